//! A private [`Postfix`] and the proxy in front of it, run in the test
//! process ([`TestProxy`], kernel layer off): the rig of the end-to-end
//! tests that judge SMTP only (postfix_e2e, hardening_e2e).
//!
//! Clients connect to the proxy on 127.0.0.1 from a 127/8 address of their
//! own ([`Rig::client`], or the clients of [`crate::clients`]) while the
//! proxy reaches Postfix from 127.0.0.1: so Postfix's log shows whether the
//! real client's address got through.

use std::net::SocketAddr;
use std::time::Duration;

use crate::postfix::{Postfix, PostfixOptions, LOG_WAIT};
use crate::proxy::{Client, TestProxy};
use crate::tcp::{connect_local, wait_until};

/// A plain listener on a free port.
pub const PLAIN_LISTENER: &str = "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\n";

/// How the proxy tells Postfix who the client is, and the Postfix settings
/// that go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    ProxyV2,
    ProxyV1,
    Xclient,
    None,
}

impl Identity {
    /// The value of `backend.identity`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ProxyV2 => "proxy-v2",
            Self::ProxyV1 => "proxy-v1",
            Self::Xclient => "xclient",
            Self::None => "none",
        }
    }

    /// A Postfix that takes this identity from the proxy (PROXY protocol
    /// expected, or XCLIENT allowed from 127.0.0.1).
    #[must_use]
    pub fn postfix_options(self) -> PostfixOptions {
        PostfixOptions {
            proxy_protocol: matches!(self, Self::ProxyV2 | Self::ProxyV1),
            xclient_hosts: (self == Self::Xclient).then(|| "127.0.0.1/32".to_owned()),
            ..PostfixOptions::default()
        }
    }
}

/// What [`Rig::launch`] starts.
#[derive(Clone, Debug)]
pub struct RigOptions {
    pub identity: Identity,
    pub postfix: PostfixOptions,
    /// The `[[listen]]` tables; the first is the one [`Rig::addr`] names.
    pub listen: String,
    /// `backend.connect`: `"on-mail"` (the proxy probes Postfix's
    /// capabilities first, one session in its log) or `"on-connect"` (one
    /// Postfix session per client session).
    pub connect: &'static str,
    /// More keys of the `[backend]` table (`starttls = true`, …).
    pub backend: String,
    /// More TOML tables (`[limits]`, `[relay]`, `[tls]`, …).
    pub extra: String,
}

impl RigOptions {
    /// A Postfix for `identity`, one plain listener, `backend.connect =
    /// "on-mail"` (the default), nothing extra.
    #[must_use]
    pub fn new(identity: Identity) -> Self {
        RigOptions {
            identity,
            postfix: identity.postfix_options(),
            listen: PLAIN_LISTENER.to_owned(),
            connect: "on-mail",
            backend: String::new(),
            extra: String::new(),
        }
    }
}

/// A Postfix and the proxy in front of it. The proxy is stopped first.
pub struct Rig {
    pub proxy: TestProxy,
    pub postfix: Postfix,
    /// Sessions of the proxy's capability probe in Postfix's log (one
    /// with `"on-mail"`, none with `"on-connect"`).
    probes: usize,
}

impl Rig {
    /// [`RigOptions::new`] with the `extra` TOML tables.
    ///
    /// # Panics
    /// When Postfix or the proxy does not start.
    pub fn start(identity: Identity, extra: &str) -> Rig {
        Self::launch(RigOptions {
            extra: extra.to_owned(),
            ..RigOptions::new(identity)
        })
    }

    /// Starts Postfix, then the proxy; with `"on-mail"` returns once the
    /// proxy's capability probe is over, in Postfix's log too, so that the
    /// test's own sessions come after it.
    ///
    /// # Panics
    /// When Postfix or the proxy does not start, or the probe fails.
    pub fn launch(options: RigOptions) -> Rig {
        let postfix = Postfix::start(options.postfix.clone()).expect("start Postfix");
        let backend = format!("connect = \"{}\"\n{}", options.connect, options.backend);
        let proxy = TestProxy::start(&proxy_config(
            postfix.addr(),
            options.identity,
            &backend,
            &options.listen,
            &options.extra,
        ));
        let probes = usize::from(options.connect == "on-mail");
        let rig = Rig {
            proxy,
            postfix,
            probes,
        };
        if probes > 0 {
            wait_until(LOG_WAIT, || rig.proxy.ctx.capabilities.probed());
            assert!(
                rig.proxy.ctx.capabilities.learned().is_some(),
                "the capability probe failed; log:\n{}",
                rig.log()
            );
            // The fixture's readiness check and the probe.
            rig.postfix.expect_disconnects(1 + probes);
        }
        rig
    }

    /// The proxy's (first) listener.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    /// Postfix's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.postfix.log()
    }

    /// A raw client connected to the proxy from `source` (a 127/8
    /// address), and its greeting.
    ///
    /// # Panics
    /// When the connection or the greeting fails.
    #[track_caller]
    pub fn client(&self, source: &str) -> (Client, String) {
        let source = source.parse().expect("an IPv4 source");
        let stream = connect_local(source, self.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect from {source} to {}: {e}", self.addr()));
        Client::from_stream(stream).expect("greeting")
    }

    /// Asserts exactly `n` deliveries ([`Postfix::expect_delivered`]).
    #[track_caller]
    pub fn expect_delivered(&self, n: usize) {
        self.postfix.expect_delivered(n);
    }

    /// Waits until Postfix logged the end of `n` sessions besides the
    /// fixture's readiness check and the proxy's capability probe; returns
    /// their `disconnect from` lines, in order.
    ///
    /// # Panics
    /// When fewer came in time.
    #[track_caller]
    pub fn expect_sessions(&self, n: usize) -> Vec<String> {
        let mut lines = self.postfix.expect_disconnects(1 + self.probes + n);
        lines.drain(..1 + self.probes);
        lines
    }
}

/// The proxy's configuration for a Postfix at `backend`, with more keys
/// of the `[backend]` table in `backend_keys`.
#[must_use]
pub fn proxy_config(
    backend: SocketAddr,
    identity: Identity,
    backend_keys: &str,
    listen: &str,
    extra: &str,
) -> String {
    format!(
        r#"mode = "enforce"

{listen}

[backend]
address = "{backend}"
identity = "{identity}"
connect_timeout = "2s"
{backend_keys}

[kernel]
mode = "off"

{extra}
"#,
        identity = identity.name(),
    )
}
