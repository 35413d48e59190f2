//! The real `smtp-limiter` binary as an operator runs it: the agent with its
//! control socket, the CLI changing blocks and limits live, blocks stored
//! and restored after a restart that lost the kernel maps (as a reboot does).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{self, Agent, AgentDir, Launch},
    fixture::free_port,
    kernel::PinDir,
    prerequisites,
    proxy::{connect_from, failed_rcpts_before_the_cut, Client},
};
use limiter_user::kernel::{BpfDatapath, Datapath};

/// The CLI with `config`: (exit code 0, stdout and stderr).
fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = agent::cli(config, args);
    (out.success(), out.text())
}

/// An agent's files ([`AgentDir`]) and its configuration: a listener, the
/// built-in backend and metrics on free ports, and `extra` TOML tables
/// (`[kernel]`, `[filters]`, …).
struct AgentFiles {
    dir: AgentDir,
    config: PathBuf,
    ports: Ports,
}

/// The ports of an agent's configuration, and what else goes in it.
struct Ports {
    extra: String,
    proxy: SocketAddr,
    backend: u16,
    metrics: u16,
}

impl Ports {
    /// Picks free ports (the agent may lose one to another process before
    /// it binds: [`AgentFiles::start`] then picks new ones) and writes the
    /// configuration with them.
    fn renew(&mut self, dir: &AgentDir) {
        let port = || free_port().expect("a free port");
        self.proxy = SocketAddr::from(([127, 0, 0, 1], port()));
        self.backend = port();
        self.metrics = port();
        self.write(dir, "");
    }

    /// Writes the configuration, with `more` TOML after the rest (a table
    /// the test changes, e.g. `[limits]`).
    fn write(&self, dir: &AgentDir, more: &str) {
        dir.write_config(&format!(
            r#"
                [[listen]]
                address = "{proxy}"
                [backend]
                address = "127.0.0.1:{backend}"
                builtin = true
                [metrics]
                address = "127.0.0.1:{metrics}"
                {extra}
                {more}
                "#,
            proxy = self.proxy,
            backend = self.backend,
            metrics = self.metrics,
            extra = self.extra,
        ));
    }
}

impl AgentFiles {
    fn new(name: &str, extra: &str) -> Self {
        let dir = AgentDir::new(name);
        AgentFiles {
            config: dir.config(),
            dir,
            ports: Ports {
                extra: extra.to_owned(),
                proxy: SocketAddr::from(([127, 0, 0, 1], 0)),
                backend: 0,
                metrics: 0,
            },
        }
    }

    /// Starts the agent on new free ports (tried again with others when
    /// one was taken).
    fn start(&mut self) -> Agent {
        let AgentFiles { dir, ports, .. } = self;
        Agent::start(dir, &Launch::here(), || ports.renew(dir))
    }

    fn write_config(&self, more: &str) {
        self.ports.write(&self.dir, more);
    }

    fn proxy(&self) -> SocketAddr {
        self.ports.proxy
    }
}

/// The value of the first `key` anywhere in `value` (objects searched
/// depth first), as `limits show --json` nests its limits.
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        serde_json::Value::Array(list) => list.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// `max_failed_rcpt` as the running agent reports it.
#[track_caller]
fn max_failed_rcpt(config: &Path) -> u64 {
    let (ok, out) = cli(config, &["limits", "show", "--json"]);
    assert!(ok, "{out}");
    let limits: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    find_key(&limits, "max_failed_rcpt")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no max_failed_rcpt in {out}"))
}

/// Polls `max_failed_rcpt` until it is `want`; whether it got there.
fn wait_max_failed_rcpt(config: &Path, want: u64) -> bool {
    limiter_tests::tcp::wait_until(Duration::from_secs(10), || max_failed_rcpt(config) == want)
}

#[test]
fn cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps() {
    if !prerequisites("cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "agent",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    let agent = files.start();
    let (config, proxy) = (files.config.clone(), files.proxy());
    let config = &config;
    let (ok, out) = cli(
        config,
        &[
            "block",
            "add",
            "127.0.0.2",
            "--for",
            "1h",
            "--reason",
            "flood",
        ],
    );
    assert!(ok, "{out}");
    // In the kernel's map, with its reason and an expiry …
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.2".parse().unwrap())
        .unwrap()
        .expect("blocked in the kernel");
    assert_eq!(hit.origin, Some(limiter_common::Reason::Flood));
    assert!(hit.expires.is_some(), "--for 1h expires");
    // … and refused by the proxy, while another source is served.
    let (mut smtp, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "blocked source: {greeting}"
    );
    smtp.expect_closed();
    let greeting = greeting_from("127.0.0.3", proxy);
    assert!(greeting.starts_with("220 "), "other source: {greeting}");

    // `limits set` changes what the proxy does, not only what it shows: a
    // harvester is cut off after 2 failed recipients instead of the file's
    // limit.
    let from_file = max_failed_rcpt(config);
    assert!(
        from_file > 3,
        "the default limit is too low for this test: {from_file}"
    );
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "2"]);
    assert!(ok, "{out}");
    assert_eq!(max_failed_rcpt(config), 2);
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.4", proxy), 2);
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "many"]);
    assert!(!ok && out.contains("max_failed_rcpt"), "{out}");
    assert_eq!(
        max_failed_rcpt(config),
        2,
        "a refused value changed the limit"
    );
    // Every live limit (config::LIVE_LIMITS) goes through the CLI and the
    // agent: the value `limits show` gives is taken back as it is. A name
    // outside the table is refused by the CLI, which lists the names.
    let show = |config: &Path| {
        let (ok, out) = cli(config, &["limits", "show", "--json"]);
        assert!(ok, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let shown = show(config);
    for limit in limiter_user::config::LIVE_LIMITS {
        let value = find_key(&shown, limit.name)
            .unwrap_or_else(|| panic!("limits show has no {}: {shown}", limit.name));
        let text = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        let (ok, out) = cli(config, &["limits", "set", limit.name, &text]);
        assert!(ok, "limits set {} {text}: {out}", limit.name);
    }
    assert_eq!(show(config), shown, "setting the shown values changed them");
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpts", "2"]);
    assert!(!ok && out.contains("max_failed_rcpt_per_source"), "{out}");
    let (ok, out) = cli(config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // The two sessions served (127.0.0.3 and the harvester); the refused
    // connection of the blocked source is not a session.
    let sessions = stats["proxy"]["sessions_total"].as_u64();
    assert_eq!(sessions, Some(2), "{out}");

    // A bad file is refused by reload (naming the key) and the running
    // configuration stays, the live change included …
    let good = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, good.replace("[state]", "[state]\nbogus = 1")).unwrap();
    let (ok, out) = cli(config, &["reload"]);
    std::fs::write(config, &good).unwrap();
    assert!(!ok && out.contains("bogus"), "{out}");
    assert_eq!(
        max_failed_rcpt(config),
        2,
        "a refused reload changed the limits"
    );
    // … a good one brings back the file's limits and names no section
    // that needs a restart …
    let (ok, out) = cli(config, &["reload"]);
    assert!(ok, "{out}");
    assert!(!out.contains("restart"), "{out}");
    assert_eq!(max_failed_rcpt(config), from_file);
    // … [smtp] holds for the sessions that begin after it: a line longer
    // than the default 512 bytes is refused before, taken after (and by a
    // session that began before the reload, refused still) …
    let long_noop = format!("NOOP {}", "x".repeat(900));
    let (mut before, greeting) = Client::from_stream(connect_from("127.0.0.6", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    let reply = before.cmd(&long_noop).unwrap();
    assert!(
        reply.starts_with("500 "),
        "a 905-byte line before the reload: {reply}"
    );
    std::fs::write(
        config,
        good.replace("[state]", "[smtp]\nmax_line_length = 2000\n[state]"),
    )
    .unwrap();
    let (ok, out) = cli(config, &["reload", "--json"]);
    assert!(ok, "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["restart_needed"], serde_json::json!([]), "{out}");
    let (mut after, greeting) = Client::from_stream(connect_from("127.0.0.6", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    let reply = after.cmd(&long_noop).unwrap();
    assert!(
        reply.starts_with("250 "),
        "a 905-byte line after the reload: {reply}"
    );
    let reply = before.cmd(&long_noop).unwrap();
    assert!(
        reply.starts_with("500 "),
        "the session from before the reload: {reply}"
    );
    drop((before, after));
    // … while smtp.max_sessions is named: in force after a restart only.
    std::fs::write(
        config,
        good.replace("[state]", "[smtp]\nmax_sessions = 77\n[state]"),
    )
    .unwrap();
    let (ok, out) = cli(config, &["reload", "--json"]);
    std::fs::write(config, &good).unwrap();
    assert!(ok, "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["smtp"]),
        "{out}"
    );
    let (ok, out) = cli(config, &["reload"]);
    assert!(ok && !out.contains("restart"), "{out}");
    // … and SIGHUP does what `reload` does: the file's value again, and
    // the next harvester is cut off at the file's limit.
    files.write_config("[limits]\nmax_failed_rcpt = 3");
    agent.signal(libc::SIGHUP);
    assert!(
        wait_max_failed_rcpt(config, 3),
        "SIGHUP did not reload the file: max_failed_rcpt is {}",
        max_failed_rcpt(config)
    );
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.5", proxy), 3);

    // Stop, lose the kernel maps (as a reboot does), start again.
    agent.stop();
    drop(kernel);
    std::fs::remove_dir_all(pins.path()).unwrap();
    let agent = files.start();
    let proxy = files.proxy();
    let (ok, out) = cli(config, &["block", "list", "--json"]);
    assert!(ok, "{out}");
    let listing: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let listed: Vec<_> = listing
        .as_array()
        .unwrap_or_else(|| panic!("a JSON list: {out}"))
        .iter()
        .filter(|b| b["net"] == "127.0.0.2/32")
        .collect();
    assert!(listed.len() == 1 && listed[0]["reason"] == "flood", "{out}");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.2".parse().unwrap())
        .unwrap()
        .expect("restored into the kernel");
    assert_eq!(hit.origin, Some(limiter_common::Reason::Flood));
    let greeting = greeting_from("127.0.0.2", proxy);
    assert!(
        greeting.starts_with("421 4.7.0"),
        "still blocked after the restart: {greeting}"
    );

    let (ok, out) = cli(config, &["block", "del", "127.0.0.2"]);
    assert!(ok, "{out}");
    assert!(
        kernel
            .block_covering("127.0.0.2".parse().unwrap())
            .unwrap()
            .is_none(),
        "`block del` left the block in the kernel"
    );
    let greeting = greeting_from("127.0.0.2", proxy);
    assert!(greeting.starts_with("220 "), "unblocked: {greeting}");
    agent.stop();
    drop(kernel);
}

/// An agent's files with the kernel layer required (its maps pinned in a
/// directory of their own) and `limits` as its `[limits]` table.
fn with_kernel(name: &str, limits: &str) -> (PinDir, AgentFiles) {
    let pins = PinDir::new();
    let files = AgentFiles::new(
        name,
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"\n[limits]\n{limits}",
            pins.path().display()
        ),
    );
    (pins, files)
}

/// The greeting a new connection from `source` gets.
fn greeting_from(source: &str, proxy: SocketAddr) -> String {
    Client::from_stream(connect_from(source, proxy)).unwrap().1
}

/// An attacker that takes the next address of its network each time one
/// is blocked: past `limits.max_blocked_sources_per_network` blocked
/// sources, the network is blocked, in the proxy and in the kernel, and an
/// address of it that never misbehaved is refused with the rest; an
/// address outside it is still served.
#[test]
fn an_attacker_moving_across_its_network_gets_the_network_blocked() {
    let test = "an_attacker_moving_across_its_network_gets_the_network_blocked";
    if !prerequisites(test) {
        return;
    }
    // /28 networks: 127.0.0.32/28 is the attacker's, 127.0.0.1 (the
    // backend's) stays outside whatever happens.
    let (pins, mut files) = with_kernel(
        "network-blocks",
        "max_failed_rcpt = 1\nmax_blocked_sources_per_network = 2\nnetwork_ipv4_prefix = 28",
    );
    let agent = files.start();
    let (config, proxy) = (&files.config.clone(), files.proxy());
    let greeting_of = |source: &str| greeting_from(source, proxy);
    // Two harvesters of the /28 blocked one after the other: each alone.
    for source in ["127.0.0.33", "127.0.0.34"] {
        assert_eq!(failed_rcpts_before_the_cut(source, proxy), 1, "{source}");
        assert!(greeting_of(source).starts_with("421 4.7.0"), "{source}");
    }
    assert!(
        greeting_of("127.0.0.40").starts_with("220 "),
        "two blocked sources are not yet the network's block"
    );
    // The third blocks the /28.
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.35", proxy), 1);
    let (ok, out) = cli(config, &["block", "list", "--origin", "network", "--json"]);
    assert!(ok, "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        find_key(&listed, "net").is_some_and(|net| net == "127.0.0.32/28"),
        "block list --origin network: {out}"
    );
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.40".parse().unwrap())
        .unwrap()
        .expect("the network is blocked in the kernel");
    assert_eq!(hit.origin, Some(limiter_common::Reason::Network));
    let greeting = greeting_of("127.0.0.40");
    assert!(
        greeting.starts_with("421 4.7.0"),
        "an address of the blocked network: {greeting}"
    );
    let greeting = greeting_of("127.0.0.2");
    assert!(
        greeting.starts_with("220 "),
        "outside the network: {greeting}"
    );
    let (ok, out) = cli(config, &["block", "check", "127.0.0.40"]);
    assert!(
        ok && out.contains("blocked by 127.0.0.32/28 (network"),
        "block check: {out}"
    );
    agent.stop();
    drop(kernel);
}

/// A client that connects, reads the greeting and hangs up in a loop, one
/// connection at a time (always within its cap): past
/// `limits.connection_rate` its connections get `421 4.7.0` at once, past
/// twice the rate it is blocked, in the kernel too; another source is
/// served throughout.
#[test]
fn a_client_reconnecting_in_a_loop_is_refused_then_blocked() {
    let test = "a_client_reconnecting_in_a_loop_is_refused_then_blocked";
    if !prerequisites(test) {
        return;
    }
    let (pins, mut files) = with_kernel("connection-rate", "connection_rate = \"5/1m\"");
    let agent = files.start();
    let proxy = files.proxy();
    let greeting_of = |source: &str| greeting_from(source, proxy);
    let churner = "127.0.0.50";
    for i in 1..=5 {
        let greeting = greeting_of(churner);
        assert!(greeting.starts_with("220 "), "connection {i}: {greeting}");
    }
    for i in 6..=10 {
        let greeting = greeting_of(churner);
        assert!(
            greeting.starts_with("421 4.7.0 Error: too many connections"),
            "connection {i}, over the rate: {greeting}"
        );
    }
    let greeting = greeting_of("127.0.0.51");
    assert!(greeting.starts_with("220 "), "another source: {greeting}");
    // The 11th within the minute: twice over the rate, blocked.
    assert!(greeting_of(churner).starts_with("421 4.7.0"));
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering(churner.parse().unwrap())
        .unwrap()
        .expect("the churner is blocked in the kernel");
    assert_eq!(hit.origin, Some(limiter_common::Reason::Flood));
    let greeting = greeting_of(churner);
    assert!(
        greeting.starts_with("421 4.7.0") && greeting.contains("blocked"),
        "once blocked: {greeting}"
    );
    let (ok, out) = cli(&files.config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let refused = find_key(&stats, "rejections").map(|r| &r["connection-rate"]);
    assert_eq!(refused, Some(&serde_json::json!(6)), "stats: {out}");
    agent.stop();
    drop(kernel);
}

/// The same loop spread over the addresses of a network, each address
/// under `limits.connection_rate`: past `connection_rate_per_network` the
/// network's connections get `421 4.7.0`, past twice it the network is
/// blocked, in the kernel too, and an address of it that never connected
/// is refused with the rest; another network is served throughout.
#[test]
fn a_loop_spread_over_a_network_gets_the_network_blocked() {
    let test = "a_loop_spread_over_a_network_gets_the_network_blocked";
    if !prerequisites(test) {
        return;
    }
    // /28 networks: the churners' is 127.0.0.64/28.
    let (pins, mut files) = with_kernel(
        "connection-rate-network",
        "connection_rate = \"5/1m\"\nconnection_rate_per_network = \"6/1m\"\nnetwork_ipv4_prefix = 28",
    );
    let agent = files.start();
    let proxy = files.proxy();
    let greeting_of = |source: &str| greeting_from(source, proxy);
    // Three addresses, two connections each: six, each address under five.
    for source in ["127.0.0.65", "127.0.0.66", "127.0.0.67"] {
        for _ in 0..2 {
            let greeting = greeting_of(source);
            assert!(greeting.starts_with("220 "), "{source}: {greeting}");
        }
    }
    // The 7th to the 12th, from fresh addresses of the /28: refused.
    for host in 68..74 {
        let greeting = greeting_of(&format!("127.0.0.{host}"));
        assert!(
            greeting.starts_with("421 4.7.0 Error: too many connections from your network"),
            "127.0.0.{host}, over the network's rate: {greeting}"
        );
    }
    let greeting = greeting_of("127.0.0.81");
    assert!(greeting.starts_with("220 "), "another network: {greeting}");
    // The 13th: twice over, the /28 is blocked.
    assert!(greeting_of("127.0.0.74").starts_with("421 4.7.0"));
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.79".parse().unwrap())
        .unwrap()
        .expect("the network is blocked in the kernel");
    assert_eq!(hit.origin, Some(limiter_common::Reason::Flood));
    let greeting = greeting_of("127.0.0.79");
    assert!(
        greeting.starts_with("421 4.7.0") && greeting.contains("blocked"),
        "an address of the network that never connected: {greeting}"
    );
    let (ok, out) = cli(&files.config, &["block", "check", "127.0.0.79"]);
    assert!(
        ok && out.contains("blocked by 127.0.0.64/28 (flood"),
        "block check: {out}"
    );
    let (ok, out) = cli(&files.config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let refused = find_key(&stats, "rejections").map(|r| &r["connection-rate-network"]);
    assert_eq!(refused, Some(&serde_json::json!(7)), "stats: {out}");
    agent.stop();
    drop(kernel);
}

/// `smtp-limiter stats` and `/metrics` show the content filters' verdicts,
/// with the real binary, clamd, and the built-in backend.
#[test]
fn stats_and_metrics_show_filter_verdicts() {
    let test = "stats_and_metrics_show_filter_verdicts";
    if !limiter_tests::clamd::prerequisites(test) {
        return;
    }
    let clamd = limiter_tests::clamd::Clamd::start().expect("start clamd");
    let mut files = AgentFiles::new(
        "filters",
        &format!(
            "[kernel]\nmode = \"off\"\n[filters]\nmax_rejects = 0\n[filters.clamav]\naddress = \"{}\"",
            clamd.tcp_address()
        ),
    );
    let agent = files.start();
    let (config, proxy, metrics) = (&files.config, files.proxy(), files.ports.metrics);
    let (mut smtp, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    for (body, want) in [
        ("Subject: hello\r\n\r\nclean\r\n", "250"),
        (
            &format!(
                "Subject: hi\r\n\r\n{}\r\n",
                limiter_tests::clamd::VIRUS_MARKER
            )[..],
            "550 5.7.1",
        ),
    ] {
        assert!(smtp
            .cmd("MAIL FROM:<a@client.test>")
            .unwrap()
            .starts_with("250"));
        assert!(smtp
            .cmd("RCPT TO:<alice@example.com>")
            .unwrap()
            .starts_with("250"));
        assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
        let reply = smtp.cmd(&format!("{body}.")).unwrap();
        assert!(reply.starts_with(want), "{body:?}: {reply}");
    }
    let (ok, out) = cli(config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats --json is JSON");
    assert_eq!(stats["filters"]["verdicts"]["clean"], 1, "{out}");
    assert_eq!(stats["filters"]["verdicts"]["virus"], 1, "{out}");
    let text = limiter_tests::agent::scrape_metrics(SocketAddr::from(([127, 0, 0, 1], metrics)));
    assert!(
        text.contains("smtp_limiter_filter_verdicts_total{verdict=\"virus\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("smtp_limiter_filter_wait_seconds_count 2"),
        "{text}"
    );
    agent.stop();
}

/// A block ends by itself: refused while it lasts, served once it expired
/// (the proxy checks the expiry itself), and the agent's sweep (every 10
/// s) then removes it from its list and from the kernel's map.
#[test]
fn a_block_expires_and_the_sweep_removes_it() {
    if !prerequisites("a_block_expires_and_the_sweep_removes_it") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "expiry",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    let agent = files.start();
    let (config, proxy) = (&files.config, files.proxy());
    let source = "127.0.0.6";
    let (ok, out) = cli(config, &["block", "add", source, "--for", "3s"]);
    assert!(ok, "{out}");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let in_kernel = || {
        kernel
            .blocks()
            .unwrap()
            .iter()
            .any(|b| b.net.to_string() == format!("{source}/32"))
    };
    assert!(in_kernel(), "the block is not in the kernel's map");
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "while blocked: {greeting}"
    );
    smtp.expect_closed();

    // Served again once it expired (3 s, with room for a loaded machine).
    let served = limiter_tests::tcp::wait_until(Duration::from_secs(10), || {
        Client::from_stream(connect_from(source, proxy))
            .is_ok_and(|(_, greeting)| greeting.starts_with("220 "))
    });
    assert!(served, "still refused 10 s after a 3 s block");

    // The sweep (every 10 s) removes it from the list and the kernel.
    let listed = || {
        let (ok, out) = cli(config, &["block", "list", "--json"]);
        assert!(ok, "{out}");
        out.contains(&format!("\"{source}/32\""))
    };
    let swept =
        limiter_tests::tcp::wait_until(Duration::from_secs(30), || !listed() && !in_kernel());
    assert!(
        swept,
        "30 s after its expiry the block is still listed ({}) or in the kernel ({})",
        listed(),
        in_kernel()
    );
    agent.stop();
    drop(kernel);
}

/// SIGTERM with sessions open (`smtp.shutdown_grace` = 3 s): an idle
/// session is told 421 4.3.0 at once, a message in DATA is still taken
/// (250, which the proxy only says when the backend did), a message that
/// does not end within the grace is cut when it is over (not before), and
/// the agent exits successfully.
#[test]
fn sigterm_lets_a_transaction_finish_within_the_grace_and_cuts_the_rest() {
    let test = "sigterm_lets_a_transaction_finish_within_the_grace_and_cuts_the_rest";
    if !limiter_tests::fixture::require(
        test,
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } != 0).then(|| "needs root (sources 127.0.0.x)".to_owned()),
    ) {
        return;
    }
    const GRACE: Duration = Duration::from_secs(3);
    let mut files = AgentFiles::new(
        "sigterm",
        "[kernel]\nmode = \"off\"\n[smtp]\nshutdown_grace = \"3s\"",
    );
    let mut agent = files.start();
    let proxy = files.proxy();
    let in_data = |source: &str| {
        let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
        assert!(greeting.starts_with("220 "), "{greeting}");
        assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
        for (line, want) in [
            ("MAIL FROM:<a@client.test>", "250 "),
            ("RCPT TO:<alice@example.com>", "250 "),
            ("DATA", "354 "),
        ] {
            let reply = smtp.cmd(line).unwrap();
            assert!(reply.starts_with(want), "{line}: {reply}");
        }
        smtp.send(b"Subject: in flight\r\n\r\nfirst line\r\n")
            .unwrap();
        smtp
    };
    let mut finishing = in_data("127.0.0.7");
    let mut stuck = in_data("127.0.0.8");
    let (mut idle, greeting) = Client::from_stream(connect_from("127.0.0.9", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(idle.cmd("EHLO idle.test").unwrap().starts_with("250"));

    agent.signal(libc::SIGTERM);
    let signalled = Instant::now();
    match idle.next_event() {
        limiter_tests::proxy::Seen::Reply(r) if r.starts_with("421 4.3.0") => {}
        other => panic!("idle session after SIGTERM: {other:?}"),
    }
    finishing.send(b"last line\r\n.\r\n").unwrap();
    let reply = finishing.reply().unwrap();
    assert!(
        reply.starts_with("250 "),
        "a message in flight at SIGTERM: {reply}"
    );
    let cut = stuck.next_event();
    let after = signalled.elapsed();
    assert!(
        matches!(&cut, limiter_tests::proxy::Seen::Reply(r) if r.starts_with("421 "))
            || cut.is_ended_by_peer(),
        "the unfinished message after the grace: {cut:?}"
    );
    // Not before the grace is over (a lower bound holds on any machine).
    assert!(
        after >= GRACE - Duration::from_millis(200),
        "cut {after:?} after SIGTERM, before the {GRACE:?} grace"
    );
    let status = agent.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent's exit after SIGTERM: {status:?}"
    );
}

/// `allow` and `top --once` against a running agent: an allow-listed
/// source is never limited or blocked (a harvester from it is not cut
/// off), in the kernel's allow map too; `top` shows the refusals and the
/// block that followed; `allow del` puts the source under the limits again.
#[test]
fn cli_allow_and_top_against_a_running_agent() {
    if !prerequisites("cli_allow_and_top_against_a_running_agent") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "allow",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"\n[limits]\nmax_failed_rcpt = 2",
            pins.path().display()
        ),
    );
    let agent = files.start();
    let (config, proxy) = (&files.config, files.proxy());
    let (allowed, other) = ("127.0.0.10", "127.0.0.11");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let allow_listed = || {
        let (ok, out) = cli(config, &["allow", "list", "--json"]);
        assert!(ok, "{out}");
        let list: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let net = format!("{allowed}/32");
        let listed = list
            .as_array()
            .unwrap_or_else(|| panic!("a JSON list: {out}"))
            .iter()
            .any(|n| *n == net.as_str());
        let in_kernel = kernel
            .allows()
            .unwrap()
            .iter()
            .any(|n| n.to_string() == net);
        (listed, in_kernel)
    };
    let (ok, out) = cli(config, &["allow", "add", allowed]);
    assert!(ok, "{out}");
    assert_eq!(allow_listed(), (true, true), "(listed, in the kernel)");

    // Allowed: ten unknown recipients, never cut off, never blocked.
    let (mut smtp, greeting) = Client::from_stream(connect_from(allowed, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO allowed.test").unwrap().starts_with("250"));
    assert!(smtp
        .cmd("MAIL FROM:<a@allowed.test>")
        .unwrap()
        .starts_with("250 "));
    for n in 1..=10 {
        let reply = smtp
            .cmd(&format!("RCPT TO:<nobody{n}@example.com>"))
            .unwrap();
        assert!(reply.starts_with("550 "), "allow-listed, RCPT {n}: {reply}");
    }
    assert!(smtp.cmd("QUIT").unwrap().starts_with("221"));
    // Another source is cut off after 2 and blocked.
    assert_eq!(failed_rcpts_before_the_cut(other, proxy), 2);

    let (ok, out) = cli(config, &["top", "--once", "--json"]);
    assert!(ok, "{out}");
    let top: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let harvest = top["rejections"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .find(|r| r["reason"] == "harvest")
        .and_then(|r| r["count"].as_u64());
    assert_eq!(harvest, Some(1), "one harvest refusal: {out}");
    let blocks: Vec<_> = top["drops"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|b| {
            (
                b["net"].as_str().unwrap_or("?"),
                b["reason"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        blocks,
        vec![(format!("{other}/32").as_str(), "harvest")],
        "only the other source is blocked: {out}"
    );

    // No longer allowed: under the limits again.
    let (ok, out) = cli(config, &["allow", "del", allowed]);
    assert!(ok, "{out}");
    assert_eq!(allow_listed(), (false, false), "(listed, in the kernel)");
    assert_eq!(failed_rcpts_before_the_cut(allowed, proxy), 2);
    agent.stop();
    drop(kernel);
}

/// `recipients check`, `stats` and `refresh` against a running agent whose
/// valid recipients come from a real directory (slapd): a known address is
/// known, an unknown one in the directory's domain is refused, one outside
/// it is not the directory's to decide; an address added to the directory
/// is known after `refresh`.
#[test]
fn cli_recipients_against_a_running_agent() {
    let test = "cli_recipients_against_a_running_agent";
    if !limiter_tests::slapd::prerequisites(test) {
        return;
    }
    use limiter_tests::slapd::{Slapd, SlapdOptions};
    use limiter_user::recipients::Lookup;
    let slapd = Slapd::start(SlapdOptions {
        users: 20,
        ..SlapdOptions::default()
    })
    .expect("start slapd");
    let mut files = AgentFiles::new(
        "recipients",
        &format!("[kernel]\nmode = \"off\"\n{}", slapd.recipients_toml("")),
    );
    let agent = files.start();
    // The first load runs beside the agent's start: wait for it.
    let loaded = limiter_tests::tcp::wait_until(Duration::from_secs(30), || {
        agent.json(&["recipients", "stats"])["addresses"]
            .as_u64()
            .is_some_and(|n| n > 0)
    });
    assert!(
        loaded,
        "no recipients loaded: {}\nagent:\n{}",
        agent.json(&["recipients", "stats"]),
        agent.log()
    );
    let expected = slapd.expected_addresses().len() as u64;
    assert_eq!(
        agent.json(&["recipients", "stats"])["addresses"].as_u64(),
        Some(expected),
        "every address of the directory"
    );

    // (lookup, refused, exit code) of `recipients check ADDRESS --json`.
    let check = |address: &str| {
        let out = agent.cli(&["recipients", "check", address, "--json"]);
        let answer: serde_json::Value =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
        (
            answer["lookup"].as_str().unwrap_or("?").to_owned(),
            answer["refused"].as_bool(),
            out.code,
        )
    };
    assert_eq!(
        check("user1@example.com"),
        (Lookup::Known.name().to_owned(), Some(false), Some(0))
    );
    // Case-insensitive, as the proxy judges it.
    assert_eq!(check("USER1@Example.COM").0, Lookup::Known.name());
    // Unknown in the directory's domain: refused, exit status 1 (the
    // answer is "no", as `postmap -q` says it); a domain the directory
    // does not cover is not known either.
    assert_eq!(
        check("nobody@example.com"),
        (Lookup::Unknown.name().to_owned(), Some(true), Some(1))
    );
    assert_eq!(
        check("someone@elsewhere.test"),
        (Lookup::NotCovered.name().to_owned(), Some(false), Some(1))
    );

    // A new user is known once the agent has read the directory again.
    slapd
        .add_user("newcomer", &["newcomer@example.com"])
        .expect("add a user");
    assert_eq!(check("newcomer@example.com").0, Lookup::Unknown.name());
    let out = agent.cli(&["recipients", "refresh", "--json"]);
    assert!(out.success(), "{}", out.text());
    assert_eq!(check("newcomer@example.com").0, Lookup::Known.name());
    assert_eq!(
        agent.json(&["recipients", "stats"])["addresses"].as_u64(),
        Some(expected + 1)
    );
    agent.stop();
}

/// Blocks are stored by the shutdown path itself: a block only the
/// kernel's map holds (put there without the agent's knowledge, so no
/// save on change covers it) is in the state file once the agent has
/// stopped on SIGTERM, written after the signal; after a restart that lost
/// the kernel maps (as a reboot does) it is restored, and the kernel drops
/// the source's SYNs again. A block added with the CLI just before the
/// signal survives too.
#[test]
fn blocks_are_saved_by_the_shutdown_path() {
    let test = "blocks_are_saved_by_the_shutdown_path";
    if !prerequisites(test)
        || !limiter_tests::fixture::require(test, limiter_tests::clients::missing_prerequisite())
    {
        return;
    }
    use limiter_tests::{agent::NetRig, postfix::PostfixOptions};
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
    let postfix = PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    };
    let mut rig = NetRig::start("cli", "cs1", postfix, |parts| {
        parts.config(
            SocketAddr::new(parts.link.server_v4.into(), 25),
            "identity = \"proxy-v2\"",
            &parts.kernel_table(&parts.link.server_if, "xdp"),
        )
    });
    let listen = SocketAddr::new(rig.link.server_v4.into(), 25);
    let (kernel_only, by_cli, other) = (
        std::net::IpAddr::from(rig.link.client_v4s[0]),
        std::net::IpAddr::from(rig.link.client_v4s[1]),
        std::net::IpAddr::from(rig.link.client_v4s[2]),
    );
    let (_, greeting) = rig.session(kernel_only, listen);
    assert!(greeting.starts_with("220 "), "{greeting}");

    // Into the kernel's map behind the agent's back (the product's own
    // kernel interface, not the map's bytes).
    let expires = std::time::SystemTime::now() + Duration::from_secs(3600);
    BpfDatapath::open_pinned(rig.pins())
        .expect("the agent's pinned maps")
        .block(
            format!("{kernel_only}/32").parse().unwrap(),
            Some(expires),
            limiter_common::Reason::Flood,
        )
        .expect("a block in the kernel's map");
    let out = rig
        .agent
        .cli(&["block", "add", &by_cli.to_string(), "--for", "1h"]);
    assert!(out.success(), "{}", out.text());
    // What the state directory holds, and the files written at or after
    // `since`.
    let stored = |dir: &AgentDir, since: Option<std::time::SystemTime>| {
        let mut text = String::new();
        for (path, modified) in dir.state_files() {
            if since.is_none_or(|t| modified >= t) {
                text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        text
    };
    let kernel_only_net = format!("\"{kernel_only}/32\"");
    assert!(
        !stored(&rig.dir, None).contains(&kernel_only_net),
        "stored before the shutdown (a save on change?): {}",
        stored(&rig.dir, None)
    );

    // A file touched just before the signal: its mtime is on the same
    // (coarse) clock as the state files'.
    let marker = rig.dir.path().join("sigterm.marker");
    std::fs::write(&marker, "").unwrap();
    let signalled = std::fs::metadata(&marker).unwrap().modified().unwrap();
    rig.restart(|rig| {
        let written = stored(&rig.dir, Some(signalled));
        assert!(
            written.contains(&kernel_only_net),
            "the kernel's block was not stored at shutdown (state files written since SIGTERM: {written:?}; all: {})",
            stored(&rig.dir, None)
        );
        assert!(
            stored(&rig.dir, None).contains(&format!("\"{by_cli}/32\"")),
            "the CLI's block is not stored: {}",
            stored(&rig.dir, None)
        );
        // The maps go, as in a reboot: what comes back comes from the files.
        std::fs::remove_dir_all(rig.pins()).expect("remove the pins");
    });
    for net in [kernel_only, by_cli] {
        let block = rig
            .agent
            .block(&format!("{net}/32"))
            .unwrap_or_else(|| panic!("{net} not restored:\n{}", rig.agent.log()));
        assert_eq!(block["in_kernel"], true, "{block}");
    }
    let dropped = rig.agent.kernel_counter("dropped_block");
    match rig.connect(kernel_only, listen, CONNECT_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop the restored block's SYN, got {other:?}"),
    }
    assert!(rig.agent.kernel_counter("dropped_block") > dropped);
    let (_, greeting) = rig.session(other, listen);
    assert!(greeting.starts_with("220 "), "another source: {greeting}");
}
