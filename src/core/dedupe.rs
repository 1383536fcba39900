//! Idempotent publishing: a message may carry an `id`; a repeat of that id by the same author in
//! the same room within `--dedupe-window` is acknowledged with the first copy's seq and not
//! broadcast again, so a client can safely retry a send whose acknowledgement it never saw. Ids
//! are keyed by author because every member sees them: keyed by room alone, a member could send
//! another's next id first and have the real message dropped. One `Dedupe` per room,
//! inside the room's state mutex (publishing already holds it). Memory is bounded per room by
//! `--dedupe-max` ids; past it the oldest id is forgotten early.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Whose id space a message's `id` belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author<'a> {
    /// A token's `sub`: every socket and REST call of that user shares one id space, so a
    /// retry on a new socket is still recognised.
    User(&'a str),
    /// One connection of this process, without a token (its id).
    Connection(u64),
    /// The REST API without a token (the API key, or REST left open): one id space.
    Api,
    /// An author already written out by `key` (received from another process, or qualified
    /// with the process's node id by the cluster broker).
    Key(&'a str),
}

impl Author<'_> {
    /// The author as one string; the prefixes keep the kinds apart (a user named `7` is not
    /// connection 7).
    pub fn key(&self) -> Cow<'_, str> {
        match self {
            Author::User(sub) => Cow::Owned(format!("u:{sub}")),
            Author::Connection(id) => Cow::Owned(format!("c:{id}")),
            Author::Api => Cow::Borrowed("api"),
            Author::Key(key) => Cow::Borrowed(key),
        }
    }
}

/// The map key of `id` by `author`. Ids have no control characters (`proto::validate_id`), so
/// everything after the last NUL is the id and two different pairs never meet.
fn key_of(author: &Author<'_>, id: &str) -> String {
    let author = author.key();
    let mut key = String::with_capacity(author.len() + 1 + id.len());
    key.push_str(&author);
    key.push('\0');
    key.push_str(id);
    key
}

pub struct Dedupe {
    window_ms: u64,
    max: usize,
    /// (Author, id) keys in the order they were first seen, with when (Unix ms): expiry pops
    /// from the front.
    order: VecDeque<(u64, Arc<str>)>,
    /// (Author, id) key → the seq its first copy got.
    seen: HashMap<Arc<str>, u64>,
}

impl Dedupe {
    /// Allocates nothing until the first id arrives; `window` zero or `max` zero turns it off.
    pub fn new(window: Duration, max: usize) -> Self {
        Dedupe {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max,
            order: VecDeque::new(),
            seen: HashMap::new(),
        }
    }

    fn enabled(&self) -> bool {
        self.window_ms > 0 && self.max > 0
    }

    /// Forgets ids older than the window.
    fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) < self.window_ms {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }

    /// The seq of an earlier copy of `id` by `author` still inside the window, if any.
    pub fn check(&mut self, author: &Author<'_>, id: &str, now_ms: u64) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        self.expire(now_ms);
        self.seen.get(key_of(author, id).as_str()).copied()
    }

    /// Remembers that `author`'s `id` was published as `seq`, unless it already is (a copy
    /// delivered twice keeps its first seq).
    pub fn record(&mut self, author: &Author<'_>, id: &str, seq: u64, now_ms: u64) {
        if !self.enabled() {
            return;
        }
        self.expire(now_ms);
        let key = key_of(author, id);
        if self.seen.contains_key(key.as_str()) {
            return;
        }
        while self.order.len() >= self.max {
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        let key: Arc<str> = key.into();
        self.seen.insert(key.clone(), seq);
        self.order.push_back((now_ms, key));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Author<'static> = Author::Connection(1);

    #[test]
    fn repeats_inside_the_window_are_found() {
        let mut d = Dedupe::new(Duration::from_secs(10), 100);
        assert_eq!(d.check(&A, "a", 1_000), None);
        d.record(&A, "a", 7, 1_000);
        assert_eq!(d.check(&A, "a", 5_000), Some(7));
        assert_eq!(d.check(&A, "b", 5_000), None);
        assert_eq!(d.check(&A, "a", 11_000), None, "expired after the window");
        assert!(d.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut d = Dedupe::new(Duration::from_secs(60), 3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            d.record(&A, id, i as u64 + 1, 0);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.check(&A, "a", 0), None, "the oldest was forgotten");
        assert_eq!(d.check(&A, "d", 0), Some(4));
    }

    #[test]
    fn off_when_the_window_is_zero() {
        let mut d = Dedupe::new(Duration::ZERO, 100);
        d.record(&A, "a", 1, 0);
        assert_eq!(d.check(&A, "a", 0), None);
        assert!(d.is_empty());
    }

    #[test]
    fn one_author_cannot_use_up_another_authors_id() {
        let mut d = Dedupe::new(Duration::from_secs(60), 100);
        d.record(&Author::Connection(2), "c-3", 5, 0);
        assert_eq!(d.check(&Author::Connection(1), "c-3", 0), None);
        assert_eq!(d.check(&Author::Connection(2), "c-3", 0), Some(5));
        d.record(&Author::User("mallory"), "k", 6, 0);
        assert_eq!(d.check(&Author::User("alice"), "k", 0), None);
        assert_eq!(d.check(&Author::Api, "k", 0), None);
        assert_eq!(d.check(&Author::Key("u:mallory"), "k", 0), Some(6));
        // A user named like a connection key is still another author.
        assert_eq!(d.check(&Author::User("2"), "c-3", 0), None);
    }
}
