//! The control path: compiling and applying rules across many endpoints,
//! a one-rule change reaching the kernel, agent start to enforcing, and
//! memory at scale. Applies go through the gRPC API as `tollgatectl`
//! would send them; a reply means the rules are in the kernel and saved.

use std::time::{Duration, Instant};

use tollgate_agent::client;
use tollgate_policy::document::parse_documents;
use tollgate_proto::v1::{self as api, policy_service_client::PolicyServiceClient};
use tollgate_tests::{AgentProcess, TestEnv};

use crate::{
    Plan,
    report::{ControlFigures, Report},
    rules,
};

/// Policies `ep-0<j>*` for j in 0..10, each over a tenth of the endpoints
/// and a tenth of `rules` prefixes, the prefixes taken from `offset` on.
fn policies(glob_root: &str, rules_total: usize, offset: usize) -> Vec<api::EgressPolicy> {
    let prefixes = rules::prefixes(rules_total + offset);
    let per_policy = rules_total / 10;
    (0..10)
        .flat_map(|j| {
            let mine = &prefixes[offset + j * per_policy..offset + (j + 1) * per_policy];
            let yaml = rules::policy(
                &format!("group-{j}"),
                &format!("{glob_root}/ep-{j}*"),
                "enforce",
                mine,
            );
            parse_documents("bench", &yaml)
                .expect("the generated policy is valid")
                .into_iter()
                .map(|sourced| sourced.policy)
        })
        .collect()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Addresses one endpoint learns before memory is measured.
const LEARNED_FOR_MEMORY: u32 = 10_000;

pub fn measure(plan: &Plan, report: &mut Report) {
    let mut env = TestEnv::new("bench-control");
    let resolver = env.add_host(91, &[]).v4;
    let netns = env.hosts[0].netns.clone();
    let resolver_arg = resolver.to_string();
    let mut agent_args = vec![
        "--mode",
        "enforce",
        "--dns-resolver",
        &resolver_arg,
        "--fqdn-max-addresses-per-endpoint",
        "20000",
    ];
    if let Some(filter) = &plan.agent_log {
        agent_args.extend(["--log-level", filter]);
    }
    // Endpoint cgroups ep-<j><nn>: the tenth selected by policy group-j.
    let per_group = plan.endpoints / 10;
    for j in 0..10 {
        for n in 0..per_group {
            env.cgroup.child(&format!("ep-{j}{n:03}"));
        }
    }
    let glob = env.cgroup.relative.clone();
    let started = Instant::now();
    let mut agent = AgentProcess::start(&env, &agent_args);
    let cold_start = started.elapsed();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let apply = |policies: Vec<api::EgressPolicy>| {
        runtime.block_on(async {
            let channel = client::connect(&env.agent_address(), &client::ClientTls::default())
                .await
                .expect("connecting to the agent");
            let started = Instant::now();
            PolicyServiceClient::new(channel)
                .max_encoding_message_size(tollgate_agent::control::server::MAX_MESSAGE_BYTES)
                .apply_policies(api::ApplyPoliciesRequest {
                    policies,
                    expected_generation: None,
                    dry_run: false,
                })
                .await
                .unwrap_or_else(|status| panic!("apply: {status}"));
            started.elapsed()
        })
    };

    // Every policy's rules change on each apply: two variants in turn.
    let variants = [
        policies(&glob, plan.control_rules, 0),
        policies(&glob, plan.control_rules, plan.control_rules),
    ];
    let full_applies: Vec<Duration> = (0..6).map(|i| apply(variants[i % 2].clone())).collect();

    // One rule more or less in one policy. Only that policy is sent, as a
    // user changing it would: an apply creates or replaces the policies
    // it names and leaves the others as they are.
    let base = variants[0].clone();
    let extra = rules::policy(
        "group-0",
        &format!("{glob}/ep-0*"),
        "enforce",
        &rules::prefixes(plan.control_rules / 10 + 1),
    );
    let one_more = parse_documents("bench", &extra).unwrap().remove(0).policy;
    apply(base.clone());
    let one_rule: Vec<Duration> = (0..20)
        .map(|i| {
            let changed = if i % 2 == 0 {
                one_more.clone()
            } else {
                base[0].clone()
            };
            apply(vec![changed])
        })
        .collect();
    if plan.agent_log.is_some() {
        for line in agent.log_so_far() {
            eprintln!("agent: {line}");
        }
    }

    // A restart with the saved set: adopt, restore, ready.
    agent.terminate();
    let started = Instant::now();
    let mut agent = AgentProcess::start(&env, &agent_args);
    let warm_start = started.elapsed();

    // Memory at scale, with an endpoint that learned 10k addresses.
    let mut at_scale = policies(&glob, plan.memory_rules, 0);
    let names = format!(
        "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: names\n\
         spec:\n  cgroupSelector:\n    paths: [\"{glob}/ep-0000\"]\n  egress:\n\
         \x20 - {{name: dns, to: [{{cidr: {resolver}/32}}], ports: [{{port: 53, protocol: UDP}}]}}\n\
         \x20 - {{name: names, to: [{{fqdn: \"*.bench.test\"}}]}}\n"
    );
    at_scale.extend(
        parse_documents("bench", &names)
            .unwrap()
            .into_iter()
            .map(|s| s.policy),
    );
    apply(at_scale);
    crate::learned::learn(
        &netns,
        resolver,
        &env.cgroup.path.join("ep-0000"),
        1.0,
        LEARNED_FOR_MEMORY,
    );
    std::thread::sleep(Duration::from_millis(500)); // the agent reads the last answers
    let pid = agent.pid();
    let rss_kib = proc_status_kib(pid, "VmRSS:");
    let map_bytes = map_memlock_bytes(pid);
    agent.terminate();
    drop(agent);
    env.cleanup_pins();

    report.control(ControlFigures {
        endpoints: plan.endpoints,
        rules: plan.control_rules,
        full_apply_median: median(full_applies),
        one_rule_median: median(one_rule.clone()),
        one_rule_max: one_rule.into_iter().max().unwrap(),
        cold_start,
        warm_start,
        memory_rules: plan.memory_rules,
        learned_addresses: LEARNED_FOR_MEMORY,
        agent_rss_kib: rss_kib,
        map_memlock_bytes: map_bytes,
    });
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory of the maps the agent holds, by their `memlock` in
/// fdinfo.
fn map_memlock_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}
