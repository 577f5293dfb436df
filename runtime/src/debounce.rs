//! Debounce for a concern that recomputes everything on any change: the watches observe
//! changes on a [`ChangeClock`]; the reconcile waits until they settle (a quiet moment, but
//! never longer than a cap after the oldest), then takes them, keeping the wall-clock time
//! of the oldest for the propagation annotation of what it writes.
//!
//! kube-runtime's own debounce (`controller::Config::debounce`) is not used for this: it
//! postpones a reconcile for as long as changes keep coming.

use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The changes not yet taken: when the oldest was observed (wall clock, for annotations,
/// and monotonic) and when the latest was.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pending {
    first_at: DateTime<Utc>,
    first: Instant,
    last: Instant,
}

/// Tracks pending changes between the watches (which observe) and the reconcile (which
/// waits for them to settle, then takes them). Cheap to clone; clones share the clock.
#[derive(Clone, Debug)]
pub struct ChangeClock {
    pending: Arc<Mutex<Option<Pending>>>,
    /// Quiet time after the latest change before the changes count as settled.
    quiet: Duration,
    /// Changes count as settled at most this long after the oldest.
    max: Duration,
}

impl ChangeClock {
    pub fn new(quiet: Duration, max: Duration) -> Self {
        Self {
            pending: Arc::default(),
            quiet,
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change happened now.
    pub fn observe(&self) {
        let now = Instant::now();
        let mut p = self.lock();
        match &mut *p {
            Some(p) => p.last = now,
            None => {
                *p = Some(Pending {
                    first_at: Utc::now(),
                    first: now,
                    last: now,
                })
            }
        }
    }

    /// How long to wait at `now` before the changes settle: until `quiet` passed since the
    /// latest change, but never more than `max` after the oldest (a steady stream of
    /// changes must not postpone the reconcile forever). `None`: settled (or none pending).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let p = (*self.lock())?;
        let due = (p.last + self.quiet).min(p.first + self.max);
        (due > now).then(|| due - now)
    }

    /// Waits until the pending changes settled (at once when none are pending).
    pub async fn settled(&self) {
        while let Some(wait) = self.wait(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// The wall-clock time of the oldest pending change (now if none), clearing them.
    pub fn take(&self) -> DateTime<Utc> {
        self.lock().take().map_or_else(Utc::now, |p| p.first_at)
    }

    /// Handles the pending changes: `handle` gets the time of the oldest (they are cleared);
    /// when it fails they are put back, so the retry keeps that time. A concern that
    /// debounces calls [`ChangeClock::settled`] first.
    pub async fn handle<T, E, Fut>(&self, handle: impl FnOnce(DateTime<Utc>) -> Fut) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let changed_at = self.take();
        let result = handle(changed_at).await;
        if result.is_err() {
            self.restore(changed_at);
        }
        result
    }

    /// Puts back changes whose handling failed, so the retry keeps their original time.
    pub fn restore(&self, first_at: DateTime<Utc>) {
        let now = Instant::now();
        let mut p = self.lock();
        match &mut *p {
            Some(p) => p.first_at = p.first_at.min(first_at),
            None => {
                *p = Some(Pending {
                    first_at,
                    first: now,
                    last: now,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(1000);

    fn pending(clock: &ChangeClock) -> Pending {
        clock.lock().expect("a change is pending")
    }

    #[test]
    fn the_clock_waits_for_quiet_but_not_forever() {
        let clock = ChangeClock::new(QUIET, MAX);
        let t0 = Instant::now();
        assert_eq!(clock.wait(t0), None, "nothing pending: settled now");
        clock.observe();
        let p = pending(&clock);
        // Just after the change: wait out the quiet period.
        assert_eq!(clock.wait(p.last), Some(QUIET));
        assert_eq!(clock.wait(p.last + QUIET), None);
        // Changes keep coming: the wait is capped at `MAX` after the first.
        clock.lock().as_mut().unwrap().last = p.first + Duration::from_millis(950);
        assert_eq!(
            clock.wait(p.first + Duration::from_millis(960)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(clock.wait(p.first + MAX), None);
    }

    #[test]
    fn the_clock_keeps_the_oldest_change_time() {
        let clock = ChangeClock::new(QUIET, MAX);
        clock.observe();
        let first = pending(&clock).first_at;
        clock.observe();
        assert_eq!(clock.take(), first);
        assert!(clock.lock().is_none());
        // A failed reconcile puts its time back; a newer change does not move it.
        clock.restore(first);
        clock.observe();
        assert_eq!(clock.take(), first);
    }

    #[tokio::test]
    async fn settled_returns_once_quiet() {
        let clock = ChangeClock::new(QUIET, MAX);
        clock.settled().await;
        clock.observe();
        let started = tokio::time::Instant::now();
        clock.settled().await;
        assert!(started.elapsed() >= QUIET, "{:?}", started.elapsed());
        assert!(clock.wait(Instant::now()).is_none());
    }
}
