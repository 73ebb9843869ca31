//! Reads safetensors checkpoints tensor by tensor with positioned reads instead of a memory map,
//! so loading a model costs one copy of its weights in resident memory rather than two (the mapped
//! file pages plus the converted tensors).

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Entry {
    file: Arc<File>,
    path: Arc<PathBuf>,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the data in the file, and its length.
    start: u64,
    len: usize,
}

/// Every tensor of a set of safetensors files, by name; data is read when asked for.
pub struct SafetensorsFiles {
    entries: HashMap<String, Entry>,
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsFiles {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut entries = HashMap::new();
        for path in paths {
            read_header(path, &mut entries)?;
        }
        Ok(Self { entries })
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let Some(e) = self.entries.get(name) else {
            candle_core::bail!("cannot find tensor {name} in the checkpoint")
        };
        let mut buf = vec![0u8; e.len];
        e.file.read_exact_at(&mut buf, e.start).map_err(|err| {
            candle_core::Error::Msg(format!("reading {name} from {}: {err}", e.path.display()))
        })?;
        Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, &Device::Cpu)
    }
}

/// Parses one file's header: an 8-byte little-endian length, then JSON
/// `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": …}`.
fn read_header(path: &Path, entries: &mut HashMap<String, Entry>) -> Result<()> {
    let bad = |msg: String| candle_core::Error::Msg(format!("{}: {msg}", path.display()));
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(bad("not a safetensors file (bad header length)".into()));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    let (file, path) = (Arc::new(file), Arc::new(path.to_path_buf()));
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"]
            .as_str()
            .and_then(dtype_of)
            .ok_or_else(|| bad(format!("{name} has an unsupported dtype {}", info["dtype"])))?;
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .map_err(|_| bad(format!("{name} has no shape")))?;
        let offsets: [u64; 2] = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|_| bad(format!("{name} has no data_offsets")))?;
        let len = (offsets[1] - offsets[0]) as usize;
        let start = 8 + n + offsets[0];
        if offsets[1] < offsets[0]
            || start + len as u64 > size
            || len != shape.iter().product::<usize>() * dtype.size_in_bytes()
        {
            return Err(bad(format!(
                "{name}'s data does not fit its shape and the file"
            )));
        }
        entries.insert(
            name,
            Entry {
                file: file.clone(),
                path: path.clone(),
                dtype,
                shape,
                start,
                len,
            },
        );
    }
    Ok(())
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.load(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: expected {s:?}, got {:?}",
                t.shape()
            )
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
