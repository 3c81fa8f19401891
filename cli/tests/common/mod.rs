//! Helpers shared by the CLI's integration tests.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// A name no other test run uses.
pub fn unique(name: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{name}-{}-{t}", std::process::id())
}

/// Runs the `onceflow` binary; returns (exit code, stdout, stderr).
pub fn onceflow(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_onceflow"))
        .args(args)
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .output()
        .expect("run onceflow");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
