//! Tensors of the Open Inference Protocol: datatypes, shapes, and the
//! little-endian raw form that both the binary REST extension and gRPC's
//! `raw_*_contents` use.
//!
//! Nothing is allocated from a declared shape: element counts are checked
//! against the data actually received, so a huge declared shape with a
//! small body is refused without allocating.

use bytes::Bytes;

/// A protocol datatype name (`FP32`, `INT64`, `BYTES`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    pub fn parse(name: &str) -> Result<Self, String> {
        use DataType::*;
        Ok(match name {
            "BOOL" => Bool,
            "UINT8" => Uint8,
            "UINT16" => Uint16,
            "UINT32" => Uint32,
            "UINT64" => Uint64,
            "INT8" => Int8,
            "INT16" => Int16,
            "INT32" => Int32,
            "INT64" => Int64,
            "FP16" => Fp16,
            "BF16" => Bf16,
            "FP32" => Fp32,
            "FP64" => Fp64,
            "BYTES" => Bytes,
            other => return Err(format!("unknown datatype {other:?}")),
        })
    }

    pub fn as_str(self) -> &'static str {
        use DataType::*;
        match self {
            Bool => "BOOL",
            Uint8 => "UINT8",
            Uint16 => "UINT16",
            Uint32 => "UINT32",
            Uint64 => "UINT64",
            Int8 => "INT8",
            Int16 => "INT16",
            Int32 => "INT32",
            Int64 => "INT64",
            Fp16 => "FP16",
            Bf16 => "BF16",
            Fp32 => "FP32",
            Fp64 => "FP64",
            Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for `BYTES` (length-prefixed elements).
    fn size(self) -> Option<usize> {
        use DataType::*;
        match self {
            Bool | Uint8 | Int8 => Some(1),
            Uint16 | Int16 | Fp16 | Bf16 => Some(2),
            Uint32 | Int32 | Fp32 => Some(4),
            Uint64 | Int64 | Fp64 => Some(8),
            Bytes => None,
        }
    }

    fn is_integer(self) -> bool {
        use DataType::*;
        matches!(
            self,
            Bool | Uint8 | Uint16 | Uint32 | Uint64 | Int8 | Int16 | Int32 | Int64
        )
    }
}

/// Tensor elements in the forms Fovea computes with: `FP32` values, whole
/// numbers of any integer type or `BOOL` (masks), or `BYTES` elements.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Int(Vec<i64>),
    Bytes(Vec<Bytes>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::Fp32(v) => v.len(),
            TensorData::Int(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }
}

/// A request's input tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A response's output tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A declared shape as sizes, and its element count (checked: no negative
/// dimension, no overflow).
pub fn checked_shape(shape: &[i64]) -> Result<(Vec<usize>, usize), String> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut count: usize = 1;
    for &d in shape {
        let d =
            usize::try_from(d).map_err(|_| format!("shape {shape:?} has a negative dimension"))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
        dims.push(d);
    }
    Ok((dims, count))
}

/// Elements of `count` from their raw little-endian bytes.
pub fn decode_raw(datatype: DataType, count: usize, raw: &[u8]) -> Result<TensorData, String> {
    let Some(size) = datatype.size() else {
        return decode_bytes_elements(count, raw).map(TensorData::Bytes);
    };
    if Some(raw.len()) != count.checked_mul(size) {
        return Err(format!(
            "{} bytes of data for {count} {} elements ({} bytes expected)",
            raw.len(),
            datatype.as_str(),
            count.saturating_mul(size)
        ));
    }
    let chunks = raw.chunks_exact(size);
    use DataType::*;
    let ints: Vec<i64> = match datatype {
        Fp32 => {
            return Ok(TensorData::Fp32(
                chunks
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ))
        }
        Fp16 | Bf16 | Fp64 => {
            return Err(format!(
                "{} data is not supported: send FP32",
                datatype.as_str()
            ))
        }
        Bool | Uint8 => chunks.map(|c| c[0] as i64).collect(),
        Int8 => chunks.map(|c| c[0] as i8 as i64).collect(),
        Uint16 => chunks
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Int16 => chunks
            .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Uint32 => chunks
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Int32 => chunks
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        // A mask value above i64::MAX is still "set".
        Uint64 => chunks
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()).min(i64::MAX as u64) as i64)
            .collect(),
        Int64 => chunks
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Bytes => unreachable!("handled above"),
    };
    debug_assert!(datatype.is_integer());
    Ok(TensorData::Int(ints))
}

/// `BYTES` elements, each preceded by its length (4 bytes, little-endian).
fn decode_bytes_elements(count: usize, raw: &[u8]) -> Result<Vec<Bytes>, String> {
    // Each element takes at least its 4-byte length: bound the allocation.
    if count > raw.len() / 4 {
        return Err(format!(
            "{} bytes of data cannot hold {count} BYTES elements",
            raw.len()
        ));
    }
    let mut elements = Vec::with_capacity(count);
    let mut rest = raw;
    for i in 0..count {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(format!("BYTES element {i}: its length is cut off"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!(
                "BYTES element {i} declares {len} bytes, {} remain",
                tail.len()
            ));
        }
        elements.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes left over after {count} BYTES elements",
            rest.len()
        ));
    }
    Ok(elements)
}

/// The raw little-endian form of output data (`FP32`, `INT64`, or
/// length-prefixed `BYTES`).
pub fn encode_raw(data: &TensorData) -> Vec<u8> {
    match data {
        TensorData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Int(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Bytes(v) => {
            let mut out = Vec::with_capacity(v.iter().map(|b| 4 + b.len()).sum());
            for element in v {
                out.extend_from_slice(&(element.len() as u32).to_le_bytes());
                out.extend_from_slice(element);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatypes_round_trip() {
        for name in ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "BYTES"] {
            assert_eq!(DataType::parse(name).unwrap().as_str(), name);
        }
        assert!(DataType::parse("fp32").is_err());
    }

    #[test]
    fn shapes_are_checked_without_allocating() {
        assert_eq!(checked_shape(&[2, 3, 4]).unwrap(), (vec![2, 3, 4], 24));
        assert_eq!(checked_shape(&[]).unwrap().1, 1);
        assert!(checked_shape(&[2, -1]).unwrap_err().contains("negative"));
        let huge = [i64::MAX, i64::MAX, 4];
        assert!(checked_shape(&huge).unwrap_err().contains("too many"));
        // A plausible but huge count against a tiny body: refused by size.
        let (_, count) = checked_shape(&[100_000, 3, 4096, 4096]).unwrap();
        assert!(decode_raw(DataType::Fp32, count, &[0; 16]).is_err());
        assert!(decode_raw(DataType::Bytes, count, &[0; 16]).is_err());
    }

    #[test]
    fn raw_numbers_are_little_endian() {
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            decode_raw(DataType::Fp32, 2, &raw).unwrap(),
            TensorData::Fp32(vec![1.5, -2.0])
        );
        assert!(decode_raw(DataType::Fp32, 3, &raw).is_err());
        assert_eq!(
            decode_raw(DataType::Int32, 2, &[255, 255, 255, 255, 7, 0, 0, 0]).unwrap(),
            TensorData::Int(vec![-1, 7])
        );
        assert_eq!(
            decode_raw(DataType::Bool, 3, &[1, 0, 1]).unwrap(),
            TensorData::Int(vec![1, 0, 1])
        );
        assert!(decode_raw(DataType::Fp16, 1, &[0, 0])
            .unwrap_err()
            .contains("FP32"));
        let out = TensorData::Fp32(vec![0.25, 3.0]);
        assert_eq!(
            decode_raw(DataType::Fp32, 2, &encode_raw(&out)).unwrap(),
            out
        );
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let data = TensorData::Bytes(vec![Bytes::from_static(b"ab"), Bytes::new()]);
        let raw = encode_raw(&data);
        assert_eq!(raw, [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(decode_raw(DataType::Bytes, 2, &raw).unwrap(), data);
        // Truncated, too long, leftovers.
        assert!(decode_raw(DataType::Bytes, 1, &raw[..5])
            .unwrap_err()
            .contains("declares"));
        assert!(decode_raw(DataType::Bytes, 1, &raw)
            .unwrap_err()
            .contains("left over"));
        assert!(decode_raw(DataType::Bytes, 2, &[9, 0, 0, 0, 1]).is_err());
    }
}
