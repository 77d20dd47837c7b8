//! JSON lines: one flow record per line.

use std::io::{self, Write};

use serde::Serialize;

pub struct JsonLines<W: Write> {
    out: W,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_line() {
        let mut lines = JsonLines::new(Vec::new());
        lines.write(&serde_json::json!({"a": 1})).unwrap();
        lines.write(&serde_json::json!({"b": "x\ny"})).unwrap();
        assert_eq!(
            String::from_utf8(lines.out).unwrap(),
            "{\"a\":1}\n{\"b\":\"x\\ny\"}\n"
        );
    }
}
