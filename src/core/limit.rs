//! Rate limits at work: the per-connection limiter that tells a soft refusal (an error frame
//! with `retry_after_ms`) from a flood (close 1008), a room's publish limiter, and the per-IP
//! connection cap. The bucket arithmetic is governor's GCRA; the specs are `config::rate`'s.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use crate::config::rate::{RateLimitArg, RateSpec};
use crate::core::lockout::key_of;

fn quota(spec: RateSpec) -> Quota {
    Quota::with_period(spec.period())
        .unwrap_or_else(|| Quota::per_second(spec.count))
        .allow_burst(spec.burst)
}

/// A token bucket for `spec`.
pub fn limiter(spec: RateSpec) -> DefaultDirectRateLimiter {
    RateLimiter::direct(quota(spec))
}

/// Most addresses `PerIpRate` remembers; past it, once the addresses whose buckets are full
/// again are forgotten, the rest share one bucket (the unspecified address): a spray from many
/// addresses is slowed as one rather than remembered without bound.
const MAX_RATE_ADDRESSES: usize = 100_000;

/// A rate per client address (`--accounts-register-rate`): one token bucket per address, IPv6
/// by its /64 as the failure lockout charges it.
pub struct PerIpRate {
    buckets: DefaultKeyedRateLimiter<IpAddr>,
}

impl PerIpRate {
    pub fn new(spec: RateSpec) -> Self {
        PerIpRate {
            buckets: RateLimiter::keyed(quota(spec)),
        }
    }

    /// Takes a token from `ip`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let mut key = key_of(ip);
        if self.buckets.len() >= MAX_RATE_ADDRESSES {
            self.buckets.retain_recent();
            if self.buckets.len() >= MAX_RATE_ADDRESSES {
                key = IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED);
            }
        }
        self.buckets
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}
/// What the limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Drop the message and tell the client when to retry.
    Refuse {
        retry_after: Duration,
    },
    /// The client ignored `burst` refusals in a row: close it.
    Flooding,
}

/// One connection's limiter. A client that backs off when told never reaches `Flooding`; one
/// that keeps sending through `burst` consecutive refusals does.
pub struct ConnectionLimiter {
    bucket: DefaultDirectRateLimiter,
    burst: u32,
    refused_in_a_row: u32,
}

impl ConnectionLimiter {
    pub fn new(spec: RateSpec) -> Self {
        ConnectionLimiter {
            bucket: limiter(spec),
            burst: spec.burst.get(),
            refused_in_a_row: 0,
        }
    }

    pub fn check(&mut self) -> Verdict {
        match self.bucket.check() {
            Ok(()) => {
                self.refused_in_a_row = 0;
                Verdict::Allow
            }
            Err(not_until) => {
                self.refused_in_a_row += 1;
                if self.refused_in_a_row > self.burst {
                    Verdict::Flooding
                } else {
                    Verdict::Refuse {
                        retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                    }
                }
            }
        }
    }
}

/// The publish limiter of a new room: its settings' `rate_limit` when the rooms file sets one
/// (`off` included), else `--room-rate-limit`.
pub fn room_limiter(
    from_settings: Option<RateLimitArg>,
    flag: Option<RateSpec>,
) -> Option<DefaultDirectRateLimiter> {
    from_settings
        .map_or(flag, |RateLimitArg(spec)| spec)
        .map(limiter)
}

/// `--max-connections-per-ip`: WebSocket connections held per client address. Consulted once
/// per upgrade and once per close, so one mutex is plenty.
pub struct PerIpLimit {
    max: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

impl PerIpLimit {
    pub fn new(max: u32) -> Self {
        PerIpLimit {
            max,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more connection from `ip`, unless it already holds the maximum.
    pub fn try_acquire(&self, ip: IpAddr) -> bool {
        let mut held = self.held.lock();
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts one connection from `ip` as closed; forgets the address at zero.
    pub fn release(&self, ip: IpAddr) {
        let mut held = self.held.lock();
        if let Some(n) = held.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&ip);
            }
        }
    }

    /// Addresses currently holding a connection.
    pub fn addresses(&self) -> usize {
        self.held.lock().len()
    }
}

/// Milliseconds to tell a client, rounded up so that retrying then succeeds.
pub fn retry_after_ms(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Option<RateSpec> {
        s.parse::<RateLimitArg>().unwrap().0
    }

    #[test]
    fn per_minute_refills_slowly() {
        let limiter = limiter(spec("6/m burst 2").unwrap());
        assert!(limiter.check().is_ok() && limiter.check().is_ok());
        let wait = limiter
            .check()
            .expect_err("the burst is spent")
            .wait_time_from(DefaultClock::default().now());
        assert!(
            wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
    }

    #[test]
    fn room_limiter_prefers_the_file() {
        let flag = spec("1/s");
        assert!(room_limiter(None, flag).is_some());
        assert!(room_limiter(None, None).is_none());
        assert!(
            room_limiter(Some(RateLimitArg(None)), flag).is_none(),
            "off in the file wins"
        );
        assert!(room_limiter(Some(RateLimitArg(spec("5/m"))), None).is_some());
    }

    #[test]
    fn burst_then_refusals_then_flood() {
        let mut l = ConnectionLimiter::new(spec("1/s burst 3").unwrap());
        for _ in 0..3 {
            assert_eq!(l.check(), Verdict::Allow);
        }
        for _ in 0..3 {
            match l.check() {
                Verdict::Refuse { retry_after } => {
                    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(l.check(), Verdict::Flooding);
    }

    #[test]
    fn per_ip_counts_and_forgets() {
        let l = PerIpLimit::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.try_acquire(a) && l.try_acquire(a));
        assert!(!l.try_acquire(a));
        assert!(l.try_acquire(b));
        l.release(a);
        assert!(l.try_acquire(a));
        l.release(a);
        l.release(a);
        l.release(b);
        assert_eq!(l.addresses(), 0);
    }

    #[test]
    fn per_ip_rate_keeps_one_bucket_per_address() {
        let r = PerIpRate::new(spec("1/m burst 2").unwrap());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(r.check(a).is_ok() && r.check(a).is_ok());
        let wait = r.check(a).unwrap_err();
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        assert!(r.check(b).is_ok());
        // One /64 is one client.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let same: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(r.check(v6).is_ok() && r.check(same).is_ok());
        assert!(r.check(v6).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_ms(Duration::from_micros(1)), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(1500)), 2);
        assert_eq!(retry_after_ms(Duration::ZERO), 1);
    }
}
