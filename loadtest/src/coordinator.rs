//! The run itself: preflight, start workers, ramp, cross-check the servers, drive the scenario,
//! drain, count tail loss against the rooms' final seqs, close, and merge it all into a
//! `Report`. Everything is bounded by `--max-seconds`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::config::{Config, Pacing, Scenario, Server};
use crate::cost::{Cost, Mark};
use crate::hist::{add_buckets, new_hist, to_buckets};
use crate::http::{self, Stats};
use crate::link::WorkerLink;
use crate::plan::{default_procs, room_name, Plan};
use crate::report::{Latency, Report, Saturation, ServerReport, Step};
use crate::summary::Summary;
use crate::units::{ms, thousands};
use crate::worker::{Command, Counters, Event, InstanceSeq, Progress, WorkerResult, WorkerSpec};
use crate::{preflight, sys};

/// `--max-seconds` ran out.
#[derive(Debug)]
struct DeadlineHit;

impl std::fmt::Display for DeadlineHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by --max-seconds")
    }
}

impl std::error::Error for DeadlineHit {}

/// HTTP checks in flight at once.
const HTTP_CONCURRENCY: usize = 16;

/// Runs a whole load test and returns its report; `Err` only when the run could not be made
/// (bad settings, a server not answering before the ramp, a worker that cannot start).
/// Writes `config.json` and appends to `config.summary` when set. Prints live lines on stderr unless `config.quiet`.
pub async fn run(mut config: Config) -> anyhow::Result<Report> {
    config.validate()?;
    let mut servers = config.servers()?;
    for s in servers.iter_mut().filter(|s| s.pid.is_none()) {
        s.pid = crate::procfs::listener_pid(s.addr);
    }
    let sources = config.source_addrs()?;
    let (_, hard) = sys::raise_nofile()
        .or_else(|_| sys::nofile())
        .unwrap_or((1024, 1024));
    let procs = config
        .procs
        .unwrap_or_else(|| default_procs(config.clients, hard));
    let checks = preflight::run(&config, &servers, &sources, procs);
    if !config.quiet {
        preflight::print(&checks);
    }

    let started = Instant::now();
    let mut c = Coordinator::new(config.clone(), servers, sources, procs);
    c.report.preflight = checks;
    c.report.started_unix_ms = crate::payload::now_us() / 1000;
    let outcome = c.flow().await;
    if let Err(e) = &outcome {
        if e.downcast_ref::<DeadlineHit>().is_none() {
            c.abort().await;
            return Err(outcome
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("run failed")));
        }
        c.report.failures.push(format!(
            "stopped by --max-seconds {:.0} before the run completed",
            config.max_seconds()
        ));
        c.abort().await;
    }
    c.finish_report(started);
    c.report.publishing = config.publishing().map(str::to_string);
    if let Some(path) = &config.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(&c.report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &config.summary {
        let value = serde_json::to_value(&c.report)?;
        Summary::of(&value, config.json.as_deref()).append(path)?;
    }
    Ok(c.report)
}

/// What the coordinator knows about one worker.
#[derive(Default)]
struct WorkerView {
    progress: Progress,
    /// Progress events received.
    ticks: u64,
    members: Option<Vec<u32>>,
    seqs: Option<Vec<InstanceSeq>>,
    result: Option<WorkerResult>,
    exited: bool,
}

struct Coordinator {
    config: Config,
    servers: Vec<Server>,
    sources: Vec<std::net::Ipv4Addr>,
    procs: u32,
    plan: Plan,
    deadline: Instant,
    links: Vec<WorkerLink>,
    events: mpsc::UnboundedReceiver<(u32, Event)>,
    events_tx: Option<mpsc::UnboundedSender<(u32, Event)>>,
    views: Vec<WorkerView>,
    /// Every latency seen so far (for the live p99).
    live_hist: Histogram<u64>,
    /// Latencies since the current saturate step began.
    step_hist: Histogram<u64>,
    bar: ProgressBar,
    t0: Instant,
    next_live: Instant,
    last_live: (Instant, u64),
    report: Report,
    /// Expected members per instance, from the workers' `Ramped`.
    members: Vec<u32>,
    publish_started: Option<Instant>,
    publish_ended: Option<Instant>,
}

impl Coordinator {
    fn new(
        config: Config,
        servers: Vec<Server>,
        sources: Vec<std::net::Ipv4Addr>,
        procs: u32,
    ) -> Self {
        let plan = Plan::new(&config, servers.len() as u32, procs);
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let bar = if config.quiet {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(u64::from(config.clients));
            if let Ok(style) = ProgressStyle::with_template(
                "ramp {bar:40.cyan/blue} {pos}/{len} connects, {elapsed} elapsed, eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        };
        Coordinator {
            deadline: now + Duration::from_secs_f64(config.max_seconds()),
            report: Report {
                settings: Some(config.clone()),
                procs,
                clients: config.clients,
                rooms: config.rooms,
                servers: servers.len(),
                ..Report::default()
            },
            config,
            servers,
            sources,
            procs,
            plan,
            links: Vec::new(),
            events: rx,
            events_tx: Some(tx),
            views: (0..procs).map(|_| WorkerView::default()).collect(),
            live_hist: new_hist(),
            step_hist: new_hist(),
            bar,
            t0: now,
            next_live: now + Duration::from_secs(1),
            last_live: (now, 0),
            members: Vec::new(),
            publish_started: None,
            publish_ended: None,
        }
    }

    async fn flow(&mut self) -> anyhow::Result<()> {
        let n = self.servers.len();
        self.report.server_stats = self
            .servers
            .iter()
            .map(|s| ServerReport {
                url: s.url.clone(),
                ..ServerReport::default()
            })
            .collect();
        for (i, s) in self.servers.clone().iter().enumerate() {
            let st = http::stats(s).await.with_context(|| {
                format!(
                    "server {} does not answer /api/stats before the ramp",
                    s.url
                )
            })?;
            self.report.server_stats[i].before = Some(st);
        }

        self.start_workers()?;
        let ramp_start = Instant::now();
        self.t0 = ramp_start;
        self.wait_for(
            |c| c.views.iter().all(|v| v.members.is_some() || v.exited),
            self.deadline,
        )
        .await?;
        self.bar.finish_and_clear();
        self.worker_trouble()?;
        self.report.ramp_secs = ramp_start.elapsed().as_secs_f64();
        self.members = vec![0; self.plan.instances() as usize];
        for v in &self.views {
            for (i, m) in v.members.iter().flatten().enumerate() {
                self.members[i] += m;
            }
        }
        let opened: u64 = self.members.iter().map(|&m| u64::from(m)).sum();
        self.report.ramp_connects_per_sec = opened as f64 / self.report.ramp_secs.max(1e-3);
        for (i, s) in self.report.server_stats.iter_mut().enumerate() {
            s.opened = (0..self.members.len())
                .filter(|inst| inst % n == i)
                .map(|inst| u64::from(self.members[inst]))
                .sum();
        }
        self.live(&format!(
            "ramp done: {} open in {:.1} s",
            thousands(opened),
            self.report.ramp_secs
        ));

        // Let the servers settle (presence bursts, allocator) before reading their RSS.
        self.pump_for(Duration::from_millis(1000)).await?;
        self.stats_into(|s| &mut s.after_ramp).await;
        if self.config.scenario != Scenario::Churn {
            self.check_rooms().await;
            self.check_connections();
        }

        let hold = Duration::from_secs_f64(self.config.duration);
        // CPU charged to deliveries, on both sides: from just before publishing to the end of
        // the drain, so the ramp's connects do not count.
        let start = self.mark().await?;
        match self.config.scenario {
            Scenario::Idle => self.pump_for(hold).await?,
            Scenario::Chat | Scenario::Churn => {
                self.publish(Command::Publish {
                    rate: self.config.rate(),
                });
                self.pump_for(hold).await?;
                self.quiet();
            }
            Scenario::Hot => {
                // Steady: `--rate`, each message its own write, within the window (the
                // publisher applies it); burst: as fast as the window allows, in bursts.
                self.publish(match self.config.publish_pacing {
                    Pacing::Steady => Command::Publish {
                        rate: self.config.rate(),
                    },
                    Pacing::Burst => Command::PublishWindow {
                        window: self.config.window,
                    },
                });
                self.pump_for(hold).await?;
                self.quiet();
            }
            Scenario::Saturate => {
                let s = self.saturate(hold).await?;
                self.report.saturation = Some(s);
                self.quiet();
            }
        }
        if self.publish_started.is_some() {
            self.drain().await?;
        }
        let end = self.mark().await?;
        let window = Cost::between(&self.urls(), &start, &end);
        self.report.cpu_steady_seconds = window.loadtest_cpu_seconds;
        self.report.cpu_us_per_delivery = window.loadtest_cpu_us_per_delivery;
        // Saturate's figure is its highest sustained step's, not the mix of every step.
        self.report.cost = match &self.report.saturation {
            Some(s) => s
                .steps
                .iter()
                .filter(|st| st.passed)
                .max_by(|a, b| a.deliveries_per_sec.total_cmp(&b.deliveries_per_sec))
                .and_then(|st| st.cost.clone()),
            None => Some(window),
        };
        self.note_coarse_cpu();
        self.stats_into(|s| &mut s.end).await;

        let final_seq = if self.config.scenario == Scenario::Churn {
            Vec::new()
        } else {
            self.final_seqs().await?
        };
        self.broadcast(Command::Finish { final_seq });
        let limit = (Instant::now() + Duration::from_secs(20)).min(self.deadline);
        self.wait_for(
            |c| c.views.iter().all(|v| v.result.is_some() || v.exited),
            limit,
        )
        .await?;
        self.after_close().await;
        // Reap worker processes so their CPU time counts as ours.
        let limit = (Instant::now() + Duration::from_secs(5)).min(self.deadline);
        if self.procs > 1 {
            self.wait_for(|c| c.views.iter().all(|v| v.exited), limit)
                .await?;
        }
        Ok(())
    }

    /// /proc counts CPU in clock ticks: a window of little server CPU gets a coarse figure,
    /// and the report says how coarse.
    fn note_coarse_cpu(&mut self) {
        let Some(cost) = &self.report.cost else {
            return;
        };
        let tick = crate::procfs::tick_seconds();
        for (server, c) in self.servers.iter().zip(&cost.servers) {
            if let (Some(pid), Some(cpu)) = (server.pid, c.cpu_seconds) {
                if cpu > 0.0 && cpu < 100.0 * tick {
                    self.report.notes.push(format!(
                        "{}: {cpu:.2} s of server CPU in the window, read from /proc/{pid} in {:.0} ms ticks: its deliveries per CPU-second are good to ±{:.0}%",
                        server.url,
                        tick * 1000.0,
                        100.0 * 2.0 * tick / cpu
                    ));
                }
            }
        }
    }

    fn start_workers(&mut self) -> anyhow::Result<()> {
        let Some(tx) = self.events_tx.take() else {
            bail!("workers already started");
        };
        let exe = match &self.config.worker_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding this executable to start workers")?,
        };
        for index in 0..self.procs {
            let spec = WorkerSpec {
                index,
                procs: self.procs,
                config: self.config.clone(),
                servers: self.servers.clone(),
                sources: self.sources.clone(),
                deadline_secs: self.config.max_seconds() + 30.0,
            };
            let link = if self.procs == 1 {
                WorkerLink::in_process(spec, tx.clone())
            } else {
                WorkerLink::spawn(&exe, spec, tx.clone())?
            };
            self.links.push(link);
        }
        Ok(())
    }

    fn worker_trouble(&self) -> anyhow::Result<()> {
        if let Some((i, _)) = self
            .views
            .iter()
            .enumerate()
            .find(|(_, v)| v.exited && v.result.is_none())
        {
            bail!("worker {i} exited before the end of the run (see its stderr above)");
        }
        Ok(())
    }

    fn broadcast(&self, cmd: Command) {
        for l in &self.links {
            l.send(cmd.clone());
        }
    }

    fn publish(&mut self, cmd: Command) {
        self.publish_started.get_or_insert_with(Instant::now);
        self.broadcast(cmd);
    }

    fn quiet(&mut self) {
        self.broadcast(Command::Quiet);
        self.publish_ended = Some(Instant::now());
    }

    fn sum(&self) -> (Counters, Progress) {
        let mut c = Counters::default();
        let mut p = Progress::default();
        for v in &self.views {
            c.add(&v.progress.counters);
            p.done += v.progress.done;
            p.open += v.progress.open;
            p.failed += v.progress.failed;
            p.disconnects += v.progress.disconnects;
            p.sessions += v.progress.sessions;
        }
        (c, p)
    }

    /// CPU seconds of the worker processes (of this process, when the worker runs in it).
    fn cpu_sum(&self) -> f64 {
        self.views.iter().map(|v| v.progress.cpu_s).sum()
    }

    fn on_event(&mut self, index: u32, ev: Event) {
        let Some(view) = self.views.get_mut(index as usize) else {
            return;
        };
        match ev {
            Event::Progress(p) => {
                add_buckets(&mut self.live_hist, &p.hist);
                add_buckets(&mut self.step_hist, &p.hist);
                view.progress = p;
                view.ticks += 1;
                let done: u64 = self.views.iter().map(|v| v.progress.done).sum();
                self.bar.set_position(done);
            }
            Event::Ramped { members, .. } => view.members = Some(members),
            Event::Seqs { instances } => view.seqs = Some(instances),
            Event::Result(r) => view.result = Some(*r),
            Event::Error { message } => self.report.notes.push(message),
            Event::Exited { code } => {
                view.exited = true;
                if view.result.is_none() {
                    self.report
                        .failures
                        .push(format!("worker {index} exited early (exit code {code:?})"));
                }
            }
        }
    }

    /// Whether every worker has sent a progress report since `ticks` were read (or exited).
    fn all_reported_since(&self, ticks: &[u64]) -> bool {
        self.views
            .iter()
            .zip(ticks)
            .all(|(v, t)| v.ticks > *t || v.exited)
    }

    /// Handles events until `done(self)` or `limit`; `Ok(false)` when the limit came first.
    /// Fails with `DeadlineHit` at `--max-seconds`.
    async fn wait_for(
        &mut self,
        done: impl Fn(&Self) -> bool,
        limit: Instant,
    ) -> anyhow::Result<bool> {
        loop {
            if done(self) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(DeadlineHit.into());
            }
            if now >= limit {
                return Ok(false);
            }
            if now >= self.next_live {
                self.live_tick();
            }
            let wake = limit.min(self.deadline).min(self.next_live);
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some((i, ev)) => self.on_event(i, ev),
                    None => bail!("every worker is gone"),
                },
                _ = sleep_until(wake) => {}
            }
        }
    }

    async fn pump_for(&mut self, d: Duration) -> anyhow::Result<()> {
        self.wait_for(|_| false, Instant::now() + d)
            .await
            .map(|_| ())
    }

    fn live_tick(&mut self) {
        let now = Instant::now();
        while self.next_live <= now {
            self.next_live += Duration::from_secs(1);
        }
        let (c, p) = self.sum();
        let dt = now.duration_since(self.last_live.0).as_secs_f64().max(1e-3);
        let rate = (c.deliveries.saturating_sub(self.last_live.1)) as f64 / dt;
        self.last_live = (now, c.deliveries);
        let p99 = if self.live_hist.is_empty() {
            "-".to_string()
        } else {
            ms(self.live_hist.value_at_quantile(0.99))
        };
        let mut line = format!(
            "[{:>6.1}s] open {} failed {} | deliveries/s {} | p99 {} | loss {} dups {}",
            self.t0.elapsed().as_secs_f64(),
            thousands(p.open),
            p.failed,
            thousands(rate.round() as u64),
            p99,
            c.loss(),
            c.dups
        );
        if p.disconnects > 0 {
            line.push_str(&format!(" | disconnects {}", p.disconnects));
        }
        if p.sessions > 0 {
            line.push_str(&format!(" | sessions {}", thousands(p.sessions)));
        }
        self.live(&line);
    }

    fn live(&self, line: &str) {
        if self.config.quiet {
            return;
        }
        if self.bar.is_hidden() || self.bar.is_finished() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    async fn stats_into(&mut self, slot: impl Fn(&mut ServerReport) -> &mut Option<Stats>) {
        for (i, s) in self.servers.clone().iter().enumerate() {
            match http::stats(s).await {
                Ok(st) => *slot(&mut self.report.server_stats[i]) = Some(st),
                Err(e) => self.report.notes.push(format!("{e:#}")),
            }
        }
    }

    /// Compares `/api/rooms/{room}` member counts with what was opened, on a sample of rooms.
    async fn check_rooms(&mut self) {
        let rooms = self.config.rooms;
        let n = self.servers.len() as u32;
        let sample = self.config.check_rooms.min(rooms).max(1);
        let picked: Vec<u32> = (0..sample)
            .map(|i| (u64::from(i) * u64::from(rooms) / u64::from(sample)) as u32)
            .collect();
        let mut jobs: Vec<(u32, u32, u32)> = Vec::new();
        for &r in &picked {
            for s in 0..n {
                let inst = r * n + s;
                let expected = self.members.get(inst as usize).copied().unwrap_or(0);
                jobs.push((r, s, expected));
            }
        }
        let results = self
            .room_requests(jobs.iter().map(|&(r, s, _)| (r, s)).collect())
            .await;
        self.report.rooms_checked = picked.len() as u64;
        for ((r, s, expected), got) in jobs.into_iter().zip(results) {
            let url = &self.servers[s as usize].url;
            match got {
                Ok(Some(info)) if info.members == u64::from(expected) => {}
                Ok(None) if expected == 0 => {}
                Ok(Some(info)) => self.report.count_mismatches.push(format!(
                    "{} on {url}: opened {expected} members, server reports {}",
                    room_name(r),
                    info.members
                )),
                Ok(None) => self.report.count_mismatches.push(format!(
                    "{} on {url}: opened {expected} members, server says no such room",
                    room_name(r)
                )),
                Err(e) => self
                    .report
                    .notes
                    .push(format!("room check {}: {e:#}", room_name(r))),
            }
        }
    }

    /// `/api/stats` connections after the ramp must have grown by what was opened.
    fn check_connections(&mut self) {
        for s in &self.report.server_stats {
            if let (Some(b), Some(a)) = (&s.before, &s.after_ramp) {
                let grew = a.connections as i64 - b.connections as i64;
                if grew != s.opened as i64 {
                    self.report.count_mismatches.push(format!(
                        "{}: opened {} sockets, /api/stats connections went {} → {}",
                        s.url, s.opened, b.connections, a.connections
                    ));
                }
            }
        }
    }

    /// GETs `/api/rooms/lt-r` on server s for each `(r, s)`, a few at a time, in order.
    async fn room_requests(
        &self,
        jobs: Vec<(u32, u32)>,
    ) -> Vec<anyhow::Result<Option<http::RoomInfo>>> {
        let mut out: Vec<Option<anyhow::Result<Option<http::RoomInfo>>>> =
            (0..jobs.len()).map(|_| None).collect();
        let mut set = JoinSet::new();
        let mut next = 0;
        loop {
            while set.len() < HTTP_CONCURRENCY && next < jobs.len() {
                let (r, s) = jobs[next];
                let server = self.servers[s as usize].clone();
                let i = next;
                set.spawn(async move { (i, http::room(&server, &room_name(r)).await) });
                next += 1;
            }
            match set.join_next().await {
                Some(Ok((i, res))) => out[i] = Some(res),
                Some(Err(e)) => {
                    let _ = e;
                }
                None => break,
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("request task failed"))))
            .collect()
    }

    /// After the publishers stop: wait until every publication is echoed and the delivery
    /// count stands still, or `--drain-timeout`.
    async fn drain(&mut self) -> anyhow::Result<()> {
        let limit = Instant::now() + Duration::from_secs_f64(self.config.drain_timeout);
        let mut last: Option<u64> = None;
        loop {
            // A fresh progress from every worker before judging.
            let ticks: Vec<u64> = self.views.iter().map(|v| v.ticks).collect();
            let fresh = self
                .wait_for(|c| c.all_reported_since(&ticks), limit)
                .await?;
            if !fresh {
                self.report
                    .notes
                    .push("drain: deliveries still moving at --drain-timeout".into());
                return Ok(());
            }
            let (c, _) = self.sum();
            // Churn publishers that left never see their last echoes.
            let echoed = c.acked >= c.sent || self.config.scenario == Scenario::Churn;
            if echoed && last == Some(c.deliveries) {
                return Ok(());
            }
            last = Some(c.deliveries);
        }
    }

    /// Final seq per instance: the larger of the server's `last_seq` and the largest seq any
    /// client saw. Also checks that servers assigned exactly one seq per publication.
    async fn final_seqs(&mut self) -> anyhow::Result<Vec<u64>> {
        self.broadcast(Command::ReportSeqs);
        let limit = (Instant::now() + Duration::from_secs(10)).min(self.deadline);
        self.wait_for(
            |c| c.views.iter().all(|v| v.seqs.is_some() || v.exited),
            limit,
        )
        .await?;
        let count = self.plan.instances() as usize;
        let mut min_welcome = vec![u64::MAX; count];
        let mut max_seen = vec![0u64; count];
        let mut sent = vec![0u64; count];
        for v in &self.views {
            for s in v.seqs.iter().flatten() {
                let i = s.instance as usize;
                if i < count {
                    min_welcome[i] = min_welcome[i].min(s.min_welcome);
                    max_seen[i] = max_seen[i].max(s.max_seen);
                    sent[i] += s.sent;
                }
            }
        }
        let n = self.servers.len() as u32;
        let wanted: Vec<u32> = (0..count as u32)
            .filter(|&i| min_welcome[i as usize] != u64::MAX)
            .collect();
        let results = self
            .room_requests(wanted.iter().map(|&i| (i / n, i % n)).collect())
            .await;
        let mut final_seq = max_seen.clone();
        let clustered = self
            .report
            .server_stats
            .iter()
            .any(|s| s.before.as_ref().is_some_and(|b| b.clustered));
        for (&i, res) in wanted.iter().zip(results) {
            let i = i as usize;
            let room = room_name(i as u32 / n);
            let url = &self.servers[i % n as usize].url;
            match res {
                Ok(Some(info)) => final_seq[i] = final_seq[i].max(info.last_seq),
                Ok(None) => self.report.count_mismatches.push(format!(
                    "{room} on {url}: members are connected but the server says no such room"
                )),
                Err(e) => self.report.notes.push(format!("last_seq of {room}: {e:#}")),
            }
            if !clustered && (self.config.scenario != Scenario::Idle || sent[i] > 0) {
                let assigned = final_seq[i].saturating_sub(min_welcome[i]);
                if assigned != sent[i] {
                    self.report.count_mismatches.push(format!(
                        "{room} on {url}: publishers sent {}, server assigned {assigned} seqs",
                        sent[i]
                    ));
                }
            }
        }
        if clustered {
            // Cluster mode: a room's instances on every server are one room with one seq
            // stream, numbered for all its publishers together.
            let n = n as usize;
            for r in 0..count / n {
                let ids = r * n..(r + 1) * n;
                let welcome = ids
                    .clone()
                    .map(|i| min_welcome[i])
                    .min()
                    .unwrap_or(u64::MAX);
                if welcome == u64::MAX {
                    continue;
                }
                let last = ids.clone().map(|i| final_seq[i]).max().unwrap_or(0);
                let room_sent: u64 = ids.clone().map(|i| sent[i]).sum();
                for i in ids {
                    final_seq[i] = last;
                }
                if self.config.scenario != Scenario::Idle || room_sent > 0 {
                    let assigned = last.saturating_sub(welcome);
                    if assigned != room_sent {
                        self.report.count_mismatches.push(format!(
                            "{} (cluster): publishers sent {room_sent}, cluster assigned {assigned} seqs",
                            room_name(r as u32)
                        ));
                    }
                }
            }
        }
        Ok(final_seq)
    }

    /// Saturate: double the rate every step until loss, slow p99, disconnects or `hold`.
    async fn saturate(&mut self, hold: Duration) -> anyhow::Result<Saturation> {
        let step = Duration::from_secs_f64(self.config.step_seconds);
        let started = Instant::now();
        // `--rate` is per room, whatever the route: rooms with a member somewhere publish.
        let n = self.servers.len();
        let live_rooms = self
            .members
            .chunks(n.max(1))
            .filter(|room| room.iter().any(|&m| m > 0))
            .count() as f64;
        let mut out = Saturation::default();
        let mut rate = self.config.rate();
        let mut start = self.mark().await?;
        loop {
            let (c0, p0) = self.sum();
            self.step_hist.reset();
            let t0 = Instant::now();
            self.publish(Command::Publish { rate });
            self.pump_for(step).await?;
            let end = self.mark().await?;
            let (c1, p1) = self.sum();
            let secs = t0.elapsed().as_secs_f64();
            let cost = Cost::between(&self.urls(), &start, &end);
            start = end;
            let loss = c1.loss().saturating_sub(c0.loss());
            let st = Step {
                rate,
                seconds: secs,
                sent_per_sec: (c1.sent - c0.sent) as f64 / secs,
                target_sent_per_sec: rate * live_rooms,
                deliveries_per_sec: (c1.deliveries - c0.deliveries) as f64 / secs,
                loss,
                disconnects: p1.disconnects - p0.disconnects,
                p99_us: if self.step_hist.is_empty() {
                    0
                } else {
                    self.step_hist.value_at_quantile(0.99)
                },
                passed: false,
                cost: Some(cost),
            };
            let p99_ok = (st.p99_us as f64) <= self.config.max_p99_ms * 1000.0;
            let mut stop = None;
            if st.loss > 0 {
                stop = Some(format!("loss {} at {rate} msg/s/room", st.loss));
            } else if st.disconnects > 0 {
                stop = Some(format!(
                    "{} disconnects at {rate} msg/s/room",
                    st.disconnects
                ));
            } else if !p99_ok {
                stop = Some(format!(
                    "p99 {} > {} ms at {rate} msg/s/room",
                    ms(st.p99_us),
                    self.config.max_p99_ms
                ));
            }
            let passed = stop.is_none();
            if passed && st.deliveries_per_sec > out.best_deliveries_per_sec {
                out.best_deliveries_per_sec = st.deliveries_per_sec;
                out.best_rate = rate;
            }
            if passed && st.sent_per_sec < 0.8 * st.target_sent_per_sec {
                stop = Some(format!(
                    "publishers reached only {:.0} of {:.0} msg/s: the load generator is the limit",
                    st.sent_per_sec, st.target_sent_per_sec
                ));
            }
            if stop.is_none() && started.elapsed() + step > hold {
                stop = Some("--duration reached".into());
            }
            self.live(&format!(
                "step {rate} msg/s/room: {} deliveries/s, p99 {}, loss {}",
                thousands(st.deliveries_per_sec.round() as u64),
                ms(st.p99_us),
                st.loss
            ));
            out.steps.push(Step { passed, ..st });
            if let Some(why) = stop {
                out.stopped_because = why;
                return Ok(out);
            }
            rate *= 2.0;
        }
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url.clone()).collect()
    }

    /// One end of a cost window: fresh counters from every worker, then every server's
    /// `/api/stats` (fetched together, so the servers are sampled within one round trip).
    async fn mark(&mut self) -> anyhow::Result<Mark> {
        self.snapshot().await?;
        let (c, _) = self.sum();
        let loadtest_cpu = self.cpu_sum();
        let at_secs = self.t0.elapsed().as_secs_f64();
        let mut set = JoinSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let s = s.clone();
            set.spawn(async move { (i, http::stats(&s).await) });
        }
        let mut servers = vec![None; self.servers.len()];
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Ok(st))) => servers[i] = Some(st),
                Ok((i, Err(e))) => self
                    .report
                    .notes
                    .push(format!("cost sample of {}: {e:#}", self.servers[i].url)),
                Err(e) => self.report.notes.push(format!("cost sample: {e}")),
            }
        }
        Ok(Mark {
            wire_bytes_in: c.wire_bytes_in,
            deliveries_by_server: c.deliveries_by_server,
            loadtest_cpu,
            servers,
            at_secs,
        })
    }

    /// Asks every worker for its counters now and waits for the answers (bounded to 5 s).
    async fn snapshot(&mut self) -> anyhow::Result<()> {
        let ticks: Vec<u64> = self.views.iter().map(|v| v.ticks).collect();
        self.broadcast(Command::Snapshot);
        let limit = Instant::now() + Duration::from_secs(5);
        self.wait_for(|c| c.all_reported_since(&ticks), limit)
            .await
            .map(|_| ())
    }

    /// After every client closed: connections should return to where they were.
    async fn after_close(&mut self) {
        let limit = Instant::now() + Duration::from_secs(5);
        for (i, s) in self.servers.clone().iter().enumerate() {
            let before = self.report.server_stats[i]
                .before
                .as_ref()
                .map(|b| b.connections);
            loop {
                match http::stats(s).await {
                    Ok(st) => {
                        let back = before.is_none_or(|b| st.connections <= b);
                        self.report.server_stats[i].after_close = Some(st.clone());
                        if back {
                            break;
                        }
                        if Instant::now() >= limit {
                            self.report.count_mismatches.push(format!(
                                "{}: {} connections 5 s after every client closed (was {} before the run)",
                                s.url,
                                st.connections,
                                before.unwrap_or(0)
                            ));
                            break;
                        }
                    }
                    Err(e) => {
                        self.report.notes.push(format!("after close: {e:#}"));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    /// Tells workers to stop and collects what they have, briefly.
    async fn abort(&mut self) {
        if self.links.is_empty() {
            return;
        }
        self.broadcast(Command::Abort);
        self.deadline = Instant::now() + Duration::from_secs(10);
        let limit = Instant::now() + Duration::from_secs(5);
        let _ = self
            .wait_for(
                |c| c.views.iter().all(|v| v.result.is_some() || v.exited),
                limit,
            )
            .await;
        self.bar.finish_and_clear();
    }

    fn finish_report(&mut self, started: Instant) {
        let r = &mut self.report;
        let mut counters = Counters::default();
        let mut hist = new_hist();
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        let mut disconnects: BTreeMap<String, u64> = BTreeMap::new();
        let mut missing = 0;
        for v in &self.views {
            match &v.result {
                Some(w) => {
                    counters.add(&w.counters);
                    add_buckets(&mut hist, &w.hist);
                    for (k, n) in &w.failed {
                        *failed.entry(k.clone()).or_insert(0) += n;
                    }
                    for (k, n) in &w.disconnects {
                        *disconnects.entry(k.clone()).or_insert(0) += n;
                    }
                    r.connected += w.connected;
                    r.sessions += w.sessions;
                    r.unclean_closes += w.unclean_closes;
                }
                None => {
                    missing += 1;
                    // Best effort from the last progress.
                    counters.add(&v.progress.counters);
                }
            }
        }
        if missing > 0 {
            r.failures
                .push(format!("{missing} worker(s) sent no result"));
            hist = self.live_hist.clone();
        }
        r.failed_connects = failed.values().sum();
        r.failed_by_reason = failed;
        r.disconnects = disconnects.values().sum();
        r.disconnects_by_reason = disconnects;
        r.sent = counters.sent;
        r.acked = counters.acked;
        r.publish_writes = counters.publish_writes;
        r.late_sends = counters.late_sends;
        if r.late_sends * 10 > r.sent {
            r.notes.push(format!(
                "steady publishers wrote {} of {} messages over half a period late (the load generator short of CPU, or a full --window): their spacing was not even",
                r.late_sends, r.sent
            ));
        }
        r.messages_per_publish_write = (counters.publish_writes > 0)
            .then(|| counters.sent as f64 / counters.publish_writes as f64);
        r.deliveries = counters.deliveries;
        r.loss = counters.loss();
        r.dups = counters.dups;
        r.reorders = counters.reorders();
        r.expected_deliveries = counters
            .deliveries
            .saturating_sub(counters.dups + counters.stale)
            + r.loss;
        r.presence_frames = counters.presence;
        r.server_errors = counters.server_errors;
        r.other_frames = counters.other_frames;
        r.unstamped = counters.unstamped;
        if counters.clock_skew > 0 {
            r.notes.push(format!(
                "{} stamps were in the future (clock step?)",
                counters.clock_skew
            ));
        }
        if r.other_frames > 0 {
            r.notes.push(format!(
                "{} frames of unknown shape from the server",
                r.other_frames
            ));
        }
        if r.unclean_closes > 0 {
            r.notes.push(format!(
                "{} sockets got no close frame back within 3 s when closing",
                r.unclean_closes
            ));
        }
        r.latency_us = Latency::of(&hist);
        r.latency_buckets = to_buckets(&hist);
        r.publish_secs = match (self.publish_started, self.publish_ended) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        if r.publish_secs > 0.0 {
            r.deliveries_per_sec = r.deliveries as f64 / r.publish_secs;
        }
        let mut rss_total = 0i64;
        let mut opened_total = 0u64;
        // Churn's population is in flux: a memory figure per connection would mean nothing.
        let memory = self.config.scenario != Scenario::Churn;
        for s in r.server_stats.iter_mut().filter(|_| memory) {
            if let (Some(b), Some(a)) = (&s.before, &s.after_ramp) {
                if s.opened > 0 {
                    let grew = a.rss_bytes as i64 - b.rss_bytes as i64;
                    s.rss_per_conn_bytes = Some(grew as f64 / s.opened as f64);
                    rss_total += grew;
                    opened_total += s.opened;
                }
            }
        }
        if rss_total < 0 {
            r.notes.push(
                "server RSS shrank during the ramp (memory freed from an earlier run?): start fresh servers for memory figures"
                    .into(),
            );
        }
        if opened_total > 0 {
            r.rss_per_conn_bytes = Some(rss_total as f64 / opened_total as f64);
        }
        let (me, children) = sys::cpu_seconds();
        r.cpu_seconds = me + children;
        r.wall_secs = started.elapsed().as_secs_f64();
        let scenario = self.config.scenario;
        let already = std::mem::take(&mut r.failures);
        r.judge(scenario);
        let mut all = already;
        all.append(&mut r.failures);
        r.failures = all;
    }
}
