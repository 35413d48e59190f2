//! Allow and reject lists by network: the configuration's own
//! (`lists.allow`, `lists.reject`) and the files it names
//! (`lists.allow_files`, `lists.reject_files`), which are re-read on every
//! reload and SIGHUP.
//!
//! A list file holds one address or CIDR a line, like a Postfix `cidr:`
//! table without the result column: `#` starts a comment (a whole line or
//! the end of one), blank lines are ignored, a bare address means the single
//! host. A line that is not exactly one address or network is an error
//! naming the file and the line, and the configuration is refused (at
//! `check-config`, at start, at reload: the running lists then stay). The
//! same format is `block import --format plain`.
//!
//! [`apply`] puts a list set into the kernel and, given the previous one,
//! takes out what left it; [`NetSet`] answers "which entry contains this
//! address" with one hash lookup per prefix length in use, for the policy's
//! checks at accept.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use limiter_common::Reason;

use crate::{blocks::Blocks, kernel::Datapath};

/// Most bad lines of one file quoted in an error.
const MAX_QUOTED_ERRORS: usize = 10;

/// A bad line of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// One entry of a plain list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainEntry {
    pub net: IpNet,
    /// 1-based.
    pub line: usize,
    /// The comment at the end of the line, if any.
    pub comment: Option<String>,
}

/// Parses a plain list: one address or CIDR a line, `#` comments, blank
/// lines. Returns every entry and every bad line.
pub fn parse_plain(text: &str) -> (Vec<PlainEntry>, Vec<LineError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let (body, comment) = match raw.split_once('#') {
            Some((body, comment)) => (body, Some(comment.trim())),
            None => (raw, None),
        };
        let mut words = body.split_whitespace();
        let Some(word) = words.next() else { continue };
        if let Some(extra) = words.next() {
            errors.push(LineError {
                line,
                message: format!(
                    "{:?}: one address or CIDR a line (found {word:?} then {extra:?}; a comment starts with #)",
                    raw.trim()
                ),
            });
            continue;
        }
        match crate::config::parse_cidr(word) {
            Ok(net) => entries.push(PlainEntry {
                net,
                line,
                comment: comment.filter(|c| !c.is_empty()).map(str::to_owned),
            }),
            Err(message) => errors.push(LineError { line, message }),
        }
    }
    (entries, errors)
}

/// Formats a file's bad lines as `file:line: message` lines (the first
/// few, and how many more).
pub fn describe_errors(path: &Path, errors: &[LineError]) -> String {
    let mut text: Vec<String> = errors
        .iter()
        .take(MAX_QUOTED_ERRORS)
        .map(|e| format!("{}:{}: {}", path.display(), e.line, e.message))
        .collect();
    if errors.len() > MAX_QUOTED_ERRORS {
        text.push(format!(
            "… and {} more bad lines",
            errors.len() - MAX_QUOTED_ERRORS
        ));
    }
    text.join("\n")
}

/// Reads a list file.
///
/// # Errors
/// The file cannot be read (with the path), or bad lines (each with
/// `file:line`).
pub fn read_file(path: &Path) -> Result<Vec<ListEntry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (entries, errors) = parse_plain(&text);
    if !errors.is_empty() {
        return Err(describe_errors(path, &errors));
    }
    let file: Arc<Path> = Arc::from(path);
    Ok(entries
        .into_iter()
        .map(|e| ListEntry {
            net: e.net,
            source: ListSource::File {
                path: file.clone(),
                line: u32::try_from(e.line).unwrap_or(u32::MAX),
            },
        })
        .collect())
}

/// Where a list entry comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListSource {
    /// The configuration's own key (`lists.allow`, `lists.reject`).
    Key(&'static str),
    /// A line of a list file.
    File { path: Arc<Path>, line: u32 },
}

impl fmt::Display for ListSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(key) => f.write_str(key),
            Self::File { path, line } => write!(f, "{}:{line}", path.display()),
        }
    }
}

/// A list entry with its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub net: IpNet,
    pub source: ListSource,
}

/// The entries read from `lists.allow_files` and `lists.reject_files`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileLists {
    pub allow: Vec<ListEntry>,
    pub reject: Vec<ListEntry>,
}

impl FileLists {
    /// Reads every file.
    ///
    /// # Errors
    /// `(key, message)`: the first file that cannot be read or has bad
    /// lines, with `file:line` for each bad line.
    pub fn read(
        allow_files: &[PathBuf],
        reject_files: &[PathBuf],
    ) -> Result<Self, (String, String)> {
        let mut lists = Self::default();
        for (key, files, into) in [
            ("lists.allow_files", allow_files, &mut lists.allow),
            ("lists.reject_files", reject_files, &mut lists.reject),
        ] {
            for (i, path) in files.iter().enumerate() {
                into.extend(read_file(path).map_err(|e| (format!("{key}[{i}]"), e))?);
            }
        }
        Ok(lists)
    }
}

/// The lists in force: each network once, with where it comes from (the
/// configuration's key first, then the files in order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListSet {
    pub allow: BTreeMap<IpNet, ListSource>,
    pub reject: BTreeMap<IpNet, ListSource>,
}

impl ListSet {
    /// The lists of a configuration.
    pub fn of(lists: &crate::config::Lists) -> Self {
        let mut set = Self::default();
        for (into, key, inline, files) in [
            (
                &mut set.allow,
                "lists.allow",
                &lists.allow,
                &lists.from_files.allow,
            ),
            (
                &mut set.reject,
                "lists.reject",
                &lists.reject,
                &lists.from_files.reject,
            ),
        ] {
            for net in inline {
                into.entry(net.trunc()).or_insert(ListSource::Key(key));
            }
            for entry in files {
                into.entry(entry.net.trunc())
                    .or_insert_with(|| entry.source.clone());
            }
        }
        set
    }

    /// The entries of `list` containing `ip`, most specific first.
    pub fn containing(
        list: &BTreeMap<IpNet, ListSource>,
        ip: IpAddr,
    ) -> Vec<(&IpNet, &ListSource)> {
        let ip = ip.to_canonical();
        let mut found: Vec<_> = list
            .iter()
            .filter(|(net, _)| net.contains(&ip) || mapped_contains(net, ip))
            .collect();
        found.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        found
    }
}

/// Whether an IPv4-mapped IPv6 network contains an IPv4 address.
fn mapped_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V6(n), IpAddr::V4(v4)) => n.contains(&v4.to_ipv6_mapped()),
        _ => false,
    }
}

/// What [`apply`] changed in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub allowed: usize,
    pub disallowed: usize,
    pub rejected: usize,
    pub unrejected: usize,
    /// Errors, one per entry the kernel refused.
    pub errors: Vec<String>,
}

/// Puts `new` into the kernel: allow-list entries into its allow map,
/// reject-list entries as permanent `reject-list` blocks. Given the set in
/// force before, only the difference: what left a list leaves the kernel
/// (a reject entry on which the agent also holds a block of its own goes
/// back to that block).
pub fn apply(
    old: Option<&ListSet>,
    new: &ListSet,
    datapath: &dyn Datapath,
    blocks: Option<&Blocks>,
) -> Applied {
    let mut applied = Applied::default();
    let empty = ListSet::default();
    let old = old.unwrap_or(&empty);
    for net in old.allow.keys().filter(|n| !new.allow.contains_key(n)) {
        if datapath.disallow(*net).unwrap_or(false) {
            applied.disallowed += 1;
        }
    }
    for net in old.reject.keys().filter(|n| !new.reject.contains_key(n)) {
        let released = match blocks {
            Some(blocks) => release(*net, datapath, blocks),
            None => datapath.unblock(*net).unwrap_or(false),
        };
        if released {
            applied.unrejected += 1;
        }
    }
    let fresh = old.allow.is_empty() && old.reject.is_empty();
    for (net, source) in &new.allow {
        if !fresh && old.allow.contains_key(net) {
            continue;
        }
        match datapath.allow(*net) {
            Ok(()) => applied.allowed += 1,
            Err(e) => applied.errors.push(format!("{source}: {net}: {e}")),
        }
    }
    for (net, source) in &new.reject {
        if !fresh && old.reject.contains_key(net) {
            continue;
        }
        match datapath.block(*net, None, Reason::RejectList) {
            Ok(()) => applied.rejected += 1,
            Err(e) => applied.errors.push(format!("{source}: {net}: {e}")),
        }
    }
    applied
}

/// Takes `net` out of the kernel's block maps, or puts back the agent's own
/// block on it if it holds one; returns whether the kernel entry went.
pub fn release(net: IpNet, datapath: &dyn Datapath, blocks: &Blocks) -> bool {
    match blocks.get(&net) {
        Some(block) => {
            let ok = datapath.block(net, block.expires, block.origin).is_ok();
            blocks.mark_kernel(&net, ok);
            false
        }
        None => datapath.unblock(net).unwrap_or(false),
    }
}

/// Takes the agent's expired or evicted blocks out of the kernel, except
/// where a reject list holds the same network: there the list's permanent
/// entry goes back.
pub fn release_blocks(nets: &[IpNet], lists: &crate::config::Lists, datapath: &dyn Datapath) {
    if nets.is_empty() {
        return;
    }
    let listed: HashSet<IpNet> = lists
        .reject
        .iter()
        .chain(lists.from_files.reject.iter().map(|e| &e.net))
        .map(IpNet::trunc)
        .collect();
    for net in nets {
        let result = if listed.contains(net) {
            datapath.block(*net, None, Reason::RejectList)
        } else {
            datapath.unblock(*net).map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!(%net, error = %e, "removing an expired block from the kernel");
        }
    }
}

/// A set of networks that finds the most specific one containing an
/// address with one hash lookup per prefix length in use (a list of a
/// hundred thousand networks costs the same few lookups as one of ten).
#[derive(Clone, Debug, Default)]
pub struct NetSet {
    nets: HashSet<IpNet>,
    v4_lengths: Vec<u8>,
    v6_lengths: Vec<u8>,
}

impl FromIterator<IpNet> for NetSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        let nets: HashSet<IpNet> = iter.into_iter().map(|n| n.trunc()).collect();
        let mut v4 = [false; 33];
        let mut v6 = [false; 129];
        for net in &nets {
            match net {
                IpNet::V4(n) => v4[usize::from(n.prefix_len())] = true,
                IpNet::V6(n) => v6[usize::from(n.prefix_len())] = true,
            }
        }
        let lengths = |used: &[bool]| -> Vec<u8> {
            (0..used.len())
                .rev()
                .filter(|l| used[*l])
                .map(|l| l as u8)
                .collect()
        };
        Self {
            v4_lengths: lengths(&v4),
            v6_lengths: lengths(&v6),
            nets,
        }
    }
}

impl NetSet {
    /// The most specific network of the set containing `ip` (IPv4-mapped
    /// addresses as IPv4; networks are expected canonical, IPv4 as IPv4).
    pub fn find(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = ip.to_canonical();
        let lengths = match ip {
            IpAddr::V4(_) => &self.v4_lengths,
            IpAddr::V6(_) => &self.v6_lengths,
        };
        lengths
            .iter()
            .filter_map(|len| IpNet::new(ip, *len).ok())
            .map(|net| net.trunc())
            .find(|net| self.nets.contains(net))
    }

    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn plain_lists_take_one_network_a_line_with_comments() {
        let text = "\
# spam sources, ticket 4711
192.0.2.7
198.51.100.0/24   # whole range

  2001:db8::/32\t# v6
2001:db8::1 # host
\t
";
        let (entries, errors) = parse_plain(text);
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<(String, usize, Option<&str>)> = entries
            .iter()
            .map(|e| (e.net.to_string(), e.line, e.comment.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("192.0.2.7/32".to_owned(), 2, None),
                ("198.51.100.0/24".to_owned(), 3, Some("whole range")),
                ("2001:db8::/32".to_owned(), 5, Some("v6")),
                ("2001:db8::1/128".to_owned(), 6, Some("host")),
            ]
        );
    }

    #[test]
    fn bad_lines_are_reported_each_with_its_line() {
        let cases = [
            ("192.0.2.0/33", "invalid network"),
            ("192.0.2.7/24", "host bits"),
            ("example.com", "invalid network"),
            ("192.0.2.1 REJECT", "one address or CIDR a line"),
            ("192.0.2.1, 192.0.2.2", "one address or CIDR a line"),
        ];
        for (line, want) in cases {
            let (entries, errors) = parse_plain(&format!("192.0.2.9\n{line}\n"));
            assert_eq!(entries.len(), 1, "{line}");
            assert_eq!(errors.len(), 1, "{line}");
            assert_eq!(errors[0].line, 2, "{line}");
            assert!(
                errors[0].message.contains(want),
                "{line}: {}",
                errors[0].message
            );
        }
        let errors: Vec<LineError> = (1..=12)
            .map(|line| LineError {
                line,
                message: "bad".into(),
            })
            .collect();
        let text = describe_errors(Path::new("/etc/x.cidr"), &errors);
        assert!(text.starts_with("/etc/x.cidr:1: bad\n"), "{text}");
        assert!(text.ends_with("… and 2 more bad lines"), "{text}");
    }

    #[test]
    fn files_are_read_with_their_sources_and_refused_with_file_and_line() {
        let dir = std::env::temp_dir().join(format!("smtp-limiter-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.cidr");
        let bad = dir.join("bad.cidr");
        std::fs::write(&good, "# ok\n192.0.2.0/24\n\n2001:db8::1\n").unwrap();
        std::fs::write(&bad, "192.0.2.1\nnot-an-address\n").unwrap();
        let lists = FileLists::read(&[], std::slice::from_ref(&good)).unwrap();
        assert_eq!(lists.reject.len(), 2);
        assert_eq!(
            lists.reject[1].source.to_string(),
            format!("{}:4", good.display())
        );
        let (key, message) = FileLists::read(&[good.clone(), bad.clone()], &[]).unwrap_err();
        assert_eq!(key, "lists.allow_files[1]");
        assert!(
            message.contains(&format!("{}:2:", bad.display())),
            "{message}"
        );
        let (key, message) = FileLists::read(&[], &[dir.join("missing")]).unwrap_err();
        assert_eq!(key, "lists.reject_files[0]");
        assert!(message.contains("missing"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn net_sets_find_the_most_specific_network() {
        let set: NetSet = ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.7/32", "2001:db8::/32"]
            .iter()
            .map(|s| net(s))
            .collect();
        assert_eq!(
            set.find("10.1.2.3".parse().unwrap()),
            Some(net("10.1.0.0/16"))
        );
        assert_eq!(
            set.find("10.2.2.3".parse().unwrap()),
            Some(net("10.0.0.0/8"))
        );
        assert_eq!(
            set.find("::ffff:192.0.2.7".parse().unwrap()),
            Some(net("192.0.2.7/32"))
        );
        assert_eq!(
            set.find("2001:db8::5".parse().unwrap()),
            Some(net("2001:db8::/32"))
        );
        assert_eq!(set.find("192.0.2.8".parse().unwrap()), None);
        assert_eq!(set.len(), 4);
        assert!(NetSet::default()
            .find("10.0.0.1".parse().unwrap())
            .is_none());
    }

    #[test]
    fn list_sets_keep_the_first_source_of_each_network() {
        let mut lists = crate::config::Lists {
            reject: vec![net("192.0.2.0/24")],
            ..Default::default()
        };
        let path: Arc<Path> = Arc::from(Path::new("/etc/r.cidr"));
        lists.from_files.reject = vec![
            ListEntry {
                net: net("192.0.2.0/24"),
                source: ListSource::File {
                    path: path.clone(),
                    line: 1,
                },
            },
            ListEntry {
                net: net("192.0.2.7/32"),
                source: ListSource::File { path, line: 2 },
            },
        ];
        let set = ListSet::of(&lists);
        assert_eq!(set.reject.len(), 2);
        assert_eq!(set.reject[&net("192.0.2.0/24")].to_string(), "lists.reject");
        let hits = ListSet::containing(&set.reject, "192.0.2.7".parse().unwrap());
        assert_eq!(
            hits.iter()
                .map(|(n, s)| format!("{n} {s}"))
                .collect::<Vec<_>>(),
            ["192.0.2.7/32 /etc/r.cidr:2", "192.0.2.0/24 lists.reject"]
        );
    }
}
