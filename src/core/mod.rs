//! The engine's core, with no I/O of its own: rooms and their registry, history and the
//! archive, the `$lobby`, rate limits, access tokens and counters.

pub mod accounts;
pub mod archive;
pub mod auth;
pub mod coalesce;
pub mod dedupe;
pub mod history;
pub mod hub;
pub mod limit;
pub mod lobby;
pub mod lockout;
pub mod ring;
pub mod room;
pub mod stats;
pub mod workers;
