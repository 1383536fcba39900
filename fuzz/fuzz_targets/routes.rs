//! Fuzzes route templates (`[routes]` in the rooms file): any table either loads or is refused
//! with a message, and a loaded table answers any request path without panicking, with either
//! no match or a room that passes the room name rules. A path made from a template by
//! substituting encoded values must lead to the room made from the same values.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use roomcast::config::routes::Routes;
use roomcast::proto::names::validate_joinable_room;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    table: Vec<(&'a str, &'a str)>,
    paths: Vec<&'a str>,
    /// Values for a path built from the first template's placeholders.
    values: Vec<&'a str>,
}

fuzz_target!(|input: Input<'_>| {
    let routes = match Routes::from_pairs(input.table.iter().copied()) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    for path in &input.paths {
        if let Some(Ok(room)) = routes.find(path) {
            assert_eq!(validate_joinable_room(&room), Ok(()), "{path} -> {room:?}");
        }
    }
    // The first template with its placeholders filled in, encoded as a client would.
    let Some((template, room)) = input.table.first() else {
        return;
    };
    let mut values = input.values.iter().cycle();
    let mut path = String::new();
    let mut expected = (*room).to_owned();
    for seg in template.trim_start_matches('/').split('/') {
        path.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                let Some(value) = values.next() else { return };
                if value.contains(['{', '}']) {
                    return; // would be read as a placeholder by the naive substitution below
                }
                path.extend(utf8_percent_encode(value, NON_ALPHANUMERIC));
                expected = expected.replace(&format!("{{{name}}}"), value);
            }
            None => path.push_str(seg),
        }
    }
    match routes.find(&path) {
        Some(Ok(got)) => assert_eq!(got, expected, "{path}"),
        Some(Err(_)) => assert!(validate_joinable_room(&expected).is_err(), "{path}"),
        None => panic!("{path} built from {template} matched nothing"),
    }
});
