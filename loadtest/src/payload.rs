//! What publishers put on the wire and what receivers read back: the stamped chat text and the
//! few fields of a server frame the checks need.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch. Every process of a run reads the same clock, so a stamp
/// made by one worker can be compared with the clock of another.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The client frame a publisher sends: `{"type":"message","text":"<publisher>:<µs>:xxx…"}`,
/// padded so that `text` is `payload_bytes` long (never shorter than the stamp): with `x`, or
/// with prose or JSON (`--payload-kind`) for measurements where the bytes' content matters
/// (compression).
pub fn stamped_message(
    publisher: u32,
    sent_us: u64,
    payload_bytes: usize,
    kind: PayloadKind,
) -> Vec<u8> {
    let stamp = format!("{publisher}:{sent_us}:");
    let pad = payload_bytes.saturating_sub(stamp.len());
    let mut out = Vec::with_capacity(40 + stamp.len() + pad);
    out.extend_from_slice(br#"{"type":"message","text":""#);
    out.extend_from_slice(stamp.as_bytes());
    match kind {
        PayloadKind::X => out.resize(out.len() + pad, b'x'),
        PayloadKind::Prose | PayloadKind::Json => {
            // Each message starts elsewhere in the sample, so no two are the same.
            let sample = if kind == PayloadKind::Prose {
                PROSE
            } else {
                JSON_SAMPLE
            };
            let start = (sent_us as usize).wrapping_mul(31) % sample.len();
            let mut left = pad;
            for &b in sample.as_bytes().iter().cycle().skip(start) {
                if left == 0 {
                    break;
                }
                // JSON text inside a JSON string: its quotes escaped (the text keeps them).
                if b == b'"' {
                    out.push(b'\\');
                }
                out.push(b);
                left -= 1;
            }
        }
    }
    out.extend_from_slice(br#""}"#);
    out
}

/// What fills a message's text after the stamp (`--payload-kind`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// `xxx…`: compresses to almost nothing; fine wherever the content does not matter.
    #[default]
    X,
    /// English chat prose.
    Prose,
    /// A JSON document (records with ids, names, numbers, timestamps).
    Json,
}

/// Plain prose of the kind people type in chat rooms, for `--payload-kind prose`.
const PROSE: &str = "Morning all! Did anyone else see the deploy notes from last night? \
I think the new search page is much faster, but the filters on mobile still jump around when \
you scroll. Maria said she would look into it after lunch. Also, quick reminder that the team \
lunch moved to Thursday because half of us are at the conference on Wednesday. If you have \
dietary restrictions, drop them in the sheet before noon tomorrow. Has anybody tried the new \
coffee place on the corner? Their flat white was decent, a bit pricey though. Back to work: \
the flaky integration test failed twice again this morning, both times on the payment retry \
path. My guess is a timeout that is too tight when the sandbox is slow. I'll bump it and add a \
log line so we can see how long the call really takes. Ping me if you see it fail somewhere \
else. Weekend plans? We're finally going hiking if the weather holds, otherwise it's board \
games and pizza. Oh, and congratulations to Sam on the new baby, photos in the other channel! \
Can someone review my pull request for the export feature? It's mostly tests, the change \
itself is small. Thanks in advance, I owe you one. ";

/// A JSON document of the kind applications push through rooms, for `--payload-kind json`.
const JSON_SAMPLE: &str = r#"{"id":8812731,"kind":"order.updated","at":"2026-03-14T09:26:53.589Z","customer":{"id":"c_5d2e9a","name":"Ada Lovelace","tier":"gold","country":"GB"},"items":[{"sku":"BK-1043","title":"Notes on the Analytical Engine","qty":1,"price":24.99,"currency":"GBP"},{"sku":"PN-2211","title":"Fountain pen, fine nib","qty":2,"price":12.5,"currency":"GBP"},{"sku":"NB-0007","title":"Squared notebook A5","qty":3,"price":4.75,"currency":"GBP"}],"totals":{"items":64.24,"shipping":3.99,"tax":12.85,"grand":81.08},"status":{"from":"paid","to":"packed","by":"warehouse-2","note":"fragile items wrapped separately"},"tags":["priority","gift","repeat-customer"],"tracking":null,"version":17}"#;

/// Reads `(publisher, sent_us)` back from a chat text; `None` for text this tool did not write.
pub fn parse_stamp(text: &str) -> Option<(u32, u64)> {
    parse_stamp_bytes(text.as_bytes())
}

/// `parse_stamp` on the raw bytes of the text: `<digits>:<digits>:` and anything after.
fn parse_stamp_bytes(text: &[u8]) -> Option<(u32, u64)> {
    let (publisher, rest) = leading_u64(text)?;
    let rest = rest.strip_prefix(b":")?;
    let (sent, rest) = leading_u64(rest)?;
    rest.strip_prefix(b":")?;
    Some((u32::try_from(publisher).ok()?, sent))
}

/// The decimal number at the start of `b` and what follows it; `None` without a digit or on
/// overflow.
fn leading_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in &b[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((n, &b[digits..]))
}

/// What one text frame from the server means to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Welcome {
        seq: u64,
    },
    /// A chat message; `stamp` is `None` when the text was not written by this tool.
    Message {
        seq: u64,
        stamp: Option<(u32, u64)>,
    },
    Presence,
    Pong,
    Left,
    Error {
        code: String,
    },
    /// Valid JSON of a type this tool does not know, or not what the protocol promises.
    Other,
}

/// Classifies one server text frame. Never fails: a malformed frame is `Other`, counted by the
/// caller as a protocol problem.
///
/// This runs once per delivery, so it reads the object's top-level fields in one pass over the
/// bytes (`Fields::scan`): no `serde_json::Value`, no allocation except an error's code.
pub fn parse_incoming(bytes: &[u8]) -> Incoming {
    let Some(f) = Fields::scan(bytes) else {
        return Incoming::Other;
    };
    match (f.kind, f.seq) {
        (Some(Str::Plain(b"message")), Some(seq)) => Incoming::Message {
            seq,
            stamp: match f.text {
                Some(Str::Plain(t)) => parse_stamp_bytes(t),
                // The stamp leads the text and is digits and colons, which serde_json never
                // escapes: read it off the raw bytes. Decoding a whole escaped text (a JSON
                // payload's quotes) cost the clients more than the server spent per delivery.
                Some(t @ Str::Escaped(raw)) => {
                    parse_stamp_bytes(raw).or_else(|| parse_stamp(&t.decode()))
                }
                None => None,
            },
        },
        (Some(Str::Plain(b"welcome")), Some(seq)) => Incoming::Welcome { seq },
        (Some(Str::Plain(b"presence")), _) => Incoming::Presence,
        (Some(Str::Plain(b"pong")), _) => Incoming::Pong,
        (Some(Str::Plain(b"left")), _) => Incoming::Left,
        (Some(Str::Plain(b"error")), _) => Incoming::Error {
            code: f.code.map(Str::decode).unwrap_or_default(),
        },
        _ => Incoming::Other,
    }
}

/// A JSON string as it stands between its quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str<'a> {
    /// No backslash: the bytes are the value.
    Plain(&'a [u8]),
    /// Has escapes: the raw bytes, decoded only when needed.
    Escaped(&'a [u8]),
}

impl Str<'_> {
    fn decode(self) -> String {
        match self {
            Str::Plain(b) => String::from_utf8_lossy(b).into_owned(),
            Str::Escaped(raw) => {
                let mut quoted = Vec::with_capacity(raw.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(raw);
                quoted.push(b'"');
                serde_json::from_slice(&quoted).unwrap_or_default()
            }
        }
    }
}

/// The top-level fields of a server frame the load test reads. A field that is absent or of
/// another JSON type is `None`, as are the fields after a repeated key's first value.
#[derive(Debug, Default)]
struct Fields<'a> {
    kind: Option<Str<'a>>,
    seq: Option<u64>,
    text: Option<Str<'a>>,
    code: Option<Str<'a>>,
}

impl<'a> Fields<'a> {
    /// Reads one JSON object; `None` when `b` is not one (trailing bytes included). Nested
    /// values are skipped by bracket depth, strings by their quotes; numbers and literals are
    /// not validated beyond their characters (the server writes them with serde_json).
    fn scan(b: &'a [u8]) -> Option<Self> {
        let mut c = Cursor { b, i: 0 };
        let mut f = Fields::default();
        c.ws();
        c.eat(b'{')?;
        c.ws();
        if c.peek() == Some(b'}') {
            c.i += 1;
        } else {
            loop {
                c.ws();
                let key = c.string()?;
                c.ws();
                c.eat(b':')?;
                c.ws();
                match key {
                    Str::Plain(b"type") if c.peek() == Some(b'"') => f.kind = Some(c.string()?),
                    Str::Plain(b"text") if c.peek() == Some(b'"') => f.text = Some(c.string()?),
                    Str::Plain(b"code") if c.peek() == Some(b'"') => f.code = Some(c.string()?),
                    Str::Plain(b"seq") => {
                        let start = c.i;
                        c.value()?;
                        // Only a plain unsigned integer is a seq (as serde_json's u64 reads it).
                        f.seq = match leading_u64(&b[start..c.i]) {
                            Some((n, [])) => Some(n),
                            _ => None,
                        };
                    }
                    _ => c.value()?,
                }
                c.ws();
                match c.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        c.ws();
        (c.i == b.len()).then_some(f)
    }
}

/// A position in a frame's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string starting at its opening quote; leaves the cursor after the closing one.
    fn string(&mut self) -> Option<Str<'a>> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.next()?;
                }
                _ => {}
            }
        }
        let raw = &self.b[start..self.i - 1];
        Some(if escaped {
            Str::Escaped(raw)
        } else {
            Str::Plain(raw)
        })
    }

    /// Skips one value of any type.
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                    self.i += 1;
                    if depth == 0 {
                        return Some(());
                    }
                }
            }
            _ => {
                let start = self.i;
                self.scalar();
                (self.i > start).then_some(())
            }
        }
    }

    /// Skips a number or literal: up to the next delimiter.
    fn scalar(&mut self) {
        while !matches!(
            self.peek(),
            None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
        ) {
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_and_json_payloads_have_the_length_asked_and_round_trip() {
        for kind in [PayloadKind::Prose, PayloadKind::Json] {
            for len in [500, 4096] {
                let sent = stamped_message(7, 1_700_000_000_000_001, len, kind);
                let client: serde_json::Value = serde_json::from_slice(&sent).expect("JSON");
                let text = client["text"].as_str().expect("text");
                assert_eq!(text.len(), len, "{kind:?}");
                let echoed = serde_json::json!({"type": "message", "room": "lt-1", "user": "u7",
                    "text": text, "seq": 3, "ts": 1});
                assert_eq!(
                    parse_incoming(echoed.to_string().as_bytes()),
                    Incoming::Message {
                        seq: 3,
                        stamp: Some((7, 1_700_000_000_000_001))
                    }
                );
            }
        }
    }

    #[test]
    fn stamp_round_trips_through_the_server_frame() {
        let sent = stamped_message(42, 1_700_000_000_123_456, 64, PayloadKind::X);
        let client: serde_json::Value = serde_json::from_slice(&sent).expect("valid JSON");
        let text = client["text"].as_str().expect("text");
        assert_eq!(text.len(), 64);
        assert_eq!(client["type"], "message");
        // what the server sends back to every member
        let echoed = format!(
            r#"{{"type":"message","room":"lt-3","user":"u42","text":"{text}","seq":17,"ts":1700000000123}}"#
        );
        assert_eq!(
            parse_incoming(echoed.as_bytes()),
            Incoming::Message {
                seq: 17,
                stamp: Some((42, 1_700_000_000_123_456))
            }
        );
    }

    #[test]
    fn short_payload_is_never_truncated() {
        let sent = stamped_message(7, 123, 1, PayloadKind::X);
        let v: serde_json::Value = serde_json::from_slice(&sent).expect("valid JSON");
        assert_eq!(v["text"], "7:123:");
        assert_eq!(parse_stamp("7:123:"), Some((7, 123)));
    }

    #[test]
    fn foreign_text_has_no_stamp() {
        assert_eq!(parse_stamp("hello everyone"), None);
        assert_eq!(parse_stamp("1:2"), None);
        assert_eq!(parse_stamp("a:2:x"), None);
    }

    /// The serde_json reading this module used before `Fields::scan`: the oracle it must agree
    /// with on every frame the server writes.
    fn parse_with_serde(bytes: &[u8]) -> Incoming {
        use std::borrow::Cow;
        #[derive(serde::Deserialize)]
        struct ServerFrame<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
            #[serde(default)]
            seq: Option<u64>,
            #[serde(default, borrow)]
            text: Option<Cow<'a, str>>,
            #[serde(default, borrow)]
            code: Option<Cow<'a, str>>,
        }
        let Ok(frame) = serde_json::from_slice::<ServerFrame<'_>>(bytes) else {
            return Incoming::Other;
        };
        match (frame.kind.as_ref(), frame.seq) {
            ("message", Some(seq)) => Incoming::Message {
                seq,
                stamp: frame.text.as_deref().and_then(parse_stamp),
            },
            ("welcome", Some(seq)) => Incoming::Welcome { seq },
            ("presence", _) => Incoming::Presence,
            ("pong", _) => Incoming::Pong,
            ("left", _) => Incoming::Left,
            ("error", _) => Incoming::Error {
                code: frame.code.map(Cow::into_owned).unwrap_or_default(),
            },
            _ => Incoming::Other,
        }
    }

    #[test]
    fn scanner_agrees_with_serde_on_server_frames() {
        let text = String::from_utf8(stamped_message(
            42,
            1_700_000_000_123_456,
            64,
            PayloadKind::X,
        ))
        .expect("utf8");
        let stamp: serde_json::Value = serde_json::from_str(&text).expect("json");
        let stamp = stamp["text"].as_str().expect("text").to_string();
        let frames = [
            format!(
                r#"{{"type":"message","room":"lt-3","user":"u42","text":"{stamp}","seq":17,"ts":1700000000123}}"#
            ),
            format!(
                r#"{{"type":"message","room":"lt-3","user":"u42","text":"{stamp}","seq":17,"ts":1,"id":"k-1"}}"#
            ),
            format!(r#" {{ "seq" : 5 , "text" : "{stamp}" , "type" : "message" }} "#),
            r#"{"type":"message","room":"r","user":"u","text":"a"b:1","seq":3,"ts":1}"#.into(),
            r#"{"type":"message","text":"1:2:x","seq":3}"#.into(),
            r#"{"type":"message","text":"1:2:x","seq":-3}"#.into(),
            r#"{"type":"message","text":"1:2:x","seq":3.5}"#.into(),
            r#"{"type":"message","text":"1:2:x","seq":"3"}"#.into(),
            r#"{"type":"message","text":"99999999999:2:x","seq":3}"#.into(),
            r#"{"type":"message","text":"1:2:x","seq":99999999999999999999999}"#.into(),
            r#"{"type":"message","text":"1:2:x"}"#.into(),
            r#"{"type":"welcome","room":"lt-0","user":"u1","members":3,"seq":9}"#.into(),
            r#"{"type":"presence","room":"lt-0","joined":["a","b"]"],"left":[],"members":2}"#
                .into(),
            r#"{"type":"presence","room":"lt-0","joined":[{"x":[1,{"y":"}"}]}],"members":2}"#
                .into(),
            r#"{"type":"error","code":"not_joined","reason":"x","room":"r","retry_after_ms":5}"#
                .into(),
            r#"{"type":"error","code":"abc","reason":"x"}"#.into(),
            r#"{"type":"pong"}"#.into(),
            r#"{"type":"left","room":"r"}"#.into(),
            r#"{"type":"dance"}"#.into(),
            r#"{"type":7}"#.into(),
            r#"{}"#.into(),
            r#"{"type":"pong"} x"#.into(),
            r#"{"type":"pong""#.into(),
            r#"{"type":"pong",}"#.into(),
            r#"{"type":}"#.into(),
            r#"["type","pong"]"#.into(),
            "not json".into(),
            "".into(),
        ];
        for f in &frames {
            assert_eq!(
                parse_incoming(f.as_bytes()),
                parse_with_serde(f.as_bytes()),
                "{f}"
            );
        }
        // Every prefix of a real frame is malformed, never a panic or a wrong message.
        let full = frames[0].as_bytes();
        for end in 0..full.len() {
            assert_eq!(parse_incoming(&full[..end]), Incoming::Other, "{end}");
        }
    }

    #[test]
    fn classifies_server_frames() {
        assert_eq!(
            parse_incoming(br#"{"type":"welcome","room":"lt-0","user":"u1","members":3,"seq":9}"#),
            Incoming::Welcome { seq: 9 }
        );
        assert_eq!(
            parse_incoming(
                br#"{"type":"presence","room":"lt-0","joined":["a"],"left":[],"members":2}"#
            ),
            Incoming::Presence
        );
        assert_eq!(
            parse_incoming(br#"{"type":"error","code":"not_joined","reason":"x"}"#),
            Incoming::Error {
                code: "not_joined".into()
            }
        );
        assert_eq!(parse_incoming(br#"{"type":"pong"}"#), Incoming::Pong);
        assert_eq!(parse_incoming(b"not json"), Incoming::Other);
        assert_eq!(
            parse_incoming(br#"{"type":"message","text":"no seq"}"#),
            Incoming::Other
        );
        // escaped text still parses (Cow falls back to an owned string)
        assert_eq!(
            parse_incoming(br#"{"type":"message","text":"a\"b","seq":1}"#),
            Incoming::Message {
                seq: 1,
                stamp: None
            }
        );
    }
}
