//! The shard counts behind `/metrics`, kept so that a scrape never waits on a count that takes
//! long. Counting awards and tasks by state reads whole tables (the original's award tables
//! have no index on the state), which is a millisecond on a small SQLite shard and tens of
//! seconds on a MySQL table of millions of rows: longer than a scrape may take, and a load on
//! the database the service shares with its writers.
//!
//! So the last counts are kept with when they were taken and how long they took. A count quicker
//! than [`QUICK`] is taken for every scrape. A longer one is served as it is while it is younger
//! than ten times its own duration: counting then takes at most about a tenth of the time,
//! whatever the size of the tables. Once older, a count that took at most [`SYNC_LIMIT`] is
//! simply taken again before the scrape answers; a longer one is taken on a thread of its own
//! while scrapes keep getting the previous counts, whose age `/metrics` shows
//! (`big_market_shard_counts_age_seconds`). One count runs at a time: a scrape that finds one
//! in flight waits for it, and the scrapes that waited serve the one count taken after them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::{ShardStatus, Store};

/// The longest count a scrape waits for when the counts it has are too old.
pub const SYNC_LIMIT: Duration = Duration::from_millis(250);

/// A count quicker than this is taken for every scrape: the gauges show what was just written.
pub const QUICK: Duration = Duration::from_millis(10);

/// How many times its own duration a longer count stays fresh.
const FRESH_FOR: u32 = 10;

/// Counts of every shard, and when they were taken.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Per shard, as [`Store::status`] gives them.
    pub shards: Arc<Vec<ShardStatus>>,
    /// When the count started.
    pub taken: Instant,
    /// How long it took.
    pub took: Duration,
}

/// What to do with the counts at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Serve them.
    Serve,
    /// Count again and serve the new counts.
    CountNow,
    /// Serve them, and count again on a thread of its own.
    CountBehind,
}

/// The policy: counts of age `age` that took `took`.
pub fn next(age: Duration, took: Duration) -> Next {
    if took < QUICK {
        Next::CountNow
    } else if age < took * FRESH_FOR {
        Next::Serve
    } else if took <= SYNC_LIMIT {
        Next::CountNow
    } else {
        Next::CountBehind
    }
}

#[derive(Default)]
struct Held {
    last: Option<Counts>,
    /// The last count that failed: when it started, and why.
    failed: Option<(Instant, String)>,
    /// A count is running on its own thread.
    behind: bool,
}

/// How the shards are counted ([`Store::status`]).
type CountFn = Box<dyn Fn() -> Result<Vec<ShardStatus>> + Send + Sync>;

/// The kept counts of a store.
pub struct CountCache {
    counter: CountFn,
    held: Mutex<Held>,
    /// Held while a count runs: one count at a time, however many scrapes want one.
    flight: Mutex<()>,
}

impl CountCache {
    /// Nothing counted yet: the first call counts.
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        CountCache::counting(Box::new(move || store.status()))
    }

    fn counting(counter: CountFn) -> Arc<Self> {
        Arc::new(CountCache {
            counter,
            held: Mutex::new(Held::default()),
            flight: Mutex::new(()),
        })
    }

    /// Counts taken after `asked`: a count that started once the caller asked (while it waited
    /// for the count in flight) is served as it is; otherwise this count runs, alone.
    fn count_since(&self, asked: Instant) -> Result<Counts> {
        let _flight = self.flight.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.held.lock().expect("count cache lock");
        if let Some(last) = &held.last {
            if last.taken >= asked {
                return Ok(last.clone());
            }
        }
        // A count that started after the caller asked, and failed, is its answer too: the
        // scrapes that waited for it do not each run it again against shards that fail.
        if let Some((started, why)) = &held.failed {
            if *started >= asked {
                return Err(Error::Io {
                    path: "shard counts".into(),
                    source: std::io::Error::other(format!(
                        "the count taken for this request failed: {why}"
                    )),
                });
            }
        }
        drop(held);
        self.count()
    }

    fn count(&self) -> Result<Counts> {
        let taken = Instant::now();
        let shards = match (self.counter)() {
            Ok(shards) => shards,
            Err(e) => {
                self.held.lock().expect("count cache lock").failed = Some((taken, e.to_string()));
                return Err(e);
            }
        };
        let counts = Counts {
            shards: Arc::new(shards),
            taken,
            took: taken.elapsed(),
        };
        self.held.lock().expect("count cache lock").last = Some(counts.clone());
        Ok(counts)
    }

    /// The counts to serve now (see the module's description). Fails only when there are none
    /// yet and the shards cannot be read; a count behind that fails is logged, and the previous
    /// counts are served until one succeeds.
    pub fn get(self: &Arc<Self>) -> Result<Counts> {
        let (last, start_behind) = {
            let mut held = self.held.lock().expect("count cache lock");
            let Some(last) = held.last.clone() else {
                drop(held);
                return self.count_since(Instant::now());
            };
            match next(last.taken.elapsed(), last.took) {
                Next::Serve => return Ok(last),
                Next::CountNow => {
                    drop(held);
                    return self.count_since(Instant::now());
                }
                Next::CountBehind => (last, !std::mem::replace(&mut held.behind, true)),
            }
        };
        if start_behind {
            let me = self.clone();
            let spawned = crate::util::spawn("shard-counts", move || {
                if let Err(e) = me.count_since(Instant::now()) {
                    log::warn!(
                        "counting the shards for /metrics failed, serving older counts: {e}"
                    );
                }
                me.held.lock().expect("count cache lock").behind = false;
            });
            if let Err(e) = spawned {
                log::warn!("could not start a thread to count the shards: {e}");
                self.held.lock().expect("count cache lock").behind = false;
            }
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cache(dir: &tempfile::TempDir) -> Arc<CountCache> {
        let settings = crate::config::Settings::new(dir.path()).validate().unwrap();
        CountCache::new(Arc::new(Store::open(&settings, true).unwrap()))
    }

    #[test]
    fn old_counts_that_took_long_are_served_while_new_ones_are_taken_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir);
        let first = cache.get().unwrap();
        assert_eq!(first.shards.len(), 2);
        // As if the last count had taken a second, eleven seconds ago.
        let old = Counts {
            shards: Arc::new(Vec::new()),
            taken: Instant::now() - Duration::from_secs(11),
            took: Duration::from_secs(1),
        };
        cache.held.lock().unwrap().last = Some(old.clone());
        let served = cache.get().unwrap();
        assert!(served.shards.is_empty(), "the old counts, at once");
        assert!(
            crate::util::wait_until(Duration::from_secs(10), || {
                !cache.held.lock().unwrap().behind
            }),
            "the count behind ends"
        );
        let after = cache.get().unwrap();
        assert_eq!(after.shards.len(), 2, "the new counts");
        assert!(after.taken > old.taken);
    }

    #[test]
    fn the_first_counts_and_quick_ones_are_taken_before_answering() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir);
        assert!(cache.held.lock().unwrap().last.is_none());
        let first = cache.get().unwrap();
        let old = Counts {
            taken: Instant::now() - Duration::from_secs(1),
            took: QUICK,
            ..first
        };
        cache.held.lock().unwrap().last = Some(old.clone());
        let again = cache.get().unwrap();
        assert!(again.taken > old.taken, "counted again");
        assert!(!cache.held.lock().unwrap().behind);
    }

    #[test]
    fn concurrent_scrapes_never_run_more_than_one_count_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (running, most, counts) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (r, m, c) = (running.clone(), most.clone(), counts.clone());
        // A count of a few milliseconds: quick, so every scrape wants a new one.
        let cache = CountCache::counting(Box::new(move || {
            let now = r.fetch_add(1, SeqCst) + 1;
            m.fetch_max(now, SeqCst);
            c.fetch_add(1, SeqCst);
            std::thread::sleep(2 * MS); // the count's own duration
            r.fetch_sub(1, SeqCst);
            Ok(Vec::new())
        }));
        std::thread::scope(|s| {
            for _ in 0..16 {
                let cache = cache.clone();
                s.spawn(move || {
                    for _ in 0..20 {
                        cache.get().unwrap();
                    }
                });
            }
        });
        assert_eq!(most.load(SeqCst), 1, "counts ran at once");
        assert!(
            counts.load(SeqCst) < 16 * 20,
            "scrapes that waited for a count served it instead of counting again"
        );
    }

    #[test]
    fn scrapes_that_waited_for_a_failing_count_share_its_failure() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let counts = Arc::new(AtomicUsize::new(0));
        let c = counts.clone();
        let cache = CountCache::counting(Box::new(move || {
            c.fetch_add(1, SeqCst);
            std::thread::sleep(100 * MS); // the count's own duration
            Err(crate::Error::Config("the shards do not answer".into()))
        }));
        let failed = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let cache = cache.clone();
                    s.spawn(move || cache.get().is_err())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|failed| *failed)
                .count()
        });
        assert_eq!(failed, 8, "every scrape gets an error");
        assert!(
            counts.load(SeqCst) <= 2,
            "{} counts ran for 8 scrapes that asked at once",
            counts.load(SeqCst)
        );
    }

    #[test]
    fn quick_counts_are_taken_for_every_scrape() {
        assert_eq!(next(Duration::ZERO, Duration::ZERO), Next::CountNow);
        assert_eq!(next(MS, QUICK - MS), Next::CountNow);
    }

    #[test]
    fn longer_counts_stay_fresh_for_ten_times_their_duration() {
        assert_eq!(next(99 * MS, QUICK), Next::Serve);
        assert_eq!(next(100 * MS, QUICK), Next::CountNow);
        assert_eq!(
            next(Duration::from_secs(9), Duration::from_secs(1)),
            Next::Serve
        );
    }

    #[test]
    fn a_count_up_to_the_sync_limit_is_taken_again_before_answering() {
        assert_eq!(next(Duration::from_secs(60), SYNC_LIMIT), Next::CountNow);
    }

    #[test]
    fn a_long_count_is_taken_behind_the_scrapes() {
        let took = SYNC_LIMIT + MS;
        assert_eq!(next(took * 9, took), Next::Serve);
        assert_eq!(next(took * 10, took), Next::CountBehind);
        assert_eq!(
            next(Duration::from_secs(299), Duration::from_secs(30)),
            Next::Serve
        );
        assert_eq!(
            next(Duration::from_secs(301), Duration::from_secs(30)),
            Next::CountBehind
        );
    }
}
