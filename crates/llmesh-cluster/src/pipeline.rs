//! The request pipeline. An entry node sends each step of a request along the plan: every hop
//! runs its layers on the step and passes the activations to the next hop (source-routed: the
//! plan travels with the step); the last hop chooses the next token and sends it straight to the
//! entry node (a [`Delivery`]), as does a hop whose next hop is the entry's own; the chain of
//! calls behind it only confirms. Each hop keeps the request's KV cache for its layers, keyed by
//! (entry node, request id).
//!
//! When a hop fails, the entry node leaves the failed node out, waits for the plan the remaining
//! nodes agree on, and replays the request — the prompt and the tokens produced so far — on it.
//! The last hop's sampler is rebuilt from the same seed and the tokens so far, so the replayed
//! request continues exactly where it was.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use llmesh_engine::generate::StepRunner;
use llmesh_engine::head::{HeadSpec, SequenceHead, StepOutput};
use llmesh_engine::service::RunnerFactory;
use llmesh_engine::{Error, GenerateRequest, LogitsFor, ShardInput};

use crate::net::NetError;
use crate::node::{HopState, Inner, PlanState};
use crate::partition::Plan;
use crate::wire::{
    CtlRequest, Delivery, StepError, StepReply, StepRequest, StepResponse, decode_hidden,
    encode_hidden,
};

/// What a hop does with the outcome of its step.
pub(crate) enum Answer {
    /// Answer the caller.
    Reply(StepResponse),
    /// Send the answer to the entry node, then confirm to the caller (see [`deliver`]).
    Deliver(PeerId, Delivery),
}

/// Runs one step at this node and answers it, delivering to the entry node first when the
/// step's outcome goes there directly.
pub(crate) fn handle_step(inner: &Arc<Inner>, req: StepRequest) -> StepResponse {
    match run_step(inner, req) {
        Answer::Reply(r) => r,
        Answer::Deliver(entry, d) => inner.rt.block_on(deliver(inner, entry, d)),
    }
}

/// Sends a step's answer to its entry node; the caller is told `Delivered`, or gets the answer
/// itself to pass back down the chain when the entry cannot take it.
pub(crate) async fn deliver(inner: &Inner, entry: PeerId, d: Delivery) -> StepResponse {
    let fallback = d.reply.clone();
    match inner.net.deliver(entry, d).await {
        Ok(Ok(StepReply::Delivered)) => Ok(StepReply::Delivered),
        other => {
            tracing::debug!(%entry, "could not deliver to the entry node ({other:?}); answering down the chain");
            Ok(fallback)
        }
    }
}

/// The hop at which the chain of hops that the entry node starts at hop `from` ends: the last
/// hop, or the one before the entry's own next hop.
fn chain_end(req: &StepRequest, from: usize) -> usize {
    let hops = &req.plan.hops;
    let mut h = from;
    while h + 1 < hops.len() && hops[h + 1].node != req.entry {
        h += 1;
    }
    h
}

/// Whether this hop (not the entry node) was called by another hop rather than by the entry, so
/// that its answer goes to the entry directly instead of back through the callers.
fn answers_entry_directly(me: &str, req: &StepRequest) -> bool {
    let hop = req.hop as usize;
    me != req.entry
        && hop > 0
        && req
            .plan
            .hops
            .get(hop - 1)
            .is_some_and(|h| h.node != req.entry)
}

/// Runs one step at this node (hop `req.hop` of the plan) and, unless it is the last hop, the
/// rest of the pipeline after it.
pub(crate) fn run_step(inner: &Arc<Inner>, req: StepRequest) -> Answer {
    let direct = answers_entry_directly(&inner.me_s, &req);
    let (request, start_pos, hop) = (req.request, req.start_pos, req.hop);
    let entry = req.entry.clone();
    match step_here(inner, req) {
        Ok(reply @ (StepReply::Done(_) | StepReply::Hidden { .. })) if direct => {
            match entry.parse::<PeerId>() {
                Ok(entry) => Answer::Deliver(
                    entry,
                    Delivery {
                        request,
                        start_pos,
                        hop,
                        reply,
                    },
                ),
                Err(_) => Answer::Reply(Ok(reply)),
            }
        }
        other => Answer::Reply(other),
    }
}

fn step_here(inner: &Arc<Inner>, req: StepRequest) -> StepResponse {
    if req.model != inner.advert.fingerprint {
        return Err(StepError::NotReady(
            "this node holds a different model".into(),
        ));
    }
    let Some(hop) = req.plan.hops.get(req.hop as usize).cloned() else {
        return Err(StepError::Failed(format!(
            "hop {} is not in the plan",
            req.hop
        )));
    };
    if hop.node != inner.me_s {
        return Err(StepError::Failed(
            "a step for another node arrived here".into(),
        ));
    }
    let shard = {
        let slot = inner
            .shard
            .lock()
            .map_err(|_| StepError::Failed("shard lock poisoned".into()))?;
        match (&slot.shard, slot.range) {
            (Some(s), Some(r)) if r == (hop.start, hop.end) => s.clone(),
            _ => {
                return Err(StepError::NotReady(format!(
                    "{} holds layers {:?}, the plan needs {}..{}{}",
                    inner.name,
                    slot.range,
                    hop.start,
                    hop.end,
                    if slot.loading { " (loading)" } else { "" }
                )));
            }
        }
    };
    let key = (req.entry.clone(), req.request);
    let taken = inner.states.lock().ok().and_then(|mut s| s.remove(&key));
    let mut state = match taken {
        Some(st) => st,
        None if req.start_pos == 0 => HopState {
            cache: shard.new_cache(),
            head: None,
            last_used: Instant::now(),
        },
        None => {
            return Err(StepError::StateLost(format!(
                "{} has no state for this request",
                inner.name
            )));
        }
    };
    let start = req.start_pos as usize;
    if start < state.cache.len() {
        state.cache.truncate(start);
    } else if start > state.cache.len() {
        return Err(StepError::StateLost(format!(
            "{} holds {} positions of this request, the step starts at {start}",
            inner.name,
            state.cache.len()
        )));
    }
    if shard.is_last() {
        if let Some(spec) = &req.head {
            state.head =
                Some(SequenceHead::new(spec).map_err(|e| StepError::Failed(e.to_string()))?);
        }
        if state.head.is_none() {
            return Err(StepError::StateLost(
                "the request's sampling state is missing".into(),
            ));
        }
    }
    let hidden = match &req.hidden {
        Some(w) if !shard.is_first() => Some(decode_hidden(w).map_err(StepError::Failed)?),
        None if shard.is_first() => None,
        _ => {
            return Err(StepError::Failed(
                "the step carries the wrong input for this hop".into(),
            ));
        }
    };
    let input = match hidden {
        Some(h) => ShardInput::Hidden(h),
        None => ShardInput::Tokens(&req.tokens),
    };
    let mode = state
        .head
        .as_ref()
        .map_or(LogitsFor::Last, SequenceHead::logits_for);
    let t0 = Instant::now();
    let out = shard
        .forward(&mut state.cache, input, mode)
        .map_err(|e| StepError::Failed(e.to_string()))?;
    tracing::trace!(
        hop = req.hop,
        tokens = req.tokens.len(),
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "layers ran"
    );
    state.last_used = Instant::now();
    if shard.is_last() {
        let logits = out
            .into_logits()
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let result = state
            .head
            .as_mut()
            .map(|h| h.process(&logits, &req.tokens, req.sample))
            .unwrap_or_else(|| Err(Error::Invalid("no head".into())))
            .map_err(|e| StepError::Failed(e.to_string()));
        put_back(inner, key, state);
        return result.map(StepReply::Done);
    }
    let hidden = out
        .into_hidden()
        .map_err(|e| StepError::Failed(e.to_string()))?;
    put_back(inner, key, state);
    let wire =
        encode_hidden(&hidden, inner.wire_dtype).map_err(|e| StepError::Failed(e.to_string()))?;
    let next_hop = req.hop as usize + 1;
    let Some(next) = req.plan.hops.get(next_hop).cloned() else {
        return Err(StepError::Failed(
            "the plan ends before the last layer".into(),
        ));
    };
    if next.node == req.entry && req.entry != inner.me_s {
        inner
            .bytes_sent
            .fetch_add(wire.data.len() as u64, Ordering::Relaxed);
        return Ok(StepReply::Hidden {
            hop: next_hop as u32,
            hidden: wire,
        });
    }
    let next_req = StepRequest {
        hop: next_hop as u32,
        hidden: Some(wire),
        ..req
    };
    forward(inner, &next.node, next_req)
}

/// Whether running `req` at its hop goes on to send a step to another node and wait for the
/// answer (else the hop only computes: it is the last, or it hands activations back to the
/// entry node in its reply).
pub(crate) fn forwards(req: &StepRequest) -> bool {
    req.plan
        .hops
        .get(req.hop as usize + 1)
        .is_some_and(|next| next.node != req.entry)
}

fn put_back(inner: &Inner, key: (String, u64), state: HopState) {
    if let Ok(mut s) = inner.states.lock() {
        s.insert(key, state);
    }
}

/// Sends a step to `node` (or runs it here) and turns transport failures into `Unreachable`.
fn forward(inner: &Arc<Inner>, node: &str, req: StepRequest) -> StepResponse {
    if node == inner.me_s {
        return handle_step(inner, req);
    }
    let peer: PeerId = node
        .parse()
        .map_err(|_| StepError::Failed(format!("bad peer id {node}")))?;
    let payload = req.hidden.as_ref().map_or(0, |h| h.data.len()) + req.tokens.len() * 4;
    inner.steps_sent.fetch_add(1, Ordering::Relaxed);
    inner
        .bytes_sent
        .fetch_add(payload as u64, Ordering::Relaxed);
    let t0 = Instant::now();
    let end = chain_end(&req, req.hop as usize);
    let result = if inner.me_s == req.entry && end > req.hop as usize {
        send_expecting_delivery(inner, peer, end, req)
    } else {
        inner.net.step_blocking(peer, req)
    };
    tracing::trace!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        bytes = payload,
        "remote step answered"
    );
    match result {
        Ok(resp) => resp,
        Err(e) => Err(StepError::Unreachable {
            peer: node.to_string(),
            detail: e.to_string(),
        }),
    }
}

/// What reaches an entry node waiting on a step: the answer the chain's end delivered, or the
/// chain's own reply.
pub(crate) enum Arrival {
    Delivered(StepReply),
    Chain(Result<StepResponse, NetError>),
}

/// Where a delivery for a step an entry node waits on must come from.
pub(crate) struct Awaited {
    /// The node of the hop that ends the chain.
    pub from: String,
    pub tx: std::sync::mpsc::Sender<Arrival>,
}

/// Sends a step from the entry node to `peer` whose chain ends at hop `end` on another node,
/// and takes whichever comes first: that hop's delivered answer, or the chain's reply (an
/// error, or the answer itself when it could not be delivered).
fn send_expecting_delivery(
    inner: &Arc<Inner>,
    peer: PeerId,
    end: usize,
    req: StepRequest,
) -> Result<StepResponse, NetError> {
    let key = (req.request, req.start_pos, end as u32);
    let (tx, rx) = std::sync::mpsc::channel();
    let from = req.plan.hops[end].node.clone();
    if let Ok(mut d) = inner.deliveries.lock() {
        d.insert(
            key,
            Awaited {
                from,
                tx: tx.clone(),
            },
        );
    }
    struct Slot<'a>(&'a Inner, (u64, u32, u32));
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            if let Ok(mut d) = self.0.deliveries.lock() {
                d.remove(&self.1);
            }
        }
    }
    let _slot = Slot(inner, key);
    let net = inner.net.clone();
    inner.rt.spawn(async move {
        let _ = tx.send(Arrival::Chain(net.step(peer, req).await));
    });
    match rx.recv() {
        Ok(Arrival::Delivered(reply)) => Ok(Ok(reply)),
        // The chain confirms a delivery only after this node took it, which the channel gives
        // first: a bare confirmation means it went elsewhere.
        Ok(Arrival::Chain(Ok(Ok(StepReply::Delivered)))) => Ok(Err(StepError::StateLost(
            "the step's answer was delivered but did not arrive".into(),
        ))),
        Ok(Arrival::Chain(r)) => r,
        Err(_) => Err(NetError::Stopped),
    }
}

/// Takes an answer delivered to this (entry) node for a step it is waiting on.
pub(crate) fn accept_delivery(inner: &Inner, peer: PeerId, d: Delivery) -> StepResponse {
    let key = (d.request, d.start_pos, d.hop);
    let waiting = inner.deliveries.lock().ok().and_then(|w| {
        w.get(&key)
            .filter(|a| a.from == peer.to_string())
            .map(|a| a.tx.clone())
    });
    match waiting {
        Some(tx) if tx.send(Arrival::Delivered(d.reply)).is_ok() => {
            inner.deliveries_taken.fetch_add(1, Ordering::Relaxed);
            Ok(StepReply::Delivered)
        }
        _ => Err(StepError::StateLost(
            "no step of this node waits for that answer".into(),
        )),
    }
}

/// Makes cluster runners for the worker pool.
pub(crate) struct ClusterFactory(pub Weak<Inner>);

impl RunnerFactory for ClusterFactory {
    fn runner<'a>(&'a self, req: &GenerateRequest) -> Result<Box<dyn StepRunner + 'a>, Error> {
        let inner = self
            .0
            .upgrade()
            .ok_or_else(|| Error::Unavailable("the node is shutting down".into()))?;
        let mut spec = req.head_spec();
        // Fix the seed now: a replay on another node must draw the same numbers.
        if spec.sampling.seed.is_none() {
            use rand::Rng;
            spec.sampling.seed = Some(rand::rng().random());
        }
        Ok(Box::new(ClusterRunner {
            request: inner.next_request.fetch_add(1, Ordering::SeqCst),
            inner,
            spec,
            plan: None,
            history: Vec::new(),
            generated: Vec::new(),
            stale: false,
            used: Vec::new(),
        }))
    }
}

/// The entry node's side of one request.
pub(crate) struct ClusterRunner {
    inner: Arc<Inner>,
    spec: HeadSpec,
    request: u64,
    plan: Option<Arc<Plan>>,
    /// Every token fed so far (prompt and generated), for replays.
    history: Vec<u32>,
    /// Tokens chosen so far.
    generated: Vec<u32>,
    /// The hops hold no usable state: replay before the next step.
    stale: bool,
    /// Plans this request has used, to release its state from their nodes.
    used: Vec<(u64, Arc<Plan>)>,
}

enum Retry {
    /// Give up: the computation itself failed.
    Fatal(String),
    /// Wait and try the same step again.
    Wait(String),
    /// Leave this node out, then replay on a new plan.
    Drop(String, String),
    /// Replay on the current plan.
    Replay(String),
}

impl ClusterRunner {
    /// The usable plan, waiting for one until the deadline.
    fn current_plan(&self, deadline: Instant, avoid: Option<&str>) -> Result<Arc<Plan>, Error> {
        loop {
            let state = self.inner.plan_tx.borrow().clone();
            let reason = match state {
                PlanState::Ready(p) if avoid.is_none_or(|a| p.hops.iter().all(|h| h.node != a)) => {
                    return Ok(p);
                }
                PlanState::Ready(_) => {
                    "waiting for the cluster to re-plan without the failed node".to_string()
                }
                PlanState::Waiting(r) => r,
                // Not a state to wait out: the live nodes cannot hold the model.
                PlanState::Impossible(r) => {
                    return Err(Error::Unavailable(format!(
                        "the cluster cannot hold the model: {r}"
                    )));
                }
            };
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!("no usable plan: {reason}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(
        &self,
        plan: &Arc<Plan>,
        start_pos: usize,
        tokens: &[u32],
        sample: bool,
        head: Option<HeadSpec>,
    ) -> Result<StepOutput, Retry> {
        let req = StepRequest {
            entry: self.inner.me_s.clone(),
            request: self.request,
            model: self.inner.advert.fingerprint.clone(),
            plan: (**plan).clone(),
            hop: 0,
            start_pos: start_pos as u32,
            tokens: tokens.to_vec(),
            hidden: None,
            sample,
            head,
        };
        let first = plan.hops[0].node.clone();
        let mut result = forward(&self.inner, &first, req.clone());
        loop {
            return match result {
                Ok(StepReply::Done(out)) => Ok(out),
                // A hop before this node hands the activations back: run this node's hop (and
                // the rest of the plan after it) from here.
                Ok(StepReply::Hidden { hop, hidden }) => {
                    let ours = plan.hops.get(hop as usize).map(|h| h.node.as_str());
                    if ours != Some(self.inner.me_s.as_str()) {
                        return Err(Retry::Fatal(format!(
                            "activations came back for hop {hop}, which this node does not run"
                        )));
                    }
                    let next = StepRequest {
                        hop,
                        hidden: Some(hidden),
                        ..req.clone()
                    };
                    result = handle_step(&self.inner, next);
                    continue;
                }
                Ok(StepReply::Delivered) => Err(Retry::Replay(
                    "a hop confirmed an answer this node never received".into(),
                )),
                Err(StepError::NotReady(m)) => Err(Retry::Wait(m)),
                Err(StepError::StateLost(m)) => Err(Retry::Replay(m)),
                Err(StepError::Unreachable { peer, detail }) => Err(Retry::Drop(peer, detail)),
                Err(StepError::Failed(m)) => Err(Retry::Fatal(m)),
            };
        }
    }

    /// Largest number of tokens per step, so a step's activations stay well under the message
    /// limit.
    fn max_chunk(&self) -> usize {
        let per_token = self.inner.files.config().hidden_size * 4;
        (crate::wire::MAX_MESSAGE / 4 / per_token.max(1)).clamp(1, 512)
    }

    /// Feeds `tokens` at `start_pos` in chunks; only the last chunk may sample.
    fn feed(
        &self,
        plan: &Arc<Plan>,
        start_pos: usize,
        tokens: &[u32],
        sample: bool,
        head: Option<HeadSpec>,
    ) -> Result<StepOutput, Retry> {
        let chunk = self.max_chunk();
        let mut out = StepOutput::default();
        let mut pos = start_pos;
        let mut head = head;
        let n = tokens.len().div_ceil(chunk).max(1);
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let last = i + 1 == n;
            let o = self.send(plan, pos, part, sample && last, head.take())?;
            out.prompt_logprobs.extend(o.prompt_logprobs);
            out.sampled = o.sampled;
            pos += part.len();
        }
        Ok(out)
    }

    fn release(&self, request: u64, plan: &Plan) {
        for hop in &plan.hops {
            if hop.node == self.inner.me_s {
                if let Ok(mut s) = self.inner.states.lock() {
                    s.remove(&(self.inner.me_s.clone(), request));
                }
                continue;
            }
            let Ok(peer) = hop.node.parse::<PeerId>() else {
                continue;
            };
            let net = self.inner.net.clone();
            let entry = self.inner.me_s.clone();
            self.inner.rt.spawn(async move {
                let _ = net.ctl(peer, CtlRequest::Release { entry, request }).await;
            });
        }
    }
}

impl StepRunner for ClusterRunner {
    fn step(&mut self, tokens: &[u32], sample: bool) -> Result<StepOutput, Error> {
        let deadline = Instant::now() + self.inner.plan_wait;
        let mut avoid: Option<String> = None;
        loop {
            let plan = self.current_plan(deadline, avoid.as_deref())?;
            if self.plan.as_ref() != Some(&plan) {
                if self.plan.is_some() {
                    self.stale = true;
                }
                self.plan = Some(plan.clone());
            }
            let attempt = (|| -> Result<StepOutput, Retry> {
                if self.stale || self.history.is_empty() {
                    if self.stale {
                        // A fresh request id: the old one's state may linger on other nodes.
                        if let Some(old) = self.used.last() {
                            self.release(old.0, &old.1);
                        }
                        self.request = self.inner.next_request.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut spec = self.spec.clone();
                    spec.generated = self.generated.clone();
                    if !self.history.is_empty() {
                        tracing::info!(
                            request = self.request,
                            tokens = self.history.len(),
                            "replaying request on a new plan"
                        );
                        self.feed(&plan, 0, &self.history, false, Some(spec.clone()))?;
                        self.stale = false;
                        return self.feed(&plan, self.history.len(), tokens, sample, None);
                    }
                    self.stale = false;
                    return self.feed(&plan, 0, tokens, sample, Some(spec));
                }
                self.feed(&plan, self.history.len(), tokens, sample, None)
            })();
            if !self
                .used
                .iter()
                .any(|(r, p)| *r == self.request && **p == *plan)
            {
                self.used.push((self.request, plan.clone()));
            }
            match attempt {
                Ok(out) => {
                    self.history.extend_from_slice(tokens);
                    if let Some(s) = &out.sampled {
                        self.generated.push(s.id);
                    }
                    return Ok(out);
                }
                Err(Retry::Fatal(m)) => {
                    return Err(Error::Unavailable(format!("the pipeline failed: {m}")));
                }
                Err(Retry::Wait(m)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Unavailable(format!(
                            "the cluster did not become ready: {m}"
                        )));
                    }
                    tracing::debug!("step must wait: {m}");
                    self.stale = true;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(Retry::Replay(m)) => {
                    tracing::info!("replaying request: {m}");
                    self.stale = true;
                }
                Err(Retry::Drop(peer, detail)) => {
                    tracing::warn!(%peer, "a node of the plan failed ({detail}); re-planning without it");
                    if let Ok(p) = peer.parse::<PeerId>()
                        && let Ok(mut t) = self.inner.topo.lock()
                    {
                        t.failed(&p);
                    }
                    avoid = Some(peer);
                    self.stale = true;
                }
            }
        }
    }

    fn context_length(&self) -> usize {
        self.inner.files.config().max_position_embeddings
    }
}

impl Drop for ClusterRunner {
    fn drop(&mut self) {
        for (request, plan) in std::mem::take(&mut self.used) {
            self.release(request, &plan);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::Hop;

    fn step(entry: &str, nodes: &[&str], hop: usize) -> StepRequest {
        StepRequest {
            entry: entry.into(),
            request: 1,
            model: String::new(),
            plan: Plan {
                hops: nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| Hop {
                        node: (*n).into(),
                        start: i,
                        end: i + 1,
                    })
                    .collect(),
            },
            hop: hop as u32,
            start_pos: 0,
            tokens: vec![],
            hidden: None,
            sample: false,
            head: None,
        }
    }

    /// Walks a step through a plan as the nodes do, and checks that the entry waits for a
    /// delivery exactly when the hop that ends the chain sends one.
    #[test]
    fn the_entry_expects_a_delivery_exactly_when_the_chain_end_sends_one() {
        let plans: [&[&str]; 6] = [
            &["a", "b"],
            &["b", "a"],
            &["a", "b", "c"],
            &["b", "a", "c"],
            &["b", "c", "a"],
            &["b", "c", "d", "a", "e"],
        ];
        for nodes in plans {
            for entry in ["a", "z"] {
                // The hops the entry sends to: the first remote one, and each one after a hop
                // of its own.
                let mut from = 0;
                while from < nodes.len() {
                    if nodes[from] == entry {
                        from += 1;
                        continue;
                    }
                    let end = chain_end(&step(entry, nodes, from), from);
                    assert_eq!(
                        answers_entry_directly(nodes[end], &step(entry, nodes, end)),
                        end > from,
                        "{nodes:?} entry {entry} from hop {from} to hop {end}"
                    );
                    from = end + 1;
                }
            }
        }
    }
}
