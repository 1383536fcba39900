//! Durable history (`--history-db`): every published message goes to SQLite, written in
//! batches by one dedicated writer thread. Publishing only `try_send`s a pointer to the frame it
//! already encoded into a bounded queue: when the writer falls behind (slow or locked disk) the
//! message is dropped from the archive and counted, never waited for. The room rings in memory
//! stay the source for live replay; the archive feeds them when a room is created (after a
//! restart, or when an emptied room comes back) and serves the paging API beyond them.
//!
//! Seq continuity: a room that comes back must continue its numbering even when its last
//! messages are still in the writer queue (or were dropped from it). Rooms that leave memory
//! and messages that are dropped leave an `Unflushed` note with their last seq; a new room takes
//! the larger of the note and the database, and the writer removes a note once the database has
//! caught up with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::Retention;
use crate::core::ring::{History, Seed};
use crate::core::stats::{unix_millis, Stats};
use crate::proto::{self, Epoch, Outbound};

/// Most messages one transaction writes.
const BATCH: usize = 1024;
/// How often old messages are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long the writer waits on a locked database before it retries (and the queue fills).
const WRITER_BUSY: Duration = Duration::from_millis(250);
/// How long a read (room seed, paging) waits on a locked database.
const READER_BUSY: Duration = Duration::from_secs(2);
/// Read-only connections for page reads: a page read holds one for the whole page, and at most
/// this many page reads wait on the blocking pool at once (`page_slot`), so a flood of page
/// reads waits asynchronously, not on blocking threads. Room seeds have a connection of their
/// own, so no page read ever holds up a join.
const PAGE_READERS: usize = 4;
/// Buckets of the per-name change counters (see `Archive::changes`).
const CHANGE_BUCKETS: usize = 256;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    room    TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,   -- Unix milliseconds, for age retention
    payload TEXT    NOT NULL,   -- the message frame's JSON, exactly as it was broadcast
    epoch   INTEGER,            -- the room's epoch (proto::Epoch bits) when it was published
    PRIMARY KEY (room, seq)
);
CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);
";

/// One message on its way to disk: pointers only, nothing copied on the publishing side.
struct Record {
    room: Arc<str>,
    ts: u64,
    epoch: Epoch,
    out: Arc<Outbound>,
}

enum Job {
    Append(Record),
    /// The room left memory: drop its `Unflushed` note once the database has its last seq.
    Retired(Arc<str>),
    Stop,
}

/// What memory knows about a room that the database may not have yet.
struct Unflushed {
    /// The room's last used seq.
    last_seq: u64,
    /// And its epoch.
    epoch: Epoch,
    /// Its ring when it left memory, fresher than the database while the writer catches up.
    frames: Option<VecDeque<Arc<Outbound>>>,
}

/// The notes, and a change counter per bucket of room names: bumped (under the notes' lock)
/// whenever a name's note appears, changes or goes. A seed read from disk outside every lock
/// is used only if its bucket did not change meanwhile.
struct NoteBook {
    notes: HashMap<Box<str>, Unflushed>,
    changes: Box<[u64]>,
}

impl NoteBook {
    fn bucket(name: &str) -> usize {
        // FNV-1a: stable and cheap; a collision only costs a fresh read.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (h % CHANGE_BUCKETS as u64) as usize
    }

    fn changed(&mut self, name: &str) {
        let b = Self::bucket(name);
        self.changes[b] = self.changes[b].wrapping_add(1);
    }

    fn version(&self, name: &str) -> u64 {
        self.changes[Self::bucket(name)]
    }
}

impl Default for NoteBook {
    fn default() -> Self {
        NoteBook {
            notes: HashMap::new(),
            changes: vec![0; CHANGE_BUCKETS].into_boxed_slice(),
        }
    }
}

type Notes = Arc<Mutex<NoteBook>>;

/// What a join that may create a room brings for the room's past.
#[derive(Default)]
pub struct Seeding {
    /// The past read beforehand, off every lock (`Hub::seed_job`).
    pub prepared: Option<Prepared>,
    /// When `prepared` will not do, refuse with `JoinError::SeedStale` (the caller prepares
    /// again, off the lock) rather than read under the lock. Off for a caller's last try.
    pub retry_if_stale: bool,
}

/// A room's past as read from disk before the room is created, outside every lock (see
/// `Archive::prepare`).
pub struct Prepared {
    /// The note book's version of the name when the read began.
    version: u64,
    capacity: usize,
    read: rusqlite::Result<SeedRead>,
}

/// Archived messages, newest first, as `(seq, JSON payload)`, and the epoch of the room's last
/// archived message.
pub type ArchivedPage = (Vec<(u64, String)>, Option<Epoch>);

/// A room's last seq, the epoch of its last message and its last messages, as on disk.
type SeedRead = (u64, Option<Epoch>, Vec<(u64, String)>);

pub struct Archive {
    tx: SyncSender<Job>,
    /// Room seeds' own connection; the writer has its own too (WAL: readers never wait for it).
    seed_reader: Mutex<Connection>,
    /// Page reads', at most one page read each (`page_slots`).
    page_readers: Box<[Mutex<Connection>]>,
    page_slots: Arc<tokio::sync::Semaphore>,
    /// Fault injection for tests: every page read first sleeps this long, as on a slow disk.
    page_delay: Duration,
    notes: Notes,
    stats: Arc<Stats>,
    stopping: Arc<AtomicBool>,
    /// What the writer and `close` share to account for every queued message at shutdown.
    books: Arc<Books>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Most frame bytes the writer queue holds (`--history-db-queue-bytes`): the queue is
    /// bounded in messages by its channel and in bytes by this.
    max_queue_bytes: usize,
}

/// The count of messages queued but neither written nor counted as dropped, so that a
/// shutdown that cannot wait for the writer can still say (and count) what was not written.
#[derive(Default)]
struct Books {
    pending: AtomicU64,
    /// Frame bytes of the messages queued and not yet taken by the writer.
    pending_bytes: AtomicUsize,
    /// `close` gave up waiting: the writer writes nothing more, and counts nothing more.
    abandoned: AtomicBool,
    /// Held while a batch is written and counted: `close` takes it before it reads `pending`,
    /// so a batch is never counted both as written and as lost.
    committing: Mutex<()>,
}

/// Why the history database could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Archive {
    /// Opens (creating if needed) the database at `path` in WAL mode and starts the writer.
    pub fn open(
        path: &Path,
        retention: Retention,
        queue: usize,
        stats: Arc<Stats>,
    ) -> Result<Archive, DbError> {
        create_private(path)?;
        let conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite did not switch to WAL mode");
        }
        // In WAL mode NORMAL keeps the database consistent and loses no commit on a process
        // crash; only a power loss can lose the last commits. One fsync per checkpoint, not per
        // batch.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(WRITER_BUSY)?;
        conn.execute_batch(SCHEMA)?;
        // Databases made before epochs: their messages get none, so a room of theirs starts a
        // new epoch the first time it is created again.
        let has_epoch: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('messages') WHERE name = 'epoch'",
            [],
            |r| r.get(0),
        )?;
        if !has_epoch {
            conn.execute_batch("ALTER TABLE messages ADD COLUMN epoch INTEGER")?;
        }
        let reader = || -> rusqlite::Result<Mutex<Connection>> {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(READER_BUSY)?;
            Ok(Mutex::new(reader))
        };
        let seed_reader = reader()?;
        let page_readers = (0..PAGE_READERS)
            .map(|_| reader())
            .collect::<rusqlite::Result<Box<[_]>>>()?;

        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let notes: Notes = Arc::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let books = Arc::new(Books::default());
        let writer = Writer {
            conn,
            rx,
            notes: notes.clone(),
            stats: stats.clone(),
            retention,
            stopping: stopping.clone(),
            books: books.clone(),
            failed_at_stop: false,
            touched: HashSet::new(),
        };
        let handle = std::thread::Builder::new()
            .name("roomcast-history-db".into())
            .spawn(move || writer.run())?;
        tracing::info!(path = %path.display(), ?retention, "durable history");
        Ok(Archive {
            tx,
            seed_reader,
            page_readers,
            page_slots: Arc::new(tokio::sync::Semaphore::new(PAGE_READERS)),
            page_delay: Duration::ZERO,
            notes,
            stats,
            stopping,
            books,
            writer: Mutex::new(Some(handle)),
            max_queue_bytes: usize::MAX,
        })
    }

    /// Makes every page read sleep `delay` first (tests: a slow disk).
    pub fn with_page_delay(mut self, delay: Duration) -> Self {
        self.page_delay = delay;
        self
    }

    /// Bounds the writer queue in bytes too (`--history-db-queue-bytes`).
    pub fn with_max_queue_bytes(mut self, bytes: usize) -> Self {
        self.max_queue_bytes = bytes;
        self
    }

    /// Queues a published message. Never blocks; a full queue drops it (counted) and notes the
    /// seq so that the room's numbering never reuses it.
    pub(crate) fn append(&self, room: &Arc<str>, ts: u64, epoch: Epoch, out: &Arc<Outbound>) {
        let job = Job::Append(Record {
            room: room.clone(),
            ts,
            epoch,
            out: out.clone(),
        });
        let size = out.frame.len();
        let queued = self.books.pending_bytes.fetch_add(size, Ordering::SeqCst);
        let sent = if queued.saturating_add(size) > self.max_queue_bytes {
            Err(())
        } else {
            self.books.pending.fetch_add(1, Ordering::SeqCst);
            self.tx.try_send(job).map_err(|_| {
                self.books.pending.fetch_sub(1, Ordering::SeqCst);
            })
        };
        if sent.is_err() {
            self.books.pending_bytes.fetch_sub(size, Ordering::SeqCst);
            self.stats.history_db_dropped.inc();
            let mut book = self.notes.lock();
            book.changed(room);
            let note = book.notes.entry(room.as_ref().into()).or_insert(Unflushed {
                last_seq: 0,
                epoch,
                frames: None,
            });
            note.last_seq = note.last_seq.max(out.seq);
            note.epoch = epoch;
        }
    }

    /// A room leaves memory with its last seq and ring.
    pub(crate) fn retire(&self, room: &Arc<str>, last_seq: u64, epoch: Epoch, history: History) {
        let frames = history.into_frames();
        // The note is in the book before the writer can see the job: a writer that took the
        // job first would find no note to forget, and the ring would stay in memory for good.
        let mut book = self.notes.lock();
        book.changed(room);
        let sent = self.tx.try_send(Job::Retired(room.clone())).is_ok();
        let note = book.notes.entry(room.as_ref().into()).or_insert(Unflushed {
            last_seq: 0,
            epoch,
            frames: None,
        });
        note.last_seq = note.last_seq.max(last_seq);
        note.epoch = epoch;
        // Nobody would free the ring if the job was not taken: keep just the seq, the ring
        // comes from disk later.
        note.frames = sent.then_some(frames);
    }

    /// A free page reader, or the first to come free. Only `PAGE_READERS` page reads run at
    /// once (`page_slot`), so this waits only for a caller that skipped the slot (tests).
    fn page_reader(&self) -> parking_lot::MutexGuard<'_, Connection> {
        self.page_readers
            .iter()
            .find_map(|r| r.try_lock())
            .unwrap_or_else(|| self.page_readers[0].lock())
    }

    /// Waits (asynchronously) for a page read's turn: hold the permit across `page`. `None`
    /// never happens (the slots are never closed); a caller may read without a slot then.
    pub async fn page_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.page_slots.clone().acquire_owned().await.ok()
    }

    /// Reads room `name`'s last seq and last `capacity` messages from disk, for a room about to
    /// be created. Blocking: call from `spawn_blocking`, before taking any lock; `seed` then
    /// uses the result if nothing about the name changed meanwhile.
    pub fn prepare(&self, name: &str, capacity: usize) -> Prepared {
        let version = self.notes.lock().version(name);
        Prepared {
            version,
            capacity,
            read: self.read_seed(name, capacity),
        }
    }

    /// Whether creating room `name` now would have to read the disk under the caller's lock:
    /// nothing about it is in memory and `prepared` is missing or stale (the room lived or
    /// retired since it was read). The caller then lets go of its lock and prepares again.
    pub fn needs_read(&self, name: &str, capacity: usize, prepared: Option<&Prepared>) -> bool {
        let book = self.notes.lock();
        if book.notes.get(name).is_some_and(|n| n.frames.is_some()) {
            return false;
        }
        !prepared.is_some_and(|p| p.version == book.version(name) && p.capacity == capacity)
    }

    /// The room's last seq, the epoch of its last message (none when it has no message, or an
    /// unreadable one) and its last `capacity` messages.
    fn read_seed(&self, name: &str, capacity: usize) -> rusqlite::Result<SeedRead> {
        let conn = self.seed_reader.lock();
        let max: Option<i64> = conn.query_row(
            "SELECT max(seq) FROM messages WHERE room = ?1",
            [name],
            |r| r.get(0),
        )?;
        let epoch = last_epoch(&conn, name)?;
        let rows = read_rows(&conn, name, i64::MAX, capacity)?;
        Ok((
            max.map_or(0, |m| u64::try_from(m).unwrap_or(0)),
            epoch,
            rows,
        ))
    }

    /// Where room `name` starts when it is created: its last seq and its last `capacity`
    /// messages. Called under the registry's shard lock. `prepared` is the disk's answer read
    /// beforehand (`prepare`); it is used when nothing about the name changed since, and
    /// otherwise (or without one) the disk is read here, under the lock, counted in
    /// `history_db_locked_reads`: the last resort once `needs_read` has sent a join back to
    /// prepare again a few times. A database error is logged and the room starts from what
    /// memory knows.
    pub fn seed(&self, name: &str, capacity: usize, prepared: Option<Prepared>) -> Seed {
        let (note, fresh) = {
            let mut book = self.notes.lock();
            let fresh = prepared
                .filter(|p| p.version == book.version(name) && p.capacity == capacity)
                .map(|p| p.read);
            let note = book.notes.remove(name);
            // The room is in memory from now on: a read prepared before this moment is stale.
            book.changed(name);
            (note, fresh)
        };
        if let Some(Unflushed {
            last_seq,
            epoch,
            frames: Some(frames),
        }) = note
        {
            return Seed {
                last_seq,
                epoch,
                history: History::with_frames(capacity, frames),
            };
        }
        let floor = note.as_ref().map_or(0, |n| n.last_seq);
        // What memory knows of the room is newer than the disk, and of the same epoch.
        let noted = note.map(|n| n.epoch);
        let from_db = fresh.unwrap_or_else(|| {
            self.stats.history_db_locked_reads.inc();
            self.read_seed(name, capacity)
        });
        match from_db {
            Ok((max, epoch, mut rows)) => {
                rows.reverse();
                // The epoch goes on while the disk has the room's messages: with none, the
                // numbering starts again, and so does a new epoch.
                let epoch = noted
                    .or(epoch.filter(|_| max > 0))
                    .unwrap_or_else(Epoch::random);
                Seed {
                    last_seq: max.max(floor),
                    epoch,
                    history: History::with_frames(
                        capacity,
                        rows.into_iter().map(|(seq, p)| outbound(seq, &p)),
                    ),
                }
            }
            Err(e) => {
                tracing::warn!(room = name, error = %e, "could not read the room's history");
                Seed {
                    last_seq: floor,
                    epoch: noted.unwrap_or_else(Epoch::random),
                    history: History::new(capacity),
                }
            }
        }
    }

    /// Up to `limit` archived messages of `room` with a seq below `before`, newest first, as
    /// `(seq, JSON payload)`, and the epoch of the room's last archived message. Blocking: call
    /// from `spawn_blocking`, holding a `page_slot`.
    pub fn page(&self, room: &str, before: u64, limit: usize) -> Result<ArchivedPage, DbError> {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let reader = self.page_reader();
        if !self.page_delay.is_zero() {
            std::thread::sleep(self.page_delay);
        }
        let rows = read_rows(&reader, room, before, limit)?;
        Ok((rows, last_epoch(&reader, room)?))
    }

    /// Asks the writer to flush what is queued and stop; waits at most `within` (and, past it,
    /// for the batch being committed, at most a few busy timeouts). What was not written by
    /// then is counted in `history_db_dropped` and logged with its number. Blocking.
    pub fn close(&self, within: Duration) {
        let deadline = Instant::now() + within;
        self.stopping.store(true, Ordering::SeqCst);
        while let Err(TrySendError::Full(_)) = self.tx.try_send(Job::Stop) {
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut writer = self.writer.lock();
        while writer.as_ref().is_some_and(|h| !h.is_finished()) {
            if Instant::now() >= deadline {
                self.abandon(within);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(h) = writer.take() {
            let _ = h.join();
        }
    }

    /// Stops the writer where it is and counts what it had not written.
    fn abandon(&self, within: Duration) {
        self.books.abandoned.store(true, Ordering::SeqCst);
        let committing = self.books.committing.try_lock_for(WRITER_BUSY * 4);
        let lost = self.books.pending.swap(0, Ordering::SeqCst);
        drop(committing);
        if lost > 0 {
            self.stats.history_db_dropped.inc_by(lost);
            tracing::warn!(
                lost,
                "history not written at shutdown: {lost} messages were still queued for the \
                 database after {within:?}"
            );
        } else {
            tracing::warn!("the history writer did not finish within {within:?}");
        }
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // The writer stops by itself once the queue's sender is gone; don't wait for it here.
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// The epoch of room `room`'s last archived message (none: no message, or one from before
/// epochs, or a corrupt value).
fn last_epoch(conn: &Connection, room: &str) -> rusqlite::Result<Option<Epoch>> {
    let epoch: Option<Option<i64>> = conn
        .query_row(
            "SELECT epoch FROM messages WHERE room = ?1 ORDER BY seq DESC LIMIT 1",
            [room],
            |r| r.get(0),
        )
        .optional()?;
    Ok(epoch
        .flatten()
        .and_then(|e| u64::try_from(e).ok())
        .and_then(Epoch::from_bits))
}

fn read_rows(
    conn: &Connection,
    room: &str,
    before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, String)>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT seq, payload FROM messages WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![room, before, limit], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
    })?;
    rows.collect()
}

/// A kept message read back from disk, ready to be replayed: header + the stored JSON.
fn outbound(seq: u64, payload: &str) -> Arc<Outbound> {
    Arc::new(Outbound::numbered(
        proto::frame_from_payload(payload.as_bytes()),
        seq,
    ))
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    rx: Receiver<Job>,
    notes: Notes,
    stats: Arc<Stats>,
    retention: Retention,
    stopping: Arc<AtomicBool>,
    books: Arc<Books>,
    /// A write failed while stopping: the rest is dropped (counted) without trying, so that
    /// the shutdown is not a busy timeout per batch.
    failed_at_stop: bool,
    /// Rooms written since the last prune (per-room retention prunes only those).
    touched: HashSet<Arc<str>>,
}

impl Writer {
    fn run(mut self) {
        self.prune();
        let mut last_prune = Instant::now();
        loop {
            let first = match self.rx.recv_timeout(PRUNE_EVERY) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    self.prune();
                    last_prune = Instant::now();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut appends = Vec::new();
            let mut retired = Vec::new();
            let mut stop = false;
            let mut job = Some(first);
            while let Some(j) = job.take() {
                match j {
                    Job::Append(r) => appends.push(r),
                    Job::Retired(room) => retired.push(room),
                    Job::Stop => stop = true,
                }
                if appends.len() < BATCH && !stop {
                    job = self.rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.write(&appends);
                let bytes = appends.iter().map(|r| r.out.frame.len()).sum();
                self.books.pending_bytes.fetch_sub(bytes, Ordering::SeqCst);
            }
            for room in retired {
                self.forget_note_if_flushed(&room);
            }
            if stop {
                self.prune();
                return;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                self.prune();
                last_prune = Instant::now();
            }
        }
    }

    /// Writes one batch in one transaction, retrying while the database is locked or failing.
    /// While it retries, the queue fills and publishers drop (and count) instead of waiting.
    fn write(&mut self, batch: &[Record]) {
        let mut backoff = Duration::from_millis(20);
        let mut warned = false;
        let n = batch.len() as u64;
        loop {
            let books = self.books.clone();
            let _committing = books.committing.lock();
            if books.abandoned.load(Ordering::SeqCst) {
                // `close` has counted these already.
                return;
            }
            if self.failed_at_stop {
                self.stats.history_db_dropped.inc_by(n);
                books.pending.fetch_sub(n, Ordering::SeqCst);
                return;
            }
            match insert_batch(&mut self.conn, batch) {
                Ok(()) => {
                    self.stats.history_db_written.inc_by(n);
                    books.pending.fetch_sub(n, Ordering::SeqCst);
                    for r in batch {
                        if !self.touched.contains(&r.room) {
                            self.touched.insert(r.room.clone());
                        }
                    }
                    if warned {
                        tracing::info!("history database writable again");
                    }
                    return;
                }
                Err(e) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        tracing::warn!(error = %e, lost = n, "history not written at shutdown");
                        self.stats.history_db_dropped.inc_by(n);
                        books.pending.fetch_sub(n, Ordering::SeqCst);
                        self.failed_at_stop = true;
                        return;
                    }
                    if !warned {
                        tracing::warn!(error = %e, "history database write failed; retrying");
                        warned = true;
                    }
                    drop(_committing);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn forget_note_if_flushed(&self, room: &str) {
        let max: Option<i64> = self
            .conn
            .query_row(
                "SELECT max(seq) FROM messages WHERE room = ?1",
                [room],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten()
            .flatten();
        let on_disk = max.unwrap_or(0) as u64;
        let mut book = self.notes.lock();
        if book.notes.get(room).is_some_and(|n| n.last_seq <= on_disk) {
            book.notes.remove(room);
            book.changed(room);
        }
    }

    fn prune(&mut self) {
        let result = match self.retention {
            Retention::Age(age) => {
                let cutoff = unix_millis().saturating_sub(age.as_millis() as u64);
                self.conn
                    .execute("DELETE FROM messages WHERE ts < ?1", [cutoff as i64])
                    .map(|n| n as u64)
            }
            Retention::PerRoom(keep) => {
                let mut total = 0u64;
                let keep = i64::try_from(keep).unwrap_or(i64::MAX);
                let mut result = Ok(0);
                for room in self.touched.drain() {
                    match self.conn.execute(
                        "DELETE FROM messages WHERE room = ?1 AND seq <= \
                         (SELECT max(seq) FROM messages WHERE room = ?1) - ?2",
                        params![room.as_ref(), keep],
                    ) {
                        Ok(n) => total += n as u64,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result.map(|_: u64| total)
            }
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "history pruned"),
            Err(e) => tracing::warn!(error = %e, "history prune failed"),
        }
    }
}

/// Creates the database file readable and writable by this user alone (0600), before SQLite
/// opens it: messages (and password hashes, `accounts.rs`) are private. SQLite gives its -wal
/// and -shm files the database file's mode. An existing file keeps the mode it has.
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn insert_batch(conn: &mut Connection, batch: &[Record]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO messages (room, seq, ts, payload, epoch) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for r in batch {
            let Ok(payload) = std::str::from_utf8(proto::frame_payload(&r.out.frame)) else {
                continue;
            };
            stmt.execute(params![
                r.room.as_ref(),
                r.out.seq as i64,
                r.ts as i64,
                payload,
                r.epoch.to_bits() as i64
            ])?;
        }
    }
    tx.commit()
}

/// The JSON payload of a kept frame, for the paging API (no decoding: the bytes as sent).
pub fn payload_of(out: &Outbound) -> Bytes {
    let p = proto::frame_payload(&out.frame);
    out.frame.slice_ref(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch these tests publish in.
    const E: Epoch = match Epoch::from_bits(42) {
        Some(e) => e,
        None => panic!(),
    };

    fn publish(seq: u64) -> Arc<Outbound> {
        Arc::new(Outbound::numbered(
            proto::message_frame("r", "u", &format!("m{seq}"), seq, 1),
            seq,
        ))
    }

    #[test]
    fn messages_survive_reopening_and_seq_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let stats = Arc::new(Stats::new());
        let room: Arc<str> = "r".into();
        {
            let a = Archive::open(&path, Retention::default(), 100, stats.clone()).unwrap();
            for seq in 1..=5 {
                a.append(&room, unix_millis(), E, &publish(seq));
            }
            a.close(Duration::from_secs(10));
        }
        assert_eq!(stats.history_db_written.get(), 5);
        let a = Archive::open(&path, Retention::default(), 100, stats).unwrap();
        let seed = a.seed("r", 3, None);
        assert_eq!(seed.last_seq, 5);
        assert_eq!(seed.history.first_seq(), Some(3));
        let page = a.page("r", 5, 10).unwrap().0;
        assert_eq!(
            page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [4, 3, 2, 1]
        );
        let v: serde_json::Value = serde_json::from_str(&page[0].1).unwrap();
        assert_eq!(v["text"], "m4");
        assert_eq!(a.seed("other", 3, None).last_seq, 0);
        assert_eq!(seed.epoch, E, "the epoch goes on with the messages");
        assert_eq!(a.page("r", 5, 10).unwrap().1, Some(E));
        assert_ne!(
            a.seed("other", 3, None).epoch,
            E,
            "a room with no past starts a new one"
        );
    }

    #[test]
    fn a_database_from_before_epochs_gets_the_column_and_new_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE messages (room TEXT NOT NULL, seq INTEGER NOT NULL,
                 ts INTEGER NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (room, seq));
                 INSERT INTO messages VALUES ('r', 7, 0, '{\"type\":\"message\",\"seq\":7}');",
            )
            .unwrap();
            // Recent, so that age retention keeps it.
            c.execute("UPDATE messages SET ts = ?1", [unix_millis() as i64])
                .unwrap();
        }
        let a = Archive::open(&path, Retention::default(), 100, Arc::new(Stats::new())).unwrap();
        let seed = a.seed("r", 10, None);
        assert_eq!(seed.last_seq, 7, "the old messages are still there");
        a.append(&"r".into(), unix_millis(), seed.epoch, &publish(8));
        a.close(Duration::from_secs(10));
        assert_eq!(a.page("r", u64::MAX, 10).unwrap().1, Some(seed.epoch));
    }

    #[test]
    fn what_is_not_written_by_the_shutdown_deadline_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let stats = Arc::new(Stats::new());
        let room: Arc<str> = "r".into();
        let a = Archive::open(&path, Retention::default(), 10_000, stats.clone()).unwrap();
        // Another process holds the database: nothing can be written.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        for seq in 1..=3000 {
            a.append(&room, unix_millis(), E, &publish(seq));
        }
        a.close(Duration::from_millis(100));
        assert_eq!(stats.history_db_written.get(), 0);
        assert_eq!(
            stats.history_db_dropped.get(),
            3000,
            "every message not written is counted by the time close returns"
        );
        other.execute_batch("ROLLBACK").unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_database_and_its_wal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let stats = Arc::new(Stats::new());
        let a = Archive::open(&path, Retention::default(), 100, stats.clone()).unwrap();
        a.append(&"r".into(), unix_millis(), E, &publish(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.history_db_written.get() == 0 {
            assert!(Instant::now() < deadline, "nothing written");
            std::thread::sleep(Duration::from_millis(5));
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("h.sqlite{suffix}"));
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
        }
        a.close(Duration::from_secs(10));
    }

    #[test]
    fn a_retired_room_keeps_its_seq_before_the_writer_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::new());
        let a =
            Archive::open(&dir.path().join("h.sqlite"), Retention::default(), 1, stats).unwrap();
        // A queue of one: most of these are dropped, and the seq must still not go back.
        let room: Arc<str> = "r".into();
        let mut ring = History::new(4);
        for seq in 1..=50 {
            let out = publish(seq);
            a.append(&room, unix_millis(), E, &out);
            ring.push(&out);
        }
        a.retire(&room, 50, E, ring);
        let seed = a.seed("r", 4, None);
        assert_eq!(seed.last_seq, 50);
        a.close(Duration::from_secs(10));
    }

    #[test]
    fn the_writer_queue_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::new());
        let frame = publish(1).frame.len();
        // Room for one frame's bytes: a second one queued behind it is dropped, counted, and
        // its seq still noted.
        let a = Archive::open(
            &dir.path().join("h.sqlite"),
            Retention::default(),
            100,
            stats.clone(),
        )
        .unwrap()
        .with_max_queue_bytes(frame - 1);
        let room: Arc<str> = "r".into();
        for seq in 1..=3 {
            a.append(&room, unix_millis(), E, &publish(seq));
        }
        assert_eq!(stats.history_db_dropped.get(), 3, "no frame fits");
        assert_eq!(a.seed("r", 4, None).last_seq, 3, "the seqs are not reused");
        a.close(Duration::from_secs(10));
        assert_eq!(stats.history_db_written.get(), 0);
    }

    #[test]
    fn a_prepared_seed_is_used_only_while_nothing_changed() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::new());
        let a = Archive::open(
            &dir.path().join("h.sqlite"),
            Retention::default(),
            100,
            stats.clone(),
        )
        .unwrap();
        let room: Arc<str> = "r".into();
        let mut ring = History::new(4);
        for seq in 1..=3 {
            let out = publish(seq);
            a.append(&room, unix_millis(), E, &out);
            ring.push(&out);
        }
        a.retire(&room, 3, E, ring);
        // Once the writer has the messages on disk it forgets the room's note, which changes
        // the name's version: wait for that, so that nothing changes during the read below.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.notes.lock().notes.is_empty() {
            assert!(Instant::now() < deadline, "the writer never caught up");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Read while nothing changes: used as it is, no read under the lock.
        let prepared = a.prepare("r", 4);
        let seed = a.seed("r", 4, Some(prepared));
        assert_eq!(seed.last_seq, 3);
        assert_eq!(stats.history_db_locked_reads.get(), 0);

        // The room lives again and retires at seq 9 while a read prepared before is in
        // flight: that read is stale and must not number the room from 3.
        let prepared = a.prepare("r", 4);
        let mut ring = History::new(4);
        for seq in 4..=9 {
            let out = publish(seq);
            a.append(&room, unix_millis(), E, &out);
            ring.push(&out);
        }
        a.retire(&room, 9, E, ring);
        // The writer may have flushed and dropped the note by now: either way, 9.
        a.close(Duration::from_secs(10));
        let seed = a.seed("r", 4, Some(prepared));
        assert_eq!(seed.last_seq, 9);
        assert_eq!(seed.history.first_seq(), Some(6));
        assert_eq!(stats.history_db_locked_reads.get(), 1);
    }

    #[test]
    fn per_room_retention_keeps_the_last_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let stats = Arc::new(Stats::new());
        let room: Arc<str> = "r".into();
        let a = Archive::open(&path, Retention::PerRoom(3), 100, stats.clone()).unwrap();
        for seq in 1..=10 {
            a.append(&room, unix_millis(), E, &publish(seq));
        }
        // The writer prunes the rooms it wrote to when it stops.
        a.close(Duration::from_secs(10));
        let page = a.page("r", u64::MAX, 100).unwrap().0;
        assert_eq!(page.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [10, 9, 8]);
    }

    #[test]
    fn age_retention_deletes_older_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let stats = Arc::new(Stats::new());
        let room: Arc<str> = "r".into();
        let a = Archive::open(&path, Retention::Age(Duration::from_secs(60)), 100, stats).unwrap();
        let now = unix_millis();
        a.append(&room, now - 120_000, E, &publish(1));
        a.append(&room, now - 90_000, E, &publish(2));
        a.append(&room, now, E, &publish(3));
        a.close(Duration::from_secs(10));
        let page = a.page("r", u64::MAX, 100).unwrap().0;
        assert_eq!(page.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3]);
    }
}
