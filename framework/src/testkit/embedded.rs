//! Real Apache Kafka brokers as child JVMs: KRaft, combined broker + controller, loopback only.
//!
//! What `bin/kafka-storage.sh format` and `bin/kafka-server-start.sh` do, without the
//! distribution tarball: the jars come from [`super::jars`], the configuration is written here,
//! and each node is a `java ... kafka.Kafka server.properties` child process whose output goes
//! to `<node dir>/server.log`.

use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use super::KafkaOptions;
use super::error::{Result, TestkitError};
use super::jars::{self, BrokerJars};

/// How many lines of a broker's log an error message carries.
const LOG_TAIL_LINES: usize = 30;

/// Prefix of every broker directory under the system temp directory.
const DIR_PREFIX: &str = "onceflow-kafka-";

/// One node of an embedded cluster.
#[derive(Debug)]
struct Node {
    id: i32,
    client_port: u16,
    controller_port: u16,
    /// The SASL listener's port, when the cluster has users (see `KafkaOptions::sasl_users`).
    sasl_port: Option<u16>,
    dir: PathBuf,
    /// `None` while the node is killed.
    process: Mutex<Option<Child>>,
}

impl Node {
    fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn properties_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    fn process(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding this lock cannot leave the Option inconsistent, so a poisoned
        // lock is still usable; we must still be able to kill the JVM from Drop.
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running embedded cluster of one or more nodes.
#[derive(Debug)]
pub(crate) struct EmbeddedCluster {
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    jars: BrokerJars,
    nodes: Vec<Node>,
    java: PathBuf,
    heap: String,
    start_timeout: Duration,
    /// Set when something went wrong that a person will want the logs for.
    keep_logs: AtomicBool,
}

impl EmbeddedCluster {
    /// Fetches jars if needed, formats and starts every node, and waits until all accept
    /// clients. Blocking: call it from a thread that may block.
    pub(crate) fn start(options: &KafkaOptions) -> Result<Self> {
        if options.nodes < 1 {
            return Err(TestkitError::Unsupported(format!(
                "an embedded cluster needs at least one node, not {}",
                options.nodes
            )));
        }
        for user in &options.sasl_users {
            user.check()?;
        }
        let java = options.java.clone();
        check_java(&java)?;
        let jars = jars::ensure(
            &options.cache_dir,
            &options.version,
            &options.fallback_versions(),
        )?;
        let parent = options.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        remove_stale_dirs(&parent);

        let root = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&parent)
            .map_err(|e| {
                TestkitError::io(
                    format!("creating the broker's directory in {}", parent.display()),
                    e,
                )
            })?;
        let root_path = root.path().to_path_buf();
        fs::write(root_path.join("owner.pid"), std::process::id().to_string())
            .map_err(|e| TestkitError::io("writing owner.pid", e))?;

        let per_node = if options.sasl_users.is_empty() { 2 } else { 3 };
        let ports = free_ports(usize::try_from(options.nodes).unwrap_or(1) * per_node)?;
        let nodes: Vec<Node> = (0..options.nodes)
            .map(|i| {
                let idx = usize::try_from(i).unwrap_or_default();
                Node {
                    id: i + 1,
                    client_port: ports[idx * per_node],
                    controller_port: ports[idx * per_node + 1],
                    sasl_port: (per_node == 3).then(|| ports[idx * per_node + 2]),
                    dir: root_path.join(format!("node-{}", i + 1)),
                    process: Mutex::new(None),
                }
            })
            .collect();

        let cluster = Self {
            root: Some(root),
            root_path,
            jars,
            nodes,
            java,
            heap: options.heap.clone(),
            start_timeout: options.start_timeout,
            keep_logs: AtomicBool::new(false),
        };
        let result = cluster.format_and_start_all(options);
        if let Err(e) = result {
            // Dropping `cluster` kills whatever did start; the logs stay for the reader.
            cluster.keep_logs.store(true, Ordering::SeqCst);
            return Err(e);
        }
        tracing::info!(
            bootstrap = %cluster.bootstrap_servers(),
            nodes = cluster.nodes.len(),
            version = %cluster.jars.version,
            dir = %cluster.root_path.display(),
            "embedded Kafka started"
        );
        Ok(cluster)
    }

    fn format_and_start_all(&self, options: &KafkaOptions) -> Result<()> {
        let voters = self
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = random_cluster_id();
        for node in &self.nodes {
            fs::create_dir_all(&node.dir)
                .map_err(|e| TestkitError::io(format!("creating {}", node.dir.display()), e))?;
            let props = server_properties(node, &voters, self.nodes.len(), options);
            fs::write(node.properties_path(), props)
                .map_err(|e| TestkitError::io("writing server.properties", e))?;
            fs::write(node.dir.join("log4j2.properties"), LOG4J2_PROPERTIES)
                .map_err(|e| TestkitError::io("writing log4j2.properties", e))?;
            fs::write(node.dir.join("log4j.properties"), LOG4J_PROPERTIES)
                .map_err(|e| TestkitError::io("writing log4j.properties", e))?;
        }
        // Formatting is one short JVM per node; run them side by side.
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|node| s.spawn(|| self.format(node, &cluster_id)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TestkitError::Unsupported(
                            "the format thread panicked".into(),
                        ))
                    })
                })
                .collect::<Result<Vec<()>>>()
        })?;
        // Every node must be launched before any is waited for: with several controllers a
        // node only opens its client port once the quorum has elected a leader.
        for node in &self.nodes {
            self.launch(node)?;
        }
        for node in &self.nodes {
            self.wait_ready(node)?;
        }
        Ok(())
    }

    fn base_command(&self, node: &Node) -> Command {
        let mut cmd = Command::new(&self.java);
        cmd.current_dir(&node.dir)
            .arg(format!("-Xmx{}", self.heap))
            .arg("-XX:+UseG1GC")
            .arg("-Djava.awt.headless=true")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                node.dir.join("log4j2.properties").display()
            ))
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                node.dir.join("log4j.properties").display()
            ))
            .arg("-cp")
            .arg(self.jars.classpath())
            .stdin(Stdio::null());
        cmd
    }

    fn format(&self, node: &Node, cluster_id: &str) -> Result<()> {
        let mut cmd = self.base_command(node);
        cmd.arg("kafka.tools.StorageTool")
            .arg("format")
            // One argument, so an id can never be mistaken for an option.
            .arg(format!("--cluster-id={cluster_id}"))
            .arg("-c")
            .arg(node.properties_path())
            .arg("--ignore-formatted");
        let output = cmd
            .output()
            .map_err(|e| TestkitError::io("running kafka.tools.StorageTool", e))?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            return Err(TestkitError::FormatFailed {
                node: node.id,
                status: output.status.to_string(),
                output_tail: jars::last_lines(&text, LOG_TAIL_LINES),
            });
        }
        Ok(())
    }

    fn launch(&self, node: &Node) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .map_err(|e| TestkitError::io(format!("opening {}", node.log_path().display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("cloning the log handle", e))?;
        let mut cmd = self.base_command(node);
        cmd.arg("kafka.Kafka")
            .arg(node.properties_path())
            .stdout(log)
            .stderr(log_err);
        let child = spawn_tied_to_this_process(cmd)
            .map_err(|e| TestkitError::io(format!("starting Kafka node {}", node.id), e))?;
        *node.process() = Some(child);
        Ok(())
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "start-up runs on a blocking thread (Kafka::start_with uses spawn_blocking)"
    )]
    fn wait_ready(&self, node: &Node) -> Result<()> {
        let started = Instant::now();
        let addr = node.client_addr();
        loop {
            if let Some(child) = node.process().as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(TestkitError::BrokerExited {
                    node: node.id,
                    status: status.to_string(),
                    log: node.log_path(),
                    log_tail: log_tail(&node.log_path()),
                });
            }
            // With a fixed port, the broker binds its client listener only once it is
            // registered and unfenced, so an accepted connection means "ready for clients".
            if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
                tracing::debug!(node = node.id, elapsed = ?started.elapsed(), "Kafka node ready");
                return Ok(());
            }
            if started.elapsed() > self.start_timeout {
                return Err(TestkitError::NotReady {
                    node: node.id,
                    address: addr.to_string(),
                    waited: started.elapsed(),
                    log: node.log_path(),
                    log_tail: log_tail(&node.log_path()),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn bootstrap_servers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The SASL listener's addresses, if the cluster has users.
    pub(crate) fn sasl_bootstrap_servers(&self) -> Option<String> {
        self.nodes
            .iter()
            .map(|n| n.sasl_port.map(|p| format!("127.0.0.1:{p}")))
            .collect::<Option<Vec<_>>>()
            .map(|addrs| addrs.join(","))
    }

    pub(crate) fn node_ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub(crate) fn version(&self) -> &str {
        &self.jars.version
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.root_path
    }

    fn node(&self, id: i32) -> Result<&Node> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            TestkitError::Unsupported(format!(
                "no node {id} in this cluster (nodes: {:?})",
                self.node_ids()
            ))
        })
    }

    pub(crate) fn log_path(&self, id: i32) -> Result<PathBuf> {
        Ok(self.node(id)?.log_path())
    }

    /// The process ids of the nodes' JVMs that are running (a killed node has none).
    pub(crate) fn process_ids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.process().as_ref().map(Child::id))
            .collect()
    }

    /// SIGKILL, like a machine losing power: no controlled shutdown, no flush.
    pub(crate) fn kill_node(&self, id: i32) -> Result<()> {
        let node = self.node(id)?;
        let mut guard = node.process();
        match guard.take() {
            Some(mut child) => {
                child
                    .kill()
                    .map_err(|e| TestkitError::io(format!("killing Kafka node {id}"), e))?;
                child
                    .wait()
                    .map_err(|e| TestkitError::io(format!("reaping Kafka node {id}"), e))?;
                tracing::info!(node = id, "Kafka node killed (SIGKILL)");
                Ok(())
            }
            None => Err(TestkitError::Unsupported(format!(
                "Kafka node {id} is not running"
            ))),
        }
    }

    /// Starts a killed node again on its old ports and data, and waits until it is ready.
    pub(crate) fn restart_node(&self, id: i32) -> Result<()> {
        let node = self.node(id)?;
        if node.process().is_some() {
            return Err(TestkitError::Unsupported(format!(
                "Kafka node {id} is running; kill it first"
            )));
        }
        let started = Instant::now();
        let result = self.launch(node).and_then(|()| self.wait_ready(node));
        if result.is_err() {
            self.keep_logs.store(true, Ordering::SeqCst);
        } else {
            tracing::info!(node = id, elapsed = ?started.elapsed(), "Kafka node restarted");
        }
        result
    }

    pub(crate) fn keep_logs(&self) {
        self.keep_logs.store(true, Ordering::SeqCst);
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut child) = node.process().take() {
                // Data is thrown away with the directory, so no graceful shutdown is needed.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let keep = self.keep_logs.load(Ordering::SeqCst) || std::thread::panicking();
        if let Some(root) = self.root.take() {
            if keep {
                let path = root.keep();
                eprintln!(
                    "onceflow testkit: kept the embedded Kafka directory (logs in node-*/server.log): {}",
                    path.display()
                );
            } else {
                let _ = root.close();
            }
        }
    }
}

fn server_properties(node: &Node, voters: &str, nodes: usize, options: &KafkaOptions) -> String {
    // Replication of the internal topics follows the cluster size: 1 node → RF 1; 3 or more →
    // RF 3 with min ISR 2, so one node can die without stopping transactions.
    let rf = nodes.min(3);
    let min_isr = if rf >= 3 { 2 } else { 1 };
    let mut p = String::new();
    let _ = write!(
        p,
        "# Written by onceflow's testkit.
process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={data}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=1
default.replication.factor={rf}
min.insync.replicas={min_isr}
unclean.leader.election.enable=false
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
log.cleaner.dedupe.buffer.size=2097152
",
        id = node.id,
        data = node.dir.join("data").display(),
    );
    match node.sasl_port {
        None => {
            let _ = write!(
                p,
                "listeners=PLAINTEXT://127.0.0.1:{bp},CONTROLLER://127.0.0.1:{cp}
advertised.listeners=PLAINTEXT://127.0.0.1:{bp}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
",
                bp = node.client_port,
                cp = node.controller_port,
            );
        }
        // A second client listener whose users authenticate with SASL/PLAIN, and ACLs enforced
        // for everyone. The PLAINTEXT listeners (clients of the testkit itself, the brokers
        // among themselves, the controllers) authenticate nobody; their principal,
        // `User:ANONYMOUS`, is the super user, so only the SASL users are held to ACLs.
        Some(sp) => {
            let users: String = options
                .sasl_users
                .iter()
                .map(|u| format!(" user_{}=\"{}\"", u.name, u.password))
                .collect();
            let _ = write!(
                p,
                "listeners=PLAINTEXT://127.0.0.1:{bp},SASL_PLAINTEXT://127.0.0.1:{sp},CONTROLLER://127.0.0.1:{cp}
advertised.listeners=PLAINTEXT://127.0.0.1:{bp},SASL_PLAINTEXT://127.0.0.1:{sp}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{users};
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:ANONYMOUS
",
                bp = node.client_port,
                cp = node.controller_port,
            );
        }
    }
    for (k, v) in &options.broker_properties {
        let _ = writeln!(p, "{k}={v}");
    }
    p
}

const LOG4J2_PROPERTIES: &str = "\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
";

const LOG4J_PROPERTIES: &str = "\
log4j.rootLogger=INFO, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.kafka.common.config.AbstractConfig=WARN
";

pub(crate) fn java_program() -> PathBuf {
    match std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join("bin").join("java"),
        None => PathBuf::from("java"),
    }
}

fn check_java(java: &Path) -> Result<()> {
    Command::new(java)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| TestkitError::JavaMissing {
            program: java.display().to_string(),
            source,
        })
        .map(|_| ())
}

/// Distinct free loopback ports. All listeners are held until every port is chosen so the same
/// port is not handed out twice; another process can still take one before the broker binds it,
/// which shows up as a clear "address in use" start-up error.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| TestkitError::io("finding free loopback ports", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| TestkitError::io("finding free loopback ports", e))
}

/// A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters), the
/// form `kafka-storage random-uuid` prints.
fn random_cluster_id() -> String {
    let mut bytes = [0u8; 16];
    let filled = fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !filled {
        // Uniqueness only matters within this machine's temp directory; time and pid suffice.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    // The first character comes from the top 6 bits of the first byte; 62 and 63 encode as '-'
    // and '_'. An id starting with '-' is read as an option by the storage tool's argument
    // parser (Kafka's own Uuid.randomUuid avoids it for the same reason): keep it a letter.
    if bytes[0] >> 2 >= 62 {
        bytes[0] &= 0x7f;
    }
    base64_url_no_pad(&bytes)
}

fn base64_url_no_pad(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => jars::last_lines(&String::from_utf8_lossy(&bytes), LOG_TAIL_LINES),
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}

/// Removes broker directories left by earlier test processes that are gone: a process-wide
/// shared broker is never dropped, so its directory outlives the process. Directories younger
/// than an hour are kept for whoever is reading their logs.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(std::result::Result::ok) {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let path = entry.path();
        let owner_alive = fs::read_to_string(path.join("owner.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if !owner_alive && old {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that the kernel kills it when this process dies, however it dies.
///
/// A broker that outlives its test process holds ports and memory forever, and a process-wide
/// shared broker is never dropped. `PR_SET_PDEATHSIG` fires when the *thread* that forked the
/// child exits, not the process, so every broker is forked from one dedicated thread that lives
/// as long as the process does. Public for harnesses that run other child processes (the
/// benchmark's workers) which must not outlive them either.
pub fn spawn_tied_to_this_process(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    set_parent_death_signal(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let spawned = std::thread::Builder::new()
            .name("onceflow-testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the spawner thread");
        }
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let unavailable = || std::io::Error::other("the testkit's spawner thread is gone");
    spawner.send((cmd, reply_tx)).map_err(|_| unavailable())?;
    reply_rx.recv().map_err(|_| unavailable())?
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and calls only `prctl`, which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_has_kafkas_uuid_form() {
        let id = random_cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(random_cluster_id(), id);
    }

    #[test]
    fn cluster_ids_never_start_with_a_dash_or_underscore() {
        for _ in 0..20_000 {
            let id = random_cluster_id();
            assert!(!id.starts_with('-') && !id.starts_with('_'), "{id}");
        }
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_url_no_pad(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_url_no_pad(b"fo"), "Zm8");
        assert_eq!(base64_url_no_pad(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).unwrap();
        let mut sorted = ports;
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6);
    }
}
