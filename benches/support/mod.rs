//! What the criterion benches share: one short measurement setting (so that `cargo bench` runs
//! every bench in well under two minutes on two cores) and a hub to join rooms of.

// Each bench file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;

use roomcast::core::hub::{Hub, JoinRequest, Start};
use roomcast::core::room::Joined;
use roomcast::core::stats::Stats;

/// Registry shards, as the server's default.
pub const SHARDS: usize = 64;
/// Broadcast ring size, the server's default `--room-buffer`. Every bench drains all receivers
/// after each publish, so no receiver can lag.
pub const ROOM_BUFFER: usize = 1024;

/// Short runs: 10 samples over 1 s after 0.3 s of warm-up. Enough to compare a change against a
/// saved baseline on a quiet machine (criterion reports the confidence interval); raise them
/// with `--measurement-time` / `--sample-size` for finer figures.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(300));
}

pub fn new_hub() -> Hub {
    Hub::new(SHARDS, ROOM_BUFFER, Arc::new(Stats::new()))
}

/// Joins `name` as member `id`.
pub fn join(hub: &Hub, name: &str, id: u64, user: &Arc<str>) -> Joined {
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
