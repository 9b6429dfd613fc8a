//! Cutting links between loopback addresses with nftables: a table of the
//! run's own (`inet synod_faults_<pid>_<run>`) whose input chain drops the
//! UDP datagrams of the directed links cut. Dropping on input loses the
//! datagram, as a network would; dropping on output would make `sendto`
//! fail instead.
//!
//! A link is cut one way (`from` → `to`), so every partition is a set of
//! directed cuts: isolating a replica, a majority and a minority, a bridge,
//! one-way loss. Healing flushes the chain; dropping the [`Firewall`]
//! deletes the table, and [`Firewall::new`] deletes tables that dead runs
//! left behind.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const TABLE_PREFIX: &str = "synod_faults_";

/// The run's nftables table.
#[derive(Debug)]
pub struct Firewall {
    table: String,
    cuts: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
}

/// Whether this process can use nftables (the `nft` command is there and
/// may change the ruleset).
pub fn available() -> bool {
    Command::new("nft")
        .args(["list", "tables"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn nft(script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft")?;
    child
        .stdin
        .take()
        .context("nft's input")?
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft refused {script:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Firewall {
    /// Creates the run's table (with no cut), after deleting the tables of
    /// runs whose process is gone.
    ///
    /// # Errors
    /// nft is missing or refuses.
    pub fn new(run: u32) -> Result<Firewall> {
        remove_stale_tables();
        let table = format!("{TABLE_PREFIX}{}_{run}", std::process::id());
        nft(&format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority -10; policy accept; }}\n"
        ))?;
        Ok(Firewall {
            table,
            cuts: BTreeSet::new(),
        })
    }

    /// Drops every UDP datagram from `from` to `to` (one way).
    ///
    /// # Errors
    /// nft refuses.
    pub fn cut(&mut self, from: Ipv4Addr, to: Ipv4Addr) -> Result<()> {
        if self.cuts.insert((from, to)) {
            nft(&format!(
                "add rule inet {} input ip saddr {from} ip daddr {to} meta l4proto udp drop\n",
                self.table
            ))?;
        }
        Ok(())
    }

    /// Cuts both directions between `a` and `b`.
    ///
    /// # Errors
    /// nft refuses.
    pub fn cut_both(&mut self, a: Ipv4Addr, b: Ipv4Addr) -> Result<()> {
        self.cut(a, b)?;
        self.cut(b, a)
    }

    /// Cuts every link between a member of `one` and a member of `other`,
    /// both ways.
    ///
    /// # Errors
    /// nft refuses.
    pub fn separate(&mut self, one: &[Ipv4Addr], other: &[Ipv4Addr]) -> Result<()> {
        for &a in one {
            for &b in other {
                self.cut_both(a, b)?;
            }
        }
        Ok(())
    }

    /// The directed links cut now.
    pub fn cuts(&self) -> &BTreeSet<(Ipv4Addr, Ipv4Addr)> {
        &self.cuts
    }

    /// Restores every link.
    ///
    /// # Errors
    /// nft refuses.
    pub fn heal(&mut self) -> Result<()> {
        if !self.cuts.is_empty() {
            nft(&format!("flush chain inet {} input\n", self.table))?;
            self.cuts.clear();
        }
        Ok(())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {}\n", self.table));
    }
}

/// Deletes `synod_faults_<pid>_<run>` tables whose process no longer runs.
fn remove_stale_tables() {
    let Ok(output) = Command::new("nft").args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(rest) = name.strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let pid = rest
            .split('_')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = nft(&format!("delete table inet {name}\n"));
            }
        }
    }
}
