//! A worker owns a slice of the clients: it ramps them up, runs their receive loops and
//! publishers, counts everything, and talks to the coordinator through `Command`s in and
//! `Event`s out (JSON lines over stdio in a worker process, channels when run in-process).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::client::{self, close_reason, ws_reason, Ws};
use crate::clock;
use crate::config::{Config, Pacing, RampOrder, Route, Scenario, Server, Transport, BURST_MAX};
use crate::gate::Gated;
use crate::hist::{new_hist, to_buckets};
use crate::payload::{now_us, parse_incoming, stamped_message, Incoming};
use crate::plan::{room_name, Placement, Plan};
use crate::seq::{Seen, SeqTracker};

/// Everything a worker needs; sent as the first stdin line to a worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: u32,
    pub procs: u32,
    pub config: Config,
    pub servers: Vec<Server>,
    pub sources: Vec<Ipv4Addr>,
    /// The worker stops by itself this many seconds after it starts, whatever it hears.
    pub deadline_secs: f64,
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Publishers send `rate` messages/s per room (all its publishers together) from now on
    /// (replaces any pace).
    Publish { rate: f64 },
    /// Publishers send as fast as `window` unacknowledged messages allow.
    PublishWindow { window: u32 },
    /// Publishers stop sending; sockets stay open.
    Quiet,
    /// Answer with `Event::Seqs`.
    ReportSeqs,
    /// Send a `Progress` now (a step boundary), besides the one each second.
    Snapshot,
    /// Count tail loss against the rooms' final seqs (indexed by instance; empty: skip),
    /// close every socket, answer with `Event::Result` and end.
    Finish { final_seq: Vec<u64> },
    /// Drop everything and end with `Event::Result`.
    Abort,
}

/// Counters every client adds to. `loss = gaps + tail_loss - late`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Chat message frames received (duplicates included).
    pub deliveries: u64,
    /// Seqs skipped when a later one arrived first.
    pub gaps: u64,
    /// Messages that arrived after a later seq (they fill a gap counted before).
    pub late: u64,
    pub dups: u64,
    /// At or before the welcome seq, or too far behind to tell.
    pub stale: u64,
    /// Seqs never received by the end (known only at `Finish`).
    pub tail_loss: u64,
    /// Messages publishers wrote.
    pub sent: u64,
    /// Publishers' own messages echoed back to them.
    pub acked: u64,
    /// Socket writes (flushes) that carried publishers' messages: `sent / publish_writes` is
    /// messages per publisher write (1 when steady).
    #[serde(default)]
    pub publish_writes: u64,
    /// Steady publishers' messages written more than half a period after their time (the
    /// load generator was short of CPU, or a window waited for echoes): spacing not kept.
    #[serde(default)]
    pub late_sends: u64,
    pub presence: u64,
    /// `{"type":"error"}` frames received.
    pub server_errors: u64,
    /// Frames this tool could not classify.
    pub other_frames: u64,
    /// Chat messages without this tool's stamp (someone else writing in `lt-*`).
    pub unstamped: u64,
    /// Stamps from the future (clock step); latency recorded as 0.
    pub clock_skew: u64,
    /// `deliveries` by the index of the server the receiving client is connected to (the one
    /// that wrote them): divided by that server's CPU time in the report.
    #[serde(default)]
    pub deliveries_by_server: Vec<u64>,
    /// Bytes the clients read off their sockets after the upgrade (compressed frames as they
    /// came): divided by deliveries in the report.
    #[serde(default)]
    pub wire_bytes_in: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.deliveries += o.deliveries;
        self.gaps += o.gaps;
        self.late += o.late;
        self.dups += o.dups;
        self.stale += o.stale;
        self.tail_loss += o.tail_loss;
        self.sent += o.sent;
        self.acked += o.acked;
        self.publish_writes += o.publish_writes;
        self.late_sends += o.late_sends;
        self.presence += o.presence;
        self.server_errors += o.server_errors;
        self.other_frames += o.other_frames;
        self.unstamped += o.unstamped;
        self.clock_skew += o.clock_skew;
        self.wire_bytes_in += o.wire_bytes_in;
        if self.deliveries_by_server.len() < o.deliveries_by_server.len() {
            self.deliveries_by_server
                .resize(o.deliveries_by_server.len(), 0);
        }
        for (a, b) in self
            .deliveries_by_server
            .iter_mut()
            .zip(&o.deliveries_by_server)
        {
            *a += b;
        }
    }

    /// Messages some member never received.
    pub fn loss(&self) -> u64 {
        (self.gaps + self.tail_loss).saturating_sub(self.late)
    }

    pub fn reorders(&self) -> u64 {
        self.late + self.stale
    }
}

/// Sent once a second.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Connect attempts finished (ok or failed) during the ramp.
    pub done: u64,
    /// Sockets open now.
    pub open: u64,
    pub failed: u64,
    pub disconnects: u64,
    /// Churn: sessions completed (connected, stayed, left cleanly).
    pub sessions: u64,
    pub counters: Counters,
    /// Latencies recorded since the previous progress, µs, as `[value, count]` buckets.
    pub hist: Vec<(u64, u64)>,
    /// CPU seconds this worker's process has used so far (user + system).
    pub cpu_s: f64,
}

/// One room instance as this worker saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSeq {
    pub instance: u32,
    /// Smallest welcome seq among this worker's members (u64::MAX: none).
    pub min_welcome: u64,
    pub max_seen: u64,
    pub sent: u64,
}

/// The worker's last word.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub counters: Counters,
    /// Every latency recorded, µs.
    pub hist: Vec<(u64, u64)>,
    pub connected: u64,
    pub failed: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    pub sessions: u64,
    /// Sockets that did not finish the close handshake in time.
    pub unclean_closes: u64,
    pub cpu_self_s: f64,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    /// Every connect of the ramp finished. `members[instance]` = sockets open there now.
    Ramped {
        members: Vec<u32>,
        failed: BTreeMap<String, u64>,
    },
    Seqs {
        instances: Vec<InstanceSeq>,
    },
    Result(Box<WorkerResult>),
    /// A worker could not run (bad spec, lost its coordinator...).
    Error {
        message: String,
    },
    /// The worker process ended (made by the coordinator's reader, never by a worker).
    Exited {
        code: Option<i32>,
    },
}

/// Publishers' pace, broadcast to every publisher of the worker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pace {
    Silent,
    Rate { rate: f64, since: Instant },
    Window { window: u32 },
}

/// Why a client's receive loop is told to end.
#[derive(Debug, Clone)]
enum Stop {
    Running,
    Finish(Arc<Vec<u64>>),
    Abort,
}

/// How a client's loop ended.
enum End {
    Finish(Arc<Vec<u64>>),
    Abort,
    /// Churn: the session's lifetime is over.
    Leave,
    /// The server or the network ended it.
    Lost(String),
}

/// Counters and latencies of some clients, behind one lock: one lock per delivery.
struct Shard {
    c: Counters,
    /// Since the last progress.
    hist: Histogram<u64>,
}

/// State shared by the worker's clients.
struct Shared {
    index: u32,
    config: Config,
    plan: Plan,
    servers: Vec<Server>,
    sources: Vec<Ipv4Addr>,
    shards: Vec<Mutex<Shard>>,
    done: AtomicU64,
    open: AtomicU64,
    connected: AtomicU64,
    sessions: AtomicU64,
    unclean: AtomicU64,
    assigned: u64,
    failed: Mutex<BTreeMap<String, u64>>,
    disconnects: Mutex<BTreeMap<String, u64>>,
    members: Vec<AtomicU32>,
    min_welcome: Vec<AtomicU64>,
    max_seen: Vec<AtomicU64>,
    sent: Vec<AtomicU64>,
    ramp_done: Notify,
    pace: watch::Sender<Pace>,
    stop: watch::Sender<Stop>,
    /// Raised just before `stop` changes: opens the clients' `Gated` stop futures.
    stopping: AtomicBool,
    /// Connects in flight at once (ramp and churn reconnects).
    connect_slots: Arc<Semaphore>,
    /// The runtime the publishers run on (`PublisherThread`); `None`: this one.
    publish_rt: Option<tokio::runtime::Handle>,
}

/// A thread of its own for steady publishers: on the receivers' thread a publisher's wake-up
/// waits behind every receiver with frames to read (100 of them in `hot`, each a few µs), so
/// steady send times drift and catch up in runs. The publishers' sockets are opened on this
/// runtime, so their I/O stays on it. Burst publishers stay with the receivers: `hot`'s window
/// counts only the publisher's own echoes, and sharing the thread is what keeps it from running
/// ahead of receivers that cannot keep up (the server would evict them).
struct PublisherThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl PublisherThread {
    /// `None` when the thread or its runtime cannot be made (publishers then share this one).
    fn start(index: u32) -> Option<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("publishers-{index}"))
            .spawn(move || {
                // Made and dropped on this thread: a runtime cannot be dropped inside another.
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                if handle_tx.send(rt.handle().clone()).is_ok() {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                }
            })
            .ok()?;
        let handle = handle_rx.recv().ok()?;
        Some(PublisherThread {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for PublisherThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking client cannot leave a counter half-updated in a way that matters here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const SHARDS: usize = 8;
/// A gate that is always open (see `gate::Gated`).
static ALWAYS: AtomicBool = AtomicBool::new(true);
/// How long a closing client waits for the server's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// Per-client state that outlives one frame.
struct Me {
    id: u32,
    place: Placement,
    shard: usize,
    tracker: SeqTracker,
}

impl Shared {
    /// Tells every client to stop. The gate goes up first, so that a client whose gated stop
    /// future was not polled still sees the change.
    fn signal_stop(&self, stop: Stop) {
        self.stopping.store(true, Release);
        self.stop.send_replace(stop);
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[i % self.shards.len()])
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, reason: String) {
        *lock(map).entry(reason).or_insert(0) += 1;
    }

    /// Accounts one text frame; returns the stamp's publisher for chat messages.
    fn on_text(&self, me: &mut Me, bytes: &[u8]) -> Option<u32> {
        let now = now_us();
        let incoming = parse_incoming(bytes);
        let mut publisher = None;
        let mut shard = self.shard(me.shard);
        match incoming {
            Incoming::Message { seq, stamp } => {
                shard.c.deliveries += 1;
                if let Some(n) = shard
                    .c
                    .deliveries_by_server
                    .get_mut(me.place.server as usize)
                {
                    *n += 1;
                }
                match me.tracker.observe(seq) {
                    Seen::InOrder => {}
                    Seen::Gap(n) => shard.c.gaps += n,
                    Seen::Late => shard.c.late += 1,
                    Seen::Duplicate => shard.c.dups += 1,
                    Seen::Stale => shard.c.stale += 1,
                }
                match stamp {
                    Some((p, sent)) => {
                        publisher = Some(p);
                        if now >= sent {
                            shard.hist.saturating_record((now - sent).max(1));
                        } else {
                            shard.c.clock_skew += 1;
                            shard.hist.saturating_record(1);
                        }
                    }
                    None => shard.c.unstamped += 1,
                }
                if me.id == publisher.unwrap_or(u32::MAX) {
                    shard.c.acked += 1;
                }
                drop(shard);
                let max = &self.max_seen[me.place.instance as usize];
                if seq > max.load(Relaxed) {
                    max.fetch_max(seq, Relaxed);
                }
            }
            Incoming::Presence => shard.c.presence += 1,
            Incoming::Error { .. } => shard.c.server_errors += 1,
            Incoming::Pong | Incoming::Left => {}
            Incoming::Welcome { .. } | Incoming::Other => shard.c.other_frames += 1,
        }
        publisher
    }

    fn progress(&self) -> Progress {
        let mut p = Progress {
            done: self.done.load(Relaxed),
            open: self.open.load(Relaxed),
            failed: lock(&self.failed).values().sum(),
            disconnects: lock(&self.disconnects).values().sum(),
            sessions: self.sessions.load(Relaxed),
            cpu_s: crate::sys::cpu_seconds().0,
            ..Progress::default()
        };
        let mut interval = new_hist();
        for s in &self.shards {
            let mut s = lock(s);
            p.counters.add(&s.c);
            let _ = interval.add(&s.hist);
            s.hist.reset();
        }
        p.hist = to_buckets(&interval);
        p.counters.wire_bytes_in = crate::wire::bytes_in();
        p
    }

    fn members(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.load(Relaxed)).collect()
    }

    fn seqs(&self) -> Vec<InstanceSeq> {
        (0..self.plan.instances() as usize)
            .filter_map(|i| {
                let min_welcome = self.min_welcome[i].load(Relaxed);
                let sent = self.sent[i].load(Relaxed);
                (min_welcome != u64::MAX || sent > 0).then(|| InstanceSeq {
                    instance: i as u32,
                    min_welcome,
                    max_seen: self.max_seen[i].load(Relaxed),
                    sent,
                })
            })
            .collect()
    }

    fn source_for(&self, c: u32) -> Option<Ipv4Addr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[c as usize % self.sources.len()])
        }
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.connect_timeout)
    }
}

/// Runs one worker to the end. Events are tagged with `spec.index`.
pub async fn run(
    spec: WorkerSpec,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<(u32, Event)>,
) {
    let index = spec.index;
    let emit = |e: Event| {
        let _ = events.send((index, e));
    };
    let plan = Plan::new(&spec.config, spec.servers.len() as u32, spec.procs);
    let instances = plan.instances() as usize;
    let assigned = u64::from(plan.count_of(index));
    let per_worker = |total: u32| (total / spec.procs).max(1) as usize;
    let publisher_thread = match spec.config.publish_pacing {
        Pacing::Steady => PublisherThread::start(index),
        Pacing::Burst => None,
    };
    let shared = Arc::new(Shared {
        index,
        publish_rt: publisher_thread.as_ref().map(|p| p.handle.clone()),
        connect_slots: Arc::new(Semaphore::new(per_worker(spec.config.connect_concurrency))),
        config: spec.config.clone(),
        plan,
        servers: spec.servers.clone(),
        sources: spec.sources.clone(),
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    c: Counters {
                        deliveries_by_server: vec![0; spec.servers.len()],
                        ..Counters::default()
                    },
                    hist: new_hist(),
                })
            })
            .collect(),
        done: AtomicU64::new(0),
        open: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        sessions: AtomicU64::new(0),
        unclean: AtomicU64::new(0),
        assigned,
        failed: Mutex::new(BTreeMap::new()),
        disconnects: Mutex::new(BTreeMap::new()),
        members: (0..instances).map(|_| AtomicU32::new(0)).collect(),
        min_welcome: (0..instances).map(|_| AtomicU64::new(u64::MAX)).collect(),
        max_seen: (0..instances).map(|_| AtomicU64::new(0)).collect(),
        sent: (0..instances).map(|_| AtomicU64::new(0)).collect(),
        ramp_done: Notify::new(),
        pace: watch::channel(Pace::Silent).0,
        stop: watch::channel(Stop::Running).0,
        stopping: AtomicBool::new(false),
    });

    // Cumulative latencies: every progress moves its interval in here.
    let mut total_hist = new_hist();
    let deadline = Instant::now() + Duration::from_secs_f64(spec.deadline_secs.max(1.0));
    let mut spawner = tokio::spawn(ramp(shared.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ramp_reported = assigned == 0;
    if ramp_reported {
        emit(Event::Ramped {
            members: shared.members(),
            failed: BTreeMap::new(),
        });
    }

    let finish = loop {
        if !ramp_reported && shared.done.load(Relaxed) >= assigned {
            ramp_reported = true;
            emit(Event::Ramped {
                members: shared.members(),
                failed: lock(&shared.failed).clone(),
            });
        }
        tokio::select! {
            _ = tick.tick() => {
                let p = shared.progress();
                crate::hist::add_buckets(&mut total_hist, &p.hist);
                emit(Event::Progress(p));
            }
            _ = shared.ramp_done.notified(), if !ramp_reported => {}
            cmd = cmds.recv() => match cmd {
                Some(Command::Publish { rate }) => {
                    shared.pace.send_replace(Pace::Rate { rate, since: Instant::now() });
                }
                Some(Command::PublishWindow { window }) => {
                    shared.pace.send_replace(Pace::Window { window });
                }
                Some(Command::Quiet) => {
                    shared.pace.send_replace(Pace::Silent);
                }
                Some(Command::ReportSeqs) => emit(Event::Seqs { instances: shared.seqs() }),
                Some(Command::Snapshot) => {
                    let p = shared.progress();
                    crate::hist::add_buckets(&mut total_hist, &p.hist);
                    emit(Event::Progress(p));
                }
                Some(Command::Finish { final_seq }) => break Some(Arc::new(final_seq)),
                Some(Command::Abort) | None => break None,
            },
            _ = sleep_until(deadline) => {
                eprintln!("loadtest worker {index}: deadline reached, stopping");
                break None;
            }
        }
    };

    shared.pace.send_replace(Pace::Silent);
    match finish {
        Some(final_seq) => {
            shared.signal_stop(Stop::Finish(final_seq));
            // Every client closes within CLOSE_WAIT; allow for a slow, busy machine.
            let grace = CLOSE_WAIT * 2 + Duration::from_secs(2);
            if timeout(grace, &mut spawner).await.is_err() {
                spawner.abort();
                let _ = (&mut spawner).await;
            }
        }
        None => {
            shared.signal_stop(Stop::Abort);
            spawner.abort();
            let _ = (&mut spawner).await;
        }
    }
    let last = shared.progress();
    crate::hist::add_buckets(&mut total_hist, &last.hist);
    let result = WorkerResult {
        counters: last.counters,
        hist: to_buckets(&total_hist),
        connected: shared.connected.load(Relaxed),
        failed: lock(&shared.failed).clone(),
        disconnects: lock(&shared.disconnects).clone(),
        sessions: shared.sessions.load(Relaxed),
        unclean_closes: shared.unclean.load(Relaxed),
        cpu_self_s: crate::sys::cpu_seconds().0,
    };
    emit(Event::Result(Box::new(result)));
}

/// Starts this worker's clients at the ramp rate, then waits for all of them to end.
/// Aborting this task aborts every client (the `JoinSet` drops them).
async fn ramp(shared: Arc<Shared>) {
    let plan = shared.plan;
    let rate = shared.config.ramp_rate / f64::from(plan.procs);
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    let mut mine: Vec<u32> = plan.clients_of(shared.index).collect();
    if shared.config.ramp_order == RampOrder::Rooms {
        // Every worker walks the rooms in the same order at the same pace, so a room's members
        // (publishers first) join together. Stable sort: members keep their order.
        mine.sort_by_key(|&c| plan.place(c).room);
    }
    let mut stop = shared.stop.subscribe();
    for (i, c) in mine.into_iter().enumerate() {
        if !matches!(*stop.borrow_and_update(), Stop::Running) {
            break;
        }
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        sleep_until(at).await;
        let Ok(permit) = shared.connect_slots.clone().acquire_owned().await else {
            break;
        };
        let s = shared.clone();
        let rt = match &shared.publish_rt {
            Some(h) if plan.place(c).publisher => h.clone(),
            _ => tokio::runtime::Handle::current(),
        };
        if shared.config.scenario == Scenario::Churn {
            set.spawn_on(churn_slot(s, c, permit), &rt);
        } else {
            set.spawn_on(client_main(s, c, permit), &rt);
        }
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                Shared::count(&shared.disconnects, "panic".into());
            }
        }
    }
}

/// One steady client: connect, then receive (and publish) until told to stop.
async fn client_main(shared: Arc<Shared>, c: u32, permit: OwnedSemaphorePermit) {
    let place = shared.plan.place(c);
    let server = &shared.servers[place.server as usize];
    let room = room_name(place.room);
    let user = format!("u{c}");
    if shared.config.transport == Transport::Sse {
        return sse_client(shared, c, permit, &room, &user).await;
    }
    let connected = timeout(
        shared.connect_timeout(),
        client::connect(server, shared.source_for(c), &room, &user),
    )
    .await;
    drop(permit);
    let done = shared.done.fetch_add(1, Relaxed) + 1;
    if done >= shared.assigned {
        shared.ramp_done.notify_one();
    }
    let (ws, welcome) = match connected {
        Ok(Ok(ok)) => ok,
        Ok(Err(reason)) => return Shared::count(&shared.failed, reason),
        Err(_) => return Shared::count(&shared.failed, "timeout".into()),
    };
    joined(&shared, place.instance, welcome);
    let mut me = Me {
        id: c,
        place,
        shard: c as usize,
        tracker: SeqTracker::new(welcome),
    };
    let stop = wait_stop(shared.stop.subscribe());
    let end = if place.publisher {
        publish_session(&shared, ws, &mut me, stop, &shared.stopping).await
    } else {
        receive_session(&shared, ws, &mut me, stop, &shared.stopping).await
    };
    left(&shared, &me, end);
}

/// One event-stream client (`--transport sse`, `idle` only): connect, then hold the stream,
/// reading and dropping whatever comes (heartbeats, presence) until told to stop.
async fn sse_client(
    shared: Arc<Shared>,
    c: u32,
    permit: OwnedSemaphorePermit,
    room: &str,
    user: &str,
) {
    let place = shared.plan.place(c);
    let server = &shared.servers[place.server as usize];
    let connected = timeout(
        shared.connect_timeout(),
        client::connect_sse(server, shared.source_for(c), room, user),
    )
    .await;
    drop(permit);
    let done = shared.done.fetch_add(1, Relaxed) + 1;
    if done >= shared.assigned {
        shared.ramp_done.notify_one();
    }
    let (stream, welcome) = match connected {
        Ok(Ok(ok)) => ok,
        Ok(Err(reason)) => return Shared::count(&shared.failed, reason),
        Err(_) => return Shared::count(&shared.failed, "timeout".into()),
    };
    joined(&shared, place.instance, welcome);
    let me = Me {
        id: c,
        place,
        shard: c as usize,
        tracker: SeqTracker::new(welcome),
    };
    let stop = wait_stop(shared.stop.subscribe());
    tokio::pin!(stop);
    let mut sink = [0u8; 512];
    let end = loop {
        tokio::select! {
            end = &mut stop => break end,
            ready = stream.readable() => {
                if ready.is_err() {
                    break End::Lost("sse_error".into());
                }
                match stream.try_read(&mut sink) {
                    Ok(0) => break End::Lost("eof".into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => break End::Lost(crate::sys::errno_name(&e)),
                }
            }
        }
    };
    left(&shared, &me, end);
}

fn joined(shared: &Shared, instance: u32, welcome: u64) {
    shared.open.fetch_add(1, Relaxed);
    shared.connected.fetch_add(1, Relaxed);
    shared.members[instance as usize].fetch_add(1, Relaxed);
    shared.min_welcome[instance as usize].fetch_min(welcome, Relaxed);
}

fn left(shared: &Shared, me: &Me, end: End) {
    shared.open.fetch_sub(1, Relaxed);
    shared.members[me.place.instance as usize].fetch_sub(1, Relaxed);
    match end {
        End::Finish(final_seq) => {
            if let Some(&f) = final_seq.get(me.place.instance as usize) {
                let tail = me.tracker.tail_loss(f);
                if tail > 0 {
                    shared.shard(me.shard).c.tail_loss += tail;
                }
            }
        }
        End::Leave => {
            shared.sessions.fetch_add(1, Relaxed);
        }
        End::Abort => {}
        End::Lost(reason) => Shared::count(&shared.disconnects, reason),
    }
}

/// Resolves when the worker says finish or abort. Cancel-safe.
async fn wait_stop(mut rx: watch::Receiver<Stop>) -> End {
    loop {
        match &*rx.borrow_and_update() {
            Stop::Running => {}
            Stop::Finish(f) => return End::Finish(f.clone()),
            Stop::Abort => return End::Abort,
        }
        if rx.changed().await.is_err() {
            return End::Abort;
        }
    }
}

/// A receiving-only client: one task owns the whole socket; fastwebsockets answers pings.
/// `stop` is polled once, then only after `gate` is raised.
async fn receive_session(
    shared: &Shared,
    mut ws: Ws,
    me: &mut Me,
    stop: impl Future<Output = End>,
    gate: &AtomicBool,
) -> End {
    // Not polled once per delivery (see `gate`).
    let mut stop = Gated::new(stop, gate);
    let end = loop {
        // The read future is dropped only when `stop` wins, and then the socket is being
        // closed: a half-read frame no longer matters (fastwebsockets' read is not cancel-safe).
        // Stop first: a gated poll costs one atomic swap, and a busy socket cannot starve it.
        tokio::select! {
            biased;
            end = &mut stop => break end,
            frame = ws.read_frame() => match frame {
                Ok(frame) => match frame.opcode {
                    OpCode::Text => {
                        shared.on_text(me, &frame.payload);
                    }
                    OpCode::Close => break End::Lost(close_reason(&frame.payload)),
                    _ => {}
                },
                Err(e) => break End::Lost(ws_reason(&e)),
            },
        }
    };
    if matches!(end, End::Finish(_) | End::Leave) {
        let clean = timeout(CLOSE_WAIT, async {
            ws.write_frame(Frame::close(1000, b"")).await?;
            loop {
                if ws.read_frame().await?.opcode == OpCode::Close {
                    return Ok::<_, WebSocketError>(());
                }
            }
        })
        .await;
        if !matches!(
            clean,
            Ok(Ok(())) | Ok(Err(WebSocketError::ConnectionClosed))
        ) {
            shared.unclean.fetch_add(1, Relaxed);
        }
    }
    end
}

/// Messages a window publisher may still send: its window less what is sent and not yet echoed.
fn window_room(window: u32, sent: u64, acked: &AtomicU64) -> u64 {
    u64::from(window).saturating_sub(sent.saturating_sub(acked.load(Relaxed)))
}

/// Bytes a publisher's writer buffers before a burst must go out anyway.
const PUBLISH_BUFFER: usize = 16 * 1024;

/// A publishing client: the socket is split; the reader counts and acknowledges, the writer
/// paces publications and sends the pongs and close replies the reader owes.
async fn publish_session(
    shared: &Shared,
    ws: Ws,
    me: &mut Me,
    stop: impl Future<Output = End>,
    gate: &AtomicBool,
) -> End {
    // Frames go through a buffer and leave with one flush per burst: a window publisher that
    // may send 40 messages sends them in one write, as a fast real publisher's TCP stream would
    // carry them, instead of 40 syscalls (which also paced the server one message per read).
    let (mut rx, mut tx) = ws.split(|s| {
        let (r, w) = tokio::io::split(s);
        (r, tokio::io::BufWriter::with_capacity(PUBLISH_BUFFER, w))
    });
    let acked = AtomicU64::new(0);
    let ack = Notify::new();
    let (owed_tx, mut owed_rx) = mpsc::channel::<(OpCode, Vec<u8>)>(8);
    let (closing_tx, closing_rx) = watch::channel(false);
    let id = me.id;
    let instance = me.place.instance;
    let rank = me.place.publisher_rank;

    let reader = async {
        let mut stop = Gated::new(stop, gate);
        let mut owe = |f: Frame<'_>| {
            // Pongs and close replies go through the writer; a full queue drops a pong,
            // which the next ping makes good.
            let _ = owed_tx.try_send((f.opcode, f.payload.to_vec()));
            std::future::ready(Ok::<(), WebSocketError>(()))
        };
        let end = loop {
            // As in `receive_session`: the read future is dropped only when stopping.
            tokio::select! {
                biased;
                end = &mut stop => break end,
                frame = rx.read_frame(&mut owe) => match frame {
                    Ok(frame) => match frame.opcode {
                        OpCode::Text => {
                            let own_echo = shared.on_text(me, &frame.payload) == Some(id);
                            if own_echo {
                                acked.fetch_add(1, Relaxed);
                                ack.notify_one();
                            }
                        }
                        OpCode::Close => break End::Lost(close_reason(&frame.payload)),
                        _ => {}
                    },
                    Err(e) => break End::Lost(ws_reason(&e)),
                },
            }
        };
        if matches!(end, End::Finish(_) | End::Leave) {
            let _ = closing_tx.send(true);
            let clean = timeout(CLOSE_WAIT, async {
                loop {
                    if rx.read_frame(&mut owe).await?.opcode == OpCode::Close {
                        return Ok::<_, WebSocketError>(());
                    }
                }
            })
            .await;
            if !matches!(clean, Ok(Ok(()))) {
                shared.unclean.fetch_add(1, Relaxed);
            }
        }
        drop(owed_tx);
        end
    };

    let writer = async {
        let mut pace_rx = shared.pace.subscribe();
        let mut closing_rx = closing_rx;
        let mut pace = *pace_rx.borrow_and_update();
        let config = &shared.config;
        let steady = config.publish_pacing == Pacing::Steady;
        // Messages a rate publisher writes at once: one when steady, `--burst-size` in bursts.
        let group = if steady {
            1
        } else {
            u64::from(config.burst_size)
        };
        // `hot` keeps its window under a rate too: a rate the server cannot follow fills it,
        // and the publisher then waits for echoes instead of queueing without bound.
        let rate_window = (config.scenario == Scenario::Hot).then_some(config.window);
        // The window compares all sends with all echoes, whatever paces came before.
        let mut sent_total = 0u64;
        let publishers = f64::from(shared.plan.publishers);
        // Spread publishers' send times over the period (golden-ratio sequence).
        let stagger = (f64::from(id) * 0.618_033_988_75 + f64::from(rank) * 0.5).fract();
        let far = Instant::now() + Duration::from_secs(86_400);
        // Publications a pace asks for by `now`: a writer that starts (or a pace that changes)
        // mid-way begins there instead of catching up on what it was never there for.
        let due_by = |pace: Pace, now: Instant| -> u64 {
            match pace {
                Pace::Rate { rate, since } => {
                    let elapsed = now.saturating_duration_since(since).as_secs_f64();
                    let n = (elapsed * rate / publishers - stagger).floor() + 1.0;
                    n.max(0.0) as u64
                }
                _ => 0,
            }
        };
        let mut sent_in_pace = due_by(pace, Instant::now());
        loop {
            let now = Instant::now();
            let window = match pace {
                Pace::Window { window } => Some(window),
                Pace::Rate { .. } => rate_window,
                Pace::Silent => None,
            };
            let window_full = window.is_some_and(|w| window_room(w, sent_total, &acked) == 0);
            let wake = match pace {
                Pace::Silent => far,
                _ if window_full => far,
                Pace::Rate { rate, since } => {
                    // When the group's last message is due.
                    let period = publishers / rate;
                    let last = (sent_in_pace + group - 1) as f64;
                    since + Duration::from_secs_f64(period * (stagger + last))
                }
                Pace::Window { .. } => now,
            };
            tokio::select! {
                biased;
                owed = owed_rx.recv() => match owed {
                    Some((op, data)) => {
                        let frame = Frame::new(true, op, None, Payload::Owned(data));
                        if tx.write_frame(frame).await.is_err() || tx.flush().await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                r = closing_rx.changed() => {
                    if r.is_err() || *closing_rx.borrow() {
                        if tx.write_frame(Frame::close(1000, b"")).await.is_ok() {
                            let _ = tx.flush().await;
                        }
                        // We started the close, so what the reader still owes (the echo of the
                        // server's close) needs no sending; wait for the reader to finish.
                        while owed_rx.recv().await.is_some() {}
                        return;
                    }
                }
                r = pace_rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    pace = *pace_rx.borrow_and_update();
                    sent_in_pace = due_by(pace, Instant::now());
                }
                _ = ack.notified(), if window_full => {}
                _ = clock::sleep_until(wake), if wake < far => {
                    let mut due = match pace {
                        // What the pace owes by now, at most BURST_MAX per wake-up.
                        Pace::Rate { .. } => due_by(pace, Instant::now())
                            .saturating_sub(sent_in_pace)
                            .clamp(1, BURST_MAX),
                        // Everything the window allows, in one burst.
                        Pace::Window { window } => window_room(window, sent_total, &acked).max(1),
                        Pace::Silent => 1,
                    };
                    if let Some(w) = window {
                        due = due.min(window_room(w, sent_total, &acked).max(1));
                    }
                    // Steady: every message its own write, also when catching up. Burst: all
                    // of them in one (the buffer sends what passes its 16 KiB on the way).
                    let per_write = if steady { 1 } else { due };
                    while due > 0 {
                        for _ in 0..per_write.min(due) {
                            if let (true, Pace::Rate { rate, since }) = (steady, pace) {
                                let period = publishers / rate;
                                let at = since.into_std()
                                    + Duration::from_secs_f64(
                                        period * (stagger + sent_in_pace as f64),
                                    );
                                let late = std::time::Instant::now().saturating_duration_since(at);
                                if late.as_secs_f64() > period / 2.0 {
                                    shared.shard(id as usize).c.late_sends += 1;
                                }
                            }
                            let text = stamped_message(
                                id,
                                now_us(),
                                config.payload_bytes,
                                config.payload_kind,
                            );
                            if tx.write_frame(Frame::text(Payload::Owned(text))).await.is_err() {
                                return;
                            }
                            sent_in_pace += 1;
                            sent_total += 1;
                            due -= 1;
                            shared.sent[instance as usize].fetch_add(1, Relaxed);
                            shared.shard(id as usize).c.sent += 1;
                        }
                        if tx.flush().await.is_err() {
                            return;
                        }
                        shared.shard(id as usize).c.publish_writes += 1;
                    }
                }
            }
        }
    };

    let (end, ()) = tokio::join!(reader, writer);
    end
}

/// Churn: one slot connects, stays a random while, leaves and comes back, until the run ends.
async fn churn_slot(shared: Arc<Shared>, c: u32, permit: OwnedSemaphorePermit) {
    let home = shared.plan.place(c);
    let mut rng = Rng(u64::from(c).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut permit = Some(permit);
    let mut first = true;
    let mut stop_rx = shared.stop.subscribe();
    loop {
        if !matches!(*stop_rx.borrow_and_update(), Stop::Running) {
            break;
        }
        let permit = match permit.take() {
            Some(p) => p,
            None => match shared.connect_slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // Publishers always return to their own room; the others wander.
        let place = if home.publisher {
            home
        } else {
            let room = rng.below(shared.plan.rooms);
            let server = match shared.plan.route {
                Route::Rooms => room % shared.plan.servers,
                Route::Spread => rng.below(shared.plan.servers),
            };
            Placement {
                room,
                server,
                instance: room * shared.plan.servers + server,
                publisher: false,
                publisher_rank: 0,
            }
        };
        let server = &shared.servers[place.server as usize];
        let connected = timeout(
            shared.connect_timeout(),
            client::connect(
                server,
                shared.source_for(c),
                &room_name(place.room),
                &format!("u{c}"),
            ),
        )
        .await;
        drop(permit);
        if first {
            first = false;
            let done = shared.done.fetch_add(1, Relaxed) + 1;
            if done >= shared.assigned {
                shared.ramp_done.notify_one();
            }
        }
        let (ws, welcome) = match connected {
            Ok(Ok(ok)) => ok,
            Ok(Err(reason)) => {
                Shared::count(&shared.failed, reason);
                sleep(Duration::from_millis(100 + rng.below(400) as u64)).await;
                continue;
            }
            Err(_) => {
                Shared::count(&shared.failed, "timeout".into());
                sleep(Duration::from_millis(100 + rng.below(400) as u64)).await;
                continue;
            }
        };
        joined(&shared, place.instance, welcome);
        let mut me = Me {
            id: c,
            place,
            shard: c as usize,
            tracker: SeqTracker::new(welcome),
        };
        let life = Duration::from_secs_f64(shared.config.churn_lifetime * (0.5 + rng.unit()));
        let stop = {
            let rx = shared.stop.subscribe();
            async move {
                tokio::select! {
                    end = wait_stop(rx) => match end {
                        // Final seqs mean nothing while rooms come and go.
                        End::Finish(_) => End::Leave,
                        other => other,
                    },
                    _ = sleep(life) => End::Leave,
                }
            }
        };
        // The session's lifetime timer is in `stop` too: no gate (churn is not about cost).
        let end = if place.publisher {
            publish_session(&shared, ws, &mut me, stop, &ALWAYS).await
        } else {
            receive_session(&shared, ws, &mut me, stop, &ALWAYS).await
        };
        let abort = matches!(end, End::Abort);
        left(&shared, &me, end);
        if abort {
            break;
        }
    }
}

/// xorshift64*: deterministic per client, good enough to pick rooms and lifetimes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_subtracts_late_fills() {
        let c = Counters {
            gaps: 5,
            late: 2,
            tail_loss: 1,
            stale: 1,
            ..Counters::default()
        };
        assert_eq!(c.loss(), 4);
        assert_eq!(c.reorders(), 3);
    }

    #[test]
    fn counters_add_deliveries_by_server() {
        let mut total = Counters::default();
        let a = Counters {
            deliveries: 3,
            deliveries_by_server: vec![1, 2],
            ..Counters::default()
        };
        let b = Counters {
            deliveries: 6,
            deliveries_by_server: vec![1, 2, 3],
            ..Counters::default()
        };
        total.add(&a);
        total.add(&b);
        assert_eq!(total.deliveries, 9);
        assert_eq!(total.deliveries_by_server, vec![2, 4, 3]);
    }

    #[test]
    fn events_and_commands_round_trip_as_json_lines() {
        let cmd = Command::Finish {
            final_seq: vec![3, 4],
        };
        let line = serde_json::to_string(&cmd).expect("serialize");
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<Command>(&line).expect("parse"),
            Command::Finish { final_seq } if final_seq == vec![3, 4]
        ));
        let ev = Event::Progress(Progress {
            open: 7,
            hist: vec![(10, 2)],
            ..Progress::default()
        });
        let line = serde_json::to_string(&ev).expect("serialize");
        match serde_json::from_str::<Event>(&line).expect("parse") {
            Event::Progress(p) => assert_eq!((p.open, p.hist), (7, vec![(10, 2)])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng(12345);
        for _ in 0..1000 {
            assert!(r.below(7) < 7);
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
