//! The assign phases: a closed loop of clients, and an open loop sent on a fixed schedule, with what each came to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use whist_adapters::store::Database;
use whist_adapters::tokens::{Purpose, Tokens};

use super::measures::{
    metric_sum, metric_total, CpuTimes, LoadProcesses, NeighbourSeconds, Neighbours,
    OtherProcesses, Statements, WalWritten,
};
use super::series::ClosedFigures;
use super::{Users, SHED_RETRY};

/// How one assign was answered.
enum Answer {
    /// 200, with the mandelbox's id.
    Assigned(String),
    /// 503 `NO_INSTANCE_AVAILABLE`.
    Refused,
    /// 429: more assigns at once than the server takes (`WHIST_ASSIGN_CONCURRENCY`; the load's rate limits are off).
    Shed,
    /// Anything else, or no answer.
    Failed,
}

/// One assign for the user signed in with `token`.
async fn assign(client: &reqwest::Client, base: &str, token: &str, session: i64) -> Answer {
    let response = client
        .post(format!("{base}/mandelbox/assign"))
        .bearer_auth(token)
        .json(&serde_json::json!({
            "regions": ["us-east-1"],
            "client_commit_hash": "load",
            "session_id": session,
            "user_email": "load@example.com",
        }))
        .send()
        .await;
    let Ok(response) = response else {
        return Answer::Failed;
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match (status, body["mandelbox_id"].as_str()) {
        (200, Some(mandelbox_id)) => Answer::Assigned(mandelbox_id.to_string()),
        (503, _) if body["error"] == "NO_INSTANCE_AVAILABLE" => Answer::Refused,
        (429, _) => Answer::Shed,
        _ => Answer::Failed,
    }
}

/// The protocol server's disconnect of `mandelbox_id`.
async fn disconnect(client: &reqwest::Client, base: &str, tokens: &Tokens, mandelbox_id: &str) {
    let secret = tokens.derive(Purpose::Protocol, mandelbox_id);
    let _ = client
        .post(format!("{base}/mandelbox/{mandelbox_id}/disconnect"))
        .bearer_auth(secret)
        .send()
        .await;
}

/// What one phase of assign load came to.
pub(super) struct Phase {
    sent: u64,
    pub(super) assigned: u64,
    refused: u64,
    shed: u64,
    failed: u64,
    /// Sorted: each assign's latency (closed loop) or answer time from its scheduled send (open loop).
    latencies: Vec<Duration>,
    /// Sorted, as `latencies` but with each 429 a second later (when the app retries it); empty without 429s.
    with_retries: Vec<Duration>,
    elapsed: f64,
    cpu: Option<CpuTimes>,
    /// CPU seconds the machine's other processes took over the phase (counted in `cpu`'s machine time).
    others: f64,
    /// Assigns the servers decided more than once, and all assigns they counted, over the phase.
    retried: f64,
    counted: f64,
    /// What only an open loop measures; `None` for a closed loop.
    open: Option<OpenLoopFigures>,
    /// Statements the server processes ran over the phase (`pg_stat_statements`), when Postgres keeps them.
    statements: Option<Statements>,
    /// What the load's Postgres wrote to its WAL over the phase.
    wal: Option<WalWritten>,
}

/// What only an open loop measures: how its sends kept to the schedule, and in which seconds its answers were slow.
struct OpenLoopFigures {
    /// Sorted: how late each assign left after its scheduled time (the generator, or the machine under it, fell
    /// behind).
    lateness: Vec<Duration>,
    most_in_flight: u64,
    /// Answers slower than [`SLOW_ANSWER`] (the p99 target), by second of the schedule. A stall shows as a second or
    /// two of many; a rate above what the servers sustain, as counts that grow to the end.
    slow_by_second: Vec<u64>,
    /// The p99 of each [`WINDOW`] of the schedule, in milliseconds (an open loop longer than one window): how much
    /// of the whole loop's p99 a single stall decides.
    p99_by_window: Vec<f64>,
    /// When the schedule began (UTC), to find a stall's second in other logs (Postgres's, the servers').
    schedule_began: chrono::DateTime<chrono::Utc>,
    /// What the machine's other processes, the load's Postgres's background processes and the disks did in each
    /// second (`None` where the sampler failed).
    neighbours: Option<NeighbourSeconds>,
    /// Slow answers in a second that make it worth naming the busiest other process: 1% of the second's sends.
    notable: u64,
    /// What the servers still had to do of the load before the open loop, and how long it took them.
    settled: Settled,
    /// Postgres alone in the same seconds ([`BESIDE_RATE`] one-row inserts a second), or why it did not run.
    beside: Result<Beside, String>,
}

/// How many one-row inserts a second Postgres alone answers beside an open loop: enough that a stall of the disk
/// longer than [`SLOW_ANSWER`] holds up at least one of them, and few enough to cost the machine next to nothing.
const BESIDE_RATE: f64 = 50.0;

/// Postgres alone beside an open loop, in the same seconds: where its one-row inserts were slow too, the machine
/// (its disk, mostly) stalled for anything that commits, and the open loop's slow answers there say nothing of the
/// servers; what the open loop answered outside those seconds does.
struct Beside {
    /// Sorted: each insert's time from its scheduled start.
    times: Vec<Duration>,
    /// The seconds of the open loop's schedule in which an insert of Postgres alone took longer than
    /// [`SLOW_ANSWER`].
    stalls: Vec<usize>,
    /// Of the open loop's answers slower than [`SLOW_ANSWER`], how many were sent in a stalled second or the one
    /// after it (a stall's backlog drains into the next second), and how many in all.
    slow_in_reach: u64,
    slow: u64,
    /// Sorted: the open loop's answer times outside a stall's reach.
    outside: Vec<Duration>,
    /// All the open loop's answers.
    answers: usize,
}

impl Beside {
    /// `seconds`: how many seconds the open loop's schedule has (those [`slow_by_second`] counts).
    fn new(
        control: &crate::bench::RateControl,
        schedule_began: chrono::DateTime<chrono::Utc>,
        answers: &[Duration],
        rate: f64,
        seconds: usize,
    ) -> Self {
        let stalls = stalled_seconds(
            &control.answers,
            schedule_began.timestamp_micros(),
            seconds,
            SLOW_ANSWER,
        );
        let reach = stall_reach(&stalls, seconds);
        let (mut outside, slow_in_reach, slow) = outside_reach(answers, rate, &reach, SLOW_ANSWER);
        outside.sort();
        let mut times = control.times();
        times.sort();
        Self {
            times,
            stalls,
            slow_in_reach,
            slow,
            outside,
            answers: answers.len(),
        }
    }

    fn print(&self) {
        let stalls: Vec<String> = self.stalls.iter().map(usize::to_string).collect();
        println!(
            "{:<36} {:>11.1} ms (slowest {:.1} ms; {} inserts); seconds with one > {} ms: {}{}",
            format!("Postgres beside, {BESIDE_RATE:.0} inserts/s: p99"),
            percentile_ms(&self.times, 0.99),
            percentile_ms(&self.times, 1.0),
            self.times.len(),
            SLOW_ANSWER.as_millis(),
            self.stalls.len(),
            if stalls.is_empty() {
                String::new()
            } else {
                format!(" ({})", stalls.join(" "))
            }
        );
        println!(
            "{:<36} {:>14} of {} (in a second Postgres alone stalled in, or the next)",
            format!("answers > {} ms in its stalls", SLOW_ANSWER.as_millis()),
            self.slow_in_reach,
            self.slow
        );
        println!(
            "{:<36} {:>11.1} ms (p50 {:.1} ms; {} of {} answers)",
            "answer p99 outside its stalls",
            percentile_ms(&self.outside, 0.99),
            percentile_ms(&self.outside, 0.50),
            self.outside.len(),
            self.answers
        );
    }
}

/// What the servers still had to do as an open loop was about to begin (the tail of the closed loop before it, or
/// of the fleet's registration), and how long the open loop waited for it.
#[derive(Debug, Clone)]
struct Settled {
    /// Events the slowest projection had still to apply.
    behind: i64,
    /// Side effects the reconciler had not carried out yet.
    jobs: i64,
    took: Duration,
    /// `false` when [`SETTLE_LIMIT`] ran out first.
    reached: bool,
    /// How long the `CHECKPOINT` after settling took, or why Postgres refused it.
    checkpoint: Result<Duration, String>,
}

/// How long an open loop waits at most for the servers to settle (see [`AssignLoad::settle`]).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

impl OpenLoopFigures {
    fn print(&self) {
        println!(
            "{:<36} {:>11.0} ms (projections {} events behind, {} jobs waiting{})",
            "settled before the schedule in",
            self.settled.took.as_secs_f64() * 1000.0,
            self.settled.behind,
            self.settled.jobs,
            if self.settled.reached {
                ""
            } else {
                "; still not settled: the schedule began anyway"
            }
        );
        match &self.settled.checkpoint {
            Ok(took) => println!(
                "{:<36} {:>11.0} ms",
                "then a checkpoint in",
                took.as_secs_f64() * 1000.0
            ),
            Err(refused) => println!(
                "{:<36} {:>14} ({refused}): the schedule inherits what the load before it left unwritten",
                "then a checkpoint", "refused"
            ),
        }
        println!(
            "{:<36} {:>14}",
            "most assigns in flight", self.most_in_flight
        );
        let late = self
            .lateness
            .iter()
            .filter(|late| **late > Duration::from_millis(1))
            .count();
        println!("{:<36} {:>14}", "sends late by > 1 ms", late);
        let by_second: Vec<String> = self.slow_by_second.iter().map(u64::to_string).collect();
        println!(
            "{:<36} {:>14} (from {} UTC)",
            format!("answers > {} ms, by second", SLOW_ANSWER.as_millis()),
            by_second.join(" "),
            self.schedule_began.format("%H:%M:%S%.3f")
        );
        print_p99_by_window(&self.p99_by_window);
        if let Some(neighbours) = &self.neighbours {
            neighbours.print(
                &self.slow_by_second,
                self.notable,
                &format!("> {} ms", SLOW_ANSWER.as_millis()),
            );
        }
        match &self.beside {
            Ok(beside) => beside.print(),
            Err(error) => println!("{:<36} {:>14} ({error})", "Postgres beside", "failed"),
        }
        // Counted in the answer times above: a machine that holds up the generator shows here, not in the server.
        println!(
            "{:<36} {:>11.1} ms (p99.9 {:.1} ms)",
            "send lateness p99",
            percentile_ms(&self.lateness, 0.99),
            percentile_ms(&self.lateness, 0.999)
        );
    }
}

impl Phase {
    /// Names the statements the phase counted, from the texts read once the load is over ([`Statements::texts`]).
    pub(super) fn name_statements(&mut self, texts: &std::collections::HashMap<i64, String>) {
        if let Some(statements) = &mut self.statements {
            statements.name(texts);
        }
    }

    pub(super) fn rate(&self) -> f64 {
        self.assigned as f64 / self.elapsed.max(1e-9)
    }

    /// WAL the load's Postgres wrote per assign answered over the phase, where it could be read.
    pub(super) fn wal_per_assign(&self) -> Option<f64> {
        self.wal
            .map(|wal| wal.bytes_per(self.assigned.max(1) as f64))
    }

    pub(super) fn figures(&self) -> ClosedFigures {
        ClosedFigures {
            rate: self.rate(),
            cpu_per_assign: self
                .cpu
                .map(|cpu| cpu.machine / self.assigned.max(1) as f64),
            generator_cpu_per_assign: self
                .cpu
                .map(|cpu| cpu.generator / self.assigned.max(1) as f64),
            p99_ms: self.percentile(0.99),
            retried: (self.counted > 0.0).then(|| self.retried / self.counted),
        }
    }

    pub(super) fn percentile(&self, fraction: f64) -> f64 {
        percentile_ms(&self.latencies, fraction)
    }

    pub(super) fn print(&self, cpu_per_insert: Option<f64>, timed: &str) {
        println!("{:<36} {:>12.0}/s", "assigns answered 200", self.rate());
        println!(
            "{:<36} {:>14}",
            "sent / 200 / refused / 429 / failed",
            format!(
                "{} / {} / {} / {} / {}",
                self.sent, self.assigned, self.refused, self.shed, self.failed
            )
        );
        for (label, fraction) in [("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)] {
            println!(
                "{:<36} {:>11.1} ms",
                format!("assign {timed} {label}"),
                self.percentile(fraction)
            );
        }
        if !self.with_retries.is_empty() {
            println!(
                "{:<36} {:>11.1} ms (each 429 as its retry, {} s later)",
                format!("assign {timed} p99, 429s retried"),
                percentile_ms(&self.with_retries, 0.99),
                SHED_RETRY.as_secs()
            );
        }
        let figures = self.figures();
        if let Some(retried) = figures.retried {
            println!(
                "{:<36} {:>13.1}%",
                "assigns decided more than once",
                100.0 * retried
            );
        }
        match &self.statements {
            Some(statements) => statements.print(self.assigned.max(1) as f64),
            None => println!(
                "{:<36} {:>14}",
                "statements per assign", "n/a (no pg_stat_statements)"
            ),
        }
        if let Some(wal) = self.wal {
            wal.print(self.assigned as f64, self.elapsed);
        }
        if let Some(open) = &self.open {
            open.print();
        }
        if let (Some(cpu), Some(per_assign)) = (self.cpu, figures.cpu_per_assign) {
            println!(
                "{:<36} {:>11.2} ms (server {:.1}%, load generator and its hosts {:.1}%, Postgres and the rest {:.1}%, \
                 other processes {:.1}%)",
                "machine CPU per assign",
                per_assign * 1000.0,
                100.0 * cpu.server / cpu.machine.max(1e-9),
                100.0 * cpu.generator / cpu.machine.max(1e-9),
                100.0 * (cpu.machine - cpu.server - cpu.generator - self.others).max(0.0)
                    / cpu.machine.max(1e-9),
                100.0 * self.others / cpu.machine.max(1e-9),
            );
            println!(
                "{:<36} {:>14.1} (the kernel {:.0}% of the machine's CPU)",
                "context switches per assign",
                cpu.switches / self.assigned.max(1) as f64,
                100.0 * cpu.kernel / cpu.machine.max(1e-9),
            );
            if self.open.is_some() {
                // Not the capacity left to drain a backlog with: an assign costs less the more assigns share a
                // statement, so a backlog drains at about the closed loop's rate, whatever the idle cores say.
                println!(
                    "{:<36} {:>11.2} of {} cores",
                    "machine busy",
                    cpu.machine / self.elapsed.max(1e-9),
                    super::machine_cores()
                );
            }
            if let Some(per_insert) = cpu_per_insert {
                println!(
                    "{:<36} {:>13.1}x",
                    "assign / pgbench insert, in CPU",
                    per_assign / per_insert.max(1e-12)
                );
            }
        }
    }
}

/// Counts every phase of assign load shares.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    assigned: AtomicU64,
    refused: AtomicU64,
    shed: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, answer: &Answer) {
        let counter = match answer {
            Answer::Assigned(_) => &self.assigned,
            Answer::Refused => &self.refused,
            Answer::Shed => &self.shed,
            Answer::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counts a phase's figures are taken from, as the phase starts.
struct Before {
    /// Assigns decided more than once, and all assigns, as the servers had counted them.
    retries: (f64, f64),
    statements: Option<Statements>,
    wal: Option<WalWritten>,
    cpu: Option<CpuTimes>,
    others: OtherProcesses,
    started: Instant,
}

/// What the assign phases send to, and as whom.
pub(super) struct AssignLoad<'a> {
    pub(super) client: &'a reqwest::Client,
    /// The load's database, for `pg_stat_statements`.
    pub(super) database: &'a Database,
    /// Its URL, for Postgres beside the open loop (pgbench).
    pub(super) url: &'a str,
    pub(super) bases: &'a [String],
    pub(super) tokens: &'a Tokens,
    pub(super) users: &'a Users,
    /// The servers, the load generator and the load's Postgres, told from the machine's other processes.
    pub(super) load_processes: &'a LoadProcesses,
    pub(super) keep: bool,
    pub(super) seconds: u64,
}

impl AssignLoad<'_> {
    /// Every client assigns, then (unless `keep`) disconnects what it got, then assigns again, for `seconds`.
    pub(super) async fn closed_loop(
        &self,
        clients: usize,
        server_pids: &[u32],
    ) -> anyhow::Result<Phase> {
        let deadline = Instant::now() + Duration::from_secs(self.seconds);
        let tally = Arc::new(Tally::default());
        let before = self.before(server_pids).await;
        let mut tasks = Vec::new();
        for index in 0..clients {
            let client = self.client.clone();
            let base = self.bases[index % self.bases.len()].clone();
            let token = self.users.token(index).to_string();
            let tokens = self.tokens.clone();
            let tally = tally.clone();
            let keep = self.keep;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut session = 0i64;
                while Instant::now() < deadline {
                    session += 1;
                    let sent = Instant::now();
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    let answer = assign(&client, &base, &token, session).await;
                    latencies.push((sent.elapsed(), matches!(answer, Answer::Shed)));
                    tally.count(&answer);
                    if let (Answer::Assigned(mandelbox_id), false) = (&answer, keep) {
                        disconnect(&client, &base, &tokens, mandelbox_id).await;
                    }
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await?);
        }
        self.finish(&tally, latencies, before, server_pids, None)
            .await
    }

    /// Assigns sent at `rate` per second for `seconds`, on schedule whatever the answers' speed (no send waits for
    /// an answer), each timed from its scheduled send: a queue anywhere shows in the figures instead of slowing the
    /// sender down.
    pub(super) async fn open_loop(&self, rate: f64, server_pids: &[u32]) -> anyhow::Result<Phase> {
        let total = (rate * self.seconds as f64).round().max(1.0) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let tally = Arc::new(Tally::default());
        let in_flight = Arc::new(AtomicU64::new(0));
        let mut most_in_flight = 0;
        // Postgres alone writes to a database of its own on the same server, so that the load's database counts
        // only the servers' statements and commits (the WAL and its flushes are the whole server's either way).
        let beside_database =
            crate::bench::ScratchDatabase::create(self.url, "whist_load_beside").await?;
        let beside_pool = beside_database.connect().await?;
        sqlx::raw_sql(crate::bench::RATE_CONTROL_TABLE)
            .execute(&beside_pool)
            .await?;
        beside_pool.close().await;
        let settled = self.settle().await?;
        let before = self.before(server_pids).await;
        // The schedule is kept by a thread of its own, which sleeps to each send time with the operating system's
        // precision (tens of microseconds) and hands the send to the runtime: tokio's timers fire on whole
        // milliseconds, which would make most sends up to a millisecond late and add that to every answer time.
        let first = std::time::Instant::now() + Duration::from_millis(20);
        let schedule_began = chrono::Utc::now() + chrono::Duration::milliseconds(20);
        let neighbours = Neighbours::sample(self.load_processes.clone(), first);
        // Postgres alone in the same seconds, begun a moment early and ended a moment late, so that it covers the
        // whole schedule.
        let (url, seconds) = (beside_database.url.clone(), self.seconds + 1);
        let beside = tokio::spawn(async move {
            crate::bench::pgbench_at_rate(&url, BESIDE_RATE, seconds, 4, 0.0).await
        });
        let (pace, mut due) = tokio::sync::mpsc::unbounded_channel::<(u64, std::time::Instant)>();
        let pacer = std::thread::spawn(move || {
            for index in 0..total {
                let scheduled = first + interval.mul_f64(index as f64);
                if let Some(wait) = scheduled.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
                if pace.send((index, scheduled)).is_err() {
                    return;
                }
            }
        });
        let mut tasks = Vec::with_capacity(total as usize);
        while let Some((index, scheduled)) = due.recv().await {
            let scheduled = tokio::time::Instant::from_std(scheduled);
            let client = self.client.clone();
            let base = self.bases[index as usize % self.bases.len()].clone();
            let token = self.users.token(index as usize).to_string();
            let tokens = self.tokens.clone();
            let (tally, in_flight) = (tally.clone(), in_flight.clone());
            let keep = self.keep;
            most_in_flight = most_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
            tally.sent.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let late = scheduled.elapsed();
                let answer = assign(&client, &base, &token, index as i64 + 1).await;
                let answered = scheduled.elapsed();
                tally.count(&answer);
                if let (Answer::Assigned(mandelbox_id), false) = (&answer, keep) {
                    disconnect(&client, &base, &tokens, mandelbox_id).await;
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
                ((answered, matches!(answer, Answer::Shed)), late)
            }));
        }
        pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the open loop's pacer thread panicked"))?;
        let mut latencies = Vec::with_capacity(tasks.len());
        let mut lateness = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (answered, late) = task.await?;
            latencies.push(answered);
            lateness.push(late);
        }
        let neighbours = neighbours.finish();
        let times: Vec<Duration> = latencies.iter().map(|(took, _)| *took).collect();
        let slow_by_second = slow_by_second(&times, rate, SLOW_ANSWER);
        let beside = match beside.await {
            Ok(Ok(control)) => Ok(Beside::new(
                &control,
                schedule_began,
                &times,
                rate,
                slow_by_second.len(),
            )),
            Ok(Err(error)) => Err(format!("{error:#}")),
            Err(error) => Err(error.to_string()),
        };
        beside_database.drop_it().await?;
        lateness.sort();
        let open = OpenLoopFigures {
            lateness,
            most_in_flight,
            slow_by_second,
            p99_by_window: p99_by_window(&times, rate),
            schedule_began,
            neighbours,
            notable: (rate / 100.0).ceil() as u64,
            settled,
            beside,
        };
        self.finish(&tally, latencies, before, server_pids, Some(open))
            .await
    }

    /// Waits, up to [`SETTLE_LIMIT`], until the servers have done what the load so far left them: every projection
    /// at the log's head and no side effect waiting. A closed loop leaves a tail of events to project and jobs to
    /// carry out; an open loop begun at once would measure how the servers recover from the closed loop's
    /// saturation in its first second, not how they answer at its rate. Then it writes out what Postgres still
    /// holds of that load (see [`AssignLoad::checkpoint`]).
    async fn settle(&self) -> anyhow::Result<Settled> {
        let started = Instant::now();
        let mut first = None;
        loop {
            let (behind, jobs): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT position FROM event_log_head WHERE id = 1) \
                        - coalesce((SELECT min(position) FROM projection_checkpoints), 0), \
                        (SELECT count(*) FROM jobs WHERE status IN ('pending', 'running'))",
            )
            .fetch_one(self.database.any())
            .await?;
            let (behind_first, jobs_first) = *first.get_or_insert((behind, jobs));
            let reached = behind <= 0 && jobs == 0;
            if reached || started.elapsed() >= SETTLE_LIMIT {
                let took = started.elapsed();
                return Ok(Settled {
                    behind: behind_first,
                    jobs: jobs_first,
                    took,
                    reached,
                    checkpoint: self.checkpoint().await,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes out what the load before left in Postgres's buffers and the kernel's page cache: a `CHECKPOINT` writes
    /// every dirty buffer and fsyncs the data files. A closed loop writes tens of MB of WAL a second; without this,
    /// its checkpoints and the kernel's writeback of its pages land in the open loop after it, which then measures
    /// that debt rather than answers at its own rate. It needs superuser (or `pg_checkpoint`, Postgres 15 on); a
    /// refusal is printed, not fatal.
    async fn checkpoint(&self) -> Result<Duration, String> {
        let started = Instant::now();
        sqlx::query("CHECKPOINT")
            .execute(self.database.any())
            .await
            .map(|_| started.elapsed())
            .map_err(|error| error.to_string())
    }

    /// What the servers and the machine had counted as a phase starts.
    async fn before(&self, server_pids: &[u32]) -> Before {
        let retries = self.retries().await;
        let statements = Statements::read(self.database).await;
        let wal = WalWritten::read(self.database).await;
        Before {
            retries,
            statements,
            wal,
            cpu: CpuTimes::read(server_pids),
            others: OtherProcesses::read(self.load_processes),
            started: Instant::now(),
        }
    }

    /// The phase's figures: what was counted since `before`.
    async fn finish(
        &self,
        tally: &Tally,
        answers: Vec<(Duration, bool)>,
        before: Before,
        server_pids: &[u32],
        open: Option<OpenLoopFigures>,
    ) -> anyhow::Result<Phase> {
        let elapsed = before.started.elapsed().as_secs_f64();
        let cpu = CpuTimes::read(server_pids)
            .zip(before.cpu)
            .map(|(after, earlier)| after.since(&earlier));
        let others = OtherProcesses::read(self.load_processes).since(&before.others);
        let statements = Statements::read(self.database)
            .await
            .zip(before.statements)
            .map(|(after, earlier)| after.since(&earlier));
        let wal = WalWritten::read(self.database)
            .await
            .zip(before.wal)
            .map(|(after, earlier)| after.since(earlier));
        let (retried, counted) = self.retries().await;
        let (retried_before, counted_before) = before.retries;
        let (latencies, with_retries) = answer_times(&answers);
        Ok(Phase {
            sent: tally.sent.load(Ordering::Relaxed),
            assigned: tally.assigned.load(Ordering::Relaxed),
            refused: tally.refused.load(Ordering::Relaxed),
            shed: tally.shed.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            latencies,
            with_retries,
            elapsed,
            cpu,
            others,
            retried: retried - retried_before,
            counted: counted - counted_before,
            open,
            statements,
            wal,
        })
    }

    /// Assigns decided more than once, and all assigns, as the servers have counted them so far.
    async fn retries(&self) -> (f64, f64) {
        let mut texts = Vec::new();
        for base in self.bases {
            if let Ok(response) = self.client.get(format!("{base}/metrics")).send().await {
                texts.push(response.text().await.unwrap_or_default());
            }
        }
        (
            metric_total(&texts, "whist_assigns_retried_total").unwrap_or(0.0),
            metric_sum(&texts, "whist_assigns_total"),
        )
    }
}

/// How slow an open loop's answer may be (the half-rate p99 target) before it counts in the phase's slow answers.
const SLOW_ANSWER: Duration = Duration::from_millis(20);

/// Of an open loop's answer times, in the order of their scheduled sends at `rate` per second, how many in each
/// second of the schedule took longer than `slow`.
fn slow_by_second(answers: &[Duration], rate: f64, slow: Duration) -> Vec<u64> {
    let seconds = (answers.len() as f64 / rate.max(1e-9)).ceil() as usize;
    let mut counts = vec![0; seconds];
    for (index, took) in answers.iter().enumerate() {
        let second = second_sent(index, rate, seconds);
        if *took > slow {
            if let Some(count) = counts.get_mut(second) {
                *count += 1;
            }
        }
    }
    counts
}

/// The second of a schedule of `seconds` seconds at `rate` sends a second in which its `index`th send was scheduled
/// (a send past the last whole second counts in the last).
fn second_sent(index: usize, rate: f64, seconds: usize) -> usize {
    ((index as f64 / rate.max(1e-9)) as usize).min(seconds.saturating_sub(1))
}

/// The seconds of a schedule begun at `began_us` (microseconds since the Unix epoch), `seconds` long, in which a
/// transaction of Postgres alone beside it took longer than `slow`, each once, in order.
fn stalled_seconds(
    beside: &[crate::bench::ControlAnswer],
    began_us: i64,
    seconds: usize,
    slow: Duration,
) -> Vec<usize> {
    let mut stalls: Vec<usize> = beside
        .iter()
        .filter(|answer| answer.took > slow && answer.scheduled_us >= began_us)
        .map(|answer| ((answer.scheduled_us - began_us) / 1_000_000) as usize)
        .filter(|second| *second < seconds)
        .collect();
    stalls.sort_unstable();
    stalls.dedup();
    stalls
}

/// For each of `seconds` seconds of a schedule, whether it is in a stall's reach: a stalled second, or the one after
/// (what a stall holds up drains into the next second).
fn stall_reach(stalls: &[usize], seconds: usize) -> Vec<bool> {
    let mut reach = vec![false; seconds];
    for second in stalls {
        for reached in [*second, second + 1] {
            if let Some(flag) = reach.get_mut(reached) {
                *flag = true;
            }
        }
    }
    reach
}

/// Of an open loop's answer times, in the order of their scheduled sends at `rate` per second: those sent in a second
/// outside `reach`, how many slower than `slow` were sent inside it, and how many were slower than `slow` in all.
fn outside_reach(
    answers: &[Duration],
    rate: f64,
    reach: &[bool],
    slow: Duration,
) -> (Vec<Duration>, u64, u64) {
    let mut outside = Vec::with_capacity(answers.len());
    let (mut slow_inside, mut slow_all) = (0, 0);
    for (index, took) in answers.iter().enumerate() {
        let inside = reach
            .get(second_sent(index, rate, reach.len()))
            .copied()
            .unwrap_or(false);
        if *took > slow {
            slow_all += 1;
            if inside {
                slow_inside += 1;
            }
        }
        if !inside {
            outside.push(*took);
        }
    }
    (outside, slow_inside, slow_all)
}

/// The stretch of an open loop's schedule whose own p99 the report gives (see [`p99_by_window`]).
const WINDOW: Duration = Duration::from_secs(10);

/// Of an open loop's answer times, in the order of their scheduled sends at `rate` per second, the p99 of each
/// [`WINDOW`] of the schedule, in milliseconds; a last window less than half full is left out (a random schedule
/// such as pgbench's may run a few sends past the whole windows, and their p99 would be their slowest). A stall of a tenth of a second holds up
/// about 1% of a ten-second window's answers on its own, and decides that window's p99; over a longer loop it is
/// one window in several.
fn p99_by_window(answers: &[Duration], rate: f64) -> Vec<f64> {
    let per_window = ((rate * WINDOW.as_secs_f64()).round() as usize).max(1);
    answers
        .chunks(per_window)
        .filter(|window| window.len() * 2 >= per_window)
        .map(|window| {
            let mut sorted = window.to_vec();
            sorted.sort();
            percentile_ms(&sorted, 0.99)
        })
        .collect()
}

/// Prints what Postgres alone answered at the open loop's `rate` ([`crate::bench::pgbench_at_rate`]) beside the open
/// loop's own p99 and WAL per assign.
pub(super) fn print_rate_control(
    control: &crate::bench::RateControl,
    rate: f64,
    answer_p99: f64,
    wal_per_assign: f64,
) {
    println!(
        "-- Postgres alone at {rate:.0} transactions/s (pgbench --rate: {} rows a transaction, about an assign's WAL); \
         time from the scheduled start --",
        control.rows
    );
    let times = control.times();
    let mut sorted = times.clone();
    sorted.sort();
    println!("{:<36} {:>14}", "transactions", control.answers.len());
    for (label, fraction) in [("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)] {
        println!(
            "{:<36} {:>11.1} ms",
            format!("transaction {label}"),
            percentile_ms(&sorted, fraction)
        );
    }
    print_p99_by_window(&p99_by_window(&times, rate));
    println!(
        "{:<36} {:>12.0} B (an assign: {:.0} B)",
        "WAL written per transaction", control.wal_per_transaction, wal_per_assign
    );
    println!(
        "{:<36} {:>13.2}x",
        "assign answer p99 / Postgres alone's",
        answer_p99 / percentile_ms(&sorted, 0.99).max(1e-9)
    );
}

/// Prints the p99 of each window of a schedule ([`p99_by_window`]), when there is more than one.
fn print_p99_by_window(by_window: &[f64]) {
    if by_window.len() > 1 {
        let by_window: Vec<String> = by_window.iter().map(|p99| format!("{p99:.1}")).collect();
        println!(
            "{:<36} {:>14}",
            format!("p99 ms, by {} s of the schedule", WINDOW.as_secs()),
            by_window.join(" ")
        );
    }
}

/// Each answer's time, sorted, and, when some were 429s, the same with each 429 a second later (when the desktop
/// app retries it: what it cost its user is at least that), sorted; empty without 429s.
fn answer_times(answers: &[(Duration, bool)]) -> (Vec<Duration>, Vec<Duration>) {
    let mut latencies: Vec<Duration> = answers.iter().map(|(took, _)| *took).collect();
    latencies.sort();
    let mut with_retries: Vec<Duration> = if answers.iter().any(|(_, shed)| *shed) {
        answers
            .iter()
            .map(|(took, shed)| if *shed { *took + SHED_RETRY } else { *took })
            .collect()
    } else {
        Vec::new()
    };
    with_retries.sort();
    (latencies, with_retries)
}

/// The `fraction` percentile of `sorted` durations, in milliseconds (0 when there are none).
fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len().saturating_sub(1));
    sorted
        .get(index)
        .map_or(0.0, |duration| duration.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_answers_are_counted_in_the_second_of_their_scheduled_send() {
        let ms = Duration::from_millis;
        // Four sends a second over two and a half seconds: a stall in the second second.
        let answers = [
            ms(3),
            ms(4),
            ms(25),
            ms(2),
            ms(40),
            ms(31),
            ms(20),
            ms(5),
            ms(3),
            ms(90),
        ];
        assert_eq!(slow_by_second(&answers, 4.0, ms(20)), [1, 2, 1]);
        assert_eq!(slow_by_second(&[], 4.0, ms(20)), Vec::<u64>::new());
    }

    #[test]
    fn a_stall_of_postgres_alone_reaches_its_second_and_the_next() {
        let ms = Duration::from_millis;
        let began = 1_000_000_000;
        let insert = |at_ms: i64, took: u64| crate::bench::ControlAnswer {
            scheduled_us: began + at_ms * 1000,
            took: ms(took),
        };
        // Slow inserts in seconds 1 (twice) and 3; one before the schedule and one after it count for nothing.
        let beside = [
            insert(-500, 90),
            insert(100, 2),
            insert(1200, 40),
            insert(1900, 25),
            insert(3000, 21),
            insert(3500, 20),
            insert(9000, 80),
        ];
        let stalls = stalled_seconds(&beside, began, 5, ms(20));
        assert_eq!(stalls, [1, 3]);
        assert_eq!(stall_reach(&stalls, 5), [false, true, true, true, true]);
        // The last second's stall reaches past the schedule's end without harm.
        assert_eq!(stall_reach(&[4], 5), [false, false, false, false, true]);
        // Two answers a second: second 0 is outside; a slow answer there counts in all, not in the reach.
        let answers = [ms(30), ms(2), ms(50), ms(3), ms(4), ms(25)];
        let (outside, slow_inside, slow_all) =
            outside_reach(&answers, 2.0, &stall_reach(&stalls, 3), ms(20));
        assert_eq!(outside, [ms(30), ms(2)]);
        assert_eq!((slow_inside, slow_all), (2, 3));
    }

    #[test]
    fn each_window_of_the_schedule_has_its_own_p99() {
        let ms = Duration::from_millis;
        // One send a second: ten-second windows of ten answers, the second one with a stall, the last one short.
        let mut answers = vec![ms(2); 25];
        answers[14] = ms(80);
        assert_eq!(p99_by_window(&answers, 1.0), [2.0, 80.0, 2.0]);
        // A last window of four answers in ten is left out, however slow they were.
        answers.truncate(24);
        answers[22] = ms(300);
        assert_eq!(p99_by_window(&answers, 1.0), [2.0, 80.0]);
        assert_eq!(p99_by_window(&[], 1.0), Vec::<f64>::new());
    }

    #[test]
    fn a_429_counts_as_its_retry_a_second_later_in_the_second_view_only() {
        let ms = Duration::from_millis;
        let (latencies, with_retries) =
            answer_times(&[(ms(5), false), (ms(2), true), (ms(3), false)]);
        assert_eq!(latencies, [ms(2), ms(3), ms(5)]);
        assert_eq!(with_retries, [ms(3), ms(5), ms(1002)]);
        let (_, none) = answer_times(&[(ms(5), false)]);
        assert!(none.is_empty(), "no 429, no second view");
    }

    #[test]
    fn a_percentile_is_the_duration_at_its_rank_and_zero_of_none() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.5), 51.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 100.0);
        assert_eq!(percentile_ms(&sorted, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }
}
