//! The native format: the records exactly as the agent prints them
//! (docs/flow-records.md), so JSON sinks and stdout agree.

use super::put_json;
use crate::export::record::Record;

pub(super) fn write(record: Record, out: &mut Vec<u8>) {
    match record {
        Record::Flow(flow) => put_json(flow, out),
        Record::Dns(dns) => put_json(dns, out),
        Record::Loss(loss) => put_json(loss, out),
    }
}
