//! The agent's main job: put the datapath in place, then turn every decision
//! into a flow record on stdout until told to stop. Stopping leaves the
//! programs pinned and attached: enforcement outlives the agent.

use std::{io, path::PathBuf, time::Duration};

use tokio_util::sync::CancellationToken;
use tollgate_common::{FlowEvent, Mode, flow_flags};
use tracing::{info, warn};

use crate::{
    cgroups::CgroupPaths,
    datapath::{Datapath, DatapathError, DatapathOptions},
    enforce::{EnforceError, Enforcer},
    flow::{Enrichment, FlowRecord, WallClock},
    output::JsonLines,
    policy::model::Policy,
};

/// Everything the run needs, resolved from flags before the runtime starts.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub datapath: DatapathOptions,
    pub cgroup2_mount: PathBuf,
    pub mode: Mode,
    pub node: String,
    pub allowed_report_interval: Duration,
    /// Policies to put in force; None leaves the datapath's rules alone.
    pub policies: Option<Vec<Policy>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("reading events: {0}")]
    Events(io::Error),
    #[error("writing flow records: {0}")]
    Output(io::Error),
    #[error("putting the policies in force: {0}")]
    Enforce(#[from] EnforceError),
}

/// How often cgroups are looked for anew, to find endpoints that appeared.
const CGROUP_RESCAN: Duration = Duration::from_secs(1);

const BATCH: usize = 512;

pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let mut datapath = Datapath::open(&config.datapath)?;
    datapath.set_global_mode(config.mode)?;
    datapath.set_allowed_report_interval(config.allowed_report_interval)?;
    let mut reader = datapath
        .take_event_reader()
        .map_err(RunError::Events)?
        .expect("a fresh datapath has its reader");
    for (program, attachment) in datapath.attachments() {
        info!(program, ?attachment, "attached");
    }
    // The policies are in force before the agent says it is ready.
    let mut enforcer = config
        .policies
        .map(|policies| Enforcer::new(policies, &config.cgroup2_mount));
    if let Some(enforcer) = &mut enforcer {
        enforcer.refresh(&mut datapath)?;
        info!(
            endpoints = enforcer.endpoint_count(),
            generation = datapath.generation(),
            "policies in force"
        );
    }
    info!(
        cgroup = %config.datapath.cgroup.display(),
        pin_dir = %datapath.pin_dir().display(),
        mode = ?config.mode,
        generation = datapath.generation(),
        "ready"
    );

    let mut printer = Printer {
        out: JsonLines::new(io::BufWriter::new(io::stdout().lock())),
        cgroups: CgroupPaths::new(config.cgroup2_mount.clone()),
        clock: WallClock::now(),
        node: config.node.clone(),
        seq: 0,
    };
    let mut events = Vec::with_capacity(BATCH);
    let mut rescan = tokio::time::interval(CGROUP_RESCAN);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            read = reader.read(&mut events, BATCH) => {
                read.map_err(RunError::Events)?;
                printer.print(&events, enforcer.as_ref())?;
                events.clear();
            }
            _ = rescan.tick(), if enforcer.is_some() => {
                let enforcer = enforcer.as_mut().expect("guarded");
                match enforcer.refresh(&mut datapath) {
                    Ok(Some(generation)) => info!(endpoints = enforcer.endpoint_count(), generation, "endpoints changed"),
                    Ok(None) => {}
                    // The previous rules stay in force; the next rescan retries.
                    Err(e) => warn!(error = %e, "cannot put the changed endpoints in force"),
                }
            }
        }
    }
    // What the kernel reported before the stop still goes out.
    while reader.read_available(&mut events, BATCH) > 0 {
        printer.print(&events, enforcer.as_ref())?;
        events.clear();
    }
    match datapath.counters() {
        Ok(counters) => info!(
            ?counters,
            undecodable = reader.undecodable(),
            "stopping; programs stay attached"
        ),
        Err(e) => warn!(error = %e, "stopping; cannot read counters"),
    }
    Ok(())
}

struct Printer<W: io::Write> {
    out: JsonLines<W>,
    cgroups: CgroupPaths,
    clock: WallClock,
    node: String,
    seq: u64,
}

impl<W: io::Write> Printer<W> {
    fn print(&mut self, events: &[FlowEvent], enforcer: Option<&Enforcer>) -> Result<(), RunError> {
        for event in events {
            self.seq += 1;
            let cgroup = self.cgroups.resolve(event.cgroup_id);
            let attribution = enforcer
                .filter(|_| event.flags & flow_flags::ENDPOINT_KNOWN != 0)
                .and_then(|e| e.attribute(event.generation, event.set_id, event.rule_id));
            let enrichment = Enrichment {
                seq: self.seq,
                node: &self.node,
                cgroup,
                clock: self.clock,
                attribution,
            };
            let record = FlowRecord::new(event, enrichment);
            self.out.write(&record).map_err(RunError::Output)?;
        }
        self.out.flush().map_err(RunError::Output)
    }
}
