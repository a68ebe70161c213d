//! The cluster behind the API: a node serves requests through the pipeline the plan gives, with
//! the same [`InferenceService`] interface a single process uses.

use std::sync::Arc;

use llmesh_engine::GenerateRequest;
use llmesh_engine::service::{
    Health, InferenceService, JobEvent, ModelHandle, NodeReport, PlanHopReport, ShardReport,
    SubmitError, TopologyReport,
};
use tokio::sync::mpsc;

use crate::node::{Node, PlanState};
use crate::wire::NodeInfo;

impl Node {
    fn report(&self, id: &str, info: &NodeInfo, is_self: bool) -> NodeReport {
        let a = &self.inner.advert;
        let model_layers = a.layers as usize;
        let shards: Vec<ShardReport> = info
            .loaded
            .iter()
            .map(|&(s, e)| ShardReport {
                model: self.inner.handle.id.clone(),
                start: s as usize,
                end: e as usize,
                total_layers: model_layers,
            })
            .collect();
        let weight_bytes = info.loaded.map_or(0, |(s, e)| {
            let mut b = u64::from(e - s) * a.layer_bytes;
            if s == 0 {
                b += a.first_bytes;
            }
            if e as usize == model_layers {
                b += a.last_bytes;
            }
            b
        });
        NodeReport {
            id: id.to_string(),
            name: info.name.clone(),
            backend: info.backend.clone(),
            is_self,
            memory_budget_bytes: info.memory_budget,
            memory_total_bytes: info.memory_total,
            weight_bytes,
            shards,
        }
    }
}

impl InferenceService for Node {
    fn models(&self) -> Vec<Arc<ModelHandle>> {
        vec![self.inner.handle.clone()]
    }

    fn submit(
        &self,
        model: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<JobEvent>, SubmitError> {
        if model != self.inner.handle.id {
            return Err(SubmitError::UnknownModel(model.to_string()));
        }
        match self.inner.pool.get() {
            Some(pool) => pool.submit(req),
            None => Err(SubmitError::Unavailable("the node is starting".into())),
        }
    }

    fn topology(&self) -> TopologyReport {
        let me = self.inner.info();
        let mut nodes = vec![self.report(&self.inner.me_s, &me, true)];
        let mut links = Vec::new();
        if let Ok(t) = self.inner.topo.lock() {
            for (id, info) in t.alive() {
                nodes.push(self.report(&id.to_string(), info, false));
                links.push(serde_json::json!({
                    "from": self.inner.me_s,
                    "to": id.to_string(),
                    "address": t.get(&id).and_then(|s| s.addr.as_ref()).map(|a| a.to_string()),
                }));
            }
        }
        let plan = match &*self.inner.plan_tx.borrow() {
            PlanState::Ready(p) => p
                .hops
                .iter()
                .map(|h| PlanHopReport {
                    node: h.node.clone(),
                    name: self.inner.node_name(&h.node),
                    start: h.start,
                    end: h.end,
                })
                .collect(),
            _ => Vec::new(),
        };
        let sent = serde_json::json!({
            "steps": self.inner.steps_sent.load(std::sync::atomic::Ordering::Relaxed),
            "bytes": self.inner.bytes_sent.load(std::sync::atomic::Ordering::Relaxed),
            "answers_delivered_here": self.inner.deliveries_taken.load(std::sync::atomic::Ordering::Relaxed),
        });
        TopologyReport {
            nodes,
            links,
            plan,
            sent,
        }
    }

    fn health(&self) -> Health {
        let mut h = self.inner.pool.get().map(|p| p.health()).unwrap_or(Health {
            ok: false,
            running: 0,
            queued: 0,
            reason: Some("starting".into()),
        });
        match &*self.inner.plan_tx.borrow() {
            PlanState::Ready(_) => {}
            PlanState::Waiting(r) | PlanState::Impossible(r) => {
                h.ok = false;
                h.reason = Some(r.clone());
            }
        }
        h
    }
}
