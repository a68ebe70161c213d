//! The peer-to-peer network, in the shape of rust-libp2p's file-sharing example: [`start`]
//! returns a clonable [`NetClient`] that sends commands (each with a channel for its answer), a
//! stream of [`NetEvent`]s, and an event loop that owns the swarm. Nothing else touches the swarm.
//!
//! Transport: TCP, then the cluster key's private-network layer, then Noise, then yamux. Control
//! messages and pipeline steps are request-response protocols with our own bounded codec.
//! Discovery: mDNS (optional) and explicit peer addresses, redialled until connected.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::PnetConfig;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

use crate::key::ClusterKey;
use crate::wire::{
    CTL_PROTOCOL, Codec, CtlRequest, CtlResponse, STEP_PROTOCOL, StepRequest, StepResponse,
};

/// How long a step may take end to end (a long prompt chunk on a slow node).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a control message may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// The peer could not be reached or the connection broke.
    #[error("{0}")]
    Unreachable(String),
    /// The network task has stopped.
    #[error("the network has stopped")]
    Stopped,
}

/// Something that happened on the network.
#[derive(Debug)]
pub enum NetEvent {
    /// A connection to a peer is up (the first one).
    Connected(PeerId, Multiaddr),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// mDNS found a peer.
    Discovered(PeerId, Multiaddr),
    /// mDNS no longer sees a peer.
    Expired(PeerId),
    /// A peer sent a control message; answer with [`NetClient::respond_ctl`].
    Ctl(PeerId, CtlRequest, u64),
    /// A peer sent a pipeline step; answer with [`NetClient::respond_step`].
    Step(PeerId, Box<StepRequest>, u64),
    /// A connection failed before it was established (wrong cluster key, not llmesh, down).
    ConnectFailed(Option<PeerId>, String),
    /// Listening on a new address.
    Listening(Multiaddr),
}

enum Command {
    Dial(Multiaddr, Option<PeerId>),
    Ctl(
        PeerId,
        CtlRequest,
        oneshot::Sender<Result<CtlResponse, NetError>>,
    ),
    Step(
        PeerId,
        Box<StepRequest>,
        oneshot::Sender<Result<StepResponse, NetError>>,
    ),
    RespondCtl(u64, CtlResponse),
    RespondStep(u64, Box<StepResponse>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Listening(oneshot::Sender<Vec<Multiaddr>>),
    Disconnect(PeerId),
}

/// Sends commands to the network task.
#[derive(Clone)]
pub struct NetClient {
    tx: mpsc::Sender<Command>,
    local: PeerId,
}

impl NetClient {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr, peer: Option<PeerId>) {
        let _ = self.tx.send(Command::Dial(addr, peer)).await;
    }

    /// Sends a control message and waits for the answer.
    pub async fn ctl(&self, peer: PeerId, req: CtlRequest) -> Result<CtlResponse, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Ctl(peer, req, tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Sends a step and waits for the answer (async).
    pub async fn step(&self, peer: PeerId, req: StepRequest) -> Result<StepResponse, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Step(peer, Box::new(req), tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Sends a step and waits for the answer, from a thread outside the async runtime.
    pub fn step_blocking(&self, peer: PeerId, req: StepRequest) -> Result<StepResponse, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::Step(peer, Box::new(req), tx))
            .map_err(|_| NetError::Stopped)?;
        rx.blocking_recv().map_err(|_| NetError::Stopped)?
    }

    /// Answers a control message.
    pub async fn respond_ctl(&self, id: u64, resp: CtlResponse) {
        let _ = self.tx.send(Command::RespondCtl(id, resp)).await;
    }

    /// Answers a step (callable from any thread outside the runtime).
    pub fn respond_step_blocking(&self, id: u64, resp: StepResponse) {
        let _ = self
            .tx
            .blocking_send(Command::RespondStep(id, Box::new(resp)));
    }

    /// Answers a step.
    pub async fn respond_step(&self, id: u64, resp: StepResponse) {
        let _ = self.tx.send(Command::RespondStep(id, Box::new(resp))).await;
    }

    /// Peers with an open connection.
    pub async fn connected(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Connected(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Addresses this node listens on.
    pub async fn listening(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Listening(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Closes every connection to a peer.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.tx.send(Command::Disconnect(peer)).await;
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    ctl: request_response::Behaviour<Codec<CtlRequest, CtlResponse>>,
    step: request_response::Behaviour<Codec<StepRequest, StepResponse>>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Network settings.
pub struct NetConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// The cluster key.
    pub cluster_key: ClusterKey,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Whether to discover peers with mDNS.
    pub mdns: bool,
}

fn transport(
    keypair: &Keypair,
    key: &ClusterKey,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let psk = key.psk();
    let noise = noise::Config::new(keypair)?;
    let mut yamux = yamux::Config::default();
    yamux.set_max_num_streams(1024);
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(Duration::from_secs(20))
            .boxed(),
    )
}

/// Starts the network: returns the client, the event stream, and the task to spawn.
pub fn start(cfg: NetConfig) -> Result<(NetClient, mpsc::Receiver<NetEvent>, EventLoop), String> {
    let local = cfg.keypair.public().to_peer_id();
    let transport = transport(&cfg.keypair, &cfg.cluster_key).map_err(|e| format!("noise: {e}"))?;
    let mdns = if cfg.mdns {
        let mcfg = mdns::Config {
            ttl: Duration::from_secs(30),
            query_interval: Duration::from_secs(3),
            ..Default::default()
        };
        Some(mdns::tokio::Behaviour::new(mcfg, local).map_err(|e| format!("mDNS: {e}"))?)
    } else {
        None
    };
    let behaviour = Behaviour {
        ctl: request_response::Behaviour::with_codec(
            Codec::default(),
            [(CTL_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(CTL_TIMEOUT),
        ),
        step: request_response::Behaviour::with_codec(
            Codec::default(),
            [(STEP_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(STEP_TIMEOUT)
                .with_max_concurrent_streams(1024),
        ),
        mdns: Toggle::from(mdns),
        identify: identify::Behaviour::new(identify::Config::new(
            "/llmesh/id/1".into(),
            cfg.keypair.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| e.to_string())?
        .with_behaviour(|_| behaviour)
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    for addr in cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    Ok((
        NetClient { tx: cmd_tx, local },
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            pending_ctl: HashMap::new(),
            pending_step: HashMap::new(),
            inbound_ctl: HashMap::new(),
            inbound_step: HashMap::new(),
            next_id: 0,
            fingerprint: cfg.cluster_key.fingerprint(),
        },
    ))
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending_ctl: HashMap<OutboundRequestId, oneshot::Sender<Result<CtlResponse, NetError>>>,
    pending_step: HashMap<OutboundRequestId, oneshot::Sender<Result<StepResponse, NetError>>>,
    inbound_ctl: HashMap<u64, ResponseChannel<CtlResponse>>,
    inbound_step: HashMap<u64, ResponseChannel<StepResponse>>,
    next_id: u64,
    fingerprint: String,
}

impl EventLoop {
    /// Runs until every client is dropped.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr, peer) => {
                if let Some(p) = peer
                    && (self.swarm.is_connected(&p) || p == *self.swarm.local_peer_id())
                {
                    return;
                }
                let opts = match peer {
                    Some(p) => libp2p::swarm::dial_opts::DialOpts::peer_id(p)
                        .addresses(vec![addr.clone()])
                        .build(),
                    None => libp2p::swarm::dial_opts::DialOpts::unknown_peer_id()
                        .address(addr.clone())
                        .build(),
                };
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%addr, "dial failed: {e}");
                }
            }
            Command::Ctl(peer, req, reply) => {
                let id = self.swarm.behaviour_mut().ctl.send_request(&peer, req);
                self.pending_ctl.insert(id, reply);
            }
            Command::Step(peer, req, reply) => {
                tracing::trace!(us = now_us(), "step command to send");
                let id = self.swarm.behaviour_mut().step.send_request(&peer, *req);
                self.pending_step.insert(id, reply);
            }
            Command::RespondCtl(id, resp) => {
                if let Some(ch) = self.inbound_ctl.remove(&id) {
                    let _ = self.swarm.behaviour_mut().ctl.send_response(ch, resp);
                }
            }
            Command::RespondStep(id, resp) => {
                tracing::trace!(us = now_us(), "step response to send");
                if let Some(ch) = self.inbound_step.remove(&id) {
                    let _ = self.swarm.behaviour_mut().step.send_response(ch, *resp);
                }
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Listening(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    async fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                emit(&self.events, NetEvent::Listening(address)).await
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } if num_established.get() == 1 => {
                let addr = endpoint.get_remote_address().clone();
                self.swarm.add_peer_address(peer_id, addr.clone());
                emit(&self.events, NetEvent::Connected(peer_id, addr)).await;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                emit(&self.events, NetEvent::Disconnected(peer_id)).await;
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let msg = error.to_string();
                if is_handshake_failure(&msg) {
                    tracing::warn!(
                        "could not connect to {}: the encrypted handshake failed ({msg}). If it is an llmesh node, it uses a different cluster key (this node's key fingerprint is {})",
                        peer_id.map_or("a peer".to_string(), |p| p.to_string()),
                        self.fingerprint
                    );
                } else {
                    tracing::debug!(?peer_id, "outgoing connection failed: {msg}");
                }
                emit(&self.events, NetEvent::ConnectFailed(peer_id, msg)).await;
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                let msg = error.to_string();
                tracing::warn!(
                    "refused a connection from {send_back_addr}: the encrypted handshake failed ({msg}). It does not have this cluster's key (fingerprint {}), or is not an llmesh node",
                    self.fingerprint
                );
                emit(&self.events, NetEvent::ConnectFailed(None, msg)).await;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    emit(&self.events, NetEvent::Discovered(peer, addr)).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                for (peer, _) in list {
                    emit(&self.events, NetEvent::Expired(peer)).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ctl(ev)) => self.on_ctl(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::Step(ev)) => self.on_step(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            _ => {}
        }
    }

    async fn on_ctl(&mut self, ev: request_response::Event<CtlRequest, CtlResponse>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.next_id += 1;
                    self.inbound_ctl.insert(self.next_id, channel);
                    emit(&self.events, NetEvent::Ctl(peer, request, self.next_id)).await;
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(tx) = self.pending_ctl.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(tx) = self.pending_ctl.remove(&request_id) {
                    let _ = tx.send(Err(NetError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }

    async fn on_step(&mut self, ev: request_response::Event<StepRequest, StepResponse>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    tracing::trace!(us = now_us(), "step request arrived");
                    self.next_id += 1;
                    self.inbound_step.insert(self.next_id, channel);
                    emit(
                        &self.events,
                        NetEvent::Step(peer, Box::new(request), self.next_id),
                    )
                    .await;
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    tracing::trace!(us = now_us(), "step response arrived");
                    if let Some(tx) = self.pending_step.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(tx) = self.pending_step.remove(&request_id) {
                    let _ = tx.send(Err(NetError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }
}

/// Whether a connection failed inside the encrypted handshake (as with another cluster key),
/// rather than before it (the peer is down or unreachable).
fn is_handshake_failure(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    // The other side hangs up inside the handshake when it cannot decrypt what we send.
    if m.contains("handshake failed") {
        return true;
    }
    let down = ["refused", "unreachable", "timed out", "timeout", "no route"];
    if down.iter().any(|d| m.contains(d)) {
        return false;
    }
    m.contains("noise")
        || m.contains("handshake")
        || m.contains("decrypt")
        || m.contains("multistream")
        || m.contains("protocol")
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// Parses `host:port` or a multiaddr into a multiaddr.
pub fn parse_address(s: &str) -> Result<Multiaddr, String> {
    if s.starts_with('/') {
        return s
            .parse()
            .map_err(|e| format!("`{s}` is not a valid multiaddr: {e}"));
    }
    use std::net::ToSocketAddrs;
    let sock = s
        .to_socket_addrs()
        .map_err(|e| format!("`{s}` is not host:port: {e}"))?
        .next()
        .ok_or_else(|| format!("`{s}` did not resolve to an address"))?;
    let ip = match sock.ip() {
        std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
        std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/tcp/{}", sock.port())
        .parse()
        .map_err(|e| format!("{e}"))
}

async fn emit(events: &mpsc::Sender<NetEvent>, ev: NetEvent) {
    let _ = events.send(ev).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_down_peer_is_not_reported_as_a_key_mismatch() {
        assert!(!super::is_handshake_failure(
            "Failed to negotiate transport protocol(s): [(/ip4/127.0.0.1/tcp/1: : Connection refused (os error 111))]"
        ));
        assert!(super::is_handshake_failure(
            "Failed to negotiate transport protocol(s): noise: decrypt error"
        ));
        // What a dialler sees when the listener has another cluster key.
        assert!(super::is_handshake_failure(
            "Failed to negotiate transport protocol(s): [(/ip4/127.0.0.1/tcp/47801: : Handshake failed: Handshake failed: Connection reset by peer (os error 104))]"
        ));
    }

    #[test]
    fn addresses_parse_as_host_port_or_multiaddr() {
        assert_eq!(
            super::parse_address("127.0.0.1:4000").unwrap().to_string(),
            "/ip4/127.0.0.1/tcp/4000"
        );
        assert_eq!(
            super::parse_address("/ip4/10.0.0.2/tcp/47480")
                .unwrap()
                .to_string(),
            "/ip4/10.0.0.2/tcp/47480"
        );
        assert!(super::parse_address("nonsense").is_err());
    }
}
