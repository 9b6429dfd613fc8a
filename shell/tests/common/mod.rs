//! Helpers shared by the shell's tests: a dev cluster started with
//! `synod dev --detach` in a temporary directory on free loopback ports and
//! stopped with `synod dev --stop` when dropped, and `synod` commands run
//! with a private home (history and config files) and a bounded wait.

#![allow(dead_code)]

use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `synod` binary under test.
pub const SYNOD: &str = env!("CARGO_BIN_EXE_synod");

/// Longest a `synod dev` start may take (it may build synod-server first).
const START_TIMEOUT: Duration = Duration::from_secs(240);

/// Longest any other `synod` command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Picks a port base whose six ports (base+1..3, base+101..103) are free on
/// 127.0.0.1, starting from a point that differs per process so parallel
/// test binaries do not collide.
pub fn free_port_base() -> u16 {
    let start = 20_000 + (std::process::id() % 200) as u16 * 150;
    for attempt in 0..200u16 {
        let base = 20_000 + (start - 20_000 + attempt * 150) % 30_000;
        let all_free = [1, 2, 3, 101, 102, 103]
            .iter()
            .all(|offset| UdpSocket::bind(("127.0.0.1", base + offset)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free port range on 127.0.0.1");
}

/// Runs `command` to completion, killing it after `timeout`.
pub fn run_bounded(mut command: Command, timeout: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("synod starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A dev cluster for one test binary.
pub struct DevCluster {
    /// The data directory.
    pub data: tempfile::TempDir,
    /// The private home: `synod dev` writes the config file there.
    pub home: tempfile::TempDir,
    /// The port base.
    pub port_base: u16,
}

impl DevCluster {
    /// Starts a detached dev cluster and waits for its leader.
    pub fn start() -> DevCluster {
        let cluster = DevCluster {
            data: tempfile::tempdir().expect("data dir"),
            home: tempfile::tempdir().expect("home dir"),
            port_base: free_port_base(),
        };
        cluster.start_again();
        cluster
    }

    /// Starts the detached cluster on its data directory (again).
    pub fn start_again(&self) {
        let mut command = self.synod();
        command
            .arg("dev")
            .arg("--detach")
            .arg("--no-shell")
            .arg("--data")
            .arg(self.data.path())
            .arg("--port-base")
            .arg(self.port_base.to_string());
        let output = run_bounded(command, START_TIMEOUT);
        assert!(
            output.status.success(),
            "synod dev failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops the cluster (what `Drop` does).
    pub fn stop(&self) -> Output {
        let mut command = self.synod();
        command
            .arg("dev")
            .arg("--stop")
            .arg("--data")
            .arg(self.data.path());
        run_bounded(command, COMMAND_TIMEOUT)
    }

    /// The config directory `synod dev` writes into.
    pub fn config_home(&self) -> PathBuf {
        self.home.path().join(".config")
    }

    /// `synod` with the private home and no connection settings but the
    /// config file `synod dev` wrote.
    pub fn synod(&self) -> Command {
        synod_with_home(self.home.path())
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `synod` with `home` as its home directory and no SYNOD_* settings from
/// the environment the tests run in.
pub fn synod_with_home(home: &Path) -> Command {
    let mut command = Command::new(SYNOD);
    command
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("SYNOD_HISTORY", home.join("history"))
        .env("TERM", "xterm")
        .env_remove("SYNOD_ENDPOINTS")
        .env_remove("SYNOD_CA")
        .env_remove("SYNOD_CERT")
        .env_remove("SYNOD_KEY")
        .env_remove("SYNOD_CONFIG");
    command
}
