//! Every frame type, and every field of every table, survives encode -> decode -> unpack.
//!
//! The samples (`weir_protocol::samples`) set every field to a non-default value. A schema walk
//! checks that claim against `schema/weir.fbs` itself: it parses the schema, follows the encoded
//! bytes table by table (through unions, vectors of tables and nested messages) and fails on any
//! field absent from the buffer. A field added to the schema without a sample value fails here.

use std::collections::{BTreeSet, HashMap};

use bytes::BytesMut;
use flatbuffers::{Follow, ForwardsUOffset, Table, Vector};
use weir_protocol::wire::{self, Body, BodyT, Durability, FrameT, Range};
use weir_protocol::{
    samples, verify_message, DeliveryItem, Encoder, FrameDecoder, InFrame, MessageProps,
    PublishItem, WireLimits,
};

const SCHEMA: &str = include_str!("../../schema/weir.fbs");

fn encode(frame: &FrameT) -> BytesMut {
    let mut out = BytesMut::new();
    Encoder::new(WireLimits::DEFAULT)
        .encode(frame, &mut out)
        .expect("encode");
    out
}

fn decode_one(mut buf: BytesMut) -> InFrame {
    let frame = FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .expect("decode")
        .expect("a whole frame");
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    frame
}

#[test]
fn every_body_type_has_a_sample() {
    let sampled: BTreeSet<u8> = samples::bodies().iter().map(|b| b.body_type().0).collect();
    let all: BTreeSet<u8> = Body::ENUM_VALUES
        .iter()
        .filter(|b| **b != Body::NONE)
        .map(|b| b.0)
        .collect();
    assert_eq!(
        sampled, all,
        "a body type has no sample (or a sample repeats one)"
    );
}

#[test]
fn every_sample_round_trips_through_the_object_api() {
    for frame in samples::frames() {
        let decoded = decode_one(encode(&frame));
        assert_eq!(decoded.request_id(), frame.request_id);
        assert_eq!(decoded.body_type(), frame.body.body_type());
        assert_eq!(
            decoded.frame().unpack(),
            frame,
            "round trip changed {:?}",
            frame.body.body_type()
        );
    }
}

#[test]
fn every_field_of_every_table_is_present_in_the_encoded_samples() {
    let schema = Schema::parse(SCHEMA);
    assert!(
        schema.tables.len() > 40,
        "schema parse found only {} tables",
        schema.tables.len()
    );
    let mut visited = BTreeSet::new();
    for frame in samples::frames() {
        let bytes = encode(&frame);
        // SAFETY: produced by our encoder and verified by the decoder first.
        decode_one(bytes.clone());
        let root = unsafe { <ForwardsUOffset<Table>>::follow(&bytes[4..], 0) };
        let mut missing = Vec::new();
        schema.walk("Frame", root, &mut missing, &mut visited);
        assert!(
            missing.is_empty(),
            "{:?}: fields left at their default: {missing:?}",
            frame.body.body_type()
        );
    }
    let unvisited: Vec<_> = schema
        .tables
        .keys()
        .filter(|t| !visited.contains(*t))
        .collect();
    assert!(
        unvisited.is_empty(),
        "tables no sample reaches: {unvisited:?}"
    );
}

#[test]
fn hot_path_publish_encoder_matches_the_object_api() {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = enc
        .message(
            &MessageProps {
                message_id: Some("m-1"),
                correlation_id: Some("c-1"),
                reply_to: Some("replies"),
                content_type: Some("text/plain"),
                content_encoding: Some("identity"),
                headers: &[("k", b"v"), ("k2", b"")],
                timestamp_ms: 17,
                expiration_ms: Some(5),
                priority: 3,
                deliver_at_ms: Some(99),
                persistent: false,
            },
            b"hello",
        )
        .unwrap();
    let m = verify_message(&message, &WireLimits::DEFAULT)
        .unwrap()
        .unpack();
    assert_eq!(m.message_id.as_deref(), Some("m-1"));
    assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(m.reply_to.as_deref(), Some("replies"));
    assert_eq!(m.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.content_encoding.as_deref(), Some("identity"));
    let headers: Vec<_> = m
        .headers
        .unwrap()
        .into_iter()
        .map(|h| (h.key, h.value.unwrap_or_default()))
        .collect();
    assert_eq!(
        headers,
        vec![("k".to_string(), b"v".to_vec()), ("k2".to_string(), vec![])]
    );
    assert_eq!(
        (m.timestamp_ms, m.expiration_ms, m.priority, m.deliver_at_ms),
        (17, Some(5), 3, Some(99))
    );
    assert!(!m.persistent);
    assert_eq!(m.body.as_deref(), Some(&b"hello"[..]));

    let mut out = BytesMut::new();
    let items = [
        PublishItem {
            sequence: 10,
            exchange: "",
            routing_key: "orders",
            mandatory: false,
            message: &message,
        },
        PublishItem {
            sequence: 11,
            exchange: "events",
            routing_key: "a.b",
            mandatory: true,
            message: &message,
        },
    ];
    enc.publish(&mut out, 5, Some(3), true, items).unwrap();
    let frame = decode_one(out);
    assert_eq!(frame.request_id(), 5);
    let p = frame.frame().body_as_publish().unwrap();
    assert_eq!((p.producer_id(), p.confirm()), (Some(3), true));
    let got: Vec<_> = frame
        .publish_entries()
        .map(|(e, bytes)| {
            (
                e.sequence(),
                e.exchange().unwrap_or("").to_string(),
                e.routing_key().unwrap().to_string(),
                e.mandatory(),
                bytes,
            )
        })
        .collect();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].0, got[0].1.as_str(), got[0].2.as_str(), got[0].3),
        (10, "", "orders", false)
    );
    assert_eq!(
        (got[1].0, got[1].1.as_str(), got[1].2.as_str(), got[1].3),
        (11, "events", "a.b", true)
    );
    assert_eq!(got[0].4, message);
    assert_eq!(got[1].4, message);
}

#[test]
fn hot_path_deliver_confirm_ack_and_nack_encoders_round_trip() {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = samples::message_bytes(64);
    let mut out = BytesMut::new();
    enc.deliver(
        &mut out,
        "worker-1",
        (1..=3).map(|tag| DeliveryItem {
            delivery_tag: tag,
            redelivered: tag == 2,
            delivery_count: tag as u32,
            exchange: "x",
            routing_key: "k",
            message: &message,
            deaths: &[],
        }),
    )
    .unwrap();
    let ranges = [Range::new(1, 4), Range::new(8, 8)];
    enc.confirm(&mut out, &ranges, Durability::Interval, &[Range::new(2, 3)])
        .unwrap();
    enc.ack(&mut out, 0, &ranges).unwrap();
    enc.nack(&mut out, 9, &ranges, false, None).unwrap();
    enc.nack(&mut out, 0, &ranges, true, Some(1500)).unwrap();

    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let deliver = decoder.decode(&mut out).unwrap().unwrap();
    assert_eq!(deliver.request_id(), 0);
    assert_eq!(
        deliver.frame().body_as_deliver().unwrap().consumer_tag(),
        Some("worker-1")
    );
    let d: Vec<_> = deliver
        .deliveries()
        .map(|(d, bytes)| {
            (
                d.delivery_tag(),
                d.redelivered(),
                d.delivery_count(),
                d.exchange(),
                d.routing_key(),
                bytes,
            )
        })
        .collect();
    assert_eq!(d.len(), 3);
    for (i, (tag, redelivered, count, x, k, bytes)) in d.into_iter().enumerate() {
        assert_eq!(
            (tag, redelivered, count, x, k),
            (i as u64 + 1, i == 1, i as u32 + 1, Some("x"), Some("k"))
        );
        assert_eq!(bytes, message);
    }

    let expect = |frame: InFrame, want: FrameT| assert_eq!(frame.frame().unpack(), want);
    let rt = |r: &[Range]| r.iter().map(|r| r.unpack()).collect::<Vec<_>>();
    let mut confirm = wire::ConfirmT::default();
    confirm.ranges = rt(&ranges);
    confirm.durability = Durability::Interval;
    confirm.duplicates = Some(rt(&[Range::new(2, 3)]));
    expect(
        decoder.decode(&mut out).unwrap().unwrap(),
        weir_protocol::frame(0, BodyT::Confirm(Box::new(confirm))),
    );
    let mut ack = wire::AckT::default();
    ack.ranges = rt(&ranges);
    expect(
        decoder.decode(&mut out).unwrap().unwrap(),
        weir_protocol::frame(0, BodyT::Ack(Box::new(ack))),
    );
    let mut nack = wire::NackT::default();
    nack.ranges = rt(&ranges);
    nack.requeue = false;
    expect(
        decoder.decode(&mut out).unwrap().unwrap(),
        weir_protocol::frame(9, BodyT::Nack(Box::new(nack))),
    );
    let mut retry = wire::NackT::default();
    retry.ranges = rt(&ranges);
    retry.requeue = true;
    retry.delay_ms = Some(1500);
    expect(
        decoder.decode(&mut out).unwrap().unwrap(),
        weir_protocol::frame(0, BodyT::Nack(Box::new(retry))),
    );
    assert!(out.is_empty());
}

#[test]
fn message_bytes_are_sliced_from_the_receive_buffer_not_copied() {
    let frame = samples::frames()
        .into_iter()
        .find(|f| matches!(f.body, BodyT::Publish(_)))
        .unwrap();
    let buf = encode(&frame);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let decoded = decode_one(buf);
    let mut n = 0;
    for (_, bytes) in decoded.publish_entries() {
        let start = bytes.as_ptr() as usize;
        assert!(
            range.contains(&start) && start + bytes.len() <= range.end,
            "message was copied out of the frame"
        );
        n += 1;
    }
    assert_eq!(n, 2);
}

// ---- a minimal reader of schema/weir.fbs, enough to walk encoded tables field by field ----

#[derive(Debug)]
struct Field {
    name: String,
    ty: String,
    nested: Option<String>,
}

struct Schema {
    tables: HashMap<String, Vec<Field>>,
    unions: HashMap<String, Vec<String>>,
}

impl Schema {
    fn parse(text: &str) -> Schema {
        let text: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let mut tables = HashMap::new();
        let mut unions = HashMap::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            let head = rest[..open]
                .split(';')
                .next_back()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>();
            let close = open + rest[open..].find('}').unwrap();
            let inner = &rest[open + 1..close];
            match head.as_slice() {
                ["table", name] => {
                    let fields = inner
                        .split(';')
                        .filter(|f| f.contains(':'))
                        .map(|f| {
                            let (name, ty) = f.split_once(':').unwrap();
                            let ty = ty.split(['=', '(']).next().unwrap().trim().to_string();
                            let nested = f.split("nested_flatbuffer:").nth(1).map(|n| {
                                n.trim().trim_matches(|c| c == '"' || c == ')').to_string()
                            });
                            Field {
                                name: name.trim().to_string(),
                                ty,
                                nested,
                            }
                        })
                        .collect();
                    tables.insert(name.to_string(), fields);
                }
                ["union", name] => {
                    let members = inner
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect();
                    unions.insert(name.to_string(), members);
                }
                _ => {}
            }
            rest = &rest[close + 1..];
        }
        Schema { tables, unions }
    }

    /// Records every field of `table_name` (and of the tables it reaches) that the buffer lacks.
    fn walk(
        &self,
        table_name: &str,
        table: Table<'_>,
        missing: &mut Vec<String>,
        visited: &mut BTreeSet<String>,
    ) {
        visited.insert(table_name.to_string());
        let vtable = table.vtable();
        let mut slot = 0u16;
        for field in &self.tables[table_name] {
            let union = self.unions.get(&field.ty);
            let type_slot = 4 + 2 * slot;
            if union.is_some() {
                slot += 1; // a union occupies two slots: its type byte, then its value
            }
            let voffset = 4 + 2 * slot;
            slot += 1;
            if vtable.get(voffset) == 0 {
                missing.push(format!("{table_name}.{}", field.name));
                continue;
            }
            // SAFETY (all `get`s below): the buffer was verified by the decoder; types come from the
            // schema it was generated from.
            if let Some(members) = union {
                let tag = unsafe { table.get::<u8>(type_slot, Some(0)) }.unwrap();
                let member = &members[usize::from(tag) - 1];
                let sub = unsafe { table.get::<ForwardsUOffset<Table>>(voffset, None) }.unwrap();
                self.walk(member, sub, missing, visited);
            } else if self.tables.contains_key(&field.ty) {
                let sub = unsafe { table.get::<ForwardsUOffset<Table>>(voffset, None) }.unwrap();
                self.walk(&field.ty, sub, missing, visited);
            } else if let Some(elem) = field.ty.strip_prefix('[').and_then(|t| t.strip_suffix(']'))
            {
                if self.tables.contains_key(elem) {
                    let items = unsafe {
                        table.get::<ForwardsUOffset<Vector<ForwardsUOffset<Table>>>>(voffset, None)
                    }
                    .unwrap();
                    assert!(
                        !items.is_empty(),
                        "{table_name}.{} is an empty list in the sample",
                        field.name
                    );
                    for item in items {
                        self.walk(elem, item, missing, visited);
                    }
                } else if let Some(nested) = &field.nested {
                    let bytes = unsafe { table.get::<ForwardsUOffset<Vector<u8>>>(voffset, None) }
                        .unwrap()
                        .bytes();
                    let root = unsafe { <ForwardsUOffset<Table>>::follow(bytes, 0) };
                    self.walk(nested, root, missing, visited);
                }
            }
        }
    }
}

#[test]
fn ranges_coalesce_sorted_and_deduplicated() {
    let r = weir_protocol::ranges_of(vec![5, 1, 2, 3, 9, 10, 3]);
    assert_eq!(
        r,
        vec![Range::new(1, 3), Range::new(5, 5), Range::new(9, 10)]
    );
    assert!(weir_protocol::ranges_of(vec![]).is_empty());
}
