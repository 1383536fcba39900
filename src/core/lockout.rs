//! The failure lockout: wrong room passwords and tokens that do not verify, counted per client
//! address and room. A few are forgiven; past them every attempt on that room from that address
//! is refused unseen (429 with `Retry-After`, or an error frame with `retry_after_ms`) until
//! enough time has passed, so a password cannot be guessed faster than `BURST` tries and then
//! one per `INTERVAL`.
//!
//! Each key keeps one instant (GCRA's "theoretical arrival time"): a failure pushes it
//! `INTERVAL` later; the key is locked while it lies more than `BURST × INTERVAL` ahead. Keys
//! whose instant has passed are forgotten, so the table holds only recent offenders.
//! IPv6 addresses are keyed by their /64, which one host usually owns whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Failures forgiven before the lockout starts.
pub const BURST: u32 = 5;
/// How long each failure is remembered: after the burst, one try per interval.
pub const INTERVAL: Duration = Duration::from_secs(12);
/// Most (address, room) keys remembered. Past it, failures of new keys share one key per room
/// (the unspecified address): under a spray from many addresses the room locks for all of
/// them rather than forgetting.
const MAX_KEYS: usize = 100_000;

type Key = (IpAddr, Box<str>);

/// The address of keys shared by many addresses (past `MAX_KEYS`) and of subject keys.
const SHARED: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// Failed attempts per client address and room.
pub struct Lockout {
    keys: Mutex<HashMap<Key, Instant>>,
    burst: u32,
    interval: Duration,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout::new(BURST, INTERVAL)
    }
}

impl Lockout {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Lockout {
            keys: Mutex::new(HashMap::new()),
            burst: burst.max(1),
            interval,
        }
    }

    fn tolerance(&self) -> Duration {
        self.interval.saturating_mul(self.burst)
    }

    /// `Err(wait)` while `peer` is locked out of `room` (`""`: no room named).
    pub fn check(&self, peer: IpAddr, room: &str) -> Result<(), Duration> {
        self.check_at(peer, room, Instant::now())
    }

    /// Notes a failed attempt; `Err(wait)` when it locks the key.
    pub fn failed(&self, peer: IpAddr, room: &str) -> Result<(), Duration> {
        self.failed_at(peer, room, Instant::now())
    }

    /// `Err(wait)` while `subject` (an account name) is locked out, whatever the address.
    pub fn check_subject(&self, subject: &str) -> Result<(), Duration> {
        let now = Instant::now();
        self.check_at(SHARED, subject, now)
            .and_then(|()| self.check_at(SHARED, "", now))
    }

    /// Notes a failed attempt charged to `subject` alone, whatever the address it came from, so
    /// that guesses spread over many addresses still meet the lockout.
    pub fn failed_subject(&self, subject: &str) -> Result<(), Duration> {
        self.failed_at(SHARED, subject, Instant::now())
    }

    fn check_at(&self, peer: IpAddr, room: &str, now: Instant) -> Result<(), Duration> {
        let keys = self.keys.lock();
        if keys.is_empty() {
            return Ok(());
        }
        let worst = [key_of(peer), SHARED]
            .into_iter()
            .filter_map(|ip| keys.get(&(ip, Box::from(room))).copied())
            .max();
        match worst {
            Some(tat) => self.wait(tat, now),
            None => Ok(()),
        }
    }

    fn failed_at(&self, peer: IpAddr, room: &str, now: Instant) -> Result<(), Duration> {
        let mut keys = self.keys.lock();
        let mut key = (key_of(peer), Box::from(room));
        if !keys.contains_key(&key) && keys.len() >= MAX_KEYS {
            keys.retain(|_, tat| *tat > now);
            if keys.len() >= MAX_KEYS {
                // Addresses past the bound share one key per room; subjects (whose keys have
                // no address already) share one key between them.
                if key.0 == SHARED {
                    key.1 = Box::from("");
                } else {
                    key.0 = SHARED;
                }
            }
        }
        let tat = keys.entry(key).or_insert(now);
        *tat = (*tat).max(now) + self.interval;
        self.wait(*tat, now)
    }

    fn wait(&self, tat: Instant, now: Instant) -> Result<(), Duration> {
        let ahead = tat.saturating_duration_since(now);
        match ahead.checked_sub(self.tolerance()) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Keys remembered now (for tests and `/api/stats`).
    pub fn len(&self) -> usize {
        self.keys.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The address a failure (or a rate, `limit::PerIpRate`) is charged to: IPv6 by its /64.
pub(crate) fn key_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_burst_is_forgiven_then_one_try_per_interval() {
        let l = Lockout::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.failed_at(A, "vault", t0), Ok(()));
        }
        let wait = l.failed_at(A, "vault", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert_eq!(l.check_at(A, "vault", t0), Err(wait));
        // Other rooms and other addresses are not touched.
        assert_eq!(l.check_at(A, "hall", t0), Ok(()));
        assert_eq!(l.check_at(B, "vault", t0), Ok(()));
        // Once the wait is over, one more try; failing it locks again at once.
        let later = t0 + wait;
        assert_eq!(l.check_at(A, "vault", later), Ok(()));
        assert!(l.failed_at(A, "vault", later).is_err());
    }

    #[test]
    fn a_subject_is_locked_whatever_the_address() {
        let l = Lockout::new(2, Duration::from_secs(10));
        assert!(l.failed_subject("alice").is_ok());
        assert!(l.failed_subject("alice").is_ok());
        assert!(l.check_subject("alice").is_ok());
        assert!(l.failed_subject("alice").is_err());
        assert!(l.check_subject("alice").is_err());
        assert!(l.check_subject("bob").is_ok());
        // Subject keys and address keys do not meet.
        assert!(l.check_at(A, "", Instant::now()).is_ok());
    }

    #[test]
    fn ipv6_is_charged_by_its_64() {
        let l = Lockout::new(1, Duration::from_secs(10));
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.failed_at(one, "r", t0).is_ok());
        assert!(l.failed_at(other, "r", t0).is_err());
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check_at(elsewhere, "r", t0).is_ok());
    }
}
