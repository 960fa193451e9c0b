//! The command line a user reads: `--help` gives every option's default and
//! environment variable, `--version` the crate's version.

use std::process::Command;

fn run(arg: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-python-interpreter"))
        .arg(arg)
        .output()
        .expect("running the server binary");
    assert!(out.status.success(), "{arg} failed: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The `--help` text of each option, keyed by its long name.
fn options(help: &str) -> Vec<(String, String)> {
    let mut options: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let long = trimmed
            .split(", ")
            .find_map(|p| p.strip_prefix("--"))
            .filter(|_| (2..=6).contains(&indent) && trimmed.starts_with('-'));
        match long {
            Some(name) => {
                let name = name.split([' ', '=']).next().unwrap_or_default();
                options.push((name.to_string(), String::new()));
            }
            None => {
                if let Some((_, text)) = options.last_mut() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    options
}

#[test]
fn help_gives_every_option_its_default_and_environment_variable() {
    let help = run("--help");
    let options = options(&help);
    assert!(options.len() > 30, "options not found in:\n{help}");
    for (name, text) in options {
        if name == "help" || name == "version" {
            continue;
        }
        assert!(
            text.contains("[default"),
            "--{name} does not say its default:\n{text}"
        );
        assert!(
            text.contains("[env: ") || text.contains("no environment variable"),
            "--{name} does not name its environment variable:\n{text}"
        );
    }
}

#[test]
fn version_is_the_crate_version() {
    assert_eq!(
        run("--version").trim(),
        format!("mcp-python-interpreter {}", env!("CARGO_PKG_VERSION"))
    );
}
