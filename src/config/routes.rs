//! Route templates: the rooms file's `[routes]` table, URL path templates mapped to room name
//! templates (`"/ws/posts/{id}/live" = "post:{id}"`). Every template is checked when the file is
//! read (syntax, placeholders, built-in routes, overlaps, whether the room can ever be valid), so
//! a request only walks a tree of path segments: one hash lookup per segment, no regex, and no
//! allocation unless a template matches.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::proto::names::{validate_joinable_room, NameError, MAX_ROOM_BYTES};

/// Most segments a path template may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most templates one file may hold: overlaps are checked pairwise through the tree at load.
pub const MAX_ROUTES: usize = 1000;
/// Longest path template, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest placeholder name, in bytes.
const MAX_NAME_BYTES: usize = 32;

/// Single-segment paths the server answers itself; a template may not take them.
const BUILT_IN_SINGLE: &[&str] = &["roomcast.js", "healthz", "metrics", "echo", "ws", "sse"];
/// First segments whose two-segment paths are built-in (`/ws/{room}`, `/sse/{room}`).
const BUILT_IN_ROOM: &[&str] = &["ws", "sse"];

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matched byte for byte against the request's (still encoded) segment.
    Literal(Box<str>),
    /// `{name}`: any one segment, percent-decoded.
    Slot(Box<str>),
}

/// A key of `[routes]`: a path template, checked on its own while the file is parsed (so its
/// errors point at the key).
#[derive(Debug, Clone)]
pub(crate) struct PathTemplate {
    raw: String,
    segments: Vec<Segment>,
}

impl PartialEq for PathTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for PathTemplate {}

impl PartialOrd for PathTemplate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PathTemplate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.raw.cmp(&other.raw)
    }
}

impl<'de> Deserialize<'de> for PathTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        PathTemplate::parse(&raw).map_err(|e| de::Error::custom(format!("route `{raw}`: {e}")))
    }
}

/// Characters a literal path segment may hold: those a URL path carries as they are (RFC 3986
/// `pchar` without `%`), so comparing with the encoded request segment is exact.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.'
                | '_'
                | '~'
                | '!'
                | '$'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | '+'
                | ','
                | ';'
                | '='
                | ':'
                | '@'
        )
}

/// A placeholder name: `[A-Za-z_][A-Za-z0-9_]*`, at most `MAX_NAME_BYTES`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PathTemplate {
    fn parse(raw: &str) -> Result<PathTemplate, String> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(format!("longer than {MAX_PATH_BYTES} bytes"));
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err("a route's path starts with `/`".into());
        };
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if seg.is_empty() {
                return Err("empty segment (`//`, or a `/` at the end)".into());
            }
            let slot = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
            match slot {
                Some(name) if !name.contains(['{', '}']) => {
                    if !valid_name(name) {
                        return Err(format!(
                            "placeholder `{seg}`: a name is letters, digits and `_`, not starting \
                             with a digit, at most {MAX_NAME_BYTES} bytes"
                        ));
                    }
                    if segments.iter().any(|s| *s == Segment::Slot(name.into())) {
                        return Err(format!("placeholder `{seg}` appears twice"));
                    }
                    segments.push(Segment::Slot(name.into()));
                }
                _ if seg.contains(['{', '}']) => {
                    return Err(format!(
                        "segment `{seg}`: unbalanced braces, or a placeholder that is not a \
                         whole segment (write `/{{name}}/`)"
                    ));
                }
                _ => {
                    if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
                        return Err(format!(
                            "segment `{seg}`: {c:?} is not a character a URL path carries as it \
                             is (letters, digits and -._~!$&'()*+,;=:@)"
                        ));
                    }
                    segments.push(Segment::Literal(seg.into()));
                }
            }
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(format!("more than {MAX_SEGMENTS} segments"));
        }
        let first = match &segments[0] {
            Segment::Literal(l) => &**l,
            Segment::Slot(_) => {
                return Err(
                    "the first segment must be literal: a placeholder there would take \
                     the server's own routes (`/api/...`, `/healthz`)"
                        .into(),
                )
            }
        };
        let built_in = first == "api"
            || (segments.len() == 1 && BUILT_IN_SINGLE.contains(&first))
            || (segments.len() == 2 && BUILT_IN_ROOM.contains(&first));
        if built_in {
            return Err(format!(
                "it would take paths the server answers itself (`/api/...`, `/ws`, \
                 `/ws/{{room}}`, `/sse`, `/sse/{{room}}`, `/healthz`, `/metrics`, `/echo`, \
                 `/roomcast.js`): `/{first}/...` is the server's"
            ));
        }
        Ok(PathTemplate {
            raw: raw.to_owned(),
            segments,
        })
    }

    /// The index of placeholder `name` among the path's placeholders.
    fn slot_index(&self, name: &str) -> Option<usize> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Slot(n) => Some(&**n),
                Segment::Literal(_) => None,
            })
            .position(|n| n == name)
    }
}

/// A piece of a room template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    /// The value of the path's placeholder at this index (in path order).
    Slot(usize),
}

/// Reads a room template against its path: balanced braces, every placeholder in the path, and
/// some value of the placeholders makes a valid room name.
fn parse_room(room: &str, path: &PathTemplate) -> Result<Vec<Piece>, String> {
    if room.is_empty() {
        return Err("the room template is empty".into());
    }
    let mut pieces = Vec::new();
    let mut rest = room;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                pieces.push(Piece::Text(rest.into()));
                rest = "";
            }
            Some(i) if rest.as_bytes()[i] == b'}' => {
                return Err(format!("room `{room}`: unbalanced braces"));
            }
            Some(i) => {
                if i > 0 {
                    pieces.push(Piece::Text(rest[..i].into()));
                }
                let after = &rest[i + 1..];
                let close = after
                    .find(['{', '}'])
                    .filter(|&j| after.as_bytes()[j] == b'}')
                    .ok_or_else(|| format!("room `{room}`: unbalanced braces"))?;
                let name = &after[..close];
                let index = path.slot_index(name).ok_or_else(|| {
                    format!(
                        "room `{room}`: placeholder `{{{name}}}` is not in the path `{}`",
                        path.raw
                    )
                })?;
                pieces.push(Piece::Slot(index));
                rest = &after[close + 1..];
            }
        }
    }
    // Every placeholder is at least one byte; distinct, ascending values are what a dm: room
    // needs. If these make no valid room, no value does.
    let samples = [
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p",
    ];
    let mut order: Vec<usize> = Vec::new();
    let mut sample = String::new();
    for piece in &pieces {
        match piece {
            Piece::Text(t) => sample.push_str(t),
            Piece::Slot(i) => {
                let k = match order.iter().position(|o| o == i) {
                    Some(k) => k,
                    None => {
                        order.push(*i);
                        order.len() - 1
                    }
                };
                sample.push_str(samples[k % samples.len()]);
            }
        }
    }
    validate_joinable_room(&sample).map_err(|e| {
        format!(
            "room `{room}` can never be a valid room name: {}",
            e.room_reason()
        )
    })?;
    Ok(pieces)
}

/// A template's room side, as the tree keeps it.
#[derive(Debug, Clone)]
struct Route {
    /// The path template as written, for errors.
    path: Box<str>,
    room: Vec<Piece>,
}

/// One level of the tree: the literal segments that go on, the placeholder that does, and the
/// template that ends here.
#[derive(Debug, Clone, Default)]
struct Node {
    literals: HashMap<Box<str>, Node>,
    slot: Option<Box<Node>>,
    end: Option<Route>,
}

/// Every route template, as a tree of path segments.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    root: Node,
    len: usize,
}

/// Why a `[routes]` entry was refused: its text, and where in the file (byte range).
#[derive(Debug)]
pub(crate) struct RouteError {
    pub span: Option<Range<usize>>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

impl Routes {
    /// Builds the tree from the file's entries, in file order (so an overlap is reported at the
    /// later of the two entries).
    pub(crate) fn build(
        mut entries: Vec<(PathTemplate, String, Option<Range<usize>>)>,
    ) -> Result<Routes, RouteError> {
        entries.sort_by_key(|(_, _, span)| span.as_ref().map_or(0, |s| s.start));
        let mut routes = Routes::default();
        for (path, room, span) in entries {
            let refuse = |message: String| RouteError {
                span: span.clone(),
                key: format!("routes.{:?}", path.raw),
                message,
            };
            if routes.len >= MAX_ROUTES {
                return Err(refuse(format!("more than {MAX_ROUTES} routes")));
            }
            let pieces = parse_room(&room, &path).map_err(&refuse)?;
            if let Some(other) = overlapping(&routes.root, &path.segments) {
                return Err(refuse(format!(
                    "route `{}` takes some of the same paths as `{}`",
                    path.raw, other.path
                )));
            }
            let mut node = &mut routes.root;
            for seg in &path.segments {
                node = match seg {
                    Segment::Literal(l) => node.literals.entry(l.clone()).or_default(),
                    Segment::Slot(_) => node.slot.get_or_insert_with(Box::default),
                };
            }
            node.end = Some(Route {
                path: path.raw.into(),
                room: pieces,
            });
            routes.len += 1;
        }
        Ok(routes)
    }

    /// Builds a table from `(path, room)` pairs, as the file's `[routes]` would give them (for
    /// tests and the fuzzer); the error is the message the file would get.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Routes, String> {
        let mut entries = Vec::new();
        for (i, (path, room)) in pairs.into_iter().enumerate() {
            let template = PathTemplate::parse(path).map_err(|e| format!("route `{path}`: {e}"))?;
            entries.push((template, room.to_owned(), Some(i..i + 1)));
        }
        Routes::build(entries).map_err(|e| e.to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The room a request path is routed to: `None` when no template matches; otherwise the
    /// room name the template makes of the path's segments (percent-decoded), or why it is not
    /// a valid room name.
    pub fn find(&self, path: &str) -> Option<Result<String, NameError>> {
        if self.len == 0 {
            return None;
        }
        let rest = path.strip_prefix('/')?;
        let mut captured: Vec<&str> = Vec::new();
        let route = walk(&self.root, rest.split('/'), &mut captured)?;
        Some(room_of(route, &captured))
    }
}

/// The template matching the remaining segments below `node`, recording what each placeholder
/// took. Templates never overlap, so the first match is the only one; the walk visits each node
/// of the tree at most once.
fn walk<'t, 'p>(
    node: &'t Node,
    mut segments: std::str::Split<'p, char>,
    captured: &mut Vec<&'p str>,
) -> Option<&'t Route> {
    let Some(seg) = segments.next() else {
        return node.end.as_ref();
    };
    if let Some(found) = node
        .literals
        .get(seg)
        .and_then(|child| walk(child, segments.clone(), captured))
    {
        return Some(found);
    }
    let child = node.slot.as_deref()?;
    captured.push(seg);
    let found = walk(child, segments, captured);
    if found.is_none() {
        captured.pop();
    }
    found
}

/// A template already in the tree that matches some path `segments` matches too.
fn overlapping<'t>(node: &'t Node, segments: &[Segment]) -> Option<&'t Route> {
    let Some((first, rest)) = segments.split_first() else {
        return node.end.as_ref();
    };
    let by_slot = || node.slot.as_deref().and_then(|c| overlapping(c, rest));
    match first {
        Segment::Literal(l) => node
            .literals
            .get(l)
            .and_then(|c| overlapping(c, rest))
            .or_else(by_slot),
        Segment::Slot(_) => node
            .literals
            .values()
            .find_map(|c| overlapping(c, rest))
            .or_else(by_slot),
    }
}

/// The room name a matched template makes: literal text and percent-decoded segments, checked
/// by the room name rules. Stops building once past the longest room name.
fn room_of(route: &Route, captured: &[&str]) -> Result<String, NameError> {
    let mut room = String::new();
    for piece in &route.room {
        match piece {
            Piece::Text(t) => room.push_str(t),
            Piece::Slot(i) => {
                let raw = captured.get(*i).copied().unwrap_or_default();
                let decoded = percent_encoding::percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| NameError::BadCharacter)?;
                room.push_str(&decoded);
            }
        }
        if room.len() > MAX_ROOM_BYTES {
            return Err(NameError::TooLong);
        }
    }
    validate_joinable_room(&room)?;
    Ok(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(pairs: &[(&str, &str)]) -> Result<Routes, String> {
        Routes::from_pairs(pairs.iter().copied())
    }

    fn room(r: &Routes, path: &str) -> Option<Result<String, NameError>> {
        r.find(path)
    }

    #[test]
    fn the_tutorials_paths() {
        let r = routes(&[
            ("/ws/posts/{id}/live", "post:{id}"),
            ("/ws/chat/{room}", "{room}"),
            ("/sse/posts/{id}", "post:{id}"),
            ("/live/{a}/{b}", "dm:{a}+{b}"),
            ("/lobby", "$lobby"),
        ])
        .unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(room(&r, "/ws/posts/42/live"), Some(Ok("post:42".into())));
        assert_eq!(room(&r, "/ws/chat/general"), Some(Ok("general".into())));
        assert_eq!(room(&r, "/ws/chat/%23general"), Some(Ok("#general".into())));
        assert_eq!(room(&r, "/sse/posts/7"), Some(Ok("post:7".into())));
        assert_eq!(room(&r, "/live/alice/bob"), Some(Ok("dm:alice+bob".into())));
        assert_eq!(room(&r, "/lobby"), Some(Ok("$lobby".into())));
        // Substituted names follow the room rules.
        assert_eq!(
            room(&r, "/ws/chat/a%20b"),
            Some(Err(NameError::BadCharacter))
        );
        assert_eq!(room(&r, "/ws/chat/%ff"), Some(Err(NameError::BadCharacter)));
        assert_eq!(room(&r, "/ws/chat/"), Some(Err(NameError::Empty)));
        assert_eq!(room(&r, "/ws/chat/%24x"), Some(Err(NameError::Reserved)));
        assert_eq!(room(&r, "/live/bob/alice"), Some(Err(NameError::BadDirect)));
        let long = format!("/ws/chat/{}", "x".repeat(5000));
        assert_eq!(room(&r, &long), Some(Err(NameError::TooLong)));
        // Unmapped.
        for path in [
            "/ws/posts/42",
            "/ws/posts/42/live/",
            "/ws/chat",
            "/ws/chat/a/b",
            "/WS/chat/a",
            "/",
            "",
            "ws/chat/a",
        ] {
            assert_eq!(room(&r, path), None, "{path}");
        }
        assert_eq!(Routes::default().find("/ws/chat/a"), None);
    }

    #[test]
    fn literals_and_placeholders_side_by_side() {
        let r = routes(&[
            ("/rooms/{id}/chat", "chat:{id}"),
            ("/rooms/special/feed", "feed"),
        ])
        .unwrap();
        // `special` matches the literal first, then the walk falls back to the placeholder.
        assert_eq!(
            room(&r, "/rooms/special/chat"),
            Some(Ok("chat:special".into()))
        );
        assert_eq!(room(&r, "/rooms/special/feed"), Some(Ok("feed".into())));
        assert_eq!(room(&r, "/rooms/other/feed"), None);
    }

    fn refused(pairs: &[(&str, &str)]) -> String {
        routes(pairs).expect_err("refused")
    }

    #[test]
    fn bad_templates_are_refused_with_reasons() {
        for (path, room, needle) in [
            ("ws/x/{id}", "{id}", "starts with `/`"),
            ("/ws/x/{id", "{id}", "unbalanced"),
            ("/ws/x/id}", "{id}", "unbalanced"),
            ("/ws/x/a{id}", "{id}", "whole segment"),
            ("/ws/x/{id}/{id}", "{id}", "twice"),
            ("/ws//{id}", "{id}", "empty segment"),
            ("/ws/x/{id}/", "{id}", "empty segment"),
            ("/ws/x/{}", "x", "placeholder `{}`"),
            ("/ws/x/{1a}", "x", "placeholder"),
            ("/ws/x y/{id}", "{id}", "not a character"),
            ("/ws/%41/{id}", "{id}", "not a character"),
            ("/{x}/live", "{x}", "first segment must be literal"),
            ("/api/x/{id}", "{id}", "server answers itself"),
            ("/api", "a", "server answers itself"),
            ("/ws/{room}", "{room}", "server answers itself"),
            ("/sse/{room}", "{room}", "server answers itself"),
            ("/ws/general", "general", "server answers itself"),
            ("/healthz", "a", "server answers itself"),
            ("/ws", "a", "server answers itself"),
        ] {
            let e = refused(&[(path, room)]);
            assert!(e.contains(needle), "{path}: {e}");
        }
        let deep = format!("/a{}", "/x".repeat(MAX_SEGMENTS));
        assert!(refused(&[(&deep, "a")]).contains("segments"));
        for (room, needle) in [
            ("post:{id", "unbalanced"),
            ("post:id}", "unbalanced"),
            ("post:{{id}}", "unbalanced"),
            ("post:{other}", "not in the path"),
            ("", "empty"),
            ("post {id}", "never be a valid room"),
            ("${id}", "never be a valid room"),
            ("dm:{id}+{id}", "never be a valid room"),
            ("{id}+x", "never be a valid room"),
        ] {
            let e = refused(&[("/live/{id}", room)]);
            assert!(e.contains(needle), "{room}: {e}");
            assert!(e.starts_with("key `routes.\"/live/{id}\"`"), "{e}");
        }
        let e = refused(&[("/live/{id}", &"x".repeat(65))]);
        assert!(e.contains("never be a valid room"), "{e}");
        // A path placeholder the room does not use is fine (a slug, say).
        routes(&[("/posts/{id}/{slug}", "post:{id}")]).unwrap();
    }

    #[test]
    fn overlapping_templates_are_refused() {
        for pairs in [
            [("/a/{x}", "{x}"), ("/a/{y}", "{y}")],
            [("/a/{x}/b", "{x}"), ("/a/c/{y}", "{y}")],
            [("/a/c/{y}", "{y}"), ("/a/{x}/b", "{x}")],
            [("/a/b", "b"), ("/a/{x}", "{x}")],
        ] {
            let e = refused(&pairs);
            assert!(e.contains("same paths"), "{pairs:?}: {e}");
            // Reported at the later entry, naming the earlier one.
            assert!(e.contains(&format!("`{}`", pairs[0].0)), "{e}");
            assert!(
                e.starts_with(&format!("key `routes.{:?}`", pairs[1].0)),
                "{e}"
            );
        }
        // Different lengths or different literals do not overlap.
        routes(&[
            ("/a/{x}", "{x}"),
            ("/a/{x}/b", "{x}"),
            ("/b/{x}", "{x}"),
            ("/a/{x}/c/{y}", "{x}"),
            ("/a/{x}/d/{y}", "{y}"),
        ])
        .unwrap();
    }

    #[test]
    fn many_templates_stay_cheap() {
        let pairs: Vec<(String, String)> = (0..MAX_ROUTES)
            .map(|i| (format!("/t{i}/{{id}}/live"), format!("t{i}:{{id}}")))
            .collect();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(p, r)| (&**p, &**r)).collect();
        let r = routes(&refs).unwrap();
        assert_eq!(room(&r, "/t999/5/live"), Some(Ok("t999:5".into())));
        let mut over = refs.clone();
        over.push(("/one/more", "x"));
        assert!(refused(&over).contains("more than"));
    }
}
