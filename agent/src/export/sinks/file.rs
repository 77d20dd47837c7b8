//! JSON lines (or any one-line format) on stdout or in a file with
//! size-based rotation, for the Azure Monitor Agent, Fluent Bit or Vector to
//! pick up.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

/// Where lines go.
pub enum LineTarget {
    Stdout(io::Stdout),
    File(RotatingFile),
}

impl LineTarget {
    /// Writes each record on its own line; flushed before returning.
    pub fn write_batch(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        match self {
            Self::Stdout(stdout) => {
                let mut out = stdout.lock();
                for record in records {
                    out.write_all(record)?;
                    out.write_all(b"\n")?;
                }
                out.flush()
            }
            Self::File(file) => file.write_batch(records),
        }
    }
}

/// `path` is written until it would pass `max_bytes`; then it becomes
/// `path.1` (and `path.1` becomes `path.2`, ...), keeping `max_files`
/// rotated files. A record is never split across files.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
    /// A batch's lines, written with one call; kept from batch to batch.
    buffer: Vec<u8>,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            max_files,
            file,
            size,
            buffer: Vec::new(),
        })
    }

    pub fn write_batch(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let written = self.write_lines(records, &mut buffer);
        self.buffer = buffer;
        written
    }

    fn write_lines(&mut self, records: &[Vec<u8>], buffer: &mut Vec<u8>) -> io::Result<()> {
        for record in records {
            let line = record.len() as u64 + 1;
            if self.size > 0 && self.size + buffer.len() as u64 + line > self.max_bytes {
                self.file.write_all(buffer)?;
                buffer.clear();
                self.rotate()?;
            }
            buffer.extend_from_slice(record);
            buffer.push(b'\n');
        }
        self.file.write_all(buffer)?;
        self.size += buffer.len() as u64;
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        if self.max_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.max_files).rev() {
                match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_keeps_max_files_and_never_splits_a_line() {
        let dir = std::env::temp_dir().join(format!("tg-rotate-{}", std::process::id()));
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("flows.jsonl");
        let mut file = RotatingFile::open(&path, 20, 2).unwrap();
        let record = |n: u8| vec![b'a' + n; 9]; // 10 bytes with its newline
        for n in 0..7 {
            file.write_batch(&[record(n)]).unwrap();
        }
        // 7 records of 10 bytes, 2 per file: current holds g, .1 e f, .2 c d; a b are gone.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "ggggggggg\n");
        assert_eq!(read(&file.rotated(1)), "eeeeeeeee\nfffffffff\n");
        assert_eq!(read(&file.rotated(2)), "ccccccccc\nddddddddd\n");
        assert!(!file.rotated(3).exists());

        // A batch is split at record boundaries too, and reopening appends.
        drop(file);
        let mut file = RotatingFile::open(&path, 20, 2).unwrap();
        file.write_batch(&[record(7), record(8)]).unwrap();
        assert_eq!(read(&path), "iiiiiiiii\n");
        assert_eq!(read(&file.rotated(1)), "ggggggggg\nhhhhhhhhh\n");
    }
}
