//! `big-market bench`: the pipeline measured side by side with the ceilings of its parts, in one
//! run on fresh temporary data directories with the same durability settings. Prints each
//! figure as it is measured, then one JSON line with every figure and the ratios.
//!
//! - `sqlite_limit`: awards/s for raw inserts of the same two rows per award, 1,000 awards per
//!   transaction, one thread per shard file, no pipeline around them (the insert ceiling).
//! - `sqlite_e2e_limit`: every statement the embedded pipeline runs for an award (award and task
//!   insert, delivery log, award completion, task completion), 1,000 awards per transaction, one
//!   thread per shard: the ceiling of a pipeline that must also deliver.
//! - `sqlite_group_limit`: the same statements in transactions of `threads / shards` awards, the
//!   largest group that callers with one award each in flight can form (every statement of an
//!   award in one transaction, where the pipeline commits its save before anything else).
//! - `broker_limit`: persistent publishes/s of same-sized messages with pipelined confirms
//!   (only with an AMQP URL; the in-process transport has no broker ceiling).
//! - `broker_e2e_limit`: the same publishes while a consumer with manual acks drains the queue,
//!   until the last one is consumed: the ceiling of a pipeline that delivers through RabbitMQ.
//! - `naive`: the original's design: per award one transaction, a publish and a wait for its
//!   confirm, one more transaction to mark the task; on the same number of caller threads,
//!   through one connection per shard file (a pool whose callers queue for SQLite's one writer).
//! - `pipeline`: `save_award` from many caller threads, one award per call as HTTP requests
//!   do, end to end: from the first save to the last award delivered.
//! - `drain`: tasks/s for the scanner to deliver a backlog of failed tasks; the backlog is
//!   written while the broker is down, and its peak memory is reported.
//!
//! With `--store mysql://…` the bench measures the MySQL store instead, on fresh databases named
//! after the configured ones (`<name>_b<digits><phase>`, dropped afterwards):
//! - `mysql_e2e_limit`: every statement of an award end to end as multi-row statements,
//!   1,000 awards per transaction, one connection (and thread) per database;
//! - `mysql_group_limit`: the same in transactions of `threads / databases` awards, the largest
//!   group that callers with one award each in flight can form;
//! - `mysql_naive`: the original's design on its own database: per award one transaction with
//!   the award and its task (the original's statements), a publish and its confirm, one
//!   statement to complete the task, through a pool of connections per database;
//! - `pipeline` and `pipeline_batched` as above, against it.
//!
//! Beside `mysql_e2e_limit` and `pipeline` it prints the statements and commits the servers ran
//! per award (their global `Questions` and `Com_commit`; other clients of the servers count too).
//!
//! `bench --sweep` ([`crate::sweep`]) measures the ceilings, the original's design and the
//! pipeline (and, with `--http`, the HTTP API) at 16, 64 and 256 callers on the same store and
//! transport, prints one table and one JSON line per caller count, and with `--plot FILE` draws
//! them as an SVG line chart (awards/s per caller count, save p99 on a second axis).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{AmqpUrl, MysqlDatabase, Settings, StoreTarget};
use crate::error::{Error, Result};
use crate::load::{callers, Calls, Latencies};
use crate::model::{AwardRecord, EventMessage};
use crate::router::{award_table, route};
use crate::service::{Parts, Service};
use crate::store::Store;
use crate::store::{mysql_server_work, Direct, SeedDatabase};
use crate::transport::amqp::Amqp;
use crate::transport::fault::Faulty;
use crate::transport::memory::InProcess;
use crate::transport::{Outgoing, Transport};
use crate::util::{now_ms, Rng};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Awards per phase (the naive phase uses a fifth of them).
    pub records: usize,
    /// Caller threads for the naive and pipeline phases.
    pub threads: usize,
    /// Also measure `POST /api/v1/awards` through the HTTP server.
    pub http: bool,
}

/// Every figure of one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    /// Transport used (`in-process` or the AMQP URL without password).
    pub transport: String,
    /// Store measured: `sqlite`, or the MySQL databases' URLs without passwords.
    pub store: String,
    /// MySQL ceiling of the whole pipeline, awards/s (`--store mysql://…` only).
    pub mysql_e2e_limit: Option<f64>,
    /// `pipeline / mysql_e2e_limit`: the target is 0.7.
    pub pipeline_over_mysql_e2e_limit: Option<f64>,
    /// The MySQL ceiling in groups of `threads / databases` awards (what the callers can form).
    pub mysql_group_limit: Option<f64>,
    /// Statements the MySQL servers ran per award during `mysql_e2e_limit`.
    pub mysql_e2e_statements_per_award: Option<f64>,
    /// Commits per award during `mysql_e2e_limit`.
    pub mysql_e2e_commits_per_award: Option<f64>,
    /// Statements the MySQL servers ran per award during `pipeline`.
    pub pipeline_statements_per_award: Option<f64>,
    /// Commits per award during `pipeline`.
    pub pipeline_commits_per_award: Option<f64>,
    /// Awards per phase.
    pub records: usize,
    /// Caller threads.
    pub threads: usize,
    /// Insert ceiling, awards/s.
    pub sqlite_limit: f64,
    /// Storage ceiling of the whole embedded pipeline, awards/s.
    pub sqlite_e2e_limit: f64,
    /// The same statements in groups of the callers per shard, awards/s (the SQLite store only).
    pub sqlite_group_limit: Option<f64>,
    /// Broker ceiling, messages/s (AMQP only).
    pub broker_limit: Option<f64>,
    /// Broker ceiling with a consumer draining the queue, messages/s (AMQP only).
    pub broker_e2e_limit: Option<f64>,
    /// The original's design on SQLite, awards/s (the SQLite store only).
    pub naive: Option<f64>,
    /// The original's design on the MySQL store, awards/s (`--store mysql://…` only).
    pub mysql_naive: Option<f64>,
    /// Our pipeline end to end (first save to last delivery), awards/s.
    pub pipeline: f64,
    /// Our pipeline through `save_awards` in batches of 100, awards/s (not part of the ratios).
    pub pipeline_batched: f64,
    /// Backlog drain, tasks/s (not measured by `--sweep`).
    pub drain: Option<f64>,
    /// Median `save_award` latency under load, ms.
    pub save_p50_ms: f64,
    /// 99th percentile `save_award` latency under load, ms.
    pub save_p99_ms: f64,
    /// `POST /api/v1/awards` requests/s through the HTTP server (with `--http`).
    pub http: Option<f64>,
    /// 99th percentile request latency through HTTP, ms.
    pub http_p99_ms: Option<f64>,
    /// `http / pipeline` (with `--http`).
    pub http_over_pipeline: Option<f64>,
    /// Peak resident memory while the pipeline phase ran, MB (the service under load).
    pub pipeline_peak_rss_mb: f64,
    /// Peak resident memory while the backlog phase saved every award with the broker down, MB.
    pub backlog_peak_rss_mb: Option<f64>,
    /// Peak resident memory of the whole bench process, test data included, MB.
    pub peak_rss_mb: f64,
    /// `pipeline / min(sqlite_e2e_limit, broker_e2e_limit)`: the target is 0.7.
    pub pipeline_over_e2e_limit: f64,
    /// `pipeline_batched` over the same ceiling as `pipeline_over_e2e_limit`: the target is 0.85.
    pub pipeline_batched_over_e2e_limit: Option<f64>,
    /// `pipeline / naive` (or `/ mysql_naive` on the MySQL store).
    pub pipeline_over_naive: Option<f64>,
    /// `drain / broker_limit`.
    pub drain_over_broker_limit: Option<f64>,
}

/// Award number `i` of a phase tagged `tag` (order ids are unique per phase).
fn record(i: usize, tag: char) -> AwardRecord {
    AwardRecord::sample(
        &format!("user{:04}", i % 1000),
        &format!("{tag}{i:011}"),
        1_712_377_010_878,
    )
    .expect("bench awards are valid")
}

fn records(n: usize, tag: char) -> Vec<AwardRecord> {
    (0..n).map(|i| record(i, tag)).collect()
}

fn fresh(base: &Settings, tmp: &tempfile::TempDir, name: &str) -> Settings {
    let mut s = base.clone();
    s.data_dir = tmp.path().join(name);
    s.topic = format!("{}_bench_{}", base.topic, Rng::new().digits(8));
    s.scan_interval = Duration::from_secs(3600);
    s
}

/// A connection to the broker at `url`, once it is up (bounded).
fn amqp(url: &AmqpUrl, s: &Settings) -> Result<Amqp> {
    let t = Amqp::connect(url, s)?;
    if !crate::util::wait_until(Duration::from_secs(10), || t.is_connected()) {
        return Err(Error::Broker("the bench needs a reachable broker".into()));
    }
    Ok(t)
}

/// The RabbitMQ queue of a phase (none in-process), deleted when the phase is done.
struct Queue(Option<Arc<Amqp>>);

impl Queue {
    /// Delete the queue (and its dead-letter queue) once the phase's service has stopped.
    fn delete(self) -> Result<()> {
        match self.0 {
            Some(a) => a.delete_queue(),
            None => Ok(()),
        }
    }
}

/// The configured transport for a phase, and its queue.
fn transport(s: &Settings) -> Result<(Arc<dyn Transport>, Queue)> {
    match &s.amqp_url {
        Some(url) => {
            let a = Arc::new(amqp(url, s)?);
            Ok((a.clone(), Queue(Some(a))))
        }
        None => Ok((Arc::new(InProcess::new(s.publish_timeout())), Queue(None))),
    }
}

/// A service on a fresh directory (or fresh scratch databases, which it initialises as `init`
/// would) with its consumer, so that it delivers what it saves; and its queue, to delete after
/// its shutdown.
fn start_service(s: &Settings) -> Result<(Service, Queue)> {
    drop(Store::open(s, true)?);
    let (t, queue) = transport(s)?;
    let service = Service::start(
        s.clone(),
        t,
        Parts {
            consumer: true,
            scanner_loop: false,
        },
    )?;
    Ok((service, queue))
}

/// Wait until the service has delivered `n` awards (bounded), then return the time since `start`.
fn until_delivered(service: &Service, n: usize, start: Instant, what: &str) -> Result<Duration> {
    let delivered = || service.metrics().delivered.load(Ordering::Relaxed) as usize;
    if !crate::util::wait_until(Duration::from_secs(600), || delivered() >= n) {
        return Err(Error::Broker(format!(
            "{what}: delivered {} of {n} within 600 s",
            delivered()
        )));
    }
    Ok(start.elapsed())
}

/// Counts what it consumes and acknowledges it: the consumer of `broker_e2e_limit`.
struct Counting(AtomicUsize);

impl crate::transport::Handler for Counting {
    fn handle(&self, _body: &[u8]) -> crate::transport::Handled {
        self.0.fetch_add(1, Ordering::Relaxed);
        crate::transport::Handled::Ack
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The transport of a phase of the original's design: RabbitMQ (the phase's queue deleted at
/// its end), or the in-process transport with a consumer that acknowledges each message, as the
/// original's listener does (it only logs what it receives). Either way a publish waits for its
/// confirm.
struct SeedTransport {
    t: Arc<dyn Transport>,
    queue: Queue,
    consumer: Option<Box<dyn crate::transport::ConsumerHandle>>,
}

impl SeedTransport {
    fn start(s: &Settings) -> Result<SeedTransport> {
        let (t, queue) = transport(s)?;
        let consumer = match queue.0 {
            Some(_) => None,
            None => {
                Some(t.start_consumer(Arc::new(Counting(AtomicUsize::new(0))), s.consumer_threads)?)
            }
        };
        Ok(SeedTransport { t, queue, consumer })
    }

    /// Publish one message and wait for its confirm.
    fn publish(&self, body: String) -> Result<()> {
        let one = [Outgoing {
            message_id: String::new(),
            body,
        }];
        match self.t.publish_batch(&one, &|| false).pop() {
            Some(Err(e)) => Err(Error::Broker(format!(
                "naive publish failed: {}",
                e.reason()
            ))),
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<()> {
        if let Some(c) = self.consumer {
            c.stop();
        }
        self.queue.delete()
    }
}

/// The original's design on the SQLite store, `n` awards from `threads` callers: per award
/// one transaction with the award and its task, a publish and its confirm, one transaction to
/// mark the task. Returns awards/s.
fn naive_phase(s: &Settings, threads: usize, n: usize) -> Result<f64> {
    drop(Store::open(s, true)?);
    // The original's connection pool hands a caller a connection per transaction, and the
    // database serialises their writes on its locks. A SQLite file takes one writer at a time,
    // so here that pool is one connection per shard behind a lock, held for one transaction:
    // the callers queue for the writer in the lock, not in SQLite's busy handler, which sleeps
    // and retries and fails a caller once the busy timeout has passed ("database is locked",
    // as 256 callers of their own connections on two files did).
    let shards: Vec<Mutex<Direct>> = (1..=s.layout.db_count())
        .map(|db| Direct::open(s, db).map(Mutex::new))
        .collect::<Result<_>>()?;
    let transport = SeedTransport::start(s)?;
    let recs = records(n, '3');
    let elapsed = on_threads(threads, n, |i| {
        let r = &recs[i];
        let shard = &shards[(route(r.user_id.as_str(), s.layout).db - 1) as usize];
        let (id, body) = shard
            .lock()
            .expect("naive shard lock")
            .save_one(r, &s.topic, now_ms())?;
        transport.publish(body)?;
        shard
            .lock()
            .expect("naive shard lock")
            .mark_one(id, now_ms())
    })
    .map(|calls| calls.elapsed);
    transport.finish()?;
    Ok(rate(n, elapsed?))
}

/// Connections per database of `mysql_naive`: HikariCP's default maximum, the pool Spring Boot
/// gives a data source unless told otherwise.
const SEED_POOL: usize = 10;

/// The original's design on the MySQL store (scratch databases), `n` awards from `threads`
/// callers: per award one transaction with the award and its task, a publish and its confirm,
/// the task's completion. Returns awards/s.
fn mysql_naive_phase(
    base: &Settings,
    dbs: &[MysqlDatabase],
    threads: usize,
    n: usize,
) -> Result<f64> {
    let scratch = Scratch::new(base, dbs, 'n');
    let s = &scratch.settings;
    drop(Store::open(s, true)?);
    let seeds: Vec<SeedDatabase> = scratch
        .dbs
        .dbs()
        .iter()
        .map(|d| SeedDatabase::open(d, SEED_POOL, s))
        .collect::<Result<_>>()?;
    let transport = SeedTransport::start(s)?;
    let recs = records(n, '3');
    let elapsed = on_threads(threads, n, |i| {
        let r = &recs[i];
        let at = route(r.user_id.as_str(), s.layout);
        let db = &seeds[(at.db - 1) as usize];
        let message = EventMessage::for_award(r, at.db, i as u64 + 1, now_ms());
        let body = message.encode();
        db.save(&award_table(at.table), r, &s.topic, &message.id, &body)?;
        transport.publish(body)?;
        db.complete(r.user_id.as_str(), &message.id)
    })
    .map(|calls| calls.elapsed);
    transport.finish()?;
    drop(seeds);
    drop(scratch);
    Ok(rate(n, elapsed?))
}

/// Run the callers on `threads` threads, each taking the next index until `n`: their time and
/// latencies, or the first failure.
fn on_threads(threads: usize, n: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<Calls> {
    callers("bench", threads, n as u64, |i| f(i as usize), || Ok(()))?.all_ok()
}

/// Create the shards of `s`, route `recs` to them, call `ready` just before the clock starts,
/// and run `f` on each shard's share (with the shard's database index), one thread per shard;
/// returns the time it took.
fn on_shards(
    s: &Settings,
    recs: Vec<AwardRecord>,
    ready: impl FnOnce() -> Result<()>,
    f: impl Fn(u32, &[AwardRecord]) -> Result<()> + Sync,
) -> Result<Duration> {
    drop(Store::open(s, true)?);
    let mut per_db: Vec<Vec<AwardRecord>> = vec![Vec::new(); s.layout.db_count() as usize];
    for r in recs {
        per_db[(route(r.user_id.as_str(), s.layout).db - 1) as usize].push(r);
    }
    ready()?;
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let handles = per_db
            .iter()
            .enumerate()
            .map(|(i, rs)| {
                let f = &f;
                crate::util::spawn_scoped(scope, format!("bench-db-{:02}", i + 1), move || {
                    f(i as u32 + 1, rs)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("bench thread"))
    })?;
    Ok(start.elapsed())
}

/// Publish `batches` batches of `chunk` copies of `body` from `threads` threads.
fn publish_batches(
    t: &dyn Transport,
    threads: usize,
    batches: usize,
    chunk: usize,
    body: &str,
) -> Result<Duration> {
    on_threads(threads, batches, |_| {
        let batch: Vec<Outgoing> = (0..chunk)
            .map(|i| Outgoing {
                message_id: format!("{i}"),
                body: body.to_string(),
            })
            .collect();
        match t
            .publish_batch(&batch, &|| false)
            .into_iter()
            .find_map(|r| r.err())
        {
            Some(e) => Err(Error::Broker(format!(
                "bench publish failed: {}",
                e.reason()
            ))),
            None => Ok(()),
        }
    })
    .map(|calls| calls.elapsed)
}

/// Reset the kernel's peak-RSS mark for this process (Linux: `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Measure everything, print each figure as it is measured and then one JSON line with all of
/// them; returns the figures.
pub fn run(base: &Settings, opts: &BenchOptions) -> Result<Figures> {
    let f = measure(base, opts, &Print::Stdout)?;
    println!("{}", serde_json::to_string(&f).expect("figures serialize"));
    Ok(f)
}

/// Measure one point of a sweep: every phase but the backlog drain, with the figure lines on
/// stderr; returns the figures.
pub(crate) fn measure_point(base: &Settings, opts: &BenchOptions) -> Result<Figures> {
    measure(base, opts, &Print::SweepPoint)
}

/// Where a run's figure lines go, and what it measures.
enum Print {
    /// A bench of its own: figure lines on stdout, every phase measured.
    Stdout,
    /// A point of a sweep: figure lines on stderr (stdout is the sweep's table and JSON lines),
    /// and no backlog drain (it does not depend on the callers).
    SweepPoint,
}

impl Print {
    fn line(&self, line: String) {
        match self {
            Print::Stdout => println!("{line}"),
            Print::SweepPoint => eprintln!("{line}"),
        }
    }
}

/// Measure every phase of one caller count on the configured store and transport.
fn measure(base: &Settings, opts: &BenchOptions, print: &Print) -> Result<Figures> {
    if let StoreTarget::Mysql(dbs) = &base.store {
        return run_mysql(base, dbs, opts, print);
    }
    let show = |line: String| print.line(line);
    let tmp = tempfile::tempdir().map_err(|e| Error::Io {
        path: std::env::temp_dir(),
        source: e,
    })?;
    let n = opts.records.max(100);
    let mut f = Figures {
        records: n,
        threads: opts.threads,
        store: "sqlite".into(),
        ..Default::default()
    };
    let say = |what: &str| eprintln!("bench: {what}");

    // 1. Storage ceilings.
    say("sqlite_limit: raw inserts, 1000 awards per transaction, one thread per shard");
    let s = fresh(base, &tmp, "sqlite_limit");
    f.sqlite_limit = rate(
        n,
        on_shards(
            &s,
            records(n, '1'),
            || Ok(()),
            |db, rs| Direct::open(&s, db)?.insert_batches(rs, 1000, &s.topic, now_ms()),
        )?,
    );
    show(format!("sqlite_limit  {:>10.0} awards/s", f.sqlite_limit));

    say("sqlite_e2e_limit: every statement of an award end to end, 1000 awards per transaction");
    f.sqlite_e2e_limit = sqlite_ceiling(&fresh(base, &tmp, "sqlite_e2e_limit"), n, 1000, '8')?;
    show(format!(
        "sqlite_e2e_limit {:>7.0} awards/s",
        f.sqlite_e2e_limit
    ));

    // The same statements in groups no larger than the callers can form: one award per caller
    // in flight, spread over the shards.
    let group = (opts.threads / base.layout.db_count() as usize).max(1);
    say(&format!(
        "sqlite_group_limit: the same, {group} awards per transaction (the callers per shard)"
    ));
    let s = fresh(base, &tmp, "sqlite_group_limit");
    let group_limit = sqlite_ceiling(&s, (n / 4).max(100), group, '7')?;
    f.sqlite_group_limit = Some(group_limit);
    show(format!(
        "sqlite_group_limit {:>5.0} awards/s  ({group} awards per transaction)",
        group_limit
    ));

    // 2. Broker ceiling.
    if let Some(url) = &base.amqp_url {
        say("broker_limit: persistent publishes, pipelined confirms");
        let s = fresh(base, &tmp, "broker_limit");
        let t = Amqp::connect(url, &s)?;
        f.transport = t.describe();
        let body = EventMessage::for_award(&records(1, '2')[0], 1, 1, now_ms()).encode();
        let chunk = 200;
        // As many publishers as a link has publishing channels at the least, so that none
        // waits for one.
        let publishers = opts
            .threads
            .min(crate::transport::amqp::PUBLISH_CHANNELS_MIN);
        let batches = n.div_ceil(chunk);
        let elapsed = publish_batches(&t, publishers, batches, chunk, &body)?;
        f.broker_limit = Some(rate(batches * chunk, elapsed));
        t.delete_queue()?;
        show(format!(
            "broker_limit  {:>10.0} messages/s",
            f.broker_limit.unwrap_or(0.0)
        ));
        drop(t);

        say("broker_e2e_limit: the same publishes while a consumer with manual acks drains the queue");
        let s = fresh(base, &tmp, "broker_e2e_limit");
        let t = amqp(url, &s)?;
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let consumer = t.start_consumer(counting.clone(), s.consumer_threads)?;
        let start = Instant::now();
        publish_batches(&t, publishers, batches, chunk, &body)?;
        let total = batches * chunk;
        if !crate::util::wait_until(Duration::from_secs(600), || {
            counting.0.load(Ordering::Relaxed) >= total
        }) {
            return Err(Error::Broker(
                "broker_e2e_limit: the consumer did not drain the queue".into(),
            ));
        }
        f.broker_e2e_limit = Some(rate(total, start.elapsed()));
        consumer.stop();
        t.delete_queue()?;
        show(format!(
            "broker_e2e_limit {:>7.0} messages/s",
            f.broker_e2e_limit.unwrap_or(0.0)
        ));
    } else {
        f.transport = "in-process".into();
        show(
            "broker_limit        n/a (no --amqp-url: the in-process transport has no broker)"
                .into(),
        );
    }

    // 3. The original's design.
    let naive_n = (n / 5).max(100);
    say(&format!(
        "naive: {naive_n} awards, one transaction + one confirm + one transaction each"
    ));
    let naive = naive_phase(&fresh(base, &tmp, "naive"), opts.threads, naive_n)?;
    f.naive = Some(naive);
    show(format!("naive         {naive:>10.0} awards/s"));

    // 4. Our pipeline.
    say(&format!(
        "pipeline: save_award from {} threads, one award per call, until the last is delivered",
        opts.threads
    ));
    let s = fresh(base, &tmp, "pipeline");
    let (service, queue) = start_service(&s)?;
    pipeline_phase(&service, opts.threads, n, &mut f)?;
    service.shutdown()?;
    queue.delete()?;
    show(format!(
        "pipeline      {:>10.0} awards/s end to end  (save p50 {:.2} ms, p99 {:.2} ms; {:.2} x sqlite_group_limit)",
        f.pipeline,
        f.save_p50_ms,
        f.save_p99_ms,
        f.pipeline / group_limit
    ));

    // 4b. The same pipeline for callers that save in batches.
    say("pipeline_batched: save_awards, 100 awards per call, until the last is delivered");
    let s = fresh(base, &tmp, "pipeline_batched");
    let (service, queue) = start_service(&s)?;
    f.pipeline_batched = batched_phase(&service, opts.threads, n)?;
    service.shutdown()?;
    queue.delete()?;
    show(format!(
        "pipeline_batched {:>7.0} awards/s end to end  (save_awards, 100 per call)",
        f.pipeline_batched
    ));

    // 5. Backlog drain.
    if let Print::Stdout = print {
        drain_phase(&fresh(base, &tmp, "drain"), opts.threads, n, &mut f)?;
        show(format!(
            "drain         {:>10.0} tasks/s  (backlog written with the broker down: peak {:.1} MB)",
            f.drain.unwrap_or(0.0),
            f.backlog_peak_rss_mb.unwrap_or(0.0)
        ));
    }

    // 6. Through the HTTP API.
    if opts.http {
        let s = fresh(base, &tmp, "http");
        http_phase(&s, opts.threads, n, &mut f)?;
        f.http_over_pipeline = f.http.map(|h| h / f.pipeline);
        show(format!(
            "http          {:>10.0} requests/s end to end  (p99 {:.2} ms; {:.2} x pipeline's {:.0} awards/s, p99 {:.2} ms)",
            f.http.unwrap_or(0.0),
            f.http_p99_ms.unwrap_or(0.0),
            f.http_over_pipeline.unwrap_or(0.0),
            f.pipeline,
            f.save_p99_ms
        ));
    }

    f.peak_rss_mb = peak_rss_mb();
    let ceiling = f
        .sqlite_e2e_limit
        .min(f.broker_e2e_limit.unwrap_or(f64::INFINITY));
    f.pipeline_over_e2e_limit = f.pipeline / ceiling;
    f.pipeline_batched_over_e2e_limit = Some(f.pipeline_batched / ceiling);
    f.pipeline_over_naive = Some(f.pipeline / naive);
    f.drain_over_broker_limit = f.broker_limit.zip(f.drain).map(|(b, d)| d / b);
    show(format!(
        "peak memory   {:>10.1} MB during the pipeline phase ({:.1} MB for the whole bench, test data included)",
        f.pipeline_peak_rss_mb, f.peak_rss_mb
    ));
    Ok(f)
}

/// `n` awards saved from `threads` callers while the broker is down, then the scanner sends the
/// backlog: fills the drain rate and the backlog's peak memory.
fn drain_phase(s: &Settings, threads: usize, n: usize, f: &mut Figures) -> Result<()> {
    let (t, queue) = transport(s)?;
    let faulty = Arc::new(Faulty::new(t));
    let service = Service::start(
        s.clone(),
        faulty.clone(),
        Parts {
            consumer: true,
            scanner_loop: false,
        },
    )?;
    faulty.set_down(true);
    reset_peak_rss();
    on_threads(threads, n, |i| {
        service.save_award(record(i, '5')).map(|_| ())
    })?;
    if !crate::util::wait_until(Duration::from_secs(600), || service.relays_idle()) {
        return Err(Error::Broker(
            "drain: the relays did not settle the backlog".into(),
        ));
    }
    f.backlog_peak_rss_mb = Some(peak_rss_mb());
    faulty.set_down(false);
    let start = Instant::now();
    let report = service.drain(1000)?;
    f.drain = Some(rate(report.relayed.completed, start.elapsed()));
    if report.relayed.completed != n {
        return Err(Error::Broker(format!(
            "drain delivered {} of {n}",
            report.relayed.completed
        )));
    }
    service.shutdown()?;
    queue.delete()
}

/// Fresh MySQL databases for one phase (`<name>_b<digits><phase>`), dropped afterwards.
struct Scratch {
    settings: Settings,
    dbs: crate::store::Scratch,
}

impl Scratch {
    fn new(base: &Settings, dbs: &[MysqlDatabase], phase: char) -> Scratch {
        let tag = Rng::new().digits(6);
        let dbs = crate::store::Scratch::new(dbs, &format!("b{tag}{phase}"));
        let mut settings = base.clone();
        settings.store = dbs.target();
        settings.topic = format!("{}_bench_{tag}", base.topic);
        settings.scan_interval = Duration::from_secs(3600);
        Scratch { settings, dbs }
    }
}

/// `save_award` from `threads` callers, one award per call, until the last is delivered: fills
/// the pipeline's rate, save latencies and peak memory.
fn pipeline_phase(service: &Service, threads: usize, n: usize, f: &mut Figures) -> Result<()> {
    reset_peak_rss();
    let progress = crate::load::progress_bar(n as u64, "pipeline");
    let start = Instant::now();
    let mut calls = on_threads(threads, n, |i| {
        service.save_award(record(i, '4'))?;
        progress.inc(1);
        Ok(())
    })?;
    progress.finish_and_clear();
    f.pipeline = rate(n, until_delivered(service, n, start, "pipeline")?);
    f.save_p50_ms = calls.latencies.percentile_ms(0.50);
    f.save_p99_ms = calls.latencies.percentile_ms(0.99);
    f.pipeline_peak_rss_mb = peak_rss_mb();
    Ok(())
}

/// `POST /api/v1/awards` from `threads` keep-alive connections to a server on a fresh service,
/// until the last is delivered: fills the HTTP rate and p99.
fn http_phase(s: &Settings, threads: usize, n: usize, f: &mut Figures) -> Result<()> {
    eprintln!(
        "bench: http: POST /api/v1/awards from {threads} keep-alive clients, until the last is delivered"
    );
    let (service, queue) = start_service(s)?;
    let service = Arc::new(service);
    let server = crate::http::HttpServer::start(
        crate::http::HttpConfig::local("127.0.0.1:0"),
        service.clone(),
    )?;
    let body = |i: usize| {
        let r = record(i, '6');
        serde_json::json!({"userId": r.user_id.as_str(), "activityId": r.activity_id, "strategyId": r.strategy_id, "orderId": r.order_id.as_str(), "awardId": r.award_id, "awardTitle": r.award_title})
            .to_string()
    };
    let start = Instant::now();
    let mut lat: Latencies =
        crate::http::client::post_load(server.local_addr(), "/api/v1/awards", threads, n, body)?
            .into_iter()
            .collect();
    let elapsed = until_delivered(&service, n, start, "http")?;
    f.http = Some(rate(n, elapsed));
    f.http_p99_ms = Some(lat.percentile_ms(0.99));
    server.stop();
    Arc::try_unwrap(service)
        .map_err(|_| Error::Config("http bench still holds the service".into()))?
        .shutdown()?;
    queue.delete()
}

/// `save_awards` from `threads` callers, 100 awards per call, until the last is delivered.
fn batched_phase(service: &Service, threads: usize, n: usize) -> Result<f64> {
    let calls = n.div_ceil(100);
    let start = Instant::now();
    on_threads(threads, calls, |c| {
        let batch: Vec<AwardRecord> = (c * 100..((c + 1) * 100).min(n))
            .map(|i| record(i, '7'))
            .collect();
        match service.save_awards(batch).into_iter().find_map(|r| r.err()) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    })?;
    Ok(rate(
        n,
        until_delivered(service, n, start, "pipeline_batched")?,
    ))
}

/// Every statement of `n` awards end to end on scratch databases, `batch` awards per
/// transaction, one connection and thread per database: awards/s, and the statements and
/// commits per award the servers ran meanwhile.
fn mysql_ceiling(
    base: &Settings,
    dbs: &[MysqlDatabase],
    n: usize,
    batch: usize,
    phase: char,
    tag: char,
) -> Result<(f64, (f64, f64))> {
    let scratch = Scratch::new(base, dbs, phase);
    let s = &scratch.settings;
    let mut before = None;
    let elapsed = on_shards(
        s,
        records(n, tag),
        || {
            before = Some(mysql_server_work(dbs)?);
            Ok(())
        },
        |db, rs| {
            let d = &scratch.dbs.dbs()[db as usize - 1];
            crate::store::mysql_e2e_batches(d, db, s.layout, rs, batch, &s.topic)
        },
    )?;
    let work = mysql_server_work(dbs)?.per_award(before.unwrap_or_default(), n);
    Ok((rate(n, elapsed), work))
}

/// Every statement of an award end to end on fresh shards `s`, `n` awards, `batch` per
/// transaction, one thread per shard: awards/s.
fn sqlite_ceiling(s: &Settings, n: usize, batch: usize, tag: char) -> Result<f64> {
    let elapsed = on_shards(
        s,
        records(n, tag),
        || Ok(()),
        |db, rs| Direct::open(s, db)?.e2e_batches(rs, batch, &s.topic, now_ms()),
    )?;
    Ok(rate(n, elapsed))
}

/// The bench on the MySQL store: its ceilings and the original's design beside the pipeline.
fn run_mysql(
    base: &Settings,
    dbs: &[MysqlDatabase],
    opts: &BenchOptions,
    print: &Print,
) -> Result<Figures> {
    let n = opts.records.max(100);
    let say = |what: &str| eprintln!("bench: {what}");
    let show = |line: String| print.line(line);
    let mut f = Figures {
        records: n,
        threads: opts.threads,
        store: dbs
            .iter()
            .map(|d| d.shown.as_str())
            .collect::<Vec<_>>()
            .join(","),
        transport: match &base.amqp_url {
            Some(_) => "amqp".into(),
            None => "in-process".into(),
        },
        ..Default::default()
    };

    say("mysql_e2e_limit: every statement of an award end to end, multi-row, 1000 awards per transaction, one connection per database");
    let (limit, (statements, commits)) = mysql_ceiling(base, dbs, n, 1000, 'e', '8')?;
    f.mysql_e2e_limit = Some(limit);
    f.mysql_e2e_statements_per_award = Some(statements);
    f.mysql_e2e_commits_per_award = Some(commits);
    show(format!(
        "mysql_e2e_limit {:>8.0} awards/s  ({statements:.3} statements, {commits:.4} commits per award)",
        limit
    ));

    // The same statements in groups no larger than the callers can form: one award per caller
    // in flight, spread over the databases.
    let group = (opts.threads / dbs.len()).max(1);
    say(&format!(
        "mysql_group_limit: the same, {group} awards per transaction (the callers per database)"
    ));
    let (group_limit, _) = mysql_ceiling(base, dbs, (n / 4).max(100), group, 'g', '9')?;
    f.mysql_group_limit = Some(group_limit);
    show(format!(
        "mysql_group_limit {:>6.0} awards/s  ({group} awards per transaction)",
        group_limit
    ));

    let naive_n = (n / 5).max(100);
    say(&format!(
        "mysql_naive: {naive_n} awards, the original's statements: one transaction + one confirm + one completion each, {SEED_POOL} connections per database"
    ));
    let naive = mysql_naive_phase(base, dbs, opts.threads, naive_n)?;
    f.mysql_naive = Some(naive);
    show(format!(
        "mysql_naive   {naive:>10.0} awards/s  ({:.3} x mysql_e2e_limit)",
        naive / limit
    ));

    say(&format!(
        "pipeline: save_award from {} threads, one award per call, until the last is delivered",
        opts.threads
    ));
    let scratch = Scratch::new(base, dbs, 'p');
    let (service, queue) = start_service(&scratch.settings)?;
    let before = mysql_server_work(dbs)?;
    pipeline_phase(&service, opts.threads, n, &mut f)?;
    let (statements, commits) = mysql_server_work(dbs)?.per_award(before, n);
    service.shutdown()?;
    queue.delete()?;
    drop(scratch);
    f.pipeline_over_mysql_e2e_limit = Some(f.pipeline / limit);
    f.pipeline_over_naive = Some(f.pipeline / naive);
    f.pipeline_statements_per_award = Some(statements);
    f.pipeline_commits_per_award = Some(commits);
    show(format!(
        "pipeline      {:>10.0} awards/s end to end  (save p50 {:.2} ms, p99 {:.2} ms; {:.2} x mysql_e2e_limit, {:.2} x mysql_group_limit, {:.1} x mysql_naive; {statements:.3} statements, {commits:.4} commits per award)",
        f.pipeline,
        f.save_p50_ms,
        f.save_p99_ms,
        f.pipeline / limit,
        f.pipeline / group_limit,
        f.pipeline / naive
    ));

    say("pipeline_batched: save_awards, 100 awards per call, until the last is delivered");
    let scratch = Scratch::new(base, dbs, 'b');
    let (service, queue) = start_service(&scratch.settings)?;
    f.pipeline_batched = batched_phase(&service, opts.threads, n)?;
    service.shutdown()?;
    queue.delete()?;
    drop(scratch);
    show(format!(
        "pipeline_batched {:>7.0} awards/s end to end  (save_awards, 100 per call; {:.2} x mysql_e2e_limit)",
        f.pipeline_batched,
        f.pipeline_batched / limit
    ));

    if opts.http {
        let scratch = Scratch::new(base, dbs, 'h');
        http_phase(&scratch.settings, opts.threads, n, &mut f)?;
        drop(scratch);
        f.http_over_pipeline = f.http.map(|h| h / f.pipeline);
        show(format!(
            "http          {:>10.0} requests/s end to end  (p99 {:.2} ms; {:.2} x pipeline's {:.0} awards/s; {:.2} x mysql_e2e_limit)",
            f.http.unwrap_or(0.0),
            f.http_p99_ms.unwrap_or(0.0),
            f.http_over_pipeline.unwrap_or(0.0),
            f.pipeline,
            f.http.unwrap_or(0.0) / limit
        ));
    }

    f.peak_rss_mb = peak_rss_mb();
    f.pipeline_over_e2e_limit = f.pipeline / limit;
    f.pipeline_batched_over_e2e_limit = Some(f.pipeline_batched / limit);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_naive_phases_callers_never_wait_on_sqlites_busy_handler() {
        // With no busy timeout at all, any two writers that meet on a shard file fail with
        // "database is locked" at once: the callers must queue for the file's one writer
        // outside SQLite, so that no caller count runs into the timeout.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::new(dir.path().join("data"));
        s.busy_timeout = Duration::ZERO;
        let rate = naive_phase(&s, 64, 400).unwrap();
        assert!(rate > 0.0);
        let store = Store::open(&s, false).unwrap();
        let completed: u64 = store
            .status()
            .unwrap()
            .iter()
            .map(|shard| shard.tasks_in(crate::model::TaskState::Completed))
            .sum();
        assert_eq!(completed, 400, "every award's task is marked completed");
    }
}
