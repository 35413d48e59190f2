//! `filters-bench`: what the content filters (rspamd, ClamAV) cost a mail
//! flow through the proxy, against the same proxy without them, in one run
//! with interleaved rounds.
//!
//! Run it with `cargo xtask bench -- --only filters [ARGS]` or
//! `cargo run --release -p limiter-tests --bin filters-bench [-- ARGS]`, as
//! root (the Postfix, rspamd and clamd fixtures need it). All traffic stays
//! on 127.0.0.1.
//!
//! One private Postfix (discard delivery, PROXY v2), one private rspamd and
//! one private clamd (the test fixtures: tiny rule set and signature
//! database, no network lookups), and four proxies in this process in front
//! of the same Postfix: filters off, rspamd only, clamd only, both. Every
//! round measures every setup (the order rotates from round to round) for
//! `--seconds` with `--clients` client threads, each sending messages one
//! after the other on its own persistent session (MAIL, RCPT, DATA, body,
//! end; the next one when the reply came): messages per second, and each
//! message's time from MAIL to the reply to its end. Reported: medians over
//! rounds, the range, the median of the per-round ratios to "off", and the
//! added latency per message (median and p99 of all messages of a setup,
//! minus the same for "off").
//!
//! Checks: every reply in a transaction is the expected one (any other
//! aborts the run); each proxy's message counter grows by exactly the
//! messages acknowledged through it; the filter verdicts counted equal the
//! messages sent through a filtering proxy, all `clean`; Postfix delivers
//! every message by the end.

use std::{
    net::{SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use limiter_tests::{
    bench::{
        agent::loopback_config,
        args::Common,
        report::{quantile, Table},
        smtp_client::blocking::{Reply, Smtp},
    },
    clamd::Clamd,
    postfix::{Postfix, PostfixOptions},
    proxy::TestProxy,
    rspamd::Rspamd,
    stats::{machine, median, min_max},
};

/// How long a reply may take before the run is declared broken.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

/// A plain text message of about 4 KB, dot-stuffed where needed.
fn message_body() -> String {
    let mut body = String::from(
        "From: Sender <sender@bench.test>\r\nTo: Alice <alice@example.com>\r\n\
         Subject: quarterly report\r\nMessage-ID: <bench@bench.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    for i in 0..50 {
        body.push_str(&format!(
            "Line {i:02} of the report: revenue, costs and the outlook for the next quarter.\r\n"
        ));
    }
    body
}

/// Messages/s and added latency per message through the proxy with
/// rspamd and ClamAV on vs. off, same run, interleaved rounds (as root).
#[derive(Parser)]
#[command(name = "filters-bench")]
struct Options {
    #[command(flatten)]
    common: Common,
    /// Length of one measurement, seconds [default: 4; 1.5 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Client threads, one persistent session each.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

impl Options {
    /// Rounds: 5, or 3 with --quick.
    fn rounds(&self) -> usize {
        self.common.rounds(5, 3)
    }

    fn seconds(&self) -> f64 {
        self.seconds
            .unwrap_or(if self.common.quick { 1.5 } else { 4.0 })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Off,
    Rspamd,
    Clamd,
    Both,
}

const SETUPS: [Setup; 4] = [Setup::Off, Setup::Rspamd, Setup::Clamd, Setup::Both];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Off => "filters off",
            Setup::Rspamd => "rspamd",
            Setup::Clamd => "clamd",
            Setup::Both => "rspamd + clamd",
        }
    }
}

fn proxy_config(backend: SocketAddr, filters: &str) -> String {
    loopback_config(backend, "proxy-v2", "", "", filters)
}

/// What one measurement saw.
struct Run {
    messages: u64,
    seconds: f64,
    /// Seconds from MAIL to the end-of-DATA reply, per message.
    latencies: Vec<f64>,
}

/// `clients` threads, each on its own session, sending messages until
/// `seconds` have passed.
fn measure(addr: SocketAddr, clients: usize, seconds: f64, body: &str) -> Result<Run> {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| scope.spawn(move || client(addr, until, body)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("client thread panicked")))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for result in results {
        latencies.extend(result?);
    }
    Ok(Run {
        messages: latencies.len() as u64,
        seconds: elapsed,
        latencies,
    })
}

fn client(addr: SocketAddr, until: Instant, body: &str) -> Result<Vec<f64>> {
    let stream = TcpStream::connect(addr).context("connect to the proxy")?;
    let mut smtp = Smtp::new(stream, REPLY_TIMEOUT)?;
    let expect = |reply: std::io::Result<Reply>, code: u16, what: &str| -> Result<()> {
        let reply = reply.with_context(|| format!("{what}: expected {code}"))?;
        ensure!(
            reply.code == code,
            "{what}: expected {code}, got {:?}",
            reply.text
        );
        Ok(())
    };
    expect(smtp.reply(), 220, "greeting")?;
    expect(smtp.command("EHLO client.bench.test"), 250, "EHLO")?;
    let mut latencies = Vec::new();
    let data = format!("{body}.");
    while Instant::now() < until {
        let t0 = Instant::now();
        expect(smtp.command("MAIL FROM:<sender@bench.test>"), 250, "MAIL")?;
        expect(smtp.command("RCPT TO:<alice@example.com>"), 250, "RCPT")?;
        expect(smtp.command("DATA"), 354, "DATA")?;
        expect(smtp.command(&data), 250, "end of DATA")?;
        latencies.push(t0.elapsed().as_secs_f64());
    }
    smtp.quit();
    Ok(latencies)
}

fn main() -> Result<()> {
    let opts = Options::parse();
    ensure!(
        opts.clients >= 1 && opts.seconds() > 0.0,
        "--clients and --seconds must be above 0"
    );
    let body = message_body();
    eprintln!("filters-bench: starting Postfix, rspamd and clamd");
    let postfix = Postfix::start(PostfixOptions::for_load(true))?;
    let rspamd = Rspamd::start()?;
    let clamd = Clamd::start()?;
    let rspamd_table = format!("[filters.rspamd]\nurl = \"{}\"\n", rspamd.url());
    let clamd_table = format!("[filters.clamav]\naddress = \"{}\"\n", clamd.tcp_address());
    let proxies: Vec<(Setup, TestProxy)> = SETUPS
        .iter()
        .map(|&setup| {
            let filters = match setup {
                Setup::Off => String::new(),
                Setup::Rspamd => rspamd_table.clone(),
                Setup::Clamd => clamd_table.clone(),
                Setup::Both => format!("{rspamd_table}\n{clamd_table}"),
            };
            (
                setup,
                TestProxy::start(&proxy_config(postfix.addr(), &filters)),
            )
        })
        .collect();

    // Warm-up: one short run per setup, not recorded.
    for (_, proxy) in &proxies {
        measure(proxy.addr, opts.clients, 0.5, &body)?;
    }
    let before: Vec<u64> = proxies
        .iter()
        .map(|(_, p)| p.ctx.stats.messages.load(Ordering::Relaxed))
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut sent = vec![0u64; SETUPS.len()];
    for round in 0..opts.rounds() {
        let mut round_rates = vec![0.0; SETUPS.len()];
        for k in 0..SETUPS.len() {
            let i = (k + round) % SETUPS.len();
            let run = measure(proxies[i].1.addr, opts.clients, opts.seconds(), &body)?;
            round_rates[i] = run.messages as f64 / run.seconds;
            sent[i] += run.messages;
            latencies[i].extend(run.latencies);
        }
        eprintln!(
            "round {}: {}",
            round + 1,
            SETUPS
                .iter()
                .zip(&round_rates)
                .map(|(s, r)| format!("{} {r:.0}/s", s.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for i in 0..SETUPS.len() {
            rates[i].push(round_rates[i]);
            ratios[i].push(round_rates[i] / round_rates[0]);
        }
    }

    // Checks.
    for (i, (setup, proxy)) in proxies.iter().enumerate() {
        let grew = proxy.ctx.stats.messages.load(Ordering::Relaxed) - before[i];
        ensure!(
            grew == sent[i],
            "{}: the proxy counted {grew} messages, the clients {}",
            setup.name(),
            sent[i]
        );
        // One verdict per message taken (warm-up included), every one
        // `clean`; a filtering setup with no verdict at all fails.
        let taken = proxy.ctx.stats.messages.load(Ordering::Relaxed);
        match (&proxy.ctx.filters, setup) {
            (None, Setup::Off) => {}
            (None, _) => bail!("{}: the proxy has no content filters", setup.name()),
            (Some(_), Setup::Off) => bail!("off: the proxy has content filters"),
            (Some(filters), _) => {
                let verdicts = filters.stats.verdicts.list();
                ensure!(
                    taken > 0 && verdicts == [("clean", taken)],
                    "{}: verdicts {verdicts:?}, expected {taken} clean (one per message)",
                    setup.name()
                );
            }
        }
    }
    let total: u64 = proxies
        .iter()
        .map(|(_, p)| p.ctx.stats.messages.load(Ordering::Relaxed))
        .sum();
    ensure!(
        postfix.wait_delivered(total as usize, DRAIN_TIMEOUT),
        "Postfix delivered {} of {total}",
        postfix.delivered()
    );
    // Exactly: none twice (once the queue is empty, every delivery is in
    // the log).
    ensure!(
        postfix.wait_queue_empty(DRAIN_TIMEOUT),
        "Postfix's queue did not empty ({} messages left)",
        postfix.queued()
    );
    ensure!(
        postfix.delivered() == total as usize,
        "Postfix delivered {} messages, the proxies took {total}",
        postfix.delivered()
    );

    let mut report = String::new();
    report.push_str(&format!(
        "filters-bench: {} rounds × {} s, {} clients on persistent sessions, {}-byte messages\n{}\n\n",
        opts.rounds(),
        opts.seconds(),
        opts.clients,
        body.len(),
        machine()
    ));
    let mut table = Table::new(&[
        "setup",
        "msgs/s median",
        "min–max",
        "× off (median of round ratios)",
        "latency median",
        "p99",
        "added median",
        "added p99",
    ]);
    let (off_p50, off_p99) = (quantile(&latencies[0], 0.5), quantile(&latencies[0], 0.99));
    for (i, setup) in SETUPS.iter().enumerate() {
        let (lo, hi) = min_max(&rates[i]);
        let (p50, p99) = (quantile(&latencies[i], 0.5), quantile(&latencies[i], 0.99));
        table.row(vec![
            setup.name().to_owned(),
            format!("{:.0}", median(&rates[i])),
            format!("{lo:.0}–{hi:.0}"),
            format!("{:.2}", median(&ratios[i])),
            format!("{:.2} ms", p50 * 1e3),
            format!("{:.2} ms", p99 * 1e3),
            format!("{:+.2} ms", (p50 - off_p50) * 1e3),
            format!("{:+.2} ms", (p99 - off_p99) * 1e3),
        ]);
    }
    report.push_str(&table.markdown());
    report.push_str(&format!(
        "\nchecks: proxy message counters = messages acknowledged ({} measured), one clean verdict per message through each filtering proxy, Postfix delivered exactly {total} (warm-up included)\n",
        sent.iter().sum::<u64>()
    ));
    print!("{report}");
    drop(proxies);
    Ok(())
}
