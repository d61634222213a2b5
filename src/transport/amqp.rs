//! RabbitMQ through lapin (on async-global-executor): the only code that speaks AMQP.
//!
//! Topology like the original's `convertAndSend(topic, message)`: the default exchange, routing
//! key = topic, and a durable queue named after the topic, declared on every connect. Publishes
//! are persistent and `mandatory` on a confirming channel; a batch is sent with every publish in
//! flight, then its confirms are awaited. A message counts as sent only on an ack that carries no
//! returned message (an unroutable mandatory message is acked *with* the returned message, and
//! is a failure). Consuming uses a second connection, manual acks and a prefetch limit.
//!
//! A supervisor thread watches both connections and reconnects with backoff, logging each state
//! change once. While disconnected, publishes fail fast as `Unavailable` (not counted against
//! the task) and the scanner pauses.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, Sender};
use lapin::message::{Delivery, DeliveryResult};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::{ConsumerHandle, Handled, Handler, Outgoing, PublishFailure, Transport, CONSUME_BATCH};
use crate::config::{AmqpUrl, QueueType, Settings};
use crate::error::{Error, Result};

/// Longest wait for a connection attempt: the TCP connect, the AMQP handshake, the channel and
/// the topology. An attempt past it is abandoned, and its socket shut down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a connection's orderly close; past it its socket is shut down.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the supervisor checks a healthy connection.
const HEALTH_TICK: Duration = Duration::from_millis(200);
/// Longest wait for a publisher confirm or an ack; past it the connection is presumed dead.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connect attempt's socket. lapin runs each connection on an I/O thread of its own that
/// only a closed socket ends, so an attempt abandoned at its deadline (a peer that accepts and
/// never speaks), and a link being closed, shut the socket down: the thread ends, and a
/// handshake that would complete late completes on a dead socket. lapin's I/O thread holds the
/// attempt (through the connect function it was given) until it ends, which tells the
/// supervisor whether an earlier attempt is still alive.
#[derive(Default)]
struct Attempt {
    /// A second handle on the connection's socket, and whether the attempt was abandoned.
    socket: Mutex<(Option<std::net::TcpStream>, bool)>,
}

impl Attempt {
    fn abandon(&self) {
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        socket.1 = true;
        if let Some(s) = socket.0.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    channel: Channel,
    attempt: Weak<Attempt>,
    /// The node it is connected to (its URL without the password).
    node: String,
    /// Set when the server cancelled the link's consumer (a node lost, a leader moved, a
    /// consumer timeout), or a retired publishing channel could not be replaced: the link is
    /// then replaced (so the consumer subscribes again, and the publishing channels are fresh).
    cancelled: Arc<AtomicBool>,
    /// The publishing link's confirm channels, each lent to one batch (or dead letter) at a
    /// time, from its hand-over until its last confirm: on a channel, lapin numbers a publish
    /// for its confirm under one lock and queues its frames under another, one ack may confirm
    /// many, and a returned message goes to whichever confirm an ack completes first. With
    /// one batch per channel, the confirms and returned messages a batch hears are of its own
    /// publishes. Empty on the other links.
    pool: Pool,
}

/// A link's publishing channels: those free to lend, and those set aside for good (see
/// [`Pool::retire`]), kept open until the link goes.
#[derive(Clone)]
struct Pool {
    free: (
        async_channel::Sender<Channel>,
        async_channel::Receiver<Channel>,
    ),
    parked: Arc<Mutex<Vec<Channel>>>,
    conn: Arc<Connection>,
    /// The link's `cancelled`: set to have the link replaced.
    replace: Arc<AtomicBool>,
}

/// A publishing channel lent to one batch. Back to its pool on drop once `settled` (every
/// confirm of what was published on it came back) and still open; otherwise (a batch that
/// gave up with confirms outstanding, a channel the broker closed) it is set aside and a fresh
/// one takes its place: see [`Pool::retire`].
struct Lent {
    channel: Channel,
    settled: bool,
    pool: Pool,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.settled && self.channel.status().connected() {
            // The pool has room for every channel of the link: this never fails while it lives.
            let _ = self.pool.free.0.try_send(self.channel.clone());
        } else {
            self.pool.retire(self.channel.clone());
        }
    }
}

/// The fewest publishing channels a link has: as many batches as the bench's broker ceiling
/// keeps in flight.
pub(crate) const PUBLISH_CHANNELS_MIN: usize = 8;

/// Failed opens of a fresh channel, on a connection that is not blocked, after which the link
/// is replaced instead.
const RETIRE_TRIES: u32 = 3;

/// Channels set aside on one link after which the link is replaced instead (each is an open
/// channel on the broker until then).
const PARKED_MAX: usize = 32;

/// A channel in confirm mode on `conn`.
async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Pool {
    /// A pool of `n` fresh confirm channels on `conn`, opened side by side (each is two round
    /// trips).
    async fn open(
        n: usize,
        conn: Arc<Connection>,
        replace: Arc<AtomicBool>,
    ) -> lapin::Result<Pool> {
        let channels = futures_util::future::join_all((0..n).map(|_| confirm_channel(&conn)))
            .await
            .into_iter()
            .collect::<lapin::Result<Vec<_>>>()?;
        let free = async_channel::bounded(n.max(1));
        for channel in channels {
            let _ = free.0.try_send(channel);
        }
        Ok(Pool {
            free,
            parked: Arc::default(),
            conn,
            replace,
        })
    }

    /// Borrow a channel, waiting for one while every one is lent (a channel the broker closed
    /// meanwhile is retired, not lent).
    async fn lend(&self) -> Option<Lent> {
        loop {
            let channel = self.free.1.recv().await.ok()?;
            if channel.status().connected() {
                return Some(Lent {
                    channel,
                    settled: false,
                    pool: self.clone(),
                });
            }
            self.retire(channel);
        }
    }

    /// Channels free now, and set aside.
    fn counts(&self) -> (usize, usize) {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner()).len();
        (self.free.1.len(), parked)
    }

    /// Set `old` aside for good and put a fresh confirm channel in its place. A batch that gave
    /// up may leave confirms outstanding on its channel, and lapin attaches a returned message
    /// to whichever confirm an ack completes first: nothing published on `old` is to be
    /// confirmed alongside another batch, and waiting for its confirms has no reliable end
    /// (`wait_for_confirms` awaits only the newest, and only once). It is not closed either: a
    /// close would go out ahead of its publishes still queued in lapin, and RabbitMQ closes the
    /// whole connection on a frame for a closed channel (CHANNEL_ERROR). It stays open, unused,
    /// until the link goes; past [`PARKED_MAX`] the link is replaced. The fresh channel is
    /// opened in the background, bounded, looking again every [`BLOCKED_POLL`] while the
    /// connection is blocked (the broker reads nothing from it then) and with a backoff after a
    /// failed open ([`retire_pause`]); after [`RETIRE_TRIES`] failed opens the link is
    /// marked for replacement; the task ends once the connection or the pool is gone (it holds
    /// neither the pool's receiver nor its parked channels).
    fn retire(&self, old: Channel) {
        // A closed channel needs no keeping (nothing more is sent on it); an open one is kept.
        let set_aside = {
            let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            if old.status().connected() {
                parked.push(old);
            }
            parked.len()
        };
        if set_aside > PARKED_MAX {
            log::warn!(
                "{set_aside} publishing channels set aside after batches that gave up: reconnecting"
            );
            self.replace.store(true, Ordering::SeqCst);
            return;
        }
        log::debug!("a publishing channel came back with confirms outstanding, or closed: set aside, a fresh one takes its place");
        let (home, conn, replace) = (self.free.0.clone(), self.conn.clone(), self.replace.clone());
        async_global_executor::spawn(async move {
            let live = || conn.status().connected() && !home.is_closed();
            let mut backoff = BACKOFF_MIN;
            let mut failed = 0;
            while live() {
                if !conn.status().blocked() {
                    match bounded_wait(confirm_channel(&conn), RPC_TIMEOUT).await {
                        Some(Ok(fresh)) => {
                            let _ = home.try_send(fresh);
                            return;
                        }
                        Some(Err(e)) => {
                            log::warn!("opening a publishing channel failed: {e}");
                            failed += 1;
                        }
                        // The broker stopped reading the connection meanwhile: not a failure.
                        None if conn.status().blocked() => {}
                        None => {
                            log::warn!(
                                "opening a publishing channel: no answer within {RPC_TIMEOUT:?}"
                            );
                            failed += 1;
                        }
                    }
                    if failed >= RETIRE_TRIES {
                        log::warn!("a publishing channel could not be replaced {failed} times: reconnecting");
                        replace.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                async_io::Timer::after(retire_pause(conn.status().blocked(), &mut backoff)).await;
            }
        })
        .detach();
    }
}

/// How often a blocked connection is looked at again while a fresh publishing channel waits
/// to be opened on it.
const BLOCKED_POLL: Duration = Duration::from_millis(100);

/// How long to wait before trying again (the fresh-channel task; the supervisor's reconnects,
/// which pass `blocked = false`): while the broker blocks the connection, a short poll that
/// does not grow (a block is not a failure, and the pool should be whole soon after it lifts);
/// after a failure, a backoff that doubles up to [`BACKOFF_MAX`].
fn retire_pause(blocked: bool, backoff: &mut Duration) -> Duration {
    if blocked {
        return BLOCKED_POLL;
    }
    let pause = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    pause
}

impl Link {
    fn healthy(&self) -> bool {
        self.conn.status().connected()
            && self.channel.status().connected()
            && !self.cancelled.load(Ordering::SeqCst)
    }

    /// Close the connection (bounded; at once when the broker blocks it, as it reads nothing
    /// from it then), then shut its socket down whatever the broker did.
    fn close(&self) {
        if !self.conn.status().blocked() {
            let conn = self.conn.clone();
            let _ = async_global_executor::block_on(bounded_wait(
                async move { conn.close(200, "closing".into()).await },
                CLOSE_TIMEOUT,
            ));
        }
        if let Some(attempt) = self.attempt.upgrade() {
            attempt.abandon();
        }
    }
}

struct ConsumeState {
    deliveries: Sender<Delivery>,
    link: Option<Link>,
}

struct Inner {
    url: AmqpUrl,
    /// Every node of `--amqp-url`, in order: its AMQP parts and its URL without the password.
    nodes: Vec<(AMQPUri, String)>,
    /// The node to try first: the last one a link connected to.
    preferred: std::sync::atomic::AtomicUsize,
    topology: Topology,
    queue: String,
    prefetch: u16,
    publish_timeout: Duration,
    /// How many batches may be in flight at once: one per relay (shard), per scanner pool
    /// thread, the scanner's own (caller-runs), and one more, at least [`PUBLISH_CHANNELS_MIN`];
    /// dead letters and other callers of `publish_batch` share them, each waiting for one
    /// under its deadline.
    publish_channels: usize,
    publish: RwLock<Option<Link>>,
    consume: Mutex<Option<ConsumeState>>,
    publish_up: AtomicBool,
    /// One heal at a time (the supervisor, and `start_consumer` once).
    healing: Mutex<()>,
    /// The last connect attempt of each link to each node: a new one starts only once it has
    /// ended.
    publish_attempt: Vec<Mutex<Weak<Attempt>>>,
    consume_attempt: Vec<Mutex<Weak<Attempt>>>,
    /// Set when a node refused the queues' declaration (406: a queue exists with other
    /// arguments): a configuration error, not an outage.
    refused: Mutex<Option<String>>,
}

/// The queues a link declares: the topic's and its dead-letter queue, with the arguments of
/// `--queue-type`.
#[derive(Debug, Clone, PartialEq)]
struct Topology {
    queue: String,
    queue_type: QueueType,
    delivery_limit: u32,
}

impl Topology {
    fn of(settings: &Settings) -> Topology {
        Topology {
            queue: settings.topic.clone(),
            queue_type: settings.queue_type,
            delivery_limit: settings.delivery_limit,
        }
    }

    /// The queues to declare, dead-letter queue first (the target of the broker's
    /// dead-lettering exists before the queue that sends to it), each with its arguments.
    /// Classic: plain durable queues without arguments, the original's. Quorum: both quorum
    /// queues; the topic's has the delivery limit, and past it the broker dead-letters the
    /// message to `<topic>.dlq` (at-least-once, which needs `reject-publish` overflow).
    fn queues(&self) -> [(String, FieldTable); 2] {
        let dlq = dead_letter_queue(&self.queue);
        let text = |v: &str| AMQPValue::LongString(v.into());
        match self.queue_type {
            QueueType::Classic => [
                (dlq, FieldTable::default()),
                (self.queue.clone(), FieldTable::default()),
            ],
            QueueType::Quorum => {
                let mut d = FieldTable::default();
                d.insert("x-queue-type".into(), text("quorum"));
                let mut q = FieldTable::default();
                q.insert("x-queue-type".into(), text("quorum"));
                q.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongInt(self.delivery_limit.min(i32::MAX as u32) as i32),
                );
                q.insert("x-dead-letter-exchange".into(), text(""));
                q.insert("x-dead-letter-routing-key".into(), text(&dlq));
                q.insert("x-dead-letter-strategy".into(), text("at-least-once"));
                q.insert("x-overflow".into(), text("reject-publish"));
                [(dlq, d), (self.queue.clone(), q)]
            }
        }
    }
}

/// Whether the broker refused a declaration because the queue exists with other arguments.
fn precondition_failed(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if p.get_id() == 406 => {
            Some(p.get_message().to_string())
        }
        _ => None,
    }
}

/// The RabbitMQ transport.
pub struct Amqp {
    inner: Arc<Inner>,
    supervisor: Option<(Sender<()>, JoinHandle<()>)>,
}

/// Await `f` for at most `limit`; `None` if it did not finish. lapin leaves the promises of a
/// connection that died abruptly unresolved, so every await on the broker is bounded.
async fn bounded_wait<F: Future>(f: F, limit: Duration) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut timer = async_io::Timer::after(limit);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(v));
        }
        if std::pin::Pin::new(&mut timer).poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await
}

/// The AMQP parts of a URL. amq-protocol's own errors may quote the URL, password included:
/// the refusal says only what to check.
fn amqp_uri(url: &str) -> Result<AMQPUri> {
    let mut uri = url.parse::<AMQPUri>().map_err(|_| {
        Error::Config(AmqpUrl::refusal(
            "is not a valid AMQP URL (check the escapes of its user, password and vhost, and its query parameters)",
        ))
    })?;
    // A node that stops answering without closing (a failover, a half-open connection) is
    // found by missed heartbeats; RabbitMQ proposes 60 s, too long to wait before moving to
    // the next node. `?heartbeat=N` in the URL overrides it.
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT);
    }
    Ok(uri)
}

/// The heartbeat asked of the broker, seconds, unless the URL says otherwise.
const HEARTBEAT: u16 = 10;

/// What a link is for.
struct LinkSpec<'a> {
    uri: &'a AMQPUri,
    /// The URL without its password.
    shown: &'a str,
    topology: &'a Topology,
    name: &'static str,
    /// Confirm channels to lend to publishing batches (the publishing link's).
    publishers: usize,
    prefetch: Option<u16>,
    /// Consume the queue into this channel.
    consume: Option<Sender<Delivery>>,
}

/// Open a link on the calling thread within [`CONNECT_TIMEOUT`]. `attempt` learns the socket;
/// an attempt that fails or misses the deadline is abandoned (its socket shut down).
fn connect_link(what: &str, spec: LinkSpec<'_>, attempt: Arc<Attempt>) -> Result<Link> {
    let shown = spec.shown.to_string();
    let topology = spec.topology.clone();
    let opened = async_global_executor::block_on(bounded_wait(
        open_link(spec, attempt.clone()),
        CONNECT_TIMEOUT,
    ));
    match opened {
        Some(Ok(link)) => Ok(link),
        Some(Err(e)) => {
            attempt.abandon();
            match precondition_failed(&e) {
                Some(why) => Err(Error::Config(format!(
                    "{shown} refused to declare the queues as --queue-type {} declares them ({why}): a queue of that name exists with other arguments; nothing was changed. Pass the --queue-type it was declared with, or delete the queue first",
                    topology.queue_type.as_str()
                ))),
                None => Err(Error::Broker(format!("{what} {shown}: {e}"))),
            }
        }
        None => {
            attempt.abandon();
            Err(Error::Broker(format!(
                "{what} {shown}: no answer within {CONNECT_TIMEOUT:?} (is it a RabbitMQ server?)"
            )))
        }
    }
}

async fn open_link(spec: LinkSpec<'_>, attempt: Arc<Attempt>) -> lapin::Result<Link> {
    let cancelled = Arc::new(AtomicBool::new(false));
    let props = ConnectionProperties::default().with_connection_name(spec.name.into());
    let runtime = lapin::runtime::default_runtime()?;
    let weak = Arc::downgrade(&attempt);
    let conn = Connection::connector(
        spec.uri.clone(),
        runtime,
        async move |uri, runtime| {
            let stream = lapin::tcp::AMQPUriTcpExt::connect_with_config_async(
                &uri,
                lapin::tcp::TLSConfig::default(),
                &runtime,
            )
            .await?;
            let mut socket = attempt.socket.lock().unwrap_or_else(|p| p.into_inner());
            if socket.1 {
                return Err(std::io::Error::other("the connect attempt was abandoned").into());
            }
            if let lapin::tcp::AsyncTcpStream::Plain(s) = &stream {
                socket.0 = Some(s.get_ref().try_clone()?);
            }
            drop(socket);
            Ok(stream)
        },
        props,
    )
    .await?;
    // The topic's queue and its dead-letter queue. Classic (the original's): declared, durable
    // and without arguments, when they do not exist; a queue that exists is taken as it is (its
    // arguments, such as a length limit on the dead-letter queue, are the operator's). Quorum:
    // every queue that exists is declared again with --queue-type's arguments first, which
    // changes nothing when they agree and is refused by the broker (406, naming the argument
    // that differs) when they do not; only then are the missing ones created. So a refusal
    // leaves the broker as it was. A passive declare of a missing queue closes its channel, so
    // each probe has a channel of its own.
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut missing = Vec::new();
    for (q, arguments) in spec.topology.queues() {
        let probe = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = probe
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok();
        if !exists {
            missing.push((q, arguments));
            continue;
        }
        let _ = probe.close(200, "probed".into()).await;
        if spec.topology.queue_type == QueueType::Quorum {
            let check = conn.create_channel().await?;
            check
                .queue_declare(q.as_str().into(), durable, arguments)
                .await?;
            let _ = check.close(200, "checked".into()).await;
        }
    }
    for (q, arguments) in missing {
        let declare = conn.create_channel().await?;
        declare
            .queue_declare(q.as_str().into(), durable, arguments)
            .await?;
        let _ = declare.close(200, "declared".into()).await;
    }
    let channel = conn.create_channel().await?;
    if let Some(p) = spec.prefetch {
        channel.basic_qos(p, BasicQosOptions::default()).await?;
    }
    let conn = Arc::new(conn);
    let pool = Pool::open(spec.publishers, conn.clone(), cancelled.clone()).await?;
    if let Some(deliveries) = spec.consume {
        let consumer = channel
            .basic_consume(
                spec.topology.queue.as_str().into(),
                "big-market".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let flag = cancelled.clone();
        consumer.set_delegate(move |d: DeliveryResult| {
            let tx = deliveries.clone();
            let flag = flag.clone();
            async move {
                match d {
                    Ok(Some(delivery)) => {
                        // Prefetch bounds what is in flight, and the channel holds more than that.
                        let _ = tx.send(delivery);
                    }
                    Ok(None) => {
                        // The server cancelled the consumer: the supervisor replaces the link,
                        // which subscribes again.
                        log::warn!("amqp consumer cancelled by the server; subscribing again");
                        flag.store(true, Ordering::SeqCst);
                    }
                    Err(e) => log::warn!("amqp consumer error, reconnecting: {e}"),
                }
            }
        });
    }
    Ok(Link {
        conn,
        channel,
        attempt: weak,
        node: spec.shown.to_string(),
        cancelled,
        pool,
    })
}

impl Inner {
    fn new(url: &AmqpUrl, settings: &Settings) -> Result<Inner> {
        let nodes = url
            .nodes()
            .iter()
            .map(|n| Ok((amqp_uri(n.secret_url())?, n.shown().to_string())))
            .collect::<Result<Vec<_>>>()?;
        let attempts = || nodes.iter().map(|_| Mutex::new(Weak::new())).collect();
        Ok(Inner {
            url: url.clone(),
            preferred: Default::default(),
            topology: Topology::of(settings),
            queue: settings.topic.clone(),
            prefetch: settings.prefetch,
            publish_timeout: settings.publish_timeout(),
            publish_channels: (settings.layout.db_count() as usize + settings.pool_threads + 2)
                .max(PUBLISH_CHANNELS_MIN),
            publish: RwLock::new(None),
            consume: Mutex::new(None),
            publish_up: AtomicBool::new(false),
            healing: Mutex::new(()),
            publish_attempt: attempts(),
            consume_attempt: attempts(),
            refused: Mutex::new(None),
            nodes,
        })
    }

    /// Connect one link to the first node that answers, from the preferred one on, skipping a
    /// node whose previous attempt for this link is still alive (at most one attempt in flight
    /// per link and node: an abandoned one ends once lapin's thread sees its socket shut). A
    /// node that refuses the queues' arguments ends the search: that is a configuration error.
    fn connect<'s>(
        &'s self,
        attempts: &[Mutex<Weak<Attempt>>],
        what: &str,
        spec: impl Fn(&'s AMQPUri, &'s str) -> LinkSpec<'s>,
    ) -> Result<Link> {
        let n = self.nodes.len();
        let first = self.preferred.load(Ordering::SeqCst) % n;
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let (uri, shown) = &self.nodes[i];
            let mut last = attempts[i].lock().expect("attempt lock");
            if last.strong_count() > 0 {
                failures.push(format!("{shown}: the previous attempt is still closing"));
                continue;
            }
            let attempt = Arc::new(Attempt::default());
            *last = Arc::downgrade(&attempt);
            drop(last);
            match connect_link(what, spec(uri, shown), attempt) {
                Ok(link) => {
                    self.preferred.store(i, Ordering::SeqCst);
                    return Ok(link);
                }
                Err(Error::Config(why)) => {
                    *self.refused.lock().expect("refused lock") = Some(why.clone());
                    return Err(Error::Config(why));
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(Error::Broker(failures.join("; ")))
    }

    fn connect_publisher(&self) -> Result<Link> {
        self.connect(&self.publish_attempt, "connecting to", |uri, shown| {
            LinkSpec {
                uri,
                shown,
                topology: &self.topology,
                name: "big-market-publish",
                publishers: self.publish_channels,
                prefetch: None,
                consume: None,
            }
        })
    }

    fn connect_consumer(&self, deliveries: Sender<Delivery>) -> Result<Link> {
        self.connect(
            &self.consume_attempt,
            "connecting the consumer to",
            |uri, shown| LinkSpec {
                uri,
                shown,
                topology: &self.topology,
                name: "big-market-consume",
                publishers: 0,
                prefetch: Some(self.prefetch),
                consume: Some(deliveries.clone()),
            },
        )
    }

    /// The node the publishing link is connected to, if it is.
    fn publish_node(&self) -> Option<String> {
        self.publish
            .read()
            .expect("publish lock")
            .as_ref()
            .filter(|l| l.healthy())
            .map(|l| l.node.clone())
    }

    fn publish_link(&self) -> Option<Link> {
        self.publish.read().expect("publish lock").clone()
    }

    fn publish_healthy(&self) -> bool {
        self.publish
            .read()
            .expect("publish lock")
            .as_ref()
            .is_some_and(Link::healthy)
    }

    /// After a link to `node` was lost, start the next search at the node after it: a node that
    /// went away is the last one to try again.
    fn move_past(&self, node: &str) {
        if let Some(i) = self.nodes.iter().position(|(_, shown)| shown == node) {
            self.preferred
                .store((i + 1) % self.nodes.len(), Ordering::SeqCst);
        }
    }

    /// One supervisor step: reconnect what is down. Returns whether everything is up.
    fn heal(&self) -> bool {
        let _healing = self.healing.lock().unwrap_or_else(|p| p.into_inner());
        let mut ok = true;
        if !self.publish_healthy() {
            // A link that is down is closed before another is opened: its thread and socket
            // go with it.
            let old = self.publish.write().expect("publish lock").take();
            if let Some(old) = old {
                old.close();
                self.move_past(&old.node);
            }
            match self.connect_publisher() {
                Ok(link) => {
                    *self.publish.write().expect("publish lock") = Some(link);
                }
                Err(Error::Config(why)) => {
                    ok = false;
                    log::error!("{why}");
                }
                Err(e) => {
                    ok = false;
                    if self.publish_up.load(Ordering::SeqCst) {
                        log::warn!("broker connection lost url={}: {e}; writes still commit, tasks wait for the reconnect", self.url);
                    } else {
                        log::debug!("broker still unreachable: {e}");
                    }
                }
            }
            let up = self.publish_healthy();
            if up && !self.publish_up.load(Ordering::SeqCst) {
                log::info!("broker connected url={} queue={}", self.url, self.queue);
            }
            self.publish_up.store(up, Ordering::SeqCst);
        }
        let mut consume = self.consume.lock().expect("consume lock");
        if let Some(state) = consume.as_mut() {
            if !state.link.as_ref().is_some_and(Link::healthy) {
                let lost = state.link.take();
                if let Some(old) = &lost {
                    old.close();
                    self.move_past(&old.node);
                }
                match self.connect_consumer(state.deliveries.clone()) {
                    Ok(link) => {
                        log::info!("consumer connected url={} queue={}", self.url, self.queue);
                        state.link = Some(link);
                    }
                    Err(e) => {
                        ok = false;
                        if lost.is_some() {
                            log::warn!("consumer connection lost: {e}; unacked messages return to the queue");
                        }
                    }
                }
            }
        }
        ok
    }
}

impl Amqp {
    /// Connect (or keep trying in the background) and declare the topology. A broker that is
    /// down at start is not an error: writes commit and the backlog is sent once it is up.
    pub fn connect(url: &AmqpUrl, settings: &Settings) -> Result<Self> {
        let inner = Arc::new(Inner::new(url, settings)?);
        inner.heal();
        if let Some(why) = inner.refused.lock().expect("refused lock").take() {
            return Err(Error::Config(why));
        }
        if !inner.publish_healthy() {
            log::warn!(
                "broker unreachable url={}: starting disconnected, retrying in the background",
                inner.url
            );
        }
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let sup = inner.clone();
        let handle = crate::util::spawn("amqp-supervisor", move || supervise(sup, stop_rx))?;
        Ok(Amqp {
            inner,
            supervisor: Some((stop_tx, handle)),
        })
    }

    /// Connect once to the first node that answers and close: is the broker reachable with
    /// these settings, and does it take the queues as declared? Returns the node.
    pub fn connect_once(settings: &Settings) -> Result<String> {
        let url = settings
            .amqp_url
            .as_ref()
            .ok_or_else(|| Error::Config("no AMQP URL given".into()))?;
        let inner = Inner::new(url, settings)?;
        let link = inner.connect(&inner.publish_attempt, "connecting to", |uri, shown| {
            LinkSpec {
                uri,
                shown,
                topology: &inner.topology,
                name: "big-market-status",
                publishers: 0,
                prefetch: None,
                consume: None,
            }
        })?;
        link.close();
        Ok(link.node)
    }

    /// The publishing link's confirm channels: how many are in its pool now (not lent, not
    /// being replaced), how many it has, and how many it set aside after batches that gave up;
    /// `None` while disconnected.
    pub fn publishing_channels(&self) -> Option<(usize, usize, usize)> {
        let link = self.inner.publish_link().filter(Link::healthy)?;
        let (free, parked) = link.pool.counts();
        Some((free, self.inner.publish_channels, parked))
    }

    /// Delete this transport's queue and its dead-letter queue (tests use queues of their own
    /// and remove them after).
    pub fn delete_queue(&self) -> Result<()> {
        let link = self
            .inner
            .publish_link()
            .ok_or_else(|| Error::Broker("not connected".into()))?;
        let queue = self.inner.queue.clone();
        async_global_executor::block_on(async move {
            for q in [dead_letter_queue(&queue), queue] {
                link.channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            Ok::<_, lapin::Error>(())
        })
        .map_err(|e| Error::Broker(format!("deleting queue: {e}")))
    }
}

fn supervise(inner: Arc<Inner>, stop: Receiver<()>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let wait = if inner.heal() {
            backoff = BACKOFF_MIN;
            HEALTH_TICK
        } else {
            retire_pause(false, &mut backoff)
        };
        if !matches!(
            stop.recv_timeout(wait),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        ) {
            break;
        }
    }
}

impl Drop for Amqp {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.supervisor.take() {
            drop(stop);
            // A connect attempt in flight (a broker that does not answer) ends now, not at its
            // deadline.
            let live = self.inner.publish_link().map(|l| l.attempt);
            let per_node = self.inner.publish_attempt.iter();
            for last in per_node.chain(self.inner.consume_attempt.iter()) {
                let last = last.lock().expect("attempt lock").clone();
                let is_live = live.as_ref().is_some_and(|l| Weak::ptr_eq(l, &last));
                if let Some(attempt) = last.upgrade().filter(|_| !is_live) {
                    attempt.abandon();
                }
            }
            let _ = handle.join();
        }
        if let Some(link) = self.inner.publish.write().expect("publish lock").take() {
            link.close();
        }
    }
}

impl Transport for Amqp {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    fn broker(&self) -> Option<super::BrokerInfo> {
        Some(super::BrokerInfo {
            node: self.inner.publish_node(),
            queue_type: self.inner.topology.queue_type.as_str(),
        })
    }

    fn describe(&self) -> String {
        let queue_type = self.inner.topology.queue_type.as_str();
        match self.inner.publish_node() {
            Some(node) => format!(
                "amqp node={node} queue={} type={queue_type} (connected; nodes: {})",
                self.inner.queue, self.inner.url
            ),
            None => format!(
                "amqp {} queue={} type={queue_type} (disconnected)",
                self.inner.url, self.inner.queue
            ),
        }
    }

    fn publish_batch(
        &self,
        batch: &[Outgoing],
        hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), PublishFailure>> {
        let link = self.inner.publish_link().filter(Link::healthy);
        let Some(link) = link else {
            return batch
                .iter()
                .map(|_| Err(PublishFailure::Unavailable("broker not connected".into())))
                .collect();
        };
        // Nothing new goes into a connection the broker has stopped reading: it would be
        // routed whenever the broker resumes, possibly after the task was sent again.
        if link.conn.status().blocked() {
            return batch
                .iter()
                .map(|_| {
                    Err(PublishFailure::Unavailable(
                        "the broker is blocking publishers (a memory or disk alarm)".into(),
                    ))
                })
                .collect();
        }
        let queue = self.inner.queue.clone();
        let publish_timeout = self.inner.publish_timeout;
        async_global_executor::block_on(async move {
            // One deadline for the whole batch, handing the messages over included (a blocked
            // connection holds that up too): waits one after another must not add up past the
            // lease of the tasks in it.
            let mut deadline = std::time::Instant::now() + publish_timeout;
            let mut waits = HeldBatch::default();
            // Every message of the batch is handed to the connection at once, and the hand-overs
            // are awaited together: lapin resolves a publish once its I/O thread has taken the
            // frames, so awaiting each before starting the next cost a switch between this
            // thread and lapin's per message, and a socket write per message. The batch has a
            // channel to itself until its last confirm (see `Link::pool`); waiting for
            // one counts against the deadline too. On a give-up, frames already queued are
            // still sent once the connection allows: their tasks count as unconfirmed, are not
            // sent again within a lease, and a copy is deduplicated.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some(lent) = bounded_wait(link.pool.lend(), left).await.flatten() else {
                // Nothing was handed over: every channel stayed lent within the batch's
                // deadline (a pool in use by batches a blocked or slow broker holds).
                return batch
                    .iter()
                    .map(|_| {
                        Err(PublishFailure::Unavailable(format!(
                            "no publishing channel free within the batch deadline of {publish_timeout:?}"
                        )))
                    })
                    .collect();
            };
            let handed = held(
                &link,
                async {
                    let handed = {
                        let channel = &lent.channel;
                        let publishes = batch.iter().map(|m| {
                            let props = BasicProperties::default()
                                .with_delivery_mode(2)
                                .with_content_type("application/json".into())
                                .with_message_id(m.message_id.as_str().into());
                            let opts = BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            };
                            channel.basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                opts,
                                m.body.as_bytes(),
                                props,
                            )
                        });
                        futures_util::future::join_all(publishes).await
                    };
                    (handed, lent)
                },
                &mut deadline,
                publish_timeout,
                hold,
                &mut waits,
            )
            .await;
            let (handed, mut lent) = match handed {
                Some((handed, lent)) => (Some(handed), Some(lent)),
                None => (None, None),
            };
            let pending: Vec<std::result::Result<_, String>> = match handed {
                Some(handed) => handed
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect(),
                None => batch
                    .iter()
                    .map(|_| {
                        Err(format!(
                            "not handed to the broker within the batch deadline of {publish_timeout:?}"
                        ))
                    })
                    .collect(),
            };
            crate::crash::hit(crate::crash::Point::BeforeConfirm);
            let no_confirm = || {
                Err(PublishFailure::Unconfirmed(format!(
                    "no confirm within the batch deadline of {publish_timeout:?}"
                )))
            };
            let mut confirms = Vec::with_capacity(pending.len());
            // Once one confirm is given up on, the rest are taken only if they are in already:
            // waiting (and renewing the leases) again for each would add up past the deadline.
            let mut gave_up = false;
            // The first confirm taken after one was given up on (see `outcomes`).
            let mut trusted = pending.len();
            for p in pending {
                if gave_up {
                    trusted = trusted.min(confirms.len());
                }
                confirms.push(match p {
                    Err(e) => Err(PublishFailure::Unconfirmed(format!("publish failed: {e}"))),
                    Ok(confirm) => {
                        let answer = if gave_up {
                            futures_lite::future::poll_once(confirm).await
                        } else {
                            held(
                                &link,
                                confirm,
                                &mut deadline,
                                publish_timeout,
                                hold,
                                &mut waits,
                            )
                            .await
                        };
                        match answer {
                            None => {
                                gave_up = true;
                                no_confirm()
                            }
                            Some(Ok(c)) => Ok(c),
                            Some(Err(e)) => {
                                Err(PublishFailure::Unconfirmed(format!("no confirm: {e}")))
                            }
                        }
                    }
                });
                if confirms.len() == 1 {
                    crate::crash::hit(crate::crash::Point::MidRelayBatch);
                }
            }
            if let Some(lent) = lent.as_mut() {
                lent.settled = !gave_up;
            }
            let heard: Vec<_> = confirms
                .into_iter()
                .map(|c| c.map(|c| Heard::of(c, &queue)))
                .collect();
            let ids: Vec<&str> = batch.iter().map(|m| m.message_id.as_str()).collect();
            outcomes(&ids, heard, trusted)
        })
    }

    fn is_connected(&self) -> bool {
        self.inner.publish_healthy()
            && !self
                .inner
                .publish_link()
                .is_some_and(|l| l.conn.status().blocked())
    }

    fn start_consumer(
        &self,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>> {
        let (tx, rx) = bounded::<Delivery>(usize::from(self.inner.prefetch) * 4);
        *self.inner.consume.lock().expect("consume lock") = Some(ConsumeState {
            deliveries: tx,
            link: None,
        });
        // With the broker reachable, consume at once; otherwise the supervisor connects the
        // consumer with the publisher, and starting does not wait for a broker that is down.
        if self.inner.publish_healthy() {
            self.inner.heal();
        }
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, stop_rx, handler, inner) = (
                rx.clone(),
                stop_rx.clone(),
                handler.clone(),
                self.inner.clone(),
            );
            handles.push(crate::util::spawn(
                format!("amqp-consumer-{i}"),
                move || consume(&inner, &*handler, &rx, &stop_rx),
            )?);
        }
        Ok(Box::new(AmqpConsumer {
            inner: self.inner.clone(),
            stop: stop_tx,
            handles,
        }))
    }
}

/// How long a consumer thread holding deliveries waits for new ones before it tries the held
/// ones again (the handler's own backoff comes on top).
const HOLD_POLL: Duration = Duration::from_millis(100);

/// One consumer thread: handle what arrives in batches and settle it. A delivery whose store
/// write failed (outcome `Retry`) is held, unacknowledged, and handed to the handler again with
/// the next batch, or on its own once nothing else arrives (the handler backs off between
/// failing tries), rather than requeued: on a quorum queue every requeue counts against the
/// delivery limit, and an outage of our own store must not have the broker dead-letter good
/// messages. Everything else in a batch is settled at once, so one message the store cannot
/// take holds up nothing but itself (and its prefetch slot). Held deliveries go back to the
/// queue when the consumer stops (counted once), or when their channel is lost (the broker
/// requeued them already: a restart, a failover, or the broker's consumer timeout).
fn consume(
    inner: &Arc<Inner>,
    handler: &dyn Handler,
    rx: &Receiver<Delivery>,
    stop: &Receiver<()>,
) {
    let mut health = crate::consumer::StoreHealth::default();
    let mut held: Vec<Delivery> = Vec::new();
    loop {
        let first = if held.is_empty() {
            select! {
                recv(stop) -> _ => break,
                recv(rx) -> d => match d {
                    Ok(d) => Some(d),
                    Err(_) => break,
                },
            }
        } else {
            // Held deliveries: try them again soon, with whatever arrives meanwhile.
            select! {
                recv(stop) -> _ => break,
                recv(rx) -> d => match d {
                    Ok(d) => Some(d),
                    Err(_) => break,
                },
                default(HOLD_POLL) => None,
            }
        };
        let mut batch = match first {
            Some(d) => crate::util::drain_batch(rx, d, CONSUME_BATCH),
            None => Vec::new(),
        };
        held.retain(|d| d.acker.usable());
        batch.append(&mut held);
        if batch.is_empty() {
            continue;
        }
        let bodies: Vec<&[u8]> = batch.iter().map(|d| d.data.as_slice()).collect();
        let outcomes = handler.handle_batch(&bodies);
        crate::crash::hit(crate::crash::Point::BeforeAck);
        let (mut now, mut now_outcomes) = (Vec::new(), Vec::new());
        for (d, o) in batch.into_iter().zip(outcomes) {
            if matches!(o, Handled::Retry(_)) {
                held.push(d);
            } else {
                now.push(d);
                now_outcomes.push(o);
            }
        }
        if !now.is_empty() {
            settle_batch(inner, now, now_outcomes, &mut health, stop);
        }
    }
    if !held.is_empty() {
        let retry = held
            .iter()
            .map(|_| Handled::Retry("the consumer stopped".into()))
            .collect();
        settle_batch(inner, held, retry, &mut health, stop);
    }
}

/// Settle a handled batch: the dead letters are published first, all at once, then every
/// ack or requeue is sent at once and awaited together, rather than one round trip after
/// another. When a dead-letter publish fails (a full or refusing dead-letter queue, a
/// publisher that is down or blocked), its message goes back to the queue only after a
/// backoff, as after a storage failure: the consumer thread waits (taking nothing new) unless
/// `stop` ends the wait, so a message that cannot be set aside is not redelivered in a loop.
fn settle_batch(
    inner: &Arc<Inner>,
    batch: Vec<Delivery>,
    outcomes: Vec<Handled>,
    health: &mut crate::consumer::StoreHealth,
    stop: &Receiver<()>,
) {
    let queue = dead_letter_queue(&inner.queue);
    let set_aside: Vec<_> = batch
        .iter()
        .zip(&outcomes)
        .filter_map(|(d, outcome)| match outcome {
            Handled::Reject(reason) => {
                let (inner, reason) = (inner.clone(), reason.clone());
                let (properties, data) = (d.properties.clone(), d.data.clone());
                Some(async_global_executor::spawn(async move {
                    dead_letter(&inner, &properties, &data, &reason).await
                }))
            }
            _ => None,
        })
        .collect();
    let mut results = async_global_executor::block_on(async move {
        let mut out = Vec::with_capacity(set_aside.len());
        for s in set_aside {
            out.push(s.await);
        }
        out
    })
    .into_iter();
    let mut failure = None;
    let outcomes: Vec<Handled> = outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Handled::Reject(reason) => match results.next() {
                Some(Ok(())) => {
                    log::warn!(
                        "message set aside in {queue} reason={reason:?}: see `big-market dlq list`"
                    );
                    Handled::Ack
                }
                Some(Err(e)) => {
                    failure = Some(e.clone());
                    Handled::Retry(e)
                }
                None => Handled::Retry("not set aside".into()),
            },
            other => other,
        })
        .collect();
    match failure {
        Some(cause) => {
            let (wait, started) = health.failed();
            if started {
                log::warn!("could not set a message aside in {queue} ({cause}); it goes back to the queue after a backoff of up to {:?}, until a dead letter goes through", crate::consumer::BACKOFF_MAX);
            } else {
                log::debug!("dead-lettering still failing, waiting {wait:?}: {cause}");
            }
            // The backoff itself, cut short by a stop.
            let _ = stop.recv_timeout(wait);
        }
        None => {
            if outcomes.iter().any(|o| matches!(o, Handled::Ack)) {
                if let Some(n) = health.succeeded() {
                    log::info!("dead letters go through again after {n} failed batches");
                }
            }
        }
    }
    // Every ack or requeue is handed to the connection at once and awaited together on this
    // thread, under one deadline (a task and a timer of its own for each cost a hop through
    // the executor's threads, and a wake of the timer thread, per delivery).
    let n = batch.len();
    let settles = batch
        .into_iter()
        .zip(outcomes)
        .map(|(d, outcome)| settle(d, outcome));
    let settled = async_global_executor::block_on(bounded_wait(
        futures_util::future::join_all(settles),
        RPC_TIMEOUT,
    ));
    if settled.is_none() {
        log::debug!("amqp acks and requeues of a batch of {n} deliveries not all written within {RPC_TIMEOUT:?}; what is queued is sent if the channel lives, and the broker redelivers what it never received");
    }
}

/// Ack or requeue one delivery (a dead letter was published before, confirmed: RabbitMQ would
/// delete a rejected message).
async fn settle(d: Delivery, outcome: Handled) {
    // A delivery whose channel is gone cannot be settled; the broker requeues it by itself,
    // and delivery is idempotent.
    if !d.acker.usable() {
        log::debug!("amqp delivery from a closed channel left unsettled ({outcome:?}); the broker redelivers it");
        return;
    }
    let settled = match &outcome {
        Handled::Ack | Handled::Reject(_) => d.ack(BasicAckOptions::default()).await,
        Handled::Retry(_) => {
            d.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
        }
    };
    if let Err(e) = settled {
        log::debug!("amqp settle failed ({outcome:?}), the broker will redeliver: {e}");
    }
}

/// Await one step of a publish (handing a message over, or its confirm) until the batch's
/// `deadline`. Past it the message may still be routed (a broker that blocks publishers holds
/// it and routes it once it resumes; one under an alarm confirms late), and giving up would
/// have it sent twice. So while the connection lives and `hold` renews the caller's leases, keep
/// waiting a deadline at a time: without limit while the broker says it blocks this connection
/// (it will resume), and for [`SLOW_CONFIRM_DEADLINES`] more deadlines otherwise. `None` when
/// the wait ends without an answer.
async fn held<F>(
    link: &Link,
    confirm: F,
    deadline: &mut std::time::Instant,
    publish_timeout: Duration,
    hold: &dyn Fn() -> bool,
    batch: &mut HeldBatch,
) -> Option<F::Output>
where
    F: Future,
{
    let mut confirm = std::pin::pin!(confirm);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Some(r) = bounded_wait(confirm.as_mut(), left).await {
            return Some(r);
        }
        let blocked = link.conn.status().blocked();
        if !link.healthy() || (!blocked && batch.extra >= SLOW_CONFIRM_DEADLINES) || !hold() {
            return None;
        }
        if !batch.warned {
            batch.warned = true;
            log::warn!(
                "no confirm within {publish_timeout:?}{}: holding the batch in flight and renewing its leases",
                if blocked {
                    " (the broker is blocking publishers: a memory or disk alarm)"
                } else {
                    ""
                }
            );
        }
        batch.extra += 1;
        *deadline = std::time::Instant::now() + publish_timeout;
    }
}

/// What a batch's waits have done so far, shared by every message of the batch: the extra
/// deadlines count for the batch, not for each message.
#[derive(Default)]
struct HeldBatch {
    warned: bool,
    extra: u32,
}

/// Extra deadlines a batch is held for while the broker is connected and not blocking, but
/// slow to confirm.
const SLOW_CONFIRM_DEADLINES: u32 = 4;

/// What one publish's confirm said, as [`outcomes`] weighs it.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    Ack,
    Nack,
    /// The channel is not in confirm mode.
    NotRequested,
    /// The confirm carried a returned (unroutable) message: its message id, and why.
    Returned {
        id: Option<String>,
        why: String,
    },
}

impl Heard {
    fn of(c: Confirmation, queue: &str) -> Heard {
        match c {
            Confirmation::Ack(None) => Heard::Ack,
            Confirmation::Nack(None) => Heard::Nack,
            Confirmation::NotRequested => Heard::NotRequested,
            Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => Heard::Returned {
                id: r.properties.message_id().as_ref().map(|id| id.to_string()),
                why: format!(
                    "returned by the broker as unroutable: {} {} (does queue {queue} exist?)",
                    r.reply_code, r.reply_text
                ),
            },
        }
    }
}

/// Each message's result from what the confirms of its batch said (`ids[i]` is the message
/// of `heard[i]`). lapin hands a returned message to whichever confirm its ack completes
/// first, and one ack may complete many: a returned message that names its message fails that
/// message, whichever confirm carried it; one without a message id fails the confirm that
/// carried it. Confirms from `trusted` on were taken after the batch gave up on an earlier
/// one, whose confirm lapin still holds: an ack completing both may have handed it the return
/// of a later message, so an ack there (or a return of another message's) proves nothing and
/// counts as unconfirmed (the task is sent again after its lease; the consumer deduplicates).
/// Pure.
fn outcomes(
    ids: &[&str],
    heard: Vec<std::result::Result<Heard, PublishFailure>>,
    trusted: usize,
) -> Vec<std::result::Result<(), PublishFailure>> {
    let returned: std::collections::HashMap<&str, &str> = heard
        .iter()
        .filter_map(|h| match h {
            Ok(Heard::Returned { id: Some(id), why }) => Some((id.as_str(), why.as_str())),
            _ => None,
        })
        .collect();
    ids.iter()
        .zip(&heard)
        .enumerate()
        .map(|(i, (id, h))| {
            if let Some(why) = returned.get(id) {
                return Err(PublishFailure::Rejected(why.to_string()));
            }
            let h = h.as_ref().map_err(Clone::clone)?;
            if i >= trusted && matches!(h, Heard::Ack | Heard::Returned { id: Some(_), .. }) {
                return Err(PublishFailure::Unconfirmed(
                    "confirmed after the batch gave up on an earlier confirm".into(),
                ));
            }
            match h {
                Heard::Ack => Ok(()),
                Heard::Returned { id: None, why } => Err(PublishFailure::Rejected(why.clone())),
                // Another message's, matched to it above.
                Heard::Returned { id: Some(_), .. } => Ok(()),
                Heard::Nack => Err(PublishFailure::Rejected("nacked by the broker".into())),
                Heard::NotRequested => Err(PublishFailure::Unavailable(
                    "the channel is not in confirm mode".into(),
                )),
            }
        })
        .collect()
}

/// The dead-letter queue of a topic's queue: `<topic>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

const H_REASON: &str = "x-big-market-reason";
const H_AT: &str = "x-big-market-dead-lettered-at";
const H_QUEUE: &str = "x-big-market-original-queue";
const H_ID: &str = "x-big-market-message-id";

/// The message id of a delivery: its AMQP message id, else the `id` of its JSON body.
fn message_id_of(props: &BasicProperties, body: &[u8]) -> Option<String> {
    props
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()?
                .get("id")?
                .as_str()
                .map(str::to_string)
        })
}

/// Publish a copy of `d` to the dead-letter queue, persistent, with headers saying why, when,
/// from where and which message; `Ok` once the broker confirmed it.
async fn dead_letter(
    inner: &Inner,
    properties: &BasicProperties,
    data: &[u8],
    reason: &str,
) -> std::result::Result<(), String> {
    let link = inner
        .publish_link()
        .filter(Link::healthy)
        .ok_or("the publisher is not connected")?;
    if link.conn.status().blocked() {
        return Err("the broker is blocking publishers (a memory or disk alarm)".into());
    }
    let mut headers = FieldTable::default();
    headers.insert(H_REASON.into(), AMQPValue::LongString(reason.into()));
    headers.insert(H_AT.into(), AMQPValue::LongLongInt(crate::util::now_ms()));
    headers.insert(
        H_QUEUE.into(),
        AMQPValue::LongString(inner.queue.as_str().into()),
    );
    let id = message_id_of(properties, data);
    if let Some(id) = &id {
        headers.insert(H_ID.into(), AMQPValue::LongString(id.as_str().into()));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    if let Some(ct) = properties.content_type() {
        props = props.with_content_type(ct.clone());
    }
    // One deadline for a channel, handing it over and its confirm, like a publish batch: a
    // consumer thread never waits on the broker without a bound.
    let limit = inner.publish_timeout;
    let started = std::time::Instant::now();
    let mut lent = bounded_wait(link.pool.lend(), limit)
        .await
        .flatten()
        .ok_or_else(|| format!("no publishing channel free within {limit:?}"))?;
    publish_confirmed(
        &mut lent,
        &dead_letter_queue(&inner.queue),
        data,
        props,
        limit.saturating_sub(started.elapsed()),
    )
    .await
}

/// Publish on a lent channel to the default exchange with `mandatory` and wait for a plain
/// ack, handing it over and the confirm together within `limit`; the channel counts as settled
/// when an answer came back.
async fn publish_confirmed(
    lent: &mut Lent,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
    limit: Duration,
) -> std::result::Result<(), String> {
    let opts = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let published = bounded_wait(
        async {
            lent.channel
                .basic_publish("".into(), queue.into(), opts, body, props)
                .await?
                .await
        },
        limit,
    )
    .await;
    lent.settled = published.is_some();
    match published {
        Some(Ok(Confirmation::Ack(None))) => Ok(()),
        Some(Ok(other)) => Err(format!("publishing to {queue}: not confirmed ({other:?})")),
        Some(Err(e)) => Err(format!("publishing to {queue}: {e}")),
        None => Err(format!(
            "publishing to {queue}: not confirmed within {limit:?}"
        )),
    }
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The message id (AMQP property, or the body's `id`), if it had one.
    pub message_id: Option<String>,
    /// Why the consumer could not process it.
    pub reason: String,
    /// When it was set aside, epoch ms (0 if unknown).
    pub dead_lettered_at_ms: i64,
    /// The body as received (lossy UTF-8).
    pub body: String,
}

/// What to do with one dead letter while walking the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Leave it in the dead-letter queue.
    Keep,
    /// Publish it to the topic's queue again (confirmed), then remove it.
    Replay,
    /// Remove it.
    Drop,
}

fn header_str(t: &FieldTable, k: &str) -> Option<String> {
    match t.inner().get(k)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn header_int(t: &FieldTable, k: &str) -> Option<i64> {
    match t.inner().get(k)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Walk at most `limit` messages of the topic's dead-letter queue, oldest first, and apply
/// `decide` to each: kept messages go back to the queue in their order when the walk ends.
/// Returns every message seen with what was done to it.
pub fn walk_dead_letters(
    settings: &Settings,
    limit: usize,
    mut decide: impl FnMut(&DeadLetter) -> DeadLetterAction + Send + 'static,
) -> Result<Vec<(DeadLetter, DeadLetterAction)>> {
    let url = settings.amqp_url.as_ref().ok_or_else(|| {
        Error::Config("the dead-letter queue lives on RabbitMQ: pass --amqp-url (AMQP_URL); in-process, a refused message ends as a dead task (`big-market tasks list --state dead`)".into())
    })?;
    let queue = settings.topic.clone();
    let inner = Inner::new(url, settings)?;
    let link = inner.connect(&inner.publish_attempt, "connecting to", |uri, shown| {
        LinkSpec {
            uri,
            shown,
            topology: &inner.topology,
            name: "big-market-dlq",
            publishers: 1,
            prefetch: None,
            consume: None,
        }
    })?;
    let dlq = dead_letter_queue(&queue);
    let channel = link.channel.clone();
    let pool = link.pool.clone();
    let walked = async_global_executor::block_on(async move {
        // Walk only what is there now: a replayed message the consumer refuses again comes
        // back to the end of the queue, and must not be met again in this walk.
        let present = channel
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("reading {dlq}: {e}"))?
            .message_count() as usize;
        let limit = limit.min(present);
        let mut out = Vec::new();
        while out.len() < limit {
            let got = bounded_wait(
                channel.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }),
                RPC_TIMEOUT,
            )
            .await
            .ok_or_else(|| format!("reading {dlq}: no answer within {RPC_TIMEOUT:?}"))?
            .map_err(|e| format!("reading {dlq}: {e}"))?;
            let Some(msg) = got else { break };
            let d = msg.delivery;
            let headers = d.properties.headers().clone().unwrap_or_default();
            let letter = DeadLetter {
                message_id: header_str(&headers, H_ID)
                    .or_else(|| message_id_of(&d.properties, &d.data)),
                reason: header_str(&headers, H_REASON)
                    .or_else(|| {
                        // Dead-lettered by the broker itself (a quorum queue's delivery limit).
                        header_str(&headers, "x-first-death-reason")
                            .map(|r| format!("dead-lettered by the broker: {r}"))
                    })
                    .unwrap_or_default(),
                dead_lettered_at_ms: header_int(&headers, H_AT).unwrap_or(0),
                body: String::from_utf8_lossy(&d.data).to_string(),
            };
            let action = decide(&letter);
            match action {
                DeadLetterAction::Keep => {}
                DeadLetterAction::Replay => {
                    let mut props = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into());
                    if let Some(id) = &letter.message_id {
                        props = props.with_message_id(id.as_str().into());
                    }
                    // Bounded: a channel the broker closed is only replaced in the background,
                    // and the replacement may never come (the connection gone).
                    let mut lent = bounded_wait(pool.lend(), RPC_TIMEOUT)
                        .await
                        .flatten()
                        .ok_or_else(|| {
                            format!("no publishing channel within {RPC_TIMEOUT:?} to replay into")
                        })?;
                    publish_confirmed(&mut lent, &queue, &d.data, props, RPC_TIMEOUT).await?;
                    d.ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| format!("removing a replayed message from {dlq}: {e}"))?;
                }
                DeadLetterAction::Drop => {
                    d.ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| format!("removing a message from {dlq}: {e}"))?;
                }
            }
            out.push((letter, action));
        }
        Ok::<_, String>(out)
    });
    // Closing returns every message left unacked (the kept ones) to the queue.
    link.close();
    walked.map_err(Error::Broker)
}

struct AmqpConsumer {
    inner: Arc<Inner>,
    stop: Sender<()>,
    handles: Vec<JoinHandle<()>>,
}

impl ConsumerHandle for AmqpConsumer {
    fn stop(self: Box<Self>) {
        // Stop handing out work first, then let the handlers finish the message in hand.
        let state = self.inner.consume.lock().expect("consume lock").take();
        drop(self.stop);
        for h in self.handles {
            let _ = h.join();
        }
        if let Some(link) = state.and_then(|s| s.link) {
            link.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Outgoing, Transport};
    use crate::util::wait_until;

    /// A transport on the broker named by `BIG_MARKET_TEST_AMQP`, on a queue of its own
    /// (deleted on drop), with a publish deadline of [`DEADLINE`]; `None` without the variable,
    /// as the integration suites skip. Panics when the variable names a broker that does not
    /// answer.
    struct OnBroker(Arc<Amqp>);

    const DEADLINE: Duration = Duration::from_secs(1);

    impl OnBroker {
        fn start(name: &str) -> Option<OnBroker> {
            let url = std::env::var("BIG_MARKET_TEST_AMQP").ok()?;
            let url = AmqpUrl::parse(&url).expect("BIG_MARKET_TEST_AMQP is an amqp:// URL");
            let mut settings = Settings::new("unused");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos();
            settings.topic = format!("bm_unit_{name}_{}_{nanos}", std::process::id());
            settings.publish_deadline = Some(DEADLINE);
            settings.stale_after = DEADLINE * 3;
            let amqp = Amqp::connect(&url, &settings).expect("connect");
            assert!(
                wait_until(Duration::from_secs(20), || amqp.is_connected()),
                "BIG_MARKET_TEST_AMQP names a broker that does not answer"
            );
            Some(OnBroker(Arc::new(amqp)))
        }

        /// `publish_batch`, failing the test if it has not returned within its deadline and
        /// five seconds (rather than hanging the suite).
        fn publish(&self, n: usize) -> Vec<std::result::Result<(), PublishFailure>> {
            let (amqp, (tx, rx)) = (self.0.clone(), crossbeam_channel::bounded(1));
            crate::util::spawn("unit-publish", move || {
                let _ = tx.send(amqp.publish_batch(&batch(n), &|| true));
            })
            .unwrap();
            rx.recv_timeout(DEADLINE + Duration::from_secs(5))
                .expect("publish_batch returned within its deadline")
        }

        fn link(&self) -> Link {
            self.0.inner.publish_link().expect("a publishing link")
        }

        /// Wait (bounded) until the link has every channel free, `parked` set aside.
        fn whole(&self, parked: usize) -> bool {
            let total = self.0.inner.publish_channels;
            wait_until(Duration::from_secs(20), || {
                self.0.publishing_channels() == Some((total, total, parked))
            })
        }
    }

    impl Drop for OnBroker {
        fn drop(&mut self) {
            let _ = self.0.delete_queue();
        }
    }

    fn batch(n: usize) -> Vec<Outgoing> {
        (0..n)
            .map(|i| Outgoing {
                message_id: format!("unit{i}"),
                body: "{}".into(),
            })
            .collect()
    }

    #[test]
    fn a_batch_that_finds_every_channel_lent_within_its_deadline_is_unavailable_and_sends_nothing()
    {
        let Some(b) = OnBroker::start("lent") else {
            eprintln!("BIG_MARKET_TEST_AMQP is unset: nothing to run against");
            return;
        };
        let (link, total) = (b.link(), b.0.inner.publish_channels);
        let mut lent: Vec<Lent> = async_global_executor::block_on(async {
            let mut all = Vec::new();
            for _ in 0..total {
                all.push(link.pool.lend().await.expect("a channel"));
            }
            all
        });
        assert_eq!(b.0.publishing_channels(), Some((0, total, 0)));
        let started = std::time::Instant::now();
        let results = b.publish(3);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(PublishFailure::Unavailable(w))
                if w.contains("no publishing channel free"))),
            "{results:?}"
        );
        assert!(
            started.elapsed() >= DEADLINE,
            "it waited its deadline for a channel"
        );
        // Given back settled, every channel is free again, none set aside; the next batch is
        // sent.
        for l in &mut lent {
            l.settled = true;
        }
        drop(lent);
        assert_eq!(b.0.publishing_channels(), Some((total, total, 0)));
        let results = b.publish(3);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    #[test]
    fn past_the_most_channels_set_aside_the_publishing_link_is_replaced() {
        let Some(b) = OnBroker::start("parked") else {
            eprintln!("BIG_MARKET_TEST_AMQP is unset: nothing to run against");
            return;
        };
        let first = b.link();
        // Each channel given back unsettled (a batch that gave up with confirms outstanding)
        // is set aside and a fresh one takes its place, on the same link, up to PARKED_MAX.
        for n in 1..=PARKED_MAX {
            let lent = async_global_executor::block_on(first.pool.lend()).expect("a channel");
            drop(lent);
            assert!(b.whole(n), "{n} set aside: {:?}", b.0.publishing_channels());
        }
        assert!(
            Arc::ptr_eq(&first.conn, &b.link().conn),
            "still the first link"
        );
        // One more and the link is replaced: a new connection, its pool whole, none aside.
        drop(async_global_executor::block_on(first.pool.lend()).expect("a channel"));
        assert!(
            wait_until(Duration::from_secs(30), || b
                .0
                .inner
                .publish_link()
                .is_some_and(|l| !Arc::ptr_eq(&first.conn, &l.conn))),
            "the link was replaced"
        );
        assert!(b.whole(0), "{:?}", b.0.publishing_channels());
        let results = b.publish(2);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    fn returned(id: Option<&str>) -> Heard {
        Heard::Returned {
            id: id.map(str::to_string),
            why: format!("returned: {id:?}"),
        }
    }

    #[test]
    fn a_fresh_channel_waits_a_short_poll_while_blocked_and_a_growing_backoff_after_failures() {
        let mut backoff = BACKOFF_MIN;
        for _ in 0..20 {
            assert_eq!(retire_pause(true, &mut backoff), BLOCKED_POLL);
        }
        assert_eq!(backoff, BACKOFF_MIN, "a block does not grow the backoff");
        let pauses: Vec<Duration> = (0..6).map(|_| retire_pause(false, &mut backoff)).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert_eq!(pauses[1], BACKOFF_MIN * 2);
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX.min(BACKOFF_MIN * 32));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(retire_pause(false, &mut backoff), BACKOFF_MAX, "bounded");
    }

    #[test]
    fn a_returned_message_fails_the_message_it_names_not_the_confirm_that_carried_it() {
        // "b" was returned, but its return came with the confirm of "a" (one ack completed
        // both, in lapin's order): "a" was routed, "b" was not.
        let got = outcomes(
            &["a", "b", "c"],
            vec![Ok(returned(Some("b"))), Ok(Heard::Ack), Ok(Heard::Ack)],
            3,
        );
        assert!(got[0].is_ok(), "{:?}", got[0]);
        assert!(
            matches!(&got[1], Err(PublishFailure::Rejected(w)) if w.contains("Some(\"b\")")),
            "{:?}",
            got[1]
        );
        assert!(got[2].is_ok());
    }

    #[test]
    fn after_a_confirm_given_up_an_ack_proves_nothing_but_a_return_or_a_nack_still_fails() {
        // "b" was given up on; its confirm, still in lapin, may have taken "d"'s return when
        // one ack completed "b" to "d": "c" and "d" heard plain acks.
        let lost = PublishFailure::Unconfirmed("no confirm".into());
        let got = outcomes(
            &["a", "b", "c", "d", "e", "f"],
            vec![
                Ok(Heard::Ack),
                Err(lost.clone()),
                Ok(Heard::Ack),
                Ok(Heard::Ack),
                Ok(returned(Some("a"))),
                Ok(Heard::Nack),
            ],
            2,
        );
        assert!(
            matches!(&got[0], Err(PublishFailure::Rejected(_))),
            "a return names it, whichever confirm carried it: {:?}",
            got[0]
        );
        assert_eq!(got[1], Err(lost));
        for (i, g) in got.iter().enumerate().take(5).skip(2) {
            assert!(
                matches!(g, Err(PublishFailure::Unconfirmed(_))),
                "{i}: an ack after the give-up: {g:?}"
            );
        }
        assert!(matches!(&got[5], Err(PublishFailure::Rejected(w)) if w.contains("nacked")));
    }

    #[test]
    fn a_returned_message_without_an_id_fails_its_carrier_and_nacks_and_errors_stay_failures() {
        let lost = PublishFailure::Unconfirmed("no confirm".into());
        let got = outcomes(
            &["a", "b", "c", "d"],
            vec![
                Ok(returned(None)),
                Ok(Heard::Nack),
                Err(lost.clone()),
                Ok(Heard::NotRequested),
            ],
            4,
        );
        assert!(matches!(&got[0], Err(PublishFailure::Rejected(_))));
        assert!(matches!(&got[1], Err(PublishFailure::Rejected(w)) if w.contains("nacked")));
        assert_eq!(got[2], Err(lost));
        assert!(matches!(&got[3], Err(PublishFailure::Unavailable(_))));
    }
}
