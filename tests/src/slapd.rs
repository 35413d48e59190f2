//! A private, real OpenLDAP `slapd` for one test: its own `slapd.conf`,
//! schema and mdb database in a temp dir under /tmp, listening on
//! `127.0.0.1` and a free port (and, with [`SlapdOptions::tls`], `ldaps://`
//! on another one plus StartTLS, with a certificate from a CA of its own).
//! Stopped, and its directory removed, when the [`Slapd`] is dropped.
//!
//! The directory, suffix [`BASE_DN`], is generated ([`SlapdOptions::users`]
//! users under `ou=people`, see [`generate`]) and loaded with `slapadd`
//! before slapd starts. It behaves like Active Directory where it matters
//! here: a search returns at most [`SlapdOptions::size_limit`] entries
//! (1000, AD's `MaxPageSize`) unless it asks for pages (RFC 2696), so only
//! a paged search gets everything; and some users carry AD's
//! `proxyAddresses` (`SMTP:` primary, `smtp:` aliases, `X500:` and `SIP:`
//! values that are not mail addresses) through a tiny custom schema
//! ([`EXTRA_SCHEMA`]) that also defines `mailAlternateAddress`.
//!
//! Binds: [`READER_DN`]/[`READER_PASSWORD`] (an ordinary entry: the size
//! limit applies), [`ADMIN_DN`]/[`ADMIN_PASSWORD`] (the rootdn, used by the
//! helpers that change the directory), or anonymous (read access too).
//!
//! Needs Debian's `slapd` and `ldap-utils` (`cargo xtask setup` installs
//! them and makes sure no system slapd is configured or running), and
//! `openssl` for the TLS variant; not root. See [`missing_prerequisite`].
//! With `SLAPD_FIXTURE_KEEP` set the directory (config, database, `slapd.log`)
//! is kept. Instances whose test process died before its `Drop` are stopped
//! and removed by the next test process that starts one.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::fixture::{self, free_port, write, ChildProcess, InstanceDir, Server};

/// The suffix of every instance.
pub const BASE_DN: &str = "dc=example,dc=com";
/// Where the users are.
pub const PEOPLE_DN: &str = "ou=people,dc=example,dc=com";
/// An ordinary entry allowed to read: the size limit applies to it.
pub const READER_DN: &str = "cn=reader,dc=example,dc=com";
pub const READER_PASSWORD: &str = "reader-secret";
/// The rootdn (no limits), for the helpers that change the directory.
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PASSWORD: &str = "admin-secret";
/// The filter of [`Slapd::recipients_toml`]: the users.
pub const USER_FILTER: &str = "(objectClass=inetOrgPerson)";

/// Active Directory's `proxyAddresses` (with its real OID) and the
/// Sun/Netscape `mailAlternateAddress`, carried by an auxiliary class.
pub const EXTRA_SCHEMA: &str = "\
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
    DESC 'Active Directory: addresses of a recipient, SMTP: primary, smtp: others, X500:, SIP: ...'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 2.16.840.1.113730.3.1.13 NAME 'mailAlternateAddress'
    DESC 'other addresses of a recipient'
    EQUALITY caseIgnoreIA5Match
    SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.4203.666.100.1 NAME 'smtpLimiterMailRecipient'
    DESC 'test fixture: carries proxyAddresses and mailAlternateAddress'
    SUP top AUXILIARY
    MAY ( proxyAddresses $ mailAlternateAddress ) )
";

/// Debian's schema files the instance includes, in order.
const SCHEMAS: [&str; 4] = ["core", "cosine", "inetorgperson", "nis"];
const SCHEMA_DIR: &str = "/etc/ldap/schema";
/// Where Debian's slapd keeps its backend modules.
const MODULE_DIR: &str = "/usr/lib/ldap";
/// Where Debian's package keeps the programs.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// How long [`Slapd::start`] waits for slapd to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
static SERVER: Server = Server::new("slapd", "SLAPD_FIXTURE_KEEP", stop_stale);

/// What an instance is started with.
#[derive(Clone, Debug)]
pub struct SlapdOptions {
    /// Generated users (see [`generate`]).
    pub users: usize,
    /// Most entries a search returns without paged results (slapd's
    /// `size.soft`/`size.hard`/`size.pr`; paged searches are not limited in
    /// total, `size.prtotal=unlimited`).
    pub size_limit: usize,
    /// Also listen with `ldaps://` and offer StartTLS, with a certificate
    /// for 127.0.0.1 and localhost signed by [`Slapd::ca_file`].
    pub tls: bool,
    /// Most entries a paged search returns in total (`size.prtotal`);
    /// `None`: unlimited, as Active Directory.
    pub paged_total_limit: Option<usize>,
}

impl Default for SlapdOptions {
    fn default() -> Self {
        Self {
            users: 3000,
            size_limit: 1000,
            tls: false,
            paged_total_limit: None,
        }
    }
}

/// One generated user.
#[derive(Clone, Debug)]
pub struct User {
    pub uid: String,
    pub dn: String,
    /// Its mail addresses as stored (mixed case for some), every attribute.
    pub addresses: Vec<String>,
    /// Values stored in address attributes that are not mail addresses
    /// (`SIP:…`, `X500:…`): must not be accepted.
    pub not_addresses: Vec<String>,
    /// Whether it carries AD-style `proxyAddresses`.
    pub ad_style: bool,
}

/// The generated directory, deterministic for a number of users `n`
/// (user `i` is `uid=user{i:06}`):
///
/// * `mail: user{i}@example.com`, every 7th in mixed case
///   (`User{i}@Example.COM`); every 50th (i % 50 == 49) has no address at
///   all (a user without a mailbox);
/// * every 5th: `mailAlternateAddress: alt{i}@example.com`, every 10th also
///   `alt{i}@example.org` (a second domain);
/// * every 10th (i % 10 == 3), AD-style: `mail: First.Last{i}@example.com`
///   and `proxyAddresses: SMTP:First.Last{i}@example.com`,
///   `smtp:user{i}.alias@example.net`, `X500:/o=Example/…/cn=user{i}`,
///   `SIP:sip{i}@example.com`.
#[must_use]
pub fn generate(n: usize) -> Vec<User> {
    (0..n)
        .map(|i| {
            let uid = format!("user{i:06}");
            let dn = format!("uid={uid},{PEOPLE_DN}");
            let mut addresses = Vec::new();
            let mut not_addresses = Vec::new();
            let ad_style = i % 10 == 3;
            if i % 50 == 49 {
                // No mailbox.
            } else if ad_style {
                addresses.push(format!("First.Last{i}@example.com"));
                addresses.push(format!("user{i}.alias@example.net"));
                not_addresses.push(format!(
                    "X500:/o=Example/ou=Exchange/cn=Recipients/cn=user{i}"
                ));
                not_addresses.push(format!("SIP:sip{i}@example.com"));
            } else if i % 7 == 0 {
                addresses.push(format!("User{i}@Example.COM"));
            } else {
                addresses.push(format!("user{i}@example.com"));
            }
            if i % 5 == 0 {
                addresses.push(format!("alt{i}@example.com"));
                if i % 10 == 0 {
                    addresses.push(format!("alt{i}@example.org"));
                }
            }
            User {
                uid,
                dn,
                addresses,
                not_addresses,
                ad_style,
            }
        })
        .collect()
}

/// The LDIF of one user.
fn user_ldif(user: &User) -> String {
    let mut out = String::with_capacity(512);
    let _ = writeln!(out, "dn: {}", user.dn);
    let _ = writeln!(out, "objectClass: inetOrgPerson");
    let _ = writeln!(out, "objectClass: smtpLimiterMailRecipient");
    let _ = writeln!(out, "uid: {}\ncn: {}\nsn: {}", user.uid, user.uid, user.uid);
    if user.ad_style {
        let primary = &user.addresses[0];
        let _ = writeln!(out, "mail: {primary}");
        let _ = writeln!(out, "proxyAddresses: SMTP:{primary}");
        for alias in &user.addresses[1..2] {
            let _ = writeln!(out, "proxyAddresses: smtp:{alias}");
        }
        for other in &user.not_addresses {
            let _ = writeln!(out, "proxyAddresses: {other}");
        }
        for alt in &user.addresses[2..] {
            let _ = writeln!(out, "mailAlternateAddress: {alt}");
        }
    } else {
        let mut addresses = user.addresses.iter();
        if let Some(mail) = addresses.next().filter(|a| !a.starts_with("alt")) {
            let _ = writeln!(out, "mail: {mail}");
        }
        for alt in user.addresses.iter().filter(|a| a.starts_with("alt")) {
            let _ = writeln!(out, "mailAlternateAddress: {alt}");
        }
    }
    out.push('\n');
    out
}

/// The directory's fixed top: suffix, reader, `ou=people`, and a group
/// without addresses.
fn top_ldif() -> String {
    format!(
        "dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {READER_DN}\nobjectClass: person\ncn: reader\nsn: reader\nuserPassword: {READER_PASSWORD}\n\n\
         dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: cn=staff,{BASE_DN}\nobjectClass: groupOfNames\ncn: staff\nmember: {READER_DN}\n\n"
    )
}

/// Why [`Slapd::start`] cannot work here, or `None` if it can.
#[must_use]
pub fn missing_prerequisite() -> Option<String> {
    for tool in ["slapd", "slapadd", "ldapadd", "ldapdelete"] {
        if let Err(e) = tool_path(tool) {
            return Some(format!("{e:#}"));
        }
    }
    for schema in SCHEMAS {
        let path = Path::new(SCHEMA_DIR).join(format!("{schema}.schema"));
        if !path.is_file() {
            return Some(format!(
                "{} is missing (is Debian's slapd package installed?)",
                path.display()
            ));
        }
    }
    if !Path::new(MODULE_DIR).join("back_mdb.so").exists() {
        return Some(format!(
            "{MODULE_DIR}/back_mdb.so is missing (is Debian's slapd package installed?)"
        ));
    }
    None
}

/// Whether tests that need slapd can run here. Under `CI=true` a missing
/// prerequisite is a failure (panic), elsewhere the test is skipped.
pub fn prerequisites(test: &str) -> bool {
    fixture::require(test, missing_prerequisite())
}

fn tool_path(name: &str) -> Result<PathBuf> {
    fixture::find_program(
        name,
        &TOOL_DIRS,
        "install slapd and ldap-utils: `cargo xtask setup`",
    )
}

/// A running private slapd. Dropping it stops slapd and removes its
/// directory.
pub struct Slapd {
    /// Before `dir`: dropped first, which stops slapd.
    child: Option<ChildProcess>,
    /// Removed when dropped (unless `SLAPD_FIXTURE_KEEP`).
    dir: InstanceDir,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    users: Vec<User>,
    options: SlapdOptions,
}

impl Slapd {
    /// Generates the directory, loads it and starts slapd; returns once it
    /// accepts connections (at most 20 s).
    ///
    /// # Errors
    /// A missing prerequisite, or slapd did not start (its log is in the
    /// message).
    pub fn start(options: SlapdOptions) -> Result<Slapd> {
        SERVER.start(missing_prerequisite(), || Self::try_start(&options))
    }

    fn try_start(options: &SlapdOptions) -> Result<Slapd> {
        let dir = SERVER.new_dir()?;
        let mut slapd = Slapd {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            tls_addr: if options.tls {
                Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
            } else {
                None
            },
            dir,
            child: None,
            users: generate(options.users),
            options: options.clone(),
        };
        // From here on an error drops `slapd`: it stops what was started
        // and removes the directory.
        slapd.configure()?;
        slapd.load()?;
        slapd.launch()?;
        Ok(slapd)
    }

    fn configure(&self) -> Result<()> {
        let d = self.dir.path();
        fs::create_dir(d.join("db")).context("creating the database directory")?;
        write(&d.join("extra.schema"), EXTRA_SCHEMA)?;
        write(&d.join("reader.secret"), &format!("{READER_PASSWORD}\n"))?;
        let mut conf = String::new();
        for schema in SCHEMAS {
            let _ = writeln!(conf, "include {SCHEMA_DIR}/{schema}.schema");
        }
        let limit = self.options.size_limit;
        let total = self
            .options
            .paged_total_limit
            .map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        let _ = write!(
            conf,
            "include {d}/extra.schema\n\
             pidfile {d}/slapd.pid\n\
             argsfile {d}/slapd.args\n\
             modulepath {MODULE_DIR}\n\
             moduleload back_mdb\n\
             sizelimit size.soft={limit} size.hard={limit} size.pr={limit} size.prtotal={total}\n",
            d = d.display()
        );
        if self.options.tls {
            // A CA of the instance's own and a server certificate it
            // signed, for 127.0.0.1 and localhost.
            crate::certs::write_ca_and_server(d)?;
            let _ = write!(
                conf,
                "TLSCACertificateFile {d}/ca.pem\n\
                 TLSCertificateFile {d}/cert.pem\n\
                 TLSCertificateKeyFile {d}/key.pem\n",
                d = d.display()
            );
        }
        let _ = write!(
            conf,
            "database mdb\n\
             suffix \"{BASE_DN}\"\n\
             rootdn \"{ADMIN_DN}\"\n\
             rootpw {ADMIN_PASSWORD}\n\
             directory {d}/db\n\
             maxsize 4294967296\n\
             dbnosync\n\
             index objectClass eq\n\
             index uid eq\n\
             access to attrs=userPassword by anonymous auth by * none\n\
             access to * by * read\n",
            d = d.display()
        );
        write(&d.join("slapd.conf"), &conf)
    }

    /// Writes the LDIF and loads it offline with `slapadd -q`.
    fn load(&self) -> Result<()> {
        let mut ldif = top_ldif();
        ldif.reserve(self.users.len() * 400);
        for user in &self.users {
            ldif.push_str(&user_ldif(user));
        }
        let path = self.dir.join("data.ldif");
        write(&path, &ldif)?;
        let out = Command::new(tool_path("slapadd")?)
            .arg("-q")
            .arg("-f")
            .arg(self.dir.join("slapd.conf"))
            .arg("-l")
            .arg(&path)
            .output()
            .context("running slapadd")?;
        if !out.status.success() {
            bail!(
                "slapadd failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = fs::remove_file(&path);
        Ok(())
    }

    fn launch(&mut self) -> Result<()> {
        let mut urls = format!("ldap://{}/", self.addr);
        if let Some(tls) = self.tls_addr {
            let _ = write!(urls, " ldaps://{tls}/");
        }
        // `-d 0`: in the foreground (a child this fixture owns), no debug
        // output; errors still go to stderr, into slapd.log.
        let mut child = ChildProcess::spawn(
            "slapd",
            Command::new(tool_path("slapd")?)
                .arg("-f")
                .arg(self.dir.join("slapd.conf"))
                .arg("-h")
                .arg(&urls)
                .args(["-d", "0"]),
            &self.dir.join("slapd.log"),
        )?;
        let accepts =
            |a: &SocketAddr| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok();
        child.wait_ready(
            START_TIMEOUT,
            "accept connections",
            || accepts(&self.addr) && self.tls_addr.as_ref().is_none_or(accepts),
            || self.log(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// `ldap://127.0.0.1:PORT` (StartTLS is offered there with `tls`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("ldap://{}", self.addr)
    }

    /// `ldaps://127.0.0.1:PORT`, with `tls`.
    #[must_use]
    pub fn ldaps_url(&self) -> Option<String> {
        self.tls_addr.map(|a| format!("ldaps://{a}"))
    }

    /// The CA that signed the server certificate, with `tls`.
    #[must_use]
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.join("ca.pem"))
    }

    /// A file holding [`READER_PASSWORD`] and a newline.
    #[must_use]
    pub fn reader_password_file(&self) -> PathBuf {
        self.dir.join("reader.secret")
    }

    /// The instance's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generated users (those added or deleted since are not
    /// reflected).
    #[must_use]
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// Every address of the generated users, in lower case.
    #[must_use]
    pub fn expected_addresses(&self) -> BTreeSet<String> {
        self.users
            .iter()
            .flat_map(|u| u.addresses.iter().map(|a| a.to_lowercase()))
            .collect()
    }

    /// A `[recipients.ldap]` table for this instance: the reader's bind
    /// (password file), [`BASE_DN`], [`USER_FILTER`], then `extra` lines.
    #[must_use]
    pub fn recipients_toml(&self, extra: &str) -> String {
        format!(
            "[recipients.ldap]\nurl = \"{}\"\nbind_dn = \"{READER_DN}\"\npassword_file = \"{}\"\n\
             base_dn = \"{BASE_DN}\"\nfilter = \"{USER_FILTER}\"\n{extra}\n",
            self.url(),
            self.reader_password_file().display()
        )
    }

    /// Adds a user `uid` under `ou=people` with these `mail` values.
    ///
    /// # Errors
    /// `ldapadd` failed.
    pub fn add_user(&self, uid: &str, mails: &[&str]) -> Result<()> {
        let mut ldif = format!(
            "dn: uid={uid},{PEOPLE_DN}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
        );
        for mail in mails {
            let _ = writeln!(ldif, "mail: {mail}");
        }
        let path = self.dir.join(format!("add-{uid}.ldif"));
        write(&path, &ldif)?;
        let result = self.ldap_tool("ldapadd", &["-f", &path.display().to_string()]);
        let _ = fs::remove_file(&path);
        result
    }

    /// Deletes the entries `dns` (in one `ldapdelete`).
    ///
    /// # Errors
    /// `ldapdelete` failed.
    pub fn delete(&self, dns: &[String]) -> Result<()> {
        let path = self.dir.join("delete.dns");
        write(&path, &(dns.join("\n") + "\n"))?;
        let result = self.ldap_tool("ldapdelete", &["-f", &path.display().to_string()]);
        let _ = fs::remove_file(&path);
        result
    }

    fn ldap_tool(&self, tool: &str, args: &[&str]) -> Result<()> {
        let out = Command::new(tool_path(tool)?)
            .args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PASSWORD,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// slapd's own output so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.dir.read("slapd.log")
    }

    /// Stops slapd (SIGTERM, then SIGKILL after 5 s); the directory stays
    /// until the `Slapd` is dropped. Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            child.stop();
        }
    }
}

/// Stops the slapd of a stale instance, if still running: the pid file,
/// checked against the command line (which names the instance's
/// slapd.conf).
fn stop_stale(dir: &Path, owner: u32) {
    let slapd = || fixture::pid_file_process(dir, "slapd.pid");
    if let Some(pid) = slapd() {
        eprintln!("slapd fixture: stopping slapd {pid} left by process {owner}");
        fixture::kill_all(Duration::from_secs(1), || slapd().into_iter().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_directory_has_every_kind_of_entry() {
        let users = generate(100);
        assert_eq!(users.len(), 100);
        assert!(users[49].addresses.is_empty());
        assert_eq!(
            users[0].addresses,
            ["User0@Example.COM", "alt0@example.com", "alt0@example.org"]
        );
        assert!(users[3].ad_style && users[3].addresses[0] == "First.Last3@example.com");
        let ldif = user_ldif(&users[13]);
        assert!(
            ldif.contains("proxyAddresses: SMTP:First.Last13@example.com\n"),
            "{ldif}"
        );
        assert!(
            ldif.contains("proxyAddresses: smtp:user13.alias@example.net\n"),
            "{ldif}"
        );
        assert!(
            ldif.contains("proxyAddresses: SIP:sip13@example.com\n"),
            "{ldif}"
        );
        let ldif = user_ldif(&users[5]);
        assert!(
            ldif.contains("mail: user5@example.com\nmailAlternateAddress: alt5@example.com\n"),
            "{ldif}"
        );
        let ldif = user_ldif(&users[49]);
        assert!(!ldif.contains("mail"), "{ldif}");
    }
}
