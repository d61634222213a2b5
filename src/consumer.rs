//! The award consumer: handles `send_award` messages by delivering the award (record state
//! `create` -> `completed`) on the user's shard. Idempotent by message id: the delivery log and
//! the state change commit in one transaction, so a redelivered message changes nothing.

use std::sync::Arc;

use crate::error::{Error, Result};
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

    fn outcome(&self, body: &[u8], id: &str, result: Result<Delivered>) -> Handled {
        match result {
            Ok(Delivered::First) => {
                Metrics::add(&self.metrics.delivered, 1);
                log::trace!("delivered message_id={id}");
                Handled::Ack
            }
            Ok(Delivered::Again) => {
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
                log::warn!("delivery will be retried message_id={id}: {e}");
                Handled::Retry(e.to_string())
            }
        }
    }
}

impl Handler for AwardConsumer {
    fn handle(&self, body: &[u8]) -> Handled {
        self.handle_batch(&[body])
            .pop()
            .expect("one outcome per body")
    }

    fn handle_batch(&self, bodies: &[&[u8]]) -> Vec<Handled> {
        let decoded: Vec<Result<EventMessage>> =
            bodies.iter().map(|b| EventMessage::decode(b)).collect();
        let valid: Vec<EventMessage> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let mut delivered = self.store.deliver_many(valid, now_ms()).into_iter();
        bodies
            .iter()
            .zip(decoded)
            .map(|(body, d)| match d {
                Ok(msg) => self.outcome(
                    body,
                    &msg.id,
                    delivered.next().expect("one result per valid message"),
                ),
                Err(e) => self.outcome(body, "-", Err(e)),
            })
            .collect()
    }
}
