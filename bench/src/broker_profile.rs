//! `--profile-broker DIR`: where the embedded broker's CPU goes, per mode.
//!
//! The broker shares the machine's cores with the worker, so what a mode asks of it bounds the
//! throughput as much as the worker's own CPU (docs/benchmarks.md). The broker column says how
//! much; this says on what. Around each measured throughput run the harness attaches
//! async-profiler (Maven Central's `tools.profiler:async-profiler`, unpacked once into the
//! testkit's cache) to the broker's JVM with `jcmd JVMTI.agent_load`, which samples every
//! thread once per millisecond of CPU it uses — Java, GC, JIT and kernel frames alike. The
//! stacks go to `DIR/<size>-<mode>-<repeat>.collapsed` (one line per distinct stack and its
//! sample count: the input of any flame graph tool), and each sample is sorted by what the
//! broker was doing ([`activity`]): which request a handler thread was serving, its network
//! threads, its inter-broker channel, the group coordinator, GC, JIT.
//!
//! Why not JFR: its execution sampler sees Java frames only, and samples a few threads every
//! 10–20 ms; a JFR profile of a 6 s run held a few hundred samples
//! (docs/benchmarks-journal.md). async-profiler counts CPU time, so the samples of a run are
//! its CPU milliseconds, and a category's samples over the records are CPU µs per record.
//!
//! The profiler starts before the worker and stops once the last output is visible, outside
//! the measured window: `jcmd` is itself a short-lived JVM, and its ~0.5 s of CPU would
//! otherwise compete with the run. So a profile also holds the worker's start-up (its group
//! join) and the broker's JIT, which the broker column leaves out. Its JIT row left out, a
//! profile's total has run from 15 % under the broker column to 2 % over it, mostly 3–15 %
//! under (docs/benchmarks.md, "Run it").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The async-profiler release fetched from Maven Central.
pub const ASYNC_PROFILER_VERSION: &str = "4.1";

/// Sampling interval: one sample per millisecond of a thread's CPU time.
pub const INTERVAL_MS: f64 = 1.0;

/// A ready profiler: the agent library and the `jcmd` that loads it into the broker.
#[derive(Debug)]
pub struct BrokerProfiler {
    jcmd: PathBuf,
    library: PathBuf,
    dir: PathBuf,
}

/// The agent's directory inside the async-profiler jar for this machine.
fn platform() -> anyhow::Result<&'static str> {
    match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => Ok("linux-x64"),
        ("linux", "aarch64") => Ok("linux-arm64"),
        (os, arch) => bail!("--profile-broker: async-profiler has no agent for {os}/{arch}"),
    }
}

impl BrokerProfiler {
    /// Fetches the agent (once; Maven resolves it from Central through the user's settings),
    /// finds `jcmd` beside the broker's `java`, and creates `dir`.
    ///
    /// Fails, rather than running without profiles, when any of it is missing: a run asked
    /// for profiles.
    pub fn prepare(dir: &Path, java: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
        // The broker writes the files from its own working directory: the path must be
        // absolute, and free of what would end the agent's option string.
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let shown = dir.display().to_string();
        if shown.contains([',', '\'', '"', ' ', '\n']) {
            bail!("--profile-broker {shown}: the path may not contain commas, quotes or spaces");
        }
        let platform = platform()?;
        let unpacked =
            onceflow::testkit::cache_dir().join(format!("async-profiler-{ASYNC_PROFILER_VERSION}"));
        let library = unpacked.join(platform).join("libasyncProfiler.so");
        if !library.is_file() {
            println!("fetching async-profiler {ASYNC_PROFILER_VERSION} from Maven Central ...");
            std::fs::create_dir_all(&unpacked)
                .with_context(|| format!("creating {}", unpacked.display()))?;
            // Run in the cache directory: outside a project the plugin writes its markers
            // under a literal `${project.basedir}/` in the working directory, which must not
            // be the user's checkout.
            let out = Command::new("mvn")
                .current_dir(&unpacked)
                .args(["-q", "-B"])
                .arg(format!(
                    "org.apache.maven.plugins:maven-dependency-plugin:{}:unpack",
                    onceflow::testkit::MAVEN_DEPENDENCY_PLUGIN
                ))
                .arg(format!(
                    "-Dartifact=tools.profiler:async-profiler:{ASYNC_PROFILER_VERSION}:jar"
                ))
                .arg(format!("-DoutputDirectory={}", unpacked.display()))
                .arg(format!(
                    "-Dmdep.unpack.includes={platform}/libasyncProfiler.so"
                ))
                .output()
                .context("running mvn (is Maven installed?)")?;
            if !out.status.success() || !library.is_file() {
                bail!(
                    "fetching async-profiler {ASYNC_PROFILER_VERSION} failed ({}):\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // `jcmd` comes with a JDK, not with a JRE: look beside the broker's `java` first.
        let beside = java.parent().map(|d| d.join("jcmd"));
        let jcmd = match beside {
            Some(j) if j.is_file() => j,
            _ => PathBuf::from("jcmd"),
        };
        let probe = Command::new(&jcmd).arg("-h").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            bail!(
                "--profile-broker needs `jcmd` (a JDK, not only a JRE): none beside {} or on PATH",
                java.display()
            );
        }
        Ok(Self { jcmd, library, dir })
    }

    /// Where a run's stacks go.
    pub fn file(&self, size: usize, mode: &str, repeat: usize) -> PathBuf {
        self.dir.join(format!("{size}-{mode}-{repeat}.collapsed"))
    }

    /// Starts sampling the JVM `pid`.
    pub fn start(&self, pid: u32) -> anyhow::Result<()> {
        let interval = format!("{INTERVAL_MS}ms");
        self.agent(pid, &format!("start,event=cpu,interval={interval}"))
    }

    /// Stops sampling the JVM `pid` and writes what it sampled to `file`, collapsed.
    pub fn stop(&self, pid: u32, file: &Path) -> anyhow::Result<()> {
        self.agent(pid, &format!("stop,file={},collapsed", file.display()))
    }

    /// Loads the agent into `pid` with `options` (async-profiler takes each command as a new
    /// attach of its library).
    fn agent(&self, pid: u32, options: &str) -> anyhow::Result<()> {
        // jcmd parses `key=value` words as its own arguments; single quotes keep the agent's
        // option string one argument.
        let out = Command::new(&self.jcmd)
            .arg(pid.to_string())
            .arg("JVMTI.agent_load")
            .arg(&self.library)
            .arg(format!("'{options}'"))
            .output()
            .with_context(|| format!("running {}", self.jcmd.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // jcmd exits 0 whatever the agent answered; the agent's own code is in the output.
        if !out.status.success() || !text.contains("return code: 0") {
            bail!("async-profiler `{options}` in the broker (pid {pid}) failed: {text}");
        }
        Ok(())
    }
}

/// Samples per [`activity`] in collapsed stacks (`frame;frame;…;leaf count` per line).
pub fn samples_by_activity(collapsed: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut by = BTreeMap::new();
    for (n, line) in collapsed.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (stack, count) = line
            .rsplit_once(' ')
            .with_context(|| format!("line {}: no sample count", n + 1))?;
        let count: u64 = count
            .trim()
            .parse()
            .with_context(|| format!("line {}: sample count {count:?}", n + 1))?;
        *by.entry(activity(stack).to_owned()).or_insert(0) += count;
    }
    Ok(by)
}

/// Reads a run's collapsed stacks; fails if the profiler wrote none.
pub fn read(file: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the broker profile {}", file.display()))?;
    let by = samples_by_activity(&text)?;
    if by.values().sum::<u64>() == 0 {
        bail!("the broker profile {} holds no samples", file.display());
    }
    Ok(by)
}

/// What the broker was doing in one sampled stack, by its threads' and handlers' frames.
///
/// A request handler's sample is named for the request it served (`KafkaApis.handle…`). A
/// produce to a transactional partition is appended in a callback once the transaction
/// coordinator has verified the partition (KIP-890), outside `KafkaApis`; those count as
/// produce too.
pub fn activity(stack: &str) -> &'static str {
    let has = |s: &str| stack.contains(s);
    if has("CompileBroker") || has("C2Compiler") || has("C1Compiler") {
        return "JIT compiler";
    }
    // JDK 17's GC workers are `GangWorker`s; later JDKs' `WorkerThread`s run `GCTaskThread`s.
    if has("GangWorker")
        || has("GCTaskThread")
        || has("ConcurrentGCThread")
        || has("G1ServiceThread")
        || has("VMThread")
        || has("G1YoungCollector")
    {
        return "GC and VM operations";
    }
    if has("KafkaRequestHandler.run") {
        return match handler(stack) {
            Some(request) => request,
            None if has("handleProduceAppend") || has("appendRecords") => "Produce",
            None => "request handlers, between requests",
        };
    }
    if has("network/Processor.run") || has("network/Acceptor.run") {
        return "network threads (requests in, responses out)";
    }
    if has("NodeToControllerRequestThread") {
        return "controller channel";
    }
    if has("InterBrokerSendThread") {
        return "inter-broker requests (transaction markers, write verification)";
    }
    if has("CoordinatorRuntime") || has("MultiThreadedEventProcessor") {
        return "group coordinator";
    }
    if has("DelayedOperationPurgatory") {
        return "purgatory (delayed fetches and produces)";
    }
    if has("raft") || has("Raft") || has("QuorumController") || has("metadata/") {
        return "KRaft and metadata";
    }
    "other"
}

/// The request a handler thread's stack serves, from its `KafkaApis.handle<Name>Request` frame.
fn handler(stack: &str) -> Option<&'static str> {
    const REQUESTS: [(&str, &str); 19] = [
        ("handleProduceRequest", "Produce"),
        ("handleFetchRequest", "Fetch"),
        (
            "handleAddPartitionsToTxnRequest",
            "AddPartitionsToTxn (and verification)",
        ),
        ("handleAddOffsetsToTxnRequest", "AddOffsetsToTxn"),
        ("handleTxnOffsetCommitRequest", "TxnOffsetCommit"),
        ("handleEndTxnRequest", "EndTxn"),
        ("handleWriteTxnMarkersRequest", "WriteTxnMarkers"),
        ("handleInitProducerIdRequest", "InitProducerId"),
        ("handleFindCoordinatorRequest", "FindCoordinator"),
        ("handleOffsetCommitRequest", "OffsetCommit"),
        ("handleOffsetFetchRequest", "OffsetFetch"),
        ("handleListOffsetRequest", "ListOffsets"),
        ("handleTopicMetadataRequest", "Metadata"),
        ("handleApiVersionsRequest", "ApiVersions"),
        ("handleCreateTopicsRequest", "CreateTopics, DeleteTopics"),
        ("handleDeleteTopicsRequest", "CreateTopics, DeleteTopics"),
        ("handleHeartbeatRequest", "group membership"),
        ("handleJoinGroupRequest", "group membership"),
        ("handleSyncGroupRequest", "group membership"),
    ];
    // The outermost `KafkaApis` frame that names a request: past the dispatcher
    // (`KafkaApis.handle`), and through the closures Scala names `$anonfun$handle…$3`.
    let name = stack.split(';').find_map(|frame| {
        let (_, method) = frame.split_once("KafkaApis.")?;
        let method = method.strip_prefix("$anonfun$").unwrap_or(method);
        let name = method.split('$').next().unwrap_or(method);
        (name.starts_with("handle") && name != "handle").then_some(name)
    })?;
    Some(
        REQUESTS
            .iter()
            .find(|(frame, _)| *frame == name)
            .map_or("other requests", |(_, request)| request),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Stacks as async-profiler writes them (shortened in the middle).
    const PRODUCE: &str = "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/server/KafkaApis.handle;kafka/server/KafkaApis.handleProduceRequest;kafka/server/ReplicaManager.handleProduceAppend;jbyte_disjoint_arraycopy_avx3";
    const VERIFIED_APPEND: &str = "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/server/ReplicaManager.handleProduceAppend;kafka/server/ReplicaManager.maybeSendPartitionsToTransactionCoordinator;kafka/server/ReplicaManager.appendRecords";
    const END_TXN: &str = "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/server/KafkaApis.handle;kafka/server/KafkaApis.handleEndTxnRequest;kafka/coordinator/transaction/TransactionCoordinator.handleEndTransaction";
    const ADD_PARTITIONS_LAMBDA: &str = "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/server/KafkaApis.$anonfun$handleAddPartitionsToTxnRequest$3;kafka/coordinator/transaction/TransactionCoordinator.handleVerifyPartitionsInTransaction";
    const IDLE_HANDLER: &str = "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/network/RequestChannel.receiveRequest;java/util/concurrent/ArrayBlockingQueue.poll";
    const NETWORK: &str = "java/lang/Thread.run;kafka/network/Processor.run;kafka/network/Processor.poll;org/apache/kafka/common/network/Selector.poll;sun/nio/ch/EPoll.wait;epoll_wait";
    const MARKERS: &str = "java/lang/Thread.run;org/apache/kafka/server/util/ShutdownableThread.run;org/apache/kafka/server/util/InterBrokerSendThread.doWork;org/apache/kafka/server/util/InterBrokerSendThread.pollOnce;kafka/coordinator/transaction/TransactionMarkerRequestCompletionHandler.onComplete";
    const HEARTBEAT: &str = "java/lang/Thread.run;org/apache/kafka/server/util/ShutdownableThread.run;org/apache/kafka/server/NodeToControllerRequestThread.doWork;org/apache/kafka/server/util/InterBrokerSendThread.pollOnce";
    const GC: &str = "start_thread;thread_native_entry;Thread::call_run;GangWorker::run;GangWorker::loop;G1ParScanThreadState::trim_queue_to_threshold";
    const JIT: &str = "thread_native_entry;Thread::call_run;JavaThread::thread_main_inner;CompileBroker::compiler_thread_loop;C2Compiler::compile_method";

    #[test]
    fn samples_are_named_for_the_request_or_thread_they_served() {
        assert_eq!(activity(PRODUCE), "Produce");
        assert_eq!(activity(VERIFIED_APPEND), "Produce");
        assert_eq!(activity(END_TXN), "EndTxn");
        assert_eq!(
            activity(ADD_PARTITIONS_LAMBDA),
            "AddPartitionsToTxn (and verification)"
        );
        assert_eq!(activity(IDLE_HANDLER), "request handlers, between requests");
        assert_eq!(
            activity(NETWORK),
            "network threads (requests in, responses out)"
        );
        assert_eq!(
            activity(MARKERS),
            "inter-broker requests (transaction markers, write verification)"
        );
        assert_eq!(activity(HEARTBEAT), "controller channel");
        assert_eq!(activity(GC), "GC and VM operations");
        assert_eq!(activity(JIT), "JIT compiler");
        assert_eq!(activity("start_thread;clone3"), "other");
        assert_eq!(
            activity(
                "java/lang/Thread.run;kafka/server/KafkaRequestHandler.run;kafka/server/KafkaApis.handleDescribeAclsRequest"
            ),
            "other requests"
        );
    }

    #[test]
    fn collapsed_lines_are_summed_per_activity() {
        let text = format!("{PRODUCE} 7\n{VERIFIED_APPEND} 3\n{NETWORK} 5\n\n{END_TXN} 1\n");
        let by = samples_by_activity(&text).expect("parses");
        assert_eq!(by.get("Produce"), Some(&10));
        assert_eq!(
            by.get("network threads (requests in, responses out)"),
            Some(&5)
        );
        assert_eq!(by.get("EndTxn"), Some(&1));
        assert_eq!(by.values().sum::<u64>(), 16);
    }

    #[test]
    fn a_line_without_a_count_is_an_error_not_a_zero() {
        let err = samples_by_activity("a;b;c\n").expect_err("no count");
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = samples_by_activity("a;b;c x\n").expect_err("bad count");
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }
}
