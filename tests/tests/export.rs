//! Export to SIEMs through the agent: rsyslog receives CEF over TCP and TLS,
//! stand-ins for Splunk HEC, Azure Logs Ingestion and Elasticsearch check
//! each API's wire format, and outages, a full spool and a restart lose
//! nothing that is not accounted for by a loss marker.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tollgate_tests::{
    AgentProcess, TempFile, TestDir, TestEnv, free_port, host_policy, http_get,
    kube::{FakeApiServer, namespace},
    make_certificates, metric_sample,
    node::{Layout, SimPod},
    receiver::{self, Api, Behaviour, Receiver},
    rsyslog::Rsyslog,
};

const WAIT: Duration = Duration::from_secs(10);

/// `count` denied connections (each is reported, never deduplicated).
fn denied_connections(env: &TestEnv, host: Ipv4Addr, count: usize) {
    let run = env.probe(&[
        "--count",
        &count.to_string(),
        "connect",
        "tcp",
        &format!("{host}:8081"),
    ]);
    assert_eq!(run.results.len(), count);
    assert!(
        run.results.iter().all(|r| *r == Err(libc::EPERM)),
        "{run:?}"
    );
}

/// Polls `done` until it holds, for at most `WAIT`; the assertions after
/// it say what was missing.
fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sink(yaml: String) -> [String; 2] {
    ["--sink".into(), yaml]
}

/// The agent with `policy` and more flags, each with its value.
fn start(env: &TestEnv, policy: &TempFile, flags: &[[String; 2]]) -> AgentProcess {
    let mut args: Vec<&str> = vec!["--policy", policy.path.to_str().unwrap()];
    for [flag, value] in flags {
        args.push(flag);
        args.push(value);
    }
    AgentProcess::start(env, &args)
}

/// A record's type, `seq` and (loss markers) count, from the native JSON
/// or an ECS document.
fn record_view(event: &Value) -> (Option<&str>, Option<u64>, Option<u64>) {
    match event["event"]["dataset"].as_str() {
        Some(dataset) => (
            dataset.strip_prefix("tollgate."),
            event["event"]["sequence"].as_u64(),
            event["loss"]["count"].as_u64(),
        ),
        None => (
            event["type"].as_str(),
            event["seq"].as_u64(),
            event["count"].as_u64(),
        ),
    }
}

/// Waits until `events` (from a receiver) hold `flows` flow records, then
/// checks that they came in order, each once, from seq `first` on, with
/// any gap accounted for by a loss marker before it. Returns how many were
/// reported lost.
fn check_complete(agent: &AgentProcess, receiver: &Receiver, first: u64, flows: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = receiver.events();
        let views: Vec<_> = events.iter().map(record_view).collect();
        let delivered = views.iter().filter(|v| v.0 == Some("flow")).count() as u64;
        let lost: u64 = views
            .iter()
            .filter(|v| v.0 == Some("loss"))
            .map(|v| v.2.unwrap())
            .sum();
        if delivered + lost >= flows || Instant::now() > deadline {
            let mut expected = first;
            let mut pending_loss = 0;
            for (event, (kind, seq, count)) in events.iter().zip(&views) {
                match kind {
                    Some("loss") => pending_loss += count.unwrap(),
                    Some("flow") => {
                        let seq = seq.unwrap();
                        assert!(
                            seq >= expected && seq - expected <= pending_loss,
                            "{:?}: seq {seq} after {}, with {pending_loss} reported lost",
                            receiver.api,
                            expected - 1
                        );
                        pending_loss -= seq - expected;
                        expected = seq + 1;
                    }
                    other => panic!("unexpected record type {other:?}: {event}"),
                }
            }
            assert_eq!(
                delivered + lost,
                flows,
                "{:?}: {delivered} delivered and {lost} reported lost of {flows}; the agent logged {:#?}",
                receiver.api,
                agent.log_so_far()
            );
            assert_eq!(receiver.malformed(), Vec::<String>::new());
            assert_eq!(receiver.refused(), Vec::<String>::new());
            return lost;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_sink(receiver: &Receiver, secrets: &TestDir, name: &str) -> [String; 2] {
    http_sink_with(receiver, secrets, name, "")
}

/// An HTTP sink to `receiver`, with more fields (`, field: value`).
fn http_sink_with(receiver: &Receiver, secrets: &TestDir, name: &str, more: &str) -> [String; 2] {
    let token = secrets.path.join(format!("{name}.token"));
    std::fs::write(&token, format!("{}\n", receiver::TOKEN)).unwrap();
    let token = token.display();
    let url = receiver.url();
    let [flag, yaml] = sink(match receiver.api {
        Api::SplunkHec => {
            format!("{{name: {name}, type: splunkHec, url: '{url}', tokenFile: {token}}}")
        }
        Api::AzureLogsIngestion => format!(
            "{{name: {name}, type: azureLogsIngestion, endpoint: '{url}', dcrImmutableId: dcr-0123, \
             stream: Custom-Tollgate_CL, tokenFile: {token}}}"
        ),
        Api::ElasticBulk => {
            format!("{{name: {name}, type: elasticBulk, url: '{url}', apiKeyFile: {token}}}")
        }
    });
    let fields = yaml.strip_suffix('}').unwrap();
    [flag, format!("{fields}{more}}}")]
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn cef_over_syslog_tcp_and_tls_reaches_rsyslog() {
    let mut env = TestEnv::new("export-syslog");
    let host = env.add_host(50, &[8080, 8081]).v4;
    let certs = TestDir::new("export-syslog-certs");
    make_certificates(&certs.path, "tollgate-syslog-ca");
    let tcp = Rsyslog::start_tcp("export-tcp");
    let tls = Rsyslog::start_tls("export-tls", &certs.path);
    let files = TestDir::new("export-syslog-files");
    let flows_file = files.path.join("flows.jsonl");
    let policy = TempFile::new(
        "export-syslog.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let _agent = start(
        &env,
        &policy,
        &[
            sink(format!(
                "{{name: siem-tcp, type: syslog, address: 'tcp://127.0.0.1:{}'}}",
                tcp.port
            )),
            sink(format!(
                "{{name: siem-tls, type: syslog, address: 'tls://localhost:{}', caFile: {}, \
                 filter: {{verdicts: [denied]}}}}",
                tls.port,
                certs.path.join("ca.pem").display()
            )),
            sink(format!(
                "{{name: flows-file, type: file, path: {}}}",
                flows_file.display()
            )),
            // Each connection its own record, in order.
            ["--allowed-report-interval".into(), "0".into()],
        ],
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(())
    );
    denied_connections(&env, host, 1);

    let check = |line: &str, pri: &str, act: &str| {
        let fields: Vec<&str> = line.splitn(6, '|').collect();
        // RFC 5424 as rsyslog parsed it: version 1, our host, app, msgid, priority.
        assert_eq!(
            &fields[..5],
            ["1", "test-node", "tollgate", "flow", pri],
            "{line}"
        );
        let cef = fields[5].trim_start();
        assert!(cef.starts_with("CEF:0|Tollgate|tollgate-agent|"), "{line}");
        assert!(cef.contains(&format!("act={act}")), "{line}");
        assert!(cef.contains(&format!("dst={host}")), "{line}");
    };
    let lines = tcp.wait_for_lines(2, WAIT);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    check(&lines[0], "134", "allowed");
    check(&lines[1], "132", "denied");
    // The TLS sink takes denials only: the allowed record, sent first,
    // never reaches it.
    let lines = tls.wait_for_lines(1, WAIT);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    check(&lines[0], "132", "denied");
    let file = std::fs::read_to_string(&flows_file).unwrap();
    let records: Vec<Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (&records[0]["verdict"], &records[1]["verdict"]),
        (&"allowed".into(), &"denied".into())
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn http_sinks_deliver_every_record_once_and_in_order_through_outages() {
    let mut env = TestEnv::new("export-http");
    let host = env.add_host(51, &[8080, 8081]).v4;
    let secrets = TestDir::new("export-http-secrets");
    let mut splunk = Receiver::start(Api::SplunkHec);
    let azure = Receiver::start(Api::AzureLogsIngestion);
    let elastic = Receiver::start(Api::ElasticBulk);
    let policy = TempFile::new(
        "export-http.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let metrics_port = free_port();
    let metrics_listen = [
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let agent = start(
        &env,
        &policy,
        &[
            http_sink(&splunk, &secrets, "splunk"),
            http_sink(&azure, &secrets, "azure"),
            http_sink(&elastic, &secrets, "elastic"),
            metrics_listen,
        ],
    );
    denied_connections(&env, host, 100);
    // Splunk goes away (connections refused), Azure throttles (429 with
    // Retry-After), while records keep coming.
    splunk.go_away();
    azure.set(Behaviour::Fail(429));
    denied_connections(&env, host, 300);
    std::thread::sleep(Duration::from_secs(1));
    splunk.come_back();
    azure.set(Behaviour::Accept);
    denied_connections(&env, host, 100);

    for receiver in [&splunk, &azure, &elastic] {
        assert_eq!(
            check_complete(&agent, receiver, 1, 500),
            0,
            "{:?} lost records",
            receiver.api
        );
    }
    assert!(azure.requests() > 1);

    // The receiver has every record; the agent counts a batch once its
    // response is in.
    let scrape = || http_get(metrics_port, "/metrics").1;
    let delivered = "tollgate_export_delivered_records_total";
    wait_until(|| {
        let metrics = scrape();
        ["splunk", "azure", "elastic"]
            .iter()
            .all(|sink| metric_sample(&metrics, &format!("{delivered}{{sink=\"{sink}\"}}")) == 500)
    });
    let metrics = scrape();
    let value =
        |name: &str, sink: &str| metric_sample(&metrics, &format!("{name}{{sink=\"{sink}\"}}"));
    for sink in ["splunk", "azure", "elastic"] {
        assert_eq!(
            value("tollgate_export_delivered_records_total", sink),
            500,
            "{metrics}"
        );
        assert_eq!(value("tollgate_export_dropped_records_total", sink), 0);
        assert_eq!(value("tollgate_export_spooled_records", sink), 0);
    }
    assert!(value("tollgate_export_send_failures_total", "splunk") > 0);
    assert!(value("tollgate_export_send_failures_total", "azure") > 0);
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn splunk_acknowledgements_are_awaited_and_an_invalid_event_loses_only_itself() {
    let mut env = TestEnv::new("export-hec");
    let host = env.add_host(53, &[8080, 8081]).v4;
    let secrets = TestDir::new("export-hec-secrets");
    // A token with indexer acknowledgement: requests need a channel, and
    // each batch is indexed once its ackId is acknowledged (after 2 polls).
    let acked = Receiver::start(Api::SplunkHec);
    acked.require_ack(2);
    // HEC refuses three events as invalid, wherever they fall in a batch.
    let picky = Receiver::start(Api::SplunkHec);
    let invalid = [5, 50, 51];
    picky.refuse_seqs(invalid);
    let policy = TempFile::new(
        "export-hec.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let agent = start(
        &env,
        &policy,
        &[
            http_sink_with(&acked, &secrets, "splunk-ack", ", index: tollgate"),
            http_sink(&picky, &secrets, "splunk-picky"),
        ],
    );
    denied_connections(&env, host, 100);

    assert_eq!(check_complete(&agent, &acked, 1, 100), 0);

    let view = |events: &[Value]| -> (Vec<u64>, u64) {
        let seqs = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        let rejected = events
            .iter()
            .filter(|e| e["type"] == "loss")
            .inspect(|e| assert_eq!(e["reason"], "rejected", "{e}"))
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        (seqs, rejected)
    };
    wait_until(|| {
        let (seqs, rejected) = view(&picky.events());
        seqs.len() + rejected as usize >= 100
    });
    let (seqs, rejected) = view(&picky.events());
    let expected: Vec<u64> = (1..=100).filter(|seq| !invalid.contains(seq)).collect();
    assert_eq!(seqs, expected, "every valid record once, in order");
    assert_eq!(rejected, 3, "the invalid ones reported rejected");
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn azure_bodies_stay_under_the_limit_and_one_refused_as_too_large_is_split() {
    let mut env = TestEnv::new("export-azure-size");
    let host = env.add_host(54, &[8080, 8081]).v4;
    let secrets = TestDir::new("export-azure-size-secrets");
    // The documented 1 MB; and a receiver taking far less, so that only
    // splitting after 413s gets records through.
    let mut roomy = Receiver::start(Api::AzureLogsIngestion);
    let mut tight = Receiver::start(Api::AzureLogsIngestion);
    tight.limit_body(20_000);
    let policy = TempFile::new(
        "export-azure-size.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    // Batches bounded by bytes only: 2,000 records of about 1 kB are
    // spooled while the receivers are away, and go in batches of 1 MiB.
    let batch = ", batchRecords: 5000, gzip: false";
    roomy.go_away();
    tight.go_away();
    let agent = start(
        &env,
        &policy,
        &[
            http_sink_with(&roomy, &secrets, "azure-roomy", batch),
            http_sink_with(&tight, &secrets, "azure-tight", batch),
        ],
    );
    denied_connections(&env, host, 2000);
    roomy.come_back();
    tight.come_back();

    assert_eq!(check_complete(&agent, &roomy, 1, 2000), 0);
    assert_eq!(roomy.too_large(), 0, "bodies are cut below 1 MB");
    // About 2 MB in all: at least two bodies, however the records were
    // spooled into batches when the receiver came back.
    assert!(roomy.requests() >= 2, "{} requests", roomy.requests());
    assert_eq!(check_complete(&agent, &tight, 1, 2000), 0);
    assert!(tight.too_large() > 0);
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn elastic_documents_index_cleanly_into_logs_data_streams_at_their_own_time() {
    let mut env = TestEnv::new("export-elastic");
    let host = env.add_host(55, &[8080, 8081]).v4;
    let secrets = TestDir::new("export-elastic-secrets");
    let mut elastic = Receiver::start(Api::ElasticBulk);
    // A pod labelled both `app` and `app.kubernetes.io/name`: in a
    // dynamic mapping the first is a value, the second makes `app` an
    // object.
    let api = FakeApiServer::start();
    api.put(namespace("prod", &[]));
    let pod = SimPod::new(
        &env,
        1,
        "prod",
        "payments",
        "payments",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    pod.make_cgroup(&env);
    let mut object = pod.object.clone();
    object["metadata"]["labels"]["app.kubernetes.io/name"] = json!("payments");
    api.put(object);
    let kubeconfig = TempFile::new("export-elastic.kubeconfig", &api.kubeconfig());
    let policy = TempFile::new(
        "export-elastic.yaml",
        &format!(
            "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: payments-web
  namespace: prod
spec:
  podSelector:
    matchLabels: {{app: payments}}
  mode: enforce
  egress:
  - name: web
    to: [{{cidr: {host}/32}}]
    ports: [{{port: 8080, protocol: TCP}}]
"
        ),
    );
    // Records wait in the spool first, so the time of indexing is not
    // theirs.
    elastic.go_away();
    let agent = start(
        &env,
        &policy,
        &[
            http_sink_with(
                &elastic,
                &secrets,
                "elastic-ecs",
                ", index: logs-tollgate-ecs",
            ),
            http_sink_with(
                &elastic,
                &secrets,
                "elastic-ocsf",
                ", format: ocsf, index: logs-tollgate-ocsf",
            ),
            ["--kubeconfig".into(), kubeconfig.path.display().to_string()],
            ["--allowed-report-interval".into(), "0".into()],
        ],
    );
    agent.wait_until_logged(
        &["listed kind=\"pods\"", "listed kind=\"namespaces\""],
        WAIT,
    );
    pod.wait_until_in_datapath(&env);
    // Every record is the pod's: three allowed, three denied.
    for port in [8080, 8080, 8080, 8081, 8081, 8081] {
        pod.connect(&env, host, port).ok();
    }
    std::thread::sleep(Duration::from_secs(1));
    elastic.come_back();

    wait_until(|| {
        ["logs-tollgate-ecs", "logs-tollgate-ocsf"]
            .iter()
            .all(|index| elastic.documents(index).len() >= 6)
            || !elastic.refused().is_empty()
    });
    assert_eq!(elastic.refused(), Vec::<String>::new());
    assert_eq!(elastic.malformed(), Vec::<String>::new());
    let ecs = elastic.documents("logs-tollgate-ecs");
    let ocsf = elastic.documents("logs-tollgate-ocsf");
    let sequence = |docs: &[Value], pointer: &str| -> Vec<u64> {
        docs.iter()
            .filter_map(|d| d.pointer(pointer)?.as_u64())
            .collect()
    };
    assert_eq!(
        sequence(&ecs, "/event/sequence"),
        (1..=6).collect::<Vec<_>>(),
        "{ecs:#?}; the agent logged {:#?}",
        agent.log_so_far()
    );
    assert_eq!(
        sequence(&ocsf, "/unmapped/seq"),
        (1..=6).collect::<Vec<_>>(),
        "{ocsf:#?}; the agent logged {:#?}",
        agent.log_so_far()
    );
    for docs in [&ecs, &ocsf] {
        assert!(
            docs.iter()
                .any(|d| d.to_string().contains("app.kubernetes.io/name")),
            "the pod's labels are in: {docs:#?}"
        );
    }
    // Each document's @timestamp is its record's time (to the millisecond,
    // OCSF's `time`), not the time of indexing a second later.
    for doc in &ocsf {
        let millis = doc["time"].as_i64().unwrap();
        let time = tollgate_agent::flow::rfc3339_nanos(i128::from(millis) * 1_000_000);
        let stamp = doc["@timestamp"].as_str().unwrap();
        assert_eq!(stamp[..23], time[..23], "{doc}");
    }
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn spooled_records_survive_a_restart_and_full_or_damaged_spools_are_reported() {
    let mut env = TestEnv::new("export-spool");
    let host = env.add_host(52, &[8080, 8081]).v4;
    let secrets = TestDir::new("export-spool-secrets");
    let mut roomy = Receiver::start(Api::SplunkHec);
    let mut small = Receiver::start(Api::AzureLogsIngestion);
    let policy = TempFile::new(
        "export-spool.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let [_, small_sink] = http_sink(&small, &secrets, "small");
    let sinks = [
        http_sink(&roomy, &secrets, "roomy"),
        // Room for about 60 records.
        sink(small_sink.replace("}", ", spoolBytes: 40000}")),
    ];
    roomy.go_away();
    small.go_away();
    let mut agent = start(&env, &policy, &sinks);
    denied_connections(&env, host, 200);
    // Stop with everything spooled: the next agent sends it.
    let (status, log) = agent.terminate();
    assert!(status.success(), "{status}: {log:#?}");
    // A torn write at the end of roomy's spool, as a crash mid-write leaves
    // it: a record header promising more bytes than follow.
    let roomy_spool = env.state.path.join("spool/roomy");
    let last_segment = std::fs::read_dir(&roomy_spool)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "seg"))
        .max()
        .expect("roomy has spooled segments");
    let mut segment = std::fs::OpenOptions::new()
        .append(true)
        .open(&last_segment)
        .unwrap();
    std::io::Write::write_all(&mut segment, &[64, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap();
    drop(segment);
    let _agent = start(&env, &policy, &sinks);
    roomy.come_back();
    small.come_back();
    // The small spool's marker comes last from the first run: once it is
    // in, there is room again.
    let events = |r: &Receiver| r.events();
    let marker_position = |events: &[Value]| events.iter().position(|e| e["type"] == "loss");
    wait_until(|| marker_position(&events(&small)).is_some());
    denied_connections(&env, host, 10);

    // seq restarts with the agent; the first run's 200 come first, then
    // the torn record is reported, then the second run's.
    wait_until(|| events(&roomy).len() >= 211);
    let roomy_events = events(&roomy);
    let seqs: Vec<u64> = roomy_events
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    let expected: Vec<u64> = (1..=200).chain(1..=10).collect();
    assert_eq!(
        seqs, expected,
        "every record once, in order, across the restart"
    );
    let damaged = &roomy_events[200];
    assert_eq!(damaged["type"], "loss", "{damaged}");
    assert_eq!(damaged["reason"], "spool_damaged");
    assert_eq!(damaged["count"], 1);

    wait_until(|| {
        let events = events(&small);
        marker_position(&events).is_some_and(|marker| events.len() - marker > 10)
    });
    let small_events = events(&small);
    let marker = marker_position(&small_events).unwrap();
    let delivered: Vec<u64> = small_events[..marker]
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let kept = delivered.len() as u64;
    assert!(kept > 0 && kept < 200, "{kept} of 200 fit the spool");
    assert_eq!(delivered, (1..=kept).collect::<Vec<_>>());
    let loss = &small_events[marker];
    assert_eq!(loss["reason"], "spool_full");
    assert_eq!(loss["sink"], "small");
    assert_eq!(loss["count"].as_u64(), Some(200 - kept), "{loss}");
    assert_eq!(loss["first_seq"].as_u64(), Some(kept + 1));
    assert_eq!(loss["last_seq"].as_u64(), Some(200));
    let after: Vec<u64> = small_events[marker + 1..]
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(after, (1..=10).collect::<Vec<_>>());
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn syslog_newline_framing_and_udp_message_size_suit_their_receivers() {
    let mut env = TestEnv::new("export-syslog-framing");
    let host = env.add_host(51, &[8080, 8081]).v4;
    // Splits the stream at newlines only, as syslog-ng's network() does.
    let newline = Rsyslog::start_tcp_newline_only("export-newline");
    // Takes datagrams far larger than the sink sends: any cut is the agent's.
    let udp = Rsyslog::start_udp("export-udp", 65536);
    const MAX_MESSAGE_BYTES: usize = 480;
    let policy = TempFile::new(
        "export-syslog-framing.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let metrics_port = free_port();
    let _agent = start(
        &env,
        &policy,
        &[
            sink(format!(
                "{{name: siem-newline, type: syslog, address: 'tcp://127.0.0.1:{}', framing: newline}}",
                newline.port
            )),
            sink(format!(
                "{{name: siem-udp, type: syslog, address: 'udp://127.0.0.1:{}', \
                 maxMessageBytes: {MAX_MESSAGE_BYTES}}}",
                udp.port
            )),
            ["--allowed-report-interval".into(), "0".into()],
            [
                "--metrics-listen".into(),
                format!("127.0.0.1:{metrics_port}"),
            ],
        ],
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(())
    );
    denied_connections(&env, host, 2);

    // Each record is its own message, whole, in order.
    let whole = newline.wait_for_lines(3, WAIT);
    assert_eq!(whole.len(), 3, "{whole:#?}");
    let payload = |line: &str| line.splitn(6, '|').nth(5).unwrap().trim_start().to_owned();
    for (line, act) in whole.iter().zip(["allowed", "denied", "denied"]) {
        assert!(line.starts_with("1|test-node|tollgate|flow|"), "{line}");
        let cef = payload(line);
        assert!(cef.starts_with("CEF:0|Tollgate|"), "{line}");
        assert!(cef.contains(&format!("act={act} ")), "{line}");
        assert!(cef.ends_with(|c: char| !c.is_whitespace()), "{line}");
    }
    // Over UDP, each is the start of the same record, cut where it would
    // not fit in a datagram of MAX_MESSAGE_BYTES (the header included).
    let cut = udp.wait_for_lines(3, WAIT);
    assert_eq!(cut.len(), 3, "{cut:#?}");
    let mut truncated = 0;
    for (cut, whole) in cut.iter().zip(&whole) {
        let (cut, whole) = (payload(cut), payload(whole));
        assert!(
            whole.starts_with(&cut),
            "{cut}\nis not the start of\n{whole}"
        );
        assert!(cut.len() < MAX_MESSAGE_BYTES, "{cut}");
        if cut.len() < whole.len() {
            truncated += 1;
        }
    }
    assert!(
        truncated > 0,
        "no record is longer than {MAX_MESSAGE_BYTES} bytes: the test shows nothing"
    );
    let metrics = http_get(metrics_port, "/metrics").1;
    assert_eq!(
        metric_sample(
            &metrics,
            "tollgate_export_truncated_records_total{sink=\"siem-udp\"}"
        ),
        truncated,
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "tollgate_export_truncated_records_total{sink=\"siem-newline\"}"
        ),
        0
    );
}
