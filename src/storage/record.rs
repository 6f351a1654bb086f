//! Records: `length u32 | crc32 u32 | kind u8 | body`, little-endian, packed back to back.
//!
//! Contract: pure encoding and decoding; no I/O. `length` counts the body; the crc32 (crc32fast,
//! IEEE) covers the length, the kind and the body, so a damaged length is caught like a damaged
//! body. Bodies read back from the journal were verified at ingress and are trusted once their
//! crc matches.
//!
//! Kinds:
//! - `Commit`: opens every commit chunk at a block boundary: the commit's sequence number, the
//!   chunk's index and count in its commit, the segment it was written for, and the bytes of
//!   records that follow it in the chunk. Recovery walks the log chunk by chunk with it.
//! - `Message`: a published message as received, behind its routing envelope: the exchange, the
//!   routing key and the target queues with the message's sequence number in each queue (one
//!   record serves a fanout to several queues of the shard). Compaction copies it whole, so the
//!   copy names the same queue sequence numbers and recovery keeps one of the two.
//! - `Settle`: ranges of one queue's sequence numbers that were acked, dead-lettered, expired,
//!   dropped or purged.
//! - `Control`: an opaque body for the broker's own bookkeeping (declarations, dedup windows).
//! - `Retry` (appended in format 1; older journals simply have none): messages of one queue that
//!   failed and wait out a retry delay, each named by its queue sequence number with its due time
//!   (absolute, ms since the epoch), its failures so far and its deliveries so far. The message's
//!   bytes stay in its `Message` record; the newest `Retry` record naming a live message is its
//!   state after a restart.
//!
//! A `Message` record of an idempotent producer's publish carries its stamp, (producer id,
//! sequence), after the targets: bit 14 of the target count (`STAMPED`) says so. Records written
//! before stamps existed never have that bit (a count is at most `targets_per_message_max`), so
//! they read as before; `decode` skips the stamp, `decode_stamped` returns it. A dead letter's
//! history follows as an annotation, flagged by bit 15 (see `MessageEnvelope`).

use crate::storage::format::{COMMIT_BODY_BYTES, COMMIT_RECORD_BYTES, RECORD_HEADER_BYTES};
use std::fmt;

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Opens a commit chunk (internal to the journal; never replayed to the broker).
    Commit = 1,
    /// A message and its routing envelope.
    Message = 2,
    /// Settled ranges of a queue.
    Settle = 3,
    /// Opaque broker bookkeeping.
    Control = 4,
    /// Messages of a queue waiting out a retry delay.
    Retry = 5,
}

impl RecordKind {
    /// The kind a byte denotes.
    pub fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Commit),
            2 => Some(RecordKind::Message),
            3 => Some(RecordKind::Settle),
            4 => Some(RecordKind::Control),
            5 => Some(RecordKind::Retry),
            _ => None,
        }
    }
}

/// The crc32 of a record.
pub fn record_crc(kind: u8, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(body.len() as u32).to_le_bytes());
    h.update(&[kind]);
    h.update(body);
    h.finalize()
}

/// Writes the header of a record whose body already sits at `out[RECORD_HEADER_BYTES..]`.
pub fn seal_record(out: &mut [u8], kind: RecordKind) {
    let body_len = out.len() - RECORD_HEADER_BYTES;
    let crc = record_crc(kind as u8, &out[RECORD_HEADER_BYTES..]);
    out[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[8] = kind as u8;
}

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// All header bytes are zero: nothing was ever written here.
    Zero,
    /// The bytes end before the header or body does.
    Truncated { need: usize, have: usize },
    /// The length field exceeds what the context allows.
    Length { length: u32, max: usize },
    /// The checksum does not match.
    Checksum { stored: u32, computed: u32 },
    /// Unknown kind byte.
    Kind(u8),
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordFault::Zero => write!(f, "zero bytes where a record header should be"),
            RecordFault::Truncated { need, have } => {
                write!(f, "record needs {need} bytes, only {have} remain")
            }
            RecordFault::Length { length, max } => {
                write!(
                    f,
                    "record length {length} exceeds the {max} bytes it may span"
                )
            }
            RecordFault::Checksum { stored, computed } => write!(
                f,
                "bad checksum: stored {stored:#010x}, contents give {computed:#010x}"
            ),
            RecordFault::Kind(k) => write!(f, "unknown record kind {k}"),
        }
    }
}

/// A record parsed out of a byte slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Its kind.
    pub kind: RecordKind,
    /// Its body.
    pub body: &'a [u8],
}

impl RawRecord<'_> {
    /// Header plus body.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.body.len()
    }
}

/// Parses and checks the record at the start of `bytes`, which may extend at most `max_len`
/// bytes (header included).
pub fn parse_record(bytes: &[u8], max_len: usize) -> Result<RawRecord<'_>, RecordFault> {
    if bytes.len() < RECORD_HEADER_BYTES {
        if bytes.iter().all(|&b| b == 0) {
            return Err(RecordFault::Zero);
        }
        return Err(RecordFault::Truncated {
            need: RECORD_HEADER_BYTES,
            have: bytes.len(),
        });
    }
    if bytes[..RECORD_HEADER_BYTES].iter().all(|&b| b == 0) {
        return Err(RecordFault::Zero);
    }
    let length = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let kind_byte = bytes[8];
    let total = RECORD_HEADER_BYTES as u64 + length as u64;
    if total > max_len as u64 {
        return Err(RecordFault::Length {
            length,
            max: max_len,
        });
    }
    let total = total as usize;
    if total > bytes.len() {
        return Err(RecordFault::Truncated {
            need: total,
            have: bytes.len(),
        });
    }
    let body = &bytes[RECORD_HEADER_BYTES..total];
    let computed = record_crc(kind_byte, body);
    if stored != computed {
        return Err(RecordFault::Checksum { stored, computed });
    }
    let kind = RecordKind::from_u8(kind_byte).ok_or(RecordFault::Kind(kind_byte))?;
    Ok(RawRecord { kind, body })
}

/// The body of a commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    /// Sequence number of the commit (one write group and one fdatasync, in one segment).
    pub commit_seq: u64,
    /// The segment it was written into.
    pub segment: u32,
    /// Index of this chunk within its commit.
    pub chunk_index: u16,
    /// Number of chunks of the commit.
    pub chunk_count: u16,
    /// Bytes of records following this commit record in the chunk (padding excluded).
    pub batch_bytes: u32,
}

impl CommitRecord {
    /// Encodes the whole record (header included) into `out[..COMMIT_RECORD_BYTES]`.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..COMMIT_RECORD_BYTES];
        let b = &mut out[RECORD_HEADER_BYTES..];
        b[0..8].copy_from_slice(&self.commit_seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.segment.to_le_bytes());
        b[12..14].copy_from_slice(&self.chunk_index.to_le_bytes());
        b[14..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[16..20].copy_from_slice(&self.batch_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&[0; 4]);
        seal_record(out, RecordKind::Commit);
    }

    /// Decodes a commit record's body.
    pub fn decode(body: &[u8]) -> Option<CommitRecord> {
        if body.len() != COMMIT_BODY_BYTES {
            return None;
        }
        Some(CommitRecord {
            commit_seq: u64::from_le_bytes(body[0..8].try_into().ok()?),
            segment: u32::from_le_bytes(body[8..12].try_into().ok()?),
            chunk_index: u16::from_le_bytes(body[12..14].try_into().ok()?),
            chunk_count: u16::from_le_bytes(body[14..16].try_into().ok()?),
            batch_bytes: u32::from_le_bytes(body[16..20].try_into().ok()?),
        })
    }
}

/// One queue a message is routed to, with the message's sequence number in that queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// Queue name.
    pub queue: &'a [u8],
    /// The message's sequence number in that queue; settle records name ranges of these.
    pub queue_seq: u64,
}

/// The routing envelope stored in front of a message's bytes.
///
/// Body layout: `u8 exchange_len | exchange | u16 key_len | routing_key | u16 target_count |
/// (u8 queue_len | queue | u64 queue_seq)* | [annotations] | message bytes`.
///
/// Annotations are the broker's own notes beside the message (which stays the producer's exact
/// bytes): present only when bit 15 of `target_count` is set (no record written before they
/// existed has it: targets are far fewer than 32768), as `u32 len | (u8 tag | u32 len | bytes)*`.
/// Tags: 1, the dead-letter history (`broker::deaths`). A reader skips tags it does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageEnvelope<'a> {
    /// Exchange the message was published to.
    pub exchange: &'a [u8],
    /// Its routing key.
    pub routing_key: &'a [u8],
    /// The queues of this shard it was routed to.
    pub targets: Vec<Target<'a>>,
    /// Its dead-letter history (`broker::deaths`'s encoding); empty if it was never
    /// dead-lettered.
    pub deaths: &'a [u8],
}

/// Bit of `target_count` that says annotations follow the targets (and the stamp, if any).
const ANNOTATED: u16 = 1 << 15;
/// Annotation tag of the dead-letter history.
const TAG_DEATHS: u8 = 1;

/// Why a record body does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} record body: {why}")]
pub struct BodyError {
    kind: &'static str,
    why: &'static str,
}

fn body_err(kind: &'static str, why: &'static str) -> BodyError {
    BodyError { kind, why }
}

impl<'a> MessageEnvelope<'a> {
    /// Bytes of the envelope (message bytes excluded). Panics on names longer than the format
    /// allows; the broker's limits keep names far shorter.
    pub fn encoded_len(&self) -> usize {
        assert!(
            self.exchange.len() <= u8::MAX as usize,
            "exchange name too long"
        );
        assert!(
            self.routing_key.len() <= u16::MAX as usize,
            "routing key too long"
        );
        assert!(self.targets.len() < STAMPED as usize, "too many targets");
        self.annotations_len()
            + 1
            + self.exchange.len()
            + 2
            + self.routing_key.len()
            + 2
            + self
                .targets
                .iter()
                .map(|t| {
                    assert!(t.queue.len() <= u8::MAX as usize, "queue name too long");
                    1 + t.queue.len() + 8
                })
                .sum::<usize>()
    }

    /// Bytes of the annotations section (0 when there is nothing to note).
    fn annotations_len(&self) -> usize {
        if self.deaths.is_empty() {
            0
        } else {
            4 + 1 + 4 + self.deaths.len()
        }
    }

    /// Writes the envelope into `out`, which is exactly `encoded_len()` long.
    pub fn encode(&self, out: &mut [u8]) {
        self.encode_stamped(out, None)
    }

    /// Bytes of the envelope with a producer stamp, or without one.
    pub fn encoded_len_stamped(&self, stamp: Option<ProducerStamp>) -> usize {
        self.encoded_len() + if stamp.is_some() { 16 } else { 0 }
    }

    /// Writes the envelope and, if given, the producer stamp after the targets, into `out`,
    /// exactly `encoded_len_stamped(stamp)` long.
    pub fn encode_stamped(&self, out: &mut [u8], stamp: Option<ProducerStamp>) {
        assert_eq!(out.len(), self.encoded_len_stamped(stamp));
        assert!(self.targets.len() < STAMPED as usize, "too many targets");
        let mut w = Writer { out, at: 0 };
        w.put(&[self.exchange.len() as u8]);
        w.put(self.exchange);
        w.put(&(self.routing_key.len() as u16).to_le_bytes());
        w.put(self.routing_key);
        let annotated = if self.deaths.is_empty() { 0 } else { ANNOTATED };
        let flag = if stamp.is_some() { STAMPED } else { 0 };
        w.put(&(self.targets.len() as u16 | flag | annotated).to_le_bytes());
        for t in &self.targets {
            w.put(&[t.queue.len() as u8]);
            w.put(t.queue);
            w.put(&t.queue_seq.to_le_bytes());
        }
        if let Some(s) = stamp {
            w.put(&s.producer_id.to_le_bytes());
            w.put(&s.sequence.to_le_bytes());
        }
        if annotated != 0 {
            w.put(&((1 + 4 + self.deaths.len()) as u32).to_le_bytes());
            w.put(&[TAG_DEATHS]);
            w.put(&(self.deaths.len() as u32).to_le_bytes());
            w.put(self.deaths);
        }
        assert_eq!(w.at, w.out.len());
    }

    /// Splits a message record body into its envelope and the message bytes.
    pub fn decode(body: &'a [u8]) -> Result<(MessageEnvelope<'a>, &'a [u8]), BodyError> {
        Self::decode_stamped(body).map(|(env, _, message)| (env, message))
    }

    /// Splits a message record body into its envelope, its producer stamp (if it has one) and
    /// the message bytes.
    #[allow(clippy::type_complexity)]
    pub fn decode_stamped(
        body: &'a [u8],
    ) -> Result<(MessageEnvelope<'a>, Option<ProducerStamp>, &'a [u8]), BodyError> {
        let e = |why| body_err("message", why);
        let mut r = Reader { b: body };
        let n = r.u8().ok_or(e("exchange length"))? as usize;
        let exchange = r.take(n).ok_or(e("exchange"))?;
        let n = r.u16().ok_or(e("routing key length"))? as usize;
        let routing_key = r.take(n).ok_or(e("routing key"))?;
        let count = r.u16().ok_or(e("target count"))?;
        let stamped = count & STAMPED != 0;
        let annotated = count & ANNOTATED != 0;
        let count = (count & !(STAMPED | ANNOTATED)) as usize;
        let mut targets = Vec::with_capacity(count);
        for _ in 0..count {
            let n = r.u8().ok_or(e("queue length"))? as usize;
            let queue = r.take(n).ok_or(e("queue"))?;
            let queue_seq = r.u64().ok_or(e("queue sequence"))?;
            targets.push(Target { queue, queue_seq });
        }
        let stamp = if stamped {
            Some(ProducerStamp {
                producer_id: r.u64().ok_or(e("producer id"))?,
                sequence: r.u64().ok_or(e("producer sequence"))?,
            })
        } else {
            None
        };
        let mut deaths: &[u8] = &[];
        if annotated {
            let n = r.u32().ok_or(e("annotations length"))? as usize;
            let mut a = Reader {
                b: r.take(n).ok_or(e("annotations"))?,
            };
            while !a.b.is_empty() {
                let tag = a.u8().ok_or(e("annotation tag"))?;
                let n = a.u32().ok_or(e("annotation length"))? as usize;
                let value = a.take(n).ok_or(e("annotation"))?;
                if tag == TAG_DEATHS {
                    deaths = value;
                }
            }
        }
        Ok((
            MessageEnvelope {
                exchange,
                routing_key,
                targets,
                deaths,
            },
            stamp,
            r.b,
        ))
    }
}

/// The target count's top bit: a producer stamp follows the targets.
const STAMPED: u16 = 1 << 14;

/// An idempotent producer's publish, as its message record remembers it: replay rebuilds the
/// producer windows from these (`broker::producers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: u64,
    /// The producer's publish sequence.
    pub sequence: u64,
}

/// How messages were settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SettleReason {
    /// Acknowledged by a consumer.
    Acked = 1,
    /// Moved to a dead-letter exchange.
    DeadLettered = 2,
    /// Expired.
    Expired = 3,
    /// Dropped (overflow, max deliveries without a dead-letter target).
    Dropped = 4,
    /// Purged.
    Purged = 5,
}

impl SettleReason {
    fn from_u8(b: u8) -> Option<SettleReason> {
        match b {
            1 => Some(SettleReason::Acked),
            2 => Some(SettleReason::DeadLettered),
            3 => Some(SettleReason::Expired),
            4 => Some(SettleReason::Dropped),
            5 => Some(SettleReason::Purged),
            _ => None,
        }
    }
}

/// Ranges of one queue's messages that were settled.
///
/// Body layout: `u8 queue_len | queue | u8 reason | u32 range_count | (u64 first | u64 last)*`,
/// ranges inclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRecord<'a> {
    /// Queue name.
    pub queue: &'a [u8],
    /// Why.
    pub reason: SettleReason,
    /// Inclusive ranges of queue sequence numbers.
    pub ranges: Vec<(u64, u64)>,
}

impl<'a> SettleRecord<'a> {
    /// Encoded body length.
    pub fn encoded_len(&self) -> usize {
        assert!(self.queue.len() <= u8::MAX as usize, "queue name too long");
        1 + self.queue.len() + 1 + 4 + 16 * self.ranges.len()
    }

    /// Writes the body into `out`, exactly `encoded_len()` long.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len());
        let mut w = Writer { out, at: 0 };
        w.put(&[self.queue.len() as u8]);
        w.put(self.queue);
        w.put(&[self.reason as u8]);
        w.put(&(self.ranges.len() as u32).to_le_bytes());
        for (a, b) in &self.ranges {
            w.put(&a.to_le_bytes());
            w.put(&b.to_le_bytes());
        }
    }

    /// Decodes a settle body.
    pub fn decode(body: &'a [u8]) -> Result<SettleRecord<'a>, BodyError> {
        let e = |why| body_err("settle", why);
        let mut r = Reader { b: body };
        let n = r.u8().ok_or(e("queue length"))? as usize;
        let queue = r.take(n).ok_or(e("queue"))?;
        let reason = SettleReason::from_u8(r.u8().ok_or(e("reason"))?).ok_or(e("reason"))?;
        let count = r.u32().ok_or(e("range count"))? as usize;
        if r.b.len() != count.checked_mul(16).ok_or(e("range count"))? {
            return Err(e("range bytes"));
        }
        let mut ranges = Vec::with_capacity(count);
        for _ in 0..count {
            let a = r.u64().ok_or(e("range"))?;
            let b = r.u64().ok_or(e("range"))?;
            ranges.push((a, b));
        }
        Ok(SettleRecord {
            queue,
            reason,
            ranges,
        })
    }
}

/// One message of a `RetryRecord`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryEntry {
    /// The message's queue sequence number.
    pub seq: u64,
    /// When it is deliverable again, ms since the Unix epoch (absolute: a restart does not
    /// move it).
    pub due_ms: u64,
    /// Times it failed (nacked or rejected with requeue) so far, this one included.
    pub failures: u32,
    /// Times it was delivered so far.
    pub delivery_count: u32,
}

/// Messages of one queue that wait out a retry delay.
///
/// Body layout: `u8 queue_len | queue | u32 count | (u64 seq | u64 due_ms | u32 failures |
/// u32 delivery_count)*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryRecord<'a> {
    /// Queue name.
    pub queue: &'a [u8],
    pub entries: Vec<RetryEntry>,
}

/// Bytes of one `RetryEntry` in a record body.
const RETRY_ENTRY_BYTES: usize = 24;

impl<'a> RetryRecord<'a> {
    /// Encoded body length.
    pub fn encoded_len(&self) -> usize {
        assert!(self.queue.len() <= u8::MAX as usize, "queue name too long");
        1 + self.queue.len() + 4 + RETRY_ENTRY_BYTES * self.entries.len()
    }

    /// Writes the body into `out`, exactly `encoded_len()` long.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len());
        let mut w = Writer { out, at: 0 };
        w.put(&[self.queue.len() as u8]);
        w.put(self.queue);
        w.put(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            w.put(&e.seq.to_le_bytes());
            w.put(&e.due_ms.to_le_bytes());
            w.put(&e.failures.to_le_bytes());
            w.put(&e.delivery_count.to_le_bytes());
        }
    }

    /// Decodes a retry body.
    pub fn decode(body: &'a [u8]) -> Result<RetryRecord<'a>, BodyError> {
        let e = |why| body_err("retry", why);
        let mut r = Reader { b: body };
        let n = r.u8().ok_or(e("queue length"))? as usize;
        let queue = r.take(n).ok_or(e("queue"))?;
        let count = r.u32().ok_or(e("entry count"))? as usize;
        if r.b.len()
            != count
                .checked_mul(RETRY_ENTRY_BYTES)
                .ok_or(e("entry count"))?
        {
            return Err(e("entry bytes"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(RetryEntry {
                seq: r.u64().ok_or(e("seq"))?,
                due_ms: r.u64().ok_or(e("due time"))?,
                failures: r.u32().ok_or(e("failures"))?,
                delivery_count: r.u32().ok_or(e("delivery count"))?,
            });
        }
        Ok(RetryRecord { queue, entries })
    }
}

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_every_single_bit_flip_is_caught() {
        let body = b"hello, journal";
        let mut buf = vec![0u8; RECORD_HEADER_BYTES + body.len()];
        buf[RECORD_HEADER_BYTES..].copy_from_slice(body);
        seal_record(&mut buf, RecordKind::Control);
        let r = parse_record(&buf, 1 << 20).expect("valid");
        assert_eq!((r.kind, r.body), (RecordKind::Control, &body[..]));
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse_record(&b, 1 << 20).is_err(),
                "flip of bit {bit} not caught"
            );
        }
    }

    #[test]
    fn message_and_settle_bodies_round_trip() {
        let env = MessageEnvelope {
            exchange: b"orders",
            routing_key: b"eu.new",
            targets: vec![
                Target {
                    queue: b"billing",
                    queue_seq: 7,
                },
                Target {
                    queue: b"audit",
                    queue_seq: 1 << 40,
                },
            ],
            deaths: &[],
        };
        let mut body = vec![0u8; env.encoded_len() + 5];
        env.encode(&mut body[..env.encoded_len()]);
        body[env.encoded_len()..].copy_from_slice(b"bytes");
        let (e2, msg) = MessageEnvelope::decode(&body).expect("decodes");
        assert_eq!((e2, msg), (env.clone(), &b"bytes"[..]));

        // With annotations: they come back, the message bytes after them are untouched, and a
        // plain envelope's bytes are what they were before annotations existed.
        // target_count's high byte: after u8 + "orders" + u16 + "eu.new" and its low byte.
        assert_eq!(body[16], 0, "a plain envelope has no annotated bit");
        let annotated = MessageEnvelope {
            deaths: b"history",
            ..env.clone()
        };
        let mut body = vec![0u8; annotated.encoded_len() + 5];
        annotated.encode(&mut body[..annotated.encoded_len()]);
        body[annotated.encoded_len()..].copy_from_slice(b"bytes");
        let (e3, msg) = MessageEnvelope::decode(&body).expect("decodes");
        assert_eq!((e3, msg), (annotated, &b"bytes"[..]));

        // With a stamp: the plain decoder skips it, the stamped one returns it.
        let stamp = ProducerStamp {
            producer_id: 7,
            sequence: u64::MAX,
        };
        let len = env.encoded_len_stamped(Some(stamp));
        let mut stamped = vec![0u8; len + 5];
        env.encode_stamped(&mut stamped[..len], Some(stamp));
        stamped[len..].copy_from_slice(b"bytes");
        assert_eq!(
            MessageEnvelope::decode_stamped(&stamped).expect("decodes"),
            (env.clone(), Some(stamp), &b"bytes"[..])
        );
        assert_eq!(
            MessageEnvelope::decode(&stamped).expect("decodes"),
            (env.clone(), &b"bytes"[..])
        );
        assert_eq!(
            MessageEnvelope::decode_stamped(&body).expect("decodes").1,
            None
        );
        assert!(MessageEnvelope::decode_stamped(&stamped[..len - 1]).is_err());

        let s = SettleRecord {
            queue: b"billing",
            reason: SettleReason::DeadLettered,
            ranges: vec![(1, 5), (9, 9)],
        };
        let mut body = vec![0u8; s.encoded_len()];
        s.encode(&mut body);
        assert_eq!(SettleRecord::decode(&body), Ok(s));
        assert!(SettleRecord::decode(&body[..body.len() - 1]).is_err());
    }

    #[test]
    fn retry_bodies_round_trip_and_a_short_one_is_refused() {
        let r = RetryRecord {
            queue: b"work",
            entries: vec![
                RetryEntry {
                    seq: 3,
                    due_ms: 1_700_000_000_123,
                    failures: 2,
                    delivery_count: 5,
                },
                RetryEntry {
                    seq: 1 << 40,
                    due_ms: u64::MAX,
                    failures: u32::MAX,
                    delivery_count: 1,
                },
            ],
        };
        let mut body = vec![0u8; r.encoded_len()];
        r.encode(&mut body);
        assert_eq!(RetryRecord::decode(&body), Ok(r));
        assert!(RetryRecord::decode(&body[..body.len() - 1]).is_err());
        assert_eq!(RecordKind::from_u8(5), Some(RecordKind::Retry));
    }
}
