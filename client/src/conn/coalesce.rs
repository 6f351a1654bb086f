//! Coalescing: runs of adjacent publishes and of adjacent settlements, taken in one drain of the
//! command channel, leave as one frame each.
//!
//! Contract: driver-task only (methods on `Driver`). Commands are taken in channel order and
//! only a run of adjacent, compatible commands is merged, so the wire order of frames is the
//! order of the calls: a settlement never overtakes a publish, cancel or request queued before
//! it. The run is flushed (encoded) when an incompatible command arrives, when the next one would
//! not fit, and at the end of every drain, so nothing waits in a run across an await.
//!
//! - Publishes merge when they share exchange, routing key and mandatory flag, up to
//!   `publish_batch_max` entries and `frame_size_max` bytes (estimated as `Client` estimates one
//!   batch); one `PendingPublish` per message as before, sequences increasing in wire order. If
//!   the merged frame fails to encode, each command is encoded on its own again, so exactly the
//!   publishes that cannot be sent fail (and give their permits back).
//! - Acks merge with acks, nacks with nacks of the same `requeue` and the same retry delay
//!   (`Delivery::nack_with_delay`; rejects never), into one frame of tag ranges (a refusal of
//!   the delay, past the broker's `delay_ms_max`, would have refused each of them alone too). The frame asks for the broker's answer only if some caller still waits
//!   for it (its `SettleFuture` is alive); it then gets one request id, and the answer is handed
//!   to every waiter of the run.
//!
//! Exactness: the broker judges a settlement frame whole: a range naming no delivery it holds
//! refuses the frame and settles nothing (`UnknownDeliveryTag`). So only settlements whose every
//! tag is *held* merge: delivered by a consumer of this connection (not auto-acked) and not
//! named by any settlement, cancel or requeue sent since. Those the broker holds too, so the
//! merged frame cannot be refused for a tag, and its `Ok` is every waiter's. Any other
//! settlement (a double ack, a `get` delivery, a tag of a consumer the broker cancelled) goes in
//! a frame of its own, judged exactly as before. What remains shared is a refusal by an owning
//! shard (its storage failing): the run's waiters all get it, as one `ack_all` would; the
//! deliveries the owner kept stay outstanding and may be settled again (they are no longer
//! held, so that retry goes alone).
//!
//! Memory: the held tags are bounded by the consumers' prefetch windows (the broker sends no
//! more), a run by `OUT_HIGH_WATER_BYTES` (the drain counts it with the output buffer).

use bytes::Bytes;
use weir_protocol::ranges_of;

use super::driver::Driver;
use super::requests::Pending;
use super::{Command, ConfirmTx, Reply, Settle};
use crate::error::ClientError;

/// Estimated bytes of a `Publish` frame beside its entries, as `Client::publish_batch_with`
/// estimates them (the encoder checks the exact size).
const PUBLISH_FRAME_BYTES: usize = 256;
/// Estimated bytes of an `Ack`/`Nack` frame beside its ranges, and of one range.
const SETTLE_FRAME_BYTES: usize = 128;
const RANGE_BYTES: usize = 16;

/// The run of commands being merged.
#[derive(Default)]
pub(super) enum Run {
    #[default]
    Empty,
    Publish(PublishRun),
    Settle(SettleRun),
}

pub(super) struct PublishRun {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    messages: Vec<Bytes>,
    confirms: Vec<ConfirmTx>,
    /// Messages of each merged command, in order: what an encoding failure splits back into.
    parts: Vec<usize>,
    /// Estimated frame bytes.
    bytes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SettleKind {
    Ack,
    /// Nacks merge only with nacks of the same `requeue` and the same retry `delay_ms`: one
    /// frame carries one of each.
    Nack {
        requeue: bool,
        delay_ms: Option<u32>,
    },
}

pub(super) struct SettleRun {
    kind: SettleKind,
    tags: Vec<u64>,
    replies: Vec<Reply>,
}

impl Run {
    /// Estimated bytes the run adds to the output buffer once flushed.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Run::Empty => 0,
            Run::Publish(r) => r.bytes,
            Run::Settle(r) => SETTLE_FRAME_BYTES + r.tags.len() * RANGE_BYTES,
        }
    }
}

fn entry_bytes(exchange: &str, routing_key: &str, messages: &[Bytes]) -> usize {
    let per_entry = 128 + routing_key.len() + exchange.len();
    messages.iter().map(|m| m.len() + per_entry).sum()
}

impl Driver {
    /// Takes one drained command: merged into the run where it can be, else the run leaves
    /// first and the command starts a run or is encoded at once.
    pub(super) fn take(&mut self, command: Command) {
        match command {
            Command::Publish {
                exchange,
                routing_key,
                mandatory,
                messages,
                confirms,
            } => {
                let bytes = entry_bytes(&exchange, &routing_key, &messages);
                let limits = *self.encoder.limits();
                if let Run::Publish(r) = &mut self.run {
                    if r.exchange == exchange
                        && r.routing_key == routing_key
                        && r.mandatory == mandatory
                        && r.messages.len() + messages.len() <= limits.publish_batch_max as usize
                        && r.bytes + bytes <= limits.frame_size_max as usize
                    {
                        r.parts.push(messages.len());
                        r.bytes += bytes;
                        r.messages.extend(messages);
                        r.confirms.extend(confirms);
                        return;
                    }
                }
                self.flush_run();
                self.run = Run::Publish(PublishRun {
                    exchange,
                    routing_key,
                    mandatory,
                    parts: vec![messages.len()],
                    bytes: PUBLISH_FRAME_BYTES + bytes,
                    messages,
                    confirms,
                });
            }
            Command::Settle { kind, tags, reply } => {
                let merging = match kind {
                    Settle::Ack => Some(SettleKind::Ack),
                    Settle::Nack { requeue, delay_ms } => {
                        Some(SettleKind::Nack { requeue, delay_ms })
                    }
                    Settle::Reject { .. } => None,
                };
                let held = self.release_held(&tags);
                let Some(merging) = merging.filter(|_| held) else {
                    self.flush_run();
                    // Judged alone by the broker, as it always was.
                    self.settle(kind, tags, reply.filter(|r| !r.is_closed()));
                    return;
                };
                let frame_max = self.encoder.limits().frame_size_max as usize;
                if let Run::Settle(r) = &mut self.run {
                    if r.kind == merging
                        && SETTLE_FRAME_BYTES + (r.tags.len() + tags.len()) * RANGE_BYTES
                            <= frame_max
                    {
                        r.tags.extend(tags);
                        r.replies.extend(reply);
                        return;
                    }
                }
                self.flush_run();
                self.run = Run::Settle(SettleRun {
                    kind: merging,
                    tags,
                    replies: reply.into_iter().collect(),
                });
            }
            other => {
                self.flush_run();
                self.on_command(other);
            }
        }
    }

    /// Encodes the run, if any.
    pub(super) fn flush_run(&mut self) {
        match std::mem::take(&mut self.run) {
            Run::Empty => {}
            Run::Publish(r) => self.flush_publish(r),
            Run::Settle(r) => self.flush_settle(r),
        }
    }

    fn flush_publish(&mut self, r: PublishRun) {
        if r.parts.len() == 1 {
            return self.publish(
                &r.exchange,
                &r.routing_key,
                r.mandatory,
                &r.messages,
                r.confirms,
            );
        }
        match self.encode_publish(&r.exchange, &r.routing_key, r.mandatory, &r.messages) {
            Ok(first) => self.await_confirms(first, r.confirms),
            Err(_) => {
                // Nothing was written. One command at a time, so only those that cannot be
                // encoded fail, as they would have unmerged.
                let (mut messages, mut confirms) = (r.messages.into_iter(), r.confirms.into_iter());
                for n in r.parts {
                    let m: Vec<Bytes> = messages.by_ref().take(n).collect();
                    let c: Vec<ConfirmTx> = confirms.by_ref().take(n).collect();
                    self.publish(&r.exchange, &r.routing_key, r.mandatory, &m, c);
                }
            }
        }
    }

    fn flush_settle(&mut self, r: SettleRun) {
        let waiting: Vec<Reply> = r.replies.into_iter().filter(|r| !r.is_closed()).collect();
        let id = if waiting.is_empty() {
            0
        } else {
            self.request_id()
        };
        let ranges = ranges_of(r.tags);
        let encoded = match r.kind {
            SettleKind::Ack => self.encoder.ack(&mut self.out, id, &ranges),
            SettleKind::Nack { requeue, delay_ms } => {
                self.encoder
                    .nack(&mut self.out, id, &ranges, requeue, delay_ms)
            }
        };
        match encoded {
            Ok(_) => {
                self.count_frame(id);
                if id != 0 {
                    self.requests.insert(id, Pending::Group(waiting));
                }
            }
            Err(e) => {
                for reply in waiting {
                    let _ = reply.send(Err(ClientError::Protocol(e.clone())));
                }
            }
        }
    }

    /// Whether every tag is held (so the broker holds it too); either way none of them is held
    /// after this, since a settlement naming them is about to leave.
    fn release_held(&mut self, tags: &[u64]) -> bool {
        let all = tags.iter().all(|t| self.held.contains_key(t));
        for t in tags {
            self.held.remove(t);
        }
        all && !tags.is_empty()
    }
}

/// One answer for every waiter of a merged settlement.
pub(super) fn answer_group(
    replies: Vec<Reply>,
    result: Result<weir_protocol::InFrame, ClientError>,
) {
    let mut replies = replies.into_iter();
    let Some(last) = replies.next_back() else {
        return;
    };
    for reply in replies {
        let _ = reply.send(duplicate(&result));
    }
    let _ = last.send(result);
}

/// A copy of an answer: replies are frames (cheap clones) or errors made from an `Error` frame
/// or the connection's end, which copy field by field.
fn duplicate(
    result: &Result<weir_protocol::InFrame, ClientError>,
) -> Result<weir_protocol::InFrame, ClientError> {
    match result {
        Ok(frame) => Ok(frame.clone()),
        Err(ClientError::Refused { code, message }) => Err(ClientError::Refused {
            code: *code,
            message: message.clone(),
        }),
        Err(ClientError::Closed(reason)) => Err(ClientError::Closed(reason.clone())),
        Err(ClientError::Protocol(e)) => Err(ClientError::Protocol(e.clone())),
        Err(other) => Err(ClientError::UnexpectedReply(other.to_string())),
    }
}
