//! The interactive shell driven through a pseudo-terminal (rexpect), as a
//! person would use it. A detached dev cluster runs on free loopback ports;
//! each scenario spawns `synod` in a pty, types lines and keys (Tab,
//! Ctrl-C, Ctrl-D) and waits, with a bounded timeout, for what the screen
//! must show: commands with quoted arguments, relative paths after `cd`,
//! tab completion of a command and of a node path fetched from the cluster,
//! errors that leave the shell usable, a watch printing changes made by
//! another client until Ctrl-C, a lock held by one shell while a second
//! shell waits for it and gets it on `unlock`, and `synod dev` itself: the
//! shell it opens, and the cluster stopping when that shell is left.

mod common;

use std::process::Command;

use common::{free_port_base, run_bounded, synod_with_home, DevCluster, COMMAND_TIMEOUT};
use rexpect::session::{spawn_command, PtySession};

/// Longest wait for any expected output.
const EXPECT_TIMEOUT_MS: u64 = 20_000;

const PROMPT: &str = "synod:/> ";

fn shell(cluster: &DevCluster) -> PtySession {
    spawn_command(cluster.synod(), Some(EXPECT_TIMEOUT_MS)).expect("synod starts in a pty")
}

/// Types keys without Enter (send alone leaves them in the pty's buffer).
fn keys(p: &mut PtySession, text: &str) {
    p.send(text).expect("type");
    p.flush().expect("flush");
}

fn one_shot(cluster: &DevCluster, args: &[&str]) {
    let mut command: Command = cluster.synod();
    command.args(args);
    let output = run_bounded(command, COMMAND_TIMEOUT);
    assert!(
        output.status.success(),
        "synod {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Types a line, waits for `expected`, then for the prompt `prompt` (typing
/// before the prompt is back would be lost: the line editor flushes
/// type-ahead when it takes the terminal).
fn step(p: &mut PtySession, line: &str, expected: &str, prompt: &str) {
    p.send_line(line).expect("type");
    p.exp_string(expected)
        .unwrap_or_else(|error| panic!("`{line}` should show {expected:?}: {error}"));
    p.exp_string(prompt)
        .unwrap_or_else(|error| panic!("no prompt {prompt:?} after `{line}`: {error}"));
}

fn typing_completion_and_errors(cluster: &DevCluster) {
    let mut p = shell(cluster);
    p.exp_string(PROMPT).expect("prompt");
    step(
        &mut p,
        "create /config 'a b c'",
        "created /config\r\n",
        PROMPT,
    );
    step(
        &mut p,
        "create /config/database 'postgres://db:5432'",
        "created /config/database",
        PROMPT,
    );

    // Relative paths after cd, with the path completed by Tab.
    keys(&mut p, "cd con");
    keys(&mut p, "\t");
    p.exp_string("config/")
        .expect("path completed from the cluster");
    keys(&mut p, "\r");
    let config_prompt = "synod:/config> ";
    p.exp_string(config_prompt)
        .expect("prompt shows the new node");
    keys(&mut p, "get da");
    keys(&mut p, "\t");
    p.exp_string("database").expect("child completed");
    keys(&mut p, "\r");
    p.exp_string("postgres://db:5432")
        .expect("value of the relative path");
    p.exp_string(config_prompt).expect("prompt");
    step(&mut p, "get .", "a b c", config_prompt);

    // A command name completes too.
    keys(&mut p, "pw");
    keys(&mut p, "\t");
    keys(&mut p, "\r");
    p.exp_string("\r\n/config\r\n").expect("pwd ran");
    p.exp_string(config_prompt).expect("prompt");

    // Errors are printed and the shell goes on.
    step(
        &mut p,
        "get /nowhere",
        "error: node /nowhere does not exist",
        config_prompt,
    );
    step(&mut p, "frobnicate", "unknown command", config_prompt);
    step(&mut p, "cd ..", "", PROMPT);
    step(&mut p, "ls -l", "  config\r\n", PROMPT);
    // rexpect reads bytes one by one, so match the ASCII part of the drawing.
    step(&mut p, "tree", " database\r\n", PROMPT);
    step(&mut p, "help watch", "usage: watch [PATH]", PROMPT);
    p.send_control('d').expect("ctrl-d");
    p.exp_eof().expect("Ctrl-D leaves the shell");

    // The history outlives the shell.
    let history = std::fs::read_to_string(cluster.home.path().join("history")).expect("history");
    assert!(history.contains("create /config 'a b c'"), "{history}");
}

fn watching_a_node(cluster: &DevCluster) {
    one_shot(cluster, &["create", "/watched", "v0"]);
    let mut p = shell(cluster);
    p.exp_string(PROMPT).expect("prompt");
    p.send_line("watch /watched").expect("type");
    p.exp_string("watching /watched and below")
        .expect("watch started");
    one_shot(cluster, &["set", "/watched", "v1"]);
    p.exp_string("changed /watched = \"v1\"")
        .expect("data change shown");
    one_shot(cluster, &["create", "/watched/child", "c"]);
    p.exp_string("created /watched/child")
        .expect("creation shown");
    one_shot(cluster, &["rm", "-r", "/watched"]);
    p.exp_string("deleted /watched").expect("deletion shown");
    p.send_control('c').expect("ctrl-c");
    p.exp_string("watch stopped")
        .expect("Ctrl-C ends the watch");
    p.exp_string(PROMPT).expect("back at the prompt");
    p.send_line("pwd").expect("type");
    p.exp_string("/\r\n").expect("the shell still works");
    p.send_line("exit").expect("type");
    p.exp_eof().expect("exit leaves");
}

fn holding_a_lock(cluster: &DevCluster) {
    let mut first = shell(cluster);
    let mut second = shell(cluster);
    first.exp_string(PROMPT).expect("prompt");
    second.exp_string(PROMPT).expect("prompt");

    first.send_line("lock /locks/db").expect("type");
    first
        .exp_string("acquired lock /locks/db: fencing token")
        .expect("first shell holds the lock");
    first
        .exp_string("synod:/ [lock /locks/db]> ")
        .expect("prompt shows the lock");

    second.send_line("lock /locks/db").expect("type");
    second
        .exp_string("waiting for lock /locks/db: it is held")
        .expect("second shell waits");

    first.send_line("unlock").expect("type");
    first
        .exp_string("released lock /locks/db")
        .expect("released");
    second
        .exp_string("acquired lock /locks/db: fencing token")
        .expect("second shell gets the lock");

    // The first shell now waits, and gives up on Ctrl-C.
    first.send_line("lock /locks/db").expect("type");
    first
        .exp_string("waiting for lock /locks/db")
        .expect("waits");
    first.send_control('c').expect("ctrl-c");
    first.exp_string("gave up waiting").expect("wait cancelled");
    first.exp_string(PROMPT).expect("prompt without a lock");

    // Ctrl-C at the prompt releases what the second shell holds.
    second
        .exp_string("[lock /locks/db]> ")
        .expect("prompt shows the lock");
    second.send_control('c').expect("ctrl-c");
    second
        .exp_string("released lock /locks/db")
        .expect("released by Ctrl-C");
    second.exp_string(PROMPT).expect("prompt without the lock");

    // Leader election: one shell leads, the other sees who.
    first
        .send_line("elect /elections/api 10.0.0.7:8080")
        .expect("type");
    first
        .exp_string("elected leader of /elections/api: fencing token")
        .expect("first shell leads");
    first
        .exp_string("[leader /elections/api]> ")
        .expect("prompt shows the leadership");
    second.send_line("leader /elections/api").expect("type");
    second
        .exp_string("with value \"10.0.0.7:8080\"")
        .expect("second shell sees the leader");
    second.exp_string(PROMPT).expect("prompt");
    second
        .send_line("elect /elections/api other")
        .expect("type");
    second
        .exp_string("campaigning for /elections/api: session")
        .expect("second shell campaigns behind the leader");
    second.send_control('c').expect("ctrl-c");
    second
        .exp_string("withdrew from the election")
        .expect("Ctrl-C withdraws");
    second.exp_string(PROMPT).expect("prompt");
    first.send_line("resign").expect("type");
    first
        .exp_string("resigned from /elections/api")
        .expect("resigned");
    first.exp_string(PROMPT).expect("prompt");
    second.send_line("leader /elections/api").expect("type");
    second
        .exp_string("nobody leads /elections/api")
        .expect("nobody leads after the resignation");
    second.exp_string(PROMPT).expect("prompt");

    second.send_control('d').expect("ctrl-d");
    second.exp_eof().expect("leaves");
    first.send_control('d').expect("ctrl-d");
    first.exp_eof().expect("leaves");
}

fn dev_opens_the_shell_and_stops_on_leaving() {
    let home = tempfile::tempdir().expect("home");
    let data = tempfile::tempdir().expect("data");
    let base = free_port_base().to_string();
    let mut command = synod_with_home(home.path());
    command
        .arg("dev")
        .arg("--data")
        .arg(data.path())
        .arg("--port-base")
        .arg(&base);
    let mut p = spawn_command(command, Some(120_000)).expect("synod dev starts");
    p.exp_string("Synod dev cluster is up").expect("cluster up");
    p.exp_string(PROMPT).expect("shell opened");
    p.send_line("create /hello world").expect("type");
    p.exp_string("created /hello").expect("works");
    // Ctrl-C reaches the shell only: the replicas run in their own
    // process group and keep serving.
    p.exp_string(PROMPT).expect("prompt");
    p.send_line("watch /").expect("type");
    p.exp_string("watching / and below").expect("watching");
    p.send_control('c').expect("ctrl-c");
    p.exp_string("watch stopped").expect("stopped");
    p.exp_string(PROMPT).expect("prompt");
    p.send_line("get /hello").expect("type");
    p.exp_string("world").expect("the cluster survived Ctrl-C");
    p.exp_string(PROMPT).expect("prompt");
    p.send_line("status").expect("type");
    p.exp_string("leader").expect("status shows a leader");
    p.send_control('d').expect("ctrl-d");
    p.exp_string("cluster stopped")
        .expect("leaving the shell stops the cluster");
    p.exp_eof().expect("synod dev ends");
    assert!(!data.path().join("pids").exists());
}

#[test]
fn the_shell_in_a_terminal() {
    let cluster = DevCluster::start();
    typing_completion_and_errors(&cluster);
    watching_a_node(&cluster);
    holding_a_lock(&cluster);
    drop(cluster);
    dev_opens_the_shell_and_stops_on_leaving();
}
