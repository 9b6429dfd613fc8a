//! Where the cluster is: endpoints and TLS files from flags, environment
//! variables or a small TOML file, in that order of precedence, and the
//! connection made from them.
//!
//! The file (`--config`, `$SYNOD_CONFIG`, or `$XDG_CONFIG_HOME/synod/config.toml`
//! falling back to `~/.config/synod/config.toml`) looks like this; relative
//! paths are read from the file's directory:
//!
//! ```toml
//! endpoints = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
//! ca = "certs/ca.pem"
//! cert = "certs/client.pem"
//! key = "certs/client-key.pem"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use synod_client::Client;
use synod_proto::tls::TlsFiles;

/// The first line of a config file that `synod dev` wrote; only such a file
/// is replaced by a later `synod dev`, never one a person wrote.
pub const DEV_MARKER: &str = "# written by `synod dev`";

/// How long connecting (opening a session) may take before giving up.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// How long one request may take.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Connection flags shared by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Replica client addresses, comma-separated (host:port,...).
    #[arg(long, env = "SYNOD_ENDPOINTS", global = true, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "SYNOD_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, env = "SYNOD_CERT", global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "SYNOD_KEY", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// A config file with endpoints and TLS files (see `synod help config`).
    #[arg(long, env = "SYNOD_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A config file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Replica client addresses.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's private key.
    pub key: PathBuf,
}

impl ClientConfig {
    /// Reads a config file, resolving relative paths against its directory.
    ///
    /// # Errors
    /// An unreadable file or bad TOML, naming the file.
    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config: ClientConfig =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut config.ca, &mut config.cert, &mut config.key] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// The file's text, with `header` comment lines first.
    pub fn to_toml(&self, header: &str) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!("{header}\n{body}")
    }

    /// The TLS files.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// The user's config file: `$XDG_CONFIG_HOME/synod/config.toml`, else
/// `~/.config/synod/config.toml`.
pub fn user_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir).join("synod").join("config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(".config/synod/config.toml"))
}

impl ConnectArgs {
    /// Combines flags and environment (already merged by clap) with the
    /// config file: each setting given directly wins over the file's.
    ///
    /// # Errors
    /// Nothing says where the cluster is, or the config file is unusable.
    pub fn resolve(&self) -> anyhow::Result<ClientConfig> {
        let file = match &self.config {
            Some(path) => Some(ClientConfig::load(path)?),
            None => match user_config_path().filter(|path| path.exists()) {
                Some(path) => Some(ClientConfig::load(&path)?),
                None => None,
            },
        };
        let endpoints = if self.endpoints.is_empty() {
            file.as_ref()
                .map(|f| f.endpoints.clone())
                .unwrap_or_default()
        } else {
            self.endpoints.clone()
        };
        let pick = |flag: &Option<PathBuf>, from_file: fn(&ClientConfig) -> &PathBuf| {
            flag.clone()
                .or_else(|| file.as_ref().map(|f| from_file(f).clone()))
        };
        let ca = pick(&self.ca, |f| &f.ca);
        let cert = pick(&self.cert, |f| &f.cert);
        let key = pick(&self.key, |f| &f.key);
        match (endpoints.is_empty(), ca, cert, key) {
            (false, Some(ca), Some(cert), Some(key)) => Ok(ClientConfig {
                endpoints,
                ca,
                cert,
                key,
            }),
            _ => bail!(
                "no cluster to talk to: run `synod dev` for a local one (it writes {}), \
                 or give --endpoints, --ca, --cert and --key (or SYNOD_ENDPOINTS, SYNOD_CA, \
                 SYNOD_CERT, SYNOD_KEY, or a --config file)",
                user_config_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "a config file".into())
            ),
        }
    }
}

/// Opens a session with the cluster.
///
/// # Errors
/// Unreadable TLS files, or no replica answered within [`CONNECT_TIMEOUT_MS`].
pub async fn connect(config: &ClientConfig) -> anyhow::Result<Client> {
    connect_within(config, CONNECT_TIMEOUT_MS).await
}

/// Opens a session with the cluster, giving up after `timeout_ms`.
///
/// # Errors
/// Unreadable TLS files, or no replica answered in time.
pub async fn connect_within(config: &ClientConfig, timeout_ms: u64) -> anyhow::Result<Client> {
    let builder = Client::builder()
        .endpoints(config.endpoints.clone())
        .tls(config.tls())
        .session_timeout_ms(10_000)
        .request_timeout_ms(REQUEST_TIMEOUT_MS);
    match tokio::time::timeout(Duration::from_millis(timeout_ms), builder.connect()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(error).with_context(|| {
            format!("cannot connect to {}", config.endpoints.join(", "))
        }),
        Err(_) => bail!(
            "cannot connect to {}: no session within {} ms; is the cluster running and has it a leader?",
            config.endpoints.join(", "),
            timeout_ms
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.toml");
        let config = ClientConfig {
            endpoints: vec!["127.0.0.1:1".into()],
            ca: "certs/ca.pem".into(),
            cert: "certs/client.pem".into(),
            key: "/abs/key.pem".into(),
        };
        std::fs::write(&path, config.to_toml(DEV_MARKER)).expect("write");
        let args = ConnectArgs {
            endpoints: vec!["127.0.0.1:2".into()],
            config: Some(path),
            ..ConnectArgs::default()
        };
        let resolved = args.resolve().expect("resolves");
        assert_eq!(resolved.endpoints, vec!["127.0.0.1:2".to_string()]);
        assert_eq!(resolved.ca, dir.path().join("certs/ca.pem"));
        assert_eq!(resolved.key, PathBuf::from("/abs/key.pem"));
    }
}
