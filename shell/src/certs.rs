//! `synod certs`: a CA and certificates for replicas (with the host names
//! and IP addresses they are reached by) and for clients. Replica
//! certificates carry the replica-only identity the peer port requires
//! (both TLS usages and the `synod-replica://node-<id>` name; see
//! `synod_proto::tls`); client names of a replica's form are refused.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use synod_proto::tls::{CertificateAuthority, IssuedCertificate};

/// `synod certs` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write the PEM files into (created if missing).
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
    /// Replace files that exist (including the CA).
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
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    for path in [&cert, &key] {
        if path.exists() && !force {
            bail!("{} exists; pass --force to replace it", path.display());
        }
    }
    write_pair(&cert, &key, issued)?;
    say!("  {}  {}", cert.display(), key.display());
    Ok(())
}

/// Writes a certificate, and its key readable by its owner only.
pub fn write_pair(cert: &Path, key: &Path, issued: &IssuedCertificate) -> anyhow::Result<()> {
    std::fs::write(cert, &issued.cert_pem)
        .with_context(|| format!("cannot write {}", cert.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options
        .open(key)
        .and_then(|mut file| file.write_all(issued.key_pem.as_bytes()))
        .with_context(|| format!("cannot write {}", key.display()))
}

/// Runs `synod certs`.
///
/// # Errors
/// Bad arguments, existing files without --force, or a failed write.
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
    if args.dir.join("ca.pem").exists() && !args.force {
        // Issuing from an existing CA needs the CA loaded from its PEM
        // files, which synod-proto does not offer yet.
        bail!(
            "{} already holds a CA; issuing more certificates from an existing CA is not \
             supported yet: write into a new --dir, or pass --force to make a new CA (every \
             certificate must then be replaced)",
            args.dir.display()
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let ca = CertificateAuthority::generate("Synod CA").context("cannot generate the CA")?;
    say!("wrote (certificate, private key):");
    write(&args.dir, "ca", &ca.certificate(), args.force)?;
    for (id, hosts) in &nodes {
        let issued = ca
            .issue_node(*id, hosts)
            .with_context(|| format!("cannot issue the certificate of replica {id}"))?;
        write(&args.dir, &format!("node-{id}"), &issued, args.force)?;
    }
    for name in &clients {
        let issued = ca
            .issue_client(name)
            .with_context(|| format!("cannot issue the client certificate {name}"))?;
        write(&args.dir, name, &issued, args.force)?;
    }
    say!(
        "Keep ca-key.pem secret. Each replica's [tls] names ca.pem, node-<id>.pem and \
         node-<id>-key.pem; clients use --ca ca.pem --cert NAME.pem --key NAME-key.pem."
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
