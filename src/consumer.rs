//! The award consumer: handles `send_award` messages by delivering the award (record state
//! `create` -> `completed`) on the user's shard. Idempotent by message id: the delivery log and
//! the state change commit in one transaction, so a redelivered message changes nothing.

use std::sync::Arc;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::EventMessage;
use crate::store::{Delivered, Store};
use crate::transport::{Handled, Handler};
use crate::util::now_ms;

/// Delivers awards from message bodies.
pub struct AwardConsumer {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl AwardConsumer {
    /// A consumer over a store.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        AwardConsumer { store, metrics }
    }
}

impl Handler for AwardConsumer {
    fn handle(&self, body: &[u8]) -> Handled {
        let result = EventMessage::decode(body).and_then(|msg| {
            let id = msg.id.clone();
            self.store.deliver(msg, now_ms()).map(|d| (id, d))
        });
        match result {
            Ok((id, Delivered::First)) => {
                Metrics::add(&self.metrics.delivered, 1);
                log::trace!("delivered message_id={id}");
                Handled::Ack
            }
            Ok((id, Delivered::Again)) => {
                Metrics::add(&self.metrics.redelivered, 1);
                log::debug!("redelivered message_id={id} changed nothing");
                Handled::Ack
            }
            Err(Error::Poison(reason)) => {
                Metrics::add(&self.metrics.poison, 1);
                let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).to_string();
                log::error!("message set aside: {reason} body={shown:?}");
                Handled::Reject(reason)
            }
            Err(e) => {
                log::warn!("delivery will be retried: {e}");
                Handled::Retry(e.to_string())
            }
        }
    }
}
