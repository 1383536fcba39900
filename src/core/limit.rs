//! Rate limits: `RATE[:BURST]` specs from the command line, and the per-connection limiter that
//! tells a soft refusal (an error frame with `retry_after_ms`) from a flood (close 1008).
//! The bucket arithmetic is governor's GCRA.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

/// A token bucket: `per_second` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl RateSpec {
    pub fn limiter(self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(Quota::per_second(self.per_second).allow_burst(self.burst))
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.per_second, self.burst)
    }
}

/// `off`, `RATE` (burst = 2 × rate) or `RATE:BURST`, both positive integers.
/// `Option` because a limit may be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitArg(pub Option<RateSpec>);

impl FromStr for RateLimitArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s == "0" {
            return Ok(RateLimitArg(None));
        }
        let bad = || format!("`{s}` is not `off`, RATE or RATE:BURST (positive integers)");
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let per_second: NonZeroU32 = rate.parse().map_err(|_| bad())?;
        let burst: NonZeroU32 = match burst {
            Some(b) => b.parse().map_err(|_| bad())?,
            None => per_second.saturating_mul(NonZeroU32::MIN.saturating_add(1)),
        };
        Ok(RateLimitArg(Some(RateSpec { per_second, burst })))
    }
}

impl fmt::Display for RateLimitArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(spec) => spec.fmt(f),
            None => f.write_str("off"),
        }
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
            bucket: spec.limiter(),
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
    from_settings: Option<crate::config::rooms::RateLimit>,
    flag: Option<RateSpec>,
) -> Option<DefaultDirectRateLimiter> {
    use crate::config::rooms::RateLimit;
    match from_settings {
        None => flag.map(RateSpec::limiter),
        Some(RateLimit::Off) => None,
        Some(RateLimit::Limit { per_second, burst }) => {
            let period = Duration::from_secs_f64(1.0 / per_second.max(1e-6));
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            Quota::with_period(period).map(|q| RateLimiter::direct(q.allow_burst(burst)))
        }
    }
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
    fn parses_specs() {
        let s = spec("20:40").unwrap();
        assert_eq!((s.per_second.get(), s.burst.get()), (20, 40));
        let s = spec("5").unwrap();
        assert_eq!((s.per_second.get(), s.burst.get()), (5, 10));
        assert_eq!(spec("off"), None);
        assert_eq!(spec("0"), None);
        for bad in ["", "x", "1:0", "0:5", "-1", "1:2:3", "1.5"] {
            assert!(bad.parse::<RateLimitArg>().is_err(), "{bad}");
        }
        assert_eq!(RateLimitArg(spec("20:40")).to_string(), "20:40");
    }

    #[test]
    fn burst_then_refusals_then_flood() {
        let mut l = ConnectionLimiter::new(spec("1:3").unwrap());
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
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_ms(Duration::from_micros(1)), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(1500)), 2);
        assert_eq!(retry_after_ms(Duration::ZERO), 1);
    }
}
