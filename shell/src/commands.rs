//! The commands' handlers and the state they share: the session, the
//! current node, held locks and leaderships, and how output is written
//! (text for people, one JSON document per result for scripts).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use synod_client::{
    Client, ClientError, CreateMode, EventType, LeaderInfo, Leadership, LockGuard, LockOptions, Op,
    Sequencer, SessionState, WatchKind,
};
use synod_proto::tls::node_server_name;
use synod_proto::wire::ClusterStatus;
use tokio::sync::broadcast;

use crate::connect::{self, ClientConfig};
use crate::paths;
use crate::probe::{self, Prober};
use crate::render;
use crate::table::{self, Interrupt, Parsed, UsageError};

/// Most nodes `tree`, `ls -R` and `rm -r` visit, so a huge namespace cannot
/// hang the shell.
pub const SUBTREE_NODES_MAX: usize = 100_000;

/// Characters of a value shown in `watch` lines.
const PREVIEW_CHARS_MAX: usize = 60;

/// How long `status` waits for each replica.
const STATUS_TIMEOUT_MS: u64 = 3_000;

/// What the shell does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next command.
    Continue,
    /// Leave the shell.
    Exit,
}

/// Ctrl-C ended the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// The state every command works on.
pub struct Shell {
    /// The session, once connected (`help` and `pwd` work without one).
    pub client: Option<Client>,
    /// Where the cluster is, for `status` to reach each replica.
    pub config: Option<ClientConfig>,
    /// The current node.
    pub cwd: String,
    /// Output JSON instead of text.
    pub json: bool,
    /// An interactive shell (locks and leaderships outlive the command)
    /// rather than one command from the command line (they last until Ctrl-C).
    pub interactive: bool,
    /// Locks this session holds, by path.
    pub locks: BTreeMap<String, LockGuard>,
    /// Elections this session leads, by path.
    pub leading: BTreeMap<String, Leadership>,
    /// Set by `exit`.
    exit_requested: bool,
}

impl Shell {
    /// A shell at `/`.
    pub fn new(client: Option<Client>, config: Option<ClientConfig>, interactive: bool) -> Shell {
        Shell {
            client,
            config,
            cwd: "/".into(),
            json: false,
            interactive,
            locks: BTreeMap::new(),
            leading: BTreeMap::new(),
            exit_requested: false,
        }
    }

    fn client(&self) -> anyhow::Result<&Client> {
        self.client.as_ref().context("not connected to a cluster")
    }

    /// Resolves a path argument against the current node.
    pub fn path(&self, argument: &str) -> String {
        paths::resolve(&self.cwd, argument)
    }

    /// Prints a result: `text` for a person, or `json()` as one line.
    fn emit(&self, text: impl Display, json: impl FnOnce() -> Value) {
        if self.json {
            say!("{}", json());
        } else {
            let text = text.to_string();
            if !text.is_empty() {
                say!("{text}");
            }
        }
    }

    /// Prints a progress note for a person (nothing in JSON mode).
    fn note(&self, text: impl Display) {
        if !self.json {
            say!("{text}");
        }
    }

    /// Runs one command line's words: looks the command up in the table,
    /// checks its arguments and runs it, cancelling it on Ctrl-C unless it
    /// handles Ctrl-C itself.
    ///
    /// # Errors
    /// [`UsageError`] for unknown commands and bad arguments,
    /// [`Interrupted`] when Ctrl-C cancelled it, or the command's failure.
    pub async fn execute(&mut self, words: &[String]) -> anyhow::Result<Flow> {
        let Some((name, rest)) = words.split_first() else {
            return Ok(Flow::Continue);
        };
        let Some(spec) = table::find(name) else {
            return Err(UsageError(format!(
                "unknown command `{name}`; `help` lists the commands"
            ))
            .into());
        };
        let parsed = spec.parse(rest)?;
        let json_before = self.json;
        self.json |= parsed.json;
        if spec.needs_cluster && self.client.is_none() {
            self.json = json_before;
            bail!("not connected to a cluster");
        }
        let result = match spec.interrupt {
            Interrupt::Handled => (spec.run)(self, parsed).await,
            Interrupt::Cancel => {
                tokio::select! {
                    result = (spec.run)(self, parsed) => result,
                    () = interrupted() => Err(Interrupted.into()),
                }
            }
        };
        self.json = json_before;
        result?;
        if self.exit_requested {
            Ok(Flow::Exit)
        } else {
            Ok(Flow::Continue)
        }
    }

    /// Gives up every lock and leadership (Ctrl-C at an empty prompt, or
    /// the end of a one-shot `lock`/`elect`), saying what it released.
    pub async fn release_all(&mut self) {
        let locks: Vec<String> = self.locks.keys().cloned().collect();
        for path in locks {
            if let Err(error) = self.release_lock(&path).await {
                eprintln!("error: {error:#}");
            }
        }
        let elections: Vec<String> = self.leading.keys().cloned().collect();
        for path in elections {
            if let Err(error) = self.resign_election(&path).await {
                eprintln!("error: {error:#}");
            }
        }
    }

    /// After the session expired: opens a new one (locks, leaderships and
    /// ephemeral nodes of the old one are gone) and returns it.
    ///
    /// # Errors
    /// No cluster configured, or it cannot be reached.
    pub async fn reconnect(&mut self) -> anyhow::Result<Client> {
        let config = self.config.clone().context("no cluster configured")?;
        let client = connect::connect(&config).await?;
        self.client = Some(client.clone());
        self.locks.clear();
        self.leading.clear();
        Ok(client)
    }

    /// Whether the session holds locks or leads elections.
    pub fn holds_anything(&self) -> bool {
        !self.locks.is_empty() || !self.leading.is_empty()
    }

    /// Forgets locks and leaderships the session may have lost (it was
    /// suspended past the point where the cluster may expire it, or it
    /// ended), saying so.
    pub fn forget_lost(&mut self) {
        self.locks.retain(|path, guard| {
            let held = guard.is_held();
            if !held {
                eprintln!(
                    "lock {} may be lost: the session was cut off too long (run `lock` again)",
                    render::name(path)
                );
            }
            held
        });
        self.leading.retain(|path, leadership| {
            let leads = leadership.is_leader();
            if !leads {
                eprintln!(
                    "leadership of {} may be lost: the session was cut off too long",
                    render::name(path)
                );
            }
            leads
        });
    }

    async fn release_lock(&mut self, path: &str) -> anyhow::Result<()> {
        let guard = self
            .locks
            .remove(path)
            .with_context(|| format!("this shell holds no lock {path}"))?;
        guard.release().await?;
        self.emit(
            format!("released lock {}", render::name(path)),
            || json!({"released": path}),
        );
        Ok(())
    }

    async fn resign_election(&mut self, path: &str) -> anyhow::Result<()> {
        let leadership = self
            .leading
            .remove(path)
            .with_context(|| format!("this shell leads no election {path}"))?;
        leadership.resign().await?;
        self.emit(
            format!("resigned from {}", render::name(path)),
            || json!({"resigned": path}),
        );
        Ok(())
    }
}

/// Resolves when Ctrl-C is pressed while a command runs (never, when the
/// signal cannot be watched).
pub async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A value argument: text as it is, `@FILE` read from the file, `@@...` a
/// literal value starting with `@`.
fn value(argument: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(rest) = argument.strip_prefix("@@") {
        return Ok(format!("@{rest}").into_bytes());
    }
    if let Some(file) = argument.strip_prefix('@') {
        return std::fs::read(file).with_context(|| format!("cannot read {file}"));
    }
    Ok(argument.as_bytes().to_vec())
}

/// The `-v VERSION` flag, if given.
fn expected_version(parsed: &Parsed) -> anyhow::Result<Option<u64>> {
    parsed
        .value('v')
        .map(|version| {
            version
                .parse()
                .map_err(|_| UsageError(format!("-v takes a version number, not {version:?}")))
        })
        .transpose()
        .map_err(Into::into)
}

fn sequencer_json(sequencer: &Sequencer) -> Value {
    json!({
        "path": sequencer.path,
        "mode": format!("{:?}", sequencer.mode).to_lowercase(),
        "generation": sequencer.generation,
    })
}

fn token_text(sequencer: &Sequencer) -> String {
    format!(
        "fencing token generation {} ({})",
        sequencer.generation,
        format!("{:?}", sequencer.mode).to_lowercase()
    )
}

/// `root` and its descendants, depth first with children in name order,
/// each as `(path, depth, lasts)` where `lasts[i]` says whether the node's
/// ancestor at depth `i + 1` (or the node itself, last) is the last child of
/// its parent, which is what `tree` needs to draw its branches. Bounded by
/// [`SUBTREE_NODES_MAX`].
async fn walk(client: &Client, root: &str) -> anyhow::Result<Vec<(String, usize, Vec<bool>)>> {
    let mut out = Vec::new();
    let mut stack: Vec<(String, usize, Vec<bool>)> = vec![(root.to_string(), 0, Vec::new())];
    while let Some((path, depth, lasts)) = stack.pop() {
        if out.len() >= SUBTREE_NODES_MAX {
            bail!("more than {SUBTREE_NODES_MAX} nodes under {root}; pick a smaller subtree");
        }
        let children = client.children(&path).await?;
        let count = children.len();
        for (index, name) in children.iter().enumerate().rev() {
            let mut child_lasts = lasts.clone();
            child_lasts.push(index + 1 == count);
            stack.push((paths::child(&path, name), depth + 1, child_lasts));
        }
        out.push((path, depth, lasts));
    }
    Ok(out)
}

/// `ls [-l] [-R] [PATH]`.
pub async fn ls(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    if parsed.flag('R') {
        let nodes = walk(&client, &path).await?;
        let listed: Vec<String> = nodes.into_iter().skip(1).map(|(p, _, _)| p).collect();
        let mut lines = Vec::new();
        if parsed.flag('l') {
            lines.push(LONG_HEADER.to_string());
        }
        let mut entries = Vec::new();
        for node in &listed {
            if parsed.flag('l') {
                let stat = client.exists(node).await?;
                if let Some(stat) = stat {
                    lines.push(long_line(&render::name(node), &stat));
                    entries.push(json!({"path": node, "stat": render::stat_json(&stat)}));
                }
            } else {
                lines.push(render::name(node));
                entries.push(json!({"path": node}));
            }
        }
        shell.emit(lines.join("\n"), || json!({"path": path, "nodes": entries}));
        return Ok(());
    }
    let children = client.children(&path).await?;
    if parsed.flag('l') {
        let mut lines = vec![LONG_HEADER.to_string()];
        let mut entries = Vec::new();
        for name in &children {
            let child = paths::child(&path, name);
            if let Some(stat) = client.exists(&child).await? {
                lines.push(long_line(&render::name(name), &stat));
                entries.push(json!({"name": name, "stat": render::stat_json(&stat)}));
            }
        }
        shell.emit(
            lines.join("\n"),
            || json!({"path": path, "children": entries}),
        );
    } else {
        let text = children
            .iter()
            .map(|name| render::name(name))
            .collect::<Vec<_>>()
            .join("  ");
        shell.emit(text, || json!({"path": path, "children": children}));
    }
    Ok(())
}

/// The header of `ls -l`.
const LONG_HEADER: &str = "version      bytes  children  modified (UTC)       name";

fn long_line(name: &str, stat: &synod_client::Stat) -> String {
    format!(
        "{:>7}  {:>9}  {:>8}  {}  {}{}",
        stat.version,
        stat.data_length,
        stat.children_count,
        render::time_ms(stat.modified_time_ms),
        name,
        if stat.ephemeral_owner != 0 {
            "  (ephemeral)"
        } else {
            ""
        }
    )
}

/// `tree [PATH]`.
pub async fn tree(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let nodes = walk(&client, &path).await?;
    let mut lines = Vec::new();
    for (node, depth, lasts) in &nodes {
        if *depth == 0 {
            lines.push(render::name(node));
            continue;
        }
        let mut line = String::new();
        for last in &lasts[..lasts.len() - 1] {
            line.push_str(if *last { "    " } else { "│   " });
        }
        line.push_str(if lasts[lasts.len() - 1] {
            "└── "
        } else {
            "├── "
        });
        line.push_str(&render::name(node.rsplit('/').next().unwrap_or(node)));
        lines.push(line);
    }
    let all: Vec<&String> = nodes.iter().map(|(p, _, _)| p).collect();
    shell.emit(lines.join("\n"), || json!({"path": path, "nodes": all}));
    Ok(())
}

/// `cd [PATH]`.
pub async fn cd(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let path = shell.path(parsed.arg(0).unwrap_or("/"));
    if shell.client()?.exists(&path).await?.is_none() {
        bail!("node {path} does not exist");
    }
    shell.cwd = path;
    Ok(())
}

/// `pwd`.
pub async fn pwd(shell: &mut Shell, _parsed: Parsed) -> anyhow::Result<()> {
    shell.emit(&shell.cwd, || json!({"path": shell.cwd}));
    Ok(())
}

/// `get PATH`.
pub async fn get(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let (data, stat) = shell.client()?.get(&path).await?;
    shell.emit(render::data_for_terminal(&data), || {
        let mut value = render::data_json(&data);
        value["path"] = json!(path);
        value["stat"] = render::stat_json(&stat);
        value
    });
    Ok(())
}

/// `stat PATH`.
pub async fn stat(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let Some(stat) = shell.client()?.exists(&path).await? else {
        return Err(ClientError::Refused(synod_proto::Error::NoNode { path }).into());
    };
    shell.emit(
        render::stat_text(&path, &stat),
        || json!({"path": path, "stat": render::stat_json(&stat)}),
    );
    Ok(())
}

/// `set PATH VALUE|@FILE`.
pub async fn set(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let data = value(parsed.arg(1).unwrap_or(""))?;
    let stat = shell
        .client()?
        .set(&path, &data, expected_version(&parsed)?)
        .await?;
    shell.emit(
        format!(
            "set {} (version {}, {} bytes)",
            render::name(&path),
            stat.version,
            data.len()
        ),
        || json!({"path": path, "stat": render::stat_json(&stat)}),
    );
    Ok(())
}

/// `create [-e] [-s] PATH [VALUE|@FILE]`.
pub async fn create(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let data = match parsed.arg(1) {
        Some(argument) => value(argument)?,
        None => Vec::new(),
    };
    let mode = match (parsed.flag('e'), parsed.flag('s')) {
        (false, false) => CreateMode::Persistent,
        (true, false) => CreateMode::Ephemeral,
        (false, true) => CreateMode::PersistentSequential,
        (true, true) => CreateMode::EphemeralSequential,
    };
    // A sequential node named by a directory (`create -s /queue/`) gets the
    // bare counter as its name, so keep the slash the person typed.
    let path = if mode.is_sequential() && parsed.arg(0).is_some_and(|a| a.ends_with('/')) {
        format!("{}/", path.trim_end_matches('/'))
    } else {
        path
    };
    let created = shell.client()?.create(&path, &data, mode).await?;
    shell.emit(
        format!("created {}", render::name(&created)),
        || json!({"path": created, "mode": format!("{mode:?}").to_lowercase()}),
    );
    Ok(())
}

/// `rm [-r] PATH`.
pub async fn rm(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    if path == "/" {
        bail!("the root node cannot be deleted");
    }
    let mut deleted = Vec::new();
    if parsed.flag('r') && parsed.flag('v') {
        bail!("rm -r deletes whatever versions it finds; -v works without -r only");
    }
    if parsed.flag('r') {
        let nodes = walk(&client, &path).await?;
        // Deepest first, so every node is childless when its turn comes.
        let mut order: Vec<(String, usize)> = nodes.into_iter().map(|(p, d, _)| (p, d)).collect();
        order.sort_by_key(|node| std::cmp::Reverse(node.1));
        for (node, _) in order {
            client.delete(&node, None).await?;
            deleted.push(node);
        }
    } else {
        let expected = expected_version(&parsed)?;
        client
            .delete(&path, expected)
            .await
            .map_err(|error| match error {
                ClientError::Refused(synod_proto::Error::NotEmpty { .. }) => {
                    anyhow::anyhow!("node {path} has children; `rm -r {path}` deletes it with them")
                }
                other => other.into(),
            })?;
        deleted.push(path.clone());
    }
    let text = if deleted.len() == 1 {
        format!("deleted {}", render::name(&path))
    } else {
        format!(
            "deleted {} and {} nodes below it",
            render::name(&path),
            deleted.len() - 1
        )
    };
    shell.emit(text, || json!({"deleted": deleted}));
    Ok(())
}

/// `watch [PATH]`: a persistent recursive watch printed until Ctrl-C.
pub async fn watch(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let mut events = client.events();
    client
        .add_watch(&path, WatchKind::PersistentRecursive)
        .await?;
    // Requests and watch registrations share one ordered stream: once this
    // read is answered, the replica has registered the watch.
    let exists = client.exists(&path).await?;
    shell.note(format!(
        "watching {} and below{}; Ctrl-C stops",
        render::name(&path),
        if exists.is_none() {
            " (it does not exist yet)"
        } else {
            ""
        }
    ));
    let result = async {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = interrupted() => return Ok::<(), anyhow::Error>(()),
            };
            let event = match event {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    shell.note(format!("(missed {missed} events: the shell fell behind)"));
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => bail!("the session ended"),
            };
            let relevant = event.event_type == EventType::HistoryCompacted
                || WatchKind::PersistentRecursive.fires_on(&path, &event.path, event.event_type);
            if !relevant {
                continue;
            }
            let mut value_text = String::new();
            let mut value_json = Value::Null;
            if matches!(
                event.event_type,
                EventType::NodeCreated | EventType::NodeDataChanged
            ) {
                if let Ok((data, _)) = client.get(&event.path).await {
                    value_text = format!(" = {}", render::data_preview(&data, PREVIEW_CHARS_MAX));
                    value_json = render::data_json(&data)["data"].clone();
                }
            }
            let kind = match event.event_type {
                EventType::NodeCreated => "created",
                EventType::NodeDeleted => "deleted",
                EventType::NodeDataChanged => "changed",
                EventType::NodeChildrenChanged => "children changed",
                EventType::LeaderChanged => "leader changed",
                EventType::HistoryCompacted => "history compacted: events were missed, re-read",
            };
            shell.emit(
                format!(
                    "[{}] {kind} {}{value_text}",
                    event.revision,
                    render::name(&event.path)
                ),
                || {
                    json!({
                        "revision": event.revision,
                        "type": format!("{:?}", event.event_type),
                        "path": event.path,
                        "data": value_json,
                    })
                },
            );
        }
    }
    .await;
    let _ = client
        .remove_watch(&path, WatchKind::PersistentRecursive)
        .await;
    shell.note("watch stopped");
    result
}

/// In one-shot mode, holds what was just acquired until Ctrl-C, then gives
/// it up.
async fn hold_until_interrupted(shell: &mut Shell, what: &str) -> anyhow::Result<()> {
    if shell.interactive {
        return Ok(());
    }
    shell.note(format!("holding {what}; Ctrl-C releases it and exits"));
    interrupted().await;
    shell.release_all().await;
    Ok(())
}

/// `lock [-s] PATH`: the client's lock recipe, first without waiting so
/// the person learns when the lock is held by someone else.
pub async fn lock(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    if shell.locks.contains_key(&path) {
        bail!("this shell already holds lock {path}");
    }
    let options = if parsed.flag('s') {
        LockOptions::shared()
    } else {
        LockOptions::exclusive()
    };
    let guard = match client.lock_with(&path, options.try_once()).await {
        Ok(guard) => guard,
        Err(ClientError::Refused(synod_proto::Error::LockBusy { .. })) => {
            shell.note(format!(
                "waiting for lock {}: it is held; Ctrl-C gives up",
                render::name(&path)
            ));
            tokio::select! {
                guard = client.lock_with(&path, options) => guard?,
                () = interrupted() => {
                    // The wait may already be queued in the cluster: leave the queue.
                    client
                        .request(Op::ReleaseLock { path: path.clone() }, None, None)
                        .await?;
                    shell.note("gave up waiting");
                    return Err(Interrupted.into());
                }
            }
        }
        Err(error) => return Err(error.into()),
    };
    let sequencer = guard.token().clone();
    shell.emit(
        format!(
            "acquired lock {}: {}",
            render::name(&path),
            token_text(&sequencer)
        ),
        || json!({"lock": path, "sequencer": sequencer_json(&sequencer)}),
    );
    shell.locks.insert(path.clone(), guard);
    hold_until_interrupted(shell, &format!("lock {path}")).await
}

/// `unlock [PATH]`.
pub async fn unlock(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    match parsed.arg(0) {
        Some(argument) => {
            let path = shell.path(argument);
            shell.release_lock(&path).await
        }
        None if shell.locks.is_empty() => bail!("this shell holds no lock"),
        None => {
            let locks: Vec<String> = shell.locks.keys().cloned().collect();
            for path in locks {
                shell.release_lock(&path).await?;
            }
            Ok(())
        }
    }
}

/// `elect NAME VALUE`: the client's campaign recipe.
pub async fn elect(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    let value = parsed.arg(1).unwrap_or("").as_bytes().to_vec();
    if shell.leading.contains_key(&path) {
        bail!("this shell already leads {path}");
    }
    if let Some(leader) = client.leader(&path).await? {
        shell.note(format!(
            "campaigning for {}: session {:#x} leads it now; Ctrl-C withdraws",
            render::name(&path),
            leader.session
        ));
    }
    let leadership = tokio::select! {
        leadership = client.campaign(&path, &value) => leadership?,
        () = interrupted() => {
            // The client gives up an abandoned campaign's place itself; this
            // makes sure, and "not held" means it already did.
            match client.resign(&path).await {
                Ok(()) | Err(ClientError::Refused(synod_proto::Error::LockNotHeld { .. })) => {}
                Err(error) => return Err(error.into()),
            }
            shell.note("withdrew from the election");
            return Err(Interrupted.into());
        }
    };
    let sequencer = leadership.token().clone();
    shell.emit(
        format!(
            "elected leader of {}: {}",
            render::name(&path),
            token_text(&sequencer)
        ),
        || json!({"election": path, "sequencer": sequencer_json(&sequencer)}),
    );
    shell.leading.insert(path.clone(), leadership);
    hold_until_interrupted(shell, &format!("leadership of {path}")).await
}

/// `resign [NAME]`.
pub async fn resign(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    match parsed.arg(0) {
        Some(argument) => {
            let path = shell.path(argument);
            shell.resign_election(&path).await
        }
        None if shell.leading.is_empty() => bail!("this shell leads no election"),
        None => {
            let elections: Vec<String> = shell.leading.keys().cloned().collect();
            for path in elections {
                shell.resign_election(&path).await?;
            }
            Ok(())
        }
    }
}

fn leader_text(path: &str, leader: &Option<LeaderInfo>) -> String {
    match leader {
        None => format!("nobody leads {}", render::name(path)),
        Some(info) => format!(
            "{} is led by session {:#x} with value {}, {}",
            render::name(path),
            info.session,
            render::data_preview(&info.value, PREVIEW_CHARS_MAX),
            token_text(&info.sequencer)
        ),
    }
}

fn leader_json(path: &str, leader: &Option<LeaderInfo>) -> Value {
    match leader {
        None => json!({"election": path, "leader": null}),
        Some(info) => {
            let mut value = render::data_json(&info.value);
            value["session"] = json!(info.session);
            value["sequencer"] = sequencer_json(&info.sequencer);
            json!({"election": path, "leader": value})
        }
    }
}

/// `leader [-w] NAME`.
pub async fn leader(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    let client = shell.client()?.clone();
    let path = shell.path(parsed.arg(0).unwrap_or("."));
    if !parsed.flag('w') {
        let leader = tokio::select! {
            leader = client.leader(&path) => leader?,
            () = interrupted() => return Err(Interrupted.into()),
        };
        shell.emit(leader_text(&path, &leader), || leader_json(&path, &leader));
        return Ok(());
    }
    let mut leaders = client.observe(&path).await?;
    let mut first = true;
    loop {
        let leader = tokio::select! {
            leader = leaders.next() => leader?,
            () = interrupted() => return Ok(()),
        };
        shell.emit(leader_text(&path, &leader), || leader_json(&path, &leader));
        if first {
            shell.note("watching for changes of leader; Ctrl-C stops");
            first = false;
        }
    }
}

/// One replica's answer to `status`, or why there is none.
struct ReplicaReport {
    node_id: u64,
    address: String,
    status: Result<ClusterStatus, String>,
}

/// The line under the status table naming the cluster identity the
/// reachable replicas hold, or saying that they disagree (a replica on
/// another cluster's database).
fn identity_line(reports: &[ReplicaReport]) -> String {
    let held: Vec<(u64, Option<&str>)> = reports
        .iter()
        .filter_map(|report| {
            let status = report.status.as_ref().ok()?;
            Some((report.node_id, status.replica.cluster_identity.as_deref()))
        })
        .collect();
    let Some((_, first)) = held.first() else {
        return String::new();
    };
    if held.iter().all(|(_, identity)| identity == first) {
        return match first {
            Some(identity) => format!("\ncluster identity {identity}"),
            None => "\ncluster identity not minted yet (no leader has committed one)".into(),
        };
    }
    let each: Vec<String> = held
        .iter()
        .map(|(node, identity)| format!("node {node} holds {}", identity.unwrap_or("none")))
        .collect();
    format!(
        "\nreplicas disagree on the cluster identity: {}",
        each.join(", ")
    )
}

/// `status`: asks every member over a connection of its own, without a
/// session, so it works while the cluster has no leader.
pub async fn status(shell: &mut Shell, _parsed: Parsed) -> anyhow::Result<()> {
    let config = shell.config.clone().context(
        "no cluster to talk to: run `synod dev`, or give --endpoints, --ca, --cert and --key",
    )?;
    let attached = shell
        .client
        .as_ref()
        .and_then(|client| match *client.state().borrow() {
            SessionState::Connected { node_id, .. } => Some(node_id),
            _ => None,
        });
    let material = config.tls().load().context("cannot load the TLS files")?;
    let first_address = config
        .endpoints
        .first()
        .context("no endpoints configured")?;
    let prober = Prober::new(
        &material,
        probe::resolve(first_address)?,
        Duration::from_millis(STATUS_TIMEOUT_MS),
    )?;
    // The members and their addresses come from the first replica that
    // answers.
    let mut first = None;
    let mut failures = Vec::new();
    for endpoint in &config.endpoints {
        match prober.status(endpoint, probe::host_of(endpoint)).await {
            Ok(status) => {
                first = Some(status);
                break;
            }
            Err(error) => failures.push(format!("{endpoint}: {error:#}")),
        }
    }
    let Some(first) = first else {
        bail!("no replica answered: {}", failures.join("; "));
    };
    let mut asking = tokio::task::JoinSet::new();
    for (node_id, address) in first.members.clone() {
        if node_id == first.replica.node_id {
            continue;
        }
        let prober = prober.clone();
        asking.spawn(async move {
            let status = prober
                .status(&address, &node_server_name(node_id))
                .await
                .map_err(|error| format!("{error:#}"));
            ReplicaReport {
                node_id,
                address,
                status,
            }
        });
    }
    let mut reports = vec![ReplicaReport {
        node_id: first.replica.node_id,
        address: first
            .members
            .iter()
            .find(|(id, _)| *id == first.replica.node_id)
            .map(|(_, address)| address.clone())
            .unwrap_or_default(),
        status: Ok(first.clone()),
    }];
    while let Some(report) = asking.join_next().await {
        reports.push(report.context("status task failed")?);
    }
    reports.sort_by_key(|report| report.node_id);
    let chosen_max = reports
        .iter()
        .filter_map(|report| report.status.as_ref().ok())
        .map(|status| status.replica.chosen_through)
        .max()
        .unwrap_or(0);
    let mut rows = vec![[
        "ID", "ADDRESS", "ROLE", "LEADER", "BALLOT", "CHOSEN", "APPLIED", "REVISION", "SESSIONS",
        "LAG",
    ]
    .map(String::from)
    .to_vec()];
    let mut replicas = Vec::new();
    for report in &reports {
        let is_attached = attached == Some(report.node_id);
        let mark = if is_attached { "*" } else { " " };
        match &report.status {
            Ok(status) => {
                let replica = &status.replica;
                let lag = chosen_max.saturating_sub(replica.applied_through);
                rows.push(vec![
                    format!("{mark}{}", report.node_id),
                    report.address.clone(),
                    replica.role.clone(),
                    replica.leader.map_or("-".into(), |id| id.to_string()),
                    replica.ballot.clone(),
                    replica.chosen_through.to_string(),
                    replica.applied_through.to_string(),
                    replica.revision.to_string(),
                    replica.sessions.to_string(),
                    lag.to_string(),
                ]);
                replicas.push(json!({
                    "node_id": report.node_id,
                    "address": report.address,
                    "reachable": true,
                    "attached": is_attached,
                    "role": replica.role,
                    "leader": replica.leader,
                    "ballot": replica.ballot,
                    "chosen_through": replica.chosen_through,
                    "applied_through": replica.applied_through,
                    "revision": replica.revision,
                    "sessions": replica.sessions,
                    "watches": replica.watches,
                    "lag_slots": lag,
                    "cluster_identity": replica.cluster_identity,
                    "confirmed_members": replica.confirmed_members,
                    "waiting": replica.waiting,
                    "peers": replica
                        .peers
                        .iter()
                        .map(|(id, chosen)| json!({"node_id": id, "chosen_through": chosen}))
                        .collect::<Vec<_>>(),
                }));
            }
            Err(error) => {
                let mut row = vec![
                    format!("{mark}{}", report.node_id),
                    report.address.clone(),
                    "unreachable".into(),
                ];
                row.extend(std::iter::repeat_n("-".to_string(), 7));
                rows.push(row);
                replicas.push(json!({
                    "node_id": report.node_id,
                    "address": report.address,
                    "reachable": false,
                    "attached": is_attached,
                    "error": error,
                }));
            }
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = rows
        .iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.push_str(&identity_line(&reports));
    for report in &reports {
        match &report.status {
            Err(error) => text.push_str(&format!("\nreplica {}: {error}", report.node_id)),
            Ok(status) => {
                if let Some(reason) = &status.replica.waiting {
                    text.push_str(&format!("\nreplica {}: {reason}", report.node_id));
                }
            }
        }
    }
    let health = cluster_health(
        &reports,
        first.replica.node_id,
        first.members.len(),
        chosen_max,
    );
    shell.emit(text, || {
        json!({
            "replicas": replicas,
            "quorum": health.quorum.is_ok(),
            "asked_replica_ready": health.asked_ready.is_ok(),
        })
    });
    // Scripts read the exit code: the table (or JSON) is printed either way.
    health
        .quorum
        .map_err(|reason| anyhow::anyhow!("no quorum: {reason}"))?;
    health.asked_ready.map_err(|reason| {
        anyhow::anyhow!("replica {} is not ready: {reason}", first.replica.node_id)
    })?;
    Ok(())
}

/// A replica whose applied slot trails the cluster's chosen prefix by more
/// than this is not ready (as the replica's own `/readyz` defaults to).
const READY_LAG_SLOTS_MAX: u64 = 1_000;

/// What `status` concludes, for its exit code.
struct ClusterHealth {
    /// A leader that a majority of the members follow, or why there is none.
    quorum: Result<u64, String>,
    /// Whether the replica asked first is ready (knows a leader, is not
    /// joining, is caught up), or why not.
    asked_ready: Result<(), String>,
}

fn cluster_health(
    reports: &[ReplicaReport],
    asked: u64,
    members: usize,
    chosen_max: u64,
) -> ClusterHealth {
    let statuses: Vec<_> = reports
        .iter()
        .filter_map(|report| report.status.as_ref().ok())
        .map(|status| &status.replica)
        .collect();
    let majority = members / 2 + 1;
    let quorum = statuses
        .iter()
        .filter(|replica| replica.role == "leader")
        .map(|leader| {
            let followers = statuses
                .iter()
                .filter(|replica| replica.leader == Some(leader.node_id))
                .count();
            (leader.node_id, followers)
        })
        .find(|&(_, followers)| followers >= majority)
        .map(|(leader, _)| leader)
        .ok_or_else(|| {
            format!(
                "{} of {members} members answered, and no leader is followed by {majority} of them",
                statuses.len()
            )
        });
    let asked_ready = match statuses.iter().find(|replica| replica.node_id == asked) {
        None => Err("it did not answer".to_string()),
        Some(replica) if replica.role == "joining" => {
            Err("it is rejoining after a lost disk and does not vote yet".to_string())
        }
        Some(replica) if replica.leader.is_none() => Err("it knows no leader".to_string()),
        Some(replica) => {
            let lag = chosen_max.saturating_sub(replica.applied_through);
            if lag > READY_LAG_SLOTS_MAX {
                Err(format!("it is {lag} slots behind the cluster"))
            } else {
                Ok(())
            }
        }
    };
    ClusterHealth {
        quorum,
        asked_ready,
    }
}

/// `help [COMMAND]`.
pub async fn help(shell: &mut Shell, parsed: Parsed) -> anyhow::Result<()> {
    match parsed.arg(0) {
        Some(name) => {
            let spec = table::find(name).ok_or_else(|| {
                UsageError(format!("no command `{name}`; `help` lists the commands"))
            })?;
            shell.emit(
                spec.help(),
                || json!({"command": spec.name, "usage": spec.usage(), "help": spec.help()}),
            );
        }
        None => {
            let text = format!(
                "Commands (paths may be relative to the current node; quote values with spaces):\n{}\
                 \nTab completes commands and node paths. Ctrl-C cancels a running command; \
                 Ctrl-D leaves.\n`help COMMAND` tells more.",
                table::overview()
            );
            shell.emit(text, || {
                json!({"commands": table::COMMANDS.iter().map(|spec| json!({
                    "name": spec.name,
                    "usage": spec.usage(),
                    "summary": spec.summary,
                })).collect::<Vec<_>>()})
            });
        }
    }
    Ok(())
}

/// `exit`.
pub async fn exit(shell: &mut Shell, _parsed: Parsed) -> anyhow::Result<()> {
    shell.exit_requested = true;
    Ok(())
}
