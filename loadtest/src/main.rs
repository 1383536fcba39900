//! `loadtest`: parse the command line, run, print the table, exit with the verdict.
//! Exit codes: 0 pass, 1 the run found failures, 2 the run could not be made, 3 `--max-seconds`.

use clap::{Parser, Subcommand};
use loadtest::{sys, Config};

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
    /// Internal: a worker process, driven over stdin/stdout by the coordinator.
    #[command(hide = true)]
    Worker,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Cmd::Worker) = cli.command {
        std::process::exit(loadtest::link::worker_main());
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
