//! The two layers together, in network namespaces: the proxy listens in the
//! server namespace with the packet program on its interface; a harvesting
//! client is cut off by the proxy, blocked, and from then on its SYNs are
//! dropped by the kernel while other clients still get through.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, SystemTime},
};

use limiter_common::Reason;
use limiter_tests::{
    kernel::TestKernel,
    netns::{link, NetNs},
    prerequisites,
    proxy::{Client, TestProxy},
    tcp::connect_from,
};
use limiter_user::kernel::{AttachMode, Datapath, KernelLimits};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// The harvest block's duration: long enough for the checks made while it
/// holds (a few connection attempts of [`CONNECT_TIMEOUT`] on a loaded
/// machine), short enough to wait for its expiry.
const BLOCK_SECONDS: u64 = 5;

/// A minimal backend on the host's loopback: accepts every command.
struct SinkBackend {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkBackend {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || serve_sink(stream));
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_sink(stream: std::net::TcpStream) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let _ = writer.write_all(b"220 sink.test ESMTP\r\n");
    let mut in_data = false;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        let reply: &[u8] = if in_data {
            if line == ".\r\n" {
                in_data = false;
                b"250 2.0.0 Ok: queued\r\n"
            } else {
                b""
            }
        } else {
            match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                Some("EHLO") => b"250-sink.test\r\n250 PIPELINING\r\n",
                Some("DATA") => {
                    in_data = true;
                    b"354 go ahead\r\n"
                }
                Some("QUIT") => {
                    let _ = writer.write_all(b"221 2.0.0 Bye\r\n");
                    return;
                }
                _ => b"250 2.0.0 Ok\r\n",
            }
        };
        if writer.write_all(reply).is_err() {
            return;
        }
        line.clear();
    }
}

impl Drop for SinkBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn harvest_is_blocked_in_the_kernel(tag: &str, ipv6: bool) {
    let server = NetNs::new("lim-psrv").unwrap();
    let client = NetNs::new("lim-pcli").unwrap();
    let link = link(&server, &client, tag).unwrap();
    let kernel = TestKernel::load(KernelLimits {
        ports: vec![25],
        ..KernelLimits::default()
    });
    server
        .run(|| kernel.datapath.attach(&link.server_if, AttachMode::Xdp))
        .unwrap();
    let backend = SinkBackend::start();
    let (server_ip, sources): (IpAddr, Vec<IpAddr>) = if ipv6 {
        (
            link.server_v6.into(),
            link.client_v6s.iter().map(|a| IpAddr::V6(*a)).collect(),
        )
    } else {
        (
            link.server_v4.into(),
            link.client_v4s.iter().map(|a| IpAddr::V4(*a)).collect(),
        )
    };
    let listen = SocketAddr::new(server_ip, 25);
    let config = format!(
        r#"
        [[listen]]
        address = "{listen}"
        [backend]
        address = "{}"
        identity = "none"
        [relay]
        accept = "*@example.com"
        [limits]
        max_failed_rcpt = 3
        ipv6_prefix = 128
        block_duration = "{BLOCK_SECONDS}s"
        "#,
        backend.addr
    );
    let proxy = TestProxy::start_in(Some(&server), &config, kernel.datapath.clone());

    let harvester = sources[0];
    let stream =
        connect_from(&client, harvester, listen, CONNECT_TIMEOUT).expect("first connection");
    let (mut smtp, greeting) = Client::from_stream(stream).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(smtp.cmd("EHLO harvester.test").unwrap().starts_with("250"));
    assert!(smtp
        .cmd("MAIL FROM:<x@harvester.test>")
        .unwrap()
        .starts_with("250"));
    for name in ["anna", "ben", "carl"] {
        let reply = smtp
            .cmd(&format!("RCPT TO:<{name}@elsewhere.test>"))
            .unwrap();
        assert!(reply.starts_with("550 5.7.1"), "{reply}");
    }
    let reply = smtp.cmd("RCPT TO:<dora@elsewhere.test>").unwrap();
    assert!(reply.starts_with("421 4.7.0"), "{reply}");
    smtp.expect_closed();

    // The block reached the kernel …
    let hit = kernel
        .datapath
        .block_covering(harvester)
        .unwrap()
        .expect("harvester blocked in the kernel");
    assert_eq!(hit.origin, Some(Reason::Harvest));
    assert!(hit.expires.is_some(), "a harvest block expires");
    // … which now drops the harvester's SYNs …
    match connect_from(&client, harvester, listen, CONNECT_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop the harvester's SYN, got {other:?}"),
    }
    let expires = hit.expires.unwrap();
    assert!(
        SystemTime::now() < expires,
        "the drop was checked after the block's expiry: raise BLOCK_SECONDS"
    );
    assert!(kernel.datapath.counters().unwrap().dropped_block >= 1);
    // … while another client still gets through and can send mail.
    let stream =
        connect_from(&client, sources[1], listen, CONNECT_TIMEOUT).expect("another source");
    let (mut smtp, greeting) = Client::from_stream(stream).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(smtp.cmd("EHLO good.test").unwrap().starts_with("250"));
    assert!(smtp
        .cmd("MAIL FROM:<a@good.test>")
        .unwrap()
        .starts_with("250"));
    assert!(smtp
        .cmd("RCPT TO:<alice@example.com>")
        .unwrap()
        .starts_with("250"));
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    let reply = smtp.cmd("Subject: hi\r\n\r\nhello\r\n.").unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(
        proxy
            .ctx
            .stats
            .blocks_issued
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The block expires: from then on the kernel passes the harvester's
    // SYNs and the proxy serves it again (no sweep needed for either).
    if let Ok(left) = expires.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match connect_from(&client, harvester, listen, CONNECT_TIMEOUT) {
            Ok(stream) => break stream,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("harvester after the expiry: {e}; trying again");
            }
            Err(e) => panic!("the harvester is still dropped 10 s after its block expired: {e}"),
        }
    };
    let (mut smtp, greeting) = Client::from_stream(stream).unwrap();
    assert!(greeting.starts_with("220 "), "after the expiry: {greeting}");
    assert!(smtp.cmd("EHLO harvester.test").unwrap().starts_with("250"));
    drop(proxy);
}

#[test]
fn ipv4_harvester_is_blocked_in_the_kernel() {
    if prerequisites("ipv4_harvester_is_blocked_in_the_kernel") {
        harvest_is_blocked_in_the_kernel("ph4", false);
    }
}

#[test]
fn ipv6_harvester_is_blocked_in_the_kernel() {
    if prerequisites("ipv6_harvester_is_blocked_in_the_kernel") {
        harvest_is_blocked_in_the_kernel("ph6", true);
    }
}

/// Blocks in the kernel maps (from another agent run, or restored ones) are
/// refused by the proxy at accept even where no packet program is attached
/// (loopback). Without a running agent the CLI reads the pinned maps and
/// refuses changes.
#[test]
fn kernel_blocks_are_refused_by_the_proxy_too() {
    if !prerequisites("kernel_blocks_are_refused_by_the_proxy_too") {
        return;
    }
    let kernel = TestKernel::load(KernelLimits::default());
    let backend = SinkBackend::start();
    let config = format!(
        "[[listen]]\naddress = \"127.0.0.1:0\"\n[backend]\naddress = \"{}\"\nidentity = \"none\"\n",
        backend.addr
    );
    let proxy = TestProxy::start_with_kernel(&config, kernel.datapath.clone());
    let (_, greeting) = Client::connect(proxy.addr).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");

    let expires = std::time::SystemTime::now() + Duration::from_secs(3600);
    kernel
        .datapath
        .block("127.0.0.1/32".parse().unwrap(), Some(expires), Reason::Auth)
        .unwrap();
    let (mut client, greeting) = Client::connect(proxy.addr).unwrap();
    assert!(greeting.starts_with("421 4.7.0"), "{greeting}");
    client.expect_closed();

    // No agent runs with this configuration (its control socket is the
    // test's own path, never the host's default): the CLI reads the
    // pinned maps for a listing …
    let (ok, stdout, stderr) = smtp_limiter(&["block", "list", "--json"], kernel.pin_path());
    assert!(ok, "{stdout}{stderr}");
    let listing: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let listed: Vec<_> = listing
        .as_array()
        .unwrap_or_else(|| panic!("a JSON list: {stdout}"))
        .iter()
        .filter(|b| b["net"] == "127.0.0.1/32")
        .collect();
    assert_eq!(listed.len(), 1, "{stdout}");
    assert_eq!(listed[0]["reason"], "auth", "{stdout}");
    // … and refuses a change, which would not outlive it: the block stays.
    let (ok, stdout, stderr) = smtp_limiter(&["block", "del", "127.0.0.1"], kernel.pin_path());
    assert!(!ok && !stderr.trim().is_empty(), "{stdout}{stderr}");
    assert!(
        kernel
            .datapath
            .block_covering("127.0.0.1".parse().unwrap())
            .unwrap()
            .is_some(),
        "a refused `block del` removed the block"
    );

    kernel
        .datapath
        .unblock("127.0.0.1/32".parse().unwrap())
        .unwrap();
    let (_, greeting) = Client::connect(proxy.addr).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
}

/// Runs the built `smtp-limiter` binary with a configuration pointing at
/// `pin_path` and at a control socket of the test's own (nothing listens
/// there); returns (success, stdout, stderr).
fn smtp_limiter(args: &[&str], pin_path: &std::path::Path) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("smtp-limiter-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[kernel]\npin_path = \"{}\"\n[control]\nsocket = \"{}\"\n",
            pin_path.display(),
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let binary = limiter_tests::smtp_limiter_binary();
    let child: Child = Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run smtp-limiter");
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
