//! Built-in accounts (`--accounts-db`): the SQLite store of account names and Argon2id
//! password hashes, the rules a new account obeys, and the service that runs every hash on
//! low-priority threads of its own, a few at a time. No HTTP here: `http::accounts` answers.
//!
//! A name is unique by its key, the NFKC form lower-cased: `Alice`, `alice` and `ａｌｉｃｅ`
//! (fullwidth) are one account, shown and put in tokens as first registered. Logging in takes
//! any spelling with the same key.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::Semaphore;
use unicode_normalization::UnicodeNormalization;

use crate::core::archive::create_private;
use crate::core::stats::unix_millis;
use crate::core::workers::{WorkError, Workers};
use crate::proto::names::validate_user;

/// Shortest password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password, in bytes: Argon2 takes any length, but a megabyte password is a way to
/// make every request cost more than it should.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Argon2id memory per hash, KiB: OWASP's minimum (19 MiB) with `ITERATIONS` and `LANES`.
/// One hash takes tens of milliseconds of one core; the hash pool bounds how many run at once.
pub const MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes over the memory.
pub const ITERATIONS: u32 = 2;
/// Argon2id lanes: one, so a hash uses one core.
pub const LANES: u32 = 1;

/// Requests allowed to wait for a hash, per hash slot, before new ones are refused (`Busy`):
/// a login flood queues a second or so of work, not an unbounded pile of held sockets.
const WAITING_PER_SLOT: usize = 32;
/// Database lookups (no hash) run at once on the blocking pool.
const LOOKUP_SLOTS: usize = 2;
/// How long a statement waits for another process holding the database's write lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The schema, one step per version (`PRAGMA user_version` counts the steps applied).
const MIGRATIONS: &[&str] = &["CREATE TABLE accounts (
        key TEXT PRIMARY KEY,        -- NFKC, lower-cased: what makes a name unique
        name TEXT NOT NULL,          -- as registered: the tokens' `sub`
        hash TEXT NOT NULL,          -- Argon2id, PHC string (parameters and salt inside)
        created_at INTEGER NOT NULL  -- Unix milliseconds
    ) WITHOUT ROWID;"];

/// An account as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The name breaks a rule; the text says which.
    #[error("{0}")]
    BadName(&'static str),
    /// The password breaks a rule; the text says which.
    #[error("{0}")]
    BadPassword(&'static str),
    #[error("the user name is taken")]
    NameTaken,
    /// Every hash slot is busy and the queue before them is full.
    #[error("too many password checks are waiting")]
    Busy,
    #[error("accounts database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("accounts database: {0}")]
    Io(#[from] std::io::Error),
    /// The file was made by a newer roomcast (its schema version is past ours).
    #[error("accounts database: schema version {0} is newer than this roomcast knows ({known}): upgrade roomcast", known = MIGRATIONS.len())]
    Newer(i64),
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The blocking task running the job panicked or was cancelled at shutdown.
    #[error("the accounts worker stopped")]
    Worker,
}

/// The key that makes a name unique: NFKC (compatibility forms folded: fullwidth letters,
/// ligatures, non-breaking spaces), then lower-cased.
pub fn name_key(name: &str) -> String {
    name.nfkc().collect::<String>().to_lowercase()
}

/// Characters that show nothing and would let two names look alike: zero-width characters,
/// bidirectional controls, the soft hyphen, the byte-order mark, tag characters.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{E0000}'..='\u{E0FFF}')
}

/// The rules of an account name: the user-name rules of every connection (1–32 characters, no
/// control character), and no invisible character and no space at either end, so that two
/// accounts cannot look the same. Uniqueness (by `name_key`) is the store's.
pub fn check_name(name: &str) -> Result<(), AccountError> {
    validate_user(name).map_err(|e| AccountError::BadName(e.user_reason()))?;
    if name.chars().any(invisible) {
        return Err(AccountError::BadName(
            "user name contains an invisible character (zero-width, bidirectional control, soft hyphen)",
        ));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(AccountError::BadName(
            "user name starts or ends with a space",
        ));
    }
    Ok(())
}

/// The rules of a password: at least `MIN_PASSWORD_CHARS` characters, at most
/// `MAX_PASSWORD_BYTES` bytes. Any character is allowed; it is compared byte for byte.
pub fn check_password(password: &str) -> Result<(), AccountError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(AccountError::BadPassword(
            "password is longer than 1024 bytes",
        ));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AccountError::BadPassword(
            "password is shorter than 8 characters",
        ));
    }
    Ok(())
}

/// One stored row.
struct Row {
    account: Account,
    hash: String,
}

/// The accounts database: one connection, used from the blocking pool only (every method
/// blocks on the disk).
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens the file at `path`, creating it readable by this user only (0600) if missing, in
    /// WAL mode (several processes may share it), and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, AccountError> {
        create_private(path)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "the accounts database did not switch to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Adds an account; `NameTaken` when its key is someone's already.
    pub fn insert(&self, name: &str, hash: &str, created_at: u64) -> Result<(), AccountError> {
        let inserted = self.conn.lock().execute(
            "INSERT INTO accounts (key, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name_key(name), name, hash, created_at as i64],
        );
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                Err(AccountError::NameTaken)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn row(&self, name: &str) -> Result<Option<Row>, AccountError> {
        let row = self
            .conn
            .lock()
            .query_row(
                "SELECT name, hash, created_at FROM accounts WHERE key = ?1",
                [name_key(name)],
                |r| {
                    Ok(Row {
                        account: Account {
                            name: r.get(0)?,
                            created_at: r.get::<_, i64>(2)?.max(0) as u64,
                        },
                        hash: r.get(1)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// The account whose key is `name`'s.
    pub fn find(&self, name: &str) -> Result<Option<Account>, AccountError> {
        Ok(self.row(name)?.map(|r| r.account))
    }

    /// Removes the account whose key is `name`'s; whether there was one.
    pub fn delete(&self, name: &str) -> Result<bool, AccountError> {
        let n = self
            .conn
            .lock()
            .execute("DELETE FROM accounts WHERE key = ?1", [name_key(name)])?;
        Ok(n > 0)
    }

    /// Every account, by name.
    pub fn list(&self) -> Result<Vec<Account>, AccountError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare("SELECT name, created_at FROM accounts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(Account {
                name: r.get(0)?,
                created_at: r.get::<_, i64>(1)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

/// Applies the migrations the file has not had, in one write transaction: two processes
/// starting on one new file at once migrate it once.
fn migrate(conn: &mut Connection) -> Result<(), AccountError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(AccountError::Newer(version));
    }
    for step in &MIGRATIONS[version.max(0) as usize..] {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

/// Argon2id with the parameters above, and a hash of a random password that an unknown name
/// is checked against, so that a login for a name nobody has costs what a wrong password does.
pub struct Hasher {
    argon: Argon2<'static>,
    dummy: String,
}

impl Hasher {
    /// Computes the dummy hash: one hash's time.
    pub fn new() -> Result<Hasher, AccountError> {
        let params = Params::new(MEMORY_KIB, ITERATIONS, LANES, None)
            .map_err(|e| AccountError::Hash(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut hasher = Hasher {
            argon,
            dummy: String::new(),
        };
        let random = SaltString::generate(&mut OsRng);
        hasher.dummy = hasher.hash(random.as_str())?;
        Ok(hasher)
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) with a fresh random salt.
    pub fn hash(&self, password: &str) -> Result<String, AccountError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| AccountError::Hash(e.to_string()))
    }

    /// Whether `password` matches `phc` (under the parameters written in it). A stored hash
    /// that does not parse matches nothing; it is checked against the dummy instead, so that
    /// it takes a hash's time like every other answer.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        match PasswordHash::new(phc) {
            Ok(parsed) => self
                .argon
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "a stored password hash does not parse");
                self.verify_dummy(password);
                false
            }
        }
    }

    /// Checks `password` against the dummy hash: the time of a check, the answer of none.
    pub fn verify_dummy(&self, password: &str) {
        if let Ok(parsed) = PasswordHash::new(&self.dummy) {
            let _ = self.argon.verify_password(password.as_bytes(), &parsed);
        }
    }
}

/// Creates an account after checking the rules: what `POST /register` runs on the blocking
/// pool and `roomcast user add` runs as it is. A taken name costs no hash (the 409 says it is
/// taken anyway); two registrations of one name at once meet the key's uniqueness.
pub fn create(
    store: &Store,
    hasher: &Hasher,
    name: &str,
    password: &str,
) -> Result<Account, AccountError> {
    check_name(name)?;
    check_password(password)?;
    if store.find(name)?.is_some() {
        return Err(AccountError::NameTaken);
    }
    let hash = hasher.hash(password)?;
    let account = Account {
        name: name.to_owned(),
        created_at: unix_millis(),
    };
    store.insert(&account.name, &hash, account.created_at)?;
    Ok(account)
}

/// What the HTTP routes call. Every password hash and check runs on threads of their own at the
/// lowest CPU priority (`workers.rs`), `slots` at once (Argon2id takes a core and 19 MiB each),
/// never on the runtime's threads; requests beyond them wait in a queue of bounded length and
/// past it are refused with `Busy`. Lookups without a hash go to the blocking pool.
pub struct Accounts {
    store: Arc<Store>,
    hasher: Arc<Hasher>,
    hashes: Workers,
    lookups: Pool,
}

/// A semaphore before the blocking pool, and a bound on the requests waiting for it.
struct Pool {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Counts one waiting request until dropped (also when the request is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn new(slots: usize) -> Pool {
        let slots = slots.max(1);
        Pool {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            max_waiting: slots * WAITING_PER_SLOT,
        }
    }

    /// Runs `job` on the blocking pool once a slot is free. Cancel-safe: dropped while waiting,
    /// it gives up its place; dropped while the job runs, the job finishes and frees its slot.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
    ) -> Result<T, AccountError> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(AccountError::Busy);
        }
        let waiting = Waiting(&self.waiting);
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AccountError::Worker)?;
        drop(waiting);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            job()
        })
        .await
        .map_err(|_| AccountError::Worker)?
    }
}

impl Accounts {
    /// `hash_slots`: hashes computed at once (at least 1), each on a thread of its own.
    pub fn new(store: Store, hasher: Hasher, hash_slots: usize) -> Result<Accounts, AccountError> {
        let slots = hash_slots.max(1);
        Ok(Accounts {
            store: Arc::new(store),
            hasher: Arc::new(hasher),
            hashes: Workers::new("roomcast-hash", slots, slots * WAITING_PER_SLOT)?,
            lookups: Pool::new(LOOKUP_SLOTS),
        })
    }

    /// Runs a job that hashes on the hash workers.
    async fn hashing<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
    ) -> Result<T, AccountError> {
        self.hashes.run(job).await.map_err(|e| match e {
            WorkError::Busy => AccountError::Busy,
            WorkError::Stopped => AccountError::Worker,
        })?
    }

    /// Creates an account (see `create`); the rules are checked before waiting for a slot.
    pub async fn register(&self, name: &str, password: &str) -> Result<Account, AccountError> {
        check_name(name)?;
        check_password(password)?;
        let (store, hasher) = (self.store.clone(), self.hasher.clone());
        let (name, password) = (name.to_owned(), password.to_owned());
        self.hashing(move || create(&store, &hasher, &name, &password))
            .await
    }

    /// The account `name` and `password` open, or `None`: an unknown name and a wrong
    /// password take one hash check each and give the same answer.
    pub async fn login(&self, name: &str, password: &str) -> Result<Option<Account>, AccountError> {
        let (store, hasher) = (self.store.clone(), self.hasher.clone());
        let (name, password) = (name.to_owned(), password.to_owned());
        self.hashing(move || match store.row(&name)? {
            Some(row) => Ok(hasher.verify(&password, &row.hash).then_some(row.account)),
            None => {
                hasher.verify_dummy(&password);
                Ok(None)
            }
        })
        .await
    }

    /// The account whose key is `name`'s (no hash: a token already proved who asks).
    pub async fn find(&self, name: &str) -> Result<Option<Account>, AccountError> {
        let store = self.store.clone();
        let name = name.to_owned();
        self.lookups.run(move || store.find(&name)).await
    }
}

/// Hash slots for `--accounts-hash-slots 0`: half the cores, at least one, so that a login
/// flood leaves cores to the deliveries even where the workers' low priority is not available.
pub fn default_hash_slots() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("accounts.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn names_are_unique_by_their_folded_form() {
        assert_eq!(name_key("Alice"), "alice");
        assert_eq!(name_key("ＡＬＩＣＥ"), "alice");
        assert_eq!(name_key("e\u{301}"), name_key("\u{e9}"));
        let (_dir, store) = store();
        store.insert("Alice", "h", 1).unwrap();
        for other in ["alice", "ALICE", "ａｌｉｃｅ"] {
            assert!(
                matches!(store.insert(other, "h", 2), Err(AccountError::NameTaken)),
                "{other}"
            );
        }
        let found = store.find("aLiCe").unwrap().unwrap();
        assert_eq!(found.name, "Alice", "shown as registered");
        assert!(store.delete("ALICE").unwrap());
        assert!(store.find("Alice").unwrap().is_none());
        assert!(!store.delete("alice").unwrap());
    }

    #[test]
    fn name_and_password_rules() {
        for ok in ["alice", "Bob Smith", "zoë", "李"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " alice",
            "alice ",
            "al\u{200B}ice",
            "\u{202E}ecila",
            "a\u{7}",
            &"x".repeat(33),
        ] {
            assert!(
                matches!(check_name(bad), Err(AccountError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(check_password("12345678").is_ok());
        assert!(check_password("ééééééé").is_err(), "7 characters");
        assert!(check_password("éééééééé").is_ok(), "8 characters, 16 bytes");
        assert!(check_password(&"x".repeat(MAX_PASSWORD_BYTES)).is_ok());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
    }

    #[test]
    fn the_schema_is_versioned_and_a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        // Opening again applies nothing twice.
        drop(Store::open(&path).unwrap());
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(Store::open(&path), Err(AccountError::Newer(99))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn hashes_are_argon2id_phc_strings() {
        let h = Hasher::new().unwrap();
        let phc = h.hash("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(h.verify("correct horse", &phc));
        assert!(!h.verify("correct horsE", &phc));
        assert!(!h.verify("correct horse", "not a phc string"));
        assert_ne!(phc, h.hash("correct horse").unwrap(), "salted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn register_then_login() {
        let (_dir, store) = store();
        let accounts = Accounts::new(store, Hasher::new().unwrap(), 1).unwrap();
        let a = accounts.register("Alice", "correct horse").await.unwrap();
        assert_eq!(a.name, "Alice");
        assert!(matches!(
            accounts.register("alice", "another one").await,
            Err(AccountError::NameTaken)
        ));
        assert_eq!(
            accounts.login("ALICE", "correct horse").await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(accounts.login("alice", "wrong horse").await.unwrap(), None);
        assert_eq!(accounts.login("nobody", "wrong horse").await.unwrap(), None);
        assert_eq!(accounts.find("alice").await.unwrap(), Some(a));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_not_grown() {
        let pool = Arc::new(Pool::new(1));
        let gate = Arc::new(std::sync::Barrier::new(2));
        // One job holds the only slot until released; the queue behind it fills up.
        let job = {
            let (pool, held) = (pool.clone(), gate.clone());
            tokio::spawn(async move {
                pool.run(move || {
                    held.wait();
                    Ok(())
                })
                .await
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while pool.slots.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let mut queued = Vec::new();
        for _ in 0..WAITING_PER_SLOT {
            let p = pool.clone();
            queued.push(tokio::spawn(async move { p.run(|| Ok(())).await }));
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while pool.waiting.load(Ordering::Relaxed) < WAITING_PER_SLOT {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(matches!(pool.run(|| Ok(())).await, Err(AccountError::Busy)));
        gate.wait();
        job.await.unwrap().unwrap();
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(pool.waiting.load(Ordering::Relaxed), 0);
        assert!(pool.run(|| Ok(())).await.is_ok());
    }
}
