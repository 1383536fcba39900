//! A room this socket is in: its receiver, the last seq it saw, and a pending gap under
//! `--lag-policy resync`.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::{Either, FutureExt};

use smallvec::SmallVec;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use crate::core::room::Room;
use crate::core::stats::Stats;
use crate::proto::{Outbound, ServerFrame};

/// Room frames gathered for one write, with the index of the room each came from.
pub(super) type Batch = SmallVec<[(usize, Arc<Outbound>); 16]>;

/// A room this socket is in.
pub(super) struct Membership {
    pub(super) room: Arc<Room>,
    pub(super) rx: Receiver<Arc<Outbound>>,
    /// Seq of the last message seen from this room (delivered or skipped by `echo:false`), with
    /// `GAP` set under `--lag-policy resync` while frames after it were missed: the gap is then
    /// announced by a `lagged` frame just before the next message this member does get. One
    /// word for both, since the last seq cannot move while a gap is pending (the next message
    /// ends the gap): 8 bytes less in every connection.
    position: u64,
}

/// The flag bit of `Membership::position` (seqs never come near it: Redis numbers below
/// 2^53, and a standalone room would need centuries at a million messages a second).
const GAP: u64 = 1 << 63;

impl Membership {
    pub(super) fn new(room: Arc<Room>, rx: Receiver<Arc<Outbound>>, last_seq: u64) -> Self {
        Membership {
            room,
            rx,
            position: last_seq & !GAP,
        }
    }

    /// Adds a frame from this room (room index `i`) to `batch` if it is for connection
    /// `conn`, preceded by a `lagged` notice when a gap is pending.
    pub(super) fn accept(
        &mut self,
        i: usize,
        out: Arc<Outbound>,
        conn: u64,
        batch: &mut Batch,
        stats: &Stats,
    ) {
        if out.moved {
            // The room's ring was replaced: what follows is on the new one. (Not being in the
            // room any more cannot happen while this membership exists; the old ring would
            // then end `Closed`, which closes the connection.)
            if let Some(rx) = self.room.moved_receiver(conn) {
                self.rx = rx;
            }
            return;
        }
        if out.seq > 0 {
            let gap = self.position & GAP != 0;
            let from = (self.position & !GAP).saturating_add(1);
            if gap && out.seq > from {
                stats.lag_resyncs.inc();
                let notice = Outbound {
                    published_at: out.published_at,
                    ..Outbound::notice(
                        ServerFrame::Lagged {
                            room: self.room.name(),
                            missed_from: from,
                            missed_to: out.seq - 1,
                        }
                        .encode(),
                    )
                };
                batch.push((i, Arc::new(notice)));
            }
            self.position = out.seq & !GAP;
        }
        if out.is_for(conn) {
            batch.push((i, out));
        }
    }

    /// The receiver skipped frames (`--lag-policy resync`): everything after the last seq seen
    /// is missing until the next message says where the gap ends.
    pub(super) fn lagged(&mut self) {
        self.position |= GAP;
    }
}

/// Waits for the next frame from any of the rooms. Cancel-safe: `broadcast::Receiver::recv`
/// loses nothing when dropped before completion. Not an `async fn`: this future sits in every
/// idle connection's task, and an `async fn` would keep the slice beside the one room's
/// `recv` (88 bytes against 72, `-Zprint-type-sizes`).
pub(super) fn recv_any(
    rooms: &mut [Membership],
) -> impl Future<Output = (usize, Result<Arc<Outbound>, RecvError>)> + '_ {
    match rooms {
        [] => Either::Left(std::future::pending()),
        [only] => Either::Right(Either::Left(only.rx.recv().map(|r| (0, r)))),
        many => {
            let futures = many
                .iter_mut()
                .enumerate()
                .map(|(i, m)| Box::pin(async move { (i, m.rx.recv().await) }));
            Either::Right(Either::Right(
                futures_util::future::select_all(futures).map(|(out, _, _)| out),
            ))
        }
    }
}
