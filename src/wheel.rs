//! A coarse timing wheel shared by every WebSocket connection: one task wakes the connections
//! whose deadline (next ping, ping timeout, idle and message timeouts, token expiry) has come.
//!
//! Why not a `tokio::time::Sleep` in each connection: the wait of an idle connection is what its
//! task's memory is made of, and a `Sleep` is 112 bytes of it; tokio rounds a task to 128 bytes,
//! so those bytes decide whether an idle connection's task is 512 bytes or 640 (a 768-byte block
//! from mimalloc, which can give a 128-aligned 512-byte block as it is). An entry here is
//! 24 bytes (the connection's id and its task's waker), in a slot's `Vec`, and a connection keeps
//! 16 bytes of its own ([`Alarm`]). The price is resolution: a deadline is met up to one
//! [`TICK`] late, which no deadline here minds.
//!
//! The same entries are the list of waiting connections that the shutdown drain hands its turns
//! to (`shutdown`), so a connection needs no second wait for its turn either.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The wheel's resolution, in milliseconds: a deadline is met within one tick after it.
const TICK_MS: u64 = 10;
const TICK: Duration = Duration::from_millis(TICK_MS);

/// Slots, one tick each: about 41 s ahead. A later deadline waits in the furthest slot and is
/// put back when that one comes (one extra wake per 41 s, only for far deadlines).
const SLOTS: u64 = 4096;

/// One connection's place in the wheel, kept by the connection.
#[derive(Debug, Clone, Copy)]
pub struct Alarm {
    /// The tick the connection wants to be woken at (`NEVER`: it does not).
    due: u64,
    /// The tick of the slot its entry was put in (`NEVER`: none). The entry is gone once the
    /// wheel has fired that tick.
    at: u64,
}

const NEVER: u64 = u64::MAX;

impl Alarm {
    pub const NONE: Alarm = Alarm {
        due: NEVER,
        at: NEVER,
    };
}

/// An entry: whom to wake.
struct Entry {
    id: u64,
    waker: Waker,
}

#[derive(Default)]
struct State {
    /// `SLOTS` slots once the first entry comes (a wheel nobody uses holds nothing); the entry
    /// for tick `t` is in slot `t % SLOTS`.
    slots: Vec<Vec<Entry>>,
    /// The driver sleeps until this tick (`NEVER`: until an entry comes).
    next: u64,
    /// Connections given their turn to close (`give_turns`) that have not taken it yet.
    turned: HashSet<u64>,
}

pub struct Wheel {
    base: Instant,
    state: Mutex<State>,
    /// The last tick fired: an entry for it or before it has been woken and removed. Written
    /// under the lock; read without it to skip the lock when nothing has to change.
    fired: AtomicU64,
    /// Set by the first `give_turns`: only then does a connection look for its turn.
    draining: AtomicBool,
    /// Wakes the driver when an entry comes before the tick it sleeps until.
    driver: Notify,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel {
            base: Instant::now(),
            state: Mutex::new(State {
                next: NEVER,
                ..State::default()
            }),
            fired: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            driver: Notify::new(),
        }
    }
}

impl std::fmt::Debug for Wheel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wheel")
            .field("fired", &self.fired.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Wheel {
    /// The first tick at or after `t`: woken then, a deadline at `t` has passed.
    fn tick_at(&self, t: Instant) -> u64 {
        let nanos = t.saturating_duration_since(self.base).as_nanos();
        let tick = nanos.div_ceil(TICK.as_nanos());
        u64::try_from(tick).unwrap_or(NEVER - 1).min(NEVER - 1)
    }

    /// The last tick that has begun.
    fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        u64::try_from(nanos / TICK.as_nanos()).unwrap_or(NEVER - 1)
    }

    /// Sets the moment `alarm` wants to be woken at; the next `poll` moves its entry if it has
    /// to. A later moment leaves the entry where it is: it wakes the connection early once, and
    /// `poll` then puts it at the new tick.
    pub fn set(&self, alarm: &mut Alarm, at: Instant) {
        alarm.due = self.tick_at(at);
    }

    /// Ready once `alarm`'s moment has come; otherwise makes sure that this task is woken by
    /// then. Takes the lock only when the entry has to be put in or moved.
    pub fn poll(&self, id: u64, alarm: &mut Alarm, cx: &mut Context<'_>) -> Poll<()> {
        // The entry is still in the wheel, at or before the moment: the wheel wakes this task
        // then. (Checked first, without reading the clock: this runs at every wake of every
        // connection, for a room frame as much as for the alarm.)
        if alarm.at != NEVER
            && alarm.at <= alarm.due
            && alarm.at > self.fired.load(Ordering::Acquire)
        {
            return Poll::Pending;
        }
        if self.now() >= alarm.due {
            return Poll::Ready(());
        }
        let mut state = self.state.lock();
        let fired = self.fired.load(Ordering::Acquire);
        if alarm.due <= fired {
            return Poll::Ready(());
        }
        if alarm.at != NEVER && alarm.at > fired {
            remove(&mut state, id, alarm.at);
        }
        // A moment beyond the wheel waits in its furthest slot.
        let at = alarm.due.min(fired + SLOTS);
        if state.slots.is_empty() {
            state.slots.resize_with(SLOTS as usize, Vec::new);
        }
        let slot = &mut state.slots[(at % SLOTS) as usize];
        slot.push(Entry {
            id,
            waker: cx.waker().clone(),
        });
        alarm.at = at;
        if at < state.next {
            state.next = at;
            drop(state);
            self.driver.notify_one();
        }
        Poll::Pending
    }

    /// Takes `alarm`'s entry out (the connection is going). `true` when the connection had
    /// been given its turn and not taken it: the caller passes it on.
    pub fn forget(&self, id: u64, alarm: &mut Alarm) -> bool {
        let waiting = alarm.at != NEVER && alarm.at > self.fired.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        if !waiting && !draining {
            return false;
        }
        let mut state = self.state.lock();
        if alarm.at != NEVER && alarm.at > self.fired.load(Ordering::Acquire) {
            remove(&mut state, id, alarm.at);
        }
        *alarm = Alarm::NONE;
        draining && state.turned.remove(&id)
    }

    /// Whether connection `id` has been given its turn (once: the turn is taken).
    pub fn take_turn(&self, id: u64) -> bool {
        self.draining.load(Ordering::Acquire) && self.state.lock().turned.remove(&id)
    }

    /// Gives up to `n` waiting connections their turn, earliest deadline first, and wakes
    /// them; returns how many there were.
    pub fn give_turns(&self, n: u32) -> u32 {
        let mut woken = Vec::new();
        {
            let mut state = self.state.lock();
            self.draining.store(true, Ordering::Release);
            let fired = self.fired.load(Ordering::Acquire);
            let state = &mut *state;
            if !state.slots.is_empty() {
                for tick in fired + 1..=fired + SLOTS {
                    let slot = &mut state.slots[(tick % SLOTS) as usize];
                    while woken.len() < n as usize {
                        let Some(entry) = slot.pop() else { break };
                        state.turned.insert(entry.id);
                        woken.push(entry.waker);
                    }
                    if woken.len() == n as usize {
                        break;
                    }
                }
            }
        }
        let given = u32::try_from(woken.len()).unwrap_or(n);
        woken.into_iter().for_each(Waker::wake);
        given
    }

    /// Wakes every waiting connection (whatever woke them is for them to find out).
    pub fn wake_all(&self) {
        let slots = std::mem::take(&mut self.state.lock().slots);
        for entry in slots.into_iter().flatten() {
            entry.waker.wake();
        }
    }

    /// Fires the slots as their ticks come, until `stop` completes. Every connection's
    /// deadlines depend on it: run it for as long as connections may wait.
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut woken = Vec::new();
        loop {
            let next = {
                let mut state = self.state.lock();
                let now = self.now();
                let fired = self.fired.load(Ordering::Acquire);
                if !state.slots.is_empty() {
                    // Past a whole turn of the wheel (a stalled runtime), every slot is due.
                    for tick in fired + 1..=now.min(fired + SLOTS) {
                        let slot = &mut state.slots[(tick % SLOTS) as usize];
                        woken.extend(std::mem::take(slot).into_iter().map(|e| e.waker));
                    }
                }
                self.fired.store(now.max(fired), Ordering::Release);
                state.next = next_occupied(&state.slots, now);
                state.next
            };
            // Outside the lock: a woken connection may want it at once.
            woken.drain(..).for_each(Waker::wake);
            let sleep = async {
                match next {
                    NEVER => std::future::pending().await,
                    tick => match self
                        .base
                        .checked_add(Duration::from_millis(tick.saturating_mul(TICK_MS)))
                    {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    },
                }
            };
            tokio::select! {
                () = &mut stop => return,
                () = sleep => {}
                () = self.driver.notified() => {}
            }
        }
    }
}

/// Takes connection `id`'s entry out of the slot of tick `at`.
fn remove(state: &mut State, id: u64, at: u64) {
    if let Some(slot) = state.slots.get_mut((at % SLOTS) as usize) {
        if let Some(i) = slot.iter().position(|e| e.id == id) {
            slot.swap_remove(i);
        }
    }
}

/// The first tick after `now` whose slot holds an entry.
fn next_occupied(slots: &[Vec<Entry>], now: u64) -> u64 {
    if slots.is_empty() {
        return NEVER;
    }
    (now + 1..=now + SLOTS)
        .find(|tick| !slots[(tick % SLOTS) as usize].is_empty())
        .unwrap_or(NEVER)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A wheel with its driver running for the test's length.
    fn running() -> Arc<Wheel> {
        let wheel = Arc::new(Wheel::default());
        let driver = wheel.clone();
        tokio::spawn(async move { driver.run(std::future::pending()).await });
        wheel
    }

    /// Waits until `alarm`'s moment, as a connection does.
    async fn wait(wheel: &Wheel, id: u64, alarm: &mut Alarm) {
        std::future::poll_fn(|cx| wheel.poll(id, alarm, cx)).await;
    }

    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn an_alarm_wakes_its_task_at_its_moment_never_before() {
        let wheel = running();
        let start = Instant::now();
        let mut alarm = Alarm::NONE;
        wheel.set(&mut alarm, start + Duration::from_millis(50));
        tokio::time::timeout(BOUND, wait(&wheel, 1, &mut alarm))
            .await
            .expect("woken");
        assert!(start.elapsed() >= Duration::from_millis(50));
        // Its entry is gone with the tick: nothing is left to hand a turn to.
        assert_eq!(wheel.give_turns(1), 0);
    }

    #[tokio::test]
    async fn an_earlier_moment_moves_the_entry_and_a_later_one_waits_on() {
        let wheel = running();
        let start = Instant::now();
        let mut alarm = Alarm::NONE;
        wheel.set(&mut alarm, start + Duration::from_secs(30));
        let waiting = tokio::time::timeout(Duration::from_millis(30), wait(&wheel, 1, &mut alarm));
        assert!(waiting.await.is_err(), "not due for 30 s");
        wheel.set(&mut alarm, start + Duration::from_millis(60));
        tokio::time::timeout(BOUND, wait(&wheel, 1, &mut alarm))
            .await
            .expect("woken at the earlier moment");
        assert!(start.elapsed() >= Duration::from_millis(60));
        // Later than the slot it sits in: woken there, the wait goes on to the new moment.
        let start = Instant::now();
        wheel.set(&mut alarm, start + Duration::from_millis(40));
        let waiting = tokio::time::timeout(Duration::from_millis(10), wait(&wheel, 1, &mut alarm));
        assert!(waiting.await.is_err());
        wheel.set(&mut alarm, start + Duration::from_millis(120));
        tokio::time::timeout(BOUND, wait(&wheel, 1, &mut alarm))
            .await
            .expect("woken at the later moment");
        assert!(start.elapsed() >= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn a_moment_beyond_the_wheel_waits_in_its_furthest_slot() {
        let wheel = Wheel::default();
        let mut alarm = Alarm::NONE;
        wheel.set(&mut alarm, Instant::now() + Duration::from_secs(3600));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wheel.poll(7, &mut alarm, &mut cx).is_pending());
        assert_eq!(alarm.at, SLOTS, "the furthest slot from tick 0");
        assert!(alarm.due > alarm.at);
    }

    #[tokio::test]
    async fn turns_go_to_the_earliest_deadlines_and_a_forgotten_entry_gets_none() {
        let wheel = Wheel::default();
        let mut cx = Context::from_waker(Waker::noop());
        let now = Instant::now();
        let mut alarms = [Alarm::NONE; 4];
        for (id, alarm) in alarms.iter_mut().enumerate() {
            // Ids 0..4 due in 4, 3, 2, 1 seconds.
            wheel.set(alarm, now + Duration::from_secs(4 - id as u64));
            assert!(wheel.poll(id as u64, alarm, &mut cx).is_pending());
        }
        assert!(!wheel.forget(3, &mut alarms[3]), "no turn given yet");
        assert_eq!(wheel.give_turns(2), 2);
        assert!(wheel.take_turn(2));
        assert!(wheel.take_turn(1));
        assert!(!wheel.take_turn(1), "a turn is taken once");
        assert!(!wheel.take_turn(0));
        assert_eq!(wheel.give_turns(5), 1, "only id 0 is left");
        assert!(
            wheel.forget(0, &mut alarms[0]),
            "given and not taken: passed on"
        );
    }
}
