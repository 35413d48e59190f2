//! Several agents sharing their blocks through one private Redis
//! (`[cluster]`), as edge hosts of one site would: a block decided on one
//! (by the CLI or by its proxy) holds on the others, its removal too;
//! Redis away, each agent goes on alone and catches up when Redis returns;
//! an agent started empty gets the blocks in force; and what is read from
//! Redis is checked. The agents run in the test's namespace with the
//! kernel layer off and the built-in backend (the proxy's own refusal is
//! what is checked here, not the kernel's drop).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Agent, AgentDir, Launch},
    fixture::{free_port, wait_until},
    proxy::{connect_from, failed_rcpts_before_the_cut, Client},
    redis::{prerequisites, Redis},
};
use serde_json::Value;

/// How long an event may take from one agent to another here: the goal is
/// under a second; the rest is room for a loaded two-CPU CI machine (each
/// check is a CLI run of its own).
const PROPAGATION: Duration = Duration::from_secs(10);
/// How long an agent may take to notice Redis gone or back (a reconnect
/// waits up to 10 s between tries).
const RECONNECT: Duration = Duration::from_secs(30);

/// One agent of the cluster: its directory and ports.
struct Node {
    name: &'static str,
    dir: AgentDir,
    proxy: SocketAddr,
    redis: String,
    extra: String,
    /// The configuration last written (without what
    /// [`AgentDir::write_config`] adds).
    body: String,
    /// `VAR=value` the agent runs with (through `env`).
    env: Vec<String>,
}

impl Node {
    fn new(name: &'static str, redis: &Redis, extra: &str) -> Node {
        Node {
            name,
            dir: AgentDir::new(name),
            proxy: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis: redis.url(),
            extra: extra.to_owned(),
            body: String::new(),
            env: Vec::new(),
        }
    }

    /// Starts the agent on new free ports (others if one was taken).
    fn start(&mut self) -> Agent {
        let Node {
            name,
            dir,
            proxy,
            redis,
            extra,
            body,
            env,
        } = self;
        let launch = if env.is_empty() {
            Launch::here()
        } else {
            Launch {
                wrapper: [&["/usr/bin/env".to_owned()][..], env].concat(),
                ..Launch::default()
            }
        };
        Agent::start(dir, &launch, || {
            let port = || free_port().expect("a free port");
            *proxy = SocketAddr::from(([127, 0, 0, 1], port()));
            *body = format!(
                r#"
                [[listen]]
                address = "{proxy}"
                [backend]
                address = "127.0.0.1:{backend}"
                builtin = true
                [metrics]
                address = "127.0.0.1:{metrics}"
                [kernel]
                mode = "off"
                [limits]
                max_failed_rcpt = 3
                [cluster]
                redis = "{redis}"
                node = "{name}"
                share_counters = false
                {extra}
                "#,
                backend = port(),
                metrics = port(),
            );
            dir.write_config(body);
        })
    }
}

/// The proxy's greeting to `source`.
#[track_caller]
fn greeting(source: &str, proxy: SocketAddr) -> String {
    let (_, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    greeting
}

/// `stats`' cluster object.
fn cluster(agent: &Agent) -> Value {
    agent.json(&["stats"])["cluster"].clone()
}

/// Waits until `agent` lists (or, `listed` false, no longer lists) `net`;
/// how long that took.
#[track_caller]
fn wait_listed(agent: &Agent, net: &str, listed: bool, what: &str) -> Duration {
    let start = Instant::now();
    assert!(
        wait_until(PROPAGATION, || agent.block(net).is_some() == listed),
        "{what}: {net} {} within {PROPAGATION:?}; log:\n{}",
        if listed { "not listed" } else { "still listed" },
        agent.log()
    );
    start.elapsed()
}

#[track_caller]
fn wait_state(agent: &Agent, state: &str) {
    assert!(
        wait_until(RECONNECT, || cluster(agent)["state"] == state),
        "cluster never {state}: {}; log:\n{}",
        cluster(agent),
        agent.log()
    );
}

#[test]
fn blocks_decided_on_one_agent_hold_on_the_other() {
    if !prerequisites("blocks_decided_on_one_agent_hold_on_the_other") {
        return;
    }
    let redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "[lists]\nallow = [\"127.0.0.200\"]");
    let mut b = Node::new("mx-b", &redis, "[lists]\nallow = [\"127.0.0.200\"]");
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    assert_eq!(cluster(&agent_a)["node"], "mx-a");

    // (a) A manual block on A is listed on B, decided by A.
    let added = Instant::now();
    let out = agent_a.cli(&[
        "block",
        "add",
        "127.0.0.9",
        "--for",
        "1h",
        "--reason",
        "manual",
    ]);
    assert!(out.success(), "{}", out.text());
    let seen = wait_listed(&agent_b, "127.0.0.9/32", true, "block add on A");
    println!(
        "propagation latency (block add on A to B's block list, CLI polling): {:?} after the command, {:?} including it",
        seen,
        added.elapsed()
    );
    let row = agent_b.block("127.0.0.9/32").unwrap();
    assert_eq!(row["node"], "mx-a", "{row}");
    assert_eq!(row["origin"], "manual", "{row}");
    assert_eq!(agent_a.block("127.0.0.9/32").unwrap()["node"], "mx-a");
    let text = agent_b.cli(&["block", "list"]).text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("127.0.0.9/32 ") && l.ends_with("(node mx-a)")),
        "{text}"
    );
    assert!(greeting("127.0.0.9", b.proxy).starts_with("421 4.7.0"));

    // (b) Its removal on A releases it on B.
    let out = agent_a.cli(&["block", "del", "127.0.0.9"]);
    assert!(out.success(), "{}", out.text());
    let gone = wait_listed(&agent_b, "127.0.0.9/32", false, "block del on A");
    println!("propagation latency (block del on A to B): {gone:?}");
    assert!(greeting("127.0.0.9", b.proxy).starts_with("220 "));

    // (c) A harvester cut off by A's proxy is refused by B's.
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.10", a.proxy), 3);
    let seen = wait_listed(&agent_b, "127.0.0.10/32", true, "harvest block on A");
    println!("propagation latency (harvest block on A to B): {seen:?}");
    let row = agent_b.block("127.0.0.10/32").unwrap();
    assert_eq!(
        (&row["node"], &row["origin"]),
        (&"mx-a".into(), &"harvest".into()),
        "{row}"
    );
    let refused = greeting("127.0.0.10", b.proxy);
    assert!(
        refused.starts_with("421 4.7.0"),
        "B let the harvester in: {refused}"
    );

    // (f) Entries nobody trustworthy wrote: malformed ones, one for every
    // address, one for an allow-listed source; then a good one, so that
    // once it is listed the others have been read.
    let stream = "smtp-limiter:blocks";
    for fields in [
        &[
            "kind",
            "block",
            "net",
            "not-a-net",
            "reason",
            "manual",
            "node",
            "x",
            "expires",
            "never",
        ][..],
        &["kind", "explode"],
        &[
            "kind",
            "block",
            "net",
            "0.0.0.0/0",
            "reason",
            "manual",
            "node",
            "evil",
            "expires",
            "never",
        ],
        &[
            "kind",
            "block",
            "net",
            "127.0.0.0/24",
            "reason",
            "manual",
            "node",
            "evil",
            "expires",
            "never",
        ],
        &[
            "kind",
            "block",
            "net",
            "127.0.0.11/32",
            "reason",
            "flood",
            "node",
            "tester",
            "expires",
            "never",
        ],
    ] {
        let mut args = vec!["XADD", stream, "*"];
        args.extend_from_slice(fields);
        redis.cli(&args).expect("XADD");
    }
    wait_listed(
        &agent_b,
        "127.0.0.11/32",
        true,
        "the good entry after the bad ones",
    );
    for agent in [&agent_a, &agent_b] {
        let log = agent.log();
        assert!(
            log.contains("malformed entry skipped") && log.contains("not-a-net"),
            "{log}"
        );
        assert!(
            log.contains("block refused") && log.contains("0.0.0.0/0"),
            "{log}"
        );
        assert!(agent.block("0.0.0.0/0").is_none() && agent.block("127.0.0.0/24").is_none());
        assert!(
            cluster(agent)["refused"].as_u64() >= Some(4),
            "{}",
            cluster(agent)
        );
    }
    // A source nobody blocked is still served by both.
    assert!(greeting("127.0.0.12", a.proxy).starts_with("220 "));
    assert!(greeting("127.0.0.12", b.proxy).starts_with("220 "));
    assert!(
        cluster(&agent_a)["published"].as_u64() >= Some(3),
        "{}",
        cluster(&agent_a)
    );

    // A source allow-listed on B by a reload is not blocked there by A's
    // decision (A does not allow it).
    b.body = b
        .body
        .replace("\"127.0.0.200\"]", "\"127.0.0.200\", \"127.0.0.13\"]");
    b.dir.write_config(&b.body);
    let out = agent_b.cli(&["reload"]);
    assert!(out.success(), "{}", out.text());
    for net in ["127.0.0.13", "127.0.0.14"] {
        let out = agent_a.cli(&["block", "add", net, "--for", "1h"]);
        assert!(out.success(), "{}", out.text());
    }
    wait_listed(
        &agent_b,
        "127.0.0.14/32",
        true,
        "the block after the allowed one",
    );
    assert!(
        agent_b.block("127.0.0.13/32").is_none(),
        "allow-listed on B, blocked all the same"
    );
    assert!(agent_b.log().contains("127.0.0.13/32") && agent_a.block("127.0.0.13/32").is_some());
    agent_a.stop();
    agent_b.stop();
}

#[test]
fn redis_away_each_agent_goes_on_and_catches_up_and_an_empty_agent_gets_the_blocks() {
    if !prerequisites(
        "redis_away_each_agent_goes_on_and_catches_up_and_an_empty_agent_gets_the_blocks",
    ) {
        return;
    }
    let mut redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    let out = agent_a.cli(&["block", "add", "127.0.1.1", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    wait_listed(&agent_b, "127.0.1.1/32", true, "before the outage");

    // (d) Redis killed: both serve, both say so; a block on B meanwhile
    // reaches A once Redis is back on the same port (empty).
    redis.kill();
    wait_state(&agent_a, "down");
    wait_state(&agent_b, "down");
    assert!(greeting("127.0.1.2", a.proxy).starts_with("220 "));
    assert!(greeting("127.0.1.2", b.proxy).starts_with("220 "));
    let out = agent_b.cli(&[
        "block",
        "add",
        "127.0.1.3",
        "--for",
        "1h",
        "--reason",
        "manual",
    ]);
    assert!(out.success(), "{}", out.text());
    assert!(greeting("127.0.1.3", b.proxy).starts_with("421 4.7.0"));
    assert!(agent_a.block("127.0.1.3/32").is_none());
    assert_eq!(cluster(&agent_b)["queued"], 1, "{}", cluster(&agent_b));
    redis.restart().expect("redis-server back on its port");
    let back = Instant::now();
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    assert!(
        wait_until(RECONNECT, || agent_a.block("127.0.1.3/32").is_some()),
        "the block B decided during the outage never reached A; log:\n{}",
        agent_b.log()
    );
    println!("caught up {:?} after Redis returned", back.elapsed());
    assert_eq!(agent_a.block("127.0.1.3/32").unwrap()["node"], "mx-b");
    assert!(greeting("127.0.1.3", a.proxy).starts_with("421 4.7.0"));
    for agent in [&agent_a, &agent_b] {
        let log = agent.log();
        assert_eq!(
            log.matches("Redis unreachable").count(),
            1,
            "once per change:\n{log}"
        );
    }

    // An agent away while the stream was trimmed past its position reads
    // the active hash again: A is cut off (its connections killed, a
    // password keeps it out), an event is written to the hash only, the
    // stream trimmed; then A is let back in.
    let clients = redis.cli(&["CLIENT", "LIST"]).unwrap();
    let ids: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains("name=smtp-limiter:mx-a "))
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("id="))
        .collect();
    assert_eq!(ids.len(), 2, "A's two connections, named: {clients}");
    redis
        .cli(&["CONFIG", "SET", "requirepass", "keep-out"])
        .unwrap();
    let auth = ["--no-auth-warning", "-a", "keep-out"];
    for id in ids {
        redis
            .cli(&[&auth[..], &["CLIENT", "KILL", "ID", id]].concat())
            .unwrap();
    }
    wait_state(&agent_a, "down");
    let entry = r#"{"reason":"flood","node":"tester","expires":"never","comment":""}"#;
    for command in [
        &["HSET", "smtp-limiter:active", "127.0.1.6/32", entry][..],
        &["XTRIM", "smtp-limiter:blocks", "MAXLEN", "0"],
        &["CONFIG", "SET", "requirepass", ""],
    ] {
        redis.cli(&[&auth[..], command].concat()).unwrap();
    }
    wait_state(&agent_a, "up");
    wait_listed(&agent_a, "127.0.1.6/32", true, "A back after the trim");

    // (e) An agent started with an empty state directory gets the blocks
    // in force; a malformed entry in the hash is skipped.
    redis
        .cli(&["HSET", "smtp-limiter:active", "127.0.1.4/32", "{not json"])
        .unwrap();
    redis
        .cli(&[
            "HSET",
            "smtp-limiter:active",
            "0.0.0.0/0",
            r#"{"reason":"manual","node":"evil","expires":"never","comment":""}"#,
        ])
        .unwrap();
    let ended = r#"{"reason":"flood","node":"mx-a","expires":"1000","comment":""}"#;
    redis
        .cli(&["HSET", "smtp-limiter:active", "127.0.1.5/32", ended])
        .unwrap();
    let mut c = Node::new("mx-c", &redis, "");
    let agent_c = c.start();
    wait_state(&agent_c, "up");
    wait_listed(&agent_c, "127.0.1.3/32", true, "empty agent C");
    assert_eq!(agent_c.block("127.0.1.3/32").unwrap()["node"], "mx-b");
    assert!(greeting("127.0.1.3", c.proxy).starts_with("421 4.7.0"));
    assert!(agent_c.block("0.0.0.0/0").is_none() && agent_c.block("127.0.1.4/32").is_none());
    let log = agent_c.log();
    assert!(
        log.contains("malformed entry skipped") && log.contains("127.0.1.4/32"),
        "{log}"
    );
    assert!(log.contains("block refused"), "{log}");
    // The ended block is not applied, and leaves the hash; the unreadable
    // entries stay for whoever wrote them.
    assert!(agent_c.block("127.0.1.5/32").is_none());
    assert!(
        wait_until(PROPAGATION, || redis
            .cli(&["HEXISTS", "smtp-limiter:active", "127.0.1.5/32"])
            .is_ok_and(|r| r == "0")),
        "the ended block stayed in the hash"
    );
    let left = redis.cli(&["HEXISTS", "smtp-limiter:active", "127.0.1.4/32"]);
    assert_eq!(left.unwrap(), "1");
    agent_a.stop();
    agent_b.stop();
    agent_c.stop();
}

#[test]
fn a_password_protected_redis_takes_password_file_and_refuses_the_rest() {
    if !prerequisites("a_password_protected_redis_takes_password_file_and_refuses_the_rest") {
        return;
    }
    let redis = Redis::start_with_password("cluster-secret").expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let password_file = a.dir.path().join("redis.pw");
    std::fs::write(&password_file, "cluster-secret\n").unwrap();
    a.extra = format!("password_file = \"{}\"", password_file.display());
    let mut b = Node::new("mx-b", &redis, "");
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    let out = agent_a.cli(&["block", "add", "127.0.2.1", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    assert!(
        wait_until(PROPAGATION, || redis
            .cli(&["HEXISTS", "smtp-limiter:active", "127.0.2.1/32"])
            .is_ok_and(|r| r == "1")),
        "A's block never reached Redis; log:\n{}",
        agent_a.log()
    );
    // B has no password: it stays down, says why once, and serves alone.
    assert!(
        wait_until(RECONNECT, || agent_b.log().contains("Redis unreachable")),
        "{}",
        agent_b.log()
    );
    let log = agent_b.log();
    assert!(
        log.contains("NOAUTH") || log.contains("uthentication"),
        "{log}"
    );
    assert_eq!(cluster(&agent_b)["state"], "down");
    assert!(agent_b.block("127.0.2.1/32").is_none());
    assert!(greeting("127.0.2.1", b.proxy).starts_with("220 "));
    agent_a.stop();
    agent_b.stop();
}

#[test]
fn blocks_travel_over_tls_verified_against_the_ca() {
    if !prerequisites("blocks_travel_over_tls_verified_against_the_ca") {
        return;
    }
    let redis = Redis::start_tls().expect("a private redis-server with TLS");
    // The agents verify the server against the system's CA store, which
    // SSL_CERT_FILE replaces (as an operator's unit could).
    let trust = format!("SSL_CERT_FILE={}", redis.ca_file().display());
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    a.env = vec![trust.clone()];
    b.env = vec![trust];
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    let out = agent_a.cli(&["block", "add", "127.0.3.1", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    let seen = wait_listed(&agent_b, "127.0.3.1/32", true, "over TLS");
    println!("propagation latency over TLS (block add on A to B): {seen:?}");
    // An agent that does not trust the CA stays out.
    let mut c = Node::new("mx-c", &redis, "");
    let agent_c = c.start();
    assert!(
        wait_until(RECONNECT, || agent_c.log().contains("Redis unreachable")),
        "{}",
        agent_c.log()
    );
    assert!(agent_c.log().contains("certificate"), "{}", agent_c.log());
    assert_eq!(cluster(&agent_c)["state"], "down");
    assert!(agent_c.block("127.0.3.1/32").is_none());
    agent_a.stop();
    agent_b.stop();
    agent_c.stop();
}
