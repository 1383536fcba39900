//! The WebSocket wire below the protocol: decoding client frames, writing
//! whole frames.

pub mod deflate;
pub mod frame;
pub mod io;
pub mod write;
