//! A measured worker process: started, watched until it says `ready`, its CPU time read at
//! that point, and finally killed and reaped with its resource usage.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A running worker.
pub struct Worker {
    child: Child,
    ready: mpsc::Receiver<Instant>,
    mode: String,
    reaped: bool,
}

impl Drop for Worker {
    /// A worker the harness gave up on (an error on the way) must not outlive it.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a worker cost from its start to its end.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User + system CPU seconds over the whole life of the process.
    pub cpu_seconds: f64,
    /// Peak resident set size, MiB (`VmHWM`).
    pub peak_rss_mib: f64,
}

impl Worker {
    /// Starts `command` with its stdout watched for the `ready` line (and otherwise passed on).
    pub fn spawn(mode: &str, mut command: Command) -> anyhow::Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        // Killed by the kernel if the harness dies, however it dies (a JVM left running
        // would skew every later measurement on the machine).
        let mut child = onceflow::testkit::spawn_tied_to_this_process(command)
            .with_context(|| format!("starting the {mode} worker"))?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let (tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == "ready" {
                    // The harness may have given up already; then nobody listens.
                    let _ = tx.send(Instant::now());
                } else {
                    println!("  | {line}");
                }
            }
        });
        Ok(Self {
            child,
            ready,
            mode: mode.to_owned(),
            reaped: false,
        })
    }

    /// Waits until the worker holds its partitions; fails if it exits first or takes longer
    /// than `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(at) = self.ready.try_recv() {
                return Ok(at);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("the {} worker was not ready within {timeout:?}", self.mode);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fails if the worker has exited (a worker runs until it is killed).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the {} worker exited early: {status}", self.mode);
        }
        Ok(())
    }

    /// The user and system CPU seconds the worker has used so far, from `/proc`.
    pub fn user_and_system_seconds_so_far(&self) -> anyhow::Result<(f64, f64)> {
        user_and_system_seconds_of(self.child.id())
    }

    /// The CPU seconds librdkafka's own threads in the worker have used so far (`None` for a
    /// worker without them: the Kafka Streams modes).
    pub fn librdkafka_seconds_so_far(&self) -> anyhow::Result<Option<f64>> {
        librdkafka_cpu_seconds_of(self.child.id())
    }

    /// The worker's peak resident set size so far (MiB): `VmHWM`, the high-water mark of its
    /// own address space. Not `wait4`'s `ru_maxrss`: Linux carries the pre-`exec` image's
    /// high-water mark — a copy of the harness, which holds the pre-loaded input — into it,
    /// and it reported the harness's 203 MiB for every Rust worker in a 1 KB run.
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .context("no VmHWM in /proc status")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb / 1024.0)
    }

    /// SIGKILLs the worker and returns what it used over its whole life (peak RSS read just
    /// before the kill).
    #[allow(unsafe_code)]
    pub fn kill(mut self) -> anyhow::Result<Usage> {
        let peak_rss_mib = self.peak_rss_mib()?;
        self.child.kill()?;
        let pid = libc::pid_t::try_from(self.child.id())?;
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, which std has not reaped (try_wait reaps only an
        // exited child, and then check_alive failed and nobody calls kill); both pointers are
        // to live locals.
        let rc = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
        if rc != pid {
            bail!("wait4 failed: {}", std::io::Error::last_os_error());
        }
        self.reaped = true;
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Usage {
            cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
            peak_rss_mib,
        })
    }
}

/// User and system CPU seconds process `pid` has used so far, from one read of
/// `/proc/<pid>/stat`. For the broker the system part tells which repeats ran in a slow phase
/// of the machine, when copying produced bytes into the page cache costs many times more per
/// byte (docs/benchmarks.md, "Limits of the method"); for a worker the user part is the
/// steadier measure of its own work.
pub fn user_and_system_seconds_of(pid: u32) -> anyhow::Result<(f64, f64)> {
    user_and_system_seconds_in(&format!("/proc/{pid}/stat"))
}

/// CPU seconds a JVM's JIT compiler threads (`C1 CompilerThread…`, `C2 CompilerThread…`)
/// have used so far, from `/proc/<pid>/task/*/`. A freshly started JVM compiles for minutes;
/// that CPU is start-up cost, not the cost of the requests it serves, and the harness reports
/// it apart (threads that have ended are not counted, so a JVM that retired compiler threads
/// under-reports; the rest of its CPU is then over-reported by as much).
pub fn jit_cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_seconds_of_threads(pid, |name| name.contains("CompilerThre"))?.unwrap_or(0.0))
}

/// CPU seconds librdkafka's own threads (named `rdk:…`: its main thread and one per broker
/// connection, which build and send the produce and fetch requests and read the answers) have
/// used so far in process `pid`; `None` when the process has no such thread (the Kafka
/// Streams modes). The rest of a Rust worker's CPU is the application's: its polling,
/// processing and producing calls.
///
/// Why the harness reports it: at 1 KB onceflow's worker used more CPU per record than the
/// at-least-once copy, and the split showed where. onceflow's own threads cost 0.5–0.8 µs per
/// record more in every repeat; librdkafka's cost the same in fast repeats and up to 2.8 µs
/// more in the slow ones (the broker's directory growing, until its delete delay was cut),
/// when its producer thread busy-polls while a partition's next batch waits behind the one
/// request in flight (docs/benchmarks-journal.md, "Investigations").
pub fn librdkafka_cpu_seconds_of(pid: u32) -> anyhow::Result<Option<f64>> {
    cpu_seconds_of_threads(pid, |name| name.starts_with("rdk:"))
}

/// CPU seconds of the threads of `pid` whose name (`/proc/<pid>/task/*/comm`) `wanted`
/// accepts, or `None` if there is none. Threads that have ended are not counted.
fn cpu_seconds_of_threads(pid: u32, wanted: impl Fn(&str) -> bool) -> anyhow::Result<Option<f64>> {
    let mut total = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread may end between the listing and the read; it is then not counted.
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if wanted(name.trim_end())
            && let Ok(seconds) = cpu_seconds_in(&dir.join("stat").to_string_lossy())
        {
            *total.get_or_insert(0.0) += seconds;
        }
    }
    Ok(total)
}

fn cpu_seconds_in(stat_path: &str) -> anyhow::Result<f64> {
    let (user, system) = user_and_system_seconds_in(stat_path)?;
    Ok(user + system)
}

fn user_and_system_seconds_in(stat_path: &str) -> anyhow::Result<(f64, f64)> {
    let stat =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    user_and_system_seconds_of_stat(&stat)
}

/// User and system CPU seconds from the text of a `/proc/<pid>/stat` file.
fn user_and_system_seconds_of_stat(stat: &str) -> anyhow::Result<(f64, f64)> {
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    let per_second = clock_ticks_per_second();
    Ok((ticks(11)? / per_second, ticks(12)? / per_second))
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_picked_by_name_and_a_process_without_them_has_none() -> anyhow::Result<()> {
        let me = std::process::id();
        // This test's own thread is named after the test (libtest names its threads so).
        let own = cpu_seconds_of_threads(me, |name| !name.is_empty())?;
        assert!(own.is_some_and(|s| s >= 0.0), "{own:?}");
        assert_eq!(
            cpu_seconds_of_threads(me, |name| name == "no such thread")?,
            None
        );
        assert_eq!(librdkafka_cpu_seconds_of(me)?, None);
        Ok(())
    }

    #[test]
    fn user_and_system_time_are_read_past_a_command_name_with_spaces_and_parentheses() {
        // utime 250 and stime 50 ticks are the 14th and 15th fields.
        let stat = "4242 (java (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 30";
        let (user, system) = user_and_system_seconds_of_stat(stat).unwrap();
        let tick = clock_ticks_per_second();
        assert_eq!((user, system), (250.0 / tick, 50.0 / tick));
        assert!(user_and_system_seconds_of_stat("4242 (java) S 1 2").is_err());
    }
}
