//! Opening a connection: TCP, the `Hello`/`Welcome` handshake, then the driver task.
//!
//! Contract: runs on the caller's task, before any driver exists: nothing else may be said
//! before `Welcome`, and the driver's codec is sized by the limits `Welcome` announces. It owns
//! the socket until it hands it to the spawned `Driver`, with whatever bytes were read past
//! `Welcome`.
//!
//! Faults handled: the broker closing before `Welcome` (`Closed(Eof)`), an `Error` answer
//! (`ProtocolVersion` for a version refusal, `Refused` otherwise), any other answer, and a
//! `Welcome` that is inconsistent (another protocol version, missing or unusable limits, shard
//! ports that do not match the shard count): `UnexpectedReply`, the connection dropped.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::{Encoder, FrameDecoder};

use super::driver::Driver;
use super::{ConnHandle, ServerInfo, Shared, READ_CHUNK_BYTES};
use crate::error::{ClientError, CloseReason};
use crate::message::Limits;

/// Opens a connection: TCP with `TCP_NODELAY`, `Hello`, `Welcome`, then the driver task.
pub(crate) async fn open(
    addr: std::net::SocketAddr,
    client_name: &str,
    protocol_version: u16,
) -> Result<ConnHandle, ClientError> {
    let mut stream = TcpStream::connect(addr).await?;
    // Small frames (acks, confirms' requests) must not wait for Nagle's timer.
    stream.set_nodelay(true)?;

    // The handshake runs before the driver exists: nothing else can be said before `Welcome`,
    // and the driver's codec is sized by the limits `Welcome` announces.
    let handshake_limits = weir_protocol::WireLimits::DEFAULT;
    let mut encoder = Encoder::new(handshake_limits);
    let mut out = BytesMut::new();
    let mut hello = wire::HelloT::default();
    hello.protocol_version = protocol_version;
    hello.client_name = Some(client_name.to_string());
    hello.client_version = Some(env!("CARGO_PKG_VERSION").to_string());
    encoder.encode(
        &weir_protocol::frame(1, BodyT::Hello(Box::new(hello))),
        &mut out,
    )?;
    stream.write_all(&out).await?;

    let decoder = FrameDecoder::new(handshake_limits);
    let mut rx = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let reply = loop {
        if let Some(frame) = decoder.decode(&mut rx)? {
            break frame;
        }
        if stream.read_buf(&mut rx).await? == 0 {
            return Err(ClientError::Closed(CloseReason::Eof));
        }
    };
    let welcome = match reply.frame().body_as_welcome() {
        Some(w) => w.unpack(),
        None => {
            return Err(match reply.frame().body_as_error() {
                Some(e) if e.code() == ErrorCode::ProtocolVersion => ClientError::ProtocolVersion {
                    message: e.message().unwrap_or("").to_string(),
                },
                Some(e) => ClientError::Refused {
                    code: e.code(),
                    message: e.message().unwrap_or("").to_string(),
                },
                None => ClientError::UnexpectedReply(format!(
                    "{:?} in answer to Hello",
                    reply.body_type()
                )),
            });
        }
    };
    let info = server_info(&welcome, protocol_version)?;
    let limits = info.limits.wire();

    let (tx, commands) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        permits: Semaphore::new(
            (info.limits.publishes_in_flight_max as usize).min(Semaphore::MAX_PERMITS),
        ),
        info,
        closed: OnceLock::new(),
        frames_sent: AtomicU64::new(0),
        answers_asked: AtomicU64::new(0),
    });
    let handle = ConnHandle { tx, shared };
    let driver = Driver::new(handle.clone(), limits, rx);
    tokio::spawn(driver.run(stream, commands));
    Ok(handle)
}

fn server_info(w: &wire::WelcomeT, asked: u16) -> Result<ServerInfo, ClientError> {
    if w.protocol_version != asked {
        return Err(ClientError::ProtocolVersion {
            message: format!(
                "the broker answered with protocol {}; this client asked for {asked}",
                w.protocol_version
            ),
        });
    }
    let limits = w
        .limits
        .as_deref()
        .ok_or_else(|| ClientError::UnexpectedReply("Welcome without limits".into()))?;
    let limits = Limits::from_wire(limits);
    limits
        .wire()
        .check()
        .map_err(|e| ClientError::UnexpectedReply(format!("Welcome announces bad limits: {e}")))?;
    if limits.publishes_in_flight_max == 0 {
        return Err(ClientError::UnexpectedReply(
            "Welcome announces publishes_in_flight_max 0".into(),
        ));
    }
    let shard_ports = w.shard_ports.clone().unwrap_or_default();
    if shard_ports.len() != usize::from(w.shard_count) || w.shard >= w.shard_count.max(1) {
        return Err(ClientError::UnexpectedReply(format!(
            "Welcome: shard {} of {} with {} shard ports",
            w.shard,
            w.shard_count,
            shard_ports.len()
        )));
    }
    Ok(ServerInfo {
        broker_version: w.broker_version.clone().unwrap_or_default(),
        protocol_version: w.protocol_version,
        shard_count: w.shard_count,
        shard: w.shard,
        shard_ports,
        limits,
        durability: w.durability,
        connection_id: w.connection_id,
    })
}
