//! The llmesh cluster: node identity and cluster key, discovery and peer links (libp2p), the
//! topology each node sees, the deterministic partitioner, and the request pipeline across
//! nodes with replay on failure. A [`Node`] serves the same `InferenceService` interface as a
//! single process, so the HTTP API does not know how layers are placed.
#![deny(missing_docs)]

pub mod capability;
pub mod identity;
pub mod key;
pub mod net;
mod node;
pub mod partition;
mod pipeline;
mod service;
pub mod topology;
pub mod wire;

pub use node::{Node, NodeConfig, PlanState};
