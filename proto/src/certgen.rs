//! Making certificates: a cluster CA, generated here or loaded from its PEM
//! files, that issues replica and client certificates, for `synod certs`,
//! `synod dev` and tests. Behind the `certgen` feature, so that an
//! application linking `synod-client` compiles no certificate authority.
//!
//! The certificates made here are what [`crate::tls`] requires: a replica's
//! carries both TLS usages, its `synod-replica://node-<id>` URI and its
//! `node-<id>.synod` DNS name (see the trust model there); a client's has
//! the clientAuth usage only and may not carry a replica's name. Keys are
//! ECDSA P-256, generated on the spot.
//!
//! # Validity
//! Every certificate made here expires: a leaf after the days it is asked
//! for ([`LEAF_VALIDITY_DAYS`], one year, unless told otherwise), a CA
//! generated here after [`CA_VALIDITY_DAYS`] (ten years, unless told
//! otherwise). Validity starts [`BACKDATE_MINUTES`] before now, so that a
//! host whose clock is a little behind accepts a new certificate at once.
//! A leaf never outlives the CA that signed it (every verifier refuses it
//! once the CA has expired), so one asked to is cut to the CA's end;
//! [`IssuedCertificate::not_after`] says when each one ends.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use time::OffsetDateTime;

use crate::tls::{is_replica_name, node_server_name, replica_uri, TlsFiles};

/// Days a leaf certificate is valid for unless told otherwise: one year.
pub const LEAF_VALIDITY_DAYS: u32 = 365;

/// Days a CA generated here is valid for unless told otherwise: ten years.
pub const CA_VALIDITY_DAYS: u32 = 3650;

/// The longest validity asked for that is accepted: one hundred years.
pub const VALIDITY_DAYS_MAX: u32 = 36_500;

/// Minutes before now that a new certificate's validity starts.
pub const BACKDATE_MINUTES: i64 = 5;

/// Why a certificate could not be made, or a CA loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CertgenError {
    /// rcgen refused the certificate (for example a host that is not a
    /// valid DNS name).
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file given as the CA's certificate is not one a CA can issue
    /// with: not PEM, not a CA, or outside its validity.
    #[error("{} is not a usable CA certificate: {detail}", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The file given as the CA's key is not a key, or not the CA's.
    #[error("{} is not the private key of the CA {}: {detail}", key.display(), cert.display())]
    NotCaKey {
        /// The key file.
        key: PathBuf,
        /// The CA's certificate file.
        cert: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A certificate was asked for with a name only (another) replica's
    /// certificate may carry.
    #[error("{0:?} is a name only a replica's own certificate may carry; choose another name")]
    ReservedName(String),
    /// A validity of no days, or of more than [`VALIDITY_DAYS_MAX`].
    #[error("a validity of {0} days: give 1 to {VALIDITY_DAYS_MAX} days")]
    Validity(u32),
}

/// Result of the certificate functions.
pub type Result<T, E = CertgenError> = std::result::Result<T, E>;

/// A PEM certificate with its PEM private key, and when it expires.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The end of its validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCertificate")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate authority able to issue replica and client certificates:
/// generated on the spot, or an existing one loaded from its files.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a self-signed CA with the given common name, valid for
    /// `validity_days`.
    ///
    /// # Errors
    /// [`CertgenError::Validity`] or [`CertgenError::Generate`].
    pub fn generate(common_name: &str, validity_days: u32) -> Result<CertificateAuthority> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity(validity_days, None)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: certificate.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// Loads an existing CA from its certificate (PEM; the first
    /// certificate in the file) and its private key (PEM), to issue more
    /// certificates that its cluster accepts. The certificate must be a CA
    /// within its validity, and the key must be its own.
    ///
    /// # Errors
    /// [`CertgenError::Read`] for a file that cannot be read,
    /// [`CertgenError::NotCa`] or [`CertgenError::NotCaKey`] saying what
    /// is wrong, naming the file. Never panics, whatever the files hold.
    pub fn load(cert: &Path, key: &Path) -> Result<CertificateAuthority> {
        let cert_bytes = read(cert)?;
        let key_bytes = read(key)?;
        let not_ca = |detail: String| CertgenError::NotCa {
            path: cert.to_path_buf(),
            detail,
        };
        let not_key = |detail: String| CertgenError::NotCaKey {
            key: key.to_path_buf(),
            cert: cert.to_path_buf(),
            detail,
        };
        let der: CertificateDer<'static> = crate::tls::parse_certificates(cert, &cert_bytes)
            .map_err(|error| not_ca(error.to_string()))?
            .swap_remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|error| not_ca(format!("it does not parse: {error}")))?;
        let is_ca = parsed
            .basic_constraints()
            .map_err(|error| not_ca(format!("its basic constraints do not parse: {error}")))?
            .is_some_and(|constraints| constraints.value.ca);
        if !is_ca {
            return Err(not_ca(
                "it is not a CA certificate (no basic constraint CA:TRUE); give the \
                 certificate of the CA that signs the cluster's certificates"
                    .into(),
            ));
        }
        let window = parsed.validity();
        let not_after = window.not_after.to_datetime();
        if !window.is_valid() {
            return Err(not_ca(format!(
                "it is valid from {} to {}, and not now",
                window.not_before, window.not_after
            )));
        }
        let key_text = std::str::from_utf8(&key_bytes)
            .map_err(|_| not_key("the file is not PEM text".into()))?;
        let key_pair = KeyPair::from_pem(key_text)
            .map_err(|error| not_key(format!("it does not load as a private key: {error}")))?;
        if key_pair.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(not_key(
                "its public half is not the certificate's public key".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|error| not_ca(format!("rcgen cannot issue with it: {error}")))?;
        let cert_pem =
            String::from_utf8(cert_bytes).map_err(|_| not_ca("the file is not PEM text".into()))?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem,
            not_after,
        })
    }

    /// The CA's certificate and key, PEM, as they were generated or loaded.
    pub fn certificate(&self) -> IssuedCertificate {
        IssuedCertificate {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.issuer.key().serialize_pem(),
            not_after: self.not_after.into(),
        }
    }

    /// The end of the CA's validity: no certificate it issues outlasts it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    /// Issues a replica's certificate, valid for TLS server and client
    /// authentication (replicas dial each other), naming the replica URI
    /// [`replica_uri`]`(node_id)`, the DNS name
    /// [`node_server_name`]`(node_id)` and every host in `hosts` (DNS names
    /// or IP addresses, such as `localhost` and `127.0.0.1`): what
    /// [`crate::tls::replica_certificate_node`] requires. Valid for
    /// `validity_days`, or to the CA's end if that comes first.
    ///
    /// # Errors
    /// [`CertgenError::Generate`], for example for a host that is not a
    /// valid DNS name; [`CertgenError::ReservedName`] for a host naming
    /// another replica; [`CertgenError::Validity`].
    pub fn issue_node(
        &self,
        node_id: u64,
        hosts: &[String],
        validity_days: u32,
    ) -> Result<IssuedCertificate> {
        let own = node_server_name(node_id);
        if let Some(host) = hosts
            .iter()
            .find(|host| is_replica_name(host) && !host.eq_ignore_ascii_case(&own))
        {
            return Err(CertgenError::ReservedName(host.clone()));
        }
        let mut names = vec![own];
        names.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        let uri = rcgen::string::Ia5String::try_from(replica_uri(node_id))?;
        params.subject_alt_names.push(SanType::URI(uri));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("synod node {node_id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, validity_days)
    }

    /// Issues a client certificate (client authentication only) with the
    /// given common name, valid for `validity_days` or to the CA's end if
    /// that comes first; it names no host and no replica URI, so it cannot
    /// pose as a replica.
    ///
    /// # Errors
    /// [`CertgenError::Generate`]; [`CertgenError::ReservedName`] for a
    /// common name of a replica's form (`node-<id>.synod`, or one naming
    /// `synod-replica`); [`CertgenError::Validity`].
    pub fn issue_client(&self, common_name: &str, validity_days: u32) -> Result<IssuedCertificate> {
        if is_replica_name(common_name) {
            return Err(CertgenError::ReservedName(common_name.to_string()));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, validity_days)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        validity_days: u32,
    ) -> Result<IssuedCertificate> {
        let (not_before, not_after) = validity(validity_days, Some(self.not_after))?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            not_after: not_after.into(),
        })
    }
}

/// The validity of a certificate made now for `days`, ending no later than
/// `ends_by` (its CA's end). Whole seconds, as X.509 keeps them.
fn validity(
    days: u32,
    ends_by: Option<OffsetDateTime>,
) -> Result<(OffsetDateTime, OffsetDateTime)> {
    if days == 0 || days > VALIDITY_DAYS_MAX {
        return Err(CertgenError::Validity(days));
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let not_before = now - time::Duration::minutes(BACKDATE_MINUTES);
    let asked = now + time::Duration::days(i64::from(days));
    let not_after = ends_by.map_or(asked, |ends_by| asked.min(ends_by));
    Ok((not_before, not_after))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CertgenError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The files [`generate_dev_certs`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    /// The directory holding them.
    pub dir: PathBuf,
    /// The replicas certificates were made for.
    pub node_ids: Vec<u64>,
}

impl DevCerts {
    /// Replica `node_id`'s files (`ca.pem`, `node-<id>.pem`, `node-<id>-key.pem`).
    pub fn node(&self, node_id: u64) -> TlsFiles {
        TlsFiles::in_dir(&self.dir, &format!("node-{node_id}"))
    }

    /// The client's files (`ca.pem`, `client.pem`, `client-key.pem`).
    pub fn client(&self) -> TlsFiles {
        TlsFiles::in_dir(&self.dir, "client")
    }

    /// The CA's certificate (`ca.pem`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA's key (`ca-key.pem`), kept to issue more certificates.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
}

/// Generates a CA, a certificate per replica in `node_ids` (valid for
/// `hosts`, e.g. `localhost` and `127.0.0.1`, and for its
/// [`node_server_name`]) and a client certificate named `synod client`,
/// with the default validities, and writes them as PEM into `dir` (created
/// if missing): `ca.pem`, `ca-key.pem`, `node-<id>.pem`,
/// `node-<id>-key.pem`, `client.pem`, `client-key.pem`. Private keys are
/// written readable by their owner only (on Unix). Existing files are
/// overwritten.
///
/// # Errors
/// [`CertgenError::Generate`] or [`CertgenError::Write`].
pub fn generate_dev_certs(dir: &Path, node_ids: &[u64], hosts: &[String]) -> Result<DevCerts> {
    std::fs::create_dir_all(dir).map_err(|source| CertgenError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let certs = DevCerts {
        dir: dir.to_owned(),
        node_ids: node_ids.to_vec(),
    };
    let ca = CertificateAuthority::generate("Synod development CA", CA_VALIDITY_DAYS)?;
    write_pair(&certs.ca_cert(), &certs.ca_key(), &ca.certificate())?;
    for &node_id in node_ids {
        let files = certs.node(node_id);
        let issued = ca.issue_node(node_id, hosts, LEAF_VALIDITY_DAYS)?;
        write_pair(&files.cert, &files.key, &issued)?;
    }
    let files = certs.client();
    let issued = ca.issue_client("synod client", LEAF_VALIDITY_DAYS)?;
    write_pair(&files.cert, &files.key, &issued)?;
    Ok(certs)
}

/// Writes a certificate to `cert` and its key to `key`, the key readable
/// by its owner only (on Unix), each synced to disk; files that exist are
/// replaced.
///
/// # Errors
/// [`CertgenError::Write`] naming the file.
pub fn write_pair(cert: &Path, key: &Path, issued: &IssuedCertificate) -> Result<()> {
    write_file(cert, issued.cert_pem.as_bytes(), false)?;
    write_file(key, issued.key_pem.as_bytes(), true)
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut file| {
            // A key file that existed keeps its mode through the open.
            #[cfg(unix)]
            if private {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|source| CertgenError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::UnixTime;

    use super::*;
    use crate::tls::*;

    #[test]
    fn dev_certs_load_and_build_configs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certs = generate_dev_certs(dir.path(), &[1, 2, 3], &hosts).expect("generate");
        for name in [
            "ca.pem",
            "ca-key.pem",
            "node-1.pem",
            "node-3-key.pem",
            "client.pem",
            "client-key.pem",
        ] {
            assert!(dir.path().join(name).is_file(), "{name} written");
        }
        let node = certs.node(2).load().expect("node 2 loads");
        let client = certs.client().load().expect("client loads");
        server_config(&node).expect("server config");
        client_config(&node).expect("a replica dials peers too");
        client_config(&client).expect("client config");
        let transport = Arc::new(quinn::TransportConfig::default());
        quic_server_config(&node, transport.clone()).expect("quic server config");
        quic_client_config(&client, transport).expect("quic client config");

        let leaf = &node.cert_chain[0];
        assert!(certificate_names(leaf, &node_server_name(2)));
        assert!(certificate_names(leaf, "localhost"));
        assert!(certificate_names(leaf, "127.0.0.1"));
        assert!(!certificate_names(leaf, &node_server_name(1)));
        assert!(!certificate_names(
            &client.cert_chain[0],
            &node_server_name(2)
        ));
        assert_eq!(replica_certificate_node(leaf), Ok(2));
        assert!(matches!(
            replica_certificate_node(&client.cert_chain[0]),
            Err(NotReplicaCertificate::Usages(_))
        ));
    }

    fn leaf_of(issued: &IssuedCertificate) -> CertificateDer<'static> {
        parse_certificates(Path::new("test"), issued.cert_pem.as_bytes()).expect("parses")[0]
            .clone()
    }

    #[test]
    fn only_replica_certificates_name_a_replica() {
        let ca = CertificateAuthority::generate("test CA", CA_VALIDITY_DAYS).expect("CA");
        let node = ca
            .issue_node(3, &["localhost".into()], LEAF_VALIDITY_DAYS)
            .expect("node");
        assert_eq!(replica_certificate_node(&leaf_of(&node)), Ok(3));

        // A client certificate that names node-3.synod: the DNS name alone
        // makes no replica.
        let mut params = rcgen::CertificateParams::new(vec![node_server_name(3)]).expect("params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_only = ca.issue(params, LEAF_VALIDITY_DAYS).expect("issued");
        let leaf = leaf_of(&client_only);
        assert!(certificate_names(&leaf, &node_server_name(3)));
        let error = replica_certificate_node(&leaf).expect_err("client usage only");
        assert!(matches!(error, NotReplicaCertificate::Usages(_)), "{error}");
        assert!(error.to_string().contains("clientAuth"), "{error}");

        // Both usages and the DNS name, but no replica URI.
        let mut params = rcgen::CertificateParams::new(vec![node_server_name(3)]).expect("params");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let old_form = ca
            .issue(params.clone(), LEAF_VALIDITY_DAYS)
            .expect("issued");
        assert!(matches!(
            replica_certificate_node(&leaf_of(&old_form)),
            Err(NotReplicaCertificate::ReplicaName(_))
        ));

        // A replica URI for one node and the DNS name of another.
        let mut mismatched = params.clone();
        mismatched.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(replica_uri(4)).expect("uri"),
        ));
        assert!(matches!(
            replica_certificate_node(&leaf_of(
                &ca.issue(mismatched, LEAF_VALIDITY_DAYS).expect("issued")
            )),
            Err(NotReplicaCertificate::DnsName { .. })
        ));

        // Two replica URIs, and a non-canonical id.
        let mut twice = params.clone();
        for id in [3, 4] {
            twice.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(replica_uri(id)).expect("uri"),
            ));
        }
        assert!(replica_certificate_node(&leaf_of(
            &ca.issue(twice, LEAF_VALIDITY_DAYS).expect("issued")
        ))
        .is_err());
        let mut padded = params;
        padded.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("synod-replica://node-03".to_string()).expect("uri"),
        ));
        assert!(replica_certificate_node(&leaf_of(
            &ca.issue(padded, LEAF_VALIDITY_DAYS).expect("issued")
        ))
        .is_err());

        // Garbage is an error, not a panic.
        assert!(matches!(
            replica_certificate_node(&CertificateDer::from(vec![0x30, 0x03, 0x01])),
            Err(NotReplicaCertificate::Unparsable(_))
        ));

        // Replica names are refused for clients and for other replicas.
        for name in ["node-3.synod", "NODE-12.SYNOD", "synod-replica://node-1"] {
            assert!(matches!(
                ca.issue_client(name, LEAF_VALIDITY_DAYS),
                Err(CertgenError::ReservedName(_))
            ));
        }
        assert!(ca
            .issue_client("node-3.example", LEAF_VALIDITY_DAYS)
            .is_ok());
        assert!(matches!(
            ca.issue_node(1, &["node-2.synod".into()], LEAF_VALIDITY_DAYS),
            Err(CertgenError::ReservedName(_))
        ));
        assert!(ca
            .issue_node(1, &["node-1.synod".into()], LEAF_VALIDITY_DAYS)
            .is_ok());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = generate_dev_certs(dir.path(), &[1], &[]).expect("generate");
        let good = certs.node(1);

        let missing = TlsFiles {
            key: dir.path().join("nope.pem"),
            ..good.clone()
        };
        let error = missing.load().expect_err("missing key");
        assert!(matches!(error, TlsError::Read { .. }));
        assert!(error.to_string().contains("nope.pem"), "{error}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"hello").expect("write");
        let error = TlsFiles {
            cert: garbage.clone(),
            ..good.clone()
        }
        .load()
        .expect_err("not pem");
        assert!(matches!(error, TlsError::NotPem { .. }), "{error}");
        assert!(error.to_string().contains("garbage.pem"), "{error}");

        // A certificate where the key should be, and a key where the
        // certificate should be.
        let error = TlsFiles {
            key: good.cert.clone(),
            ..good.clone()
        }
        .load()
        .expect_err("no key");
        assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error}");
        let error = TlsFiles {
            cert: good.key.clone(),
            ..good.clone()
        }
        .load()
        .expect_err("no certificate");
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");

        // A key that does not match the certificate.
        let mismatched = TlsFiles {
            key: certs.client().key,
            ..good
        }
        .load()
        .expect("parses");
        assert!(matches!(
            server_config(&mismatched),
            Err(TlsError::Config(_))
        ));
    }

    #[test]
    fn node_material_is_checked_against_ca_name_and_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["localhost".to_string()];
        let certs = generate_dev_certs(dir.path(), &[1, 2], &hosts).expect("generate");
        certs.node(2).load_for_node(2).expect("node 2's own files");

        // A certificate for node 2 from another CA.
        let other_dir = tempfile::tempdir().expect("temp dir");
        let other = generate_dev_certs(other_dir.path(), &[2], &hosts).expect("generate");
        let foreign = TlsFiles {
            ca: certs.node(2).ca,
            ..other.node(2)
        };
        let error = foreign.load_for_node(2).expect_err("another CA");
        assert!(matches!(error, TlsError::NotSignedByCa { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("node-2.pem is not signed by the CA"),
            "{message}"
        );
        assert!(
            message.contains(&certs.node(2).ca.display().to_string()),
            "{message}"
        );

        // Node 1's key beside node 2's certificate.
        let swapped = TlsFiles {
            key: certs.node(1).key,
            ..certs.node(2)
        };
        let error = swapped.load_for_node(2).expect_err("swapped key");
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("node-1-key.pem does not match certificate"),
            "{error}"
        );

        // Node 1's files configured for node 2.
        let error = certs.node(1).load_for_node(2).expect_err("another node's");
        assert!(matches!(error, TlsError::WrongNode { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("node-1.pem does not name node-2.synod: it was made for another node"),
            "{error}"
        );

        // A client certificate is no replica certificate.
        let error = certs.client().load_for_node(1).expect_err("client's");
        assert!(error.to_string().contains("client.pem"), "{error}");

        // A replica's certificate where the CA should be.
        let error = TlsFiles {
            ca: certs.node(1).cert,
            ..certs.node(2)
        }
        .load_for_node(2)
        .expect_err("no CA");
        assert!(matches!(error, TlsError::NotSignedByCa { .. }), "{error}");
    }

    fn seconds_from_now(time: SystemTime) -> i64 {
        match time.duration_since(SystemTime::now()) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        }
    }

    /// Whether `leaf` chains to `ca` as a client certificate, as a
    /// replica's client port checks it.
    fn accepted_as_client(ca: &CertificateDer<'static>, leaf: &CertificateDer<'static>) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("a trust anchor");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("a verifier");
        verifier
            .verify_client_cert(leaf, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn a_loaded_ca_issues_certificates_its_cluster_accepts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = generate_dev_certs(dir.path(), &[1], &[]).expect("generate");
        let ca = CertificateAuthority::load(&certs.ca_cert(), &certs.ca_key()).expect("loads");

        let files = TlsFiles::in_dir(dir.path(), "node-4");
        let issued = ca
            .issue_node(4, &["db4.example".into()], LEAF_VALIDITY_DAYS)
            .expect("node 4");
        write_pair(&files.cert, &files.key, &issued).expect("written");
        files
            .load_for_node(4)
            .expect("a replica certificate of the same cluster");

        let client = ca.issue_client("billing", 30).expect("client");
        let ca_der = &certs.node(1).load().expect("loads").ca_certs[0];
        assert!(accepted_as_client(ca_der, &leaf_of(&client)));
        let foreign = CertificateAuthority::generate("another CA", 10).expect("CA");
        let stranger = foreign.issue_client("billing", 30).expect("client");
        assert!(!accepted_as_client(ca_der, &leaf_of(&stranger)));
    }

    #[test]
    fn certificates_expire_and_never_outlive_their_ca() {
        let day = 24 * 3600;
        let ca = CertificateAuthority::generate("short CA", 10).expect("CA");
        assert!((seconds_from_now(ca.not_after()) - 10 * day).abs() < 60);
        let leaf = ca.issue_client("app", 3).expect("leaf");
        assert!((seconds_from_now(leaf.not_after) - 3 * day).abs() < 60);
        let long = ca.issue_client("app", 365).expect("leaf");
        assert_eq!(long.not_after, ca.not_after(), "cut to the CA's end");

        // What the certificate says is what was reported.
        let der = leaf_of(&leaf);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parses");
        let not_after: SystemTime = parsed.validity().not_after.to_datetime().into();
        assert_eq!(not_after, leaf.not_after);
        let not_before: SystemTime = parsed.validity().not_before.to_datetime().into();
        let backdated = SystemTime::now()
            .duration_since(not_before)
            .expect("starts before now");
        assert!(backdated >= Duration::from_secs(4 * 60), "{backdated:?}");

        for days in [0, VALIDITY_DAYS_MAX + 1] {
            assert!(matches!(
                ca.issue_client("app", days),
                Err(CertgenError::Validity(_))
            ));
            assert!(matches!(
                CertificateAuthority::generate("CA", days),
                Err(CertgenError::Validity(_))
            ));
        }
    }

    #[test]
    fn loading_a_ca_refuses_what_cannot_issue() {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = generate_dev_certs(dir.path(), &[1], &[]).expect("generate");
        let node = certs.node(1);

        let error = CertificateAuthority::load(&node.cert, &node.key).expect_err("a leaf");
        assert!(matches!(error, CertgenError::NotCa { .. }), "{error}");
        assert!(
            error.to_string().contains("not a CA certificate"),
            "{error}"
        );

        let error = CertificateAuthority::load(&certs.ca_cert(), &node.key).expect_err("wrong key");
        assert!(matches!(error, CertgenError::NotCaKey { .. }), "{error}");
        assert!(error.to_string().contains("node-1-key.pem"), "{error}");

        let missing = dir.path().join("missing-key.pem");
        let error = CertificateAuthority::load(&certs.ca_cert(), &missing).expect_err("no key");
        assert!(matches!(error, CertgenError::Read { .. }), "{error}");

        let error =
            CertificateAuthority::load(&certs.ca_key(), &certs.ca_key()).expect_err("a key");
        assert!(matches!(error, CertgenError::NotCa { .. }), "{error}");

        // A CA that has expired.
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().expect("key");
        let expired = IssuedCertificate {
            cert_pem: params.self_signed(&key).expect("signed").pem(),
            key_pem: key.serialize_pem(),
            not_after: SystemTime::UNIX_EPOCH,
        };
        let (cert, key) = (dir.path().join("old.pem"), dir.path().join("old-key.pem"));
        write_pair(&cert, &key, &expired).expect("written");
        let error = CertificateAuthority::load(&cert, &key).expect_err("expired");
        assert!(error.to_string().contains("and not now"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_written_for_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("k.pem");
        std::fs::write(&key, b"old").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let ca = CertificateAuthority::generate("CA", 10).expect("CA");
        write_pair(&dir.path().join("c.pem"), &key, &ca.certificate()).expect("written");
        let mode = std::fs::metadata(&key)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
