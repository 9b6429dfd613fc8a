//! The interactive shell on rustyline: a helper that completes commands
//! and node paths (children fetched from the cluster) and hints a
//! command's usage, all from the command table; persistent history; Ctrl-C
//! cancels the running command, Ctrl-D leaves.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::ExternalPrinter;
use rustyline::{CompletionType, Config, Context, Editor, Helper};
use synod_client::{Client, ClientError, SessionState};
use tokio::runtime::Runtime;

use crate::commands::{Flow, Interrupted, Shell};
use crate::paths;
use crate::render;
use crate::table::{self, ArgKind};

/// Longest wait for the children of a node while completing.
const COMPLETION_TIMEOUT_MS: u64 = 1_000;

/// Lines kept in the history file.
const HISTORY_LINES_MAX: usize = 10_000;

/// Completion and hints for the shell, from the command table.
pub struct ShellHelper {
    client: Option<Client>,
    runtime: tokio::runtime::Handle,
    /// The current node, refreshed before each prompt.
    pub cwd: String,
}

impl ShellHelper {
    fn complete_path(&self, partial: &str) -> Vec<Pair> {
        let Some(client) = &self.client else {
            return Vec::new();
        };
        let (directory, prefix) = paths::split_partial(partial);
        let parent = paths::resolve(&self.cwd, directory);
        let lookup = async {
            let children = client.children(&parent).await.ok()?;
            let matching: Vec<String> = children
                .into_iter()
                .filter(|name| name.starts_with(prefix))
                .collect();
            // A single match that has children completes with a slash, so the
            // next Tab goes on into it; one without children with a space.
            let single_suffix = match matching.as_slice() {
                [only] => match client.exists(&paths::child(&parent, only)).await {
                    Ok(Some(stat)) if stat.children_count > 0 => "/",
                    _ => " ",
                },
                _ => "",
            };
            Some((matching, single_suffix))
        };
        let result = self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(COMPLETION_TIMEOUT_MS), lookup)
                .await
                .ok()
                .flatten()
        });
        let Some((matching, suffix)) = result else {
            return Vec::new();
        };
        matching
            .into_iter()
            .filter(|name| !name.chars().any(char::is_control))
            .map(|name| Pair {
                display: name.clone(),
                replacement: format!("{directory}{name}{suffix}"),
            })
            .collect()
    }
}

/// The words before the cursor, and whether the cursor starts a new word.
fn words_before(line: &str) -> (Vec<&str>, bool) {
    (
        line.split_whitespace().collect(),
        line.is_empty() || line.ends_with(char::is_whitespace),
    )
}

/// How many of `words` (after the command name) are positional arguments:
/// not flags, nor the values of flags that take one.
fn positional_count(spec: &table::CommandSpec, words: &[&str]) -> usize {
    let mut count = 0;
    let mut words = words.iter();
    while let Some(word) = words.next() {
        if word.len() > 1 && word.starts_with('-') {
            let takes_value = word[1..].chars().last().is_some_and(|letter| {
                spec.flags
                    .iter()
                    .any(|flag| flag.letter == letter && flag.value.is_some())
            });
            if takes_value {
                words.next();
            }
        } else {
            count += 1;
        }
    }
    count
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _context: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let (mut words, new_word) = words_before(before);
        let current = if new_word {
            ""
        } else {
            words.pop().unwrap_or("")
        };
        let start = pos - current.len();
        if words.is_empty() {
            let candidates = table::names()
                .filter(|name| name.starts_with(current))
                .map(|name| Pair {
                    display: name.to_string(),
                    replacement: format!("{name} "),
                })
                .collect();
            return Ok((start, candidates));
        }
        let Some(spec) = table::find(words[0]) else {
            return Ok((start, Vec::new()));
        };
        if current.starts_with('-') {
            return Ok((start, Vec::new()));
        }
        let index = positional_count(spec, &words[1..]);
        let candidates = match spec.arg_kind(index) {
            Some(ArgKind::Path) => self.complete_path(current),
            Some(ArgKind::Command) => table::COMMANDS
                .iter()
                .filter(|spec| spec.name.starts_with(current))
                .map(|spec| Pair {
                    display: spec.name.to_string(),
                    replacement: format!("{} ", spec.name),
                })
                .collect(),
            Some(ArgKind::Text) | None => Vec::new(),
        };
        Ok((start, candidates))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;

    /// After a command name and a space, the rest of its usage line.
    fn hint(&self, line: &str, pos: usize, _context: &Context<'_>) -> Option<String> {
        if pos != line.len() || !line.ends_with(' ') {
            return None;
        }
        let mut words = line.split_whitespace();
        let name = words.next()?;
        if words.next().is_some() {
            return None;
        }
        let spec = table::find(name)?;
        let usage = spec.usage();
        let rest = usage.strip_prefix(spec.name)?.trim_start();
        (!rest.is_empty()).then(|| rest.to_string())
    }
}

impl Highlighter for ShellHelper {
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        Cow::Owned(format!("\x1b[2m{hint}\x1b[0m"))
    }
}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

/// Where the history is kept: `$SYNOD_HISTORY`, else `~/.synod_history`.
pub fn history_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SYNOD_HISTORY").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(".synod_history"))
}

/// Prints changes of the session's connection above the prompt, as they
/// happen: lost, attached again, expired.
fn report_session_changes(
    runtime: &Runtime,
    editor: &mut Editor<ShellHelper, DefaultHistory>,
    client: &Client,
) {
    let Ok(mut printer) = editor.create_external_printer() else {
        return;
    };
    let mut state = client.state();
    runtime.spawn(async move {
        let mut last = *state.borrow_and_update();
        while state.changed().await.is_ok() {
            let now = *state.borrow_and_update();
            let message = match (last, now) {
                (_, SessionState::Suspended) => Some(
                    "(lost the connection to the replica; looking for another: locks and \
                     ephemeral nodes are kept meanwhile)"
                        .to_string(),
                ),
                (SessionState::Suspended, SessionState::Connected { node_id, .. }) => {
                    Some(format!("(connected again, through replica {node_id})"))
                }
                (_, SessionState::Expired) => Some(
                    "(the session expired: its locks and ephemeral nodes are gone; the next \
                     command opens a new one)"
                        .to_string(),
                ),
                _ => None,
            };
            if let Some(message) = message {
                let _ = printer.print(format!("{message}\n"));
            }
            last = now;
            if now.is_ended() {
                break;
            }
        }
    });
}

fn session_expired(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<ClientError>(),
        Some(
            ClientError::SessionExpired
                | ClientError::Refused(synod_proto::Error::SessionExpired { .. })
        )
    )
}

/// Opens a new session after the old one expired, so the shell goes on.
fn reconnect(
    runtime: &Runtime,
    shell: &mut Shell,
    editor: &mut Editor<ShellHelper, DefaultHistory>,
) {
    eprintln!("the session expired: its locks, leaderships and ephemeral nodes are gone; opening a new one");
    match runtime.block_on(shell.reconnect()) {
        Ok(client) => {
            report_session_changes(runtime, editor, &client);
            if let Some(helper) = editor.helper_mut() {
                helper.client = Some(client);
            }
            eprintln!("connected again");
        }
        Err(error) => eprintln!("error: {error:#}"),
    }
}

fn prompt(shell: &Shell) -> String {
    let mut held: Vec<String> = shell
        .locks
        .keys()
        .map(|path| format!("lock {}", render::name(path)))
        .collect();
    held.extend(
        shell
            .leading
            .keys()
            .map(|path| format!("leader {}", render::name(path))),
    );
    if held.is_empty() {
        format!("synod:{}> ", render::name(&shell.cwd))
    } else {
        format!("synod:{} [{}]> ", render::name(&shell.cwd), held.join(", "))
    }
}

/// Runs the shell until Ctrl-D or `exit`, then releases what the session
/// holds and closes it.
///
/// # Errors
/// The terminal failed.
pub fn run(runtime: &Runtime, shell: &mut Shell) -> anyhow::Result<()> {
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .history_ignore_space(true)
        .history_ignore_dups(true)?
        .max_history_size(HISTORY_LINES_MAX)?
        .auto_add_history(false)
        .build();
    let mut editor: Editor<ShellHelper, DefaultHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(ShellHelper {
        client: shell.client.clone(),
        runtime: runtime.handle().clone(),
        cwd: shell.cwd.clone(),
    }));
    if let Some(client) = &shell.client {
        report_session_changes(runtime, &mut editor, client);
    }
    let history = history_path();
    if let Some(path) = &history {
        // A missing history file is the normal first run.
        let _ = editor.load_history(path);
    }
    loop {
        if let Some(helper) = editor.helper_mut() {
            helper.cwd = shell.cwd.clone();
        }
        shell.forget_lost();
        match editor.readline(&prompt(shell)) {
            Ok(line) => {
                let trimmed = line.trim();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                let _ = editor.add_history_entry(trimmed);
                if let Some(path) = &history {
                    let _ = editor.save_history(path);
                }
                let Some(words) = shlex::split(trimmed) else {
                    eprintln!("error: unclosed quote");
                    continue;
                };
                let expired = shell.client.as_ref().is_some_and(|client| {
                    matches!(*client.state().borrow(), SessionState::Expired)
                });
                if expired {
                    reconnect(runtime, shell, &mut editor);
                }
                match runtime.block_on(shell.execute(&words)) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Exit) => break,
                    Err(error) if error.is::<Interrupted>() => eprintln!("^C (cancelled)"),
                    Err(error) => {
                        eprintln!("error: {error:#}");
                        if session_expired(&error) {
                            reconnect(runtime, shell, &mut editor);
                        }
                    }
                }
            }
            Err(ReadlineError::Interrupted) => {
                if shell.holds_anything() {
                    runtime.block_on(shell.release_all());
                } else {
                    say!("(Ctrl-D or `exit` leaves the shell)");
                }
            }
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(error.into()),
        }
    }
    runtime.block_on(async {
        shell.release_all().await;
        if let Some(client) = &shell.client {
            client.close().await;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper() -> (Runtime, ShellHelper) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        (
            runtime,
            ShellHelper {
                client: None,
                runtime: handle,
                cwd: "/".into(),
            },
        )
    }

    #[test]
    fn completes_command_names_from_the_table() {
        let (_runtime, helper) = helper();
        let history = DefaultHistory::new();
        let context = Context::new(&history);
        let (start, candidates) = helper.complete("wa", 2, &context).expect("completes");
        assert_eq!(start, 0);
        let names: Vec<&str> = candidates.iter().map(|c| c.replacement.as_str()).collect();
        assert_eq!(names, vec!["watch "]);
        let (start, candidates) = helper.complete("help lo", 7, &context).expect("completes");
        assert_eq!(start, 5);
        assert_eq!(candidates[0].replacement, "lock ");
    }

    #[test]
    fn hints_the_usage_after_a_command() {
        let (_runtime, helper) = helper();
        let history = DefaultHistory::new();
        let context = Context::new(&history);
        assert_eq!(
            helper.hint("ls ", 3, &context).as_deref(),
            Some("[-l] [-R] [PATH]")
        );
        assert_eq!(helper.hint("ls /a", 5, &context), None);
        assert_eq!(helper.hint("pwd ", 4, &context), None);
    }
}
