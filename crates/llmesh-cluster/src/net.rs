//! The peer-to-peer network, in the shape of rust-libp2p's file-sharing example: [`start`]
//! returns a clonable [`NetClient`] that sends commands (each with a channel for its answer), a
//! stream of [`NetEvent`]s, and an event loop that owns the swarm. Nothing else touches the swarm.
//!
//! Transport: TCP, then the cluster key's private-network layer, then Noise, then yamux. Control
//! messages use request-response with our own bounded codec. Pipeline steps, on the hot path,
//! use long-lived streams (one per step in flight, kept in a pool per peer and reused), so a step
//! costs one message each way and no protocol negotiation.
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
    CTL_PROTOCOL, Codec, CtlRequest, CtlResponse, Delivery, STEP_PROTOCOL, StepMessage,
    StepRequest, StepResponse, read_msg, write_msg,
};

/// How long a step may take end to end (a long prompt chunk on a slow node).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The byte a node sends on a step stream it accepted.
const STREAM_GREETING: u8 = 0x4c;

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
    /// A peer sent a pipeline step; answer on the channel.
    Step(PeerId, Box<StepRequest>, oneshot::Sender<StepResponse>),
    /// A peer delivered the answer to a step this node sent; acknowledge on the channel.
    Deliver(PeerId, Box<Delivery>, oneshot::Sender<StepResponse>),
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
    RespondCtl(u64, CtlResponse),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Listening(oneshot::Sender<Vec<Multiaddr>>),
    Disconnect(PeerId),
}

/// Sends commands to the network task.
#[derive(Clone)]
pub struct NetClient {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    control: libp2p_stream::Control,
    /// Idle step streams per peer, ready for the next step.
    pool: std::sync::Arc<std::sync::Mutex<HashMap<PeerId, Vec<libp2p::Stream>>>>,
    rt: tokio::runtime::Handle,
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

    /// Sends a step and waits for the answer (async), on an idle stream to the peer or a new one.
    pub async fn step(&self, peer: PeerId, req: StepRequest) -> Result<StepResponse, NetError> {
        self.send_step_message(peer, StepMessage::Step(req)).await
    }

    /// Delivers the answer to a step to its entry node and waits for the acknowledgement.
    pub async fn deliver(&self, peer: PeerId, d: Delivery) -> Result<StepResponse, NetError> {
        self.send_step_message(peer, StepMessage::Deliver(d)).await
    }

    async fn send_step_message(
        &self,
        peer: PeerId,
        msg: StepMessage,
    ) -> Result<StepResponse, NetError> {
        let pooled = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(&peer).and_then(Vec::pop));
        if let Some(stream) = pooled {
            // A pooled stream the peer has since closed fails before anything was processed;
            // anything else is a real failure.
            match self.exchange(peer, stream, &msg).await {
                Err(NetError::Unreachable(e))
                    if e.contains("end of file") || e.contains("reset") =>
                {
                    tracing::debug!(%peer, "a pooled step stream was closed: {e}");
                }
                other => return other,
            }
        }
        let stream = self.open_step_stream(peer).await?;
        self.exchange(peer, stream, &msg).await
    }

    async fn exchange(
        &self,
        peer: PeerId,
        mut stream: libp2p::Stream,
        msg: &StepMessage,
    ) -> Result<StepResponse, NetError> {
        let exchange = async {
            write_msg(&mut stream, msg).await?;
            read_msg::<StepResponse, _>(&mut stream).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
            Ok(Ok(resp)) => {
                if let Ok(mut p) = self.pool.lock() {
                    p.entry(peer).or_default().push(stream);
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(NetError::Unreachable(format!("{peer}: {e}"))),
            Err(_) => Err(NetError::Unreachable(format!(
                "{peer}: no answer in {STEP_TIMEOUT:?}"
            ))),
        }
    }

    /// Opens a step stream and waits for the peer's greeting: a peer under load may drop an
    /// inbound stream it cannot accept yet (nothing was sent on it, so trying again is safe).
    async fn open_step_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetError> {
        use futures::AsyncReadExt;
        let mut last = String::new();
        for attempt in 0..8u64 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
            }
            let mut stream = match self.control.clone().open_stream(peer, STEP_PROTOCOL).await {
                Ok(s) => s,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let mut hello = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut hello)).await
            {
                Ok(Ok(())) if hello[0] == STREAM_GREETING => return Ok(stream),
                Ok(Ok(())) => last = "unexpected greeting".into(),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no greeting".into(),
            }
        }
        Err(NetError::Unreachable(format!(
            "{peer}: cannot open a step stream: {last}"
        )))
    }

    /// Sends a step and waits for the answer, from a thread outside the async runtime (a
    /// request's runner or a blocking task). The exchange runs on the calling thread, with the
    /// runtime driving the connection: no task to hand it to and no channel back, which saves
    /// two thread wake-ups per step.
    pub fn step_blocking(&self, peer: PeerId, req: StepRequest) -> Result<StepResponse, NetError> {
        self.rt.block_on(self.step(peer, req))
    }

    /// Answers a control message.
    pub async fn respond_ctl(&self, id: u64, resp: CtlResponse) {
        let _ = self.tx.send(Command::RespondCtl(id, resp)).await;
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
    stream: libp2p_stream::Behaviour,
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
        stream: libp2p_stream::Behaviour::new(),
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
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(STEP_PROTOCOL)
        .map_err(|_| "the step protocol is already registered".to_string())?;
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| "the network needs a tokio runtime".to_string())?;
    rt.spawn(serve_steps(incoming, ev_tx.clone()));
    Ok((
        NetClient {
            tx: cmd_tx,
            local,
            control,
            pool: Default::default(),
            rt,
        },
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            pending_ctl: HashMap::new(),
            inbound_ctl: HashMap::new(),
            next_id: 0,
            fingerprint: cfg.cluster_key.fingerprint(),
        },
    ))
}

/// Answers steps arriving on inbound streams: each stream carries one step at a time, for as
/// long as the peer keeps it.
async fn serve_steps(mut incoming: libp2p_stream::IncomingStreams, events: mpsc::Sender<NetEvent>) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let events = events.clone();
        tokio::spawn(async move {
            use futures::AsyncWriteExt;
            if stream.write_all(&[STREAM_GREETING]).await.is_err() || stream.flush().await.is_err()
            {
                return;
            }
            loop {
                let msg: StepMessage = match read_msg(&mut stream).await {
                    Ok(m) => m,
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            tracing::debug!(%peer, "step stream closed: {e}");
                        }
                        return;
                    }
                };
                let (tx, rx) = oneshot::channel();
                let event = match msg {
                    StepMessage::Step(req) => {
                        tracing::trace!(us = now_us(), "step request arrived");
                        NetEvent::Step(peer, Box::new(req), tx)
                    }
                    StepMessage::Deliver(d) => {
                        tracing::trace!(us = now_us(), "step answer delivered");
                        NetEvent::Deliver(peer, Box::new(d), tx)
                    }
                };
                if events.send(event).await.is_err() {
                    return;
                }
                let Ok(resp) = rx.await else { return };
                tracing::trace!(us = now_us(), "step response to send");
                if write_msg(&mut stream, &resp).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending_ctl: HashMap<OutboundRequestId, oneshot::Sender<Result<CtlResponse, NetError>>>,
    inbound_ctl: HashMap<u64, ResponseChannel<CtlResponse>>,
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
            Command::RespondCtl(id, resp) => {
                if let Some(ch) = self.inbound_ctl.remove(&id) {
                    let _ = self.swarm.behaviour_mut().ctl.send_response(ch, resp);
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
