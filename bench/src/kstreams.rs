//! The Kafka Streams peer: `bench/kstreams/`, a Maven project built here against the broker's
//! own Kafka version, and run as a JVM child process.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::workers::BASELINE_COMMIT_INTERVAL;

/// The built application: what `java` needs to run it.
#[derive(Debug, Clone)]
pub struct KStreamsApp {
    java: PathBuf,
    classpath: String,
    /// `java -version`'s first line.
    pub java_version: String,
}

fn project_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kstreams")
}

/// Builds the application with Maven for Kafka `version` (all artifacts from Maven Central).
pub fn build(version: &str) -> anyhow::Result<KStreamsApp> {
    let dir = project_dir();
    println!("building the Kafka Streams peer (kafka-streams {version}) with Maven ...");
    let out = Command::new("mvn")
        .current_dir(&dir)
        .args(["-q", "-B", "package"])
        .arg(format!("-Dkafka.version={version}"))
        .output()
        .context("running mvn (is Maven installed?)")?;
    if !out.status.success() {
        bail!(
            "building {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let target = dir.join("target");
    let jar = target.join("onceflow-bench-kstreams.jar");
    let lib = target.join("lib");
    // The dependency plugin leaves jars of earlier builds in lib/; only this version's count.
    let stale = format!("kafka-streams-{version}.jar");
    if !lib.join(&stale).exists() {
        bail!("{} is missing after the build", lib.join(stale).display());
    }
    let mut classpath = vec![jar.display().to_string()];
    let mut deps: Vec<PathBuf> = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kafka = name.starts_with("kafka-streams-") || name.starts_with("kafka-clients-");
            name.ends_with(".jar") && (!kafka || name.ends_with(&format!("-{version}.jar")))
        })
        .collect();
    deps.sort();
    classpath.extend(deps.iter().map(|p| p.display().to_string()));
    // The same JVM the embedded broker runs on (the testkit's `$JAVA_HOME`, else `PATH`).
    let java = onceflow::testkit::KafkaOptions::single().java;
    let about = Command::new(&java)
        .arg("-version")
        .output()
        .with_context(|| format!("running {} -version", java.display()))?;
    let java_version = String::from_utf8_lossy(&about.stderr)
        .lines()
        .next()
        .unwrap_or("unknown")
        .to_owned();
    Ok(KStreamsApp {
        java,
        classpath: classpath.join(":"),
        java_version,
    })
}

impl KStreamsApp {
    /// The command that runs the application in `guarantee` (`exactly_once_v2` or
    /// `at_least_once`) with the baselines' commit interval. The JVM runs with its defaults,
    /// as a user would start it.
    pub fn command(
        &self,
        guarantee: &str,
        bootstrap: &str,
        input: &str,
        output: &str,
        application_id: &str,
    ) -> Command {
        let mut c = Command::new(&self.java);
        c.arg("-cp")
            .arg(&self.classpath)
            .arg("dev.onceflow.bench.Enrich")
            .args([guarantee, bootstrap, input, output, application_id])
            .arg(BASELINE_COMMIT_INTERVAL.as_millis().to_string());
        c
    }
}
