//! The command line explains itself: every subcommand and every argument has help text, the README's commands
//! table names what `whist help` lists, the exit codes say how a command ended (0 ok, 1 failure, 2 usage, 3 a
//! verification found a difference), and `whist --version` names the commit the binary was built from.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::Duration;

use crate::whist_binary;

/// Runs `whist arguments` with no environment but PATH, to its end.
fn run_whist(arguments: &[&str], environment: &[(&str, &str)]) -> Output {
    let working_dir = tempfile::tempdir().expect("a temporary folder");
    Command::new(whist_binary())
        .args(arguments)
        .current_dir(working_dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(environment.iter().copied())
        .output()
        .expect("the whist binary runs")
}

/// Runs `whist arguments` against the test's Postgres database until it exits (at most 120 s); (its exit code,
/// its log). The exit code is `None` when a signal ended it.
pub async fn whist_exit_code(
    database: &whist_tests::TestDatabase,
    arguments: &[&str],
    log: &str,
) -> (Option<i32>, String) {
    let mut child = whist_tests::ChildProcess::start(
        &whist_binary(),
        arguments,
        database.data_dir.path(),
        &[(
            "DATABASE_URL",
            database.url.clone().expect("a Postgres database"),
        )],
        log,
    );
    let Some(status) = child.exited(Duration::from_secs(120)).await else {
        panic!(
            "whist {arguments:?} did not exit within 120 s; its log:\n{}",
            child.log_text()
        );
    };
    (status.code(), child.log_text())
}

/// One line of a help section: a subcommand or an argument, and whether it says what it is.
#[derive(Debug, Clone)]
struct Entry {
    /// A subcommand's name, an option's long flag (`--after`), or a positional's value name (`<INSTANCE_ID>`).
    name: String,
    /// Its description, without clap's own annotations (`[default: …]`, `[possible values: …]`).
    description: String,
}

/// A command's `--help`, read.
#[derive(Debug, Clone, Default)]
struct Help {
    /// The entries of its `Commands:` section.
    commands: Vec<Entry>,
    /// The entries of its `Arguments:` and `Options:` sections.
    arguments: Vec<Entry>,
}

/// Indentation of a line, in spaces.
fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// `text` without clap's annotations (`[default: 1]`, `[env: X=]`, `[possible values: a, b]`, `[aliases: …]`) and
/// its `Possible values:` lists: what is left is what a person wrote.
fn written_description(text: &str) -> String {
    let mut left = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('[') {
        let annotation = ["[default:", "[env:", "[possible values:", "[aliases:"]
            .iter()
            .any(|prefix| rest[start..].starts_with(prefix));
        match rest[start..].find(']') {
            Some(length) if annotation => {
                left.push_str(&rest[..start]);
                rest = &rest[start + length + 1..];
            }
            _ => {
                left.push_str(&rest[..=start]);
                rest = &rest[start + 1..];
            }
        }
    }
    left.push_str(rest);
    left.lines()
        .map(str::trim)
        .filter(|line| *line != "Possible values:" && !line.starts_with("- "))
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// Reads clap's help text. Sections start with an unindented `Name:` line; an entry is a line indented by at most
/// six spaces (`  -h, --help`, `      --after <AFTER>`, `  serve`), its description either on the same line after
/// two or more spaces or on the lines below it indented further (clap's two layouts).
fn read_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section: Option<String> = None;
    // The entry being read: its section, its name, its description so far.
    let mut entry: Option<(String, Entry)> = None;
    let finish = |entry: &mut Option<(String, Entry)>, help: &mut Help| {
        if let Some((section, mut finished)) = entry.take() {
            finished.description = written_description(&finished.description);
            if section == "Commands" {
                help.commands.push(finished);
            } else {
                help.arguments.push(finished);
            }
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if indentation(line) == 0 {
            finish(&mut entry, &mut help);
            section = line
                .strip_suffix(':')
                .filter(|name| ["Commands", "Arguments", "Options"].contains(name))
                .map(str::to_string);
            continue;
        }
        let Some(section) = &section else { continue };
        if indentation(line) <= 6 {
            finish(&mut entry, &mut help);
            let trimmed = line.trim_start();
            let (head, description) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            let name = if section == "Commands" {
                head.split_whitespace().next().unwrap_or(head).to_string()
            } else {
                // `-h, --help` → `--help`; `--after <AFTER>` → `--after`; `<INSTANCE_ID>` stays.
                head.split([' ', ','])
                    .find(|part| part.starts_with("--"))
                    .unwrap_or(head)
                    .to_string()
            };
            entry = Some((
                section.clone(),
                Entry {
                    name,
                    description: description.to_string(),
                },
            ));
        } else if let Some((_, current)) = &mut entry {
            current.description.push('\n');
            current.description.push_str(line);
        }
    }
    finish(&mut entry, &mut help);
    help
}

/// `whist path… --help`, read.
fn help_of(path: &[String]) -> Help {
    let mut arguments: Vec<&str> = path.iter().map(String::as_str).collect();
    arguments.push("--help");
    let output = run_whist(&arguments, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "whist {arguments:?} succeeds: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    read_help(&String::from_utf8(output.stdout).expect("help is UTF-8"))
}

/// Every command of `whist` (the top level is the empty path) and its help, walking `whist help` down every
/// subcommand.
fn help_tree() -> BTreeMap<Vec<String>, Help> {
    let mut tree = BTreeMap::new();
    let mut unvisited = vec![Vec::new()];
    while let Some(path) = unvisited.pop() {
        let help = help_of(&path);
        for command in &help.commands {
            // clap's own `help` subcommand prints the others' help; walking it would walk them again.
            if command.name != "help" {
                let mut below = path.clone();
                below.push(command.name.clone());
                unvisited.push(below);
            }
        }
        tree.insert(path, help);
    }
    tree
}

/// The undocumented subcommands and arguments in `tree`, one line each naming it.
fn undocumented(tree: &BTreeMap<Vec<String>, Help>) -> Vec<String> {
    let mut missing = Vec::new();
    for (path, help) in tree {
        let command = std::iter::once("whist")
            .chain(path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        for entry in &help.commands {
            if entry.description.is_empty() {
                missing.push(format!("subcommand `{command} {}` has no help", entry.name));
            }
        }
        for entry in &help.arguments {
            if entry.description.is_empty() {
                missing.push(format!(
                    "argument {} of `{command}` has no help",
                    entry.name
                ));
            }
        }
    }
    missing
}

#[test]
fn every_subcommand_and_argument_has_help_text() {
    let tree = help_tree();
    // The reading found what is there: the walk reached the nested commands and their arguments.
    let arguments: usize = tree.values().map(|help| help.arguments.len()).sum();
    assert!(tree.len() >= 30, "commands walked: {:?}", tree.keys());
    assert!(arguments >= 80, "{arguments} arguments read");
    let swap_over = &tree[&vec!["images".to_string(), "swap-over".to_string()]];
    assert!(
        swap_over
            .arguments
            .iter()
            .any(|entry| entry.name == "--commit-hash"),
        "{swap_over:?}"
    );
    let drain = &tree[&vec!["admin".to_string(), "drain".to_string()]];
    assert!(
        drain
            .arguments
            .iter()
            .any(|entry| entry.name == "<INSTANCE_ID>"),
        "{drain:?}"
    );

    let missing = undocumented(&tree);
    assert!(
        missing.is_empty(),
        "every subcommand and argument says what it is:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_help_reader_notices_an_argument_or_a_subcommand_without_help() {
    // Both of clap's layouts: the description on the entry's line, and under it.
    let same_line = "About\n\nUsage: whist x [OPTIONS] <ID>\n\nCommands:\n  one   Does one thing\n  two\n  \
                     help  Print this message\n\nArguments:\n  <ID>  \n\nOptions:\n      --count <COUNT>  [default: 1]\n      \
                     --after <AFTER>  The position to list after [default: 0]\n  -h, --help       Print help\n";
    let help = read_help(same_line);
    let tree = BTreeMap::from([(vec!["x".to_string()], help)]);
    assert_eq!(
        undocumented(&tree),
        vec![
            "subcommand `whist x two` has no help",
            "argument <ID> of `whist x` has no help",
            "argument --count of `whist x` has no help",
        ]
    );
    let next_line = "About\n\nUsage: whist x [OPTIONS]\n\nOptions:\n      --region <REGION>\n\n      --count <COUNT>\n          \
                     How many\n\n          [default: 1]\n\n      --switch <SWITCH>\n          [possible values: on, off]\n\n  \
                     -h, --help\n          Print help (see a summary with '-h')\n\nExit codes:\n  0  ok\n";
    let help = read_help(next_line);
    let tree = BTreeMap::from([(vec!["x".to_string()], help)]);
    assert_eq!(
        undocumented(&tree),
        vec![
            "argument --region of `whist x` has no help",
            "argument --switch of `whist x` has no help",
        ]
    );
}

/// The `## Commands` section of README.md.
fn readme_commands_section() -> String {
    let readme = std::fs::read_to_string(crate::deploy::repository().join("README.md"))
        .expect("README.md reads");
    let start = readme
        .find("\n## Commands")
        .expect("README.md has a `## Commands` section");
    let section = &readme[start + 1..];
    let end = section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3);
    section[..end].to_string()
}

/// What the README's commands table names: each command path (`["events", "trace"]`) with the options written
/// after it in the table.
fn commands_named_in_the_readme() -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut named: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for row in readme_commands_section().lines() {
        // A row of the table; `\|` inside a cell is an alternative, not a cell border.
        let Some(row) = row.trim().strip_prefix('|') else {
            continue;
        };
        let row = row.replace("\\|", "\u{1}");
        let first_cell = row.split('|').next().unwrap_or_default();
        // The code spans of the first cell: `whist images create-buffers` / `swap-over` / `rollback`.
        let spans: Vec<&str> = first_cell.split('`').skip(1).step_by(2).collect();
        let mut previous: Vec<String> = Vec::new();
        for span in spans {
            let mut tokens = span.split_whitespace().peekable();
            // A span that does not start with `whist` names a sibling of the previous span's last command.
            let mut path: Vec<String> = if tokens.peek() == Some(&"whist") {
                tokens.next();
                Vec::new()
            } else {
                previous[..previous.len().saturating_sub(1)].to_vec()
            };
            while let Some(token) = tokens.next() {
                let token = token.trim_matches(|c| c == '[' || c == ']');
                if token.starts_with("--") {
                    named
                        .entry(path.clone())
                        .or_default()
                        .insert(token.to_string());
                    // Its value, when the table shows one (`--as USER_ID`).
                    if tokens
                        .peek()
                        .is_some_and(|next| next.chars().any(|c| c.is_ascii_uppercase()))
                    {
                        tokens.next();
                    }
                    continue;
                }
                let alternatives: Vec<&str> = token.split('\u{1}').collect();
                let commands = alternatives.iter().all(|word| {
                    !word.is_empty()
                        && word
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                });
                if !commands {
                    // A value (`NAME`, `TYPE ID`, `N]`, `…`), not a command.
                    continue;
                }
                if alternatives.len() == 1 {
                    path.push(token.to_string());
                    named.entry(path.clone()).or_default();
                } else {
                    for alternative in alternatives {
                        let mut below = path.clone();
                        below.push(alternative.to_string());
                        named.entry(below).or_default();
                    }
                }
            }
            previous = path;
        }
    }
    named
}

#[test]
fn the_readme_commands_table_matches_whist_help() {
    let tree = help_tree();
    let named = commands_named_in_the_readme();
    assert!(
        named.contains_key(&vec!["events".to_string(), "trace".to_string()])
            && named.contains_key(&vec!["admin".to_string(), "drain".to_string()]),
        "the table was read: {named:?}"
    );

    let mut wrong = Vec::new();
    // Every top-level command of `whist help` is in the table.
    for command in &tree[&Vec::new()].commands {
        if command.name != "help" && !named.keys().any(|path| path[0] == command.name) {
            wrong.push(format!("`whist {}` is not in the table", command.name));
        }
    }
    // Every command and option the table names exists.
    for (path, options) in &named {
        let command = format!("whist {}", path.join(" "));
        let Some(help) = tree.get(path) else {
            wrong.push(format!(
                "the table names `{command}`, which `whist help` does not have"
            ));
            continue;
        };
        for option in options {
            if !help.arguments.iter().any(|entry| &entry.name == option) {
                wrong.push(format!(
                    "the table names `{command} {option}`, which `{command} --help` does not have"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "README.md's commands table and `whist help` agree:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_top_level_help_lists_the_exit_codes() {
    let output = run_whist(&["--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).expect("help is UTF-8");
    let codes = &help[help.find("Exit codes:").expect("an exit codes section")..];
    for code in ["0", "1", "2", "3"] {
        assert!(
            codes
                .lines()
                .any(|line| line.trim_start().starts_with(code)),
            "{codes}"
        );
    }
    assert!(codes.contains("events verify") && codes.contains("projections verify"));
}

#[test]
fn a_usage_mistake_exits_2() {
    for arguments in [
        &["no-such-command"][..],
        &["events", "list", "--no-such-option"],
        &["events", "list", "--limit", "many"],
        &["admin", "--as", "developer", "drain"],
        &[
            "images",
            "create-buffers",
            "--commit-hash",
            "abc",
            "--amis",
            "us-east-1=ami-1",
        ],
        &["events", "state", "instance", "i-1", "--as-of", "yesterday"],
        &["events", "history", "spaceship", "x"],
        &["projections", "verify", "nonsense"],
    ] {
        let output = run_whist(arguments, &[]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "whist {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("error:"),
            "whist {arguments:?} says what is wrong"
        );
    }
    // Help and the version are not mistakes.
    for arguments in [&["--help"][..], &["events", "--help"], &["--version"]] {
        assert_eq!(
            run_whist(arguments, &[]).status.code(),
            Some(0),
            "{arguments:?}"
        );
    }
}

#[test]
fn a_command_that_fails_exits_1() {
    // Nothing listens on this loopback port: the database cannot be reached.
    let port = whist_tests::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/whist");
    let started = std::time::Instant::now();
    let output = run_whist(
        &["events", "verify"],
        &[("DATABASE_URL", &url), ("ENVIRONMENT", "local")],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gave up in {:?}",
        started.elapsed()
    );
}

#[test]
fn the_version_names_the_commit_the_binary_was_built_from() {
    let output = run_whist(&["--version"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let version = String::from_utf8(output.stdout).expect("UTF-8");
    let commit = version
        .trim()
        .strip_prefix(concat!("whist ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("`whist {{version}} ({{commit}})`: {version:?}"));
    let git = |arguments: &[&str]| {
        Command::new("git")
            .args(arguments)
            .current_dir(crate::deploy::repository())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) => {
            // Built from HEAD; or, when a commit landed between the build and this test, from one of its
            // ancestors (the build reruns on the next `cargo` invocation).
            let ancestor = || git(&["merge-base", "--is-ancestor", commit, &head]).is_some();
            assert!(
                commit == head || (commit.len() == 40 && ancestor()),
                "whist --version names {commit}, the checkout is at {head}"
            );
        }
        None => assert!(
            commit == "unknown"
                || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
            "{commit}"
        ),
    }
}
