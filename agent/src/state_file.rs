//! Files in --state-dir, written so that a reader (or a crash) sees the old
//! file or the new one, never a part.

use std::{io::Write, path::Path};

pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("state file in a directory");
    std::fs::create_dir_all(dir)?;
    let mut temporary_name = path.file_name().expect("state file has a name").to_owned();
    temporary_name.push(".tmp");
    let temporary = dir.join(temporary_name);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
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
