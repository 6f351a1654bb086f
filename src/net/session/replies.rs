//! Replies and refusals: every frame the session owes the client is encoded here.
//!
//! Contract: runs on the connection's shard; appends frames to the connection's output buffer
//! through the session's reused encoder. An owner's reply to a plain request becomes its answer
//! frame as it is; a `Refusal` becomes an `Error` frame with its code and message.
//!
//! Faults handled: a reply this broker cannot encode (a broker bug: logged, and the connection
//! closes, since it cannot go on without its answer), a reply of the wrong kind (answered with
//! `Internal`). A fatal `Error` closes the connection after it is sent.

use bytes::BytesMut;
use weir_protocol::wire::{self, Body, BodyT, ErrorCode};
use weir_protocol::{WireLimits, PROTOCOL_VERSION};

use super::{Flow, Session, State};
use crate::mesh::msg::Reply;
use crate::mesh::types::Refusal;

/// Most queues in one `QueueList` page: about two tables each, far within the verifier budget a
/// client's decoder applies (`WireLimits::verifier_tables_max`).
pub(super) const LIST_PAGE_MAX: usize = 1000;
// A full page must verify in a client that uses the default wire limits.
const _: () = assert!(2 * LIST_PAGE_MAX + 64 <= WireLimits::DEFAULT.verifier_tables_max);

/// Most bindings in one `BindingList` (one table each, within the verifier budget).
pub(super) const BINDING_LIST_MAX: usize = 4 * LIST_PAGE_MAX;
const _: () = assert!(BINDING_LIST_MAX + 64 <= WireLimits::DEFAULT.verifier_tables_max);

/// A frame type as error messages name it.
pub(super) fn name(body: Body) -> &'static str {
    body.variant_name().unwrap_or("an unknown frame")
}

impl Session {
    /// Answers a client's request with an owner's reply as it is.
    pub(super) fn on_reply_to(&mut self, request_id: u64, reply: Reply, out: &mut BytesMut) {
        let body = match reply {
            Reply::Info(i) => BodyT::QueueInfo(i),
            Reply::Deleted(n) => {
                let mut d = wire::QueueDeletedT::default();
                d.messages = n;
                BodyT::QueueDeleted(Box::new(d))
            }
            Reply::Purged(n) => {
                let mut p = wire::QueuePurgedT::default();
                p.messages = n;
                BodyT::QueuePurged(Box::new(p))
            }
            Reply::Refused(r) => return self.refuse(out, request_id, r),
            Reply::Done => BodyT::Ok(Box::default()),
            other => {
                tracing::error!(?other, "unexpected reply");
                return self.refuse(
                    out,
                    request_id,
                    Refusal {
                        code: ErrorCode::Internal,
                        message: "unexpected reply".into(),
                    },
                );
            }
        };
        self.reply(out, request_id, body);
    }

    pub(super) fn welcome(&self) -> BodyT {
        let c = &self.ctx;
        let mut limits = wire::LimitsT::default();
        limits.frame_size_max = c.limits.frame_size_max;
        limits.message_size_max = c.limits.message_size_max;
        limits.publish_batch_max = c.limits.publish_batch_max;
        limits.deliver_batch_max = c.limits.deliver_batch_max;
        limits.publishes_in_flight_max = c.publishes_in_flight_max;
        limits.prefetch_max = c.prefetch_max;
        limits.name_length_max = c.limits.name_length_max;
        limits.headers_max = c.limits.headers_max;
        let mut w = wire::WelcomeT::default();
        w.protocol_version = PROTOCOL_VERSION;
        w.broker_version = Some(c.broker_version.to_string());
        w.shard_count = c.shard_count();
        w.shard = c.shard;
        w.shard_ports = Some(c.shard_ports.clone());
        w.limits = Some(Box::new(limits));
        w.durability = c.durability;
        w.connection_id = c.connection_id;
        BodyT::Welcome(Box::new(w))
    }

    pub(super) fn reply(&mut self, out: &mut BytesMut, request_id: u64, body: BodyT) -> Flow {
        // Replies are frames built from our own values; failing to encode one is a broker bug,
        // and the connection cannot go on without its reply.
        match self
            .encoder
            .encode(&weir_protocol::frame(request_id, body), out)
        {
            Ok(_) => Flow::Continue,
            Err(e) => {
                tracing::error!(
                    connection = self.ctx.connection_id,
                    "cannot encode a reply: {e}"
                );
                self.state = State::Closing;
                Flow::Close
            }
        }
    }

    pub(super) fn refuse(&mut self, out: &mut BytesMut, request_id: u64, r: Refusal) {
        self.fail(out, request_id, r.code, r.message, false);
    }

    /// An `Error` for publishes, naming their sequence numbers as ranges (request id 0).
    pub(super) fn fail_sequences(
        &mut self,
        out: &mut BytesMut,
        code: ErrorCode,
        message: String,
        sequences: Vec<u64>,
    ) {
        self.tally.refused(code, &message);
        let sequences = weir_protocol::ranges_of(sequences);
        let mut e = wire::ErrorT::default();
        e.code = code;
        e.message = Some(message);
        e.sequences = Some(sequences.iter().map(|r| r.unpack()).collect());
        self.reply(out, 0, BodyT::Error(Box::new(e)));
    }

    pub(super) fn fail(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        code: ErrorCode,
        message: String,
        close: bool,
    ) -> Flow {
        tracing::debug!(
            connection = self.ctx.connection_id,
            ?code,
            close,
            "{message}"
        );
        self.tally.refused(code, &message);
        let mut e = wire::ErrorT::default();
        e.code = code;
        e.message = Some(message);
        e.close = close;
        let flow = self.reply(out, request_id, BodyT::Error(Box::new(e)));
        if close {
            self.state = State::Closing;
            return Flow::Close;
        }
        flow
    }
}
