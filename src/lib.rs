//! roomcast: a WebSocket room broadcast engine.
//!
//! Data flows one way: `server` (accept) → `http` (routes, upgrade) → `connection` (one task per
//! socket) → `hub` / `room` (membership, sequence) → every member's writer, which sends the same
//! pre-encoded bytes (`protocol`).

pub mod archive;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod dedupe;
pub mod error;
pub mod frame;
pub mod history;
pub mod http;
pub mod hub;
pub mod limit;
pub mod lobby;
pub mod names;
pub mod protocol;
pub mod room;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod stats;
pub mod target;

pub use config::Config;
pub use error::{Error, Result};
pub use server::run;
