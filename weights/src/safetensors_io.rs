//! safetensors reading (memory-mapped) and writing (atomic).
//!
//! Loading policy: floating tensors (f16, bf16, f32, f64, f8e4m3) are
//! converted to the requested dtype. Integer and boolean tensors keep their
//! values in the nearest candle dtype (`num_batches_tracked` stays I64):
//! BOOL -> U8, I8 -> I16, U16 -> U32, U64 -> I64 (error if a value does not
//! fit); U8/I16/I32/U32/I64 are kept as they are. Other dtypes are refused.
//! Tensors are returned sorted by name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

use crate::WeightsError;

/// Loads every tensor of a safetensors file onto `device`, floating tensors
/// converted to `dtype` (see the module doc for integers).
pub fn load_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let mmap = map(path)?;
    let st = SafeTensors::deserialize(&mmap).map_err(|source| WeightsError::Safetensors {
        path: path.into(),
        source,
    })?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        let t = view_to_tensor(path, name, view.dtype(), view.shape(), view.data(), device)?;
        let t = if is_float(t.dtype()) && t.dtype() != dtype {
            t.to_dtype(dtype)
                .map_err(|e| WeightsError::candle(path, e))?
        } else {
            t
        };
        out.push((name.to_string(), t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The `__metadata__` string map of a safetensors file (empty if absent).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, WeightsError> {
    let mmap = map(path)?;
    let (_, meta) =
        SafeTensors::read_metadata(&mmap).map_err(|source| WeightsError::Safetensors {
            path: path.into(),
            source,
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Writes `tensors` (any device, any candle dtype but the sub-byte floats)
/// to `path`, atomically: a temporary file in the same folder is written,
/// synced, then renamed over `path`, so readers never see a partial file.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WeightsError> {
    let mut seen = std::collections::HashSet::new();
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(WeightsError::invalid(
                path,
                format!("duplicate tensor name {name}"),
            ));
        }
        raws.push((name.clone(), to_raw(path, name, t)?));
    }
    let bytes =
        safetensors::serialize(raws, metadata).map_err(|source| WeightsError::Safetensors {
            path: path.into(),
            source,
        })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".fovea-tmp-")
        .tempfile_in(dir)
        .map_err(|e| WeightsError::io(dir, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| WeightsError::io(tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| WeightsError::io(path, e.error))?;
    Ok(())
}

pub(crate) fn map(path: &Path) -> Result<memmap2::Mmap, WeightsError> {
    let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    // SAFETY: the map is read-only and dropped before we return; a file
    // truncated underneath us by another process is the documented risk of
    // mmap (SIGBUS), as for every mmap-based safetensors reader.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))
}

pub(crate) fn is_float(d: DType) -> bool {
    matches!(
        d,
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3
    )
}

fn view_to_tensor(
    path: &Path,
    name: &str,
    dtype: StDtype,
    shape: &[usize],
    data: &[u8],
    device: &Device,
) -> Result<Tensor, WeightsError> {
    let cerr = |e| WeightsError::candle(path, e);
    let direct = |d: DType| Tensor::from_raw_buffer(data, d, shape, device).map_err(cerr);
    match dtype {
        StDtype::F16 => direct(DType::F16),
        StDtype::BF16 => direct(DType::BF16),
        StDtype::F32 => direct(DType::F32),
        StDtype::F64 => direct(DType::F64),
        StDtype::F8_E4M3 => direct(DType::F8E4M3),
        StDtype::U8 | StDtype::BOOL => direct(DType::U8),
        StDtype::I16 => direct(DType::I16),
        StDtype::I32 => direct(DType::I32),
        StDtype::U32 => direct(DType::U32),
        StDtype::I64 => direct(DType::I64),
        StDtype::I8 => {
            let v: Vec<i16> = data.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, device).map_err(cerr)
        }
        StDtype::U16 => {
            let v: Vec<u32> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect();
            Tensor::from_vec(v, shape, device).map_err(cerr)
        }
        StDtype::U64 => {
            let v = data
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    i64::try_from(u64::from_le_bytes(b)).ok()
                })
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| {
                    WeightsError::invalid(path, format!("{name}: u64 value beyond i64"))
                })?;
            Tensor::from_vec(v, shape, device).map_err(cerr)
        }
        other => Err(WeightsError::UnsupportedDtype {
            path: path.into(),
            dtype: format!("{other:?}"),
            name: name.into(),
        }),
    }
}

/// A tensor already turned into little-endian bytes, so that serialization
/// cannot fail half-way (candle's own `View` impl unwraps).
struct Raw {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for Raw {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_raw(path: &Path, name: &str, t: &Tensor) -> Result<Raw, WeightsError> {
    let cerr = |e| WeightsError::candle(path, e);
    let flat = t.flatten_all().map_err(cerr)?;
    fn bytes<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> candle_core::Result<Vec<u8>> {
        let v = t.to_vec1::<T>()?;
        let mut out = Vec::with_capacity(v.len() * N);
        for x in v {
            out.extend_from_slice(&f(x));
        }
        Ok(out)
    }
    let (dtype, data) = match t.dtype() {
        DType::U8 => (StDtype::U8, bytes::<u8, 1>(&flat, |x| [x])),
        DType::U32 => (StDtype::U32, bytes::<u32, 4>(&flat, u32::to_le_bytes)),
        DType::I16 => (StDtype::I16, bytes::<i16, 2>(&flat, i16::to_le_bytes)),
        DType::I32 => (StDtype::I32, bytes::<i32, 4>(&flat, i32::to_le_bytes)),
        DType::I64 => (StDtype::I64, bytes::<i64, 8>(&flat, i64::to_le_bytes)),
        DType::F16 => (
            StDtype::F16,
            bytes::<half::f16, 2>(&flat, half::f16::to_le_bytes),
        ),
        DType::BF16 => (
            StDtype::BF16,
            bytes::<half::bf16, 2>(&flat, half::bf16::to_le_bytes),
        ),
        DType::F32 => (StDtype::F32, bytes::<f32, 4>(&flat, f32::to_le_bytes)),
        DType::F64 => (StDtype::F64, bytes::<f64, 8>(&flat, f64::to_le_bytes)),
        other => {
            return Err(WeightsError::UnsupportedDtype {
                path: path.into(),
                dtype: format!("{other:?}"),
                name: name.into(),
            })
        }
    };
    Ok(Raw {
        dtype,
        shape: t.dims().to_vec(),
        data: data.map_err(cerr)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_dtypes_and_metadata() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("t.safetensors");
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?;
        let b = a.to_dtype(DType::F16)?;
        let c = Tensor::new(&[7i64], &dev)?;
        // A transposed (non-contiguous) tensor is written in logical order.
        let d = a.t()?;
        let tensors = vec![
            ("a".to_string(), a.clone()),
            ("b".to_string(), b),
            ("c".to_string(), c),
            ("d".to_string(), d.clone()),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&p, &tensors, Some(meta.clone()))?;
        assert_eq!(read_metadata(&p)?, meta);

        let back = load_safetensors(&p, DType::F32, &dev)?;
        let names: Vec<_> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(back[1].1.dtype(), DType::F32);
        assert_eq!(back[1].1.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        assert_eq!(back[2].1.dtype(), DType::I64);
        assert_eq!(back[2].1.to_vec1::<i64>()?, [7]);
        assert_eq!(back[3].1.to_vec2::<f32>()?, d.to_vec2::<f32>()?);

        let half = load_safetensors(&p, DType::BF16, &dev)?;
        assert_eq!(half[0].1.dtype(), DType::BF16);
        assert_eq!(half[2].1.dtype(), DType::I64);
        // No temporary files are left next to the output.
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn duplicate_names_and_bad_files_are_errors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("t.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        let dup = vec![("x".to_string(), t.clone()), ("x".to_string(), t)];
        assert!(save_safetensors(&p, &dup, None).is_err());
        assert!(!p.exists());
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage")?;
        assert!(load_safetensors(&p, DType::F32, &Device::Cpu).is_err());
        assert!(read_metadata(&p).is_err());
        assert!(load_safetensors(&dir.path().join("missing"), DType::F32, &Device::Cpu).is_err());
        Ok(())
    }
}
