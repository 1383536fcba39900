//! A room this socket is in: its receiver, the last seq it saw, and a pending gap under
//! `--lag-policy resync`.

use std::sync::Arc;

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
    /// Seq of the last message seen from this room (delivered or skipped by `echo:false`).
    last_seq: u64,
    /// `--lag-policy resync`: the first seq this member missed; announced by a `lagged` frame
    /// just before the next message it does get.
    /// 0: none (seqs start at 1). Not an `Option`: 8 bytes less in every connection.
    gap_from: u64,
}

impl Membership {
    pub(super) fn new(room: Arc<Room>, rx: Receiver<Arc<Outbound>>, last_seq: u64) -> Self {
        Membership {
            room,
            rx,
            last_seq,
            gap_from: 0,
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
            let from = std::mem::take(&mut self.gap_from);
            if from > 0 && out.seq > from {
                stats.lag_resyncs.inc();
                let notice = Outbound {
                    frame: ServerFrame::Lagged {
                        room: self.room.name(),
                        missed_from: from,
                        missed_to: out.seq - 1,
                    }
                    .encode(),
                    origin: 0,
                    skip_origin: false,
                    published_at: out.published_at,
                    seq: 0,
                    sse: Default::default(),
                    deflated: None,
                    moved: false,
                };
                batch.push((i, Arc::new(notice)));
            }
            self.last_seq = out.seq;
        }
        if out.is_for(conn) {
            batch.push((i, out));
        }
    }

    /// The receiver skipped frames (`--lag-policy resync`): everything after the last seq seen
    /// is missing until the next message says where the gap ends.
    pub(super) fn lagged(&mut self) {
        if self.gap_from == 0 {
            self.gap_from = self.last_seq.saturating_add(1);
        }
    }
}

/// Waits for the next frame from any of the rooms. Cancel-safe: `broadcast::Receiver::recv`
/// loses nothing when dropped before completion.
pub(super) async fn recv_any(
    rooms: &mut [Membership],
) -> (usize, Result<Arc<Outbound>, RecvError>) {
    match rooms {
        [] => std::future::pending().await,
        [only] => (0, only.rx.recv().await),
        many => {
            let futures = many
                .iter_mut()
                .enumerate()
                .map(|(i, m)| Box::pin(async move { (i, m.rx.recv().await) }));
            futures_util::future::select_all(futures).await.0
        }
    }
}
