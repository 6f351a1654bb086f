//! The per-message path, one message at a time: a fixed number of 1 KiB persistent messages, each
//! published, confirmed, delivered and acked before the next, through the broker's own code in
//! one process. It prints ns and heap allocations per message; `benches/callgrind.sh` runs it
//! under valgrind's callgrind for instructions per message (exact; the wall clock is not).
//!
//! Why not `weir serve` under valgrind: glommio needs io_uring, which valgrind does not support.
//! So this driver stands in for the executor and the kernel, and runs everything else the shard
//! runs per message, in the order the shard runs it (one shard, `fsync = always`, default
//! limits, the connection on the queue's owner, as a shard-aware client connects):
//!
//! 1. Publish. The client's bytes (one `Publish` frame of one entry, request id 0, confirm, from
//!    `weir_protocol::Encoder` as `weir-client` encodes it) land in the connection's receive
//!    buffer; the connection turn (`net::connection::serve`) decodes them with the
//!    `FrameDecoder`, hands the frame to `Session::on_frame_at`, ticks the session, and submits
//!    the `Addressed` ops to the shard's work queue (`ShardState::send_addressed`/`push_work`,
//!    with `mesh::weight`).
//! 2. The worker (`shard::worker`, `ShardState::execute`): journal room, `ops::publish` on the
//!    `QueueHost` with a journal sink that is `shard::staging::Staging` line for line, over the
//!    real `storage::Journal` (the record's envelope, crc and copy into the staged chunk),
//!    `ops::journal`, `ops::collect_pushes` (nothing yet: the message is held for its commit),
//!    the removed-queue check, the reply held for the commit.
//! 3. The commit: the journal's own committer (`Journal::run_committer`) writes the round (to a
//!    directory that drops the bytes: `NullDir`), then the confirmer (`shard::confirmer`) runs:
//!    `resolve_commits` (`pending_rounds_through`, `commit_round`, `QueueHost::commit_resolved`),
//!    `dispatch_owed` (an empty `Op::Settle` of the shard's own, executed by the worker: that
//!    dispatches the `Deliver` push), cooling, and the `Published` reply
//!    (`durability::published`).
//! 4. The replies and pushes reach the session (`ShardState::deliver`, `to_connection`:
//!    `Session::on_reply_at` encodes the `Confirm`, `Session::on_push` the `Deliver`, into the
//!    outbox); the connection "writes" the outbox, hands the deliveries' charges back
//!    (`take_unwritten`, `on_written`) and the worker executes the `DeliveriesWritten` op.
//! 5. Ack. The client decodes the `Deliver`, sends one `Ack` of its one tag (request id 0, as
//!    `weir-client` acks one delivery), and steps 1-4 run for it: `ops::execute` of the
//!    `Settle`, the settle record staged and committed, the ack applied at `commit_resolved`,
//!    its (unasked) reply to the session.
//!
//! Left out, by design: the executor (task spawns, wakers, doorbells, scheduling: here a loop
//! runs each step until nothing is left), io_uring and the kernel (the socket's recv and send
//! copies, the segment write and fdatasync: `NullDir` keeps no bytes and its fdatasync returns
//! at once; a write buffer is reused from a pool where glommio allocates a DMA buffer), the
//! mesh hop (none: one shard), the client (its encoding and decoding run outside the counted
//! part: `broker_turn` is the only function whose cost `callgrind.sh` collects), and what the
//! shard runs on timers (expiry, reclaim, housekeeping). The clock is read where the shell reads
//! it. By default each message takes its own connection turns, worker rounds and commits
//! (nothing is coalesced across messages): the per-message idiom at its least batched. With
//! `WEIR_BENCH_WINDOW=K`, K messages (still one publish frame and one ack frame each) arrive
//! together, as from a producer with K unconfirmed: they share connection turns and commits, as
//! they do in the running broker under a pipelined load.
//!
//! Kept in step with `src/shard/worker.rs`, `src/shard/staging.rs`, `src/shard/mod.rs` and
//! `src/net/connection.rs` by hand: when they change what runs per message, change `Shard`
//! below the same way.
//!
//! Run: `cargo bench --bench per_message [-- MESSAGES]` (default 20 000, after 1 000 of warm-up;
//! also `WEIR_BENCH_MESSAGES`). At the end it asserts that every message was confirmed,
//! delivered once and acked, and that the queue is empty, in every build.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use weir::broker::catalog::CatalogRecord;
use weir::broker::control::{RoutingCopy, CONTROL_CONN};
use weir::broker::cooling::Written;
use weir::broker::durability::{self, HeldReplies};
use weir::broker::host::{HostLimits, QueueHost};
use weir::broker::ops::{self, JournalSink};
use weir::broker::orphan_bindings;
use weir::broker::rebuild::Rebuild;
use weir::broker::routing::hash::FastMap;
use weir::broker::stored::{Cache, Liveness, Stored};
use weir::limits::Limits;
use weir::mesh::msg::{Op, PublishItem, Pushed, Reply};
use weir::mesh::types::{ConnRef, Refusal, Seq};
use weir::mesh::MeshMsg;
use weir::net::session::{Addressed, Flow, Session, SessionCtx};
use weir::storage::io::{IoBuf, SegmentDir, SegmentFile};
use weir::storage::{
    Appended, CommitId, Journal, JournalConfig, MessageEnvelope, RetryEntry, RetryRecord,
    SettleReason, SettleRecord, StorageError, Target,
};
use weir_protocol::wire::{self, BodyT, Durability, Range};
use weir_protocol::{Encoder, FrameDecoder, InFrame, MessageProps, PublishItem as WireItem};

const QUEUE: &str = "orders.eu.created";
const BODY_BYTES: usize = 1024;
const WARM_UP: u64 = 1_000;
const DEFAULT_MESSAGES: u64 = 20_000;

// ---- heap allocations, counted (a relaxed add per call: a few instructions) ----

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to `System` unchanged; it only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---- the disk, minus the kernel ----

/// Write buffers handed back by writes, reused by the next commit (glommio's DMA allocator
/// stands here; the bytes are never read).
type Pool = Rc<RefCell<Vec<Box<[u8]>>>>;

/// A segment directory that keeps no bytes: every operation succeeds at once.
#[derive(Clone, Default)]
struct NullDir {
    pool: Pool,
}

struct NullFile {
    pool: Pool,
    size: Cell<u64>,
}

struct NullBuf {
    data: Box<[u8]>,
    len: usize,
}

impl IoBuf for NullBuf {
    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl SegmentDir for NullDir {
    type File = NullFile;
    type Buf = NullBuf;
    fn alloc_buf(&self, len: usize) -> NullBuf {
        let mut pool = self.pool.borrow_mut();
        let data = match pool.iter().position(|b| b.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0; len].into_boxed_slice(),
        };
        NullBuf { data, len }
    }
    fn describe(&self, name: &str) -> String {
        format!("null:{name}")
    }
    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }
    async fn create(&self, _: &str) -> io::Result<NullFile> {
        Ok(NullFile {
            pool: self.pool.clone(),
            size: Cell::new(0),
        })
    }
    async fn open(&self, name: &str) -> io::Result<NullFile> {
        Err(io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }
    async fn remove(&self, _: &str) -> io::Result<()> {
        Ok(())
    }
    async fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl SegmentFile for NullFile {
    type Buf = NullBuf;
    type ReadBuf = Vec<u8>;
    async fn preallocate(&self, len: u64) -> io::Result<()> {
        self.size.set(self.size.get().max(len));
        Ok(())
    }
    async fn write_at(&self, buf: NullBuf, pos: u64) -> io::Result<usize> {
        let n = buf.len;
        self.size.set(self.size.get().max(pos + n as u64));
        self.pool.borrow_mut().push(buf.data);
        Ok(n)
    }
    async fn read_at(&self, _: u64, _: usize) -> io::Result<Vec<u8>> {
        Err(io::Error::other("the bench's journal keeps no bytes"))
    }
    async fn fdatasync(&self) -> io::Result<()> {
        Ok(())
    }
    async fn size(&self) -> io::Result<u64> {
        Ok(self.size.get())
    }
    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.size.set(len);
        Ok(())
    }
    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}

/// Polls `f` once: everything the bench awaits is ready at once, or (the committer) runs until
/// it waits for more records.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

fn ready<F: Future>(f: F) -> F::Output {
    match poll_once(pin!(f)) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the bench awaited something that is not ready"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---- the journal sink: `shard::staging::Staging`, over the bench's journal ----

struct Staging<'a> {
    journal: &'a Journal<NullDir>,
    appended: &'a Cell<Option<Appended>>,
    written: &'a RefCell<Written>,
    liveness: &'a Rc<Liveness>,
    hold: bool,
}

impl Staging<'_> {
    fn note(&self, result: Result<Appended, StorageError>) -> Result<Option<CommitId>, Refusal> {
        let a = result.map_err(durability::storage_refusal)?;
        if self
            .appended
            .get()
            .is_none_or(|prev| prev.commit <= a.commit)
        {
            self.appended.set(Some(a));
        }
        Ok(self.hold.then_some(a.commit))
    }
}

impl JournalSink for Staging<'_> {
    fn message(
        &mut self,
        targets: &[(&str, Seq)],
        msg: &Rc<Stored>,
    ) -> Result<Option<CommitId>, Refusal> {
        let envelope = MessageEnvelope {
            deaths: &[],
            exchange: msg.exchange.as_bytes(),
            routing_key: msg.routing_key.as_bytes(),
            targets: targets
                .iter()
                .map(|(queue, seq)| Target {
                    queue: queue.as_bytes(),
                    queue_seq: *seq,
                })
                .collect(),
        };
        let payload = msg.payload();
        let appended = self
            .journal
            .append_message(&envelope, &payload)
            .map_err(durability::storage_refusal)?;
        msg.set_position(appended.position, appended.len, Some(self.liveness));
        self.written.borrow_mut().note(targets);
        self.note(Ok(appended))
    }

    fn settle(
        &mut self,
        queue: &str,
        reason: SettleReason,
        ranges: &[(u64, u64)],
    ) -> Result<Option<CommitId>, Refusal> {
        let record = SettleRecord {
            queue: queue.as_bytes(),
            reason,
            ranges: ranges.to_vec(),
        };
        self.note(self.journal.append_settle(&record))
    }

    fn catalog(&mut self, record: &CatalogRecord) -> Result<(), Refusal> {
        self.note(self.journal.append_control(&record.encode()))
            .map(|_| ())
    }

    fn retry(&mut self, queue: &str, entries: &[RetryEntry]) -> Result<Option<CommitId>, Refusal> {
        let record = RetryRecord {
            queue: queue.as_bytes(),
            entries: entries.to_vec(),
        };
        self.note(self.journal.append_retry(&record))
    }
}

/// `shard::staging::record_room`.
fn record_room(item: &PublishItem) -> usize {
    let targets: usize = item.also.iter().map(|q| q.len() + 16).sum();
    item.bytes.len()
        + item.exchange.len()
        + item.routing_key.len()
        + item.queue.len()
        + targets
        + 64
}

// ---- the shard ----

/// A connection as the shard holds it (`net::connection::ConnEntry`, less its doorbell), with
/// the connection task's receive buffer and decoder.
struct Conn {
    session: RefCell<Session>,
    outbox: RefCell<BytesMut>,
    rx: RefCell<BytesMut>,
    decoder: FrameDecoder,
}

/// What the detached commit-wait task of one request holds (`ShardState::execute`).
struct CommitWait {
    appended: Appended,
    rounds: Vec<Option<CommitId>>,
    written: Written,
    waiting: Option<Reply>,
    from: ConnRef,
    id: u64,
}

/// `ShardState`, less the executor: the fields the per-message path touches.
struct Shard {
    id: u16,
    limits: Limits,
    durability: Durability,
    host: RefCell<QueueHost>,
    journal: Journal<NullDir>,
    committer: RefCell<Pin<Box<dyn Future<Output = ()>>>>,
    appended: Cell<Option<Appended>>,
    written: RefCell<Written>,
    liveness: Rc<Liveness>,
    held: RefCell<HeldReplies>,
    routing: Rc<RoutingCopy>,
    connections: RefCell<FastMap<u64, Rc<Conn>>>,
    work: RefCell<VecDeque<(usize, MeshMsg)>>,
    work_bytes: Cell<usize>,
    commit_waits: RefCell<VecDeque<CommitWait>>,
}

impl Shard {
    fn open(limits: Limits, durability: Durability) -> Shard {
        let mut rebuild = Rebuild::new();
        let config = JournalConfig {
            shard_id: 0,
            limits: limits.storage,
        };
        let (journal, _) = ready(Journal::open(NullDir::default(), config, |p, k, b| {
            rebuild.apply(p, k, b)
        }))
        .expect("an empty journal opens");
        let (mut host, _) = rebuild
            .finish(0, Cache::new(limits.broker.cache_bytes_max), now_ms())
            .expect("nothing to rebuild");
        host.set_limits(HostLimits {
            queues_per_shard_max: limits.broker.queues_per_shard_max,
            queued_messages_max: limits.broker.queued_messages_max,
        });
        host.set_outbox_bytes_max(limits.broker.outbox_bytes_max);
        let liveness = host.liveness().clone();
        let committer: Pin<Box<dyn Future<Output = ()>>> =
            Box::pin(journal.clone().run_committer());
        let routing = Rc::new(RoutingCopy::default());
        routing.ready.set(true);
        Shard {
            id: 0,
            limits,
            durability,
            host: RefCell::new(host),
            journal,
            committer: RefCell::new(committer),
            appended: Cell::new(None),
            written: RefCell::new(Written::default()),
            liveness,
            held: RefCell::new(HeldReplies::default()),
            routing,
            connections: RefCell::new(FastMap::default()),
            work: RefCell::new(VecDeque::new()),
            work_bytes: Cell::new(0),
            commit_waits: RefCell::new(VecDeque::new()),
        }
    }

    /// `accept`: a session for connection `conn`.
    fn accept(&self, conn: u64) {
        let b = &self.limits.broker;
        let now = now_ms();
        let ctx = SessionCtx {
            broker_version: "bench",
            shard: self.id,
            shard_ports: vec![0],
            durability: self.durability,
            limits: self.limits.wire,
            publishes_in_flight_max: b.publishes_in_flight_max,
            prefetch_default: b.prefetch_default,
            prefetch_max: b.prefetch_max,
            targets_per_message_max: b.targets_per_message_max,
            delay_ms_max: b.delay_ms_max,
            connection_id: conn,
            started_ms: now,
            accepted_ms: now,
            handshake_timeout_ms: b.handshake_timeout_ms,
            requests_in_flight_max: b.requests_in_flight_max,
            consumers_per_connection_max: b.consumers_per_connection_max,
            gets_unacked_max: b.gets_unacked_max,
            publish_bytes_in_flight_max: b.publish_bytes_in_flight_max,
            message_copy_bytes_max: b.message_copy_bytes_max,
            outbox_bytes_max: b.outbox_bytes_max,
            retry_delays_count_max: b.retry_delays_count_max,
        };
        let entry = Conn {
            session: RefCell::new(Session::new(ctx, self.routing.clone())),
            outbox: RefCell::new(BytesMut::new()),
            rx: RefCell::new(BytesMut::new()),
            decoder: FrameDecoder::new(self.limits.wire),
        };
        self.connections.borrow_mut().insert(conn, Rc::new(entry));
    }

    fn conn(&self, conn: u64) -> Rc<Conn> {
        self.connections.borrow()[&conn].clone()
    }

    /// Runs the broker until nothing is left to do, then hands back what connection `conn`
    /// (its `entry`: the connection task holds it) wrote. The one function whose cost
    /// `callgrind.sh` collects (`--toggle-collect`).
    #[inline(never)]
    fn broker_turn(&self, conn: u64, entry: &Conn) -> BytesMut {
        let me = ConnRef {
            shard: self.id,
            conn,
        };
        let mut written = BytesMut::new();
        loop {
            let mut progress = self.connection_turn(me, entry, &mut written);
            while let Some(msg) = self.next_work() {
                progress = true;
                match msg {
                    MeshMsg::Request { from, id, op } => self.execute(from, id, op),
                    other => self.deliver(other),
                }
            }
            progress |= self.commit_turn();
            if !progress {
                return written;
            }
        }
    }

    /// One turn of `net::connection::serve`: decode what was read, answer, submit, write.
    fn connection_turn(&self, me: ConnRef, entry: &Conn, written: &mut BytesMut) -> bool {
        let mut flow = Flow::Continue;
        let mut outbound = Vec::new();
        let mut decoded = false;
        {
            let mut session = entry.session.borrow_mut();
            let mut out = entry.outbox.borrow_mut();
            let mut rx = entry.rx.borrow_mut();
            let now = now_ms();
            while flow == Flow::Continue && self.has_room() {
                if !session.wants_input_beside(out.len()) {
                    break;
                }
                match entry.decoder.decode(&mut rx) {
                    Ok(Some(frame)) => {
                        decoded = true;
                        flow = session.on_frame_at(now, &frame, &mut out, &mut outbound)
                    }
                    Ok(None) => break,
                    Err(e) => panic!("the bench's client sent a bad frame: {e}"),
                }
            }
            if flow == Flow::Continue {
                flow = session.on_tick_at(now, &mut out);
            }
            assert_eq!(flow, Flow::Continue, "the session closed the connection");
            let _ = session.handshake_deadline();
            let _ = session.wants_input() && self.has_room();
        }
        self.send_addressed(me, outbound);
        let owed = entry.outbox.borrow_mut().split();
        let charges = entry.session.borrow_mut().take_unwritten();
        let wrote = !owed.is_empty();
        written.unsplit(owed); // the client's socket
        let mut outbound = Vec::new();
        entry
            .session
            .borrow_mut()
            .on_written(charges, &mut outbound);
        self.send_addressed(me, outbound);
        decoded || wrote
    }

    fn has_room(&self) -> bool {
        (self.work_bytes.get() as u64) <= self.limits.broker.work_bytes_max
    }

    fn send_addressed(&self, from: ConnRef, outbound: Vec<Addressed>) {
        for r in outbound {
            assert_eq!(r.shard, self.id, "one shard: no mesh hop");
            self.push_work(MeshMsg::Request {
                from,
                id: r.id,
                op: r.op,
            });
        }
    }

    fn push_work(&self, msg: MeshMsg) {
        let weight = weir::mesh::weight(&msg);
        self.work_bytes.set(self.work_bytes.get() + weight);
        self.work.borrow_mut().push_back((weight, msg));
    }

    fn next_work(&self) -> Option<MeshMsg> {
        let (weight, msg) = self.work.borrow_mut().pop_front()?;
        self.work_bytes.set(self.work_bytes.get() - weight);
        Some(msg)
    }

    fn reply_to(&self, to: ConnRef, id: u64, reply: Reply) {
        self.push_work(MeshMsg::Reply { to, id, reply });
    }

    fn staging(&self) -> Staging<'_> {
        Staging {
            journal: &self.journal,
            appended: &self.appended,
            written: &self.written,
            liveness: &self.liveness,
            hold: self.durability == Durability::Always,
        }
    }

    /// `ShardState::execute`, for the ops of the per-message path (no purge, control, routing,
    /// `Get` or status; every payload hot, nothing dead-lettered).
    fn execute(&self, from: ConnRef, id: u64, op: Op) {
        let now = now_ms();
        let mut pushes = Vec::new();
        let mut rounds: Vec<Option<CommitId>> = Vec::new();
        let reply = match op {
            Op::Publish(items) => {
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    ready(self.journal.wait_for_room(record_room(&item)));
                    let mut host = self.host.borrow_mut();
                    let mut sink = self.staging();
                    let outcome = ops::publish(&mut host, &mut sink, from, item, now);
                    let round = self.appended.get().map(|a| a.commit);
                    rounds.push(round.filter(|_| outcome.journaled));
                    outcomes.push(outcome);
                }
                Reply::Published(outcomes)
            }
            op @ (Op::Purge { .. } | Op::Control(_) | Op::Routing(_) | Op::Get { .. }) => {
                panic!("not on the per-message path: {op:?}")
            }
            op => {
                let mut host = self.host.borrow_mut();
                let mut sink = self.staging();
                ops::execute(&mut host, &mut sink, from, op, now, &mut pushes)
            }
        };
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            ops::journal(&mut host, &mut sink).expect("the bench's journal takes every record");
        }
        let own = self.appended.take();
        let written = std::mem::take(&mut *self.written.borrow_mut());
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            ops::collect_pushes(
                &mut host,
                &mut sink,
                now,
                self.limits.wire.deliver_batch_max as usize,
                &mut pushes,
            );
            self.appended.set(None);
            self.written.borrow_mut().clear();
        }
        // `forget_removed_queues`
        let removed = self.host.borrow_mut().take_removed();
        let gone = orphan_bindings::removed_with_bindings(&self.routing.table.borrow(), removed);
        assert!(gone.is_empty(), "no queue is deleted");
        let mut reply = Some(reply);
        let mut held_reply = None;
        if durability::holds_for_commit(self.durability, own.is_some()) {
            held_reply = reply.take();
        }
        if let Some(reply) = reply.take() {
            self.reply_to(from, id, reply);
        }
        // `read_back`: every payload is hot here.
        for push in pushes.iter() {
            if let Pushed::Deliver { deliveries, .. } = push {
                assert!(deliveries.iter().all(|d| d.cold.is_none()), "nothing cools");
            }
        }
        pushes
            .retain(|p| !matches!(p, Pushed::Deliver { deliveries, .. } if deliveries.is_empty()));
        assert!(self.host.borrow_mut().take_dead_letters().is_empty());
        for push in pushes {
            self.push_work(MeshMsg::Push {
                from_shard: self.id,
                push,
            });
        }
        let Some(appended) = own else { return };
        if held_reply.is_some() {
            self.held.borrow_mut().hold();
        }
        self.commit_waits.borrow_mut().push_back(CommitWait {
            appended,
            rounds,
            written,
            waiting: held_reply,
            from,
            id,
        });
    }

    /// The committer runs until the oldest waiting request's commit has finished, then every
    /// request whose commit has finished is answered with one resolution of their rounds (the
    /// confirmer, `shard::confirmer`).
    fn commit_turn(&self) -> bool {
        let Some(oldest) = self.commit_waits.borrow().front().map(|w| w.appended) else {
            return false;
        };
        let mut wait = pin!(self.journal.commit(&oldest));
        while poll_once(wait.as_mut()).is_pending() {
            assert!(poll_once(self.committer.borrow_mut().as_mut()).is_pending());
        }
        let mut batch = Vec::new();
        while let Some(w) = {
            let mut waits = self.commit_waits.borrow_mut();
            let finished = waits
                .front()
                .is_some_and(|w| self.journal.round_finished(w.appended.commit));
            if finished {
                waits.pop_front()
            } else {
                None
            }
        } {
            batch.push(w);
        }
        let newest = batch.last().expect("the oldest finished").appended.commit;
        let rounds: Vec<Option<CommitId>> = batch
            .iter()
            .flat_map(|w| w.rounds.iter().copied())
            .collect();
        let outcomes = self.resolve_commits(newest, &rounds);
        for w in batch {
            let result = ready(self.journal.commit_round(w.appended.commit));
            self.commit_done(w, result, &outcomes);
        }
        true
    }

    fn commit_done(
        &self,
        w: CommitWait,
        result: Result<(), StorageError>,
        outcomes: &BTreeMap<CommitId, Result<(), Refusal>>,
    ) {
        if result.is_ok() {
            w.written.cool_over_budget(&mut self.host.borrow_mut());
        }
        if let Some(reply) = w.waiting {
            let reply = match (reply, result) {
                (Reply::Published(published), _) => {
                    Reply::Published(durability::published(published, &w.rounds, outcomes))
                }
                (reply, Ok(())) => reply,
                (reply, Err(e)) => durability::not_durable(reply, durability::storage_refusal(e)),
            };
            self.reply_to(w.from, w.id, reply);
            self.held.borrow_mut().release();
        }
    }

    /// `ShardState::resolve_commits`.
    fn resolve_commits(
        &self,
        newest: CommitId,
        rounds: &[Option<CommitId>],
    ) -> BTreeMap<CommitId, Result<(), Refusal>> {
        let mut wanted = self.host.borrow().pending_rounds_through(newest);
        wanted.extend(rounds.iter().flatten().copied());
        wanted.sort_unstable();
        wanted.dedup();
        let mut outcomes = BTreeMap::new();
        let mut changed = false;
        for round in wanted {
            let result = ready(self.journal.commit_round(round));
            changed |= self
                .host
                .borrow_mut()
                .commit_resolved(round, result.is_ok());
            outcomes.insert(round, result.map_err(durability::storage_refusal));
        }
        if changed {
            // `dispatch_owed`
            let from = ConnRef {
                shard: self.id,
                conn: CONTROL_CONN,
            };
            self.push_work(MeshMsg::Request {
                from,
                id: 0,
                op: Op::Settle(Vec::new()),
            });
        }
        outcomes
    }

    /// `ShardState::deliver`.
    fn deliver(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Request { .. } => unreachable!("requests are executed by the worker"),
            MeshMsg::Reply { to, .. } if to.conn == CONTROL_CONN => {}
            MeshMsg::Reply { to, id, reply } => self.to_connection(to, |session, out, outbound| {
                session.on_reply_at(now_ms(), id, reply, out, outbound);
            }),
            MeshMsg::Push { from_shard, push } => {
                let to = match &push {
                    Pushed::Deliver { to, .. } => *to,
                    Pushed::Cancelled(c) | Pushed::TimedOut(c) => c.to,
                };
                self.to_connection(to, |session, out, outbound| {
                    session.on_push(from_shard, push, out, outbound);
                })
            }
        }
    }

    /// `ShardState::to_connection`, less the doorbell.
    fn to_connection(
        &self,
        to: ConnRef,
        give: impl FnOnce(&mut Session, &mut BytesMut, &mut Vec<Addressed>),
    ) {
        let Some(entry) = self.connections.borrow().get(&to.conn).cloned() else {
            return;
        };
        let mut outbound = Vec::new();
        give(
            &mut entry.session.borrow_mut(),
            &mut entry.outbox.borrow_mut(),
            &mut outbound,
        );
        self.send_addressed(to, outbound);
    }
}

// ---- the client: outside the counted part ----

struct Client {
    encoder: Encoder,
    decoder: FrameDecoder,
    message: Bytes,
    sequence: u64,
    confirmed: u64,
    delivered: u64,
}

impl Client {
    fn new(limits: Limits) -> Client {
        let mut encoder = Encoder::new(limits.wire);
        let message = encoder
            .message(&MessageProps::default(), &[0x5a; BODY_BYTES])
            .expect("a 1 KiB message encodes");
        Client {
            encoder,
            decoder: FrameDecoder::new(limits.wire),
            message,
            sequence: 0,
            confirmed: 0,
            delivered: 0,
        }
    }

    fn frame(&mut self, rx: &mut BytesMut, request_id: u64, body: BodyT) {
        self.encoder
            .encode(&weir_protocol::frame(request_id, body), rx)
            .expect("a control frame encodes");
    }

    /// `weir-client`'s `publish` of one message: its own frame, request id 0, confirmed.
    #[inline(never)]
    fn publish(&mut self, rx: &mut BytesMut) {
        self.sequence += 1;
        let item = WireItem {
            sequence: self.sequence,
            exchange: "",
            routing_key: QUEUE,
            mandatory: false,
            message: &self.message,
        };
        self.encoder
            .publish(rx, 0, None, true, [item])
            .expect("a publish encodes");
    }

    /// Reads what the broker wrote: confirms and deliveries; returns the delivery tags.
    #[inline(never)]
    fn read(&mut self, mut written: BytesMut) -> Vec<u64> {
        let mut tags = Vec::new();
        while let Some(frame) = self
            .decoder
            .decode(&mut written)
            .expect("the broker's frames")
        {
            self.seen(&frame, &mut tags);
        }
        tags
    }

    fn seen(&mut self, frame: &InFrame, tags: &mut Vec<u64>) {
        let f = frame.frame();
        if let Some(c) = f.body_as_confirm() {
            assert_eq!(c.durability(), Durability::Always);
            for r in c.ranges().iter() {
                self.confirmed += r.last() - r.first() + 1;
            }
        } else if let Some(d) = f.body_as_deliver() {
            for (delivery, message) in frame.deliveries() {
                assert_eq!(
                    message, self.message,
                    "the message's bytes travel unchanged"
                );
                tags.push(delivery.delivery_tag());
                self.delivered += 1;
            }
            assert_eq!(d.consumer_tag(), Some("c"));
        } else if let Some(e) = f.body_as_error() {
            panic!("the broker refused: {:?}", e.message());
        }
    }

    /// One ack per delivery, unasked for an answer (request id 0).
    #[inline(never)]
    fn ack(&mut self, rx: &mut BytesMut, tag: u64) {
        self.encoder
            .ack(rx, 0, &[Range::new(tag, tag)])
            .expect("an ack encodes");
    }
}

// ---- the run ----

struct Run {
    shard: Shard,
    client: Client,
    conn: u64,
    broker_allocs: u64,
    acked: u64,
}

impl Run {
    fn new() -> Run {
        let limits = Limits::DEFAULT;
        let shard = Shard::open(limits, Durability::Always);
        let conn = 1;
        shard.accept(conn);
        let mut run = Run {
            shard,
            client: Client::new(limits),
            conn,
            broker_allocs: 0,
            acked: 0,
        };
        let mut hello = wire::HelloT::default();
        hello.protocol_version = weir_protocol::PROTOCOL_VERSION;
        run.control(1, BodyT::Hello(Box::new(hello)));
        let mut declare = wire::DeclareQueueT::default();
        declare.name = Some(QUEUE.into());
        declare.durable = true;
        run.control(2, BodyT::DeclareQueue(Box::new(declare)));
        let mut consume = wire::ConsumeT::default();
        consume.queue = QUEUE.into();
        consume.consumer_tag = Some("c".into());
        consume.prefetch = 1000;
        run.control(3, BodyT::Consume(Box::new(consume)));
        run
    }

    /// Sends a control frame and expects its answer (no error).
    fn control(&mut self, request_id: u64, body: BodyT) {
        let entry = self.shard.conn(self.conn);
        self.client
            .frame(&mut entry.rx.borrow_mut(), request_id, body);
        let mut written = self.shard.broker_turn(self.conn, &entry);
        let frame = self
            .client
            .decoder
            .decode(&mut written)
            .expect("a frame")
            .expect("an answer");
        assert_eq!(frame.request_id(), request_id);
        if let Some(e) = frame.frame().body_as_error() {
            panic!("refused: {:?}", e.message());
        }
    }

    fn turn(&mut self, entry: &Conn) -> BytesMut {
        let before = ALLOCS.load(Ordering::Relaxed);
        let written = self.shard.broker_turn(self.conn, entry);
        self.broker_allocs += ALLOCS.load(Ordering::Relaxed) - before;
        written
    }

    /// `window` messages, each its own publish frame, arriving together (a producer with that
    /// many unconfirmed): published, confirmed, delivered; then each delivery acked in its own
    /// frame, the acks arriving together. A window of 1 is one message at a time.
    fn messages(&mut self, window: u64) {
        let entry = self.shard.conn(self.conn);
        for _ in 0..window {
            self.client.publish(&mut entry.rx.borrow_mut());
        }
        let written = self.turn(&entry);
        let tags = self.client.read(written);
        assert_eq!(
            tags.len() as u64,
            window,
            "each message is delivered once, after its commit"
        );
        for tag in tags {
            self.client.ack(&mut entry.rx.borrow_mut(), tag);
        }
        let written = self.turn(&entry);
        self.acked += window;
        assert!(
            self.client.read(written).is_empty(),
            "an unasked ack is not answered"
        );
    }

    /// What the shard says of the queue: (ready, unacked).
    fn queue_counts(&self) -> (u64, u64) {
        let me = ConnRef {
            shard: 0,
            conn: self.conn,
        };
        let info = self
            .shard
            .host
            .borrow_mut()
            .info(me, QUEUE, now_ms())
            .expect("the queue exists");
        (info.messages_ready, info.messages_unacked)
    }
}

/// Messages in flight together (`WEIR_BENCH_WINDOW`, default 1: one at a time).
fn window() -> u64 {
    std::env::var("WEIR_BENCH_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|&w| w > 0)
        .unwrap_or(1)
}

fn messages_to_run() -> u64 {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .or_else(|| std::env::var("WEIR_BENCH_MESSAGES").ok()?.parse().ok())
        .unwrap_or(DEFAULT_MESSAGES)
}

fn main() {
    let n = messages_to_run();
    let window = window();
    assert!(
        n.is_multiple_of(window) && WARM_UP.is_multiple_of(window),
        "WEIR_BENCH_WINDOW must divide {WARM_UP} and the message count"
    );
    let mut run = Run::new();
    for _ in 0..WARM_UP / window {
        run.messages(window);
    }
    let allocs_before = run.broker_allocs;
    let start = Instant::now();
    for _ in 0..n / window {
        run.messages(window);
    }
    let elapsed = start.elapsed();
    let allocs = run.broker_allocs - allocs_before;

    let total = WARM_UP + n;
    assert_eq!(run.client.sequence, total);
    assert_eq!(run.client.confirmed, total, "every publish confirmed");
    assert_eq!(run.client.delivered, total, "every message delivered once");
    assert_eq!(run.acked, total);
    assert_eq!(
        run.queue_counts(),
        (0, 0),
        "the queue is empty: every ack applied"
    );
    let stats = run.shard.journal.stats();
    // The queue's declaration, then a message record and a settle record per message.
    assert_eq!(stats.records, 1 + 2 * total, "{stats:?}");
    assert!(run.shard.held.borrow().is_empty());

    let per = |x: f64| x / n as f64;
    println!(
        "per_message: {n} messages of {BODY_BYTES} B (after {WARM_UP} of warm-up), one shard, \
         fsync = always, one publish + one ack frame each, {window} at a time: {:.0} ns/message, \
         {:.1} broker heap allocations/message, {:.2} commits/message",
        per(elapsed.as_nanos() as f64),
        per(allocs as f64),
        stats.commits as f64 / total as f64,
    );
}
