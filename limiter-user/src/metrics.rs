//! Prometheus text exposition on `metrics.address` (`GET /metrics`): the
//! kernel's decision counters, the proxy's session, message, rejection
//! and block counters, and the cluster's (`[cluster]`).

use std::{fmt::Write as _, sync::atomic::Ordering, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use crate::{
    kernel::Datapath,
    proxy::{LatencyHistogram, ProxyContext, LATENCY_BUCKETS},
};

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// The exposition text.
pub fn render(ctx: &ProxyContext, kernel: &dyn Datapath) -> String {
    let mut out = String::with_capacity(4096);
    let counters = kernel.counters();
    let kernel_loaded = counters.is_ok();
    match counters {
        Ok(counters) => {
            let samples: Vec<(String, u64)> = counters
                .fields()
                .iter()
                .map(|(name, value)| (format!("{{counter=\"{name}\"}}"), *value))
                .collect();
            metric(
                &mut out,
                "kernel_events_total",
                "counter",
                "Kernel decisions and events, by counter (STATS map; would_drop_* are what observe mode passed instead of dropping).",
                &samples,
            );
            metric(
                &mut out,
                "kernel_up",
                "gauge",
                "Whether the kernel layer is loaded.",
                &[(String::new(), 1)],
            );
        }
        Err(_) => metric(
            &mut out,
            "kernel_up",
            "gauge",
            "Whether the kernel layer is loaded.",
            &[(String::new(), 0)],
        ),
    }
    // Counts kept on every change: a scrape walks no map (at a million
    // blocks a walk took seconds, under the lock accepts need).
    let blocks = ctx.blocks.counts();
    if kernel_loaded {
        metric(
            &mut out,
            "kernel_blocks",
            "gauge",
            "Blocks of the agent the kernel holds (the reject lists' entries not included).",
            &[(String::new(), blocks.in_kernel)],
        );
    }
    metric(
        &mut out,
        "blocks",
        "gauge",
        "Active blocks held by the agent, by origin (manual, harvest, auth, flood, reject-list, relay, filter, network).",
        &labelled(blocks.by_origin, "origin"),
    );
    metric(
        &mut out,
        "blocks_evicted_total",
        "counter",
        "Blocks dropped because the table was full (state.max_blocks).",
        &[(String::new(), ctx.blocks.evicted())],
    );
    let stats = &ctx.stats;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    metric(
        &mut out,
        "sessions_open",
        "gauge",
        "SMTP sessions open now.",
        &[(String::new(), load(&stats.sessions_open))],
    );
    metric(
        &mut out,
        "sessions_total",
        "counter",
        "SMTP sessions accepted.",
        &[(String::new(), load(&stats.sessions_total))],
    );
    metric(
        &mut out,
        "messages_total",
        "counter",
        "Messages the backend accepted through the proxy.",
        &[(String::new(), load(&stats.messages))],
    );
    metric(
        &mut out,
        "backend_errors_total",
        "counter",
        "Backend connections that failed.",
        &[(String::new(), load(&stats.backend_errors))],
    );
    metric(
        &mut out,
        "blocks_issued_total",
        "counter",
        "Blocks ordered by the policy, by reason.",
        &labelled(stats.blocks_by_reason(), "reason"),
    );
    metric(
        &mut out,
        "proxy_blocks",
        "gauge",
        "Blocks held by the agent's table (the proxy refuses these sources at accept).",
        &[(String::new(), ctx.blocks.len() as u64)],
    );
    metric(
        &mut out,
        "rejections_total",
        "counter",
        "Refusals by the proxy, by reason.",
        &labelled(stats.rejections(), "reason"),
    );
    metric(
        &mut out,
        "sessions_shed_total",
        "counter",
        "Sessions closed under pressure, by reason (shed-idle, shed-parked, shed-new, shed-slow-message, stress-timeout, slow-transaction, spool-evicted, too-many-commands, backend-slot-timeout).",
        &labelled(stats.shed(), "reason"),
    );
    metric(
        &mut out,
        "early_backend_connections_total",
        "counter",
        "Backend connections opened at accept for recent senders (backend.early_connect), by outcome: used by the session, or closed unused.",
        &labelled(stats.early_links(), "outcome"),
    );
    metric(
        &mut out,
        "parked_transactions_total",
        "counter",
        "Transactions whose backend connection closed while they waited for their client on a slot others needed, by outcome: parked, resumed on a new connection, refused by it.",
        &labelled(stats.parked(), "outcome"),
    );
    let slots = ctx.backend_slots.counts();
    metric(
        &mut out,
        "backend_slots",
        "gauge",
        "Backend connections allowed at once (backend.max_connections).",
        &[(String::new(), slots.capacity as u64)],
    );
    metric(
        &mut out,
        "backend_slots_in_use",
        "gauge",
        "Backend slots held by open backend connections now.",
        &[(String::new(), slots.in_use as u64)],
    );
    metric(
        &mut out,
        "backend_slots_in_use_shed_networks",
        "gauge",
        "Backend slots held now by networks with a session shed within limits.shed_sessions_window (together at most half the slots).",
        &[(String::new(), slots.shed_in_use as u64)],
    );
    metric(
        &mut out,
        "backend_slots_waiting",
        "gauge",
        "Sessions waiting for a backend slot now.",
        &[(String::new(), slots.waiting as u64)],
    );
    metric(
        &mut out,
        "backend_slot_waits_total",
        "counter",
        "Sessions that had to wait for a backend slot.",
        &[(String::new(), slots.waits)],
    );
    metric(
        &mut out,
        "backend_slot_timeouts_total",
        "counter",
        "Waits for a backend slot that ended without one (421 4.3.2 to the client).",
        &[(String::new(), slots.timeouts)],
    );
    metric(
        &mut out,
        "messages_spooled_total",
        "counter",
        "Messages whose slow client gave its backend slot to waiting sessions mid-message; the proxy took in the rest and replayed the transaction (backend.spool_size).",
        &[(String::new(), ctx.spool.spooled())],
    );
    metric(
        &mut out,
        "spool_bytes",
        "gauge",
        "Bytes of message copies the proxy holds now (at most backend.spool_size).",
        &[(String::new(), ctx.spool.used())],
    );
    metric(
        &mut out,
        "messages_evicted_total",
        "counter",
        "Spooled messages still arriving that a full spool dropped to make room for faster ones, slowest first (421 4.3.1 to their clients).",
        &[(String::new(), ctx.spool.evicted())],
    );
    if let Some(recipients) = &ctx.recipients {
        recipients.render_metrics(&mut out);
    }
    if let Some(filters) = &ctx.filters {
        metric(
            &mut out,
            "filter_verdicts_total",
            "counter",
            "Messages judged by the content filters, by verdict (clean, virus, spam, soft-reject, unscanned, tempfail, skipped-size).",
            &labelled(filters.stats.verdicts.list(), "verdict"),
        );
        metric(
            &mut out,
            "filter_errors_total",
            "counter",
            "Content scanner failures (down, timeout, bad reply), by scanner.",
            &labelled(filters.stats.scanner_errors.list(), "scanner"),
        );
        histogram(
            &mut out,
            "filter_wait_seconds",
            "Wait from the end of DATA to the last scanner verdict.",
            &filters.stats.wait,
        );
    }
    if let Some(cluster) = ctx.cluster.counts() {
        render_cluster(&mut out, &cluster);
    }
    histogram(
        &mut out,
        "backend_reply_seconds",
        "Latency of backend replies to relayed commands.",
        &stats.backend_latency,
    );
    histogram(
        &mut out,
        "backend_slot_wait_seconds",
        "How long the sessions that had to wait for a backend slot waited, with a slot at the end or without.",
        &ctx.backend_slots.wait_time,
    );
    out
}

/// The cluster's figures (only with a `[cluster]`).
fn render_cluster(out: &mut String, cluster: &crate::cluster::ClusterCounts) {
    metric(
        out,
        "cluster_up",
        "gauge",
        "Whether the link to the cluster's Redis is up (blocks shared).",
        &[(String::new(), u64::from(cluster.up))],
    );
    metric(
        out,
        "cluster_events_total",
        "counter",
        "Block events: published (decided here, written to Redis), applied (another node's, in force here), observed (another node's policy block, not in force here: observe mode), dropped (decided here, never written: queue full), refused (read from Redis and skipped).",
        &labelled(
            vec![
                ("published", cluster.published),
                ("applied", cluster.applied),
                ("observed", cluster.observed),
                ("dropped", cluster.dropped),
                ("refused", cluster.refused),
            ],
            "event",
        ),
    );
    metric(
        out,
        "cluster_queued",
        "gauge",
        "Block events decided here waiting for Redis.",
        &[(String::new(), cluster.queued as u64)],
    );
    let Some(counters) = cluster.counters else {
        return;
    };
    metric(
        out,
        "cluster_counters_up",
        "gauge",
        "Whether the failure windows are counted over every host now (cluster.share_counters, Redis reachable).",
        &[(String::new(), u64::from(counters.up))],
    );
    metric(
        out,
        "cluster_counted_events_total",
        "counter",
        "Events of the failure windows (failed RCPT, failed AUTH, null sender, filter reject) sent to Redis to be counted over every host, or dropped (Redis away or slow: counted here alone).",
        &labelled(
            vec![("sent", counters.sent), ("dropped", counters.dropped)],
            "outcome",
        ),
    );
    metric(
        out,
        "cluster_windows_crossed_total",
        "counter",
        "Failure windows that went past their limit counted over every host on this host's events (a block ordered here).",
        &[(String::new(), counters.crossed)],
    );
    metric(
        out,
        "cluster_counter_commands_total",
        "counter",
        "Redis commands sent for the counted events.",
        &[(String::new(), counters.commands)],
    );
}

/// Counts by name as samples with one label: `{label="name"}`.
fn labelled(counts: Vec<(&'static str, u64)>, label: &str) -> Vec<(String, u64)> {
    counts
        .into_iter()
        .map(|(name, n)| (format!("{{{label}=\"{name}\"}}"), n))
        .collect()
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP smtp_limiter_{name} {help}");
    let _ = writeln!(out, "# TYPE smtp_limiter_{name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "smtp_limiter_{name}{labels} {value}");
    }
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &LatencyHistogram) {
    let (counts, sum) = histogram.snapshot();
    let _ = writeln!(out, "# HELP smtp_limiter_{name} {help}");
    let _ = writeln!(out, "# TYPE smtp_limiter_{name} histogram");
    for (bound, count) in LATENCY_BUCKETS.iter().zip(&counts) {
        let _ = writeln!(out, "smtp_limiter_{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let total = counts.last().copied().unwrap_or(0);
    let _ = writeln!(out, "smtp_limiter_{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "smtp_limiter_{name}_sum {sum}");
    let _ = writeln!(out, "smtp_limiter_{name}_count {total}");
}

/// Serves `/metrics` on `listener` forever.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>, kernel: Arc<dyn Datapath>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (ctx, kernel) = (ctx.clone(), kernel.clone());
        tokio::spawn(async move {
            let _ = timeout(
                Duration::from_secs(10),
                answer(stream, &ctx, kernel.as_ref()),
            )
            .await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    ctx: &ProxyContext,
    kernel: &dyn Datapath,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        if stream.read_buf(&mut request).await? == 0 {
            break;
        }
    }
    let first_line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let (status, body) =
        if first_line.starts_with(b"GET /metrics ") || first_line.starts_with(b"GET / ") {
            ("200 OK", render(ctx, kernel))
        } else {
            ("404 Not Found", "try /metrics\n".to_owned())
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, kernel::NoKernel};

    #[test]
    fn renders_counters_with_help_and_type() {
        let kernel: Arc<dyn Datapath> = Arc::new(NoKernel::new("test"));
        let ctx = ProxyContext::new(&Config::default(), kernel.clone()).unwrap();
        ctx.stats.count_message();
        ctx.stats.count_rejection("harvest");
        ctx.stats.count_block("harvest");
        ctx.count_shed("192.0.2.1".parse().unwrap(), "shed-idle");
        let slot = ctx
            .backend_slots
            .try_acquire("192.0.2.1".parse().unwrap())
            .expect("a free slot");
        ctx.stats
            .backend_latency
            .record(std::time::Duration::from_millis(3));
        let text = render(&ctx, kernel.as_ref());
        assert!(
            text.contains(
                "# TYPE smtp_limiter_messages_total counter\nsmtp_limiter_messages_total 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("smtp_limiter_rejections_total{reason=\"harvest\"} 1"),
            "{text}"
        );
        assert!(text.contains("smtp_limiter_kernel_up 0"), "{text}");
        assert!(!text.contains("smtp_limiter_kernel_blocks"), "{text}");
        assert!(
            text.contains("smtp_limiter_blocks_issued_total{reason=\"harvest\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("smtp_limiter_backend_reply_seconds_bucket{le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("smtp_limiter_backend_reply_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("smtp_limiter_backend_reply_seconds_count 1"),
            "{text}"
        );
        for sample in [
            "smtp_limiter_sessions_shed_total{reason=\"shed-idle\"} 1\n",
            "smtp_limiter_rejections_total{reason=\"shed-idle\"} 1\n",
            "smtp_limiter_backend_slots 80\n",
            "smtp_limiter_backend_slots_in_use 1\n",
            "smtp_limiter_backend_slots_in_use_shed_networks 0\n",
            "smtp_limiter_backend_slots_waiting 0\n",
            "smtp_limiter_backend_slot_waits_total 0\n",
            "smtp_limiter_backend_slot_timeouts_total 0\n",
        ] {
            assert!(text.contains(sample), "{sample} missing: {text}");
        }
        drop(slot);
        let text = render(&ctx, kernel.as_ref());
        assert!(
            text.contains("smtp_limiter_backend_slots_in_use 0\n"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use crate::{config::Config, kernel::NoKernel};

    #[tokio::test]
    async fn cluster_figures_are_scraped_down_and_counted_events_dropped() {
        let kernel: Arc<dyn Datapath> = Arc::new(NoKernel::new("test"));
        let mut config = Config::default();
        let ctx = Arc::new(ProxyContext::new(&config, kernel.clone()).unwrap());
        let text = render(&ctx, kernel.as_ref());
        assert!(!text.contains("smtp_limiter_cluster_"), "{text}");
        // A Redis nobody listens on: the cluster stays down.
        config.cluster.redis = Some("redis://127.0.0.1:1/0".to_owned());
        config.cluster.node = Some("mx1".to_owned());
        ctx.cluster.start(&config, &ctx).unwrap();
        // A failed AUTH is counted here (its source's window and its
        // network's) and, Redis away, not cluster-wide: two events dropped.
        let policy = ctx.policy();
        let source = "192.0.2.7".parse().unwrap();
        assert!(policy
            .auth_failed(&ctx.state, source, None, std::time::Instant::now())
            .is_none());
        let text = render(&ctx, kernel.as_ref());
        for sample in [
            "# TYPE smtp_limiter_cluster_up gauge\nsmtp_limiter_cluster_up 0\n",
            "smtp_limiter_cluster_events_total{event=\"published\"} 0\n",
            "smtp_limiter_cluster_events_total{event=\"applied\"} 0\n",
            "smtp_limiter_cluster_events_total{event=\"observed\"} 0\n",
            "smtp_limiter_cluster_events_total{event=\"dropped\"} 0\n",
            "smtp_limiter_cluster_events_total{event=\"refused\"} 0\n",
            "smtp_limiter_cluster_queued 0\n",
            "smtp_limiter_cluster_counters_up 0\n",
            "smtp_limiter_cluster_counted_events_total{outcome=\"sent\"} 0\n",
            "smtp_limiter_cluster_counted_events_total{outcome=\"dropped\"} 2\n",
            "smtp_limiter_cluster_windows_crossed_total 0\n",
        ] {
            assert!(text.contains(sample), "{sample} missing: {text}");
        }
        ctx.cluster.publish_block(&crate::blocks::Block {
            net: "192.0.2.8/32".parse().unwrap(),
            origin: crate::blocks::Reason::Manual,
            expires: None,
            since: std::time::SystemTime::now(),
            repeat: 0,
            comment: None,
        });
        let text = render(&ctx, kernel.as_ref());
        assert!(text.contains("smtp_limiter_cluster_queued 1\n"), "{text}");
    }
}
