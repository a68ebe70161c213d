//! What this node knows of the cluster: its peers, whether they are alive, and what they offer.
//! A peer is alive while it is connected and answers heartbeats; a peer that fails a request is
//! left out for a while even before its connection drops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use crate::wire::NodeInfo;

/// Heartbeats a peer may miss before it is considered gone.
pub const MAX_MISSES: u32 = 3;
/// How long a peer that failed a request stays out of plans.
pub const FAILED_HOLD: Duration = Duration::from_secs(15);

/// One peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    /// What it last said about itself.
    pub info: Option<NodeInfo>,
    /// The address of the connection.
    pub addr: Option<Multiaddr>,
    /// Whether a connection is open.
    pub connected: bool,
    /// When it last answered.
    pub last_seen: Option<Instant>,
    /// Heartbeats missed in a row.
    pub misses: u32,
    /// Left out of plans until then (it failed a request).
    pub failed_until: Option<Instant>,
}

impl PeerState {
    /// Whether the peer can take part in plans.
    pub fn alive(&self, now: Instant) -> bool {
        self.connected
            && self.info.is_some()
            && self.misses < MAX_MISSES
            && self.failed_until.is_none_or(|t| now >= t)
    }
}

/// The peers of this node.
#[derive(Debug, Default)]
pub struct Topology {
    peers: HashMap<PeerId, PeerState>,
}

impl Topology {
    /// A connection to `peer` opened.
    pub fn connected(&mut self, peer: PeerId, addr: Multiaddr) {
        let p = self.peers.entry(peer).or_default();
        p.connected = true;
        p.addr = Some(addr);
        p.misses = 0;
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
        }
    }

    /// `peer` told us about itself.
    pub fn heard(&mut self, peer: PeerId, info: NodeInfo) {
        let p = self.peers.entry(peer).or_default();
        p.info = Some(info);
        p.last_seen = Some(Instant::now());
        p.misses = 0;
    }

    /// `peer` did not answer a heartbeat; returns whether it is now considered gone.
    pub fn missed(&mut self, peer: &PeerId) -> bool {
        match self.peers.get_mut(peer) {
            Some(p) => {
                p.misses += 1;
                p.misses == MAX_MISSES
            }
            None => false,
        }
    }

    /// `peer` failed a request: leave it out of plans for a while.
    pub fn failed(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.failed_until = Some(Instant::now() + FAILED_HOLD);
        }
    }

    /// Peers that can take part in plans, with what they said about themselves.
    pub fn alive(&self) -> Vec<(PeerId, &NodeInfo)> {
        let now = Instant::now();
        let mut v: Vec<(PeerId, &NodeInfo)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.alive(now))
            .filter_map(|(id, p)| p.info.as_ref().map(|i| (*id, i)))
            .collect();
        v.sort_by_key(|(id, _)| id.to_string());
        v
    }

    /// Peers with an open connection.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `peer` is connected.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.connected)
    }

    /// A peer's state.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerState> {
        self.peers.get(peer)
    }
}
