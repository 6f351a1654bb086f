//! Topic matching: RabbitMQ's word rules, a reference matcher that reads them directly, and the
//! trie the table routes by.
//!
//! Contract: owned by one exchange of one table, on that table's thread. A binding key is a path
//! of words with a `*` child and a `#` child per node; a route walks the key as a set of live
//! nodes per word (each node at most once per word), so its cost is key words × live nodes
//! whatever the patterns, never exponential in their `#`s. The walk's working sets live in a
//! thread-local scratch sized by the largest trie the thread routed through, so a route
//! allocates nothing. Faults handled: removing a binding the trie does not hold is a bug, caught
//! by a debug assertion and otherwise ignored.

use std::cell::RefCell;
use std::collections::HashMap;

use super::hash::Seeded;
use super::intern::{QueueId, Words};

/// No node / no child.
const NONE: u32 = u32::MAX;

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
pub(super) struct TopicTrie {
    /// Node 0 is the root: the binding key `""` (no words) ends there.
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    /// (parent << 32 | word id) → child.
    edges: HashMap<u64, u32, Seeded>,
    words: Words,
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
    pub(super) fn new() -> TopicTrie {
        TopicTrie {
            nodes: vec![Node::new(NONE, VIA_ROOT)],
            free_nodes: Vec::new(),
            edges: HashMap::default(),
            words: Words::default(),
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

    /// `node`'s `#` child (`via` is `VIA_HASH`) or `*` child, made if it has none.
    fn wildcard_child(&mut self, node: u32, via: u32) -> u32 {
        let n = &self.nodes[node as usize];
        let child = if via == VIA_HASH { n.hash } else { n.star };
        if child != NONE {
            return child;
        }
        let child = self.new_node(node, via);
        let n = &mut self.nodes[node as usize];
        *(if via == VIA_HASH {
            &mut n.hash
        } else {
            &mut n.star
        }) = child;
        child
    }

    pub(super) fn insert(&mut self, key: &str, queue: QueueId) {
        let mut node = ROOT;
        for w in Self::path(key) {
            node = match w {
                "#" => self.wildcard_child(node, VIA_HASH),
                "*" => self.wildcard_child(node, VIA_STAR),
                w => {
                    let word = self.words.intern(w);
                    match self.edges.get(&edge(node, word)) {
                        Some(&child) => child,
                        None => {
                            let child = self.new_node(node, word);
                            self.edges.insert(edge(node, word), child);
                            self.words.add_use(word);
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

    /// The node a binding key's path ends at, if the trie holds that path.
    pub(super) fn node_of(&self, key: &str) -> Option<u32> {
        let mut node = ROOT;
        for w in Self::path(key) {
            let n = &self.nodes[node as usize];
            node = match w {
                "#" => n.hash,
                "*" => n.star,
                w => self
                    .words
                    .get(w)
                    .and_then(|word| self.edges.get(&edge(node, word)).copied())
                    .unwrap_or(NONE),
            };
            if node == NONE {
                return None;
            }
        }
        Some(node)
    }

    /// The queues of the bindings ending at `node`, one per binding, in the order a route
    /// emits them.
    pub(super) fn queues_at(&self, node: u32) -> impl Iterator<Item = QueueId> + '_ {
        let n = &self.nodes[node as usize];
        let more = (n.queues > 1).then(|| &self.more[&node]);
        (n.queues > 0)
            .then_some(n.queue)
            .into_iter()
            .chain(more.into_iter().flatten().copied())
    }

    /// (live nodes, edges, words, nodes with more than one queue): what removals must empty.
    #[cfg(test)]
    pub(super) fn shape(&self) -> (usize, usize, usize, usize) {
        (
            self.nodes.len() - self.free_nodes.len(),
            self.edges.len(),
            self.words.len(),
            self.more.len(),
        )
    }

    /// Removes one binding of `queue` with `key` (it exists), then every node left useless.
    pub(super) fn remove(&mut self, key: &str, queue: QueueId) {
        let Some(mut node) = self.node_of(key) else {
            debug_assert!(false, "topic binding '{key}' is not in the trie");
            return;
        };
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
                    self.words.drop_use(word);
                }
            }
            self.nodes[node as usize] = Node::new(NONE, VIA_ROOT);
            self.free_nodes.push(node);
            node = parent;
        }
    }

    /// Calls `out` with the id of each queue `key` reaches, once.
    pub(super) fn route(&self, key: &str, queue_count: usize, mut out: impl FnMut(QueueId)) {
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
                let word = self.words.get(w);
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
