//! The journal on real files: glommio DMA files (O_DIRECT) under an executor started through
//! `weir::rt`, in a temporary directory on the project's disk (ext4; tmpfs would silently drop
//! O_DIRECT).

mod journal_support;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use journal_support::body;
use weir::rt::fs::DmaDir;
use weir::rt::{run_on_executor, spawn, spawn_detached, Pinning};
use weir::storage::{
    Journal, JournalConfig, MessageEnvelope, Position, RecordKind, StorageLimits, Target,
};

fn config() -> JournalConfig {
    JournalConfig {
        shard_id: 1,
        limits: StorageLimits {
            segment_size_bytes_max: 1 << 20,
            record_bytes_max: 60 << 10,
            commit_bytes_max: 64 << 10,
            staged_bytes_max: 256 << 10,
            read_window_bytes: 128 << 10,
            reserve_bytes: 0,
        },
    }
}

fn temp_dir() -> tempfile::TempDir {
    // /tmp is on the root ext4 here; the target dir is a fallback that is never tmpfs.
    tempfile::Builder::new()
        .prefix("weir-journal-")
        .tempdir_in(std::env::temp_dir())
        .expect("temp dir")
}

type Replayed = Vec<(Position, RecordKind, Vec<u8>)>;

fn open_and_replay(path: PathBuf) -> Result<Replayed, String> {
    run_on_executor(Pinning::Unbound, 1 << 20, move || async move {
        let mut replayed = Vec::new();
        let (j, _) = Journal::open(DmaDir::new(path), config(), |p, k, b| {
            replayed.push((p, k, b.to_vec()))
        })
        .await
        .map_err(|e| e.to_string())?;
        spawn_detached(j.clone().run_committer());
        j.close().await;
        Ok(replayed)
    })
    .expect("executor")
}

#[test]
fn concurrent_appenders_share_group_commits_and_every_record_reads_back_and_recovers() {
    let tmp = temp_dir();
    let path = tmp.path().to_path_buf();
    let (written, stats) = run_on_executor(Pinning::Unbound, 1 << 20, move || async move {
        let (j, _) = Journal::open(DmaDir::new(path), config(), |_, _, _| {})
            .await
            .expect("opens");
        spawn_detached(j.clone().run_committer());
        let written = Rc::new(RefCell::new(Vec::new()));
        let tasks: Vec<_> = (0..32u64)
            .map(|t| {
                let j = j.clone();
                let written = written.clone();
                spawn(async move {
                    for k in 0..8u64 {
                        let seq = t * 8 + k;
                        let env = MessageEnvelope {
                            deaths: &[],
                            exchange: b"",
                            routing_key: b"q",
                            targets: vec![Target {
                                queue: b"q",
                                queue_seq: seq,
                            }],
                        };
                        let msg = body(seq as usize);
                        j.wait_for_room(msg.len() + 64).await;
                        let a = j.append_message(&env, &msg).expect("append");
                        j.commit(&a).await.expect("commit");
                        assert!(j.durable_position() > a.position);
                        written.borrow_mut().push((a, seq, msg));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        // Every record reads back from the disk by position, byte for byte.
        let all: Vec<_> = written.borrow().clone();
        for (a, seq, msg) in &all {
            let r = j.read(a.position, Some(a.len)).await.expect("read");
            let (env, m) = MessageEnvelope::decode(r.body()).expect("message record");
            assert_eq!((env.targets[0].queue_seq, m), (*seq, &msg[..]));
        }
        let stats = j.stats();
        j.close().await;
        let written: Vec<_> = written
            .borrow()
            .iter()
            .map(|(a, _, m)| (a.position, m.clone()))
            .collect();
        (written, stats)
    })
    .expect("executor");
    assert_eq!(stats.records, 256);
    assert!(
        stats.commits < 128,
        "32 appenders awaiting their commits must share commits: {stats:?}"
    );
    let replayed = open_and_replay(tmp.path().to_path_buf()).expect("recovers");
    let mut written = written;
    written.sort_by_key(|w| w.0);
    assert_eq!(replayed.len(), written.len());
    for ((p, k, b), (wp, m)) in replayed.iter().zip(&written) {
        assert_eq!((p, *k), (wp, RecordKind::Message));
        let (_, msg) = MessageEnvelope::decode(b).expect("message");
        assert_eq!(msg, &m[..]);
    }
}

#[test]
fn on_real_files_a_torn_tail_is_cut_and_damage_mid_log_is_refused() {
    let tmp = temp_dir();
    let path = tmp.path().to_path_buf();
    // Three openings: three segments, each with a few commits.
    for round in 0..3 {
        let path = path.clone();
        run_on_executor(Pinning::Unbound, 1 << 20, move || async move {
            let (j, _) = Journal::open(DmaDir::new(path), config(), |_, _, _| {})
                .await
                .expect("opens");
            spawn_detached(j.clone().run_committer());
            for i in 0..6 {
                let a = j.append_control(&body(round * 6 + i)).expect("append");
                j.commit(&a).await.expect("commit");
            }
            j.close().await;
        })
        .expect("executor");
    }
    let mut names: Vec<_> = std::fs::read_dir(&path)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3);
    assert_eq!(open_and_replay(path.clone()).expect("clean").len(), 18);

    // Damage in the middle segment: refused, naming the file.
    let middle = std::fs::read(&names[1]).expect("read");
    let mut bad = middle.clone();
    bad[4096 + 40] ^= 0x20;
    std::fs::write(&names[1], &bad).expect("write");
    let err = open_and_replay(path.clone()).expect_err("refused");
    assert!(
        err.contains("corrupt") && err.contains(&*names[1].to_string_lossy()),
        "{err}"
    );
    std::fs::write(&names[1], &middle).expect("restore");

    // A torn last commit in the last segment: cut, the earlier commits kept.
    let last = std::fs::read(&names[2]).expect("read");
    let last_commit = (4096..last.len())
        .step_by(4096)
        .rfind(|&b| last[b..b + 9].iter().any(|&x| x != 0))
        .expect("a commit");
    let mut torn = last.clone();
    torn[last_commit + 40] ^= 0x20;
    std::fs::write(&names[2], &torn).expect("write");
    let replayed = open_and_replay(path.clone()).expect("cut, not refused");
    assert_eq!(replayed.len(), 17);
    // After that recovery the journal appends into a fresh segment and the cut stays cut.
    assert_eq!(open_and_replay(path.clone()).expect("again").len(), 17);
}
