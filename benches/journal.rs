//! Journal benchmark: group-commit throughput and commit latency against the raw limit of the
//! disk, measured in the same run. `cargo bench --bench journal` prints one table.
//!
//! Everything runs on one glommio executor pinned to cpu 0 (through `weir::rt`), on files in
//! `$WEIR_BENCH_DIR` (default: the system temp dir, ext4 on the project's disk here; never tmpfs,
//! which silently drops O_DIRECT). Durability is `fsync = always`: every commit is one or a few
//! O_DIRECT writes and one fdatasync, and a record's latency runs from its `append` to the
//! resolution of its `commit`. Each appender is a task with one record in flight: it appends,
//! awaits the commit, and appends again (closed loop, so there is no coordinated omission to
//! correct within a run: the latency measured is the latency every appender waited).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use weir::rt::fs::{DmaDir, DmaSegmentFile};
use weir::rt::{run_on_executor, spawn, spawn_detached, yield_if_needed, Pinning};
use weir::storage::io::{IoBuf, SegmentFile};
use weir::storage::{Journal, JournalConfig, MessageEnvelope, StorageLimits, Target};

const WARMUP: Duration = Duration::from_millis(300);
const MEASURE: Duration = Duration::from_millis(1500);

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn us(ns: u64) -> String {
    format!("{:.0}", ns as f64 / 1000.0)
}

struct Raw {
    seq_mib_s: f64,
    seq_mib: f64,
    sync4k: Histogram<u64>,
    write4k: Histogram<u64>,
}

/// The disk's limit: 1 MiB O_DIRECT writes, each followed by an fdatasync, into a preallocated
/// file (as journal segments are); then 4 KiB write + fdatasync latency.
async fn raw_disk(dir: &Path) -> Raw {
    let path = dir.join("raw-seq");
    let f = DmaSegmentFile::open_raw(&path)
        .await
        .expect("open raw file");
    let size: u64 = 1 << 30;
    f.preallocate(size).await.expect("preallocate");
    let mib = 1usize << 20;
    let start = Instant::now();
    let mut pos = 0u64;
    while start.elapsed() < Duration::from_secs(2) && pos + mib as u64 <= size {
        let mut b = DmaSegmentFile::alloc(mib);
        b.bytes_mut().fill(0x5A);
        let n = f.write_at(b, pos).await.expect("write");
        assert_eq!(n, mib);
        f.fdatasync().await.expect("fdatasync");
        pos += mib as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let seq_mib = pos as f64 / mib as f64;
    f.close().await.expect("close");
    let _ = std::fs::remove_file(&path);

    let path = dir.join("raw-4k");
    let f = DmaSegmentFile::open_raw(&path)
        .await
        .expect("open raw file");
    f.preallocate(64 << 20).await.expect("preallocate");
    let mut sync4k = hist();
    let mut write4k = hist();
    for i in 0..3000u64 {
        let mut b = DmaSegmentFile::alloc(4096);
        b.bytes_mut().fill(i as u8);
        let t0 = Instant::now();
        f.write_at(b, i * 4096).await.expect("write");
        let t1 = Instant::now();
        f.fdatasync().await.expect("fdatasync");
        let t2 = Instant::now();
        if i >= 200 {
            write4k.saturating_record((t2 - t0).as_nanos() as u64);
            sync4k.saturating_record((t2 - t1).as_nanos() as u64);
        }
    }
    f.close().await.expect("close");
    let _ = std::fs::remove_file(&path);
    Raw {
        seq_mib_s: seq_mib / secs,
        seq_mib,
        sync4k,
        write4k,
    }
}

struct Run {
    records: u64,
    payload_bytes: u64,
    secs: f64,
    commits: u64,
    bytes_written: u64,
    latency: Histogram<u64>,
}

fn bench_config() -> JournalConfig {
    JournalConfig {
        shard_id: 0,
        limits: StorageLimits::DEFAULT,
    }
}

async fn journal_run(dir: &Path, record: usize, appenders: usize) -> Run {
    let (j, _) = Journal::open(DmaDir::new(dir), bench_config(), |_, _, _| {})
        .await
        .expect("open journal");
    spawn_detached(j.clone().run_committer());
    let latency = Rc::new(RefCell::new(hist()));
    let counted = Rc::new(RefCell::new((0u64, 0u64)));
    let t_start = Instant::now();
    let measure_from = t_start + WARMUP;
    let end = measure_from + MEASURE;
    let stats_at_start = Rc::new(RefCell::new(None));
    let tasks: Vec<_> = (0..appenders)
        .map(|a| {
            let j = j.clone();
            let latency = latency.clone();
            let counted = counted.clone();
            let stats_at_start = stats_at_start.clone();
            spawn(async move {
                let payload = vec![a as u8; record];
                let mut seq = 0u64;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    if now >= measure_from && stats_at_start.borrow().is_none() {
                        *stats_at_start.borrow_mut() = Some(j.stats());
                    }
                    let queue = [b'q', (a % 251) as u8];
                    let env = MessageEnvelope {
                        deaths: &[],
                        exchange: b"",
                        routing_key: &queue,
                        targets: vec![Target {
                            queue: &queue,
                            queue_seq: seq,
                        }],
                    };
                    seq += 1;
                    let t0 = Instant::now();
                    j.wait_for_room(record + 64).await;
                    let appended = j.append_message(&env, &payload).expect("append");
                    j.commit(&appended).await.expect("commit");
                    let t1 = Instant::now();
                    if t0 >= measure_from && t1 <= end {
                        latency
                            .borrow_mut()
                            .saturating_record((t1 - t0).as_nanos() as u64);
                        let mut c = counted.borrow_mut();
                        c.0 += 1;
                        c.1 += record as u64;
                    }
                    yield_if_needed().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let stats_end = j.stats();
    j.close().await;
    let s0 = stats_at_start.borrow().unwrap_or_default();
    let (records, payload_bytes) = *counted.borrow();
    let latency = latency.borrow().clone();
    Run {
        records,
        payload_bytes,
        secs: MEASURE.as_secs_f64(),
        commits: stats_end.commits - s0.commits,
        bytes_written: stats_end.bytes_written - s0.bytes_written,
        latency,
    }
}

/// Writes about 1 GiB of 16 KiB records, then times a full recovery (open and replay).
async fn recovery_run(dir: &Path) -> (u64, u64, f64) {
    let (j, _) = Journal::open(DmaDir::new(dir), bench_config(), |_, _, _| {})
        .await
        .expect("open journal");
    spawn_detached(j.clone().run_committer());
    let payload = vec![7u8; 16 << 10];
    let mut written = 0u64;
    let mut last = None;
    while written < 1 << 30 {
        j.wait_for_room(payload.len() + 64).await;
        last = Some(j.append_control(&payload).expect("append"));
        written += payload.len() as u64;
        if written.is_multiple_of(4 << 20) {
            yield_if_needed().await;
        }
    }
    j.commit(&last.expect("appended")).await.expect("commit");
    j.close().await;
    let t0 = Instant::now();
    let mut records = 0u64;
    let mut bytes = 0u64;
    let (j, _) = Journal::open(DmaDir::new(dir), bench_config(), |_, _, b| {
        records += 1;
        bytes += b.len() as u64;
    })
    .await
    .expect("recover");
    let secs = t0.elapsed().as_secs_f64();
    spawn_detached(j.clone().run_committer());
    j.close().await;
    (records, bytes, secs)
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag: do nothing
    // then, so the test suite stays fast.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = std::env::var_os("WEIR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("weir-journal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("bench root");
    let root2 = root.clone();
    let out = run_on_executor(Pinning::Cpu(0), 64 << 20, move || async move {
        let root = root2;
        let raw = raw_disk(&fresh_dir(&root, "raw")).await;
        let mut rows = Vec::new();
        for record in [100usize, 1024, 16 << 10] {
            for appenders in [1usize, 16, 256] {
                let dir = fresh_dir(&root, &format!("j-{record}-{appenders}"));
                let run = journal_run(&dir, record, appenders).await;
                let _ = std::fs::remove_dir_all(&dir);
                rows.push((record, appenders, run));
            }
        }
        let dir = fresh_dir(&root, "recovery");
        let recovery = recovery_run(&dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        (raw, rows, recovery)
    })
    .expect("executor");
    let _ = std::fs::remove_dir_all(&root);
    let (raw, rows, (rec_records, rec_bytes, rec_secs)) = out;

    println!();
    println!(
        "weir journal benchmark: one glommio executor pinned to cpu 0 (appenders, committer and \
         I/O on one core), fsync=always (one fdatasync per commit), O_DIRECT, preallocated 64 MiB \
         segments, commit_bytes_max 1 MiB, staged_bytes_max 8 MiB; files under {}",
        root.parent().unwrap_or(&root).display()
    );
    println!(
        "machine: {} vCPU, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_default()
    );
    println!();
    println!("raw disk limit (same run):");
    println!(
        "  O_DIRECT sequential 1 MiB writes, fdatasync after each: {:.0} MiB/s ({:.0} MiB written)",
        raw.seq_mib_s, raw.seq_mib
    );
    println!(
        "  4 KiB O_DIRECT write + fdatasync (2800 samples): write+sync p50 {} us, p99 {} us, p99.9 {} us; fdatasync alone p50 {} us, p99 {} us",
        us(raw.write4k.value_at_quantile(0.5)),
        us(raw.write4k.value_at_quantile(0.99)),
        us(raw.write4k.value_at_quantile(0.999)),
        us(raw.sync4k.value_at_quantile(0.5)),
        us(raw.sync4k.value_at_quantile(0.99)),
    );
    println!();
    println!(
        "| record | appenders | records/s | payload MiB/s | % of raw 1 MiB+sync | commits/s | records/commit | written KiB/commit | commit p50 us | p99 us | p99.9 us | max us |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (record, appenders, r) in &rows {
        let mib_s = r.payload_bytes as f64 / r.secs / (1 << 20) as f64;
        let commits = r.commits.max(1);
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.0}% | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
            if *record >= 1024 {
                format!("{} KiB", record / 1024)
            } else {
                format!("{record} B")
            },
            appenders,
            r.records as f64 / r.secs,
            mib_s,
            100.0 * mib_s / raw.seq_mib_s,
            r.commits as f64 / r.secs,
            r.records as f64 / commits as f64,
            r.bytes_written as f64 / commits as f64 / 1024.0,
            us(r.latency.value_at_quantile(0.5)),
            us(r.latency.value_at_quantile(0.99)),
            us(r.latency.value_at_quantile(0.999)),
            us(r.latency.max()),
        );
    }
    println!();
    if let Some((_, _, r)) = rows.iter().find(|(s, a, _)| *s == 1024 && *a == 256) {
        let mib_s = r.payload_bytes as f64 / r.secs / (1 << 20) as f64;
        println!(
            "target 1: 256 appenders x 1 KiB = {:.0} MiB/s = {:.0}% of raw {:.0} MiB/s (target >= 70%)",
            mib_s,
            100.0 * mib_s / raw.seq_mib_s,
            raw.seq_mib_s
        );
        println!(
            "target 2: commit p99 {} us vs 3 x raw 4 KiB write+fdatasync p99 = {} us",
            us(r.latency.value_at_quantile(0.99)),
            us(3 * raw.write4k.value_at_quantile(0.99))
        );
    }
    println!(
        "target 3: recovery of {:.2} GiB ({} records) took {:.2} s (target <= 2 s)",
        rec_bytes as f64 / (1u64 << 30) as f64,
        rec_records,
        rec_secs
    );
}
