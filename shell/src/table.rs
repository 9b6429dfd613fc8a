//! The command table: every shell command's name, usage, help, flags,
//! arguments and handler. Completion, help, argument checking and dispatch
//! all read this one table, in the REPL and from the command line alike.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use crate::commands::{self, Shell};

/// A handler's future: it borrows the shell for as long as it runs.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// Runs a command with its checked arguments.
pub type Handler = for<'a> fn(&'a mut Shell, Parsed) -> HandlerFuture<'a>;

/// What an argument is, which decides how it is completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A node path: completed from the cluster's children.
    Path,
    /// A command name: completed from this table.
    Command,
    /// Free text (a value, an election name): not completed.
    Text,
}

/// One positional argument.
#[derive(Debug, Clone, Copy)]
pub struct Arg {
    /// Its name in the usage line.
    pub name: &'static str,
    /// How it is completed.
    pub kind: ArgKind,
    /// Whether it may be left out.
    pub optional: bool,
}

/// One single-letter flag.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// The letter, as in `-l`.
    pub letter: char,
    /// What it does.
    pub help: &'static str,
    /// The name of the value it takes (`-v VERSION`), if it takes one.
    pub value: Option<&'static str>,
}

impl Flag {
    fn usage(&self) -> String {
        match self.value {
            Some(value) => format!("-{} {value}", self.letter),
            None => format!("-{}", self.letter),
        }
    }
}

/// Whether the dispatcher cancels the command on Ctrl-C, or the command
/// watches for Ctrl-C itself (to clean up: stop a watch, give up a wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Ctrl-C drops the running command.
    Cancel,
    /// The command handles Ctrl-C.
    Handled,
}

/// One command.
#[derive(Clone, Copy)]
pub struct CommandSpec {
    /// Its name.
    pub name: &'static str,
    /// Other names it answers to.
    pub aliases: &'static [&'static str],
    /// One line on what it does.
    pub summary: &'static str,
    /// More on how it behaves, for `help COMMAND`.
    pub details: &'static str,
    /// Its flags.
    pub flags: &'static [Flag],
    /// Its positional arguments, required ones first.
    pub args: &'static [Arg],
    /// Who handles Ctrl-C.
    pub interrupt: Interrupt,
    /// Whether it needs a connection (`help` and `pwd` do not).
    pub needs_cluster: bool,
    /// What runs it.
    pub run: Handler,
}

impl std::fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CommandSpec {
    /// The usage line: `ls [-l] [-R] [PATH]`.
    pub fn usage(&self) -> String {
        let mut usage = self.name.to_string();
        for flag in self.flags {
            usage.push_str(&format!(" [{}]", flag.usage()));
        }
        for arg in self.args {
            if arg.optional {
                usage.push_str(&format!(" [{}]", arg.name));
            } else {
                usage.push_str(&format!(" {}", arg.name));
            }
        }
        usage
    }

    /// The full help text.
    pub fn help(&self) -> String {
        let mut help = format!("usage: {}\n\n{}", self.usage(), self.summary);
        if !self.details.is_empty() {
            help.push_str(&format!("\n{}", self.details));
        }
        if !self.flags.is_empty() {
            help.push('\n');
            for flag in self.flags {
                help.push_str(&format!("\n  {:<10}  {}", flag.usage(), flag.help));
            }
        }
        if !self.aliases.is_empty() {
            help.push_str(&format!("\n\nalso: {}", self.aliases.join(", ")));
        }
        help
    }

    /// The kind of the `index`-th positional argument, if there is one.
    pub fn arg_kind(&self, index: usize) -> Option<ArgKind> {
        self.args.get(index).map(|arg| arg.kind)
    }

    /// Checks words (after the command name) against the flags and the
    /// number of arguments. `--json` is accepted anywhere; `--` ends flags.
    ///
    /// # Errors
    /// A [`UsageError`] naming the problem and showing the usage.
    pub fn parse(&self, words: &[String]) -> Result<Parsed, UsageError> {
        let mut parsed = Parsed::default();
        let mut flags_done = false;
        let mut words = words.iter();
        while let Some(word) = words.next() {
            if !flags_done && word == "--" {
                flags_done = true;
            } else if word == "--json" {
                parsed.json = true;
            } else if !flags_done && word.len() > 1 && word.starts_with('-') {
                for (index, letter) in word[1..].char_indices() {
                    let Some(flag) = self.flags.iter().find(|flag| flag.letter == letter) else {
                        return Err(self.usage_error(format!("unknown flag -{letter}")));
                    };
                    parsed.flags.insert(letter);
                    if let Some(name) = flag.value {
                        // `-v3` or `-v 3`.
                        let attached = &word[1 + index + letter.len_utf8()..];
                        let value = if attached.is_empty() {
                            words.next().cloned().ok_or_else(|| {
                                self.usage_error(format!("-{letter} needs a {name}"))
                            })?
                        } else {
                            attached.to_string()
                        };
                        parsed.values.insert(letter, value);
                        break;
                    }
                }
            } else {
                parsed.args.push(word.clone());
            }
        }
        let required = self.args.iter().filter(|arg| !arg.optional).count();
        if parsed.args.len() < required {
            let missing = self.args[parsed.args.len()].name;
            return Err(self.usage_error(format!("missing {missing}")));
        }
        if parsed.args.len() > self.args.len() {
            return Err(self.usage_error(format!(
                "too many arguments (quote a value with spaces: '{}')",
                parsed.args[self.args.len()..].join(" ")
            )));
        }
        Ok(parsed)
    }

    fn usage_error(&self, problem: String) -> UsageError {
        UsageError(format!("{}: {problem}\nusage: {}", self.name, self.usage()))
    }
}

/// A command's words, checked against its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The flags given.
    pub flags: BTreeSet<char>,
    /// The positional arguments.
    pub args: Vec<String>,
    /// Whether `--json` was given.
    pub json: bool,
    /// The values of flags that take one.
    pub values: BTreeMap<char, String>,
}

impl Parsed {
    /// Whether flag `letter` was given.
    pub fn flag(&self, letter: char) -> bool {
        self.flags.contains(&letter)
    }

    /// The value of flag `letter`, if given.
    pub fn value(&self, letter: char) -> Option<&str> {
        self.values.get(&letter).map(String::as_str)
    }

    /// The `index`-th argument, if given.
    pub fn arg(&self, index: usize) -> Option<&str> {
        self.args.get(index).map(String::as_str)
    }
}

/// The words do not fit the command; the message shows its usage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

const PATH: Arg = Arg {
    name: "PATH",
    kind: ArgKind::Path,
    optional: false,
};
const OPTIONAL_PATH: Arg = Arg {
    name: "PATH",
    kind: ArgKind::Path,
    optional: true,
};
const NAME: Arg = Arg {
    name: "NAME",
    kind: ArgKind::Path,
    optional: false,
};

const VERSION_FLAG: Flag = Flag {
    letter: 'v',
    help: "only if the node is at this version (compare and set)",
    value: Some("VERSION"),
};

macro_rules! handler {
    ($function:path) => {
        |shell, parsed| Box::pin($function(shell, parsed))
    };
}

/// Every command of the shell, in the order `help` lists them.
pub static COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "ls",
        aliases: &[],
        summary: "List a node's children (the current node by default).",
        details: "With -l, one line per child: version, data size, children, \
                  ephemeral mark, last change and name.",
        flags: &[
            Flag {
                letter: 'l',
                help: "long listing with each child's stat",
                value: None,
            },
            Flag {
                letter: 'R',
                help: "list every descendant, as full paths",
                value: None,
            },
        ],
        args: &[OPTIONAL_PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::ls),
    },
    CommandSpec {
        name: "tree",
        aliases: &[],
        summary: "Draw the subtree under a node.",
        details: "",
        flags: &[],
        args: &[OPTIONAL_PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::tree),
    },
    CommandSpec {
        name: "cd",
        aliases: &[],
        summary: "Change the current node; relative paths start from it.",
        details: "`cd` alone goes to /, `cd ..` to the parent.",
        flags: &[],
        args: &[OPTIONAL_PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::cd),
    },
    CommandSpec {
        name: "pwd",
        aliases: &[],
        summary: "Print the current node.",
        details: "",
        flags: &[],
        args: &[],
        interrupt: Interrupt::Cancel,
        needs_cluster: false,
        run: handler!(commands::pwd),
    },
    CommandSpec {
        name: "get",
        aliases: &["cat"],
        summary: "Print a node's data.",
        details: "Text is printed as it is; binary data as a hex dump. \
                  With --json: {\"path\", \"data\", \"data_hex\" (binary only), \"stat\"}.",
        flags: &[],
        args: &[PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::get),
    },
    CommandSpec {
        name: "stat",
        aliases: &[],
        summary: "Print a node's metadata: revisions, times, version, children, owner.",
        details: "",
        flags: &[],
        args: &[PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::stat),
    },
    CommandSpec {
        name: "set",
        aliases: &[],
        summary: "Replace a node's data.",
        details: "VALUE is taken as it is; @FILE reads the value from a file \
                  (write @@ for a value starting with @).",
        flags: &[VERSION_FLAG],
        args: &[
            PATH,
            Arg {
                name: "VALUE|@FILE",
                kind: ArgKind::Text,
                optional: false,
            },
        ],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::set),
    },
    CommandSpec {
        name: "create",
        aliases: &["mk"],
        summary: "Create a node, empty or with a value (VALUE or @FILE, as for set).",
        details: "Ephemeral nodes live as long as this shell's session: in a \
                  one-shot command, that ends when the command does.",
        flags: &[
            Flag {
                letter: 'e',
                help: "ephemeral: deleted when this session ends",
                value: None,
            },
            Flag {
                letter: 's',
                help: "sequential: a 10-digit counter is appended to the name",
                value: None,
            },
        ],
        args: &[
            PATH,
            Arg {
                name: "VALUE|@FILE",
                kind: ArgKind::Text,
                optional: true,
            },
        ],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::create),
    },
    CommandSpec {
        name: "rm",
        aliases: &["delete"],
        summary: "Delete a node.",
        details: "A node with children is deleted only with -r.",
        flags: &[
            Flag {
                letter: 'r',
                help: "delete the node and everything below it",
                value: None,
            },
            VERSION_FLAG,
        ],
        args: &[PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::rm),
    },
    CommandSpec {
        name: "watch",
        aliases: &[],
        summary: "Print every change at or below a node until Ctrl-C.",
        details: "Creations, data changes (with the new value) and deletions, \
                  each with its revision. Ctrl-C ends the watch and returns to the prompt.",
        flags: &[],
        args: &[OPTIONAL_PATH],
        interrupt: Interrupt::Handled,
        needs_cluster: true,
        run: handler!(commands::watch),
    },
    CommandSpec {
        name: "lock",
        aliases: &[],
        summary: "Acquire a lock (waiting for it if held) and show its fencing token.",
        details: "In the shell the lock stays held, shown in the prompt, until `unlock` \
                  or Ctrl-C at an empty prompt; as a one-shot command it is held until \
                  Ctrl-C. Ctrl-C while waiting gives up the wait.",
        flags: &[Flag {
            letter: 's',
            help: "shared instead of exclusive",
            value: None,
        }],
        args: &[PATH],
        interrupt: Interrupt::Handled,
        needs_cluster: true,
        run: handler!(commands::lock),
    },
    CommandSpec {
        name: "unlock",
        aliases: &[],
        summary: "Release a lock this shell holds (every one, without PATH).",
        details: "",
        flags: &[],
        args: &[OPTIONAL_PATH],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::unlock),
    },
    CommandSpec {
        name: "elect",
        aliases: &["campaign"],
        summary: "Campaign to lead the election NAME with VALUE; waits until elected.",
        details: "Leadership is kept, shown in the prompt, until `resign` or Ctrl-C at \
                  an empty prompt (one-shot: until Ctrl-C). Ctrl-C while waiting withdraws.",
        flags: &[],
        args: &[
            NAME,
            Arg {
                name: "VALUE",
                kind: ArgKind::Text,
                optional: false,
            },
        ],
        interrupt: Interrupt::Handled,
        needs_cluster: true,
        run: handler!(commands::elect),
    },
    CommandSpec {
        name: "resign",
        aliases: &[],
        summary: "Stop leading an election (every one, without NAME).",
        details: "",
        flags: &[],
        args: &[Arg {
            name: "NAME",
            kind: ArgKind::Path,
            optional: true,
        }],
        interrupt: Interrupt::Cancel,
        needs_cluster: true,
        run: handler!(commands::resign),
    },
    CommandSpec {
        name: "leader",
        aliases: &[],
        summary: "Show who leads the election NAME: session, value and fencing token.",
        details: "With -w, keep printing every change of leader until Ctrl-C.",
        flags: &[Flag {
            letter: 'w',
            help: "watch: print every change of leader",
            value: None,
        }],
        args: &[NAME],
        interrupt: Interrupt::Handled,
        needs_cluster: true,
        run: handler!(commands::leader),
    },
    CommandSpec {
        name: "status",
        aliases: &[],
        summary: "Show every replica: role, leader, ballot, chosen and applied slots, \
                  sessions, lag.",
        details: "Asks each member on its own connection, without a session, so it works \
                  while the cluster has no leader; a replica that does not answer is shown as \
                  unreachable. Lag is how many slots a replica has applied \
                  fewer than the highest chosen slot seen. * marks the replica this \
                  shell's session is attached to.",
        flags: &[],
        args: &[],
        interrupt: Interrupt::Cancel,
        needs_cluster: false,
        run: handler!(commands::status),
    },
    CommandSpec {
        name: "help",
        aliases: &["?"],
        summary: "List the commands, or explain one.",
        details: "",
        flags: &[],
        args: &[Arg {
            name: "COMMAND",
            kind: ArgKind::Command,
            optional: true,
        }],
        interrupt: Interrupt::Cancel,
        needs_cluster: false,
        run: handler!(commands::help),
    },
    CommandSpec {
        name: "exit",
        aliases: &["quit"],
        summary: "Leave the shell (Ctrl-D does too); held locks and leaderships end.",
        details: "",
        flags: &[],
        args: &[],
        interrupt: Interrupt::Cancel,
        needs_cluster: false,
        run: handler!(commands::exit),
    },
];

/// The command named `name` (or one of its aliases).
pub fn find(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS
        .iter()
        .find(|spec| spec.name == name || spec.aliases.contains(&name))
}

/// Every name and alias, for completion.
pub fn names() -> impl Iterator<Item = &'static str> {
    COMMANDS
        .iter()
        .flat_map(|spec| std::iter::once(spec.name).chain(spec.aliases.iter().copied()))
}

/// The list `help` prints: one aligned line per command.
pub fn overview() -> String {
    let width = COMMANDS
        .iter()
        .map(|spec| spec.usage().len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for spec in COMMANDS {
        text.push_str(&format!(
            "  {:<width$}  {}\n",
            spec.usage(),
            spec.summary
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_flags_arguments_and_json() {
        let ls = find("ls").expect("ls");
        let parsed = ls.parse(&words("-lR /a --json")).expect("parses");
        assert!(parsed.flag('l') && parsed.flag('R') && parsed.json);
        assert_eq!(parsed.args, vec!["/a".to_string()]);
        let set = find("set").expect("set");
        let parsed = set.parse(&words("/a -- -1")).expect("parses");
        assert_eq!(parsed.args, vec!["/a".to_string(), "-1".to_string()]);
        let parsed = set.parse(&words("-v 3 /a x")).expect("parses");
        assert_eq!(parsed.value('v'), Some("3"));
        assert_eq!(parsed.args.len(), 2);
        assert_eq!(
            set.parse(&words("-v4 /a x")).expect("parses").value('v'),
            Some("4")
        );
        assert!(set
            .parse(&words("/a x -v"))
            .expect_err("no value")
            .0
            .contains("VERSION"));
        assert_eq!(set.usage(), "set [-v VERSION] PATH VALUE|@FILE");
    }

    #[test]
    fn refuses_unknown_flags_and_wrong_counts_with_usage() {
        let ls = find("ls").expect("ls");
        let error = ls.parse(&words("-x")).expect_err("bad flag");
        assert!(error.0.contains("unknown flag -x"));
        assert!(error.0.contains("usage: ls [-l] [-R] [PATH]"));
        let get = find("get").expect("get");
        assert!(get
            .parse(&[])
            .expect_err("missing")
            .0
            .contains("missing PATH"));
        assert!(get.parse(&words("/a /b")).is_err());
    }

    #[test]
    fn names_are_unique_and_every_command_has_help() {
        let mut seen = BTreeSet::new();
        for name in names() {
            assert!(seen.insert(name), "{name} is listed twice");
        }
        for spec in COMMANDS {
            assert!(!spec.summary.is_empty());
            assert!(spec.help().contains(&spec.usage()));
        }
        assert!(overview().contains("watch [PATH]"));
    }
}
