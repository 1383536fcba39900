//! Write coalescing for busy rooms (`--write-coalesce`).
//!
//! A room whose publishers are steady sends each message on its own: every member's task wakes
//! for it and writes one frame, one segment per member per message. A room that publishes
//! faster than one message per window instead holds its messages for at most the window (or
//! until `--write-coalesce-frames` are held) and sends them together: each member wakes once
//! and writes them all in one vectored write. A message that comes a whole window after the
//! previous one is sent at once, so a quiet room pays nothing, not even a timer.
//!
//! The held messages of every room are released by one thread, not a task: a tokio timer
//! rounds up to the next millisecond, which would double a 1 ms window, while a condition
//! variable's timed wait wakes within tens of microseconds. The thread sleeps while no room
//! holds anything.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A room that holds messages for the coalescer to release.
pub trait Held: Send + Sync {
    /// Sends the messages held since a batch that started at least one window before `now`,
    /// if they are still held (a join or a full batch may have sent them already).
    fn release_due(&self, now: Instant);
}

/// The coalescer's handle, owned by the hub. Dropping it stops the thread.
pub struct Coalescer {
    shared: Arc<Shared>,
}

/// What rooms hold to schedule their batches.
pub struct Shared {
    window: Duration,
    max_frames: usize,
    state: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Batches by the time they are due: every batch waits the same window, so the order they
    /// started in is (within the clock reads of concurrent publishers) the order they are due.
    due: VecDeque<(Instant, Weak<dyn Held>)>,
    stopped: bool,
}

impl Coalescer {
    /// Starts the releasing thread. `window` is the longest a message is held; `max_frames` the
    /// most one batch holds before it is sent early.
    pub fn start(window: Duration, max_frames: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            window,
            max_frames: max_frames.max(1),
            state: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("roomcast-coalesce".into())
            .spawn(move || thread.run())?;
        Ok(Coalescer { shared })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Coalescer {
    fn drop(&mut self) {
        self.shared.state.lock().stopped = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Whether a message at `now` after the room's previous one at `previous` is part of a
    /// busy stretch (and so held).
    pub fn busy(&self, previous: Option<Instant>, now: Instant) -> bool {
        previous.is_some_and(|p| now.saturating_duration_since(p) < self.window)
    }

    /// Asks for `room`'s batch that started at `started` to be released one window later.
    pub fn schedule(&self, started: Instant, room: Weak<dyn Held>) {
        let mut q = self.state.lock();
        let was_empty = q.due.is_empty();
        q.due.push_back((started + self.window, room));
        drop(q);
        // Only an empty queue can have the thread waiting without a deadline, or with one
        // later than this batch's (every later batch is due later).
        if was_empty {
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        let mut q = self.state.lock();
        loop {
            if q.stopped {
                return;
            }
            let Some(&(due, _)) = q.due.front() else {
                self.wake.wait(&mut q);
                continue;
            };
            let now = Instant::now();
            if due > now {
                self.wake.wait_until(&mut q, due);
                continue;
            }
            let mut ready = Vec::new();
            while let Some((d, _)) = q.due.front() {
                if *d > now {
                    break;
                }
                if let Some((_, room)) = q.due.pop_front() {
                    ready.push(room);
                }
            }
            // Rooms take their own lock to send: never with the queue's held, so that a room
            // scheduling its next batch under its lock cannot wait on this thread.
            parking_lot::MutexGuard::unlocked(&mut q, || {
                for room in ready {
                    if let Some(room) = room.upgrade() {
                        room.release_due(now);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);

    impl Held for Count {
        fn release_due(&self, _: Instant) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_scheduled_batch_is_released_after_the_window_and_a_dropped_room_is_skipped() {
        let c = Coalescer::start(Duration::from_millis(2), 8).expect("thread");
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let room: Arc<dyn Held> = count.clone();
        let gone: Arc<dyn Held> = Arc::new(Count(AtomicUsize::new(0)));
        let started = Instant::now();
        c.shared().schedule(started, Arc::downgrade(&gone));
        drop(gone);
        c.shared().schedule(started, Arc::downgrade(&room));
        let deadline = Instant::now() + Duration::from_secs(10);
        let released = &count.0;
        while released.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "never released");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(started.elapsed() >= Duration::from_millis(2));
    }

    #[test]
    fn busy_means_within_one_window_of_the_previous_message() {
        let c = Coalescer::start(Duration::from_millis(1), 8).expect("thread");
        let s = c.shared();
        let t = Instant::now();
        assert!(!s.busy(None, t));
        assert!(s.busy(Some(t), t + Duration::from_micros(999)));
        assert!(!s.busy(Some(t), t + Duration::from_millis(1)));
    }
}
