//! `big-market verify`: the pipeline run in child processes of this binary, on fresh data
//! directories, under injected transport faults (refusals, dropped connections, delayed
//! confirms), killed at every crash boundary in turn, then restarted; and once with two
//! processes on the same shards. After each round the audit checks the invariants: every
//! committed award delivered exactly once in effect, no task without an award, no award
//! without a task, no gap in any shard's sequence.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::audit::{audit, ShardAudit};
use crate::config::Settings;
use crate::crash::BOUNDARIES;
use crate::error::{Error, Result};
use crate::model::TaskState;
use crate::store::Store;
use crate::util::{now_ms, wait_until};

/// What to run.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Rounds over every scenario.
    pub rounds: usize,
    /// Awards written per scenario.
    pub records: usize,
    /// Transport faults injected into every child (a [`crate::config::FaultPlan`] spec).
    pub faults: String,
}

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Round number.
    pub round: usize,
    /// Crash boundary, or `two-processes`.
    pub scenario: String,
    /// How the first run ended.
    pub first_run: String,
    /// Whether the restarted service reached a clean audit in time.
    pub recovered: bool,
    /// Awards committed (sum of shard sequences).
    pub committed: u64,
    /// Distinct messages delivered.
    pub delivered: u64,
    /// Messages that arrived more than once and were deduplicated.
    pub redelivered: u64,
    /// Invariant violations found by the final audit (empty: passed).
    pub violations: Vec<String>,
}

const TIMEOUT: Duration = Duration::from_secs(120);

struct Child2 {
    child: Child,
}

impl Child2 {
    fn spawn(cmd: &mut Command) -> Result<Child2> {
        cmd.spawn()
            .map(|child| Child2 { child })
            .map_err(|e| Error::Io {
                path: "child process".into(),
                source: e,
            })
    }

    /// The exit status, or `None` if the child is still running after `limit`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.wait(Duration::from_secs(30));
        if status.is_none() {
            let _ = self.child.kill();
        }
        status
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "still running (killed)".into(),
        Some(s) if s.success() => "finished".into(),
        Some(s) => match s.signal() {
            Some(6) => "crashed (abort)".into(),
            Some(sig) => format!("killed by signal {sig}"),
            None => format!("exit {}", s.code().unwrap_or(-1)),
        },
    }
}

fn audits(settings: &Settings) -> Result<(Vec<ShardAudit>, u64, u64)> {
    let store = Store::open(settings, false)?;
    let now = now_ms();
    let mut out = Vec::new();
    for shard in store.shards() {
        out.push(audit(&shard.audit_facts(settings.layout.tb_count())?, now));
    }
    let statuses = store.status()?;
    let pending = statuses
        .iter()
        .map(crate::store::ShardStatus::pending)
        .sum();
    let dead = statuses.iter().map(|s| s.tasks_in(TaskState::Dead)).sum();
    Ok((out, pending, dead))
}

fn violations(audits: &[ShardAudit], pending: u64, dead: u64) -> Vec<String> {
    let mut v = Vec::new();
    for a in audits {
        let lost = a.lost(0);
        if !lost.is_empty() {
            v.push(format!(
                "shard {:02}: {} committed tasks never delivered (first {:?})",
                a.db,
                lost.len(),
                &lost[..lost.len().min(5)]
            ));
        }
        if !a.unknown.is_empty() {
            v.push(format!(
                "shard {:02}: delivered numbers never committed {:?}",
                a.db, a.unknown
            ));
        }
        if a.tasks_without_award > 0 {
            v.push(format!(
                "shard {:02}: {} tasks without an award",
                a.db, a.tasks_without_award
            ));
        }
        if a.awards_without_task > 0 {
            v.push(format!(
                "shard {:02}: {} awards without a task",
                a.db, a.awards_without_task
            ));
        }
    }
    if pending > 0 {
        v.push(format!("{pending} tasks still pending"));
    }
    if dead > 0 {
        v.push(format!("{dead} tasks dead"));
    }
    v
}

fn scenario(
    exe: &Path,
    base: &Settings,
    opts: &VerifyOptions,
    round: usize,
    name: &str,
) -> Result<Outcome> {
    let tmp = tempfile::tempdir().map_err(|e| Error::Io {
        path: std::env::temp_dir(),
        source: e,
    })?;
    let mut settings = base.clone();
    settings.data_dir = tmp.path().join("data");
    // Against RabbitMQ, each scenario has queues of its own, deleted afterwards.
    let tag = crate::util::Rng::new().digits(12);
    settings.topic = format!("verify_{tag}");
    // On MySQL, each scenario has databases of its own, dropped afterwards.
    let scratch = match &base.store {
        crate::config::StoreTarget::Mysql(dbs) => {
            let s = crate::store::Scratch::new(dbs, &format!("v{}", &tag[..6]));
            settings.store = s.target();
            Some(s)
        }
        crate::config::StoreTarget::Sqlite => None,
    };
    let store_env = scratch.as_ref().map(|s| s.env_value()).unwrap_or_default();
    let common = |cmd: &mut Command| {
        cmd.arg("--data-dir")
            .arg(&settings.data_dir)
            .env("BIG_MARKET_STORE", &store_env)
            .args([
                "--db-count",
                &settings.layout.db_count().to_string(),
                "--tb-count",
                &settings.layout.tb_count().to_string(),
            ])
            .args([
                "--stale-after",
                "1s",
                "--scan-interval",
                "100ms",
                "--max-attempts",
                "1000000",
            ])
            .args(["--inject-faults", &opts.faults])
            .args(["--topic", &settings.topic])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Credentials go through the environment, never a command line (`ps` shows those).
        match &settings.amqp_url {
            Some(url) => cmd.env("AMQP_URL", url.secret_url()),
            None => cmd.env_remove("AMQP_URL"),
        };
    };
    let records = opts.records.to_string();
    let mut load = Command::new(exe);
    common(&mut load);
    let mut serves = Vec::new();
    // The scenario's fresh shards are made first, as an operator's `init` makes them: only it
    // creates MySQL databases, and two processes must not race to create a data dir.
    let mut init = Command::new(exe);
    common(&mut init);
    init.arg("init");
    Child2::spawn(&mut init)?.wait(TIMEOUT);
    if name == "two-processes" {
        let mut serve = Command::new(exe);
        common(&mut serve);
        serve.arg("serve");
        serves.push(Child2::spawn(&mut serve)?);
    } else {
        // Cross the boundary a different number of times each round. The writer's boundaries
        // are crossed once per group commit, many times a run; the relay's and the consumer's
        // once per batch, and against RabbitMQ batches are large, so those crash early enough
        // to be reached (a scenario whose crash point is not reached fails).
        let nth = match name {
            "after-commit" | "mid-group-commit" => opts.records / 10 + 7 * round,
            _ => 3 + 4 * (round - 1),
        };
        load.args(["--crash-at", &format!("{name}:{nth}")]);
    }
    load.args([
        "load",
        "--records",
        &records,
        "--threads",
        "4",
        "--timeout",
        "60s",
    ]);
    let first = Child2::spawn(&mut load)?.wait(TIMEOUT);
    let first_run = describe(first);
    let mut serve = Command::new(exe);
    common(&mut serve);
    serve.arg("serve");
    serves.push(Child2::spawn(&mut serve)?);
    let recovered = wait_until(TIMEOUT, || {
        audits(&settings)
            .map(|(a, pending, dead)| violations(&a, pending, dead).is_empty())
            .unwrap_or(false)
    });
    for s in &mut serves {
        s.terminate();
    }
    let (a, pending, dead) = audits(&settings)?;
    let mut violations = violations(&a, pending, dead);
    if name != "two-processes" && first_run != "crashed (abort)" {
        violations.push(format!(
            "the crash point {name} was never reached (the first run {first_run}): this scenario proved nothing"
        ));
    }
    if let Some(url) = &settings.amqp_url {
        if let Err(e) = crate::transport::amqp::Amqp::connect(url, &settings).and_then(|amqp| {
            wait_until(Duration::from_secs(10), || {
                crate::transport::Transport::is_connected(&amqp)
            });
            amqp.delete_queue()
        }) {
            log::warn!(
                "verify: could not delete the queues of {}: {e}",
                settings.topic
            );
        }
    }
    if !recovered && violations.is_empty() {
        violations.push("the audit was clean only after the services stopped".into());
    }
    if !violations.is_empty() {
        let kept = tmp.keep();
        violations.push(format!("data kept at {}", kept.display()));
    }
    Ok(Outcome {
        round,
        scenario: name.to_string(),
        first_run,
        recovered,
        committed: a.iter().map(|x| x.committed).sum(),
        delivered: a.iter().map(|x| x.delivered).sum(),
        redelivered: a.iter().map(|x| x.redelivered.len() as u64).sum(),
        violations,
    })
}

/// Run every scenario `rounds` times, printing a table as it goes. Fails on any violation.
pub fn run(base: &Settings, opts: &VerifyOptions) -> Result<Vec<Outcome>> {
    let exe = std::env::current_exe().map_err(|e| Error::Io {
        path: "current executable".into(),
        source: e,
    })?;
    println!(
        "transport: {}; store: {}",
        match &base.amqp_url {
            Some(_) => "RabbitMQ (--amqp-url), a queue per scenario",
            None => "in-process",
        },
        match &base.store {
            crate::config::StoreTarget::Mysql(_) => "MySQL (--store), databases per scenario",
            crate::config::StoreTarget::Sqlite => "SQLite, a directory per scenario",
        }
    );
    println!(
        "{:<5} {:<18} {:<22} {:<9} {:>9} {:>9} {:>11}  result",
        "round", "scenario", "first run", "recovery", "committed", "delivered", "redelivered"
    );
    let mut outcomes = Vec::new();
    for round in 1..=opts.rounds {
        for name in BOUNDARIES
            .iter()
            .map(|b| b.as_str())
            .chain(["two-processes"])
        {
            let o = scenario(&exe, base, opts, round, name)?;
            println!(
                "{:<5} {:<18} {:<22} {:<9} {:>9} {:>9} {:>11}  {}",
                o.round,
                o.scenario,
                o.first_run,
                if o.recovered { "ok" } else { "timed out" },
                o.committed,
                o.delivered,
                o.redelivered,
                if o.violations.is_empty() {
                    "ok".to_string()
                } else {
                    format!("VIOLATION: {}", o.violations.join("; "))
                }
            );
            outcomes.push(o);
        }
    }
    let failed = outcomes.iter().filter(|o| !o.violations.is_empty()).count();
    println!(
        "verify: {} scenarios, {} passed, {failed} failed",
        outcomes.len(),
        outcomes.len() - failed
    );
    if failed > 0 {
        return Err(Error::Violation(format!(
            "{failed} scenarios broke an invariant (see the table above)"
        )));
    }
    Ok(outcomes)
}
