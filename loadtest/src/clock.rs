//! Sleeps finer than tokio's timer, for publishers' send times. tokio's timer wheel ticks in
//! whole milliseconds, so a publisher at 1,500 msg/s (a message every 667 µs) woken by it sends
//! one message, then two back to back, and the server reads those two at once: the steady pacing
//! it was asked for becomes small bursts. Here one thread per process keeps the wake-ups in a
//! heap and sleeps on a condition variable with a timeout (a futex on Linux: tens of
//! microseconds of slack), then wakes the tasks whose time has come.
//!
//! Long sleeps still go to tokio; only their last stretch comes here, so this thread only ever
//! holds the next few milliseconds of wake-ups.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// Waits up to this long before a deadline are left to tokio's timer (they end at least this
/// early, to the millisecond); the rest is this clock's.
const HANDOVER: Duration = Duration::from_millis(2);

/// Resolves at `at`, within tens of microseconds rather than tokio's millisecond. Cancel-safe:
/// dropping it leaves at most one stale wake-up in the heap, which fires and is forgotten.
pub async fn sleep_until(at: Instant) {
    if let Some(early) = at.checked_sub(HANDOVER) {
        if early > Instant::now() {
            tokio::time::sleep_until(early).await;
        }
    }
    Sleep { at, slot: None }.await
}

/// One registered wake-up, shared by the sleeping future and the clock thread.
struct Slot {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// A heap entry: earliest first, ties in registration order.
struct Entry {
    at: std::time::Instant,
    order: u64,
    slot: Arc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Reverse<Entry>>,
    next_order: u64,
}

/// The process's clock: the heap and the thread's condition variable.
struct Clock {
    heap: Mutex<Heap>,
    changed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The clock, its thread started on first use. `None` if the thread cannot be started (then
/// sleeps fall back to tokio's timer).
fn clock() -> Option<&'static Clock> {
    static CLOCK: OnceLock<Option<&'static Clock>> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        let clock: &'static Clock = Box::leak(Box::new(Clock {
            heap: Mutex::new(Heap::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("loadtest-clock".into())
            .spawn(move || clock.run())
            .ok()
            .map(|_| clock)
    })
}

impl Clock {
    fn register(&self, at: std::time::Instant, slot: Arc<Slot>) {
        let mut heap = lock(&self.heap);
        let order = heap.next_order;
        heap.next_order += 1;
        let earliest = heap.entries.peek().is_none_or(|Reverse(e)| at < e.at);
        heap.entries.push(Reverse(Entry { at, order, slot }));
        drop(heap);
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut due = Vec::new();
        let mut heap = lock(&self.heap);
        loop {
            let now = std::time::Instant::now();
            while heap.entries.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = heap.entries.pop() {
                    due.push(e.slot);
                }
            }
            if !due.is_empty() {
                // Wake outside the lock: a woken task may register its next sleep at once.
                drop(heap);
                for slot in due.drain(..) {
                    slot.fired.store(true, Ordering::Release);
                    if let Some(w) = lock(&slot.waker).take() {
                        w.wake();
                    }
                }
                heap = lock(&self.heap);
                continue;
            }
            heap = match heap.entries.peek().map(|Reverse(e)| e.at) {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(heap, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
                None => self.changed.wait(heap).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The last stretch of `sleep_until`.
struct Sleep {
    at: Instant,
    slot: Option<Arc<Slot>>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        let Some(clock) = clock() else {
            // No clock thread: tokio's timer, to the millisecond.
            let mut fallback = Box::pin(tokio::time::sleep_until(self.at));
            return fallback.as_mut().poll(cx);
        };
        match &self.slot {
            Some(slot) => {
                *lock(&slot.waker) = Some(cx.waker().clone());
                // The clock sets `fired` before it takes the waker: either it took the one just
                // stored, or `fired` is visible here.
                if slot.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
            }
            None => {
                let slot = Arc::new(Slot {
                    fired: AtomicBool::new(false),
                    waker: Mutex::new(Some(cx.waker().clone())),
                });
                clock.register(self.at.into_std(), slot.clone());
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Median lateness of 21 wake-ups `period` apart.
    async fn median_lateness(period: Duration) -> Duration {
        let start = Instant::now() + Duration::from_millis(1);
        let mut late = Vec::new();
        for k in 0..21u32 {
            let at = start + period * k;
            sleep_until(at).await;
            let now = Instant::now();
            assert!(now >= at, "woke early");
            late.push(now - at);
        }
        late.sort();
        late[10]
    }

    #[tokio::test]
    async fn wakes_at_sub_millisecond_spacing() {
        // Wake-ups 400 µs apart: tokio's timer alone rounds each up to its next millisecond
        // tick (a median about 500 µs late). A stall of the shared machine makes a whole
        // attempt late, so the best of five counts.
        let period = Duration::from_micros(400);
        let mut medians = Vec::new();
        for _ in 0..5 {
            let m = median_lateness(period).await;
            if m < period / 2 {
                return;
            }
            medians.push(m);
        }
        panic!("median lateness of every attempt: {medians:?}");
    }

    #[tokio::test]
    async fn past_deadlines_and_long_sleeps_resolve() {
        sleep_until(Instant::now() - Duration::from_millis(5)).await;
        let at = Instant::now() + Duration::from_millis(12);
        sleep_until(at).await;
        assert!(Instant::now() >= at);
    }
}
