//! Criterion benches of the broadcast hot paths.
//!
//! * `fanout`: one message delivered to N in-process subscribers. `serialise_once` is what the
//!   server does (`Room::publish` encodes one frame; every receiver gets the same `Arc`'d bytes);
//!   `encode_per_subscriber` is the naive baseline (the message goes through the same kind of
//!   broadcast ring, and every subscriber encodes its own frame with `proto::message_frame`).
//!   Throughput is in deliveries, so the per-delivery cost shows.
//! * `encode`: one `message_frame` for a short and a 1 KiB text, against `serde_json::to_vec` of
//!   the same `ServerFrame::Message` alone (the difference is the frame-header cost).
//! * `registry`: join + leave of a fresh member on an existing room, and `Hub::get`, from one
//!   thread and from two threads contending for the same room.
//!
//! Run: `cargo bench -p roomcast --bench fanout`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use tokio::sync::broadcast;

use roomcast::core::hub::{Hub, JoinRequest, Start};
use roomcast::core::room::Joined;
use roomcast::core::stats::{unix_millis, Stats};
use roomcast::proto::{self, Outbound, ServerFrame};

const ROOM: &str = "bench-room";
const USER: &str = "alice";
/// 20 bytes of chat text.
const SHORT_TEXT: &str = "hello, how are you??";
/// Registry shards, as the server's default.
const SHARDS: usize = 64;
/// Broadcast ring size. Every bench drains all receivers after each publish, so a ring of a few
/// slots would do; this leaves ample room so no receiver can ever lag.
const ROOM_BUFFER: usize = 1024;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
}

fn new_hub() -> Hub {
    Hub::new(SHARDS, ROOM_BUFFER, Arc::new(Stats::new()))
}

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
    configure(&mut group);
    for n in [1usize, 100, 10_000] {
        group.throughput(Throughput::Elements(n as u64));

        // Serialise once: the real room, its members joined through the hub.
        let hub = new_hub();
        let user: Arc<str> = USER.into();
        let mut members: Vec<(u64, broadcast::Receiver<Arc<Outbound>>)> = (1..=n as u64)
            .map(|id| (id, join(&hub, ROOM, id, &user).rx))
            .collect();
        let room = hub.get(ROOM).expect("room exists while it has members");
        group.bench_with_input(BenchmarkId::new("serialise_once", n), &n, |b, _| {
            b.iter(|| {
                room.publish(USER, SHORT_TEXT, 0, false);
                let mut written = 0usize;
                for (id, rx) in &mut members {
                    let out = rx.try_recv().expect("a frame per publish, never lagged");
                    if out.is_for(*id) {
                        // The "write": the shared bytes, never copied.
                        written += black_box(&out.frame[..]).len();
                    }
                }
                written
            });
        });
        drop(members);

        // Encode per subscriber: same broadcast ring, but each subscriber encodes its own frame.
        let (tx, _) = broadcast::channel::<Arc<PlainMessage>>(ROOM_BUFFER);
        let mut naive: Vec<broadcast::Receiver<Arc<PlainMessage>>> =
            (0..n).map(|_| tx.subscribe()).collect();
        let (room_name, user_name, text): (Arc<str>, Arc<str>, Arc<str>) =
            (ROOM.into(), USER.into(), SHORT_TEXT.into());
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

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    let long_text = "x".repeat(1024);
    for (label, text) in [("20B", SHORT_TEXT), ("1KiB", long_text.as_str())] {
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

/// Runs `op(thread, i)` `iters` times in all, split across `threads` threads that start together;
/// returns the wall time of the slowest thread (thread start-up excluded).
fn timed_on_threads<F>(threads: u64, iters: u64, op: F) -> Duration
where
    F: Fn(u64, u64) + Sync,
{
    if threads == 1 {
        let start = Instant::now();
        for i in 0..iters {
            op(0, i);
        }
        return start.elapsed();
    }
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                let share = iters / threads + u64::from(t < iters % threads);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..share {
                        op(t, i);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn registry(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));

    // A populated registry: 1,000 other rooms, and the bench room held open by an anchor member
    // so it survives every leave.
    let hub = new_hub();
    let user: Arc<str> = USER.into();
    let mut held = Vec::new();
    for r in 0..1_000u64 {
        held.push(join(&hub, &format!("room-{r}"), r + 1, &user));
    }
    held.push(join(&hub, ROOM, 0, &user));
    let room = hub.get(ROOM).expect("anchored room");
    // Member ids: one disjoint range per thread, above every id in use.
    let next_id = AtomicU64::new(0);

    for threads in [1u64, 2] {
        let label = if threads == 1 {
            "1_thread"
        } else {
            "2_threads"
        };
        group.bench_function(BenchmarkId::new("join_leave", label), |b| {
            b.iter_custom(|iters| {
                let base = (next_id.fetch_add(1, Ordering::Relaxed) << 40) | (1 << 62);
                timed_on_threads(threads, iters, |t, i| {
                    let id = base | (t << 32) | i;
                    let joined = join(&hub, ROOM, id, &user);
                    black_box(&joined.welcome);
                    assert!(hub.leave(&joined.room, id));
                })
            });
        });
        group.bench_function(BenchmarkId::new("get", label), |b| {
            b.iter_custom(|iters| {
                timed_on_threads(threads, iters, |_, _| {
                    black_box(hub.get(black_box(ROOM)));
                })
            });
        });
    }
    // Presence bookkeeping stays bounded: at most one queued entry per room.
    hub.flush_presence();
    assert_eq!(room.member_count(), 1);
    group.finish();
    drop(held);
}

criterion_group!(benches, fanout, encode, registry);
criterion_main!(benches);

/// Joins `name` as member `id`.
fn join(hub: &Hub, name: &str, id: u64, user: &Arc<str>) -> Joined {
    let req = JoinRequest {
        name,
        id,
        user,
        password: None,
        replay: None,
        grant: None,
    };
    hub.join(&req, Start::default())
        .expect("an open room admits")
}
