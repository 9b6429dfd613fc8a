//! What the fault suite's tests share.

use std::path::PathBuf;
use std::process::Command;

use synod_faults::run::server_binary_beside;

/// The synod-server binary of this build, built now if this package's
/// tests run on their own.
pub fn server_binary() -> PathBuf {
    let own = PathBuf::from(env!("CARGO_BIN_EXE_synod-faults"));
    let server = server_binary_beside(&own);
    if !server.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "synod-server", "--bin", "synod-server"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building synod-server failed");
    }
    assert!(server.is_file(), "no synod-server at {}", server.display());
    server
}
