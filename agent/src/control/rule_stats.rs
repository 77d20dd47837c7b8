//! Per-rule hit counts as the API and `tollgatectl get rules` show them.

use std::time::Duration;

use tollgate_proto::v1 as api;

use crate::enforce::RuleStat;

impl From<RuleStat> for api::RuleStats {
    fn from(s: RuleStat) -> Self {
        let is_rule = s.rule.rule.is_some();
        api::RuleStats {
            policy: s.rule.policy,
            rule: s.rule.rule.unwrap_or_default(),
            action: s.rule.action,
            source: s.rule.source,
            allowed: s.hits.allowed,
            denied: s.hits.denied,
            audit: s.hits.audit,
            last_hit_unix_nanos: s.hits.last_hit_unix_ns().unwrap_or(0),
            rule_id: if is_rule { s.rule.id } else { 0 },
            hits_id: s.rule.id,
        }
    }
}

/// `--unused-for`: a number and a unit, `d` or `w` (`90d`), or any
/// duration `--allowed-report-interval` takes (`12h`, `30m`, `45s`).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, seconds) = match (text.strip_suffix('d'), text.strip_suffix('w')) {
        (Some(number), _) => (number, 86_400),
        (_, Some(number)) => (number, 7 * 86_400),
        _ => return crate::config::parse_duration(text),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90d, 12h or 30m"))?;
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// The table `tollgatectl get rules` prints: one row per rule and per
/// policy default, last hit as UTC time and age, `never` where never hit.
pub fn table(rules: &[api::RuleStats], now_unix_ns: u64) -> String {
    let header = [
        "POLICY", "RULE", "ACTION", "ALLOWED", "DENIED", "AUDIT", "LAST HIT",
    ];
    let rows: Vec<[String; 7]> = rules
        .iter()
        .map(|r| {
            [
                r.policy.clone(),
                if r.rule.is_empty() {
                    "(default)".into()
                } else {
                    r.rule.clone()
                },
                r.action.clone(),
                r.allowed.to_string(),
                r.denied.to_string(),
                r.audit.to_string(),
                last_hit(r.last_hit_unix_nanos, now_unix_ns),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

fn last_hit(unix_ns: u64, now_unix_ns: u64) -> String {
    if unix_ns == 0 {
        return "never".into();
    }
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(
        unix_ns as i128 / 1_000_000_000 * 1_000_000_000,
    )
    .ok()
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| unix_ns.to_string());
    format!("{when} ({} ago)", age(now_unix_ns.saturating_sub(unix_ns)))
}

/// An age in its largest whole unit: `42s`, `5m`, `3h`, `12d`.
fn age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The hits as the pins and the state directory hold them, for a reader
/// while no agent answers: the counters pinned under `bpffs_root`, named by
/// the rules the last agent saved in `state_dir` (`rules.json`).
pub fn read_pinned(
    bpffs_root: &std::path::Path,
    state_dir: &std::path::Path,
    policy: Option<&str>,
    unused_for_seconds: u64,
    now_unix_ns: u64,
) -> Result<Vec<api::RuleStats>, String> {
    let rules_file = state_dir.join(super::controller::RULES_FILE);
    let saved = crate::enforce::SavedRules::read(&rules_file)
        .map_err(|e| format!("{}: {e}", rules_file.display()))?;
    let pin_dir = crate::datapath::DatapathOptions {
        bpffs_root: bpffs_root.to_owned(),
        cgroup: Default::default(),
    }
    .pin_dir();
    let map = crate::datapath::RuleHitsMap::open_pinned(&pin_dir).map_err(|e| e.to_string())?;
    let stats = crate::enforce::rule_stats(&saved.rules, policy, |ids| map.read(ids))
        .map_err(|e| e.to_string())?;
    if let Some(policy) = policy
        && stats.is_empty()
    {
        return Err(format!("no policy {policy:?} in {}", rules_file.display()));
    }
    Ok(
        crate::enforce::unused_for(stats, unused_for_seconds, now_unix_ns)
            .into_iter()
            .map(api::RuleStats::from)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_days_and_weeks() {
        assert_eq!(parse_age("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1_800)));
        assert!(parse_age("90").is_err());
        assert!(parse_age("d").is_err());
    }

    #[test]
    fn the_table_says_never_and_how_long_ago() {
        let now = 1_800_000_000 * 1_000_000_000u64;
        let rules = [
            api::RuleStats {
                policy: "prod/web".into(),
                rule: "https".into(),
                action: "allow".into(),
                allowed: 12,
                last_hit_unix_nanos: now - 300 * 1_000_000_000,
                ..Default::default()
            },
            api::RuleStats {
                policy: "prod/web".into(),
                action: "deny".into(),
                denied: 4,
                ..Default::default()
            },
        ];
        assert_eq!(
            table(&rules, now),
            "POLICY    RULE       ACTION  ALLOWED  DENIED  AUDIT  LAST HIT\n\
             prod/web  https      allow   12       0       0      2027-01-15T07:55:00Z (5m ago)\n\
             prod/web  (default)  deny    0        4       0      never\n"
        );
    }
}
