//! Request-reply correlation: request ids, and what each one is waiting for.
//!
//! Contract: driver-task only (methods on `Driver`). Every frame that wants an answer gets the
//! next request id of this connection as it is encoded, and its `Pending` entry is keyed by it;
//! the broker echoes the id on exactly one reply (or `Error`), which `answer` routes back. Ids
//! are never reused on a connection; 0 means "no answer wanted".
//!
//! Faults handled: a caller that gave up (its oneshot dropped: the answer is dropped, except
//! that an abandoned `Consume` cancels its consumer), a refused `Consume` (its consumer is
//! unregistered), a reply for an id nobody waits on (ignored).

use weir_protocol::wire::BodyT;
use weir_protocol::InFrame;

use super::coalesce::answer_group;
use super::driver::Driver;
use super::Reply;
use crate::error::ClientError;

/// What a request id is waiting for.
pub(super) enum Pending {
    Reply(Reply),
    /// A merged settlement: its one answer goes to every caller still waiting on it.
    Group(Vec<Reply>),
    /// The consumer is registered; a refusal unregisters it.
    Consume {
        tag: String,
        reply: Reply,
    },
    /// The consumer is unregistered once the broker confirms: until then deliveries may still
    /// arrive for it, and are requeued.
    Cancel {
        tag: String,
        reply: Option<Reply>,
    },
}

impl Driver {
    pub(super) fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    pub(super) fn encode(&mut self, request_id: u64, body: BodyT) -> Result<(), ClientError> {
        self.encoder
            .encode(&weir_protocol::frame(request_id, body), &mut self.out)?;
        self.count_frame(request_id);
        Ok(())
    }

    pub(super) fn answer(&mut self, id: u64, result: Result<InFrame, ClientError>) {
        match self.requests.remove(&id) {
            Some(Pending::Reply(reply)) => {
                let _ = reply.send(result);
            }
            Some(Pending::Group(replies)) => answer_group(replies, result),
            Some(Pending::Consume { tag, reply }) => {
                let refused = result.is_err();
                if refused {
                    self.consumers.remove(&tag);
                }
                if reply.send(result).is_err() && !refused {
                    // `consume` was abandoned before its answer: nobody will read this stream.
                    self.cancel_consumer(tag, None);
                }
            }
            Some(Pending::Cancel { tag, reply }) => {
                // The broker has forgotten the consumer: nothing more arrives for it.
                self.consumers.remove(&tag);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            None => {}
        }
    }
}
