//! The award consumer: handles `send_award` messages by delivering the award (record state
//! `create` -> `completed`) on the user's shard. Idempotent by message id: the delivery log and
//! the state change commit in one transaction, so a redelivered message changes nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::EventMessage;
use crate::store::{Delivered, Store};
use crate::transport::{Handled, Handler};
use crate::util::now_ms;

/// Whether delivering keeps failing on the store, and how long to hold back before the
/// messages of a failed batch go back to the queue. Pure: the consumer sleeps what it says.
#[derive(Debug, Default)]
pub struct StoreHealth {
    failures: u32,
}

/// First wait after a storage error; it doubles per failed batch up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between tries while the store keeps failing.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl StoreHealth {
    /// A batch failed on the store: how long to wait before its messages are retried, and
    /// whether this starts a failing spell (the one time to warn).
    pub fn failed(&mut self) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let wait = BACKOFF_MIN
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(BACKOFF_MAX);
        (wait, self.failures == 1)
    }
    /// A batch went through: `Some(failed batches)` when this ends a failing spell.
    pub fn succeeded(&mut self) -> Option<u32> {
        let ended = (self.failures > 0).then_some(self.failures);
        self.failures = 0;
        ended
    }
}

/// Delivers awards from message bodies.
pub struct AwardConsumer {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Mutex<StoreHealth>,
}

impl AwardConsumer {
    /// A consumer over a store.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        AwardConsumer {
            store,
            metrics,
            health: Mutex::new(StoreHealth::default()),
        }
    }

    /// After a batch: while the store fails, hold this consumer thread back (it takes no new
    /// messages meanwhile, and the failed ones return to the queue only after the wait), with
    /// one warning when the failures start and one line when they end.
    fn pace(&self, outcomes: &[Handled]) {
        let failure = outcomes.iter().find_map(|o| match o {
            Handled::Retry(e) => Some(e.clone()),
            _ => None,
        });
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(cause) => {
                let (wait, started) = health.failed();
                drop(health);
                if started {
                    log::warn!("delivery paused: the store is failing ({cause}); the messages it could not take are tried again after a backoff of up to {BACKOFF_MAX:?} (on RabbitMQ they are held, unacknowledged), until a batch goes through");
                } else {
                    log::debug!("delivery still failing, waiting {wait:?}: {cause}");
                }
                std::thread::sleep(wait); // the backoff itself, not a wait for a condition
            }
            None => {
                if let Some(n) = health.succeeded() {
                    log::info!(
                        "delivery resumed: the store accepts writes again after {n} failed batches"
                    );
                }
            }
        }
    }

    /// What to tell the transport about one message; `original`: it is in the original's
    /// form (no order id).
    fn outcome(&self, body: &[u8], id: &str, original: bool, result: Result<Delivered>) -> Handled {
        match result {
            Ok(Delivered::Recorded) => {
                Metrics::add(&self.metrics.original_messages, 1);
                log::debug!("original's message recorded message_id={id}: it names no award");
                Handled::Ack
            }
            Ok(Delivered::First) => {
                Metrics::add(&self.metrics.delivered, 1);
                log::trace!("delivered message_id={id}");
                Handled::Ack
            }
            Ok(Delivered::Again) => {
                Metrics::add(&self.metrics.redelivered, 1);
                if original {
                    Metrics::add(&self.metrics.original_messages, 1);
                }
                log::debug!("redelivered message_id={id} changed nothing");
                Handled::Ack
            }
            Err(Error::Poison(reason)) => {
                Metrics::add(&self.metrics.poison, 1);
                let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).to_string();
                log::error!("unprocessable message refused: {reason} body={shown:?}");
                Handled::Reject(reason)
            }
            Err(e) => {
                log::debug!("delivery will be retried message_id={id}: {e}");
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
        let outcomes: Vec<Handled> = bodies
            .iter()
            .zip(decoded)
            .map(|(body, d)| match d {
                Ok(msg) => self.outcome(
                    body,
                    &msg.id,
                    msg.order_id().is_none(),
                    delivered.next().expect("one result per valid message"),
                ),
                Err(e) => self.outcome(body, "-", false, Err(e)),
            })
            .collect();
        self.pace(&outcomes);
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_originals_message_is_recorded_acknowledged_and_counted_never_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::Settings::new(dir.path().join("data"));
        let store = Arc::new(Store::open(&settings, true).unwrap());
        let metrics = Arc::new(Metrics::default());
        let consumer = AwardConsumer::new(store.clone(), metrics.clone());
        let seed = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","userId":"xiaofuge"},"id":"74920280321","timestamp":1712377010878}"#.as_bytes();
        assert_eq!(consumer.handle(seed), Handled::Ack);
        assert_eq!(consumer.handle(seed), Handled::Ack, "a repeat as well");
        assert_eq!(Metrics::get(&metrics.original_messages), 2);
        assert_eq!(Metrics::get(&metrics.redelivered), 1);
        assert_eq!(
            (
                Metrics::get(&metrics.delivered),
                Metrics::get(&metrics.poison)
            ),
            (0, 0)
        );
        let db = crate::router::route("xiaofuge", settings.layout).db;
        let status = store.shard(db).status(settings.layout.tb_count()).unwrap();
        assert_eq!((status.delivered_messages, status.receipts), (1, 2));
        // Still refused: a message naming an order that is not there, and one without a user.
        let unknown = br#"{"data":{"awardId":101,"awardTitle":"t","orderId":"1","userId":"xiaofuge"},"id":"74920280322","timestamp":1}"#;
        assert!(matches!(consumer.handle(unknown), Handled::Reject(_)));
        let no_user =
            br#"{"data":{"awardId":101,"awardTitle":"t"},"id":"74920280323","timestamp":1}"#;
        assert!(matches!(consumer.handle(no_user), Handled::Reject(_)));
    }

    #[test]
    fn storage_failures_back_off_doubling_and_warn_once_per_spell() {
        let mut h = StoreHealth::default();
        assert_eq!(h.succeeded(), None, "nothing to report while healthy");
        let waits: Vec<(Duration, bool)> = (0..8).map(|_| h.failed()).collect();
        assert_eq!(waits[0], (BACKOFF_MIN, true));
        assert_eq!(waits[1], (BACKOFF_MIN * 2, false));
        assert_eq!(waits[2], (BACKOFF_MIN * 4, false));
        assert!(waits.iter().all(|(w, _)| *w <= BACKOFF_MAX));
        assert_eq!(waits[7].0, BACKOFF_MAX);
        assert_eq!(waits.iter().filter(|(_, warn)| *warn).count(), 1);
        assert_eq!(h.succeeded(), Some(8));
        assert_eq!(h.succeeded(), None);
        assert_eq!(h.failed(), (BACKOFF_MIN, true), "a new spell starts over");
        for _ in 0..100 {
            h.failed();
        }
        assert_eq!(h.failed().0, BACKOFF_MAX, "no overflow after many failures");
    }
}
