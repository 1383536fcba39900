//! Fuzzes the room and user name rules against a second, naive statement of the same rules
//! (docs/PROTOCOL.md), and checks that every valid name survives the trip through an upgrade
//! URL (percent-encoded path segment or form-encoded query) unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use roomcast::proto::names::{validate_room, validate_user, NameError};
use roomcast::target::parse_ws_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };

    let room = validate_room(name);
    assert_eq!(room, room_rule(name), "room {name:?}");
    let user = validate_user(name);
    assert_eq!(user, user_rule(name), "user {name:?}");
    if let Err(e) = room {
        assert!(!e.room_reason().is_empty());
    }
    if let Err(e) = user {
        assert!(!e.user_reason().is_empty());
    }

    if room.is_ok() {
        let path = format!("/ws/{}", utf8_percent_encode(name, NON_ALPHANUMERIC));
        let target = parse_ws_target(&path, None).expect("valid room refused in a URL");
        assert_eq!(target.room.as_deref(), Some(name));
        let query = form(&[("room", name)]);
        let target = parse_ws_target("/ws", Some(&query)).expect("valid ?room= refused");
        assert_eq!(target.room.as_deref(), Some(name));
    }
    let query = form(&[("user", name)]);
    match parse_ws_target("/ws", Some(&query)) {
        Ok(target) => {
            assert!(user.is_ok(), "invalid user {name:?} accepted in a URL");
            assert_eq!(target.user.as_deref(), Some(name));
        }
        Err(e) => {
            assert!(user.is_err(), "valid user {name:?} refused in a URL");
            assert_eq!(e.code(), "bad_user");
        }
    }
});

fn room_rule(name: &str) -> Result<(), NameError> {
    const ALLOWED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:#@";
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.len() > 64 {
        Err(NameError::TooLong)
    } else if name.bytes().any(|b| !ALLOWED.contains(&b)) {
        Err(NameError::BadCharacter)
    } else {
        Ok(())
    }
}

fn user_rule(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.chars().count() > 32 {
        Err(NameError::TooLong)
    } else if name.chars().any(|c| c.is_control()) {
        Err(NameError::BadCharacter)
    } else {
        Ok(())
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}
