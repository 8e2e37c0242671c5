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
