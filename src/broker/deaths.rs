//! A message's dead-letter history: what it is on disk and in memory, how one more death is
//! added, and when a dead letter would go round a cycle.
//!
//! Contract: pure functions over bytes, no I/O, any thread. The history travels beside the
//! message, never inside it: the message's bytes stay the producer's, and the history is an
//! annotation of its journal record (`storage::record`, tag 1) and a `deaths` vector of the
//! `Delivery` it goes out in. It is the same compact encoding everywhere (journal, `Stored`,
//! `PublishItem`, `PushedDelivery`), so nothing is decoded on the way unless a delivery is
//! written or a message is dead-lettered again.
//!
//! Encoding: `u8 count | (u8 queue_len | queue | u8 reason | u32 count | u8 exchange_len |
//! exchange | u16 key_len | routing_key | i64 first_time_ms | i64 last_time_ms)*`, little-endian,
//! most recent first. Names were verified as UTF-8 when their message was published.
//!
//! Faults handled: a history that does not decode (it passed its record's crc, so that is a
//! bug, not a disk fault) reads as empty rather than failing the delivery; a history past
//! `DEATHS_PER_DELIVERY_MAX` lines loses its oldest ones.

use bytes::{BufMut, Bytes, BytesMut};
use weir_protocol::limits::DEATHS_PER_DELIVERY_MAX;
use weir_protocol::wire::DeathReason;
use weir_protocol::DeathItem;

/// Most bytes an encoded history takes: `DEATHS_PER_DELIVERY_MAX` lines of names at the wire's
/// `name_length_max` (255). Journal records leave room for it (`Limits::envelope_bytes_max`).
pub const HISTORY_BYTES_MAX: usize =
    1 + DEATHS_PER_DELIVERY_MAX * ((1 + 255) + 1 + 4 + (1 + 255) + (2 + 255) + 8 + 8);

/// Decodes a history; empty bytes are an empty history. `None` if the bytes are malformed.
pub fn decode(blob: &[u8]) -> Option<Vec<DeathItem<'_>>> {
    if blob.is_empty() {
        return Some(Vec::new());
    }
    let mut r = blob;
    let count = take(&mut r, 1)?[0] as usize;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = take(&mut r, 1)?[0] as usize;
        let queue = std::str::from_utf8(take(&mut r, n)?).ok()?;
        let reason = DeathReason(take(&mut r, 1)?[0]);
        let count = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
        let n = take(&mut r, 1)?[0] as usize;
        let exchange = std::str::from_utf8(take(&mut r, n)?).ok()?;
        let n = u16::from_le_bytes(take(&mut r, 2)?.try_into().ok()?) as usize;
        let routing_key = std::str::from_utf8(take(&mut r, n)?).ok()?;
        let first_time_ms = i64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let last_time_ms = i64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        out.push(DeathItem {
            queue,
            reason,
            count,
            exchange,
            routing_key,
            first_time_ms,
            last_time_ms,
        });
    }
    r.is_empty().then_some(out)
}

/// Decodes a history for a delivery: a malformed one (a bug) is logged and reads as empty.
pub fn for_delivery(blob: &[u8]) -> Vec<DeathItem<'_>> {
    decode(blob).unwrap_or_else(|| {
        tracing::error!("a dead-letter history does not decode; delivered without it");
        Vec::new()
    })
}

/// Encodes a history.
pub fn encode(deaths: &[DeathItem<'_>]) -> Bytes {
    assert!(deaths.len() <= DEATHS_PER_DELIVERY_MAX);
    let mut out = BytesMut::new();
    out.put_u8(deaths.len() as u8);
    for d in deaths {
        assert!(d.queue.len() <= u8::MAX as usize && d.exchange.len() <= u8::MAX as usize);
        assert!(d.routing_key.len() <= u16::MAX as usize);
        out.put_u8(d.queue.len() as u8);
        out.put_slice(d.queue.as_bytes());
        out.put_u8(d.reason.0);
        out.put_u32_le(d.count);
        out.put_u8(d.exchange.len() as u8);
        out.put_slice(d.exchange.as_bytes());
        out.put_u16_le(d.routing_key.len() as u16);
        out.put_slice(d.routing_key.as_bytes());
        out.put_i64_le(d.first_time_ms);
        out.put_i64_le(d.last_time_ms);
    }
    out.freeze()
}

/// One death, about to be added to a history.
#[derive(Clone, Copy, Debug)]
pub struct Death<'a> {
    /// The queue the message is dead-lettered from.
    pub queue: &'a str,
    pub reason: DeathReason,
    /// The exchange and routing key the message entered that queue with.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub now_ms: i64,
}

/// The history `prev` with `death` added, as RabbitMQ keeps `x-death`: the line for the same
/// queue and reason counts one more and moves to the front (keeping its first time); otherwise a
/// new line goes in front. The oldest lines past `DEATHS_PER_DELIVERY_MAX` are dropped.
pub fn add(prev: &[DeathItem<'_>], death: Death<'_>) -> Bytes {
    let mut lines: Vec<DeathItem<'_>> = Vec::with_capacity(prev.len() + 1);
    let same = |d: &DeathItem<'_>| d.queue == death.queue && d.reason == death.reason;
    let (count, first_time_ms) = prev
        .iter()
        .find(|d| same(d))
        .map_or((1, death.now_ms), |d| {
            (d.count.saturating_add(1), d.first_time_ms)
        });
    lines.push(DeathItem {
        queue: death.queue,
        reason: death.reason,
        count,
        exchange: death.exchange,
        routing_key: death.routing_key,
        first_time_ms,
        last_time_ms: death.now_ms,
    });
    lines.extend(prev.iter().filter(|d| !same(d)).copied());
    lines.truncate(DEATHS_PER_DELIVERY_MAX);
    encode(&lines)
}

/// Whether publishing a dead letter with history `deaths` (its newest death first) to `queue`
/// closes a cycle that no consumer took part in: the queue is already in the history and no
/// death since the message last left it was a rejection. Such a copy is dropped, as RabbitMQ
/// drops it: expiry or length limits alone would otherwise move it round forever.
pub fn is_cycle(deaths: &[DeathItem<'_>], queue: &str) -> bool {
    let Some(at) = deaths.iter().position(|d| d.queue == queue) else {
        return false;
    };
    deaths[..=at]
        .iter()
        .all(|d| d.reason != DeathReason::Rejected)
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (h, t) = r.split_at(n);
    *r = t;
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn death(queue: &str, reason: DeathReason, now_ms: i64) -> Death<'_> {
        Death {
            queue,
            reason,
            exchange: "ex",
            routing_key: "key",
            now_ms,
        }
    }

    #[test]
    fn a_history_round_trips_and_counts_repeats_on_one_line() {
        let h = add(&[], death("a", DeathReason::Expired, 10));
        let h = add(&decode(&h).unwrap(), death("b", DeathReason::Rejected, 20));
        let h = add(&decode(&h).unwrap(), death("a", DeathReason::Expired, 30));
        let lines = decode(&h).unwrap();
        let got: Vec<_> = lines
            .iter()
            .map(|d| (d.queue, d.reason, d.count, d.first_time_ms, d.last_time_ms))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", DeathReason::Expired, 2, 10, 30),
                ("b", DeathReason::Rejected, 1, 20, 20),
            ]
        );
        assert_eq!((lines[0].exchange, lines[0].routing_key), ("ex", "key"));
        assert_eq!(encode(&lines), h);
    }

    #[test]
    fn a_history_keeps_only_its_newest_lines_and_bad_bytes_do_not_decode() {
        let mut h = Bytes::new();
        let names: Vec<String> = (0..DEATHS_PER_DELIVERY_MAX + 3)
            .map(|i| format!("q{i}"))
            .collect();
        for (i, q) in names.iter().enumerate() {
            h = add(
                &decode(&h).unwrap(),
                death(q, DeathReason::Expired, i as i64),
            );
        }
        let lines = decode(&h).unwrap();
        assert_eq!(lines.len(), DEATHS_PER_DELIVERY_MAX);
        assert_eq!(lines[0].queue, names.last().unwrap());
        assert!(decode(&h[..h.len() - 1]).is_none(), "truncated");
        let mut longer = h.to_vec();
        longer.push(0);
        assert!(decode(&longer).is_none(), "trailing bytes");
        assert!(for_delivery(&h[..3]).is_empty());
    }

    #[test]
    fn a_cycle_of_expiries_is_one_and_a_rejection_on_the_way_breaks_it() {
        // a expires into b, b expires back into a: a cycle nobody consumed.
        let h = add(&[], death("a", DeathReason::Expired, 1));
        let h = add(&decode(&h).unwrap(), death("b", DeathReason::Expired, 2));
        let lines = decode(&h).unwrap();
        assert!(is_cycle(&lines, "a"));
        assert!(is_cycle(&lines, "b"));
        assert!(!is_cycle(&lines, "c"), "a queue it never left");
        // A consumer of b rejected it: it is being worked on, not going round by itself.
        let h = add(&decode(&h).unwrap(), death("b", DeathReason::Rejected, 3));
        assert!(!is_cycle(&decode(&h).unwrap(), "a"));
        // Back in a and expired again: the rejection is older than a's line now.
        let h = add(&decode(&h).unwrap(), death("a", DeathReason::Expired, 4));
        assert!(is_cycle(&decode(&h).unwrap(), "a"));
    }
}
