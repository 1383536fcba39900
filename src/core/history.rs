//! Message history, between a room's publishing and its joiners: each room keeps its last
//! messages as the frames already encoded for the broadcast (so replay costs no encoding), and
//! a join may ask for the last N of them (`history`) or for everything after a seq (`since`,
//! gapless recovery after a reconnect).
//!
//! `History` is one room's ring; it lives inside the room's state mutex, the same lock that
//! numbers and broadcasts a message and subscribes a joiner, which is what makes "replay, then
//! live" atomic: no gap, no duplicate. `HistoryService` is what every room shares: the settings
//! and the optional SQLite archive (`archive.rs`). In cluster mode a room's ring is also kept in
//! Redis (a capped list per room, `cluster.rs`); a process creating the room starts its ring from
//! that list (`History::followed_by`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Retention;
use crate::core::archive::{Archive, DbError, Prepared};
use crate::core::dedupe::Dedupe;
use crate::core::ring::{History, MemoryBudget, Seed};
use crate::core::stats::Stats;
use crate::proto::{Epoch, Outbound};

/// History settings shared by every room, parsed from the configuration.
#[derive(Debug, Clone)]
pub struct HistorySettings {
    /// Messages kept per room by default (`--history`).
    pub capacity: usize,
    /// How long an `id` is remembered (`--dedupe-window`); zero turns deduplication off.
    pub dedupe_window: Duration,
    /// Most ids remembered per room (`--dedupe-max`).
    pub dedupe_max: usize,
    /// SQLite file for durable history (`--history-db`).
    pub db: Option<PathBuf>,
    pub retention: Retention,
    /// Messages waiting for the disk writer before new ones are dropped (`--history-db-queue`).
    pub db_queue: usize,
    /// Frame bytes waiting for the disk writer before new messages are dropped
    /// (`--history-db-queue-bytes`).
    pub db_queue_bytes: usize,
    /// Bytes every room's ring may keep together (`--history-memory`).
    pub memory: usize,
    /// Bytes one room's ring may keep, unless its settings say (`--room-history-bytes`).
    pub room_bytes: usize,
    /// Fault injection for tests: each page read from the database first sleeps this long.
    pub page_delay: Duration,
}

impl Default for HistorySettings {
    /// History off: what benches and unit tests of other modules use.
    fn default() -> Self {
        HistorySettings {
            capacity: 0,
            dedupe_window: Duration::ZERO,
            dedupe_max: 0,
            db: None,
            retention: Retention::default(),
            db_queue: 1,
            db_queue_bytes: usize::MAX,
            memory: usize::MAX,
            room_bytes: usize::MAX,
            page_delay: Duration::ZERO,
        }
    }
}

/// What every room shares about history: settings and the optional archive.
pub struct HistoryService {
    settings: HistorySettings,
    archive: Option<Archive>,
    /// Every ring's share of `--history-memory`.
    budget: Arc<MemoryBudget>,
}

impl HistoryService {
    /// Opens the archive when one is configured (fails on a database that cannot be opened).
    pub fn new(settings: HistorySettings, stats: Arc<Stats>) -> Result<Self, DbError> {
        let archive = match &settings.db {
            Some(path) => Some(
                Archive::open(path, settings.retention, settings.db_queue, stats.clone())?
                    .with_max_queue_bytes(settings.db_queue_bytes)
                    .with_page_delay(settings.page_delay),
            ),
            None => None,
        };
        let budget = Arc::new(MemoryBudget::new(
            settings.memory,
            stats.history_trimmed.clone(),
        ));
        Ok(HistoryService {
            settings,
            archive,
            budget,
        })
    }

    /// History off, no archive.
    pub fn disabled() -> Self {
        HistoryService {
            settings: HistorySettings::default(),
            archive: None,
            budget: Arc::new(MemoryBudget::new(usize::MAX, Default::default())),
        }
    }

    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    pub fn archive(&self) -> Option<&Archive> {
        self.archive.as_ref()
    }

    /// The starting point of room `name`, created now with a ring of `capacity`. With an
    /// archive, seq and ring continue from what the room had before (a restart, or the room
    /// emptied and came back), from `prepared` when it is still good (see `Archive::seed`).
    /// Called under the registry's shard lock, so it never races the same room's `retire`.
    /// Its ring is bounded by `max_bytes` and the shared `--history-memory`.
    pub fn new_room(
        &self,
        name: &str,
        capacity: usize,
        max_bytes: usize,
        prepared: Option<Prepared>,
    ) -> Seed {
        let mut seed = match &self.archive {
            Some(archive) => archive.seed(name, capacity, prepared),
            None => Seed {
                last_seq: 0,
                epoch: Epoch::random(),
                history: History::new(capacity),
            },
        };
        seed.history = seed.history.bounded(max_bytes, Some(self.budget.clone()));
        seed
    }

    /// Whether creating room `name` with `prepared` would read the disk under a lock (see
    /// `Archive::needs_read`).
    pub fn needs_read(&self, name: &str, capacity: usize, prepared: Option<&Prepared>) -> bool {
        self.archive
            .as_ref()
            .is_some_and(|a| a.needs_read(name, capacity, prepared))
    }

    /// Bytes every room's ring keeps now.
    pub fn memory_used(&self) -> usize {
        self.budget.used()
    }

    /// A fresh dedupe window for a new room.
    pub fn new_dedupe(&self) -> Dedupe {
        Dedupe::new(self.settings.dedupe_window, self.settings.dedupe_max)
    }

    /// Hands a just-published message to the archive. Never blocks: a full writer queue drops
    /// it and counts the drop.
    pub(crate) fn record(&self, room: &Arc<str>, ts: u64, epoch: Epoch, out: &Arc<Outbound>) {
        if let Some(archive) = &self.archive {
            archive.append(room, ts, epoch, out);
        }
    }

    /// A room leaves memory (its last member left) with `last_seq` and its ring.
    pub(crate) fn retire(&self, room: &Arc<str>, last_seq: u64, epoch: Epoch, history: History) {
        if let Some(archive) = &self.archive {
            archive.retire(room, last_seq, epoch, history);
        }
    }

    /// Flushes and stops the archive writer, waiting at most `within`. Blocking.
    pub fn close(&self, within: Duration) {
        if let Some(archive) = &self.archive {
            archive.close(within);
        }
    }
}
