//! Weights from a Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped and opened only when one of their
//! tensors is asked for, so a node holding a few layers maps and touches only those bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::weights::{
    TensorBytes, Weight, WeightName, WeightSource, floats_to_f32, release_mapped, weight_from_bytes,
};

/// The name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct TensorMeta {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: HashMap<String, TensorMeta>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; llmesh never writes model files while they are
        // loaded. A concurrent writer could change the bytes under us, which at worst yields
        // wrong weights, the same as reading the file while it is being rewritten.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let (start, end) = (data_start + s, data_start + e);
            if end > map.len() || start > end {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` lies beyond the end of the file (truncated?)"),
                ));
            }
            tensors.insert(
                name,
                TensorMeta {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }
}

/// A Hugging Face checkpoint directory's weights.
pub struct SafetensorsSource {
    dir: PathBuf,
    /// Tensor name → file name, from the index; `None` for a single-file checkpoint.
    weight_map: Option<HashMap<String, String>>,
    open: RefCell<HashMap<String, Rc<MappedFile>>>,
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let source = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
            let map = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            let mut weight_map = HashMap::with_capacity(map.len());
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(
                        &index,
                        format!("weight_map entry `{tensor}` is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::format(
                        &index,
                        format!("weight_map names a file outside the directory: `{file}`"),
                    ));
                }
                weight_map.insert(tensor.clone(), file.to_string());
            }
            SafetensorsSource {
                dir: dir.to_path_buf(),
                weight_map: Some(weight_map),
                open: RefCell::new(HashMap::new()),
            }
        } else if dir.join(SINGLE_FILE).is_file() {
            let source = SafetensorsSource {
                dir: dir.to_path_buf(),
                weight_map: None,
                open: RefCell::new(HashMap::new()),
            };
            source.file(SINGLE_FILE)?;
            source
        } else {
            return Err(Error::format(
                dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
            ));
        };
        Ok(source)
    }

    fn file(&self, name: &str) -> Result<Rc<MappedFile>> {
        if let Some(f) = self.open.borrow().get(name) {
            return Ok(f.clone());
        }
        let f = Rc::new(MappedFile::open(&self.dir.join(name))?);
        self.open.borrow_mut().insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn locate(&self, name: WeightName) -> Result<(Rc<MappedFile>, String)> {
        let key = name.hf();
        let file_name = match &self.weight_map {
            Some(map) => map.get(&key).cloned().ok_or_else(|| Error::MissingTensor {
                path: self.dir.join(INDEX_FILE),
                name: key.clone(),
            })?,
            None => SINGLE_FILE.to_string(),
        };
        let file = self.file(&file_name)?;
        if !file.tensors.contains_key(&key) {
            return Err(Error::MissingTensor {
                path: file.path.clone(),
                name: key,
            });
        }
        Ok((file, key))
    }

    /// Reads one tensor's bytes after checking its shape; returns them with their type.
    fn read<T>(
        &self,
        name: WeightName,
        expected: &[usize],
        f: impl FnOnce(&memmap2::Mmap, &[u8], GgmlDType) -> Result<T>,
    ) -> Result<T> {
        let (file, key) = self.locate(name)?;
        let meta = &file.tensors[&key];
        if meta.shape != expected {
            return Err(Error::Shape {
                path: file.path.clone(),
                name: key,
                got: meta.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let dtype = match meta.dtype {
            Dtype::F32 => GgmlDType::F32,
            Dtype::F16 => GgmlDType::F16,
            Dtype::BF16 => GgmlDType::BF16,
            other => {
                return Err(Error::format(
                    &file.path,
                    format!(
                        "tensor `{key}` has type {other:?}; llmesh reads F32, F16 and BF16 checkpoints"
                    ),
                ));
            }
        };
        let bytes = &file.map[meta.start..meta.end];
        if bytes.len() != expected.iter().product::<usize>() * dtype.type_size() {
            return Err(Error::format(
                &file.path,
                format!("tensor `{key}` has the wrong number of bytes for its shape"),
            ));
        }
        let out = f(&file.map, bytes, dtype)?;
        release_mapped(&file.map, meta.start, meta.end - meta.start);
        Ok(out)
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: WeightName) -> bool {
        match &self.weight_map {
            Some(map) => map.contains_key(&name.hf()),
            None => self
                .file(SINGLE_FILE)
                .map(|f| f.tensors.contains_key(&name.hf()))
                .unwrap_or(false),
        }
    }

    fn matrix(&self, name: WeightName, rows: usize, cols: usize) -> Result<Weight> {
        self.read(name, &[rows, cols], |map, bytes, dtype| {
            weight_from_bytes(TensorBytes::Mapped(map, bytes), dtype, rows, cols)
        })
    }

    fn vector(&self, name: WeightName, len: usize) -> Result<Tensor> {
        self.read(name, &[len], |_, bytes, dtype| {
            let v = floats_to_f32(bytes, dtype).unwrap_or_default();
            Ok(Tensor::from_vec(v, len, &Device::Cpu)?)
        })
    }
}
