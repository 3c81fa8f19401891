//! [`Pipeline`]: a processor, its configuration, and the exactly-once runtime that drives it.

use std::sync::Arc;

use crate::codec::{Codec, Json};
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::processor::Processor;
use crate::shutdown::ShutdownHandle;
use crate::transaction::{RunSummary, run_worker};

/// An exactly-once consume → process → produce pipeline.
///
/// `C` is the input codec: [`Json`] by default, or any [`Codec`] through
/// [`Pipeline::with_codec`].
pub struct Pipeline<P: Processor, C = Json> {
    config: PipelineConfig,
    processor: Arc<P>,
    codec: Arc<C>,
    shutdown: ShutdownHandle,
}

impl<P: Processor, C> std::fmt::Debug for Pipeline<P, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P> Pipeline<P, Json>
where
    P: Processor,
    Json: Codec<P::Input>,
{
    /// A pipeline whose input values are decoded as JSON into `P::Input`.
    pub fn new(config: PipelineConfig, processor: P) -> Self {
        Self {
            config,
            processor: Arc::new(processor),
            codec: Arc::new(Json),
            shutdown: ShutdownHandle::new(),
        }
    }
}

impl<P: Processor, C: Codec<P::Input>> Pipeline<P, C> {
    /// Uses another input codec, e.g. [`Raw`](crate::codec::Raw) for bytes.
    pub fn with_codec<C2: Codec<P::Input>>(self, codec: C2) -> Pipeline<P, C2> {
        Pipeline {
            config: self.config,
            processor: self.processor,
            codec: Arc::new(codec),
            shutdown: self.shutdown,
        }
    }

    /// A handle that stops this pipeline (gracefully or by force) from anywhere.
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The processor (shared with the running pipeline).
    #[must_use]
    pub fn processor(&self) -> Arc<P> {
        Arc::clone(&self.processor)
    }

    /// Runs until the shutdown handle is used or a fatal error happens.
    ///
    /// The consumer, the producer and every blocking librdkafka call live on two dedicated
    /// threads (the transaction loop and its poller); processing runs as tasks on the current
    /// tokio runtime. Returns the run's
    /// figures after a graceful stop.
    pub async fn run(self) -> Result<RunSummary, Error> {
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let Self {
            config,
            processor,
            codec,
            shutdown,
        } = self;
        let name = format!("onceflow-{}", config.instance_id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let result = run_worker(processor, codec, config, runtime, shutdown);
                let _ = tx.send(result);
            })
            .map_err(|e| Error::Worker(format!("cannot start the worker thread: {e}")))?;
        rx.await
            .map_err(|_| Error::Worker("the worker thread panicked".into()))?
    }

    /// [`run`](Self::run), stopping gracefully on the first SIGINT/SIGTERM and by force on the
    /// second.
    pub async fn run_until_signal(self) -> Result<RunSummary, Error> {
        let signals = tokio::spawn(self.shutdown_handle().shutdown_on_signals());
        let result = self.run().await;
        signals.abort();
        result
    }
}
