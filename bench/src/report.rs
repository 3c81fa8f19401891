//! Results: the JSON document and the markdown tables with ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::REFERENCE;
use crate::latency::LatencyRow;

/// One throughput run of one mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThroughputRow {
    pub mode: String,
    pub value_size: usize,
    /// 1-based; 0 is the warm-up round.
    pub repeat: usize,
    pub records: u64,
    /// From process start until the worker held its partitions (not in `seconds`).
    pub startup_seconds: f64,
    /// From partitions held until every output was visible to read_committed.
    pub seconds: f64,
    pub records_per_second: f64,
    /// CPU seconds (user + system) of the worker process within `seconds`.
    pub cpu_seconds: f64,
    /// Of `cpu_seconds`, in the kernel (`None` in runs from before it was recorded). The user
    /// part is the steadier figure for comparing two builds: on the benchmark's virtual
    /// machines the kernel's copies cost more in some phases of a run than in others
    /// (docs/benchmarks.md, "Limits of the method").
    #[serde(default)]
    pub cpu_system_seconds: Option<f64>,
    /// Of `cpu_seconds`, in librdkafka's own threads (`rdk:…`); the rest is the
    /// application's. `None` for the Kafka Streams modes and in runs from before it was
    /// recorded.
    #[serde(default)]
    pub cpu_librdkafka_seconds: Option<f64>,
    /// CPU seconds over the process's whole life, start-up included.
    pub cpu_seconds_total: f64,
    /// CPU seconds of the embedded broker's JVM within `seconds`, without its JIT compiler
    /// threads (`None` with an external cluster). It shares the machine with the worker, so
    /// its cost per record bounds the throughput as much as the worker's.
    #[serde(default)]
    pub broker_cpu_seconds: Option<f64>,
    /// CPU seconds of the broker JVM's JIT compiler threads within `seconds`: warm-up still
    /// going on in the broker, which competes with the worker for the cores.
    #[serde(default)]
    pub broker_jit_cpu_seconds: Option<f64>,
    /// CPU seconds the broker JVM (all its threads) spent in the kernel within `seconds`. On
    /// the benchmark's virtual machines the kernel's copy of produced bytes into the page
    /// cache costs many times more per byte in some phases of a run than in others, for every
    /// mode alike; a repeat with a high figure here ran in a slow phase (docs/benchmarks.md,
    /// "Limits of the method").
    #[serde(default)]
    pub broker_system_cpu_seconds: Option<f64>,
    /// Peak resident set size of the worker process.
    pub peak_rss_mib: f64,
    /// With `--profile-broker`: the broker's CPU samples (one per millisecond of a thread's
    /// CPU) by what it was doing, from before the worker started until the last output was
    /// visible (see [`crate::broker_profile`]). `None` in runs without it.
    #[serde(default)]
    pub broker_profile: Option<BTreeMap<String, u64>>,
}

/// Everything one run of the harness measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub kafka: String,
    pub kafka_version: String,
    /// The JVM of the Kafka Streams modes, if they ran.
    pub java: Option<String>,
    pub records: u64,
    pub repeats: usize,
    pub warmup_records: u64,
    /// Warm-up rounds (runs before this field was recorded had one).
    #[serde(default = "one")]
    pub warmup_rounds: usize,
    pub latency_seconds: f64,
    /// The latency phase's rate was set with `--latency-rate` (not half onceflow's throughput).
    #[serde(default)]
    pub latency_rate_set: bool,
    pub machine: String,
    pub throughput: Vec<ThroughputRow>,
    pub latency: Vec<LatencyRow>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

fn runs<'a>(
    rows: &'a [ThroughputRow],
    mode: &'a str,
    size: usize,
) -> impl Iterator<Item = &'a ThroughputRow> {
    rows.iter()
        .filter(move |r| r.mode == mode && r.value_size == size && r.repeat > 0)
}

/// The median throughput of `mode` at `size` over the measured repeats.
pub fn median_throughput(rows: &[ThroughputRow], mode: &str, size: usize) -> Option<f64> {
    median(
        runs(rows, mode, size)
            .map(|r| r.records_per_second)
            .collect(),
    )
}

/// `REFERENCE ÷ mode` in each measured repeat, in repeat order ("0.85, 0.71, 0.76"): the
/// two ran minutes apart in the same repeat, so the host's slower and faster phases, which
/// move a whole repeat, move both. The median of the column's ratio hides how far apart the
/// repeats were; this shows it. "–" for the reference itself, and for a repeat that lacks
/// either run.
fn paired_ratios(rows: &[ThroughputRow], mode: &str, size: usize) -> String {
    if mode == REFERENCE {
        return "–".to_owned();
    }
    let of = |m: &str| -> BTreeMap<usize, f64> {
        runs(rows, m, size)
            .map(|r| (r.repeat, r.records_per_second))
            .collect()
    };
    let (reference, this) = (of(REFERENCE), of(mode));
    let repeats: std::collections::BTreeSet<usize> =
        reference.keys().chain(this.keys()).copied().collect();
    let ratios: Vec<String> = repeats
        .iter()
        .map(|n| match (reference.get(n), this.get(n)) {
            (Some(x), Some(y)) => format!("{:.2}", x / y),
            _ => "–".to_owned(),
        })
        .collect();
    if ratios.is_empty() {
        "–".to_owned()
    } else {
        ratios.join(", ")
    }
}

/// One line about the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").map(|r| {
                r.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Where a mode's row goes in a table: in the order of [`crate::MODES`], with the
/// `--baseline` row right after the row it is the baseline of.
fn mode_order(mode: &str) -> usize {
    let at = |m: &str| crate::MODES.iter().position(|x| *x == m);
    match at(mode) {
        Some(i) => 2 * i,
        None if mode == crate::BASELINE_MODE => at(REFERENCE).map_or(usize::MAX, |i| 2 * i + 1),
        None => usize::MAX,
    }
}

/// The ratios between modes on the same allocator, for a table with `*-jemalloc` rows:
/// `onceflow-100ms-jemalloc` ÷ each other jemalloc mode (beside the same ratio on the system
/// allocator), and each jemalloc mode ÷ the same mode on the system allocator.
fn allocator_ratios(rows: &[ThroughputRow], modes: &[&str], size: usize) -> Option<String> {
    let suffix = crate::JEMALLOC_SUFFIX;
    let reference = format!("{REFERENCE}{suffix}");
    let median_of = |mode: &str| median_throughput(rows, mode, size);
    let ratio = |a: &str, b: &str| {
        median_of(a)
            .zip(median_of(b))
            .map_or("–".to_owned(), |(a, b)| format!("{:.2}", a / b))
    };
    let jemalloc: Vec<&str> = modes
        .iter()
        .copied()
        .filter(|m| m.ends_with(suffix))
        .collect();
    if jemalloc.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if modes.contains(&reference.as_str()) {
        for other in jemalloc.iter().filter(|m| **m != reference) {
            let base = other.trim_end_matches(suffix);
            parts.push(format!(
                "{reference} ÷ {other} **{}** (on the system allocator, {REFERENCE} ÷ {base}: {})",
                ratio(&reference, other),
                ratio(REFERENCE, base)
            ));
        }
    }
    let gains: Vec<String> = jemalloc
        .iter()
        .map(|m| {
            let base = m.trim_end_matches(suffix);
            format!("{base} {}", ratio(m, base))
        })
        .collect();
    parts.push(format!(
        "throughput on jemalloc ÷ on the system allocator: {}",
        gains.join(", ")
    ));
    Some(format!("Same allocator for both: {}.", parts.join("; ")))
}

fn one() -> usize {
    1
}

/// With `--profile-broker`: the broker's CPU by activity, µs per record, one column per
/// profiled mode (its samples over all its measured repeats, over their records).
fn broker_profile_table(rows: &[ThroughputRow], modes: &[&str], size: usize) -> Option<String> {
    let mut columns: Vec<(&str, BTreeMap<&str, f64>)> = Vec::new();
    for mode in modes {
        let profiled: Vec<&ThroughputRow> = runs(rows, mode, size)
            .filter(|r| r.broker_profile.is_some())
            .collect();
        let records: u64 = profiled.iter().map(|r| r.records).sum();
        if records == 0 {
            continue;
        }
        let mut per_record = BTreeMap::new();
        for (activity, samples) in profiled
            .iter()
            .filter_map(|r| r.broker_profile.as_ref())
            .flatten()
        {
            *per_record.entry(activity.as_str()).or_insert(0.0) +=
                *samples as f64 * crate::broker_profile::INTERVAL_MS * 1e3 / records as f64;
        }
        columns.push((mode, per_record));
    }
    if columns.is_empty() {
        return None;
    }
    // Each activity once.
    let mut activities: Vec<&str> = columns
        .iter()
        .flat_map(|(_, c)| c.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let most = |a: &str| {
        columns
            .iter()
            .filter_map(|(_, c)| c.get(a).copied())
            .fold(0.0, f64::max)
    };
    activities.sort_by(|a, b| most(b).total_cmp(&most(a)).then(a.cmp(b)));
    let mut out = format!(
        "#### {size} B values: the broker's CPU by activity, µs per record (`--profile-broker`; \
         from before each worker started until its last output was visible, JIT included)\n\n"
    );
    let names: Vec<&str> = columns.iter().map(|(m, _)| *m).collect();
    let _ = writeln!(out, "| activity | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(columns.len()));
    let cell = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
    for a in &activities {
        let cells: Vec<String> = columns
            .iter()
            .map(|(_, c)| cell(c.get(a).copied()))
            .collect();
        let _ = writeln!(out, "| {a} | {} |", cells.join(" | "));
    }
    let totals: Vec<String> = columns
        .iter()
        .map(|(_, c)| cell(Some(c.values().sum())))
        .collect();
    let _ = writeln!(out, "| **all** | {} |", totals.join(" | "));
    Some(out)
}

/// The markdown tables: per value size, throughput (medians, ratios) and latency.
pub fn markdown(res: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Kafka {} ({}); {}; {}; {} records per throughput run, median of {} run(s) after {} warm-up round(s) of {} records.\n",
        res.kafka_version,
        res.kafka,
        res.java.as_deref().unwrap_or("no JVM client"),
        res.machine,
        res.records,
        res.repeats,
        res.warmup_rounds,
        res.warmup_records
    );
    let mut sizes: Vec<usize> = res
        .throughput
        .iter()
        .filter(|r| r.repeat > 0)
        .map(|r| r.value_size)
        .collect();
    sizes.dedup();
    for size in sizes {
        let mut modes: Vec<&str> = Vec::new();
        for r in res
            .throughput
            .iter()
            .filter(|r| r.value_size == size && r.repeat > 0)
        {
            if !modes.contains(&r.mode.as_str()) {
                modes.push(&r.mode);
            }
        }
        modes.sort_by_key(|m| mode_order(m));
        let reference = median_throughput(&res.throughput, REFERENCE, size);
        let reference_rss = median(
            runs(&res.throughput, REFERENCE, size)
                .map(|r| r.peak_rss_mib)
                .collect(),
        );
        let _ = writeln!(out, "#### {size} B values: throughput\n");
        let _ = writeln!(
            out,
            "| mode | records/s | min – max | {REFERENCE} ÷ mode | by repeat | CPU s | CPU µs / record | of it user µs / record | of it librdkafka µs / record | broker CPU µs / record | broker JIT s | peak RSS MiB | mode RSS ÷ {REFERENCE} RSS | start-up s |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for mode in &modes {
            let rs: Vec<&ThroughputRow> = runs(&res.throughput, mode, size).collect();
            let rps = median(rs.iter().map(|r| r.records_per_second).collect()).unwrap_or(f64::NAN);
            let lo = rs
                .iter()
                .map(|r| r.records_per_second)
                .fold(f64::INFINITY, f64::min);
            let hi = rs.iter().map(|r| r.records_per_second).fold(0.0, f64::max);
            let cpu = median(rs.iter().map(|r| r.cpu_seconds).collect()).unwrap_or(f64::NAN);
            let user = median(
                rs.iter()
                    .filter_map(|r| r.cpu_system_seconds.map(|sys| r.cpu_seconds - sys))
                    .collect(),
            );
            let librdkafka = median(rs.iter().filter_map(|r| r.cpu_librdkafka_seconds).collect());
            let rss = median(rs.iter().map(|r| r.peak_rss_mib).collect()).unwrap_or(f64::NAN);
            let broker = median(rs.iter().filter_map(|r| r.broker_cpu_seconds).collect());
            let jit = median(rs.iter().filter_map(|r| r.broker_jit_cpu_seconds).collect());
            let start = median(rs.iter().map(|r| r.startup_seconds).collect()).unwrap_or(f64::NAN);
            let records = rs.first().map_or(1, |r| r.records) as f64;
            // CPU seconds as µs per record, "–" where the run did not record them.
            let per_record = |s: Option<f64>| {
                s.map_or("–".to_owned(), |s| format!("{:.1}", s * 1e6 / records))
            };
            let ratio = reference.map_or("–".to_owned(), |x| format!("{:.2}", x / rps));
            let by_repeat = paired_ratios(&res.throughput, mode, size);
            let rss_ratio = reference_rss.map_or("–".to_owned(), |x| format!("{:.1}", rss / x));
            let _ = writeln!(
                out,
                "| {mode} | {rps:.0} | {lo:.0} – {hi:.0} | {ratio} | {by_repeat} | {cpu:.1} | {:.1} | {} | {} | {} | {} | {rss:.0} | {rss_ratio} | {start:.1} |",
                cpu * 1e6 / records,
                per_record(user),
                per_record(librdkafka),
                per_record(broker),
                jit.map_or("–".to_owned(), |j| format!("{j:.1}"))
            );
        }
        if let Some(line) = allocator_ratios(&res.throughput, &modes, size) {
            let _ = writeln!(out, "\n{line}");
        }
        if let Some(table) = broker_profile_table(&res.throughput, &modes, size) {
            let _ = write!(out, "\n{table}");
        }
        let lat: Vec<&LatencyRow> = res
            .latency
            .iter()
            .filter(|l| l.value_size == size)
            .collect();
        if let Some(first) = lat.first() {
            let _ = writeln!(
                out,
                "\n#### {size} B values: end-to-end latency at {:.0} records/s ({}), {} s per mode\n",
                first.rate,
                if res.latency_rate_set {
                    "set with --latency-rate".to_owned()
                } else {
                    format!("half {REFERENCE}'s throughput")
                },
                res.latency_seconds
            );
            let _ = writeln!(
                out,
                "| mode | p50 ms | p99 ms | p99.9 ms | max ms | outputs seen / produced |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
            let mut lat = lat.clone();
            lat.sort_by_key(|l| mode_order(&l.mode));
            for l in lat {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} / {} |",
                    l.mode, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.received, l.produced
                );
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &str, repeat: usize, rps: f64, rss: f64) -> ThroughputRow {
        ThroughputRow {
            mode: mode.to_owned(),
            value_size: 100,
            repeat,
            records: 1_000,
            startup_seconds: 0.5,
            seconds: 1_000.0 / rps,
            records_per_second: rps,
            cpu_seconds: 0.25,
            cpu_system_seconds: Some(0.05),
            cpu_librdkafka_seconds: (mode != "kstreams-eos-v2").then_some(0.1),
            cpu_seconds_total: 0.5,
            broker_cpu_seconds: Some(0.5),
            broker_jit_cpu_seconds: Some(0.1),
            broker_system_cpu_seconds: Some(0.2),
            peak_rss_mib: rss,
            broker_profile: None,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts_and_none_when_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn jemalloc_rows_are_compared_with_each_other_and_with_their_system_allocator_rows() {
        let rows = vec![
            row(REFERENCE, 1, 150.0, 10.0),
            row("at-least-once", 1, 200.0, 10.0),
            row("onceflow-100ms-jemalloc", 1, 180.0, 10.0),
            row("at-least-once-jemalloc", 1, 200.0, 10.0),
        ];
        let modes = [
            "at-least-once",
            REFERENCE,
            "at-least-once-jemalloc",
            "onceflow-100ms-jemalloc",
        ];
        let line = allocator_ratios(&rows, &modes, 100).expect("jemalloc rows");
        assert_eq!(
            line,
            "Same allocator for both: onceflow-100ms-jemalloc ÷ at-least-once-jemalloc **0.90** \
             (on the system allocator, onceflow-100ms ÷ at-least-once: 0.75); throughput on \
             jemalloc ÷ on the system allocator: at-least-once 1.00, onceflow-100ms 1.20."
        );
        assert_eq!(allocator_ratios(&rows, &modes[..2], 100), None);
    }

    #[test]
    fn broker_profiles_are_summed_over_repeats_per_record_and_missing_cells_are_dashes() {
        let profiled = |mode: &str, repeat: usize, samples: &[(&str, u64)]| ThroughputRow {
            broker_profile: Some(samples.iter().map(|(a, n)| ((*a).to_owned(), *n)).collect()),
            ..row(mode, repeat, 100.0, 10.0)
        };
        let rows = vec![
            // The warm-up round's profile (none is taken; were it there) is not counted.
            profiled(REFERENCE, 0, &[("Produce", 1_000_000)]),
            profiled(REFERENCE, 1, &[("Produce", 100), ("Fetch", 50)]),
            profiled(REFERENCE, 2, &[("Produce", 100), ("Fetch", 50)]),
            profiled("at-least-once", 1, &[("Produce", 80)]),
            row("ceiling", 1, 100.0, 10.0),
        ];
        let table = broker_profile_table(&rows, &["ceiling", "at-least-once", REFERENCE], 100)
            .expect("profiled rows");
        // 200 samples of 1 ms over 2 × 1,000 records: 100 µs a record.
        assert!(
            table.contains("| activity | at-least-once | onceflow-100ms |"),
            "{table}"
        );
        assert!(table.contains("| Produce | 80.00 | 100.00 |"), "{table}");
        assert!(table.contains("| Fetch | – | 50.00 |"), "{table}");
        assert!(table.contains("| **all** | 80.00 | 150.00 |"), "{table}");
        // The rows with the most first.
        assert!(table.find("| Produce").unwrap() < table.find("| Fetch").unwrap());
        assert_eq!(broker_profile_table(&rows[4..], &["ceiling"], 100), None);
    }

    #[test]
    fn ratios_by_repeat_pair_each_repeat_with_the_references_same_repeat() {
        let rows = vec![
            row(REFERENCE, 0, 1.0, 10.0),
            row("at-least-once", 0, 1_000.0, 10.0),
            row(REFERENCE, 1, 90.0, 10.0),
            row("at-least-once", 1, 100.0, 10.0),
            row(REFERENCE, 2, 150.0, 10.0),
            row("at-least-once", 2, 120.0, 10.0),
            row(REFERENCE, 3, 80.0, 10.0),
        ];
        // Repeat 1 is slower for both: 0.90; repeat 2 faster: 1.25; repeat 3 lacks one run.
        assert_eq!(paired_ratios(&rows, "at-least-once", 100), "0.90, 1.25, –");
        assert_eq!(paired_ratios(&rows, REFERENCE, 100), "–");
        assert_eq!(paired_ratios(&rows, "ceiling", 100), "–, –, –");
        assert_eq!(paired_ratios(&rows, "at-least-once", 1024), "–");
    }

    #[test]
    fn the_baseline_row_follows_its_reference() {
        let mut modes = vec![crate::BASELINE_MODE, "kstreams-alo", REFERENCE, "ceiling"];
        modes.sort_by_key(|m| mode_order(m));
        assert_eq!(
            modes,
            vec!["ceiling", REFERENCE, crate::BASELINE_MODE, "kstreams-alo"]
        );
    }

    #[test]
    fn the_warm_up_round_is_not_counted_and_ratios_divide_the_reference_by_the_mode() {
        let rows = vec![
            row(REFERENCE, 0, 1.0, 10.0),
            row(REFERENCE, 1, 200.0, 10.0),
            row(REFERENCE, 2, 100.0, 10.0),
            row(REFERENCE, 3, 300.0, 10.0),
            row("kstreams-eos-v2", 1, 50.0, 400.0),
        ];
        assert_eq!(median_throughput(&rows, REFERENCE, 100), Some(200.0));
        let md = markdown(&Results {
            kafka: "k".into(),
            kafka_version: "v".into(),
            java: None,
            records: 1_000,
            repeats: 3,
            warmup_records: 10,
            warmup_rounds: 1,
            latency_seconds: 0.0,
            latency_rate_set: false,
            machine: "m".into(),
            throughput: rows,
            latency: Vec::new(),
        });
        // 200 / 50 = 4.00 times the throughput; 400 / 10 = 40.0 times the memory. By
        // repeat: 200 / 50 in the first; the other two have no kstreams run.
        assert!(
            md.contains("| kstreams-eos-v2 | 50 | 50 – 50 | 4.00 | 4.00, –, – |"),
            "{md}"
        );
        assert!(
            md.contains(&format!("| {REFERENCE} | 200 | 100 – 300 | 1.00 | – |")),
            "{md}"
        );
        assert!(md.contains("| 400 | 40.0 |"), "{md}");
        // 0.25 s of CPU over 1,000 records, 0.05 s of it in the kernel and 0.1 s in
        // librdkafka's threads: 250 µs a record, 200 of them in user mode, 100 in librdkafka.
        assert!(md.contains("| 0.2 | 250.0 | 200.0 | 100.0 |"), "{md}");
        // A JVM worker has no librdkafka threads.
        assert!(md.contains("| 0.2 | 250.0 | 200.0 | – |"), "{md}");
    }
}
