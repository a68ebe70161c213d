//! The GGUF file format (version 2 and 3): a bounds-checked reader over a memory map and a writer.
//!
//! We parse GGUF ourselves rather than through candle's reader so that a truncated or hostile file
//! is an error naming the file, never a panic or a huge allocation: every length is checked against
//! the bytes that remain before anything is allocated.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float32`
    F32(f32),
    /// `float64`
    F64(f64),
    /// `bool`
    Bool(bool),
    /// `string`
    String(String),
    /// `array` (all elements of one type)
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions, outermost first (candle's order; GGUF stores them innermost first).
    pub dims: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Number of bytes of data.
    pub size: usize,
}

/// The parsed header of a GGUF file: metadata and tensor directory.
#[derive(Debug, Clone)]
pub struct Header {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor directory.
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub tensor_order: Vec<String>,
}

impl Header {
    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Converts a ggml type id to candle's type, naming the unsupported ones.
pub fn dtype_from_id(id: u32) -> std::result::Result<GgmlDType, String> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        other => {
            let name = match other {
                16 => "IQ2_XXS",
                17 => "IQ2_XS",
                18 => "IQ3_XXS",
                19 => "IQ1_S",
                20 => "IQ4_NL",
                21 => "IQ3_S",
                22 => "IQ2_S",
                23 => "IQ4_XS",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                29 => "IQ1_M",
                _ => "unknown",
            };
            return Err(format!("ggml type {other} ({name}) is not supported"));
        }
    })
}

/// The ggml type id of a candle type.
pub fn dtype_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes taken by a tensor of `dims` (outermost first) stored as `dtype`, or why it cannot be.
pub fn tensor_bytes(dims: &[usize], dtype: GgmlDType) -> std::result::Result<usize, String> {
    let inner = *dims.last().unwrap_or(&1);
    let block = dtype.block_size();
    if !inner.is_multiple_of(block) {
        return Err(format!(
            "row length {inner} is not a multiple of the {dtype:?} block size {block}"
        ));
    }
    let rows = dims[..dims.len().saturating_sub(1)]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("tensor dimensions overflow")?;
    (inner / block)
        .checked_mul(dtype.type_size())
        .and_then(|r| r.checked_mul(rows))
        .ok_or_else(|| "tensor dimensions overflow".to_string())
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("file ends inside {what} (truncated?)"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// A count that must fit in the rest of the file, given each item takes at least `min` bytes.
    fn count(&mut self, what: &str, min: usize) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| format!("{what} {n} is too large"))?;
        if n.saturating_mul(min.max(1)) > self.remaining() {
            return Err(format!(
                "{what} {n} does not fit in the rest of the file (corrupt or truncated)"
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>("a value")?[0]),
            1 => MetaValue::I8(self.array::<1>("a value")?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("a value")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("a value")?)),
            4 => MetaValue::U32(self.u32("a value")?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("a value")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("a value")?)),
            7 => match self.array::<1>("a value")?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            8 => MetaValue::String(self.string("a string value")?),
            9 => {
                if depth > 4 {
                    return Err("metadata arrays nested too deeply".into());
                }
                let item_ty = self.u32("an array type")?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("unknown metadata value type {t}")),
                };
                let n = self.count("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64("a value")?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("a value")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("a value")?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// Parses the header of a GGUF file held in `data`; `path` names it in errors.
pub fn read_header(data: &[u8], path: &Path) -> Result<Header> {
    parse_header(data).map_err(|msg| Error::format(path, format!("invalid GGUF file: {msg}")))
}

fn parse_header(data: &[u8]) -> std::result::Result<Header, String> {
    let mut c = Cursor { data, pos: 0 };
    let magic = c
        .take(4, "the magic number")
        .map_err(|_| "file too short".to_string())?;
    if magic != MAGIC {
        return Err("bad magic number (not a GGUF file)".into());
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported version {version} (llmesh reads versions 2 and 3)"
        ));
    }
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 12)?;
    let mut metadata = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("a metadata key")?;
        let ty = c.u32("a metadata type")?;
        let value = c
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or("general.alignment must be a power of two")?,
        None => DEFAULT_ALIGNMENT,
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("a tensor name")?;
        let n_dims = c.u32("a tensor rank")? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64("a tensor dimension")?;
            dims.push(usize::try_from(d).map_err(|_| format!("tensor `{name}` is too large"))?);
        }
        dims.reverse();
        let dtype =
            dtype_from_id(c.u32("a tensor type")?).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let offset = c.u64("a tensor offset")?;
        infos.push((name, dims, dtype, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = HashMap::with_capacity(n_tensors);
    let mut tensor_order = Vec::with_capacity(n_tensors);
    for (name, dims, dtype, offset) in infos {
        let size = tensor_bytes(&dims, dtype).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let start = data_start
            .checked_add(offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| format!("tensor `{name}` has an invalid offset"))?;
        if start.checked_add(size).is_none_or(|end| end > data.len()) {
            return Err(format!(
                "tensor `{name}` lies beyond the end of the file (truncated?)"
            ));
        }
        if tensors.contains_key(&name) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        tensor_order.push(name.clone());
        tensors.insert(
            name,
            TensorInfo {
                dims,
                dtype,
                offset: start,
                size,
            },
        );
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        tensor_order,
    })
}

/// A tensor to write: its name, type, dimensions (outermost first) and encoded bytes.
pub struct TensorToWrite<'a> {
    /// Name in the file.
    pub name: String,
    /// Storage type of `data`.
    pub dtype: GgmlDType,
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Encoded data (`tensor_bytes(dims, dtype)` bytes).
    pub data: std::borrow::Cow<'a, [u8]>,
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        MetaValue::String(s) => write_string(w, s),
        MetaValue::Array(items) => {
            let item_ty = items.first().map_or(4, MetaValue::type_id);
            if items.iter().any(|i| i.type_id() != item_ty) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "GGUF arrays must hold values of one type",
                ));
            }
            w.write_all(&item_ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

/// Writes a GGUF v3 file.
pub fn write(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorToWrite<'_>],
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    write_to(&mut w, metadata, tensors).map_err(|e| Error::io(path, e))?;
    w.flush().map_err(|e| Error::io(path, e))
}

fn write_to(
    w: &mut impl Write,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorToWrite<'_>],
) -> std::io::Result<()> {
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    let mut pos = 0u64;
    let mut counted = CountingWriter {
        inner: w,
        count: &mut pos,
    };
    counted.write_all(MAGIC)?;
    counted.write_all(&3u32.to_le_bytes())?;
    counted.write_all(&(tensors.len() as u64).to_le_bytes())?;
    counted.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (k, v) in metadata {
        write_string(&mut counted, k)?;
        counted.write_all(&v.type_id().to_le_bytes())?;
        write_value(&mut counted, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        let expected =
            tensor_bytes(&t.dims, t.dtype).map_err(|e| invalid(format!("{}: {e}", t.name)))?;
        if expected != t.data.len() {
            return Err(invalid(format!(
                "{}: {} bytes of data, {expected} expected",
                t.name,
                t.data.len()
            )));
        }
        write_string(&mut counted, &t.name)?;
        counted.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in t.dims.iter().rev() {
            counted.write_all(&(*d as u64).to_le_bytes())?;
        }
        counted.write_all(&dtype_id(t.dtype).to_le_bytes())?;
        counted.write_all(&offset.to_le_bytes())?;
        offset = (offset + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let pad = |pos: u64| (pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - pos) as usize;
    let zeros = [0u8; DEFAULT_ALIGNMENT as usize];
    let p = pad(*counted.count);
    counted.write_all(&zeros[..p])?;
    for t in tensors {
        counted.write_all(&t.data)?;
        let p = pad(t.data.len() as u64);
        counted.write_all(&zeros[..p])?;
    }
    Ok(())
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: &'a mut u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        *self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<(String, MetaValue)>, Vec<TensorToWrite<'static>>) {
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            ("x.count".to_string(), MetaValue::U32(7)),
            (
                "x.list".to_string(),
                MetaValue::Array(vec![
                    MetaValue::String("a".into()),
                    MetaValue::String("bc".into()),
                ]),
            ),
        ];
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let tensors = vec![
            TensorToWrite {
                name: "w".into(),
                dtype: GgmlDType::F32,
                dims: vec![2, 3],
                data: data.into(),
            },
            TensorToWrite {
                name: "b".into(),
                dtype: GgmlDType::F32,
                dims: vec![1],
                data: vec![1u8, 2, 3, 4].into(),
            },
        ];
        (meta, tensors)
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let (meta, tensors) = sample();
        write(&path, &meta, &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let h = read_header(&bytes, &path).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata, meta);
        assert_eq!(h.tensor_order, vec!["w", "b"]);
        let w = &h.tensors["w"];
        assert_eq!(w.dims, vec![2, 3]);
        assert_eq!(&bytes[w.offset..w.offset + w.size], &tensors[0].data[..]);
        assert_eq!(w.offset % 32, 0);
        let b = &h.tensors["b"];
        assert_eq!(&bytes[b.offset..b.offset + b.size], &[1, 2, 3, 4]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let (meta, tensors) = sample();
        write(&path, &meta, &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let last_tensor_end = {
            let h = read_header(&bytes, &path).unwrap();
            h.tensors.values().map(|t| t.offset + t.size).max().unwrap()
        };
        for len in 0..last_tensor_end {
            let err = read_header(&bytes[..len], &path).unwrap_err().to_string();
            assert!(err.contains("invalid GGUF file"), "{len}: {err}");
        }
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let (meta, tensors) = sample();
        write(&path, &meta, &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Flip every byte of the header to a few hostile values; parsing must return, not panic.
        for i in 0..bytes.len().min(400) {
            for v in [0u8, 0xff, 0x7f, 9] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = read_header(&b, &path);
            }
        }
    }
}
