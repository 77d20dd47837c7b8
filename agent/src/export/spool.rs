//! A sink's disk spool: a bounded FIFO of formatted records (a JSON line, a
//! CEF line, ...: any bytes) in a directory of its own, so that an outage of
//! the sink or a restart of the agent loses nothing until the bound is
//! reached. The sink pushes each record, peeks a batch, delivers it and
//! acknowledges it. docs/spool.md describes the files and what survives what.
//!
//! One task owns a spool. Its I/O is plain std::fs, buffered: a push copies
//! into a buffer, a peek reads about one batch, and only sync() and the
//! occasional cursor save wait for the disk.

use std::{
    collections::VecDeque,
    fmt,
    fs::{self, File},
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::state_file::write_atomic;

/// The first bytes of every segment: the format and its version.
const SEGMENT_MAGIC: &[u8; 8] = b"TGSPOOL1";
const SEGMENT_HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
/// Before each record: its length and the CRC32 of length and record, both
/// u32 little-endian. The CRC covers the length so that a damaged length
/// (or a run of zeros left by a power loss) is not taken for a record.
const RECORD_HEADER_LEN: u64 = 8;
const MIN_SEGMENT_BYTES: u64 = 64 << 10;
const MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// Saving the cursor costs two fsyncs (0.5 ms on a local disk, several on a
/// network disk): too much for every batch at full rate. Acks save it at
/// most this often, sync() and a clean stop always; a crash replays what was
/// acknowledged since.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_secs(1);
const IO_BUFFER_BYTES: usize = 64 << 10;
/// Record buffers kept for reuse: a batch's worth at the usual batch sizes
/// (500 records, Azure's 1,000), none larger than an ordinary record.
const MAX_SPARE_BUFFERS: usize = 1024;
const MAX_SPARE_BUFFER_BYTES: usize = 16 << 10;
const CURSOR_FILE: &str = "cursor.json";
const SEGMENT_SUFFIX: &str = ".seg";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "cannot acknowledge {acked} spooled records: {peeked} were peeked and not acknowledged yet"
    )]
    NotPeeked { acked: usize, peeked: usize },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io {
        action,
        path,
        source,
    }
}

#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    /// Not stored: the spool holds too much unacknowledged; counted in
    /// `dropped()`.
    Full,
}

/// A persistent FIFO of records for one sink, bounded in bytes.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    cursor_save_interval: Duration,
    /// Segments that may hold unacknowledged records, oldest first; the last
    /// one is written to when it has a writer.
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Sealed segments written since the last sync(), for it to fsync.
    unsynced: Vec<(u64, File)>,
    /// Segment files were created since the last sync(): their directory
    /// entries need an fsync too.
    created_files: bool,
    /// The first unacknowledged record.
    acked: Position,
    /// The first record not read yet; `reader`, when open on its segment,
    /// stands there.
    read: Position,
    reader: Option<Reader>,
    /// Records read but not acknowledged, oldest first, and where each ends.
    peeked: Vec<Vec<u8>>,
    peeked_ends: Vec<Position>,
    /// How many of `peeked` the caller was given, so may acknowledge.
    returned: usize,
    /// Buffers of acknowledged records, for the next reads: at full rate
    /// the spool reads a batch after every acknowledgement.
    spare: Vec<Vec<u8>>,
    records: usize,
    /// Framed size (header and record) of the unacknowledged records: the
    /// amount `max_bytes` bounds.
    bytes: u64,
    dropped: u64,
    discarded_bytes: u64,
    saved: SavedCursor,
    saved_at: Instant,
}

struct Segment {
    seq: u64,
    /// Where the valid records end (what is written, buffered or not).
    end: u64,
    /// Records not read yet.
    unread: usize,
    writer: Option<BufWriter<File>>,
}

struct Reader {
    segment: u64,
    file: BufReader<File>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    segment: u64,
    offset: u64,
}

/// The cursor file: where the first unacknowledged record is, and the drops
/// not yet taken, so a restart neither replays delivered records nor
/// forgets a loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SavedCursor {
    segment: u64,
    offset: u64,
    dropped: u64,
}

struct Tuning {
    segment_bytes: u64,
    cursor_save_interval: Duration,
}

/// Why the rest of a segment cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    Header,
    Truncated,
    Checksum,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Damage::Header => "not a spool segment (bad header)",
            Damage::Truncated => "record runs past the end of the segment",
            Damage::Checksum => "checksum mismatch",
        })
    }
}

impl Spool {
    /// Opens the spool in `dir` (made if missing) and recovers what an
    /// earlier run left: unacknowledged records stay, in order; a torn or
    /// damaged tail of a segment is cut off, logged, counted in
    /// `discarded_bytes()` and as one drop (at least one record was lost).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let tuning = Tuning {
            segment_bytes: (max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES),
            cursor_save_interval: CURSOR_SAVE_INTERVAL,
        };
        Self::open_tuned(dir, max_bytes, tuning)
    }

    fn open_tuned(dir: &Path, max_bytes: u64, tuning: Tuning) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error("creating spool directory", dir))?;
        let saved = load_cursor(dir)?;
        let seqs = list_segments(dir)?;
        let start = saved.map_or(
            Position {
                segment: 0,
                offset: SEGMENT_HEADER_LEN,
            },
            |c| Position {
                segment: c.segment,
                offset: c.offset.max(SEGMENT_HEADER_LEN),
            },
        );
        let mut dropped = saved.map_or(0, |c| c.dropped);
        let mut discarded_bytes = 0;
        let mut segments = VecDeque::new();
        let (mut records, mut bytes) = (0, 0);
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            if seq < start.segment {
                remove_segment(&path);
                continue;
            }
            let from = if seq == start.segment {
                start.offset
            } else {
                SEGMENT_HEADER_LEN
            };
            let scan =
                scan_segment(&path, from).map_err(io_error("reading spool segment", &path))?;
            if let Some(damage) = scan.damage {
                let discarded = scan.file_len - scan.end;
                tracing::warn!(segment = %path.display(), offset = scan.end, discarded_bytes = discarded, %damage,
                    "damaged spool segment (a crash while writing?): the rest of it is discarded");
                dropped += 1;
                discarded_bytes += discarded;
                // Cut off, so the next open does not count it again.
                if let Err(error) = truncate_segment(&path, scan.end) {
                    tracing::warn!(segment = %path.display(), %error, "cannot cut off the damaged part");
                }
            }
            if scan.records == 0 {
                // Empty or all acknowledged; new records go to new segments.
                remove_segment(&path);
                continue;
            }
            records += scan.records;
            bytes += scan.end - from;
            segments.push_back(Segment {
                seq,
                end: scan.end,
                unread: scan.records,
                writer: None,
            });
        }
        let next_seq = seqs.last().map_or(0, |last| last + 1).max(start.segment);
        let acked = match segments.front() {
            Some(first) if first.seq == start.segment => start,
            Some(first) => Position {
                segment: first.seq,
                offset: SEGMENT_HEADER_LEN,
            },
            None => Position {
                segment: next_seq,
                offset: SEGMENT_HEADER_LEN,
            },
        };
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: tuning.segment_bytes,
            cursor_save_interval: tuning.cursor_save_interval,
            segments,
            next_seq,
            unsynced: Vec::new(),
            created_files: false,
            acked,
            read: acked,
            reader: None,
            peeked: Vec::new(),
            peeked_ends: Vec::new(),
            returned: 0,
            spare: Vec::new(),
            records,
            bytes,
            dropped,
            discarded_bytes,
            saved: SavedCursor {
                segment: acked.segment,
                offset: acked.offset,
                dropped,
            },
            saved_at: Instant::now(),
        };
        spool.save_cursor()?;
        Ok(spool)
    }

    /// Appends `record`, unless the unacknowledged records and it would
    /// exceed the bound. An error also means the record is not stored, and
    /// it is counted as dropped too.
    pub fn push(&mut self, record: &[u8]) -> Result<Pushed, SpoolError> {
        if !self.fits(record.len()) {
            self.dropped += 1;
            return Ok(Pushed::Full);
        }
        match self.append(record) {
            Ok(()) => Ok(Pushed::Stored),
            Err(error) => {
                self.dropped += 1;
                Err(error)
            }
        }
    }

    /// Whether a record of `len` bytes would be stored now: for a loss
    /// marker, which must not itself become a drop.
    pub fn fits(&self, len: usize) -> bool {
        u32::try_from(len).is_ok() && self.bytes + framed_len(len) <= self.max_bytes
    }

    fn append(&mut self, record: &[u8]) -> Result<(), SpoolError> {
        let framed = framed_len(record.len());
        let starts_segment = match self.segments.back() {
            Some(last) if last.writer.is_some() => {
                last.end > SEGMENT_HEADER_LEN && last.end + framed > self.segment_bytes
            }
            _ => true,
        };
        if starts_segment {
            self.start_segment()?;
        }
        let last = self
            .segments
            .back_mut()
            .expect("start_segment leaves a segment to write to");
        let writer = last
            .writer
            .as_mut()
            .expect("start_segment leaves a segment to write to");
        // fits() refused records whose length needs more than 32 bits.
        let length = (record.len() as u32).to_le_bytes();
        let mut header = [0; RECORD_HEADER_LEN as usize];
        header[..4].copy_from_slice(&length);
        header[4..].copy_from_slice(&checksum(length, record).to_le_bytes());
        if let Err(error) = writer
            .write_all(&header)
            .and_then(|()| writer.write_all(record))
        {
            let seq = last.seq;
            self.abandon_writer();
            return Err(io_error("writing spool segment", &self.segment_path(seq))(
                error,
            ));
        }
        last.end += framed;
        last.unread += 1;
        self.records += 1;
        self.bytes += framed;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        self.seal_writer()?;
        let seq = self.next_seq;
        let path = self.segment_path(seq);
        let file = File::create(&path).map_err(io_error("creating spool segment", &path))?;
        let mut writer = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        writer
            .write_all(SEGMENT_MAGIC)
            .map_err(io_error("writing spool segment", &path))?;
        self.next_seq += 1;
        self.created_files = true;
        self.segments.push_back(Segment {
            seq,
            end: SEGMENT_HEADER_LEN,
            unread: 0,
            writer: Some(writer),
        });
        Ok(())
    }

    /// Flushes the segment being written and keeps its file for sync().
    fn seal_writer(&mut self) -> Result<(), SpoolError> {
        let Some(last) = self.segments.back_mut() else {
            return Ok(());
        };
        let Some(writer) = last.writer.take() else {
            return Ok(());
        };
        match writer.into_inner() {
            Ok(file) => {
                self.unsynced.push((last.seq, file));
                Ok(())
            }
            Err(error) => {
                let seq = last.seq;
                let (error, writer) = error.into_parts();
                last.writer = Some(writer);
                self.abandon_writer();
                Err(io_error("writing spool segment", &self.segment_path(seq))(
                    error,
                ))
            }
        }
    }

    /// After a failed write: stops writing to the last segment and cuts its
    /// file to the records counted in it. Buffered records that never
    /// reached the file leave a hole there, which the reader finds and
    /// counts as dropped.
    fn abandon_writer(&mut self) {
        let Some(last) = self.segments.back_mut() else {
            return;
        };
        let Some(writer) = last.writer.take() else {
            return;
        };
        // Without flushing: the buffer holds the failed write.
        drop(writer.into_parts());
        let path = segment_path(&self.dir, last.seq);
        if let Err(error) = truncate_segment(&path, last.end) {
            tracing::warn!(segment = %path.display(), %error, "cannot cut off a failed write");
        }
    }

    /// The oldest unacknowledged records: at most `max_records` (at least
    /// one) and `max_bytes` together, but at least one record if there is
    /// any, however large. The same records come again until acknowledged.
    pub fn peek(&mut self, max_records: usize, max_bytes: usize) -> Result<&[Vec<u8>], SpoolError> {
        let max_records = max_records.max(1);
        let (mut count, mut size) = (0, 0usize);
        while count < max_records {
            if count == self.peeked.len() && !self.read_next()? {
                break;
            }
            let len = self.peeked[count].len();
            if count > 0 && size.saturating_add(len) > max_bytes {
                break;
            }
            size += len;
            count += 1;
        }
        self.returned = self.returned.max(count);
        Ok(&self.peeked[..count])
    }

    /// Reads the next record into `peeked`; false when there is none.
    fn read_next(&mut self) -> Result<bool, SpoolError> {
        loop {
            let Ok(index) = self
                .segments
                .binary_search_by_key(&self.read.segment, |s| s.seq)
            else {
                // The read position is the start of a segment not made yet.
                return Ok(false);
            };
            let segment = &mut self.segments[index];
            if self.read.offset >= segment.end {
                let Some(next) = self.segments.get(index + 1) else {
                    return Ok(false);
                };
                self.read = Position {
                    segment: next.seq,
                    offset: SEGMENT_HEADER_LEN,
                };
                continue;
            }
            if let Some(writer) = &mut segment.writer
                && !writer.buffer().is_empty()
                && let Err(error) = writer.flush()
            {
                let seq = segment.seq;
                self.abandon_writer();
                return Err(io_error("writing spool segment", &self.segment_path(seq))(
                    error,
                ));
            }
            let room = segment.end - self.read.offset;
            let mut record = self.spare.pop().unwrap_or_default();
            let reader = self.reader_at(self.read)?;
            match read_record(reader, room, &mut record) {
                Ok(Ok(framed)) => {
                    self.segments[index].unread -= 1;
                    self.read.offset += framed;
                    self.peeked.push(record);
                    self.peeked_ends.push(self.read);
                    return Ok(true);
                }
                Ok(Err(damage)) => self.discard_rest(index, damage),
                Err(error) => {
                    // Where the reader stands is unknown now.
                    self.reader = None;
                    return Err(io_error(
                        "reading spool segment",
                        &self.segment_path(self.read.segment),
                    )(error));
                }
            }
        }
    }

    fn reader_at(&mut self, at: Position) -> Result<&mut BufReader<File>, SpoolError> {
        let reader = match self.reader.take() {
            Some(reader) if reader.segment == at.segment => self.reader.insert(reader),
            _ => {
                let path = self.segment_path(at.segment);
                let mut file =
                    File::open(&path).map_err(io_error("opening spool segment", &path))?;
                file.seek(SeekFrom::Start(at.offset))
                    .map_err(io_error("reading spool segment", &path))?;
                self.reader.insert(Reader {
                    segment: at.segment,
                    file: BufReader::with_capacity(IO_BUFFER_BYTES, file),
                })
            }
        };
        Ok(&mut reader.file)
    }

    /// The segment at `index` is damaged from the read position on (it
    /// changed on disk since it was written or checked): its unread records
    /// are dropped, counted, and cut off the file.
    fn discard_rest(&mut self, index: usize, damage: Damage) {
        let at = self.read.offset;
        let segment = &mut self.segments[index];
        let lost_records = segment.unread;
        let lost_bytes = segment.end - at;
        segment.unread = 0;
        segment.end = at;
        let being_written = segment.writer.is_some();
        let path = segment_path(&self.dir, segment.seq);
        if being_written {
            self.abandon_writer();
        } else if let Err(error) = truncate_segment(&path, at) {
            tracing::warn!(segment = %path.display(), %error, "cannot cut off the damaged part");
        }
        self.reader = None;
        self.records -= lost_records;
        self.bytes -= lost_bytes;
        self.dropped += lost_records as u64;
        self.discarded_bytes += lost_bytes;
        tracing::warn!(segment = %path.display(), offset = at, %damage, lost_records,
            "damaged spool segment: its records from here on are dropped");
    }

    /// Acknowledges the first `n` records of the last peek: they are never
    /// returned again, also after a restart (see docs/spool.md for when a
    /// crash replays them). When saving the cursor fails, the records are
    /// acknowledged all the same and the error says so.
    pub fn ack(&mut self, n: usize) -> Result<(), SpoolError> {
        if n > self.returned {
            return Err(SpoolError::NotPeeked {
                acked: n,
                peeked: self.returned,
            });
        }
        if n == 0 {
            return Ok(());
        }
        self.acked = self.peeked_ends[n - 1];
        let mut freed = 0;
        for record in self.peeked.drain(..n) {
            freed += framed_len(record.len());
            if self.spare.len() < MAX_SPARE_BUFFERS && record.capacity() <= MAX_SPARE_BUFFER_BYTES {
                self.spare.push(record);
            }
        }
        self.peeked_ends.drain(..n);
        self.returned -= n;
        self.records -= n;
        self.bytes -= freed;
        self.remove_acked_segments();
        if self.saved_at.elapsed() >= self.cursor_save_interval {
            self.save_cursor()?;
        }
        Ok(())
    }

    /// Deletes the segments whose records are all acknowledged, except the
    /// one being written.
    fn remove_acked_segments(&mut self) {
        while let Some(first) = self.segments.front() {
            let all_acked = first.seq < self.acked.segment
                || (first.seq == self.acked.segment
                    && self.acked.offset >= first.end
                    && first.writer.is_none());
            if !all_acked {
                break;
            }
            let seq = first.seq;
            self.segments.pop_front();
            remove_segment(&self.segment_path(seq));
            if self.acked.segment == seq {
                self.acked = Position {
                    segment: self.segments.front().map_or(self.next_seq, |s| s.seq),
                    offset: SEGMENT_HEADER_LEN,
                };
            }
            if self.read.segment == seq {
                self.read = self.acked;
            }
            if self.reader.as_ref().is_some_and(|r| r.segment == seq) {
                self.reader = None;
            }
        }
    }

    /// Makes everything pushed so far survive a power loss, and saves the
    /// cursor if it moved.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(last) = self.segments.back_mut()
            && let Some(writer) = &mut last.writer
        {
            let seq = last.seq;
            if let Err(error) = writer.flush() {
                self.abandon_writer();
                return Err(io_error("writing spool segment", &self.segment_path(seq))(
                    error,
                ));
            }
            writer.get_ref().sync_data().map_err(io_error(
                "syncing spool segment",
                &segment_path(&self.dir, seq),
            ))?;
        }
        while let Some((seq, file)) = self.unsynced.last() {
            file.sync_data()
                .map_err(io_error("syncing spool segment", &self.segment_path(*seq)))?;
            self.unsynced.pop();
        }
        if self.created_files {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error("syncing spool directory", &self.dir))?;
            self.created_files = false;
        }
        self.save_cursor_if_moved()
    }

    /// Records refused since the last take_dropped(), and those found lost.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The drops so far, counting from zero again: for the sink to report
    /// them in one loss marker once that fits.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Bytes of damaged segment data thrown away since open, at open or
    /// while reading (the log says so too).
    #[cfg(test)]
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded_bytes
    }

    /// Unacknowledged records.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Unacknowledged bytes, with 8 bytes of framing per record: what the
    /// bound applies to.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn cursor(&self) -> SavedCursor {
        SavedCursor {
            segment: self.acked.segment,
            offset: self.acked.offset,
            dropped: self.dropped,
        }
    }

    fn save_cursor(&mut self) -> Result<(), SpoolError> {
        let cursor = self.cursor();
        let path = self.dir.join(CURSOR_FILE);
        let json = serde_json::to_vec(&cursor).expect("a struct of integers serializes");
        write_atomic(&path, &json).map_err(io_error("saving spool cursor", &path))?;
        self.saved = cursor;
        self.saved_at = Instant::now();
        Ok(())
    }

    fn save_cursor_if_moved(&mut self) -> Result<(), SpoolError> {
        if self.cursor() == self.saved {
            return Ok(());
        }
        self.save_cursor()
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        segment_path(&self.dir, seq)
    }
}

/// A clean stop keeps what was pushed and forgets what was acknowledged:
/// records go to the kernel (no fsync: they outlive the process, not a
/// power loss), and the cursor is saved.
impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(last) = self.segments.back_mut()
            && let Some(writer) = &mut last.writer
            && let Err(error) = writer.flush()
        {
            tracing::warn!(segment = %segment_path(&self.dir, last.seq).display(), %error,
                "spooled records lost at stop");
        }
        if let Err(error) = self.save_cursor_if_moved() {
            tracing::warn!(%error, "acknowledged records will be delivered again after the restart");
        }
    }
}

fn framed_len(len: usize) -> u64 {
    RECORD_HEADER_LEN + len as u64
}

fn checksum(length: [u8; 4], record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&length);
    hasher.update(record);
    hasher.finalize()
}

/// Reads one framed record into `record`, from a segment that holds `room`
/// more bytes. Returns its framed size, or the damage found instead.
fn read_record(
    input: &mut impl Read,
    room: u64,
    record: &mut Vec<u8>,
) -> io::Result<Result<u64, Damage>> {
    if room < RECORD_HEADER_LEN {
        return Ok(Err(Damage::Truncated));
    }
    let mut header = [0; RECORD_HEADER_LEN as usize];
    if let Err(damage) = read_exact_or_truncated(input, &mut header)? {
        return Ok(Err(damage));
    }
    let length = [header[0], header[1], header[2], header[3]];
    let stored_checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let framed = framed_len(u32::from_le_bytes(length) as usize);
    if framed > room {
        return Ok(Err(Damage::Truncated));
    }
    record.clear();
    record.resize((framed - RECORD_HEADER_LEN) as usize, 0);
    if let Err(damage) = read_exact_or_truncated(input, record)? {
        return Ok(Err(damage));
    }
    if checksum(length, record) != stored_checksum {
        return Ok(Err(Damage::Checksum));
    }
    Ok(Ok(framed))
}

fn read_exact_or_truncated(
    input: &mut impl Read,
    buf: &mut [u8],
) -> io::Result<Result<(), Damage>> {
    match input.read_exact(buf) {
        Ok(()) => Ok(Ok(())),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(Err(Damage::Truncated)),
        Err(error) => Err(error),
    }
}

/// What a segment holds from some offset on.
struct Scan {
    file_len: u64,
    /// Where the valid records end.
    end: u64,
    records: usize,
    damage: Option<Damage>,
}

/// Checks the header and every record from `from` on.
fn scan_segment(path: &Path, from: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut scan = Scan {
        file_len,
        end: 0,
        records: 0,
        damage: None,
    };
    if file_len == 0 {
        // Made, then the process stopped before the header left the buffer.
        return Ok(scan);
    }
    let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, file);
    let mut magic = [0; SEGMENT_MAGIC.len()];
    if read_exact_or_truncated(&mut input, &mut magic)?.is_err() || magic != *SEGMENT_MAGIC {
        scan.damage = Some(Damage::Header);
        return Ok(scan);
    }
    scan.end = from;
    if from >= file_len {
        return Ok(scan);
    }
    input.seek(SeekFrom::Start(from))?;
    let mut record = Vec::new();
    while scan.end < file_len {
        match read_record(&mut input, file_len - scan.end, &mut record)? {
            Ok(framed) => {
                scan.end += framed;
                scan.records += 1;
            }
            Err(damage) => {
                scan.damage = Some(damage);
                break;
            }
        }
    }
    Ok(scan)
}

fn truncate_segment(path: &Path, len: u64) -> io::Result<()> {
    let file = File::options().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_data()
}

/// A segment whose records are all acknowledged. Failing to delete it
/// costs only disk space until the next open, which deletes it again.
fn remove_segment(path: &Path) {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(segment = %path.display(), %error, "cannot delete an acknowledged spool segment");
        }
        _ => {}
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}{SEGMENT_SUFFIX}"))
}

/// The sequence numbers of the segments in `dir`, in order.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let entries = fs::read_dir(dir).map_err(io_error("listing spool directory", dir))?;
    let mut seqs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("listing spool directory", dir))?;
        let name = entry.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .filter(|digits| digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse().ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// The saved cursor; none when missing, or unreadable (then every spooled
/// record is delivered again: a duplicate rather than a loss).
fn load_cursor(dir: &Path) -> Result<Option<SavedCursor>, SpoolError> {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(json) => match serde_json::from_slice(&json) {
            Ok(cursor) => Ok(Some(cursor)),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error,
                    "unreadable spool cursor: every spooled record is delivered again");
                Ok(None)
            }
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(io_error("reading spool cursor", &path)(error)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scratch(name: &str) -> scopeguard::ScopeGuard<PathBuf, impl FnOnce(PathBuf)> {
        let dir = std::env::temp_dir().join(format!("tg-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        scopeguard::guard(dir, |dir| {
            let _ = fs::remove_dir_all(dir);
        })
    }

    /// Small segments, and acks that never save the cursor: rotation after
    /// a few records, and a crash that forgets exactly the acks since the
    /// last sync.
    fn tuning(segment_bytes: u64) -> Tuning {
        Tuning {
            segment_bytes,
            cursor_save_interval: Duration::MAX,
        }
    }

    fn owned(records: &[&str]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.as_bytes().to_vec()).collect()
    }

    fn numbered(count: usize, len: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("{i:0len$}").into_bytes())
            .collect()
    }

    fn push_all(spool: &mut Spool, records: &[Vec<u8>]) {
        for record in records {
            assert_eq!(spool.push(record).unwrap(), Pushed::Stored);
        }
    }

    fn all(spool: &mut Spool) -> Vec<Vec<u8>> {
        spool.peek(usize::MAX, usize::MAX).unwrap().to_vec()
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(SEGMENT_SUFFIX))
            .collect();
        names.sort();
        names
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn records_come_out_in_order_until_acknowledged() {
        let dir = scratch("order");
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert!(spool.is_empty());
        assert!(spool.peek(10, 1000).unwrap().is_empty());
        push_all(&mut spool, &owned(&["one", "two", "three"]));
        assert_eq!((spool.len(), spool.bytes()), (3, 3 * 8 + 11));

        assert_eq!(spool.peek(2, usize::MAX).unwrap(), owned(&["one", "two"]));
        assert_eq!(spool.peek(10, 5).unwrap(), owned(&["one"]));
        assert_eq!(
            spool.peek(10, 0).unwrap(),
            owned(&["one"]),
            "one record even when it alone is over max_bytes"
        );
        assert_eq!(spool.peek(0, usize::MAX).unwrap(), owned(&["one"]));
        assert_eq!(all(&mut spool), owned(&["one", "two", "three"]));

        spool.ack(2).unwrap();
        assert_eq!((spool.len(), spool.bytes()), (1, 8 + 5));
        assert_eq!(all(&mut spool), owned(&["three"]));
        push_all(&mut spool, &owned(&["four"]));
        assert_eq!(all(&mut spool), owned(&["three", "four"]));
        spool.ack(2).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(all(&mut spool).is_empty());
    }

    #[test]
    fn only_peeked_records_can_be_acknowledged() {
        let dir = scratch("ack");
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &owned(&["a", "b", "c"]));
        spool.peek(1, usize::MAX).unwrap();
        assert!(matches!(
            spool.ack(2),
            Err(SpoolError::NotPeeked {
                acked: 2,
                peeked: 1
            })
        ));
        spool.ack(1).unwrap();
        assert!(spool.ack(1).is_err());
        assert_eq!(all(&mut spool), owned(&["b", "c"]));
    }

    #[test]
    fn a_clean_restart_keeps_the_unacknowledged_and_forgets_the_acknowledged() {
        let dir = scratch("restart");
        let records = numbered(5, 3);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &records);
        spool.peek(2, usize::MAX).unwrap();
        spool.ack(2).unwrap();
        drop(spool);

        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!((spool.len(), spool.bytes()), (3, 3 * (8 + 3)));
        assert_eq!(all(&mut spool), records[2..]);
        // Peeked and not acknowledged: comes again.
        spool.ack(1).unwrap();
        drop(spool);

        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(all(&mut spool), records[3..]);
        push_all(&mut spool, &owned(&["new"]));
        assert_eq!(all(&mut spool)[2], b"new");
    }

    #[test]
    fn a_crash_replays_acks_since_the_last_sync_and_loses_buffered_records() {
        let dir = scratch("crash");
        let records = numbered(4, 10);
        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(1 << 20)).unwrap();
        push_all(&mut spool, &records[..3]);
        spool.sync().unwrap();
        spool.peek(1, usize::MAX).unwrap();
        spool.ack(1).unwrap();
        push_all(&mut spool, &records[3..]);
        // kill -9: no destructor, the write buffer is lost.
        std::mem::forget(spool);

        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(1 << 20)).unwrap();
        assert_eq!(all(&mut spool), records[..3]);
        assert_eq!(spool.dropped(), 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_counted_once() {
        let dir = scratch("torn");
        let records = numbered(3, 20);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &records);
        drop(spool);
        let segment = dir.join(&segment_files(&dir)[0]);
        let intact_len = fs::metadata(&segment).unwrap().len();

        for tail in [&[100, 0, 0][..], &[100, 0, 0, 0, 1, 2, 3, 4, b'x', b'y']] {
            let mut file = File::options().append(true).open(&segment).unwrap();
            file.write_all(tail).unwrap();
            drop(file);

            let mut spool = Spool::open(&dir, 1 << 20).unwrap();
            assert_eq!(all(&mut spool), records);
            assert_eq!(spool.discarded_bytes(), tail.len() as u64);
            assert_eq!(spool.take_dropped(), 1, "a torn record is one lost");
            assert_eq!(fs::metadata(&segment).unwrap().len(), intact_len);
        }
        let spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!((spool.dropped(), spool.discarded_bytes()), (0, 0));
    }

    #[test]
    fn a_damaged_record_loses_the_rest_of_its_segment_only() {
        let dir = scratch("damaged");
        // 28 bytes framed: three records to a segment of 100.
        let records = numbered(10, 20);
        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(100)).unwrap();
        push_all(&mut spool, &records);
        drop(spool);
        let files = segment_files(&dir);
        assert_eq!(files.len(), 4);
        // The second record of the second segment, in its payload.
        flip_byte(&dir.join(&files[1]), 8 + 28 + 8 + 5);

        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(100)).unwrap();
        let mut expected = records[..4].to_vec();
        expected.extend_from_slice(&records[6..]);
        assert_eq!(all(&mut spool), expected);
        assert_eq!((spool.dropped(), spool.discarded_bytes()), (1, 2 * 28));
        assert_eq!(spool.len(), 8);
    }

    #[test]
    fn damage_found_while_reading_drops_exactly_the_records_after_it() {
        let dir = scratch("damaged-read");
        let records = numbered(6, 20);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &records);
        spool.sync().unwrap();
        let segment = dir.join(&segment_files(&dir)[0]);
        flip_byte(&segment, 8 + 3 * 28 + 2);

        assert_eq!(all(&mut spool), records[..3]);
        assert_eq!((spool.len(), spool.dropped()), (3, 3));
        assert_eq!(spool.bytes(), 3 * 28);
        assert_eq!(fs::metadata(&segment).unwrap().len(), 8 + 3 * 28);
        // Writing goes on in a new segment.
        push_all(&mut spool, &owned(&["after"]));
        assert_eq!(all(&mut spool)[3], b"after");
        drop(spool);

        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(all(&mut spool).len(), 4);
        assert_eq!(spool.dropped(), 3);
    }

    #[test]
    fn a_full_spool_refuses_and_counts_until_records_are_acknowledged() {
        let dir = scratch("full");
        let record = vec![b'r'; 100];
        let mut spool = Spool::open(&dir, 3 * 108).unwrap();
        push_all(
            &mut spool,
            &[record.clone(), record.clone(), record.clone()],
        );
        assert_eq!(spool.push(&record).unwrap(), Pushed::Full);
        assert_eq!(spool.push(b"").unwrap(), Pushed::Full);
        assert!(!spool.fits(0));
        assert_eq!((spool.len(), spool.dropped()), (3, 2));

        spool.peek(1, usize::MAX).unwrap();
        spool.ack(1).unwrap();
        assert!(spool.fits(100) && !spool.fits(101));
        assert_eq!(spool.push(&record).unwrap(), Pushed::Stored);
        assert_eq!(spool.take_dropped(), 2);
        assert_eq!(spool.take_dropped(), 0);
        drop(spool);

        let mut spool = Spool::open(&dir, 100).unwrap();
        assert_eq!(
            all(&mut spool).len(),
            3,
            "a smaller bound keeps what is there"
        );
        let dir = scratch("full-empty");
        let mut spool = Spool::open(&dir, 108).unwrap();
        assert_eq!(spool.push(&[0; 101]).unwrap(), Pushed::Full);
        assert_eq!(spool.push(&record).unwrap(), Pushed::Stored);
    }

    #[test]
    fn drops_not_taken_survive_a_restart() {
        let dir = scratch("dropped");
        let mut spool = Spool::open(&dir, 10).unwrap();
        assert_eq!(
            spool.push(b"a record of more than ten").unwrap(),
            Pushed::Full
        );
        drop(spool);
        let mut spool = Spool::open(&dir, 10).unwrap();
        assert_eq!(spool.take_dropped(), 1);
        drop(spool);
        assert_eq!(Spool::open(&dir, 10).unwrap().dropped(), 0);
    }

    #[test]
    fn records_are_any_bytes() {
        let dir = scratch("bytes");
        let records = vec![
            b"".to_vec(),
            b"\n".to_vec(),
            b"a\nb\r\n".to_vec(),
            vec![0; 5],
            (0..=255).collect(),
            b"".to_vec(),
            // Larger than the write buffer and than a segment.
            vec![0xff; 70_000],
            b"{\"type\":\"flow\"}\n".to_vec(),
        ];
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &records);
        assert_eq!(all(&mut spool), records);
        drop(spool);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(all(&mut spool), records);
        assert_eq!(spool.discarded_bytes(), 0);
    }

    #[test]
    fn segments_rotate_and_acknowledged_ones_are_deleted() {
        let dir = scratch("segments");
        let records = numbered(7, 20);
        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(100)).unwrap();
        push_all(&mut spool, &records);
        assert_eq!(
            segment_files(&dir),
            [
                "0000000000000000.seg",
                "0000000000000001.seg",
                "0000000000000002.seg"
            ]
        );
        spool.sync().unwrap();
        for name in &segment_files(&dir)[..2] {
            assert_eq!(fs::metadata(dir.join(name)).unwrap().len(), 8 + 3 * 28);
        }

        let first_segment = dir.join("0000000000000000.seg");
        let first_segment_bytes = fs::read(&first_segment).unwrap();
        spool.peek(3, usize::MAX).unwrap();
        spool.ack(2).unwrap();
        assert_eq!(
            segment_files(&dir).len(),
            3,
            "segment 0 is not all acknowledged"
        );
        spool.ack(1).unwrap();
        assert_eq!(segment_files(&dir)[0], "0000000000000001.seg");
        assert_eq!(all(&mut spool), records[3..]);
        spool.ack(4).unwrap();
        assert_eq!(
            segment_files(&dir),
            ["0000000000000002.seg"],
            "the segment being written stays"
        );
        drop(spool);
        // A power loss can undo a delete; the cursor says it was done.
        fs::write(&first_segment, first_segment_bytes).unwrap();

        let mut spool = Spool::open_tuned(&dir, 1 << 20, tuning(100)).unwrap();
        assert!(segment_files(&dir).is_empty());
        assert!(all(&mut spool).is_empty());
        push_all(&mut spool, &owned(&["next"]));
        assert_eq!(segment_files(&dir), ["0000000000000003.seg"]);
        assert_eq!(all(&mut spool), owned(&["next"]));
    }

    #[test]
    fn an_unreadable_cursor_delivers_everything_again() {
        let dir = scratch("cursor");
        let records = numbered(3, 4);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        push_all(&mut spool, &records);
        spool.peek(1, usize::MAX).unwrap();
        spool.ack(1).unwrap();
        drop(spool);
        fs::write(dir.join(CURSOR_FILE), b"{\"segm").unwrap();
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(all(&mut spool), records);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push(Vec<u8>),
        Peek {
            max_records: usize,
            max_bytes: usize,
        },
        /// Of what was peeked, modulo.
        Ack(usize),
        TakeDropped,
        Sync,
        Reopen,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::collection::vec(any::<u8>(), 0..120).prop_map(Op::Push),
            3 => (0..8usize, 0..400usize).prop_map(|(max_records, max_bytes)| Op::Peek { max_records, max_bytes }),
            3 => any::<usize>().prop_map(Op::Ack),
            1 => Just(Op::TakeDropped),
            1 => Just(Op::Sync),
            1 => Just(Op::Reopen),
            1 => Just(Op::Crash),
        ]
    }

    /// What the spool must hold: a queue with a byte bound.
    struct Model {
        /// Every record stored, in order; the first `acked` are acknowledged.
        stored: Vec<Vec<u8>>,
        acked: usize,
        returned: usize,
        dropped: u64,
        /// As of the last sync or open: what a crash cannot take back.
        synced_acked: usize,
        synced_stored: usize,
        synced_dropped: u64,
    }

    impl Model {
        fn unacked(&self) -> &[Vec<u8>] {
            &self.stored[self.acked..]
        }

        fn bytes(&self) -> u64 {
            self.unacked().iter().map(|r| framed_len(r.len())).sum()
        }

        fn peek(&self, max_records: usize, max_bytes: usize) -> &[Vec<u8>] {
            let mut size = 0;
            let count = self
                .unacked()
                .iter()
                .take(max_records.max(1))
                .enumerate()
                .take_while(|(i, r)| {
                    size += r.len();
                    *i == 0 || size <= max_bytes
                })
                .count();
            &self.unacked()[..count]
        }

        fn synced(&mut self) {
            self.synced_acked = self.acked;
            self.synced_stored = self.stored.len();
            self.synced_dropped = self.dropped;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn agrees_with_an_in_memory_queue(
            max_bytes in 0..1500u64,
            segment_bytes in 16..400u64,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let dir = scratch("model");
            let open = || Spool::open_tuned(&dir, max_bytes, tuning(segment_bytes)).unwrap();
            let mut spool = open();
            let mut model = Model {
                stored: Vec::new(),
                acked: 0,
                returned: 0,
                dropped: 0,
                synced_acked: 0,
                synced_stored: 0,
                synced_dropped: 0,
            };
            for op in ops {
                match op {
                    Op::Push(record) => {
                        let expected = if model.bytes() + framed_len(record.len()) <= max_bytes {
                            model.stored.push(record.clone());
                            Pushed::Stored
                        } else {
                            model.dropped += 1;
                            Pushed::Full
                        };
                        prop_assert_eq!(spool.push(&record).unwrap(), expected);
                    }
                    Op::Peek { max_records, max_bytes } => {
                        let expected = model.peek(max_records, max_bytes);
                        prop_assert_eq!(spool.peek(max_records, max_bytes).unwrap(), expected);
                        model.returned = model.returned.max(expected.len());
                    }
                    Op::Ack(n) => {
                        let n = n % (model.returned + 1);
                        spool.ack(n).unwrap();
                        model.acked += n;
                        model.returned -= n;
                    }
                    Op::TakeDropped => {
                        prop_assert_eq!(spool.take_dropped(), model.dropped);
                        model.dropped = 0;
                    }
                    Op::Sync => {
                        spool.sync().unwrap();
                        model.synced();
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = open();
                        model.returned = 0;
                        model.synced();
                    }
                    Op::Crash => {
                        std::mem::forget(spool);
                        spool = open();
                        let recovered = all(&mut spool);
                        // Acks since the last sync come back, records pushed
                        // since then may be lost from the end.
                        let first = (model.synced_acked..=model.acked).find(|&first| {
                            let end = first + recovered.len();
                            end >= model.synced_stored
                                && end <= model.stored.len()
                                && model.stored[first..end] == recovered[..]
                        });
                        prop_assert!(first.is_some(), "recovered {:?}", recovered);
                        let first = first.unwrap();
                        prop_assert!(
                            spool.dropped() == model.synced_dropped
                                || spool.dropped() == model.synced_dropped + 1,
                            "a torn record at most is counted"
                        );
                        model.stored.truncate(first + recovered.len());
                        model.acked = first;
                        model.returned = recovered.len();
                        model.dropped = spool.dropped();
                        model.synced();
                    }
                }
                prop_assert_eq!(spool.len(), model.unacked().len());
                prop_assert_eq!(spool.bytes(), model.bytes());
                prop_assert_eq!(spool.dropped(), model.dropped);
            }
        }
    }
}
