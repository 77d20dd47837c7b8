//! Delivery: the publisher (on the task that reads the ring buffer) formats
//! and encodes each record once per sink and hands it to that sink's queue
//! without waiting; each sink's tasks move its queue into its disk spool and
//! send batches from the spool, in order, retrying with backoff, so a slow
//! or dead receiver holds up nothing but its own sink. Whatever cannot be
//! kept is counted and reported in the sink's stream as a loss marker.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, task::JoinSet};
use tracing::{info, warn};

use super::{
    config::{SinkConfig, SinkFilter, Target},
    format::{self, Format},
    record::{LossReason, LossRecord, Record},
    sinks::{
        Encoded, Encoder, RecordMeta, SendError, Transport,
        file::{LineTarget, RotatingFile},
        http::HttpSender,
        syslog::SyslogSender,
    },
    spool::{Pushed, Spool, SpoolError},
};
use crate::flow::{WallClock, rfc3339_nanos};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("sink {sink}: {message}")]
    Setup { sink: String, message: String },
    #[error("sink {sink}: {source}")]
    Spool { sink: String, source: SpoolError },
}

/// Records a sink's queue holds before the publisher counts drops: about a
/// third of a second at 200,000 records/s, so a spool write stall does not
/// lose records.
const QUEUE_RECORDS: usize = 65_536;
/// Queue buffer kept between intakes: a few milliseconds at full rate. A
/// burst grows it; the intake gives the excess back afterwards.
const QUEUE_KEPT_BYTES: usize = 1 << 20;
/// How often the intake makes the spool durable.
const SYNC_INTERVAL: Duration = Duration::from_millis(200);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Spool space kept free of records for the loss marker, so that a loss is
/// reported even when the spool stays full until the agent stops.
const LOSS_MARKER_RESERVE: usize = 4096;
/// A Retry-After beyond this is not believed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Counters of one sink, shared with its tasks and with metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub delivered: AtomicU64,
    /// Records that never reached the spool (queue or spool full).
    pub dropped: AtomicU64,
    /// Records the receiver refused for good.
    pub rejected: AtomicU64,
    /// Records sent cut to the sink's message size (syslog over UDP).
    pub truncated: AtomicU64,
    pub send_failures: AtomicU64,
    pub queued_records: AtomicU64,
    pub spooled_records: AtomicU64,
    pub spooled_bytes: AtomicU64,
}

impl SinkStats {
    fn note(&self, encoded: Encoded) {
        if encoded == Encoded::Truncated {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn spool_is(&self, spool: &Spool) {
        self.spooled_records
            .store(spool.len() as u64, Ordering::Relaxed);
        self.spooled_bytes.store(spool.bytes(), Ordering::Relaxed);
    }
}

/// Records lost on their way into one sink, waiting to be reported: one
/// gap in the sink's stream, named by its first cause.
#[derive(Debug, Default)]
struct Lost {
    reason: Option<LossReason>,
    count: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

impl Lost {
    fn note(&mut self, reason: LossReason, count: u64, seq: Option<u64>) {
        self.reason.get_or_insert(reason);
        self.count += count;
        if let Some(seq) = seq {
            self.first_seq.get_or_insert(seq);
            self.last_seq = Some(seq);
        }
    }
}

/// Records waiting for a sink's intake: their wire forms end to end in one
/// buffer, so queueing a record allocates nothing, and the intake takes
/// all of them at once.
#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    /// Per record: its `seq` and where it ends in `bytes`.
    ends: Vec<(Option<u64>, usize)>,
}

impl Queued {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (Option<u64>, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(seq, end), start)| (seq, &self.bytes[start..end]))
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// A sink's queue, between the publisher and the sink's intake.
#[derive(Default)]
struct Queue {
    queued: Mutex<Queued>,
    /// Rung when a record arrives in an empty queue, and at the close.
    arrived: Notify,
    /// The publisher is gone: nothing more will come.
    closed: AtomicBool,
}

impl Queue {
    /// Swaps what is queued into `taken` (which must be empty); true when
    /// the queue is closed and `taken` holds the last of it.
    fn take(&self, taken: &mut Queued) -> bool {
        // Read first: whatever came before the close is in this take.
        let closed = self.closed.load(Ordering::Acquire);
        std::mem::swap(&mut *self.queued.lock().expect("not poisoned"), taken);
        closed
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.arrived.notify_one();
    }
}

struct SinkInput {
    name: String,
    format: Format,
    filter: SinkFilter,
    encoder: Encoder,
    queue: Arc<Queue>,
    /// Shared with the intake, which reports it.
    lost: Arc<Mutex<Lost>>,
    stats: Arc<SinkStats>,
}

/// The publishing side. Dropping it ends the sinks' queues: they drain into
/// their spools and deliver what they can (`Exporter::drain`).
pub struct Exporter {
    sinks: Vec<SinkInput>,
    instance: String,
    payload: Vec<u8>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        for sink in &self.sinks {
            sink.queue.close();
        }
    }
}

/// The sinks' tasks, to wait for after the exporter is dropped.
pub struct SinkTasks(JoinSet<()>);

impl SinkTasks {
    /// Waits until every sink has spooled its queue and sent what it could,
    /// at most `deadline`; what is not sent stays spooled for the next start.
    pub async fn drain(mut self, deadline: Duration) {
        let drained = tokio::time::timeout(deadline, async {
            while self.0.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("sinks still delivering after {deadline:?}; the rest stays spooled");
            self.0.abort_all();
        }
    }
}

/// Per-sink shared state, for metrics.
pub type StatsBySink = Vec<(String, Arc<SinkStats>)>;

impl Exporter {
    /// Opens every sink (spool under `state_dir/spool/<name>`) and starts its
    /// tasks; contacts no receiver yet.
    pub fn start(
        sinks: Vec<SinkConfig>,
        state_dir: &Path,
        node: &str,
    ) -> Result<(Self, SinkTasks, StatsBySink), ExportError> {
        let instance = WallClock::now().unix_nanos(0).to_string();
        let mut tasks = JoinSet::new();
        let mut inputs = Vec::new();
        let mut stats_by_sink = Vec::new();
        for config in sinks {
            let setup = |message: String| ExportError::Setup {
                sink: config.name.clone(),
                message,
            };
            let (encoder, transport) = match &config.target {
                Target::Stdout => (
                    Encoder::Lines,
                    Transport::Lines(LineTarget::Stdout(std::io::stdout())),
                ),
                Target::File {
                    path,
                    max_file_bytes,
                    max_files,
                } => (
                    Encoder::Lines,
                    Transport::Lines(LineTarget::File(
                        RotatingFile::open(path, *max_file_bytes, *max_files)
                            .map_err(|e| setup(format!("{}: {e}", path.display())))?,
                    )),
                ),
                Target::Syslog {
                    address,
                    facility,
                    framing,
                    max_message_bytes,
                    ca_file,
                } => (
                    Encoder::Syslog {
                        facility: *facility,
                        max_message_bytes: *max_message_bytes,
                    },
                    Transport::Syslog(
                        SyslogSender::new(address.clone(), *framing, ca_file.as_deref())
                            .map_err(|e| setup(e.to_string()))?,
                    ),
                ),
                Target::Http { api, gzip, ca_file } => (
                    Encoder::Http(api.clone()),
                    Transport::Http(
                        HttpSender::new(&config.name, api.clone(), *gzip, ca_file.as_deref())
                            .map_err(setup)?,
                    ),
                ),
            };
            let queue = Arc::new(Queue::default());
            let lost = Arc::new(Mutex::new(Lost::default()));
            let stats = Arc::new(SinkStats::default());
            let worker = SinkWorker {
                name: config.name.clone(),
                format: config.format,
                encoder: encoder.clone(),
                node: node.to_owned(),
                instance: instance.clone(),
                lost: lost.clone(),
                stats: stats.clone(),
                batch_records: config.batch_records,
            };
            if config.spool_bytes == 0 {
                tasks.spawn(worker.deliver_from_queue(queue.clone(), transport));
            } else {
                let dir = state_dir.join("spool").join(&config.name);
                let spool =
                    Spool::open(&dir, config.spool_bytes).map_err(|source| ExportError::Spool {
                        sink: config.name.clone(),
                        source,
                    })?;
                if !spool.is_empty() {
                    info!(
                        sink = config.name,
                        records = spool.len(),
                        "spooled records from the last run will be sent first"
                    );
                }
                let spool = Arc::new(Mutex::new(spool));
                let arrived = Arc::new(Notify::new());
                let worker = Arc::new(worker);
                let (intake_done_tx, intake_done) = tokio::sync::watch::channel(false);
                tasks.spawn(worker.clone().intake(
                    queue.clone(),
                    spool.clone(),
                    arrived.clone(),
                    intake_done_tx,
                ));
                tasks.spawn(worker.deliver_from_spool(spool, arrived, intake_done, transport));
            }
            stats_by_sink.push((config.name.clone(), stats.clone()));
            inputs.push(SinkInput {
                name: config.name,
                format: config.format,
                filter: config.filter,
                encoder,
                queue,
                lost,
                stats,
            });
        }
        Ok((
            Self {
                sinks: inputs,
                instance,
                payload: Vec::with_capacity(2048),
            },
            SinkTasks(tasks),
            stats_by_sink,
        ))
    }

    /// Hands a record to every sink whose filter takes it. Never waits: a
    /// full queue counts the record as lost for that sink.
    pub fn publish(&mut self, record: Record<'_, '_>, meta: &RecordMeta) {
        let (verdict, namespace, destination) = match record {
            Record::Flow(flow) => (Some(flow.verdict), flow.src.namespace, Some(flow.dst.ip)),
            Record::Dns(dns) => (None, dns.src.namespace, Some(dns.resolver.ip)),
            Record::Loss(_) => (None, None, None),
        };
        let mut formatted: Option<Format> = None;
        for sink in &self.sinks {
            let passes = match destination {
                Some(ip) => sink.filter.passes(verdict, namespace, ip),
                None => true,
            };
            if !passes {
                continue;
            }
            // Sinks of one format share the formatting.
            if formatted != Some(sink.format) {
                self.payload.clear();
                format::write(sink.format, record, &self.instance, &mut self.payload);
                formatted = Some(sink.format);
            }
            let mut queued = sink.queue.queued.lock().expect("not poisoned");
            if queued.len() >= QUEUE_RECORDS {
                drop(queued);
                sink.stats.dropped.fetch_add(1, Ordering::Relaxed);
                let mut lost = sink.lost.lock().expect("not poisoned");
                lost.note(LossReason::QueueFull, 1, meta.seq);
                continue;
            }
            // Encoded straight into the queue.
            let encoded = sink.encoder.encode(
                meta,
                &self.payload,
                sink.format != Format::Cef,
                &self.instance,
                &mut queued.bytes,
            );
            let end = queued.bytes.len();
            queued.ends.push((meta.seq, end));
            let records = queued.len();
            drop(queued);
            sink.stats.note(encoded);
            sink.stats
                .queued_records
                .store(records as u64, Ordering::Relaxed);
            // The intake takes the whole queue: one wakeup for all records
            // that arrive before it runs.
            if records == 1 {
                sink.queue.arrived.notify_one();
            }
        }
    }

    pub fn sink_names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|s| s.name.as_str())
    }
}

/// What a sink's tasks share.
struct SinkWorker {
    name: String,
    format: Format,
    encoder: Encoder,
    node: String,
    instance: String,
    lost: Arc<Mutex<Lost>>,
    stats: Arc<SinkStats>,
    batch_records: usize,
}

impl SinkWorker {
    /// The encoded loss marker for what was lost so far, taking it; None
    /// when nothing was lost.
    fn take_loss_marker(&self) -> Option<Vec<u8>> {
        let lost = std::mem::take(&mut *self.lost.lock().expect("not poisoned"));
        (lost.count > 0).then(|| self.encode_loss(&lost))
    }

    fn encode_loss(&self, lost: &Lost) -> Vec<u8> {
        let unix_nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let marker = LossRecord {
            kind: LossRecord::KIND,
            time: rfc3339_nanos(unix_nanos),
            seq: None,
            node: self.node.clone(),
            count: lost.count,
            reason: lost.reason.unwrap_or(LossReason::QueueFull),
            sink: Some(self.name.clone()),
            first_seq: lost.first_seq,
            last_seq: lost.last_seq,
        };
        let mut payload = Vec::new();
        format::write(
            self.format,
            Record::Loss(&marker),
            &self.instance,
            &mut payload,
        );
        let meta = RecordMeta::of_loss(&marker, unix_nanos);
        let mut wire = Vec::new();
        let encoded = self.encoder.encode(
            &meta,
            &payload,
            self.format != Format::Cef,
            &self.instance,
            &mut wire,
        );
        self.stats.note(encoded);
        wire
    }

    /// Moves the queue into the spool, syncing it now and then. A gap is
    /// reported just before the next record that gets in, or at the stop.
    async fn intake(
        self: Arc<Self>,
        queue: Arc<Queue>,
        spool: Arc<Mutex<Spool>>,
        arrived: Arc<Notify>,
        done: tokio::sync::watch::Sender<bool>,
    ) {
        // Damage found on opening is reported before anything else.
        self.report_loss(&mut spool.lock().expect("not poisoned"));
        let mut sync = tokio::time::interval(SYNC_INTERVAL);
        let mut taken = Queued::default();
        loop {
            tokio::select! {
                () = queue.arrived.notified() => {
                    let closed = self.take(&queue, &mut taken);
                    if !taken.is_empty() {
                        self.spool_batch(&spool, &taken);
                        arrived.notify_one();
                    }
                    taken.clear();
                    taken.bytes.shrink_to(QUEUE_KEPT_BYTES);
                    if closed {
                        break;
                    }
                }
                _ = sync.tick() => self.sync(&spool),
            }
        }
        self.report_loss(&mut spool.lock().expect("not poisoned"));
        self.sync(&spool);
        let _ = done.send(true);
        arrived.notify_one();
    }

    /// Takes what is queued into `taken`; true when the queue is closed
    /// and this was the last of it.
    fn take(&self, queue: &Queue, taken: &mut Queued) -> bool {
        let closed = queue.take(taken);
        self.stats.queued_records.store(0, Ordering::Relaxed);
        closed
    }

    fn spool_batch(&self, spool: &Mutex<Spool>, records: &Queued) {
        let mut spool = spool.lock().expect("not poisoned");
        for (seq, record) in records.iter() {
            // The reserve keeps room for the marker of the gap this record
            // would open.
            let stored = if spool.fits(record.len() + LOSS_MARKER_RESERVE) {
                self.report_loss(&mut spool);
                match spool.push(record) {
                    Ok(pushed) => Ok(pushed == Pushed::Stored),
                    Err(e) => {
                        warn!(sink = self.name, error = %e, "cannot spool a record");
                        Err(())
                    }
                }
            } else {
                Ok(false)
            };
            let reason = match stored {
                Ok(true) => continue,
                Ok(false) => LossReason::SpoolFull,
                Err(()) => LossReason::WriteFailed,
            };
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.lost.lock().expect("not poisoned").note(reason, 1, seq);
        }
        self.stats.spool_is(&spool);
    }

    /// Spools the marker of what was lost so far, if there is room for it;
    /// else the loss keeps growing until there is.
    fn report_loss(&self, spool: &mut Spool) {
        let mut lost = self.lost.lock().expect("not poisoned");
        // The spool's own drops: records it found damaged (here or in an
        // earlier run). Refusals cannot happen: a push is tried only when
        // it fits.
        let damaged = spool.take_dropped();
        if damaged > 0 {
            self.stats.dropped.fetch_add(damaged, Ordering::Relaxed);
            lost.note(LossReason::SpoolDamaged, damaged, None);
        }
        if lost.count == 0 {
            return;
        }
        let marker = self.encode_loss(&lost);
        if spool.fits(marker.len()) && matches!(spool.push(&marker), Ok(Pushed::Stored)) {
            *lost = Lost::default();
        }
    }

    fn sync(&self, spool: &Mutex<Spool>) {
        if let Err(e) = spool.lock().expect("not poisoned").sync() {
            warn!(sink = self.name, error = %e, "cannot sync the spool");
        }
    }

    /// Sends batches from the spool, oldest first, until the intake is done
    /// and the spool is empty.
    async fn deliver_from_spool(
        self: Arc<Self>,
        spool: Arc<Mutex<Spool>>,
        arrived: Arc<Notify>,
        intake_done: tokio::sync::watch::Receiver<bool>,
        mut transport: Transport,
    ) {
        let mut backoff = FIRST_BACKOFF;
        // The batch being sent: a copy, as the spool stays with the intake
        // meanwhile; its buffers are reused from batch to batch.
        let mut copies = Vec::new();
        loop {
            let records = {
                let mut spool = spool.lock().expect("not poisoned");
                match spool.peek(self.batch_records, 1 << 20) {
                    Ok(batch) => copy_into(&mut copies, batch.iter().map(Vec::as_slice)),
                    Err(e) => {
                        warn!(sink = self.name, error = %e, "cannot read the spool");
                        0
                    }
                }
            };
            let batch = &copies[..records];
            if batch.is_empty() {
                if *intake_done.borrow() {
                    return;
                }
                arrived.notified().await;
                continue;
            }
            match transport.send(batch).await {
                Ok(rejected) => {
                    backoff = FIRST_BACKOFF;
                    self.acknowledge(&spool, batch.len(), rejected);
                }
                Err(SendError {
                    after,
                    reason,
                    settled,
                }) => {
                    // What the receiver took (or refused for good) before
                    // the failure is not sent again.
                    if settled.records > 0 {
                        self.acknowledge(&spool, settled.records, settled.rejected);
                    }
                    self.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                    let wait = after.map_or(backoff, |a| a.min(MAX_RETRY_AFTER));
                    warn!(sink = self.name, reason, retry_in = ?wait, "delivery failed");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // Stopping cuts the wait short: the batch stays spooled.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = wait_until_done(intake_done.clone()) => return,
                    }
                }
            }
        }
    }

    fn acknowledge(&self, spool: &Mutex<Spool>, records: usize, rejected: usize) {
        let mut spool = spool.lock().expect("not poisoned");
        if let Err(e) = spool.ack(records) {
            warn!(sink = self.name, error = %e, "cannot acknowledge spooled records");
        }
        self.stats
            .delivered
            .fetch_add((records - rejected) as u64, Ordering::Relaxed);
        if rejected > 0 {
            self.stats
                .rejected
                .fetch_add(rejected as u64, Ordering::Relaxed);
            let mut lost = self.lost.lock().expect("not poisoned");
            lost.note(LossReason::Rejected, rejected as u64, None);
        }
        // A gap waiting for room is reported now that there is some, not
        // only when the next record comes.
        self.report_loss(&mut spool);
        self.stats.spool_is(&spool);
    }

    /// A sink without a spool (stdout): batches straight from the queue.
    async fn deliver_from_queue(self, queue: Arc<Queue>, mut transport: Transport) {
        let mut taken = Queued::default();
        let mut copies = Vec::new();
        loop {
            queue.arrived.notified().await;
            let closed = self.take(&queue, &mut taken);
            let marker = self.take_loss_marker();
            let mut records = marker
                .iter()
                .map(Vec::as_slice)
                .chain(taken.iter().map(|(_, r)| r));
            loop {
                let count = copy_into(&mut copies, records.by_ref().take(self.batch_records));
                if count == 0 {
                    break;
                }
                let batch = &copies[..count];
                match transport.send(batch).await {
                    Ok(_) => {
                        self.stats
                            .delivered
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // Nowhere to keep them: counted, and reported with the next batch.
                        warn!(sink = self.name, error = %e, "cannot write records");
                        self.stats
                            .dropped
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        let mut lost = self.lost.lock().expect("not poisoned");
                        lost.note(LossReason::WriteFailed, batch.len() as u64, None);
                    }
                }
            }
            drop(records);
            taken.clear();
            taken.bytes.shrink_to(QUEUE_KEPT_BYTES);
            if closed {
                return;
            }
        }
    }
}

/// Copies `records` into the first buffers of `copies`, reusing them, and
/// returns how many there were. Transports take a slice of buffers.
fn copy_into<'r>(copies: &mut Vec<Vec<u8>>, records: impl Iterator<Item = &'r [u8]>) -> usize {
    let mut count = 0;
    for record in records {
        if count == copies.len() {
            copies.push(Vec::new());
        }
        copies[count].clear();
        copies[count].extend_from_slice(record);
        count += 1;
    }
    count
}

async fn wait_until_done(mut done: tokio::sync::watch::Receiver<bool>) {
    let _ = done.wait_for(|done| *done).await;
}
