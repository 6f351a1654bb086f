//! `weir data reshard`: a data directory's queues moved to another shard count, offline and
//! crash-safely.
//!
//! Contract: runs on the main thread of a process that serves nothing, holding the directory's
//! lock (`weir.lock`, as `weir serve` does: a directory a broker holds is refused). The journals
//! are read and written on one glommio executor (`rt::run_on_executor`) through the broker's own
//! code: each old shard's journal is replayed by `Journal::open` into the same `Rebuild` a shard
//! runs at start-up (so the recovery decision tables decide what is live, not a second parser),
//! and the live state is written as a fresh, compact journal per new shard with the journal's
//! own record encoders. A queue goes to `placement(name) = crc32(name) % N`, the protocol's
//! definition.
//!
//! What is carried (everything a restart would recover):
//! - every durable queue's declaration (arguments included; an `arguments.shard` names the new
//!   owner), its next sequence number (a
//!   `QueueSeq` record: numbers are never reused) and its last usage record (`expires_ms`);
//! - every live message of it, in queue order, under its own queue sequence number: its record is
//!   the old one with the one target that moves (exchange, routing key, dead-letter history and
//!   producer stamp kept; the message's bytes, hence its delivery time and priority, untouched);
//!   a message stored once for several queues of one old shard is written once per queue;
//! - each live message's newest retry state (`Retry` records after its message);
//! - the control plane's durable exchanges and bindings (old shard 0 to new shard 0, as the
//!   re-statement before reclaim writes them);
//! - idempotent producers' windows: a window is per (producer, shard), and after a reshard a
//!   producer's queues may have new owners, so every new shard gets the union of the producer's
//!   windows on all old shards (a conservative merge: a re-send of anything stored anywhere is a
//!   duplicate on every shard; never stored twice).
//!
//! Transient state follows the broker's restart rules: non-durable queues and non-persistent
//! messages were never journaled, and deliveries that were unacked come back ready (marked
//! redelivered), as after any restart.
//!
//! Crash safety. Generation G's journals are `datadir::shard_dir(dir, G, i)`; a reshard writes
//! generation G+1 beside them, fsyncs every commit (the journal's group commit) and every
//! directory, then replaces `layout.toml` atomically (the commit point), then removes generation
//! G. The decision table, state on disk → what `serve` and `reshard` do:
//!
//! | on disk                                              | serve / reshard                      |
//! |------------------------------------------------------|--------------------------------------|
//! | layout G, only gen G                                 | serve G / reshard G → G+1            |
//! | layout G, gen G+1 partial or whole, maybe .tmp       | G+1 and .tmp removed, then as above  |
//! | layout.toml.tmp of G+1 fsynced, not renamed          | as above: the old layout stands      |
//! | layout G+1 (renamed), gen G still there              | gen G removed, then serve G+1        |
//! | layout G+1, gen G removed                            | serve G+1 / reshard G+1 → G+2        |
//!
//! So a SIGKILL at any moment leaves either all of the old layout or all of the new one.
//! Generation 0 keeps the first layout's paths (`shard-N/`), so directories made before this
//! tool exist are read as they are; a resharded directory's layout is format 2, which a broker
//! that knows only format 1 refuses rather than starting empty.
//!
//! Faults handled: a held lock, a missing or unreadable layout, a journal that does not recover
//! (the old layout stands, nothing is removed) and any write or sync error are a `ReshardError`
//! naming the shard or path; the new generation stays behind as a leftover the next run removes.
//! A test hook, `WEIR_RESHARD_KILL_AFTER_STEP=k`, SIGKILLs the process right after step k (the
//! steps are the `step` calls, counted from 1), so tests can crash it at every step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::broker::catalog::CatalogRecord;
use crate::broker::control::{ControlPlane, CONTROL_SHARD};
use crate::broker::producers::ProducerState;
use crate::broker::rebuild::Rebuild;
use crate::config::Config;
use crate::datadir::{self, Layout, LayoutError};
use crate::limits::Limits;
use crate::mesh::types::placement;
use crate::rt::fs::DmaDir;
use crate::rt::{self, Pinning};
use crate::server::{self, ServeError, BROKER_VERSION};
use crate::storage::format::RECORD_HEADER_BYTES;
use crate::storage::{
    Appended, Journal, JournalConfig, MessageEnvelope, RetryRecord, StorageError, Target,
};

/// The test hook's variable: SIGKILL right after this step.
pub const KILL_AFTER_STEP_ENV: &str = "WEIR_RESHARD_KILL_AFTER_STEP";

/// Retry entries per `Retry` record: 24 bytes each, so a record stays far below
/// `record_bytes_max` whatever the queue holds.
const RETRY_ENTRIES_PER_RECORD: usize = 1024;

/// What one new shard received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub queues: u64,
    pub messages: u64,
    /// The messages' bytes (as published; envelopes not counted).
    pub bytes: u64,
}

/// What a reshard did.
#[derive(Debug)]
pub enum Outcome {
    /// The directory already has that many shards: nothing was touched.
    Unchanged { shards: usize },
    Moved {
        from: usize,
        to: usize,
        generation: u64,
        /// Per new shard.
        shards: Vec<Moved>,
        exchanges: u64,
        bindings: u64,
        producers: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReshardError {
    #[error("{0}")]
    Lock(#[from] ServeError),
    #[error("data directory {dir}: {reason}")]
    Layout { dir: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Journal(String),
}

impl ReshardError {
    fn layout(dir: &Path) -> impl FnOnce(LayoutError) -> ReshardError + '_ {
        move |e| match e {
            LayoutError::Invalid(reason) => ReshardError::Layout {
                dir: dir.to_path_buf(),
                reason,
            },
            LayoutError::Io { what, source } => ReshardError::Io { what, source },
        }
    }
}

/// Steps done so far in this process (the test hook counts them).
static STEPS: AtomicU32 = AtomicU32::new(0);

/// Marks a step done; the test hook may end the process here, as a crash would.
fn step(what: &str) {
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::debug!(step = n, "{what}");
    let kill = std::env::var(KILL_AFTER_STEP_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    if kill == Some(n) {
        eprintln!("weir data reshard: {KILL_AFTER_STEP_ENV}={n}: killed after \"{what}\"");
        // SAFETY: kill(2) of our own pid with SIGKILL touches no memory; it does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Moves the queues of `config.data_dir` to `shards` shards (see the module header).
pub fn reshard(config: &Config, shards: usize) -> Result<Outcome, ReshardError> {
    let dir = config.data_dir.as_path();
    if shards == 0 || shards > usize::from(u16::MAX) {
        return Err(ReshardError::Layout {
            dir: dir.to_path_buf(),
            reason: format!("--shards {shards}: between 1 and {} expected", u16::MAX),
        });
    }
    if !dir.is_dir() {
        return Err(ReshardError::Layout {
            dir: dir.to_path_buf(),
            reason: "no such directory".into(),
        });
    }
    let _lock = server::lock_data_dir(dir)?;
    let Some(old) = datadir::read_layout(dir).map_err(ReshardError::layout(dir))? else {
        return Err(ReshardError::Layout {
            dir: dir.to_path_buf(),
            reason: format!(
                "no {}: no broker has served it, so there is nothing to reshard",
                datadir::LAYOUT_FILE
            ),
        });
    };
    if old.shards == shards {
        return Ok(Outcome::Unchanged { shards });
    }
    datadir::remove_leftovers(dir, old.generation).map_err(ReshardError::layout(dir))?;
    step("leftovers of other generations removed");

    let new = Layout {
        shards,
        generation: old.generation + 1,
    };
    let old_dirs: Vec<PathBuf> = (0..old.shards)
        .map(|i| datadir::shard_dir(dir, old.generation, i))
        .collect();
    let new_dirs: Vec<PathBuf> = (0..shards)
        .map(|k| datadir::shard_dir(dir, new.generation, k))
        .collect();
    for d in &new_dirs {
        std::fs::create_dir_all(d).map_err(|source| ReshardError::Io {
            what: format!("creating {}", d.display()),
            source,
        })?;
    }
    let limits = config.limits;
    let dirs = new_dirs.clone();
    let copied = rt::run_on_executor(Pinning::Unbound, config.io_memory_bytes, move || {
        copy(old_dirs, dirs, limits)
    })
    .map_err(|source| ReshardError::Io {
        what: "starting the executor".into(),
        source,
    })??;
    step("new journals written and committed");

    // Every name under the new generation durable before the layout names it.
    let sync = |d: &Path| datadir::sync_dir(d).map_err(ReshardError::layout(dir));
    for d in &new_dirs {
        sync(d)?;
    }
    sync(&datadir::generation_dir(dir, new.generation))?;
    sync(dir)?;
    step("directories synced");
    datadir::stage_layout(dir, new, BROKER_VERSION).map_err(ReshardError::layout(dir))?;
    step("new layout staged");
    datadir::replace_layout(dir).map_err(ReshardError::layout(dir))?;
    step("new layout in place");
    datadir::remove_leftovers(dir, new.generation).map_err(ReshardError::layout(dir))?;
    step("old generation removed");
    Ok(Outcome::Moved {
        from: old.shards,
        to: shards,
        generation: new.generation,
        shards: copied.shards,
        exchanges: copied.exchanges,
        bindings: copied.bindings,
        producers: copied.producers,
    })
}

struct Copied {
    shards: Vec<Moved>,
    exchanges: u64,
    bindings: u64,
    producers: u64,
}

/// A new shard's journal being written.
struct NewShard {
    journal: Journal<DmaDir>,
    last: Option<Appended>,
    moved: Moved,
}

impl NewShard {
    async fn control(&mut self, record: &CatalogRecord) -> Result<(), ReshardError> {
        let body = record.encode();
        self.journal
            .wait_for_room(RECORD_HEADER_BYTES + body.len())
            .await;
        self.last = Some(self.journal.append_control(&body).map_err(journal_err)?);
        Ok(())
    }
}

fn journal_err(e: StorageError) -> ReshardError {
    ReshardError::Journal(format!("writing the new journals: {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// On the executor: every old shard replayed in turn and its live state written to its queues'
/// new owners; then the control plane and the producers' windows; then every new journal
/// committed. One old shard's index is in memory at a time (what its own recovery holds).
async fn copy(
    old_dirs: Vec<PathBuf>,
    new_dirs: Vec<PathBuf>,
    limits: Limits,
) -> Result<Copied, ReshardError> {
    let mut news = Vec::with_capacity(new_dirs.len());
    for (k, d) in new_dirs.iter().enumerate() {
        let config = JournalConfig {
            shard_id: k as u32,
            limits: limits.storage,
        };
        let (journal, _) = Journal::open(DmaDir::new(d), config, |_, _, _| {})
            .await
            .map_err(|e| ReshardError::Journal(format!("new shard {k}: {}: {e}", d.display())))?;
        rt::spawn_detached(journal.clone().run_committer());
        news.push(NewShard {
            journal,
            last: None,
            moved: Moved::default(),
        });
    }
    step("new journals opened");
    let count = new_dirs.len() as u16;
    let mut producers: Vec<ProducerState> = Vec::new();
    let mut routing = None;
    for (i, d) in old_dirs.iter().enumerate() {
        if !d.exists() {
            // `serve` records the layout before it creates the shards' directories: a crash
            // in between leaves a shard that never held anything.
            step("an old shard copied");
            continue;
        }
        let failed = |e: String| ReshardError::Journal(format!("shard {i}: {}: {e}", d.display()));
        let mut rebuild = Rebuild::with_producer_window(limits.broker.producer_window_max);
        let config = JournalConfig {
            shard_id: i as u32,
            limits: limits.storage,
        };
        let (old, _) = Journal::open(DmaDir::new(d), config, |position, kind, body| {
            rebuild.apply(position, kind, body)
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
        rt::spawn_detached(old.clone().run_committer());
        old.set_read_ahead_bytes_max(limits.read_ahead_bytes());
        let table = rebuild.take_routing();
        if i == usize::from(CONTROL_SHARD) {
            routing = Some(table);
        }
        producers.extend(rebuild.take_producers(now_ms()).restatement());
        for q in rebuild.into_live().map_err(failed)? {
            let name = q.declare.name.clone();
            let owner = placement(&name, count);
            let mut declare = q.declare;
            // A queue declared with `arguments.shard` (allowed only where its name places it)
            // keeps saying where it is.
            if declare.arguments.shard.is_some() {
                declare.arguments.shard = Some(owner);
            }
            let new = &mut news[usize::from(owner)];
            new.control(&CatalogRecord::DeclareQueue(declare)).await?;
            for &(seq, position, len) in &q.messages {
                let record = old
                    .read(position, Some(len))
                    .await
                    .map_err(|e| failed(format!("queue '{name}' message {seq}: {e}")))?;
                let (envelope, stamp, message) = MessageEnvelope::decode_stamped(record.body())
                    .map_err(|e| failed(format!("queue '{name}' message {seq}: {e}")))?;
                let moved = MessageEnvelope {
                    exchange: envelope.exchange,
                    routing_key: envelope.routing_key,
                    targets: vec![Target {
                        queue: name.as_bytes(),
                        queue_seq: seq,
                    }],
                    deaths: envelope.deaths,
                };
                let bytes = RECORD_HEADER_BYTES + moved.encoded_len_stamped(stamp) + message.len();
                new.journal.wait_for_room(bytes).await;
                let appended = new
                    .journal
                    .append_message_stamped(&moved, stamp, message)
                    .map_err(journal_err)?;
                new.last = Some(appended);
                new.moved.messages += 1;
                new.moved.bytes += message.len() as u64;
            }
            // After their messages: replay keeps a retry state only for a live message.
            for entries in q.retries.chunks(RETRY_ENTRIES_PER_RECORD) {
                let retry = RetryRecord {
                    queue: name.as_bytes(),
                    entries: entries.to_vec(),
                };
                new.journal
                    .wait_for_room(RECORD_HEADER_BYTES + retry.encoded_len())
                    .await;
                new.last = Some(new.journal.append_retry(&retry).map_err(journal_err)?);
            }
            new.control(&CatalogRecord::QueueSeq {
                name: name.clone(),
                next_seq: q.next_seq,
            })
            .await?;
            if let Some(unused_since_ms) = q.usage {
                new.control(&CatalogRecord::QueueUsage {
                    name,
                    unused_since_ms,
                })
                .await?;
            }
            new.moved.queues += 1;
        }
        old.close().await;
        step("an old shard copied");
    }
    let (mut exchanges, mut bindings) = (0, 0);
    if let Some(table) = routing {
        for record in ControlPlane::new(table, u32::MAX, u32::MAX).restatement() {
            match record {
                CatalogRecord::DeclareExchange(_) => exchanges += 1,
                _ => bindings += 1,
            }
            news[usize::from(CONTROL_SHARD)].control(&record).await?;
        }
    }
    let mut ids: Vec<u64> = producers.iter().map(|p| p.producer_id).collect();
    ids.sort_unstable();
    ids.dedup();
    for new in &mut news {
        for p in &producers {
            new.control(&CatalogRecord::Producer(p.clone())).await?;
        }
    }
    for (k, new) in news.iter().enumerate() {
        if let Some(last) = &new.last {
            new.journal
                .commit(last)
                .await
                .map_err(|e| ReshardError::Journal(format!("new shard {k}: commit: {e}")))?;
        }
        new.journal.close().await;
    }
    Ok(Copied {
        shards: news.iter().map(|n| n.moved).collect(),
        exchanges,
        bindings,
        producers: ids.len() as u64,
    })
}
