//! Room and user name rules: the first check every name from the network goes through.

/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 64;
/// Longest user name, in characters.
pub const MAX_USER_CHARS: usize = 32;
/// The server's read-only room of room events (see `lobby`). Names starting with `$` belong to
/// the server; this is the only one a client may join.
pub const LOBBY: &str = "$lobby";
/// Prefix of a direct-message room: `dm:alice+bob` may be joined only by the users it names.
pub const DM_PREFIX: &str = "dm:";

/// Why a name was refused; the text goes to the client verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
    BadCharacter,
    /// Well formed, but starting with `$`: reserved for the server.
    Reserved,
    /// A `dm:` name whose user list is not sorted, repeats a name or has an empty one: each
    /// set of users has exactly one room name, so nobody can open a second room beside it.
    BadDirect,
}

impl NameError {
    pub fn room_reason(self) -> &'static str {
        match self {
            NameError::Empty => "room name is empty",
            NameError::TooLong => "room name is longer than 64 bytes",
            NameError::BadCharacter => {
                "room name may only contain A-Z a-z 0-9 _ - . : # @ (and + in dm: names)"
            }
            NameError::BadDirect => {
                "a dm: room name lists user names sorted, without repeats, joined by +"
            }
            NameError::Reserved => {
                "room names starting with $ are reserved for the server ($lobby may be joined, read-only)"
            }
        }
    }

    /// The error code for a refused room name: `reserved_room` or `bad_room`.
    pub fn room_code(self) -> &'static str {
        match self {
            NameError::Reserved => "reserved_room",
            _ => "bad_room",
        }
    }

    pub fn user_reason(self) -> &'static str {
        match self {
            NameError::Empty => "user name is empty",
            NameError::TooLong => "user name is longer than 32 characters",
            NameError::BadCharacter | NameError::Reserved | NameError::BadDirect => {
                "user name contains a control character"
            }
        }
    }
}

/// A room name a client may create, publish to or look up: 1–64 bytes of
/// `A-Z a-z 0-9 _ - . : # @`. A `$` as the first byte (and only there) makes a well-formed
/// server name, refused with `Reserved`. A `dm:` name may also hold `+` between its user
/// names, which must be sorted and distinct (`BadDirect` otherwise).
pub fn validate_room(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_ROOM_BYTES {
        return Err(NameError::TooLong);
    }
    let (reserved, rest) = match name.strip_prefix('$') {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let direct = !reserved && rest.starts_with(DM_PREFIX);
    let ok = rest.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'_' | b'-' | b'.' | b':' | b'#' | b'@')
            || (direct && b == b'+')
    });
    match (ok, reserved) {
        (false, _) => Err(NameError::BadCharacter),
        (true, true) => Err(NameError::Reserved),
        (true, false) if direct => validate_direct(&rest[DM_PREFIX.len()..]),
        (true, false) => Ok(()),
    }
}

/// The user list of a `dm:` name: non-empty names, each greater than the one before (sorted,
/// no repeats), so one set of users has one room.
fn validate_direct(list: &str) -> Result<(), NameError> {
    let mut previous: Option<&str> = None;
    for user in list.split('+') {
        if user.is_empty() || previous.is_some_and(|p| p >= user) {
            return Err(NameError::BadDirect);
        }
        previous = Some(user);
    }
    Ok(())
}

/// The users a direct-message room (`dm:alice+bob`) admits, or `None` for any other room.
/// `name` must already be valid.
pub fn direct_users(name: &str) -> Option<std::str::Split<'_, char>> {
    name.strip_prefix(DM_PREFIX).map(|list| list.split('+'))
}

/// Whether `user` may be in `room`: always, unless `room` is a direct-message room that does
/// not name `user`.
pub fn direct_admits(room: &str, user: &str) -> bool {
    direct_users(room).is_none_or(|mut users| users.any(|u| u == user))
}

/// A room name a client may join or leave: `validate_room`, plus `$lobby`.
pub fn validate_joinable_room(name: &str) -> Result<(), NameError> {
    if name == LOBBY {
        Ok(())
    } else {
        validate_room(name)
    }
}

/// Whether `name` belongs to the server (starts with `$`). Cheap: one byte.
pub fn is_server_room(name: &str) -> bool {
    name.as_bytes().first() == Some(&b'$')
}

/// A user name is 1–32 characters, none of them a control character.
pub fn validate_user(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    // Count at most 33 characters: enough to know it is too long without walking a huge input.
    if name.chars().take(MAX_USER_CHARS + 1).count() > MAX_USER_CHARS {
        return Err(NameError::TooLong);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        for ok in [
            "general",
            "#general",
            "post:42",
            "channel:general",
            "a",
            "team@acme",
            "x.y-z_1",
        ] {
            assert_eq!(validate_room(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_room(&"a".repeat(64)), Ok(()));
        assert_eq!(validate_room(&"a".repeat(65)), Err(NameError::TooLong));
        assert_eq!(validate_room(""), Err(NameError::Empty));
        for bad in [
            "a b", "a/b", "é", "a\0", "a$x", "$a$", "$$", "$a b", "a?b", "a%20",
        ] {
            assert_eq!(validate_room(bad), Err(NameError::BadCharacter), "{bad:?}");
        }
    }

    #[test]
    fn direct_message_names() {
        for ok in [
            "dm:alice+bob",
            "dm:alice",
            "dm:Bob+alice+carol",
            "dm:a.b+a_c",
        ] {
            assert_eq!(validate_room(ok), Ok(()), "{ok}");
        }
        for bad in [
            "dm:bob+alice",
            "dm:alice+alice",
            "dm:",
            "dm:+alice",
            "dm:alice+",
            "dm:a++b",
        ] {
            assert_eq!(validate_room(bad), Err(NameError::BadDirect), "{bad:?}");
            assert_eq!(NameError::BadDirect.room_code(), "bad_room");
        }
        // `+` belongs to dm: names only.
        assert_eq!(validate_room("a+b"), Err(NameError::BadCharacter));
        assert_eq!(validate_room("$dm:a+b"), Err(NameError::BadCharacter));
        assert!(direct_admits("dm:alice+bob", "bob"));
        assert!(!direct_admits("dm:alice+bob", "carol"));
        assert!(!direct_admits("dm:alice+bob", "alice+bob"));
        assert!(direct_admits("general", "carol"));
    }

    #[test]
    fn dollar_names_are_the_servers() {
        for reserved in ["$lobby", "$x", "$", "$post:1"] {
            assert_eq!(
                validate_room(reserved),
                Err(NameError::Reserved),
                "{reserved}"
            );
            assert!(is_server_room(reserved));
        }
        assert_eq!(
            validate_room(&format!("${}", "a".repeat(64))),
            Err(NameError::TooLong)
        );
        assert_eq!(validate_joinable_room(LOBBY), Ok(()));
        assert_eq!(validate_joinable_room("$lobby2"), Err(NameError::Reserved));
        assert_eq!(validate_joinable_room("$Lobby"), Err(NameError::Reserved));
        assert_eq!(validate_joinable_room("general"), Ok(()));
        assert!(!is_server_room("general") && !is_server_room(""));
        assert_eq!(NameError::Reserved.room_code(), "reserved_room");
        assert_eq!(NameError::BadCharacter.room_code(), "bad_room");
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "Zoë Ångström", "😀", "a b c", "<script>"] {
            assert_eq!(validate_user(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_user(&"é".repeat(32)), Ok(()));
        assert_eq!(validate_user(&"é".repeat(33)), Err(NameError::TooLong));
        assert_eq!(validate_user(""), Err(NameError::Empty));
        assert_eq!(validate_user("a\nb"), Err(NameError::BadCharacter));
        assert_eq!(validate_user("a\u{7f}"), Err(NameError::BadCharacter));
    }
}
