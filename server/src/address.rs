//! Member addresses as a configuration writes them: a host, which is an IP
//! address or a DNS name, and a port (`10.0.0.1:7001`, `[fd00::1]:7001`,
//! `synod-0.synod-peers.prod.svc:7001`). A name is resolved each time a
//! replica dials the member (so again after every failed or lost
//! connection), never once for good: a member that comes back with a new
//! IP address, as a Kubernetes pod does, is found at it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A host (IP address or DNS name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Host {
    Ip(IpAddr),
    /// A DNS name, lower-cased.
    Name(String),
}

/// The longest DNS name accepted (RFC 1035).
const NAME_BYTES_MAX: usize = 253;

impl HostPort {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address itself when the host is an IP address; `None` for a
    /// name, which must be resolved ([`HostPort::resolve`]).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// Whether the host is a DNS name.
    pub fn is_name(&self) -> bool {
        matches!(self.host, Host::Name(_))
    }

    /// Resolves the address now: an IP address as it is, a name through
    /// the system's resolver (the hosts file, then DNS), keeping the first
    /// address of the family `local` (the socket that will dial it) can
    /// reach.
    ///
    /// # Errors
    /// The resolver's error, or one saying the name has no address of that
    /// family.
    pub async fn resolve(&self, local: SocketAddr) -> std::io::Result<SocketAddr> {
        let name = match &self.host {
            Host::Ip(ip) => return Ok(SocketAddr::new(*ip, self.port)),
            Host::Name(name) => name,
        };
        let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
            .await?
            .collect();
        found
            .iter()
            .copied()
            .find(|address| address.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "{name} resolves to {found:?}, none of them an IPv{} address",
                        if local.is_ipv4() { 4 } else { 6 }
                    ),
                )
            })
    }
}

impl From<SocketAddr> for HostPort {
    fn from(address: SocketAddr) -> HostPort {
        HostPort {
            host: Host::Ip(address.ip()),
            port: address.port(),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// Whether `name` is a DNS name as a configuration may give one: labels of
/// letters, digits and hyphens (not at either end), 1 to 63 bytes each,
/// separated by dots, at most 253 bytes in all, with one trailing dot
/// allowed.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        if let Ok(address) = text.parse::<SocketAddr>() {
            return Ok(address.into());
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!(
                "{text:?} is not HOST:PORT (an IP address or DNS name, then a port)"
            ));
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: {port:?} is not a port (0 to 65535)"))?;
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            return Err(format!(
                "{text:?}: write an IPv6 address in brackets, as [fd00::1]:{port}"
            ));
        }
        if !is_dns_name(host) {
            return Err(format!(
                "{text:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(HostPort {
            host: Host::Name(host.to_ascii_lowercase()),
            port,
        })
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HostPort, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in [
            "10.0.0.1:7001",
            "[fd00::1]:7001",
            "localhost:7101",
            "synod-0.synod-peers.prod.svc.cluster.local:7001",
        ] {
            let address: HostPort = text.parse().expect(text);
            assert_eq!(address.to_string(), text);
        }
        let name: HostPort = "DB1.Example.com:1".parse().expect("a name");
        assert_eq!(name.to_string(), "db1.example.com:1");
        assert!(name.is_name());
        assert_eq!(name.socket_addr(), None);
        let ip: HostPort = "127.0.0.1:9".parse().expect("an IP");
        assert_eq!(
            ip.socket_addr(),
            Some("127.0.0.1:9".parse().expect("address"))
        );
        for bad in [
            "db1",
            "db1:port",
            "db1:70000",
            "fd00::1:7001",
            "-db.example:1",
            "a..b:1",
            "under_score:1",
            ":1",
            "[fd00::1:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad} is refused");
        }
        let long = format!("{}:1", "a.".repeat(130));
        assert!(long.parse::<HostPort>().is_err());
    }

    #[tokio::test]
    async fn names_resolve_to_the_family_of_the_socket() {
        let local: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let localhost: HostPort = "localhost:7001".parse().expect("a name");
        let resolved = localhost.resolve(local).await.expect("localhost resolves");
        assert!(
            resolved.ip().is_loopback() && resolved.is_ipv4(),
            "{resolved}"
        );
        assert_eq!(resolved.port(), 7001);
        let nowhere: HostPort = "no-such-host.invalid:1".parse().expect("a name");
        assert!(nowhere.resolve(local).await.is_err());
    }
}
