//! Partitioning: which node runs which layers. A pure, deterministic function of the model's
//! description and the nodes' capabilities, so every node that sees the same cluster computes the
//! same plan and weights stay where they were loaded.
//!
//! * [`Strategy::MemoryWeighted`] — exo's ring split: layers in proportion to memory, every node
//!   used. The baseline.
//! * [`Strategy::Latency`] (default) — minimise the time per token of one stream: each node's
//!   measured seconds per layer times its layers, the output head's share on the last node, plus
//!   a cost per hop, with every node's weights and KV cache within its memory. A node is added
//!   only when it lowers that time (or is needed for memory).

use serde::{Deserialize, Serialize};

/// What the partitioner needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Transformer blocks.
    pub layers: usize,
    /// Bytes of one block's weights.
    pub layer_bytes: u64,
    /// Bytes of KV cache reserved per block (for the tokens the node must be able to hold).
    pub kv_bytes_per_layer: u64,
    /// Extra bytes of the first shard (token embedding).
    pub first_bytes: u64,
    /// Extra bytes of the last shard (final norm and output head, or the tied embedding).
    pub last_bytes: u64,
}

/// What the partitioner needs to know about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Stable id (ties are broken by it).
    pub id: String,
    /// Bytes this node may use for weights and KV cache.
    pub memory: u64,
    /// Measured seconds to run one layer for one token.
    pub seconds_per_layer: f64,
}

/// One hop of a plan: a node and its layer range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hop {
    /// Node id.
    pub node: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// The ordered hops that together cover every layer once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Plan {
    /// Hops in pipeline order.
    pub hops: Vec<Hop>,
}

impl Plan {
    /// The range `node` holds, if it is in the plan.
    pub fn range_of(&self, node: &str) -> Option<(usize, usize)> {
        self.hops
            .iter()
            .find(|h| h.node == node)
            .map(|h| (h.start, h.end))
    }

    /// Estimated seconds per token of this plan for `model` on `nodes`, with `hop_seconds` per
    /// boundary: each node's layers at its measured speed, and the output head on the last node
    /// at the same speed per byte (a decode step reads every weight once, the head's as well).
    pub fn seconds_per_token(
        &self,
        model: &ModelSpec,
        nodes: &[NodeSpec],
        hop_seconds: f64,
    ) -> f64 {
        let speed = |id: &str| {
            nodes
                .iter()
                .find(|n| n.id == id)
                .map_or(0.0, |n| n.seconds_per_layer)
        };
        let layers: f64 = self
            .hops
            .iter()
            .map(|h| speed(&h.node) * (h.end - h.start) as f64)
            .sum();
        let head = self
            .hops
            .last()
            .map_or(0.0, |h| speed(&h.node) * model.head_layers());
        layers + head + hop_seconds * self.hops.len().saturating_sub(1) as f64
    }
}

impl ModelSpec {
    /// The output head's work per token in layers: its bytes over one layer's.
    pub fn head_layers(&self) -> f64 {
        self.last_bytes as f64 / self.layer_bytes.max(1) as f64
    }
}

/// How to split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Layers in proportion to memory (exo's ring strategy).
    MemoryWeighted,
    /// Minimum estimated time per token within memory.
    Latency,
}

impl Strategy {
    /// Parses `memory-weighted` or `latency`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "memory-weighted" | "memory" => Some(Strategy::MemoryWeighted),
            "latency" => Some(Strategy::Latency),
            _ => None,
        }
    }
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// No node can take part.
    #[error("no node is available to run the model")]
    NoNodes,
    /// The nodes together cannot hold the model.
    #[error(
        "the model needs {} for its weights and KV cache but the {nodes} node(s) have {}: at least {} more memory is needed",
        gib(*needed),
        gib(*available),
        gib(*missing)
    )]
    DoesNotFit {
        /// Bytes the whole model needs.
        needed: u64,
        /// Bytes the nodes may use together.
        available: u64,
        /// Bytes missing (at least one layer when the total would suffice but whole layers do
        /// not fit).
        missing: u64,
        /// Nodes considered.
        nodes: usize,
    },
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Computes the plan. `hop_seconds` is the estimated cost of passing activations between two
/// nodes for one token.
pub fn plan(
    model: &ModelSpec,
    nodes: &[NodeSpec],
    strategy: Strategy,
    hop_seconds: f64,
) -> Result<Plan, PlanError> {
    if nodes.is_empty() || model.layers == 0 {
        return Err(PlanError::NoNodes);
    }
    let mut nodes: Vec<NodeSpec> = nodes.to_vec();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes.dedup_by(|a, b| a.id == b.id);
    let plan = match strategy {
        Strategy::MemoryWeighted => memory_weighted(model, &nodes),
        Strategy::Latency => latency(model, &nodes, hop_seconds),
    };
    plan.ok_or_else(|| does_not_fit(model, &nodes))
}

fn per_layer(model: &ModelSpec) -> u64 {
    (model.layer_bytes + model.kv_bytes_per_layer).max(1)
}

fn does_not_fit(model: &ModelSpec, nodes: &[NodeSpec]) -> PlanError {
    let needed = per_layer(model) * model.layers as u64 + model.first_bytes + model.last_bytes;
    let available: u64 = nodes.iter().map(|n| n.memory).sum();
    let missing = if available >= needed {
        per_layer(model)
    } else {
        needed - available
    };
    PlanError::DoesNotFit {
        needed,
        available,
        missing,
        nodes: nodes.len(),
    }
}

/// Layers node `i` of an ordered set of `k` can hold.
fn capacity(model: &ModelSpec, node: &NodeSpec, i: usize, k: usize) -> usize {
    let mut extra = 0;
    if i == 0 {
        extra += model.first_bytes;
    }
    if i + 1 == k {
        extra += model.last_bytes;
    }
    (node.memory.saturating_sub(extra) / per_layer(model)) as usize
}

/// Lays out counts per node (in the given order) as contiguous hops, skipping empty ones.
fn layout(nodes: &[&NodeSpec], counts: &[usize]) -> Plan {
    let mut hops = Vec::new();
    let mut at = 0;
    for (n, &c) in nodes.iter().zip(counts) {
        if c > 0 {
            hops.push(Hop {
                node: n.id.clone(),
                start: at,
                end: at + c,
            });
            at += c;
        }
    }
    Plan { hops }
}

fn memory_weighted(model: &ModelSpec, nodes: &[NodeSpec]) -> Option<Plan> {
    let total: u128 = nodes.iter().map(|n| u128::from(n.memory)).sum();
    if total == 0 {
        return None;
    }
    let n = model.layers;
    // Largest remainder: floor shares, then hand out the rest by largest fraction (ties by id).
    let mut counts: Vec<usize> = nodes
        .iter()
        .map(|m| ((u128::from(m.memory) * n as u128) / total) as usize)
        .collect();
    let mut rest: Vec<(u128, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(i, m)| ((u128::from(m.memory) * n as u128) % total, i))
        .collect();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let assigned: usize = counts.iter().sum();
    for &(_, i) in rest.iter().take(n - assigned) {
        counts[i] += 1;
    }
    // The proportional split ignores the embedding and head; move layers off nodes that
    // overflow to the nearest ones with room, keeping the order.
    let used: Vec<&NodeSpec> = nodes.iter().collect();
    fix_overflow(model, &used, &mut counts)?;
    Some(layout(&used, &counts))
}

fn fix_overflow(model: &ModelSpec, nodes: &[&NodeSpec], counts: &mut [usize]) -> Option<()> {
    let active =
        |counts: &[usize]| -> Vec<usize> { (0..counts.len()).filter(|&i| counts[i] > 0).collect() };
    for _ in 0..model.layers * nodes.len() + 1 {
        let act = active(counts);
        let caps: Vec<usize> = act
            .iter()
            .enumerate()
            .map(|(pos, &i)| capacity(model, nodes[i], pos, act.len()))
            .collect();
        let over = act
            .iter()
            .zip(&caps)
            .find(|(i, c)| counts[**i] > **c)
            .map(|(i, _)| *i);
        let Some(i) = over else { return Some(()) };
        let room = |j: usize| {
            let pos = act.iter().position(|&x| x == j);
            let cap = match pos {
                Some(p) => caps[p],
                None => capacity(model, nodes[j], 1, 3),
            };
            counts[j] < cap
        };
        let target = (1..nodes.len())
            .flat_map(|d| [i.checked_sub(d), Some(i + d)])
            .flatten()
            .find(|&j| j < nodes.len() && room(j))?;
        counts[i] -= 1;
        counts[target] += 1;
    }
    None
}

fn latency(model: &ModelSpec, nodes: &[NodeSpec], hop_seconds: f64) -> Option<Plan> {
    let n = nodes.len();
    let mut best: Option<(f64, usize, Vec<usize>, Plan)> = None;
    let mut consider = |subset: Vec<usize>| {
        let members: Vec<&NodeSpec> = subset.iter().map(|&i| &nodes[i]).collect();
        for (alternative, chosen) in pipeline_orders(model, members) {
            let Some(counts) = fill_by_speed(model, &chosen) else {
                continue;
            };
            let plan = layout(&chosen, &counts);
            if plan.hops.len() != chosen.len() {
                continue; // a node with no layers is not part of this subset's plan
            }
            // Moving the head to a faster node must not leave it fewer layers than a slower
            // node with as much memory.
            if alternative && !faster_nodes_hold_as_many(nodes, &plan) {
                continue;
            }
            let cost = plan.seconds_per_token(model, nodes, hop_seconds);
            let better = match &best {
                None => true,
                Some((c, k, ids, _)) => {
                    // Prefer lower time; within 0.1% prefer fewer nodes, then lower ids, then
                    // the first order tried.
                    let eps = 1e-3 * c.abs().max(1e-12);
                    cost < c - eps
                        || ((cost - c).abs() <= eps && (chosen.len(), &subset) < (*k, ids))
                }
            };
            if better {
                best = Some((cost, chosen.len(), subset.clone(), plan));
            }
        }
    };
    if n <= 12 {
        for mask in 1u32..(1 << n) {
            consider((0..n).filter(|i| mask & (1 << i) != 0).collect());
        }
    } else {
        // Too many subsets: the fastest k nodes for each k.
        let mut by_speed: Vec<usize> = (0..n).collect();
        by_speed.sort_by(|&a, &b| {
            nodes[a]
                .seconds_per_layer
                .total_cmp(&nodes[b].seconds_per_layer)
                .then(a.cmp(&b))
        });
        for k in 1..=n {
            let mut s = by_speed[..k].to_vec();
            s.sort();
            consider(s);
        }
    }
    best.map(|b| b.3)
}

/// The pipeline orders worth trying for the chosen nodes, the first with `false`, the rest
/// with `true`. First: the embedding (first position) and output head (last) on the slowest
/// nodes, the smaller of the two on the faster of those, so that the fastest have the most room
/// for layers. Then that order with the last node swapped for each other one: the head is work
/// for its node every token, worth a faster node when it is large (a big vocabulary).
fn pipeline_orders<'a>(
    model: &ModelSpec,
    chosen: Vec<&'a NodeSpec>,
) -> Vec<(bool, Vec<&'a NodeSpec>)> {
    let first = pipeline_order(model, chosen);
    let k = first.len();
    let mut orders = vec![(false, first.clone())];
    for i in 0..k.saturating_sub(1) {
        let mut order = first.clone();
        order.swap(i, k - 1);
        orders.push((true, order));
    }
    orders
}

/// Whether every node of the cluster holds at least as many layers in `plan` as each slower
/// node with the same memory.
fn faster_nodes_hold_as_many(nodes: &[NodeSpec], plan: &Plan) -> bool {
    let layers = |id: &str| plan.range_of(id).map_or(0, |(s, e)| e - s);
    nodes.iter().all(|a| {
        nodes.iter().all(|b| {
            a.memory != b.memory
                || a.seconds_per_layer >= b.seconds_per_layer
                || layers(&a.id) >= layers(&b.id)
        })
    })
}

/// Orders the chosen nodes so that the fastest have the most room: the embedding (first) and
/// output head (last) go to the slowest nodes, the smaller of the two to the faster of those.
fn pipeline_order<'a>(model: &ModelSpec, mut chosen: Vec<&'a NodeSpec>) -> Vec<&'a NodeSpec> {
    let k = chosen.len();
    chosen.sort_by(|a, b| {
        a.seconds_per_layer
            .total_cmp(&b.seconds_per_layer)
            .then(a.id.cmp(&b.id))
    });
    let extra = |pos: usize| {
        let mut e = 0;
        if pos == 0 {
            e += model.first_bytes;
        }
        if pos + 1 == k {
            e += model.last_bytes;
        }
        e
    };
    let mut positions: Vec<usize> = (0..k).collect();
    positions.sort_by_key(|&p| (extra(p), p));
    let mut ordered: Vec<Option<&NodeSpec>> = vec![None; k];
    for (node, &pos) in chosen.into_iter().zip(&positions) {
        ordered[pos] = Some(node);
    }
    ordered.into_iter().flatten().collect()
}

/// Counts per node (nodes in pipeline order) minimising compute time: fastest nodes filled to
/// capacity first; every node gets at least one layer. `None` if they cannot hold the model.
fn fill_by_speed(model: &ModelSpec, nodes: &[&NodeSpec]) -> Option<Vec<usize>> {
    let k = nodes.len();
    if k > model.layers {
        return None;
    }
    let caps: Vec<usize> = (0..k).map(|i| capacity(model, nodes[i], i, k)).collect();
    if caps.contains(&0) || caps.iter().sum::<usize>() < model.layers {
        return None;
    }
    let mut counts = vec![1usize; k];
    let mut left = model.layers - k;
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| {
        nodes[a]
            .seconds_per_layer
            .total_cmp(&nodes[b].seconds_per_layer)
            .then(nodes[a].id.cmp(&nodes[b].id))
    });
    for i in order {
        let take = (caps[i] - counts[i]).min(left);
        counts[i] += take;
        left -= take;
    }
    (left == 0).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const GIB: u64 = 1 << 30;

    fn model(layers: usize) -> ModelSpec {
        ModelSpec {
            layers,
            layer_bytes: 200 << 20,
            kv_bytes_per_layer: 8 << 20,
            first_bytes: 250 << 20,
            last_bytes: 250 << 20,
        }
    }

    fn node(id: &str, memory: u64, spl: f64) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            memory,
            seconds_per_layer: spl,
        }
    }

    fn check_valid(model: &ModelSpec, nodes: &[NodeSpec], plan: &Plan) {
        // Every layer covered exactly once, in order.
        let mut at = 0;
        for h in &plan.hops {
            assert_eq!(h.start, at, "{plan:?}");
            assert!(h.end > h.start, "{plan:?}");
            at = h.end;
        }
        assert_eq!(at, model.layers, "{plan:?}");
        // No node twice, none over its memory.
        let k = plan.hops.len();
        for (i, h) in plan.hops.iter().enumerate() {
            assert_eq!(plan.hops.iter().filter(|x| x.node == h.node).count(), 1);
            let n = nodes.iter().find(|n| n.id == h.node).unwrap();
            let mut bytes = (h.end - h.start) as u64 * per_layer(model);
            if i == 0 {
                bytes += model.first_bytes;
            }
            if i + 1 == k {
                bytes += model.last_bytes;
            }
            assert!(
                bytes <= n.memory,
                "{} holds {bytes} > {}: {plan:?}",
                n.id,
                n.memory
            );
        }
    }

    fn random_case(rng: &mut rand_chacha::ChaCha8Rng) -> (ModelSpec, Vec<NodeSpec>) {
        let m = model(rng.random_range(1..=80));
        let k = rng.random_range(1..=7);
        let nodes = (0..k)
            .map(|i| {
                node(
                    &format!("node-{}", rng.random_range(0..1000) * 10 + i),
                    rng.random_range(1..=24) * GIB / 2,
                    rng.random_range(1..=100) as f64 * 1e-4,
                )
            })
            .collect();
        (m, nodes)
    }

    #[test]
    fn plans_cover_every_layer_once_and_fit_memory() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut planned = 0;
        for _ in 0..3000 {
            let (m, nodes) = random_case(&mut rng);
            for strategy in [Strategy::Latency, Strategy::MemoryWeighted] {
                match plan(&m, &nodes, strategy, 0.002) {
                    Ok(p) => {
                        check_valid(&m, &nodes, &p);
                        planned += 1;
                    }
                    Err(PlanError::DoesNotFit { missing, .. }) => assert!(missing > 0),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(planned > 3000, "too few cases fit: {planned}");
    }

    #[test]
    fn the_same_inputs_in_any_order_give_the_same_plan() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for _ in 0..1000 {
            let (m, nodes) = random_case(&mut rng);
            let mut shuffled = nodes.clone();
            shuffled.reverse();
            shuffled.rotate_left(rng.random_range(0..nodes.len()));
            for strategy in [Strategy::Latency, Strategy::MemoryWeighted] {
                assert_eq!(
                    plan(&m, &nodes, strategy, 0.002),
                    plan(&m, &shuffled, strategy, 0.002)
                );
            }
        }
    }

    #[test]
    fn a_faster_node_gets_at_least_as_many_layers_as_a_slower_one_with_equal_memory() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let m = model(rng.random_range(2..=64));
            let mem = rng.random_range(1..=16) * GIB / 2;
            let (fast, slow) = (
                rng.random_range(1..50) as f64 * 1e-4,
                rng.random_range(50..100) as f64 * 1e-4,
            );
            let mut nodes = vec![node("a", mem, fast), node("b", mem, slow)];
            for i in 0..rng.random_range(0..3) {
                nodes.push(node(
                    &format!("c{i}"),
                    rng.random_range(1..=16) * GIB / 2,
                    rng.random_range(1..100) as f64 * 1e-4,
                ));
            }
            let Ok(p) = plan(
                &m,
                &nodes,
                Strategy::Latency,
                rng.random_range(0..5) as f64 * 1e-3,
            ) else {
                continue;
            };
            let layers = |id: &str| p.range_of(id).map_or(0, |(s, e)| e - s);
            assert!(layers("a") >= layers("b"), "{p:?} with {nodes:?}");
        }
    }

    #[test]
    fn latency_uses_one_node_when_it_holds_the_model() {
        let m = model(16);
        let nodes = [node("a", 8 * GIB, 1e-3), node("b", 8 * GIB, 1e-3)];
        let p = plan(&m, &nodes, Strategy::Latency, 0.001).unwrap();
        assert_eq!(p.hops.len(), 1);
        // A much faster second node is worth a hop.
        let nodes = [node("a", 8 * GIB, 4e-3), node("b", 2 * GIB, 1e-3)];
        let p = plan(&m, &nodes, Strategy::Latency, 0.001).unwrap();
        assert_eq!(p.hops.len(), 2, "{p:?}");
    }

    #[test]
    fn a_large_output_head_goes_to_the_faster_node() {
        // The head reads as many bytes as six layers (a large vocabulary); neither node holds
        // the whole model, each holds ten layers besides the embedding or the head.
        let m = ModelSpec {
            layer_bytes: 100 << 20,
            first_bytes: 600 << 20,
            last_bytes: 600 << 20,
            ..model(16)
        };
        let nodes = [node("a", 1700 << 20, 1e-3), node("b", 1700 << 20, 4e-3)];
        let p = plan(&m, &nodes, Strategy::Latency, 0.0).unwrap();
        check_valid(&m, &nodes, &p);
        let hops: Vec<(&str, usize, usize)> = p
            .hops
            .iter()
            .map(|h| (h.node.as_str(), h.start, h.end))
            .collect();
        // a: 10 layers and the head (16 ms); b: 6 layers (24 ms). With the head on b instead:
        // 10 ms on a and 6 + 6 layers' worth on b (48 ms).
        assert_eq!(hops, [("b", 0, 6), ("a", 6, 16)]);
        assert!((p.seconds_per_token(&m, &nodes, 0.0) - 0.040).abs() < 1e-9);
        let head_on_b = Plan {
            hops: vec![
                Hop {
                    node: "a".into(),
                    start: 0,
                    end: 10,
                },
                Hop {
                    node: "b".into(),
                    start: 10,
                    end: 16,
                },
            ],
        };
        assert!((head_on_b.seconds_per_token(&m, &nodes, 0.001) - 0.059).abs() < 1e-9);
    }

    #[test]
    fn memory_weighted_splits_by_memory() {
        let m = ModelSpec {
            first_bytes: 0,
            last_bytes: 0,
            ..model(12)
        };
        let nodes = [
            node("a", 4 * GIB, 1e-3),
            node("b", 2 * GIB, 1e-3),
            node("c", 2 * GIB, 1e-3),
        ];
        let p = plan(&m, &nodes, Strategy::MemoryWeighted, 0.0).unwrap();
        let sizes: Vec<usize> = p.hops.iter().map(|h| h.end - h.start).collect();
        assert_eq!(sizes, vec![6, 3, 3]);
    }

    #[test]
    fn a_model_that_fits_nowhere_names_the_shortfall() {
        let m = model(40);
        let nodes = [node("a", GIB, 1e-3), node("b", GIB, 1e-3)];
        let err = plan(&m, &nodes, Strategy::Latency, 0.001)
            .unwrap_err()
            .to_string();
        // 40 × 208 MiB + 500 MiB = 8.61 GiB needed, 2 GiB available.
        assert_eq!(
            err,
            "the model needs 8.61 GiB for its weights and KV cache but the 2 node(s) have 2.00 GiB: at least 6.61 GiB more memory is needed"
        );
    }
}
