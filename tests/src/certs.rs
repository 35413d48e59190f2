//! Certificates for the TLS tests, made with the `openssl` command in a
//! temporary directory of their own (removed on drop): a self-signed one
//! for a listener ([`Certs::self_signed`]), or a CA and a server
//! certificate it signed for `127.0.0.1` and `localhost`
//! ([`Certs::ca_signed`], [`write_ca_and_server`]) for clients that verify.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{bail, Context, Result};

/// A directory with `cert.pem` and `key.pem` (and `ca.pem`, `ca.key` for
/// [`Certs::ca_signed`]); removed on drop.
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// A self-signed certificate for `CN=localhost` (RSA 2048), for a
    /// listener whose clients do not verify.
    ///
    /// # Errors
    /// The directory could not be made or openssl failed.
    pub fn self_signed(name: &str) -> Result<Certs> {
        let certs = Certs::new(name)?;
        openssl(
            &certs.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ],
        )?;
        Ok(certs)
    }

    /// A CA of its own (`ca.pem`) and a server certificate it signed
    /// (`cert.pem`, `key.pem`) for `IP:127.0.0.1` and `DNS:localhost`.
    ///
    /// # Errors
    /// The directory could not be made or openssl failed.
    pub fn ca_signed(name: &str) -> Result<Certs> {
        let certs = Certs::new(name)?;
        write_ca_and_server(&certs.dir)?;
        Ok(certs)
    }

    fn new(name: &str) -> Result<Certs> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-certs-{name}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Certs { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate (PEM).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// Its private key (PEM).
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The CA certificate (PEM) of [`Certs::ca_signed`].
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The proxy's `[tls]` table for this certificate.
    pub fn toml(&self) -> String {
        format!(
            "[tls]\ncertificate = \"{}\"\nkey = \"{}\"\n",
            self.cert().display(),
            self.key().display()
        )
    }

    /// Postfix's settings for a server offering STARTTLS with this
    /// certificate, and logging its TLS sessions.
    pub fn postfix_main_cf(&self) -> Vec<(String, String)> {
        [
            ("smtpd_tls_cert_file", self.cert().display().to_string()),
            ("smtpd_tls_key_file", self.key().display().to_string()),
            ("smtpd_tls_security_level", "may".to_owned()),
            ("smtpd_tls_loglevel", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Writes into `dir` a CA (`ca.key`, `ca.pem`) and a server certificate
/// it signed (`key.pem`, `cert.pem`) for `IP:127.0.0.1` and
/// `DNS:localhost`, P-256 keys, valid two days.
///
/// # Errors
/// openssl failed (its stderr is in the message).
pub fn write_ca_and_server(dir: &Path) -> Result<()> {
    let ext = dir.join("server.ext");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .with_context(|| format!("writing {}", ext.display()))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_subject = format!(
        "/CN=smtp-limiter test CA {}",
        dir.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &ca_subject,
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
