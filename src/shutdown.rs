//! Shutdown signalling: one flag the accept loop raises, a receiver per task, and the turns that
//! release WebSocket connections a few at a time.
//!
//! hyper stops tracking a connection once it is upgraded, so WebSocket tasks listen here
//! themselves and send their own close. They do not all go when the flag is raised: each waits
//! for its turn ([`Shutdown::poll_wait`], and [`Shutdown::turn`] for event streams), which the
//! shutdown sequence hands out at `--drain-rate`, so that thousands of clients do not reconnect
//! in the same second.
//!
//! Every idle WebSocket waits here for its whole life, for its turn and for its own deadlines in
//! one wait ([`Shutdown::poll_wait`]): the connections' timing wheel (`wheel`) is also the list
//! of WebSockets the drain hands turns to, so a waiting connection holds no `Notify` wait
//! (80 bytes, `-Zprint-type-sizes`) and no `Sleep` (112) in its task, only an [`Alarm`] (16).
//! Event streams, which live in hyper's task and are few, wait on a `Notify` for theirs: the
//! turns the WebSockets do not take go to them.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

use crate::wheel::{Alarm, Wheel};

/// The state a trigger and its receivers share.
#[derive(Debug, Default)]
struct Flag {
    down: AtomicBool,
    notify: Notify,
    /// Whether every connection's turn has come: `WAITING`, `ALL` or `LATE`.
    released: AtomicU8,
    /// The WebSockets' deadlines, and the list of those waiting for their turn.
    wheel: Wheel,
    /// One `notify_one` per event stream released. A woken waiter dropped before it completes
    /// passes its turn on (tokio's `Notified` does), so a turn is never lost to a `select!`.
    turns: Notify,
    /// The window, in ms, that each connection's `retry_after_ms` is drawn from.
    window_ms: AtomicU64,
    /// Seeds the draw, so that two processes spread the same ids differently.
    seed: RandomState,
}

const WAITING: u8 = 0;
const ALL: u8 = 1;
const LATE: u8 = 2;

/// Raises the shutdown flag for every `Shutdown` made from it, and hands out the connections'
/// turns. Dropping it raises the flag and releases everyone, so a receiver never waits for a
/// trigger that is gone.
#[derive(Debug)]
pub struct ShutdownTrigger(Arc<Flag>);

/// A task's view of the shutdown flag.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<Flag>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let flag = Arc::new(Flag::default());
    (ShutdownTrigger(flag.clone()), Shutdown(flag))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.down.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Sets the window the connections' reconnect delays are drawn from. Call before releasing
    /// anyone.
    pub fn set_window(&self, window: Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        self.0.window_ms.store(ms, Ordering::SeqCst);
    }

    /// Gives `n` waiting connections their turn: WebSockets first, the turns left to event
    /// streams. With fewer waiting, one turn is kept for the next event stream to wait and the
    /// rest lapse: the next batch comes soon anyway.
    pub fn release(&self, n: u32) {
        self.0.release(n);
    }

    /// Every connection's turn has come, now and for any that waits later (`Turn::All`).
    pub fn release_all(&self) {
        self.release_everyone(ALL);
    }

    /// The drain's deadline passed: every connection still waiting goes now (`Turn::Late`).
    pub fn release_late(&self) {
        self.release_everyone(LATE);
    }

    fn release_everyone(&self, how: u8) {
        // The first word stays: `Drop` must not turn a drain that ended on time into a late one.
        let _ = self
            .0
            .released
            .compare_exchange(WAITING, how, Ordering::SeqCst, Ordering::SeqCst);
        self.0.turns.notify_waiters();
        self.0.wheel.wake_all();
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.trigger();
        self.release_all();
    }
}

/// What ended a WebSocket's wait ([`Shutdown::poll_wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Its turn to close has come.
    Turn(Turn),
    /// The moment its alarm was set to has come.
    Due,
}

/// How a connection's turn came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Released by the drain, at its rate.
    Paced,
    /// Released with everyone else: the drain is off.
    All,
    /// Released with everyone still waiting when the drain's deadline passed.
    Late,
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        self.0.down.load(Ordering::SeqCst)
    }

    /// Completes once shutdown has been triggered (or the trigger is gone).
    /// Cancel-safe: dropping it before completion loses nothing.
    pub async fn recv(&mut self) {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a trigger between the two still wakes us
        // (`notify_waiters` only wakes waiters already registered).
        notified.as_mut().enable();
        if self.is_shutdown() {
            return;
        }
        notified.await;
    }

    /// Completes when this event stream's turn to close has come (WebSockets wait in
    /// [`Shutdown::poll_wait`]).
    /// Cancel-safe: a turn handed to a wait that is dropped goes to the next waiter.
    pub fn turn(&self) -> TurnWait<'_> {
        TurnWait {
            flag: &self.0,
            notified: self.0.turns.notified(),
            enabled: false,
        }
    }

    /// Polled by WebSocket `id`'s wait: its turn to close (first), or the moment `alarm` is set
    /// to ([`Shutdown::set_alarm`]). Pending, the task is woken by whichever comes first.
    /// Cancel-safe: the alarm stays in the wheel, and a turn stays given until taken.
    pub fn poll_wait(&self, id: u64, alarm: &mut Alarm, cx: &mut Context<'_>) -> Poll<Wake> {
        let flag = &self.0;
        if let Some(turn) = flag.everyone() {
            return Poll::Ready(Wake::Turn(turn));
        }
        if flag.wheel.take_turn(id) {
            return Poll::Ready(Wake::Turn(Turn::Paced));
        }
        match flag.wheel.poll(id, alarm, cx) {
            Poll::Ready(()) => Poll::Ready(Wake::Due),
            // In the wheel before the flag is read again: a release between the two still
            // wakes us (`wake_all`).
            Poll::Pending => match flag.everyone() {
                Some(turn) => Poll::Ready(Wake::Turn(turn)),
                None => Poll::Pending,
            },
        }
    }

    /// Sets the moment `alarm` wakes its connection's wait at (within 10 ms after it).
    pub fn set_alarm(&self, alarm: &mut Alarm, at: tokio::time::Instant) {
        self.0.wheel.set(alarm, at);
    }

    /// Takes WebSocket `id` out of the wheel as it goes; a turn it was given and did not take
    /// goes to the next waiting connection.
    pub fn forget(&self, id: u64, alarm: &mut Alarm) {
        if self.0.wheel.forget(id, alarm) {
            self.0.release(1);
        }
    }

    /// Runs the wheel that wakes the WebSockets at their deadlines, until `stop` completes.
    pub async fn run_alarms(&self, stop: impl Future<Output = ()>) {
        self.0.wheel.run(stop).await;
    }

    /// How long connection `id` is asked to wait before it reconnects: drawn evenly from the
    /// window the shutdown sequence set, the same for the same id within one process.
    pub fn retry_after_ms(&self, id: u64) -> u64 {
        let window = self.0.window_ms.load(Ordering::SeqCst).max(1);
        self.0.seed.hash_one(id) % window
    }
}

impl Flag {
    fn release(&self, n: u32) {
        let given = self.wheel.give_turns(n);
        for _ in given..n {
            self.turns.notify_one();
        }
    }

    fn everyone(&self) -> Option<Turn> {
        match self.released.load(Ordering::SeqCst) {
            ALL => Some(Turn::All),
            LATE => Some(Turn::Late),
            _ => None,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Shutdown::turn`]'s wait, written out rather than an `async fn`: it sits in every idle
    /// event stream, and the `async fn` kept three references beside the `Notified`
    /// (104 bytes against 80, `-Zprint-type-sizes`).
    pub struct TurnWait<'a> {
        flag: &'a Flag,
        #[pin]
        notified: tokio::sync::futures::Notified<'a>,
        enabled: bool,
    }
}

impl Future for TurnWait<'_> {
    type Output = Turn;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Turn> {
        let mut this = self.project();
        // In the queue before the flag is read: a release between the two still wakes us.
        if !*this.enabled {
            this.notified.as_mut().enable();
            *this.enabled = true;
        }
        if let Some(turn) = this.flag.everyone() {
            return Poll::Ready(turn);
        }
        match this.notified.poll(cx) {
            Poll::Ready(()) => Poll::Ready(this.flag.everyone().unwrap_or(Turn::Paced)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_waiters_and_later_receivers() {
        let (trigger, shutdown) = channel();
        let mut waiting = shutdown.clone();
        let waiter = tokio::spawn(async move { waiting.recv().await });
        tokio::task::yield_now().await;
        assert!(!shutdown.is_shutdown());
        trigger.trigger();
        waiter.await.unwrap();
        // A receiver that starts waiting after the trigger returns at once.
        let mut late = shutdown.clone();
        late.recv().await;
        assert!(late.is_shutdown());
    }

    #[tokio::test]
    async fn a_dropped_trigger_counts_as_triggered() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        shutdown.recv().await;
        assert!(shutdown.is_shutdown());
        assert_eq!(shutdown.turn().await, Turn::All);
    }

    #[tokio::test]
    async fn turns_go_one_per_release_then_to_everyone() {
        let (trigger, shutdown) = channel();
        trigger.trigger();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..5 {
            let s = shutdown.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let _ = done.send(s.turn().await);
            });
        }
        // Let all five register.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        trigger.release(2);
        assert_eq!(done_rx.recv().await, Some(Turn::Paced));
        assert_eq!(done_rx.recv().await, Some(Turn::Paced));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(done_rx.try_recv().is_err(), "only two turns were given");
        trigger.release_late();
        for _ in 0..3 {
            assert_eq!(done_rx.recv().await, Some(Turn::Late));
        }
        drop(trigger);
        assert_eq!(
            shutdown.turn().await,
            Turn::Late,
            "dropping keeps the first word"
        );
    }

    #[test]
    fn retry_after_stays_in_the_window_and_spreads() {
        let (trigger, shutdown) = channel();
        trigger.set_window(Duration::from_millis(1000));
        let draws: Vec<u64> = (1..=1000).map(|id| shutdown.retry_after_ms(id)).collect();
        assert!(draws.iter().all(|&ms| ms < 1000));
        // Evenly spread: each quarter of the window holds about a quarter of the draws.
        for q in 0..4 {
            let n = draws.iter().filter(|&&ms| ms / 250 == q).count();
            assert!((150..350).contains(&n), "quarter {q}: {n}");
        }
        assert_eq!(shutdown.retry_after_ms(7), shutdown.retry_after_ms(7));
    }
}
