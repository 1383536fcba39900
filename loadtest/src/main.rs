//! `loadtest`: parse the command line, run, print the table, exit with the verdict.
//! Exit codes: 0 pass, 1 the run found failures, 2 the run could not be made, 3 `--max-seconds`.
//! `loadtest summarize FILE…` turns full reports into summary lines.

use clap::{Parser, Subcommand};
use loadtest::{sys, Config, Summary};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for roomcast",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the one-line summary of each full report (`--json` files), oldest first; e.g.
    /// `loadtest summarize loadtest/results/full/*.json >> loadtest/results/summary.jsonl`.
    Summarize {
        /// Report files written by `--json`.
        #[arg(required = true)]
        reports: Vec<std::path::PathBuf>,
    },
    /// Internal: a worker process, driven over stdin/stdout by the coordinator.
    #[command(hide = true)]
    Worker,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Worker) => std::process::exit(loadtest::link::worker_main()),
        Some(Cmd::Summarize { reports }) => std::process::exit(summarize(&reports)),
        None => {}
    }
    let config = cli.config;
    // One thread, also when the clients run in this process (one worker): a delivery is one
    // socket wake, and on a multi-thread runtime a wake may cross threads (queue handoff, futex
    // unpark), which costs more than the delivery itself. More client cores: `--procs N`.
    let _ = sys::raise_nofile();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let json = config.json.clone();
    match rt.block_on(loadtest::run(config)) {
        Ok(report) => {
            println!("{}", report.table());
            if let Some(path) = json {
                eprintln!("loadtest: wrote {}", path.display());
            }
            if report.ok() {
                std::process::exit(0);
            }
            let deadline = report.failures.iter().any(|f| f.contains("--max-seconds"));
            eprintln!("loadtest: FAILED: {}", report.failures.join("; "));
            std::process::exit(if deadline { 3 } else { 1 });
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}

/// `loadtest summarize`: one line per report on stdout, sorted by start date.
fn summarize(reports: &[std::path::PathBuf]) -> i32 {
    let mut lines = Vec::new();
    for path in reports {
        match Summary::of_file(path) {
            Ok(s) => lines.push(s),
            Err(e) => {
                eprintln!("loadtest: {e:#}");
                return 2;
            }
        }
    }
    lines.sort_by(|a, b| (&a.date, &a.report).cmp(&(&b.date, &b.report)));
    for s in &lines {
        println!("{}", s.line());
    }
    0
}
