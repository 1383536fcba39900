//! How a step of a connection can end: the connection closing (`End`), or one client message
//! refused with an error frame while the socket stays open (`Refusal`).

use crate::proto::ProtocolError;
use crate::shutdown::Turn;

/// Why the connection ends; decides the close frame it sends.
#[derive(Debug)]
pub(crate) enum End {
    /// Send this close frame, then wait briefly for the peer's answer.
    Close(u16, &'static str),
    /// The server is shutting down and this connection's turn to go has come: close 1012 with
    /// a reconnect delay in the reason.
    Restart(Turn),
    /// The peer closed (its close was already answered) or vanished: just drop the socket.
    Gone,
}

/// Why a client message was not carried out.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Answered with an error frame; the socket stays open.
    Reply(ProtocolError),
    /// The connection ends.
    End(End),
}

impl From<End> for Refusal {
    fn from(end: End) -> Self {
        Refusal::End(end)
    }
}

/// The outcome of handling one client message.
pub(super) type Handled = Result<(), Refusal>;
