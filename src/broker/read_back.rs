//! What a payload read back from the journal becomes: a delivery completed from its record, a
//! dead letter's bytes, or, when the read failed, a requeue; and which pushes wait for the
//! read-back task (`goes_behind`).
//!
//! Contract: pure functions over a record's body the shell has already read (the read itself is
//! I/O and stays in the shard). A record that decodes as no message, or that does not name the
//! delivery it was read for, is a broken index (its CRC passed), not a bad disk: that panics,
//! as it did in the shell. A failed read is a fault the client survives: the message goes back
//! to its queue and is redelivered.

use bytes::Bytes;
use weir_protocol::wire::ErrorCode;

use crate::mesh::types::{ConnRef, Refusal};

use crate::broker::host::QueueHost;
use crate::mesh::msg::{Pushed, PushedDelivery};
use crate::storage::{MessageEnvelope, Position};

/// Splits a message record read back from `position` into its envelope and message bytes.
pub fn decode_message(position: Position, body: &[u8]) -> (MessageEnvelope<'_>, &[u8]) {
    MessageEnvelope::decode(body)
        .unwrap_or_else(|e| panic!("journal record at {position:?} is not a message: {e}"))
}

/// Completes a cold delivery from its record: exchange, routing key and the producer's bytes.
pub fn complete_from_record(d: &mut PushedDelivery, position: Position, body: &[u8]) {
    let (envelope, message) = decode_message(position, body);
    // Checked before write (the entry was made from this record's position), checked after
    // read: a record that does not name this message is a broken index.
    assert!(
        envelope
            .targets
            .iter()
            .any(|t| t.queue == d.queue.as_bytes() && t.queue_seq == d.seq),
        "journal record at {position:?} does not hold message {} of queue '{}'",
        d.seq,
        d.queue
    );
    d.exchange = String::from_utf8_lossy(envelope.exchange).into_owned();
    d.routing_key = String::from_utf8_lossy(envelope.routing_key).into_owned();
    d.bytes = Bytes::copy_from_slice(message);
    d.deaths = (!envelope.deaths.is_empty()).then(|| Bytes::copy_from_slice(envelope.deaths));
    d.cold = None;
}

/// A delivery whose payload could not be read: its message goes back to its queue (redelivered
/// later, so at least once holds), and its charge back to its connection's outbox account
/// (it will never be written).
pub fn requeue_unread(
    host: &mut QueueHost,
    to: ConnRef,
    d: &PushedDelivery,
) -> Result<(), Refusal> {
    host.outbox_written(to, u64::from(d.charge));
    host.settle(to, &d.queue, d.holder, d.seq, false, true)
}

/// Whether a push goes to the read-back task rather than straight to its connection: it needs
/// a payload read back, or the task holds `held` earlier pushes, which a push must not pass
/// (a connection gets its pushes in the order its owner made them: deliveries in sequence
/// order, a cancellation after the deliveries before it).
pub fn goes_behind(push: &Pushed, held: usize) -> bool {
    held > 0
        || matches!(push, Pushed::Deliver { deliveries, .. } if deliveries.iter().any(|d| d.cold.is_some()))
}

/// Keeps the deliveries that were read back; the unread ones were requeued.
pub fn keep_read_back(deliveries: &mut Vec<PushedDelivery>) {
    deliveries.retain(|d| d.cold.is_none());
}

/// The answer to a `Get` whose message could not be read back.
pub fn unread_refusal() -> Refusal {
    Refusal {
        code: ErrorCode::StorageFailed,
        message: "the message could not be read back from the journal; it was requeued".into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::broker::stored::Stored;
    use crate::mesh::types::Declare;
    use crate::storage::Target;
    use std::rc::Rc;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };

    /// A message record body as the journal stores it.
    pub(crate) fn record(
        exchange: &str,
        key: &str,
        targets: &[(&str, u64)],
        msg: &[u8],
    ) -> Vec<u8> {
        let envelope = MessageEnvelope {
            deaths: &[],
            exchange: exchange.as_bytes(),
            routing_key: key.as_bytes(),
            targets: targets
                .iter()
                .map(|(q, s)| Target {
                    queue: q.as_bytes(),
                    queue_seq: *s,
                })
                .collect(),
        };
        let mut body = vec![0; envelope.encoded_len()];
        envelope.encode(&mut body);
        body.extend_from_slice(msg);
        body
    }

    fn cold(queue: &str, seq: u64) -> PushedDelivery {
        PushedDelivery {
            deaths: None,
            queue: queue.into(),
            holder: 7,
            seq,
            delivery_count: 1,
            auto_ack: false,
            exchange: String::new(),
            routing_key: String::new(),
            bytes: Bytes::new(),
            cold: Some((Position::new(1, 0), 0)),
            charge: 0,
        }
    }

    #[test]
    fn a_record_fills_its_delivery() {
        let mut d = cold("q", 3);
        let body = record("x", "k", &[("p", 9), ("q", 3)], b"hello");
        complete_from_record(&mut d, Position::new(1, 0), &body);
        assert_eq!(
            (&*d.exchange, &*d.routing_key, &d.bytes[..]),
            ("x", "k", &b"hello"[..])
        );
        assert!(d.cold.is_none());
        let mut ds = vec![d, cold("q", 4)];
        keep_read_back(&mut ds);
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].seq, 3);
    }

    #[test]
    fn a_push_goes_behind_the_read_back_task_when_it_reads_or_holds_earlier_ones() {
        let push = |d: PushedDelivery| Pushed::Deliver {
            to: A,
            consumer_tag: "c".into(),
            deliveries: vec![d],
        };
        let hot = PushedDelivery {
            cold: None,
            ..cold("q", 1)
        };
        assert!(goes_behind(&push(cold("q", 1)), 0), "needs a read");
        assert!(!goes_behind(&push(hot.clone()), 0), "nothing to wait for");
        assert!(goes_behind(&push(hot), 1), "must not pass an earlier push");
        let cancelled = Pushed::Cancelled(crate::mesh::types::Cancelled {
            to: A,
            consumer_tag: "c".into(),
            message: String::new(),
        });
        assert!(goes_behind(&cancelled, 2) && !goes_behind(&cancelled, 0));
    }

    #[test]
    #[should_panic(expected = "does not hold message 4")]
    fn a_record_of_another_message_is_a_broken_index() {
        let mut d = cold("q", 4);
        complete_from_record(
            &mut d,
            Position::new(1, 0),
            &record("", "q", &[("q", 3)], b"x"),
        );
    }

    #[test]
    fn an_unread_delivery_is_requeued_and_redelivered() {
        let mut host = QueueHost::new(0);
        let declare = Declare {
            name: "q".into(),
            ..Default::default()
        };
        host.declare(A, declare, 0).unwrap();
        let msg = Rc::new(Stored::new(
            Bytes::from_static(b"m"),
            String::new(),
            "q".into(),
            false,
            None,
        ));
        host.publish(A, "q", msg, None, 0).unwrap();
        let (got, _) = host.get(A, "q", false, 0).unwrap();
        let got = got.expect("a message");
        let d = PushedDelivery {
            holder: got.holder,
            seq: got.seq,
            ..cold("q", got.seq)
        };
        requeue_unread(&mut host, A, &d).unwrap();
        let (again, _) = host.get(A, "q", false, 0).unwrap();
        let again = again.expect("requeued");
        assert_eq!((again.seq, again.delivery_count), (got.seq, 2));
        assert_eq!(unread_refusal().code, ErrorCode::StorageFailed);
    }
}
