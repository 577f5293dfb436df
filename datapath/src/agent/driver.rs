//! The loop every agent reconciler runs: a pass, then wait for a change, the resync period,
//! or — after a failed pass — the configured `backoff` (agent.yaml), the same jittered
//! exponential curve the operator's harness uses.
//!
//! Leading edge, then coalescing: the first change after a quiet time starts a pass at
//! once; what arrives while it runs is handled together by a follow-up that starts as soon
//! as it ends (one change of the cluster often arrives as a few objects a few ms apart, e.g.
//! the `ResolvedPolicy`s of every subject identity); while changes keep arriving during
//! passes, later passes start at least `debounce` apart, and at least as long after the
//! previous pass ended as it took, so a sustained burst is coalesced instead of running
//! passes back to back. (A pass is a full rebuild: at 10k remote endpoints under churn,
//! back-to-back passes kept half of a 2-core machine busy; idling as long as a pass took
//! caps the loop at half a core whatever the cluster size, at one pass of extra latency
//! only while the burst lasts.)

use super::view::Wake;
use std::future::Future;
use std::time::Duration;
use tendril_runtime::Backoff;

/// What a pass achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassOutcome {
    /// The node realizes everything it was asked to.
    Converged,
    /// Nothing to do until something else happens (initial lists incomplete, the pod
    /// CIDRs not assigned yet): wait for a change or the resync, no backoff.
    Waiting,
    /// Something failed: retry with backoff.
    Failed,
}

/// When a loop runs.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopTiming {
    /// At least this often even without a change.
    pub resync: Duration,
    /// Within a sustained burst, passes start at least this far apart. The first change
    /// after a quiet time is handled at once, and what arrived during that pass by a
    /// follow-up right after it.
    pub debounce: Duration,
    /// Retry curve after failed passes.
    pub backoff: Backoff,
}

impl LoopTiming {
    /// How long to wait after a pass with this outcome and `failures` consecutive failures
    /// (counting it); never longer than the resync period.
    pub fn wait_after(&self, outcome: PassOutcome, failures: u32) -> Duration {
        match outcome {
            PassOutcome::Converged | PassOutcome::Waiting => self.resync,
            PassOutcome::Failed => self
                .backoff
                .delay(failures, &mut rand::rng())
                .min(self.resync),
        }
    }
}

/// A reconciler of the agent: one pass converges everything it owns.
pub trait NodeLoop: Send {
    fn pass(&mut self) -> impl Future<Output = PassOutcome> + Send;

    /// A converged pass realized changes that arrived `delay` ago.
    fn realized(&mut self, _delay: Duration) {}

    /// A pass is due by then even without a change (a report the last pass deferred).
    fn due(&self) -> Option<tokio::time::Instant> {
        None
    }
}

/// Runs `node`'s passes forever: after a change of `wake` (no sooner than `debounce` after
/// the previous pass started), the resync
/// period, or a failure's backoff. Cancel by dropping the future.
pub async fn drive(wake: &Wake, timing: &LoopTiming, node: &mut impl NodeLoop) {
    let mut failures: u32 = 0;
    // Whether the next follow-up (a pass for changes that arrived during the previous one)
    // may start without the debounce: once per burst.
    let mut quick_followup = true;
    loop {
        let pass_started = tokio::time::Instant::now();
        // This pass handles every change so far: a wakeup they left pending would only
        // cause an empty pass (a change from now on leaves a new one).
        let _ = futures::FutureExt::now_or_never(wake.notified());
        let started = wake.take_since();
        if let Some(at) = started {
            tracing::debug!(
                waited_ms = at.elapsed().as_secs_f64() * 1e3,
                "pass starts after a change"
            );
        }
        let outcome = node.pass().await;
        let took = pass_started.elapsed();
        // Changes arrived while the pass ran (before a failure re-marks its own as pending).
        let arrived_during = wake.pending();
        match outcome {
            PassOutcome::Converged => {
                failures = 0;
                if let Some(at) = started {
                    node.realized(at.elapsed());
                }
            }
            PassOutcome::Waiting => wake.keep_since(started),
            PassOutcome::Failed => {
                failures = failures.saturating_add(1);
                wake.keep_since(started);
            }
        }
        let mut wait = timing.wait_after(outcome, failures);
        if let Some(due) = node.due() {
            wait = wait.min(due.saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // The first follow-up of a burst starts at once; later ones no sooner than the
        // debounce after the previous pass started, nor before an idle time as long as it
        // took (after a quiet time both are long past).
        let followup = arrived_during && outcome == PassOutcome::Converged;
        if followup && quick_followup {
            quick_followup = false;
        } else {
            quick_followup = !followup;
            tokio::time::sleep_until(pass_started + timing.debounce.max(took * 2)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    /// Records when each pass starts and returns a fixed outcome.
    struct Scripted {
        outcome: PassOutcome,
        t0: Instant,
        starts: Arc<Mutex<Vec<Duration>>>,
        delays: Arc<Mutex<Vec<Duration>>>,
        /// A change arrives during each of the next this many passes (on this wake).
        changes_during: Option<(Wake, usize)>,
        /// How long each pass takes.
        takes: Duration,
    }

    impl Scripted {
        fn new(outcome: PassOutcome) -> Self {
            Self {
                outcome,
                t0: Instant::now(),
                starts: Arc::default(),
                delays: Arc::default(),
                changes_during: None,
                takes: Duration::from_millis(2),
            }
        }
    }

    impl NodeLoop for Scripted {
        async fn pass(&mut self) -> PassOutcome {
            self.starts.lock().unwrap().push(self.t0.elapsed());
            if let Some((wake, left)) = &mut self.changes_during
                && *left > 0
            {
                *left -= 1;
                tokio::time::sleep(self.takes).await;
                wake.touch();
            }
            self.outcome
        }

        fn realized(&mut self, delay: Duration) {
            self.delays.lock().unwrap().push(delay);
        }
    }

    /// The instants at which the first `n` passes of an always-failing loop start.
    async fn failing_pass_starts(backoff: Backoff, n: usize) -> Vec<Duration> {
        let timing = LoopTiming {
            resync: Duration::from_secs(3600),
            debounce: Duration::ZERO,
            backoff,
        };
        let mut node = Scripted::new(PassOutcome::Failed);
        let starts = node.starts.clone();
        let wake = Wake::default();
        let run = drive(&wake, &timing, &mut node);
        tokio::select! {
            _ = run => unreachable!(),
            _ = async {
                while starts.lock().unwrap().len() < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            } => {}
        }
        starts.lock().unwrap().clone()
    }

    /// No resync within a test, the default backoff, `debounce_ms` between passes.
    fn without_resync(debounce_ms: u64) -> LoopTiming {
        LoopTiming {
            resync: Duration::from_secs(3600),
            debounce: Duration::from_millis(debounce_ms),
            backoff: Backoff::default(),
        }
    }

    fn gaps(starts: &[Duration]) -> Vec<u64> {
        starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_configured_backoff_sets_the_retry_schedule() {
        let fast = Backoff {
            base_millis: 100,
            max_millis: 800,
            jitter: 0.0,
        };
        let slow = Backoff {
            base_millis: 1000,
            max_millis: 3000,
            jitter: 0.0,
        };
        // base · 2^(n-1), capped at max (paused time: exact up to the 1 ms poll).
        let fast_gaps = gaps(&failing_pass_starts(fast, 6).await);
        assert_eq!(
            fast_gaps.iter().map(|g| g / 10 * 10).collect::<Vec<_>>(),
            [100, 200, 400, 800, 800],
            "{fast_gaps:?}"
        );
        let slow_gaps = gaps(&failing_pass_starts(slow, 5).await);
        assert_eq!(
            slow_gaps.iter().map(|g| g / 10 * 10).collect::<Vec<_>>(),
            [1000, 2000, 3000, 3000],
            "{slow_gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_wakes_the_loop_and_a_success_reports_its_delay() {
        let timing = without_resync(50);
        let wake = Wake::default();
        let mut node = Scripted::new(PassOutcome::Converged);
        let (starts, delays) = (node.starts.clone(), node.delays.clone());
        let run = drive(&wake, &timing, &mut node);
        let check = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(starts.lock().unwrap().len(), 1, "one pass, then it waits");
            wake.touch();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(starts.lock().unwrap().len(), 2, "a change wakes it");
            // Leading edge: after a quiet second the change is handled at once…
            let first = delays.lock().unwrap().clone();
            assert_eq!(first.len(), 1);
            assert!(first[0] < Duration::from_millis(5), "{first:?}");
            // …and a burst right after a pass is coalesced into one pass, no sooner than
            // the debounce after the previous one started.
            wake.touch();
            tokio::time::sleep(Duration::from_millis(1)).await;
            wake.touch();
            tokio::time::sleep(Duration::from_millis(1)).await;
            wake.touch();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let all = starts.lock().unwrap().clone();
            assert_eq!(all.len(), 4, "{all:?}");
        };
        tokio::select! {
            _ = run => unreachable!(),
            _ = check => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_arrives_during_a_pass_is_handled_right_after_it_once_per_burst() {
        let timing = without_resync(50);
        let wake = Wake::default();
        let mut node = Scripted::new(PassOutcome::Converged);
        // Changes arrive during the first three passes (each takes 2 ms).
        node.changes_during = Some((wake.clone(), 3));
        let starts = node.starts.clone();
        let run = drive(&wake, &timing, &mut node);
        tokio::select! {
            _ = run => unreachable!(),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let all = starts.lock().unwrap().clone();
        // The first follow-up right after the pass; the burst goes on, so the next ones
        // are spaced by the debounce; the last change is handled, then the loop rests.
        assert_eq!(gaps(&all), [2, 50, 50], "{all:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_sustained_burst_the_loop_idles_as_long_as_a_pass_takes() {
        let timing = without_resync(10);
        let wake = Wake::default();
        let mut node = Scripted::new(PassOutcome::Converged);
        node.takes = Duration::from_millis(80);
        node.changes_during = Some((wake.clone(), 4));
        let starts = node.starts.clone();
        let run = drive(&wake, &timing, &mut node);
        tokio::select! {
            _ = run => unreachable!(),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let all = starts.lock().unwrap().clone();
        // The follow-up right after the first pass; then each pass of 80 ms is followed by
        // 80 ms of rest (the 10 ms debounce is long past).
        assert_eq!(gaps(&all), [80, 160, 160, 160], "{all:?}");
    }

    /// Converges; the first pass leaves a report due 300 ms later.
    struct DeferredReport {
        t0: Instant,
        starts: Arc<Mutex<Vec<Duration>>>,
        due: Option<Instant>,
    }

    impl NodeLoop for DeferredReport {
        async fn pass(&mut self) -> PassOutcome {
            let mut starts = self.starts.lock().unwrap();
            starts.push(self.t0.elapsed());
            self.due = (starts.len() == 1).then(|| self.t0 + Duration::from_millis(300));
            PassOutcome::Converged
        }

        fn due(&self) -> Option<Instant> {
            self.due
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_report_gets_a_pass_when_due_without_a_change() {
        let timing = without_resync(10);
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut node = DeferredReport {
            t0: Instant::now(),
            starts: starts.clone(),
            due: None,
        };
        let wake = Wake::default();
        tokio::select! {
            _ = drive(&wake, &timing, &mut node) => unreachable!(),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let starts: Vec<u128> = starts
            .lock()
            .unwrap()
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(
            starts,
            [0, 300],
            "one pass at the due time, then quiet until the resync"
        );
    }
}
