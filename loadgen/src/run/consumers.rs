//! Consumers: taking deliveries, recording them, acking in groups; and the rpc server's replies.
//!
//! Contract: tasks on a load thread's runtime, one per consumer role, each with its own
//! `Client`. A consumer subscribes when its first phase starts (unless the thread already did),
//! is paced by `consumer_rate` / `process_ms`, records end-to-end latency and the loss ledger,
//! and acks with `ack_all` in groups of `ack_batch` (or after 5 ms idle), or with `idiom =
//! "per-message"` each delivery with its own `Delivery::ack` (not awaited); for rpc it answers
//! each request on its `reply_to`. It stops at the coordinator's stop signal, acks what it
//! holds, cancels and closes.
//!
//! Faults handled: a subscription that fails or a consumer stream that ends in an error
//! (counted as a failure, the consumer stops), bodies that are not the load generator's
//! (counted as foreign), requests without `reply_to` or `correlation_id` (not answered).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use weir_client::{Client, Consumer, Delivery, Message};

use super::producers::now_ns;
use super::threads::{subscribe, Rec};
use super::Shared;
use crate::scenario::{Idiom, Kind};
use crate::stats::{Count, Header, Metric};

/// A consumer (or, for rpc, a server): takes deliveries, paced by `consumer_rate` /
/// `process_ms`, records end-to-end latency and the ledger, acks in groups of `ack_batch`.
pub(super) async fn consume(
    id: u32,
    client: Client,
    consumer: Option<Consumer>,
    sh: &Shared,
    epoch: Instant,
    rec: &Rec,
    mut stop: watch::Receiver<bool>,
) {
    let s = &sh.scenario;
    let queue = (id as usize % sh.queue_names.len()) as u16;
    let mut consumer = match consumer {
        Some(c) => c,
        None => {
            let at = epoch + Duration::from_secs_f64(sh.phase_starts[s.consumers_start_phase()]);
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = stop.changed() => return,
            }
            match subscribe(&client, sh, id).await {
                Ok(c) => c,
                Err(e) => {
                    rec.borrow_mut().failed(&format!("consumer {id}: {e}"));
                    return;
                }
            }
        }
    };
    let interval = s.consumer_interval_s().map(Duration::from_secs_f64);
    // Acks are sent when `ack_all` is called; their answers are not awaited (dropping the future
    // forgoes the answer, not the ack): the queue's unacked count shows whether they landed.
    let mut next_at = Instant::now();
    let mut unacked: Vec<Delivery> = Vec::new();
    let flush_after = Duration::from_millis(5);
    loop {
        if *stop.borrow() {
            break;
        }
        let got = tokio::select! {
            d = consumer.recv() => d,
            _ = tokio::time::sleep(flush_after), if !unacked.is_empty() => {
                drop(Delivery::ack_all(&unacked));
                unacked.clear();
                continue;
            }
            _ = stop.changed() => break,
        };
        let d = match got {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                rec.borrow_mut().failed(&format!("consumer {id}: {e}"));
                break;
            }
            None => break,
        };
        if let Some(iv) = interval {
            let now = Instant::now();
            if next_at > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_at.into()) => {}
                    _ = stop.changed() => break,
                }
            }
            next_at = next_at.max(now) + iv;
        }
        let now = now_ns(epoch);
        {
            let mut r = rec.borrow_mut();
            match Header::read(d.body()) {
                Some(h) => {
                    r.latency(Metric::EndToEnd, usize::from(h.phase), h.intended_ns, now);
                    if s.kind != Kind::Rpc {
                        r.delivered(id, queue, &h, d.redelivered());
                    }
                }
                None => r.foreign += 1,
            }
            r.count(Count::Delivered, now, 1);
        }
        sh.delivered.fetch_add(1, Ordering::Relaxed);
        if s.kind == Kind::Rpc {
            reply(&client, &d).await;
        }
        if s.idiom == Idiom::PerMessage {
            // As an application acks: each delivery on its own, the answer not awaited
            // (dropping the future forgoes the answer, not the ack).
            drop(d.ack());
            continue;
        }
        unacked.push(d);
        if unacked.len() >= s.ack_batch as usize {
            drop(Delivery::ack_all(&unacked));
            unacked.clear();
        }
    }
    if !unacked.is_empty() {
        let _ = Delivery::ack_all(&unacked).await;
    }
    let _ = consumer.cancel().await;
    let _ = client.close().await;
}

/// The rpc server's answer: the request's body back, on its reply queue, with its correlation id.
async fn reply(client: &Client, request: &Delivery) {
    let (Some(to), Some(id)) = (request.reply_to(), request.correlation_id()) else {
        return;
    };
    let message = Message::new(Bytes::copy_from_slice(request.body()))
        .correlation_id(id)
        .persistent(false);
    // The confirm is not awaited: the requester's reply is what counts.
    let _ = client.publish(to, message).await;
}
