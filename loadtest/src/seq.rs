//! Per-client check of one room's `seq` stream: loss (gaps), duplicates and reordering,
//! counted from the seq the client's `welcome` carried.

/// How far back (in seqs) a late message can still be told apart from a duplicate.
const WINDOW: u64 = 128;

/// What one received seq turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one expected.
    InOrder,
    /// Ahead of the next expected: this many seqs were skipped (counted as lost for now).
    Gap(u64),
    /// Behind, and never seen before: fills a gap counted earlier (a reorder, one loss less).
    Late,
    /// Behind, and already seen.
    Duplicate,
    /// At or before the welcome seq, or too far behind to tell: the server broke its promise.
    Stale,
}

/// Tracks one client's position in one room.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Seq from the welcome: every message must have a larger one.
    base: u64,
    /// Next seq expected.
    next: u64,
    /// Bit i set: seq `next - 1 - i` was received.
    seen: u128,
}

impl SeqTracker {
    pub fn new(welcome_seq: u64) -> Self {
        SeqTracker {
            base: welcome_seq,
            next: welcome_seq + 1,
            // Everything at or below the welcome seq counts as seen, so it reads as a duplicate
            // or stale, never as a gap filler.
            seen: u128::MAX,
        }
    }

    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq <= self.base {
            return Seen::Stale;
        }
        if seq == self.next {
            self.seen = (self.seen << 1) | 1;
            self.next += 1;
            return Seen::InOrder;
        }
        if seq > self.next {
            let skipped = seq - self.next;
            let shift = skipped + 1;
            self.seen = if shift >= 128 {
                1
            } else {
                (self.seen << shift) | 1
            };
            self.next = seq + 1;
            return Seen::Gap(skipped);
        }
        let back = self.next - 1 - seq;
        if back >= WINDOW {
            return Seen::Stale;
        }
        let bit = 1u128 << back;
        if self.seen & bit != 0 {
            Seen::Duplicate
        } else {
            self.seen |= bit;
            Seen::Late
        }
    }

    /// Highest seq received (the welcome seq when none was).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    pub fn welcome(&self) -> u64 {
        self.base
    }

    /// Messages never received at the end of the stream, given the room's final seq.
    pub fn tail_loss(&self, final_seq: u64) -> u64 {
        final_seq.saturating_sub(self.last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream() {
        let mut t = SeqTracker::new(10);
        for s in 11..=20 {
            assert_eq!(t.observe(s), Seen::InOrder);
        }
        assert_eq!(t.last(), 20);
        assert_eq!(t.tail_loss(20), 0);
        assert_eq!(t.tail_loss(23), 3);
    }

    #[test]
    fn gap_then_late_fill_then_duplicate() {
        let mut t = SeqTracker::new(0);
        assert_eq!(t.observe(1), Seen::InOrder);
        assert_eq!(t.observe(4), Seen::Gap(2));
        assert_eq!(t.observe(3), Seen::Late);
        assert_eq!(t.observe(3), Seen::Duplicate);
        assert_eq!(t.observe(4), Seen::Duplicate);
        assert_eq!(t.observe(2), Seen::Late);
        assert_eq!(t.observe(5), Seen::InOrder);
    }

    #[test]
    fn at_or_before_welcome_is_stale() {
        let mut t = SeqTracker::new(5);
        assert_eq!(t.observe(5), Seen::Stale);
        assert_eq!(t.observe(1), Seen::Stale);
        assert_eq!(t.observe(6), Seen::InOrder);
    }

    #[test]
    fn huge_gap_resets_the_window() {
        let mut t = SeqTracker::new(0);
        assert_eq!(t.observe(1000), Seen::Gap(999));
        assert_eq!(t.observe(999), Seen::Late);
        assert_eq!(t.observe(10), Seen::Stale);
        assert_eq!(t.observe(1000), Seen::Duplicate);
    }
}
