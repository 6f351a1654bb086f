//! Commands -> state: what each client request does to the session, and the ops it addresses.
//!
//! Contract: runs on the connection's shard, inside `Session::on_frame_at`, only while the
//! session is open. Requests a queue's owner serves are routed there (answered when it replies,
//! in `Session::on_reply_at`); routing changes go to the control-plane writer; listings of the
//! routing table are answered at once from the shard's copy.
//!
//! Faults handled: requests the broker refuses before routing anything (reserved or misplaced
//! queue names, prefetch out of range, unknown or duplicate consumer tags, a consumer past
//! `consumers_per_connection_max`, a `Get` past `gets_unacked_max`), each answered with an
//! `Error` frame; the connection goes on.

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, ErrorCode};

use super::replies::{name, BINDING_LIST_MAX, LIST_PAGE_MAX};
use super::{Addressed, ConsumerRef, Flow, Pending, Session, State};
use crate::broker::control::CONTROL_SHARD;
use crate::mesh::msg::ControlOp;
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::Declare;
use crate::mesh::types::{Binding, ExchangeDecl};
use crate::net::command::{BindingRef, Command, Consume, DeclareQueue};

impl Session {
    /// Carries out one command of an open connection.
    pub(super) fn execute(
        &mut self,
        now_ms: u64,
        request_id: u64,
        command: Command<'_>,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        match command {
            Command::Publish(p) => self.publish(now_ms, p, out, outbound),
            Command::Settle(s) => self.settle(request_id, &s, out, outbound),
            Command::Hello { .. } => self.fail(
                out,
                request_id,
                ErrorCode::UnexpectedFrame,
                "Hello was already received".into(),
                true,
            ),
            Command::Ping { payload } => {
                let mut pong = wire::PongT::default();
                pong.payload = payload;
                self.reply(out, request_id, BodyT::Pong(Box::new(pong)))
            }
            Command::Close => {
                self.state = State::Closing;
                self.reply(out, request_id, BodyT::Ok(Box::default()));
                Flow::Close
            }
            Command::DeclareQueue(d) => self.declare_queue(request_id, d, out, outbound),
            Command::DeleteQueue {
                name,
                if_unused,
                if_empty,
            } => {
                let op = Op::Delete {
                    name: name.to_string(),
                    if_unused,
                    if_empty,
                };
                let pending = Pending::DeleteQueue {
                    request_id,
                    name: name.to_string(),
                };
                self.address(outbound, self.owner_of(name), op, pending);
                Flow::Continue
            }
            Command::PurgeQueue { name } => {
                let op = Op::Purge {
                    name: name.to_string(),
                };
                self.ask_owner(request_id, name, op, outbound)
            }
            Command::GetQueueInfo { name } => {
                let op = Op::Info {
                    name: name.to_string(),
                };
                self.ask_owner(request_id, name, op, outbound)
            }
            Command::ListQueues {
                prefix,
                after,
                limit,
            } => self.list_queues(request_id, prefix, after, limit, outbound),
            Command::GetStatus => self.get_status(request_id, outbound),
            Command::ListConnections { after, limit } => {
                self.list_connections(request_id, after, limit, outbound)
            }
            Command::ListConsumers {
                prefix,
                after_queue,
                after_tag,
                limit,
            } => self.list_consumers(request_id, prefix, after_queue, after_tag, limit, outbound),
            Command::Consume(c) => self.consume(request_id, c, out, outbound),
            Command::Cancel { consumer_tag } => match self.consumers.get(consumer_tag).cloned() {
                Some(ConsumerRef {
                    shard,
                    queue,
                    holder: Some(holder),
                }) => {
                    self.consumers.remove(consumer_tag);
                    self.address(
                        outbound,
                        shard,
                        Op::Cancel { queue, holder },
                        Pending::Cancel { request_id },
                    );
                    Flow::Continue
                }
                _ => self.no_consumer(out, request_id, consumer_tag),
            },
            Command::SetPrefetch {
                consumer_tag,
                prefetch,
            } => {
                if prefetch == 0 || prefetch > self.ctx.prefetch_max {
                    let msg = format!(
                        "prefetch {prefetch}: must be 1 to prefetch_max {}",
                        self.ctx.prefetch_max
                    );
                    return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
                }
                match self.consumers.get(consumer_tag).cloned() {
                    Some(ConsumerRef {
                        shard,
                        queue,
                        holder: Some(holder),
                    }) => {
                        let op = Op::SetPrefetch {
                            queue,
                            holder,
                            prefetch,
                        };
                        self.address(outbound, shard, op, Pending::Reply { request_id });
                        Flow::Continue
                    }
                    _ => self.no_consumer(out, request_id, consumer_tag),
                }
            }
            Command::Get { queue, auto_ack } => {
                if let Some(msg) = self.get_window_refusal() {
                    return self.fail(out, request_id, ErrorCode::LimitExceeded, msg, false);
                }
                self.get_asked();
                let shard = self.owner_of(queue);
                let op = Op::Get {
                    queue: queue.to_string(),
                    auto_ack,
                };
                self.address(outbound, shard, op, Pending::Get { request_id, shard });
                Flow::Continue
            }
            Command::DeclareExchange {
                name,
                kind,
                durable,
                auto_delete,
                passive,
            } => {
                let op = ControlOp::DeclareExchange {
                    decl: ExchangeDecl {
                        name: name.to_string(),
                        kind,
                        durable,
                        auto_delete,
                    },
                    passive,
                };
                self.control(request_id, op, outbound)
            }
            Command::DeleteExchange { name, if_unused } => {
                let op = ControlOp::DeleteExchange {
                    name: name.to_string(),
                    if_unused,
                };
                self.control(request_id, op, outbound)
            }
            Command::Bind(b) => {
                let binding = binding_of(&b);
                // The queue's owner says whether it exists (and is this connection's to bind, if
                // exclusive) and whether it is durable; the writer does the rest.
                let op = Op::Info {
                    name: binding.queue.clone(),
                };
                let shard = self.owner_of(&binding.queue);
                let pending = Pending::BindQueue {
                    request_id,
                    binding,
                };
                self.address(outbound, shard, op, pending);
                Flow::Continue
            }
            Command::Unbind(b) => {
                let binding = binding_of(&b);
                self.control(request_id, ControlOp::Unbind { binding }, outbound)
            }
            Command::ListExchanges {
                prefix,
                after,
                limit,
            } => self.list_exchanges(request_id, prefix, after, limit, out),
            Command::ListBindings { exchange, queue } => {
                let bindings: Vec<wire::BindingInfoT> = self
                    .routing
                    .table
                    .borrow()
                    .bindings(exchange, queue)
                    .into_iter()
                    .take(BINDING_LIST_MAX)
                    .map(|b| {
                        let mut i = wire::BindingInfoT::default();
                        i.exchange = Some(b.exchange);
                        i.queue = Some(b.queue);
                        i.binding_key = Some(b.key);
                        i
                    })
                    .collect();
                let mut list = wire::BindingListT::default();
                list.bindings = Some(bindings);
                self.reply(out, request_id, BodyT::BindingList(Box::new(list)))
            }
            Command::BrokerOnly(b) => {
                let msg = format!("{} is sent by the broker, never to it", name(b));
                self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
            }
            Command::Unsupported(b) => {
                let msg = format!("{} is not served by this broker version yet", name(b));
                self.fail(out, request_id, ErrorCode::UnsupportedFrame, msg, false)
            }
        }
    }

    /// Routes a request to the queue's owner, whose reply answers it as it is.
    fn ask_owner(
        &mut self,
        request_id: u64,
        queue: &str,
        op: Op,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        self.address(
            outbound,
            self.owner_of(queue),
            op,
            Pending::Reply { request_id },
        );
        Flow::Continue
    }

    fn no_consumer(&mut self, out: &mut BytesMut, request_id: u64, tag: &str) -> Flow {
        let msg = format!("no consumer '{tag}' on this connection");
        self.fail(out, request_id, ErrorCode::NotFound, msg, false)
    }

    /// Sends a routing change to the control-plane writer; its `Ok` comes once every shard has it.
    fn control(&mut self, request_id: u64, op: ControlOp, outbound: &mut Vec<Addressed>) -> Flow {
        let pending = Pending::Reply { request_id };
        self.address(outbound, CONTROL_SHARD, Op::Control(op), pending);
        Flow::Continue
    }

    fn declare_queue(
        &mut self,
        request_id: u64,
        d: DeclareQueue<'_>,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        if d.name.starts_with("weir.") {
            let msg = format!(
                "queue name '{}': names starting with 'weir.' are reserved for the broker",
                d.name
            );
            return self.fail(out, request_id, ErrorCode::AccessRefused, msg, false);
        }
        let name = if d.name.is_empty() {
            if d.passive {
                return self.fail(
                    out,
                    request_id,
                    ErrorCode::NotFound,
                    "a passive declare needs a name".into(),
                    false,
                );
            }
            self.generated_queue_name()
        } else {
            d.name.to_string()
        };
        let shard = self.owner_of(&name);
        let arguments = d.arguments.map(|a| a.unpack()).unwrap_or_default();
        if let Some(pinned) = arguments.shard.filter(|s| *s != shard) {
            let msg = format!(
                "arguments.shard {pinned}: queue '{name}' is placed on shard {shard} by the hash of its name; \
                 pinning a queue elsewhere arrives with the control plane"
            );
            return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
        }
        if let Some(msg) = self.retry_policy_refused(&arguments) {
            return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
        }
        let declare = Declare {
            name,
            passive: d.passive,
            durable: d.durable,
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            arguments,
        };
        self.address(
            outbound,
            shard,
            Op::Declare(declare),
            Pending::Reply { request_id },
        );
        Flow::Continue
    }

    /// Why a queue's retry policy cannot be honoured, if it cannot: more delays than
    /// `retry_delays_count_max`, or a delay past `delay_ms_max` (as a `Nack.delay_ms` would be).
    fn retry_policy_refused(&self, a: &wire::QueueArgumentsT) -> Option<String> {
        let delays = a.retry_delays_ms.as_deref().unwrap_or_default();
        let count_max = self.ctx.retry_delays_count_max;
        if delays.len() > count_max as usize {
            return Some(format!(
                "retry_delays_ms: {} delays, more than retry_delays_count_max = {count_max}",
                delays.len()
            ));
        }
        let delay_max = self.ctx.delay_ms_max;
        let (i, d) = delays
            .iter()
            .enumerate()
            .find(|(_, d)| u64::from(**d) > delay_max)?;
        Some(format!(
            "retry_delays_ms[{i}] = {d}: more than delay_ms_max = {delay_max} ms"
        ))
    }

    /// A name for a queue the client left unnamed, placed on this connection's own shard (drawn
    /// until it hashes there): the connection that declared it is the one that may use it, and
    /// a shard-aware client sends its traffic by the name's hash, so it lands here too, no hop.
    fn generated_queue_name(&mut self) -> String {
        loop {
            let name = format!("weir.gen-{:x}-{}", self.ctx.connection_id, self.next_name);
            self.next_name += 1;
            if self.owner_of(&name) == self.ctx.shard {
                return name;
            }
        }
    }

    fn consume(
        &mut self,
        request_id: u64,
        c: Consume<'_>,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let prefetch = if c.prefetch == 0 {
            self.ctx.prefetch_default
        } else {
            c.prefetch
        };
        if prefetch > self.ctx.prefetch_max {
            let msg = format!(
                "prefetch {prefetch} exceeds prefetch_max {}",
                self.ctx.prefetch_max
            );
            return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
        }
        let tag = match c.consumer_tag.filter(|t| !t.is_empty()) {
            Some(t) => t.to_string(),
            None => {
                self.next_name += 1;
                format!("ctag-{}", self.next_name - 1)
            }
        };
        if self.consumers.contains_key(&tag) {
            let msg = format!("consumer tag '{tag}' is in use on this connection");
            return self.fail(out, request_id, ErrorCode::DuplicateConsumerTag, msg, false);
        }
        let max = self.ctx.consumers_per_connection_max;
        if self.consumers.len() >= max as usize {
            let msg = format!(
                "this connection holds consumers_per_connection_max = {max} consumers; cancel one first"
            );
            return self.fail(out, request_id, ErrorCode::LimitExceeded, msg, false);
        }
        let queue = c.queue.to_string();
        let shard = self.owner_of(&queue);
        // Registered now, so deliveries that overtake the reply find their consumer.
        self.consumers.insert(
            tag.clone(),
            ConsumerRef {
                shard,
                queue: queue.clone(),
                holder: None,
            },
        );
        let op = Op::Consume {
            queue,
            tag: tag.clone(),
            prefetch,
            auto_ack: c.auto_ack,
            exclusive: c.exclusive,
            priority: c.priority,
        };
        self.address(outbound, shard, op, Pending::Consume { request_id, tag });
        Flow::Continue
    }

    /// The owner's answer to `Consume`: the consumer is live, or forgotten again.
    pub(super) fn consumed(
        &mut self,
        request_id: u64,
        tag: String,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        match reply {
            Reply::Consumed(holder) => {
                let shard = match self.consumers.get_mut(&tag) {
                    Some(c) => {
                        c.holder = Some(holder);
                        c.shard
                    }
                    None => return,
                };
                let mut ok = wire::ConsumeOkT::default();
                ok.consumer_tag = Some(tag);
                ok.shard = shard;
                self.reply(out, request_id, BodyT::ConsumeOk(Box::new(ok)));
            }
            Reply::Refused(r) => {
                self.consumers.remove(&tag);
                self.refuse(out, request_id, r);
            }
            other => tracing::error!(?other, "unexpected reply to consume"),
        }
    }

    /// A bind's queue check came back: on to the writer, durable if the queue is.
    pub(super) fn queue_checked(
        &mut self,
        request_id: u64,
        mut binding: Binding,
        reply: Reply,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) {
        match reply {
            Reply::Info(info) => {
                binding.durable = info.durable && !info.exclusive;
                self.control(request_id, ControlOp::Bind { binding }, outbound);
            }
            Reply::Refused(r) => self.refuse(out, request_id, r),
            other => tracing::error!(?other, "unexpected reply to a bind's queue check"),
        }
    }

    fn list_exchanges(
        &mut self,
        request_id: u64,
        prefix: &str,
        after: &str,
        limit: u32,
        out: &mut BytesMut,
    ) -> Flow {
        let limit = match limit {
            0 => LIST_PAGE_MAX,
            n => (n as usize).min(LIST_PAGE_MAX),
        };
        let table = self.routing.table.borrow();
        let mut exchanges: Vec<wire::ExchangeInfoT> = table
            .exchanges()
            .into_iter()
            .filter(|(e, _)| e.name.starts_with(prefix) && e.name.as_str() > after)
            .take(limit + 1)
            .map(|(e, bindings)| {
                let mut i = wire::ExchangeInfoT::default();
                i.name = Some(e.name.clone());
                i.kind = e.kind.to_wire();
                i.durable = e.durable;
                i.auto_delete = e.auto_delete;
                i.bindings = bindings as u32;
                i
            })
            .collect();
        drop(table);
        let more = exchanges.len() > limit;
        exchanges.truncate(limit);
        let mut list = wire::ExchangeListT::default();
        list.exchanges = Some(exchanges);
        list.more = more;
        self.reply(out, request_id, BodyT::ExchangeList(Box::new(list)))
    }
}

/// A binding as a client names it; whether it is durable is decided from its queue and exchange.
fn binding_of(b: &BindingRef<'_>) -> Binding {
    Binding {
        exchange: b.exchange.to_string(),
        queue: b.queue.to_string(),
        key: b.key.unwrap_or("").to_string(),
        durable: false,
    }
}
