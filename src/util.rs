//! Small shared helpers: the wall clock, a random source (fastrand), and bounded waiting.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. The only place that reads the wall clock; pure code takes
/// `now_ms` as an argument.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A small, fast random source (fastrand's wyrand, seeded by the OS), for jitter and test data;
/// not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    /// A randomly seeded generator.
    pub fn new() -> Self {
        Rng(fastrand::Rng::new())
    }
    /// A generator with a fixed seed, for reproducible runs.
    pub fn seeded(seed: u64) -> Self {
        Rng(fastrand::Rng::with_seed(seed))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }
    /// A uniform value in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0.f64()
    }
    /// `n` random decimal digits.
    pub fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| self.0.digit(10)).collect()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// `first` and whatever else is already waiting on `rx`, up to `max` items: how a worker turns a
/// queue of single requests into one batch without waiting for more.
pub fn drain_batch<T>(rx: &crossbeam_channel::Receiver<T>, first: T, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    batch
}

/// Start a named thread: the one way big-market starts a thread (the tidy test holds it), so
/// every thread has a name in `top -H`, panics and logs, and a refused start is one error.
pub fn spawn<T, F>(name: impl Into<String>, f: F) -> crate::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| crate::Error::Spawn { name, source })
}

/// [`spawn`] inside a [`std::thread::scope`]: the thread may borrow from the caller's stack and
/// is joined when the scope ends.
pub fn spawn_scoped<'scope, 'env, T, F>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: impl Into<String>,
    f: F,
) -> crate::Result<std::thread::ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let name = name.into();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn_scoped(scope, f)
        .map_err(|source| crate::Error::Spawn { name, source })
}

/// Poll `cond` every few milliseconds until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_rng_is_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::seeded(7), Rng::seeded(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            let f = a.next_f64();
            b.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
        let d = a.digits(12);
        assert_eq!(d.len(), 12);
        assert!(d.bytes().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn wait_until_reports_timeout() {
        assert!(!wait_until(Duration::from_millis(20), || false));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n > 3
        }));
    }
}
