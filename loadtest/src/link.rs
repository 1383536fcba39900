//! How the coordinator reaches its workers: a task in this process, or a child process
//! (`<exe> worker`) speaking JSON lines: the spec and then `Command`s on stdin, `Event`s on
//! stdout. Children are killed (by their own handle) if the coordinator lets go of them early.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::worker::{self, Command, Event, WorkerSpec};

/// The coordinator's end of one worker.
pub struct WorkerLink {
    commands: mpsc::UnboundedSender<Command>,
    /// The child process, when the worker is one; `None` once it has exited and been reaped.
    child: Option<Arc<Mutex<Option<Child>>>>,
}

impl WorkerLink {
    /// Runs the worker as a task of the current runtime.
    pub fn in_process(spec: WorkerSpec, events: mpsc::UnboundedSender<(u32, Event)>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(worker::run(spec, rx, events));
        WorkerLink {
            commands: tx,
            child: None,
        }
    }

    /// Starts `exe worker` and bridges its stdio with two threads (the commands are rare and
    /// tiny; the events are one line a second).
    pub fn spawn(
        exe: &Path,
        spec: WorkerSpec,
        events: mpsc::UnboundedSender<(u32, Event)>,
    ) -> anyhow::Result<Self> {
        let index = spec.index;
        let mut child = Process::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting worker process {}", exe.display()))?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let child = Arc::new(Mutex::new(Some(child)));

        let first = serde_json::to_string(&spec)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        std::thread::Builder::new()
            .name(format!("worker-{index}-stdin"))
            .spawn(move || {
                if writeln!(stdin, "{first}").is_err() {
                    return;
                }
                while let Some(cmd) = rx.blocking_recv() {
                    let Ok(line) = serde_json::to_string(&cmd) else {
                        continue;
                    };
                    if writeln!(stdin, "{line}")
                        .and_then(|_| stdin.flush())
                        .is_err()
                    {
                        return;
                    }
                }
                // Dropping stdin tells the worker its coordinator is gone: it aborts.
            })?;

        let reaper = child.clone();
        std::thread::Builder::new()
            .name(format!("worker-{index}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            let _ = events.send((index, ev));
                        }
                        Err(e) => {
                            let message =
                                format!("worker {index} wrote a bad line ({e}): {line:.200}");
                            let _ = events.send((index, Event::Error { message }));
                        }
                    }
                }
                let taken = reaper.lock().unwrap_or_else(|e| e.into_inner()).take();
                let code = taken.and_then(|mut c| c.wait().ok()).and_then(|s| s.code());
                let _ = events.send((index, Event::Exited { code }));
            })?;
        Ok(WorkerLink {
            commands: tx,
            child: Some(child),
        })
    }

    pub fn send(&self, cmd: Command) {
        let _ = self.commands.send(cmd);
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        // Only this worker's own child, by its handle; a reaped one is gone from the slot.
        if let Some(child) = &self.child {
            if let Some(mut c) = child.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Body of the hidden `worker` subcommand: read the spec, run on a single-threaded runtime,
/// write events to stdout. Returns the exit code.
pub fn worker_main() -> i32 {
    let mut input = BufReader::new(std::io::stdin());
    let mut first = String::new();
    if input.read_line(&mut first).is_err() {
        eprintln!("loadtest worker: no spec on stdin");
        return 2;
    }
    let spec: WorkerSpec = match serde_json::from_str(&first) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadtest worker: bad spec: {e}");
            return 2;
        }
    };
    if let Err(e) = crate::sys::raise_nofile() {
        eprintln!("loadtest worker: cannot raise the open-file limit: {e}");
    }
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in input.lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Command>(&line) {
                    Ok(cmd) => {
                        if cmd_tx.send(cmd).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("loadtest worker: bad command ({e}): {line:.200}"),
                }
            }
            // EOF: the channel closes and the worker aborts.
        });
    if let Err(e) = spawned {
        eprintln!("loadtest worker: {e}");
        return 2;
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(u32, Event)>();
    let writer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        while let Some((_, ev)) = ev_rx.blocking_recv() {
            let Ok(line) = serde_json::to_string(&ev) else {
                continue;
            };
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest worker: runtime: {e}");
            return 2;
        }
    };
    rt.block_on(worker::run(spec, cmd_rx, ev_tx));
    // The runtime is gone, so every sender is dropped and the writer drains and ends.
    drop(rt);
    let _ = writer.join();
    0
}
