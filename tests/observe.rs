//! The connection listing over the wire (two shards, raw frames so that pages can be small):
//! every connection of both shards, with the name it gave in `Hello` and its address, in id
//! order across pages, `more` set on every page but the last.

mod common;

use common::{temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT};
use weir_protocol::PROTOCOL_VERSION;

fn hello(c: &mut Client, name: &str) {
    let mut hello = wire::HelloT::default();
    hello.protocol_version = PROTOCOL_VERSION;
    hello.client_name = Some(name.into());
    match c.request(BodyT::Hello(Box::new(hello))) {
        BodyT::Welcome(_) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn page(c: &mut Client, after: Option<u64>, limit: u32) -> wire::ConnectionListT {
    let mut l = wire::ListConnectionsT::default();
    l.after = after;
    l.limit = limit;
    match c.request(BodyT::ListConnections(Box::new(l))) {
        BodyT::ConnectionList(list) => *list,
        other => panic!("expected ConnectionList, got {other:?}"),
    }
}

#[test]
fn connections_of_every_shard_are_listed_in_pages_with_their_names_and_peers() {
    let broker = Broker::start(&temp_dir("observe-connections"), &["--cpus", "0,1"]);
    let mut clients: Vec<(u16, Client)> = Vec::new();
    for i in 0..5u16 {
        let shard = i % 2;
        let mut c = broker.connect_shard(shard as usize);
        hello(&mut c, &format!("lister-{i}"));
        clients.push((shard, c));
    }
    let asker = &mut clients[0].1;
    let (mut listed, mut after, mut pages) = (Vec::new(), None, 0);
    loop {
        let list = page(asker, after, 2);
        let got = list.connections.unwrap_or_default();
        assert!(got.len() <= 2, "a page of at most the limit: {got:?}");
        pages += 1;
        after = got.last().map(|c| c.id);
        listed.extend(got);
        if !list.more {
            break;
        }
        assert!(pages < 10, "more set past the end");
    }
    assert_eq!(pages, 3, "5 connections in pages of 2");
    let ids: Vec<u64> = listed.iter().map(|c| c.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {ids:?}");
    for i in 0..5u16 {
        let name = format!("lister-{i}");
        let c = listed
            .iter()
            .find(|c| c.client_name.as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} listed: {listed:?}"));
        assert_eq!(c.shard, i % 2, "{c:?}");
        let peer = c.peer.as_deref().unwrap_or_default();
        assert!(peer.starts_with("127.0.0.1:"), "{c:?}");
        assert!(
            c.bytes_received > 0 && c.bytes_sent > 0,
            "the handshake both ways: {c:?}"
        );
    }
    // A connection that goes is no longer listed.
    drop(clients.pop());
    let asker = &mut clients[0].1;
    let gone = (0..1000).find(|_| page(asker, None, 0).connections.unwrap_or_default().len() == 4);
    assert!(gone.is_some(), "the closed connection left the listing");
}
