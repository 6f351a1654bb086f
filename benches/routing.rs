//! Routing microbenchmarks: what choosing a message's queues costs per publish, before any queue
//! sees it. Every case times one `RoutingTable::route` per iteration (exchange lookup included,
//! one reused `out` cleared each time), so criterion's time per iteration is ns per route.
//!
//! - `topic_10k`: one topic exchange with 10,000 bindings to 1,000 queues (20 regions × 50
//!   services, ten realistic binding keys per queue such as `region.r3.service.s17.*`,
//!   `region.*.service.s17.#`, `region.r3.#.error`, `#.s17.audit`), routing keys cycled from
//!   1,000,000 pre-generated ones (`region.r3.service.s17.event.e2` and the like, some for
//!   regions or services nobody bound; a key reaches about two queues). Before measuring, the
//!   trie's answers for the first keys are checked against the reference matcher and the mean
//!   number of queues per key is printed.
//! - `direct_10k`: one direct exchange with 10,000 binding keys to 1,000 queues; 90% of the
//!   routing keys hit one binding, 10% miss.
//! - `fanout_4`, `fanout_100`: one fanout exchange with 4, and one with 100, bound queues.
//!
//! Run: `cargo bench --bench routing` (pin it for steadier numbers:
//! `taskset -c 1 cargo bench --bench routing`).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::broker::routing::{topic_matches, ExchangeKind, RoutingTable};
use weir::mesh::types::{Binding, ExchangeDecl};

const REGIONS: usize = 20;
const SERVICES: usize = 50;
const KEYS: usize = 1_000_000;
/// Keys checked against the reference matcher before the topic case is measured.
const CHECKED: usize = 300;

/// xorshift64*: reproducible keys without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

fn declare(t: &mut RoutingTable, name: &str, kind: ExchangeKind) {
    t.declare_exchange(ExchangeDecl {
        name: name.into(),
        kind,
        durable: true,
        auto_delete: false,
    })
    .unwrap();
}

fn bind(t: &mut RoutingTable, exchange: &str, queue: &str, key: &str) {
    let new = t
        .bind(Binding {
            exchange: exchange.into(),
            queue: queue.into(),
            key: key.into(),
            durable: true,
        })
        .unwrap();
    assert!(new, "duplicate binding {exchange} {queue} {key}");
}

/// The ten binding keys of the queue of region `r`, service `s`. Most are the queue's own;
/// the wide ones (every region of a service, every service of a region, every error) are bound
/// by one queue each, as an aggregator would be: were they on every queue, a key would reach
/// dozens of queues and the case would measure filling `out`, not matching.
fn topic_patterns(r: usize, s: usize) -> Vec<String> {
    let mut p = vec![format!("region.r{r}.service.s{s}.*")];
    p.extend((0..4).map(|e| format!("region.r{r}.service.s{s}.event.e{e}")));
    p.push(if r == 0 {
        format!("region.*.service.s{s}.#")
    } else {
        format!("region.r{r}.service.s{s}.#.warn")
    });
    p.push(if s == 0 {
        format!("region.r{r}.#.error")
    } else {
        format!("region.r{r}.service.s{s}.#.error")
    });
    p.push(if r == 0 {
        format!("#.s{s}.audit")
    } else {
        format!("region.r{r}.service.s{s}.audit")
    });
    p.push(format!("*.r{r}.*.s{s}.metrics.#"));
    p.push(if r == 0 && s == 0 {
        "#.error".to_string()
    } else {
        format!("region.r{r}.service.s{s}.#.debug")
    });
    p
}

/// Keys stored end to end in one buffer, so cycling through a million of them streams through
/// memory instead of missing the cache on every key's own allocation: what is timed is routing,
/// not fetching the key (which a broker has just parsed).
struct Keys {
    text: String,
    ends: Vec<usize>,
}

impl Keys {
    fn generate(n: usize, mut key: impl FnMut() -> String) -> Keys {
        let mut keys = Keys {
            text: String::new(),
            ends: Vec::with_capacity(n),
        };
        for _ in 0..n {
            keys.text.push_str(&key());
            keys.ends.push(keys.text.len());
        }
        keys
    }

    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

fn topic_key(rng: &mut Rng) -> String {
    // A few regions and services beyond those bound: keys that match little or nothing.
    let r = rng.below(REGIONS + 2);
    let s = rng.below(SERVICES + 5);
    let tail = match rng.below(8) {
        0 => "created".to_string(),
        1 => format!("event.e{}", rng.below(6)),
        2 => "error".to_string(),
        3 => "audit".to_string(),
        4 => "metrics.cpu.load".to_string(),
        5 => "worker.debug".to_string(),
        6 => "db.pool.error".to_string(),
        _ => format!("event.e{}", rng.below(4)),
    };
    format!("region.r{r}.service.s{s}.{tail}")
}

fn topic_case(c: &mut Criterion) {
    let mut t = RoutingTable::new();
    declare(&mut t, "events", ExchangeKind::Topic);
    let mut all = Vec::new();
    for r in 0..REGIONS {
        for s in 0..SERVICES {
            let queue = format!("q.r{r}.s{s}");
            for p in topic_patterns(r, s) {
                bind(&mut t, "events", &queue, &p);
                all.push((queue.clone(), p));
            }
        }
    }
    assert_eq!(t.binding_count(), 10_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let keys = Keys::generate(KEYS, || topic_key(&mut rng));

    let mut out = Vec::new();
    let mut matched = 0;
    for i in 0..CHECKED {
        let key = keys.get(i);
        out.clear();
        t.route("events", key, &mut out).unwrap();
        let got: BTreeSet<&str> = out.iter().copied().collect();
        assert_eq!(got.len(), out.len(), "duplicates for {key}");
        let want: BTreeSet<&str> = all
            .iter()
            .filter(|(_, p)| topic_matches(p, key))
            .map(|(q, _)| q.as_str())
            .collect();
        assert_eq!(got, want, "{key}");
        matched += got.len();
    }
    println!(
        "topic_10k: {} bindings, {} queues; {:.2} queues per routing key on average \
         (first {CHECKED} keys, all equal to the reference matcher's)",
        t.binding_count(),
        REGIONS * SERVICES,
        matched as f64 / CHECKED as f64
    );

    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("topic_10k", |b| {
        b.iter(|| {
            let key = keys.get(i);
            i = if i + 1 == keys.len() { 0 } else { i + 1 };
            out.clear();
            t.route("events", key, &mut out).unwrap();
            black_box(out.len())
        })
    });
    group.finish();
}

fn direct_case(c: &mut Criterion) {
    const BINDINGS: usize = 10_000;
    let mut t = RoutingTable::new();
    declare(&mut t, "orders", ExchangeKind::Direct);
    for k in 0..BINDINGS {
        bind(
            &mut t,
            "orders",
            &format!("q{}", k % 1000),
            &format!("orders.k{k}"),
        );
    }
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let keys = Keys::generate(KEYS, || {
        let k = rng.below(BINDINGS);
        if rng.below(10) == 0 {
            format!("orders.k{}", BINDINGS + k)
        } else {
            format!("orders.k{k}")
        }
    });
    let mut out = Vec::new();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("direct_10k", |b| {
        b.iter(|| {
            let key = keys.get(i);
            i = if i + 1 == keys.len() { 0 } else { i + 1 };
            out.clear();
            t.route("orders", key, &mut out).unwrap();
            black_box(out.len())
        })
    });
    group.finish();
}

fn fanout_case(c: &mut Criterion) {
    let mut t = RoutingTable::new();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    for n in [4, 100] {
        let name = format!("fanout_{n}");
        declare(&mut t, &name, ExchangeKind::Fanout);
        for q in 0..n {
            bind(&mut t, &name, &format!("{name}.q{q}"), "");
        }
        let mut out = Vec::new();
        group.bench_function(&name, |b| {
            b.iter(|| {
                out.clear();
                t.route(&name, "any.key", &mut out).unwrap();
                black_box(out.len())
            })
        });
        assert_eq!(out.len(), n);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = topic_case, direct_case, fanout_case
}
criterion_main!(benches);
