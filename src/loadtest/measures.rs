//! What the load is measured with besides the answers: the machine's and each process's CPU from `/proc`, the
//! statements Postgres ran (`pg_stat_statements`) and the servers' own counters (`/metrics`).

use whist_adapters::store::Database;

/// An unlabelled metric summed over several servers' metrics (`None` when no server has it).
pub(super) fn metric_total(texts: &[String], name: &str) -> Option<f64> {
    texts
        .iter()
        .filter_map(|text| metric_value(text, name))
        .fold(None, |total, value| Some(total.unwrap_or(0.0) + value))
}

/// The value of an unlabelled metric in Prometheus's text format (a summary's `_sum` or `_count`, say).
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name)
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Calls of each statement the load's database ran, from `pg_stat_statements` (the server processes' and the load
/// test's own few: the latter are a handful per phase).
///
/// Counted by query id at the phases' turns and named only once the load is over ([`Statements::texts`]): reading
/// the texts means reading Postgres's query-text file under the extension's shared lock, 40-73 ms here, and a server
/// statement that had to add an entry waited behind it, right at the turn into the open loop.
pub(super) struct Statements {
    calls: std::collections::HashMap<i64, i64>,
    texts: std::collections::HashMap<i64, String>,
}

impl Statements {
    /// Creates the extension in the load's database. Postgres keeps statement statistics only when it loaded
    /// `pg_stat_statements` at start (`shared_preload_libraries`); otherwise [`Statements::read`] finds none.
    pub(super) async fn enable(database: &Database) {
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(database.any())
            .await;
    }

    /// The calls so far, by query id, without the texts; `None` when Postgres keeps none.
    pub(super) async fn read(database: &Database) -> Option<Self> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT queryid, calls FROM pg_stat_statements(false) \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND queryid IS NOT NULL",
        )
        .fetch_all(database.any())
        .await
        .ok()?;
        let mut calls = std::collections::HashMap::with_capacity(rows.len());
        for (query, count) in rows {
            *calls.entry(query).or_insert(0) += count;
        }
        Some(Self {
            calls,
            texts: std::collections::HashMap::new(),
        })
    }

    /// The texts of the statements the load's database ran, by query id: read once, after the load.
    pub(super) async fn texts(database: &Database) -> std::collections::HashMap<i64, String> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT queryid, query FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND queryid IS NOT NULL AND query IS NOT NULL",
        )
        .fetch_all(database.any())
        .await
        .unwrap_or_default();
        rows.into_iter().collect()
    }

    /// Names the statements counted from `texts` ([`Statements::texts`]).
    pub(super) fn name(&mut self, texts: &std::collections::HashMap<i64, String>) {
        self.texts = self
            .calls
            .keys()
            .filter_map(|query| Some((*query, texts.get(query)?.clone())))
            .collect();
    }

    pub(super) fn since(mut self, earlier: &Self) -> Self {
        for (query, count) in &mut self.calls {
            *count -= earlier.calls.get(query).copied().unwrap_or(0);
        }
        self.calls.retain(|_, count| *count > 0);
        self
    }

    /// Statements per assign, and the most frequent ones.
    pub(super) fn print(&self, assigns: f64) {
        let total: i64 = self.calls.values().sum();
        println!(
            "{:<36} {:>14.1}",
            "statements per assign",
            total as f64 / assigns
        );
        let mut top: Vec<(&i64, &i64)> = self.calls.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (query, count) in top.into_iter().take(8) {
            let text = match self.texts.get(query) {
                Some(text) => text.split_whitespace().collect::<Vec<_>>().join(" "),
                None => format!("(query id {query}; its text is gone)"),
            };
            let text: String = text.chars().take(72).collect();
            println!("  {:>6.2} per assign  {text}", *count as f64 / assigns);
        }
    }
}

/// What the load's Postgres wrote to its WAL, how often it flushed it, how many transactions its database committed
/// and how many checkpoints it began, as counted at a phase's turn.
///
/// Every commit that must be durable waits for its WAL to reach the disk, and a checkpoint (begun each time the WAL
/// grows by some half of `max_wal_size`) writes the data pages out behind it: what an assign writes, and how many
/// flushes it asks for, decide how often the disk is busy under the commits.
#[derive(Debug, Clone, Copy)]
pub(super) struct WalWritten {
    bytes: i64,
    checkpoints: i64,
    /// The WAL's fsyncs (`pg_stat_wal.wal_sync`, the whole server's; `None` before Postgres 14).
    flushes: Option<i64>,
    /// Transactions the load's database committed (`pg_stat_database.xact_commit`).
    commits: i64,
}

impl WalWritten {
    /// The WAL's position and the checkpoints begun so far (the whole server's: other databases' writes count
    /// too), its fsyncs and the load's database's commits; `None` where they cannot be read.
    pub(super) async fn read(database: &Database) -> Option<Self> {
        let sql = format!(
            "SELECT {}::bigint, (checkpoints_timed + checkpoints_req)::bigint, \
                    (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())::bigint \
               FROM pg_stat_bgwriter",
            crate::bench::WAL_WRITTEN
        );
        let (bytes, checkpoints, commits): (i64, i64, i64) =
            sqlx::query_as(&sql).fetch_one(database.any()).await.ok()?;
        let flushes = sqlx::query_scalar("SELECT wal_sync::bigint FROM pg_stat_wal")
            .fetch_one(database.any())
            .await
            .ok();
        Some(Self {
            bytes,
            checkpoints,
            flushes,
            commits,
        })
    }

    pub(super) fn since(self, earlier: Self) -> Self {
        Self {
            bytes: self.bytes - earlier.bytes,
            checkpoints: self.checkpoints - earlier.checkpoints,
            flushes: self
                .flushes
                .zip(earlier.flushes)
                .map(|(now, then)| now - then),
            commits: self.commits - earlier.commits,
        }
    }

    /// Bytes written per one of `count` things done.
    pub(super) fn bytes_per(self, count: f64) -> f64 {
        self.bytes as f64 / count.max(1.0)
    }

    pub(super) fn print(self, assigns: f64, seconds: f64) {
        println!(
            "{:<36} {:>12.0} B ({:.1} MB/s; checkpoints begun: {})",
            "WAL written per assign",
            self.bytes_per(assigns),
            self.bytes as f64 / 1e6 / seconds.max(1e-9),
            self.checkpoints
        );
        let commits = self.commits as f64 / assigns.max(1.0);
        match self.flushes {
            Some(flushes) => println!(
                "{:<36} {:>14.2} ({:.0}/s, the whole server's; transactions the load's database committed per assign: \
                 {commits:.2})",
                "WAL flushes per assign",
                flushes as f64 / assigns.max(1.0),
                flushes as f64 / seconds.max(1e-9)
            ),
            None => println!(
                "{:<36} {:>14.2}",
                "transactions committed per assign", commits
            ),
        }
    }
}

/// Every series of `name` (any labels) summed over several servers' metrics.
pub(super) fn metric_sum(texts: &[String], name: &str) -> f64 {
    texts
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| {
            let (metric, value) = line.rsplit_once(' ')?;
            let metric_name = metric.split('{').next()?;
            (metric_name == name)
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Busy CPU time, in seconds, of the whole machine, of the server and of this process (the load generator and its
/// simulated hosts), read from `/proc` (Linux); `None` where that cannot be read.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuTimes {
    pub(super) machine: f64,
    pub(super) server: f64,
    pub(super) generator: f64,
    /// The machine's busy time in the kernel (system, interrupts, soft interrupts), of `machine`.
    pub(super) kernel: f64,
    /// Context switches on the whole machine: what more processes and threads than cores cost shows here.
    pub(super) switches: f64,
}

impl CpuTimes {
    pub(super) fn read(server_pids: &[u32]) -> Option<Self> {
        let ticks = clock_ticks();
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = machine_cpu_ticks(&stat)?;
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        let busy: u64 = fields
            .iter()
            .take(8)
            .enumerate()
            .filter(|(index, _)| *index != 3 && *index != 4)
            .map(|(_, value)| value)
            .sum();
        // system, irq, softirq.
        let kernel: u64 = [2, 5, 6]
            .iter()
            .filter_map(|&index| fields.get(index))
            .sum();
        let switches = stat
            .lines()
            .find_map(|line| line.strip_prefix("ctxt "))
            .and_then(|count| count.trim().parse::<f64>().ok())?;
        Some(Self {
            machine: busy as f64 / ticks,
            kernel: kernel as f64 / ticks,
            switches,
            server: server_pids
                .iter()
                .map(|pid| Some(ProcessTicks::read(*pid)?.ticks as f64))
                .sum::<Option<f64>>()?
                / ticks,
            generator: ProcessTicks::read(std::process::id())?.ticks as f64 / ticks,
        })
    }

    pub(super) fn since(&self, earlier: &Self) -> Self {
        Self {
            machine: self.machine - earlier.machine,
            server: self.server - earlier.server,
            generator: self.generator - earlier.generator,
            kernel: self.kernel - earlier.kernel,
            switches: self.switches - earlier.switches,
        }
    }
}

/// Clock ticks per second of `/proc`'s times (`getconf CLK_TCK`, run once; 100 on Linux when that cannot run).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// How often [`Neighbours`] looks at every process: a neighbour's burst that stalls the load lasts 200-300 ms here.
const NEIGHBOUR_SAMPLE: std::time::Duration = std::time::Duration::from_millis(100);

/// The CPU the machine's other processes took while an open loop ran: neither the servers, nor the load generator
/// (and what it runs), nor the load's Postgres, but the machine's other services. Sampled from `/proc` every
/// [`NEIGHBOUR_SAMPLE`] by a thread of its own (some 90 small reads a sample), so that a second of slow answers can
/// be told apart: a neighbour's burst in it, or the load's Postgres's background work (autovacuum, a checkpoint), or
/// neither (then the cause is in the load's own work).
pub(super) struct Neighbours {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<Vec<Sample>>,
    origin: std::time::Instant,
}

/// What the machine's processes took between one look at `/proc` and the next.
struct Sample {
    at: std::time::Instant,
    /// CPU seconds of the processes outside the load, by command name.
    outside: std::collections::HashMap<String, f64>,
    /// CPU seconds of the load's Postgres's background processes, by kind (autovacuum, the checkpointer, ...).
    background: std::collections::HashMap<String, f64>,
    /// CPU seconds the machine left idle.
    idle: f64,
    /// Writes the machine's disks completed, and the milliseconds they took in all.
    disk: DiskWrites,
}

/// Writes completed by the machine's disks, and the time they took in all (`/proc/diskstats`' fifth and eighth
/// fields, summed over the disks that are devices, not loop or RAM disks). A commit waits for its WAL's write: a
/// disk whose writes slow down stalls every append while the CPU sits idle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct DiskWrites {
    writes: u64,
    milliseconds: u64,
}

impl DiskWrites {
    fn read() -> Self {
        let Ok(stats) = std::fs::read_to_string("/proc/diskstats") else {
            return Self::default();
        };
        stats
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let device = fields.get(2)?;
                std::path::Path::new(&format!("/sys/block/{device}/device"))
                    .exists()
                    .then_some(())?;
                Some(Self {
                    writes: fields.get(7)?.parse().ok()?,
                    milliseconds: fields.get(10)?.parse().ok()?,
                })
            })
            .fold(Self::default(), |sum, disk| Self {
                writes: sum.writes + disk.writes,
                milliseconds: sum.milliseconds + disk.milliseconds,
            })
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            writes: self.writes.saturating_sub(earlier.writes),
            milliseconds: self.milliseconds.saturating_sub(earlier.milliseconds),
        }
    }

    /// The mean time of a write, in milliseconds (0 without writes).
    fn mean_ms(self) -> f64 {
        self.milliseconds as f64 / self.writes.max(1) as f64
    }
}

/// One process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone)]
struct ProcessTicks {
    command: String,
    parent: u32,
    /// User plus system time, in clock ticks.
    ticks: u64,
}

impl ProcessTicks {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command (field 2) is in parentheses and may hold spaces: count the fields after its closing one
        // (state, parent, ...; user and system time are the 12th and 13th).
        let command = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        Some(Self {
            command,
            parent: fields.get(1)?.parse().ok()?,
            ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
        })
    }
}

/// Every process's ticks, by pid.
fn every_process() -> std::collections::HashMap<u32, ProcessTicks> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return std::collections::HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, ProcessTicks::read(pid)?))
        })
        .collect()
}

/// What each process of `now` took since `earlier`, in CPU seconds, beside its pid and what `now` shows of it
/// (those that took nothing left out): a process begun since counts whole, one ended since is missed.
fn spent_since<'a>(
    now: &'a std::collections::HashMap<u32, ProcessTicks>,
    earlier: &'a std::collections::HashMap<u32, ProcessTicks>,
) -> impl Iterator<Item = (u32, &'a ProcessTicks, f64)> + 'a {
    let ticks_per_second = clock_ticks();
    now.iter().filter_map(move |(pid, process)| {
        let before = earlier.get(pid).map_or(0, |earlier| earlier.ticks);
        let spent = process.ticks.saturating_sub(before);
        (spent > 0).then(|| (*pid, process, spent as f64 / ticks_per_second))
    })
}

/// The load's own processes: its servers, the load generator and the load's Postgres server (where it runs on this
/// machine), each with its children (Postgres's backends and background processes, the commands the generator
/// runs). Everything else on the machine is another process: another service's.
#[derive(Debug, Clone)]
pub(super) struct LoadProcesses {
    pids: Vec<u32>,
    postgres: Option<u32>,
}

impl LoadProcesses {
    /// The servers `server_pids`, this process, and the Postgres server behind `database`.
    pub(super) async fn find(server_pids: &[u32], database: &Database) -> Self {
        let mut pids = server_pids.to_vec();
        pids.push(std::process::id());
        let postgres = postgres_server_pid(database).await;
        pids.extend(postgres);
        Self { pids, postgres }
    }

    fn hold(&self, pid: u32, process: &ProcessTicks) -> bool {
        self.pids.contains(&pid) || self.pids.contains(&process.parent)
    }

    /// Whether `process` is one of the load's Postgres's own background processes (not a backend serving a
    /// connection).
    fn postgres_background(&self, process: &ProcessTicks) -> bool {
        self.postgres == Some(process.parent)
    }
}

/// What kind of Postgres background process `pid` is, from the title Postgres gives it (`postgres: checkpointer`,
/// `postgres: autovacuum worker`, ...); `None` for a backend serving a connection (`postgres: USER DATABASE HOST
/// ...`) or a title that cannot be read.
fn postgres_background_kind(pid: u32) -> Option<&'static str> {
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    background_kind(&String::from_utf8_lossy(&title))
}

/// The kind of Postgres background process a process title names (see [`postgres_background_kind`]).
fn background_kind(title: &str) -> Option<&'static str> {
    const KINDS: [&str; 8] = [
        "autovacuum launcher",
        "autovacuum worker",
        "checkpointer",
        "background writer",
        "walwriter",
        "logical replication launcher",
        "archiver",
        "stats collector",
    ];
    let title = title.strip_prefix("postgres: ")?;
    KINDS.into_iter().find(|kind| title.starts_with(kind))
}

/// The CPU the machine's other processes (see [`LoadProcesses`]) had taken when read, by pid: so that what the
/// machine's other services took over a phase can be told from what the load cost.
#[derive(Debug, Clone)]
pub(super) struct OtherProcesses {
    processes: std::collections::HashMap<u32, ProcessTicks>,
}

impl OtherProcesses {
    pub(super) fn read(load: &LoadProcesses) -> Self {
        Self {
            processes: every_process()
                .into_iter()
                .filter(|(pid, process)| !load.hold(*pid, process))
                .collect(),
        }
    }

    /// CPU seconds the other processes took since `earlier` (see [`spent_since`]).
    pub(super) fn since(&self, earlier: &Self) -> f64 {
        spent_since(&self.processes, &earlier.processes).fold(0.0, |sum, (_, _, spent)| sum + spent)
    }
}

/// The machine's idle and I/O-wait time, in clock ticks.
fn machine_idle_ticks() -> Option<u64> {
    let fields = machine_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
    Some(fields.get(3)? + fields.get(4)?)
}

/// The machine's CPU times, in clock ticks, from `/proc/stat`'s first line: user, nice, system, idle, iowait, irq,
/// softirq, steal, ...
fn machine_cpu_ticks(stat: &str) -> Option<Vec<u64>> {
    Some(
        stat.lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect(),
    )
}

/// The load's Postgres server process (the parent of a backend), where Postgres runs on this machine.
async fn postgres_server_pid(database: &Database) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(database.any())
        .await
        .ok()?;
    Some(ProcessTicks::read(u32::try_from(backend).ok()?)?.parent)
}

impl Neighbours {
    /// Starts sampling what the processes other than `load` take, and the load's Postgres's background processes;
    /// seconds are counted from `origin`.
    pub(super) fn sample(load: LoadProcesses, origin: std::time::Instant) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let sampler = std::thread::spawn(move || {
            let ticks_per_second = clock_ticks();
            let mut samples = Vec::new();
            // The kind of each Postgres process seen (read once: a pid keeps its kind).
            let mut kinds: std::collections::HashMap<u32, Option<&'static str>> =
                std::collections::HashMap::new();
            let mut previous = every_process();
            let mut previous_idle = machine_idle_ticks();
            let mut previous_disk = DiskWrites::read();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(NEIGHBOUR_SAMPLE);
                let now = every_process();
                let idle = machine_idle_ticks();
                let disk = DiskWrites::read();
                let mut outside = std::collections::HashMap::new();
                let mut background = std::collections::HashMap::new();
                for (pid, process, spent) in spent_since(&now, &previous) {
                    if load.postgres_background(process) {
                        if let Some(kind) = *kinds
                            .entry(pid)
                            .or_insert_with(|| postgres_background_kind(pid))
                        {
                            *background.entry(kind.to_string()).or_insert(0.0) += spent;
                        }
                    } else if !load.hold(pid, process) {
                        *outside.entry(process.command.clone()).or_insert(0.0) += spent;
                    }
                }
                samples.push(Sample {
                    at: std::time::Instant::now(),
                    outside,
                    background,
                    idle: idle
                        .zip(previous_idle)
                        .map_or(0.0, |(now, earlier)| now.saturating_sub(earlier) as f64)
                        / ticks_per_second,
                    disk: disk.since(previous_disk),
                });
                previous = now;
                previous_idle = idle;
                previous_disk = disk;
            }
            samples
        });
        Self {
            stop,
            sampler,
            origin,
        }
    }

    /// Stops sampling; what the other processes took, by second from the origin (`None` if the sampler failed).
    pub(super) fn finish(self) -> Option<NeighbourSeconds> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.sampler.join().ok()?;
        Some(NeighbourSeconds::of(&samples, self.origin))
    }
}

/// CPU seconds by name: a command, or a kind of Postgres process.
#[derive(Default)]
struct Spent(std::collections::BTreeMap<String, f64>);

impl Spent {
    fn add(&mut self, spent: &std::collections::HashMap<String, f64>) {
        for (name, seconds) in spent {
            *self.0.entry(name.clone()).or_insert(0.0) += seconds;
        }
    }

    /// The CPU seconds taken in all (the cores, over a second).
    fn total(&self) -> f64 {
        self.0.values().fold(0.0, |sum, seconds| sum + seconds)
    }

    /// What took most, with what it took, as `name 0.12`; `none` when nothing took any.
    fn busiest(&self) -> String {
        self.0
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map_or_else(
                || "none".to_string(),
                |(name, seconds)| format!("{name} {seconds:.2}"),
            )
    }
}

/// What the machine did in one second of an open loop: its samples summed.
#[derive(Default)]
struct Second {
    others: Spent,
    background: Spent,
    idle: f64,
    disk: DiskWrites,
    /// The writes of the second's sample whose writes took longest on average.
    slowest: DiskWrites,
}

/// What the machine's other processes and the load's Postgres's background processes took, what the machine left
/// idle, and what its disks wrote, in each second of an open loop.
pub(super) struct NeighbourSeconds(Vec<Second>);

impl NeighbourSeconds {
    fn of(samples: &[Sample], origin: std::time::Instant) -> Self {
        let mut seconds: Vec<Second> = Vec::new();
        for sample in samples {
            let Some(since) = sample.at.checked_duration_since(origin) else {
                continue;
            };
            let index = since.as_secs() as usize;
            if seconds.len() <= index {
                seconds.resize_with(index + 1, Second::default);
            }
            let second = &mut seconds[index];
            second.others.add(&sample.outside);
            second.background.add(&sample.background);
            second.idle += sample.idle;
            second.disk.writes += sample.disk.writes;
            second.disk.milliseconds += sample.disk.milliseconds;
            if sample.disk.mean_ms() > second.slowest.mean_ms() {
                second.slowest = sample.disk;
            }
        }
        Self(seconds)
    }

    /// The `index`th second; an empty one past the last sample.
    fn second(&self, index: usize) -> &Second {
        const NOTHING: &Second = &Second {
            others: Spent(std::collections::BTreeMap::new()),
            background: Spent(std::collections::BTreeMap::new()),
            idle: 0.0,
            disk: DiskWrites {
                writes: 0,
                milliseconds: 0,
            },
            slowest: DiskWrites {
                writes: 0,
                milliseconds: 0,
            },
        };
        self.0.get(index).unwrap_or(NOTHING)
    }

    /// Prints, by second, the other processes' cores, the load's Postgres's background cores and the machine's idle
    /// cores, and for each second in which `slow_by_second` counts at least `notable` slow answers, the busiest of
    /// each.
    pub(super) fn print(&self, slow_by_second: &[u64], notable: u64, slow: &str) {
        let by_second = |value: &dyn Fn(usize) -> f64| -> String {
            (0..slow_by_second.len())
                .map(|second| format!("{:.1}", value(second)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<36} {:>14}",
            "other processes' cores, by second",
            by_second(&|second| self.second(second).others.total())
        );
        println!(
            "{:<36} {:>14}",
            "Postgres background cores, by second",
            by_second(&|second| self.second(second).background.total())
        );
        println!(
            "{:<36} {:>14}",
            "idle cores, by second",
            by_second(&|second| self.second(second).idle)
        );
        // The slowest 100 ms rather than the second's mean: a moment of slow writes is what stalls the commits, and
        // a second's mean dilutes it.
        println!(
            "{:<36} {:>14}",
            "disk ms a write, worst 100 ms",
            by_second(&|second| self.second(second).slowest.mean_ms())
        );
        for (second, count) in slow_by_second.iter().enumerate() {
            if *count < notable.max(1) {
                continue;
            }
            let Second {
                others,
                background,
                idle,
                disk,
                slowest,
            } = self.second(second);
            println!(
                "  second {second}: {count} answers {slow}; other processes {:.2} cores (most: {}), Postgres \
                 background {:.2} (most: {}), idle {:.2}; disk writes {} at {:.2} ms, slowest {} ms at {:.2} ms",
                others.total(),
                others.busiest(),
                background.total(),
                background.busiest(),
                idle,
                disk.writes,
                disk.mean_ms(),
                NEIGHBOUR_SAMPLE.as_millis(),
                slowest.mean_ms(),
            );
        }
    }
}

/// Each series of the counter `metric` in the servers' `/metrics` answers, divided by the assigns answered.
pub(super) fn print_per_assign(
    server_metrics: &[String],
    metric: &str,
    caption: &str,
    assigned: f64,
) {
    let prefix = format!("{metric}{{");
    for line in server_metrics
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| line.starts_with(&prefix))
    {
        if let Some((series, value)) = line.rsplit_once(' ') {
            let count: f64 = value.trim().parse().unwrap_or(0.0);
            let labels = series.trim_start_matches(metric).replace('"', "");
            println!(
                "{:<36} {:>14.2}",
                format!("{caption} {labels}"),
                count / assigned
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_metric_is_read_by_its_exact_name_from_the_prometheus_text() {
        let text = "# TYPE whist_append_batch_units summary\n\
                    whist_append_batch_units{quantile=\"0.5\"} 3\n\
                    whist_append_batch_units_sum 5120\n\
                    whist_append_batch_units_count 640\n";
        assert_eq!(
            metric_value(text, "whist_append_batch_units_sum"),
            Some(5120.0)
        );
        assert_eq!(
            metric_value(text, "whist_append_batch_units_count"),
            Some(640.0)
        );
        assert_eq!(metric_value(text, "whist_append_batch_units"), None);
    }

    #[test]
    fn the_machine_s_cpu_counts_its_kernel_time_and_context_switches() {
        let before = CpuTimes::read(&[std::process::id()]).expect("/proc is readable on Linux");
        // Make the kernel switch: sleep a few times.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let after = CpuTimes::read(&[std::process::id()]).expect("/proc is readable on Linux");
        let spent = after.since(&before);
        assert!(spent.switches >= 5.0, "{spent:?}");
        assert!(
            before.kernel > 0.0 && before.kernel <= before.machine,
            "{before:?}"
        );
        assert!(
            spent.kernel >= 0.0 && spent.kernel <= spent.machine,
            "{spent:?}"
        );
    }

    #[test]
    fn every_process_is_read_with_its_parent_and_its_cpu() {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(started.elapsed());
        }
        let processes = every_process();
        let own = processes
            .get(&std::process::id())
            .expect("this process is in /proc");
        assert!(own.ticks > 0, "50 ms of CPU spent");
        assert_eq!(own.parent, std::os::unix::process::parent_id());
        assert!(processes.len() > 1, "the parent at least");
    }

    #[test]
    fn the_other_processes_cpu_is_summed_by_second_and_the_busiest_named() {
        let origin = std::time::Instant::now();
        let spent = |pairs: &[(&str, f64)]| {
            pairs
                .iter()
                .map(|(name, seconds)| (name.to_string(), *seconds))
                .collect()
        };
        let sample =
            |after_ms: u64, outside: &[(&str, f64)], background: &[(&str, f64)], idle: f64| {
                Sample {
                    at: origin + Duration::from_millis(after_ms),
                    outside: spent(outside),
                    background: spent(background),
                    idle,
                    disk: DiskWrites {
                        writes: 100,
                        milliseconds: after_ms / 10,
                    },
                }
            };
        let seconds = NeighbourSeconds::of(
            &[
                sample(100, &[("beam.smp", 0.05)], &[], 0.1),
                sample(
                    900,
                    &[("beam.smp", 0.05), ("redis-server", 0.01)],
                    &[("checkpointer", 0.01)],
                    0.1,
                ),
                sample(
                    1_100,
                    &[("mariadbd", 0.02)],
                    &[("autovacuum worker", 0.06)],
                    0.0,
                ),
                sample(1_200, &[("mariadbd", 0.03), ("beam.smp", 0.01)], &[], 0.05),
            ],
            origin,
        );
        assert!((seconds.second(0).others.total() - 0.11).abs() < 1e-9);
        assert_eq!(seconds.second(0).others.busiest(), "beam.smp 0.10");
        assert_eq!(seconds.second(1).others.busiest(), "mariadbd 0.05");
        assert_eq!(
            seconds.second(1).background.busiest(),
            "autovacuum worker 0.06"
        );
        assert!((seconds.second(1).idle - 0.05).abs() < 1e-9);
        assert_eq!(
            seconds.second(2).others.total(),
            0.0,
            "no sample in the third second"
        );
        assert_eq!(seconds.second(2).others.busiest(), "none");
        let Second {
            disk: writes,
            slowest,
            ..
        } = seconds.second(1);
        assert_eq!(
            *writes,
            DiskWrites {
                writes: 200,
                milliseconds: 230
            }
        );
        assert_eq!(
            slowest.mean_ms(),
            1.2,
            "the sample at 1.2 s: 120 ms for 100 writes"
        );
    }

    #[test]
    fn the_disks_writes_are_read_from_the_devices() {
        let disk = DiskWrites::read();
        let later = DiskWrites::read();
        assert!(later.writes >= disk.writes);
        assert_eq!(later.since(disk).writes, later.writes - disk.writes);
        assert_eq!(DiskWrites::default().mean_ms(), 0.0, "no writes, no mean");
    }

    #[test]
    fn a_postgres_background_process_is_told_from_a_backend_by_its_title() {
        assert_eq!(
            background_kind("postgres: autovacuum worker whist_load_1\0"),
            Some("autovacuum worker")
        );
        assert_eq!(
            background_kind("postgres: checkpointer "),
            Some("checkpointer")
        );
        assert_eq!(background_kind("postgres: walwriter "), Some("walwriter"));
        assert_eq!(
            background_kind("postgres: postgres whist_load_1 127.0.0.1(40312) idle"),
            None,
            "a backend serving a connection"
        );
        assert_eq!(
            background_kind("/usr/lib/postgresql/15/bin/postgres\0-D\0/tmp/data"),
            None,
            "the server itself"
        );
        assert_eq!(postgres_background_kind(std::process::id()), None);
    }

    #[test]
    fn a_metric_is_summed_over_the_servers_that_have_it() {
        let texts = [
            "whist_append_batch_units_sum 10\n".to_string(),
            "whist_append_batch_units_sum 32\n".to_string(),
            "other 1\n".to_string(),
        ];
        assert_eq!(
            metric_total(&texts, "whist_append_batch_units_sum"),
            Some(42.0)
        );
        assert_eq!(metric_total(&texts, "missing"), None);
    }
}
