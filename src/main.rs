//! The `roomcast` binary: allocator, configuration, listener, signals; everything else is the
//! library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use roomcast::config::{Command, UserCommand};
use roomcast::core::accounts::{self, AccountError, Hasher, Store};
use roomcast::Config;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "mimalloc")]
    shorten_purge_delay();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROOMCAST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let matches = Config::command().get_matches();
    let mut config = match Config::from_arg_matches(&matches) {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    let deprecated = roomcast::config::deprecated_spellings(&matches);
    if let Some(command) = config.command.take() {
        // Stderr: the command's own output (a token) goes to stdout.
        for warning in &deprecated {
            eprintln!("roomcast: warning: {warning}");
        }
        return run_command(&config, command);
    }
    for warning in &deprecated {
        tracing::warn!("{warning}");
    }
    raise_nofile_limit();
    let runtime = match runtime_builder(config.threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roomcast: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                roomcast::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", config.listen),
                ))
            })?;
        let server = roomcast::run(listener, config, shutdown_signal());
        #[cfg(feature = "mimalloc")]
        let server = async {
            tokio::select! {
                result = server => result,
                never = purge_allocator() => match never {},
            }
        };
        server.await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roomcast: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (the enum's 16th entry in the `mimalloc.h` of the pinned
/// libmimalloc-sys 0.1.49; the crate exports no constant for it).
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed pages go back to the system 10 ms after they are freed rather than mimalloc's default
/// 1 s, and `purge_allocator` makes sure that happens when the server goes quiet.
///
/// mimalloc returns a freed page only past its purge delay, and only at a later call into the
/// allocator. After a ramp of connections the pages freed last are hyper's three 8 KiB buffers
/// for each upgrade's HTTP step: with the default delay an idle server kept 0.06–0.26 KiB per
/// connection of them resident (docs/PERFORMANCE.md, memory per idle connection). Throughput
/// and latency with 10 ms are in the same place.
#[cfg(feature = "mimalloc")]
fn shorten_purge_delay() {
    // SAFETY: called first thing in `main`, before any other thread exists, so nothing reads
    // mimalloc's option table while this writes it; the call takes no pointer. An option set
    // after mimalloc initialised is read at its next purge decision, which is all we need.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
}

/// Calls into the allocator once a second for as long as the server runs, so that pages whose
/// purge delay has passed go back to the system even when nothing else allocates.
#[cfg(feature = "mimalloc")]
async fn purge_allocator() -> std::convert::Infallible {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: `mi_collect` takes no pointer and touches only mimalloc's own state, which it
        // guards for calls from any thread (the page lists it visits are this thread's own; the
        // arenas' purge runs under mimalloc's atomic guard). `force == false` purges only pages
        // whose delay has passed and frees no block still in use, so no memory the program
        // holds changes under it.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// Runs a subcommand instead of the server.
fn run_command(config: &Config, command: Command) -> std::process::ExitCode {
    match command {
        Command::Token {
            sub,
            rooms,
            ttl,
            aud,
            iss,
        } => {
            let Some(secret) = config.jwt_secret.as_deref() else {
                eprintln!("roomcast token: set --jwt-secret (or ROOMCAST_JWT_SECRET)");
                return std::process::ExitCode::from(2);
            };
            match roomcast::core::auth::issue_for(
                secret,
                &sub,
                rooms.as_deref(),
                ttl,
                aud.as_deref(),
                iss.as_deref(),
            ) {
                Ok(token) => {
                    println!("{token}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("roomcast token: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::User { action } => run_user(config, action),
    }
}

/// `roomcast user add|del|list` on the `--accounts-db` file (a running server may share it).
fn run_user(config: &Config, action: UserCommand) -> ExitCode {
    let Some(path) = config.accounts_db.as_deref() else {
        eprintln!("roomcast user: set --accounts-db (or ROOMCAST_ACCOUNTS_DB)");
        return ExitCode::from(2);
    };
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("roomcast user: {e}");
        ExitCode::FAILURE
    };
    let store = match Store::open(path) {
        Ok(store) => store,
        Err(e) => return fail(&e),
    };
    match action {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            // The name first: nobody types a password for an account that cannot exist.
            if let Err(e) = accounts::check_name(&name) {
                eprintln!("roomcast user add: {e}");
                return ExitCode::from(2);
            }
            let password = match read_password(password_stdin) {
                Ok(p) => p,
                Err(e) => return fail(&format!("cannot read the password: {e}")),
            };
            let created =
                Hasher::new().and_then(|h| accounts::create(&store, &h, &name, &password));
            match created {
                Ok(account) => {
                    println!("created account {}", account.name);
                    ExitCode::SUCCESS
                }
                Err(e @ (AccountError::BadPassword(_) | AccountError::NameTaken)) => {
                    eprintln!("roomcast user add: {e}");
                    ExitCode::from(2)
                }
                Err(e) => fail(&e),
            }
        }
        UserCommand::Del { name } => match store.delete(&name) {
            Ok(true) => {
                println!("deleted account {name}");
                ExitCode::SUCCESS
            }
            Ok(false) => fail(&format!("no account named {name}")),
            Err(e) => fail(&e),
        },
        UserCommand::List => match store.list() {
            Ok(list) => {
                for account in list {
                    let created = std::time::UNIX_EPOCH
                        + std::time::Duration::from_millis(account.created_at);
                    println!(
                        "{}\t{}",
                        account.name,
                        humantime::format_rfc3339_seconds(created)
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// The new account's password: asked for twice without echo on a terminal, else (or with
/// `--password-stdin`) the first line of standard input.
fn read_password(from_stdin: bool) -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal};
    if !from_stdin && std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        if first != again {
            return Err(std::io::Error::other("the two passwords differ"));
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_owned())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Every socket is a file descriptor: lift the soft limit to the hard one so the process can
/// hold as many connections as the machine allows (`ulimit -Hn`).
fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// `--threads 1` gets the current-thread scheduler (everything on the main thread); any other
/// count a work-stealing pool of that many workers (0: one per core, tokio's default).
fn runtime_builder(threads: u16) -> tokio::runtime::Builder {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    }
}
