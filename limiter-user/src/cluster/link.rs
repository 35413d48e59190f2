//! The link task: one connection writes the queued events, another reads
//! the other nodes' from the stream (XREAD BLOCK holds its connection).
//! Any error ends both; the task logs the state change once, waits
//! (1 s, doubling to 10 s) and connects again, then catches up from the
//! stream id it remembers, or from the active hash when that id fell off
//! the stream (or at start). Ended blocks are removed from the hash now
//! and then (`prune_loop`); the stream is trimmed by its writers
//! (`MAXLEN ~`).

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisResult, Value};

use super::{wire::Event, Applier, Shared};

/// The stream keeps about this many events (`MAXLEN ~`): an agent away
/// longer reloads the active hash instead.
const STREAM_MAXLEN: usize = 100_000;
/// Most events written in one round trip.
const WRITE_BATCH: usize = 256;
/// Most events read in one XREAD.
const READ_BATCH: usize = 512;
/// How long one XREAD waits for new events.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Longest wait for a connection or an answer (more than [`READ_BLOCK`]).
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often each agent removes the ended blocks from the active hash
/// (whichever agent comes first; the others find nothing).
const PRUNE_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Hash fields one HSCAN step of the active hash asks for: a reply (and
/// what the agent holds of it) stays small at any number of blocks, and
/// Redis is never busy long with one agent.
const SCAN_COUNT: usize = 1000;
/// Deletes a hash field only if it still holds the value that was read
/// (another agent may have put a new block there meanwhile).
const DELETE_IF_UNCHANGED: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";

/// A client for `url`, with the password of `cluster.password_file`.
pub(super) fn client(url: &str, password: Option<&str>) -> RedisResult<Client> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    Client::open(info)
}

struct Keys {
    stream: String,
    active: String,
}

pub(super) async fn run(client: Client, prefix: String, shared: Arc<Shared>, apply: Applier) {
    let keys = Keys {
        stream: format!("{prefix}:blocks"),
        active: format!("{prefix}:active"),
    };
    let mut last_id: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    let mut down_logged = false;
    loop {
        let error = session(&client, &keys, &shared, &apply, &mut last_id).await;
        shared.first_pass.send_replace(true);
        if shared.up.swap(false, Ordering::Relaxed) {
            backoff = Duration::from_secs(1);
            down_logged = false;
        }
        if !down_logged {
            tracing::warn!(error = %error, "cluster: Redis unreachable, enforcing this host's blocks alone; decisions are queued until it returns");
            down_logged = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connected stretch; returns why it ended.
async fn session(
    client: &Client,
    keys: &Keys,
    shared: &Shared,
    apply: &Applier,
    last_id: &mut Option<String>,
) -> redis::RedisError {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let connect = async {
        let writer = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reader = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok::<_, redis::RedisError>((writer, reader))
    };
    let (mut writer, mut reader) = match connect.await {
        Ok(pair) => pair,
        Err(e) => return e,
    };
    // Named, so that `CLIENT LIST` on the Redis shows each node.
    for conn in [&mut writer, &mut reader] {
        let named = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("smtp-limiter:{}", shared.node))
            .exec_async(conn)
            .await;
        if let Err(e) = named {
            return e;
        }
    }
    if let Err(e) = catch_up(&mut reader, keys, apply, last_id).await {
        return e;
    }
    shared.up.store(true, Ordering::Relaxed);
    shared.first_pass.send_replace(true);
    tracing::info!(
        node = shared.node,
        from = last_id.as_deref().unwrap_or("0-0"),
        "cluster: Redis reachable, blocks shared"
    );
    let mut pruner = writer.clone();
    tokio::select! {
        e = prune_loop(&mut pruner, keys) => e,
        e = write_loop(&mut writer, keys, shared) => e,
        e = read_loop(&mut reader, keys, shared, apply, last_id) => e,
    }
}

/// A stream id as (milliseconds, sequence); None if malformed.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Where reading starts: after `last_id` if the stream still holds what
/// followed it, else from the active hash and the stream's end.
async fn catch_up(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    apply: &Applier,
    last_id: &mut Option<String>,
) -> RedisResult<()> {
    if let Some(id) = last_id.as_deref().and_then(stream_id) {
        let first: Value = redis::cmd("XRANGE")
            .arg(&keys.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let first = entries(&first)
            .into_iter()
            .next()
            .and_then(|(first, _)| stream_id(&first));
        // Nothing after `id` was trimmed only if the stream still holds
        // an entry at or before it (writers trim, never delete); an empty
        // stream (trimmed, or Redis restarted without its data) is read
        // again from the hash too.
        if first.is_some_and(|first| first <= id) {
            return Ok(());
        }
    }
    let end: Value = redis::cmd("XREVRANGE")
        .arg(&keys.stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let end = entries(&end)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id);
    // A page at a time (HSCAN, not HGETALL): at a million blocks one
    // reply of everything would hold Redis and this agent's memory. A
    // field HSCAN returns twice is applied twice, to the same effect; a
    // change made meanwhile is in the stream after `end` too.
    let mut read = 0usize;
    let mut cursor = 0u64;
    loop {
        let (next, page) = scan_active(conn, keys, cursor).await?;
        let now = wire_now();
        for (net, value) in pairs(&page).unwrap_or_default() {
            match Event::from_active(net, value) {
                Ok(event) if ended(&event, now) => {}
                Ok(event) => {
                    apply.apply(event, "active");
                    read += 1;
                }
                Err(e) => apply.skip("active", &String::from_utf8_lossy(net), &e),
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    tracing::info!(read, from = end, "cluster: active blocks read");
    *last_id = Some(end);
    Ok(())
}

/// One HSCAN step of the active hash from `cursor`: the next cursor (0
/// once the whole hash was seen) and about [`SCAN_COUNT`] fields with
/// their values.
async fn scan_active(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    cursor: u64,
) -> RedisResult<(u64, Value)> {
    redis::cmd("HSCAN")
        .arg(&keys.active)
        .arg(cursor)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .query_async(conn)
        .await
}

/// Whether a block's end has passed.
fn ended(event: &Event, now: u64) -> bool {
    matches!(event, Event::Block { expires: Some(at), .. } if *at <= now)
}

/// At each connection and every [`PRUNE_INTERVAL`] after, removes the
/// ended blocks from the active hash, a [`SCAN_COUNT`] step at a time
/// (entries it cannot read are left for their writer: they are skipped by
/// every reader anyway).
async fn prune_loop(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
) -> redis::RedisError {
    loop {
        let mut cursor = 0u64;
        loop {
            let (next, fields) = match scan_active(conn, keys, cursor).await {
                Ok(step) => step,
                Err(e) => return e,
            };
            let now = wire_now();
            let mut pipe = redis::pipe();
            let mut n = 0;
            for (net, value) in pairs(&fields).unwrap_or_default() {
                if Event::from_active(net, value).is_ok_and(|e| ended(&e, now)) {
                    pipe.cmd("EVAL")
                        .arg(DELETE_IF_UNCHANGED)
                        .arg(1)
                        .arg(&keys.active)
                        .arg(net)
                        .arg(value)
                        .ignore();
                    n += 1;
                }
            }
            if n > 0 {
                if let Err(e) = pipe.exec_async(conn).await {
                    return e;
                }
                tracing::debug!(
                    removed = n,
                    "cluster: ended blocks removed from the active hash"
                );
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tokio::time::sleep(PRUNE_INTERVAL).await;
    }
}

fn wire_now() -> u64 {
    super::wire::unix_seconds(SystemTime::now())
}

/// Writes the queued events, a batch a round trip; a batch that fails
/// goes back to the queue's front.
async fn write_loop(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    shared: &Shared,
) -> redis::RedisError {
    loop {
        let batch = shared.queue.take(WRITE_BATCH, |_| true);
        if batch.is_empty() {
            shared.queue.ready().await;
            continue;
        }
        let mut pipe = redis::pipe();
        for event in &batch {
            let xadd = pipe
                .cmd("XADD")
                .arg(&keys.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAXLEN)
                .arg("*");
            for (field, value) in event.fields() {
                xadd.arg(field).arg(value);
            }
            xadd.ignore();
            let net = event.net().to_string();
            match event.active_value() {
                Some(value) => pipe.cmd("HSET").arg(&keys.active).arg(net).arg(value),
                None => pipe.cmd("HDEL").arg(&keys.active).arg(net),
            }
            .ignore();
        }
        if let Err(e) = pipe.exec_async(conn).await {
            shared.queue.put_back(batch);
            return e;
        }
        shared
            .published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
}

/// Reads the stream from `last_id` on and applies the other nodes' events.
async fn read_loop(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    shared: &Shared,
    apply: &Applier,
    last_id: &mut Option<String>,
) -> redis::RedisError {
    loop {
        let from = last_id.clone().unwrap_or_else(|| "0-0".to_owned());
        let reply: Value = match redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys.stream)
            .arg(&from)
            .query_async(conn)
            .await
        {
            Ok(reply) => reply,
            Err(e) => return e,
        };
        // [[stream, [[id, [field, value, ...]], ...]]] (or a map in RESP3).
        let streams: Vec<&Value> = match &reply {
            Value::Array(items) => items.iter().collect(),
            Value::Map(items) => items.iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        for stream in streams {
            let list = match stream {
                Value::Array(pair) if pair.len() == 2 => &pair[1],
                other => other,
            };
            for (id, fields) in entries(list) {
                match fields {
                    Some(fields) => match Event::from_fields(fields) {
                        Ok(event) if event.node() == shared.node => {}
                        Ok(event) => apply.apply(event, "stream"),
                        Err(e) => apply.skip("stream", &id, &e),
                    },
                    None => apply.skip("stream", &id, &"fields are not pairs"),
                }
                if stream_id(&id).is_some() {
                    *last_id = Some(id);
                }
            }
        }
    }
}

/// A stream entry's or a hash's fields: (name, value) pairs.
type Fields<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Stream entries: each id with its fields, or None when they are not
/// pairs of strings.
fn entries(value: &Value) -> Vec<(String, Option<Fields<'_>>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item {
            Value::Array(entry) if entry.len() == 2 => {
                let id = match &entry[0] {
                    Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    Value::SimpleString(s) => s.clone(),
                    _ => return None,
                };
                Some((id, pairs(&entry[1])))
            }
            _ => None,
        })
        .collect()
}

/// A flat array of alternating names and values (or a RESP3 map) as
/// pairs; None if anything is not a string.
fn pairs(value: &Value) -> Option<Fields<'_>> {
    fn bytes(v: &Value) -> Option<&[u8]> {
        match v {
            Value::BulkString(b) => Some(b),
            Value::SimpleString(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|kv| Some((bytes(&kv[0])?, bytes(&kv[1])?)))
            .collect(),
        Value::Map(items) => items
            .iter()
            .map(|(k, v)| Some((bytes(k)?, bytes(v)?)))
            .collect(),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id("10-0") > stream_id("9-5"));
        assert!(stream_id("9-10") > stream_id("9-9"));
        assert_eq!(stream_id("x-1"), None);
        assert_eq!(stream_id("12"), None);
    }

    #[test]
    fn odd_replies_give_no_entries_and_no_panic() {
        assert!(entries(&Value::Nil).is_empty());
        assert!(entries(&Value::Int(3)).is_empty());
        let odd = Value::Array(vec![
            Value::Array(vec![bulk("1-0")]),
            Value::Array(vec![bulk("2-0"), Value::Array(vec![bulk("kind")])]),
            Value::Array(vec![
                bulk("3-0"),
                Value::Array(vec![bulk("a"), Value::Int(1)]),
            ]),
            Value::Array(vec![bulk("4-0"), Value::Array(vec![bulk("a"), bulk("b")])]),
        ]);
        let got = entries(&odd);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ("2-0".to_owned(), None));
        assert_eq!(got[1], ("3-0".to_owned(), None));
        assert_eq!(got[2].1, Some(vec![(&b"a"[..], &b"b"[..])]));
    }
}
