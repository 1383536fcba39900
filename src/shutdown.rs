//! Shutdown signalling: one `watch` flag the accept loop raises, and a receiver per task.
//!
//! hyper stops tracking a connection once it is upgraded, so WebSocket tasks listen here
//! themselves and send their own close 1001.

use tokio::sync::watch;

/// Raises the shutdown flag for every `Shutdown` made from it.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of the shutdown flag.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once shutdown has been triggered (or the trigger is gone).
    /// Cancel-safe: dropping it before completion loses nothing.
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|down| *down).await;
    }
}
