//! `synod certs`: certificates for replicas (with the host names and IP
//! addresses they are reached by) and for clients, issued from the CA in
//! `--dir` (or the one named by `--ca-cert` and `--ca-key`), or from a new
//! CA made there when it holds none. Replica certificates carry the
//! replica-only identity the peer port requires (both TLS usages and the
//! `synod-replica://node-<id>` name; see `synod_proto::tls`); client names
//! of a replica's form are refused. Every certificate expires: leaves
//! after `--days` (one year), a new CA after `--ca-days` (ten years).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use synod_proto::certgen::{
    CertificateAuthority, IssuedCertificate, CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS,
};
use synod_proto::tls::TlsFiles;

/// `synod certs` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write the PEM files into (created if missing). When it
    /// holds a CA (ca.pem and ca-key.pem), certificates are issued from it.
    #[arg(long, default_value = "synod-certs", value_name = "DIR")]
    pub dir: PathBuf,
    /// A replica's certificate: its id and the host names or IP addresses
    /// it is reached by, e.g. `--node 1=db1.example.com,10.0.0.1`. Repeat
    /// for each replica.
    #[arg(long = "node", value_name = "ID=HOST[,HOST...]")]
    pub nodes: Vec<String>,
    /// A client certificate with this name (written as NAME.pem and
    /// NAME-key.pem); `client` when no --node or --client is given.
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
    /// Issue from this existing CA certificate (PEM) rather than the one in
    /// --dir; it is copied into --dir as ca.pem, its key is not.
    #[arg(
        long,
        value_name = "FILE",
        requires = "ca_key",
        conflicts_with = "new_ca"
    )]
    pub ca_cert: Option<PathBuf>,
    /// The private key of the CA named by --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Make a new CA in --dir even though it holds one (with --force; every
    /// certificate of the old CA must then be replaced).
    #[arg(long)]
    pub new_ca: bool,
    /// Days the certificates issued are valid for.
    #[arg(long, default_value_t = LEAF_VALIDITY_DAYS, value_name = "DAYS")]
    pub days: u32,
    /// Days a new CA is valid for (only when one is made).
    #[arg(long, value_name = "DAYS")]
    pub ca_days: Option<u32>,
    /// Replace files that exist.
    #[arg(long)]
    pub force: bool,
}

fn parse_node(argument: &str) -> anyhow::Result<(u64, Vec<String>)> {
    let (id, hosts) = argument
        .split_once('=')
        .with_context(|| format!("--node {argument}: expected ID=HOST[,HOST...]"))?;
    let id: u64 = id
        .trim()
        .parse()
        .with_context(|| format!("--node {argument}: {id} is not a node id"))?;
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(String::from)
        .collect();
    if hosts.is_empty() {
        bail!("--node {argument}: name at least one host or IP address");
    }
    let own = synod_proto::tls::node_server_name(id);
    if let Some(host) = hosts
        .iter()
        .find(|host| synod_proto::tls::is_replica_name(host) && !host.eq_ignore_ascii_case(&own))
    {
        bail!("--node {argument}: {host} names another replica");
    }
    Ok((id, hosts))
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let fine = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !fine {
        bail!("--client {name:?}: use letters, digits, '-', '_' and '.'");
    }
    if synod_proto::tls::is_replica_name(name) {
        bail!("--client {name:?}: that is a replica's name; a client certificate cannot carry it");
    }
    Ok(())
}

fn write(dir: &Path, name: &str, issued: &IssuedCertificate, force: bool) -> anyhow::Result<()> {
    let files = TlsFiles::in_dir(dir, name);
    for path in [&files.cert, &files.key] {
        if path.exists() && !force {
            bail!("{} exists; pass --force to replace it", path.display());
        }
    }
    synod_proto::certgen::write_pair(&files.cert, &files.key, issued)?;
    say!(
        "  {}  {}  (valid until {} UTC)",
        files.cert.display(),
        files.key.display(),
        date(issued.not_after)
    );
    Ok(())
}

fn date(time: SystemTime) -> String {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    crate::render::time_ms(ms)
}

/// The CA to issue from: the one named by --ca-cert and --ca-key (its
/// certificate copied into the directory), the one the directory holds, or
/// a new one written there.
fn certificate_authority(args: &CertsArgs) -> anyhow::Result<CertificateAuthority> {
    let ca_cert = args.dir.join("ca.pem");
    let ca_key = args.dir.join("ca-key.pem");
    let existing = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ if ca_cert.exists() && !args.new_ca => Some((ca_cert.clone(), ca_key.clone())),
        _ => None,
    };
    let Some((cert, key)) = existing else {
        let days = args.ca_days.unwrap_or(CA_VALIDITY_DAYS);
        let ca =
            CertificateAuthority::generate("Synod CA", days).context("cannot generate the CA")?;
        say!("wrote (certificate, private key):");
        write(&args.dir, "ca", &ca.certificate(), args.force)?;
        return Ok(ca);
    };
    if args.ca_days.is_some() {
        bail!(
            "--ca-days sets the validity of a new CA, and this issues from the CA {}              (pass --new-ca --force to replace the CA in {})",
            cert.display(),
            args.dir.display()
        );
    }
    if !key.exists() {
        bail!(
            "{} is missing: issuing from the CA {} needs its private key",
            key.display(),
            cert.display()
        );
    }
    let ca = CertificateAuthority::load(&cert, &key)?;
    say!(
        "issuing from the CA {} (valid until {} UTC)",
        cert.display(),
        date(ca.not_after())
    );
    say!("wrote (certificate, private key):");
    if cert != ca_cert {
        let pem = ca.certificate().cert_pem;
        match std::fs::read_to_string(&ca_cert) {
            Ok(found) if found == pem => {}
            Ok(_) if !args.force => bail!(
                "{} holds another CA; pass --force to replace it with {}",
                ca_cert.display(),
                cert.display()
            ),
            _ => {
                std::fs::write(&ca_cert, pem)
                    .with_context(|| format!("cannot write {}", ca_cert.display()))?;
                say!("  {}  (the CA certificate, copied)", ca_cert.display());
            }
        }
    }
    Ok(ca)
}

/// Runs `synod certs`.
///
/// # Errors
/// Bad arguments, an unusable CA, existing files without --force, or a
/// failed write.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let nodes = args
        .nodes
        .iter()
        .map(|node| parse_node(node))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut clients = args.clients.clone();
    if nodes.is_empty() && clients.is_empty() {
        clients.push("client".into());
    }
    for name in &clients {
        check_name(name)?;
    }
    if args.new_ca && args.dir.join("ca.pem").exists() && !args.force {
        bail!(
            "{} already holds a CA; pass --force with --new-ca to replace it (every              certificate it issued must then be replaced)",
            args.dir.display()
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let ca = certificate_authority(args)?;
    for (id, hosts) in &nodes {
        let issued = ca
            .issue_node(*id, hosts, args.days)
            .with_context(|| format!("cannot issue the certificate of replica {id}"))?;
        write(&args.dir, &format!("node-{id}"), &issued, args.force)?;
    }
    for name in &clients {
        let issued = ca
            .issue_client(name, args.days)
            .with_context(|| format!("cannot issue the client certificate {name}"))?;
        write(&args.dir, name, &issued, args.force)?;
    }
    say!(
        "Keep ca-key.pem secret. Each replica's [tls] names ca.pem, node-<id>.pem and \
         node-<id>-key.pem; clients use --ca ca.pem --cert NAME.pem --key NAME-key.pem. \
         A replica picks up a replaced certificate by itself (or on SIGHUP)."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_arguments_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_node("2=a.example,10.0.0.2").expect("parses"),
            (2, vec!["a.example".to_string(), "10.0.0.2".to_string()])
        );
        assert!(parse_node("x=a").is_err());
        assert!(parse_node("1=").is_err());
        assert!(check_name("../evil").is_err());
        assert!(check_name("app-1").is_ok());
        assert!(check_name("node-3.synod").is_err());
        assert!(parse_node("1=node-2.synod").is_err());
        assert!(parse_node("1=node-1.synod,10.0.0.1").is_ok());
    }
}
