//! The failure windows counted over every edge host
//! (`cluster.share_counters`): failed recipients per source, failed AUTH,
//! null-sender MAILs, filter rejects ([`CountKind`]).
//!
//! Each host still counts its own windows and blocks on them as it always
//! did; besides, every event it counts is queued here ([`CountSink`],
//! bounded: the session never waits) and a task of its own, on a
//! connection of its own, writes the queue to Redis a batch per round
//! trip. Redis holds one window per (kind, source key), `{prefix}:count:
//! {kind}:{net}`, and says for each event how many fell in the window: the
//! host whose event goes past the limit (one host only: the check is atomic)
//! orders the block a single host would have ordered had it seen every
//! event ([`crate::policy::Policy::over_cluster_wide`]), and the block is
//! published to the others as any.
//!
//! The window in Redis is a sorted set (score: Redis' own clock in
//! milliseconds; member: a name unique to the event) updated by one Lua
//! script ([`WINDOW`]): expire what left the window, add the event, count,
//! and past the limit delete the set (the window starts afresh, as after a
//! block here). Chosen over buckets of INCR + EXPIRE because it is the
//! same sliding window as the local one (no bucket edge where 2 × limit
//! events pass), one command per event (EVALSHA; buckets need an INCR,
//! an EXPIRE and a read of every bucket), and atomic (no two hosts both
//! ordering the block on one crossing). Its memory is bounded: a set holds
//! at most limit + 1 members and expires a window after its last event.
//! Redis' clock, not each host's, so that hosts whose clocks differ still
//! agree on the window.
//!
//! Redis is never in the mail path: with Redis away or slow the events are
//! dropped and counted (`dropped`), and each host goes on blocking on its
//! own windows.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use redis::{AsyncConnectionConfig, Client, Value};

use super::queue::Queue;
use crate::policy::{CountKind, CountSink, Counted};

/// Most events written in one round trip.
const BATCH: usize = 512;
/// Longest wait for a connection or an answer: the counters are worth
/// little late, so less than the block link's.
const TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest window Redis is asked to keep (a key's life).
const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// One event in a window: `KEYS[1]` the window, `ARGV` the event's member,
/// the window in milliseconds and the limit. Returns the events in the
/// window, negated when past the limit (the window is then deleted, so
/// only the event that crossed sees it). `replicate_commands` lets a
/// Redis 3.2 or 4 write after reading `TIME` (later ones always do).
const WINDOW: &str = "\
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local span = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return -n
end
redis.call('PEXPIRE', KEYS[1], span)
return n";

/// What the sessions (through the policy's sink) and the counters' task
/// share.
pub(super) struct Counters {
    node: String,
    prefix: String,
    /// Told when a window somewhere went past its limit on one of this
    /// host's events.
    on_crossed: Box<dyn Fn(CountKind, IpNet) + Send + Sync>,
    /// Events waiting for Redis; its drops count every event not counted
    /// cluster-wide: Redis away, the queue full, or the event older than
    /// its window by the time it could be sent.
    queue: Queue<Counted>,
    /// Names this process's events apart from an earlier run's.
    started: u64,
    serial: AtomicU64,
    up: AtomicBool,
    /// Events Redis counted (or, for `blocked` ones, reset their window).
    sent: AtomicU64,
    /// Windows that went past their limit cluster-wide on this host's
    /// events (each a block ordered here, unless the source was blocked
    /// already or allow-listed).
    crossed: AtomicU64,
    /// Redis commands sent for the events (a script load per connection
    /// included): divided by `sent`, the cost of one counted event.
    commands: AtomicU64,
}

/// A copy of the counts: `stats`' `cluster.counters` object (the counted
/// events sent to Redis, dropped with Redis away, the windows that went
/// past their limit on this host's events, the Redis commands they took)
/// and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterCounts {
    /// Whether the counters' own connection is up.
    #[serde(rename = "state", with = "super::link_state")]
    pub up: bool,
    pub sent: u64,
    pub dropped: u64,
    pub crossed: u64,
    pub commands: u64,
    pub queued: usize,
}

impl Counters {
    pub(super) fn new(
        node: String,
        prefix: String,
        on_crossed: Box<dyn Fn(CountKind, IpNet) + Send + Sync>,
    ) -> Counters {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Counters {
            node,
            prefix,
            on_crossed,
            queue: Queue::new(),
            started,
            serial: AtomicU64::new(0),
            up: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            crossed: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        }
    }

    pub(super) fn counts(&self) -> CounterCounts {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        CounterCounts {
            up: self.up.load(Ordering::Relaxed),
            sent: load(&self.sent),
            dropped: self.queue.dropped(),
            crossed: load(&self.crossed),
            commands: load(&self.commands),
            queued: self.queue.len(),
        }
    }

    /// The Redis key of a window.
    fn key(&self, kind: CountKind, net: IpNet) -> String {
        format!("{}:count:{}:{net}", self.prefix, kind.name())
    }

    /// A member no other event of any host has.
    fn member(&self) -> String {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        format!("{}:{}:{serial}", self.node, self.started)
    }

    /// The next batch to send; events already out of their window are
    /// dropped (counted) rather than counted late.
    fn batch(&self, now: Instant) -> Vec<Counted> {
        self.queue.take(BATCH, |event| {
            now.saturating_duration_since(event.at) < event.window
        })
    }

    /// The commands of a batch, one per event: the window's script, or,
    /// for an event on which this host blocked the source, the window's
    /// deletion (the other hosts start afresh too).
    fn pipeline(&self, sha: &str, batch: &[Counted]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for event in batch {
            let key = self.key(event.kind, event.net);
            if event.blocked {
                pipe.cmd("DEL").arg(key);
            } else {
                let window = event.window.min(MAX_WINDOW).as_millis().max(1) as u64;
                pipe.cmd("EVALSHA")
                    .arg(sha)
                    .arg(1)
                    .arg(key)
                    .arg(self.member())
                    .arg(window)
                    .arg(event.limit);
            }
        }
        pipe
    }

    /// Takes Redis' answers to a batch: tells `on_crossed` of each window
    /// that went past its limit on one of these events.
    fn answered(&self, batch: &[Counted], replies: &[Value]) {
        self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (event, reply) in batch.iter().zip(replies) {
            if let (false, Value::Int(n)) = (event.blocked, reply) {
                if *n < 0 {
                    self.crossed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(kind = event.kind.name(), net = %event.net, events = -n, limit = event.limit, "cluster: window over its limit counted over every host");
                    (self.on_crossed)(event.kind, event.net);
                }
            }
        }
    }
}

impl CountSink for Counters {
    fn counted(&self, event: Counted) {
        if !self.up.load(Ordering::Relaxed) {
            self.queue.count_dropped(1);
            return;
        }
        self.queue.push(event);
    }
}

/// The counters' task: connects, sends, and with Redis away waits (1 s,
/// doubling to 10 s) and connects again; logs each change of state once.
pub(super) async fn run(client: Client, counters: Arc<Counters>) {
    let mut backoff = Duration::from_secs(1);
    let mut down_logged = false;
    loop {
        let error = session(&client, &counters).await;
        if counters.up.swap(false, Ordering::Relaxed) {
            backoff = Duration::from_secs(1);
            down_logged = false;
        }
        counters.queue.clear();
        if !down_logged {
            tracing::warn!(error = %error, "cluster: Redis unreachable, the failure windows are counted on this host alone");
            down_logged = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connected stretch; returns why it ended.
async fn session(client: &Client, counters: &Counters) -> redis::RedisError {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(conn) => conn,
        Err(e) => return e,
    };
    let named = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(format!("smtp-limiter:{}:counters", counters.node))
        .exec_async(&mut conn)
        .await;
    if let Err(e) = named {
        return e;
    }
    let sha: String = match redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(WINDOW)
        .query_async(&mut conn)
        .await
    {
        Ok(sha) => sha,
        Err(e) => return e,
    };
    counters.commands.fetch_add(1, Ordering::Relaxed);
    counters.up.store(true, Ordering::Relaxed);
    tracing::info!("cluster: Redis reachable, failure windows counted over every host");
    loop {
        let batch = counters.batch(Instant::now());
        if batch.is_empty() {
            counters.queue.ready().await;
            continue;
        }
        let pipe = counters.pipeline(&sha, &batch);
        counters
            .commands
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(replies) => counters.answered(&batch, &replies),
            Err(e) => {
                counters.queue.count_dropped(batch.len() as u64);
                return e;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crossings `on_crossed` was told of.
    type Seen = Arc<std::sync::Mutex<Vec<(CountKind, IpNet)>>>;

    fn counters() -> (Arc<Counters>, Seen) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let counters = Counters::new(
            "mx1".into(),
            "sl".into(),
            Box::new(move |kind, net| record.lock().unwrap().push((kind, net))),
        );
        (Arc::new(counters), seen)
    }

    fn event(i: u32, blocked: bool) -> Counted {
        Counted {
            kind: CountKind::FailedAuth,
            net: IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(i))),
            at: Instant::now(),
            limit: 5,
            window: Duration::from_secs(600),
            blocked,
        }
    }

    #[test]
    fn with_redis_away_events_are_dropped_and_counted_not_queued() {
        let (counters, _) = counters();
        counters.counted(event(1, false));
        let counts = counters.counts();
        assert_eq!((counts.dropped, counts.queued, counts.up), (1, 0, false));
    }

    #[test]
    fn queued_events_go_in_batches_and_are_dropped_with_redis_away() {
        let (counters, _) = counters();
        counters.up.store(true, Ordering::Relaxed);
        for i in 0..BATCH as u32 + 3 {
            counters.counted(event(i, false));
        }
        let batch = counters.batch(Instant::now());
        assert_eq!(batch.len(), BATCH);
        assert_eq!(batch[0].net, event(0, false).net);
        // Redis went away: what is left is dropped, counted.
        counters.queue.clear();
        assert_eq!(counters.counts().queued, 0);
        assert_eq!(counters.counts().dropped, 3);
    }

    #[test]
    fn events_older_than_their_window_are_dropped_not_counted_late() {
        let (counters, _) = counters();
        counters.up.store(true, Ordering::Relaxed);
        counters.counted(event(1, false));
        counters.counted(event(2, false));
        let batch = counters.batch(Instant::now() + Duration::from_secs(600));
        assert!(batch.is_empty());
        assert_eq!(counters.counts().dropped, 2);
    }

    #[test]
    fn one_command_per_event_with_keys_under_the_prefix() {
        let (counters, _) = counters();
        let batch = [event(1, false), event(2, true)];
        let pipe = counters.pipeline("abc", &batch);
        let commands: Vec<Vec<String>> = pipe
            .cmd_iter()
            .map(|cmd| {
                cmd.args_iter()
                    .map(|arg| match arg {
                        redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                        _ => String::new(),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(commands.len(), 2);
        assert_eq!(
            &commands[0][..4],
            ["EVALSHA", "abc", "1", "sl:count:auth:0.0.0.1/32"]
        );
        assert!(commands[0][4].starts_with("mx1:"), "{:?}", commands[0]);
        assert_eq!(&commands[0][5..], ["600000", "5"]);
        assert_eq!(commands[1], ["DEL", "sl:count:auth:0.0.0.2/32"]);
        // Members differ, even for the same source.
        let again = counters.pipeline("abc", &batch[..1]);
        let member = |p: &redis::Pipeline| match p.cmd_iter().next().unwrap().args_iter().nth(4) {
            Some(redis::Arg::Simple(b)) => b.to_vec(),
            _ => Vec::new(),
        };
        assert_ne!(member(&pipe), member(&again));
    }

    #[test]
    fn only_a_negative_count_of_a_counted_event_is_a_crossing() {
        let (counters, seen) = counters();
        let batch = [event(1, false), event(2, false), event(3, true)];
        counters.answered(&batch, &[Value::Int(5), Value::Int(-6), Value::Int(1)]);
        assert_eq!(
            *seen.lock().unwrap(),
            [(CountKind::FailedAuth, batch[1].net)]
        );
        let counts = counters.counts();
        assert_eq!((counts.sent, counts.crossed), (3, 1));
        // Odd replies are no crossing and no panic.
        counters.answered(&batch[..1], &[Value::Nil]);
        assert_eq!(counters.counts().crossed, 1);
    }
}
