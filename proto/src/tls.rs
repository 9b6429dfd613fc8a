//! Mutual TLS for Synod's QUIC connections, shared by the replica and the
//! client: loading PEM files, building rustls and quinn configurations,
//! and the connection handshake. Making certificates is
//! [`certgen`](crate::certgen)'s, behind the `certgen` feature.
//!
//! # Trust model
//!
//! One cluster CA signs every certificate. Every connection is mutual TLS
//! 1.3 with the ALPN [`ALPN`](crate::wire::ALPN): a replica refuses a client
//! or peer whose certificate the CA did not sign, at the TLS layer, before
//! any frame is read.
//!
//! # Replica certificates
//!
//! Replicas and clients share the CA, so a replica's certificate must carry
//! an identity no client certificate can have. A replica certificate
//! (`certgen::CertificateAuthority::issue_node`) has, all at once:
//! - both extended key usages, serverAuth and clientAuth (replicas both
//!   accept and dial), where a client certificate has clientAuth only;
//! - the URI subject alternative name [`replica_uri`]
//!   (`synod-replica://node-<id>`), a form
//!   `certgen::CertificateAuthority::issue_client` never writes;
//! - the DNS name [`node_server_name`] (`node-<id>.synod`), the server name
//!   its peers dial it with, so that rustls checks it on every dial.
//!
//! [`replica_certificate_node`] checks the three and returns the node id.
//! The peer port accepts a peer claiming node id `n` only if its leaf
//! certificate is a replica certificate for `n`, and a replica that dials
//! peer `n` checks the certificate it was shown the same way (after rustls
//! verified the chain and the server name). A certificate with only the
//! clientAuth usage, or without the URI name, is refused even if it names
//! `node-<n>.synod`: it could have been issued to a client.
//!
//! # Handshake
//!
//! The side that connects opens one bidirectional stream and sends a
//! [`Hello`] frame; the replica answers with a [`HelloReply`] frame on the
//! same stream. For a client, that stream then carries the session
//! ([`ClientFrame`](crate::wire::ClientFrame)s one way,
//! [`ServerFrame`](crate::wire::ServerFrame)s the other); see [`connect`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::wire::{
    decode_frame, encode_frame, frame_length, FrameError, Hello, HelloReply, ALPN,
    FRAME_HEADER_BYTES,
};

/// Bytes asked of the stream per read by a [`FrameReader`]; a frame larger
/// than this is assembled from several reads.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The DNS name a replica's certificate must carry, and the server name its
/// peers dial it with: `node-<id>.synod`.
pub fn node_server_name(node_id: u64) -> String {
    format!("node-{node_id}.synod")
}

/// The scheme of the URI name only replica certificates carry.
pub const REPLICA_URI_SCHEME: &str = "synod-replica";

/// The URI subject alternative name a replica certificate carries and a
/// client certificate never does: `synod-replica://node-<id>`.
pub fn replica_uri(node_id: u64) -> String {
    format!("{REPLICA_URI_SCHEME}://node-{node_id}")
}

/// Why a certificate is not a replica certificate (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NotReplicaCertificate {
    /// The certificate could not be parsed.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// It lacks the serverAuth or the clientAuth extended key usage.
    #[error(
        "the certificate does not have both the serverAuth and clientAuth usages (it has {0}), \
         so it may be a client's"
    )]
    Usages(String),
    /// It has no `synod-replica://node-<id>` URI name, or more than one.
    #[error(
        "the certificate does not carry exactly one replica name synod-replica://node-<id> \
         (it carries {0}); make replica certificates with `synod certs --node`"
    )]
    ReplicaName(String),
    /// Its replica URI and its DNS name `node-<id>.synod` do not agree.
    #[error("the certificate names {uri} but not the DNS name {dns}")]
    DnsName {
        /// The replica URI found.
        uri: String,
        /// The DNS name it should also carry.
        dns: String,
    },
}

fn usage_names(usage: Option<&x509_parser::extensions::ExtendedKeyUsage<'_>>) -> String {
    let Some(usage) = usage else {
        return "no extended key usage".into();
    };
    let mut names = Vec::new();
    if usage.any {
        names.push("any");
    }
    if usage.server_auth {
        names.push("serverAuth");
    }
    if usage.client_auth {
        names.push("clientAuth");
    }
    if names.is_empty() {
        "neither".into()
    } else {
        names.join(" and ")
    }
}

/// The node id a replica certificate is for: the certificate must have the
/// serverAuth and clientAuth usages, exactly one URI name
/// `synod-replica://node-<id>` (see [`replica_uri`]) and the DNS name
/// [`node_server_name`]`(id)`. Only the certificate's content is checked
/// here; its chain to the cluster CA is the TLS handshake's to check.
///
/// # Errors
/// [`NotReplicaCertificate`] saying what is missing, in words for a person.
pub fn replica_certificate_node(
    certificate: &CertificateDer<'_>,
) -> Result<u64, NotReplicaCertificate> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|error| NotReplicaCertificate::Unparsable(error.to_string()))?;
    let usage = parsed
        .extended_key_usage()
        .map_err(|error| NotReplicaCertificate::Unparsable(error.to_string()))?
        .map(|extension| extension.value);
    if !usage.is_some_and(|usage| usage.server_auth && usage.client_auth) {
        return Err(NotReplicaCertificate::Usages(usage_names(usage)));
    }
    let names = parsed
        .subject_alternative_name()
        .map_err(|error| NotReplicaCertificate::Unparsable(error.to_string()))?
        .map(|extension| extension.value.general_names.as_slice())
        .unwrap_or_default();
    let prefix = format!("{REPLICA_URI_SCHEME}://node-");
    let replica_uris: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.to_ascii_lowercase().starts_with(REPLICA_URI_SCHEME) => {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    let node_id = match replica_uris.as_slice() {
        [uri] => uri
            .strip_prefix(prefix.as_str())
            .and_then(parse_canonical_u64)
            .ok_or_else(|| NotReplicaCertificate::ReplicaName(format!("{uri:?}")))?,
        [] => return Err(NotReplicaCertificate::ReplicaName("none".into())),
        many => {
            return Err(NotReplicaCertificate::ReplicaName(format!(
                "{} of them",
                many.len()
            )))
        }
    };
    let dns = node_server_name(node_id);
    let has_dns = names.iter().any(
        |name| matches!(name, GeneralName::DNSName(found) if found.eq_ignore_ascii_case(&dns)),
    );
    if !has_dns {
        return Err(NotReplicaCertificate::DnsName {
            uri: replica_uri(node_id),
            dns,
        });
    }
    Ok(node_id)
}

/// A node id written in canonical decimal (no sign, no leading zeros).
fn parse_canonical_u64(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return None;
    }
    text.parse().ok()
}

/// Whether `name` (a client's common name, or a host) is one only replicas
/// may carry: a replica DNS name `node-<id>.synod`, or anything naming the
/// replica URI scheme.
pub fn is_replica_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if lower.contains(REPLICA_URI_SCHEME) {
        return true;
    }
    lower
        .strip_prefix("node-")
        .and_then(|rest| rest.strip_suffix(".synod"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_digit()))
}

/// Where a replica's or client's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate(s), PEM.
    pub ca: PathBuf,
    /// This party's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// This party's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `certgen::generate_dev_certs` writes for `name` (`node-<id>` or
    /// `client`) in `dir`: `ca.pem`, `<name>.pem` and `<name>-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    /// Reads and parses the three files.
    ///
    /// # Errors
    /// [`TlsError::Read`] when a file cannot be read, [`TlsError::NotPem`]
    /// when it holds no PEM at all or a damaged PEM section,
    /// [`TlsError::NoCertificate`] or [`TlsError::NoPrivateKey`] when the PEM
    /// sections expected are missing. Each names the file.
    pub fn load(&self) -> Result<TlsMaterial> {
        let ca = read_file(&self.ca)?;
        let cert = read_file(&self.cert)?;
        let key = read_file(&self.key)?;
        Ok(TlsMaterial {
            ca_certs: parse_certificates(&self.ca, &ca)?,
            cert_chain: parse_certificates(&self.cert, &cert)?,
            key: parse_private_key(&self.key, &key)?,
        })
    }

    /// Reads and parses the three files, as [`TlsFiles::load`], and checks
    /// them fit for replica `node_id` with [`check_node_material`].
    ///
    /// # Errors
    /// As [`TlsFiles::load`] and [`check_node_material`].
    pub fn load_for_node(&self, node_id: u64) -> Result<TlsMaterial> {
        let material = self.load()?;
        check_node_material(self, &material, node_id)?;
        Ok(material)
    }
}

/// Checks that `material`, loaded from `files`, is fit for replica
/// `node_id`, so that a bad file fails at `--check` or start rather than in
/// every handshake: the CA certificates are usable trust anchors; the
/// certificate chains to one of them and is usable both as a TLS server
/// and a TLS client certificate (replicas dial each other); it is valid for
/// [`node_server_name`]`(node_id)`; and the private key is the one the
/// certificate was issued for. Nothing else a certificate may carry is
/// looked at. Never panics, whatever the files hold.
///
/// # Errors
/// [`TlsError::InvalidCa`], [`TlsError::NotSignedByCa`],
/// [`TlsError::CertificateRefused`], [`TlsError::WrongNode`],
/// [`TlsError::UnsupportedKey`] or [`TlsError::KeyMismatch`], each naming
/// the files concerned.
pub fn check_node_material(files: &TlsFiles, material: &TlsMaterial, node_id: u64) -> Result<()> {
    let provider = provider();
    let roots = material.root_store().map_err(|error| match error {
        TlsError::InvalidCa(detail) => {
            TlsError::InvalidCa(format!("{}: {detail}", files.ca.display()))
        }
        other => other,
    })?;
    let Some((leaf, intermediates)) = material.cert_chain.split_first() else {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let now = UnixTime::now();
    let refused = |usage: &'static str| {
        move |error: rustls::Error| certificate_refusal(files, node_id, usage, error)
    };
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|error| TlsError::InvalidCa(format!("{}: {error}", files.ca.display())))?;
    client_verifier
        .verify_client_cert(leaf, intermediates, now)
        .map_err(refused("as a TLS client certificate"))?;
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|error| TlsError::InvalidCa(format!("{}: {error}", files.ca.display())))?;
    let name = ServerName::try_from(node_server_name(node_id))
        .map_err(|error| TlsError::Config(error.to_string()))?;
    server_verifier
        .verify_server_cert(leaf, intermediates, &name, &[], now)
        .map_err(refused("as a TLS server certificate"))?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&material.key).map_err(|error| {
            TlsError::UnsupportedKey {
                key: files.key.clone(),
                detail: error.to_string(),
            }
        })?;
    let certified = rustls::sign::CertifiedKey::new(material.cert_chain.clone(), signing_key);
    match certified.keys_match() {
        // A key whose public half cannot be derived cannot be compared;
        // rustls accepts it in the same way.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(_) => Err(TlsError::KeyMismatch {
            key: files.key.clone(),
            cert: files.cert.clone(),
        }),
    }
}

/// The error for a certificate that webpki refused for `usage`.
fn certificate_refusal(
    files: &TlsFiles,
    node_id: u64,
    usage: &str,
    error: rustls::Error,
) -> TlsError {
    use rustls::CertificateError;
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => TlsError::NotSignedByCa {
            cert: files.cert.clone(),
            ca: files.ca.clone(),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsError::WrongNode {
            cert: files.cert.clone(),
            name: node_server_name(node_id),
        },
        other => TlsError::CertificateRefused {
            cert: files.cert.clone(),
            detail: format!("{usage}: {other}"),
        },
    }
}

/// Parsed TLS material: the CA roots, this party's chain and its key.
pub struct TlsMaterial {
    /// The cluster CA's certificates; peers must chain to one of them.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// This party's certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This party's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            ca_certs: self.ca_certs.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial")
            .field("ca_certs", &self.ca_certs.len())
            .field("cert_chain", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Parses PEM held in memory; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`TlsFiles::load`].
    pub fn from_pem(origin: &str, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsMaterial> {
        let path = |what: &str| PathBuf::from(format!("{origin} ({what})"));
        Ok(TlsMaterial {
            ca_certs: parse_certificates(&path("CA"), ca)?,
            cert_chain: parse_certificates(&path("certificate"), cert)?,
            key: parse_private_key(&path("key"), key)?,
        })
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for certificate in &self.ca_certs {
            roots
                .add(certificate.clone())
                .map_err(|error| TlsError::InvalidCa(error.to_string()))?;
        }
        Ok(Arc::new(roots))
    }
}

/// A TLS setup error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not PEM, or a PEM section in it is damaged.
    #[error("{} is not a valid PEM file: {detail}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A UDP socket could not be bound.
    #[error("cannot bind {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{} holds no certificate (expected a \"BEGIN CERTIFICATE\" section)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key.
    #[error("{} holds no private key (expected a \"BEGIN PRIVATE KEY\" section)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate is not usable as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    /// rustls refused the configuration (for example a key that does not
    /// match the certificate).
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// A certificate does not chain to the configured CA.
    #[error(
        "certificate {} is not signed by the CA {}: issue it from that CA, or point \
         tls.ca at the CA that signed it",
        cert.display(),
        ca.display()
    )]
    NotSignedByCa {
        /// The certificate.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
    },
    /// A certificate chains to the CA but is refused for another reason
    /// (expired, not yet valid, or not made for TLS server and client use).
    #[error("certificate {} is refused {detail}", cert.display())]
    CertificateRefused {
        /// The certificate.
        cert: PathBuf,
        /// How it is used and why it is refused.
        detail: String,
    },
    /// A replica's certificate does not name the replica.
    #[error(
        "certificate {} does not name {name}: it was made for another node; use the \
         certificate issued for {name}",
        cert.display()
    )]
    WrongNode {
        /// The certificate.
        cert: PathBuf,
        /// The name it should carry, [`node_server_name`].
        name: String,
    },
    /// A private key of a kind rustls cannot sign with.
    #[error("key {} is not a usable private key: {detail}", key.display())]
    UnsupportedKey {
        /// The key file.
        key: PathBuf,
        /// Why.
        detail: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error(
        "key {} does not match certificate {}: use the key the certificate was issued with",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate.
        cert: PathBuf,
    },
}

/// Result of the TLS functions.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn check_looks_like_pem(path: &Path, bytes: &[u8]) -> Result<()> {
    let begin = b"-----BEGIN ";
    if !bytes.windows(begin.len()).any(|window| window == begin) {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
            detail: "no \"-----BEGIN\" line".into(),
        });
    }
    Ok(())
}

pub(crate) fn parse_certificates(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>> {
    check_looks_like_pem(path, bytes)?;
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| TlsError::NotPem {
            path: path.to_owned(),
            detail: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

pub(crate) fn parse_private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    check_looks_like_pem(path, bytes)?;
    PrivateKeyDer::from_pem_slice(bytes).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => TlsError::NotPem {
            path: path.to_owned(),
            detail: other.to_string(),
        },
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration: TLS 1.3 only, ring, ALPN `synod/1`, and a
/// client certificate signed by the cluster CA required of every client.
///
/// # Errors
/// [`TlsError::InvalidCa`] or [`TlsError::Config`].
pub fn server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(material.root_store()?, provider.clone())
            .build()
            .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A rustls client configuration: TLS 1.3 only, ring, ALPN `synod/1`,
/// verifying the server against the cluster CA and presenting this party's
/// certificate.
///
/// # Errors
/// [`TlsError::InvalidCa`] or [`TlsError::Config`].
pub fn client_config(material: &TlsMaterial) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(material.root_store()?)
        .with_client_auth_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A quinn server configuration over [`server_config`] with the given
/// transport settings.
///
/// # Errors
/// As [`server_config`].
pub fn quic_server_config(
    material: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(server_config(material)?)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// A quinn client configuration over [`client_config`] with the given
/// transport settings.
///
/// # Errors
/// As [`client_config`].
pub fn quic_client_config(
    material: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(client_config(material)?)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// Whether `certificate` is valid for `name` (a DNS name or an IP address).
/// Used to check that a peer claiming node id `n` holds a certificate for
/// [`node_server_name`]`(n)`; the certificate's chain to the CA was checked
/// by the TLS handshake.
pub fn certificate_names(certificate: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(certificate) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
}

/// The identity a client certificate gives its holder: the certificate's
/// subject distinguished name in RFC 4514 form (for example
/// `CN=billing-service`), or `None` when the certificate cannot be parsed or
/// has an empty subject. Sessions belong to this identity, and the
/// per-identity bounds count by it: every certificate with the same subject
/// is the same client (so a renewed certificate keeps its sessions).
pub fn client_identity(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let subject = parsed.subject().to_string();
    (!subject.is_empty()).then_some(subject)
}

/// When `certificate` stops being valid (its notAfter), or `None` when it
/// cannot be parsed.
pub fn certificate_not_after(certificate: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let seconds = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    std::time::SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// The certificate chain a connection's peer presented (leaf first), if any.
pub fn peer_certificates(connection: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|chain| *chain)
}

// ---------------------------------------------------------------------------
// Frames over QUIC streams.

/// A frame could not be read from a stream.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameReadError {
    /// The frame was oversize or malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed (reset, connection lost).
    #[error("stream failed: {0}")]
    Stream(#[from] quinn::ReadError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame received.
        buffered: usize,
    },
}

/// Reads length-prefixed frames from a QUIC receive stream, buffering reads
/// so that many small frames cost one read. A frame's length is checked
/// against the bound before its body is buffered.
#[derive(Debug)]
pub struct FrameReader {
    stream: quinn::RecvStream,
    buffer: Vec<u8>,
    start: usize,
    frame_bytes_max: u64,
    last_frame_bytes: u64,
}

impl FrameReader {
    /// Reads frames of at most `frame_bytes_max` bytes from `stream`.
    pub fn new(stream: quinn::RecvStream, frame_bytes_max: u64) -> FrameReader {
        FrameReader {
            stream,
            buffer: Vec::new(),
            start: 0,
            frame_bytes_max,
            last_frame_bytes: 0,
        }
    }

    /// Changes the bound on the frames read from now on (a stream whose
    /// first frames are small control frames and whose later ones are not).
    pub fn set_max_bytes(&mut self, frame_bytes_max: u64) {
        self.frame_bytes_max = frame_bytes_max;
    }

    /// Bytes (prefix included) of the frame [`FrameReader::next`] returned
    /// last: what it cost on the wire, for byte budgets.
    pub fn last_frame_bytes(&self) -> u64 {
        self.last_frame_bytes
    }

    /// The stream, to stop it.
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }

    /// The next frame, or `None` when the stream finished cleanly between
    /// frames. Cancel-safe: dropping the future loses no bytes, so it may be
    /// raced in `tokio::select!`.
    ///
    /// # Errors
    /// [`FrameReadError`]; after one, the stream is no longer usable.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameReadError> {
        loop {
            if let Some(frame) = self.take_buffered()? {
                return Ok(Some(decode_frame(&frame)?));
            }
            if !self.fill().await? {
                let buffered = self.buffer.len() - self.start;
                if buffered == 0 {
                    return Ok(None);
                }
                return Err(FrameReadError::Truncated { buffered });
            }
        }
    }

    /// A whole frame's body from the buffer, if one is there.
    fn take_buffered(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let available = &self.buffer[self.start..];
        let Some(header) = available.get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let mut prefix = [0u8; FRAME_HEADER_BYTES];
        prefix.copy_from_slice(header);
        let length = frame_length(prefix, self.frame_bytes_max)?;
        let Some(body) = available.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length) else {
            return Ok(None);
        };
        let body = body.to_vec();
        self.start += FRAME_HEADER_BYTES + length;
        self.last_frame_bytes = (FRAME_HEADER_BYTES + length) as u64;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        Ok(Some(body))
    }

    /// Reads more bytes; `false` at the end of the stream. Cancel-safe:
    /// the buffer changes only once a read returned.
    async fn fill(&mut self) -> Result<bool, FrameReadError> {
        // Drop consumed bytes before growing, so the buffer never holds
        // more than one frame bound plus one read.
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        match self.stream.read_chunk(READ_CHUNK_BYTES, true).await? {
            Some(chunk) => {
                self.buffer.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The stream and the bytes read from it but not yet returned as
    /// frames, to read the rest of the stream unframed.
    pub fn into_parts(mut self) -> (quinn::RecvStream, Vec<u8>) {
        self.buffer.drain(..self.start);
        (self.stream, self.buffer)
    }
}

/// Encodes `frames` back to back into one buffer, for one write.
pub fn encode_frames<'a, T: Serialize + 'a>(frames: impl IntoIterator<Item = &'a T>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(&encode_frame(frame));
    }
    bytes
}

// ---------------------------------------------------------------------------
// The handshake.

/// A connection or handshake failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The connection could not be started (bad address or server name).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed, including by TLS (a certificate
    /// the other side does not trust).
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing the hello failed.
    #[error("cannot send the hello: {0}")]
    Write(#[from] quinn::WriteError),
    /// The reply could not be read.
    #[error("cannot read the hello reply: {0}")]
    Read(#[from] FrameReadError),
    /// The stream ended without a reply.
    #[error("the replica closed the stream without answering the hello")]
    NoReply,
    /// The replica refused, with its reason.
    #[error("refused by the replica: {reason}")]
    Refused {
        /// The replica's reason.
        reason: String,
    },
    /// No answer in time.
    #[error("no hello reply within {0:?}")]
    TimedOut(Duration),
    /// A replica refused this replica's cluster identity, with its reason.
    #[error("refused by the replica: {reason}")]
    IdentityRefused {
        /// The replica's reason.
        reason: String,
        /// What does not match.
        conflict: crate::wire::IdentityConflict,
    },
}

/// A connection after a successful handshake; for a client, `send` and
/// `frames` are its session stream.
#[derive(Debug)]
pub struct Handshaken {
    /// The QUIC connection.
    pub connection: quinn::Connection,
    /// The sending half of the handshake stream.
    pub send: quinn::SendStream,
    /// The receiving half of the handshake stream.
    pub frames: FrameReader,
    /// The replica's protocol version.
    pub protocol_version: u64,
    /// The replica's node id.
    pub node_id: u64,
}

/// Opens the handshake stream on `connection`, sends `hello` and waits for a
/// [`HelloReply`] within `timeout`.
///
/// # Errors
/// [`HandshakeError::Refused`] with the replica's reason, or a failure of
/// the connection or stream.
pub async fn handshake(
    connection: quinn::Connection,
    hello: &Hello,
    frame_bytes_max: u64,
    timeout: Duration,
) -> Result<Handshaken, HandshakeError> {
    let exchange = async {
        let (mut send, receive) = connection.open_bi().await?;
        send.write_all(&encode_frame(hello)).await?;
        let mut frames = FrameReader::new(receive, frame_bytes_max);
        match frames.next::<HelloReply>().await? {
            None => Err(HandshakeError::NoReply),
            Some(HelloReply::Refused { reason }) => Err(HandshakeError::Refused { reason }),
            Some(HelloReply::IdentityRefused { reason, conflict }) => {
                Err(HandshakeError::IdentityRefused { reason, conflict })
            }
            Some(HelloReply::Welcome {
                protocol_version,
                node_id,
            }) => Ok((send, frames, protocol_version, node_id)),
        }
    };
    let (send, frames, protocol_version, node_id) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::TimedOut(timeout))??;
    Ok(Handshaken {
        connection,
        send,
        frames,
        protocol_version,
        node_id,
    })
}

/// Connects `endpoint` to the replica at `address` (whose certificate must
/// be valid for `server_name`), sends `Hello::Client` with
/// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) and returns the session
/// stream. The whole exchange is bounded by `timeout`.
///
/// `endpoint` must have a default client configuration (see
/// [`client_endpoint`]).
///
/// # Errors
/// [`HandshakeError`]; a certificate the replica does not trust shows as
/// [`HandshakeError::Connection`] or as a read failure of the reply.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    server_name: &str,
    frame_bytes_max: u64,
    timeout: Duration,
) -> Result<Handshaken, HandshakeError> {
    let connecting = endpoint.connect(address, server_name)?;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| HandshakeError::TimedOut(timeout))??;
    let hello = Hello::Client {
        protocol_version: crate::PROTOCOL_VERSION,
    };
    handshake(connection, &hello, frame_bytes_max, timeout).await
}

/// A client endpoint bound to `bind` (e.g. `127.0.0.1:0`) whose default
/// configuration presents `material`'s certificate and trusts its CA. Must be
/// called inside a tokio runtime.
///
/// # Errors
/// [`TlsError`] for the configuration, or [`TlsError::Bind`].
pub fn client_endpoint(
    material: &TlsMaterial,
    bind: SocketAddr,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::Endpoint> {
    let config = quic_client_config(material, transport)?;
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|source| TlsError::Bind {
        address: bind,
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_encode_back_to_back() {
        let frames = [
            Hello::Client {
                protocol_version: 1,
            },
            Hello::Client {
                protocol_version: 2,
            },
        ];
        let bytes = encode_frames(frames.iter());
        let mut expected = encode_frame(&frames[0]);
        expected.extend_from_slice(&encode_frame(&frames[1]));
        assert_eq!(bytes, expected);
    }
}
