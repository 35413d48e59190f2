//! What the agent does with each control request (see [`crate::control`]):
//! blocks and allows through the proxy and the kernel at once (and stored),
//! live limits, statistics, reload.

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use limiter_common::reason;
use serde_json::{json, Value};

use crate::{
    agent::{kernel_limits, reload, AgentState},
    config::{self, Config},
    control::{Request, Response},
    policy::Policy,
    proxy::blocks::ActiveBlock,
};

/// Carries out one request.
pub fn handle(agent: &mut AgentState<'_>, request: Request) -> Response {
    match run(agent, request) {
        Ok(data) => Response::ok(data),
        Err(message) => Response::error(message),
    }
}

fn run(agent: &mut AgentState<'_>, request: Request) -> Result<Value, String> {
    match request {
        Request::Stats => Ok(stats(agent)),
        Request::Top => Ok(top(agent)),
        Request::Reload => {
            let path = agent
                .config_path
                .ok_or("the agent runs on the embedded default configuration: nothing to reload")?
                .to_owned();
            // Validate first, so the CLI gets the errors; `reload` keeps the
            // running configuration on a bad file too.
            Config::load(&path)
                .map_err(|e| format!("reload refused, the running configuration stays: {e}"))?;
            reload(&path, agent.config, agent.ctx, agent.datapath);
            Ok(json!({ "reloaded": path.display().to_string() }))
        }
        Request::BlockList => Ok(block_list(agent)),
        Request::BlockAdd {
            net,
            duration_secs,
            reason,
        } => {
            let net = parse_net(&net)?;
            let code = reason_code(&reason)?;
            let expires = match duration_secs {
                None => None,
                Some(secs) => Some(block_expiry(secs)?),
            };
            agent.ctx.blocks.insert(ActiveBlock {
                net,
                reason: code,
                expires,
                since: SystemTime::now(),
                repeat: 0,
            });
            let _ = agent.ctx.blocked_nets.send(net);
            let kernel = match agent.datapath.block(net, expires, code) {
                Ok(()) => "blocked".to_owned(),
                Err(e) => format!("not in the kernel: {e}"),
            };
            agent.save_blocks();
            tracing::info!(%net, reason = reason::name(code), origin = "cli", action = "block", "source blocked");
            Ok(json!({ "net": net.to_string(), "kernel": kernel, "stored": agent.store.is_some() }))
        }
        Request::BlockDel { net } => {
            let net = parse_net(&net)?;
            let in_proxy = agent.ctx.blocks.remove(&net);
            let in_kernel = agent.datapath.unblock(net).unwrap_or(false);
            agent.ctx.state.unblock(net);
            if !in_proxy && !in_kernel {
                return Err(format!("{net} is not blocked"));
            }
            agent.save_blocks();
            tracing::info!(%net, origin = "cli", action = "unblock", "block removed");
            Ok(json!({ "net": net.to_string() }))
        }
        Request::AllowList => {
            let nets = agent.datapath.allows().map_err(|e| e.to_string())?;
            Ok(json!(nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()))
        }
        Request::AllowAdd { net } => {
            let net = parse_net(&net)?;
            agent.datapath.allow(net).map_err(|e| e.to_string())?;
            // The proxy's allow list is the configuration's: keep them one.
            if !agent.config.lists.allow.contains(&net) {
                agent.config.lists.allow.push(net);
            }
            agent.ctx.set_policy(Policy::new(agent.config));
            Ok(json!({ "net": net.to_string(), "persisted": false }))
        }
        Request::AllowDel { net } => {
            let net = parse_net(&net)?;
            let in_kernel = agent.datapath.disallow(net).unwrap_or(false);
            let before = agent.config.lists.allow.len();
            agent.config.lists.allow.retain(|n| *n != net);
            if !in_kernel && before == agent.config.lists.allow.len() {
                return Err(format!("{net} is not on the allow list"));
            }
            agent.ctx.set_policy(Policy::new(agent.config));
            Ok(json!({ "net": net.to_string(), "persisted": false }))
        }
        Request::LimitsShow => Ok(limits(agent.config)),
        Request::RecipientsCheck { address } => {
            let recipients = agent
                .ctx
                .recipients
                .as_ref()
                .ok_or("no [recipients.ldap] configured")?;
            let lookup = recipients.lookup(&address);
            Ok(json!({ "address": address, "lookup": lookup, "refused": lookup.refuses() }))
        }
        Request::RecipientsStats => {
            let recipients = agent
                .ctx
                .recipients
                .as_ref()
                .ok_or("no [recipients.ldap] configured")?;
            serde_json::to_value(recipients.stats()).map_err(|e| e.to_string())
        }
        // Asynchronous: the agent's loop answers it itself.
        Request::RecipientsRefresh { .. } => Err("refresh is handled by the agent loop".into()),
        Request::LimitsSet { name, value } => {
            let mut candidate = agent.config.clone();
            set_limit(&mut candidate, &name, &value)?;
            candidate.validate().map_err(|e| e.to_string())?;
            agent.datapath.set_limits(&kernel_limits(&candidate)).ok();
            agent.ctx.set_policy(Policy::new(&candidate));
            *agent.config = candidate;
            tracing::info!(name, value, origin = "cli", "limit changed live");
            Ok(json!({
                "name": name,
                "value": value,
                "persisted": false,
                "note": "live only: the configuration file is unchanged, a reload or restart reverts it",
            }))
        }
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    config::parse_cidr(text).map_err(|e| format!("{text:?} is not an address or CIDR: {e}"))
}

/// The reason code for a reason name.
///
/// # Errors
/// An unknown name, with the valid ones.
pub fn reason_code(name: &str) -> Result<u32, String> {
    reason::from_name(name).ok_or_else(|| format!("unknown reason {name:?}: use manual, harvest, auth, flood, reject-list, relay or filter"))
}

/// When a block of `secs` seconds from now ends; refused past
/// [`config::MAX_BLOCK_DURATION`] (the arithmetic must not overflow on a
/// value from the control socket).
fn block_expiry(secs: u64) -> Result<SystemTime, String> {
    let duration = Duration::from_secs(secs);
    if duration > config::MAX_BLOCK_DURATION {
        return Err(format!(
            "--for {}: longer than {}; leave --for out for a block without end",
            config::format_duration(duration),
            config::format_duration(config::MAX_BLOCK_DURATION)
        ));
    }
    SystemTime::now()
        .checked_add(duration)
        .ok_or_else(|| format!("--for {secs}s: the end of the block is past the clock's range"))
}

/// Applies `limits set NAME VALUE` to a configuration.
fn set_limit(config: &mut Config, name: &str, value: &str) -> Result<(), String> {
    let limits = &mut config.limits;
    let number = |v: &str| v.parse::<u32>().map_err(|e| format!("{name} = {v:?}: {e}"));
    let duration = |v: &str| config::parse_duration(v).map_err(|e| format!("{name} = {v:?}: {e}"));
    match name {
        "max_connections_per_source" => limits.max_connections_per_source = number(value)?,
        "ipv6_prefix" => {
            limits.ipv6_prefix = value
                .parse::<u8>()
                .map_err(|e| format!("{name} = {value:?}: {e}"))?;
        }
        "max_failed_rcpt" => limits.max_failed_rcpt = number(value)?,
        "max_failed_rcpt_per_source" => limits.max_failed_rcpt_per_source = number(value)?,
        "failed_rcpt_window" => limits.failed_rcpt_window = duration(value)?,
        "max_failed_auth" => limits.max_failed_auth = number(value)?,
        "failed_auth_window" => limits.failed_auth_window = duration(value)?,
        "block_duration" => limits.block_duration = duration(value)?,
        "max_block_duration" => limits.max_block_duration = duration(value)?,
        "block_backoff" => {
            limits.block_backoff = value
                .parse::<f64>()
                .map_err(|e| format!("{name} = {value:?}: {e}"))?;
        }
        "null_sender_rate" => {
            limits.null_sender_rate = value
                .parse()
                .map_err(|e| format!("{name} = {value:?}: {e}"))?;
        }
        _ => {
            return Err(format!(
                "unknown limit {name:?}: use one of {}",
                LIMIT_NAMES.join(", ")
            ))
        }
    }
    Ok(())
}

/// The limits `limits set` knows.
pub const LIMIT_NAMES: [&str; 11] = [
    "max_connections_per_source",
    "ipv6_prefix",
    "max_failed_rcpt",
    "max_failed_rcpt_per_source",
    "failed_rcpt_window",
    "max_failed_auth",
    "failed_auth_window",
    "null_sender_rate",
    "block_duration",
    "block_backoff",
    "max_block_duration",
];

fn limits(config: &Config) -> Value {
    let l = &config.limits;
    json!({
        "max_connections_per_source": l.max_connections_per_source,
        "ipv6_prefix": l.ipv6_prefix,
        "max_failed_rcpt": l.max_failed_rcpt,
        "max_failed_rcpt_per_source": l.max_failed_rcpt_per_source,
        "failed_rcpt_window": config::format_duration(l.failed_rcpt_window),
        "max_failed_auth": l.max_failed_auth,
        "failed_auth_window": config::format_duration(l.failed_auth_window),
        "null_sender_rate": l.null_sender_rate.to_string(),
        "block_duration": config::format_duration(l.block_duration),
        "block_backoff": l.block_backoff,
        "max_block_duration": config::format_duration(l.max_block_duration),
        "source": l.source.iter().map(|s| json!({"cidr": s.cidr.to_string(), "max_connections": s.max_connections})).collect::<Vec<_>>(),
        "helo": l.helo.iter().map(|h| json!({"pattern": h.pattern, "max_connections": h.max_connections})).collect::<Vec<_>>(),
    })
}

fn block_list(agent: &AgentState<'_>) -> Value {
    let now = SystemTime::now();
    let kernel = agent.datapath.blocks().unwrap_or_default();
    let proxy = agent.ctx.blocks.all();
    let mut nets: Vec<IpNet> = kernel
        .iter()
        .map(|b| b.net)
        .chain(proxy.iter().map(|b| b.net))
        .collect();
    nets.sort();
    nets.dedup();
    let rows: Vec<Value> = nets
        .into_iter()
        .filter_map(|net| {
            let k = kernel.iter().find(|b| b.net == net);
            let p = proxy.iter().find(|b| b.net == net);
            let (reason, expires) = match (p, k) {
                (Some(p), _) => (p.reason, p.expires),
                (None, Some(k)) => (k.reason, k.expires),
                (None, None) => return None,
            };
            if expires.is_some_and(|t| t <= now) {
                return None;
            }
            Some(json!({
                "net": net.to_string(),
                "reason": reason::name(reason),
                "since": p.map(|p| humantime::format_rfc3339_seconds(p.since).to_string()),
                "expires": expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "repeat": p.map(|p| p.repeat),
                "drops": k.map(|k| k.drops),
                "in_kernel": k.is_some(),
            }))
        })
        .collect();
    json!(rows)
}

fn stats(agent: &AgentState<'_>) -> Value {
    let s = &agent.ctx.stats;
    let kernel = agent.datapath.counters().ok().map(|c| {
        c.fields()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "kernel_status": agent.datapath.describe(),
        "recipients": agent.ctx.recipients.as_ref().map(|r| r.stats()),
        "filters": agent.ctx.filters.as_ref().map(|f| json!({
            "verdicts": counts(f.stats.verdicts.list()),
            "scanner_errors": counts(f.stats.scanner_errors.list()),
        })),
        "kernel": kernel,
        "proxy": {
            "sessions_open": s.sessions_open.load(Ordering::Relaxed),
            "sessions_total": s.sessions_total.load(Ordering::Relaxed),
            "messages": s.messages.load(Ordering::Relaxed),
            "backend_errors": s.backend_errors.load(Ordering::Relaxed),
            "blocks_issued": s.blocks_issued.load(Ordering::Relaxed),
            "blocks_active": agent.ctx.blocks.len(),
            "rejections": counts(s.rejections()),
        },
    })
}

/// Counts by name as a JSON object.
fn counts(list: Vec<(&'static str, u64)>) -> serde_json::Map<String, Value> {
    list.into_iter()
        .map(|(name, n)| (name.to_owned(), json!(n)))
        .collect()
}

fn top(agent: &AgentState<'_>) -> Value {
    let mut connections = agent.datapath.connection_counts().unwrap_or_default();
    connections.sort_by_key(|c| std::cmp::Reverse(c.1));
    connections.truncate(20);
    let mut blocks = agent.datapath.blocks().unwrap_or_default();
    blocks.sort_by_key(|b| std::cmp::Reverse(b.drops));
    blocks.truncate(20);
    json!({
        "connections": connections.iter().map(|(net, n)| json!({"source": net.to_string(), "connections": n})).collect::<Vec<_>>(),
        "drops": blocks.iter().map(|b| json!({"net": b.net.to_string(), "reason": reason::name(b.reason), "drops": b.drops})).collect::<Vec<_>>(),
        "rejections": agent.ctx.stats.rejections().into_iter().map(|(k, v)| json!({"reason": k, "count": v})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_expiry_refuses_what_would_overflow_the_clock() {
        assert!(block_expiry(3600).is_ok());
        let longest = config::MAX_BLOCK_DURATION.as_secs();
        assert!(block_expiry(longest).is_ok());
        for secs in [longest + 1, u64::MAX / 2, u64::MAX] {
            let error = block_expiry(secs).expect_err("refused");
            assert!(error.contains("--for"), "{error}");
        }
    }
}
