//! Several edge hosts, one defence: the blocks each agent decides are
//! published to Redis (`[cluster]`), and the other agents' blocks applied
//! here, to the proxy's table and the kernel's maps.
//!
//! Redis is never in the mail path: a decision only queues an event
//! ([`Cluster::publish_block`], bounded, the oldest dropped and counted
//! when full); the link task (`link`) writes the queue to Redis and reads
//! the other nodes' events, and with Redis away the agent goes on alone,
//! its decisions kept queued until Redis returns. The stream
//! `{prefix}:blocks` carries the changes, the hash `{prefix}:active` the
//! blocks in force, for an agent that starts (or fell too far behind).
//! What is read from Redis is checked (`wire`): malformed entries are
//! logged and skipped, and no block covers everything or an allow-listed
//! source, or lasts longer than `limits.max_block_duration`.
//!
//! With `cluster.share_counters`, the failure windows are counted over
//! every host too (`counters`), on a connection of their own.

mod counters;
mod link;
mod queue;
pub mod wire;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Instant, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    blocks::{Block, Reason},
    config::Config,
    lists::ListSet,
    policy::CountKind,
    proxy::ProxyContext,
};
pub use counters::CounterCounts;
use wire::{unix_seconds, Event};

/// The cluster as the rest of the agent sees it: inert until
/// [`Cluster::start`] (no `[cluster]`, or not started yet).
#[derive(Default)]
pub struct Cluster(OnceLock<Arc<Shared>>);

/// What the link task and the agent share.
struct Shared {
    node: String,
    /// Decisions of this host waiting for Redis; when full the oldest is
    /// dropped (its block still holds here, and on the others once Redis
    /// holds a newer decision).
    queue: queue::Queue<Event>,
    up: AtomicBool,
    published: AtomicU64,
    applied: AtomicU64,
    /// The other nodes' policy blocks not applied here (observe mode).
    observed: AtomicU64,
    /// Entries read from Redis and skipped: malformed or refused.
    refused: AtomicU64,
    /// The node that decided each block applied from the cluster (shown
    /// by `block list`); bounded like the table, removed with the block.
    nodes: Mutex<HashMap<IpNet, Arc<str>>>,
    /// What the other nodes' blocks are checked against; replaced on
    /// reload.
    rules: Mutex<Arc<Rules>>,
    /// The windows counted over every host, with `share_counters`.
    counters: Option<Arc<counters::Counters>>,
    /// Set once the first connection to Redis either caught up with the
    /// cluster's blocks or failed: what the agent waits for before it
    /// listens.
    first_pass: tokio::sync::watch::Sender<bool>,
}

/// A copy of the cluster's counts: `stats`' `cluster` object (`up` as
/// `"state": "up" | "down"`) and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCounts {
    pub node: String,
    /// Whether the block link is connected.
    #[serde(rename = "state", with = "link_state")]
    pub up: bool,
    /// Blocks and unblocks decided here and written to Redis.
    pub published: u64,
    /// The other nodes' events put in force here.
    pub applied: u64,
    /// The other nodes' policy blocks not put in force (observe mode).
    pub observed: u64,
    /// Events decided here and never written (the queue was full).
    pub dropped: u64,
    /// Entries read from Redis and skipped: malformed or refused.
    pub refused: u64,
    pub queued: usize,
    /// None (null) without `share_counters`.
    pub counters: Option<CounterCounts>,
}

/// A connection to Redis up or down, as `stats` writes it.
pub(crate) mod link_state {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(up: &bool, to: S) -> Result<S::Ok, S::Error> {
        to.serialize_str(if *up { "up" } else { "down" })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(from: D) -> Result<bool, D::Error> {
        match <&str>::deserialize(from)? {
            "up" => Ok(true),
            "down" => Ok(false),
            other => Err(serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(other),
                &"up or down",
            )),
        }
    }
}

/// The configuration the other nodes' events are checked against.
struct Rules {
    /// `lists.allow` and its files: no block may overlap these.
    allow: Vec<IpNet>,
    /// `lists.reject` and its files: an unblock puts the entry back.
    reject: ListSet,
    /// `limits.max_block_duration`.
    max_duration: std::time::Duration,
}

impl Rules {
    fn of(config: &Config) -> Arc<Rules> {
        let lists = ListSet::of(&config.lists);
        Arc::new(Rules {
            allow: lists.allow.keys().copied().collect(),
            reject: lists,
            max_duration: config.limits.max_block_duration,
        })
    }
}

impl Shared {
    fn new(node: String, rules: Arc<Rules>) -> Shared {
        Shared {
            node,
            queue: queue::Queue::new(),
            up: AtomicBool::new(false),
            published: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            observed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            nodes: Mutex::new(HashMap::new()),
            rules: Mutex::new(rules),
            counters: None,
            first_pass: tokio::sync::watch::channel(false).0,
        }
    }

    fn push(&self, event: Event) {
        self.queue.push(event);
    }
}

impl Cluster {
    /// Starts the link task if `[cluster]` names a Redis server (once).
    ///
    /// # Errors
    /// `cluster.password_file` cannot be read, or the URL is refused by
    /// the client.
    pub fn start(&self, config: &Config, ctx: &Arc<ProxyContext>) -> anyhow::Result<()> {
        let Some(url) = config.cluster.redis.as_deref() else {
            return Ok(());
        };
        let node = config
            .cluster
            .node
            .clone()
            .unwrap_or_else(|| ctx.settings().hostname.clone());
        // The other nodes refuse events from a name they cannot read (a
        // hostname longer than a node name may be, say).
        if wire::parse_node(Some(node.as_bytes())).is_err() {
            anyhow::bail!(
                "cluster.node: the hostname {node:?} is no node name (1 to {} letters, digits, '.', '-', '_' or ':'): set cluster.node",
                crate::config::MAX_CLUSTER_NAME
            );
        }
        let password = match &config.cluster.password_file {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cluster.password_file {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        };
        let client = link::client(url, password.as_deref())
            .map_err(|e| anyhow::anyhow!("cluster.redis: {e}"))?;
        let mut shared = Shared::new(node.clone(), Rules::of(config));
        if config.cluster.share_counters {
            // Weak: the context holds the cluster, which holds this.
            let weak = Arc::downgrade(ctx);
            shared.counters = Some(Arc::new(counters::Counters::new(
                node.clone(),
                config.cluster.prefix.clone(),
                Box::new(move |kind, net| over_cluster_wide(&weak, kind, net)),
            )));
        }
        let shared = Arc::new(shared);
        if self.0.set(shared.clone()).is_err() {
            return Ok(());
        }
        if let Some(counters) = &shared.counters {
            ctx.state.set_sink(counters.clone());
            tokio::spawn(counters::run(client.clone(), counters.clone()));
        }
        let apply = Applier {
            ctx: ctx.clone(),
            shared: shared.clone(),
        };
        tracing::info!(
            node,
            prefix = config.cluster.prefix,
            share_counters = config.cluster.share_counters,
            "cluster: sharing blocks through Redis"
        );
        tokio::spawn(link::run(
            client,
            config.cluster.prefix.clone(),
            shared,
            apply,
        ));
        Ok(())
    }

    /// Waits (at most `limit`) until the first connection to Redis caught
    /// up with the cluster's blocks or failed, so that an agent started
    /// without state does not serve the cluster's blocked sources in the
    /// meantime. Returns whether it did; at once without `[cluster]`.
    pub async fn first_pass(&self, limit: std::time::Duration) -> bool {
        let Some(shared) = self.0.get() else {
            return true;
        };
        let mut done = shared.first_pass.subscribe();
        let passed = tokio::time::timeout(limit, done.wait_for(|done| *done))
            .await
            .is_ok();
        passed
    }

    /// Takes a reloaded configuration's lists and `max_block_duration`
    /// (the rest of `[cluster]` needs a restart).
    pub fn reload(&self, config: &Config) {
        if let Some(shared) = self.0.get() {
            *shared.rules.lock().unwrap_or_else(|p| p.into_inner()) = Rules::of(config);
        }
    }

    /// Queues a block decided here for the other nodes.
    pub fn publish_block(&self, block: &Block) {
        if let Some(shared) = self.0.get() {
            // Decided here now, whoever decided the net's previous block.
            shared
                .nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&block.net);
            shared.push(Event::Block {
                net: block.net,
                origin: block.origin,
                node: shared.node.clone(),
                expires: block.expires.map(unix_seconds),
                comment: block.comment.as_deref().map(str::to_owned),
                repeat: block.repeat,
            });
        }
    }

    /// Queues the removal of a block here for the other nodes.
    pub fn publish_unblock(&self, net: IpNet) {
        if let Some(shared) = self.0.get() {
            shared.push(Event::Unblock {
                net,
                node: shared.node.clone(),
            });
        }
    }

    /// The node that decided a block, when a cluster is configured: the
    /// one it came from, else this one.
    pub fn node_of(&self, net: &IpNet) -> Option<Arc<str>> {
        let shared = self.0.get()?;
        let nodes = shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            nodes
                .get(net)
                .cloned()
                .unwrap_or_else(|| Arc::from(shared.node.as_str())),
        )
    }

    /// The cluster's counts; None without a cluster.
    pub fn counts(&self) -> Option<ClusterCounts> {
        let s = self.0.get()?;
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        Some(ClusterCounts {
            node: s.node.clone(),
            up: s.up.load(Ordering::Relaxed),
            published: load(&s.published),
            applied: load(&s.applied),
            observed: load(&s.observed),
            dropped: s.queue.dropped(),
            refused: load(&s.refused),
            queued: s.queue.len(),
            counters: s.counters.as_ref().map(|c| c.counts()),
        })
    }
}

/// A window counted over every host went past its limit on one of this
/// host's events: the block this host would have ordered had it seen them
/// all, unless the source is blocked already.
fn over_cluster_wide(ctx: &Weak<ProxyContext>, kind: CountKind, net: IpNet) {
    let Some(ctx) = ctx.upgrade() else {
        return;
    };
    if ctx.blocks.contains(&net) {
        return;
    }
    let Some(decision) = ctx
        .policy()
        .over_cluster_wide(&ctx.state, kind, net, Instant::now())
    else {
        return;
    };
    tracing::info!(
        %net,
        window = kind.name(),
        action = if decision.enforced { "block" } else { "would-block" },
        "cluster: window over its limit counted over every host"
    );
    if decision.enforced {
        ctx.block(&decision.verdict);
    }
}

/// Applies the other nodes' events here: the path of a local block, but
/// nothing is published again.
struct Applier {
    ctx: Arc<ProxyContext>,
    shared: Arc<Shared>,
}

impl Applier {
    /// Applies one event read from Redis (`source` names where, for logs).
    fn apply(&self, event: Event, source: &str) {
        let now = SystemTime::now();
        let rules = self
            .shared
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match event {
            Event::Block {
                net,
                origin,
                node,
                expires,
                comment,
                repeat,
            } => {
                let expires = match wire::admit(net, expires, &rules.allow, rules.max_duration, now)
                {
                    Ok(at) => at,
                    Err(wire::Refusal::Expired) => return,
                    Err(refusal) => {
                        self.shared.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%net, node, source, why = %refusal, "cluster: block refused");
                        return;
                    }
                };
                let decided_by_policy = !matches!(origin, Reason::Manual | Reason::RejectList);
                // In observe mode this host enforces nothing the policy
                // decided, here or elsewhere (an operator's block holds).
                if decided_by_policy && !self.ctx.policy().enforced() {
                    self.shared.observed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%net, node, origin = origin.name(), action = "would-block", by = "cluster", "source not blocked: observe mode");
                    return;
                }
                // A block the policy ordered elsewhere counts in the
                // source's history here too: the next one escalates.
                if decided_by_policy {
                    let left = expires.duration_since(now).unwrap_or_default();
                    self.ctx
                        .state
                        .remember_block(net, repeat, std::time::Instant::now() + left);
                }
                let node: Arc<str> = Arc::from(node);
                if let Some(held) = self.ctx.blocks.get(&net) {
                    if held.expires.is_none_or(|e| e >= expires) {
                        self.remember(net, node);
                        return;
                    }
                }
                let pushed = self.ctx.enforce(Block {
                    net,
                    origin,
                    expires: Some(expires),
                    since: now,
                    repeat,
                    comment: comment.map(Arc::from),
                });
                self.shared.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%net, node = %node, origin = origin.name(), kernel = pushed.is_ok(), action = "block", by = "cluster", "source blocked");
                self.remember(net, node);
            }
            Event::Unblock { net, node } => {
                let lifted = self.ctx.lift(net, rules.reject.reject.contains_key(&net));
                self.shared
                    .nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&net);
                if lifted.in_table || lifted.in_kernel {
                    self.shared.applied.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%net, node, action = "unblock", by = "cluster", "block removed");
                }
            }
        }
    }

    fn remember(&self, net: IpNet, node: Arc<str>) {
        let mut nodes = self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.len() >= self.ctx.blocks.capacity() {
            // Entries of blocks that expired or were evicted meanwhile.
            nodes.retain(|n, _| self.ctx.blocks.contains(n));
        }
        if nodes.len() < self.ctx.blocks.capacity() {
            nodes.insert(net, node);
        }
    }

    /// Counts and logs an entry that could not be read.
    fn skip(&self, source: &str, id: &str, error: &dyn std::fmt::Display) {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source, id, error = %error, "cluster: malformed entry skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_cluster_nothing_is_queued_or_shown() {
        let cluster = Cluster::default();
        cluster.publish_block(&Block {
            net: "192.0.2.1/32".parse().unwrap(),
            origin: Reason::Manual,
            expires: None,
            since: SystemTime::now(),
            repeat: 0,
            comment: None,
        });
        cluster.publish_unblock("192.0.2.1/32".parse().unwrap());
        assert_eq!(cluster.counts(), None);
        assert_eq!(cluster.node_of(&"192.0.2.1/32".parse().unwrap()), None);
    }
}
