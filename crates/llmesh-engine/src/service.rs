//! Serving generation requests: the interface the HTTP API talks to ([`InferenceService`]) and
//! its single-process implementation ([`LocalService`]), a fixed set of worker threads that each
//! run one request at a time over a shared, read-only model, with a bounded queue in front.
//!
//! A request's events come back over a bounded channel; when the receiver is dropped (the client
//! went away) the worker stops generating at the next token and frees the request's cache.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{Receiver as StdReceiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::chat_template::ChatTemplate;
use crate::error::Error;
use crate::generate::{GenerateRequest, Generation, LocalRunner, StepRunner, TokenEvent, generate};
use crate::model::Shard;
use crate::model_files::ModelFiles;
use crate::tokenizer::Tokenizer;

/// What the API needs to know about a served model to prepare requests.
pub struct ModelHandle {
    /// The id clients name in `model`.
    pub id: String,
    /// Unix time the model was loaded.
    pub created: u64,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Most positions a sequence may have.
    pub context_length: usize,
    /// The longest token, in characters: a text of `n` characters has at least
    /// `n / max_token_chars` tokens, which lets huge inputs be refused without tokenizing them.
    pub max_token_chars: usize,
    /// Free-form facts for `/v1/models` and the UI (architecture, format, quantization...).
    pub meta: serde_json::Value,
}

impl ModelHandle {
    /// Describes the model opened from `files`, served under `id`.
    pub fn from_files(id: &str, files: &ModelFiles) -> Self {
        let tokenizer = files.tokenizer().clone();
        let max_token_chars = (0..tokenizer.vocab_size() as u32)
            .filter_map(|i| tokenizer.id_to_token(i))
            .map(|t| t.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        let cfg = files.config();
        ModelHandle {
            id: id.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            chat_template: files.chat_template().ok(),
            eos_ids: files.eos_ids().to_vec(),
            context_length: cfg.max_position_embeddings,
            max_token_chars,
            meta: serde_json::json!({
                "architecture": cfg.arch.name(),
                "format": match files.format() {
                    crate::ModelFormat::Gguf => "gguf",
                    crate::ModelFormat::HuggingFace => "safetensors",
                },
                "layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size,
                "vocab_size": cfg.vocab_size,
                "context_length": cfg.max_position_embeddings,
                "path": files.path().display().to_string(),
            }),
            tokenizer,
        }
    }
}

/// An event of one request.
#[derive(Debug)]
pub enum JobEvent {
    /// A generated token and the text it completed.
    Token(TokenEvent),
    /// Generation finished.
    Done(Generation),
    /// Generation failed.
    Failed(Error),
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No model of that id is served.
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// Every worker is busy and the queue is full.
    #[error("the server is busy ({0} requests waiting); try again shortly")]
    Overloaded(usize),
    /// The service is shutting down or its workers are gone.
    #[error("the model is not available: {0}")]
    Unavailable(String),
}

/// One node in the topology report.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// Stable id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// `cpu`, `cuda` or `metal`.
    pub backend: String,
    /// Whether this is the node answering.
    pub is_self: bool,
    /// Memory this node may use for weights and cache.
    pub memory_budget_bytes: u64,
    /// Memory of the device.
    pub memory_total_bytes: u64,
    /// Bytes of weights it holds.
    pub weight_bytes: u64,
    /// The model and layers it holds.
    pub shards: Vec<ShardReport>,
}

/// A shard held by a node.
#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    /// Model id.
    pub model: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
    /// Layers of the model.
    pub total_layers: usize,
}

/// What `/v1/topology` reports.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyReport {
    /// Every node this node knows of, itself first.
    pub nodes: Vec<NodeReport>,
    /// Links between nodes (empty for a single node).
    pub links: Vec<serde_json::Value>,
    /// The pipeline requests take, in order (empty when the model runs whole on this node).
    pub plan: Vec<PlanHopReport>,
    /// Traffic this node sent along pipelines: `steps` and `bytes` (activations and tokens),
    /// and `answers_delivered_here`: answers the hop ending a chain sent straight to this node
    /// as a request's entry.
    pub sent: serde_json::Value,
}

/// One hop of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanHopReport {
    /// Node id.
    pub node: String,
    /// Node name.
    pub name: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// Health as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Whether requests can be served.
    pub ok: bool,
    /// Requests being generated.
    pub running: usize,
    /// Requests waiting for a worker.
    pub queued: usize,
    /// Why not ok, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Runs generation requests; implemented by a local model and (later) by a cluster pipeline.
pub trait InferenceService: Send + Sync + 'static {
    /// The models served.
    fn models(&self) -> Vec<Arc<ModelHandle>>;

    /// Queues a request; events arrive on the returned channel.
    fn submit(
        &self,
        model: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<JobEvent>, SubmitError>;

    /// Nodes, links and layers.
    fn topology(&self) -> TopologyReport;

    /// Whether the service can take requests now.
    fn health(&self) -> Health;
}

/// Makes the runner of one request: the whole model in this process, or a pipeline across
/// nodes.
pub trait RunnerFactory: Send + Sync + 'static {
    /// A runner set up for `req`.
    fn runner<'a>(&'a self, req: &GenerateRequest) -> Result<Box<dyn StepRunner + 'a>, Error>;
}

struct Job {
    req: GenerateRequest,
    events: mpsc::Sender<JobEvent>,
}

#[derive(Default)]
struct Counters {
    running: AtomicUsize,
    queued: AtomicUsize,
    alive: AtomicUsize,
}

/// A fixed set of worker threads, each generating one request at a time, behind a bounded queue.
pub struct WorkerPool {
    queue: SyncSender<Job>,
    queue_capacity: usize,
    counters: Arc<Counters>,
}

/// Events buffered per request before a slow client holds its worker back.
const EVENT_BUFFER: usize = 256;

impl WorkerPool {
    /// `workers` threads taking requests from a queue of `queue` places.
    pub fn new(
        factory: Arc<dyn RunnerFactory>,
        tokenizer: Tokenizer,
        workers: usize,
        queue: usize,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let tokenizer = Arc::new(tokenizer);
        let counters = Arc::new(Counters::default());
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let factory = factory.clone();
            let tokenizer = tokenizer.clone();
            let worker_counters = counters.clone();
            counters.alive.fetch_add(1, SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("llmesh-worker-{i}"))
                .spawn(move || worker(&rx, factory.as_ref(), &tokenizer, &worker_counters));
            if let Err(e) = spawned {
                tracing::error!("could not start worker thread: {e}");
                counters.alive.fetch_sub(1, SeqCst);
            }
        }
        WorkerPool {
            queue: tx,
            queue_capacity: queue,
            counters,
        }
    }

    /// Queues a request.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::Receiver<JobEvent>, SubmitError> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        self.counters.queued.fetch_add(1, SeqCst);
        match self.queue.try_send(Job { req, events: tx }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                self.counters.queued.fetch_sub(1, SeqCst);
                Err(SubmitError::Overloaded(self.queue_capacity))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.queued.fetch_sub(1, SeqCst);
                Err(SubmitError::Unavailable("the workers have stopped".into()))
            }
        }
    }

    /// Running and waiting requests, and whether any worker is alive.
    pub fn health(&self) -> Health {
        let alive = self.counters.alive.load(SeqCst);
        Health {
            ok: alive > 0,
            running: self.counters.running.load(SeqCst),
            queued: self.counters.queued.load(SeqCst),
            reason: (alive == 0).then(|| "no worker is running".to_string()),
        }
    }
}

fn worker(
    rx: &Mutex<StdReceiver<Job>>,
    factory: &dyn RunnerFactory,
    tokenizer: &Tokenizer,
    counters: &Counters,
) {
    struct Alive<'a>(&'a Counters);
    impl Drop for Alive<'_> {
        fn drop(&mut self) {
            self.0.alive.fetch_sub(1, SeqCst);
        }
    }
    let _alive = Alive(counters);
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        counters.queued.fetch_sub(1, SeqCst);
        if job.events.is_closed() {
            continue;
        }
        counters.running.fetch_add(1, SeqCst);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut runner = factory.runner(&job.req)?;
            generate(runner.as_mut(), tokenizer, &job.req, &mut |ev| {
                job.events
                    .blocking_send(JobEvent::Token(ev.clone()))
                    .is_ok()
            })
        }));
        counters.running.fetch_sub(1, SeqCst);
        let event = match outcome {
            Ok(Ok(g)) => JobEvent::Done(g),
            Ok(Err(e)) => JobEvent::Failed(e),
            Err(_) => JobEvent::Failed(Error::Invalid(
                "internal error while generating (see the server log)".into(),
            )),
        };
        let _ = job.events.blocking_send(event);
    }
}

struct LocalFactory(Arc<Shard>);

impl RunnerFactory for LocalFactory {
    fn runner<'a>(&'a self, req: &GenerateRequest) -> Result<Box<dyn StepRunner + 'a>, Error> {
        Ok(Box::new(LocalRunner::new(&self.0, req)?))
    }
}

/// A whole model in this process, served by a pool of worker threads.
pub struct LocalService {
    handle: Arc<ModelHandle>,
    shard: Arc<Shard>,
    pool: WorkerPool,
    node_name: String,
}

impl LocalService {
    /// Serves `shard` (all layers) with `workers` requests at once and up to `queue` waiting.
    pub fn new(
        handle: ModelHandle,
        shard: Shard,
        workers: usize,
        queue: usize,
        node_name: String,
    ) -> Self {
        let shard = Arc::new(shard);
        let pool = WorkerPool::new(
            Arc::new(LocalFactory(shard.clone())),
            handle.tokenizer.clone(),
            workers,
            queue,
        );
        LocalService {
            handle: Arc::new(handle),
            shard,
            pool,
            node_name,
        }
    }
}

impl InferenceService for LocalService {
    fn models(&self) -> Vec<Arc<ModelHandle>> {
        vec![self.handle.clone()]
    }

    fn submit(
        &self,
        model: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<JobEvent>, SubmitError> {
        if model != self.handle.id {
            return Err(SubmitError::UnknownModel(model.to_string()));
        }
        self.pool.submit(req)
    }

    fn topology(&self) -> TopologyReport {
        let cfg = self.shard.config();
        let total = crate::system::total_memory_bytes().unwrap_or(0);
        TopologyReport {
            nodes: vec![NodeReport {
                id: "local".into(),
                name: self.node_name.clone(),
                backend: "cpu".into(),
                is_self: true,
                memory_budget_bytes: total,
                memory_total_bytes: total,
                weight_bytes: self.shard.weight_bytes() as u64,
                shards: vec![ShardReport {
                    model: self.handle.id.clone(),
                    start: self.shard.range().start,
                    end: self.shard.range().end,
                    total_layers: cfg.num_layers,
                }],
            }],
            links: Vec::new(),
            plan: Vec::new(),
            sent: serde_json::json!({"steps": 0, "bytes": 0, "answers_delivered_here": 0}),
        }
    }

    fn health(&self) -> Health {
        self.pool.health()
    }
}
