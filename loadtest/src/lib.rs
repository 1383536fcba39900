//! roomcast's load generator: many WebSocket clients in many rooms, publishers stamping send
//! times, receivers checking every room's `seq` stream, and HTTP cross-checks of what the
//! servers say. The binary is a thin `main`; tests call [`run`] directly.
//!
//! Data flows: `config` → `preflight` → `coordinator` (spawns `worker`s via `link`) →
//! `client` connections → counters and histograms → `cost` (both sides' CPU per window) →
//! `report` → `summary` (the run's one line for `loadtest/results/summary.jsonl`). `units` (how
//! figures are written) sits below them all.

pub mod client;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod cost;
pub mod gate;
pub mod hist;
pub mod http;
pub mod link;
pub mod payload;
pub mod plan;
pub mod preflight;
pub mod procfs;
pub mod report;
pub mod seq;
pub mod summary;
pub mod sys;
pub mod units;
pub mod wire;
pub mod worker;

pub use config::{Config, Pacing, RampOrder, Route, Scenario};
pub use coordinator::run;
pub use report::Report;
pub use summary::Summary;
