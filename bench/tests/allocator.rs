//! The `*-jemalloc` modes run their worker on jemalloc, and every other mode on the system
//! allocator: the harness's own binary, started the way the harness starts a worker, reports
//! how many bytes jemalloc holds for it while it holds a 1 MiB vector.

use std::process::Command;

/// Runs the harness with `--allocator-report`, `ONCEFLOW_BENCH_ALLOCATOR` set to `value` (or
/// removed), and returns the allocator's name and the bytes jemalloc holds.
fn report(value: Option<&str>) -> (String, usize) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_onceflow-bench"));
    c.arg("--allocator-report");
    match value {
        Some(v) => c.env("ONCEFLOW_BENCH_ALLOCATOR", v),
        None => c.env_remove("ONCEFLOW_BENCH_ALLOCATOR"),
    };
    let out = c.output().expect("the harness binary runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // "allocator: <name>; jemalloc holds <n> bytes (<m> held)"
    let rest = text
        .trim()
        .strip_prefix("allocator: ")
        .unwrap_or_else(|| panic!("unexpected report: {text}"));
    let (name, rest) = rest.split_once("; jemalloc holds ").expect("report format");
    let bytes = rest
        .split_once(' ')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected report: {text}"));
    (name.to_owned(), bytes)
}

const HELD: usize = 1 << 20;

#[test]
fn jemalloc_serves_the_process_only_when_the_environment_names_it() {
    let (name, bytes) = report(Some("jemalloc"));
    assert_eq!(name, "jemalloc");
    assert!(
        bytes >= HELD,
        "jemalloc holds {bytes} bytes, not the 1 MiB vector"
    );

    for value in [None, Some("system"), Some("")] {
        let (name, bytes) = report(value);
        assert_eq!(name, "system", "{value:?}");
        // jemalloc's own statistics call initialises it, which allocates a little.
        assert!(bytes < HELD, "{value:?}: jemalloc holds {bytes} bytes");
    }
}
