//! The llmesh cluster.
#![deny(missing_docs)]

pub mod partition;
