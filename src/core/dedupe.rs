//! Idempotent publishing: a message may carry an `id`; a repeat of that id in the same room
//! within `--dedupe-window` is acknowledged with the first copy's seq and not broadcast again, so
//! a client can safely retry a send whose acknowledgement it never saw. One `Dedupe` per room,
//! inside the room's state mutex (publishing already holds it). Memory is bounded per room by
//! `--dedupe-max` ids; past it the oldest id is forgotten early.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

pub struct Dedupe {
    window_ms: u64,
    max: usize,
    /// Ids in the order they were first seen, with when (Unix ms): expiry pops from the front.
    order: VecDeque<(u64, Arc<str>)>,
    /// Id → the seq its first copy got.
    seen: HashMap<Arc<str>, u64>,
}

impl Dedupe {
    /// Allocates nothing until the first id arrives; `window` zero or `max` zero turns it off.
    pub fn new(window: Duration, max: usize) -> Self {
        Dedupe {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max,
            order: VecDeque::new(),
            seen: HashMap::new(),
        }
    }

    fn enabled(&self) -> bool {
        self.window_ms > 0 && self.max > 0
    }

    /// Forgets ids older than the window.
    fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) < self.window_ms {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }

    /// The seq of an earlier copy of `id` still inside the window, if any.
    pub fn check(&mut self, id: &str, now_ms: u64) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        self.expire(now_ms);
        self.seen.get(id).copied()
    }

    /// Remembers that `id` was published as `seq`.
    pub fn record(&mut self, id: &str, seq: u64, now_ms: u64) {
        if !self.enabled() {
            return;
        }
        while self.order.len() >= self.max {
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        let id: Arc<str> = id.into();
        self.seen.insert(id.clone(), seq);
        self.order.push_back((now_ms, id));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_inside_the_window_are_found() {
        let mut d = Dedupe::new(Duration::from_secs(10), 100);
        assert_eq!(d.check("a", 1_000), None);
        d.record("a", 7, 1_000);
        assert_eq!(d.check("a", 5_000), Some(7));
        assert_eq!(d.check("b", 5_000), None);
        assert_eq!(d.check("a", 11_000), None, "expired after the window");
        assert!(d.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut d = Dedupe::new(Duration::from_secs(60), 3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            d.record(id, i as u64 + 1, 0);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.check("a", 0), None, "the oldest was forgotten");
        assert_eq!(d.check("d", 0), Some(4));
    }

    #[test]
    fn off_when_the_window_is_zero() {
        let mut d = Dedupe::new(Duration::ZERO, 100);
        d.record("a", 1, 0);
        assert_eq!(d.check("a", 0), None);
        assert!(d.is_empty());
    }
}
