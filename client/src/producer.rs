//! The idempotent producer: exactly-once publishing across lost connections and broker crashes.
//!
//! Contract: an [`IdempotentProducer`] is a cheap `Arc` handle, shareable across tasks. It owns
//! its own [`Client`] (its connections carry only its messages, so its sequence numbers are each
//! connection's), numbers every message from [`ProducerOptions::first_sequence`] on, and keeps
//! each one until its confirm (or refusal) comes: at most [`ProducerOptions::unconfirmed_max`]
//! messages and [`ProducerOptions::unconfirmed_bytes_max`] bytes (a publish waits for room).
//! When a connection dies it reconnects by itself (backing off, up to
//! [`ProducerOptions::reconnect_timeout`]) and re-sends every unconfirmed message, in sequence
//! order, under the same sequence: the broker stores each (producer id, sequence) at most once
//! per queue and confirms a re-send of one it had as a duplicate. Each publish's future resolves
//! once, with the confirm of whichever attempt got one.
//!
//! What the broker promises (README, "Exactly-once publishing"): a re-send within its window
//! (`producer_window_max` sequences below the producer's highest, 4096 by default) is told from
//! a new message exactly; older ones are refused (`SequenceOutOfWindow`); a producer idle for
//! `producer_idle_expiry_ms` (a day) is forgotten. Sequences should increase: gaps are fine, a
//! reused sequence is a duplicate. So one producer id is one sequence space for its life: a
//! restarted application either goes on from the sequence it reached
//! ([`IdempotentProducer::next_sequence`], stored by the application) or takes a new id.
//!
//! Faults handled: a lost connection or a broker restart (reconnect and re-send, transparently),
//! a broker that stays away longer than `reconnect_timeout` (every unconfirmed publish fails
//! with the last connect error, and the producer with it), a message the broker refuses or
//! returns (that publish fails with the broker's answer and is not re-sent).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, Mutex, Notify};

use crate::client::{Client, ClientOptions, PublishFuture, PublishOptions};
use crate::conn::{Command, Confirmation};
use crate::error::ClientError;
use crate::message::{Limits, Message};

/// How an [`IdempotentProducer`] publishes and recovers.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// The producer's id: with a sequence, it names each message across reconnects and broker
    /// restarts. Ids are the application's to allocate, one per producing process (or stream).
    pub producer_id: u64,
    /// The sequence of the first message (at least 1). A producer that restarts with the same id
    /// must go on above the sequences it used before, or its new messages are taken for
    /// duplicates.
    pub first_sequence: u64,
    /// Unconfirmed messages kept for re-sending; a publish waits beyond it. Keep it below the
    /// broker's `producer_window_max` (4096), or a re-send may fall out of the window.
    pub unconfirmed_max: usize,
    /// Bytes of unconfirmed messages kept for re-sending; a publish waits beyond it (one message
    /// is always let through).
    pub unconfirmed_bytes_max: usize,
    /// How long to keep trying to reconnect before failing every unconfirmed publish.
    pub reconnect_timeout: Duration,
    /// How each connection is made.
    pub client: ClientOptions,
}

impl ProducerOptions {
    /// The defaults for `producer_id`: sequences from 1, 1024 or 16 MiB unconfirmed, a minute
    /// to reconnect.
    pub fn new(producer_id: u64) -> ProducerOptions {
        ProducerOptions {
            producer_id,
            first_sequence: 1,
            unconfirmed_max: 1024,
            unconfirmed_bytes_max: 16 << 20,
            reconnect_timeout: Duration::from_secs(60),
            client: ClientOptions::default(),
        }
    }
}

/// A publish on its way: resolves with its confirm (`Confirmation::duplicate` says the broker
/// already had it), once, whichever attempt was confirmed; or with the broker's refusal or
/// return; or with the connect error if the producer gave up reconnecting.
pub struct ProducerFuture {
    rx: oneshot::Receiver<Result<Confirmation, ClientError>>,
}

impl Future for ProducerFuture {
    type Output = Result<Confirmation, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => {
                Poll::Ready(Err(ClientError::Closed(crate::error::CloseReason::Local)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// An exactly-once publisher: reconnects and re-sends unconfirmed messages by itself, and the
/// broker stores each at most once per queue.
///
/// # Example
///
/// ```no_run
/// use weir_client::{ClientError, IdempotentProducer, Message, ProducerOptions, PublishOptions};
///
/// # async fn example() -> Result<(), ClientError> {
/// // Producer id 42; a restarted application would go on from `next_sequence()`, stored.
/// let producer = IdempotentProducer::connect("127.0.0.1:5680", ProducerOptions::new(42)).await?;
/// let mut confirms = Vec::new();
/// for i in 0..1000 {
///     let m = Message::new(format!("order {i}"));
///     confirms.push(producer.publish(&PublishOptions::default(), "orders", m).await?);
/// }
/// // Even if the broker was restarted meanwhile, each message is in `orders` exactly once.
/// for c in confirms {
///     let confirmed = c.await?;
///     if confirmed.duplicate {
///         println!("{} was already stored: a re-send", confirmed.sequence);
///     }
/// }
/// println!("{} duplicates, {} reconnects", producer.duplicates(), producer.reconnects());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct IdempotentProducer {
    shared: Arc<Shared>,
}

struct Shared {
    addrs: Vec<SocketAddr>,
    options: ProducerOptions,
    limits: Limits,
    state: Mutex<State>,
    /// Rung when unconfirmed messages are settled (room for a waiting publish).
    room: Notify,
    duplicates: AtomicU64,
    resent: AtomicU64,
    reconnects: AtomicU64,
}

struct State {
    /// `None` while reconnecting.
    client: Option<Client>,
    /// Bumped at every reconnect: an attempt of an older generation that fails asks nothing.
    generation: u64,
    next_sequence: u64,
    pending: BTreeMap<u64, Pending>,
    bytes: usize,
    /// Set once the producer gave up reconnecting: every later publish fails with it.
    failed: Option<String>,
}

struct Pending {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    message: Bytes,
    done: oneshot::Sender<Result<Confirmation, ClientError>>,
}

impl IdempotentProducer {
    /// Connects (a [`Client`] of its own) and starts numbering at `options.first_sequence`.
    pub async fn connect(
        addr: impl tokio::net::ToSocketAddrs,
        options: ProducerOptions,
    ) -> Result<IdempotentProducer, ClientError> {
        if options.first_sequence == 0 {
            return Err(ClientError::InvalidArgument(
                "first_sequence: publish sequences start at 1".into(),
            ));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        let client = Client::connect(addrs.as_slice(), options.client.clone()).await?;
        let limits = client.server().limits;
        Ok(IdempotentProducer {
            shared: Arc::new(Shared {
                addrs,
                limits,
                state: Mutex::new(State {
                    client: Some(client),
                    generation: 0,
                    next_sequence: options.first_sequence,
                    pending: BTreeMap::new(),
                    bytes: 0,
                    failed: None,
                }),
                options,
                room: Notify::new(),
                duplicates: AtomicU64::new(0),
                resent: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
        })
    }

    /// Publishes one message under the next sequence; returns once it is sent (or waiting for a
    /// reconnect), after waiting while `unconfirmed_max` messages or `unconfirmed_bytes_max`
    /// bytes are unconfirmed. The future resolves on its confirm.
    pub async fn publish(
        &self,
        options: &PublishOptions,
        routing_key: &str,
        message: impl Into<Message>,
    ) -> Result<ProducerFuture, ClientError> {
        let limits = self.shared.limits;
        limits.check_name("routing key length", routing_key)?;
        limits.check_name("exchange name length", &options.exchange)?;
        let message = message.into().encode(&limits)?;
        let o = &self.shared.options;
        let mut st = loop {
            let room = self.shared.room.notified();
            let st = self.shared.state.lock().await;
            if let Some(why) = &st.failed {
                return Err(gave_up(why));
            }
            if st.pending.is_empty()
                || (st.pending.len() < o.unconfirmed_max
                    && st.bytes + message.len() <= o.unconfirmed_bytes_max)
            {
                break st;
            }
            drop(st);
            room.await;
        };
        let sequence = st.next_sequence;
        st.next_sequence += 1;
        st.bytes += message.len();
        let (done, rx) = oneshot::channel();
        st.pending.insert(
            sequence,
            Pending {
                exchange: options.exchange.clone(),
                routing_key: routing_key.to_string(),
                mandatory: options.mandatory,
                message,
                done,
            },
        );
        if let Err(e) = self.send(&mut st, sequence).await {
            self.lost(&mut st, &e);
        }
        Ok(ProducerFuture { rx })
    }

    /// The sequence the next publish gets: store it to restart the producer where it was.
    pub async fn next_sequence(&self) -> u64 {
        self.shared.state.lock().await.next_sequence
    }

    /// Messages sent and not yet confirmed (kept for re-sending).
    pub async fn unconfirmed(&self) -> usize {
        self.shared.state.lock().await.pending.len()
    }

    /// Confirms that said the broker already had the message (re-sends after a lost confirm).
    pub fn duplicates(&self) -> u64 {
        self.shared.duplicates.load(Ordering::Relaxed)
    }

    /// Messages sent again after a reconnect.
    pub fn resent(&self) -> u64 {
        self.shared.resent.load(Ordering::Relaxed)
    }

    /// Connections re-made after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Sends one pending message on the current client (none: a reconnect will send it) and
    /// watches its confirm.
    async fn send(&self, st: &mut State, sequence: u64) -> Result<(), ClientError> {
        let Some(client) = &st.client else {
            return Ok(());
        };
        let Some(p) = st.pending.get(&sequence) else {
            return Ok(());
        };
        let attempt = client
            .publish_as(
                self.shared.options.producer_id,
                sequence,
                &p.exchange,
                &p.routing_key,
                p.mandatory,
                p.message.clone(),
            )
            .await?;
        let me = self.clone();
        let generation = st.generation;
        tokio::spawn(async move { me.watch(sequence, generation, attempt).await });
        Ok(())
    }

    /// One attempt's outcome: a confirm or the broker's refusal settles the publish; a dead
    /// connection (of the current generation) starts a reconnect.
    async fn watch(self, sequence: u64, generation: u64, attempt: PublishFuture) {
        let outcome = attempt.await;
        let mut st = self.shared.state.lock().await;
        match outcome {
            Err(e @ (ClientError::Closed(_) | ClientError::Io(_))) => {
                if st.generation == generation {
                    self.lost(&mut st, &e);
                }
            }
            outcome => {
                if let Ok(c) = &outcome {
                    if c.duplicate {
                        self.shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(p) = st.pending.remove(&sequence) {
                    st.bytes -= p.message.len();
                    let _ = p.done.send(outcome.map(|c| Confirmation { sequence, ..c }));
                    self.shared.room.notify_waiters();
                }
            }
        }
    }

    /// The connection is gone: drop it and reconnect in the background.
    fn lost(&self, st: &mut State, _why: &ClientError) {
        if st.client.is_none() {
            return; // already reconnecting, or given up
        }
        st.client = None;
        st.generation += 1;
        let generation = st.generation;
        let me = self.clone();
        tokio::spawn(async move { me.reconnect(generation).await });
    }

    /// Connects again (backing off from 20 ms to 1 s) and re-sends every unconfirmed message in
    /// sequence order; past `reconnect_timeout`, fails them all.
    async fn reconnect(self, generation: u64) {
        let deadline = Instant::now() + self.shared.options.reconnect_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let connected = Client::connect(
                self.shared.addrs.as_slice(),
                self.shared.options.client.clone(),
            )
            .await;
            match connected {
                Ok(client) => {
                    let mut st = self.shared.state.lock().await;
                    if st.generation != generation {
                        return;
                    }
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    st.client = Some(client);
                    let sequences: Vec<u64> = st.pending.keys().copied().collect();
                    for sequence in sequences {
                        self.shared.resent.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = self.send(&mut st, sequence).await {
                            self.lost(&mut st, &e);
                            return;
                        }
                    }
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    let mut st = self.shared.state.lock().await;
                    let why = format!(
                        "producer {}: no connection within {:?}: {e}",
                        self.shared.options.producer_id, self.shared.options.reconnect_timeout
                    );
                    for (_, p) in std::mem::take(&mut st.pending) {
                        let _ = p.done.send(Err(gave_up(&why)));
                    }
                    st.bytes = 0;
                    st.failed = Some(why);
                    self.shared.room.notify_waiters();
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

fn gave_up(why: &str) -> ClientError {
    ClientError::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        why.to_string(),
    ))
}

impl Client {
    /// One idempotent producer's message under its sequence, on the connection its route takes
    /// (the queue's owner for the default exchange).
    pub(crate) async fn publish_as(
        &self,
        producer_id: u64,
        sequence: u64,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        message: Bytes,
    ) -> Result<PublishFuture, ClientError> {
        let conn = if exchange.is_empty() {
            self.conn_for(routing_key)
        } else {
            self.any_conn()
        };
        conn.take_permits(1).await?;
        let (confirm, rx) = oneshot::channel();
        conn.send(Command::PublishAs {
            producer_id,
            sequence,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            mandatory,
            message,
            confirm,
        })?;
        Ok(PublishFuture::new(rx, conn.clone()))
    }
}
