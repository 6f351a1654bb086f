//! Exchanges and bindings: declare, delete, bind, unbind, list.
//!
//! Contract: requests on any one connection (the broker's control plane answers each once every
//! shard routes by the change, so a publish on any connection after `bind` returns routes by
//! it); values converted to and from the schema's object API here; no state kept.

use weir_protocol::wire::{self, BodyT};

use crate::client::{list_pages, unexpected, Client, LIST_PAGE};
use crate::error::ClientError;

/// How an exchange routes (the protocol's type: one mapping to and from the wire).
pub use weir_protocol::ExchangeKind;

/// How an exchange is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Survives restarts, with its bindings to durable queues. Default: true.
    pub durable: bool,
    /// Deleted when its last binding goes. Default: false.
    pub auto_delete: bool,
    /// Only check that it exists with this kind (`NotFound` or `PreconditionFailed` if not).
    pub passive: bool,
}

impl Default for ExchangeOptions {
    fn default() -> Self {
        ExchangeOptions {
            durable: true,
            auto_delete: false,
            passive: false,
        }
    }
}

/// An exchange as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeInfo {
    /// Its name.
    pub name: String,
    /// How it routes (`None`: a kind this client does not know).
    pub kind: Option<ExchangeKind>,
    /// Survives restarts.
    pub durable: bool,
    /// Goes with its last binding.
    pub auto_delete: bool,
    /// Bindings from it.
    pub bindings: u32,
}

/// One binding: messages published to `exchange` matching `binding_key` go to `queue`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindingInfo {
    /// The exchange it routes from.
    pub exchange: String,
    /// The queue it routes to.
    pub queue: String,
    /// The key (direct) or pattern (topic) it matches; ignored by fanout exchanges.
    pub binding_key: String,
}

impl Client {
    /// Declares an exchange (creates it, or checks that an identical one exists: a different
    /// kind or flags is refused with `PreconditionFailed`, saying which). The default exchange
    /// `""` cannot be declared, and names starting with `weir.` are reserved (`AccessRefused`).
    pub async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<(), ClientError> {
        let conn = self.any_conn();
        conn.limits().check_name("exchange name length", name)?;
        let mut d = wire::DeclareExchangeT::default();
        d.name = name.to_string();
        d.kind = kind.to_wire();
        d.durable = options.durable;
        d.auto_delete = options.auto_delete;
        d.passive = options.passive;
        ok(conn.request(BodyT::DeclareExchange(Box::new(d))).await?)
    }

    /// Deletes an exchange and its bindings; with `if_unused`, refused (`PreconditionFailed`)
    /// while it has bindings.
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), ClientError> {
        let conn = self.any_conn();
        conn.limits().check_name("exchange name length", name)?;
        let mut d = wire::DeleteExchangeT::default();
        d.name = name.to_string();
        d.if_unused = if_unused;
        ok(conn.request(BodyT::DeleteExchange(Box::new(d))).await?)
    }

    /// Binds `queue` to `exchange` with `binding_key` (a key for direct exchanges, a pattern
    /// for topic ones, ignored by fanout ones). Idempotent. Returns once every shard routes by
    /// it. The binding survives restarts if both the exchange and the queue are durable.
    pub async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), ClientError> {
        self.binding(true, queue, exchange, binding_key).await
    }

    /// Removes a binding; removing one that does not exist is not an error. An auto-delete
    /// exchange losing its last binding goes with it.
    pub async fn unbind(
        &self,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), ClientError> {
        self.binding(false, queue, exchange, binding_key).await
    }

    /// `Bind` (`bind`) or `Unbind`: the same three names, checked against the broker's limit.
    async fn binding(
        &self,
        bind: bool,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), ClientError> {
        let conn = self.any_conn();
        let limits = conn.limits();
        limits.check_name("queue name length", queue)?;
        limits.check_name("exchange name length", exchange)?;
        limits.check_name("binding key length", binding_key)?;
        let (exchange, queue, key) = (
            exchange.to_string(),
            queue.to_string(),
            Some(binding_key.to_string()),
        );
        let body = if bind {
            let mut b = wire::BindT::default();
            (b.exchange, b.queue, b.binding_key) = (exchange, queue, key);
            BodyT::Bind(Box::new(b))
        } else {
            let mut b = wire::UnbindT::default();
            (b.exchange, b.queue, b.binding_key) = (exchange, queue, key);
            BodyT::Unbind(Box::new(b))
        };
        ok(conn.request(body).await?)
    }

    /// Every exchange whose name starts with `prefix`, in name order (all pages). The default
    /// exchange is not listed.
    pub async fn list_exchanges(&self, prefix: &str) -> Result<Vec<ExchangeInfo>, ClientError> {
        let conn = self.any_conn();
        conn.limits()
            .check_name("exchange name prefix length", prefix)?;
        list_pages(
            conn,
            "ListExchanges",
            |after| {
                let mut l = wire::ListExchangesT::default();
                l.prefix = Some(prefix.to_string()).filter(|p| !p.is_empty());
                l.after = after;
                l.limit = LIST_PAGE;
                BodyT::ListExchanges(Box::new(l))
            },
            |reply| {
                let list = reply.frame().body_as_exchange_list()?.unpack();
                let page = list
                    .exchanges
                    .into_iter()
                    .flatten()
                    .map(|e| ExchangeInfo {
                        name: e.name.unwrap_or_default(),
                        kind: ExchangeKind::from_wire(e.kind),
                        durable: e.durable,
                        auto_delete: e.auto_delete,
                        bindings: e.bindings,
                    })
                    .collect();
                Some((page, list.more))
            },
            |e| &e.name,
        )
        .await
    }

    /// Bindings, optionally only from one exchange and/or only to one queue, sorted by
    /// (exchange, queue, binding key).
    pub async fn list_bindings(
        &self,
        exchange: Option<&str>,
        queue: Option<&str>,
    ) -> Result<Vec<BindingInfo>, ClientError> {
        let conn = self.any_conn();
        let mut l = wire::ListBindingsT::default();
        l.exchange = exchange.map(str::to_string);
        l.queue = queue.map(str::to_string);
        let reply = conn.request(BodyT::ListBindings(Box::new(l))).await?;
        let Some(list) = reply.frame().body_as_binding_list() else {
            return Err(unexpected(&reply, "ListBindings"));
        };
        Ok(list
            .unpack()
            .bindings
            .into_iter()
            .flatten()
            .map(|b| BindingInfo {
                exchange: b.exchange.unwrap_or_default(),
                queue: b.queue.unwrap_or_default(),
                binding_key: b.binding_key.unwrap_or_default(),
            })
            .collect())
    }
}

fn ok(reply: weir_protocol::InFrame) -> Result<(), ClientError> {
    match reply.body_type() {
        wire::Body::Ok => Ok(()),
        _ => Err(unexpected(&reply, "an exchange request")),
    }
}
