//! The library's error type. Expected conditions (a lagging member, a peer that went away) are
//! plain values in their modules, not errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("http error: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("websocket error: {0}")]
    WebSocket(#[from] fastwebsockets::WebSocketError),
    #[error("history database: {0}")]
    Db(#[from] crate::core::archive::DbError),
    #[error("{0}")]
    Token(#[from] crate::core::auth::IssueError),
    #[error("{0}")]
    Secret(#[from] crate::core::auth::WeakSecret),
    #[error("{0}")]
    Settings(#[from] crate::config::rooms::SettingsError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::bus::redis::ClusterError),
    #[error("{0}")]
    Accounts(#[from] crate::core::accounts::AccountError),
    /// `--accounts-db` without `--jwt-secret`: accounts issue tokens signed with it.
    #[error("--accounts-db needs --jwt-secret: the accounts' tokens are signed with it (make one with `openssl rand -base64 32`)")]
    AccountsWithoutSecret,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
