//! Shutdown signalling: one flag the accept loop raises, and a receiver per task.
//!
//! hyper stops tracking a connection once it is upgraded, so WebSocket tasks listen here
//! themselves and send their own close 1001.
//!
//! Why a flag and a `Notify` rather than a `watch` channel: every idle connection waits here for
//! its whole life, and `Notify`'s wait is half the size of `watch::Receiver::wait_for`'s
//! (about 80 bytes against 160, measured with `-Zprint-type-sizes`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The state a trigger and its receivers share.
#[derive(Debug, Default)]
struct Flag {
    down: AtomicBool,
    notify: Notify,
}

/// Raises the shutdown flag for every `Shutdown` made from it. Dropping it raises the flag too,
/// so a receiver never waits for a trigger that is gone.
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
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.trigger();
    }
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
    }
}
