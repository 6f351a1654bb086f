//! Publish-confirm tracking: sequence numbers, and the confirm each published message awaits.
//!
//! Contract: driver-task only (methods on `Driver`). `publish` numbers the messages of a
//! `Publish` frame as it encodes them (so sequences increase in wire order) and keeps one
//! `PendingPublish` per sequence. Each entry is settled exactly once, by a `Confirm` (which
//! resolves it `Ok`, or `Err(Returned)` when a `Return` for it came first), by a publish
//! `Error` naming its sequence (`Err(Refused)`), or by the connection ending; each settlement
//! gives its publish permit back to the connection's semaphore.
//!
//! Faults handled: an encoding failure (nothing written: every confirm fails with the
//! protocol error and the permits come back at once), confirms or returns for sequences nobody
//! waits on (ignored), publishers that dropped their confirm futures (the outcome is dropped).

use bytes::Bytes;
use weir_protocol::wire::{self, ErrorCode, Range};
use weir_protocol::{InFrame, ProtocolError, PublishItem};

use super::driver::Driver;
use super::{ConfirmTx, Confirmation};
use crate::error::{ClientError, ReturnedMessage};

pub(super) struct PendingPublish {
    pub(super) confirm: ConfirmTx,
    returned: Option<ReturnedMessage>,
}

impl Driver {
    /// One `Publish` frame of `messages`; each confirm awaits its message's sequence.
    pub(super) fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        messages: &[Bytes],
        confirms: Vec<ConfirmTx>,
    ) {
        match self.encode_publish(exchange, routing_key, mandatory, messages) {
            Ok(first) => self.await_confirms(first, confirms),
            Err(e) => {
                // Nothing was written: the permits come back now.
                self.handle.shared.permits.add_permits(confirms.len());
                for confirm in confirms {
                    let _ = confirm.send(Err(ClientError::Protocol(e.clone())));
                }
            }
        }
    }

    /// Encodes one `Publish` frame of `messages`, numbering them from the next sequence, and
    /// returns the first; on an error nothing is written and no sequence is used.
    pub(super) fn encode_publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        messages: &[Bytes],
    ) -> Result<u64, ProtocolError> {
        let first = self.next_sequence;
        let items = messages.iter().enumerate().map(|(i, m)| PublishItem {
            sequence: first + i as u64,
            exchange,
            routing_key,
            mandatory,
            message: m,
        });
        self.encoder.publish(&mut self.out, 0, None, true, items)?;
        self.count_frame(0);
        self.next_sequence += messages.len() as u64;
        Ok(first)
    }

    /// One idempotent producer's message under the producer's own `sequence`: the connection's
    /// numbering moves past it, so sequences still increase in wire order (a connection carries
    /// one producer's messages in the producer's order).
    pub(super) fn publish_as(
        &mut self,
        producer_id: u64,
        sequence: u64,
        (exchange, routing_key, mandatory): (&str, &str, bool),
        message: &Bytes,
        confirm: ConfirmTx,
    ) {
        if sequence < self.next_sequence {
            self.handle.shared.permits.add_permits(1);
            let _ = confirm.send(Err(ClientError::InvalidArgument(format!(
                "producer sequence {sequence} is not above this connection's last one, {}",
                self.next_sequence.saturating_sub(1)
            ))));
            return;
        }
        let item = PublishItem {
            sequence,
            exchange,
            routing_key,
            mandatory,
            message,
        };
        let encoded = self
            .encoder
            .publish(&mut self.out, 0, Some(producer_id), true, [item]);
        match encoded {
            Ok(_) => {
                self.count_frame(0);
                self.next_sequence = sequence + 1;
                self.await_confirms(sequence, vec![confirm]);
            }
            Err(e) => {
                self.handle.shared.permits.add_permits(1);
                let _ = confirm.send(Err(ClientError::Protocol(e)));
            }
        }
    }

    /// Keeps one pending publish per confirm, from sequence `first` on.
    pub(super) fn await_confirms(&mut self, first: u64, confirms: Vec<ConfirmTx>) {
        for (i, confirm) in confirms.into_iter().enumerate() {
            self.publishes.insert(
                first + i as u64,
                PendingPublish {
                    confirm,
                    returned: None,
                },
            );
        }
    }

    pub(super) fn on_confirm(&mut self, c: wire::Confirm<'_>) {
        let duplicates: Vec<Range> = c
            .duplicates()
            .map(|d| d.iter().copied().collect())
            .unwrap_or_default();
        let durability = c.durability();
        for r in c.ranges().iter() {
            for sequence in self.pending_in(r) {
                let duplicate = duplicates
                    .iter()
                    .any(|d| (d.first()..=d.last()).contains(&sequence));
                self.settle_publish(sequence, |returned| match returned {
                    Some(r) => Err(ClientError::Returned(Box::new(r))),
                    None => Ok(Confirmation {
                        sequence,
                        durability,
                        duplicate,
                    }),
                });
            }
        }
    }

    /// Remembers each returned message on its publish; the `Confirm` that follows settles it.
    pub(super) fn on_return(&mut self, frame: &InFrame, r: wire::Return<'_>) {
        for (e, message) in r
            .entries()
            .iter()
            .map(|e| (e, e.message().map(|m| frame.message_bytes(m))))
        {
            if let Some(p) = self.publishes.get_mut(&e.sequence()) {
                p.returned = Some(ReturnedMessage {
                    code: e.code(),
                    exchange: e.exchange().unwrap_or("").to_string(),
                    routing_key: e.routing_key().unwrap_or("").to_string(),
                    message: message.unwrap_or_default(),
                });
            }
        }
    }

    /// A publish `Error` (request id 0): every pending publish in `sequences` is refused.
    pub(super) fn refuse_publishes<'a>(
        &mut self,
        sequences: impl IntoIterator<Item = &'a Range>,
        code: ErrorCode,
        message: &str,
    ) {
        for r in sequences {
            for sequence in self.pending_in(r) {
                self.settle_publish(sequence, |_| {
                    Err(ClientError::Refused {
                        code,
                        message: message.to_string(),
                    })
                });
            }
        }
    }

    /// The pending sequences within one wire range, collected so they can be settled.
    fn pending_in(&self, r: &Range) -> Vec<u64> {
        self.publishes
            .range(r.first()..=r.last())
            .map(|(s, _)| *s)
            .collect()
    }

    fn settle_publish(
        &mut self,
        sequence: u64,
        outcome: impl FnOnce(Option<ReturnedMessage>) -> Result<Confirmation, ClientError>,
    ) {
        if let Some(p) = self.publishes.remove(&sequence) {
            self.handle.shared.permits.add_permits(1);
            let _ = p.confirm.send(outcome(p.returned));
        }
    }
}
