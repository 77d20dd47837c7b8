//! Files in --state-dir, written so that a reader (or a crash) sees the old
//! file or the new one, never a part; and journals, appended to one record
//! at a time, of which a reader (or a crash) sees whole records only.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |file| file.write_all(contents))
}

/// [`write_atomic`], the contents written by `write` (buffered): a large
/// state need not be built in memory first. The writer's type is concrete
/// so that a serializer's many small writes inline into the buffer.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().expect("state file in a directory");
    std::fs::create_dir_all(dir)?;
    let mut temporary_name = path.file_name().expect("state file has a name").to_owned();
    temporary_name.push(".tmp");
    let temporary = dir.join(temporary_name);
    let mut file = BufWriter::new(File::create(&temporary)?);
    write(&mut file)?;
    let file = file
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    File::open(dir)?.sync_all()
}

/// An append-only file of records, each `[length: u32 LE][crc32 of the
/// payload: u32 LE][payload]`, made durable one by one (`fdatasync` of the
/// appended record only). A record cut short by a crash, or one whose
/// checksum does not hold, ends the journal: it and anything after it are
/// ignored when read, and cut off before the next append.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of whole, valid records.
    len: u64,
    /// Whole, valid records.
    records: usize,
}

/// Header of each journal record: length and checksum of the payload.
const RECORD_HEADER: usize = 8;

/// A record larger than this is taken for garbage (a torn length).
const MAX_RECORD: u32 = 1 << 30;

impl Journal {
    /// Reads the records of the journal at `path` (none if it does not
    /// exist) and opens it for appending after the last whole one. The
    /// second value says whether a torn or corrupt tail was cut off.
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<Vec<u8>>, bool)> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let (records, valid) = read_records(&bytes);
        let torn = valid < bytes.len();
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if torn {
            file.set_len(valid as u64)?;
            file.sync_data()?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
                len: valid as u64,
                records: records.len(),
            },
            records,
            torn,
        ))
    }

    /// Starts the journal anew with `first` as its only record: written
    /// beside it and renamed over it, so a crash leaves the old journal
    /// or the new one.
    pub fn replace(path: &Path, first: &[u8]) -> std::io::Result<Self> {
        let framed = frame(first);
        write_atomic(path, &framed)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            len: framed.len() as u64,
            records: 1,
        })
    }

    /// Appends one record and waits until it is on disk. After an error
    /// the journal may end in a part of it, which a reader ignores; the
    /// caller should [`Journal::replace`] it.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let framed = frame(payload);
        self.file.write_all(&framed)?;
        self.file.sync_data()?;
        self.len += framed.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Whole records in the journal.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes of the records in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a journal record under 4 GiB");
    let mut framed = Vec::with_capacity(RECORD_HEADER + payload.len());
    framed.extend_from_slice(&len.to_le_bytes());
    framed.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    framed.extend_from_slice(payload);
    framed
}

/// The whole, valid records of `bytes`, and how many bytes they take.
fn read_records(bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + RECORD_HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            break;
        }
        let start = at + RECORD_HEADER;
        let Some(payload) = bytes.get(start..start + len as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        at = start + len as usize;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tg-state-file-{}", std::process::id()));
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    fn temporary_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_journal_gives_back_its_records_in_order_after_a_reopen() {
        let dir = temporary_dir("journal-order");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("state.journal");
        let (mut journal, records, torn) = Journal::open(&path).unwrap();
        assert!(records.is_empty() && !torn && journal.is_empty());
        for record in [&b"one"[..], b"", b"three"] {
            journal.append(record).unwrap();
        }
        assert_eq!(journal.len(), 3 * 8 + 8);
        drop(journal);
        let (mut journal, records, torn) = Journal::open(&path).unwrap();
        assert_eq!(records, [&b"one"[..], b"", b"three"]);
        assert!(!torn);
        journal.append(b"four").unwrap();
        let (_, records, _) = Journal::open(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3], b"four");
    }

    #[test]
    fn a_torn_last_record_is_ignored_at_every_cut_and_cut_off() {
        let dir = temporary_dir("journal-torn");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("state.journal");
        let (mut journal, _, _) = Journal::open(&path).unwrap();
        journal.append(b"first").unwrap();
        journal.append(b"second record").unwrap();
        let whole = std::fs::read(&path).unwrap();
        let first_end = 8 + 5;
        // A crash may leave any prefix of the last record's bytes.
        for cut in first_end..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (mut journal, records, torn) = Journal::open(&path).unwrap();
            assert_eq!(records, [b"first"], "cut at {cut}");
            assert_eq!(torn, cut > first_end, "cut at {cut}");
            assert_eq!(journal.len(), first_end as u64);
            // Appends go after the last whole record, not after the torn part.
            journal.append(b"again").unwrap();
            let (_, records, torn) = Journal::open(&path).unwrap();
            assert_eq!(records, [&b"first"[..], b"again"], "cut at {cut}");
            assert!(!torn);
        }
    }

    #[test]
    fn a_record_whose_checksum_fails_ends_the_journal() {
        let dir = temporary_dir("journal-crc");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("state.journal");
        let (mut journal, _, _) = Journal::open(&path).unwrap();
        for record in [&b"one"[..], b"two", b"three"] {
            journal.append(record).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        // A flipped bit in the second record's payload.
        bytes[8 + 3 + 8] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (_, records, torn) = Journal::open(&path).unwrap();
        assert_eq!(records, [b"one"]);
        assert!(torn);
        // A length past any sane record is garbage too.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 12]);
        std::fs::write(&path, &bytes).unwrap();
        let (_, records, torn) = Journal::open(&path).unwrap();
        assert_eq!(records, [b"one"]);
        assert!(torn);
    }

    #[test]
    fn a_replaced_journal_holds_only_its_first_record() {
        let dir = temporary_dir("journal-replace");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let path = dir.join("state.journal");
        let (mut journal, _, _) = Journal::open(&path).unwrap();
        journal.append(b"old").unwrap();
        let mut journal = Journal::replace(&path, b"header").unwrap();
        journal.append(b"new").unwrap();
        let (_, records, _) = Journal::open(&path).unwrap();
        assert_eq!(records, [&b"header"[..], b"new"]);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
