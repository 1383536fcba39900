//! The registry (`core::hub`): join + leave of a fresh member on an existing room, and
//! `Hub::get`, among 1,000 other rooms, from one thread and from two threads contending for the
//! same room.
//!
//!     cargo bench --bench registry

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod support;

const ROOM: &str = "bench-room";
const USER: &str = "alice";

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
    support::configure(&mut group);
    group.throughput(Throughput::Elements(1));

    // A populated registry: 1,000 other rooms, and the bench room held open by an anchor member
    // so it survives every leave.
    let hub = support::new_hub();
    let user: Arc<str> = USER.into();
    let mut held = Vec::new();
    for r in 0..1_000u64 {
        held.push(support::join(&hub, &format!("room-{r}"), r + 1, &user));
    }
    held.push(support::join(&hub, ROOM, 0, &user));
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
                    let joined = support::join(&hub, ROOM, id, &user);
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

criterion_group!(benches, registry);
criterion_main!(benches);
