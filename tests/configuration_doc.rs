//! docs/CONFIGURATION.md against the flags the binary accepts (clap's `Command`, which `--help`
//! is rendered from): every flag has a row with its environment variable and default, and the
//! page names no flag or variable that does not exist.

use std::collections::BTreeSet;

use clap::{Arg, CommandFactory};
use roomcast::Config;

/// Read by `main` itself, not by clap.
const EXTRA_ENV: &[&str] = &["ROOMCAST_LOG"];

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIGURATION.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The server's command, then every subcommand at any depth (`user add`).
fn commands() -> Vec<clap::Command> {
    let mut out = vec![Config::command()];
    let mut i = 0;
    while i < out.len() {
        let nested: Vec<clap::Command> = out[i].get_subcommands().cloned().collect();
        out.extend(nested);
        i += 1;
    }
    out
}

/// Every flag: the server's, then each subcommand's, as `--name`, with its clap `Arg`.
fn flags() -> Vec<(String, Arg)> {
    let mut out = Vec::new();
    for cmd in commands() {
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                out.push((format!("--{long}"), arg.clone()));
            }
        }
    }
    out
}

/// The table rows whose first cell is `` `--flag` ``, by flag. A flag listed twice is an error.
fn rows(doc: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix("| `--") else {
            continue;
        };
        let cells: Vec<String> = rest.split('|').map(|c| c.trim().to_owned()).collect();
        let flag = format!("--{}", cells[0].trim_end_matches('`'));
        assert!(
            out.iter().all(|(f, _)| *f != flag),
            "{flag} has two rows in the doc"
        );
        out.push((flag, cells));
    }
    out
}

/// Every `` `--name`` (a backtick span that starts with a flag) and every `ROOMCAST_…` name,
/// anywhere in the page.
fn mentions(doc: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = |marker: &str, keep: fn(char) -> bool| {
        let mut out = BTreeSet::new();
        for (at, _) in doc.match_indices(marker) {
            let start = at + marker.len() - marker.trim_start_matches('`').len();
            let name: String = doc[start..].chars().take_while(|c| keep(*c)).collect();
            out.insert(name);
        }
        out
    };
    (
        names("`--", |c| {
            c == '-' || c.is_ascii_lowercase() || c.is_ascii_digit()
        }),
        names("ROOMCAST_", |c| {
            c == '_' || c.is_ascii_uppercase() || c.is_ascii_digit()
        }),
    )
}

/// The flags `--help` lists, for the server and for each subcommand, less `--help` and
/// `--version`.
fn help_flags() -> BTreeSet<String> {
    let helps: Vec<String> = commands()
        .iter_mut()
        .map(|c| c.render_long_help().to_string())
        .collect();
    let mut out = BTreeSet::new();
    for help in helps {
        for line in help.lines() {
            let line = line.trim_start();
            if !line.starts_with('-') {
                continue;
            }
            let Some(at) = line.find("--") else {
                continue;
            };
            let name: String = line[at..]
                .chars()
                .take_while(|c| *c == '-' || c.is_ascii_alphanumeric())
                .collect();
            if name != "--help" && name != "--version" {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn every_flag_has_a_row_with_its_env_and_default() {
    let doc = doc();
    let rows = rows(&doc);
    let mut missing = Vec::new();
    for (flag, arg) in flags() {
        let Some((_, cells)) = rows.iter().find(|(f, _)| *f == flag) else {
            missing.push(flag);
            continue;
        };
        let row = cells.join(" | ");
        match arg.get_env() {
            Some(env) => {
                let env = format!("`{}`", env.to_string_lossy());
                assert!(
                    cells.get(1) == Some(&env),
                    "{flag}: expected {env} in: {row}"
                );
            }
            None => assert!(
                cells.get(1).is_some_and(|c| c.is_empty()),
                "{flag} reads no environment variable: {row}"
            ),
        }
        // A switch's default (`false`) is written "off".
        let defaults = match arg.get_action().takes_values() {
            true => arg.get_default_values(),
            false => &[],
        };
        for default in defaults {
            let default = format!("`{}`", default.to_string_lossy());
            assert!(
                cells.get(2) == Some(&default),
                "{flag}: the default column should be {default}: {row}"
            );
        }
    }
    assert!(
        missing.is_empty(),
        "flags missing from docs/CONFIGURATION.md: {missing:?}"
    );
}

#[test]
fn the_doc_names_only_flags_and_variables_that_exist() {
    let doc = doc();
    let known: BTreeSet<String> = flags().into_iter().map(|(f, _)| f).collect();
    let known_env: BTreeSet<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .chain(EXTRA_ENV.iter().map(|e| e.to_string()))
        .collect();
    let (flags, env) = mentions(&doc);
    let unknown: Vec<_> = flags.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "the doc names flags that do not exist: {unknown:?}"
    );
    let unknown: Vec<_> = env.difference(&known_env).collect();
    assert!(
        unknown.is_empty(),
        "the doc names variables that do not exist: {unknown:?}"
    );
    for (flag, _) in rows(&doc) {
        assert!(
            known.contains(&flag),
            "a row for {flag}, which does not exist"
        );
    }
    for e in EXTRA_ENV {
        assert!(env.contains(*e), "{e} is not documented");
    }
}

#[test]
fn the_doc_has_a_row_for_each_flag_of_the_help_and_no_other() {
    let doc = doc();
    let documented: BTreeSet<String> = rows(&doc).into_iter().map(|(f, _)| f).collect();
    let help = help_flags();
    assert!(
        help.len() > 30,
        "could not read the flags from --help: {help:?}"
    );
    let missing: Vec<_> = help.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "in --help, not in docs/CONFIGURATION.md: {missing:?}"
    );
    let extra: Vec<_> = documented.difference(&help).collect();
    assert!(
        extra.is_empty(),
        "in docs/CONFIGURATION.md, not in --help: {extra:?}"
    );
}
