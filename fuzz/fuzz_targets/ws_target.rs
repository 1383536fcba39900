//! Fuzzes the upgrade target parser (`/ws`, `/ws/{room}`, query `room`, `user`, `username`).
//!
//! Two kinds of input:
//! - `Raw`: any path and query. Never panics; whatever it accepts is valid (room and user pass
//!   the name rules); whatever it refuses is 404 `not_found` or 400 `bad_room`/`bad_user`, and
//!   agrees with `parse_user` about the user.
//! - `Encoded`: a room and user names put into a URL the way a correct client would encode them.
//!   The answer must be exactly what the name rules say: the same names back, or the right
//!   refusal, room checked before user, `user` preferred over `username`.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use roomcast::proto::names::{validate_room, validate_user};
use roomcast::target::{parse_user, parse_ws_target};

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Raw {
        path: &'a str,
        query: Option<&'a str>,
    },
    Encoded {
        room: Option<&'a str>,
        user: Option<&'a str>,
        username: Option<&'a str>,
        /// `/ws?room=` instead of `/ws/{room}`.
        room_in_query: bool,
    },
}

fuzz_target!(|input: Input<'_>| match input {
    Input::Raw { path, query } => raw(path, query),
    Input::Encoded {
        room,
        user,
        username,
        room_in_query,
    } => encoded(room, user, username, room_in_query),
});

fn raw(path: &str, query: Option<&str>) {
    let user_alone = parse_user(query);
    match parse_ws_target(path, query) {
        Ok(t) => {
            if let Some(room) = &t.room {
                assert_eq!(validate_room(room), Ok(()), "accepted room {room:?}");
            }
            if let Some(user) = &t.user {
                assert_eq!(validate_user(user), Ok(()), "accepted user {user:?}");
            }
            assert_eq!(user_alone.ok(), Some(t.user));
        }
        Err(e) => {
            let status = e.status().as_u16();
            assert!(
                matches!(
                    (status, e.code()),
                    (404, "not_found") | (400, "bad_room") | (400, "bad_user")
                ),
                "{status} {}",
                e.code()
            );
            assert!(!e.reason().is_empty());
            if e.code() == "bad_user" {
                assert!(user_alone.is_err());
            }
        }
    }
}

fn encoded(room: Option<&str>, user: Option<&str>, username: Option<&str>, room_in_query: bool) {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let mut path = String::from("/ws");
    if let Some(room) = room {
        if room_in_query {
            query.append_pair("room", room);
        } else {
            path.push('/');
            path.extend(utf8_percent_encode(room, NON_ALPHANUMERIC));
        }
    }
    if let Some(u) = username {
        query.append_pair("username", u);
    }
    if let Some(u) = user {
        query.append_pair("user", u);
    }
    let query = query.finish();
    let query = (!query.is_empty()).then_some(query.as_str());

    let chosen_user = user.or(username);
    let expected = if room.is_some_and(|r| validate_room(r).is_err()) {
        Err("bad_room")
    } else if chosen_user.is_some_and(|u| validate_user(u).is_err()) {
        Err("bad_user")
    } else {
        Ok((room, chosen_user))
    };
    let got = parse_ws_target(&path, query);
    match (&got, expected) {
        (Ok(t), Ok((room, user))) => {
            assert_eq!(t.room.as_deref(), room, "{path} {query:?}");
            assert_eq!(t.user.as_deref(), user, "{path} {query:?}");
        }
        (Err(e), Err(code)) => assert_eq!(e.code(), code, "{path} {query:?}"),
        _ => panic!("{path} {query:?}: got {got:?}, expected {expected:?}"),
    }
}
