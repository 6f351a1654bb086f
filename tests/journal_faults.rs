//! The fault-injection suite of the journal, over the in-memory fault layer: crash at every
//! operation of a scripted workload, cut the tail at every byte, tear the last block at every
//! sector, flip bits mid-log, run out of space, fail an fdatasync. Every run is checked against
//! the model in `journal_support`.

mod journal_support;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use futures_lite::future::block_on;
use journal_support::*;
use weir::storage::fault::{CrashWhen, FaultDir, Image};
use weir::storage::format::COMMIT_RECORD_BYTES;
use weir::storage::record::{parse_record, CommitRecord, RecordKind};
use weir::storage::segment::parse_segment_file_name;
use weir::storage::{StorageError, BLOCK_BYTES, SECTOR_BYTES};

/// Runs the scripted workload to the end on a fresh disk; returns the disk and the model.
fn complete_run() -> (FaultDir, Model) {
    let dir = FaultDir::new();
    dir.set_yield_each_op(true);
    let model = Rc::new(RefCell::new(Model::default()));
    block_on(scripted_workload(dir.clone(), model.clone()));
    assert!(!dir.crashed());
    let model = Rc::try_unwrap(model).expect("workload done").into_inner();
    (dir, model)
}

fn recover(
    dir: FaultDir,
) -> Result<Vec<(weir::storage::Position, RecordKind, Vec<u8>)>, StorageError> {
    block_on(async { open(dir, small_config()).await.map(|(_, r)| r) })
}

fn last_segment(dir: &FaultDir) -> String {
    dir.names()
        .into_iter()
        .filter(|n| parse_segment_file_name(n).is_some())
        .max()
        .expect("a segment")
}

/// Offsets of the commit records (chunk starts) in a segment's bytes.
fn chunk_starts(bytes: &[u8]) -> Vec<(usize, CommitRecord)> {
    (BLOCK_BYTES..bytes.len())
        .step_by(BLOCK_BYTES)
        .filter_map(|b| {
            let r = parse_record(
                &bytes[b..(b + COMMIT_RECORD_BYTES).min(bytes.len())],
                COMMIT_RECORD_BYTES,
            )
            .ok()?;
            (r.kind == RecordKind::Commit)
                .then(|| (b, CommitRecord::decode(r.body).expect("commit body")))
        })
        .collect()
}

#[test]
fn the_scripted_workload_commits_everything_and_recovers_it_exactly() {
    let (dir, model) = complete_run();
    assert_eq!(model.must(), 36, "every record was committed");
    let segments = dir.names().len();
    assert!(
        segments >= 3,
        "the workload must roll segments, made {segments}"
    );
    // The crash points below only mean something if the workload makes group commits of
    // several records and commits of several chunks.
    let chunks: Vec<CommitRecord> = dir
        .names()
        .iter()
        .flat_map(|n| chunk_starts(&dir.file_bytes(n).expect("file")))
        .map(|(_, c)| c)
        .collect();
    let commits = chunks.iter().filter(|c| c.chunk_index == 0).count();
    assert!(
        chunks.iter().any(|c| c.chunk_count > 1),
        "no multi-chunk commit: {chunks:?}"
    );
    assert!(
        commits < 30,
        "no group commit: {commits} commits for 36 records"
    );
    let recovered = recover(dir.crash_image(Image::LoseUnsynced)).expect("recovers");
    assert_eq!(recovered.len(), 36);
    model.check(&recovered, "clean run");
}

#[test]
fn crash_before_during_and_after_every_write_and_fdatasync_recovers_a_prefix_with_every_commit() {
    let ops = {
        let dir = FaultDir::new();
        dir.set_yield_each_op(true);
        block_on(scripted_workload(
            dir.clone(),
            Rc::new(RefCell::new(Model::default())),
        ));
        dir.ops()
    };
    assert!(
        ops > 24,
        "workload too small to mean anything: {ops} operations"
    );
    // A chunk write is at most 8 KiB here: tear it after every one of its 16 sectors.
    let whens: Vec<CrashWhen> = [CrashWhen::Before, CrashWhen::After]
        .into_iter()
        .chain((1..16).map(|torn_sectors| CrashWhen::During { torn_sectors }))
        .collect();
    let mut runs = 0;
    for op in 0..ops {
        for &when in &whens {
            let dir = FaultDir::new();
            dir.set_yield_each_op(true);
            dir.crash_at(op, when);
            let model = Rc::new(RefCell::new(Model::default()));
            block_on(scripted_workload(dir.clone(), model.clone()));
            assert!(dir.crashed(), "op {op} never happened");
            for image in [
                Image::LoseUnsynced,
                Image::KeepUnsynced,
                Image::KeepLastUnsynced,
            ] {
                let context = format!("crash {when:?} op {op}, image {image:?}");
                let disk = dir.crash_image(image);
                let recovered = recover(disk.clone())
                    .unwrap_or_else(|e| panic!("{context}: recovery refused: {e}"));
                model.borrow().check(&recovered, &context);
                // Recovery must be repeatable, and the journal must take appends after it.
                let again = recover(disk.clone()).expect("second recovery");
                assert_eq!(
                    again.len(),
                    recovered.len(),
                    "{context}: recovery not idempotent"
                );
                block_on(async {
                    let (j, _) = open(disk.clone(), small_config()).await.expect("reopens");
                    with_committer(&j, async {
                        let a = j.append_control(b"after the crash").expect("append");
                        j.commit(&a).await.expect("commit after recovery");
                        j.close().await;
                    })
                    .await;
                });
                let after = recover(disk).expect("recovers after new appends");
                assert_eq!(after.len(), recovered.len() + 1, "{context}");
                assert_eq!(after.last().expect("one").2, b"after the crash");
                runs += 1;
            }
        }
    }
    assert_eq!(runs, ops * whens.len() as u64 * 3);
}

#[test]
fn cutting_the_last_segment_at_every_byte_of_its_tail_keeps_every_earlier_commit() {
    let (dir, model) = complete_run();
    let name = last_segment(&dir);
    let bytes = dir.file_bytes(&name).expect("last segment");
    let chunks = chunk_starts(&bytes);
    let (last_start, last) = *chunks.last().expect("the last segment holds commits");
    // The last commit may have several chunks: its first chunk is where the cut can start to bite.
    let commit_start = chunks
        .iter()
        .find(|(_, c)| c.commit_seq == last.commit_seq)
        .map(|(o, _)| *o)
        .expect("its first chunk");
    let data_end = last_start + COMMIT_RECORD_BYTES + last.batch_bytes as usize;
    let before: usize = recover(dir.crash_image(Image::LoseUnsynced))
        .expect("recovers")
        .iter()
        .filter(|(p, _, _)| {
            p.segment() < parse_segment_file_name(&name).unwrap()
                || (p.offset() as usize) < commit_start
        })
        .count();
    assert!(before < 36, "the last commit must hold records");
    for cut in commit_start..=data_end {
        let disk = dir.crash_image(Image::LoseUnsynced);
        disk.put_file(&name, bytes[..cut].to_vec());
        let context = format!("cut {name} at {cut}");
        let recovered = recover(disk).unwrap_or_else(|e| panic!("{context}: refused: {e}"));
        model.check_prefix(&recovered, &context);
        assert!(
            recovered.len() >= before,
            "{context}: lost a commit before the cut"
        );
        let want = if cut == data_end { 36 } else { before };
        assert_eq!(recovered.len(), want, "{context}");
    }
}

#[test]
fn tearing_the_last_block_at_every_sector_cuts_only_the_unacknowledged_commit() {
    let (dir, model) = complete_run();
    let name = last_segment(&dir);
    let bytes = dir.file_bytes(&name).expect("last segment");
    let chunks = chunk_starts(&bytes);
    let (last_start, last) = *chunks.last().expect("commits");
    let data_end = last_start + COMMIT_RECORD_BYTES + last.batch_bytes as usize;
    let commit_start = chunks
        .iter()
        .find(|(_, c)| c.commit_seq == last.commit_seq)
        .map(|(o, _)| *o)
        .expect("first chunk");
    let all = recover(dir.crash_image(Image::LoseUnsynced)).expect("recovers");
    let before = all
        .iter()
        .filter(|(p, _, _)| {
            p.segment() < parse_segment_file_name(&name).unwrap()
                || (p.offset() as usize) < commit_start
        })
        .count();
    let sectors_per_block = BLOCK_BYTES / SECTOR_BYTES;
    // The last block the commit wrote, and its first block: a torn write may lose the tail
    // sectors of either.
    let blocks = [(data_end - 1) / BLOCK_BYTES * BLOCK_BYTES, commit_start];
    for block in blocks {
        for sector in 0..sectors_per_block {
            for fill in [0x00u8, 0xA5] {
                let mut torn = bytes.clone();
                let from = block + sector * SECTOR_BYTES;
                torn[from..block + BLOCK_BYTES].fill(fill);
                let disk = dir.crash_image(Image::LoseUnsynced);
                disk.put_file(&name, torn);
                let context = format!("block {block} torn from sector {sector} with {fill:#x}");
                let recovered = recover(disk).unwrap_or_else(|e| panic!("{context}: refused: {e}"));
                model.check_prefix(&recovered, &context);
                let untouched = from >= data_end;
                let want = if untouched { all.len() } else { before };
                assert_eq!(recovered.len(), want, "{context}");
            }
        }
    }
}

#[test]
fn durable_bytes_are_never_written_again_by_later_commits() {
    // The tail-block policy: every commit starts on a fresh block, so the bytes of a commit
    // that was acknowledged are never rewritten, even partially.
    let dir = FaultDir::new();
    let config = small_config();
    block_on(async {
        let (j, _) = open(dir.clone(), config).await.expect("opens");
        with_committer(&j, async {
            let mut durable: Vec<(String, Vec<u8>)> = Vec::new();
            for i in 0..30 {
                let a = j.append_control(&body(i)).expect("append");
                j.commit(&a).await.expect("commit");
                let image = dir.crash_image(Image::LoseUnsynced);
                for (name, old) in &durable {
                    let now = image.file_bytes(name).expect("segment still there");
                    let end = a.position.offset() as usize;
                    let check = if parse_segment_file_name(name) == Some(a.position.segment()) {
                        old.len().min(end)
                    } else {
                        old.len()
                    };
                    assert_eq!(
                        &now[..check],
                        &old[..check],
                        "commit {i} rewrote durable bytes of {name}"
                    );
                }
                let seg = weir::storage::segment::segment_file_name(a.position.segment());
                let used = (a.position.offset() as usize + a.len as usize).div_ceil(BLOCK_BYTES)
                    * BLOCK_BYTES;
                let bytes = image.file_bytes(&seg).expect("segment");
                durable.retain(|(n, _)| *n != seg);
                durable.push((seg, bytes[..used].to_vec()));
            }
            j.close().await;
        })
        .await;
    });
}

#[test]
fn single_bit_flips_before_the_last_commit_are_refused_never_truncated() {
    let (dir, model) = complete_run();
    let names: Vec<String> = dir.names();
    let last = last_segment(&dir);
    let mut refused = 0;
    let mut harmless = 0;
    for name in &names {
        let bytes = dir.file_bytes(name).expect("segment");
        let chunks = chunk_starts(&bytes);
        let (ls, lc) = *chunks.last().expect("commits");
        // In the last segment the last commit is the torn-write window; flips there are cut.
        let limit = if *name == last {
            chunks
                .iter()
                .find(|(_, c)| c.commit_seq == lc.commit_seq)
                .map(|(o, _)| *o)
                .expect("first chunk")
        } else {
            ls + COMMIT_RECORD_BYTES + lc.batch_bytes as usize
        };
        // Header fields, then every 7th byte of the log, bit chosen by offset.
        let offsets = (0..52).chain((BLOCK_BYTES..limit).step_by(7));
        for off in offsets {
            let mut flipped = bytes.clone();
            flipped[off] ^= 1 << (off % 8);
            let disk = dir.crash_image(Image::LoseUnsynced);
            disk.put_file(name, flipped);
            let context = format!("{name} bit {} of byte {off}", off % 8);
            match recover(disk) {
                Err(StorageError::Corrupt {
                    file,
                    offset,
                    found,
                }) => {
                    assert!(
                        file.contains(name.as_str()),
                        "{context}: error names {file}"
                    );
                    assert!(
                        offset as usize <= off + BLOCK_BYTES,
                        "{context}: error at {offset}: {found}"
                    );
                    refused += 1;
                }
                Err(StorageError::Segment { file, problem }) => {
                    assert!(
                        off < 52,
                        "{context}: segment error {problem} for a log byte"
                    );
                    assert!(file.contains(name.as_str()), "{context}: names {file}");
                    refused += 1;
                }
                Err(e) => panic!("{context}: unexpected error {e}"),
                Ok(recovered) => {
                    // Only padding (not covered by any checksum) may change unnoticed.
                    assert_eq!(
                        recovered.len(),
                        36,
                        "{context}: silently truncated to {}",
                        recovered.len()
                    );
                    model.check(&recovered, &context);
                    harmless += 1;
                }
            }
        }
    }
    assert!(refused > 1000, "refused {refused}, harmless {harmless}");
}

#[test]
fn running_out_of_space_refuses_appends_keeps_every_commit_and_recovers_when_space_returns() {
    let dir = FaultDir::new();
    let config = small_config();
    // Room for two segments; the third cannot be preallocated.
    dir.set_space_bytes_max(Some(2 * config.limits.segment_size_bytes_max + 4096));
    let mut committed: Vec<Vec<u8>> = Vec::new();
    block_on(async {
        let (j, _) = open(dir.clone(), config.clone()).await.expect("opens");
        with_committer(&j, async {
            let mut i = 0;
            let err = loop {
                let b = body(i);
                i += 1;
                let a = match j.append_control(&b) {
                    Ok(a) => a,
                    Err(e) => break e,
                };
                match j.commit(&a).await {
                    Ok(()) => committed.push(b),
                    Err(e) => break e,
                }
                assert!(i < 200, "never ran out of space");
            };
            assert!(matches!(err, StorageError::NoSpace(_)), "got {err}");
            assert!(err.to_string().contains("out of disk space"), "{err}");
            // Appends are refused while the disk is full, with the same clear error.
            let refused = j.append_control(b"while full").expect_err("refused");
            assert!(matches!(refused, StorageError::NoSpace(_)), "got {refused}");
            // Space returns: the journal works again.
            dir.set_space_bytes_max(None);
            j.resume_after_no_space();
            for k in 0..5 {
                let b = body(40 + k);
                let a = j.append_control(&b).expect("append after space returned");
                j.commit(&a).await.expect("commit after space returned");
                committed.push(b);
            }
            j.close().await;
        })
        .await;
    });
    let recovered = recover(dir.crash_image(Image::LoseUnsynced)).expect("recovers");
    let got: Vec<Vec<u8>> = recovered.into_iter().map(|r| r.2).collect();
    assert_eq!(got, committed, "exactly the committed records, in order");
}

#[test]
fn reclaiming_a_segment_gives_space_back_after_no_space() {
    let dir = FaultDir::new();
    let config = small_config();
    dir.set_space_bytes_max(Some(2 * config.limits.segment_size_bytes_max + 4096));
    block_on(async {
        let (j, _) = open(dir.clone(), config.clone()).await.expect("opens");
        with_committer(&j, async {
            let mut i = 0;
            loop {
                let a = j.append_control(&body(i)).expect("append");
                i += 1;
                if j.commit(&a).await.is_err() {
                    break;
                }
            }
            let oldest = j.segments()[0];
            assert!(!oldest.active);
            j.reclaim(oldest.number).await.expect("reclaim the oldest");
            let a = j.append_control(b"after reclaim").expect("appends again");
            j.commit(&a).await.expect("commits again");
            j.close().await;
        })
        .await;
    });
    let recovered = recover(dir.crash_image(Image::LoseUnsynced)).expect("recovers");
    assert_eq!(recovered.last().expect("records").2, b"after reclaim");
}

#[test]
fn a_failed_fdatasync_stops_the_journal_and_recovery_keeps_every_commit() {
    // Find the operation number of the third data fdatasync by running once.
    for fail_op in [6u64, 9, 14] {
        let dir = FaultDir::new();
        dir.fail_at(fail_op, io::ErrorKind::Other);
        let model = Rc::new(RefCell::new(Model::default()));
        let errors = block_on(async {
            let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
            with_committer(&j, async {
                let mut errors = Vec::new();
                for i in 0..12 {
                    match j.append_control(&body(i)) {
                        Ok(a) => {
                            let idx = model.borrow_mut().appended(body(i));
                            match j.commit(&a).await {
                                Ok(()) => model.borrow_mut().committed[idx] = true,
                                Err(e) => errors.push(e),
                            }
                        }
                        Err(e) => errors.push(e),
                    }
                }
                errors
            })
            .await
        });
        assert!(
            !errors.is_empty(),
            "op {fail_op}: the failure was not reported"
        );
        assert!(
            errors.iter().all(|e| matches!(e, StorageError::Failed(_))),
            "op {fail_op}: {errors:?}"
        );
        // Every append after the failure is refused with the same error.
        assert!(errors.len() >= 12 - model.borrow().must() - 1);
        for image in [Image::LoseUnsynced, Image::KeepUnsynced] {
            let recovered = recover(dir.crash_image(image)).expect("recovers");
            model
                .borrow()
                .check(&recovered, &format!("fail op {fail_op} {image:?}"));
        }
    }
}

#[test]
fn a_crash_at_every_operation_of_reclaim_leaves_a_recoverable_journal_missing_only_reclaimed_segments(
) {
    // Four segments of committed records; then segment 1 becomes a tombstone and segment 0 is
    // removed (taking the tombstone with it). Crash at every operation of that.
    let base = FaultDir::new();
    let mut positions = Vec::new();
    block_on(async {
        let (j, _) = open(base.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            for i in 0..60 {
                let a = j.append_control(&body(i)).expect("append");
                j.commit(&a).await.expect("commit");
                positions.push(a.position);
            }
            j.close().await;
        })
        .await;
    });
    let base = base.crash_image(Image::LoseUnsynced);
    assert!(positions.last().expect("some").segment() >= 3);
    let reclaim = |dir: FaultDir| {
        block_on(async {
            let Ok((j, _)) = open(dir, small_config()).await else {
                return;
            };
            with_committer(&j, async {
                if j.reclaim(1).await.is_ok() {
                    let _ = j.reclaim(0).await;
                }
                j.close().await;
            })
            .await;
        })
    };
    let ops = {
        let dir = base.crash_image(Image::LoseUnsynced);
        let before = dir.ops();
        reclaim(dir.clone());
        dir.ops() - before
    };
    assert!(
        ops >= 5,
        "tombstone write, sync, truncate, two removals: {ops}"
    );
    for op in 0..ops {
        for when in [
            CrashWhen::Before,
            CrashWhen::During { torn_sectors: 1 },
            CrashWhen::After,
        ] {
            let dir = base.crash_image(Image::LoseUnsynced);
            dir.crash_at(dir.ops() + op, when);
            reclaim(dir.clone());
            for image in [Image::LoseUnsynced, Image::KeepUnsynced] {
                let context = format!("reclaim crash {when:?} at op {op}, {image:?}");
                let recovered = recover(dir.crash_image(image))
                    .unwrap_or_else(|e| panic!("{context}: refused: {e}"));
                let got: Vec<u32> = recovered.iter().map(|r| r.0.segment()).collect();
                let gone: std::collections::BTreeSet<u32> =
                    (0..4).filter(|s| !got.contains(s)).collect();
                let allowed: [&[u32]; 3] = [&[], &[1], &[0, 1]];
                assert!(
                    allowed
                        .iter()
                        .any(|a| a.iter().copied().eq(gone.iter().copied())),
                    "{context}: segments {gone:?} lost"
                );
                let want: Vec<_> = positions
                    .iter()
                    .zip(0..)
                    .filter(|(p, _)| !gone.contains(&p.segment()))
                    .map(|(p, i)| (*p, body(i)))
                    .collect();
                let have: Vec<_> = recovered.into_iter().map(|r| (r.0, r.2)).collect();
                assert!(have == want, "{context}: records differ");
            }
        }
    }
}

#[test]
fn records_staged_behind_a_commit_that_ran_out_of_space_are_told_no_space_too() {
    let dir = FaultDir::new();
    dir.set_yield_each_op(true);
    // Not even the first segment can be preallocated.
    dir.set_space_bytes_max(Some(4096));
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            let first = j.append_control(b"first").expect("staged");
            // Append until a record lands in the next commit: the first one is in flight then.
            let behind = loop {
                futures_lite::future::yield_now().await;
                let a = j.append_control(b"behind").expect("staged while in flight");
                if a.commit != first.commit {
                    break a;
                }
            };
            let failed = j.commit(&first).await.expect_err("no room");
            assert!(matches!(failed, StorageError::NoSpace(_)), "got {failed}");
            let abandoned = j.commit(&behind).await.expect_err("abandoned");
            assert!(
                matches!(abandoned, StorageError::NoSpace(_)),
                "a record abandoned behind a full disk is told the disk is full, got {abandoned}"
            );
            j.close().await;
        })
        .await;
    });
}
