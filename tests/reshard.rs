//! `weir data reshard`: a data directory's queues moved to another shard count, with the real
//! binary, across SIGKILL.
//!
//! The contract (src/reshard.rs): every unacked message of every durable queue comes back
//! exactly once, in queue order, with its delivery time, priority, retry state and producer
//! window; exchanges and bindings still route; sequence numbers go on; a SIGKILL at any moment
//! leaves the old layout or the new one, whole, and a rerun finishes; a held directory is
//! refused. This VM has 2 CPUs, so layouts of 1 and 2 shards are served, and a layout of 3 is
//! checked by resharding it again (served too where 3 CPUs are allowed).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Instant;

use bytes::BytesMut;
use common::{temp_dir, Broker, Client};
use weir::mesh::types::placement;
use weir_protocol::wire::{self, BodyT};
use weir_protocol::{Encoder, MessageProps, PublishItem, WireLimits};

const KILL_AFTER_STEP: &str = "WEIR_RESHARD_KILL_AFTER_STEP";

fn cpus(shards: usize) -> String {
    (0..shards)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// CPUs this test process may use: a layout of more shards is checked only by resharding it.
fn cpus_allowed() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Small segments (and so a small disk reserve): every test copies data directories around.
fn config() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("reshard-weir.toml");
        let tmp = dir.join(format!("reshard-weir.toml.{}", std::process::id()));
        std::fs::write(&tmp, "[limits]\nsegment_size_bytes_max = 2097152\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.to_str().unwrap().to_string()
    })
}

fn serve(dir: &Path, shards: usize) -> Broker {
    Broker::start(dir, &["--cpus", &cpus(shards), "--config", config()])
}

fn reshard_command(dir: &Path, shards: usize) -> std::process::Command {
    let mut cmd = common::weir_command();
    cmd.args(["data", "reshard", "--data-dir"])
        .arg(dir)
        .args(["--shards", &shards.to_string(), "--config", config()])
        .env_remove("WEIR_CONFIG")
        .env_remove(KILL_AFTER_STEP);
    cmd
}

fn reshard(dir: &Path, shards: usize) -> Output {
    let out = reshard_command(dir, shards)
        .output()
        .expect("run weir data reshard");
    assert!(
        out.status.success(),
        "reshard to {shards}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The shard count `layout.toml` records.
fn layout_shards(dir: &Path) -> usize {
    let text = std::fs::read_to_string(dir.join("layout.toml")).expect("layout.toml");
    text.lines()
        .find_map(|l| l.strip_prefix("shards = "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shard count in {text}"))
}

/// A name that `placement` puts on shard `on2` of 2 and `on3` of 3.
fn queue_placed(on2: u16, on3: u16) -> String {
    (0..)
        .map(|i| format!("rq{i}"))
        .find(|n| placement(n, 2) == on2 && placement(n, 3) == on3)
        .unwrap()
}

fn connect(broker: &Broker) -> Client {
    let mut c = broker.connect();
    c.handshake();
    c
}

/// A connection and its publish sequences (they strictly increase per connection).
struct Publisher {
    c: Client,
    encoder: Encoder,
    next: u64,
}

impl Publisher {
    fn new(broker: &Broker) -> Publisher {
        Publisher {
            c: connect(broker),
            encoder: Encoder::new(WireLimits::DEFAULT),
            next: 1,
        }
    }

    /// Publishes `bodies` and waits for their confirms; returns the confirms' duplicates.
    fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        bodies: &[Vec<u8>],
        props: &MessageProps<'_>,
        producer: Option<(u64, u64)>,
    ) -> u64 {
        let first = match producer {
            Some((_, seq)) => seq,
            None => self.next,
        };
        let messages: Vec<bytes::Bytes> = bodies
            .iter()
            .map(|b| self.encoder.message(props, b).unwrap())
            .collect();
        let items = messages.iter().enumerate().map(|(i, m)| PublishItem {
            sequence: first + i as u64,
            exchange,
            routing_key: key,
            mandatory: true,
            message: m,
        });
        let mut out = BytesMut::new();
        self.encoder
            .publish(&mut out, 0, producer.map(|p| p.0), true, items)
            .unwrap();
        self.c.stream.write_all(&out).unwrap();
        let last = first + bodies.len() as u64 - 1;
        let mut confirmed = std::collections::BTreeSet::new();
        let mut duplicates = 0;
        while (first..=last).any(|s| !confirmed.contains(&s)) {
            let f = self.c.recv().expect("closed while waiting for confirms");
            match f.body {
                BodyT::Confirm(c) => {
                    for r in &c.ranges {
                        confirmed.extend(r.first..=r.last);
                    }
                    for r in c.duplicates.iter().flatten() {
                        duplicates += r.last - r.first + 1;
                    }
                }
                other => panic!("while waiting for confirms: {other:?}"),
            }
        }
        if producer.is_none() {
            self.next = last + 1;
        }
        duplicates
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{prefix} {i}").into_bytes())
        .collect()
}

fn info(c: &mut Client, queue: &str) -> wire::QueueInfoT {
    match c.info(queue) {
        BodyT::QueueInfo(i) => *i,
        other => panic!("queue {queue} is not there: {other:?}"),
    }
}

fn cancel(c: &mut Client, tag: &str) {
    let mut cancel = wire::CancelT::default();
    cancel.consumer_tag = tag.to_string();
    assert!(matches!(
        c.request(BodyT::Cancel(Box::new(cancel))),
        BodyT::Ok(_)
    ));
}

/// Takes the next `n` messages of `queue` (they stay unacked: the broker is crashed after).
fn take(c: &mut Client, queue: &str, n: usize) -> Vec<common::Got> {
    if n == 0 {
        return Vec::new();
    }
    c.consume(queue, queue, n as u32, false);
    let got = c.deliveries(n);
    cancel(c, queue);
    got
}

fn ack_all(c: &mut Client, got: &[common::Got]) {
    if got.is_empty() {
        return;
    }
    c.ack(&got.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
}

/// What the broker must hold: each queue's ready messages in queue order.
type Model = BTreeMap<String, Vec<Vec<u8>>>;

/// Every queue of `model` holds exactly its messages, in order, and nothing else (read without
/// acking: the caller crashes the broker, and they stay).
fn check_exactly(broker: &Broker, model: &Model) {
    let mut c = connect(broker);
    for (queue, want) in model {
        let i = info(&mut c, queue);
        assert_eq!(
            i.messages_ready as usize,
            want.len(),
            "{queue}: ready messages"
        );
        let got: Vec<Vec<u8>> = take(&mut c, queue, want.len())
            .into_iter()
            .map(|g| g.body)
            .collect();
        assert_eq!(&got, want, "{queue}: every message once, in queue order");
    }
}

/// The workload every test starts from, on a broker of 2 shards: plain queues on every
/// (2-shard, 3-shard) placement, numbered messages (some acked), an exchange bound to three of
/// them (two on one old shard, so one record names both), a priority queue, delayed messages,
/// a retry waiting, an idempotent producer. Returns the model of what is ready.
fn workload(broker: &Broker) -> Model {
    let mut model = Model::new();
    let mut p = Publisher::new(broker);
    let mut c = connect(broker);
    let plain = MessageProps::default();
    // A message rejected into a dead-letter queue: its history is in its record's annotation.
    // First, so that the original's settle record (staged once the copy is confirmed, after the
    // reject's answer) rides one of the many commits that follow, before the broker stops.
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("rdead".into());
    d.durable = true;
    let mut args = wire::QueueArgumentsT::default();
    args.dead_letter_exchange = Some(String::new());
    args.dead_letter_routing_key = Some("rdlq".into());
    d.arguments = Some(Box::new(args));
    assert!(matches!(p.c.declare_with(d), BodyT::QueueInfo(_)));
    p.c.declare("rdlq");
    let dead = numbered("dead", 0..2);
    p.publish("", "rdead", &dead, &plain, None);
    let got = take(&mut c, "rdead", 1);
    let mut r = wire::RejectT::default();
    r.delivery_tag = got[0].delivery_tag;
    r.requeue = false;
    assert!(matches!(
        c.request(BodyT::Reject(Box::new(r))),
        BodyT::Ok(_)
    ));
    let dlq = info(&mut c, "rdlq");
    assert_eq!(
        dlq.messages_ready + dlq.messages_unacked,
        1,
        "dead-lettered"
    );
    model.insert("rdead".into(), dead[1..].to_vec());
    model.insert("rdlq".into(), dead[..1].to_vec());

    let queues: Vec<String> = (0..2)
        .flat_map(|a| (0..3).map(move |b| queue_placed(a, b)))
        .collect();
    for (i, q) in queues.iter().enumerate() {
        p.c.declare(q);
        let bodies = numbered(q, 0..20);
        p.publish("", q, &bodies, &plain, None);
        // The first ones of some queues acked durably: they must not come back.
        let acked = 5 * (i % 3);
        let got = take(&mut c, q, acked);
        assert_eq!(
            got.iter().map(|g| g.body.clone()).collect::<Vec<_>>(),
            bodies[..acked]
        );
        ack_all(&mut c, &got);
        model.insert(q.clone(), bodies[acked..].to_vec());
    }
    let mut x = wire::DeclareExchangeT::default();
    x.name = "rx".into();
    x.kind = wire::ExchangeKind::Direct;
    x.durable = true;
    assert!(matches!(
        p.c.request(BodyT::DeclareExchange(Box::new(x))),
        BodyT::Ok(_)
    ));
    // queues[0] and [1] are on shard 0 of 2, [3] on shard 1.
    for q in [&queues[0], &queues[1], &queues[3]] {
        let mut b = wire::BindT::default();
        b.exchange = "rx".into();
        b.queue = q.clone();
        b.binding_key = Some("k".into());
        assert!(matches!(
            p.c.request(BodyT::Bind(Box::new(b))),
            BodyT::Ok(_)
        ));
    }
    let routed = numbered("routed", 0..4);
    p.publish("rx", "k", &routed, &plain, None);
    for q in [&queues[0], &queues[1], &queues[3]] {
        model.get_mut(q).unwrap().extend(routed.iter().cloned());
    }

    // A priority queue: highest level first, then publish order.
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("rprio".into());
    d.durable = true;
    let mut args = wire::QueueArgumentsT::default();
    args.priority_max = 9;
    d.arguments = Some(Box::new(args));
    assert!(matches!(p.c.declare_with(d), BodyT::QueueInfo(_)));
    let mut by_level = Vec::new();
    for i in 0..12usize {
        let level = (i * 7 % 10) as u8;
        let body = format!("prio {level} {i}").into_bytes();
        let props = MessageProps {
            priority: level,
            ..Default::default()
        };
        p.publish("", "rprio", std::slice::from_ref(&body), &props, None);
        by_level.push((std::cmp::Reverse(level), i, body));
    }
    by_level.sort();
    model.insert(
        "rprio".into(),
        by_level.into_iter().map(|(_, _, b)| b).collect(),
    );

    // Delayed an hour: they must come back delayed, not ready.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 3_600_000;
    let delayed = MessageProps {
        deliver_at_ms: Some(later),
        ..Default::default()
    };
    p.publish("", &queues[4], &numbered("delayed", 0..3), &delayed, None);

    // A retry waiting an hour (the queue's policy), with the rest of its queue ready.
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("rretry".into());
    d.durable = true;
    let mut args = wire::QueueArgumentsT::default();
    args.retry_delays_ms = Some(vec![3_600_000]);
    d.arguments = Some(Box::new(args));
    assert!(matches!(p.c.declare_with(d), BodyT::QueueInfo(_)));
    let retry_bodies = numbered("retry", 0..3);
    p.publish("", "rretry", &retry_bodies, &plain, None);
    let got = take(&mut c, "rretry", 1);
    let mut n = wire::NackT::default();
    n.ranges = vec![wire::RangeT {
        first: got[0].delivery_tag,
        last: got[0].delivery_tag,
    }];
    n.requeue = true;
    assert!(matches!(c.request(BodyT::Nack(Box::new(n))), BodyT::Ok(_)));
    model.insert("rretry".into(), retry_bodies[1..].to_vec());

    // An idempotent producer's messages, stored on shard 1 of 2.
    let stamped = numbered("stamped", 0..3);
    let mut idem = Publisher::new(broker);
    assert_eq!(
        idem.publish("", &queues[5], &stamped, &plain, Some((77, 1))),
        0
    );
    model.get_mut(&queues[5]).unwrap().extend(stamped);
    model
}

/// What the workload's model does not show: delayed and retrying messages, a dead letter's
/// history, the producer window. Checked on a broker serving the resharded layout. (Counts are
/// ready plus unacked: an earlier connection's deliveries may not be back in ready yet.)
fn check_the_rest(broker: &Broker) {
    let mut c = connect(broker);
    let held = |i: &wire::QueueInfoT| i.messages_ready + i.messages_unacked;
    let delayed = info(&mut c, &queue_placed(1, 1));
    assert_eq!(delayed.messages_delayed, 3, "delayed messages stay delayed");
    let retry = info(&mut c, "rretry");
    assert_eq!(
        (retry.messages_retrying, held(&retry)),
        (1, 2),
        "the retry still waits"
    );
    let stamped_queue = queue_placed(1, 2);
    let before = held(&info(&mut c, &stamped_queue));
    let mut idem = Publisher::new(broker);
    let dups = idem.publish(
        "",
        &stamped_queue,
        &numbered("stamped", 1..2),
        &MessageProps::default(),
        Some((77, 2)),
    );
    assert_eq!(dups, 1, "a re-send of a stored message is a duplicate");
    assert_eq!(held(&info(&mut c, &stamped_queue)), before);
    c.consume("rdlq", "dlq", 1, false);
    let f = c.recv().expect("a dead letter");
    let BodyT::Deliver(d) = f.body else {
        panic!("expected the dead letter, got {f:?}")
    };
    let deaths = d.deliveries[0].deaths.clone().unwrap_or_default();
    assert_eq!(deaths.len(), 1, "its dead-letter history moved with it");
    assert_eq!(
        (deaths[0].queue.as_deref(), deaths[0].reason),
        (Some("rdead"), wire::DeathReason::Rejected)
    );
}

#[test]
fn every_message_moves_once_in_order_from_2_to_3_to_1_shards_and_routing_and_sequences_go_on() {
    let broker = serve(&temp_dir("reshard-moves"), 2);
    let model = workload(&broker);
    let dir = stopped(broker);

    let out = reshard(&dir, 3);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("resharded from 2 to 3 shards"), "{text}");
    // Per new shard: 6 plain queues spread over 3, plus rprio and rretry.
    let moved: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("shard "))
        .map(|l| {
            let messages = l.split(", ").nth(1).unwrap();
            messages.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    let live: usize = model.values().map(Vec::len).sum::<usize>() + 3 + 1; // + delayed, retrying
    assert_eq!(moved as usize, live, "{text}");
    // Each queue went to its owner under 3 shards.
    for k in 0..3u16 {
        let owned = model.keys().filter(|q| placement(q, 3) == k).count();
        assert!(
            text.contains(&format!("shard {k}: {owned} queues, ")),
            "shard {k} should own {owned}: {text}"
        );
    }
    assert!(
        text.contains("1 durable exchanges, 3 durable bindings"),
        "{text}"
    );
    assert_eq!(layout_shards(&dir), 3);
    let again = reshard(&dir, 3);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already has 3 shards: nothing to do"),
        "{again:?}"
    );
    let refused = common::weir_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(["--cpus", "0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("holds the queues of 3 shards, but this configuration runs 1")
            && err.contains("weir data reshard --data-dir")
            && err.contains("--shards 1"),
        "{err}"
    );
    if cpus_allowed() >= 3 {
        let broker = serve(&dir, 3);
        check_exactly(&broker, &model);
        broker.crash();
    }

    reshard(&dir, 1);
    assert_eq!(layout_shards(&dir), 1);
    let broker = serve(&dir, 1);
    check_exactly(&broker, &model);
    check_the_rest(&broker);
    let dir = broker.crash();

    // Routing through the exchange still works; new publishes take fresh sequence numbers, so
    // acking them after a crash leaves exactly the older messages.
    let broker = serve(&dir, 1);
    let bound = [queue_placed(0, 0), queue_placed(0, 1), queue_placed(1, 0)];
    let mut p = Publisher::new(&broker);
    p.publish(
        "rx",
        "k",
        &numbered("after", 0..2),
        &MessageProps::default(),
        None,
    );
    for q in &bound {
        let want = model[q].len() + 2;
        let got = take(&mut p.c, q, want);
        assert_eq!(got[want - 2..][0].body, b"after 0");
        ack_all(&mut p.c, &got[..2]); // the two oldest, journaled before the reshard
    }
    let dir = broker.crash();
    let broker = serve(&dir, 1);
    let mut model = model;
    for q in &bound {
        let m = model.get_mut(q).unwrap();
        m.drain(..2);
        m.extend(numbered("after", 0..2));
    }
    check_exactly(&broker, &model);
}

/// Stops the broker with SIGTERM, so that what the workload was answered is what its journals
/// hold (a rejected message's original is settled after its dead-letter copy is confirmed, and
/// a SIGKILL in between keeps both: at least once).
fn stopped(broker: Broker) -> std::path::PathBuf {
    let dir = broker.data_dir.clone();
    let (status, stderr) = broker.terminate();
    assert!(status.success(), "{stderr}");
    dir
}

/// A 2-shard directory with the workload, stopped; and its model.
fn prepared(name: &str) -> (std::path::PathBuf, Model) {
    let broker = serve(&temp_dir(name), 2);
    let model = workload(&broker);
    (stopped(broker), model)
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_sigkill_after_any_step_leaves_one_whole_layout_and_a_rerun_finishes() {
    let (pristine, model) = prepared("reshard-steps");
    let work = pristine.with_file_name("reshard-steps-work");
    // 2 -> 1: both layouts are served on this VM.
    for step in 1.. {
        copy_dir(&pristine, &work);
        let out = reshard_command(&work, 1)
            .env(KILL_AFTER_STEP, step.to_string())
            .output()
            .unwrap();
        let finished = out.status.success();
        assert!(
            finished || out.status.signal() == Some(libc::SIGKILL),
            "step {step}: {out:?}"
        );
        let shards = layout_shards(&work);
        assert!(shards == 2 || shards == 1, "step {step}: {shards}");
        let broker = serve(&work, shards);
        check_exactly(&broker, &model);
        let work = broker.crash();
        if finished {
            assert_eq!(shards, 1);
            // The steps of 2 old shards (src/reshard.rs): leftovers, new journals opened, 2
            // shards copied, committed, synced, staged, renamed, old generation removed.
            assert_eq!(step, 10, "a run of 9 steps finished after {step} kills");
            break;
        }
        reshard(&work, 1);
        let broker = serve(&work, 1);
        check_exactly(&broker, &model);
        broker.crash();
    }
    remove_dirs(&[&pristine, &work]);
}

fn remove_dirs(dirs: &[&Path]) {
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_sigkill_at_random_moments_on_a_larger_backlog_loses_and_duplicates_nothing() {
    let broker = serve(&temp_dir("reshard-random"), 2);
    let mut p = Publisher::new(&broker);
    let queues = [queue_placed(0, 0), queue_placed(1, 1)];
    let body = vec![b'r'; 512];
    for q in &queues {
        p.c.declare(q);
        for _ in 0..3 {
            p.publish(
                "",
                q,
                &vec![body.clone(); 1000],
                &MessageProps::default(),
                None,
            );
        }
    }
    let pristine = broker.crash();
    let work = pristine.with_file_name("reshard-random-work");
    // How long a whole run takes here: the kills fall inside it.
    copy_dir(&pristine, &work);
    let started = Instant::now();
    reshard(&work, 1);
    let whole = started.elapsed();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..3 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = whole.mul_f64((seed % 1000) as f64 / 1000.0);
        copy_dir(&pristine, &work);
        let mut child = reshard_command(&work, 1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at); // when to kill, not a synchronisation
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let shards = layout_shards(&work);
        assert!(shards == 1 || shards == 2, "round {round}: {shards}");
        let what = format!("round {round}, killed at {at:?} of {whole:?}");
        check_counts(&work, shards, &queues, &what);
        reshard(&work, 1);
        check_counts(&work, 1, &queues, &format!("{what}, after the rerun"));
    }
    remove_dirs(&[&pristine, &work]);
}

/// Every queue holds its 3000 messages, no more, no fewer.
fn check_counts(dir: &Path, shards: usize, queues: &[String], what: &str) {
    let broker = serve(dir, shards);
    let mut c = connect(&broker);
    for q in queues {
        assert_eq!(info(&mut c, q).messages_ready, 3000, "{what}: {q}");
    }
    drop(c);
    broker.crash();
}

#[test]
fn a_directory_a_broker_holds_is_refused() {
    let broker = serve(&temp_dir("reshard-held"), 2);
    let out = reshard_command(&broker.data_dir, 1).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by another weir (pid"), "{err}");
    // Nothing was touched: the broker goes on serving what it holds.
    let mut c = connect(&broker);
    c.declare("still-here");
    assert_eq!(layout_shards(&broker.data_dir), 2);
}
