//! The chat protocol's business: a client message becomes a publish, a join or a leave, each
//! checked (name, token, limits) before it goes to the bus; a refusal is an error frame.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::end::{End, Handled, Refusal};
use super::membership::Membership;
use super::{Connection, MAX_BATCH};
use crate::bus::{Fallback, JoinRequest, PublishError};
use crate::core::auth::AuthError;
use crate::core::dedupe::Author;
use crate::core::limit::{retry_after_ms, Verdict};
use crate::core::room::{Joined, Publish, Room};
use crate::core::stats::AuthReason;
use crate::proto::close;
use crate::proto::names::{is_server_room, validate_joinable_room, validate_room, NameError};
use crate::proto::ReplayRequest;
use crate::proto::{self, parse_client_message, ClientMessage, ProtocolError, ServerFrame};

impl Connection {
    /// Handles one complete client text message; protocol errors answer with an error frame.
    pub(super) async fn on_text(&mut self, text: &str) -> Option<End> {
        self.cx.stats.messages_in.inc();
        match self.admit(Some(text)).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(end) => return Some(end),
        }
        // `room` and `id` borrow from `text`; they are only needed again to label an error
        // frame.
        let mut message_id = None;
        let (result, room) = match parse_client_message(text) {
            Ok(ClientMessage::Message {
                room,
                text,
                echo,
                id,
            }) => {
                let res = match self
                    .publish(room.as_deref(), &text, echo, id.as_deref())
                    .await
                {
                    Ok(Some(ack)) => self.write_own(&ack).await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                message_id = id;
                (res, room)
            }
            Ok(ClientMessage::Join {
                room,
                password,
                replay,
            }) => (
                self.join(&room, password.as_deref(), replay).await,
                Some(room),
            ),
            Ok(ClientMessage::Leave { room }) => (self.leave(&room).await, Some(room)),
            Ok(ClientMessage::Refresh { token }) => (self.refresh(&token).await, None),
            Ok(ClientMessage::Ping) => (self.write_own(&ServerFrame::Pong.encode()).await, None),
            Err(e) => (Err(Refusal::Reply(e)), None),
        };
        match result {
            Ok(()) => None,
            Err(Refusal::Reply(e)) => {
                // Only a well-formed name is echoed back (`$` names included).
                let room =
                    room.filter(|r| matches!(validate_room(r), Ok(()) | Err(NameError::Reserved)));
                let frame = proto::message_error_frame(&e, room.as_deref(), message_id.as_deref());
                self.write_frames(&[&frame]).await.err()
            }
            Err(Refusal::End(end)) => Some(end),
        }
    }

    /// Takes one token from the socket's `--rate-limit` bucket for what the client just sent
    /// (a message, a ping, a pong or a continuation fragment). `Ok(false)`: refused, and the
    /// `rate_limited` error frame is written (naming the `id` of `text`, a complete message,
    /// when it is a chat message with one): the caller drops what was sent. `Err`: the client
    /// kept sending through `burst` refusals (close 1008), or the write failed.
    pub(super) async fn admit(&mut self, text: Option<&str>) -> Result<bool, End> {
        let Some(limiter) = &mut self.limiter else {
            return Ok(true);
        };
        match limiter.check() {
            Verdict::Allow => Ok(true),
            Verdict::Refuse { retry_after } => {
                self.cx.stats.rate_limited.inc();
                let err = ProtocolError::rate_limited(
                    "this socket sends faster than --rate-limit; the message was dropped",
                    retry_after_ms(retry_after),
                );
                // Parsed only on this refused path: the id lets the client keep the message.
                let id = match text.map(parse_client_message) {
                    Some(Ok(ClientMessage::Message { id, .. })) => id,
                    _ => None,
                };
                let frame = proto::message_error_frame(&err, None, id.as_deref());
                self.write_frames(&[&frame]).await?;
                Ok(false)
            }
            Verdict::Flooding => {
                self.cx.stats.rate_limited.inc();
                Err(End::Close(close::POLICY, "rate limit exceeded"))
            }
        }
    }

    /// Publishes into the named (or only) room. `Ok(Some(frame))`: the message repeated an
    /// `id` and was not broadcast; the frame acknowledges it to the sender alone.
    async fn publish(
        &mut self,
        room: Option<&str>,
        text: &str,
        echo: bool,
        id: Option<&str>,
    ) -> Result<Option<Bytes>, Refusal> {
        let target = match room {
            Some(name) => {
                validate_room(name).map_err(|e| Refusal::Reply(room_error(e)))?;
                self.rooms.iter().find(|m| m.room.name() == name)
            }
            // The server's rooms (`$lobby`) take no messages, so they never make the choice
            // ambiguous.
            None => {
                let mut chat = self.rooms.iter().filter(|m| !is_server_room(m.room.name()));
                match (chat.next(), chat.next()) {
                    (Some(_), Some(_)) => {
                        return Err(Refusal::Reply(ProtocolError::new(
                            "room_required",
                            "this socket is in several rooms: name one with \"room\"",
                        )))
                    }
                    (None, _) if !self.rooms.is_empty() => {
                        return Err(Refusal::Reply(room_error(NameError::Reserved)))
                    }
                    (only, _) => only,
                }
            }
        };
        let Some(member) = target else {
            return Err(Refusal::Reply(ProtocolError::new(
                "not_joined",
                "join the room before sending to it",
            )));
        };
        let room = member.room.clone();
        let publish = Publish {
            user: &self.user,
            text,
            id,
            // Ids are the token user's own, or this socket's when tokens are off.
            author: match &self.grant {
                Some(grant) => Author::User(&grant.user),
                None => Author::Connection(self.id),
            },
            origin: self.id,
            skip_origin: !echo,
        };
        // Boxed so that a broker's future does not grow every connection's task.
        let published = Box::pin(
            self.cx
                .bus
                .publish_in(&room, &publish, Fallback::LocalMembers),
        );
        match published.await {
            Ok(p) => Ok(duplicate_ack(&room, id, p.duplicate, p.seq)),
            Err(PublishError::RateLimited(wait)) => {
                Err(Refusal::Reply(ProtocolError::rate_limited(
                    "the room is at its --room-rate-limit; the message was dropped",
                    retry_after_ms(wait),
                )))
            }
            Err(PublishError::Unavailable {
                reason,
                delivered_locally,
            }) => Err(Refusal::Reply(ProtocolError::new(
                "cluster_unavailable",
                if delivered_locally {
                    format!("{reason}: delivered to members on this server only")
                } else {
                    format!("{reason}: nothing was delivered")
                },
            ))),
            // The member's own room always has a member: this one.
            Err(PublishError::NoSuchRoom) => Err(Refusal::Reply(ProtocolError::new(
                "not_joined",
                "join the room before sending to it",
            ))),
        }
    }

    /// Joins `name` and writes its welcome frame, then the past messages `replay` asks for.
    /// Checks, in order: the name, the access token, then (under the room's lock, in
    /// `Hub::join`) password and member cap, subscribing and taking the replay in the same
    /// step.
    async fn join(
        &mut self,
        name: &str,
        password: Option<&str>,
        replay: Option<ReplayRequest>,
    ) -> Handled {
        validate_joinable_room(name).map_err(|e| Refusal::Reply(room_error(e)))?;
        if let Some(grant) = &self.grant {
            if grant.expired() {
                self.cx.stats.auth_refused.inc(AuthReason::TokenExpired);
                return Err(Refusal::Reply(ProtocolError::new(
                    "token_expired",
                    "the access token has expired: reconnect with a fresh one",
                )));
            }
            if !grant.allows(name) {
                self.cx.stats.auth_refused.inc(AuthReason::ForbiddenRoom);
                return Err(Refusal::Reply(ProtocolError::new(
                    "forbidden_room",
                    "the access token does not allow this room",
                )));
            }
        }
        if self.rooms.iter().any(|m| m.room.name() == name) {
            return Err(Refusal::Reply(ProtocolError::new(
                "already_joined",
                "this socket is already in that room",
            )));
        }
        if self.rooms.len() >= self.cx.limits.max_rooms {
            return Err(Refusal::Reply(ProtocolError::new(
                "too_many_rooms",
                format!(
                    "a socket may be in at most {} rooms",
                    self.cx.limits.max_rooms
                ),
            )));
        }
        let peer = self.peer();
        self.not_locked(peer, name)?;
        let req = JoinRequest {
            name,
            id: self.id,
            user: &self.user,
            password,
            replay,
            grant: self.grant.as_deref(),
        };
        // Boxed: a broker's join may wait (cluster mode: for the room's subscription).
        let joined = Box::pin(self.cx.bus.join(req)).await.map_err(|e| {
            if let Some(reason) = e.auth_reason() {
                self.cx.stats.auth_refused.inc(reason);
            }
            if let (true, Some(peer)) = (e.is_guess(), peer) {
                // Answered as it is; the lockout bites on the next attempt.
                let _ = self.cx.lockout.failed(peer, name);
            }
            Refusal::Reply(ProtocolError::new(e.code(), e.to_string()))
        })?;
        self.enter(joined).await
    }

    /// Takes a membership `Hub::join` granted and writes its welcome frame, then its replay
    /// (announcement and past messages), all before anything live from the room.
    pub(super) async fn enter(&mut self, joined: Joined) -> Handled {
        self.rooms
            .push(Membership::new(joined.room, joined.rx, joined.last_seq));
        let welcome = joined.welcome.encode();
        let Some(replay) = joined.replay else {
            return self.write_own(&welcome).await;
        };
        let mut frames: Vec<&[u8]> = Vec::with_capacity(replay.frames.len() + 2);
        frames.push(&welcome);
        frames.push(&replay.header);
        frames.extend(replay.frames.iter().map(|o| &o.frame[..]));
        for chunk in frames.chunks(MAX_BATCH) {
            self.write_frames(chunk).await.map_err(Refusal::End)?;
        }
        Ok(())
    }

    async fn leave(&mut self, name: &str) -> Handled {
        validate_joinable_room(name).map_err(|e| Refusal::Reply(room_error(e)))?;
        let Some(index) = self.rooms.iter().position(|m| m.room.name() == name) else {
            return Err(Refusal::Reply(ProtocolError::new(
                "not_joined",
                "this socket is not in that room",
            )));
        };
        let m = self.rooms.remove(index);
        self.cx.bus.leave(&m.room, self.id);
        self.write_own(
            &ServerFrame::Left {
                room: name,
                reason: None,
            }
            .encode(),
        )
        .await
    }

    /// Takes a fresh token for the open socket: same user required. The socket then lives
    /// until the new `exp` (the wait in `serve` reads it from the grant), and leaves, each with
    /// a `left` frame, the rooms the new token no longer allows; `refreshed` comes last, so a
    /// client that reads it knows its rooms.
    async fn refresh(&mut self, token: &str) -> Handled {
        let Some(verifier) = &self.cx.verifier else {
            return Err(Refusal::Reply(ProtocolError::new(
                "refresh_unavailable",
                "this server does not use access tokens",
            )));
        };
        let peer = self.peer();
        self.not_locked(peer, "")?;
        let grant = verifier.verify(token).map_err(|e| {
            self.cx.stats.auth_refused.inc(e.reason());
            if let (true, Some(peer)) = (e.is_guess(), peer) {
                let _ = self.cx.lockout.failed(peer, "");
            }
            let code = match e {
                AuthError::Expired => "token_expired",
                _ => "unauthorized",
            };
            Refusal::Reply(ProtocolError::new(code, e.to_string()))
        })?;
        // A socket's user is named in every message it has published and in presence: a token
        // for someone else would let one user speak as another.
        if *grant.user != *self.user {
            self.cx.stats.auth_refused.inc(AuthReason::RefreshRefused);
            return Err(Refusal::Reply(ProtocolError::new(
                "forbidden_user",
                "the token is for another user: a socket keeps the user it opened with",
            )));
        }
        let exp = grant.expires_at;
        let grant = Arc::new(grant);
        self.grant = Some(grant.clone());
        let mut i = 0;
        while let Some(member) = self.rooms.get(i) {
            if grant.allows(member.room.name()) {
                i += 1;
                continue;
            }
            let m = self.rooms.remove(i);
            self.cx.bus.leave(&m.room, self.id);
            let frame = ServerFrame::Left {
                room: m.room.name(),
                reason: Some("token no longer allows this room"),
            }
            .encode();
            self.write_own(&frame).await?;
        }
        self.write_own(&ServerFrame::Refreshed { exp }.encode())
            .await
    }

    /// The client's address, for the failure lockout: the one the upgrade was charged to
    /// (behind a trusted proxy, the client it named), else the socket's peer (`None` if the
    /// socket cannot tell).
    fn peer(&self) -> Option<IpAddr> {
        self.ip
            .or_else(|| self.stream.peer_addr().ok().map(|a| a.ip()))
    }

    /// An error frame with `retry_after_ms` while `peer` is locked out of `room` (`""`: token
    /// refreshes).
    fn not_locked(&self, peer: Option<IpAddr>, room: &str) -> Handled {
        let Some(peer) = peer else { return Ok(()) };
        self.cx.lockout.check(peer, room).map_err(|wait| {
            self.cx.stats.auth_refused.inc(AuthReason::TooManyFailures);
            Refusal::Reply(ProtocolError {
                code: "too_many_failures",
                reason: "too many failed attempts from this address: try again later".into(),
                retry_after_ms: Some(retry_after_ms(wait)),
            })
        })
    }

    pub(super) fn leave_all(&mut self) {
        for m in self.rooms.drain(..) {
            self.cx.bus.leave(&m.room, self.id);
        }
    }
}

/// The `ack` frame for a message whose `id` repeated one already published as `seq`.
fn duplicate_ack(room: &Room, id: Option<&str>, duplicate: bool, seq: u64) -> Option<Bytes> {
    match (duplicate, id) {
        (true, Some(id)) => Some(
            ServerFrame::Ack {
                room: room.name(),
                id,
                seq,
                duplicate: true,
            }
            .encode(),
        ),
        _ => None,
    }
}

/// The error frame's content for a refused room name.
fn room_error(e: NameError) -> ProtocolError {
    ProtocolError::new(e.room_code(), e.room_reason())
}
