//! The routing table: exchanges, their bindings, and the queues a routing key reaches.
//!
//! Contract: plain data without I/O, owned by one thread. Two owners hold one: the control-plane
//! writer (shard 0), whose table is authoritative and validates every change, and every shard's
//! copy, which that shard's publishes are routed by without a hop and which changes only by
//! `apply`ing the writer's `RoutingChange`s in the writer's order. Both run this same code, so a
//! copy reaches exactly the writer's state: nothing here depends on a hash map's iteration order,
//! and an auto-delete exchange goes inside the change that removed its last binding, on every
//! copy alike. The table owns exchange declarations and bindings, not queues: whether a queue
//! exists, and where, is the caller's to know; `remove_queue` is how a queue's deletion arrives.
//!
//! Faults handled: every refused change is a `RoutingError` (the schema's error code and a
//! sentence naming the exchange) and changes nothing. The default exchange `""` is not in the
//! table (the broker routes it by queue name), so declaring, deleting or binding it is refused;
//! so is declaring a name under the reserved prefix `weir.`, and a binding that names no queue;
//! a redeclare with other properties names each difference.
//!
//! Matching: direct is one hash lookup of the routing key, fanout one list, topic a trie over
//! words walked as a set of live nodes per word (each node at most once per word), so its cost is
//! key words × live nodes whatever the patterns, never exponential in their `#`s. `route` is the
//! publish path: its working sets live in a thread-local scratch sized by the largest table the
//! thread routed through, so a route allocates nothing and the table stays `Send + Sync` (it
//! crosses threads as a start-up snapshot).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use weir_protocol::wire::{self, ErrorCode};

/// Names under this prefix belong to the broker.
pub const RESERVED_PREFIX: &str = "weir.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// The binding key equals the routing key.
    Direct,
    /// `.`-separated words; in a binding key `*` is one word, `#` zero or more.
    Topic,
    /// Every bound queue; keys are ignored.
    Fanout,
}

impl ExchangeKind {
    /// `None` for a value this broker version does not know.
    pub fn from_wire(k: wire::ExchangeKind) -> Option<ExchangeKind> {
        match k {
            wire::ExchangeKind::Direct => Some(ExchangeKind::Direct),
            wire::ExchangeKind::Topic => Some(ExchangeKind::Topic),
            wire::ExchangeKind::Fanout => Some(ExchangeKind::Fanout),
            _ => None,
        }
    }

    pub fn to_wire(self) -> wire::ExchangeKind {
        match self {
            ExchangeKind::Direct => wire::ExchangeKind::Direct,
            ExchangeKind::Topic => wire::ExchangeKind::Topic,
            ExchangeKind::Fanout => wire::ExchangeKind::Fanout,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
        }
    }
}

/// An exchange's declared properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    /// Deleted when its last binding goes (never merely for having none yet).
    pub auto_delete: bool,
}

/// A binding: (exchange, queue, binding key) is its identity. `durable` (its exchange and its
/// queue are both durable) is decided by the caller and stored with it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
    pub durable: bool,
}

/// A refused change or route: the schema's code (`NotFound`, `PreconditionFailed`,
/// `AccessRefused`, `InvalidArgument`) and a sentence for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingError {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for RoutingError {}

fn refuse<T>(code: ErrorCode, message: String) -> Result<T, RoutingError> {
    Err(RoutingError { code, message })
}

fn not_found(exchange: &str) -> RoutingError {
    RoutingError {
        code: ErrorCode::NotFound,
        message: format!("exchange '{exchange}' not found"),
    }
}

/// The default exchange routes by queue name in the broker itself; it has no table entry that a
/// client could change.
fn refuse_default(name: &str, what: &str) -> Result<(), RoutingError> {
    if name.is_empty() {
        return refuse(
            ErrorCode::AccessRefused,
            format!("the default exchange cannot be {what}"),
        );
    }
    Ok(())
}

/// One change to the table. The control-plane writer validates and applies a change to its
/// authoritative table, then sends the same change to every shard's copy, which applies it with
/// `apply` and reaches the same state.
#[derive(Clone, Debug)]
pub enum RoutingChange {
    DeclareExchange(ExchangeDecl),
    DeleteExchange(String),
    Bind(Binding),
    /// `durable` is ignored.
    Unbind(Binding),
    /// A queue was deleted: all its bindings go.
    RemoveQueue(String),
    /// Replace the whole table (a shard's copy at start-up).
    Snapshot(Box<RoutingTable>),
}

/// What `unbind`, `remove_queue` or `delete_exchange` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// With their stored `durable` flag, so the writer knows which removals to journal.
    pub bindings: Vec<Binding>,
    /// Deleted, or auto-deleted with their last binding.
    pub exchanges: Vec<String>,
}

/// A queue's index in `Queues::slots`: the matchers hold these, not names, so a route returns a
/// borrowed name and a topic route dedupes with a stamp per id.
type QueueId = u32;

/// No node / no child.
const NONE: u32 = u32::MAX;

/// Every exchange with its bindings.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    exchanges: HashMap<String, Exchange, Seeded>,
    queues: Queues,
    binding_count: usize,
}

#[derive(Clone, Debug)]
struct Exchange {
    decl: ExchangeDecl,
    /// Queue → binding key → durable. Ordered, so listings need no sort and removal order (and
    /// with it every copy's state) is the same everywhere.
    bindings: BTreeMap<Arc<str>, QueueBindings>,
    binding_count: usize,
    matcher: Matcher,
}

#[derive(Clone, Debug)]
struct QueueBindings {
    id: QueueId,
    keys: BTreeMap<String, bool>,
}

/// The queues bound anywhere, interned. A slot lives while some exchange binds its queue, so the
/// table holds no more slots than bound queues (plus freed ones awaiting reuse).
#[derive(Clone, Debug, Default)]
struct Queues {
    ids: HashMap<Arc<str>, QueueId>,
    slots: Vec<QueueSlot>,
    free: Vec<QueueId>,
}

#[derive(Clone, Debug)]
struct QueueSlot {
    name: Arc<str>,
    /// The exchanges with at least one binding to this queue: `remove_queue` visits only these.
    exchanges: BTreeSet<String>,
}

impl Queues {
    /// The queue's id, creating its slot if needed, and records that `exchange` binds it.
    fn bind(&mut self, queue: &str, exchange: &str) -> (QueueId, Arc<str>) {
        let id = match self.ids.get(queue) {
            Some(&id) => id,
            None => {
                let name: Arc<str> = Arc::from(queue);
                let slot = QueueSlot {
                    name: name.clone(),
                    exchanges: BTreeSet::new(),
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.slots[id as usize] = slot;
                        id
                    }
                    None => {
                        self.slots.push(slot);
                        (self.slots.len() - 1) as QueueId
                    }
                };
                self.ids.insert(name, id);
                id
            }
        };
        let slot = &mut self.slots[id as usize];
        if !slot.exchanges.contains(exchange) {
            slot.exchanges.insert(exchange.to_owned());
        }
        (id, slot.name.clone())
    }

    /// `exchange` no longer binds the queue; its slot goes with its last exchange.
    fn unbind(&mut self, id: QueueId, exchange: &str) {
        let slot = &mut self.slots[id as usize];
        slot.exchanges.remove(exchange);
        if slot.exchanges.is_empty() {
            self.release(id);
        }
    }

    fn release(&mut self, id: QueueId) {
        let slot = &mut self.slots[id as usize];
        self.ids.remove(&*slot.name);
        slot.name = Arc::from("");
        slot.exchanges = BTreeSet::new();
        self.free.push(id);
    }

    fn name(&self, id: QueueId) -> &str {
        &self.slots[id as usize].name
    }
}

#[derive(Clone, Debug)]
enum Matcher {
    /// Binding key → the queues bound with it (each once: a binding's identity includes its key).
    Direct(HashMap<Box<str>, DirectQueues, Seeded>),
    Topic(TopicTrie),
    /// Each bound queue once, however many keys bind it.
    Fanout(Vec<QueueId>),
}

/// A direct binding key's queues. Most keys bind one queue: it is held inline, sparing a route
/// one cache miss.
#[derive(Clone, Debug)]
struct DirectQueues {
    first: QueueId,
    more: Vec<QueueId>,
}

impl Matcher {
    fn new(kind: ExchangeKind) -> Matcher {
        match kind {
            ExchangeKind::Direct => Matcher::Direct(HashMap::default()),
            ExchangeKind::Topic => Matcher::Topic(TopicTrie::new()),
            ExchangeKind::Fanout => Matcher::Fanout(Vec::new()),
        }
    }

    /// `first`: the queue had no binding from this exchange before.
    fn add(&mut self, key: &str, queue: QueueId, first: bool) {
        match self {
            Matcher::Direct(by_key) => match by_key.get_mut(key) {
                Some(queues) => queues.more.push(queue),
                None => {
                    let queues = DirectQueues {
                        first: queue,
                        more: Vec::new(),
                    };
                    by_key.insert(key.into(), queues);
                }
            },
            Matcher::Topic(trie) => trie.insert(key, queue),
            Matcher::Fanout(queues) => {
                if first {
                    queues.push(queue);
                }
            }
        }
    }

    /// `last`: the queue has no binding from this exchange left.
    fn remove(&mut self, key: &str, queue: QueueId, last: bool) {
        match self {
            Matcher::Direct(by_key) => {
                if let Some(queues) = by_key.get_mut(key) {
                    if queues.first != queue {
                        if let Some(i) = queues.more.iter().position(|&q| q == queue) {
                            queues.more.remove(i);
                        }
                    } else if queues.more.is_empty() {
                        by_key.remove(key);
                    } else {
                        queues.first = queues.more.remove(0);
                    }
                }
            }
            Matcher::Topic(trie) => trie.remove(key, queue),
            Matcher::Fanout(queues) => {
                if last {
                    if let Some(i) = queues.iter().position(|&q| q == queue) {
                        queues.remove(i);
                    }
                }
            }
        }
    }
}

/// RabbitMQ's split of a topic routing key or binding key into words: the empty string is no
/// words at all; anything else splits on every `.`, so empty words count (`"a..b"` is three).
pub fn topic_words(s: &str) -> impl Iterator<Item = &str> + Clone {
    (!s.is_empty()).then(|| s.split('.')).into_iter().flatten()
}

/// The reference topic matcher: a direct reading of the rules, recursive over word slices and
/// exponential in the worst case. Tests and the benchmark check the trie against it.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| matches(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && matches(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && matches(rest, &key[1..]),
        }
    }
    let pattern: Vec<&str> = topic_words(pattern).collect();
    let key: Vec<&str> = topic_words(routing_key).collect();
    matches(&pattern, &key)
}

/// How a trie node is reached from its parent: a literal word's id, or one of these.
const VIA_STAR: u32 = u32::MAX - 1;
const VIA_HASH: u32 = u32::MAX - 2;
const VIA_ROOT: u32 = u32::MAX - 3;
/// Word ids stay below the `VIA_*` values.
const WORD_ID_MAX: u32 = u32::MAX - 4;

/// 28 bytes, so a walk that misses the cache on every node it enters fetches little: the rare
/// second and later queues of a node live in `TopicTrie::more`.
#[derive(Clone, Debug)]
struct Node {
    parent: u32,
    via: u32,
    star: u32,
    hash: u32,
    /// Literal children, found through `TopicTrie::edges`; counted so an empty node can go.
    words: u32,
    /// How many bindings end here; the first one's queue is `queue`, the others in `more`. A
    /// queue may be counted more than once (`#.#` and `#` end on the same node); the route
    /// dedupes.
    queues: u32,
    queue: QueueId,
}

impl Node {
    fn new(parent: u32, via: u32) -> Node {
        Node {
            parent,
            via,
            star: NONE,
            hash: NONE,
            words: 0,
            queues: 0,
            queue: NONE,
        }
    }

    fn is_empty(&self) -> bool {
        self.queues == 0 && self.star == NONE && self.hash == NONE && self.words == 0
    }
}

/// Topic bindings as a trie over words. Binding-key words are interned once per trie, so a
/// route hashes each routing-key word once, and each literal step is one lookup of a
/// (node, word id) pair in a single map rather than a string hash per live node.
#[derive(Clone, Debug)]
struct TopicTrie {
    /// Node 0 is the root: the binding key `""` (no words) ends there.
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    /// (parent << 32 | word id) → child.
    edges: HashMap<u64, u32, Seeded>,
    words: HashMap<Arc<str>, u32, Seeded>,
    /// Word id → (the word, how many edges use it).
    word_of: Vec<(Arc<str>, u32)>,
    free_words: Vec<u32>,
    /// Node → its second and later queues.
    more: HashMap<u32, Vec<QueueId>, Seeded>,
}

const ROOT: u32 = 0;

fn edge(node: u32, word: u32) -> u64 {
    (u64::from(node) << 32) | u64::from(word)
}

/// Calls `f` with each word of a topic key: `topic_words` unrolled by hand, as this runs once
/// per routed message.
#[inline]
fn for_each_word(key: &str, mut f: impl FnMut(&str) -> bool) {
    if key.is_empty() {
        return;
    }
    let mut rest = key;
    loop {
        match rest.bytes().position(|b| b == b'.') {
            Some(dot) => {
                if !f(&rest[..dot]) {
                    return;
                }
                rest = &rest[dot + 1..];
            }
            None => {
                f(rest);
                return;
            }
        }
    }
}

impl TopicTrie {
    fn new() -> TopicTrie {
        TopicTrie {
            nodes: vec![Node::new(NONE, VIA_ROOT)],
            free_nodes: Vec::new(),
            edges: HashMap::default(),
            words: HashMap::default(),
            word_of: Vec::new(),
            free_words: Vec::new(),
            more: HashMap::default(),
        }
    }

    fn new_node(&mut self, parent: u32, via: u32) -> u32 {
        let node = Node::new(parent, via);
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn intern(&mut self, word: &str) -> u32 {
        if let Some(&id) = self.words.get(word) {
            return id;
        }
        let word: Arc<str> = Arc::from(word);
        let id = match self.free_words.pop() {
            Some(id) => {
                self.word_of[id as usize] = (word.clone(), 0);
                id
            }
            None => {
                self.word_of.push((word.clone(), 0));
                (self.word_of.len() - 1) as u32
            }
        };
        assert!(id <= WORD_ID_MAX, "more distinct topic words than u32 ids");
        self.words.insert(word, id);
        id
    }

    /// The binding key's path: consecutive `#`s are one `#` (zero-or-more twice is
    /// zero-or-more), which keeps the walk from revisiting a node through equivalent splits.
    fn path(key: &str) -> impl Iterator<Item = &str> {
        let mut previous_hash = false;
        topic_words(key).filter(move |&w| {
            let repeat = previous_hash && w == "#";
            previous_hash = w == "#";
            !repeat
        })
    }

    fn insert(&mut self, key: &str, queue: QueueId) {
        let mut node = ROOT;
        for w in Self::path(key) {
            node = match w {
                "#" => match self.nodes[node as usize].hash {
                    NONE => {
                        let child = self.new_node(node, VIA_HASH);
                        self.nodes[node as usize].hash = child;
                        child
                    }
                    child => child,
                },
                "*" => match self.nodes[node as usize].star {
                    NONE => {
                        let child = self.new_node(node, VIA_STAR);
                        self.nodes[node as usize].star = child;
                        child
                    }
                    child => child,
                },
                w => {
                    let word = self.intern(w);
                    match self.edges.get(&edge(node, word)) {
                        Some(&child) => child,
                        None => {
                            let child = self.new_node(node, word);
                            self.edges.insert(edge(node, word), child);
                            self.word_of[word as usize].1 += 1;
                            self.nodes[node as usize].words += 1;
                            child
                        }
                    }
                }
            };
        }
        let n = &mut self.nodes[node as usize];
        if n.queues == 0 {
            n.queue = queue;
        } else {
            self.more.entry(node).or_default().push(queue);
        }
        n.queues += 1;
    }

    /// Removes one binding of `queue` with `key` (it exists), then every node left useless.
    fn remove(&mut self, key: &str, queue: QueueId) {
        let mut node = ROOT;
        for w in Self::path(key) {
            let n = &self.nodes[node as usize];
            node = match w {
                "#" => n.hash,
                "*" => n.star,
                w => self
                    .words
                    .get(w)
                    .and_then(|&word| self.edges.get(&edge(node, word)).copied())
                    .unwrap_or(NONE),
            };
            if node == NONE {
                debug_assert!(false, "topic binding '{key}' is not in the trie");
                return;
            }
        }
        let n = &mut self.nodes[node as usize];
        if n.queues > 1 {
            let more = self.more.get_mut(&node).expect("a node's later queues");
            if n.queue == queue {
                n.queue = more.remove(0);
            } else if let Some(i) = more.iter().position(|&q| q == queue) {
                more.remove(i);
            } else {
                debug_assert!(false, "queue {queue} does not end at node {node}");
                return;
            }
            if more.is_empty() {
                self.more.remove(&node);
            }
        } else if n.queues == 1 && n.queue == queue {
            n.queue = NONE;
        } else {
            debug_assert!(false, "queue {queue} does not end at node {node}");
            return;
        }
        n.queues -= 1;
        while node != ROOT && self.nodes[node as usize].is_empty() {
            let Node { parent, via, .. } = self.nodes[node as usize];
            let p = &mut self.nodes[parent as usize];
            match via {
                VIA_HASH => p.hash = NONE,
                VIA_STAR => p.star = NONE,
                VIA_ROOT => unreachable!("only the root is reached from nowhere"),
                word => {
                    p.words -= 1;
                    self.edges.remove(&edge(parent, word));
                    let uses = &mut self.word_of[word as usize];
                    uses.1 -= 1;
                    if uses.1 == 0 {
                        self.words.remove(&*uses.0);
                        uses.0 = Arc::from("");
                        self.free_words.push(word);
                    }
                }
            }
            self.nodes[node as usize] = Node::new(NONE, VIA_ROOT);
            self.free_nodes.push(node);
            node = parent;
        }
    }

    /// Calls `out` with the id of each queue `key` reaches, once.
    fn route(&self, key: &str, queue_count: usize, mut out: impl FnMut(QueueId)) {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let Scratch {
                stamp,
                node_seen,
                queue_seen,
                live,
                next,
            } = &mut *scratch;
            if node_seen.len() < self.nodes.len() {
                node_seen.resize(self.nodes.len(), 0);
            }
            if queue_seen.len() < queue_count {
                queue_seen.resize(queue_count, 0);
            }
            let nodes = &self.nodes;
            // Adds a node reached at this word, and the `#` below it (which may match nothing).
            let enter = |node: u32, set: &mut Vec<u32>, seen: &mut [u32], s: u32| {
                if seen[node as usize] != s {
                    seen[node as usize] = s;
                    set.push(node);
                    let hash = nodes[node as usize].hash;
                    if hash != NONE && seen[hash as usize] != s {
                        seen[hash as usize] = s;
                        set.push(hash);
                    }
                }
            };
            live.clear();
            let s = next_stamp(stamp, node_seen, queue_seen);
            enter(ROOT, live, node_seen, s);
            for_each_word(key, |w| {
                let word = self.words.get(w).copied();
                let s = next_stamp(stamp, node_seen, queue_seen);
                next.clear();
                for &node in live.iter() {
                    let n = &nodes[node as usize];
                    if n.via == VIA_HASH {
                        enter(node, next, node_seen, s);
                    }
                    // Most nodes have no literal child: skip a lookup that would miss.
                    if let Some(word) = word.filter(|_| n.words > 0) {
                        if let Some(&child) = self.edges.get(&edge(node, word)) {
                            enter(child, next, node_seen, s);
                        }
                    }
                    if n.star != NONE {
                        enter(n.star, next, node_seen, s);
                    }
                }
                std::mem::swap(live, next);
                !live.is_empty()
            });
            let s = next_stamp(stamp, node_seen, queue_seen);
            let mut emit = |q: QueueId| {
                if queue_seen[q as usize] != s {
                    queue_seen[q as usize] = s;
                    out(q);
                }
            };
            for &node in live.iter() {
                let n = &nodes[node as usize];
                if n.queues > 0 {
                    emit(n.queue);
                    if n.queues > 1 {
                        self.more[&node].iter().for_each(|&q| emit(q));
                    }
                }
            }
        })
    }
}

/// A topic route's working memory. Stamps mark what the current word (or the final dedupe)
/// has seen: bumping the stamp clears every mark at once.
struct Scratch {
    stamp: u32,
    node_seen: Vec<u32>,
    queue_seen: Vec<u32>,
    live: Vec<u32>,
    next: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            stamp: 0,
            node_seen: Vec::new(),
            queue_seen: Vec::new(),
            live: Vec::new(),
            next: Vec::new(),
        })
    };
}

fn next_stamp(stamp: &mut u32, node_seen: &mut [u32], queue_seen: &mut [u32]) -> u32 {
    *stamp = stamp.wrapping_add(1);
    if *stamp == 0 {
        // After 2^32 stamps an old mark could equal a new stamp: forget them all.
        node_seen.fill(0);
        queue_seen.fill(0);
        *stamp = 1;
    }
    *stamp
}

/// The hash of the maps a route reads (exchange names, direct binding keys, topic words and
/// edges): a seeded finalizer over 8-byte chunks, several times cheaper than the standard
/// SipHash on short keys. The keys are clients' strings, so the seed is random per table (and
/// kept by its clones): without it nobody can aim keys at one bucket.
#[derive(Clone, Debug)]
struct Seeded {
    seed: u64,
}

impl Default for Seeded {
    fn default() -> Self {
        Seeded {
            seed: RandomState::new().hash_one(0x7765_6972_u64),
        }
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher { state: self.seed }
    }
}

struct SeededHasher {
    state: u64,
}

impl SeededHasher {
    #[inline]
    fn mix(&mut self, x: u64) {
        // MurmurHash3's fmix64: a bijection in which every input bit flips about half the output.
        let mut h = self.state ^ x;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        self.state = h;
    }
}

impl Hasher for SeededHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            // The tail's length in the byte it leaves free: "ab" and "ab\0" differ.
            let mut last = [0u8; 8];
            last[..tail.len()].copy_from_slice(tail);
            last[7] = tail.len() as u8;
            self.mix(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, x: u8) {
        self.write(&[x]);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.mix(u64::from(x));
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.mix(x as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// How an existing exchange differs from a declare, in words.
fn describe(d: &ExchangeDecl) -> String {
    format!(
        "{} {}{} exchange",
        if d.durable { "durable" } else { "transient" },
        if d.auto_delete { "auto-delete " } else { "" },
        d.kind.name()
    )
}

fn differences(existing: &ExchangeDecl, asked: &ExchangeDecl) -> Vec<&'static str> {
    let mut asks = Vec::new();
    if existing.kind != asked.kind {
        asks.push(asked.kind.name());
    }
    if existing.durable != asked.durable {
        asks.push(if asked.durable {
            "durable"
        } else {
            "transient"
        });
    }
    if existing.auto_delete != asked.auto_delete {
        asks.push(if asked.auto_delete {
            "auto-delete"
        } else {
            "no auto-delete"
        });
    }
    asks
}

impl RoutingTable {
    pub fn new() -> RoutingTable {
        RoutingTable::default()
    }

    /// Creates an exchange (`Ok(true)`), or checks that an identical one exists (`Ok(false)`).
    pub fn declare_exchange(&mut self, decl: ExchangeDecl) -> Result<bool, RoutingError> {
        refuse_default(&decl.name, "declared")?;
        if let Some(existing) = self.exchanges.get(&decl.name) {
            let asks = differences(&existing.decl, &decl);
            if asks.is_empty() {
                return Ok(false);
            }
            return refuse(
                ErrorCode::PreconditionFailed,
                format!(
                    "exchange '{}' exists as a {}; this declare asks for {}",
                    decl.name,
                    describe(&existing.decl),
                    asks.join(", ")
                ),
            );
        }
        if decl.name.starts_with(RESERVED_PREFIX) {
            return refuse(
                ErrorCode::AccessRefused,
                format!(
                    "exchange '{}': names starting with '{RESERVED_PREFIX}' are reserved for the broker",
                    decl.name
                ),
            );
        }
        let exchange = Exchange {
            matcher: Matcher::new(decl.kind),
            decl,
            bindings: BTreeMap::new(),
            binding_count: 0,
        };
        self.exchanges.insert(exchange.decl.name.clone(), exchange);
        Ok(true)
    }

    /// The exchange's declaration, if it exists (a passive declare).
    pub fn exchange(&self, name: &str) -> Option<&ExchangeDecl> {
        self.exchanges.get(name).map(|e| &e.decl)
    }

    /// Deletes an exchange and its bindings; `if_unused` refuses while it has any.
    pub fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
    ) -> Result<Removed, RoutingError> {
        refuse_default(name, "deleted")?;
        let exchange = self.exchanges.get(name).ok_or_else(|| not_found(name))?;
        if if_unused && exchange.binding_count > 0 {
            let n = exchange.binding_count;
            return refuse(
                ErrorCode::PreconditionFailed,
                format!(
                    "exchange '{name}' has {n} binding{}",
                    if n == 1 { "" } else { "s" }
                ),
            );
        }
        let exchange = self.exchanges.remove(name).expect("looked up above");
        let mut removed = Removed::default();
        for (queue, qb) in &exchange.bindings {
            for (key, &durable) in &qb.keys {
                removed.bindings.push(Binding {
                    exchange: name.to_owned(),
                    queue: queue.to_string(),
                    key: key.clone(),
                    durable,
                });
            }
            self.queues.unbind(qb.id, name);
        }
        self.binding_count -= exchange.binding_count;
        removed.exchanges.push(name.to_owned());
        Ok(removed)
    }

    /// Adds a binding: `Ok(true)` if new, `Ok(false)` if it existed (its `durable` is updated).
    pub fn bind(&mut self, binding: Binding) -> Result<bool, RoutingError> {
        refuse_default(&binding.exchange, "bound")?;
        if binding.queue.is_empty() {
            return refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "a binding to exchange '{}' must name a queue",
                    binding.exchange
                ),
            );
        }
        let exchange = self
            .exchanges
            .get_mut(&binding.exchange)
            .ok_or_else(|| not_found(&binding.exchange))?;
        let first = match exchange.bindings.get_mut(binding.queue.as_str()) {
            Some(qb) => {
                if let Some(durable) = qb.keys.get_mut(&binding.key) {
                    *durable = binding.durable;
                    return Ok(false);
                }
                qb.keys.insert(binding.key.clone(), binding.durable);
                exchange.matcher.add(&binding.key, qb.id, false);
                false
            }
            None => true,
        };
        if first {
            let (id, name) = self.queues.bind(&binding.queue, &binding.exchange);
            let keys = BTreeMap::from([(binding.key.clone(), binding.durable)]);
            exchange.bindings.insert(name, QueueBindings { id, keys });
            exchange.matcher.add(&binding.key, id, true);
        }
        exchange.binding_count += 1;
        self.binding_count += 1;
        Ok(true)
    }

    /// Removes a binding; one that does not exist is not an error (nothing is removed).
    pub fn unbind(&mut self, binding: &Binding) -> Result<Removed, RoutingError> {
        refuse_default(&binding.exchange, "unbound")?;
        let exchange = self
            .exchanges
            .get_mut(&binding.exchange)
            .ok_or_else(|| not_found(&binding.exchange))?;
        let mut removed = Removed::default();
        let Some(qb) = exchange.bindings.get_mut(binding.queue.as_str()) else {
            return Ok(removed);
        };
        let Some(durable) = qb.keys.remove(&binding.key) else {
            return Ok(removed);
        };
        let id = qb.id;
        let last = qb.keys.is_empty();
        if last {
            exchange.bindings.remove(binding.queue.as_str());
            self.queues.unbind(id, &binding.exchange);
        }
        exchange.matcher.remove(&binding.key, id, last);
        exchange.binding_count -= 1;
        self.binding_count -= 1;
        removed.bindings.push(Binding {
            durable,
            ..binding.clone()
        });
        self.auto_delete(&binding.exchange, &mut removed);
        Ok(removed)
    }

    /// An auto-delete exchange goes when its last binding does.
    fn auto_delete(&mut self, name: &str, removed: &mut Removed) {
        if self
            .exchanges
            .get(name)
            .is_some_and(|e| e.decl.auto_delete && e.binding_count == 0)
        {
            self.exchanges.remove(name);
            removed.exchanges.push(name.to_owned());
        }
    }

    /// Removes every binding to `queue` (it was deleted), auto-deleting exchanges as `unbind`.
    pub fn remove_queue(&mut self, queue: &str) -> Removed {
        let mut removed = Removed::default();
        let Some(&id) = self.queues.ids.get(queue) else {
            return removed;
        };
        let exchanges = std::mem::take(&mut self.queues.slots[id as usize].exchanges);
        for name in &exchanges {
            let exchange = self
                .exchanges
                .get_mut(name)
                .expect("a queue's exchanges exist");
            let qb = exchange
                .bindings
                .remove(queue)
                .expect("a queue's exchanges bind it");
            let n = qb.keys.len();
            for (i, (key, durable)) in qb.keys.into_iter().enumerate() {
                exchange.matcher.remove(&key, id, i + 1 == n);
                removed.bindings.push(Binding {
                    exchange: name.clone(),
                    queue: queue.to_owned(),
                    key,
                    durable,
                });
            }
            exchange.binding_count -= n;
            self.binding_count -= n;
            self.auto_delete(name, &mut removed);
        }
        self.queues.release(id);
        removed
    }

    /// Applies a change the writer has already validated and applied, with the same result.
    pub fn apply(&mut self, change: RoutingChange) -> Result<Removed, RoutingError> {
        match change {
            RoutingChange::DeclareExchange(decl) => {
                self.declare_exchange(decl)?;
                Ok(Removed::default())
            }
            RoutingChange::DeleteExchange(name) => self.delete_exchange(&name, false),
            RoutingChange::Bind(binding) => {
                self.bind(binding)?;
                Ok(Removed::default())
            }
            RoutingChange::Unbind(binding) => self.unbind(&binding),
            RoutingChange::RemoveQueue(queue) => Ok(self.remove_queue(&queue)),
            RoutingChange::Snapshot(table) => {
                *self = *table;
                Ok(Removed::default())
            }
        }
    }

    /// Appends the queues `routing_key` reaches through `exchange` to `out`, each once, in an
    /// order that depends only on the changes the table has seen.
    pub fn route<'a>(
        &'a self,
        exchange: &str,
        routing_key: &str,
        out: &mut Vec<&'a str>,
    ) -> Result<(), RoutingError> {
        let exchange = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| not_found(exchange))?;
        let queues = &self.queues;
        match &exchange.matcher {
            Matcher::Direct(by_key) => {
                if let Some(ids) = by_key.get(routing_key) {
                    out.push(queues.name(ids.first));
                    out.extend(ids.more.iter().map(|&q| queues.name(q)));
                }
            }
            Matcher::Fanout(ids) => out.extend(ids.iter().map(|&q| queues.name(q))),
            Matcher::Topic(trie) => trie.route(routing_key, queues.slots.len(), |q| {
                out.push(queues.name(q))
            }),
        }
        Ok(())
    }

    /// Every exchange in name order, with its binding count.
    pub fn exchanges(&self) -> Vec<(&ExchangeDecl, usize)> {
        let mut all: Vec<_> = self
            .exchanges
            .values()
            .map(|e| (&e.decl, e.binding_count))
            .collect();
        all.sort_unstable_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// Bindings, optionally only from one exchange and/or to one queue, sorted by (exchange,
    /// queue, key).
    pub fn bindings(&self, exchange: Option<&str>, queue: Option<&str>) -> Vec<Binding> {
        let mut out = Vec::new();
        let mut from = |name: &str, e: &Exchange| {
            let mut push = |q: &str, qb: &QueueBindings| {
                for (key, &durable) in &qb.keys {
                    out.push(Binding {
                        exchange: name.to_owned(),
                        queue: q.to_owned(),
                        key: key.clone(),
                        durable,
                    });
                }
            };
            match queue {
                Some(q) => {
                    if let Some(qb) = e.bindings.get(q) {
                        push(q, qb);
                    }
                }
                None => e.bindings.iter().for_each(|(q, qb)| push(q, qb)),
            }
        };
        match (exchange, queue) {
            (Some(name), _) => {
                if let Some(e) = self.exchanges.get(name) {
                    from(name, e);
                }
            }
            (None, Some(q)) => {
                if let Some(&id) = self.queues.ids.get(q) {
                    for name in &self.queues.slots[id as usize].exchanges {
                        from(name, &self.exchanges[name]);
                    }
                }
            }
            (None, None) => {
                let mut names: Vec<&String> = self.exchanges.keys().collect();
                names.sort_unstable();
                for name in names {
                    from(name, &self.exchanges[name]);
                }
            }
        }
        out
    }

    /// Whether any binding names `queue`.
    pub fn has_bindings_to(&self, queue: &str) -> bool {
        self.queues.ids.contains_key(queue)
    }

    /// What must survive a restart: the durable exchanges in name order, and the durable
    /// bindings (a binding flagged durable on a transient exchange could not be restored, so
    /// it is left out too).
    pub fn durable_state(&self) -> (Vec<ExchangeDecl>, Vec<Binding>) {
        let mut names: Vec<&String> = self
            .exchanges
            .iter()
            .filter(|(_, e)| e.decl.durable)
            .map(|(name, _)| name)
            .collect();
        names.sort_unstable();
        let mut exchanges = Vec::with_capacity(names.len());
        let mut bindings = Vec::new();
        for name in names {
            let e = &self.exchanges[name];
            exchanges.push(e.decl.clone());
            for (queue, qb) in &e.bindings {
                for (key, _) in qb.keys.iter().filter(|(_, durable)| **durable) {
                    bindings.push(Binding {
                        exchange: name.clone(),
                        queue: queue.to_string(),
                        key: key.clone(),
                        durable: true,
                    });
                }
            }
        }
        (exchanges, bindings)
    }

    pub fn exchange_count(&self) -> usize {
        self.exchanges.len()
    }

    pub fn binding_count(&self) -> usize {
        self.binding_count
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn decl(name: &str, kind: ExchangeKind, durable: bool, auto_delete: bool) -> ExchangeDecl {
        ExchangeDecl {
            name: name.into(),
            kind,
            durable,
            auto_delete,
        }
    }

    fn binding(exchange: &str, queue: &str, key: &str, durable: bool) -> Binding {
        Binding {
            exchange: exchange.into(),
            queue: queue.into(),
            key: key.into(),
            durable,
        }
    }

    fn routed(t: &RoutingTable, exchange: &str, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.route(exchange, key, &mut out).unwrap();
        let mut names: Vec<String> = out.iter().map(|q| q.to_string()).collect();
        names.sort();
        names
    }

    fn table_with(kind: ExchangeKind, bindings: &[(&str, &str)]) -> RoutingTable {
        let mut t = RoutingTable::new();
        assert!(t.declare_exchange(decl("x", kind, true, false)).unwrap());
        for (queue, key) in bindings {
            t.bind(binding("x", queue, key, true)).unwrap();
        }
        t
    }

    #[test]
    fn kinds_convert_to_and_from_the_wire() {
        for k in [
            ExchangeKind::Direct,
            ExchangeKind::Topic,
            ExchangeKind::Fanout,
        ] {
            assert_eq!(ExchangeKind::from_wire(k.to_wire()), Some(k));
        }
        assert_eq!(ExchangeKind::from_wire(wire::ExchangeKind(9)), None);
        assert_eq!(ExchangeKind::Topic.name(), "topic");
    }

    #[test]
    fn direct_routes_by_the_exact_key_only() {
        let t = table_with(
            ExchangeKind::Direct,
            &[
                ("q1", "orders"),
                ("q2", "orders"),
                ("q3", "orders.eu"),
                ("q4", ""),
            ],
        );
        assert_eq!(routed(&t, "x", "orders"), ["q1", "q2"]);
        assert_eq!(routed(&t, "x", "orders.eu"), ["q3"]);
        assert_eq!(routed(&t, "x", ""), ["q4"]);
        assert!(routed(&t, "x", "Orders").is_empty());
        assert!(routed(&t, "x", "orders.*").is_empty());
        assert!(routed(&t, "x", "#").is_empty());
    }

    #[test]
    fn fanout_ignores_keys_and_lists_each_queue_once() {
        let mut t = table_with(
            ExchangeKind::Fanout,
            &[("q1", "a"), ("q1", "b"), ("q2", ""), ("q3", "whatever")],
        );
        for key in ["", "a", "zzz", "#"] {
            assert_eq!(routed(&t, "x", key), ["q1", "q2", "q3"]);
        }
        // q1 stays while one of its two bindings is left.
        t.unbind(&binding("x", "q1", "a", true)).unwrap();
        assert_eq!(routed(&t, "x", ""), ["q1", "q2", "q3"]);
        t.unbind(&binding("x", "q1", "b", true)).unwrap();
        assert_eq!(routed(&t, "x", ""), ["q2", "q3"]);
    }

    #[test]
    fn a_queue_matched_by_two_bindings_gets_the_message_once() {
        let t = table_with(
            ExchangeKind::Topic,
            &[
                ("q", "a.*"),
                ("q", "#"),
                ("q", "a.b"),
                ("q", "#.#"),
                ("r", "a.b"),
            ],
        );
        let mut out = Vec::new();
        t.route("x", "a.b", &mut out).unwrap();
        out.sort();
        assert_eq!(out, ["q", "r"]);
        // Appends: what `out` held stays.
        t.route("x", "c", &mut out).unwrap();
        assert_eq!(out, ["q", "r", "q"]);
    }

    /// Each topic case, with the reference matcher and with the trie.
    #[test]
    fn topic_edge_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("#", "", true),
            ("#", "a", true),
            ("#", "a.b.c", true),
            ("#.#", "", true),
            ("", "", true),
            ("", "a", false),
            ("a", "", false),
            ("a.#.#.b", "a.b", true),
            ("a.#.#.b", "a.x.b", true),
            ("a.#.#.b", "a.x.y.b", true),
            ("a.#.#.b", "a.b.c", false),
            ("#.b", "b", true),
            ("#.b", "x.y.b", true),
            ("#.b", "b.x", false),
            ("a.*.b", "a..b", true),
            ("a.#.b", "a..b", true),
            ("a.b", "a..b", false),
            ("a", "a", true),
            ("a", "b", false),
            ("*", "abc", true),
            ("#", "abc", true),
            ("a*", "ab", false),
            ("a*", "a*", true),
            ("A", "a", false),
            ("*", "", false),
            ("*", "x", true),
            ("*", ".", false),
            ("*.*", ".", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b", false),
            ("a.", "a.", true),
            ("a.", "a", false),
            (".a", ".a", true),
            ("*.a", ".a", true),
            ("#.a.#", "a", true),
            ("#.a.#", "b.a.c", true),
            ("#.a.#", "a.a.a", true),
            ("#.a.#", "b.c", false),
            ("*.#", "", false),
            ("*.#", "a", true),
            ("#.*", "a.b.c", true),
        ];
        for &(pattern, key, expected) in cases {
            assert_eq!(
                topic_matches(pattern, key),
                expected,
                "reference: '{pattern}' vs '{key}'"
            );
            let t = table_with(ExchangeKind::Topic, &[("q", pattern)]);
            let want: &[&str] = if expected { &["q"] } else { &[] };
            assert_eq!(routed(&t, "x", key), want, "trie: '{pattern}' vs '{key}'");
        }
        assert_eq!(topic_words("").count(), 0);
        assert_eq!(topic_words("a..b").collect::<Vec<_>>(), ["a", "", "b"]);
        assert_eq!(topic_words(".").collect::<Vec<_>>(), ["", ""]);
    }

    #[test]
    fn many_hashes_do_not_blow_up() {
        let pattern = ["#"; 40].join(".") + ".a." + &["#"; 40].join(".") + ".a";
        let t = table_with(
            ExchangeKind::Topic,
            &[("q", &pattern), ("r", "#.a.#.a.#.a.#.b")],
        );
        let key = ["a"; 200].join(".");
        assert_eq!(routed(&t, "x", &key), ["q"]);
    }

    #[test]
    fn topic_bindings_removed_leave_no_trie_behind() {
        // Several queues end on one node ("#.#" is "#"), so `more` is used and emptied too.
        let keys = [
            "a.b.c", "a.*.c", "#.c", "a.#", "", "#", "a..b", "x.#.#.y", "#.#", "#", "a.#.#",
        ];
        let mut t = RoutingTable::new();
        t.declare_exchange(decl("x", ExchangeKind::Topic, false, false))
            .unwrap();
        let shape = |t: &RoutingTable| match &t.exchanges["x"].matcher {
            Matcher::Topic(trie) => (
                trie.nodes.len() - trie.free_nodes.len(),
                trie.edges.len(),
                trie.words.len(),
                trie.more.len(),
            ),
            _ => unreachable!(),
        };
        let empty = shape(&t);
        assert_eq!(empty, (1, 0, 0, 0));
        for round in 0..3 {
            for (i, key) in keys.iter().enumerate() {
                t.bind(binding("x", &format!("q{}", i % 3), key, false))
                    .unwrap();
            }
            assert_ne!(shape(&t), empty);
            if round % 2 == 0 {
                for (i, key) in keys.iter().enumerate() {
                    t.unbind(&binding("x", &format!("q{}", i % 3), key, false))
                        .unwrap();
                }
            } else {
                for q in ["q0", "q1", "q2"] {
                    t.remove_queue(q);
                }
            }
            assert_eq!(shape(&t), empty, "round {round}");
            assert_eq!(t.queues.ids.len(), 0);
            assert!(t.queues.slots.len() <= 3);
        }
    }

    #[test]
    fn redeclaring_differently_names_each_difference() {
        let mut t = RoutingTable::new();
        assert!(t
            .declare_exchange(decl("logs", ExchangeKind::Fanout, true, false))
            .unwrap());
        assert!(!t
            .declare_exchange(decl("logs", ExchangeKind::Fanout, true, false))
            .unwrap());
        let e = t
            .declare_exchange(decl("logs", ExchangeKind::Topic, true, false))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PreconditionFailed);
        assert_eq!(
            e.message,
            "exchange 'logs' exists as a durable fanout exchange; this declare asks for topic"
        );
        let e = t
            .declare_exchange(decl("logs", ExchangeKind::Direct, false, true))
            .unwrap_err();
        assert_eq!(
            e.message,
            "exchange 'logs' exists as a durable fanout exchange; \
             this declare asks for direct, transient, auto-delete"
        );
        assert_eq!(t.exchange("logs").unwrap().kind, ExchangeKind::Fanout);
    }

    #[test]
    fn the_default_exchange_and_reserved_names_are_refused() {
        let mut t = RoutingTable::new();
        let e = t
            .declare_exchange(decl("", ExchangeKind::Direct, true, false))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessRefused);
        assert!(
            e.message.contains("default exchange cannot be declared"),
            "{}",
            e.message
        );
        let e = t
            .declare_exchange(decl("weir.x", ExchangeKind::Topic, true, false))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessRefused);
        assert!(e.message.contains("'weir.'"), "{}", e.message);
        let e = t.delete_exchange("", false).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessRefused);
        assert!(e.message.contains("cannot be deleted"), "{}", e.message);
        let e = t.bind(binding("", "q", "q", true)).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessRefused);
        assert!(e.message.contains("cannot be bound"), "{}", e.message);
        let e = t.unbind(&binding("", "q", "q", true)).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessRefused);
        assert_eq!(t.exchange_count(), 0);
        // A name that merely contains the prefix is an ordinary name.
        assert!(t
            .declare_exchange(decl("not.weir.x", ExchangeKind::Topic, true, false))
            .unwrap());
        t.declare_exchange(decl("x", ExchangeKind::Topic, true, false))
            .unwrap();
        let e = t.bind(binding("x", "", "k", true)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn unknown_exchanges_are_not_found() {
        let mut t = RoutingTable::new();
        let mut out = Vec::new();
        let errors = [
            t.bind(binding("nope", "q", "k", true)).unwrap_err(),
            t.unbind(&binding("nope", "q", "k", true)).unwrap_err(),
            t.delete_exchange("nope", false).unwrap_err(),
            t.delete_exchange("weir.x", false).unwrap_err(),
            t.route("nope", "k", &mut out).unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.code, ErrorCode::NotFound);
            assert!(e.message.contains("exchange '"), "{}", e.message);
        }
        assert_eq!(
            t.route("nope", "k", &mut out).unwrap_err().message,
            "exchange 'nope' not found"
        );
        assert!(t.exchange("nope").is_none());
    }

    #[test]
    fn delete_if_unused_refuses_an_exchange_with_bindings() {
        let mut t = table_with(ExchangeKind::Direct, &[("q1", "a"), ("q2", "b")]);
        let e = t.delete_exchange("x", true).unwrap_err();
        assert_eq!(e.code, ErrorCode::PreconditionFailed);
        assert_eq!(e.message, "exchange 'x' has 2 bindings");
        let removed = t.delete_exchange("x", false).unwrap();
        assert_eq!(
            removed,
            Removed {
                bindings: vec![binding("x", "q1", "a", true), binding("x", "q2", "b", true)],
                exchanges: vec!["x".into()],
            }
        );
        assert_eq!(t.binding_count(), 0);
        assert!(!t.has_bindings_to("q1"));
        t.declare_exchange(decl("y", ExchangeKind::Direct, true, false))
            .unwrap();
        assert_eq!(t.delete_exchange("y", true).unwrap().exchanges, ["y"]);
    }

    #[test]
    fn unbinding_what_is_not_bound_is_ok_and_removes_nothing() {
        let mut t = table_with(ExchangeKind::Topic, &[("q", "a")]);
        assert_eq!(
            t.unbind(&binding("x", "q", "b", true)).unwrap(),
            Removed::default()
        );
        assert_eq!(
            t.unbind(&binding("x", "other", "a", true)).unwrap(),
            Removed::default()
        );
        assert_eq!(t.binding_count(), 1);
        // The stored durable flag is what is reported, not the one asked with.
        let removed = t.unbind(&binding("x", "q", "a", false)).unwrap();
        assert_eq!(removed.bindings, [binding("x", "q", "a", true)]);
        assert!(removed.exchanges.is_empty(), "not auto-delete");
        assert_eq!(t.exchange_count(), 1);
    }

    #[test]
    fn binding_twice_is_idempotent_and_updates_durability() {
        let mut t = table_with(ExchangeKind::Direct, &[]);
        assert!(t.bind(binding("x", "q", "k", false)).unwrap());
        assert!(!t.bind(binding("x", "q", "k", true)).unwrap());
        assert_eq!(t.binding_count(), 1);
        assert_eq!(t.bindings(None, None), [binding("x", "q", "k", true)]);
        assert_eq!(routed(&t, "x", "k"), ["q"]);
    }

    #[test]
    fn an_auto_delete_exchange_goes_with_its_last_binding() {
        let mut t = RoutingTable::new();
        t.declare_exchange(decl("ad", ExchangeKind::Topic, true, true))
            .unwrap();
        t.declare_exchange(decl("keep", ExchangeKind::Topic, true, false))
            .unwrap();
        // No binding yet: it stays.
        assert!(t.exchange("ad").is_some());
        t.bind(binding("ad", "q1", "a", true)).unwrap();
        t.bind(binding("ad", "q2", "b", true)).unwrap();
        let r = t.unbind(&binding("ad", "q1", "a", true)).unwrap();
        assert!(r.exchanges.is_empty());
        let r = t.unbind(&binding("ad", "q2", "b", true)).unwrap();
        assert_eq!(r.exchanges, ["ad"]);
        assert!(t.exchange("ad").is_none());

        // Through remove_queue: only the exchange that lost its last binding goes.
        t.declare_exchange(decl("ad", ExchangeKind::Fanout, false, true))
            .unwrap();
        t.declare_exchange(decl("ad2", ExchangeKind::Direct, false, true))
            .unwrap();
        t.bind(binding("ad", "q1", "", false)).unwrap();
        t.bind(binding("ad", "q1", "x", false)).unwrap();
        t.bind(binding("ad2", "q1", "k", false)).unwrap();
        t.bind(binding("ad2", "q2", "k", false)).unwrap();
        t.bind(binding("keep", "q1", "#", true)).unwrap();
        let r = t.remove_queue("q1");
        assert_eq!(
            r.bindings,
            [
                binding("ad", "q1", "", false),
                binding("ad", "q1", "x", false),
                binding("ad2", "q1", "k", false),
                binding("keep", "q1", "#", true),
            ]
        );
        assert_eq!(r.exchanges, ["ad"]);
        assert!(t.exchange("ad").is_none());
        assert!(t.exchange("ad2").is_some());
        assert!(t.exchange("keep").is_some());
        assert!(!t.has_bindings_to("q1"));
        assert!(t.has_bindings_to("q2"));
        assert_eq!(t.remove_queue("q1"), Removed::default());
    }

    #[test]
    fn listings_and_durable_state() {
        let mut t = RoutingTable::new();
        t.declare_exchange(decl("b", ExchangeKind::Topic, true, false))
            .unwrap();
        t.declare_exchange(decl("a", ExchangeKind::Direct, false, false))
            .unwrap();
        t.declare_exchange(decl("c", ExchangeKind::Fanout, true, true))
            .unwrap();
        t.bind(binding("b", "q2", "z", true)).unwrap();
        t.bind(binding("b", "q1", "y", false)).unwrap();
        t.bind(binding("b", "q1", "x", true)).unwrap();
        t.bind(binding("a", "q1", "k", false)).unwrap();
        t.bind(binding("c", "q1", "", true)).unwrap();
        let names: Vec<(&str, usize)> = t
            .exchanges()
            .into_iter()
            .map(|(d, n)| (d.name.as_str(), n))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 3), ("c", 1)]);
        assert_eq!(
            t.bindings(None, None),
            [
                binding("a", "q1", "k", false),
                binding("b", "q1", "x", true),
                binding("b", "q1", "y", false),
                binding("b", "q2", "z", true),
                binding("c", "q1", "", true),
            ]
        );
        assert_eq!(
            t.bindings(None, Some("q1")),
            [
                binding("a", "q1", "k", false),
                binding("b", "q1", "x", true),
                binding("b", "q1", "y", false),
                binding("c", "q1", "", true),
            ]
        );
        assert_eq!(
            t.bindings(Some("b"), Some("q2")),
            [binding("b", "q2", "z", true)]
        );
        assert!(t.bindings(Some("nope"), None).is_empty());
        assert!(t.bindings(None, Some("nope")).is_empty());
        let (exchanges, bindings) = t.durable_state();
        assert_eq!(
            exchanges,
            [
                decl("b", ExchangeKind::Topic, true, false),
                decl("c", ExchangeKind::Fanout, true, true)
            ]
        );
        assert_eq!(
            bindings,
            [
                binding("b", "q1", "x", true),
                binding("b", "q2", "z", true),
                binding("c", "q1", "", true),
            ]
        );
        assert_eq!((t.exchange_count(), t.binding_count()), (3, 5));
    }

    #[test]
    fn a_snapshot_crosses_threads_and_routes_there() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RoutingTable>();
        send_sync::<RoutingChange>();
        let t = table_with(ExchangeKind::Topic, &[("q", "a.#"), ("r", "*.b")]);
        let change = RoutingChange::Snapshot(Box::new(t.clone()));
        let copy = std::thread::spawn(move || {
            let mut copy = RoutingTable::new();
            copy.apply(change).unwrap();
            assert_eq!(routed(&copy, "x", "a.b"), ["q", "r"]);
            copy
        })
        .join()
        .unwrap();
        assert_eq!(copy.bindings(None, None), t.bindings(None, None));
    }

    fn word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "*", "#"])
    }

    fn key_word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", ""])
    }

    fn joined(words: impl Strategy<Value = &'static str>) -> impl Strategy<Value = String> {
        prop::collection::vec(words, 0..5).prop_map(|w| w.join("."))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The trie routes exactly as the reference matcher says, each queue once.
        #[test]
        fn the_trie_agrees_with_the_reference(
            bindings in prop::collection::vec((0..6u8, joined(word())), 0..30),
            keys in prop::collection::vec(joined(key_word()), 1..8),
        ) {
            let mut t = RoutingTable::new();
            t.declare_exchange(decl("x", ExchangeKind::Topic, false, false)).unwrap();
            for (q, pattern) in &bindings {
                t.bind(binding("x", &format!("q{q}"), pattern, false)).unwrap();
            }
            for key in &keys {
                let mut out = Vec::new();
                t.route("x", key, &mut out).unwrap();
                let got: BTreeSet<&str> = out.iter().copied().collect();
                prop_assert_eq!(got.len(), out.len(), "duplicates for '{}': {:?}", key, out);
                let want: BTreeSet<String> = bindings
                    .iter()
                    .filter(|(_, p)| topic_matches(p, key))
                    .map(|(q, _)| format!("q{q}"))
                    .collect();
                let got: BTreeSet<String> = got.into_iter().map(String::from).collect();
                prop_assert_eq!(got, want, "key '{}'", key);
            }
        }

        /// A copy fed the writer's successful changes stays equal to the writer, and both equal
        /// a plain model of exchanges and bindings, routes included.
        #[test]
        fn copies_follow_the_writer_and_the_model(ops in prop::collection::vec(op(), 1..60)) {
            let mut writer = RoutingTable::new();
            let mut copy = RoutingTable::new();
            let mut model = Model::default();
            for op in ops {
                let (result, change) = match op.clone() {
                    Op::Declare(d) => (
                        writer.declare_exchange(d.clone()).map(|_| Removed::default()),
                        RoutingChange::DeclareExchange(d),
                    ),
                    Op::Delete(name, if_unused) => (
                        writer.delete_exchange(&name, if_unused),
                        RoutingChange::DeleteExchange(name),
                    ),
                    Op::Bind(b) => (
                        writer.bind(b.clone()).map(|_| Removed::default()),
                        RoutingChange::Bind(b),
                    ),
                    Op::Unbind(b) => (writer.unbind(&b), RoutingChange::Unbind(b)),
                    Op::RemoveQueue(q) => (Ok(writer.remove_queue(&q)), RoutingChange::RemoveQueue(q)),
                    Op::Snapshot => (Ok(Removed::default()), RoutingChange::Snapshot(Box::new(writer.clone()))),
                };
                let expected = model.apply(&op);
                prop_assert_eq!(
                    result.as_ref().map_err(|e| e.code),
                    expected.as_ref().map_err(|&c| c),
                    "{:?}", op
                );
                if result.is_ok() {
                    prop_assert_eq!(copy.apply(change), result);
                }
                prop_assert_eq!(writer.bindings(None, None), copy.bindings(None, None));
                prop_assert_eq!(writer.exchanges(), copy.exchanges());
                let model_bindings: Vec<Binding> = model
                    .bindings
                    .iter()
                    .map(|((e, q, k), &d)| binding(e, q, k, d))
                    .collect();
                prop_assert_eq!(writer.bindings(None, None), model_bindings);
                let model_exchanges: Vec<(&ExchangeDecl, usize)> = model
                    .exchanges
                    .values()
                    .map(|d| (d, model.bindings.keys().filter(|(e, _, _)| *e == d.name).count()))
                    .collect();
                prop_assert_eq!(writer.exchanges(), model_exchanges);
                prop_assert_eq!(writer.binding_count(), model.bindings.len());
                prop_assert_eq!(writer.exchange_count(), model.exchanges.len());
                for q in QUEUES {
                    let bound = model.bindings.keys().any(|(_, mq, _)| mq == q);
                    prop_assert_eq!(writer.has_bindings_to(q), bound);
                    prop_assert_eq!(copy.has_bindings_to(q), bound);
                }
                for name in EXCHANGES {
                    for key in ["a", "b", "a.b", "", "b.a.b"] {
                        let (mut w, mut c) = (Vec::new(), Vec::new());
                        let wr = writer.route(name, key, &mut w).map_err(|e| e.code);
                        let cr = copy.route(name, key, &mut c).map_err(|e| e.code);
                        prop_assert_eq!(&wr, &cr);
                        // Same changes, same order: routes are deterministic across copies.
                        prop_assert_eq!(&w, &c);
                        if wr.is_ok() {
                            w.sort_unstable();
                            prop_assert_eq!(w, model.route(name, key));
                        }
                    }
                }
            }
        }
    }

    const EXCHANGES: [&str; 3] = ["x", "y", "z"];
    const QUEUES: [&str; 3] = ["q1", "q2", "q3"];
    const KEYS: [&str; 6] = ["a", "b", "a.b", "#", "*.b", ""];

    #[derive(Clone, Debug)]
    enum Op {
        Declare(ExchangeDecl),
        Delete(String, bool),
        Bind(Binding),
        Unbind(Binding),
        RemoveQueue(String),
        Snapshot,
    }

    fn op() -> impl Strategy<Value = Op> {
        let exchange = prop::sample::select(EXCHANGES.to_vec()).prop_map(String::from);
        let queue = prop::sample::select(QUEUES.to_vec()).prop_map(String::from);
        let key = prop::sample::select(KEYS.to_vec()).prop_map(String::from);
        let kind = prop::sample::select(vec![
            ExchangeKind::Direct,
            ExchangeKind::Topic,
            ExchangeKind::Fanout,
        ]);
        let b = (exchange.clone(), queue.clone(), key, any::<bool>()).prop_map(|(e, q, k, d)| {
            Binding {
                exchange: e,
                queue: q,
                key: k,
                durable: d,
            }
        });
        prop_oneof![
            2 => (exchange.clone(), kind, any::<bool>(), prop::bool::weighted(0.3)).prop_map(
                |(name, kind, durable, auto_delete)| Op::Declare(ExchangeDecl { name, kind, durable, auto_delete })
            ),
            1 => (exchange, any::<bool>()).prop_map(|(e, u)| Op::Delete(e, u)),
            5 => b.clone().prop_map(Op::Bind),
            3 => b.prop_map(Op::Unbind),
            1 => queue.prop_map(Op::RemoveQueue),
            1 => Just(Op::Snapshot),
        ]
    }

    /// Exchanges and bindings as plain ordered sets, with the rules written out again.
    #[derive(Default)]
    struct Model {
        exchanges: BTreeMap<String, ExchangeDecl>,
        bindings: BTreeMap<(String, String, String), bool>,
    }

    impl Model {
        fn count(&self, exchange: &str) -> usize {
            self.bindings
                .keys()
                .filter(|(e, _, _)| e == exchange)
                .count()
        }

        fn auto_delete(&mut self, exchange: &str) {
            if self.exchanges[exchange].auto_delete && self.count(exchange) == 0 {
                self.exchanges.remove(exchange);
            }
        }

        fn apply(&mut self, op: &Op) -> Result<Removed, ErrorCode> {
            let mut removed = Removed::default();
            match op {
                Op::Declare(d) => match self.exchanges.get(&d.name) {
                    Some(existing) if existing != d => return Err(ErrorCode::PreconditionFailed),
                    Some(_) => {}
                    None => {
                        self.exchanges.insert(d.name.clone(), d.clone());
                    }
                },
                Op::Delete(name, if_unused) => {
                    if !self.exchanges.contains_key(name) {
                        return Err(ErrorCode::NotFound);
                    }
                    if *if_unused && self.count(name) > 0 {
                        return Err(ErrorCode::PreconditionFailed);
                    }
                    self.exchanges.remove(name);
                    let gone: Vec<_> = self
                        .bindings
                        .iter()
                        .filter(|((e, _, _), _)| e == name)
                        .map(|((e, q, k), &d)| binding(e, q, k, d))
                        .collect();
                    for b in &gone {
                        self.bindings
                            .remove(&(b.exchange.clone(), b.queue.clone(), b.key.clone()));
                    }
                    removed.bindings = gone;
                    removed.exchanges.push(name.clone());
                }
                Op::Bind(b) => {
                    if !self.exchanges.contains_key(&b.exchange) {
                        return Err(ErrorCode::NotFound);
                    }
                    self.bindings.insert(
                        (b.exchange.clone(), b.queue.clone(), b.key.clone()),
                        b.durable,
                    );
                }
                Op::Unbind(b) => {
                    if !self.exchanges.contains_key(&b.exchange) {
                        return Err(ErrorCode::NotFound);
                    }
                    let id = (b.exchange.clone(), b.queue.clone(), b.key.clone());
                    if let Some(durable) = self.bindings.remove(&id) {
                        removed.bindings.push(Binding {
                            durable,
                            ..b.clone()
                        });
                        self.auto_delete(&b.exchange);
                        if !self.exchanges.contains_key(&b.exchange) {
                            removed.exchanges.push(b.exchange.clone());
                        }
                    }
                }
                Op::RemoveQueue(queue) => {
                    let gone: Vec<_> = self
                        .bindings
                        .iter()
                        .filter(|((_, q, _), _)| q == queue)
                        .map(|((e, q, k), &d)| binding(e, q, k, d))
                        .collect();
                    for b in &gone {
                        self.bindings
                            .remove(&(b.exchange.clone(), b.queue.clone(), b.key.clone()));
                    }
                    let exchanges: BTreeSet<String> =
                        gone.iter().map(|b| b.exchange.clone()).collect();
                    for e in exchanges {
                        self.auto_delete(&e);
                        if !self.exchanges.contains_key(&e) {
                            removed.exchanges.push(e);
                        }
                    }
                    removed.bindings = gone;
                }
                Op::Snapshot => {}
            }
            Ok(removed)
        }

        fn route(&self, exchange: &str, key: &str) -> Vec<&str> {
            let kind = self.exchanges[exchange].kind;
            let queues: BTreeSet<&str> = self
                .bindings
                .keys()
                .filter(|(e, _, k)| {
                    e == exchange
                        && match kind {
                            ExchangeKind::Direct => k == key,
                            ExchangeKind::Topic => topic_matches(k, key),
                            ExchangeKind::Fanout => true,
                        }
                })
                .map(|(_, q, _)| q.as_str())
                .collect();
            queues.into_iter().collect()
        }
    }
}
