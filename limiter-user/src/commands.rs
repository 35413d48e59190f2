//! What the agent does with each control request (see [`crate::control`]):
//! blocks and allows through the proxy and the kernel at once (and stored),
//! live limits, statistics, reload.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

use crate::{
    agent::{kernel_limits, reload, AgentState},
    blocks::{origin_name, parse_origin, Block, Reason},
    config::{self, Config},
    control::{
        AllowChanged, Answer, BackendSlots, BlockAdded, BlockCheck, BlockDrops, BlockPage,
        BlockRemoved, BlockRow, Entry, FilterStats, HeloLimit, ImportBlock, Imported, LimitSet,
        LimitsShown, ListCursor, Match, ProxyStats, RecipientCheck, RejectionCount, Reloaded,
        Request, Response, SourceConnections, SourceLimit, SpoolCounts, Stats, Top,
    },
    kernel::KernelError,
    lists::{ListSet, ListSource},
    policy::Policy,
};

/// Carries out one request.
pub fn handle(agent: &mut AgentState<'_>, request: Request) -> Response {
    match run(agent, request) {
        Ok(data) => Response::ok(data),
        Err(message) => Response::error(message),
    }
}

fn run(agent: &mut AgentState<'_>, request: Request) -> Result<Answer, String> {
    match request {
        Request::Stats => Ok(Answer::Stats(stats(agent))),
        Request::Top => Ok(Answer::Top(top(agent))),
        Request::Reload => {
            let path = agent
                .config_path
                .ok_or("the agent runs on the embedded default configuration: nothing to reload")?
                .to_owned();
            // Validate first, so the CLI gets the errors; `reload` keeps the
            // running configuration on a bad file too.
            Config::load_with_lists(&path)
                .map_err(|e| format!("reload refused, the running configuration stays: {e}"))?;
            let restart_needed = reload(&path, agent.config, agent.ctx, agent.datapath);
            Ok(Answer::Reload(Reloaded {
                reloaded: path.display().to_string(),
                restart_needed: restart_needed.into_iter().map(str::to_owned).collect(),
            }))
        }
        Request::BlockList {
            origin,
            covering,
            after,
            rows,
        } => block_list(agent, origin.as_deref(), covering.as_deref(), after, rows)
            .map(Answer::BlockList),
        Request::BlockAdd {
            net,
            duration_secs,
            origin,
            comment,
        } => {
            let net = parse_net(&net)?;
            let origin = parse_origin(&origin)?;
            let expires = match duration_secs {
                None => None,
                Some(secs) => Some(block_expiry(secs)?),
            };
            let comment = comment.as_deref().map(clean_comment).transpose()?;
            let kernel = match add_block(
                agent,
                Block {
                    net,
                    origin,
                    expires,
                    since: SystemTime::now(),
                    repeat: 0,
                    comment: comment.as_deref().map(Arc::from),
                },
            ) {
                Ok(()) => "blocked".to_owned(),
                Err(e) => format!("not in the kernel: {e}"),
            };
            tracing::info!(%net, origin = origin.name(), comment = comment.as_deref().unwrap_or(""), by = "cli", action = "block", "source blocked");
            Ok(Answer::BlockAdd(BlockAdded {
                net: net.to_string(),
                kernel,
                stored: agent.store.is_some(),
            }))
        }
        Request::BlockDel { net } => {
            let net = parse_net(&net)?;
            let lists = ListSet::of(&agent.config.lists);
            let listed = lists.reject.get(&net.trunc());
            let lifted = agent.ctx.lift(net, listed.is_some());
            if !lifted.in_table && !lifted.in_kernel {
                return Err(match listed {
                    Some(source) => format!("{net} is on a reject list ({source}), not a block: remove it there and reload"),
                    None => format!("{net} is not blocked"),
                });
            }
            agent.ctx.cluster.publish_unblock(net);
            tracing::info!(%net, by = "cli", action = "unblock", "block removed");
            Ok(Answer::BlockDel(BlockRemoved {
                net: net.to_string(),
                still_listed: listed.map(ToString::to_string),
            }))
        }
        Request::BlockCheck { address } => block_check(agent, &address).map(Answer::BlockCheck),
        Request::BlockImport { blocks } => Ok(Answer::BlockImport(block_import(agent, blocks))),
        Request::AllowList => {
            let nets = agent.datapath.allows().map_err(|e| e.to_string())?;
            Ok(Answer::AllowList(
                nets.iter().map(ToString::to_string).collect(),
            ))
        }
        Request::AllowAdd { net } => {
            let net = parse_net(&net)?;
            agent.datapath.allow(net).map_err(|e| e.to_string())?;
            // The proxy's allow list is the configuration's: keep them one.
            if !agent.config.lists.allow.contains(&net) {
                agent.config.lists.allow.push(net);
            }
            agent.ctx.set_policy(Policy::new(agent.config));
            Ok(Answer::AllowChange(AllowChanged {
                net: net.to_string(),
                persisted: false,
            }))
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
            Ok(Answer::AllowChange(AllowChanged {
                net: net.to_string(),
                persisted: false,
            }))
        }
        Request::LimitsShow => Ok(Answer::LimitsShow(limits(agent.config))),
        Request::RecipientsCheck { address } => {
            let recipients = agent
                .ctx
                .recipients
                .as_ref()
                .ok_or("no [recipients.ldap] configured")?;
            let lookup = recipients.lookup(&address);
            Ok(Answer::RecipientsCheck(RecipientCheck {
                address,
                lookup: lookup.name().to_owned(),
                refused: lookup.refuses(),
            }))
        }
        Request::RecipientsStats => {
            let recipients = agent
                .ctx
                .recipients
                .as_ref()
                .ok_or("no [recipients.ldap] configured")?;
            Ok(Answer::RecipientsStats(recipients.stats()))
        }
        // Asynchronous: the agent's loop answers it itself.
        Request::RecipientsRefresh { .. } => Err("refresh is handled by the agent loop".into()),
        Request::LimitsSet { name, value } => {
            let mut candidate = agent.config.clone();
            candidate.limits.set_live(&name, &value)?;
            candidate.validate().map_err(|e| e.to_string())?;
            agent.datapath.set_limits(&kernel_limits(&candidate)).ok();
            agent.ctx.set_policy(Policy::new(&candidate));
            *agent.config = candidate;
            tracing::info!(name, value, origin = "cli", "limit changed live");
            Ok(Answer::LimitsSet(LimitSet {
                name,
                value,
                persisted: false,
                note:
                    "live only: the configuration file is unchanged, a reload or restart reverts it"
                        .to_owned(),
            }))
        }
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    config::parse_cidr(text).map_err(|e| format!("{text:?} is not an address or CIDR: {e}"))
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

fn limits(config: &Config) -> LimitsShown {
    let l = &config.limits;
    LimitsShown {
        live: l.live_values().into_iter().collect(),
        source: l
            .source
            .iter()
            .map(|s| SourceLimit {
                cidr: s.cidr.to_string(),
                max_connections: s.max_connections,
            })
            .collect(),
        helo: l
            .helo
            .iter()
            .map(|h| HeloLimit {
                pattern: h.pattern.clone(),
                max_connections: h.max_connections,
            })
            .collect(),
    }
}

/// Most rows in one `block list` page: a page is one request on the
/// agent's loop, so it stays short; the CLI asks for the next.
pub const MAX_PAGE_ROWS: usize = 5000;
/// Most blocks one filtered page looks at before it answers (possibly with
/// fewer rows) and says where the next one starts.
const MAX_PAGE_SCAN: usize = 50_000;
/// Longest free-text reason kept, in characters.
pub const MAX_COMMENT: usize = 500;
/// Up to this many blocks and list entries, `block list` and `block check`
/// show each entry's kernel drop count, read with one walk of the kernel's
/// block maps per page (a few milliseconds); past it the walk would hold
/// the maps' lock, which accepts need, too long, and `top` shows the
/// busiest entries instead.
pub const DROPS_SHOWN_UP_TO: usize = 10_000;

/// A free-text reason as stored: trimmed, no control characters (they
/// would garble logs and listings), at most [`MAX_COMMENT`] characters.
///
/// # Errors
/// Longer than [`MAX_COMMENT`].
pub fn clean_comment(text: &str) -> Result<String, String> {
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_COMMENT {
        return Err(format!(
            "--reason: {} characters; at most {MAX_COMMENT}",
            text.chars().count()
        ));
    }
    Ok(text)
}

/// Puts a block in force ([`crate::proxy::ProxyContext::enforce`]) and shares it with
/// the other edge hosts.
fn add_block(agent: &AgentState<'_>, block: Block) -> Result<(), KernelError> {
    agent.ctx.cluster.publish_block(&block);
    // Stored by the journal the table hands the change to: no save here.
    agent.ctx.enforce(block)
}

fn rfc3339(at: Option<SystemTime>) -> Option<String> {
    at.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// Kernel drop counts by network, when the state is small enough
/// ([`DROPS_SHOWN_UP_TO`]).
fn drop_counts(agent: &AgentState<'_>, lists: &ListSet) -> Option<HashMap<ipnet::IpNet, u64>> {
    if agent.ctx.blocks.len() + lists.reject.len() > DROPS_SHOWN_UP_TO {
        return None;
    }
    let blocks = agent.datapath.blocks().ok()?;
    Some(blocks.into_iter().map(|b| (b.net, b.drops)).collect())
}

/// A block as `block list` and `block check` show it, with its kernel
/// drop count when `drops` are known.
fn block_row(block: &Block, in_kernel: bool, drops: Option<&HashMap<IpNet, u64>>) -> BlockRow {
    let origin = block.origin.name();
    BlockRow {
        net: block.net.to_string(),
        origin: origin.to_owned(),
        // Earlier versions had the origin here: a block without text keeps it.
        reason: block.comment.as_deref().unwrap_or(origin).to_owned(),
        comment: block.comment.as_deref().map(str::to_owned),
        list: None,
        since: rfc3339(Some(block.since)),
        expires: rfc3339(block.expires),
        repeat: Some(block.repeat),
        in_kernel: Some(in_kernel),
        drops: drops.map(|d| d.get(&block.net).copied()),
        node: None,
    }
}

/// A reject list's entry as `block list` and `block check` show it.
fn list_row(net: &IpNet, source: &ListSource, drops: Option<&HashMap<IpNet, u64>>) -> BlockRow {
    BlockRow {
        net: net.to_string(),
        origin: Reason::RejectList.name().to_owned(),
        reason: source.to_string(),
        comment: None,
        list: Some(source.to_string()),
        since: None,
        expires: None,
        repeat: Some(0),
        in_kernel: Some(true),
        drops: drops.map(|d| d.get(net).copied()),
        node: None,
    }
}

/// One page of `block list`: the reject lists' entries first (by network),
/// then the blocks (by expiry, soonest first), each filtered by origin and
/// by an address or network they must contain.
fn block_list(
    agent: &AgentState<'_>,
    origin: Option<&str>,
    covering: Option<&str>,
    after: Option<ListCursor>,
    rows: Option<usize>,
) -> Result<BlockPage, String> {
    let origin = origin.map(parse_origin).transpose()?;
    let covering = covering.map(parse_net).transpose()?.map(|n| n.trunc());
    let want = rows.unwrap_or(MAX_PAGE_ROWS).clamp(1, MAX_PAGE_ROWS);
    let contains = |net: &ipnet::IpNet| covering.is_none_or(|c| net.contains(&c));
    let now = SystemTime::now();
    let mut out = Vec::new();
    let lists = ListSet::of(&agent.config.lists);
    let drops = drop_counts(agent, &lists);
    let drops = drops.as_ref();
    // Where a page that ends among the list entries ends.
    let after_list_entry = |out: &[Entry]| {
        out.last().map(|row| ListCursor {
            expires_ns: None,
            net: row.row().net.clone(),
        })
    };
    let in_lists = after.as_ref().is_none_or(|a| a.expires_ns.is_none());
    if in_lists && origin.is_none_or(|o| o == Reason::RejectList) {
        let start = match &after {
            Some(a) => std::ops::Bound::Excluded(parse_net(&a.net)?),
            None => std::ops::Bound::Unbounded,
        };
        for (net, source) in lists
            .reject
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(net, _)| contains(net))
        {
            if out.len() == want {
                let next = after_list_entry(&out);
                return Ok(BlockPage { blocks: out, next });
            }
            out.push(Entry::List(list_row(net, source, drops)));
        }
        if out.len() >= want {
            // The page ends with the lists: the blocks start the next one.
            let next = after_list_entry(&out);
            return Ok(BlockPage { blocks: out, next });
        }
    }
    let keep =
        |b: &Block| origin.is_none_or(|o| o == b.origin) && b.expires.is_none_or(|t| t > now);
    let row = |block: &Block, in_kernel: bool| {
        let mut row = block_row(block, in_kernel, drops);
        // The node that decided it, when a cluster is configured.
        row.node = agent.ctx.cluster.node_of(&block.net).map(|n| n.to_string());
        Entry::Block(row)
    };
    let next = match covering {
        // The blocks containing a network: one lookup per prefix length.
        Some(net) => {
            for block in agent
                .ctx
                .blocks
                .containing(net.network(), now, usize::MAX)
                .into_iter()
                .filter(|b| b.net.contains(&net) && keep(b))
            {
                out.push(row(&block, agent.ctx.blocks.in_kernel(&block.net)));
            }
            None
        }
        None => {
            let block_after = match &after {
                Some(ListCursor {
                    expires_ns: Some(ns),
                    net,
                }) => Some((*ns, parse_net(net)?)),
                _ => None,
            };
            let page = agent
                .ctx
                .blocks
                .page(block_after, want - out.len(), MAX_PAGE_SCAN, keep);
            out.extend(page.rows.iter().map(|(b, k)| row(b, *k)));
            page.next.map(|(ns, net)| ListCursor {
                expires_ns: Some(ns),
                net: net.to_string(),
            })
        }
    };
    Ok(BlockPage { blocks: out, next })
}

/// `block check ADDR`: whether the address is dropped and by what (the
/// allow lists first, as the kernel checks them, then blocks, reject
/// lists, kernel-only entries and the per-source connection cap).
fn block_check(agent: &AgentState<'_>, address: &str) -> Result<BlockCheck, String> {
    let ip: IpAddr = address
        .trim()
        .parse()
        .map_err(|_| format!("{address:?} is not an IPv4 or IPv6 address"))?;
    let ip = ip.to_canonical();
    let now = SystemTime::now();
    let policy = agent.ctx.policy();
    let lists = ListSet::of(&agent.config.lists);
    let mut matches = Vec::new();
    let allowed: Vec<Match> = ListSet::containing(&lists.allow, ip)
        .into_iter()
        .map(|(net, source)| Match::AllowList {
            net: net.to_string(),
            list: source.to_string(),
        })
        .collect();
    let drops = drop_counts(agent, &lists);
    let blocks = agent.ctx.blocks.containing(ip, now, 16);
    for block in &blocks {
        matches.push(Match::Block(block_row(
            block,
            agent.ctx.blocks.in_kernel(&block.net),
            drops.as_ref(),
        )));
    }
    for (net, source) in ListSet::containing(&lists.reject, ip) {
        matches.push(Match::List(list_row(net, source, drops.as_ref())));
    }
    if matches.is_empty() {
        // An entry the agent did not put there (bpftool, an earlier run).
        if let Ok(Some(hit)) = agent.datapath.block_covering(ip) {
            matches.push(Match::Kernel {
                origin: origin_name(hit.origin).to_owned(),
                expires: rfc3339(hit.expires),
            });
        }
    }
    if let Some(limit) = policy.connection_cap(ip) {
        let connections = agent
            .datapath
            .connections(ip)
            .unwrap_or_else(|_| agent.ctx.state.connections(policy.source_key(ip)));
        if connections >= limit {
            let source = agent
                .config
                .limits
                .source
                .iter()
                .filter(|s| s.cidr.contains(&ip))
                .max_by_key(|s| s.cidr.prefix_len())
                .map_or("limits.max_connections_per_source".to_owned(), |s| {
                    format!("limits.source {}", s.cidr)
                });
            matches.push(Match::Cap {
                connections,
                limit,
                source,
                reason: format!("holds {connections} of {limit} connections: new ones are dropped"),
            });
        }
    }
    let enforced = policy.enforced();
    let blocked = allowed.is_empty() && !matches.is_empty();
    let verdict = if let Some(allow) = allowed.first() {
        format!("not dropped: {}", why(allow))
    } else if let Some(first) = matches.first() {
        if enforced {
            format!("dropped: {}", why(first))
        } else {
            format!("not dropped (mode = \"observe\"), would be: {}", why(first))
        }
    } else {
        "not dropped: no block, list entry or cap covers it".to_owned()
    };
    matches.extend(allowed);
    Ok(BlockCheck {
        address: ip.to_string(),
        dropped: blocked && enforced,
        verdict,
        matches,
    })
}

/// What a match of `block check` does to the address, for its verdict.
fn why(entry: &Match) -> String {
    match entry {
        Match::Block(row) => format!(
            "blocked by {} ({}: {}), {}",
            row.net,
            row.origin,
            row.reason,
            row.expires
                .as_ref()
                .map_or("until removed".to_owned(), |t| format!("until {t}"))
        ),
        Match::List(row) => format!(
            "on the reject list: {} ({})",
            row.net,
            row.list.as_deref().unwrap_or_default()
        ),
        Match::Kernel { origin, .. } => format!("blocked in the kernel ({origin})"),
        Match::Cap { source, reason, .. } => {
            format!("over its connection cap ({source}): {reason}")
        }
        Match::AllowList { net, list } => format!("allow-listed by {net} ({list})"),
    }
}

/// `block import`: blocks the CLI read from a file, defaults applied.
fn block_import(agent: &AgentState<'_>, blocks: Vec<ImportBlock>) -> Imported {
    let now = SystemTime::now();
    let (mut added, mut not_in_kernel, mut expired) = (0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    for item in blocks {
        let block = (|| -> Result<Option<Block>, String> {
            let net = parse_net(&item.net)?;
            let origin = parse_origin(&item.origin)?;
            let expires = match item.expires_unix {
                None => None,
                Some(at) => {
                    let at = UNIX_EPOCH + Duration::from_secs(at);
                    let Ok(left) = at.duration_since(now) else {
                        return Ok(None);
                    };
                    // Refused past the longest block; the end itself is
                    // kept to the second, so an export imports unchanged.
                    block_expiry(left.as_secs())?;
                    Some(at)
                }
            };
            let comment = item.comment.as_deref().map(clean_comment).transpose()?;
            Ok(Some(Block {
                net,
                origin,
                expires,
                since: item
                    .since_unix
                    .map_or(now, |t| UNIX_EPOCH + Duration::from_secs(t)),
                repeat: 0,
                comment: comment.filter(|c| !c.is_empty()).as_deref().map(Arc::from),
            }))
        })();
        match block {
            Ok(Some(block)) => {
                added += 1;
                if add_block(agent, block).is_err() {
                    not_in_kernel += 1;
                }
            }
            Ok(None) => expired += 1,
            Err(e) => errors.push(format!("{}: {e}", item.net)),
        }
    }
    if added > 0 {
        tracing::info!(
            added,
            not_in_kernel,
            by = "cli",
            action = "import",
            "blocks imported"
        );
    }
    Imported {
        added,
        not_in_kernel,
        expired,
        errors,
    }
}

fn stats(agent: &AgentState<'_>) -> Stats {
    let s = &agent.ctx.stats;
    let kernel = agent.datapath.counters().ok().map(|c| {
        c.fields()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    });
    let slots = agent.ctx.backend_slots.counts();
    Stats {
        kernel_status: agent.datapath.describe(),
        recipients: Some(agent.ctx.recipients.as_ref().map(|r| r.stats())),
        filters: Some(agent.ctx.filters.as_ref().map(|f| FilterStats {
            verdicts: counts(f.stats.verdicts.list()),
            scanner_errors: counts(f.stats.scanner_errors.list()),
        })),
        kernel,
        cluster: Some(agent.ctx.cluster.counts()),
        proxy: Some(ProxyStats {
            sessions_open: s.sessions_open.load(Ordering::Relaxed),
            sessions_total: s.sessions_total.load(Ordering::Relaxed),
            messages: s.messages.load(Ordering::Relaxed),
            backend_errors: s.backend_errors.load(Ordering::Relaxed),
            blocks_issued: s.blocks_issued.load(Ordering::Relaxed),
            blocks_active: agent.ctx.blocks.len(),
            rejections: counts(s.rejections()),
            shed: counts(s.shed()),
            backend_slots: BackendSlots {
                capacity: slots.capacity,
                in_use: slots.in_use,
                waiting: slots.waiting,
                waits: slots.waits,
                timeouts: slots.timeouts,
            },
            spool: SpoolCounts {
                spooled: agent.ctx.spool.spooled(),
                bytes: agent.ctx.spool.used(),
                evicted: agent.ctx.spool.evicted(),
            },
        }),
    }
}

/// Counts by name, as `stats` shows them.
fn counts(list: Vec<(&'static str, u64)>) -> BTreeMap<String, u64> {
    list.into_iter()
        .map(|(name, n)| (name.to_owned(), n))
        .collect()
}

fn top(agent: &AgentState<'_>) -> Top {
    let mut connections = agent.datapath.connection_counts().unwrap_or_default();
    connections.sort_by_key(|c| std::cmp::Reverse(c.1));
    connections.truncate(20);
    let mut blocks = agent.datapath.blocks().unwrap_or_default();
    blocks.sort_by_key(|b| std::cmp::Reverse(b.drops));
    blocks.truncate(20);
    Top {
        connections: connections
            .iter()
            .map(|(net, n)| SourceConnections {
                source: net.to_string(),
                connections: u64::from(*n),
            })
            .collect(),
        drops: blocks
            .iter()
            .map(|b| BlockDrops {
                net: b.net.to_string(),
                reason: origin_name(b.origin).to_owned(),
                drops: b.drops,
            })
            .collect(),
        rejections: agent
            .ctx
            .stats
            .rejections()
            .into_iter()
            .map(|(reason, count)| RejectionCount {
                reason: reason.to_owned(),
                count,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kernel::NoKernel, proxy::ProxyContext};

    /// Runs `f` on an agent (kernel layer off) with `reject` as
    /// `lists.reject` and `blocks` in its table.
    fn with_agent<T>(
        reject: &[&str],
        blocks: &[(&str, u64)],
        f: impl FnOnce(&mut AgentState<'_>) -> T,
    ) -> T {
        let mut config = Config::default();
        config.lists.reject = reject.iter().map(|n| n.parse().unwrap()).collect();
        let datapath = NoKernel::new("test");
        let ctx = ProxyContext::new(&config, std::sync::Arc::new(NoKernel::new("test"))).unwrap();
        let now = SystemTime::now();
        for (net, secs) in blocks {
            ctx.blocks.insert(Block {
                net: net.parse().unwrap(),
                origin: if secs % 2 == 0 {
                    Reason::Manual
                } else {
                    Reason::Auth
                },
                expires: Some(now + Duration::from_secs(*secs)),
                since: now,
                repeat: 0,
                comment: Some(Arc::from(format!("block {net}"))),
            });
        }
        let saves = tokio::sync::Notify::new();
        let mut agent = AgentState {
            config: &mut config,
            config_path: None,
            ctx: &ctx,
            datapath: &datapath,
            store: None,
            saves: &saves,
        };
        f(&mut agent)
    }

    /// Every row of `block list` with `origin`/`covering`, `rows` a page.
    fn list_all(
        agent: &mut AgentState<'_>,
        origin: Option<&str>,
        covering: Option<&str>,
        rows: usize,
    ) -> (Vec<String>, usize) {
        let mut nets = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = block_list(agent, origin, covering, after.take(), Some(rows)).unwrap();
            pages += 1;
            assert!(page.blocks.len() <= rows, "{page:?}");
            nets.extend(page.blocks.iter().map(|r| r.row().net.clone()));
            match page.next {
                Some(next) => after = Some(next),
                None => return (nets, pages),
            }
        }
    }

    #[test]
    fn block_list_pages_through_list_entries_then_blocks_once_each() {
        let reject = ["198.51.100.0/24", "203.0.113.9/32", "2001:db8:bad::/48"];
        let blocks = [
            ("192.0.2.1/32", 50),
            ("192.0.2.2/32", 10),
            ("192.0.2.0/24", 31),
            ("192.0.2.3/32", 20),
            ("2001:db8::/32", 41),
        ];
        with_agent(&reject, &blocks, |agent| {
            let want = [
                "198.51.100.0/24",
                "203.0.113.9/32",
                "2001:db8:bad::/48",
                "192.0.2.2/32",
                "192.0.2.3/32",
                "192.0.2.0/24",
                "2001:db8::/32",
                "192.0.2.1/32",
            ];
            for rows in [1, 2, 3, 4, 100] {
                let (nets, _) = list_all(agent, None, None, rows);
                assert_eq!(nets, want, "pages of {rows}");
            }
            let (auth, _) = list_all(agent, Some("auth"), None, 1);
            assert_eq!(auth, ["192.0.2.0/24", "2001:db8::/32"]);
            let (listed, _) = list_all(agent, Some("reject-list"), None, 2);
            assert_eq!(listed, &want[..3]);
            let (covering, pages) = list_all(agent, None, Some("192.0.2.3"), 100);
            assert_eq!(
                (covering, pages),
                (
                    vec!["192.0.2.3/32".to_owned(), "192.0.2.0/24".to_owned()],
                    1
                )
            );
            let (covering, _) = list_all(agent, None, Some("203.0.113.9"), 100);
            assert_eq!(covering, ["203.0.113.9/32"]);
            assert!(block_list(agent, Some("nonsense"), None, None, None).is_err());
        });
    }

    #[test]
    fn block_check_names_the_block_the_list_and_the_allow_entry() {
        with_agent(&["198.51.100.0/24"], &[("192.0.2.7/32", 60)], |agent| {
            let check = block_check(agent, "192.0.2.7").unwrap();
            assert!(check.dropped, "{check:?}");
            assert!(check.verdict.contains("block 192.0.2.7/32"), "{check:?}");
            let check = block_check(agent, "198.51.100.9").unwrap();
            assert!(check.dropped, "{check:?}");
            assert!(check.verdict.contains("lists.reject"), "{check:?}");
            assert!(!block_check(agent, "192.0.2.8").unwrap().dropped);
            agent.config.lists.allow = vec!["192.0.2.0/24".parse().unwrap()];
            let check = block_check(agent, "192.0.2.7").unwrap();
            assert!(!check.dropped, "{check:?}");
            assert!(
                check
                    .verdict
                    .contains("allow-listed by 192.0.2.0/24 (lists.allow)"),
                "{check:?}"
            );
            assert!(
                matches!(check.matches.last(), Some(Match::AllowList { .. })),
                "allow entries come last: {check:?}"
            );
            assert!(
                block_check(agent, "192.0.2.0/24").is_err(),
                "an address, not a network"
            );
        });
    }

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
