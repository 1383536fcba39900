//! Room and user name rules: the first check every name from the network goes through.

/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 64;
/// Longest user name, in characters.
pub const MAX_USER_CHARS: usize = 32;

/// Why a name was refused; the text goes to the client verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
    BadCharacter,
}

impl NameError {
    pub fn room_reason(self) -> &'static str {
        match self {
            NameError::Empty => "room name is empty",
            NameError::TooLong => "room name is longer than 64 bytes",
            NameError::BadCharacter => "room name may only contain A-Z a-z 0-9 _ - . : # @",
        }
    }

    pub fn user_reason(self) -> &'static str {
        match self {
            NameError::Empty => "user name is empty",
            NameError::TooLong => "user name is longer than 32 characters",
            NameError::BadCharacter => "user name contains a control character",
        }
    }
}

/// A room name is 1–64 bytes of `A-Z a-z 0-9 _ - . : # @`.
pub fn validate_room(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_ROOM_BYTES {
        return Err(NameError::TooLong);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'#' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadCharacter)
    }
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
        for bad in ["a b", "a/b", "é", "a\0", "$x", "a?b", "a%20"] {
            assert_eq!(validate_room(bad), Err(NameError::BadCharacter), "{bad:?}");
        }
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
