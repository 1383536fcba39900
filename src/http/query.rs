//! Query strings: one typed struct per route, read by serde; unknown keys are ignored. A value
//! that does not parse, or is out of its range, is a 400 `bad_param` naming the key.

use hyper::Request;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::reply::ApiError;

/// Reads the query string of `req` as `T` (an absent query reads as an empty one).
pub fn parse<T: DeserializeOwned, B>(req: &Request<B>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("bad_param", format!("bad query string: {e}")))
}

/// `value` if it lies in `min..=max`, `default` when absent.
pub fn bounded(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(
            "bad_param",
            format!("`{key}` must be an integer from {min} to {max}"),
        )),
    }
}

/// `GET /api/rooms`.
#[derive(Debug, Default, Deserialize)]
pub struct ListRooms {
    pub limit: Option<u64>,
    pub token: Option<String>,
}

/// `GET /api/rooms/{room}`: one page of the room's users.
#[derive(Debug, Default, Deserialize)]
pub struct RoomInfo {
    pub users_limit: Option<u64>,
    /// A member id: the page starts after it.
    pub users_after: Option<u64>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Without tokens, the reader of a direct-message room names itself (unauthenticated).
    pub user: Option<String>,
}

/// `GET /api/rooms/{room}/messages`.
#[derive(Debug, Default, Deserialize)]
pub struct Messages {
    pub limit: Option<u64>,
    /// A seq: only older messages.
    pub before: Option<u64>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Without tokens, the reader of a direct-message room names itself (unauthenticated).
    pub user: Option<String>,
}

/// `POST /api/rooms/{room}/messages`.
#[derive(Debug, Default, Deserialize)]
pub struct Publish {
    /// The room's password (also accepted as `password` in the body).
    pub password: Option<String>,
}

/// What a chat upgrade's query carries beyond the room and the user (read by `target.rs`).
#[derive(Debug, Default, Deserialize)]
pub struct Upgrade {
    pub history: Option<u32>,
    pub since: Option<u64>,
    pub epoch: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

/// What an event stream's query carries beyond its rooms and user (read by `target.rs`).
/// `Last-Event-ID`, when sent, wins over `since` and `history`.
#[derive(Debug, Default, Deserialize)]
pub struct Sse {
    /// Each room's last `history` messages.
    pub history: Option<u32>,
    /// One room only: the messages after this seq.
    pub since: Option<u64>,
    /// The epoch `since` is in.
    pub epoch: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn typed_values_and_clear_errors() {
        let q: Messages = parse(&req("/x?limit=5&before=9&password=a+b&other=1")).unwrap();
        assert_eq!((q.limit, q.before), (Some(5), Some(9)));
        assert_eq!(q.password.as_deref(), Some("a b"));
        let q: Messages = parse(&req("/x")).unwrap();
        assert_eq!(q.limit, None);
        let e = parse::<Messages, _>(&req("/x?limit=ten")).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (400, "bad_param"));
        assert!(e.reason().contains("limit") || e.reason().contains("digit"));
        assert!(parse::<Upgrade, _>(&req("/x?since=-1")).is_err());
    }

    #[test]
    fn bounds_are_checked_and_named() {
        assert_eq!(bounded("limit", None, 50, 1, 1000).unwrap(), 50);
        assert_eq!(bounded("limit", Some(1000), 50, 1, 1000).unwrap(), 1000);
        let e = bounded("limit", Some(0), 50, 1, 1000).unwrap_err();
        assert_eq!(e.reason(), "`limit` must be an integer from 1 to 1000");
    }
}
