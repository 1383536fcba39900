//! What the server does once per message, however many members get it:
//!
//! * `encode`: `proto::message_frame` (a `ServerFrame::Message` to JSON, written behind its
//!   WebSocket header in one buffer) for a 20-byte and a 1 KiB text, against `serde_json::to_vec`
//!   of the same `ServerFrame` alone (the difference is the frame's cost).
//! * `compress`: permessage-deflate of one message frame's payload, as every member that
//!   negotiated compression then shares it (`ws::deflate::compress_frame`): a 500-byte chat
//!   message in English and a JSON document of up to 4 KiB sent as a message's text.
//!   Throughput is in payload bytes.
//!
//!     cargo bench --bench encode

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastwebsockets::OpCode;

use roomcast::benching::deflate;
use roomcast::proto::{self, ServerFrame};

mod support;

const ROOM: &str = "bench-room";
const USER: &str = "alice";

/// Chat prose, cut to the lengths the benches need.
const PROSE: &str = "Morning all! Did anyone else see the deploy notes from last night? I think \
the new search page is much faster, but the filters on mobile still jump around when you scroll. \
Maria said she would look into it after lunch. Also, quick reminder that the team lunch moved to \
Thursday because half of us are at the conference on Wednesday. If you have dietary \
restrictions, drop them in the sheet before noon tomorrow. Has anybody tried the new coffee place \
on the corner? Their flat white was decent, a bit pricey though. Back to work: the flaky test.";

/// A JSON array of order records, as many as fit in `len` bytes, its values varied record by
/// record (ids, names, quantities, prices), so that it compresses like application data rather
/// than like one record repeated.
fn json_document(len: usize) -> String {
    const NAMES: [&str; 6] = [
        "Ada Lovelace",
        "Grace Hopper",
        "Alan Turing",
        "Edsger Dijkstra",
        "Barbara Liskov",
        "Donald Knuth",
    ];
    const STATUS: [&str; 4] = ["paid", "packed", "shipped", "delivered"];
    let mut doc = String::from("[");
    let mut id = 8_812_731u64;
    loop {
        let name = NAMES[(id % 6) as usize];
        let status = STATUS[(id % 4) as usize];
        let record = format!(
            r#"{{"id":{id},"at":"2026-03-{:02}T{:02}:{:02}:{:02}Z","customer":{{"id":"c_{:x}","name":"{name}"}},"items":[{{"sku":"BK-{}","qty":{},"price":{}.{:02}}},{{"sku":"PN-{}","qty":{},"price":{}.{:02}}}],"status":"{status}"}}"#,
            1 + id % 28,
            id % 24,
            id * 7 % 60,
            id * 13 % 60,
            id * 2_654_435_761 % 0xFF_FFFF,
            id % 9_000 + 1_000,
            1 + id % 5,
            id * 31 % 200,
            id * 17 % 100,
            id * 3 % 9_000 + 1_000,
            1 + id % 3,
            id * 11 % 90,
            id * 23 % 100,
        );
        // The comma before it and the closing bracket must fit too.
        if doc.len() + record.len() + 2 > len {
            break;
        }
        if doc.len() > 1 {
            doc.push(',');
        }
        doc.push_str(&record);
        id += 7_919;
    }
    doc.push(']');
    doc
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    support::configure(&mut group);
    group.throughput(Throughput::Elements(1));
    let long_text = "x".repeat(1024);
    for (label, text) in [
        ("20B", "hello, how are you??"),
        ("1KiB", long_text.as_str()),
    ] {
        group.bench_with_input(BenchmarkId::new("message_frame", label), text, |b, text| {
            b.iter(|| {
                proto::message_frame(
                    black_box(ROOM),
                    black_box(USER),
                    black_box(text),
                    black_box(42),
                    black_box(1_700_000_000_000),
                )
            });
        });
        group.bench_with_input(
            BenchmarkId::new("serde_json_to_vec", label),
            text,
            |b, text| {
                b.iter(|| {
                    let msg = ServerFrame::Message {
                        room: black_box(ROOM),
                        user: black_box(USER),
                        text: black_box(text),
                        seq: black_box(42),
                        id: None,
                        ts: black_box(1_700_000_000_000),
                    };
                    serde_json::to_vec(&msg).expect("serialising into memory cannot fail")
                });
            },
        );
    }
    group.finish();
}

fn compress(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress");
    support::configure(&mut group);
    let chat = &PROSE[..500];
    let json = json_document(4096);
    for (label, text) in [("chat_500B", chat), ("json_4KiB", json.as_str())] {
        // The payload the server compresses: the message frame's JSON, header left out (the
        // document's quotes escaped inside it).
        let frame = proto::message_frame(ROOM, USER, text, 42, 1_700_000_000_000);
        let payload = proto::frame_payload(&frame).to_vec();
        let compressed = deflate::compress_frame(OpCode::Text, &payload)
            .expect("prose and JSON compress")
            .len();
        eprintln!(
            "compress/{label}: {} payload bytes -> {compressed} frame bytes",
            payload.len()
        );
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("compress_frame", label),
            &payload,
            |b, payload| {
                b.iter(|| deflate::compress_frame(OpCode::Text, black_box(payload)));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, encode, compress);
criterion_main!(benches);
