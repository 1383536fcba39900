//! Room epochs: which incarnation of a room a `seq` belongs to.
//!
//! A room's seqs count up from 1 for as long as its past is known: in memory while it has
//! members, in the history database across restarts, in Redis across processes. When that past
//! is lost (a restart with in-memory history, a wiped database, a new Redis), numbering starts
//! again and seq 5 is a different message than before. The epoch tells them apart: a new one is
//! drawn whenever numbering starts again, and a recovery position is the pair (epoch, seq).
//!
//! On the wire an epoch is 12 characters of Crockford's base32 (lowercase): short enough for
//! URLs and SSE ids, and 60 random bits make two epochs of one room practically never equal.

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Crockford's base32 alphabet: no `i`, `l`, `o` or `u`.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters of a displayed epoch: 12 × 5 bits = 60 bits.
const LEN: usize = 12;

/// One incarnation of a room's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

impl Epoch {
    /// A fresh epoch. Drawn from the process's random hasher keys (seeded by the OS) over a
    /// counter and the clock: unpredictable enough to be unique, and no extra dependency. Not a
    /// secret, so no cryptographic source is needed.
    pub fn random() -> Epoch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let state = std::collections::hash_map::RandomState::new();
        let mut hasher = state.build_hasher();
        (n, nanos).hash(&mut hasher);
        Epoch(std::hash::Hasher::finish(&hasher) >> 4)
    }

    /// The epoch as a number (the history database stores it so), and back.
    pub fn to_bits(self) -> u64 {
        self.0
    }

    /// `None` for a number no epoch has (above 60 bits): read from storage, it is corrupt.
    pub const fn from_bits(bits: u64) -> Option<Epoch> {
        if bits >> 60 == 0 {
            Some(Epoch(bits))
        } else {
            None
        }
    }

    fn encode(self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        for (i, c) in out.iter_mut().enumerate() {
            let shift = 5 * (LEN - 1 - i);
            *c = ALPHABET[((self.0 >> shift) & 31) as usize];
        }
        out
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.encode();
        // The alphabet is ASCII.
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

/// Not an epoch: exactly 12 characters of the base32 alphabet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an epoch is 12 characters of 0-9 and a-z (no i, l, o, u)")]
pub struct BadEpoch;

impl FromStr for Epoch {
    type Err = BadEpoch;

    fn from_str(s: &str) -> Result<Epoch, BadEpoch> {
        if s.len() != LEN {
            return Err(BadEpoch);
        }
        let mut bits = 0u64;
        for b in s.bytes() {
            let digit = ALPHABET.iter().position(|&a| a == b).ok_or(BadEpoch)?;
            bits = (bits << 5) | digit as u64;
        }
        Ok(Epoch(bits))
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.encode();
        s.serialize_str(std::str::from_utf8(&bytes).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Epoch, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_round_trip_and_differ() {
        let a = Epoch::random();
        let b = Epoch::random();
        assert_ne!(a, b);
        let text = a.to_string();
        assert_eq!(text.len(), 12);
        assert_eq!(text.parse::<Epoch>(), Ok(a));
        assert_eq!(Epoch::from_bits(a.to_bits()), Some(a));
        assert_eq!(Epoch::from_bits(u64::MAX), None);
        assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<Epoch>(&format!("\"{text}\"")).unwrap(),
            a
        );
    }

    #[test]
    fn bad_epochs_are_refused() {
        for bad in [
            "",
            "abc",
            "0123456789abc",
            "0123456789aI",
            "0123456789a!",
            "ééééééé",
        ] {
            assert_eq!(bad.parse::<Epoch>(), Err(BadEpoch), "{bad}");
        }
        assert!(serde_json::from_str::<Epoch>("12").is_err());
        assert_eq!("000000000000".parse::<Epoch>(), Ok(Epoch(0)));
        assert_eq!("zzzzzzzzzzzz".parse::<Epoch>(), Ok(Epoch((1 << 60) - 1)));
    }
}
