//! Rates: the one `N/s burst B` syntax of `--rate-limit`, `--room-rate-limit` and the rooms
//! file's `rate_limit` (the limiters that apply them are `core::limit`'s).

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Largest rate (messages per unit) and largest burst, in flags and the rooms file alike. It also
/// keeps the refill period of `N/s` at 1 µs or more, which governor needs to be non-zero.
pub const MAX_RATE: u32 = 1_000_000;

/// The time a rate counts its messages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// `N/s`.
    Second,
    /// `N/m`.
    Minute,
}

impl RateUnit {
    pub fn duration(self) -> Duration {
        match self {
            RateUnit::Second => Duration::from_secs(1),
            RateUnit::Minute => Duration::from_secs(60),
        }
    }
}

/// A token bucket: `count` tokens per `unit`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub count: NonZeroU32,
    pub unit: RateUnit,
    /// Messages accepted back to back from a full bucket; for a connection also the refusals in
    /// a row that count as a flood. Default: `count` (one unit's worth).
    pub burst: NonZeroU32,
}

impl RateSpec {
    /// The time between two tokens.
    pub fn period(self) -> Duration {
        self.unit.duration() / self.count.get()
    }
}

impl fmt::Display for RateSpec {
    /// The canonical spelling, which [`RateLimitArg::parse`] reads back: `20/s`, `20/s burst 40`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            RateUnit::Second => "s",
            RateUnit::Minute => "m",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// A rate limit, or `off` (`None`): `--rate-limit`, `--room-rate-limit` and the rooms file's
/// `rate_limit`.
///
/// Syntax: `off`, `N/s` or `N/m`, optionally followed by ` burst B`; N and B from 1 to
/// [`MAX_RATE`]; B defaults to N. The flags also read, for one release, the spellings they took
/// before (`RATE` with a burst of 2 × RATE, `RATE:BURST`, `0` for off); see
/// [`RateLimitArg::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitArg(pub Option<RateSpec>);

impl RateLimitArg {
    /// Reads the syntax above, and also a deprecated flag spelling, in which case the second
    /// value is the same limit in the current syntax (for the warning printed at start).
    pub fn parse(s: &str) -> Result<(RateLimitArg, Option<String>), String> {
        let s = s.trim();
        match Self::parse_current(s) {
            Ok(limit) => Ok((limit, None)),
            Err(e) => match Self::parse_deprecated(s) {
                Some(limit) => Ok((limit, Some(limit.to_string()))),
                None => Err(e),
            },
        }
    }

    /// The current syntax only (what the rooms file accepts).
    pub fn parse_current(s: &str) -> Result<RateLimitArg, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(RateLimitArg(None));
        }
        let bad =
            || format!("`{s}` is not a rate limit: expected `off`, `N/s`, `N/m`, `N/s burst B`");
        let mut words = s.split_whitespace();
        let rate = words.next().ok_or_else(bad)?;
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => None,
            (Some("burst"), Some(b), None) => Some(b.parse::<u64>().map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: u64 = count.parse().map_err(|_| bad())?;
        let unit = match unit {
            "s" => RateUnit::Second,
            "m" => RateUnit::Minute,
            _ => return Err(bad()),
        };
        let burst = burst.unwrap_or(count);
        let (Some(count), Some(burst)) = (in_range(count), in_range(burst)) else {
            return Err(format!(
                "`{s}`: the rate and the burst must be from 1 to {MAX_RATE}"
            ));
        };
        Ok(RateLimitArg(Some(RateSpec { count, unit, burst })))
    }

    /// `0` (off), `RATE` (per second, burst 2 × RATE) and `RATE:BURST`: the flags' spellings
    /// before the one syntax. `None` when `s` is none of them, or out of range.
    fn parse_deprecated(s: &str) -> Option<RateLimitArg> {
        if s == "0" {
            return Some(RateLimitArg(None));
        }
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let rate: u64 = rate.parse().ok()?;
        let burst: u64 = match burst {
            Some(b) => b.parse().ok()?,
            None => rate.saturating_mul(2),
        };
        Some(RateLimitArg(Some(RateSpec {
            count: in_range(rate)?,
            unit: RateUnit::Second,
            burst: in_range(burst)?,
        })))
    }
}

fn in_range(n: u64) -> Option<NonZeroU32> {
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_RATE)
        .and_then(NonZeroU32::new)
}

impl FromStr for RateLimitArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        RateLimitArg::parse(s).map(|(limit, _)| limit)
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

/// The rooms file's `rate_limit`: a string in the current syntax only.
impl<'de> Deserialize<'de> for RateLimitArg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RateLimitArg::parse_current(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Option<RateSpec> {
        s.parse::<RateLimitArg>().unwrap().0
    }

    #[test]
    fn parses_specs() {
        let s = spec("20/s burst 40").unwrap();
        assert_eq!(
            (s.count.get(), s.unit, s.burst.get()),
            (20, RateUnit::Second, 40)
        );
        let s = spec("5/s").unwrap();
        assert_eq!(
            (s.count.get(), s.burst.get()),
            (5, 5),
            "the burst defaults to the rate"
        );
        let s = spec("30/m burst 5").unwrap();
        assert_eq!(
            (s.count.get(), s.unit, s.burst.get()),
            (30, RateUnit::Minute, 5)
        );
        let s = spec(" 1000000/m ").unwrap();
        assert_eq!(s.burst.get(), 1_000_000);
        assert_eq!(spec("off"), None);
        assert_eq!(spec("OFF"), None);
        for bad in [
            "",
            "x",
            "10/h",
            "0/s",
            "x/s",
            "-1/s",
            "1.5/s",
            "10/s burst",
            "10/s burst 0",
            "10/s b 3",
            "10/s burst 3 4",
            "1000001/s",
            "10/s burst 1000001",
            "1:0",
            "0:5",
            "-1",
            "1:2:3",
            "1.5",
            "5000000",
        ] {
            assert!(bad.parse::<RateLimitArg>().is_err(), "{bad:?}");
        }
        // The canonical spelling reads back to the same limit.
        for text in ["20/s burst 40", "20/s", "30/m burst 5", "off"] {
            assert_eq!(text.parse::<RateLimitArg>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn deprecated_flag_spellings_keep_their_meaning() {
        let parse = |s: &str| RateLimitArg::parse(s).unwrap();
        assert_eq!(
            parse("20:40"),
            (
                RateLimitArg(spec("20/s burst 40")),
                Some("20/s burst 40".into())
            )
        );
        assert_eq!(
            parse("5"),
            (
                RateLimitArg(spec("5/s burst 10")),
                Some("5/s burst 10".into())
            )
        );
        assert_eq!(parse("0"), (RateLimitArg(None), Some("off".into())));
        assert_eq!(parse("20/s"), (RateLimitArg(spec("20/s")), None));
        assert_eq!(parse("off"), (RateLimitArg(None), None));
        // The rooms file never took them.
        for old in ["20:40", "5", "0"] {
            assert!(RateLimitArg::parse_current(old).is_err(), "{old}");
        }
    }
}
