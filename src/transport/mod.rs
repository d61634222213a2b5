//! The broker boundary. [`Transport`] publishes batches with confirms and runs consumers.
//! Implementations: [`memory::InProcess`] (the embedded default), [`amqp::Amqp`] (RabbitMQ
//! through lapin; the only code that speaks AMQP) and [`fault::Faulty`] (scripted failures for
//! tests and `verify`).

pub mod amqp;
pub mod fault;
pub mod memory;

use std::sync::Arc;

use crate::error::Result;
pub use crate::retry::PublishFailure;

/// A message to publish on the transport's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Message id (also sent as the AMQP message id).
    pub message_id: String,
    /// JSON body.
    pub body: String,
}

/// What a consumer did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Handled (delivered now or before): acknowledge.
    Ack,
    /// Can never be handled (malformed, unknown award): reject without requeue.
    Reject(String),
    /// Could not be handled now (storage busy, shutting down): requeue.
    Retry(String),
}

/// Handles one message body. Implemented by the award consumer.
pub trait Handler: Send + Sync {
    /// Handle a body; must be idempotent, since a message may arrive more than once.
    fn handle(&self, body: &[u8]) -> Handled;

    /// Handle several bodies at once (they may share one commit); one outcome per body.
    fn handle_batch(&self, bodies: &[&[u8]]) -> Vec<Handled> {
        bodies.iter().map(|b| self.handle(b)).collect()
    }
}

/// Most messages a consumer thread takes from its queue to handle together.
pub const CONSUME_BATCH: usize = 256;

/// A running consumer; `stop` finishes the message in hand and returns.
pub trait ConsumerHandle: Send + Sync {
    /// Stop consuming and join the consumer threads.
    fn stop(self: Box<Self>);
}

/// Which broker a transport is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    /// The node (URL without credentials), `None` while disconnected.
    pub node: Option<String>,
    /// `classic` or `quorum`.
    pub queue_type: &'static str,
}

/// A message transport with publisher confirms.
pub trait Transport: Send + Sync {
    /// A short description for logs and `status` (`in-process`, `amqp 127.0.0.1:5672`).
    fn describe(&self) -> String;

    /// What kind of transport this is (`amqp`, `in-process`), safe to show to anyone: no
    /// address, URL or credentials.
    fn kind(&self) -> &'static str;

    /// Publish every message, with many in flight, and wait for each confirm. The result at
    /// index `i` is message `i`'s: `Ok` only once the message is safe (broker ack of a
    /// persistent, routed message; or handled by the in-process consumer).
    ///
    /// The wait has one deadline for the batch. A transport whose messages may still be routed
    /// past it (a broker that blocks publishers holds them and routes them once it resumes; one
    /// under an alarm confirms late) keeps waiting, bounded, rather than give up on messages
    /// that would then be sent twice, calling `hold` at every further deadline: it renews the
    /// caller's leases on the tasks, and returns false when the caller no longer holds them
    /// (then the transport gives up).
    fn publish_batch(
        &self,
        batch: &[Outgoing],
        hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), PublishFailure>>;

    /// Whether publishing can currently succeed (false while the broker is unreachable).
    fn is_connected(&self) -> bool;

    /// The broker node publishing is connected to (its URL without credentials) and the
    /// queue type, for `/metrics`; `None` for a transport without a broker.
    fn broker(&self) -> Option<BrokerInfo> {
        None
    }

    /// Start consuming the topic's queue with `threads` handler threads.
    fn start_consumer(
        &self,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>>;
}
