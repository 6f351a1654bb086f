//! The recovery decision table row by row, and the journal's read, compaction and reclaim API,
//! over the in-memory fault layer.

mod journal_support;

use futures_lite::future::block_on;
use journal_support::*;
use weir::storage::fault::{FaultDir, Image};
use weir::storage::segment::{segment_file_name, SegmentHeader};
use weir::storage::{
    Journal, MessageEnvelope, Position, RecordKind, RecoveryReport, SettleReason, SettleRecord,
    StorageError, StorageLimits, Target, BLOCK_BYTES,
};

/// Records in the journals these tests damage: enough for four segments.
const N: usize = 60;

/// A journal of `records` scripted records over several segments, closed; returns the disk.
fn journal_of(records: usize) -> FaultDir {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            for i in 0..records {
                let a = j.append_control(&body(i)).expect("append");
                if i % 3 == 2 || i + 1 == records {
                    j.commit(&a).await.expect("commit");
                }
            }
            j.close().await;
        })
        .await;
    });
    dir.crash_image(Image::LoseUnsynced)
}

fn recover_with(dir: FaultDir, shard: u32) -> Result<(RecoveryReport, usize), StorageError> {
    let mut config = small_config();
    config.shard_id = shard;
    block_on(async {
        let mut n = 0;
        let (_, report) = Journal::open(dir, config, |_, _, _| n += 1).await?;
        Ok((report, n))
    })
}

fn recover(dir: FaultDir) -> Result<(RecoveryReport, usize), StorageError> {
    recover_with(dir, small_config().shard_id)
}

fn header_of(dir: &FaultDir, n: u32) -> SegmentHeader {
    SegmentHeader::decode(&dir.file_bytes(&segment_file_name(n)).expect("segment")).expect("header")
}

fn put_header(dir: &FaultDir, n: u32, h: SegmentHeader) {
    let name = segment_file_name(n);
    let mut bytes = dir.file_bytes(&name).expect("segment");
    bytes[..BLOCK_BYTES].fill(0);
    h.encode(&mut bytes[..BLOCK_BYTES]);
    dir.put_file(&name, bytes);
}

fn expect_segment_error(r: Result<(RecoveryReport, usize), StorageError>, file: &str, words: &str) {
    match r {
        Err(StorageError::Segment { file: f, problem }) => {
            assert!(f.contains(file), "error names {f}, not {file}");
            assert!(
                problem.contains(words),
                "problem {problem:?} lacks {words:?}"
            );
        }
        other => panic!("expected a segment error about {words:?}, got {other:?}"),
    }
}

#[test]
fn s1_a_clean_journal_replays_every_record() {
    let (report, n) = recover(journal_of(N)).expect("recovers");
    assert_eq!(n, N);
    assert!(report.segments >= 3 && report.cut.is_none() && report.removed_interrupted.is_none());
}

#[test]
fn s2_a_last_segment_without_a_durable_header_and_without_records_is_removed() {
    let dir = journal_of(N);
    let segments = dir.names().len() as u32;
    let name = segment_file_name(segments);
    dir.put_file(&name, vec![0; 32 << 10]);
    let (report, n) = recover(dir.clone()).expect("recovers");
    assert_eq!(n, N);
    assert!(report.removed_interrupted.expect("removed").contains(&name));
    assert!(!dir.names().contains(&name), "the file is gone");
}

#[test]
fn s3_a_foreign_or_damaged_header_is_refused_with_the_file_named() {
    let dir = journal_of(N);
    let name = segment_file_name(1);
    let mut bytes = dir.file_bytes(&name).expect("segment");
    bytes[..8].copy_from_slice(b"NOTOURS!");
    dir.put_file(&name, bytes);
    expect_segment_error(recover(dir), &name, "magic");

    // The last segment with a damaged header but records in it is not an interrupted creation.
    let dir = journal_of(N);
    let last = dir.names().len() as u32 - 1;
    let name = segment_file_name(last);
    let mut bytes = dir.file_bytes(&name).expect("segment");
    bytes[20] ^= 0x10;
    dir.put_file(&name, bytes);
    expect_segment_error(recover(dir), &name, "checksum");
}

#[test]
fn s4_an_unknown_format_version_is_refused() {
    let dir = journal_of(N);
    let mut h = header_of(&dir, 0);
    h.version = 2;
    put_header(&dir, 0, h);
    expect_segment_error(recover(dir), &segment_file_name(0), "format version 2");
}

#[test]
fn s5_a_segment_of_another_shard_is_refused() {
    let dir = journal_of(N);
    expect_segment_error(
        recover_with(dir, 8),
        &segment_file_name(0),
        "belongs to shard 7",
    );
}

#[test]
fn s6_a_renamed_segment_is_refused() {
    let dir = journal_of(N);
    let a = dir.file_bytes(&segment_file_name(0)).expect("0");
    let b = dir.file_bytes(&segment_file_name(1)).expect("1");
    dir.put_file(&segment_file_name(0), b);
    dir.put_file(&segment_file_name(1), a);
    expect_segment_error(recover(dir), &segment_file_name(0), "file name says 0");
}

#[test]
fn s7_a_gap_in_segment_numbers_is_refused_naming_the_missing_ones() {
    let dir = journal_of(N);
    dir.delete_file(&segment_file_name(1));
    expect_segment_error(
        recover(dir),
        &segment_file_name(2),
        "segments 1..1 are missing",
    );
}

#[test]
fn s9_a_commit_sequence_that_does_not_follow_is_refused() {
    let dir = journal_of(N);
    let mut h = header_of(&dir, 1);
    h.first_commit_seq += 5;
    put_header(&dir, 1, h);
    expect_segment_error(recover(dir), &segment_file_name(1), "does not follow");
}

#[test]
fn s10_files_that_are_not_segments_are_ignored_and_reported() {
    let dir = journal_of(N);
    dir.put_file("notes.txt", b"hello".to_vec());
    let (report, n) = recover(dir).expect("recovers");
    assert_eq!(n, N);
    assert_eq!(report.ignored_files, vec!["notes.txt".to_string()]);
}

#[test]
fn c3_a_sealed_segment_cut_short_is_refused_not_truncated() {
    let dir = journal_of(N);
    let name = segment_file_name(0);
    let bytes = dir.file_bytes(&name).expect("segment");
    let end = header_of(&dir, 1).prev_end as usize;
    dir.put_file(&name, bytes[..end - BLOCK_BYTES].to_vec());
    match recover(dir) {
        Err(StorageError::Corrupt {
            file,
            offset,
            found,
        }) => {
            assert!(file.contains(&name));
            assert!(offset as usize <= end - BLOCK_BYTES, "offset {offset}");
            assert!(found.contains("sealed end"), "{found}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn c5_c7_damage_followed_by_later_commits_in_the_last_segment_is_refused() {
    let dir = journal_of(N);
    // Reopen (a fresh last segment) and commit five records one by one: five commits.
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            for i in 0..5 {
                let a = j.append_control(&body(i)).expect("append");
                j.commit(&a).await.expect("commit");
            }
            j.close().await;
        })
        .await;
    });
    let last = dir.names().len() as u32 - 1;
    let name = segment_file_name(last);
    let bytes = dir.file_bytes(&name).expect("segment");
    // The first commit of the last segment, zeroed (C5) or with a flipped record byte (C7).
    for (fill, what) in [(None, "zeros"), (Some(()), "checksum")] {
        let mut b = bytes.clone();
        match fill {
            None => b[BLOCK_BYTES..BLOCK_BYTES + 64].fill(0),
            Some(()) => b[BLOCK_BYTES + 40] ^= 4,
        }
        let d = dir.crash_image(Image::LoseUnsynced);
        d.put_file(&name, b);
        match recover(d) {
            Err(StorageError::Corrupt {
                file,
                offset,
                found,
            }) => {
                assert!(file.contains(&name));
                assert!(offset as usize >= BLOCK_BYTES && (offset as usize) < 2 * BLOCK_BYTES);
                assert!(
                    found.contains("followed by valid commits"),
                    "{what}: {found}"
                );
            }
            other => panic!("{what}: expected corruption, got {other:?}"),
        }
    }
}

#[test]
fn every_durable_record_reads_back_by_position_with_and_without_a_length_hint() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            let mut appended = Vec::new();
            for i in 0..40 {
                appended.push((j.append_control(&body(i)).expect("append"), body(i)));
                if i == 0 {
                    // Not durable yet: not readable from the disk.
                    let first = appended[0].0;
                    assert!(matches!(
                        j.read(first.position, None).await,
                        Err(StorageError::NotFound { .. })
                    ));
                }
                if i % 2 == 1 {
                    let last = appended.last().expect("some").0;
                    j.commit(&last).await.expect("commit");
                }
            }
            for (a, b) in &appended {
                let r = j
                    .read(a.position, Some(a.len))
                    .await
                    .expect("read with hint");
                assert_eq!((r.kind, r.body()), (RecordKind::Control, &b[..]));
                let r = j.read(a.position, None).await.expect("read without hint");
                assert_eq!(r.body(), &b[..]);
            }
            // A position that is not a record start is refused, not misread.
            let p = appended[3].0.position;
            let bad = Position::new(p.segment(), p.offset() + 1);
            assert!(j.read(bad, None).await.is_err());
            j.close().await;
        })
        .await;
    });
}

#[test]
fn compaction_moves_live_records_forward_and_reclaim_deletes_settled_segments() {
    let dir = FaultDir::new();
    let config = small_config();
    let envelope = |seq| MessageEnvelope {
        deaths: &[],
        exchange: b"ex",
        routing_key: b"k",
        targets: vec![Target {
            queue: b"q",
            queue_seq: seq,
        }],
    };
    let (moved, all) = block_on(async {
        let (j, _) = open(dir.clone(), config.clone()).await.expect("opens");
        with_committer(&j, async {
            let mut all = Vec::new();
            for seq in 0..60u64 {
                let a = j
                    .append_message(&envelope(seq), &body(seq as usize))
                    .expect("append");
                j.commit(&a).await.expect("commit");
                all.push(a);
            }
            let segs = j.segments();
            assert!(segs.len() >= 4, "{segs:?}");
            assert!(matches!(
                j.reclaim(segs.last().expect("last").number).await,
                Err(StorageError::InUse { .. })
            ));
            // Messages 1 and 2 of segment 0 are still live: move them forward, then settle the rest.
            let mut moved = Vec::new();
            for a in &all[1..3] {
                let copy = j.relocate(a.position).await.expect("relocate");
                j.commit(&copy).await.expect("commit copy");
                moved.push((a.position, copy));
            }
            let s = SettleRecord {
                queue: b"q",
                reason: SettleReason::Acked,
                ranges: vec![(0, 0), (3, 10)],
            };
            let a = j.append_settle(&s).expect("settle");
            j.commit(&a).await.expect("commit settle");
            // A middle segment becomes a tombstone; the oldest is removed, and with it the
            // tombstone that then is the oldest.
            j.reclaim(1).await.expect("reclaim middle");
            assert!(j.segments().iter().any(|s| s.number == 1 && s.reclaimed));
            assert!(matches!(
                j.read(
                    all.iter()
                        .find(|a| a.position.segment() == 1)
                        .expect("in 1")
                        .position,
                    None
                )
                .await,
                Err(StorageError::NotFound { .. })
            ));
            j.reclaim(0).await.expect("reclaim oldest");
            assert_eq!(j.segments()[0].number, 2, "segments 0 and 1 are gone");
            for (_, copy) in &moved {
                let r = j
                    .read(copy.position, Some(copy.len))
                    .await
                    .expect("copy readable");
                let (env, msg) = MessageEnvelope::decode(r.body()).expect("message");
                assert_eq!(env.targets[0].queue, b"q");
                assert_eq!(msg, &body(env.targets[0].queue_seq as usize)[..]);
            }
            j.close().await;
            (moved, all)
        })
        .await
    });
    assert!(!dir.names().contains(&segment_file_name(0)));
    assert!(!dir.names().contains(&segment_file_name(1)));
    let mut replayed = Vec::new();
    block_on(async {
        Journal::open(dir.crash_image(Image::LoseUnsynced), config, |p, k, b| {
            replayed.push((p, k, b.to_vec()))
        })
        .await
        .expect("recovers");
    });
    // Every message of the surviving segments, the copies, and the settle record, in order.
    let survivors = all.iter().filter(|a| a.position.segment() >= 2).count();
    let messages = replayed
        .iter()
        .filter(|r| r.1 == RecordKind::Message)
        .count();
    assert_eq!(messages, survivors + moved.len());
    for (_, copy) in &moved {
        assert!(replayed.iter().any(|r| r.0 == copy.position));
    }
    assert!(replayed.iter().any(|r| r.1 == RecordKind::Settle));
}

#[test]
fn appends_beyond_the_staged_byte_bound_get_backpressure_until_a_commit_takes_them() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        // No committer yet: staging fills up.
        let mut n = 0;
        let err = loop {
            match j.append_control(&body(1)) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StorageError::Backpressure { .. }), "{err}");
        assert!(
            n >= 16,
            "staged_bytes_max is 16 KiB: {n} records of 910 bytes"
        );
        with_committer(&j, async {
            j.wait_for_room(1000).await;
            let a = j.append_control(&body(1)).expect("room again");
            j.commit(&a).await.expect("commit");
            j.close().await;
        })
        .await;
    });
}

#[test]
fn every_limit_relation_names_its_key() {
    let ok = StorageLimits::DEFAULT;
    ok.check().expect("defaults are valid");
    let cases: [(&str, StorageLimits); 5] = [
        (
            "commit_bytes_max",
            StorageLimits {
                commit_bytes_max: 5000,
                ..ok
            },
        ),
        (
            "record_bytes_max",
            StorageLimits {
                record_bytes_max: ok.commit_bytes_max,
                ..ok
            },
        ),
        (
            "segment_size_bytes_max",
            StorageLimits {
                segment_size_bytes_max: 1 << 20,
                ..ok
            },
        ),
        (
            "staged_bytes_max",
            StorageLimits {
                staged_bytes_max: 4096,
                ..ok
            },
        ),
        (
            "read_window_bytes",
            StorageLimits {
                read_window_bytes: 1 << 20,
                reserve_bytes: 0,
                ..ok
            },
        ),
    ];
    for (key, limits) in cases {
        match limits.check() {
            Err(StorageError::Limit { key: k, reason }) => assert_eq!(k, key, "{reason}"),
            other => panic!("{key}: {other:?}"),
        }
    }
}
