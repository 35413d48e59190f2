//! Two edge hosts of one site sharing their blocks through one real
//! redis-server, each as it runs in production: the real agent in a
//! network namespace of its own with XDP on its own interface, in front of
//! a private Postfix of its own. A block decided on host A (by its proxy,
//! or by the CLI) is dropped by host B's kernel, its removal too; host B
//! started again from nothing (empty state directory, new pins) drops the
//! cluster's blocks in its kernel from its first SYN on (it listens once it
//! has read them); with Redis away both hosts deliver, and a block one
//! decided meanwhile reaches the other's kernel once Redis is back. Mail from a clean source is delivered
//! through both hosts all along. With the hosts' Postfixes offering SMTP
//! AUTH (Cyrus SASL) and the hosts sharing their counters, a brute-forcer
//! spreading failed AUTHs over both is blocked on both, by both kernels,
//! once the failures counted over both pass the limit.
//!
//! The clients live in one "internet" namespace joined to each host by a
//! veth pair; each host routes back to it by default, so one source
//! address reaches both hosts. Redis (and each Postfix) run on the test's
//! own loopback, as their fixtures make them, and each host reaches them
//! through a [`Relay`] on its own loopback, the way [`NetRig`] reaches its
//! Postfix: Redis sits on a management network here, out of the mail
//! path, and its fixture stays as it is.
//!
//! Needs root, the eBPF object, the `smtp-limiter` binary, Postfix, swaks
//! and redis-server; under `CI=true` a missing one fails the test.
//!
//! [`NetRig`]: limiter_tests::agent::NetRig

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Agent, AgentDir, Launch, RigParts},
    clients::{self, swaks_to_alice_in},
    fixture,
    kernel::PinDir,
    netns::{link, Link, NetNs},
    postfix::{self, log_lines, Postfix, PostfixOptions},
    proxy::{failed_rcpts_before_the_cut, Client},
    redis::{self, Redis},
    tcp::{connect_from, connect_local, wait_until, Relay},
};

/// How long a block may take from one host's decision to the other's
/// kernel: the goal is under a second; the rest is room for a loaded
/// two-CPU CI machine.
const PROPAGATION: Duration = Duration::from_secs(10);
/// How long a host may take to reach Redis after it starts.
const CONNECTED: Duration = Duration::from_secs(30);
/// A probe's connect timeout: a handshake on a veth takes well under a
/// millisecond (the kernel answers the SYN, no process is involved), so a
/// probe that times out had its SYN dropped.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause after a probe that got through (each is a session the proxy
/// greets), so that the probes stay a trickle.
const PROBE_PAUSE: Duration = Duration::from_millis(10);
/// A connect that must succeed or be dropped (as netns_e2e: long enough
/// for a handshake, short enough for a dropped SYN to show as a timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
const SMTP: u16 = 25;
/// Blocks put in the active hash beside the test's own: more than one
/// HSCAN step of an agent's catch-up (1000) reads.
const EXTRA_BLOCKS: usize = 2500;

/// The SMTP AUTH user of each host's Postfix in [`Setup::with_auth`], and
/// its password.
const AUTH_USER: (&str, &str) = ("sam", "s3cret");
/// `AUTH PLAIN` for [`AUTH_USER`] with a wrong password: base64 of
/// `\0sam\0wrong`.
const WRONG_AUTH: &str = "AUTH PLAIN AHNhbQB3cm9uZw==";
/// `limits.max_failed_auth` in [`Setup::with_auth`].
const MAX_FAILED_AUTH: usize = 5;

/// How the site's hosts are set up; `Default`: as in production with
/// `share_counters = false` and no AUTH.
#[derive(Default)]
struct Setup {
    /// SMTP AUTH users of each host's Postfix (none: no AUTH offered).
    sasl_users: Vec<(String, String)>,
    /// More `[limits]` keys.
    limits: String,
    /// `cluster.share_counters`.
    share_counters: bool,
}

impl Setup {
    /// Each Postfix with [`AUTH_USER`], `max_failed_auth` =
    /// [`MAX_FAILED_AUTH`], failures counted over both hosts (the default
    /// `share_counters`).
    fn with_auth() -> Setup {
        Setup {
            sasl_users: vec![(AUTH_USER.0.to_owned(), AUTH_USER.1.to_owned())],
            limits: format!("max_failed_auth = {MAX_FAILED_AUTH}\nfailed_auth_window = \"10m\"\n"),
            share_counters: true,
        }
    }
}

fn ready(test: &str) -> bool {
    ready_for(test, &Setup::default())
}

fn ready_for(test: &str, setup: &Setup) -> bool {
    let missing = clients::missing_prerequisite()
        .or_else(redis::missing_prerequisite)
        .or_else(|| {
            (!setup.sasl_users.is_empty())
                .then(postfix::sasl_missing_prerequisite)
                .flatten()
        })
        .or_else(|| {
            let binary = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.join("smtp-limiter")));
            (!binary.is_some_and(|b| b.is_file())).then(|| {
                "no smtp-limiter binary next to the tests (`cargo build -p limiter-user`)"
                    .to_owned()
            })
        });
    // Root and the eBPF object first, then the servers and clients.
    limiter_tests::prerequisites(test) && fixture::require(test, missing)
}

/// One edge host: its namespace and link to the internet, its Postfix,
/// the relays to Postfix and Redis, its pins, its agent. Dropped in field
/// order: the agent (which detaches its program), its directory, the
/// relays, Postfix, the pins, the link, the namespace.
struct Host {
    agent: Option<Agent>,
    dir: AgentDir,
    redis_relay: Relay,
    postfix_relay: Relay,
    postfix: Postfix,
    pins: PinDir,
    link: Link,
    ns: NetNs,
    name: &'static str,
    /// More `[limits]` keys ([`Setup::limits`]).
    limits: String,
    share_counters: bool,
}

impl Host {
    /// `name`'s namespace, linked to `internet` (tag `tag`, see
    /// [`link`]) with its default route there, its Postfix, its agent with
    /// XDP on its end of the link.
    fn start(
        name: &'static str,
        tag: &str,
        internet: &NetNs,
        redis: &Redis,
        setup: &Setup,
    ) -> Host {
        let ns = NetNs::new(&format!("ch-{tag}")).expect("the host's namespace");
        let link = link(&ns, internet, tag).expect("the host's veth pair");
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &link.client_v4s[0].to_string(),
        ])
        .expect("the host's default route to the internet");
        let postfix = Postfix::start(PostfixOptions {
            proxy_protocol: true,
            sasl_users: setup.sasl_users.clone(),
            ..PostfixOptions::default()
        })
        .expect("the host's Postfix");
        let postfix_relay = Relay::start(&ns, postfix.addr()).expect("a relay to Postfix");
        let redis_relay = Relay::start(&ns, redis.addr()).expect("a relay to Redis");
        let mut host = Host {
            agent: None,
            dir: AgentDir::new(name),
            redis_relay,
            postfix_relay,
            postfix,
            pins: PinDir::new(),
            link,
            ns,
            name,
            limits: setup.limits.clone(),
            share_counters: setup.share_counters,
        };
        host.spawn();
        host
    }

    /// Writes the configuration (with the current pins) and starts the
    /// agent; waits until it is connected to Redis.
    fn spawn(&mut self) {
        let parts = RigParts {
            server: &self.ns,
            link: &self.link,
            relay_port: self.postfix_relay.port(),
            pins: self.pins.path(),
        };
        let more = format!(
            "{}[limits]\nmax_failed_rcpt = 3\n{}[cluster]\nredis = \"redis://127.0.0.1:{}/0\"\n\
             node = \"{}\"\nshare_counters = {}\n",
            parts.kernel_table(&self.link.server_if, "xdp"),
            self.limits,
            self.redis_relay.port(),
            self.name,
            self.share_counters,
        );
        self.dir
            .write_config(&parts.config(self.smtp(), "identity = \"proxy-v2\"", &more));
        let agent = Agent::spawn(&self.dir, &Launch::in_ns(&self.ns)).unwrap_or_else(|failed| {
            panic!(
                "{} did not start ({:?}):\n{}",
                self.name, failed.status, failed.log
            )
        });
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the host's agent runs")
    }

    /// Where the host takes mail: port 25 on its end of the link.
    fn smtp(&self) -> SocketAddr {
        SocketAddr::new(self.link.server_v4.into(), SMTP)
    }

    /// Waits until the agent says it is connected to Redis.
    #[track_caller]
    fn wait_cluster_up(&self) {
        let agent = self.agent();
        assert!(
            wait_until(CONNECTED, || agent.json(&["stats"])["cluster"]["state"]
                == "up"),
            "{} never reached Redis:\n{}",
            self.name,
            agent.log()
        );
    }

    /// Counted events (failures) the agent has sent to Redis.
    fn counted_sent(&self) -> u64 {
        self.agent().json(&["stats"])["cluster"]["counters"]["sent"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The kernel's count of SYNs dropped for a blocked source.
    fn dropped(&self) -> u64 {
        self.agent().kernel_counter("dropped_block")
    }
}

/// The site: two hosts, the internet their clients are in, one Redis.
struct Site {
    a: Host,
    b: Host,
    internet: NetNs,
    /// Dropped last: the agents leave it first.
    redis: Redis,
}

impl Site {
    fn start() -> Site {
        Site::start_with(&Setup::default())
    }

    fn start_with(setup: &Setup) -> Site {
        for stale in ["ch-ha", "ch-hb", "ch-net"] {
            if let Err(e) = NetNs::remove_stale(stale) {
                eprintln!("removing stale namespaces {stale}-*: {e:#}");
            }
        }
        let redis = Redis::start().expect("a private redis-server");
        let internet = NetNs::new("ch-net").expect("the internet's namespace");
        let a = Host::start("host-a", "ha", &internet, &redis, setup);
        let b = Host::start("host-b", "hb", &internet, &redis, setup);
        a.wait_cluster_up();
        b.wait_cluster_up();
        Site {
            a,
            b,
            internet,
            redis,
        }
    }

    /// A source address in the internet (on its side of A's link): it
    /// reaches both hosts.
    fn source(&self, n: usize) -> IpAddr {
        self.a.link.client_v4s[n].into()
    }

    /// swaks from `source` through `host`: one message to alice, delivered
    /// by the host's own Postfix, which names the source.
    #[track_caller]
    fn delivers(&self, host: &Host, source: IpAddr) {
        self.delivers_with(host, source, &[]);
    }

    /// [`Site::delivers`] with more swaks options.
    #[track_caller]
    fn delivers_with(&self, host: &Host, source: IpAddr, extra: &[&str]) {
        let before = host.postfix.delivered();
        let run = swaks_to_alice_in(
            Some(&self.internet),
            host.smtp(),
            &source.to_string(),
            extra,
        );
        assert_eq!(
            run.code,
            Some(0),
            "swaks from {source} through {}:\n{}\nagent:\n{}",
            host.name,
            run.out,
            host.agent().log()
        );
        assert!(
            host.postfix
                .wait_delivered(before + 1, Duration::from_secs(15)),
            "{}'s Postfix did not deliver:\n{}",
            host.name,
            host.postfix.log()
        );
        let log = host.postfix.log();
        assert!(
            !log_lines(&log, &format!("client=unknown[{source}]")).is_empty(),
            "{}'s Postfix did not name the client {source}:\n{log}",
            host.name
        );
    }

    /// A harvester from `source` cut off by `host`'s proxy (three unknown
    /// recipients, then `421`).
    #[track_caller]
    fn harvest(&self, host: &Host, source: IpAddr) {
        let to = host.smtp();
        let failed = self
            .internet
            .run(|| failed_rcpts_before_the_cut(&source.to_string(), to));
        assert_eq!(failed, 3, "{}", host.agent().log());
    }

    /// One session from `source` to `host` with one AUTH for [`AUTH_USER`]
    /// with a wrong password, which `host`'s Postfix refuses; its reply.
    #[track_caller]
    fn one_failed_auth(&self, host: &Host, source: IpAddr) -> String {
        let stream = connect_from(&self.internet, source, host.smtp(), CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{source} to {}: {e}", host.name));
        let (mut smtp, greeting) = Client::from_stream(stream).expect("a greeting");
        assert!(greeting.starts_with("220 "), "{}: {greeting}", host.name);
        let ehlo = smtp.cmd("EHLO guesser.test").expect("an EHLO reply");
        assert!(
            ehlo.contains("AUTH PLAIN LOGIN"),
            "{} offers no AUTH: {ehlo}",
            host.name
        );
        let reply = smtp.cmd(WRONG_AUTH).expect("an AUTH reply");
        let _ = smtp.cmd("QUIT");
        reply
    }

    /// Waits until the hosts have sent `n` counted events to Redis, both
    /// together.
    #[track_caller]
    fn wait_counted(&self, n: u64) {
        assert!(
            wait_until(PROPAGATION, || self.a.counted_sent()
                + self.b.counted_sent()
                >= n),
            "{n} counted events never reached Redis: A sent {}, B {}",
            self.a.counted_sent(),
            self.b.counted_sent()
        );
    }

    /// Connects from `source` to `host` again and again until a SYN is
    /// dropped (a probe times out) or `within` passes: when the first
    /// dropped probe was sent, counted from `since`, and how many got
    /// through before it.
    fn first_drop(
        &self,
        host: &Host,
        source: IpAddr,
        since: Instant,
        within: Duration,
    ) -> Option<(Duration, usize)> {
        let to = host.smtp();
        self.internet.run(|| {
            let mut through = 0;
            while since.elapsed() < within {
                let sent = since.elapsed();
                match connect_local(source, to, PROBE_TIMEOUT) {
                    Err(e) if e.kind() == ErrorKind::TimedOut => return Some((sent, through)),
                    Ok(stream) => {
                        through += 1;
                        drop(stream);
                    }
                    Err(e) => eprintln!("probe from {source} to {to}: {e}"),
                }
                std::thread::sleep(PROBE_PAUSE);
            }
            None
        })
    }

    /// Asserts that `host`'s kernel drops `source`'s SYNs (the connect
    /// times out, the kernel counts it) for a block decided on `by`.
    #[track_caller]
    fn assert_dropped_by_kernel(&self, host: &Host, source: IpAddr, by: &Host) {
        let agent = host.agent();
        let net = format!("{source}/32");
        let row = agent
            .block(&net)
            .unwrap_or_else(|| panic!("{net} not listed on {}:\n{}", host.name, agent.log()));
        assert_eq!(row["node"], by.name, "decided elsewhere: {row}");
        assert_eq!(row["in_kernel"], true, "{row}");
        let before = host.dropped();
        match connect_from(&self.internet, source, host.smtp(), CONNECT_TIMEOUT) {
            Err(e) if e.kind() == ErrorKind::TimedOut => {}
            other => panic!(
                "expected {}'s kernel to drop {source}'s SYN, got {other:?}",
                host.name
            ),
        }
        assert!(
            host.dropped() > before,
            "{}'s kernel did not count the drop",
            host.name
        );
    }

    /// Asserts that `host` greets `source`.
    #[track_caller]
    fn assert_greets(&self, host: &Host, source: IpAddr) {
        let stream = connect_from(&self.internet, source, host.smtp(), CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{source} to {}: {e}", host.name));
        let (_, greeting) = Client::from_stream(stream).expect("a greeting");
        assert!(
            greeting.starts_with("220 "),
            "{} to {source}: {greeting}",
            host.name
        );
    }
}

#[test]
fn a_harvester_cut_off_on_one_host_is_dropped_by_the_other_hosts_kernel() {
    if !ready("a_harvester_cut_off_on_one_host_is_dropped_by_the_other_hosts_kernel") {
        return;
    }
    let site = Site::start();
    let (a, b) = (&site.a, &site.b);
    let (harvester, clean) = (site.source(1), site.source(2));
    site.delivers(a, clean);
    site.delivers(b, clean);
    site.assert_greets(b, harvester);

    site.harvest(a, harvester);
    let cut = Instant::now();
    let (seen, through) = site
        .first_drop(b, harvester, cut, PROPAGATION)
        .unwrap_or_else(|| {
            panic!(
                "B's kernel never dropped the harvester within {PROPAGATION:?}\nA:\n{}\nB:\n{}",
                a.agent().log(),
                b.agent().log()
            )
        });
    println!(
        "propagation (A cuts the harvester off to B's kernel dropping its SYN): {seen:?} \
         ({through} probes got through before)"
    );
    site.assert_dropped_by_kernel(b, harvester, a);
    site.assert_dropped_by_kernel(a, harvester, a);
    assert_eq!(
        b.agent().block(&format!("{harvester}/32")).unwrap()["reason"],
        "harvest"
    );

    // The hosts still deliver for others; B's Postfix never heard of the
    // harvester (it got no further than B's greeting).
    site.delivers(a, clean);
    site.delivers(b, clean);
    let log = b.postfix.log();
    assert!(
        log_lines(&log, &format!("[{harvester}]")).is_empty(),
        "{log}"
    );
    let log = a.postfix.log();
    assert!(
        !log_lines(&log, &format!("connect from unknown[{harvester}]")).is_empty(),
        "the harvester's session went through A's Postfix: {log}"
    );
}

#[test]
fn a_manual_block_on_one_host_is_dropped_by_the_other_hosts_kernel_until_deleted() {
    if !ready("a_manual_block_on_one_host_is_dropped_by_the_other_hosts_kernel_until_deleted") {
        return;
    }
    let site = Site::start();
    let (a, b) = (&site.a, &site.b);
    let (blocked, clean) = (site.source(3), site.source(2));
    site.assert_greets(b, blocked);

    let out = a.agent().cli(&[
        "block",
        "add",
        &blocked.to_string(),
        "--for",
        "1h",
        "--reason",
        "manual",
    ]);
    assert!(out.success(), "{}", out.text());
    let added = Instant::now();
    let (seen, through) = site
        .first_drop(b, blocked, added, PROPAGATION)
        .unwrap_or_else(|| {
            panic!(
                "B's kernel never dropped the blocked source within {PROPAGATION:?}\nB:\n{}",
                b.agent().log()
            )
        });
    println!(
        "propagation (block add on A returns to B's kernel dropping the SYN): {seen:?} \
         ({through} probes got through before)"
    );
    site.assert_dropped_by_kernel(b, blocked, a);
    site.delivers(b, clean);

    let out = a.agent().cli(&["block", "del", &blocked.to_string()]);
    assert!(out.success(), "{}", out.text());
    let deleted = Instant::now();
    let net = format!("{blocked}/32");
    assert!(
        wait_until(PROPAGATION, || b.agent().block(&net).is_none()),
        "block del on A never reached B:\n{}",
        b.agent().log()
    );
    println!(
        "propagation (block del on A to B's list, CLI polling): {:?}",
        deleted.elapsed()
    );
    site.assert_greets(b, blocked);
    site.assert_greets(a, blocked);
}

#[test]
fn a_host_started_from_nothing_drops_the_clusters_blocks_in_its_kernel() {
    if !ready("a_host_started_from_nothing_drops_the_clusters_blocks_in_its_kernel") {
        return;
    }
    let mut site = Site::start();
    let (harvester, manual, clean) = (site.source(1), site.source(3), site.source(2));
    site.harvest(&site.a, harvester);
    let out = site.a.agent().cli(&[
        "block",
        "add",
        &manual.to_string(),
        "--for",
        "1h",
        "--reason",
        "manual",
    ]);
    assert!(out.success(), "{}", out.text());
    for net in [harvester, manual] {
        let net = format!("{net}/32");
        assert!(
            wait_until(PROPAGATION, || site
                .redis
                .cli(&["HEXISTS", "smtp-limiter:active", &net])
                .is_ok_and(|r| r == "1")),
            "{net} never reached Redis:\n{}",
            site.a.agent().log()
        );
    }

    // Many more blocks in force than one step of B's catch-up reads
    // (written to the hash only, as an agent away from the stream finds
    // them): B reads them all, page by page.
    let many: Vec<String> = (0..EXTRA_BLOCKS)
        .map(|n| format!("198.18.{}.{}/32", n / 250, n % 250 + 1))
        .collect();
    let entry = r#"{"reason":"flood","node":"host-a","expires":"never","comment":""}"#;
    let mut hset = vec!["HSET", "smtp-limiter:active"];
    for net in &many {
        hset.extend([net.as_str(), entry]);
    }
    site.redis.cli(&hset).expect("HSET of the extra blocks");

    // B goes, and comes back as a new machine would: no stored blocks, no
    // pinned maps.
    let status = site.b.agent.take().map(|mut agent| agent.terminate());
    assert!(
        status.flatten().is_some_and(|s| s.success()),
        "B's exit: {status:?}"
    );
    std::fs::remove_dir_all(site.b.dir.state_dir()).expect("B's state directory removed");
    site.b.pins = PinDir::new();
    let started = Instant::now();
    site.b.spawn();
    let listening = started.elapsed();
    let since = Instant::now();
    // Both probed first, from the same moment; checked after.
    for source in [harvester, manual] {
        let (seen, through) = site
            .first_drop(&site.b, source, since, PROPAGATION)
            .unwrap_or_else(|| {
                panic!(
                    "B, started from nothing, never dropped {source} within {PROPAGATION:?}:\n{}",
                    site.b.agent().log()
                )
            });
        println!(
            "B from nothing: control socket up {listening:?} after the start; {source} dropped \
             by its kernel {seen:?} after that ({through} probes got through before)"
        );
        // The agent listens only once it has read the cluster's blocks.
        assert_eq!(
            through, 0,
            "B, started from nothing, served {source} before applying the cluster's blocks"
        );
    }
    for source in [harvester, manual] {
        site.assert_dropped_by_kernel(&site.b, source, &site.a);
    }
    site.b.wait_cluster_up();
    let log = site.b.agent().log();
    assert!(log.contains("cluster: active blocks read"), "{log}");
    let listed = site.b.agent().json(&["block", "list"]);
    let listed = listed.as_array().expect("a list of blocks");
    assert_eq!(listed.len(), EXTRA_BLOCKS + 2, "{log}");
    for net in [&many[0], &many[EXTRA_BLOCKS / 2], &many[EXTRA_BLOCKS - 1]] {
        let row = listed
            .iter()
            .find(|b| b["net"] == net.as_str())
            .unwrap_or_else(|| panic!("{net} not listed on B"));
        assert_eq!(
            (&row["node"], &row["in_kernel"]),
            (&"host-a".into(), &true.into()),
            "{row}"
        );
    }
    site.delivers(&site.b, clean);
}

#[test]
fn with_redis_away_both_hosts_deliver_and_a_block_decided_meanwhile_reaches_the_other_after() {
    if !ready(
        "with_redis_away_both_hosts_deliver_and_a_block_decided_meanwhile_reaches_the_other_after",
    ) {
        return;
    }
    let mut site = Site::start();
    let (harvester, clean) = (site.source(3), site.source(4));
    site.redis.kill();
    for host in [&site.a, &site.b] {
        assert!(
            wait_until(CONNECTED, || host.agent().json(&["stats"])["cluster"]
                ["state"]
                == "down"),
            "{} never noticed Redis gone",
            host.name
        );
    }
    // Mail flows through both hosts without Redis …
    site.delivers(&site.a, clean);
    site.delivers(&site.b, clean);
    // … and B cuts a harvester off on its own: dropped by B's kernel, not
    // yet known to A.
    site.harvest(&site.b, harvester);
    site.assert_dropped_by_kernel(&site.b, harvester, &site.b);
    site.assert_greets(&site.a, harvester);

    // Redis returns (empty: the fixture keeps nothing): B publishes what
    // it decided meanwhile, and A's kernel drops the harvester.
    site.redis.restart().expect("Redis back");
    let back = Instant::now();
    site.a.wait_cluster_up();
    site.b.wait_cluster_up();
    let (seen, _) = site
        .first_drop(&site.a, harvester, back, CONNECTED)
        .unwrap_or_else(|| {
            panic!(
                "A's kernel never dropped the harvester B blocked while Redis was away\nA:\n{}\nB:\n{}",
                site.a.agent().log(),
                site.b.agent().log()
            )
        });
    println!("B's block from the outage in A's kernel {seen:?} after Redis came back");
    site.assert_dropped_by_kernel(&site.a, harvester, &site.b);
    site.delivers(&site.a, clean);
    site.delivers(&site.b, clean);
}

#[test]
fn a_brute_forcer_spreading_failed_auth_over_both_hosts_is_dropped_by_both_kernels() {
    let setup = Setup::with_auth();
    if !ready_for(
        "a_brute_forcer_spreading_failed_auth_over_both_hosts_is_dropped_by_both_kernels",
        &setup,
    ) {
        return;
    }
    let site = Site::start_with(&setup);
    let (a, b) = (&site.a, &site.b);
    let (guesser, clean) = (site.source(1), site.source(2));
    let good_auth = [
        "--auth",
        "PLAIN",
        "--auth-user",
        AUTH_USER.0,
        "--auth-password",
        AUTH_USER.1,
    ];
    // SASL is real: each Postfix takes the right password.
    site.delivers_with(a, clean, &good_auth);
    site.delivers_with(b, clean, &good_auth);

    // MAX_FAILED_AUTH failures, alternating hosts (A three, B two): each
    // host alone is well under the limit, and so are both together.
    for n in 0..MAX_FAILED_AUTH {
        let host = [a, b][n % 2];
        let reply = site.one_failed_auth(host, guesser);
        assert!(
            reply.starts_with("535 "),
            "AUTH {n} on {}: {reply}",
            host.name
        );
    }
    site.wait_counted(MAX_FAILED_AUTH as u64);
    let net = format!("{guesser}/32");
    for host in [a, b] {
        assert!(
            host.agent().block(&net).is_none(),
            "{} blocked before the limit:\n{}",
            host.name,
            host.agent().log()
        );
        site.assert_greets(host, guesser);
    }
    // Every failure was a real Postfix's refusal.
    for (host, n) in [(a, MAX_FAILED_AUTH.div_ceil(2)), (b, MAX_FAILED_AUTH / 2)] {
        let log = host.postfix.log();
        assert_eq!(
            log_lines(
                &log,
                &format!("unknown[{guesser}]: SASL PLAIN authentication failed")
            )
            .len(),
            n,
            "{}'s Postfix:\n{log}",
            host.name
        );
    }

    // One more, on B (its third): past the limit counted over both.
    let reply = site.one_failed_auth(b, guesser);
    assert!(reply.starts_with("535 "), "the last AUTH: {reply}");
    let crossed = Instant::now();
    // A (the other host) probed first: its time is the propagation.
    for host in [a, b] {
        let (seen, through) = site
            .first_drop(host, guesser, crossed, PROPAGATION)
            .unwrap_or_else(|| {
                panic!(
                    "{}'s kernel never dropped the brute-forcer within {PROPAGATION:?}\nA:\n{}\nB:\n{}",
                    host.name,
                    a.agent().log(),
                    b.agent().log()
                )
            });
        println!(
            "failed AUTH spread over A and B: {}'s kernel drops the brute-forcer {seen:?} after \
             the failure that crossed the limit on B ({through} probes got through before)",
            host.name
        );
    }
    for host in [a, b] {
        site.assert_dropped_by_kernel(host, guesser, b);
        let row = host.agent().block(&net).unwrap();
        assert_eq!(row["origin"], "auth", "{row}");
    }
    assert!(
        b.agent()
            .log()
            .contains("window over its limit counted over every host"),
        "{}",
        b.agent().log()
    );

    // Others still log in and send through both hosts.
    site.delivers_with(a, clean, &good_auth);
    site.delivers_with(b, clean, &good_auth);
    for host in [a, b] {
        let log = host.postfix.log();
        assert_eq!(
            log_lines(
                &log,
                &format!(
                    "client=unknown[{clean}], sasl_method=PLAIN, sasl_username={}@{}",
                    AUTH_USER.0,
                    postfix::SASL_REALM
                )
            )
            .len(),
            2,
            "{}'s Postfix:\n{log}",
            host.name
        );
    }
}
