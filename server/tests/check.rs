//! `synod-server --check` as an operator runs it: the binary against config
//! files in a temporary directory, with certificates made on the spot. A
//! valid config passes; missing certificate files, a certificate made for
//! another node and an out-of-range field each fail, and the message names
//! the file or field.

use std::path::Path;
use std::process::{Command, Output};

use synod_proto::certgen::generate_dev_certs;
use synod_proto::tls::TlsFiles;

const SERVER: &str = env!("CARGO_BIN_EXE_synod-server");

/// A config for replica `id` of a three-member cluster with the given TLS
/// files, its data directory under `dir`, and `extra` appended.
fn write_config(dir: &Path, id: u64, tls: &TlsFiles, extra: &str) -> std::path::PathBuf {
    let mut text = format!(
        "cluster_id = \"check\"\nid = {id}\ndata_dir = {data:?}\n\n\
         [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
        data = dir.join(format!("data-{id}")),
        ca = tls.ca,
        cert = tls.cert,
        key = tls.key,
    );
    for member in 1..=3 {
        text.push_str(&format!(
            "\n[[members]]\nid = {member}\npeer_address = \"127.0.0.1:{}\"\n\
             client_address = \"127.0.0.1:{}\"\n",
            7200 + member,
            7300 + member
        ));
    }
    text.push_str(extra);
    let path = dir.join(format!("node-{id}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn check(config: &Path) -> Output {
    Command::new(SERVER)
        .arg("--config")
        .arg(config)
        .arg("--check")
        .output()
        .expect("run synod-server")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_valid_config_with_its_certificates_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = generate_dev_certs(&dir.path().join("certs"), &[1, 2, 3], &[]).expect("certs");
    let config = write_config(dir.path(), 2, &certs.node(2), "");
    let output = check(&config);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));
}

#[test]
fn missing_certificate_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = TlsFiles::in_dir(&dir.path().join("absent"), "node-2");
    let config = write_config(dir.path(), 2, &files, "");
    let output = check(&config);
    assert!(!output.status.success(), "missing files passed --check");
    let message = stderr(&output);
    assert!(message.contains("cannot read"), "{message}");
    assert!(message.contains("absent"), "{message}");
}

#[test]
fn another_nodes_certificate_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = generate_dev_certs(&dir.path().join("certs"), &[1, 2, 3], &[]).expect("certs");
    let config = write_config(dir.path(), 2, &certs.node(1), "");
    let output = check(&config);
    assert!(!output.status.success(), "node 1's files passed for node 2");
    let message = stderr(&output);
    assert!(
        message.contains("node-1.pem does not name node-2.synod"),
        "{message}"
    );
}

#[test]
fn an_out_of_range_field_fails_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = generate_dev_certs(&dir.path().join("certs"), &[1, 2, 3], &[]).expect("certs");
    let extra = format!("\n[limits]\nclient_connections_max = {}\n", i64::MAX);
    let config = write_config(dir.path(), 2, &certs.node(2), &extra);
    let output = check(&config);
    assert!(!output.status.success(), "i64::MAX connections passed");
    let message = stderr(&output);
    assert!(
        message.contains("`limits.client_connections_max`: must be between 1 and 1000000"),
        "{message}"
    );
}
