//! The in-process transport: a bounded queue between publishers and consumer threads in the
//! same process. A publish is confirmed only after a consumer has handled the message, so a task
//! counts as sent only once its award is delivered; if the process dies first, the task is still
//! pending in SQLite and the scanner sends it again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, Sender};

use super::{ConsumerHandle, Handled, Handler, Outgoing, PublishFailure, Transport, CONSUME_BATCH};
use crate::error::Result;

/// Messages waiting for a consumer. When full, publishers block: backpressure.
pub const QUEUE_CAPACITY: usize = 4096;

struct Envelope {
    body: String,
    reply: Sender<Handled>,
}

/// The in-process transport.
pub struct InProcess {
    tx: Sender<Envelope>,
    rx: Receiver<Envelope>,
    consumers: Arc<AtomicUsize>,
    confirm_timeout: Duration,
}

impl InProcess {
    /// A transport whose publishes wait at most `confirm_timeout` for the consumer.
    pub fn new(confirm_timeout: Duration) -> Self {
        let (tx, rx) = bounded(QUEUE_CAPACITY);
        InProcess {
            tx,
            rx,
            consumers: Arc::new(AtomicUsize::new(0)),
            confirm_timeout,
        }
    }
}

impl Default for InProcess {
    fn default() -> Self {
        InProcess::new(Duration::from_secs(30))
    }
}

impl Transport for InProcess {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    fn describe(&self) -> String {
        "in-process".into()
    }

    fn publish_batch(
        &self,
        batch: &[Outgoing],
        _hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), PublishFailure>> {
        if self.consumers.load(Ordering::SeqCst) == 0 {
            return batch
                .iter()
                .map(|_| {
                    Err(PublishFailure::Unavailable(
                        "no in-process consumer is running".into(),
                    ))
                })
                .collect();
        }
        // One deadline for the whole batch, not one per message, and handing the messages to
        // the queue (which blocks while it is full) counts against it: a message not handed
        // over by then fails without being sent.
        let deadline = std::time::Instant::now() + self.confirm_timeout;
        let pending: Vec<Option<Receiver<Handled>>> = batch
            .iter()
            .map(|m| {
                let (reply, rx) = bounded(1);
                self.tx
                    .send_deadline(
                        Envelope {
                            body: m.body.clone(),
                            reply,
                        },
                        deadline,
                    )
                    .ok()
                    .map(|_| rx)
            })
            .collect();
        crate::crash::hit(crate::crash::Point::BeforeConfirm);
        pending
            .into_iter()
            .enumerate()
            .map(|(i, rx)| {
                let r = match rx.map(|rx| rx.recv_deadline(deadline)) {
                    Some(Ok(Handled::Ack)) => Ok(()),
                    Some(Ok(Handled::Reject(r))) => Err(PublishFailure::Rejected(r)),
                    Some(Ok(Handled::Retry(r))) => Err(PublishFailure::Unavailable(r)),
                    // Still queued: the consumer may handle it later.
                    Some(Err(_)) | None => Err(PublishFailure::Unconfirmed(
                        "the in-process consumer did not answer".into(),
                    )),
                };
                if i == 0 {
                    crate::crash::hit(crate::crash::Point::MidRelayBatch);
                }
                r
            })
            .collect()
    }

    fn is_connected(&self) -> bool {
        self.consumers.load(Ordering::SeqCst) > 0
    }

    fn start_consumer(
        &self,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>> {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, stop_rx, handler, consumers) = (
                self.rx.clone(),
                stop_rx.clone(),
                handler.clone(),
                self.consumers.clone(),
            );
            consumers.fetch_add(1, Ordering::SeqCst);
            let h = crate::util::spawn(format!("consumer-{i}"), move || {
                loop {
                    select! {
                        recv(stop_rx) -> _ => break,
                        recv(rx) -> env => match env {
                            Ok(first) => {
                                let batch = crate::util::drain_batch(&rx, first, CONSUME_BATCH);
                                let bodies: Vec<&[u8]> = batch.iter().map(|e| e.body.as_bytes()).collect();
                                let outcomes = handler.handle_batch(&bodies);
                                crate::crash::hit(crate::crash::Point::BeforeAck);
                                for (env, outcome) in batch.iter().zip(outcomes) {
                                    let _ = env.reply.send(outcome);
                                }
                            }
                            Err(_) => break,
                        },
                    }
                }
                // The last consumer to stop answers what is still queued, so no publisher waits.
                if consumers.fetch_sub(1, Ordering::SeqCst) == 1 {
                    while let Ok(env) = rx.try_recv() {
                        let _ = env
                            .reply
                            .send(Handled::Retry("the in-process consumer stopped".into()));
                    }
                }
            })?;
            handles.push(h);
        }
        Ok(Box::new(Running {
            stop: stop_tx,
            handles,
        }))
    }
}

struct Running {
    stop: Sender<()>,
    handles: Vec<JoinHandle<()>>,
}

impl ConsumerHandle for Running {
    fn stop(self: Box<Self>) {
        drop(self.stop);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A handler that holds every batch until the test opens its gate, counting what it saw.
    struct Held {
        open: Arc<Mutex<bool>>,
        seen: Arc<AtomicUsize>,
    }

    impl Handler for Held {
        fn handle(&self, _body: &[u8]) -> Handled {
            self.seen.fetch_add(1, Ordering::SeqCst);
            crate::util::wait_until(Duration::from_secs(30), || *self.open.lock().unwrap());
            Handled::Ack
        }
    }

    #[test]
    fn a_full_queue_holds_back_publishers_until_their_deadline_and_never_grows_past_its_bound() {
        let t = InProcess::new(Duration::from_millis(300));
        let (open, seen) = (Arc::new(Mutex::new(false)), Arc::new(AtomicUsize::new(0)));
        let consumer = t
            .start_consumer(
                Arc::new(Held {
                    open: open.clone(),
                    seen: seen.clone(),
                }),
                1,
            )
            .unwrap();
        // The consumer takes one message and holds it; the queue fills behind it, and the
        // rest of the batch waits for room until the batch's deadline.
        let n = QUEUE_CAPACITY + 2 * CONSUME_BATCH;
        let batch: Vec<Outgoing> = (0..n)
            .map(|i| Outgoing {
                message_id: format!("m{i}"),
                body: "{}".into(),
            })
            .collect();
        let started = std::time::Instant::now();
        let results = t.publish_batch(&batch, &|| true);
        assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(PublishFailure::Unconfirmed(_)))),
            "nothing was answered while the consumer held its batch"
        );
        assert!(seen.load(Ordering::SeqCst) >= 1);
        // The consumer took at most one batch off the queue; the rest filled it to its bound
        // and no further.
        assert_eq!(t.rx.len(), QUEUE_CAPACITY);
        *open.lock().unwrap() = true;
        consumer.stop();
    }
}
