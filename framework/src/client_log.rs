//! What librdkafka's clients say on their own: their log lines and their error callback, routed
//! into `tracing` (log lines under target `librdkafka`).
//!
//! The error callback reports trouble librdkafka is already handling (a broker gone, a partition
//! that disappeared): the pipeline acts on the failures its own calls return, so these are
//! warnings, not errors. librdkafka repeats such a report for every partition at every retry —
//! an input topic deleted under a pipeline made it call 42 times in 0.14 s — so
//! [`ClientErrors`] logs each distinct report once per [`REPEAT_WINDOW`] and counts the
//! repeats in between instead of flooding the log.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// Routes librdkafka's log lines into `tracing` (target `librdkafka`).
pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// How long a client error, once logged, is counted rather than logged again.
///
/// Long enough that a retry loop (librdkafka retries every 0.1–1 s) logs once per window; short
/// enough that a condition that lasts still shows up in a log read minutes later.
const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// How many distinct errors are remembered at once. If all of them are within their window, a
/// new error is logged every time, as it would be without folding: a memory bound, never a
/// silent drop.
const REMEMBERED: usize = 64;

/// The error callback's reports of one client, logged at `warn` with repeats folded: the first
/// report of an error (the same error and reason text) is logged, and its repeats within
/// [`REPEAT_WINDOW`] are counted. Once the window has passed, the count is logged (field
/// `repeats_not_logged`) at the client's next report of any error, or when the client is
/// dropped, and the error is logged again if it comes again. Nothing is dropped unsaid.
#[derive(Debug)]
pub(crate) struct ClientErrors {
    /// Which client, in the message: "consumer" or "producer".
    client: &'static str,
    seen: Mutex<Folding>,
}

impl ClientErrors {
    pub(crate) fn new(client: &'static str) -> Self {
        Self {
            client,
            seen: Mutex::new(Folding::default()),
        }
    }

    /// Logs (or counts) one report of librdkafka's error callback.
    pub(crate) fn report(&self, error: &KafkaError, reason: &str) {
        let now = Instant::now();
        let (log, unsaid) = {
            let mut folding = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            let unsaid = folding.forget_expired(now);
            (folding.note(format!("{error}: {reason}"), now), unsaid)
        };
        for (report, repeats) in unsaid {
            self.log_repeats(&report, repeats);
        }
        if log {
            tracing::warn!(%error, reason, "{} client error", self.client);
        }
    }

    fn log_repeats(&self, report: &str, repeats: u64) {
        tracing::warn!(
            report,
            repeats_not_logged = repeats,
            "{} client error repeated {repeats} times after it was logged",
            self.client
        );
    }
}

impl Drop for ClientErrors {
    fn drop(&mut self) {
        let unsaid = self
            .seen
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .unsaid();
        for (report, repeats) in unsaid {
            self.log_repeats(&report, repeats);
        }
    }
}

/// The folding decisions, apart from the clock and the log so they can be tested.
#[derive(Debug, Default)]
struct Folding {
    /// Per distinct report within its window: when it was logged, and its repeats since.
    seen: HashMap<String, (Instant, u64)>,
}

impl Folding {
    /// Whether the report is to be logged now (else it is counted as a repeat).
    fn note(&mut self, report: String, now: Instant) -> bool {
        if let Some((_, repeats)) = self.seen.get_mut(&report) {
            *repeats += 1;
            return false;
        }
        if self.seen.len() < REMEMBERED {
            self.seen.insert(report, (now, 0));
        }
        true
    }

    /// Forgets the reports whose window has passed, and returns those of them that repeated,
    /// with how many times.
    fn forget_expired(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut unsaid = Vec::new();
        self.seen.retain(|report, (logged_at, repeats)| {
            let expired = now.saturating_duration_since(*logged_at) >= REPEAT_WINDOW;
            if expired && *repeats > 0 {
                unsaid.push((report.clone(), *repeats));
            }
            !expired
        });
        unsaid.sort();
        unsaid
    }

    /// The reports that repeated, with how many times; forgets every report.
    fn unsaid(&mut self) -> Vec<(String, u64)> {
        let mut unsaid: Vec<(String, u64)> = self
            .seen
            .drain()
            .filter(|(_, (_, repeats))| *repeats > 0)
            .map(|(k, (_, repeats))| (k, repeats))
            .collect();
        unsaid.sort();
        unsaid
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_report_is_logged_once_per_window_with_its_repeats_counted() {
        let mut f = Folding::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(f.note("a".into(), at(0)));
        for i in 1..=12 {
            assert!(f.forget_expired(at(i * 10)).is_empty());
            assert!(!f.note("a".into(), at(i * 10)), "repeat {i}");
        }
        // A different report is not folded into the first.
        assert!(f.note("b".into(), at(200)));
        // After the window: the 12 repeats are handed back to be logged, and the report is
        // logged again when it comes again. "b" never repeated: nothing to say for it.
        let after = at(REPEAT_WINDOW.as_millis() as u64 + 200);
        assert_eq!(f.forget_expired(after), vec![("a".to_string(), 12)]);
        assert!(f.note("a".into(), after));
        assert!(!f.note("a".into(), after));
        assert_eq!(f.unsaid(), vec![("a".to_string(), 1)]);
        assert!(f.unsaid().is_empty(), "what was said is forgotten");
    }

    #[test]
    fn past_the_memory_bound_reports_are_logged_not_dropped() {
        let mut f = Folding::default();
        let t0 = Instant::now();
        for i in 0..REMEMBERED {
            assert!(f.note(format!("r{i}"), t0));
        }
        assert!(!f.note("r0".into(), t0));
        // Every remembered report is within its window: a new one is logged, every time.
        assert!(f.forget_expired(t0).is_empty());
        assert!(f.note("new".into(), t0));
        assert!(f.note("new".into(), t0));
        // Once their windows pass they are forgotten (r0's repeat handed back to be logged),
        // and the new one is remembered.
        let later = t0 + REPEAT_WINDOW;
        assert_eq!(f.forget_expired(later), vec![("r0".to_string(), 1)]);
        assert!(f.note("new".into(), later));
        assert!(!f.note("new".into(), later));
        assert_eq!(f.seen.len(), 1);
    }

    /// The whole path, through `tracing`: 42 reports of three errors (what deleting a
    /// three-partition input topic produced) make three lines, and the dropped client says how
    /// many it folded.
    #[test]
    fn a_burst_of_repeats_makes_one_line_per_error_and_a_count_at_the_end() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let writer = {
            let lines = Arc::clone(&lines);
            move || Capture(Arc::clone(&lines))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let errors = ClientErrors::new("consumer");
            let e = KafkaError::Global(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition);
            for _ in 0..14 {
                for partition in 0..3 {
                    errors.report(&e, &format!("in [{partition}]: topic does not exist"));
                }
            }
            drop(errors);
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(
            lines[..3]
                .iter()
                .all(|l| l.contains("consumer client error"))
        );
        assert!(
            lines[3..]
                .iter()
                .all(|l| l.contains("repeated 13 times after it was logged")),
            "{lines:#?}"
        );
    }

    struct Capture(Arc<Mutex<Vec<String>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut lines = self.0.lock().unwrap();
            lines.extend(
                String::from_utf8_lossy(buf)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
