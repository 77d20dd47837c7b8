//! The report of a matrix run, from the guests' "TGK " console lines
//! (written by scripts/kernels-guest.sh and kernels-init.sh): printed as a
//! table and written to target/kernels/report.{json,md}.

use std::{fmt::Write as _, path::Path};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::{PlannedTest, guest::Console};

/// Console lines shown when a kernel failed.
const TAIL_LINES: usize = 60;

#[derive(Serialize)]
pub struct KernelReport {
    kernel: String,
    /// `uname -r` in the guest; empty if it never got that far.
    release: String,
    /// From qemu's start to the guest's first report line.
    boot_seconds: Option<f64>,
    /// From then to the guest's last report line (or qemu's end).
    run_seconds: Option<f64>,
    /// False when the agent has no `verify` subcommand yet.
    verify_ran: bool,
    programs: Vec<Program>,
    tests: Vec<TestResult>,
    /// What went wrong outside the tests: a guest error, a timeout.
    errors: Vec<String>,
}

/// A line of `tollgate-agent verify --json`.
#[derive(Serialize, Deserialize)]
struct Program {
    program: String,
    loaded: bool,
    /// None (or 0) where the kernel does not count them (before 5.16).
    verified_insns: Option<u64>,
    load_ms: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct TestResult {
    test: String,
    result: Outcome,
    seconds: Option<f64>,
    note: Option<String>,
}

#[derive(Serialize, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl KernelReport {
    pub fn new(kernel: &str, plan: &[PlannedTest], console: &Console) -> Self {
        let mut report = Self {
            kernel: kernel.to_owned(),
            release: String::new(),
            boot_seconds: None,
            run_seconds: None,
            verify_ran: true,
            programs: Vec::new(),
            tests: Vec::new(),
            errors: Vec::new(),
        };
        let mut started = None;
        let mut finished = None;
        let mut done = false;
        let mut results = Vec::new();
        // A report line may follow kernel output on the same console line.
        let reports = console
            .lines
            .iter()
            .filter_map(|(at, line)| Some((*at, &line[line.find("TGK ")? + 4..])));
        for (at, line) in reports {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            report.boot_seconds.get_or_insert(at.as_secs_f64());
            finished = Some(at);
            match kind {
                "boot" => {
                    report.release = rest.split(' ').next().unwrap_or_default().to_owned();
                }
                "verify" => match serde_json::from_str(rest) {
                    Ok(program) => report.programs.push(program),
                    Err(e) => report.errors.push(format!("verify line {rest:?}: {e}")),
                },
                "verify-missing" => report.verify_ran = false,
                "verify-exit" if rest != "0" => report
                    .errors
                    .push(format!("tollgate-agent verify exited with status {rest}")),
                "start" => started = Some(rest.to_owned()),
                "test" => results.push(rest.to_owned()),
                "error" => report.errors.push(format!("guest: {rest}")),
                "done" => done = true,
                _ => {}
            }
        }
        if let (Some(boot), Some(end)) = (report.boot_seconds, finished) {
            report.run_seconds = Some(end.as_secs_f64() - boot);
        }
        if console.timed_out {
            report
                .errors
                .push(format!("timed out after {} s", console.elapsed.as_secs()));
        } else if !done {
            report
                .errors
                .push("the guest stopped before it finished the plan".into());
        }
        for test in plan {
            report
                .tests
                .push(test_result(test, &results, started.as_deref()));
        }
        report
    }

    fn failed(&self) -> bool {
        !self.errors.is_empty()
            || self.programs.iter().any(|p| !p.loaded)
            || self.tests.iter().any(|t| t.result == Outcome::Fail)
    }

    fn markdown(&self, out: &mut String) {
        let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1}"));
        let _ = writeln!(
            out,
            "## {} ({}): boot {} s, run {} s: {}\n",
            self.kernel,
            if self.release.is_empty() {
                "no boot"
            } else {
                &self.release
            },
            secs(self.boot_seconds),
            secs(self.run_seconds),
            if self.failed() { "FAILED" } else { "ok" }
        );
        for error in &self.errors {
            let _ = writeln!(out, "- error: {error}");
        }
        if !self.verify_ran {
            let _ = writeln!(
                out,
                "- `tollgate-agent verify` does not exist in this build"
            );
        }
        if !self.programs.is_empty() {
            out.push_str("\n| program | loaded | verified insns | load ms | error |\n|---|---|---|---|---|\n");
            for p in &self.programs {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    p.program,
                    if p.loaded { "yes" } else { "NO" },
                    p.verified_insns
                        .filter(|&n| n > 0)
                        .map_or("n/a".into(), |n| n.to_string()),
                    p.load_ms.map_or("-".into(), |ms| format!("{ms:.1}")),
                    one_line(p.error.as_deref().unwrap_or_default()),
                );
            }
        }
        out.push_str("\n| test | result | seconds | note |\n|---|---|---|---|\n");
        for t in &self.tests {
            let result = match t.result {
                Outcome::Pass => "pass",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            let _ = writeln!(
                out,
                "| {} | {result} | {} | {} |",
                t.test,
                secs(t.seconds),
                t.note.as_deref().unwrap_or_default()
            );
        }
        out.push('\n');
    }
}

/// A test's outcome from the guest's "test <label> <exit status> <seconds>"
/// lines; `running` is the test the guest started last.
fn test_result(test: &PlannedTest, results: &[String], running: Option<&str>) -> TestResult {
    let mut result = TestResult {
        test: test.label.clone(),
        result: Outcome::Fail,
        seconds: None,
        note: None,
    };
    if let Some(feature) = test.skipped {
        result.result = Outcome::Skip;
        result.note = Some(format!("the kernel lacks {feature}"));
        return result;
    }
    let reported = results.iter().find_map(|line| {
        let mut words = line.split(' ');
        (words.next() == Some(test.label.as_str())).then(|| (words.next(), words.next()))
    });
    match reported {
        Some((status, seconds)) => {
            result.seconds = seconds.and_then(|s| s.parse().ok());
            match status {
                Some("0") => result.result = Outcome::Pass,
                // coreutils timeout's status for a command it stopped.
                Some("124") => result.note = Some("timed out in the guest".into()),
                Some(status) => result.note = Some(format!("exit status {status}")),
                None => result.note = Some("no exit status".into()),
            }
        }
        None if running == Some(test.label.as_str()) => {
            result.note = Some("running when the guest stopped".into());
        }
        None => result.note = Some("not run: the guest stopped before it".into()),
    }
    result
}

/// Verifier messages span lines; a table cell cannot.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// Prints the report and writes it to `dir`/report.{json,md}; fails if any
/// kernel failed, after printing the end of its console.
pub fn finish(dir: &Path, reports: &[KernelReport]) -> anyhow::Result<()> {
    let mut markdown = String::from("# Kernel matrix\n\n");
    for report in reports {
        report.markdown(&mut markdown);
    }
    println!("{markdown}");
    std::fs::write(dir.join("report.md"), &markdown)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(reports)? + "\n",
    )?;
    let failed: Vec<&KernelReport> = reports.iter().filter(|r| r.failed()).collect();
    for report in &failed {
        let log = dir.join(&report.kernel).join("console.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- the end of {} ---", log.display());
        for line in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
            eprintln!("{line}");
        }
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|r| r.kernel.as_str()).collect();
        bail!("the kernel matrix failed on {}", names.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;

    fn planned(label: &str, skipped: Option<&'static str>) -> PlannedTest {
        PlannedTest {
            label: label.into(),
            executable: PathBuf::from("/t"),
            name: label.into(),
            skipped,
        }
    }

    /// Console lines one second apart, from 10 s after qemu started.
    fn console(lines: &[&str], timed_out: bool) -> Console {
        Console {
            lines: (10..)
                .zip(lines)
                .map(|(s, l)| (Duration::from_secs(s), (*l).to_owned()))
                .collect(),
            elapsed: Duration::from_secs(100),
            timed_out,
        }
    }

    #[test]
    fn results_programs_and_times_come_from_the_report_lines() {
        let plan = [
            planned("a::ok", None),
            planned("a::bad", None),
            planned("a::old", Some("a feature (9.9)")),
            planned("a::later", None),
        ];
        let lines = [
            "[    1.0] a kernel message",
            "TGK boot 6.1.0-50-cloud-amd64 8.5",
            r#"TGK verify {"program":"p","loaded":false,"verified_insns":null,"load_ms":1.5,"error":"too big"}"#,
            "TGK verify-exit 1",
            "TGK start a::ok",
            "TGK test a::ok 0 2.50",
            "TGK start a::bad",
            "[   20.1] noise TGK test a::bad 101 3.00",
            "TGK done 30.0",
        ];
        let report = KernelReport::new("6.1", &plan, &console(&lines, false));
        assert_eq!(report.release, "6.1.0-50-cloud-amd64");
        assert_eq!(report.boot_seconds, Some(11.0));
        assert_eq!(report.run_seconds, Some(7.0));
        assert!(!report.programs[0].loaded);
        assert_eq!(
            report.errors,
            ["tollgate-agent verify exited with status 1"]
        );
        let results: Vec<_> = report.tests.iter().map(|t| (t.result, t.seconds)).collect();
        assert_eq!(
            results,
            [
                (Outcome::Pass, Some(2.5)),
                (Outcome::Fail, Some(3.0)),
                (Outcome::Skip, None),
                (Outcome::Fail, None),
            ]
        );
        assert!(report.failed());
    }

    #[test]
    fn a_timeout_fails_the_running_test_and_the_kernel() {
        let plan = [planned("a::slow", None)];
        let lines = [
            "TGK boot 5.10.0-32-cloud-amd64 9.0",
            "TGK verify-missing",
            "TGK start a::slow",
        ];
        let report = KernelReport::new("5.10", &plan, &console(&lines, true));
        assert!(!report.verify_ran);
        assert_eq!(
            report.tests[0].note.as_deref(),
            Some("running when the guest stopped")
        );
        assert_eq!(report.errors, ["timed out after 100 s"]);
    }
}
