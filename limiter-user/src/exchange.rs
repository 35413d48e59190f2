//! Block lists in and out (`block import`, `block export`), in three
//! formats, chosen with `--format` or by the file's extension:
//!
//! * `plain`: one address or CIDR a line, `#` comments, as list files
//!   ([`crate::lists::parse_plain`]); what `fail2ban-client get JAIL banip`
//!   prints once its addresses are one a line, and CrowdSec's `values`.
//! * `csv`: a header line naming the columns, then one block a line. The
//!   columns are CrowdSec's (`cscli decisions import`): `value` (the address
//!   or CIDR; required), `duration` (`4h`, `3h59m12.5s`), `reason` (free
//!   text), `origin`, `scope` (`ip` or `range`), `type` (`ban`), and ours:
//!   `expires` and `since` (RFC 3339). Unknown columns are ignored.
//! * `json`: an array of objects with the same keys (CrowdSec's import
//!   format), e.g. `[{"value": "192.0.2.7", "duration": "4h", "reason":
//!   "ssh brute force"}]`.
//!
//! Mapping on import: `origin` is ours (manual, harvest, auth, flood,
//! reject-list, relay, filter, network) when it names one of our origins; another
//! origin (CrowdSec's `crowdsec`, `cscli`, `CAPI`, `lists`) is kept in front
//! of the reason, `[CAPI] crowdsecurity/ssh-bf`. A reason that is exactly one
//! of our origin names is that origin. `expires` wins over `duration`;
//! neither means the command line's `--for`, or no end. Decisions of another
//! `type` than `ban` (captcha, throttle) and of another `scope` than an
//! address or range are skipped and counted; entries already expired too.
//!
//! Export writes the same columns, so that our CSV and JSON import again
//! here (origin, reason, expiry and start kept) and into CrowdSec
//! (`duration` is what is left of the block; a block without end has an
//! empty duration, which CrowdSec fills with its default).

use std::{
    collections::HashMap,
    fmt,
    io::{self, Write},
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use limiter_common::Reason;
use serde_json::Value;

use crate::lists::{parse_plain, LineError};

/// A block list format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Plain,
    Csv,
    Json,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "plain" | "values" | "txt" => Ok(Self::Plain),
            "csv" => Ok(Self::Csv),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown format {other:?}: use plain, csv or json")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Csv => "csv",
            Self::Json => "json",
        })
    }
}

impl Format {
    /// The format a file name's extension says (`.csv`, `.json`), plain
    /// otherwise.
    pub fn of_path(path: &std::path::Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Self::Csv,
            Some("json") => Self::Json,
            _ => Self::Plain,
        }
    }
}

/// When an imported block ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// At this Unix second.
    At(u64),
    /// This long after the import.
    In(Duration),
}

/// A block read from a list, before the command line's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub net: IpNet,
    /// One of `limiter_common::reason`, if the row names one of ours.
    pub origin: Option<Reason>,
    /// Free text.
    pub reason: Option<String>,
    pub expires: Option<Expiry>,
    pub since_unix: Option<u64>,
    /// 1-based line (plain, CSV) or element (JSON) it came from.
    pub line: usize,
}

/// What a list held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub blocks: Vec<Imported>,
    /// Entries deliberately left out, with why (`line N: type captcha`).
    pub skipped: Vec<String>,
}

/// Reads a block list.
///
/// # Errors
/// Every bad line (or element), with its number; nothing is imported then.
pub fn parse(text: &str, format: Format, now: SystemTime) -> Result<Parsed, Vec<LineError>> {
    match format {
        Format::Plain => {
            let (entries, errors) = parse_plain(text);
            if !errors.is_empty() {
                return Err(errors);
            }
            Ok(Parsed {
                blocks: entries
                    .into_iter()
                    .map(|e| Imported {
                        net: e.net,
                        origin: None,
                        reason: None,
                        expires: None,
                        since_unix: None,
                        line: e.line,
                    })
                    .collect(),
                skipped: Vec::new(),
            })
        }
        Format::Csv => rows(csv_records(text)?, now),
        Format::Json => {
            let value: Value = serde_json::from_str(text).map_err(|e| {
                vec![LineError {
                    line: e.line(),
                    message: format!("not JSON: {e}"),
                }]
            })?;
            let Value::Array(items) = value else {
                return Err(vec![LineError {
                    line: 1,
                    message: "expected an array of objects ([{\"value\": \"192.0.2.7\", …}])"
                        .into(),
                }]);
            };
            let mut records = Vec::with_capacity(items.len());
            let mut errors = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let Value::Object(map) = item else {
                    errors.push(LineError {
                        line: i + 1,
                        message: format!("element {}: expected an object", i + 1),
                    });
                    continue;
                };
                let fields = map
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let text = match v {
                            Value::String(s) => s,
                            Value::Null => return None,
                            other => other.to_string(),
                        };
                        Some((k.to_ascii_lowercase(), text))
                    })
                    .collect();
                records.push((i + 1, fields));
            }
            if !errors.is_empty() {
                return Err(errors);
            }
            rows(records, now)
        }
    }
}

/// A row: its number and its fields by lower-case column name.
type Record = (usize, HashMap<String, String>);

/// Turns rows of named fields (CSV, JSON) into blocks.
fn rows(records: Vec<Record>, now: SystemTime) -> Result<Parsed, Vec<LineError>> {
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for (line, fields) in records {
        match row(&fields, now_unix) {
            Ok(Row::Block(mut block)) => {
                block.line = line;
                parsed.blocks.push(block);
            }
            Ok(Row::Skip(why)) => parsed.skipped.push(format!("line {line}: {why}")),
            Err(message) => errors.push(LineError { line, message }),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

enum Row {
    Block(Imported),
    Skip(String),
}

fn row(fields: &HashMap<String, String>, now_unix: u64) -> Result<Row, String> {
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let value = field("value")
        .or_else(|| field("net"))
        .ok_or("no value (the address or CIDR; column \"value\")")?;
    if let Some(kind) = field("type") {
        if !kind.eq_ignore_ascii_case("ban") {
            return Ok(Row::Skip(format!(
                "type {kind} (only ban decisions are blocks)"
            )));
        }
    }
    if let Some(scope) = field("scope") {
        if !["ip", "range"].contains(&scope.to_ascii_lowercase().as_str()) {
            return Ok(Row::Skip(format!("scope {scope} (only ip and range)")));
        }
    }
    let net = crate::config::parse_cidr(value)?;
    let (origin, reason) = origin_and_reason(field("origin"), field("reason"));
    let expires = match (field("expires"), field("duration")) {
        (Some(at), _) if at.eq_ignore_ascii_case("never") => None,
        (Some(at), _) => {
            let at = humantime::parse_rfc3339_weak(at).map_err(|e| {
                format!("expires {at:?}: {e} (expected RFC 3339, e.g. 2030-01-31T12:00:00Z)")
            })?;
            Some(Expiry::At(
                at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            ))
        }
        (None, Some(d)) => match parse_duration(d)? {
            Some(d) => Some(Expiry::In(d)),
            None => return Ok(Row::Skip(format!("duration {d} (already over)"))),
        },
        (None, None) => None,
    };
    if let Some(Expiry::At(at)) = expires {
        if at <= now_unix {
            return Ok(Row::Skip("already expired".into()));
        }
    }
    let since_unix = match field("since") {
        Some(s) => Some(
            humantime::parse_rfc3339_weak(s)
                .map_err(|e| format!("since {s:?}: {e}"))?
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        None => None,
    };
    Ok(Row::Block(Imported {
        net,
        origin,
        reason,
        expires,
        since_unix,
        line: 0,
    }))
}

/// Our origin code and the free text of a row's `origin` and `reason`.
pub fn origin_and_reason(
    origin: Option<&str>,
    text: Option<&str>,
) -> (Option<Reason>, Option<String>) {
    let ours = origin.and_then(Reason::from_name);
    let foreign = origin.filter(|_| ours.is_none());
    match (ours, text.and_then(Reason::from_name)) {
        // The reason names an origin and nothing contradicts it.
        (None, Some(code)) if foreign.is_none() => (Some(code), None),
        (Some(code), Some(same)) if code == same => (Some(code), None),
        _ => {
            let comment = match (foreign, text) {
                (Some(f), Some(t)) => Some(format!("[{f}] {t}")),
                (Some(f), None) => Some(format!("[{f}]")),
                (None, Some(t)) => Some(t.to_owned()),
                (None, None) => None,
            };
            (ours, comment)
        }
    }
}

/// A duration as humantime writes it (`4h`, `1h 30m`) or as Go does
/// (`3h59m12.345s`, what CrowdSec prints); `None` for a negative one (an
/// expired decision).
///
/// # Errors
/// Neither form.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Ok(None);
    }
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(Some(d));
    }
    go_duration(text)
        .map(Some)
        .ok_or_else(|| format!("duration {text:?}: expected e.g. 4h, 30m, 1h30m or 3h59m12.5s"))
}

fn go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    (total.is_finite() && total < 1e15).then(|| Duration::from_secs_f64(total))
}

/// Parses CSV (RFC 4180: quoted fields, doubled quotes, CRLF) with a header
/// line into rows of named fields.
fn csv_records(text: &str) -> Result<Vec<Record>, Vec<LineError>> {
    let mut lines = csv_rows(text)?;
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let (_, header) = lines.remove(0);
    let names: Vec<String> = header
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    if !names.iter().any(|n| n == "value" || n == "net") {
        return Err(vec![LineError {
            line: 1,
            message: format!(
                "the header line names no \"value\" column (found {}); a CSV list starts with a header such as value,duration,reason",
                header.join(",")
            ),
        }]);
    }
    Ok(lines
        .into_iter()
        .filter(|(_, cells)| cells.iter().any(|c| !c.trim().is_empty()))
        .map(|(line, cells)| {
            let fields = names
                .iter()
                .cloned()
                .zip(cells)
                .collect::<HashMap<String, String>>();
            (line, fields)
        })
        .collect())
}

/// CSV rows with the line each starts on.
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, Vec<LineError>> {
    let mut rows = Vec::new();
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                cell.push(c);
            }
            (false, '"') if cell.trim().is_empty() => {
                cell.clear();
                quoted = true;
            }
            (false, ',') => cells.push(std::mem::take(&mut cell)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                cells.push(std::mem::take(&mut cell));
                rows.push((start, std::mem::take(&mut cells)));
                line += 1;
                start = line;
            }
            (false, c) => cell.push(c),
        }
    }
    if quoted {
        return Err(vec![LineError {
            line: start,
            message: "a quoted field is not closed".into(),
        }]);
    }
    if !cell.is_empty() || !cells.is_empty() {
        cells.push(cell);
        rows.push((start, cells));
    }
    Ok(rows)
}

/// A block as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    pub net: IpNet,
    /// Our origin name.
    pub origin: String,
    /// Free text, if any.
    pub reason: Option<String>,
    pub expires: Option<SystemTime>,
    pub since: Option<SystemTime>,
}

/// The columns of a CSV export, in order.
pub const CSV_COLUMNS: [&str; 8] = [
    "value", "scope", "type", "origin", "reason", "duration", "expires", "since",
];

/// Writes blocks in a format; the plain format is one network a line.
///
/// # Errors
/// Writing failed.
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    now: SystemTime,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// Starts an export (the CSV header, the JSON array's bracket).
    ///
    /// # Errors
    /// Writing failed.
    pub fn new(mut out: W, format: Format, now: SystemTime) -> io::Result<Self> {
        match format {
            Format::Csv => writeln!(out, "{}", CSV_COLUMNS.join(","))?,
            Format::Json => write!(out, "[")?,
            Format::Plain => {}
        }
        Ok(Self {
            out,
            format,
            now,
            written: 0,
        })
    }

    /// Writes one block.
    ///
    /// # Errors
    /// Writing failed.
    pub fn write(&mut self, block: &Exported) -> io::Result<()> {
        let scope = if block.net.prefix_len() == block.net.max_prefix_len() {
            "ip"
        } else {
            "range"
        };
        let value = if scope == "ip" {
            block.net.addr().to_string()
        } else {
            block.net.to_string()
        };
        let duration = block
            .expires
            .map(|t| {
                let left = t.duration_since(self.now).unwrap_or_default();
                humantime::format_duration(Duration::from_secs(left.as_secs()))
                    .to_string()
                    .replace(' ', "")
            })
            .unwrap_or_default();
        let time = |t: Option<SystemTime>| {
            t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default()
        };
        let reason = block.reason.clone().unwrap_or_default();
        match self.format {
            Format::Plain => writeln!(self.out, "{value}")?,
            Format::Csv => {
                let cells = [
                    value,
                    scope.to_owned(),
                    "ban".to_owned(),
                    block.origin.clone(),
                    reason,
                    duration,
                    time(block.expires),
                    time(block.since),
                ];
                let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                writeln!(self.out, "{}", line.join(","))?;
            }
            Format::Json => {
                let object = serde_json::json!({
                    "value": value,
                    "scope": scope,
                    "type": "ban",
                    "origin": block.origin,
                    "reason": reason,
                    "duration": duration,
                    "expires": block.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "since": block.since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                });
                let sep = if self.written == 0 { "\n" } else { ",\n" };
                write!(self.out, "{sep}  {object}")?;
            }
        }
        self.written += 1;
        Ok(())
    }

    /// Ends the export; returns how many blocks were written.
    ///
    /// # Errors
    /// Writing failed.
    pub fn finish(mut self) -> io::Result<u64> {
        if self.format == Format::Json {
            writeln!(self.out, "{}]", if self.written == 0 { "" } else { "\n" })?;
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn formats_by_name_and_extension() {
        assert_eq!("CSV".parse::<Format>(), Ok(Format::Csv));
        assert_eq!("values".parse::<Format>(), Ok(Format::Plain));
        assert!("xml"
            .parse::<Format>()
            .unwrap_err()
            .contains("plain, csv or json"));
        assert_eq!(Format::of_path("a/b.JSON".as_ref()), Format::Json);
        assert_eq!(Format::of_path("a/b.csv".as_ref()), Format::Csv);
        assert_eq!(Format::of_path("reject.cidr".as_ref()), Format::Plain);
    }

    #[test]
    fn crowdsec_csv_imports_with_the_mapping() {
        // As `cscli decisions import` takes it, with quotes and CRLF.
        let text = "duration,scope,value,reason,origin,type\r\n\
            24h,ip,192.0.2.7,\"ssh, brute force\",CAPI,ban\r\n\
            4h,range,198.51.100.0/24,harvest,,\r\n\
            1h,ip,192.0.2.8,\"said \"\"hi\"\"\",auth,ban\r\n\
            1h,ip,192.0.2.9,,,captcha\r\n\
            1h,username,bob,,,ban\r\n\
            -5m,ip,192.0.2.10,,,ban\r\n\
            \r\n";
        let parsed = parse(text, Format::Csv, now()).unwrap();
        // (network, origin, reason, expiry, line)
        type Row<'a> = (
            String,
            Option<Reason>,
            Option<&'a str>,
            Option<Expiry>,
            usize,
        );
        let got: Vec<Row> = parsed
            .blocks
            .iter()
            .map(|b| {
                (
                    b.net.to_string(),
                    b.origin,
                    b.reason.as_deref(),
                    b.expires,
                    b.line,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "192.0.2.7/32".to_owned(),
                    None,
                    Some("[CAPI] ssh, brute force"),
                    Some(Expiry::In(Duration::from_secs(86_400))),
                    2
                ),
                (
                    "198.51.100.0/24".to_owned(),
                    Some(Reason::Harvest),
                    None,
                    Some(Expiry::In(Duration::from_secs(14_400))),
                    3
                ),
                (
                    "192.0.2.8/32".to_owned(),
                    Some(Reason::Auth),
                    Some("said \"hi\""),
                    Some(Expiry::In(Duration::from_secs(3600))),
                    4
                ),
            ]
        );
        assert_eq!(parsed.skipped.len(), 3, "{:?}", parsed.skipped);
        assert!(
            parsed.skipped[0].starts_with("line 5: type captcha"),
            "{:?}",
            parsed.skipped
        );
        assert!(
            parsed.skipped[1].contains("scope username"),
            "{:?}",
            parsed.skipped
        );
        assert!(
            parsed.skipped[2].contains("already over"),
            "{:?}",
            parsed.skipped
        );
    }

    #[test]
    fn csv_errors_name_their_lines() {
        let errors = parse(
            "value,duration\n192.0.2.1,4h\nnope,4h\n192.0.2.2,soon\n",
            Format::Csv,
            now(),
        )
        .unwrap_err();
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [3, 4]);
        assert!(
            errors[1].message.contains("duration \"soon\""),
            "{errors:?}"
        );
        let errors = parse("ip,duration\n192.0.2.1,4h\n", Format::Csv, now()).unwrap_err();
        assert!(
            errors[0].message.contains("no \"value\" column"),
            "{errors:?}"
        );
        let errors = parse("value\n\"192.0.2.1\n", Format::Csv, now()).unwrap_err();
        assert!(errors[0].message.contains("not closed"), "{errors:?}");
    }

    #[test]
    fn crowdsec_json_imports() {
        let text = r#"[
            {"duration": "3h59m12.5s", "scope": "Ip", "type": "ban", "value": "192.0.2.7", "origin": "cscli", "reason": "manual 'ban' from 'host'"},
            {"value": "2001:db8::/32", "reason": "flood", "expires": "2030-01-01T00:00:00Z", "since": "2027-01-01T00:00:00Z"},
            {"value": "192.0.2.8", "expires": "2020-01-01T00:00:00Z"}
        ]"#;
        let parsed = parse(text, Format::Json, now()).unwrap();
        assert_eq!(parsed.blocks.len(), 2);
        let a = &parsed.blocks[0];
        assert_eq!(a.origin, None);
        assert_eq!(
            a.reason.as_deref(),
            Some("[cscli] manual 'ban' from 'host'")
        );
        assert_eq!(
            a.expires,
            Some(Expiry::In(Duration::from_secs_f64(14_352.5)))
        );
        let b = &parsed.blocks[1];
        assert_eq!((b.origin, b.reason.as_deref()), (Some(Reason::Flood), None));
        assert_eq!(b.expires, Some(Expiry::At(1_893_456_000)));
        assert_eq!(b.since_unix, Some(1_798_761_600));
        assert_eq!(parsed.skipped, ["line 3: already expired"]);
        let errors = parse(r#"{"value": "192.0.2.7"}"#, Format::Json, now()).unwrap_err();
        assert!(errors[0].message.contains("array"), "{errors:?}");
        let errors = parse(r#"[{"value": "192.0.2.7/8"}, 3]"#, Format::Json, now()).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [2]);
        let errors = parse(r#"[{"value": "192.0.2.7/8"}]"#, Format::Json, now()).unwrap_err();
        assert!(errors[0].message.contains("host bits"), "{errors:?}");
    }

    #[test]
    fn plain_imports_as_list_files() {
        let parsed = parse(
            "# fail2ban\n192.0.2.7\n2001:db8::/48 # range\n",
            Format::Plain,
            now(),
        )
        .unwrap();
        assert_eq!(parsed.blocks.len(), 2);
        assert_eq!(parsed.blocks[1].line, 3);
        assert!(parsed
            .blocks
            .iter()
            .all(|b| b.origin.is_none() && b.expires.is_none()));
        assert_eq!(
            parse("192.0.2.7 x\n", Format::Plain, now()).unwrap_err()[0].line,
            1
        );
    }

    #[test]
    fn origins_and_reasons_map_both_ways() {
        let cases = [
            ((None, Some("harvest")), (Some(Reason::Harvest), None)),
            ((Some("auth"), Some("auth")), (Some(Reason::Auth), None)),
            (
                (Some("auth"), Some("harvest")),
                (Some(Reason::Auth), Some("harvest")),
            ),
            (
                (Some("auth"), Some("ticket 4711")),
                (Some(Reason::Auth), Some("ticket 4711")),
            ),
            ((Some("CAPI"), None), (None, Some("[CAPI]"))),
            (
                (Some("CAPI"), Some("harvest")),
                (None, Some("[CAPI] harvest")),
            ),
            ((None, None), (None, None)),
        ];
        for ((origin, text), (code, comment)) in cases {
            assert_eq!(
                origin_and_reason(origin, text),
                (code, comment.map(str::to_owned)),
                "{origin:?} {text:?}"
            );
        }
    }

    #[test]
    fn go_and_human_durations() {
        assert_eq!(
            parse_duration("4h").unwrap(),
            Some(Duration::from_secs(14_400))
        );
        assert_eq!(
            parse_duration("1h 30m").unwrap(),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("1h30m0.5s").unwrap(),
            Some(Duration::from_secs_f64(5400.5))
        );
        assert_eq!(
            parse_duration("250ms").unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("-1h2m").unwrap(), None);
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn exports_import_again_with_everything_kept() {
        let now = now();
        let blocks = vec![
            Exported {
                net: "192.0.2.7/32".parse().unwrap(),
                origin: "manual".into(),
                reason: Some("ticket 4711: spam run, \"big\"".into()),
                expires: Some(now + Duration::from_secs(7200)),
                since: Some(now - Duration::from_secs(60)),
            },
            Exported {
                net: "2001:db8::/48".parse().unwrap(),
                origin: "harvest".into(),
                reason: None,
                expires: None,
                since: None,
            },
        ];
        for format in [Format::Csv, Format::Json, Format::Plain] {
            let mut out = Vec::new();
            let mut writer = Writer::new(&mut out, format, now).unwrap();
            for b in &blocks {
                writer.write(b).unwrap();
            }
            assert_eq!(writer.finish().unwrap(), 2);
            let text = String::from_utf8(out).unwrap();
            let parsed =
                parse(&text, format, now).unwrap_or_else(|e| panic!("{format}: {e:?}\n{text}"));
            assert!(parsed.skipped.is_empty(), "{format}: {:?}", parsed.skipped);
            let nets: Vec<IpNet> = parsed.blocks.iter().map(|b| b.net).collect();
            assert_eq!(nets, [blocks[0].net, blocks[1].net], "{format}\n{text}");
            if format == Format::Plain {
                assert_eq!(text, "192.0.2.7\n2001:db8::/48\n");
                continue;
            }
            let a = &parsed.blocks[0];
            assert_eq!(a.origin, Some(Reason::Manual), "{format}");
            assert_eq!(a.reason, blocks[0].reason, "{format}");
            assert_eq!(a.expires, Some(Expiry::At(1_800_007_200)), "{format}");
            assert_eq!(a.since_unix, Some(1_799_999_940), "{format}");
            let b = &parsed.blocks[1];
            assert_eq!(
                (b.origin, b.reason.as_deref(), b.expires),
                (Some(Reason::Harvest), None, None)
            );
        }
        let mut out = Vec::new();
        Writer::new(&mut out, Format::Json, now)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(
            parse(std::str::from_utf8(&out).unwrap(), Format::Json, now).unwrap(),
            Parsed::default()
        );
    }
}
