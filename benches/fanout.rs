//! Fan-out: one message delivered to every member of one room of 10, 100 and 1,000 members.
//!
//! * `serialise_once` is the server's path without the sockets: `Room::publish` numbers the
//!   message, encodes one frame and sends one `Arc` into the room's broadcast ring; every
//!   member's receiver takes it and checks it is for them (`Outbound::is_for`), and the "write"
//!   touches the shared bytes, never copied.
//! * `encode_per_subscriber` is the naive baseline: the message goes through the same kind of
//!   broadcast ring, and every subscriber encodes its own frame (`proto::message_frame`).
//!
//! Throughput is in deliveries, so the per-delivery cost shows.
//!
//!     cargo bench --bench fanout

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::sync::broadcast;

use roomcast::core::stats::unix_millis;
use roomcast::proto::{self, Outbound};

mod support;

const ROOM: &str = "bench-room";
const USER: &str = "alice";
/// 20 bytes of chat text.
const TEXT: &str = "hello, how are you??";

/// What a naive server broadcasts: the message itself, to be encoded by every subscriber.
struct PlainMessage {
    room: Arc<str>,
    user: Arc<str>,
    text: Arc<str>,
    seq: u64,
    ts: u64,
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    support::configure(&mut group);
    for n in [10usize, 100, 1_000] {
        group.throughput(Throughput::Elements(n as u64));

        // Serialise once: the real room, its members joined through the hub.
        let hub = support::new_hub();
        let user: Arc<str> = USER.into();
        let mut members: Vec<(u64, broadcast::Receiver<Arc<Outbound>>)> = (1..=n as u64)
            .map(|id| (id, support::join(&hub, ROOM, id, &user).rx))
            .collect();
        let room = hub.get(ROOM).expect("room exists while it has members");
        group.bench_with_input(BenchmarkId::new("serialise_once", n), &n, |b, _| {
            b.iter(|| {
                room.publish(USER, TEXT, 0, false);
                let mut written = 0usize;
                for (id, rx) in &mut members {
                    let out = rx.try_recv().expect("a frame per publish, never lagged");
                    if out.is_for(*id) {
                        written += black_box(&out.frame[..]).len();
                    }
                }
                written
            });
        });
        drop(members);

        // Encode per subscriber: same broadcast ring, but each subscriber encodes its own frame.
        let (tx, _) = broadcast::channel::<Arc<PlainMessage>>(support::ROOM_BUFFER);
        let mut naive: Vec<broadcast::Receiver<Arc<PlainMessage>>> =
            (0..n).map(|_| tx.subscribe()).collect();
        let (room_name, user_name, text): (Arc<str>, Arc<str>, Arc<str>) =
            (ROOM.into(), USER.into(), TEXT.into());
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("encode_per_subscriber", n), &n, |b, _| {
            b.iter(|| {
                seq += 1;
                let msg = PlainMessage {
                    room: room_name.clone(),
                    user: user_name.clone(),
                    text: text.clone(),
                    seq,
                    ts: unix_millis(),
                };
                let _ = tx.send(Arc::new(msg));
                let mut written = 0usize;
                for rx in &mut naive {
                    let m = rx.try_recv().expect("a message per send, never lagged");
                    let frame = proto::message_frame(&m.room, &m.user, &m.text, m.seq, m.ts);
                    written += black_box(&frame[..]).len();
                }
                written
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
