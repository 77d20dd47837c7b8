//! Files in --state-dir, written so that a reader (or a crash) sees the old
//! file or the new one, never a part.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
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
}
