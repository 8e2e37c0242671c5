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
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
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
                .map(|pid| process_ticks(*pid))
                .sum::<Option<f64>>()?
                / ticks,
            generator: process_ticks(std::process::id())? / ticks,
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

/// User plus system time of one process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn process_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after its closing one.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64)
}

/// Clock ticks per second of `/proc`'s times (`getconf CLK_TCK`; 100 on Linux when that cannot run).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// How often [`Neighbours`] looks at every process: a neighbour's burst that stalls the load lasts 200-300 ms here.
const NEIGHBOUR_SAMPLE: std::time::Duration = std::time::Duration::from_millis(100);

/// The CPU the machine's other processes took while an open loop ran: neither the servers, nor the load generator
/// (and what it runs), nor the load's Postgres, but the machine's other services. Sampled from `/proc` every
/// [`NEIGHBOUR_SAMPLE`] by a thread of its own (some 90 small reads a sample), so that a second of slow answers can
/// be told apart: a neighbour's burst in it, or none (then the cause is in the load's own processes).
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
    /// CPU seconds the machine left idle.
    idle: f64,
}

/// One process as `/proc/PID/stat` shows it.
struct ProcessTicks {
    command: String,
    parent: u32,
    /// User plus system time, in clock ticks.
    ticks: u64,
}

/// Every process's ticks, by pid.
fn every_process() -> std::collections::HashMap<u32, ProcessTicks> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return std::collections::HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let command = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
            // After the command: state, parent, ...; user and system time are the 12th and 13th.
            let fields: Vec<&str> = stat
                .get(stat.rfind(')')? + 1..)?
                .split_whitespace()
                .collect();
            let parent = fields.get(1)?.parse().ok()?;
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((
                pid,
                ProcessTicks {
                    command,
                    parent,
                    ticks,
                },
            ))
        })
        .collect()
}

/// Whether `process` (`pid`) is one of the load's processes, `load`, or a child of one (a Postgres backend, a
/// command the load generator runs): everything else on the machine is another process.
fn of_the_load(load: &[u32], pid: u32, process: &ProcessTicks) -> bool {
    load.contains(&pid) || load.contains(&process.parent)
}

/// The CPU the machine's other processes (see [`of_the_load`]) had taken when read, by pid: so that what the
/// machine's other services took over a phase can be told from what the load cost.
#[derive(Debug, Clone)]
pub(super) struct OtherProcesses {
    ticks: std::collections::HashMap<u32, u64>,
}

impl OtherProcesses {
    pub(super) fn read(load: &[u32]) -> Self {
        Self {
            ticks: every_process()
                .into_iter()
                .filter(|(pid, process)| !of_the_load(load, *pid, process))
                .map(|(pid, process)| (pid, process.ticks))
                .collect(),
        }
    }

    /// CPU seconds the other processes took since `earlier`: a process begun since counts whole, one ended since
    /// is missed.
    pub(super) fn since(&self, earlier: &Self) -> f64 {
        let ticks: u64 = self
            .ticks
            .iter()
            .map(|(pid, ticks)| ticks.saturating_sub(earlier.ticks.get(pid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / clock_ticks()
    }
}

/// The machine's idle and I/O-wait time, in clock ticks (`/proc/stat`'s first line).
fn machine_idle_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    Some(fields.get(3)? + fields.get(4)?)
}

/// The parent of `pid` (`/proc/PID/stat`'s fourth field).
pub(super) fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The load's Postgres server process (the parent of a backend), where Postgres runs on this machine.
pub(super) async fn postgres_server_pid(database: &Database) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(database.any())
        .await
        .ok()?;
    parent_pid(u32::try_from(backend).ok()?)
}

impl Neighbours {
    /// Starts sampling; `load` are the load's own processes (their children count as theirs too), and seconds are
    /// counted from `origin`.
    pub(super) fn sample(load: Vec<u32>, origin: std::time::Instant) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let sampler = std::thread::spawn(move || {
            let ticks_per_second = clock_ticks();
            let mut samples = Vec::new();
            let mut previous = every_process();
            let mut previous_idle = machine_idle_ticks();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(NEIGHBOUR_SAMPLE);
                let now = every_process();
                let idle = machine_idle_ticks();
                let mut outside = std::collections::HashMap::new();
                for (pid, process) in &now {
                    if of_the_load(&load, *pid, process) {
                        continue;
                    }
                    // A process that began since the last look spent all its time in this interval.
                    let before = previous.get(pid).map_or(0, |earlier| earlier.ticks);
                    let spent = process.ticks.saturating_sub(before);
                    if spent > 0 {
                        *outside.entry(process.command.clone()).or_insert(0.0) +=
                            spent as f64 / ticks_per_second;
                    }
                }
                samples.push(Sample {
                    at: std::time::Instant::now(),
                    outside,
                    idle: idle
                        .zip(previous_idle)
                        .map_or(0.0, |(now, earlier)| now.saturating_sub(earlier) as f64)
                        / ticks_per_second,
                });
                previous = now;
                previous_idle = idle;
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

/// What the machine's other processes took, and what it left idle, in each second of an open loop.
pub(super) struct NeighbourSeconds {
    /// CPU seconds (cores) by command name, in each second.
    outside: Vec<std::collections::HashMap<String, f64>>,
    idle: Vec<f64>,
}

impl NeighbourSeconds {
    fn of(samples: &[Sample], origin: std::time::Instant) -> Self {
        let mut seconds = Self {
            outside: Vec::new(),
            idle: Vec::new(),
        };
        for sample in samples {
            let Some(since) = sample.at.checked_duration_since(origin) else {
                continue;
            };
            let second = since.as_secs() as usize;
            if seconds.outside.len() <= second {
                seconds
                    .outside
                    .resize_with(second + 1, std::collections::HashMap::new);
                seconds.idle.resize(second + 1, 0.0);
            }
            for (command, spent) in &sample.outside {
                *seconds.outside[second]
                    .entry(command.clone())
                    .or_insert(0.0) += spent;
            }
            seconds.idle[second] += sample.idle;
        }
        seconds
    }

    /// The cores the other processes took in `second`.
    fn outside(&self, second: usize) -> f64 {
        self.outside.get(second).map_or(0.0, |commands| {
            commands.values().fold(0.0, |sum, spent| sum + spent)
        })
    }

    /// The other process that took most in `second`, with what it took.
    fn busiest(&self, second: usize) -> Option<(&str, f64)> {
        self.outside
            .get(second)?
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(command, spent)| (command.as_str(), *spent))
    }

    /// Prints the other processes' cores and the machine's idle cores by second, and for each second in which
    /// `slow_by_second` counts at least `notable` slow answers, the busiest other process.
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
            by_second(&|second| self.outside(second))
        );
        println!(
            "{:<36} {:>14}",
            "idle cores, by second",
            by_second(&|second| self.idle.get(second).copied().unwrap_or(0.0))
        );
        for (second, count) in slow_by_second.iter().enumerate() {
            if *count < notable.max(1) {
                continue;
            }
            let busiest = self.busiest(second).map_or_else(
                || "none".to_string(),
                |(command, spent)| format!("{command} {spent:.2}"),
            );
            println!(
                "  second {second}: {count} answers {slow}; other processes {:.2} cores (most: {busiest}), idle {:.2}",
                self.outside(second),
                self.idle.get(second).copied().unwrap_or(0.0),
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
        assert_eq!(Some(own.parent), parent_pid(std::process::id()));
        assert!(processes.len() > 1, "the parent at least");
    }

    #[test]
    fn the_other_processes_cpu_is_summed_by_second_and_the_busiest_named() {
        let origin = std::time::Instant::now();
        let sample = |after_ms: u64, outside: &[(&str, f64)], idle: f64| Sample {
            at: origin + Duration::from_millis(after_ms),
            outside: outside
                .iter()
                .map(|(command, spent)| (command.to_string(), *spent))
                .collect(),
            idle,
        };
        let seconds = NeighbourSeconds::of(
            &[
                sample(100, &[("beam.smp", 0.05)], 0.1),
                sample(900, &[("beam.smp", 0.05), ("redis-server", 0.01)], 0.1),
                sample(1_100, &[("mariadbd", 0.02)], 0.0),
                sample(1_200, &[("mariadbd", 0.03), ("beam.smp", 0.01)], 0.05),
            ],
            origin,
        );
        assert!((seconds.outside(0) - 0.11).abs() < 1e-9);
        assert_eq!(
            seconds.busiest(0).map(|(command, _)| command),
            Some("beam.smp")
        );
        assert_eq!(
            seconds.busiest(1).map(|(command, _)| command),
            Some("mariadbd")
        );
        assert!((seconds.idle[1] - 0.05).abs() < 1e-9);
        assert_eq!(seconds.outside(2), 0.0, "no sample in the third second");
        assert_eq!(seconds.busiest(2), None);
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
