//! Fetching Apache Kafka's broker jars from Maven Central, once, into a cache.
//!
//! Apache publishes the whole broker as `org.apache.kafka:kafka_2.13`; its runtime dependencies
//! are everything `bin/kafka-server-start.sh` puts on the classpath except a logging backend.
//! We let Maven resolve that tree (it knows about mirrors, proxies and `~/.m2/settings.xml`),
//! copy the jars into a per-version cache directory outside the repository, and mark the
//! directory complete only after the copy finished, so a crashed fetch is redone rather than
//! half-used. A file lock serialises concurrent test processes fetching the same version.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{Result, TestkitError};

/// The Apache Kafka version the testkit runs: the newest 4.x that Maven Central serves whole.
///
/// (4.4.0 is listed in Central's metadata, but its `kafka-tools-api` jar is not published
/// there, so it cannot be resolved; 4.3.1 carries the hanging-transaction fixes of 4.2.)
/// This is the one place the version is pinned; the benchmark's Kafka Streams peer reads it too.
pub const KAFKA_VERSION: &str = "4.3.1";

/// Tried when [`KAFKA_VERSION`] cannot be fetched.
pub const FALLBACK_KAFKA_VERSION: &str = "3.9.1";

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "ONCEFLOW_KAFKA_CACHE";

/// The `maven-dependency-plugin` version every Maven fetch of the project runs (the broker's
/// jars here, the benchmark's profiler agent too). Pinned so that an old Maven's default (2.8
/// on Maven 3.8) does not decide how jars are copied.
pub const MAVEN_DEPENDENCY_PLUGIN: &str = "3.8.1";

/// The broker's jars for one version, ready to be a classpath.
#[derive(Debug, Clone)]
pub(crate) struct BrokerJars {
    pub(crate) version: String,
    pub(crate) dir: PathBuf,
}

impl BrokerJars {
    /// `<dir>/*`, the form `java -cp` expands itself.
    pub(crate) fn classpath(&self) -> String {
        format!("{}/*", self.dir.display())
    }
}

/// Where the jars are cached: `$ONCEFLOW_KAFKA_CACHE`, else `$XDG_CACHE_HOME/onceflow/kafka`,
/// else `~/.cache/onceflow/kafka`, else the system temp directory.
#[must_use]
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("onceflow").join("kafka");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home)
            .join(".cache")
            .join("onceflow")
            .join("kafka");
    }
    std::env::temp_dir().join("onceflow-kafka-cache")
}

/// Returns the cached jars of `version`, fetching them first if needed; falls back to each of
/// `fallbacks` in turn when Maven cannot resolve a version.
pub(crate) fn ensure(root: &Path, version: &str, fallbacks: &[&str]) -> Result<BrokerJars> {
    let mut failures = Vec::new();
    for candidate in std::iter::once(version).chain(fallbacks.iter().copied()) {
        match ensure_version(root, candidate) {
            Ok(jars) => {
                if candidate != version {
                    tracing::warn!(
                        wanted = version,
                        using = candidate,
                        "Kafka {version} could not be fetched; using the fallback {candidate}"
                    );
                }
                return Ok(jars);
            }
            Err(MavenOutcome::Failed(tail)) => failures.push((candidate.to_owned(), tail)),
            Err(MavenOutcome::Other(e)) => return Err(e),
        }
    }
    let tried = failures
        .iter()
        .map(|(v, _)| v.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let output_tail = failures
        .into_iter()
        .map(|(v, tail)| format!("--- {v} ---\n{tail}"))
        .collect::<Vec<_>>()
        .join("\n");
    Err(TestkitError::MavenFailed {
        version: version.to_owned(),
        tried,
        cache: root.to_path_buf(),
        output_tail,
    })
}

enum MavenOutcome {
    /// Maven ran and failed: worth trying another version.
    Failed(String),
    /// Anything else: trying another version would fail the same way.
    Other(TestkitError),
}

impl From<TestkitError> for MavenOutcome {
    fn from(e: TestkitError) -> Self {
        Self::Other(e)
    }
}

fn ensure_version(root: &Path, version: &str) -> Result<BrokerJars, MavenOutcome> {
    let dir = root.join(version);
    let lib = dir.join("lib");
    let complete = dir.join(".complete");
    let jars = BrokerJars {
        version: version.to_owned(),
        dir: lib.clone(),
    };
    // Fast path: no lock, no Maven, no network.
    if complete.exists() {
        return Ok(jars);
    }

    fs::create_dir_all(&dir)
        .map_err(|e| TestkitError::io(format!("creating {}", dir.display()), e))?;
    let lock_path = root.join(format!("{version}.lock"));
    let lock = fs::File::create(&lock_path)
        .map_err(|e| TestkitError::io(format!("creating {}", lock_path.display()), e))?;
    // Another test process may be fetching the same version right now; wait for it.
    lock.lock()
        .map_err(|e| TestkitError::io(format!("locking {}", lock_path.display()), e))?;
    if complete.exists() {
        return Ok(jars);
    }

    tracing::info!(version, cache = %dir.display(), "fetching Apache Kafka jars with Maven");
    let partial = dir.join("lib.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .map_err(|e| TestkitError::io(format!("removing {}", partial.display()), e))?;
    }
    let pom = dir.join("pom.xml");
    fs::write(&pom, pom_xml(version))
        .map_err(|e| TestkitError::io(format!("writing {}", pom.display()), e))?;

    let output = Command::new("mvn")
        .arg("-B")
        .arg("-q")
        .arg("-f")
        .arg(&pom)
        .arg(format!(
            "org.apache.maven.plugins:maven-dependency-plugin:{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies"
        ))
        .arg(format!("-DoutputDirectory={}", partial.display()))
        .arg("-DincludeScope=runtime")
        .output()
        .map_err(|source| TestkitError::MavenMissing { source })?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        return Err(MavenOutcome::Failed(last_lines(&text, 30)));
    }
    let has_broker = fs::read_dir(&partial)
        .map_err(|e| TestkitError::io(format!("listing {}", partial.display()), e))?
        .filter_map(std::result::Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13-"));
    if !has_broker {
        return Err(MavenOutcome::Failed(format!(
            "Maven succeeded but {} holds no kafka_2.13 jar",
            partial.display()
        )));
    }
    if lib.exists() {
        fs::remove_dir_all(&lib)
            .map_err(|e| TestkitError::io(format!("removing {}", lib.display()), e))?;
    }
    fs::rename(&partial, &lib)
        .map_err(|e| TestkitError::io(format!("moving jars into {}", lib.display()), e))?;
    let mut marker = fs::File::create(&complete)
        .map_err(|e| TestkitError::io(format!("creating {}", complete.display()), e))?;
    writeln!(marker, "org.apache.kafka:kafka_2.13:{version}")
        .map_err(|e| TestkitError::io(format!("writing {}", complete.display()), e))?;
    tracing::info!(version, "Apache Kafka jars cached");
    Ok(jars)
}

fn pom_xml(version: &str) -> String {
    // Kafka 4 logs through log4j2 (the slf4j 1.x binding, matching the slf4j-api it pulls);
    // Kafka 3 through reload4j. Without a backend the broker runs but its log is empty, and an
    // empty log is useless exactly when a test fails.
    let logging = if version.starts_with("3.") {
        dep("org.slf4j", "slf4j-reload4j", "1.7.36") + &dep("ch.qos.reload4j", "reload4j", "1.2.25")
    } else {
        ["log4j-slf4j-impl", "log4j-core", "log4j-api"]
            .iter()
            .map(|a| dep("org.apache.logging.log4j", a, "2.25.5"))
            .collect()
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by onceflow's testkit: resolves the Apache Kafka broker's runtime classpath. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.onceflow.testkit</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{kafka}{logging}  </dependencies>
</project>
"#,
        kafka = dep("org.apache.kafka", "kafka_2.13", version),
    )
}

fn dep(group: &str, artifact: &str, version: &str) -> String {
    format!(
        "    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version></dependency>\n"
    )
}

/// The last `n` lines of `text`.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pom_picks_the_logging_backend_by_major_version() {
        let four = pom_xml("4.3.1");
        assert!(four.contains("<artifactId>kafka_2.13</artifactId><version>4.3.1</version>"));
        assert!(four.contains("log4j-slf4j-impl"));
        assert!(!four.contains("reload4j"));
        let three = pom_xml("3.9.1");
        assert!(three.contains("slf4j-reload4j"));
        assert!(!three.contains("log4j-core"));
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }
}
