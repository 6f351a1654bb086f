//! Out of disk space on a real filesystem: a small ext4 image, loop-mounted. Needs root, a loop
//! device, mkfs.ext4 and mount; where any is missing the test says so on stdout and skips (the
//! fault-layer ENOSPC tests in journal_faults.rs always run).

mod journal_support;
mod loop_mount;

use std::path::Path;

use journal_support::body;
use loop_mount::small_filesystem;
use weir::rt::fs::DmaDir;
use weir::rt::{run_on_executor, spawn_detached, Pinning};
use weir::storage::{Journal, JournalConfig, StorageError, StorageLimits};

fn config() -> JournalConfig {
    JournalConfig {
        shard_id: 0,
        limits: StorageLimits {
            segment_size_bytes_max: 2 << 20,
            record_bytes_max: 60 << 10,
            commit_bytes_max: 64 << 10,
            staged_bytes_max: 256 << 10,
            read_window_bytes: 128 << 10,
            reserve_bytes: 0,
        },
    }
}

#[test]
fn a_full_real_disk_refuses_appends_keeps_every_commit_and_recovers_when_space_returns() {
    let fs = match small_filesystem() {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: no loop-mounted filesystem for the real ENOSPC test: {why}");
            return;
        }
    };
    let journal_dir = fs.mount.join("journal");
    std::fs::create_dir(&journal_dir).expect("journal dir");
    // A filler file takes part of the space; deleting it later is "space returns".
    let filler = fs.mount.join("filler");
    std::fs::write(&filler, vec![1u8; 6 << 20]).expect("filler");
    let dir = journal_dir.clone();
    let committed = run_on_executor(Pinning::Unbound, 1 << 20, move || async move {
        fill_until_full_then_resume(&dir, &filler).await
    })
    .expect("executor");
    let dir = journal_dir.clone();
    let recovered = run_on_executor(Pinning::Unbound, 1 << 20, move || async move {
        let mut got = Vec::new();
        let (j, _) = Journal::open(DmaDir::new(dir), config(), |_, _, b| got.push(b.to_vec()))
            .await
            .expect("recovers");
        spawn_detached(j.clone().run_committer());
        j.close().await;
        got
    })
    .expect("executor");
    assert_eq!(recovered.len(), committed.len());
    assert!(
        recovered == committed,
        "exactly the committed records, in order"
    );
}

async fn fill_until_full_then_resume(dir: &Path, filler: &Path) -> Vec<Vec<u8>> {
    let (j, _) = Journal::open(DmaDir::new(dir), config(), |_, _, _| {})
        .await
        .expect("opens");
    spawn_detached(j.clone().run_committer());
    let mut committed = Vec::new();
    let mut i = 0;
    let err = loop {
        let b = body(i % 40).repeat(8);
        i += 1;
        let a = match j.append_control(&b) {
            Ok(a) => a,
            Err(e) => break e,
        };
        match j.commit(&a).await {
            Ok(()) => committed.push(b),
            Err(e) => break e,
        }
        assert!(i < 100_000, "the 24 MiB filesystem never filled");
    };
    assert!(matches!(err, StorageError::NoSpace(_)), "got {err}");
    println!(
        "real ENOSPC after {} committed records: {err}",
        committed.len()
    );
    let refused = j
        .append_control(b"while full")
        .expect_err("refused while full");
    assert!(matches!(refused, StorageError::NoSpace(_)), "got {refused}");
    std::fs::remove_file(filler).expect("free space");
    j.resume_after_no_space();
    for k in 0..20 {
        let b = body(k).repeat(8);
        let a = j.append_control(&b).expect("append after space returned");
        j.commit(&a).await.expect("commit after space returned");
        committed.push(b);
    }
    j.close().await;
    committed
}
