//! What a WebSocket upgrade asks for (first room, user name), read from the request target
//! alone: a pure function of path and query, so it can be unit-tested and fuzzed without a
//! socket. `http` calls it before any other upgrade check.

use std::borrow::Cow;

use hyper::StatusCode;

use super::{decode_room_with, ApiError};
use crate::proto::names::{validate_joinable_room, validate_user};

/// A chat upgrade's request target, every name in it already valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsTarget {
    /// The room to join first: `/ws/{room}`, else `?room=`, else none (join later).
    pub room: Option<String>,
    /// `?user=`, else `?username=`; `None` lets the server pick `anon-<n>`.
    pub user: Option<String>,
}

/// Parses the target of a chat upgrade, `/ws` or `/ws/{room}` with its query string.
///
/// Checks happen in this order, so a request with several problems always gets the same answer:
/// path (404 `not_found` unless it is one of the two forms), room (400 `bad_room`), user
/// (400 `bad_user`). The path segment is percent-decoded as UTF-8 (invalid: `bad_room`); query
/// values are form-decoded (`+` is a space, invalid UTF-8 becomes U+FFFD and then fails or
/// passes validation like any other character).
pub fn parse_ws_target(path: &str, query: Option<&str>) -> Result<WsTarget, ApiError> {
    let mut segments = path.trim_start_matches('/').split('/');
    let path_room = match (segments.next(), segments.next(), segments.next()) {
        (Some("ws"), None, _) => None,
        (Some("ws"), Some(segment), None) => Some(segment),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ))
        }
    };
    let room = match path_room {
        // `$lobby` may be joined; other `$` names are the server's (`reserved_room`).
        Some(raw) => Some(decode_room_with(raw, validate_joinable_room)?),
        None => match query_value(query, "room") {
            Some(r) => {
                validate_joinable_room(&r).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, e.room_code(), e.room_reason())
                })?;
                Some(r.into_owned())
            }
            None => None,
        },
    };
    Ok(WsTarget {
        room,
        user: parse_user(query)?,
    })
}

/// The target of a chat upgrade on a route template's path: the room is the one the template
/// made (already valid), the user comes from the query as on `/ws/{room}`. `?room=` is not
/// read: the path names the room.
pub fn routed_ws_target(room: String, query: Option<&str>) -> Result<WsTarget, ApiError> {
    Ok(WsTarget {
        room: Some(room),
        user: parse_user(query)?,
    })
}

/// The target of an event stream on a route template's path: that one room; `?rooms=` as well
/// is 400 `bad_param`, as on `/sse/{room}`.
pub fn routed_sse_target(room: String, query: Option<&str>) -> Result<SseTarget, ApiError> {
    if query_value(query, "rooms").is_some() {
        return Err(ApiError::bad_request(
            "bad_param",
            "name the room in the path or in `rooms`, not both",
        ));
    }
    Ok(SseTarget {
        rooms: vec![room],
        user: parse_user(query)?,
    })
}

/// An event stream's request target, every name in it already valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseTarget {
    /// `/sse/{room}`, or `/sse?rooms=a,b`: in order, no repeats, at least one.
    pub rooms: Vec<String>,
    /// As for an upgrade: `?user=`, else `?username=`.
    pub user: Option<String>,
}

/// Parses the target of an event stream, `/sse/{room}` or `/sse?rooms=a,b,…`.
///
/// Checks in order: path (404 unless `/sse` or `/sse/{room}`), rooms (400 `bad_room` for a bad
/// name, 400 `bad_param` for none, both forms at once, or a room named twice), user
/// (400 `bad_user`). The `$lobby` may be named; other `$` names may not.
pub fn parse_sse_target(path: &str, query: Option<&str>) -> Result<SseTarget, ApiError> {
    let mut segments = path.trim_start_matches('/').split('/');
    let path_room = match (segments.next(), segments.next(), segments.next()) {
        (Some("sse"), None, _) => None,
        (Some("sse"), Some(segment), None) => Some(segment),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ))
        }
    };
    let listed = query_value(query, "rooms");
    let rooms = match (path_room, listed) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "bad_param",
                "name the room in the path or in `rooms`, not both",
            ))
        }
        (Some(raw), None) => vec![decode_room_with(raw, validate_joinable_room)?],
        (None, Some(list)) => {
            let mut rooms: Vec<String> = Vec::new();
            for name in list.split(',') {
                validate_joinable_room(name).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, e.room_code(), e.room_reason())
                })?;
                if rooms.iter().any(|r| r == name) {
                    return Err(ApiError::bad_request(
                        "bad_param",
                        "`rooms` names a room twice",
                    ));
                }
                rooms.push(name.to_owned());
            }
            rooms
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "bad_param",
                "name a room: /sse/{room} or /sse?rooms=a,b",
            ))
        }
    };
    Ok(SseTarget {
        rooms,
        user: parse_user(query)?,
    })
}

/// The user name an upgrade asks for (`?user=`, else `?username=`), validated.
pub fn parse_user(query: Option<&str>) -> Result<Option<String>, ApiError> {
    match query_value(query, "user").or_else(|| query_value(query, "username")) {
        Some(u) => match validate_user(&u) {
            Ok(()) => Ok(Some(u.into_owned())),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_user",
                e.user_reason(),
            )),
        },
        None => Ok(None),
    }
}

/// The first value of `key` in the query string, form-decoded.
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<Cow<'a, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str, query: Option<&str>) -> (Option<String>, Option<String>) {
        let t = parse_ws_target(path, query).unwrap();
        (t.room, t.user)
    }

    fn code(path: &str, query: Option<&str>) -> (u16, &'static str) {
        let e = parse_ws_target(path, query).unwrap_err();
        (e.status().as_u16(), e.code())
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(
            ok("/ws/general", Some("user=alice")),
            (s("general"), s("alice"))
        );
        assert_eq!(
            ok("/ws", Some("room=general&username=bob")),
            (s("general"), s("bob"))
        );
        assert_eq!(ok("/ws", Some("user=carol")), (None, s("carol")));
        assert_eq!(ok("/ws", None), (None, None));
        assert_eq!(ok("/ws/%23general", None), (s("#general"), None));
        // The path wins over the query; `user` wins over `username`.
        assert_eq!(
            ok("/ws/a", Some("room=b&username=x&user=y")),
            (s("a"), s("y"))
        );
        assert_eq!(ok("/ws", Some("user=a+b%21")), (None, s("a b!")));
    }

    #[test]
    fn refusals_in_order() {
        assert_eq!(code("/ws/", None), (400, "bad_room"));
        assert_eq!(code("/ws/a%20b", Some("user=")), (400, "bad_room"));
        assert_eq!(code("/ws/%ff", None), (400, "bad_room"));
        assert_eq!(code("/ws", Some("room=a/b")), (400, "bad_room"));
        assert_eq!(code("/ws/a", Some("user=")), (400, "bad_user"));
        assert_eq!(code("/ws", Some("username=%0a")), (400, "bad_user"));
        assert_eq!(code("/ws/a/b", None), (404, "not_found"));
        assert_eq!(code("/api/rooms", None), (404, "not_found"));
        assert_eq!(code("", None), (404, "not_found"));
    }

    #[test]
    fn event_stream_targets() {
        let t = parse_sse_target("/sse/general", Some("user=al")).unwrap();
        assert_eq!((t.rooms, t.user), (vec![s("general").unwrap()], s("al")));
        let t = parse_sse_target("/sse", Some("rooms=a,b%3Ac,%24lobby")).unwrap();
        assert_eq!(t.rooms, ["a", "b:c", "$lobby"]);
        let code = |path: &str, query: Option<&str>| {
            let e = parse_sse_target(path, query).unwrap_err();
            (e.status().as_u16(), e.code())
        };
        assert_eq!(code("/sse", None), (400, "bad_param"));
        assert_eq!(code("/sse/a", Some("rooms=b")), (400, "bad_param"));
        assert_eq!(code("/sse", Some("rooms=a,a")), (400, "bad_param"));
        assert_eq!(code("/sse", Some("rooms=a,,b")), (400, "bad_room"));
        assert_eq!(code("/sse", Some("rooms=a,$x")), (400, "reserved_room"));
        assert_eq!(code("/sse/a%2Cb", None), (400, "bad_room"));
        assert_eq!(code("/sse/a/b", None), (404, "not_found"));
        assert_eq!(code("/sse/a", Some("user=")), (400, "bad_user"));
    }

    #[test]
    fn routed_targets_take_the_room_from_the_template() {
        let t = routed_ws_target("post:1".into(), Some("room=other&user=al")).unwrap();
        assert_eq!((t.room, t.user), (s("post:1"), s("al")));
        let e = routed_ws_target("post:1".into(), Some("user=")).unwrap_err();
        assert_eq!(e.code(), "bad_user");
        let t = routed_sse_target("post:1".into(), Some("username=bo")).unwrap();
        assert_eq!((t.rooms, t.user), (vec!["post:1".to_owned()], s("bo")));
        let e = routed_sse_target("post:1".into(), Some("rooms=a")).unwrap_err();
        assert_eq!(e.code(), "bad_param");
    }
}
