//! Per-room settings: the `--rooms-config` TOML file, checked whole at start and on SIGHUP, and
//! resolved for one room name at a time (when a room is created, and for every room on reload).
//!
//! The file has a `[defaults]` table and `[rooms."NAME"]` tables, where NAME is a room name or a
//! prefix ending in `*` (`"post:*"`). A room's settings are the server's flags, overlaid by
//! `[defaults]`, overlaid by the longest matching prefix entry, overlaid by the exact entry: each
//! layer changes only the keys it sets. Every key and value is checked while parsing, so an error
//! carries the file's line and column (toml's spans) and the key's whole path (serde
//! `deny_unknown_fields`, with the path recorded by `serde_path_to_error`).
//!
//! A `[routes]` table maps URL path templates to rooms (`config::routes`); it is checked and
//! reloaded with the rest of the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::rate::RateLimitArg;
use crate::config::routes::{PathTemplate, Routes};
use crate::proto::names::{direct_users, validate_room, NameError, MAX_ROOM_BYTES};

/// Longest password accepted in the file, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Largest `room_buffer` (the same bound as `--room-buffer`).
pub const MAX_ROOM_BUFFER: u64 = 1_048_576;
/// Largest `max_members` cap.
pub const MAX_MEMBERS_CAP: u64 = 10_000_000;
/// Largest `history` depth.
pub const MAX_HISTORY: u64 = 1_000_000;
/// Largest `history_bytes` accepted (1 TiB, as `--room-history-bytes`).
pub const MAX_HISTORY_BYTES: u64 = 1 << 40;

/// What a room's presence frames carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    /// Joined and left user names plus the member count (the default).
    Events,
    /// The member count only: `joined` and `left` are always empty.
    Counts,
    /// No presence frames at all.
    Off,
}

/// A room password. Compared in constant time; never printed (`Debug` is redacted) and never
/// serialised, so it cannot reach a log line or the room-info API.
#[derive(Clone)]
pub struct Password(Arc<[u8]>);

impl Password {
    /// Whether `given` is this password. Constant time in the password's contents (`subtle`);
    /// only a length mismatch answers early, which reveals the length and nothing else.
    pub fn matches(&self, given: &str) -> bool {
        bool::from(self.0.ct_eq(given.as_bytes()))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PasswordVisitor)
    }
}

/// Accepts a string; refuses anything else without echoing it (serde's usual "invalid type:
/// integer `1234`" would put a mistyped password into the error message and the log).
struct PasswordVisitor;

impl PasswordVisitor {
    fn not_a_string<E: de::Error>() -> E {
        E::custom("password must be a string")
    }
}

impl de::Visitor<'_> for PasswordVisitor {
    type Value = Password;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a password string")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Password, E> {
        if s.is_empty() {
            return Err(E::custom("password is empty"));
        }
        if s.len() > MAX_PASSWORD_BYTES {
            return Err(E::custom(format!(
                "password is longer than {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        Ok(Password(s.as_bytes().into()))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Password, E> {
        Err(Self::not_a_string())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Password, E> {
        Err(Self::not_a_string())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Password, E> {
        Err(Self::not_a_string())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Password, E> {
        Err(Self::not_a_string())
    }
}

/// An integer from `MIN` to `MAX`, checked while parsing so the error points at the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match u64::try_from(v) {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Bounded(n)),
            _ => Err(de::Error::custom(format!(
                "{v} is out of range: expected an integer from {MIN} to {MAX}"
            ))),
        }
    }
}

/// One table of the file: `[defaults]` or `[rooms."NAME"]`. Every key is optional; an absent key
/// leaves the layer below in force.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    password: Option<Password>,
    /// Unlisted: left out of `/api/rooms` and `$lobby`. Absent: private exactly when the room
    /// has a password.
    private: Option<bool>,
    /// 0 means no cap.
    max_members: Option<Bounded<0, MAX_MEMBERS_CAP>>,
    /// 0 turns history off.
    history: Option<Bounded<0, MAX_HISTORY>>,
    /// Bytes of kept history; 0 keeps none.
    history_bytes: Option<Bounded<0, MAX_HISTORY_BYTES>>,
    rate_limit: Option<RateLimitArg>,
    presence: Option<Presence>,
    room_buffer: Option<Bounded<1, MAX_ROOM_BUFFER>>,
    compression: Option<bool>,
}

/// A key of the `[rooms]` table: an exact room name, or a prefix when it ends in `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let reason = |e: NameError| match e {
            NameError::Reserved => "names starting with `$` are the server's and take no settings",
            e => e.room_reason(),
        };
        match s.strip_suffix('*') {
            Some("") => Err(de::Error::custom(
                "`*` alone would match every room: use [defaults]",
            )),
            Some(prefix) => {
                // A prefix must be the start of some valid room name.
                if prefix.len() >= MAX_ROOM_BYTES {
                    return Err(de::Error::custom(format!(
                        "room prefix `{s}` is longer than {} bytes",
                        MAX_ROOM_BYTES - 1
                    )));
                }
                // `dm:` is the start of many a room name, though not a whole one itself.
                match validate_room(prefix) {
                    Err(NameError::BadDirect) => Ok(()),
                    r => r,
                }
                .map_err(|e| de::Error::custom(format!("room prefix `{s}`: {}", reason(e))))?;
                Ok(Pattern::Prefix(prefix.to_owned()))
            }
            None => {
                validate_room(&s)
                    .map_err(|e| de::Error::custom(format!("room `{s}`: {}", reason(e))))?;
                Ok(Pattern::Exact(s))
            }
        }
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Entry,
    #[serde(default)]
    rooms: BTreeMap<Pattern, Entry>,
    /// Path template → room template. The values keep their spans: a room template is checked
    /// against its path after parsing, and its errors point at it.
    #[serde(default)]
    routes: BTreeMap<PathTemplate, toml::Spanned<String>>,
}

/// One room's settings, resolved from the flags and the file.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// Joining needs this password.
    pub password: Option<Password>,
    /// `private` as the file says it; `None`: private exactly when there is a password (see
    /// `is_private`).
    pub private: Option<bool>,
    /// Most members at once; a join beyond it is refused with `room_full`. `None`: no cap.
    pub max_members: Option<u32>,
    /// Messages of history to keep. `None`: the file does not say, `--history` decides.
    pub history: Option<u32>,
    /// Bytes of history to keep. `None`: the file does not say, `--room-history-bytes` decides.
    pub history_bytes: Option<u64>,
    /// Per-room publish limit. `None`: the file does not say, `--room-rate-limit` decides.
    pub rate_limit: Option<RateLimitArg>,
    pub presence: Presence,
    /// Broadcast ring size, used when the room is created (a reload does not resize live rooms).
    pub room_buffer: usize,
    /// `compression = false`: this room's messages go uncompressed even to sockets that
    /// negotiated permessage-deflate (already compressed payloads gain nothing from it).
    pub compression: bool,
}

impl RoomSettings {
    /// The settings every room has without a file: the flags' values and no restriction.
    pub fn from_flags(room_buffer: usize) -> RoomSettings {
        RoomSettings {
            password: None,
            private: None,
            max_members: None,
            history: None,
            history_bytes: None,
            rate_limit: None,
            presence: Presence::Events,
            room_buffer: room_buffer.max(1),
            compression: true,
        }
    }

    fn overlay(&mut self, e: &Entry) {
        if let Some(p) = &e.password {
            self.password = Some(p.clone());
        }
        if let Some(p) = e.private {
            self.private = Some(p);
        }
        if let Some(Bounded(n)) = e.max_members {
            self.max_members = (n > 0).then_some(n as u32);
        }
        if let Some(Bounded(n)) = e.history {
            self.history = Some(n as u32);
        }
        if let Some(Bounded(n)) = e.history_bytes {
            self.history_bytes = Some(n);
        }
        if let Some(r) = e.rate_limit {
            self.rate_limit = Some(r);
        }
        if let Some(p) = e.presence {
            self.presence = p;
        }
        if let Some(Bounded(n)) = e.room_buffer {
            self.room_buffer = n as usize;
        }
        if let Some(c) = e.compression {
            self.compression = c;
        }
    }
}

impl RoomSettings {
    /// Whether the room is left out of every listing (`/api/rooms`, `$lobby`): marked
    /// `private`, or guarded by a password unless the file says `private = false` (a room
    /// whose name is for its members stays unlisted unless its operator lists it).
    /// Direct-message rooms always are: their names say who talks to whom.
    pub fn is_private(&self) -> bool {
        self.private.unwrap_or(self.password.is_some())
    }
}

impl Default for RoomSettings {
    fn default() -> Self {
        RoomSettings::from_flags(1024)
    }
}

/// Every room's settings: the flags and, when given, the parsed file.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the settings came from, for reload (`None`: flags only).
    path: Option<PathBuf>,
    /// `--room-buffer`, kept to rebuild the defaults on reload.
    flag_room_buffer: usize,
    /// Flags overlaid by `[defaults]`: what a room matching no entry gets.
    defaults: RoomSettings,
    exact: HashMap<Box<str>, Entry>,
    /// Longest first, so the first match is the longest.
    prefixes: Vec<(Box<str>, Entry)>,
    /// `[routes]`: which request paths lead into which rooms.
    routes: Routes,
}

/// Why a settings file was refused. Its text names the file, the line and column, and the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read the rooms config: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
}

impl Settings {
    /// Settings from the flags alone (no `--rooms-config`).
    pub fn from_flags(room_buffer: usize) -> Settings {
        Settings {
            path: None,
            flag_room_buffer: room_buffer,
            defaults: RoomSettings::from_flags(room_buffer),
            exact: HashMap::new(),
            prefixes: Vec::new(),
            routes: Routes::default(),
        }
    }

    /// Reads and checks the file at `path`, on top of the flags' `room_buffer`.
    pub fn load(path: &Path, room_buffer: usize) -> Result<Settings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut settings = Settings::parse(&text, &path.display().to_string(), room_buffer)?;
        settings.path = Some(path.to_owned());
        Ok(settings)
    }

    /// Reads the same file again (SIGHUP). `None` when there is no file to reload.
    pub fn reload(&self) -> Option<Result<Settings, SettingsError>> {
        let path = self.path.as_ref()?;
        Some(Settings::load(path, self.flag_room_buffer))
    }

    /// Parses file contents; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str, room_buffer: usize) -> Result<Settings, SettingsError> {
        let de = toml::Deserializer::parse(text).map_err(|e| invalid(origin, text, &e, None))?;
        let file: File = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(origin, text, e.inner(), Some(e.path())))?;
        let mut defaults = RoomSettings::from_flags(room_buffer);
        defaults.overlay(&file.defaults);
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        for (pattern, entry) in file.rooms {
            match pattern {
                Pattern::Exact(name) => {
                    exact.insert(name.into_boxed_str(), entry);
                }
                Pattern::Prefix(prefix) => prefixes.push((prefix.into_boxed_str(), entry)),
            }
        }
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let routes = Routes::build(
            file.routes
                .into_iter()
                .map(|(path, room)| {
                    let span = room.span();
                    (path, room.into_inner(), Some(span))
                })
                .collect(),
        )
        .map_err(|e| {
            let (line, column) = position(text, e.span.as_ref().map(|s| s.start));
            SettingsError::Invalid {
                path: origin.to_owned(),
                line,
                column,
                key: Some(e.key),
                message: e.message,
            }
        })?;
        Ok(Settings {
            path: None,
            flag_room_buffer: room_buffer,
            defaults,
            exact,
            prefixes,
            routes,
        })
    }

    /// The route templates (`[routes]`).
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The file these settings came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The settings of room `name`: defaults, then the longest matching prefix, then the exact
    /// entry, each overriding only the keys it sets.
    pub fn resolve(&self, name: &str) -> RoomSettings {
        let mut s = self.defaults.clone();
        if let Some((_, e)) = self.prefixes.iter().find(|(p, _)| name.starts_with(&**p)) {
            s.overlay(e);
        }
        if let Some(e) = self.exact.get(name) {
            s.overlay(e);
        }
        if direct_users(name).is_some() {
            s.private = Some(true);
        }
        s
    }

    /// `resolve(name).is_private()` without copying the settings: listings ask it of every
    /// room they show.
    pub fn is_private(&self, name: &str) -> bool {
        let prefix = self
            .prefixes
            .iter()
            .find(|(p, _)| name.starts_with(&**p))
            .map(|(_, e)| e);
        let exact = self.exact.get(name);
        let layers = [exact, prefix];
        let password = self.defaults.password.is_some()
            || layers.iter().flatten().any(|e| e.password.is_some());
        let private = layers
            .iter()
            .flatten()
            .find_map(|e| e.private)
            .or(self.defaults.private);
        direct_users(name).is_some() || private.unwrap_or(password)
    }

    /// Whether joining room `name` needs a password (listings mark such rooms).
    pub fn has_password(&self, name: &str) -> bool {
        self.defaults.password.is_some()
            || self.exact.get(name).is_some_and(|e| e.password.is_some())
            || self
                .prefixes
                .iter()
                .find(|(p, _)| name.starts_with(&**p))
                .is_some_and(|(_, e)| e.password.is_some())
    }
}

/// Turns toml's error, and the key path serde_path_to_error recorded on the way down, into one
/// naming the file, line, column and key. A syntax error (found before any key is read) names
/// no key.
fn invalid(
    origin: &str,
    text: &str,
    e: &toml::de::Error,
    path: Option<&serde_path_to_error::Path>,
) -> SettingsError {
    let (line, column) = position(text, e.span().map(|s| s.start));
    SettingsError::Invalid {
        path: origin.to_owned(),
        line,
        column,
        key: path.and_then(key_path),
        message: e.message().trim_end().to_owned(),
    }
}

/// Line and column (both from 1) of byte `offset` in `text`; `None` is the start.
fn position(text: &str, offset: Option<usize>) -> (usize, usize) {
    let Some(offset) = offset else {
        return (1, 1);
    };
    let start = offset.min(text.len());
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A key path as TOML writes it: `rooms."post:*".presence`. Bare keys stay bare, others are quoted.
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        let key = match segment {
            // The fields `toml::Spanned` reads a value through are no part of the file's keys.
            Segment::Map { key } if key.starts_with("$__serde_spanned") => continue,
            Segment::Map { key } => key,
            Segment::Enum { variant } => variant,
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Unknown => continue,
        };
        if !out.is_empty() {
            out.push('.');
        }
        let bare = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if bare {
            out.push_str(key);
        } else {
            out.push_str(&format!("{key:?}"));
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[defaults]
max_members = 500
presence = "counts"
rate_limit = "20/s burst 40"

[rooms."post:*"]
presence = "off"
room_buffer = 64
compression = false

[rooms."post:vip:*"]
password = "prefix-secret"

[rooms."post:42"]
max_members = 0
history = 10

[rooms.general]
presence = "events"
rate_limit = "off"
"#;

    fn parse(text: &str) -> Result<Settings, SettingsError> {
        Settings::parse(text, "rooms.toml", 1024)
    }

    #[test]
    fn exact_beats_longest_prefix_beats_defaults() {
        let s = parse(SAMPLE).unwrap();

        let other = s.resolve("lounge");
        assert_eq!(other.max_members, Some(500));
        assert_eq!(other.presence, Presence::Counts);
        assert_eq!(
            other.room_buffer, 1024,
            "the flag when the file says nothing"
        );
        assert_eq!(other.history, None, "unset: the server flag decides");
        assert!(other.password.is_none());
        assert_eq!(
            other.rate_limit.map(|r| r.to_string()).as_deref(),
            Some("20/s burst 40")
        );

        assert!(
            other.compression,
            "compression is on unless a room turns it off"
        );
        let post = s.resolve("post:7");
        assert!(!post.compression);
        assert_eq!(post.presence, Presence::Off);
        assert_eq!(post.room_buffer, 64);
        assert_eq!(
            post.max_members,
            Some(500),
            "keys the prefix does not set stay"
        );

        let vip = s.resolve("post:vip:1");
        assert!(vip.password.as_ref().unwrap().matches("prefix-secret"));
        // Only the longest prefix applies: `post:*`'s presence does not reach `post:vip:*`.
        assert_eq!(vip.presence, Presence::Counts);
        assert_eq!(vip.room_buffer, 1024);

        let exact = s.resolve("post:42");
        assert_eq!(exact.max_members, None, "0 lifts the cap");
        assert_eq!(exact.history, Some(10));
        assert_eq!(
            exact.presence,
            Presence::Off,
            "the prefix under the exact entry"
        );
        assert_eq!(exact.room_buffer, 64);

        let general = s.resolve("general");
        assert_eq!(general.presence, Presence::Events);
        assert_eq!(general.rate_limit, Some(RateLimitArg(None)));

        // A prefix matches by bytes, so `post:` itself matches `post:*`, `pos` does not.
        assert_eq!(s.resolve("post:").presence, Presence::Off);
        assert_eq!(s.resolve("pos").presence, Presence::Counts);
    }

    #[test]
    fn no_file_means_flags_and_no_limits() {
        let s = Settings::from_flags(77);
        let r = s.resolve("anything");
        assert_eq!(r.room_buffer, 77);
        assert_eq!(r.presence, Presence::Events);
        assert!(r.password.is_none() && r.max_members.is_none());
        let empty = parse("").unwrap();
        assert_eq!(empty.resolve("x").room_buffer, 1024);
    }

    #[test]
    fn private_rooms_are_marked_or_guarded() {
        let s = parse(
            "[rooms.\"staff*\"]\nprivate = true\n[rooms.staff-open]\nprivate = false\n\
             [rooms.vault]\npassword = \"s3cret-pass\"\nprivate = false\n\
             [rooms.safe]\npassword = \"s3cret-pass\"\n[rooms.\"dm:*\"]\nprivate = false\n",
        )
        .unwrap();
        for (name, private) in [
            ("lobby-ish", false),
            ("staff", true),
            ("staff-room", true),
            ("staff-open", false),
            // A password makes a room private unless the file lists it.
            ("vault", false),
            ("safe", true),
            // Direct-message rooms are private whatever the file says.
            ("dm:alice+bob", true),
        ] {
            assert_eq!(s.is_private(name), private, "{name}");
            assert_eq!(s.resolve(name).is_private(), private, "{name}");
        }
        assert!(s.has_password("vault") && s.has_password("safe") && !s.has_password("staff"));
        let all = parse("[defaults]\nprivate = true\n[rooms.hall]\nprivate = false\n").unwrap();
        assert!(all.is_private("anything"));
        assert!(!all.is_private("hall"));
    }

    #[test]
    fn passwords_compare_exactly_and_never_print() {
        let s = parse("[rooms.vip]\npassword = \"s3cret\"\n").unwrap();
        let p = s.resolve("vip").password.unwrap();
        assert!(p.matches("s3cret"));
        assert!(!p.matches("s3cret "));
        assert!(!p.matches("s3cre"));
        assert!(!p.matches(""));
        let printed = format!("{:?}", s.resolve("vip"));
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn rate_limits_take_the_one_syntax() {
        let s =
            parse("[rooms.a]\nrate_limit = \"30/m\"\n[rooms.b]\nrate_limit = \"5/s burst 9\"\n")
                .unwrap();
        let a = s.resolve("a").rate_limit.and_then(|r| r.0).unwrap();
        assert_eq!(
            (a.count.get(), a.burst.get()),
            (30, 30),
            "the burst defaults to the rate"
        );
        let b = s.resolve("b").rate_limit.and_then(|r| r.0).unwrap();
        assert_eq!((b.count.get(), b.burst.get()), (5, 9));
        // The flags' deprecated spellings were never valid here.
        let e = error_of("[rooms.a]\nrate_limit = \"20:40\"\n");
        assert!(
            e.contains("key `rooms.a.rate_limit`") && e.contains("20:40"),
            "{e}"
        );
    }

    /// The error for `text`, as the operator sees it.
    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let e = error_of("[defaults]\npresence = \"events\"\npasword = \"x\"\n");
        assert!(
            e.starts_with("rooms.toml:3:1: key `defaults.pasword`: unknown field `pasword`"),
            "{e}"
        );

        let e = error_of("[rooms.\"post:*\"]\nmax_members = 1\npresense = \"off\"\n");
        assert!(
            e.starts_with("rooms.toml:3:1: key `rooms.\"post:*\".presense`: unknown field"),
            "{e}"
        );

        let e = error_of("[defaults]\n\nmax_members = -3\n");
        assert!(
            e.starts_with("rooms.toml:3:15: key `defaults.max_members`: "),
            "{e}"
        );
        assert!(e.contains("out of range"), "{e}");

        let e = error_of("[rooms.\"post:*\"]\npresence = \"loud\"\n");
        assert!(
            e.starts_with("rooms.toml:2:12: key `rooms.\"post:*\".presence`: "),
            "{e}"
        );
        assert!(e.contains("loud"), "{e}");

        let e = error_of("[rooms.a]\nroom_buffer = 0\n");
        assert!(
            e.starts_with("rooms.toml:2:15: key `rooms.a.room_buffer`: "),
            "{e}"
        );

        let e = error_of("[rooms.a]\nrate_limit = \"fast\"\n");
        assert!(
            e.contains("key `rooms.a.rate_limit`") && e.contains("fast"),
            "{e}"
        );

        let e = error_of("[rooms.a]\npassword = \"\"\n");
        assert!(
            e.contains("key `rooms.a.password`") && e.contains("empty"),
            "{e}"
        );

        // A mistyped password is not echoed.
        let e = error_of("[rooms.a]\npassword = 123456789\n");
        assert!(
            e.contains("key `rooms.a.password`") && e.contains("must be a string"),
            "{e}"
        );
        assert!(!e.contains("123456789"), "{e}");

        let e = error_of("[rooms.a]\nmax_members = \"ten\"\n");
        assert!(e.contains("key `rooms.a.max_members`"), "{e}");

        let e = error_of("[defaults]\nmax_members = 5\n\n[rooms.\"bad name\"]\nmax_members = 1\n");
        assert!(
            e.starts_with("rooms.toml:4:8: key `rooms.\"bad name\"`: "),
            "{e}"
        );

        let e = error_of("[rooms.\"$lobby\"]\nmax_members = 1\n");
        assert!(
            e.starts_with("rooms.toml:1:8: key `rooms.\"$lobby\"`: ")
                && e.contains("take no settings"),
            "{e}"
        );

        let e = error_of("[rooms.\"*\"]\nmax_members = 1\n");
        assert!(e.contains("[defaults]"), "{e}");

        let e = error_of("[room.a]\nmax_members = 1\n");
        assert!(
            e.starts_with("rooms.toml:1:2: key `room`: unknown field"),
            "{e}"
        );

        // A syntax error comes before any key is read: no key path.
        let e = error_of("[defaults]\nmax_members = 1\nmax_members = 2\n");
        assert!(e.starts_with("rooms.toml:3:1: duplicate key"), "{e}");

        let e = error_of("[rooms.a]\nhistory = 1e3\n");
        assert!(e.contains("key `rooms.a.history`"), "{e}");

        // An inline table names the inner key.
        let e = error_of("[rooms]\n\"post:*\" = { presence = \"loud\" }\n");
        assert!(
            e.starts_with("rooms.toml:2:25: key `rooms.\"post:*\".presence`: "),
            "{e}"
        );
    }

    #[test]
    fn routes_are_read_and_their_errors_point_into_the_file() {
        let s = parse(
            "[rooms.general]\nmax_members = 5\n\n[routes]\n\"/ws/posts/{id}/live\" = \"post:{id}\"\n\
             \"/ws/chat/{room}\" = \"{room}\"\n",
        )
        .unwrap();
        assert_eq!(s.routes().len(), 2);
        assert_eq!(
            s.routes().find("/ws/posts/42/live"),
            Some(Ok("post:42".to_owned()))
        );
        assert!(parse("").unwrap().routes().is_empty());

        // A bad path points at the key.
        let e = error_of("[routes]\n\"/ws/x/{id\" = \"{id}\"\n");
        assert!(
            e.starts_with("rooms.toml:2:1: key `routes.\"/ws/x/{id\"`: ")
                && e.contains("unbalanced"),
            "{e}"
        );
        // A bad room points at the value.
        let e = error_of("[routes]\n\"/live/{id}\" = \"post:{slug}\"\n");
        assert!(
            e.starts_with("rooms.toml:2:16: key `routes.\"/live/{id}\"`: ")
                && e.contains("`{slug}` is not in the path"),
            "{e}"
        );
        // An overlap points at the later entry and names the earlier one.
        let e = error_of("[routes]\n\"/a/{x}\" = \"{x}\"\n\"/a/b\" = \"b\"\n");
        assert!(
            e.starts_with("rooms.toml:3:10: key `routes.\"/a/b\"`: ") && e.contains("`/a/{x}`"),
            "{e}"
        );
        // Built-in routes cannot be taken.
        let e = error_of("[routes]\n\"/ws/{room}\" = \"{room}\"\n");
        assert!(
            e.starts_with("rooms.toml:2:1: ") && e.contains("server answers itself"),
            "{e}"
        );
        // Not a string: the key path has no trace of how the span is read.
        let e = error_of("[routes]\n\"/a/{x}\" = 5\n");
        assert!(e.starts_with("rooms.toml:2:"), "{e}");
        assert!(
            e.contains("key `routes.\"/a/{x}\"`") && !e.contains("serde_spanned"),
            "{e}"
        );
    }

    #[test]
    fn the_configuration_doc_lists_every_key() {
        // serde lists the keys an entry takes in its unknown-field error.
        let e = error_of("[defaults]\nnot_a_key = 1\n");
        let (_, list) = e.split_once("expected one of ").expect("the key list");
        let keys: Vec<&str> = list.split(", ").map(|k| k.trim_matches('`')).collect();
        assert!(keys.len() >= 6, "{e}");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIGURATION.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (_, section) = doc
            .split_once("## Rooms file")
            .expect("a Rooms file section");
        // The keys' table, not the `[routes]` subsection after it.
        let section = section.split("\n### ").next().unwrap_or(section);
        let documented: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(key, _)| key)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        let mut documented_sorted = documented.clone();
        documented_sorted.sort_unstable();
        assert_eq!(documented_sorted, sorted, "the key table of {path}");
    }
}
