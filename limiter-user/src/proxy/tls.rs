//! TLS for clients (STARTTLS and implicit TLS), terminated in the proxy with
//! rustls; and the stream type that is plain until it is upgraded.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

/// Builds the acceptor from a PEM certificate chain and a PEM private key.
///
/// # Errors
/// Unreadable files, no certificate or key in them, or a key that does not
/// fit the certificate; the message names the file.
pub fn acceptor(certificate: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .with_context(|| format!("tls.certificate {}: cannot read it", certificate.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "tls.certificate {}: not a PEM certificate chain",
                certificate.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "tls.certificate {}: no certificate in the file",
            certificate.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("tls.key {}: no PEM private key in the file", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("tls.certificate and tls.key do not form a valid pair")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The backend connector for `backend.starttls`: verifies the backend's
/// certificate against `ca` (PEM) when given; without it any certificate is
/// accepted (encryption against passive listeners on the link only; the
/// backend is normally on loopback or a private network).
///
/// # Errors
/// The CA file cannot be read or holds no certificate.
pub fn backend_connector(ca: Option<&Path>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("backend.tls_ca {}: cannot read it", ca.display()))?
            {
                let cert =
                    cert.with_context(|| format!("backend.tls_ca {}: not PEM", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("backend.tls_ca {}: bad certificate", ca.display()))?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "backend.tls_ca {}: no certificate in the file",
                    ca.display()
                );
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts any backend certificate (handshake signatures are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection that is plain, or TLS after STARTTLS (or from the start).
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

/// A client connection: plain, or TLS after STARTTLS / on an implicit-TLS
/// listener.
pub type ClientStream<S> = MaybeTls<S, TlsStream<S>>;

/// A backend connection: plain, or TLS after `backend.starttls`.
pub type BackendStream =
    MaybeTls<tokio::net::TcpStream, tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl<P, T> MaybeTls<P, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl<P: AsyncRead + AsyncWrite + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncRead
    for MaybeTls<P, T>
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncRead + AsyncWrite + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncWrite
    for MaybeTls<P, T>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
