//! roomcast: a WebSocket room broadcast engine.
//!
//! Layers, lowest first; a module imports only from the layers below it:
//!
//! | layer | owns |
//! |---|---|
//! | `config` | flags, the rooms file |
//! | `proto` | wire messages: client messages, server frames, names, close codes |
//! | `ws` | WebSocket frame decoding and vectored writes |
//! | `core` | rooms, the registry, history, the lobby, limits, tokens, counters |
//! | `bus` | where rooms live: this process alone, or every process on one Redis |
//! | `conn` | one socket's life |
//! | `http` | routes, the JSON API, the upgrade |
//! | `server` | the accept loop and the shutdown sequence |
//!
//! A message flows one way: accept → HTTP route → upgrade → connection → bus → room → every
//! member's writer, which sends the same pre-encoded bytes.

mod bus;
pub mod config;
mod conn;
pub mod core;
mod error;
mod http;
pub mod proto;
mod server;
mod shutdown;
mod wheel;
mod ws;

pub use config::Config;
pub use error::{Error, Result};
pub use http::target;
pub use server::run;

/// The codec the criterion benches (`benches/`) measure directly. Not part of the API.
#[doc(hidden)]
pub mod benching {
    pub use crate::ws::deflate;
}

/// The decoders of network bytes that the fuzz targets (`fuzz/`) drive directly: client
/// WebSocket frames and cluster payloads from Redis. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::bus::redis::wire;
    pub use crate::ws::frame;
}
