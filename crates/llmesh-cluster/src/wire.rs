//! Messages between nodes and how they travel: postcard-encoded, length-prefixed, with an
//! explicit size limit (the stock request-response codecs cap messages at 1 or 10 MiB; a long
//! prompt's activations are sent in bounded chunks instead, see `pipeline`).

use std::io;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::StreamProtocol;
use llmesh_engine::head::{HeadSpec, StepOutput};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::partition::Plan;

/// Largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 96 << 20;

/// What a node serves: enough for others to plan with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAdvert {
    /// The id clients name.
    pub id: String,
    /// Identifies the exact weights: nodes with equal fingerprints hold the same model.
    pub fingerprint: String,
    /// Layers of the model.
    pub layers: u32,
    /// Bytes of one layer's weights in memory.
    pub layer_bytes: u64,
    /// Bytes of KV cache one layer needs per token.
    pub kv_bytes_per_token_layer: u64,
    /// Bytes of the embedding (first shard).
    pub first_bytes: u64,
    /// Bytes of the final norm and output head (last shard).
    pub last_bytes: u64,
    /// Measured seconds to run one layer for one token on this node.
    pub seconds_per_layer: f64,
}

/// What a node tells its peers about itself, on connecting and with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Human-readable name.
    pub name: String,
    /// llmesh version.
    pub version: String,
    /// `cpu`, `cuda` or `metal`.
    pub backend: String,
    /// Bytes this node may use for weights and KV cache.
    pub memory_budget: u64,
    /// Bytes of memory of the device.
    pub memory_total: u64,
    /// The model it can serve.
    pub model: Option<ModelAdvert>,
    /// Layers loaded now, `[start, end)`, and the plan they were loaded for.
    pub loaded: Option<(u32, u32)>,
    /// Addresses it listens on, for peers to dial.
    pub listen: Vec<String>,
    /// Its HTTP address, if it serves the API.
    pub http: Option<String>,
    /// Peers it is connected to, with their addresses (peer exchange).
    pub peers: Vec<(String, Vec<String>)>,
}

/// Control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CtlRequest {
    /// Here is who I am (sent on connect and as a heartbeat); reply with who you are.
    Hello(Box<NodeInfo>),
    /// Forget the state of a request (it finished or moved to another plan).
    Release {
        /// The node that started the request.
        entry: String,
        /// Its id there.
        request: u64,
    },
}

/// Replies to control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CtlResponse {
    /// Who I am.
    Hello(Box<NodeInfo>),
    /// Done.
    Ok,
}

/// Hidden states in transit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Positions.
    pub rows: u32,
    /// Width.
    pub cols: u32,
    /// Element type of `data`.
    pub dtype: WireDtype,
    /// Little-endian elements.
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

/// Element types on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDtype {
    /// 32-bit float (exact).
    F32,
    /// 16-bit float (half the bytes).
    F16,
    /// bfloat16.
    BF16,
}

impl WireDtype {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(WireDtype::F32),
            "f16" => Some(WireDtype::F16),
            "bf16" => Some(WireDtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::BF16 => 2,
        }
    }
}

mod serde_bytes_compat {
    //! Encodes a byte vector as one length-prefixed blob instead of a sequence of integers.
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

/// One step of a request at one hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The node that started the request (peer id).
    pub entry: String,
    /// The request's id at the entry node.
    pub request: u64,
    /// The model's fingerprint.
    pub model: String,
    /// The pipeline.
    pub plan: Plan,
    /// Which hop of the plan receives this message.
    pub hop: u32,
    /// Position of the first token of this step in the sequence.
    pub start_pos: u32,
    /// The step's token ids (the first hop embeds them; the last hop needs them for
    /// prompt log-probabilities).
    pub tokens: Vec<u32>,
    /// Hidden states from the previous hop.
    pub hidden: Option<WireTensor>,
    /// Whether the last hop should choose the next token.
    pub sample: bool,
    /// How the last hop sets up the request's head (sent with the first step).
    pub head: Option<HeadSpec>,
}

/// Why a step failed, as the entry node needs to know to react.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepError {
    /// The hop does not hold the layers the plan gives it (yet): wait or re-plan.
    NotReady(String),
    /// The hop has no state for this request at this position: replay it.
    StateLost(String),
    /// A later hop could not be reached: drop that node and replay.
    Unreachable {
        /// The node that failed.
        peer: String,
        /// What happened.
        detail: String,
    },
    /// The computation failed (a bug or a bad request): give up.
    Failed(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::NotReady(m) => write!(f, "not ready: {m}"),
            StepError::StateLost(m) => write!(f, "request state lost: {m}"),
            StepError::Unreachable { peer, detail } => {
                write!(f, "node {peer} unreachable: {detail}")
            }
            StepError::Failed(m) => write!(f, "{m}"),
        }
    }
}

/// What a hop answers when its step went well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepReply {
    /// The last hop ran: the step's result.
    Done(StepOutput),
    /// The next hop is the entry node, which holds the request open: rather than send it a new
    /// step (and answer back down the chain after it), the activations come back in the reply
    /// and the entry continues at hop `hop` itself — two messages per token fewer.
    Hidden {
        /// The hop that runs next (on the entry node).
        hop: u32,
        /// Its input.
        hidden: WireTensor,
    },
    /// The hop that ends this part of the chain sent its answer (`Done` or `Hidden`) to the
    /// entry node directly (see [`Delivery`]); the chain only confirms it.
    Delivered,
}

/// The reply to a step.
pub type StepResponse = Result<StepReply, StepError>;

/// An answer sent straight to the entry node by the hop that ends a chain of hops the entry
/// does not run — the last hop, or the hop before the entry's own — instead of back through
/// every hop before it: with hops A (entry) → B → C, the token goes C → A, one link, not
/// C → B → A. The chain still answers (`Delivered`); an answer that cannot be delivered goes
/// back along the chain as before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The request's id at the entry node.
    pub request: u64,
    /// The step's first position.
    pub start_pos: u32,
    /// The hop that answers.
    pub hop: u32,
    /// Its answer: `Done` or `Hidden`.
    pub reply: StepReply,
}

/// What travels on a step stream towards a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepMessage {
    /// A step to run.
    Step(StepRequest),
    /// An answer for a step this node (the entry) sent.
    Deliver(Delivery),
}

/// The control protocol.
pub const CTL_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/ctl/1");
/// The pipeline protocol.
pub const STEP_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/step/3");

/// Length-prefixed postcard messages of bounded size.
#[derive(Debug)]
pub struct Codec<Req, Resp>(std::marker::PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec(std::marker::PhantomData)
    }
}

/// Reads one length-prefixed message.
pub async fn read_msg<T: DeserializeOwned, R: futures::AsyncRead + Unpin + Send>(
    io: &mut R,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {MAX_MESSAGE}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    postcard::from_bytes(&buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undecodable message: {e}"),
        )
    })
}

/// Writes one length-prefixed message and flushes.
pub async fn write_msg<T: Serialize, W: futures::AsyncWrite + Unpin + Send>(
    io: &mut W,
    msg: &T,
) -> io::Result<()> {
    let buf = postcard::to_stdvec(msg)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if buf.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes exceeds the limit of {MAX_MESSAGE}",
                buf.len()
            ),
        ));
    }
    io.write_all(&(buf.len() as u32).to_le_bytes()).await?;
    io.write_all(&buf).await?;
    io.flush().await
}

impl<Req, Resp> libp2p::request_response::Codec for Codec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_msg(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_msg(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_msg(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_msg(io, &resp).await
    }
}

/// Encodes hidden states `[1, t, hidden]` (f32) for the wire.
pub fn encode_hidden(t: &candle_core::Tensor, dtype: WireDtype) -> candle_core::Result<WireTensor> {
    let (_, rows, cols) = t.dims3()?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let data = match dtype {
        WireDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        WireDtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        WireDtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    };
    Ok(WireTensor {
        rows: rows as u32,
        cols: cols as u32,
        dtype,
        data,
    })
}

/// Decodes hidden states to an f32 tensor `[1, rows, cols]`.
pub fn decode_hidden(w: &WireTensor) -> Result<candle_core::Tensor, String> {
    let n = w.rows as usize * w.cols as usize;
    if w.data.len() != n * w.dtype.size() {
        return Err(format!(
            "hidden states of {}x{} carry {} bytes",
            w.rows,
            w.cols,
            w.data.len()
        ));
    }
    let v: Vec<f32> = match w.dtype {
        WireDtype::F32 => w
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        WireDtype::F16 => w
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WireDtype::BF16 => w
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    candle_core::Tensor::from_vec(
        v,
        (1, w.rows as usize, w.cols as usize),
        &candle_core::Device::Cpu,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_states_round_trip() {
        let t = candle_core::Tensor::new(
            &[[[1.5f32, -2.25, 3.0], [0.0, 1e-3, 65504.0]]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for dt in [WireDtype::F32, WireDtype::F16, WireDtype::BF16] {
            let w = encode_hidden(&t, dt).unwrap();
            assert_eq!(w.data.len(), 6 * dt.size());
            let bytes = postcard::to_stdvec(&w).unwrap();
            assert!(
                bytes.len() < w.data.len() + 16,
                "bytes are not packed: {}",
                bytes.len()
            );
            let back: WireTensor = postcard::from_bytes(&bytes).unwrap();
            let d = decode_hidden(&back).unwrap();
            let diff = (d - &t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let tol = match dt {
                WireDtype::F32 => 0.0,
                WireDtype::F16 => 0.01,
                WireDtype::BF16 => 300.0,
            };
            assert!(diff <= tol, "{dt:?}: {diff}");
        }
    }

    #[test]
    fn malformed_tensors_are_errors() {
        let w = WireTensor {
            rows: 2,
            cols: 3,
            dtype: WireDtype::F32,
            data: vec![0; 5],
        };
        assert!(decode_hidden(&w).is_err());
    }
}
