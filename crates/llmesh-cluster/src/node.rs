//! A node: the network, what it knows of its peers, the plan it computes from that, and the
//! layers it loads for the plan. Every node runs the same code; any node can take requests.
//!
//! Planning is deterministic: each node collects the live nodes that hold the same model (itself
//! included) with the capabilities they advertise, waits until that set has been stable for a
//! moment, and runs the partitioner. Nodes that see the same cluster compute the same plan, so
//! each loads exactly its own layers, and entry nodes send requests along that plan.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use llmesh_engine::head::SequenceHead;
use llmesh_engine::service::{ModelHandle, WorkerPool};
use llmesh_engine::{KvCache, LayerRange, ModelFiles, Shard};
use tokio::sync::watch;

use crate::key::ClusterKey;
use crate::net::{self, NetClient, NetConfig, NetEvent};
use crate::partition::{self, ModelSpec, NodeSpec, Plan, Strategy};
use crate::pipeline::Answer;
use crate::topology::Topology;
use crate::wire::{CtlRequest, CtlResponse, ModelAdvert, NodeInfo, WireDtype};

/// How a node is set up.
pub struct NodeConfig {
    /// The model's files.
    pub files: Arc<ModelFiles>,
    /// What the API serves it as.
    pub handle: ModelHandle,
    /// The node's data directory (identity, cluster key, cached measurements).
    pub data_dir: PathBuf,
    /// The node's identity.
    pub keypair: Keypair,
    /// The cluster key.
    pub cluster_key: ClusterKey,
    /// Peer-to-peer listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial (other subnets, VPNs, or no mDNS).
    pub peers: Vec<Multiaddr>,
    /// Discover peers with mDNS.
    pub mdns: bool,
    /// Bytes this node may use for weights and KV cache.
    pub memory_budget: u64,
    /// The node's name.
    pub name: String,
    /// How to split the model.
    pub strategy: Strategy,
    /// Estimated seconds per hop for the latency partitioner.
    pub hop_seconds: f64,
    /// Activation type between nodes (default: f32 for f32 models, else f16).
    pub wire_dtype: Option<WireDtype>,
    /// Tokens of KV cache each node must be able to hold for its layers.
    pub kv_tokens: usize,
    /// Requests generated at once by this node as an entry.
    pub parallel: usize,
    /// Requests waiting beyond that.
    pub queue: usize,
    /// This node's HTTP address, for the cluster panel.
    pub http: Option<String>,
    /// How long the set of nodes must be stable before (re)planning.
    pub settle: Duration,
    /// Use this measured speed instead of measuring (seconds per layer per token).
    pub speed_override: Option<f64>,
    /// How long a request waits for a usable plan before failing.
    pub plan_wait: Duration,
}

/// The current plan, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanState {
    /// Still collecting peers or loading.
    Waiting(String),
    /// The model cannot be split over the live nodes.
    Impossible(String),
    /// Requests go along this plan.
    Ready(Arc<Plan>),
}

#[derive(Default)]
pub(crate) struct ShardSlot {
    pub shard: Option<Arc<Shard>>,
    pub range: Option<(usize, usize)>,
    pub target: Option<(usize, usize)>,
    pub loading: bool,
    pub error: Option<String>,
}

/// A request's state at a hop: its KV cache for this node's layers, and its head on the last hop.
pub(crate) struct HopState {
    pub cache: KvCache,
    pub head: Option<SequenceHead>,
    pub last_used: Instant,
}

pub(crate) struct Inner {
    pub me: PeerId,
    pub me_s: String,
    pub name: String,
    pub files: Arc<ModelFiles>,
    pub handle: Arc<ModelHandle>,
    pub advert: ModelAdvert,
    pub net: NetClient,
    pub rt: tokio::runtime::Handle,
    pub topo: Mutex<Topology>,
    pub plan_tx: watch::Sender<PlanState>,
    pub shard: Mutex<ShardSlot>,
    pub states: Mutex<HashMap<(String, u64), HopState>>,
    /// Steps this node (as the entry) waits on whose answers other nodes deliver directly, by
    /// (request, start position, delivering hop).
    pub deliveries: Mutex<HashMap<(u64, u32, u32), crate::pipeline::Awaited>>,
    pub next_request: AtomicU64,
    /// Steps this node sent to other nodes, and their bytes of activations and tokens.
    pub steps_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Answers other nodes delivered here directly, as the entry of the request.
    pub deliveries_taken: AtomicU64,
    pub pool: OnceLock<WorkerPool>,
    pub listen: Mutex<Vec<Multiaddr>>,
    pub wire_dtype: WireDtype,
    pub memory_budget: u64,
    pub memory_total: u64,
    pub http: Option<String>,
    pub strategy: Strategy,
    pub hop_seconds: f64,
    pub kv_tokens: usize,
    pub settle: Duration,
    pub plan_wait: Duration,
    pub explicit_peers: Vec<Multiaddr>,
    /// Peers mDNS found, redialled until connected (a first dial may fail while a peer starts).
    pub discovered: Mutex<HashMap<PeerId, Vec<Multiaddr>>>,
    pub started: Instant,
}

/// A running node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl Node {
    /// Measures this node, starts its network and background tasks, and returns it. Must be
    /// called inside a tokio runtime.
    pub fn start(cfg: NodeConfig) -> Result<Node, String> {
        let advert = crate::capability::advert(
            &cfg.files,
            &cfg.handle.id,
            &cfg.data_dir,
            cfg.speed_override,
        )
        .map_err(|e| format!("measuring this node's speed: {e}"))?;
        let (net, events, event_loop) = net::start(NetConfig {
            keypair: cfg.keypair,
            cluster_key: cfg.cluster_key,
            listen: cfg.listen,
            mdns: cfg.mdns,
        })?;
        let me = net.local_peer_id();
        let (plan_tx, _) = watch::channel(PlanState::Waiting("looking for peers".into()));
        let wire_dtype = cfg.wire_dtype.unwrap_or(if cfg.files.f32_weights() {
            WireDtype::F32
        } else {
            WireDtype::F16
        });
        let inner = Arc::new(Inner {
            me,
            me_s: me.to_string(),
            name: cfg.name,
            files: cfg.files,
            handle: Arc::new(cfg.handle),
            advert,
            net,
            rt: tokio::runtime::Handle::current(),
            topo: Mutex::new(Topology::default()),
            plan_tx,
            shard: Mutex::new(ShardSlot::default()),
            states: Mutex::new(HashMap::new()),
            deliveries: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            steps_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            deliveries_taken: AtomicU64::new(0),
            pool: OnceLock::new(),
            listen: Mutex::new(Vec::new()),
            wire_dtype,
            memory_budget: cfg.memory_budget,
            memory_total: llmesh_engine::system::total_memory_bytes().unwrap_or(0),
            http: cfg.http,
            strategy: cfg.strategy,
            hop_seconds: cfg.hop_seconds,
            kv_tokens: cfg.kv_tokens,
            settle: cfg.settle,
            plan_wait: cfg.plan_wait,
            explicit_peers: cfg.peers,
            discovered: Mutex::new(HashMap::new()),
            started: Instant::now(),
        });
        let factory: Arc<dyn llmesh_engine::service::RunnerFactory> =
            Arc::new(crate::pipeline::ClusterFactory(Arc::downgrade(&inner)));
        let pool = WorkerPool::new(
            factory,
            inner.handle.tokenizer.clone(),
            cfg.parallel,
            cfg.queue,
        );
        let _ = inner.pool.set(pool);
        tokio::spawn(event_loop.run());
        tokio::spawn(handle_events(Arc::downgrade(&inner), events));
        tokio::spawn(heartbeats(Arc::downgrade(&inner)));
        tokio::spawn(planner(Arc::downgrade(&inner)));
        tokio::spawn(collect_garbage(Arc::downgrade(&inner)));
        tracing::info!(peer = %me, name = %inner.name, "node started");
        Ok(Node { inner })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.me
    }

    /// The current plan state.
    pub fn plan(&self) -> PlanState {
        self.inner.plan_tx.borrow().clone()
    }

    /// Addresses this node listens on for peers.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner
            .listen
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// The layers loaded here now.
    pub fn loaded(&self) -> Option<(usize, usize)> {
        self.inner.shard.lock().ok().and_then(|s| s.range)
    }
}

impl Inner {
    pub fn info(&self) -> NodeInfo {
        let (loaded, peers) = {
            let loaded = self
                .shard
                .lock()
                .ok()
                .and_then(|s| s.range)
                .map(|(a, b)| (a as u32, b as u32));
            let peers = self
                .topo
                .lock()
                .map(|t| {
                    t.alive()
                        .into_iter()
                        .map(|(id, info)| (id.to_string(), info.listen.clone()))
                        .collect()
                })
                .unwrap_or_default();
            (loaded, peers)
        };
        NodeInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: "cpu".into(),
            memory_budget: self.memory_budget,
            memory_total: self.memory_total,
            model: Some(self.advert.clone()),
            loaded,
            listen: self
                .listen
                .lock()
                .map(|l| l.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default(),
            http: self.http.clone(),
            peers,
        }
    }

    /// The model as the partitioner sees it.
    pub fn model_spec(&self) -> ModelSpec {
        let a = &self.advert;
        ModelSpec {
            layers: a.layers as usize,
            layer_bytes: a.layer_bytes,
            kv_bytes_per_layer: a.kv_bytes_per_token_layer * self.kv_tokens as u64,
            first_bytes: a.first_bytes,
            last_bytes: a.last_bytes,
        }
    }

    /// This node and the live peers holding the same model, as the partitioner sees them.
    pub fn node_specs(&self) -> Vec<NodeSpec> {
        let mut v = vec![NodeSpec {
            id: self.me_s.clone(),
            memory: self.memory_budget,
            seconds_per_layer: self.advert.seconds_per_layer,
        }];
        if let Ok(t) = self.topo.lock() {
            for (id, info) in t.alive() {
                if let Some(m) = &info.model
                    && m.fingerprint == self.advert.fingerprint
                {
                    v.push(NodeSpec {
                        id: id.to_string(),
                        memory: info.memory_budget,
                        seconds_per_layer: m.seconds_per_layer,
                    });
                }
            }
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Loads (in the background) the layers the plan gives this node, dropping others first.
    fn ensure_loaded(self: &Arc<Self>, target: Option<(usize, usize)>) {
        let start = {
            let Ok(mut slot) = self.shard.lock() else {
                return;
            };
            slot.target = target;
            if slot.loading || slot.range == target {
                false
            } else {
                slot.loading = true;
                true
            }
        };
        if !start {
            return;
        }
        let me = self.clone();
        self.rt.spawn_blocking(move || me.load_loop());
    }

    fn load_loop(&self) {
        loop {
            let target = {
                let Ok(mut slot) = self.shard.lock() else {
                    return;
                };
                if slot.range == slot.target {
                    slot.loading = false;
                    return;
                }
                // Free the old layers (and the states that refer to them) before loading.
                slot.shard = None;
                slot.range = None;
                slot.target
            };
            if let Ok(mut s) = self.states.lock() {
                s.clear();
            }
            let Some((a, b)) = target else { continue };
            tracing::info!(layers = %format!("{a}..{b}"), "loading layers");
            let t0 = Instant::now();
            let loaded = LayerRange::new(a, b, self.files.config().num_layers)
                .and_then(|r| self.files.load_shard(r));
            let Ok(mut slot) = self.shard.lock() else {
                return;
            };
            match loaded {
                Ok(shard) => {
                    tracing::info!(
                        layers = %format!("{a}..{b}"),
                        mib = shard.weight_bytes() >> 20,
                        seconds = t0.elapsed().as_secs_f64(),
                        "layers loaded"
                    );
                    slot.shard = Some(Arc::new(shard));
                    slot.range = Some((a, b));
                    slot.error = None;
                }
                Err(e) => {
                    tracing::error!("could not load layers {a}..{b}: {e}");
                    slot.error = Some(e.to_string());
                    slot.loading = false;
                    return;
                }
            }
        }
    }
}

async fn handle_events(inner: Weak<Inner>, mut events: tokio::sync::mpsc::Receiver<NetEvent>) {
    while let Some(ev) = events.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        match ev {
            NetEvent::Listening(addr) => {
                tracing::info!(%addr, "listening for peers");
                if let Ok(mut l) = inner.listen.lock() {
                    l.push(addr);
                }
            }
            NetEvent::Connected(peer, addr) => {
                tracing::info!(%peer, %addr, "peer connected");
                if let Ok(mut t) = inner.topo.lock() {
                    t.connected(peer, addr);
                }
                let i = inner.clone();
                tokio::spawn(async move { hello(&i, peer).await });
            }
            NetEvent::Disconnected(peer) => {
                tracing::info!(%peer, "peer disconnected");
                if let Ok(mut t) = inner.topo.lock() {
                    t.disconnected(&peer);
                }
            }
            NetEvent::Expired(peer) => {
                if let Ok(mut d) = inner.discovered.lock() {
                    d.remove(&peer);
                }
            }
            NetEvent::Discovered(peer, addr) => {
                if let Ok(mut d) = inner.discovered.lock() {
                    let addrs = d.entry(peer).or_default();
                    if !addrs.contains(&addr) {
                        addrs.push(addr.clone());
                    }
                }
                let known = inner
                    .topo
                    .lock()
                    .map(|t| t.is_connected(&peer))
                    .unwrap_or(false);
                if !known && peer != inner.me {
                    tracing::debug!(%peer, %addr, "discovered by mDNS");
                    inner.net.dial(addr, Some(peer)).await;
                }
            }
            NetEvent::Ctl(peer, req, id) => {
                let resp = match req {
                    CtlRequest::Hello(info) => {
                        on_info(&inner, peer, *info).await;
                        CtlResponse::Hello(Box::new(inner.info()))
                    }
                    CtlRequest::Release { entry, request } => {
                        if let Ok(mut s) = inner.states.lock() {
                            s.remove(&(entry, request));
                        }
                        CtlResponse::Ok
                    }
                };
                inner.net.respond_ctl(id, resp).await;
            }
            NetEvent::Step(_peer, req, reply) => {
                let forwards = crate::pipeline::forwards(&req);
                let i = inner.clone();
                let job = move || match crate::pipeline::run_step(&i, *req) {
                    Answer::Reply(r) => {
                        let _ = reply.send(r);
                    }
                    // Delivering waits on the entry node: not on a compute thread.
                    Answer::Deliver(entry, d) => {
                        let rt = i.rt.clone();
                        rt.spawn(async move {
                            let _ = reply.send(crate::pipeline::deliver(&i, entry, d).await);
                        });
                    }
                };
                if forwards {
                    // It waits on the next node: keep that wait off the compute threads.
                    inner.rt.spawn_blocking(job);
                } else {
                    // Only computing (and answering): run it on a compute thread directly,
                    // one thread hand-off instead of three per step.
                    llmesh_engine::threads::spawn_compute(job);
                }
            }
            NetEvent::Deliver(peer, d, ack) => {
                let _ = ack.send(crate::pipeline::accept_delivery(&inner, peer, *d));
            }
            NetEvent::ConnectFailed(..) => {}
        }
    }
}

/// Records what a peer said about itself and dials the peers it knows that we do not.
async fn on_info(inner: &Arc<Inner>, peer: PeerId, info: NodeInfo) {
    let unknown: Vec<(PeerId, Vec<Multiaddr>)> = {
        let Ok(mut t) = inner.topo.lock() else { return };
        let unknown = info
            .peers
            .iter()
            .filter_map(|(id, addrs)| {
                let id: PeerId = id.parse().ok()?;
                (id != inner.me && !t.is_connected(&id))
                    .then(|| (id, addrs.iter().filter_map(|a| a.parse().ok()).collect()))
            })
            .collect();
        t.heard(peer, info);
        unknown
    };
    for (id, addrs) in unknown {
        for addr in addrs {
            inner.net.dial(addr, Some(id)).await;
        }
    }
}

async fn hello(inner: &Arc<Inner>, peer: PeerId) {
    match inner
        .net
        .ctl(peer, CtlRequest::Hello(Box::new(inner.info())))
        .await
    {
        Ok(CtlResponse::Hello(info)) => on_info(inner, peer, *info).await,
        Ok(CtlResponse::Ok) => {}
        Err(e) => {
            let gone = inner
                .topo
                .lock()
                .map(|mut t| t.missed(&peer))
                .unwrap_or(false);
            if gone {
                tracing::warn!(%peer, "peer stopped answering: {e}");
                inner.net.disconnect(peer).await;
            }
        }
    }
}

async fn heartbeats(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut round = 0u64;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let peers = inner
            .topo
            .lock()
            .map(|t| t.connected_peers())
            .unwrap_or_default();
        for peer in peers {
            let i = inner.clone();
            tokio::spawn(async move { hello(&i, peer).await });
        }
        // Redial the explicit peers that are not connected.
        if round.is_multiple_of(3) {
            let connected: Vec<Multiaddr> = {
                let t = inner.topo.lock();
                t.map(|t| {
                    t.connected_peers()
                        .iter()
                        .filter_map(|p| t.get(p).and_then(|s| s.addr.clone()))
                        .collect()
                })
                .unwrap_or_default()
            };
            for addr in &inner.explicit_peers {
                if !connected.contains(addr) {
                    inner.net.dial(addr.clone(), None).await;
                }
            }
            let found: Vec<(PeerId, Vec<Multiaddr>)> = inner
                .discovered
                .lock()
                .map(|d| d.iter().map(|(p, a)| (*p, a.clone())).collect())
                .unwrap_or_default();
            for (peer, addrs) in found {
                let up = inner
                    .topo
                    .lock()
                    .map(|t| t.is_connected(&peer))
                    .unwrap_or(true);
                if !up {
                    for addr in addrs {
                        inner.net.dial(addr, Some(peer)).await;
                    }
                }
            }
        }
        round += 1;
    }
}

async fn planner(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_specs: Option<Vec<NodeSpec>> = None;
    let mut changed_at = Instant::now();
    let mut planned_for: Option<Vec<NodeSpec>> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let specs = inner.node_specs();
        if last_specs.as_ref() != Some(&specs) {
            last_specs = Some(specs.clone());
            changed_at = Instant::now();
        }
        let settled =
            changed_at.elapsed() >= inner.settle && inner.started.elapsed() >= inner.settle * 2;
        if !settled || planned_for.as_ref() == Some(&specs) {
            continue;
        }
        planned_for = Some(specs.clone());
        let state = match partition::plan(
            &inner.model_spec(),
            &specs,
            inner.strategy,
            inner.hop_seconds,
        ) {
            Ok(p) => {
                let names = name_plan(&inner, &p);
                tracing::info!(plan = %names, nodes = specs.len(), "plan");
                PlanState::Ready(Arc::new(p))
            }
            Err(e) => {
                tracing::warn!("no plan: {e}");
                PlanState::Impossible(e.to_string())
            }
        };
        let target = match &state {
            PlanState::Ready(p) => p.range_of(&inner.me_s),
            _ => None,
        };
        inner.plan_tx.send_replace(state);
        inner.ensure_loaded(target);
    }
}

/// `name[a..b] → name[b..c]` for logs.
pub(crate) fn name_plan(inner: &Inner, p: &Plan) -> String {
    p.hops
        .iter()
        .map(|h| format!("{}[{}..{}]", inner.node_name(&h.node), h.start, h.end))
        .collect::<Vec<_>>()
        .join(" → ")
}

impl Inner {
    /// A node's name from its id.
    pub fn node_name(&self, id: &str) -> String {
        if id == self.me_s {
            return self.name.clone();
        }
        let peer: Option<PeerId> = id.parse().ok();
        peer.and_then(|p| {
            self.topo.lock().ok().and_then(|t| {
                t.get(&p)
                    .and_then(|s| s.info.as_ref().map(|i| i.name.clone()))
            })
        })
        .unwrap_or_else(|| id.chars().take(12).collect())
    }
}

async fn collect_garbage(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Ok(mut s) = inner.states.lock() {
            s.retain(|_, st| st.last_used.elapsed() < Duration::from_secs(600));
        }
    }
}
