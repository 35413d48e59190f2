//! Several agents sharing their blocks through one private Redis
//! (`[cluster]`), as edge hosts of one site would: a block decided on one
//! (by the CLI or by its proxy) holds on the others, its removal too;
//! Redis away, each agent goes on alone and catches up when Redis returns;
//! an agent started empty gets the blocks in force; what is read from
//! Redis is checked; and with `share_counters` a harvester or an AUTH
//! guesser spread over the agents is blocked at the limit counted over all
//! of them (without, nowhere). The agents run in the test's namespace with the
//! kernel layer off and the built-in backend (the proxy's own refusal is
//! what is checked here, not the kernel's drop).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{scrape_metrics, Agent, AgentDir, Launch},
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
    /// `cluster.share_counters`.
    share_counters: bool,
    /// More `[limits]` keys.
    limits: String,
    /// The metrics listener, once started.
    metrics: SocketAddr,
    /// The top-level `mode`.
    mode: &'static str,
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
            share_counters: false,
            limits: String::new(),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            mode: "enforce",
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
            share_counters,
            limits,
            metrics,
            mode,
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
            *metrics = SocketAddr::from(([127, 0, 0, 1], port()));
            *body = format!(
                r#"
                mode = "{mode}"
                [[listen]]
                address = "{proxy}"
                [backend]
                address = "127.0.0.1:{backend}"
                builtin = true
                [metrics]
                address = "{metrics}"
                [kernel]
                mode = "off"
                [limits]
                max_failed_rcpt = 3
                {limits}
                [cluster]
                redis = "{redis}"
                node = "{name}"
                share_counters = {share_counters}
                {extra}
                "#,
                backend = port(),
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

/// Waits until `agent` shares blocks and counted events through Redis.
fn wait_sharing(agent: &Agent) {
    wait_state(agent, "up");
    assert!(
        wait_until(RECONNECT, || cluster(agent)["counters"]["state"] == "up"),
        "{}",
        cluster(agent)
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

/// One failed RCPT from `source` through `proxy`, in a session of its own
/// (under the per-session limit); the proxy's reply to it.
#[track_caller]
fn one_failed_rcpt(source: &str, proxy: SocketAddr, n: usize) -> String {
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO harvester.test").unwrap().starts_with("250"));
    assert!(smtp
        .cmd("MAIL FROM:<h@harvester.test>")
        .unwrap()
        .starts_with("250 "));
    let reply = smtp
        .cmd(&format!("RCPT TO:<nobody{n}@example.com>"))
        .unwrap();
    let _ = smtp.cmd("QUIT");
    reply
}

/// One failed AUTH from `source` through `proxy`, in a session of its own;
/// the proxy's reply to it.
#[track_caller]
fn one_failed_auth(source: &str, proxy: SocketAddr) -> String {
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO guesser.test").unwrap().starts_with("250"));
    // "\0guess\0wrong": not the built-in backend's demo account.
    let reply = smtp.cmd("AUTH PLAIN AGd1ZXNzAHdyb25n").unwrap();
    let _ = smtp.cmd("QUIT");
    reply
}

/// `stats`' counted events sent to Redis by `agent`.
fn counted_sent(agent: &Agent) -> u64 {
    cluster(agent)["counters"]["sent"].as_u64().unwrap_or(0)
}

/// A metric's value in a scrape (`name` with its labels).
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Attacks spread over both agents, each agent seeing fewer failures than
/// its limit: with `share_counters` both block the source at the limit
/// counted over both; without, neither does. (The per-network windows are
/// off here, so that each failure is one counted event.)
const SPREAD_LIMITS: &str = "max_failed_rcpt_per_source = 6\nfailed_rcpt_window = \"1h\"\nmax_failed_auth = 3\nfailed_auth_window = \"10m\"\nmax_failed_rcpt_per_network = 0\nmax_failed_auth_per_network = 0";

#[test]
fn failures_spread_over_two_agents_are_counted_together() {
    if !prerequisites("failures_spread_over_two_agents_are_counted_together") {
        return;
    }
    let mut redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    for node in [&mut a, &mut b] {
        node.share_counters = true;
        node.limits = SPREAD_LIMITS.to_owned();
    }
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_sharing(&agent_a);
    wait_sharing(&agent_b);
    let proxies = [a.proxy, b.proxy];
    let agents = [&agent_a, &agent_b];
    let both_sent = |n: u64| {
        assert!(
            wait_until(PROPAGATION, || counted_sent(&agent_a)
                + counted_sent(&agent_b)
                >= n),
            "{n} counted events never reached Redis: {} {}",
            cluster(&agent_a),
            cluster(&agent_b)
        );
    };

    // A harvester: one failed RCPT a session, alternating hosts; six
    // failures (three on each) are within the limit everywhere.
    let harvester = "127.0.4.1";
    for n in 0..6 {
        let reply = one_failed_rcpt(harvester, proxies[n % 2], n);
        assert!(reply.starts_with('5'), "RCPT {n}: {reply}");
    }
    both_sent(6);
    for agent in agents {
        assert!(
            agent.block("127.0.4.1/32").is_none(),
            "blocked before the limit"
        );
    }
    // The seventh, on A, is one past the limit over both: blocked on both.
    let reply = one_failed_rcpt(harvester, a.proxy, 6);
    assert!(reply.starts_with('5'), "RCPT 7: {reply}");
    let seen_a = wait_listed(&agent_a, "127.0.4.1/32", true, "harvest over both (A)");
    let seen_b = wait_listed(&agent_b, "127.0.4.1/32", true, "harvest over both (B)");
    println!("harvest spread over A and B: blocked on A after {seen_a:?}, on B after {seen_b:?}");
    let row = agent_b.block("127.0.4.1/32").unwrap();
    assert_eq!(
        (&row["node"], &row["origin"]),
        (&"mx-a".into(), &"harvest".into()),
        "{row}"
    );
    for proxy in proxies {
        assert!(greeting(harvester, proxy).starts_with("421 4.7.0"));
    }
    assert!(agent_a
        .log()
        .contains("window over its limit counted over every host"));

    // A brute-forcer: one failed AUTH a session, alternating; three are
    // within max_failed_auth = 3, the fourth (on B) blocks on both.
    let guesser = "127.0.4.2";
    for n in 0..3 {
        let reply = one_failed_auth(guesser, proxies[n % 2]);
        assert!(reply.starts_with("535"), "AUTH {n}: {reply}");
    }
    both_sent(10);
    for agent in agents {
        assert!(
            agent.block("127.0.4.2/32").is_none(),
            "blocked before the limit"
        );
    }
    assert!(one_failed_auth(guesser, b.proxy).starts_with("535"));
    wait_listed(&agent_b, "127.0.4.2/32", true, "AUTH over both (B)");
    wait_listed(&agent_a, "127.0.4.2/32", true, "AUTH over both (A)");
    let row = agent_a.block("127.0.4.2/32").unwrap();
    assert_eq!(
        (&row["node"], &row["origin"]),
        (&"mx-b".into(), &"auth".into()),
        "{row}"
    );

    // The cost in Redis: one command per counted event (and one script
    // load per connection), as Redis itself counts them.
    let stats = redis.cli(&["INFO", "commandstats"]).unwrap();
    let calls = |command: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let sent = counted_sent(&agent_a) + counted_sent(&agent_b);
    let commands: u64 = agents
        .iter()
        .map(|agent| cluster(agent)["counters"]["commands"].as_u64().unwrap())
        .sum();
    println!(
        "Redis commands per counted event: {sent} events sent, {commands} commands by the agents (Redis counts EVALSHA {}, SCRIPT LOAD {}; DEL {}, called inside the script), {:.2} per event",
        calls("evalsha"),
        calls("script|load"),
        calls("del"),
        commands as f64 / sent as f64
    );
    assert_eq!(sent, 11, "{} {}", cluster(&agent_a), cluster(&agent_b));
    assert_eq!(calls("evalsha"), sent);
    assert_eq!(commands, sent + 2, "one script load per agent");
    // The windows that crossed were deleted; the keys expire by themselves.
    let keys = redis.cli(&["KEYS", "smtp-limiter:count:*"]).unwrap();
    assert_eq!(keys.trim(), "", "windows left after the blocks: {keys}");
    // A window under its limit holds its event and expires by itself.
    assert!(one_failed_auth("127.0.4.5", a.proxy).starts_with("535"));
    both_sent(12);
    let key = "smtp-limiter:count:auth:127.0.4.5/32";
    assert_eq!(redis.cli(&["ZCARD", key]).unwrap().trim(), "1");
    let ttl: i64 = redis.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "PTTL {ttl}");

    // The figures on /metrics.
    let text = scrape_metrics(a.metrics);
    for (name, value) in [
        ("smtp_limiter_cluster_up", 1),
        ("smtp_limiter_cluster_counters_up", 1),
        ("smtp_limiter_cluster_windows_crossed_total", 1),
        ("smtp_limiter_cluster_events_total{event=\"applied\"}", 1),
        ("smtp_limiter_cluster_events_total{event=\"refused\"}", 0),
        (
            "smtp_limiter_cluster_counted_events_total{outcome=\"dropped\"}",
            0,
        ),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name}: {text}");
    }
    assert_eq!(
        sample(
            &text,
            "smtp_limiter_cluster_counted_events_total{outcome=\"sent\"}"
        ),
        Some(counted_sent(&agent_a)),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "smtp_limiter_cluster_events_total{event=\"published\"}"
        ) >= Some(1)
    );

    // Redis away: the events are dropped and counted, mail flows, and each
    // agent still blocks on its own windows.
    redis.kill();
    let alone = "127.0.4.3";
    for n in 0..4 {
        let reply = one_failed_auth(alone, a.proxy);
        if n < 3 {
            assert!(reply.starts_with("535"), "AUTH {n}: {reply}");
        }
    }
    assert!(greeting(alone, a.proxy).starts_with("421 4.7.0"));
    assert!(greeting("127.0.4.4", b.proxy).starts_with("220 "));
    assert!(
        wait_until(PROPAGATION, || cluster(&agent_a)["counters"]["dropped"]
            .as_u64()
            >= Some(4)),
        "{}",
        cluster(&agent_a)
    );
    assert_eq!(cluster(&agent_a)["counters"]["state"], "down");
    let text = scrape_metrics(a.metrics);
    assert_eq!(
        sample(&text, "smtp_limiter_cluster_counters_up"),
        Some(0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "smtp_limiter_cluster_counted_events_total{outcome=\"dropped\"}"
        ) >= Some(4),
        "{text}"
    );
    agent_a.stop();
    agent_b.stop();
}

#[test]
fn failures_spread_over_a_network_and_two_agents_block_the_network_on_both() {
    if !prerequisites("failures_spread_over_a_network_and_two_agents_block_the_network_on_both") {
        return;
    }
    let redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    for node in [&mut a, &mut b] {
        node.share_counters = true;
        node.limits = "max_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 5\n\
                       failed_rcpt_window = \"1h\""
            .to_owned();
    }
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_sharing(&agent_a);
    wait_sharing(&agent_b);
    let proxies = [a.proxy, b.proxy];
    // Five addresses of 127.0.6.0/24, one failed RCPT each, alternating
    // hosts: within the network's limit on each host and over both.
    for n in 0..5 {
        let reply = one_failed_rcpt(&format!("127.0.6.{}", n + 1), proxies[n % 2], n);
        assert!(reply.starts_with('5'), "RCPT {n}: {reply}");
    }
    assert!(
        wait_until(PROPAGATION, || counted_sent(&agent_a)
            + counted_sent(&agent_b)
            >= 5),
        "{} {}",
        cluster(&agent_a),
        cluster(&agent_b)
    );
    for agent in [&agent_a, &agent_b] {
        assert!(
            agent.block("127.0.6.0/24").is_none(),
            "blocked before the limit"
        );
    }
    // A sixth address, on B (its third here): one past the limit over both.
    let reply = one_failed_rcpt("127.0.6.6", b.proxy, 5);
    assert!(reply.starts_with('5'), "RCPT 6: {reply}");
    let seen_b = wait_listed(&agent_b, "127.0.6.0/24", true, "the network over both (B)");
    let seen_a = wait_listed(&agent_a, "127.0.6.0/24", true, "the network over both (A)");
    println!("harvest spread over a /24 and two hosts: blocked on B after {seen_b:?}, on A after {seen_a:?}");
    let row = agent_a.block("127.0.6.0/24").unwrap();
    assert_eq!(
        (&row["node"], &row["origin"]),
        (&"mx-b".into(), &"harvest".into()),
        "{row}"
    );
    for proxy in proxies {
        assert!(greeting("127.0.6.200", proxy).starts_with("421 4.7.0"));
    }
    assert!(greeting("127.0.7.1", a.proxy).starts_with("220 "));
    agent_a.stop();
    agent_b.stop();
}

#[test]
fn without_share_counters_failures_spread_over_two_agents_block_nowhere() {
    if !prerequisites("without_share_counters_failures_spread_over_two_agents_block_nowhere") {
        return;
    }
    let redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    for node in [&mut a, &mut b] {
        node.limits = SPREAD_LIMITS.to_owned();
    }
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    let proxies = [a.proxy, b.proxy];
    // Ten failed RCPTs and six failed AUTHs, half on each: under each
    // agent's own limits (6 and 3), over them counted together.
    for n in 0..10 {
        let reply = one_failed_rcpt("127.0.5.1", proxies[n % 2], n);
        assert!(reply.starts_with('5'), "RCPT {n}: {reply}");
    }
    for n in 0..6 {
        let reply = one_failed_auth("127.0.5.2", proxies[n % 2]);
        assert!(reply.starts_with("535"), "AUTH {n}: {reply}");
    }
    // A block would have reached the other agent within this.
    let out = agent_a.cli(&["block", "add", "127.0.5.9", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    wait_listed(&agent_b, "127.0.5.9/32", true, "the marker block");
    for agent in [&agent_a, &agent_b] {
        assert_eq!(
            cluster(agent)["counters"],
            Value::Null,
            "{}",
            cluster(agent)
        );
        for net in ["127.0.5.1/32", "127.0.5.2/32"] {
            assert!(
                agent.block(net).is_none(),
                "{net} blocked: counted together?"
            );
        }
        let text = scrape_metrics(if agent.pid() == agent_a.pid() {
            a.metrics
        } else {
            b.metrics
        });
        assert_eq!(sample(&text, "smtp_limiter_cluster_up"), Some(1), "{text}");
        assert!(!text.contains("smtp_limiter_cluster_counters_up"), "{text}");
    }
    assert!(greeting("127.0.5.1", a.proxy).starts_with("220 "));
    assert!(greeting("127.0.5.2", b.proxy).starts_with("220 "));
    let keys = redis.cli(&["KEYS", "smtp-limiter:count:*"]).unwrap();
    assert_eq!(keys.trim(), "", "{keys}");
    agent_a.stop();
    agent_b.stop();
}

#[test]
fn a_repeat_offender_is_escalated_on_every_host() {
    if !prerequisites("a_repeat_offender_is_escalated_on_every_host") {
        return;
    }
    let redis = Redis::start().expect("a private redis-server");
    // Short blocks, doubling: a first block of 2 s, a repeat of 4 s.
    let limits = "block_duration = \"2s\"\nblock_backoff = 2.0";
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    a.limits = limits.to_owned();
    b.limits = limits.to_owned();
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    let harvester = "127.0.0.31";
    let net = "127.0.0.31/32";

    // A cuts the harvester off: a first block, which B holds too.
    assert_eq!(failed_rcpts_before_the_cut(harvester, a.proxy), 3);
    wait_listed(&agent_b, net, true, "A's harvest block");
    assert_eq!(agent_b.block(net).unwrap()["repeat"], 0);
    // Once it ended, the harvester tries B: B's block is a repeat, from
    // the history A's block left on B.
    assert!(
        wait_until(PROPAGATION, || greeting(harvester, b.proxy)
            .starts_with("220 ")),
        "A's 2 s block never ended on B"
    );
    assert_eq!(failed_rcpts_before_the_cut(harvester, b.proxy), 3);
    let row = agent_b.block(net).expect("B's own block");
    assert_eq!(
        (&row["node"], &row["repeat"]),
        (&"mx-b".into(), &1.into()),
        "{row}"
    );
    // And A holds B's block at that level.
    assert!(
        wait_until(PROPAGATION, || agent_a
            .block(net)
            .is_some_and(|r| r["node"] == "mx-b" && r["repeat"] == 1)),
        "A: {:?}",
        agent_a.block(net)
    );
}

#[test]
fn an_observing_host_takes_no_policy_block_of_the_others_but_an_operators() {
    if !prerequisites("an_observing_host_takes_no_policy_block_of_the_others_but_an_operators") {
        return;
    }
    let redis = Redis::start().expect("a private redis-server");
    let mut a = Node::new("mx-a", &redis, "");
    let mut b = Node::new("mx-b", &redis, "");
    b.mode = "observe";
    let (agent_a, agent_b) = (a.start(), b.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    // A harvester cut off by A: B (observing) logs and counts it, and
    // serves the source.
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.41", a.proxy), 3);
    assert!(
        wait_until(PROPAGATION, || cluster(&agent_b)["observed"] == 1),
        "B: {}",
        cluster(&agent_b)
    );
    assert!(agent_b.block("127.0.0.41/32").is_none());
    assert!(greeting("127.0.0.41", b.proxy).starts_with("220 "));
    assert!(agent_b.log().contains("source not blocked: observe mode"));
    // An operator's block on A is taken as one made on B (listed; what
    // observe mode does with it is the same as for B's own).
    let out = agent_a.cli(&["block", "add", "127.0.0.42", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    wait_listed(&agent_b, "127.0.0.42/32", true, "block add on A");
    assert_eq!(cluster(&agent_b)["applied"], 1);
    assert_eq!(cluster(&agent_b)["observed"], 1);
}

#[test]
fn an_acl_user_with_only_the_prefix_keys_shares_blocks_over_the_unix_socket() {
    if !prerequisites("an_acl_user_with_only_the_prefix_keys_shares_blocks_over_the_unix_socket") {
        return;
    }
    let redis = Redis::start_with_password("admin-secret").expect("a private redis-server");
    // Least privilege: the agents' keys only; another user with other keys.
    for user in [
        [
            "ACL",
            "SETUSER",
            "limiter",
            "on",
            ">limiter-pw",
            "~smtp-limiter:*",
            "+@all",
        ],
        [
            "ACL",
            "SETUSER",
            "elsewhere",
            "on",
            ">other-pw",
            "~other:*",
            "+@all",
        ],
    ] {
        redis.cli(&user).expect("ACL SETUSER");
    }
    let node = |name, user: &str, password: &str, url: String| {
        let mut node = Node::new(name, &redis, "");
        let file = node.dir.path().join("redis.pw");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        node.redis = url.replacen("://", &format!("://{user}@"), 1);
        node.extra = format!("password_file = \"{}\"", file.display());
        node
    };
    let tcp = redis.url();
    // redis-rs spells a Unix socket's user and password as query
    // parameters; the user goes there, the password from the file.
    let unix = format!("{}?user=limiter", redis.unix_url());
    let mut a = node("mx-a", "limiter", "limiter-pw", tcp.clone());
    let mut b = node("mx-b", "limiter", "limiter-pw", tcp.clone());
    b.redis = unix;
    let mut c = node("mx-c", "elsewhere", "other-pw", tcp);
    let (agent_a, agent_b, agent_c) = (a.start(), b.start(), c.start());
    wait_state(&agent_a, "up");
    wait_state(&agent_b, "up");
    let out = agent_a.cli(&["block", "add", "127.0.3.1", "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    wait_listed(
        &agent_b,
        "127.0.3.1/32",
        true,
        "block add on A, B on the Unix socket",
    );
    // The user without the prefix's keys is refused by Redis: C says so,
    // stays down and serves alone.
    assert!(
        wait_until(RECONNECT, || agent_c.log().contains("Redis unreachable")),
        "{}",
        agent_c.log()
    );
    assert!(
        agent_c.log().to_lowercase().contains("noperm"),
        "{}",
        agent_c.log()
    );
    assert_eq!(cluster(&agent_c)["state"], "down");
    assert!(agent_c.block("127.0.3.1/32").is_none());
}
