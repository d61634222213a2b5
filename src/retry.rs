//! Retry policy for failed publishes: which failures count, exponential backoff with jitter, and
//! when a task is parked as dead. Pure functions; the caller passes the clock and the randomness.

use std::time::Duration;

/// Why a publish failed, which decides whether it counts against the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishFailure {
    /// The broker or consumer could not be reached: not the message's fault, never counted.
    Unavailable(String),
    /// The broker refused this message (nack, unroutable, too large): counted as an attempt.
    Rejected(String),
    /// The message was handed to the transport and no confirm came (a broker that holds it, a
    /// link lost after the hand-over, a consumer that did not answer in time): it may still be
    /// routed. Not counted; its task is due again only after a lease, so that another copy does
    /// not join the one that may still be in flight.
    Unconfirmed(String),
}

impl PublishFailure {
    /// Whether this failure counts against the task's attempt limit.
    pub fn counts(&self) -> bool {
        matches!(self, PublishFailure::Rejected(_))
    }
    /// The reason text.
    pub fn reason(&self) -> &str {
        match self {
            PublishFailure::Unavailable(r)
            | PublishFailure::Rejected(r)
            | PublishFailure::Unconfirmed(r) => r,
        }
    }
}

/// How failed tasks are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Refused attempts after which a task is parked as dead.
    pub max_attempts: u32,
    /// Delay after the first refused attempt.
    pub base: Duration,
    /// Longest delay between attempts.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

/// What to do with a task after a failed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again at this time (epoch ms), with this many counted attempts.
    RetryAt {
        /// Epoch milliseconds of the next attempt.
        at_ms: i64,
        /// Counted attempts so far.
        attempts: u32,
    },
    /// Park the task as dead after this many counted attempts.
    Dead {
        /// Counted attempts so far.
        attempts: u32,
    },
}

impl RetryPolicy {
    /// The un-jittered delay before retry number `attempts` (1-based): `base * 2^(attempts-1)`, capped.
    pub fn delay(&self, attempts: u32) -> Duration {
        let shift = attempts.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << shift).min(self.cap)
    }

    /// Decide what follows a failure, given the attempts counted before it, the time, and a
    /// uniform random value in `[0, 1)` for jitter (the delay is spread over its upper half).
    /// An unavailable broker is not counted and is retried on the next scan.
    pub fn after_failure(
        &self,
        failure: &PublishFailure,
        attempts_before: u32,
        now_ms: i64,
        rand01: f64,
    ) -> Next {
        if !failure.counts() {
            return Next::RetryAt {
                at_ms: now_ms,
                attempts: attempts_before,
            };
        }
        let attempts = attempts_before + 1;
        if attempts >= self.max_attempts {
            return Next::Dead { attempts };
        }
        let delay = self.delay(attempts).as_millis() as f64;
        let jittered = delay / 2.0 + delay / 2.0 * rand01.clamp(0.0, 1.0);
        Next::RetryAt {
            at_ms: now_ms + jittered as i64,
            attempts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        }
    }

    #[test]
    fn delay_doubles_and_is_capped() {
        let p = policy();
        let got: Vec<u128> = (1..=6).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_the_delay() {
        let p = policy();
        let rej = PublishFailure::Rejected("nack".into());
        assert_eq!(
            p.after_failure(&rej, 1, 1000, 0.0),
            Next::RetryAt {
                at_ms: 1100,
                attempts: 2
            }
        );
        assert_eq!(
            p.after_failure(&rej, 1, 1000, 0.999_999),
            Next::RetryAt {
                at_ms: 1199,
                attempts: 2
            }
        );
    }

    #[test]
    fn an_outage_never_counts_and_retries_next_scan() {
        let p = policy();
        let down = PublishFailure::Unavailable("connection refused".into());
        assert_eq!(
            p.after_failure(&down, 4, 50, 0.5),
            Next::RetryAt {
                at_ms: 50,
                attempts: 4
            }
        );
    }

    #[test]
    fn refused_messages_are_parked_at_the_limit() {
        let p = policy();
        let rej = PublishFailure::Rejected("unroutable".into());
        assert!(matches!(
            p.after_failure(&rej, 3, 0, 0.5),
            Next::RetryAt { attempts: 4, .. }
        ));
        assert_eq!(p.after_failure(&rej, 4, 0, 0.5), Next::Dead { attempts: 5 });
    }
}
