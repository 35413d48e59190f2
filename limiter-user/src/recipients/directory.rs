//! The set of valid addresses and the answer to "is this a recipient?".
//! Pure data: built once per refresh, never changed, swapped whole.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use super::address::Folding;

/// What the directory says about a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lookup {
    /// In the directory: the backend is asked as usual.
    Known,
    /// Not in the directory although its domain is: refuse with
    /// `550 5.1.1` without asking the backend, and count a failed RCPT.
    Unknown,
    /// Not the directory's to decide: a domain none of whose addresses is in
    /// the directory, `postmaster` (RFC 5321 §4.5.1: always accepted, often
    /// an alias the directory lacks), or text that is not an address. The
    /// backend decides.
    NotCovered,
    /// No set was ever loaded (no directory answer yet, no cache): the
    /// backend decides.
    NoDirectory,
}

impl Lookup {
    /// Whether the proxy refuses the recipient itself (`550 5.1.1`).
    #[must_use]
    pub const fn refuses(self) -> bool {
        matches!(self, Self::Unknown)
    }

    /// The stable name (logs, metrics, the CLI).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Known => "known",
            Self::Unknown => "unknown",
            Self::NotCovered => "not-covered",
            Self::NoDirectory => "no-directory",
        }
    }
}

/// One loaded set of addresses, keyed by [`Folding::key`], and the domains
/// they are in (the directory is authoritative for those only).
///
/// Compact, for sites with a million addresses: the keys are kept once, in
/// one string (`keys`, for the cache and the refresh report), and the table
/// the lookups probe holds only a 64-bit fingerprint of each key — SipHash
/// with a key random per set, so nobody can aim at a collision. A lookup is
/// one fingerprint and one probe, never a string comparison. Two different
/// addresses share a fingerprint with a probability of about n / 2⁶⁴ per
/// lookup (5·10⁻¹⁴ for a million addresses), and the error could only say
/// `Known` for an unknown address: the backend is then asked, as without a
/// directory.
#[derive(Default)]
pub struct AddressSet {
    /// Fingerprints of the keys.
    fingerprints: HashSet<u64, BuildHasherDefault<Fingerprint>>,
    /// The keys, each followed by `'\n'` (keys never contain control
    /// characters: [`Folding::key`]).
    keys: String,
    /// The fingerprint function, random per set.
    hasher: RandomState,
    domains: HashSet<Box<str>>,
    folding: Folding,
}

impl std::fmt::Debug for AddressSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the million addresses.
        f.debug_struct("AddressSet")
            .field("addresses", &self.len())
            .field("domains", &self.domain_count())
            .field("folding", &self.folding)
            .finish_non_exhaustive()
    }
}

/// The table's hasher: a fingerprint is already a uniform hash.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 fingerprints are hashed; keep any other input usable.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl AddressSet {
    /// An empty set that keys addresses with `folding`.
    #[must_use]
    pub fn new(folding: Folding) -> Self {
        Self {
            fingerprints: HashSet::default(),
            keys: String::new(),
            hasher: RandomState::new(),
            domains: HashSet::new(),
            folding,
        }
    }

    /// A set of `addresses` (directory values already reduced to addresses,
    /// any case); those that are not addresses are skipped.
    pub fn from_addresses<'a>(
        folding: Folding,
        addresses: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut set = Self::new(folding);
        for address in addresses {
            set.insert(address);
        }
        set
    }

    fn fingerprint(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Adds `address`; whether it was an address (new or not).
    pub fn insert(&mut self, address: &str) -> bool {
        let Some(key) = self.folding.key(address) else {
            return false;
        };
        if self.fingerprints.insert(self.fingerprint(&key)) {
            self.keys.push_str(&key);
            self.keys.push('\n');
            let domain = &key[key.rfind('@').map_or(0, |at| at + 1)..];
            if !self.domains.contains(domain) {
                self.domains.insert(domain.into());
            }
        }
        true
    }

    /// Makes the tables no larger than they need to be (after loading).
    pub fn shrink_to_fit(&mut self) {
        self.fingerprints.shrink_to_fit();
        self.keys.shrink_to_fit();
        self.domains.shrink_to_fit();
    }

    /// The number of addresses.
    #[must_use]
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// The number of domains with at least one address.
    #[must_use]
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// About how many bytes of memory the set holds (its tables and keys).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        // The table allocates a power of two of buckets, at most 7/8 full,
        // each with its 8-byte fingerprint and one control byte.
        let buckets = (self.fingerprints.capacity() * 8)
            .div_ceil(7)
            .next_power_of_two();
        let domains: usize = self.domains.iter().map(|d| d.len() + 16 + 1).sum();
        buckets * 9 + self.keys.capacity() + domains
    }

    /// The rules the keys were made with.
    #[must_use]
    pub fn folding(&self) -> &Folding {
        &self.folding
    }

    /// Every key, in the order they were added.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.split_terminator('\n')
    }

    /// Whether `key` (already folded) is in the set.
    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.fingerprints.contains(&self.fingerprint(key))
    }

    /// What the set says about `address`: one key computation and one or two
    /// hash probes.
    #[must_use]
    pub fn lookup(&self, address: &str) -> Lookup {
        let Some(key) = self.folding.key(address) else {
            return Lookup::NotCovered;
        };
        if self.contains_key(&key) {
            return Lookup::Known;
        }
        let at = key.rfind('@').unwrap_or(0);
        if !self.domains.contains(&key[at + 1..]) || key[..at].eq_ignore_ascii_case("postmaster") {
            return Lookup::NotCovered;
        }
        match self.folding.base_key(&key) {
            Some(base) if self.contains_key(&base) => Lookup::Known,
            _ => Lookup::Unknown,
        }
    }

    /// How many keys of `self` are missing from `other`, and how many of
    /// `other`'s are new (for the refresh report).
    #[must_use]
    pub fn difference_counts(&self, other: &AddressSet) -> (usize, usize) {
        let removed = self.keys().filter(|k| !other.contains_key(k)).count();
        let added = other.keys().filter(|k| !self.contains_key(k)).count();
        (removed, added)
    }
}

/// The set in force, swapped whole: readers never see a half-loaded set, and
/// a lookup holds a read lock only for its own few hundred nanoseconds.
#[derive(Debug, Default)]
pub struct Directory {
    current: RwLock<Option<Arc<AddressSet>>>,
}

impl Directory {
    /// What the set in force says about `address`; [`Lookup::NoDirectory`]
    /// before the first set.
    #[must_use]
    pub fn lookup(&self, address: &str) -> Lookup {
        match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            Some(set) => set.lookup(address),
            None => Lookup::NoDirectory,
        }
    }

    /// The set in force, if any.
    #[must_use]
    pub fn current(&self) -> Option<Arc<AddressSet>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `set` in force; returns the one it replaces.
    pub fn replace(&self, set: Arc<AddressSet>) -> Option<Arc<AddressSet>> {
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(folding: Folding) -> AddressSet {
        AddressSet::from_addresses(
            folding,
            [
                "Alice@Example.com",
                "bob@example.com",
                "Carol.Smith@example.org",
                "not an address",
                "postmaster@example.org",
            ],
        )
    }

    #[test]
    fn lookups_answer_known_unknown_and_not_covered() {
        let set = set(Folding::default());
        assert_eq!(set.len(), 4);
        assert_eq!(set.domain_count(), 2);
        for (address, want) in [
            ("alice@example.com", Lookup::Known),
            ("ALICE@EXAMPLE.COM", Lookup::Known),
            ("carol.smith@EXAMPLE.org", Lookup::Known),
            ("mallory@example.com", Lookup::Unknown),
            ("alice@example.org", Lookup::Unknown),
            ("alice@example.net", Lookup::NotCovered),
            ("postmaster@example.com", Lookup::NotCovered),
            ("PostMaster@example.org", Lookup::Known),
            ("postmaster", Lookup::NotCovered),
            ("alice+tag@example.com", Lookup::Unknown),
        ] {
            assert_eq!(set.lookup(address), want, "{address}");
        }
    }

    #[test]
    fn case_sensitive_local_parts_and_delimiters_follow_the_folding() {
        let set = set(Folding {
            case_sensitive_local_part: true,
            recipient_delimiter: "+".into(),
        });
        assert_eq!(set.lookup("Alice@EXAMPLE.COM"), Lookup::Known);
        assert_eq!(set.lookup("alice@example.com"), Lookup::Unknown);
        assert_eq!(set.lookup("Alice+news@example.com"), Lookup::Known);
        assert_eq!(set.lookup("bob+@example.com"), Lookup::Known);
        assert_eq!(set.lookup("bobby+x@example.com"), Lookup::Unknown);
    }

    #[test]
    fn the_directory_swaps_whole_sets() {
        let directory = Directory::default();
        assert_eq!(directory.lookup("alice@example.com"), Lookup::NoDirectory);
        assert!(directory
            .replace(Arc::new(set(Folding::default())))
            .is_none());
        assert_eq!(directory.lookup("alice@example.com"), Lookup::Known);
        let empty = Arc::new(AddressSet::new(Folding::default()));
        assert_eq!(directory.replace(empty).map(|s| s.len()), Some(4));
        // An empty set covers no domain: the backend decides everything.
        assert_eq!(directory.lookup("alice@example.com"), Lookup::NotCovered);
    }

    #[test]
    fn memory_is_about_the_table_and_the_keys() {
        let mut set = AddressSet::new(Folding::default());
        for i in 0..100_000 {
            set.insert(&format!("user{i:06}@example.com"));
        }
        set.shrink_to_fit();
        // 131 072 buckets × 9 bytes + 100 000 keys of 22 bytes and a newline.
        let want = 131_072 * 9 + 100_000 * 23;
        let got = set.memory_bytes();
        assert!(got >= want && got < want + 1000, "{got} vs {want}");
        assert_eq!(set.keys().count(), 100_000);
        assert!(format!("{set:?}").len() < 200);
    }

    #[test]
    fn difference_counts_both_ways() {
        let a = AddressSet::from_addresses(Folding::default(), ["a@x", "b@x", "c@x"]);
        let b = AddressSet::from_addresses(Folding::default(), ["B@x", "c@x", "d@x", "e@x"]);
        assert_eq!(a.difference_counts(&b), (1, 2));
    }
}
