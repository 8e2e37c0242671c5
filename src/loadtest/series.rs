//! Comparing the runs of a series (`--servers 1,2,1`): each run of another count against the run of the first count
//! before it and the mean of those around it, and over a longer series the median of each ratio, with the targets.

/// What one run's closed loop came to, for comparing server counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RunSummary {
    pub(super) servers: usize,
    /// `None` when the run had no closed loop (`--rate N`).
    pub(super) closed: Option<ClosedFigures>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ClosedFigures {
    pub(super) rate: f64,
    /// Seconds of machine CPU per assign, when the machine's CPU could be read.
    pub(super) cpu_per_assign: Option<f64>,
    /// Seconds of the load generator's own CPU (with its simulated hosts) per assign: the same work whatever the
    /// number of servers, so its ratio between two runs is the machine's own drift and contention, a control.
    pub(super) generator_cpu_per_assign: Option<f64>,
    pub(super) p99_ms: f64,
    /// Share of assigns the servers decided more than once (lost their first attempt), when they counted.
    pub(super) retried: Option<f64>,
}

impl ClosedFigures {
    /// The mean of two runs' figures, as a baseline. The share retried is `self`'s: a comparison reads only the
    /// share of the run it holds against the baseline.
    fn mean_with(self, other: Self) -> Self {
        Self {
            rate: (self.rate + other.rate) / 2.0,
            cpu_per_assign: self
                .cpu_per_assign
                .zip(other.cpu_per_assign)
                .map(|(one, two)| (one + two) / 2.0),
            generator_cpu_per_assign: self
                .generator_cpu_per_assign
                .zip(other.generator_cpu_per_assign)
                .map(|(one, two)| (one + two) / 2.0),
            p99_ms: (self.p99_ms + other.p99_ms) / 2.0,
            retried: self.retried,
        }
    }
}

/// Each run of another server count against the run of the first count before it, with the scale-out targets:
/// assigns/s >= 90%, machine CPU per assign <= 1.2x, p99 <= 1.5x, assigns decided more than once <= 5%. When a
/// run of the first count follows it too (`--servers 1,2,1`), also against the mean of the two around it: a
/// machine whose speed drifts steadily across the three moves both sides of that comparison alike. When the series
/// holds two runs of another count or more (`--servers 1,2,1,2,1`), the median of each ratio over them, each run
/// against its closest baseline (the mean around it where there is one): on a machine whose speed swings from
/// one run to the next, a single pair says more about the swing than about the servers.
pub(super) fn compare_runs(runs: &[RunSummary]) -> Vec<String> {
    let Some(first) = runs.first().map(|run| run.servers) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let mut baseline: Option<&RunSummary> = None;
    let mut held: Vec<(usize, Held)> = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        if run.servers == first {
            baseline = Some(run);
            continue;
        }
        let Some(base) = baseline else { continue };
        lines.push(format!(
            "-- {} servers against {} (closed loop, back to back) --",
            run.servers, base.servers
        ));
        let (Some(one), Some(many)) = (base.closed, run.closed) else {
            lines.push("n/a: a run had no closed loop".to_string());
            continue;
        };
        let back_to_back = hold_against(&mut lines, one, many);
        let after = runs[index + 1..]
            .iter()
            .find(|later| later.servers == first)
            .and_then(|later| later.closed);
        let closest = match after {
            Some(after) => {
                lines.push(format!(
                    "-- {} servers against the mean of the runs of {} before and after it --",
                    run.servers, base.servers
                ));
                hold_against(&mut lines, one.mean_with(after), many)
            }
            None => back_to_back,
        };
        held.push((run.servers, closest));
    }
    // One summary per other count (`1,2,4,1,2,4,1` gives one for 2 and one for 4).
    let mut counts: Vec<usize> = held.iter().map(|(servers, _)| *servers).collect();
    counts.sort_unstable();
    counts.dedup();
    for servers in counts {
        let of_count: Vec<Held> = held
            .iter()
            .filter(|(count, _)| *count == servers)
            .map(|(_, held)| *held)
            .collect();
        if of_count.len() >= 2 {
            summarise_series(&mut lines, first, servers, &of_count);
        }
    }
    lines
}

/// One run held against its baseline: the ratios and whether each target held.
#[derive(Debug, Clone, Copy)]
struct Held {
    rate: f64,
    cpu: Option<f64>,
    generator_cpu: Option<f64>,
    p99: f64,
    retried: Option<f64>,
    every: bool,
}

/// The median of each ratio over a series of comparisons, with its range, each held against its target.
fn summarise_series(lines: &mut Vec<String>, first: usize, servers: usize, held: &[Held]) {
    let holds = |held: bool| if held { "holds" } else { "misses" };
    lines.push(format!(
        "-- the series: {} runs of {servers} servers, each against the mean of the runs of {first} around it (or the \
         run before it), median (lowest-highest) --",
        held.len()
    ));
    let rates: Vec<f64> = held.iter().map(|held| held.rate).collect();
    let (rate, rate_low, rate_high) = median_and_range(&rates);
    lines.push(format!(
        "{:<36} {:>6.0}% ({:.0}-{:.0}%; target >= 90%: {})",
        "assigns/s",
        100.0 * rate,
        100.0 * rate_low,
        100.0 * rate_high,
        holds(rate >= 0.9)
    ));
    let cpus: Option<Vec<f64>> = held.iter().map(|held| held.cpu).collect();
    let cpu_held = cpus.map(|cpus| {
        let (cpu, low, high) = median_and_range(&cpus);
        lines.push(format!(
            "{:<36} {:>6.2}x ({low:.2}-{high:.2}x; target <= 1.2x: {})",
            "machine CPU per assign",
            cpu,
            holds(cpu <= 1.2)
        ));
        cpu <= 1.2
    });
    if cpu_held.is_none() {
        lines.push(not_measured("machine CPU per assign"));
    }
    let generator: Option<Vec<f64>> = held.iter().map(|held| held.generator_cpu).collect();
    if let Some(generator) = generator {
        let (ratio, low, high) = median_and_range(&generator);
        lines.push(format!(
            "{:<36} {:>6.2}x ({low:.2}-{high:.2}x; control, no target)",
            "load generator's CPU per assign", ratio
        ));
    }
    let p99s: Vec<f64> = held.iter().map(|held| held.p99).collect();
    let (p99, p99_low, p99_high) = median_and_range(&p99s);
    lines.push(format!(
        "{:<36} {:>6.2}x ({p99_low:.2}-{p99_high:.2}x; target <= 1.5x: {})",
        "assign latency p99",
        p99,
        holds(p99 <= 1.5)
    ));
    let retried: Option<Vec<f64>> = held.iter().map(|held| held.retried).collect();
    let retried_held = retried.map(|retried| {
        let (share, low, high) = median_and_range(&retried);
        lines.push(format!(
            "{:<36} {:>6.1}% ({:.1}-{:.1}%; target <= 5%: {})",
            "assigns decided more than once",
            100.0 * share,
            100.0 * low,
            100.0 * high,
            holds(share <= 0.05)
        ));
        share <= 0.05
    });
    if retried_held.is_none() {
        lines.push(not_measured("assigns decided more than once"));
    }
    let on_medians =
        rate >= 0.9 && cpu_held.unwrap_or(false) && p99 <= 1.5 && retried_held.unwrap_or(false);
    lines.push(format!(
        "{:<36} {:>7} (in {} of {} runs alone)",
        "every condition, on the medians",
        if on_medians { "yes" } else { "no" },
        held.iter().filter(|held| held.every).count(),
        held.len()
    ));
}

/// The line of a ratio a run could not measure (the machine's CPU where `/proc` cannot be read; decisions made more
/// than once where the servers' metrics counted no assign).
fn not_measured(caption: &str) -> String {
    format!("{caption:<36} {:>7}", "n/a")
}

/// The median (the mean of the middle two of an even count), the lowest and the highest of `values`.
fn median_and_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some((&low, &high)) = sorted.first().zip(sorted.last()) else {
        return (0.0, 0.0, 0.0);
    };
    let middle = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    };
    (median, low, high)
}

/// The lines that hold the figures `many` against `one`, each target checked once.
fn hold_against(lines: &mut Vec<String>, one: ClosedFigures, many: ClosedFigures) -> Held {
    let rate = many.rate / one.rate.max(1e-9);
    let cpu = one
        .cpu_per_assign
        .zip(many.cpu_per_assign)
        .map(|(one, many)| many / one.max(1e-12));
    let generator_cpu = one
        .generator_cpu_per_assign
        .zip(many.generator_cpu_per_assign)
        .map(|(one, many)| many / one.max(1e-12));
    let p99 = many.p99_ms / one.p99_ms.max(1e-9);
    // Each target is checked once: its line says it, and every condition at once is all of them.
    let (rate_held, cpu_held, p99_held, retried_held) = (
        rate >= 0.9,
        cpu.map(|cpu| cpu <= 1.2),
        p99 <= 1.5,
        many.retried.map(|retried| retried <= 0.05),
    );
    let holds = |held: bool| if held { "holds" } else { "misses" };
    lines.push(format!(
        "{:<36} {:>6.0}% ({:.0}/s against {:.0}/s; target >= 90%: {})",
        "assigns/s",
        100.0 * rate,
        many.rate,
        one.rate,
        holds(rate_held)
    ));
    match cpu.zip(cpu_held) {
        Some((cpu, held)) => lines.push(format!(
            "{:<36} {:>6.2}x (target <= 1.2x: {})",
            "machine CPU per assign",
            cpu,
            holds(held)
        )),
        None => lines.push(not_measured("machine CPU per assign")),
    }
    if let Some(generator_cpu) = generator_cpu {
        lines.push(format!(
            "{:<36} {:>6.2}x (control, no target: the same work in both runs)",
            "load generator's CPU per assign", generator_cpu
        ));
    }
    lines.push(format!(
        "{:<36} {:>6.2}x (target <= 1.5x: {})",
        "assign latency p99",
        p99,
        holds(p99_held)
    ));
    match many.retried.zip(retried_held) {
        Some((retried, held)) => lines.push(format!(
            "{:<36} {:>6.1}% (target <= 5%: {})",
            "assigns decided more than once",
            100.0 * retried,
            holds(held)
        )),
        None => lines.push(not_measured("assigns decided more than once")),
    }
    let every = rate_held && cpu_held.unwrap_or(false) && p99_held && retried_held.unwrap_or(false);
    lines.push(format!(
        "{:<36} {:>7}",
        "every condition at once",
        if every { "yes" } else { "no" }
    ));
    Held {
        rate,
        cpu,
        generator_cpu,
        p99,
        retried: many.retried,
        every,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(servers: usize, rate: f64, cpu_ms: f64, p99_ms: f64, retried: f64) -> RunSummary {
        RunSummary {
            servers,
            closed: Some(ClosedFigures {
                rate,
                cpu_per_assign: Some(cpu_ms / 1000.0),
                // The generator's work per assign does not change with the servers.
                generator_cpu_per_assign: Some(0.000_1),
                p99_ms,
                retried: Some(retried),
            }),
        }
    }

    #[test]
    fn each_run_of_two_servers_is_held_against_the_run_of_one_before_it() {
        let lines = compare_runs(&[
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 950.0, 1.1, 50.0, 0.01),
            run(1, 2000.0, 0.8, 40.0, 0.0),
            run(2, 1700.0, 1.1, 50.0, 0.0),
        ]);
        let text = lines.join("\n");
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.starts_with("-- 2 servers against 1"))
                .count(),
            2,
            "{text}"
        );
        // The first pair holds every condition; the second misses on rate (85%) and CPU (1.38x). The first run of
        // two is also held against the mean of the runs around it (1,500/s, 0.9 ms): 63%, 1.22x.
        let every: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("every condition at once"))
            .map(|line| line.trim_end().rsplit(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(every, ["yes", "no", "no"], "{text}");
        assert!(
            text.contains("63% (950/s against 1500/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(
            text.contains("85% (1700/s against 2000/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(text.contains("1.38x (target <= 1.2x: misses)"), "{text}");
    }

    #[test]
    fn a_run_between_two_runs_of_one_is_also_held_against_their_mean() {
        // The machine slowed steadily: one serve went 2,000 -> 1,600/s, 0.8 -> 1.0 ms.
        let lines = compare_runs(&[
            run(1, 2000.0, 0.8, 40.0, 0.0),
            run(2, 1700.0, 1.0, 50.0, 0.01),
            run(1, 1600.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let headings: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("--"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            headings,
            [
                "-- 2 servers against 1 (closed loop, back to back) --",
                "-- 2 servers against the mean of the runs of 1 before and after it --"
            ],
            "{text}"
        );
        // Against the run before it: 85%, 1.25x; against the mean (1,800/s, 0.9 ms): 94%, 1.11x.
        assert!(
            text.contains("85% (1700/s against 2000/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(text.contains("1.25x (target <= 1.2x: misses)"), "{text}");
        assert!(
            text.contains("94% (1700/s against 1800/s; target >= 90%: holds)"),
            "{text}"
        );
        assert!(text.contains("1.11x (target <= 1.2x: holds)"), "{text}");
        assert!(text.ends_with("yes"), "{text}");
    }

    #[test]
    fn a_series_is_summed_up_by_the_median_of_each_ratio_against_the_runs_around_it() {
        // 1,2,1,2,1,2,1: the machine swings; the runs of two sit at 1,500, 1,400 and 1,700/s.
        let lines = compare_runs(&[
            run(1, 1600.0, 1.0, 40.0, 0.0),
            run(2, 1500.0, 1.1, 50.0, 0.01),
            run(1, 1400.0, 1.0, 40.0, 0.0),
            run(2, 1400.0, 1.5, 50.0, 0.002),
            run(1, 1800.0, 1.0, 40.0, 0.0),
            run(2, 1700.0, 1.15, 70.0, 0.0),
            run(1, 1800.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let summary: Vec<&str> = lines
            .iter()
            .skip_while(|line| !line.starts_with("-- the series: 3 runs of 2 servers"))
            .map(String::as_str)
            .collect();
        // Against the means around them (1,500, 1,600, 1,800/s): 100%, 88%, 94%; CPU 1.1x, 1.5x, 1.15x; p99
        // 1.25x, 1.25x, 1.75x; retried 1%, 0.2%, 0%.
        assert_eq!(summary.len(), 7, "{text}");
        assert!(
            summary[1].ends_with("94% (88-100%; target >= 90%: holds)"),
            "{text}"
        );
        assert!(
            summary[2].ends_with("1.15x (1.10-1.50x; target <= 1.2x: holds)"),
            "{text}"
        );
        assert!(
            summary[3].ends_with("1.00x (1.00-1.00x; control, no target)"),
            "{text}"
        );
        assert!(
            summary[4].ends_with("1.25x (1.25-1.75x; target <= 1.5x: holds)"),
            "{text}"
        );
        assert!(
            summary[5].ends_with("0.2% (0.0-1.0%; target <= 5%: holds)"),
            "{text}"
        );
        // Each run alone misses one condition or more but the first; the medians hold every one.
        assert!(summary[6].ends_with("yes (in 1 of 3 runs alone)"), "{text}");
    }

    #[test]
    fn a_series_of_several_counts_is_summed_up_count_by_count() {
        let lines = compare_runs(&[
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 950.0, 1.1, 50.0, 0.0),
            run(4, 700.0, 1.6, 80.0, 0.0),
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 930.0, 1.1, 50.0, 0.0),
            run(4, 720.0, 1.6, 80.0, 0.0),
            run(1, 1000.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let summaries: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("-- the series"))
            .map(|line| line.split(',').next().unwrap_or_default())
            .collect();
        assert_eq!(
            summaries,
            [
                "-- the series: 2 runs of 2 servers",
                "-- the series: 2 runs of 4 servers"
            ],
            "{text}"
        );
        assert!(
            text.contains("94% (93-95%; target >= 90%: holds)"),
            "{text}"
        );
        assert!(
            text.contains("71% (70-72%; target >= 90%: misses)"),
            "{text}"
        );
    }

    #[test]
    fn a_single_count_or_a_run_without_a_closed_loop_compares_nothing_it_cannot() {
        assert!(compare_runs(&[run(2, 1.0, 1.0, 1.0, 0.0)]).is_empty());
        let open_only = RunSummary {
            servers: 2,
            closed: None,
        };
        let lines = compare_runs(&[run(1, 1.0, 1.0, 1.0, 0.0), open_only]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with("n/a"), "{lines:?}");
    }
}
