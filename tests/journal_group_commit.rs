//! Group commit over the fault layer: one write and one fdatasync per commit however many
//! appenders, appends made while a commit is in flight go into the next one, and confirms come
//! out in position order.

mod journal_support;

use std::cell::RefCell;
use std::rc::Rc;

use futures_lite::future::block_on;
use journal_support::*;
use weir::storage::fault::FaultDir;
use weir::storage::io::join_all;
use weir::storage::Position;

#[test]
fn many_appenders_share_one_write_and_one_fdatasync() {
    let dir = FaultDir::new();
    dir.set_yield_each_op(true);
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            let ops_before = dir.ops();
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let j = j.clone();
                    async move {
                        let a = j.append_control(&[i as u8; 100]).expect("append");
                        j.commit(&a).await.expect("commit");
                        a
                    }
                })
                .collect();
            let appended = join_all(tasks).await;
            let stats = j.stats();
            // 64 x 109 bytes fit one 8 KiB chunk: one commit, one write, one fdatasync (plus
            // the creation of the first segment: create, preallocate, header write, its
            // fdatasync, directory sync).
            assert_eq!(stats.records, 64);
            assert_eq!(stats.commits, 1, "{stats:?}");
            assert_eq!(stats.fdatasyncs, 2, "{stats:?}");
            assert_eq!(
                dir.ops() - ops_before,
                5 + 2,
                "create, prealloc, header, sync, dir sync, write, sync"
            );
            assert!(appended.iter().all(|a| a.commit == appended[0].commit));
            j.close().await;
        })
        .await;
    });
}

#[test]
fn appends_made_while_a_commit_is_in_flight_go_into_the_next_commit() {
    let dir = FaultDir::new();
    dir.set_yield_each_op(true);
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            let first = j.append_control(b"first").expect("append");
            let confirmed: Rc<RefCell<Vec<Position>>> = Rc::default();
            // The first commit goes in flight (its writes yield); appends made meanwhile must
            // not join it.
            let c = confirmed.clone();
            let j2 = j.clone();
            let waiter = async move {
                j2.commit(&first).await.expect("first commit");
                c.borrow_mut().push(first.position);
            };
            let j3 = j.clone();
            let c = confirmed.clone();
            let later = async move {
                // Let the committer take the first batch and start writing.
                for _ in 0..3 {
                    futures_lite::future::yield_now().await;
                }
                let mut seen = Vec::new();
                for i in 0..10u8 {
                    seen.push(j3.append_control(&[i; 300]).expect("append"));
                }
                assert!(
                    seen.iter().all(|a| a.commit > first.commit),
                    "joined the in-flight commit"
                );
                assert!(seen.iter().all(|a| a.commit == seen[0].commit));
                for a in &seen {
                    j3.commit(a).await.expect("commit");
                    c.borrow_mut().push(a.position);
                    assert!(j3.durable_position() > a.position);
                }
            };
            futures_lite::future::zip(waiter, later).await;
            let stats = j.stats();
            assert_eq!(stats.commits, 2, "{stats:?}");
            let confirmed = confirmed.borrow().clone();
            assert_eq!(confirmed.len(), 11);
            assert!(
                confirmed.windows(2).all(|w| w[0] < w[1]),
                "confirms out of order: {confirmed:?}"
            );
            j.close().await;
        })
        .await;
    });
}
