//! The session state machine: what one connection may say when, and what the broker answers.
//!
//! Contract: no I/O. The connection shell hands it each decoded frame (or decode error) and an
//! output buffer; it appends the replies and says whether the connection goes on. It owns the
//! connection's protocol state (awaiting `Hello`, open, closing) and nothing else; requests that
//! touch queues go to the shard through `SessionCtx` (later work).
//!
//! Faults handled: frames before `Hello`, a second `Hello`, a wrong protocol version, frames only
//! the broker may send, malformed frames (each gets an `Error` frame; fatal ones close this
//! connection and nothing else), and frame types this broker does not serve yet (an `Error`
//! naming the frame; the connection goes on).

use bytes::BytesMut;
use weir_protocol::wire::{self, Body, BodyT, ErrorCode};
use weir_protocol::{Encoder, InFrame, ProtocolError, WireLimits, PROTOCOL_VERSION};

/// What the session needs to know about its broker and shard.
#[derive(Clone, Debug)]
pub struct SessionCtx {
    pub broker_version: &'static str,
    pub shard: u16,
    pub shard_ports: Vec<u16>,
    pub durability: wire::Durability,
    pub limits: WireLimits,
    pub publishes_in_flight_max: u32,
    pub prefetch_max: u32,
    pub connection_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    Closing,
}

/// Whether the connection goes on after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send what was written, then close.
    Close,
}

pub struct Session {
    ctx: SessionCtx,
    state: State,
    encoder: Encoder,
}

impl Session {
    pub fn new(ctx: SessionCtx) -> Session {
        let encoder = Encoder::new(ctx.limits);
        Session {
            ctx,
            state: State::AwaitingHello,
            encoder,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Answers one decoded frame.
    pub fn on_frame(&mut self, frame: &InFrame, out: &mut BytesMut) -> Flow {
        let request_id = frame.request_id();
        let body = frame.body_type();
        match (self.state, body) {
            (State::Closing, _) => Flow::Close,
            (State::AwaitingHello, Body::Hello) => {
                let hello = frame.frame().body_as_hello().expect("body type checked");
                if hello.protocol_version() != PROTOCOL_VERSION {
                    let msg = format!(
                        "this broker speaks weir protocol {PROTOCOL_VERSION}; the client asked for {}",
                        hello.protocol_version()
                    );
                    return self.fail(out, request_id, ErrorCode::ProtocolVersion, msg, true);
                }
                self.state = State::Open;
                let welcome = self.welcome();
                self.reply(out, request_id, welcome)
            }
            (State::AwaitingHello, _) => {
                let msg = format!("expected Hello as the first frame, got {}", name(body));
                self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
            }
            (State::Open, Body::Hello) => self.fail(
                out,
                request_id,
                ErrorCode::UnexpectedFrame,
                "Hello was already received".into(),
                true,
            ),
            (State::Open, Body::Ping) => {
                let payload = frame
                    .frame()
                    .body_as_ping()
                    .expect("body type checked")
                    .payload();
                let mut pong = wire::PongT::default();
                pong.payload = payload;
                self.reply(out, request_id, BodyT::Pong(Box::new(pong)))
            }
            (State::Open, Body::Close) => {
                self.state = State::Closing;
                self.reply(out, request_id, BodyT::Ok(Box::default()));
                Flow::Close
            }
            (State::Open, b) if broker_only(b) => {
                let msg = format!("{} is sent by the broker, never to it", name(b));
                self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
            }
            (State::Open, b) => {
                let msg = format!("{} is not served by this broker version yet", name(b));
                self.fail(out, request_id, ErrorCode::UnsupportedFrame, msg, false)
            }
        }
    }

    /// Answers a frame the decoder refused. Fatal errors close the connection.
    pub fn on_decode_error(&mut self, error: &ProtocolError, out: &mut BytesMut) -> Flow {
        self.fail(out, 0, error.code(), error.to_string(), error.is_fatal())
    }

    /// Tells the client the broker is going away, then closes.
    pub fn on_shutdown(&mut self, out: &mut BytesMut) -> Flow {
        self.fail(
            out,
            0,
            ErrorCode::ShuttingDown,
            "the broker is shutting down".into(),
            true,
        )
    }

    /// Refuses a connection over `connections_per_shard_max`.
    pub fn refuse_over_limit(&mut self, out: &mut BytesMut, max: u32) -> Flow {
        let msg =
            format!("this shard already serves connections_per_shard_max = {max} connections");
        self.fail(out, 0, ErrorCode::ConnectionLimit, msg, true)
    }

    fn welcome(&self) -> BodyT {
        let c = &self.ctx;
        let mut limits = wire::LimitsT::default();
        limits.frame_size_max = c.limits.frame_size_max;
        limits.message_size_max = c.limits.message_size_max;
        limits.publish_batch_max = c.limits.publish_batch_max;
        limits.deliver_batch_max = c.limits.deliver_batch_max;
        limits.publishes_in_flight_max = c.publishes_in_flight_max;
        limits.prefetch_max = c.prefetch_max;
        limits.name_length_max = c.limits.name_length_max;
        limits.headers_max = c.limits.headers_max;
        let mut w = wire::WelcomeT::default();
        w.protocol_version = PROTOCOL_VERSION;
        w.broker_version = Some(c.broker_version.to_string());
        w.shard_count = c.shard_ports.len() as u16;
        w.shard = c.shard;
        w.shard_ports = Some(c.shard_ports.clone());
        w.limits = Some(Box::new(limits));
        w.durability = c.durability;
        w.connection_id = c.connection_id;
        BodyT::Welcome(Box::new(w))
    }

    fn reply(&mut self, out: &mut BytesMut, request_id: u64, body: BodyT) -> Flow {
        // Replies are small control frames built from our own values; failing to encode one
        // is a broker bug, and the connection cannot go on without its reply.
        match self
            .encoder
            .encode(&weir_protocol::frame(request_id, body), out)
        {
            Ok(_) => Flow::Continue,
            Err(e) => {
                tracing::error!(
                    connection = self.ctx.connection_id,
                    "cannot encode a reply: {e}"
                );
                self.state = State::Closing;
                Flow::Close
            }
        }
    }

    fn fail(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        code: ErrorCode,
        message: String,
        close: bool,
    ) -> Flow {
        tracing::debug!(
            connection = self.ctx.connection_id,
            ?code,
            close,
            "{message}"
        );
        let mut e = wire::ErrorT::default();
        e.code = code;
        e.message = Some(message);
        e.close = close;
        let flow = self.reply(out, request_id, BodyT::Error(Box::new(e)));
        if close {
            self.state = State::Closing;
            return Flow::Close;
        }
        flow
    }
}

fn name(body: Body) -> &'static str {
    body.variant_name().unwrap_or("an unknown frame")
}

/// Frames only the broker sends.
fn broker_only(body: Body) -> bool {
    matches!(
        body,
        Body::Welcome
            | Body::Pong
            | Body::Ok
            | Body::Error
            | Body::Blocked
            | Body::Unblocked
            | Body::QueueInfo
            | Body::QueueDeleted
            | Body::QueuePurged
            | Body::QueueList
            | Body::ExchangeList
            | Body::BindingList
            | Body::Confirm
            | Body::Return
            | Body::ConsumeOk
            | Body::ConsumerCancelled
            | Body::Deliver
            | Body::GetOk
            | Body::Status
    )
}

#[cfg(test)]
mod tests {
    use weir_protocol::{samples, FrameDecoder};

    use super::*;

    fn ctx() -> SessionCtx {
        SessionCtx {
            broker_version: "0.1.0",
            shard: 1,
            shard_ports: vec![7001, 7002],
            durability: wire::Durability::Always,
            limits: WireLimits::DEFAULT,
            publishes_in_flight_max: 100,
            prefetch_max: 1000,
            connection_id: 42,
        }
    }

    fn frame(body: BodyT) -> InFrame {
        let mut buf = BytesMut::new();
        Encoder::new(WireLimits::DEFAULT)
            .encode(&weir_protocol::frame(9, body), &mut buf)
            .unwrap();
        FrameDecoder::new(WireLimits::DEFAULT)
            .decode(&mut buf)
            .unwrap()
            .unwrap()
    }

    fn hello(version: u16) -> InFrame {
        let mut h = wire::HelloT::default();
        h.protocol_version = version;
        frame(BodyT::Hello(Box::new(h)))
    }

    fn replies(out: &mut BytesMut) -> Vec<wire::FrameT> {
        let decoder = FrameDecoder::new(WireLimits::DEFAULT);
        std::iter::from_fn(|| decoder.decode(out).unwrap())
            .map(|f| f.frame().unpack())
            .collect()
    }

    fn error_of(f: &wire::FrameT) -> (ErrorCode, bool) {
        match &f.body {
            BodyT::Error(e) => (e.code, e.close),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn hello_gets_a_welcome_with_the_shard_layout_and_limits() {
        let mut s = Session::new(ctx());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(&hello(PROTOCOL_VERSION), &mut out),
            Flow::Continue
        );
        let r = replies(&mut out);
        assert_eq!(r[0].request_id, 9);
        let BodyT::Welcome(w) = &r[0].body else {
            panic!("{:?}", r[0])
        };
        assert_eq!((w.shard, w.shard_count, w.connection_id), (1, 2, 42));
        assert_eq!(w.shard_ports.as_deref(), Some(&[7001, 7002][..]));
        assert_eq!(w.limits.as_ref().unwrap().publishes_in_flight_max, 100);
        assert!(s.is_open());
    }

    #[test]
    fn a_wrong_protocol_version_is_refused_and_closed() {
        let mut s = Session::new(ctx());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(&hello(PROTOCOL_VERSION + 1), &mut out),
            Flow::Close
        );
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::ProtocolVersion, true)
        );
    }

    #[test]
    fn anything_before_hello_or_a_second_hello_is_refused_and_closed() {
        let mut s = Session::new(ctx());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(&frame(BodyT::Ping(Box::default())), &mut out),
            Flow::Close
        );
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::UnexpectedFrame, true)
        );

        let mut s = Session::new(ctx());
        s.on_frame(&hello(PROTOCOL_VERSION), &mut out);
        replies(&mut out);
        assert_eq!(s.on_frame(&hello(PROTOCOL_VERSION), &mut out), Flow::Close);
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::UnexpectedFrame, true)
        );
    }

    #[test]
    fn every_broker_only_frame_from_a_client_closes_and_every_other_is_answered() {
        for body in samples::bodies() {
            let kind = body.body_type();
            if matches!(kind, Body::Hello | Body::Close) {
                continue;
            }
            let mut s = Session::new(ctx());
            let mut out = BytesMut::new();
            s.on_frame(&hello(PROTOCOL_VERSION), &mut out);
            replies(&mut out);
            let flow = s.on_frame(&frame(body), &mut out);
            let r = replies(&mut out);
            assert_eq!(r.len(), 1, "{kind:?} got {} replies", r.len());
            assert_eq!(r[0].request_id, 9, "{kind:?}");
            if broker_only(kind) {
                assert_eq!(
                    (flow, error_of(&r[0])),
                    (Flow::Close, (ErrorCode::UnexpectedFrame, true)),
                    "{kind:?}"
                );
            } else if kind == Body::Ping {
                assert!(matches!(r[0].body, BodyT::Pong(ref p) if p.payload == 123_456_789));
            } else {
                assert_eq!(flow, Flow::Continue, "{kind:?}");
            }
        }
    }

    #[test]
    fn close_is_answered_then_closes() {
        let mut s = Session::new(ctx());
        let mut out = BytesMut::new();
        s.on_frame(&hello(PROTOCOL_VERSION), &mut out);
        replies(&mut out);
        assert_eq!(
            s.on_frame(&frame(BodyT::Close(Box::default())), &mut out),
            Flow::Close
        );
        assert!(matches!(replies(&mut out)[0].body, BodyT::Ok(_)));
    }
}
