//! The last good set on disk, `state.directory/recipients.json`, so that an
//! agent restarted while the directory is unreachable still knows the
//! recipients. Replaced atomically (temporary file, fsync, rename, fsync of
//! the directory), mode 0600: it lists every mailbox of the site.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

use super::address::Folding;
use super::directory::AddressSet;
use crate::config::Ldap;

/// The file's name inside `state.directory`.
pub const CACHE_FILE: &str = "recipients.json";
/// Format version, bumped on incompatible changes.
const VERSION: u32 = 1;

/// What a set was read with. A cached set is used only with the same
/// origin: a set from another server, subtree, filter or folding could
/// refuse real recipients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub url: String,
    pub base_dn: String,
    pub filter: String,
    pub attributes: Vec<String>,
    pub folding: Folding,
}

impl Origin {
    /// The origin of a set read with `ldap`.
    #[must_use]
    pub fn of(ldap: &Ldap) -> Self {
        Self {
            url: ldap.url.clone(),
            base_dn: ldap.base_dn.clone(),
            filter: ldap.filter.clone(),
            attributes: ldap.attributes.clone(),
            folding: folding(ldap),
        }
    }
}

/// The folding `ldap` asks for.
#[must_use]
pub fn folding(ldap: &Ldap) -> Folding {
    Folding {
        case_sensitive_local_part: ldap.case_sensitive_local_part,
        recipient_delimiter: ldap.recipient_delimiter.clone(),
    }
}

/// Why the cache could not be read or written, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("recipient cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("recipient cache {path}: not a valid cache ({message}); it is ignored and replaced at the next refresh")]
    Format { path: PathBuf, message: String },
    #[error("recipient cache {path}: written for another directory configuration ({what} differs); it is ignored and replaced at the next refresh")]
    OtherOrigin { path: PathBuf, what: &'static str },
}

/// A set read back from the cache.
pub struct Cached {
    pub set: AddressSet,
    /// When the directory was read.
    pub refreshed: SystemTime,
}

#[derive(Deserialize)]
struct CacheFile {
    version: u32,
    origin: Origin,
    refreshed_unix: u64,
    addresses: Vec<String>,
}

#[derive(Serialize)]
struct CacheFileRef<'a> {
    version: u32,
    origin: &'a Origin,
    refreshed_unix: u64,
    #[serde(serialize_with = "keys_sorted")]
    addresses: &'a AddressSet,
}

fn keys_sorted<S: Serializer>(set: &&AddressSet, serializer: S) -> Result<S::Ok, S::Error> {
    // Sorted, so that two saves of one set are the same file.
    let mut keys: Vec<&str> = set.keys().collect();
    keys.sort_unstable();
    let mut seq = serializer.serialize_seq(Some(keys.len()))?;
    for key in keys {
        seq.serialize_element(key)?;
    }
    seq.end()
}

/// Reads the cache at `path`; `Ok(None)` if there is none.
///
/// # Errors
/// Unreadable, invalid, or written for another origin than `want`.
pub fn load(path: &Path, want: &Origin) -> Result<Option<Cached>, CacheError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let format = |message: String| CacheError::Format {
        path: path.to_owned(),
        message,
    };
    let cache: CacheFile =
        serde_json::from_reader(BufReader::new(file)).map_err(|e| format(e.to_string()))?;
    if cache.version != VERSION {
        return Err(format(format!(
            "version {} (this agent reads {VERSION})",
            cache.version
        )));
    }
    let differs = [
        ("url", cache.origin.url != want.url),
        ("base_dn", cache.origin.base_dn != want.base_dn),
        ("filter", cache.origin.filter != want.filter),
        ("attributes", cache.origin.attributes != want.attributes),
        (
            "case_sensitive_local_part",
            cache.origin.folding.case_sensitive_local_part
                != want.folding.case_sensitive_local_part,
        ),
    ];
    if let Some((what, _)) = differs.iter().find(|(_, differs)| *differs) {
        return Err(CacheError::OtherOrigin {
            path: path.to_owned(),
            what,
        });
    }
    // The delimiter plays no part in the keys: take the configured one.
    let mut set = AddressSet::from_addresses(
        want.folding.clone(),
        cache.addresses.iter().map(String::as_str),
    );
    set.shrink_to_fit();
    Ok(Some(Cached {
        set,
        refreshed: UNIX_EPOCH + Duration::from_secs(cache.refreshed_unix),
    }))
}

/// Replaces the cache at `path` with `set`, read at `refreshed` from `origin`.
///
/// # Errors
/// The file cannot be written (the old one then stays).
pub fn save(
    path: &Path,
    origin: &Origin,
    set: &AddressSet,
    refreshed: SystemTime,
) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map_or_else(|| CACHE_FILE.into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let written = serde_json::to_writer(
        &mut writer,
        &CacheFileRef {
            version: VERSION,
            origin,
            refreshed_unix: refreshed
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            addresses: set,
        },
    )
    .map_err(std::io::Error::other)
    .and_then(|()| writer.write_all(b"\n"))
    .and_then(|()| writer.into_inner().map_err(|e| e.into_error()))
    .and_then(|file| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::os::unix::fs::PermissionsExt;

    fn ldap() -> Ldap {
        Config::from_toml(
            "[recipients.ldap]\nurl = \"ldap://dc.example\"\nbase_dn = \"dc=example,dc=com\"",
        )
        .unwrap()
        .recipients
        .ldap
        .unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-recipients-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_and_loads_the_same_set() {
        let dir = temp_dir("cache-roundtrip");
        let path = dir.join(CACHE_FILE);
        let ldap = ldap();
        let origin = Origin::of(&ldap);
        assert!(load(&path, &origin).unwrap().is_none());
        let set =
            AddressSet::from_addresses(folding(&ldap), ["Alice@Example.com", "bob@example.com"]);
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        save(&path, &origin, &set, when).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("[\"alice@example.com\",\"bob@example.com\"]"),
            "{text}"
        );
        let cached = load(&path, &origin).unwrap().unwrap();
        assert_eq!(cached.set.len(), 2);
        assert_eq!(cached.refreshed, when);
        assert!(cached.set.contains_key("alice@example.com"));
        // No temporary file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_origin_or_a_bad_file_is_refused() {
        let dir = temp_dir("cache-origin");
        let path = dir.join(CACHE_FILE);
        let ldap = ldap();
        let set = AddressSet::from_addresses(folding(&ldap), ["a@x"]);
        save(&path, &Origin::of(&ldap), &set, SystemTime::now()).unwrap();
        let mut other = ldap.clone();
        other.base_dn = "ou=people,dc=example,dc=com".into();
        let e = load(&path, &Origin::of(&other)).err().unwrap();
        assert!(e.to_string().contains("base_dn differs"), "{e}");
        let mut other = ldap.clone();
        other.case_sensitive_local_part = true;
        assert!(matches!(
            load(&path, &Origin::of(&other)),
            Err(CacheError::OtherOrigin { .. })
        ));
        let mut delimiter = ldap.clone();
        delimiter.recipient_delimiter = "+".into();
        assert!(load(&path, &Origin::of(&delimiter)).unwrap().is_some());
        fs::write(&path, "{\"version\": 1").unwrap();
        let e = load(&path, &Origin::of(&ldap)).err().unwrap();
        assert!(matches!(e, CacheError::Format { .. }), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
