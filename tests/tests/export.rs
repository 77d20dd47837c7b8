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

use serde_json::Value;
use tollgate_tests::{
    AgentProcess, TempFile, TestDir, TestEnv, free_port, host_policy, http_get, make_certificates,
    metric_sample,
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

/// Waits until `events` (from a receiver) hold `flows` flow records, then
/// checks that they came in order, each once, from seq `first` on, with
/// any gap accounted for by a loss marker before it. Returns how many were
/// reported lost.
fn check_complete(agent: &AgentProcess, receiver: &Receiver, first: u64, flows: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = receiver.events();
        let delivered = events.iter().filter(|e| e["type"] == "flow").count() as u64;
        let lost: u64 = events
            .iter()
            .filter(|e| e["type"] == "loss")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        if delivered + lost >= flows || Instant::now() > deadline {
            let mut expected = first;
            let mut pending_loss = 0;
            for event in &events {
                match event["type"].as_str() {
                    Some("loss") => pending_loss += event["count"].as_u64().unwrap(),
                    Some("flow") => {
                        let seq = event["seq"].as_u64().unwrap();
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
            return lost;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_sink(receiver: &Receiver, secrets: &TestDir, name: &str) -> [String; 2] {
    let token = secrets.path.join(format!("{name}.token"));
    std::fs::write(&token, format!("{}\n", receiver::TOKEN)).unwrap();
    let token = token.display();
    let url = receiver.url();
    sink(match receiver.api {
        Api::SplunkHec => {
            format!("{{name: {name}, type: splunkHec, url: '{url}', tokenFile: {token}}}")
        }
        Api::AzureLogsIngestion => format!(
            "{{name: {name}, type: azureLogsIngestion, endpoint: '{url}', dcrImmutableId: dcr-0123, \
             stream: Custom-Tollgate_CL, tokenFile: {token}}}"
        ),
        Api::ElasticBulk => {
            format!(
                "{{name: {name}, type: elasticBulk, url: '{url}', apiKeyFile: {token}, format: json}}"
            )
        }
    })
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
