//! What the agent answers to each control request: the `data` of a
//! successful [`Response`](super::Response). The agent builds these, the
//! CLI reads them back and `--json` prints them, so their JSON is a
//! published format: field names, nesting, and which fields are absent
//! rather than null stay as they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::ListCursor;
use crate::{
    cluster::ClusterCounts,
    recipients::{RecipientStats, RefreshReport},
};

/// Any answer, as the agent sends it. Untagged: the CLI knows which
/// request it sent and reads `data` as that request's answer type (the
/// types could not be told apart by their fields alone: `allow add` and
/// `allow del` answer alike), so this is only ever written.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[expect(
    clippy::large_enum_variant,
    reason = "one answer per request, written out at once and never stored"
)]
pub enum Answer {
    Stats(Stats),
    Top(Top),
    Reload(Reloaded),
    BlockList(BlockPage),
    BlockAdd(BlockAdded),
    BlockDel(BlockRemoved),
    BlockCheck(BlockCheck),
    BlockImport(Imported),
    /// `allow list`: the allow-listed networks.
    AllowList(Vec<String>),
    /// `allow add` and `allow del`.
    AllowChange(AllowChanged),
    LimitsShow(LimitsShown),
    LimitsSet(LimitSet),
    RecipientsCheck(RecipientCheck),
    RecipientsStats(RecipientStats),
    RecipientsRefresh(RefreshReport),
}

/// `stats`: the kernel's and the proxy's counters, and those of the
/// optional parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The kernel layer's state in words (mode, programs attached).
    pub kernel_status: String,
    /// The kernel's counters by name; null when the kernel layer is off.
    pub kernel: Option<BTreeMap<String, u64>>,
    /// Null when read from the pinned maps (the agent is not running).
    pub proxy: Option<ProxyStats>,
    /// Null without `[recipients.ldap]`, absent when read from the pinned
    /// maps (as are `filters` and `cluster`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "absent_or_null"
    )]
    pub recipients: Option<Option<RecipientStats>>,
    /// Null without `[filters]`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "absent_or_null"
    )]
    pub filters: Option<Option<FilterStats>>,
    /// Null without `[cluster]`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "absent_or_null"
    )]
    pub cluster: Option<Option<ClusterCounts>>,
}

/// The proxy's counters in `stats`, since the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    pub sessions_open: u64,
    pub sessions_total: u64,
    pub messages: u64,
    pub backend_errors: u64,
    pub blocks_issued: u64,
    /// Blocks in force now.
    pub blocks_active: usize,
    /// Refusals by reason name.
    pub rejections: BTreeMap<String, u64>,
    /// Sessions shed under load, by why.
    pub shed: BTreeMap<String, u64>,
    pub backend_slots: BackendSlots,
    /// Absent from an agent older than the spool.
    #[serde(default)]
    pub spool: SpoolCounts,
}

/// The spool in `stats` (`proxy::spool`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolCounts {
    /// Messages whose client gave its backend slot back mid-message.
    pub spooled: u64,
    /// Bytes of message copies held now.
    pub bytes: u64,
    /// Spooled messages evicted from a full spool for faster ones (absent
    /// from an agent older than eviction).
    #[serde(default)]
    pub evicted: u64,
}

/// The backend slots in `stats` (`proxy::slots::SlotCounts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSlots {
    pub capacity: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub waits: u64,
    pub timeouts: u64,
}

/// The content filters' counters in `stats`, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStats {
    pub verdicts: BTreeMap<String, u64>,
    pub scanner_errors: BTreeMap<String, u64>,
}

/// `top`: the busiest sources, the blocks that dropped most, the proxy's
/// refusals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    pub connections: Vec<SourceConnections>,
    pub drops: Vec<BlockDrops>,
    pub rejections: Vec<RejectionCount>,
}

/// Connections one source holds, as the kernel counts them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceConnections {
    pub source: String,
    pub connections: u64,
}

/// A kernel block and the packets it dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDrops {
    pub net: String,
    /// The block's origin name.
    pub reason: String,
    pub drops: u64,
}

/// Refusals by the proxy for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionCount {
    pub reason: String,
    pub count: u64,
}

/// `reload`: the file read, and the changed settings a restart must put in
/// force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub reloaded: String,
    pub restart_needed: Vec<String>,
}

/// One page of `block list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPage {
    pub blocks: Vec<Entry>,
    /// Where the next page starts; null on the last.
    pub next: Option<ListCursor>,
}

/// A row of `block list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    Block(BlockRow),
    /// A reject list's entry.
    List(BlockRow),
}

impl Entry {
    /// The row, whichever kind it is.
    #[must_use]
    pub const fn row(&self) -> &BlockRow {
        match self {
            Self::Block(row) | Self::List(row) => row,
        }
    }
}

/// A block or a reject list's entry, as `block list` and `block check` show
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRow {
    pub net: String,
    /// The origin name (`manual`, `harvest`, … `reject-list`).
    pub origin: String,
    /// The free text, else the origin (earlier versions had the origin
    /// here); the list's name for a list entry.
    pub reason: String,
    /// The free text; null without one.
    pub comment: Option<String>,
    /// The reject list a list entry is on (`lists.reject` or a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// RFC 3339; null when unknown (list entries, the pinned maps).
    pub since: Option<String>,
    /// RFC 3339; null for an entry without end.
    pub expires: Option<String>,
    /// Absent (as is `in_kernel`) in rows read from the pinned maps, which
    /// do not know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_kernel: Option<bool>,
    /// Packets the kernel dropped; null when the kernel holds no entry for
    /// it, absent when the agent holds too many entries to read each count
    /// (`commands::DROPS_SHOWN_UP_TO`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "absent_or_null"
    )]
    pub drops: Option<Option<u64>>,
    /// The edge host that decided the block, with `[cluster]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `block check`: whether an address is dropped, in words, and everything
/// that covers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCheck {
    pub address: String,
    pub dropped: bool,
    pub verdict: String,
    /// What decides first comes first; allow-list entries last.
    pub matches: Vec<Match>,
}

/// One thing that covers the address `block check` asked about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Match {
    Block(BlockRow),
    /// A reject list's entry.
    List(BlockRow),
    /// A kernel entry the agent did not put there (bpftool, an earlier
    /// run).
    Kernel {
        origin: String,
        expires: Option<String>,
    },
    /// The source holds as many connections as its cap allows.
    Cap {
        connections: u32,
        limit: u32,
        /// The setting that sets the cap.
        source: String,
        reason: String,
    },
    AllowList {
        net: String,
        list: String,
    },
}

/// `block add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAdded {
    pub net: String,
    /// `blocked`, or why the kernel does not hold it.
    pub kernel: String,
    /// Whether the agent stores blocks across restarts.
    pub stored: bool,
}

/// `block del`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRemoved {
    pub net: String,
    /// The reject list that still drops the network, if one does.
    pub still_listed: Option<String>,
}

/// `block import`: one batch's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    pub added: u64,
    pub not_in_kernel: u64,
    /// Entries whose end had passed.
    pub expired: u64,
    /// Entries refused, each with why.
    pub errors: Vec<String>,
}

/// `allow add` and `allow del`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowChanged {
    pub net: String,
    /// Always false: the configuration file is not changed.
    pub persisted: bool,
}

/// `limits show`: the live limits, then the per-network and per-HELO rules
/// (which only a reload changes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitsShown {
    /// Each live limit (`config::LIVE_LIMITS`) by name, its value as the
    /// configuration file writes it: a number, or text for durations and
    /// rates; JSON because their types differ and the CLI only shows them.
    #[serde(flatten)]
    pub live: BTreeMap<String, serde_json::Value>,
    pub source: Vec<SourceLimit>,
    pub helo: Vec<HeloLimit>,
}

/// A `[[limits.source]]` rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLimit {
    pub cidr: String,
    pub max_connections: u32,
}

/// A `[[limits.helo]]` rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeloLimit {
    pub pattern: String,
    pub max_connections: u32,
}

/// `limits set`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSet {
    pub name: String,
    pub value: String,
    /// Always false: the configuration file is not changed.
    pub persisted: bool,
    pub note: String,
}

/// `recipients check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientCheck {
    pub address: String,
    /// The lookup's name (`recipients::Lookup::name`): `known`, `unknown`,
    /// `not-covered` or `no-directory`.
    pub lookup: String,
    /// Whether the proxy refuses the recipient itself.
    pub refused: bool,
}

/// Reads a field that may be absent (`None`), null (`Some(None)`) or a
/// value: serde alone reads absent and null alike.
fn absent_or_null<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::CounterCounts;

    /// Writes `answer`, reads it back, and checks both the text (`want`)
    /// and that it reads back equal.
    #[track_caller]
    fn round_trip<T>(answer: &T, want: &str)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(answer).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(value, want, "{text}");
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), answer, "{text}");
    }

    fn block_row() -> BlockRow {
        BlockRow {
            net: "192.0.2.7/32".into(),
            origin: "manual".into(),
            reason: "ticket 4711".into(),
            comment: Some("ticket 4711".into()),
            list: None,
            since: Some("2026-01-02T03:04:05Z".into()),
            expires: None,
            repeat: Some(2),
            in_kernel: Some(true),
            drops: Some(Some(9)),
            node: Some("edge-1".into()),
        }
    }

    fn list_row() -> BlockRow {
        BlockRow {
            net: "198.51.100.0/24".into(),
            origin: "reject-list".into(),
            reason: "lists.reject".into(),
            comment: None,
            list: Some("lists.reject".into()),
            since: None,
            expires: None,
            repeat: Some(0),
            in_kernel: Some(true),
            drops: Some(None),
            node: None,
        }
    }

    #[test]
    fn stats_round_trip_with_null_and_absent_parts() {
        let mut counts = BTreeMap::new();
        counts.insert("harvest".to_owned(), 3);
        let stats = Stats {
            kernel_status: "attached".into(),
            kernel: Some(BTreeMap::from([("seen".to_owned(), 7)])),
            proxy: Some(ProxyStats {
                sessions_open: 1,
                sessions_total: 2,
                messages: 3,
                backend_errors: 0,
                blocks_issued: 4,
                blocks_active: 5,
                rejections: counts.clone(),
                shed: BTreeMap::new(),
                backend_slots: BackendSlots {
                    capacity: 80,
                    in_use: 1,
                    waiting: 0,
                    waits: 2,
                    timeouts: 0,
                },
                spool: SpoolCounts {
                    spooled: 1,
                    bytes: 512,
                    evicted: 0,
                },
            }),
            recipients: Some(None),
            filters: Some(Some(FilterStats {
                verdicts: counts,
                scanner_errors: BTreeMap::new(),
            })),
            cluster: Some(Some(ClusterCounts {
                up: true,
                node: "mx1".into(),
                published: 1,
                applied: 2,
                observed: 0,
                dropped: 0,
                refused: 0,
                queued: 0,
                counters: Some(CounterCounts {
                    up: false,
                    sent: 3,
                    dropped: 1,
                    crossed: 0,
                    commands: 3,
                    queued: 0,
                }),
            })),
        };
        round_trip(
            &stats,
            r#"{"kernel_status":"attached","kernel":{"seen":7},
                "proxy":{"sessions_open":1,"sessions_total":2,"messages":3,"backend_errors":0,
                  "blocks_issued":4,"blocks_active":5,"rejections":{"harvest":3},"shed":{},
                  "backend_slots":{"capacity":80,"in_use":1,"waiting":0,"waits":2,"timeouts":0},
                  "spool":{"spooled":1,"bytes":512,"evicted":0}},
                "recipients":null,
                "filters":{"verdicts":{"harvest":3},"scanner_errors":{}},
                "cluster":{"state":"up","node":"mx1","published":1,"applied":2,"observed":0,
                  "dropped":0,"refused":0,"queued":0,"counters":{"state":"down","sent":3,
                  "dropped":1,"crossed":0,"commands":3,"queued":0}}}"#,
        );
        // From the pinned maps: no proxy, the optional parts left out.
        let pinned = Stats {
            kernel_status: "pinned".into(),
            kernel: Some(BTreeMap::new()),
            proxy: None,
            recipients: None,
            filters: None,
            cluster: None,
        };
        round_trip(
            &pinned,
            r#"{"kernel_status":"pinned","kernel":{},"proxy":null}"#,
        );
    }

    #[test]
    fn top_and_reload_round_trip() {
        round_trip(
            &Top {
                connections: vec![SourceConnections {
                    source: "192.0.2.0/24".into(),
                    connections: 4,
                }],
                drops: vec![BlockDrops {
                    net: "192.0.2.7/32".into(),
                    reason: "auth".into(),
                    drops: 10,
                }],
                rejections: vec![RejectionCount {
                    reason: "harvest".into(),
                    count: 2,
                }],
            },
            r#"{"connections":[{"source":"192.0.2.0/24","connections":4}],
                "drops":[{"net":"192.0.2.7/32","reason":"auth","drops":10}],
                "rejections":[{"reason":"harvest","count":2}]}"#,
        );
        round_trip(
            &Reloaded {
                reloaded: "/etc/smtp-limiter/smtp-limiter.toml".into(),
                restart_needed: vec!["smtp.max_sessions".into()],
            },
            r#"{"reloaded":"/etc/smtp-limiter/smtp-limiter.toml","restart_needed":["smtp.max_sessions"]}"#,
        );
    }

    #[test]
    fn block_pages_round_trip_with_drops_null_or_absent() {
        let mut unknown_drops = block_row();
        unknown_drops.drops = None;
        unknown_drops.node = None;
        round_trip(
            &BlockPage {
                blocks: vec![
                    Entry::List(list_row()),
                    Entry::Block(block_row()),
                    Entry::Block(unknown_drops),
                ],
                next: Some(ListCursor {
                    expires_ns: Some(5),
                    net: "192.0.2.7/32".into(),
                }),
            },
            r#"{"blocks":[
                {"kind":"list","net":"198.51.100.0/24","origin":"reject-list","reason":"lists.reject",
                 "comment":null,"list":"lists.reject","since":null,"expires":null,"repeat":0,
                 "in_kernel":true,"drops":null},
                {"kind":"block","net":"192.0.2.7/32","origin":"manual","reason":"ticket 4711",
                 "comment":"ticket 4711","since":"2026-01-02T03:04:05Z","expires":null,"repeat":2,
                 "in_kernel":true,"drops":9,"node":"edge-1"},
                {"kind":"block","net":"192.0.2.7/32","origin":"manual","reason":"ticket 4711",
                 "comment":"ticket 4711","since":"2026-01-02T03:04:05Z","expires":null,"repeat":2,
                 "in_kernel":true}],
               "next":{"expires_ns":5,"net":"192.0.2.7/32"}}"#,
        );
        // A row from the pinned maps: no repeat, no in_kernel.
        let pinned = BlockRow {
            net: "192.0.2.9/32".into(),
            origin: "auth".into(),
            reason: "auth".into(),
            comment: None,
            list: None,
            since: None,
            expires: Some("2026-01-02T03:04:05Z".into()),
            repeat: None,
            in_kernel: None,
            drops: Some(Some(0)),
            node: None,
        };
        round_trip(
            &BlockPage {
                blocks: vec![Entry::Block(pinned)],
                next: None,
            },
            r#"{"blocks":[{"kind":"block","net":"192.0.2.9/32","origin":"auth","reason":"auth",
                "comment":null,"since":null,"expires":"2026-01-02T03:04:05Z","drops":0}],"next":null}"#,
        );
    }

    #[test]
    fn block_check_round_trips_every_kind_of_match() {
        let mut row = block_row();
        row.drops = None;
        row.node = None;
        row.comment = None;
        round_trip(
            &BlockCheck {
                address: "192.0.2.7".into(),
                dropped: true,
                verdict: "dropped: …".into(),
                matches: vec![
                    Match::Block(row),
                    Match::List(list_row()),
                    Match::Kernel {
                        origin: "flood".into(),
                        expires: None,
                    },
                    Match::Cap {
                        connections: 10,
                        limit: 10,
                        source: "limits.max_connections_per_source".into(),
                        reason: "holds 10 of 10 connections: new ones are dropped".into(),
                    },
                    Match::AllowList {
                        net: "192.0.2.0/24".into(),
                        list: "lists.allow".into(),
                    },
                ],
            },
            r#"{"address":"192.0.2.7","dropped":true,"verdict":"dropped: …","matches":[
                {"kind":"block","net":"192.0.2.7/32","origin":"manual","reason":"ticket 4711",
                 "comment":null,"since":"2026-01-02T03:04:05Z","expires":null,"repeat":2,"in_kernel":true},
                {"kind":"list","net":"198.51.100.0/24","origin":"reject-list","reason":"lists.reject",
                 "comment":null,"list":"lists.reject","since":null,"expires":null,"repeat":0,
                 "in_kernel":true,"drops":null},
                {"kind":"kernel","origin":"flood","expires":null},
                {"kind":"cap","connections":10,"limit":10,"source":"limits.max_connections_per_source",
                 "reason":"holds 10 of 10 connections: new ones are dropped"},
                {"kind":"allow-list","net":"192.0.2.0/24","list":"lists.allow"}]}"#,
        );
    }

    #[test]
    fn changes_round_trip() {
        round_trip(
            &BlockAdded {
                net: "192.0.2.7/32".into(),
                kernel: "blocked".into(),
                stored: true,
            },
            r#"{"net":"192.0.2.7/32","kernel":"blocked","stored":true}"#,
        );
        round_trip(
            &BlockRemoved {
                net: "192.0.2.7/32".into(),
                still_listed: None,
            },
            r#"{"net":"192.0.2.7/32","still_listed":null}"#,
        );
        round_trip(
            &BlockRemoved {
                net: "198.51.100.0/24".into(),
                still_listed: Some("lists.reject".into()),
            },
            r#"{"net":"198.51.100.0/24","still_listed":"lists.reject"}"#,
        );
        round_trip(
            &Imported {
                added: 2,
                not_in_kernel: 1,
                expired: 0,
                errors: vec!["x: bad".into()],
            },
            r#"{"added":2,"not_in_kernel":1,"expired":0,"errors":["x: bad"]}"#,
        );
        round_trip(
            &AllowChanged {
                net: "10.0.0.0/8".into(),
                persisted: false,
            },
            r#"{"net":"10.0.0.0/8","persisted":false}"#,
        );
        round_trip(&vec!["10.0.0.0/8".to_owned()], r#"["10.0.0.0/8"]"#);
        round_trip(
            &LimitSet {
                name: "max_failed_rcpt".into(),
                value: "3".into(),
                persisted: false,
                note: "live only".into(),
            },
            r#"{"name":"max_failed_rcpt","value":"3","persisted":false,"note":"live only"}"#,
        );
        round_trip(
            &RecipientCheck {
                address: "alice@example.com".into(),
                lookup: "not-covered".into(),
                refused: false,
            },
            r#"{"address":"alice@example.com","lookup":"not-covered","refused":false}"#,
        );
    }

    #[test]
    fn limits_show_keeps_the_live_limits_beside_the_rules() {
        round_trip(
            &LimitsShown {
                live: BTreeMap::from([
                    ("max_failed_rcpt".to_owned(), serde_json::json!(5)),
                    ("block_duration".to_owned(), serde_json::json!("30m")),
                ]),
                source: vec![SourceLimit {
                    cidr: "192.0.2.0/24".into(),
                    max_connections: 3,
                }],
                helo: vec![HeloLimit {
                    pattern: "*.example".into(),
                    max_connections: 1,
                }],
            },
            r#"{"max_failed_rcpt":5,"block_duration":"30m",
                "source":[{"cidr":"192.0.2.0/24","max_connections":3}],
                "helo":[{"pattern":"*.example","max_connections":1}]}"#,
        );
    }

    #[test]
    fn answers_are_written_as_their_own_json() {
        let answer = Answer::AllowChange(AllowChanged {
            net: "10.0.0.0/8".into(),
            persisted: false,
        });
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"net":"10.0.0.0/8","persisted":false}"#
        );
    }
}
