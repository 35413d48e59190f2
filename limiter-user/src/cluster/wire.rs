//! What travels through Redis: block and unblock events (stream entries'
//! fields) and active entries (the hash's values), and their parsers.
//! Another agent, an old version or anyone with write access to Redis may
//! have written them: everything is checked, nothing panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use limiter_common::Reason;

use crate::commands::MAX_COMMENT;
use crate::config::MAX_CLUSTER_NAME;

/// A change of the cluster's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `net` blocked by `node` until `expires` (unix seconds, wall clock:
    /// every host ends the block at the same moment); `None`: until removed.
    /// `repeat`: the source's backoff level (0 for a first block), so that
    /// every host escalates its next block of the source from there.
    Block {
        net: IpNet,
        /// On the wire as field `reason`, by name.
        origin: Reason,
        node: String,
        expires: Option<u64>,
        comment: Option<String>,
        repeat: u32,
    },
    /// `net` released by `node`.
    Unblock { net: IpNet, node: String },
}

/// Why an entry was skipped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("field {0:?} missing")]
    Missing(&'static str),
    #[error("field {field:?}: {value:?} {why}")]
    Bad {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

fn bad(field: &'static str, value: &[u8], why: &'static str) -> WireError {
    WireError::Bad {
        field,
        value: String::from_utf8_lossy(&value[..value.len().min(80)]).into_owned(),
        why,
    }
}

/// Highest backoff level read from Redis (far past any block duration's
/// growth to `limits.max_block_duration`).
pub const MAX_REPEAT: u32 = 1000;

/// Unix seconds of a wall-clock time (0 before the epoch).
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Event {
    pub fn net(&self) -> IpNet {
        match self {
            Event::Block { net, .. } | Event::Unblock { net, .. } => *net,
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Event::Block { node, .. } | Event::Unblock { node, .. } => node,
        }
    }

    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Event::Block {
                net,
                origin,
                node,
                expires,
                comment,
                repeat,
            } => vec![
                ("kind", "block".to_owned()),
                ("net", net.to_string()),
                ("reason", origin.name().to_owned()),
                ("node", node.clone()),
                (
                    "expires",
                    expires.map_or("never".to_owned(), |e| e.to_string()),
                ),
                ("comment", comment.clone().unwrap_or_default()),
                ("repeat", repeat.to_string()),
            ],
            Event::Unblock { net, node } => vec![
                ("kind", "unblock".to_owned()),
                ("net", net.to_string()),
                ("node", node.clone()),
            ],
        }
    }

    /// The `{prefix}:active` hash's value for a block (the net is the
    /// hash's field): the stream fields but `kind` and `net`, as JSON.
    pub fn active_value(&self) -> Option<String> {
        let Event::Block {
            origin,
            node,
            expires,
            comment,
            repeat,
            ..
        } = self
        else {
            return None;
        };
        Some(
            serde_json::json!({
                "reason": origin.name(),
                "node": node,
                "expires": expires.map_or("never".to_owned(), |e| e.to_string()),
                "comment": comment.as_deref().unwrap_or(""),
                "repeat": repeat.to_string(),
            })
            .to_string(),
        )
    }

    /// Parses a stream entry's fields (field, value) pairs.
    ///
    /// # Errors
    /// A field missing or malformed.
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Event, WireError> {
        let mut kind = None;
        let mut get = Fields::default();
        for (name, value) in fields {
            match name {
                b"kind" => kind = Some(value),
                b"net" => get.net = Some(value),
                b"reason" => get.reason = Some(value),
                b"node" => get.node = Some(value),
                b"expires" => get.expires = Some(value),
                b"comment" => get.comment = Some(value),
                b"repeat" => get.repeat = Some(value),
                // Fields of later versions are ignored.
                _ => {}
            }
        }
        match kind.ok_or(WireError::Missing("kind"))? {
            b"block" => get.block(),
            b"unblock" => Ok(Event::Unblock {
                net: parse_net(get.net)?,
                node: parse_node(get.node)?,
            }),
            other => Err(bad("kind", other, "is neither block nor unblock")),
        }
    }

    /// Parses a `{prefix}:active` hash entry.
    ///
    /// # Errors
    /// The net or the JSON value malformed.
    pub fn from_active(net: &[u8], value: &[u8]) -> Result<Event, WireError> {
        let json: serde_json::Value =
            serde_json::from_slice(value).map_err(|_| bad("active", value, "is not JSON"))?;
        let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::as_bytes);
        Fields {
            net: Some(net),
            reason: text("reason"),
            node: text("node"),
            expires: text("expires"),
            comment: text("comment"),
            repeat: text("repeat"),
        }
        .block()
    }
}

/// The raw values of a block's fields.
#[derive(Default)]
struct Fields<'a> {
    net: Option<&'a [u8]>,
    reason: Option<&'a [u8]>,
    node: Option<&'a [u8]>,
    expires: Option<&'a [u8]>,
    comment: Option<&'a [u8]>,
    /// Absent in entries of earlier versions: a first block.
    repeat: Option<&'a [u8]>,
}

impl Fields<'_> {
    fn block(self) -> Result<Event, WireError> {
        let reason_text = self.reason.ok_or(WireError::Missing("reason"))?;
        let origin = std::str::from_utf8(reason_text)
            .ok()
            .and_then(Reason::from_name)
            .ok_or_else(|| bad("reason", reason_text, "is no known origin"))?;
        let expires_text = self.expires.ok_or(WireError::Missing("expires"))?;
        let expires = match expires_text {
            b"never" => None,
            digits => Some(
                std::str::from_utf8(digits)
                    .ok()
                    .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u64>().ok())
                    .ok_or_else(|| bad("expires", digits, "is not unix seconds or never"))?,
            ),
        };
        let comment = match self.comment {
            None | Some(b"") => None,
            Some(text) => {
                let text =
                    std::str::from_utf8(text).map_err(|_| bad("comment", text, "is not UTF-8"))?;
                if text.chars().count() > MAX_COMMENT {
                    return Err(bad("comment", text.as_bytes(), "is too long"));
                }
                Some(
                    text.chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect(),
                )
            }
        };
        let repeat = match self.repeat {
            None => 0,
            Some(digits) => std::str::from_utf8(digits)
                .ok()
                .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u32>().ok())
                .filter(|r| *r <= MAX_REPEAT)
                .ok_or_else(|| bad("repeat", digits, "is not a backoff level"))?,
        };
        Ok(Event::Block {
            net: parse_net(self.net)?,
            origin,
            node: parse_node(self.node)?,
            expires,
            comment,
            repeat,
        })
    }
}

fn parse_net(value: Option<&[u8]>) -> Result<IpNet, WireError> {
    let value = value.ok_or(WireError::Missing("net"))?;
    let net: IpNet = std::str::from_utf8(value)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("net", value, "is not a network"))?;
    if net != net.trunc() {
        return Err(bad("net", value, "has host bits set"));
    }
    Ok(net)
}

pub(super) fn parse_node(value: Option<&[u8]>) -> Result<String, WireError> {
    let value = value.ok_or(WireError::Missing("node"))?;
    std::str::from_utf8(value)
        .ok()
        .filter(|n| {
            !n.is_empty()
                && n.len() <= MAX_CLUSTER_NAME
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        })
        .map(str::to_owned)
        .ok_or_else(|| bad("node", value, "is not a node name"))
}

/// Why a well-formed block is not applied here.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("blocks every address")]
    Everything,
    #[error("overlaps the allow-listed {0}")]
    Allowed(IpNet),
    #[error("already expired")]
    Expired,
}

/// The end a block from the cluster gets here: its own, at most
/// `max_duration` from `now` (a block "until removed" too, so that a
/// forgotten entry in Redis cannot hold a source forever).
///
/// # Errors
/// The block would cover everything or an allow-listed source, or has
/// ended.
pub fn admit(
    net: IpNet,
    expires: Option<u64>,
    allow: &[IpNet],
    max_duration: Duration,
    now: SystemTime,
) -> Result<SystemTime, Refusal> {
    if net.prefix_len() == 0 {
        return Err(Refusal::Everything);
    }
    if let Some(allowed) = allow.iter().find(|a| a.contains(&net) || net.contains(*a)) {
        return Err(Refusal::Allowed(*allowed));
    }
    let latest = now + max_duration;
    match expires {
        None => Ok(latest),
        Some(at) => {
            let at = UNIX_EPOCH + Duration::from_secs(at.min(unix_seconds(latest)));
            if at <= now {
                Err(Refusal::Expired)
            } else {
                Ok(at)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Event {
        Event::Block {
            net: "192.0.2.0/24".parse().unwrap(),
            origin: Reason::Harvest,
            node: "mx1".into(),
            expires: Some(1_900_000_000),
            comment: Some("ticket 4711".into()),
            repeat: 2,
        }
    }

    fn parse(fields: &[(&str, &str)]) -> Result<Event, WireError> {
        Event::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn events_round_trip() {
        let unblock = Event::Unblock {
            net: "2001:db8::/48".parse().unwrap(),
            node: "mx-2".into(),
        };
        let permanent = Event::Block {
            net: "198.51.100.7/32".parse().unwrap(),
            origin: Reason::Manual,
            node: "a".into(),
            expires: None,
            comment: None,
            repeat: 0,
        };
        for event in [block(), unblock, permanent.clone()] {
            let fields = event.fields();
            let again =
                Event::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
            assert_eq!(again, Ok(event.clone()));
        }
        for event in [block(), permanent] {
            let value = event.active_value().unwrap();
            let net = event.net().to_string();
            assert_eq!(
                Event::from_active(net.as_bytes(), value.as_bytes()),
                Ok(event)
            );
        }
    }

    #[test]
    fn malformed_entries_are_refused_naming_the_field() {
        let good = block().fields();
        let with = |field: &str, value: &str| {
            let mut f: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
            f.retain(|(k, _)| *k != field);
            if !value.is_empty() {
                f.push((field, value));
            }
            parse(&f)
        };
        for (field, value) in [
            ("kind", "explode"),
            ("net", "not-a-net"),
            ("net", "192.0.2.1/24"),
            ("net", "300.0.0.0/8"),
            ("reason", "whim"),
            ("node", "has space"),
            ("node", &"n".repeat(65)),
            ("expires", "-1"),
            ("expires", "+5"),
            ("expires", "99999999999999999999999"),
            ("comment", &"x".repeat(MAX_COMMENT + 1)),
            ("repeat", "-1"),
            ("repeat", "1001"),
            ("repeat", "two"),
        ] {
            let err = with(field, value).unwrap_err();
            assert!(err.to_string().contains(field), "{field}={value}: {err}");
        }
        for field in ["kind", "net", "reason", "node", "expires"] {
            assert_eq!(with(field, ""), Err(WireError::Missing(field)));
        }
        assert!(Event::from_active(b"192.0.2.0/24", b"{nope").is_err());
        assert!(Event::from_active(b"192.0.2.0/24", b"[]").is_err());
        assert!(Event::from_active(
            b"\xff",
            br#"{"reason":"manual","node":"a","expires":"never"}"#
        )
        .is_err());
        // An entry of an earlier version, without a level: a first block.
        assert!(matches!(
            with("repeat", ""),
            Ok(Event::Block { repeat: 0, .. })
        ));
        assert!(matches!(
            Event::from_active(
                b"192.0.2.0/24",
                br#"{"reason":"harvest","node":"a","expires":"never"}"#
            ),
            Ok(Event::Block { repeat: 0, .. })
        ));
        // Control characters in a comment do not reach logs or listings.
        let f = with("comment", "a\nb");
        assert!(matches!(f, Ok(Event::Block { comment: Some(c), .. }) if c == "a b"));
    }

    #[test]
    fn admit_refuses_everything_allowed_and_ended_and_bounds_the_rest() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let week = Duration::from_secs(7 * 86_400);
        let allow: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ];
        let admit = |net: &str, expires| admit(net.parse().unwrap(), expires, &allow, week, now);
        assert_eq!(admit("0.0.0.0/0", None), Err(Refusal::Everything));
        assert_eq!(admit("::/0", Some(1_000_100)), Err(Refusal::Everything));
        assert!(matches!(
            admit("10.1.0.0/16", None),
            Err(Refusal::Allowed(_))
        ));
        assert!(matches!(
            admit("192.0.2.0/24", None),
            Err(Refusal::Allowed(_))
        ));
        assert!(matches!(admit("8.0.0.0/5", None), Err(Refusal::Allowed(_))));
        assert_eq!(
            admit("198.51.100.0/24", Some(999_999)),
            Err(Refusal::Expired)
        );
        assert_eq!(
            admit("198.51.100.0/24", Some(1_000_100)),
            Ok(UNIX_EPOCH + Duration::from_secs(1_000_100))
        );
        assert_eq!(admit("198.51.100.0/24", None), Ok(now + week));
        assert_eq!(admit("198.51.100.0/24", Some(u64::MAX)), Ok(now + week));
    }
}
