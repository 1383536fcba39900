//! `Gated`: a future polled once, then only after a shared flag is raised; for the stop signal
//! a client's receive loop races against its socket in a `select!`.
//!
//! `select!` polls every branch each time the task wakes, and a client task wakes once per
//! delivery. The stop signal (a `watch` channel) is almost never ready, yet re-polling it takes
//! the channel's waiter lock, shared by every client: a lock per delivery for nothing. Its first
//! poll registers the task's waker with the channel, and that registration stays; so after it,
//! `Gated` polls the inner future only once the worker has raised the flag (before it sends
//! the stop), and otherwise answers `Pending` after one load of a cache line every client
//! shares (hot, unlike anything per client).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// Wraps `inner`; see the module doc. `inner` must wake the task when it becomes ready only
/// through something that happens after `flag` is raised (a `watch` send does).
pub struct Gated<'a, F> {
    inner: Pin<Box<F>>,
    flag: &'a AtomicBool,
    /// Polled once: its waker is registered.
    armed: bool,
}

impl<'a, F: Future> Gated<'a, F> {
    pub fn new(inner: F, flag: &'a AtomicBool) -> Self {
        Gated {
            inner: Box::pin(inner),
            flag,
            armed: false,
        }
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    /// Cancel-safe when `inner` is: dropping a `Gated` drops `inner`.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.armed && !self.flag.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.armed = true;
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// Pending until `ready` is set; counts its polls.
    struct Probe<'a> {
        polls: &'a AtomicUsize,
        ready: &'a AtomicBool,
    }

    impl Future for Probe<'_> {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready("stopped")
            } else {
                Poll::Pending
            }
        }
    }

    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    #[test]
    fn polls_inner_once_then_only_when_flagged() {
        let polls = AtomicUsize::new(0);
        let ready = AtomicBool::new(false);
        let flag = AtomicBool::new(false);
        let mut g = Gated::new(
            Probe {
                polls: &polls,
                ready: &ready,
            },
            &flag,
        );
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut g).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the first poll reaches inner"
        );
        for _ in 0..100 {
            assert!(Pin::new(&mut g).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "no flag: inner left alone");
        ready.store(true, Ordering::SeqCst);
        assert!(
            Pin::new(&mut g).poll(&mut cx).is_pending(),
            "ready but not flagged"
        );
        flag.store(true, Ordering::SeqCst);
        assert_eq!(Pin::new(&mut g).poll(&mut cx), Poll::Ready("stopped"));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_gated_watch_still_wakes_its_task() {
        let flag = AtomicBool::new(false);
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let stop = Gated::new(
            async move {
                let _ = rx.wait_for(|v| *v).await;
                "watch"
            },
            &flag,
        );
        let stopper = async {
            for _ in 0..5 {
                tokio::task::yield_now().await;
            }
            flag.store(true, Ordering::Release);
            tx.send_replace(true);
            std::future::pending::<()>().await;
        };
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::select! {
                why = stop => why,
                _ = stopper => unreachable!(),
            }
        })
        .await;
        assert_eq!(done, Ok("watch"));
    }
}
