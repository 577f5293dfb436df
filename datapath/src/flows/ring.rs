//! The node's bounded ring of flows. Writers never wait for readers: the oldest entry is
//! overwritten. Every entry has a sequence number, so a reader that follows keeps a cursor
//! and, when the ring overtook it, learns exactly how many entries it missed.

use super::proto::flow::{self, LostEvent, LostEventSource};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One entry: a flow, or a count of events lost before they reached the ring.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Flow(Arc<flow::Flow>),
    Lost(LostEvent),
}

impl Entry {
    /// Nanoseconds since the epoch (ordering, since/until): the flow's time, or the last
    /// loss's.
    pub fn time_nanos(&self) -> i128 {
        let ts = match self {
            Entry::Flow(f) => f.time.as_ref(),
            Entry::Lost(l) => l.last.as_ref(),
        };
        ts.map_or(0, super::timestamp_nanos)
    }
}

#[derive(Debug)]
struct Inner {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    /// Flows ever written (not lost-counts).
    seen_flows: u64,
}

/// A bounded ring of entries shared by the writer (the enricher) and the readers (the
/// Observer API's requests).
#[derive(Clone, Debug)]
pub struct FlowRing {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
    /// The next sequence number (entries written so far): followers wait on it.
    written: watch::Sender<u64>,
}

/// What a reader got from [`FlowRing::read_from`]: entries from its cursor on, and how
/// many it missed because the ring overwrote them.
#[derive(Debug, Default)]
pub struct Read {
    pub entries: Vec<Entry>,
    pub missed: u64,
    /// The cursor after these entries.
    pub next: u64,
}

impl FlowRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: VecDeque::with_capacity(capacity.min(65_536)),
                first_seq: 0,
                seen_flows: 0,
            })),
            capacity: capacity.max(1),
            written: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `entry`, overwriting the oldest when full. Never waits on readers.
    pub fn push(&self, entry: Entry) {
        let next = {
            let mut inner = self.lock();
            if inner.entries.len() >= self.capacity {
                inner.entries.pop_front();
                inner.first_seq += 1;
            }
            if matches!(entry, Entry::Flow(_)) {
                inner.seen_flows += 1;
            }
            inner.entries.push_back(entry);
            inner.first_seq + inner.entries.len() as u64
        };
        self.written.send_replace(next);
    }

    /// Records `count` events lost before the ring (a full queue) as one entry.
    pub fn push_lost(
        &self,
        source: LostEventSource,
        count: u64,
        first: prost_types::Timestamp,
        last: prost_types::Timestamp,
    ) {
        self.push(Entry::Lost(LostEvent {
            source: source as i32,
            num_events_lost: count,
            cpu: None,
            first: Some(first),
            last: Some(last),
        }));
    }

    /// (flows in the ring, flows ever written).
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        let flows = inner
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Flow(_)))
            .count();
        (flows as u64, inner.seen_flows)
    }

    /// Every entry now in the ring, oldest first, and the cursor after them.
    pub fn snapshot(&self) -> (Vec<Entry>, u64) {
        let inner = self.lock();
        let next = inner.first_seq + inner.entries.len() as u64;
        (inner.entries.iter().cloned().collect(), next)
    }

    /// Entries from sequence number `cursor` on (at most `max`).
    pub fn read_from(&self, cursor: u64, max: usize) -> Read {
        let inner = self.lock();
        let end = inner.first_seq + inner.entries.len() as u64;
        let start = cursor.max(inner.first_seq);
        let missed = start - cursor.min(start);
        let skip = (start - inner.first_seq) as usize;
        let entries: Vec<Entry> = inner.entries.iter().skip(skip).take(max).cloned().collect();
        let next = start + entries.len() as u64;
        debug_assert!(next <= end);
        Read {
            entries,
            missed,
            next,
        }
    }

    /// A receiver that changes whenever something is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: i64) -> Entry {
        Entry::Flow(Arc::new(flow::Flow {
            time: Some(prost_types::Timestamp {
                seconds: n,
                nanos: 0,
            }),
            ..flow::Flow::default()
        }))
    }

    #[test]
    fn the_ring_keeps_the_newest_and_readers_learn_what_they_missed() {
        let ring = FlowRing::new(3);
        for n in 0..5 {
            ring.push(flow(n));
        }
        let (entries, next) = ring.snapshot();
        let times: Vec<i128> = entries
            .iter()
            .map(|e| e.time_nanos() / 1_000_000_000)
            .collect();
        assert_eq!(times, vec![2, 3, 4]);
        assert_eq!(next, 5);
        assert_eq!(ring.counts(), (3, 5));
        // A reader at cursor 0 missed the two overwritten entries.
        let read = ring.read_from(0, 10);
        assert_eq!((read.missed, read.entries.len(), read.next), (2, 3, 5));
        // A reader that is up to date gets nothing, misses nothing.
        let read = ring.read_from(5, 10);
        assert_eq!((read.missed, read.entries.len(), read.next), (0, 0, 5));
        // Bounded reads continue where they stopped.
        let read = ring.read_from(3, 1);
        assert_eq!((read.missed, read.entries.len(), read.next), (0, 1, 4));
        ring.push_lost(
            LostEventSource::ObserverEventsQueue,
            7,
            prost_types::Timestamp::default(),
            prost_types::Timestamp::default(),
        );
        assert_eq!(ring.counts(), (2, 5), "a loss record is not a flow");
    }

    #[tokio::test]
    async fn followers_are_woken_by_writes() {
        let ring = FlowRing::new(4);
        let mut rx = ring.subscribe();
        ring.push(flow(1));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 1);
    }
}
