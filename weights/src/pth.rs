//! PyTorch checkpoint (`.pt` / `.pth`) import, without running Python.
//!
//! Two containers are read:
//! - the zip format (torch >= 1.6): `<top>/data.pkl` (the pickle),
//!   `<top>/data/<key>` (one raw storage per entry, stored or deflated) and
//!   `<top>/byteorder`; the top folder name varies (it is often the file stem);
//! - the legacy format (torch < 1.6): pickles back to back (magic number,
//!   protocol version 1001, sys_info, the object, the storage key list), then
//!   for each key an 8-byte element count and the raw elements.
//!
//! In both, the object pickle names storages through persistent ids
//! `('storage', <torch.XStorage class>, key, location, numel[, view])` and
//! tensors through `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, ...)`. The pickle is read by [`crate::pickle`], which executes
//! nothing; this module interprets a fixed allowlist of globals on the result:
//! the tensor rebuilds (`_rebuild_tensor`, `_v2`, `_v3`, `_rebuild_parameter`,
//! `_rebuild_parameter_with_state`, `torch._tensor._rebuild_from_type_v2`),
//! the `torch.*Storage` classes, `collections.OrderedDict`,
//! `builtins.set`/`frozenset`. Any other torch tensor constructor
//! (`_rebuild_qtensor`, `torch.storage._load_from_bytes`, ...) found where a
//! tensor is expected is refused with [`WeightsError::UnsupportedGlobal`];
//! anything else (`os.system`, model classes, ...) is inert data: a state dict
//! entry that is not a tensor is skipped and listed in
//! [`Checkpoint::skipped`].
//!
//! Where the weights are ([`Layout`]):
//! - the root is a state dict (a dict with tensor values);
//! - the root is a dict wrapping one: the first non-empty state dict or module
//!   among the keys [`WRAPPER_KEYS`] (in that order: `model` before `ema`, as
//!   Ultralytics stores its final weights under `model` and leaves `ema`
//!   `None`, while training checkpoints have `model: None` and the weights in
//!   `ema`), looking one or two dict levels deep; failing those, the single
//!   state dict or module among the other values, if there is exactly one;
//! - a whole pickled `nn.Module` (at the root or under one of those keys): its
//!   `_modules` tree is walked to produce the keys `module.state_dict()` gives
//!   (parameters, then persistent buffers, then children, skipping `None`s and
//!   the names in `_non_persistent_buffers_set`).
//!
//! A `module.` prefix (DataParallel) is removed when every key has it.
//!
//! Tensors come back on the CPU in their stored dtype, except: bool -> U8,
//! int8 -> I16 (candle has neither). Metadata ([`Checkpoint::metadata`]) holds
//! JSON strings: the module attributes `names`, `stride` and `yaml` when the
//! weights come from a pickled module, and the top-level dict's scalar and
//! string entries (`epoch`, `date`, `version`, ...).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use zip::ZipArchive;

use crate::pickle::{self, Obj, Pickle, Value};
use crate::safetensors_io::{self, is_float};
use crate::WeightsError;

/// Keys of a wrapping dict that may hold the weights, in order of preference.
pub const WRAPPER_KEYS: &[&str] = &[
    "model",
    "ema",
    "state_dict",
    "model_state",
    "model_state_dict",
    "state_dict_ema",
    "model_ema",
    "net",
    "network",
    "module",
    "params",
    "weights",
];

/// The legacy format's first pickle: this int, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

/// Module nesting and module visits allowed (real models: tens of levels,
/// thousands of modules; shared submodules are visited once per path, as
/// `state_dict()` does, so a hostile DAG could otherwise blow up).
const MAX_MODULE_DEPTH: usize = 256;
const MAX_MODULE_VISITS: usize = 1_000_000;
/// Largest tensor turned into JSON metadata (e.g. Ultralytics `stride`).
const MAX_JSON_TENSOR: usize = 4096;

/// A PyTorch checkpoint's weights, ready to use or to save as safetensors.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Dotted state-dict keys and CPU tensors, in checkpoint order.
    pub tensors: Vec<(String, Tensor)>,
    /// Plain facts found in the checkpoint, each value a JSON document.
    pub metadata: BTreeMap<String, String>,
    pub layout: Layout,
    pub format: PthFormat,
    /// State-dict entries that were not tensors (inert objects), by key.
    pub skipped: Vec<String>,
}

/// Which container the file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthFormat {
    /// torch >= 1.6 zip archive.
    Zip,
    /// torch < 1.6 concatenated pickles.
    Legacy,
}

/// Where the weights were found in the pickled object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The root object is the state dict.
    StateDict,
    /// A state dict found under `key` of the root dict (`a/b` when nested).
    Wrapped { key: String },
    /// A pickled `nn.Module` of class `class`, at the root (`key` None) or
    /// under `key`.
    Module { class: String, key: Option<String> },
}

/// What [`import_pth`] did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub tensors: usize,
    pub layout: Layout,
    pub format: PthFormat,
    /// Size of the written safetensors file.
    pub bytes: u64,
    pub skipped: Vec<String>,
}

impl fmt::Display for PthFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PthFormat::Zip => "zip",
            PthFormat::Legacy => "legacy",
        })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::StateDict => f.write_str("state dict"),
            Layout::Wrapped { key } => write!(f, "state dict under '{key}'"),
            Layout::Module { class, key: None } => write!(f, "pickled module {class}"),
            Layout::Module {
                class,
                key: Some(k),
            } => write!(f, "pickled module {class} under '{k}'"),
        }
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tensors from a {} checkpoint ({}), {} bytes written",
            self.tensors, self.format, self.layout, self.bytes
        )?;
        if !self.skipped.is_empty() {
            write!(f, ", {} non-tensor entries skipped", self.skipped.len())?;
        }
        Ok(())
    }
}

/// Reads a PyTorch checkpoint (zip or legacy format) without executing it.
pub fn load_pth(path: &Path) -> Result<Checkpoint, WeightsError> {
    let map = safetensors_io::map(path)?;
    load_pth_bytes(path, &map)
}

/// [`load_pth`] on bytes already in memory; `path` only names them in errors.
pub fn load_pth_bytes(path: &Path, data: &[u8]) -> Result<Checkpoint, WeightsError> {
    // Nothing we build may exceed a few times the input (tensor views of one
    // storage, deflated entries); real checkpoints stay far below.
    let budget = (data.len() as u64)
        .saturating_mul(4)
        .saturating_add(256 << 20);
    let (pk, blobs, big_endian, format) = if data.starts_with(b"PK\x03\x04") {
        let (pk, blobs, be) = open_zip(path, data, budget)?;
        (pk, blobs, be, PthFormat::Zip)
    } else if data.len() > 262 && &data[257..262] == b"ustar" {
        return Err(not_checkpoint(
            path,
            "a tar archive (the torch < 0.4 format is not supported)",
        ));
    } else if data.first() == Some(&0x80) {
        let (pk, blobs, be) = open_legacy(path, data)?;
        (pk, blobs, be, PthFormat::Legacy)
    } else {
        return Err(not_checkpoint(path, "neither a zip archive nor a pickle"));
    };
    let mut r = Reader {
        path,
        pk: &pk,
        blobs,
        big_endian,
        cache: HashMap::new(),
        budget,
        visits: 0,
        skipped: Vec::new(),
    };
    let (mut tensors, layout, metadata) = r.find_weights()?;
    if tensors.is_empty() {
        return Err(WeightsError::NoTensors { path: path.into() });
    }
    if tensors.iter().all(|(k, _)| k.starts_with("module.")) {
        for (k, _) in tensors.iter_mut() {
            k.drain(.."module.".len());
        }
    }
    Ok(Checkpoint {
        tensors,
        metadata,
        layout,
        format,
        skipped: r.skipped,
    })
}

/// Converts a PyTorch checkpoint to safetensors: floating tensors are kept in
/// f16/bf16 when stored so and written as f32 otherwise (f64 -> f32); integer
/// tensors (`num_batches_tracked`: I64) and bools (U8) are kept as they are.
/// `__metadata__` holds `format: pt` plus [`Checkpoint::metadata`].
pub fn import_pth(input: &Path, output: &Path) -> Result<ImportReport, WeightsError> {
    let ckpt = load_pth(input)?;
    let mut tensors = Vec::with_capacity(ckpt.tensors.len());
    for (name, t) in ckpt.tensors {
        let t = match t.dtype() {
            DType::F16 | DType::BF16 | DType::F32 => t,
            d if is_float(d) => t
                .to_dtype(DType::F32)
                .map_err(|e| WeightsError::candle(input, e))?,
            _ => t,
        };
        tensors.push((name, t));
    }
    let mut meta: HashMap<String, String> = ckpt.metadata.into_iter().collect();
    meta.insert("format".into(), "pt".into());
    safetensors_io::save_safetensors(output, &tensors, Some(meta))?;
    let bytes = std::fs::metadata(output)
        .map_err(|e| WeightsError::io(output, e))?
        .len();
    Ok(ImportReport {
        tensors: tensors.len(),
        layout: ckpt.layout,
        format: ckpt.format,
        bytes,
        skipped: ckpt.skipped,
    })
}

fn not_checkpoint(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::NotACheckpoint {
        path: path.into(),
        reason: reason.into(),
    }
}

// ---- containers ---------------------------------------------------------

/// Where storage bytes come from.
enum Blobs<'m> {
    Zip {
        data: &'m [u8],
        archive: ZipArchive<Cursor<&'m [u8]>>,
        prefix: String,
        /// Deflated entries, inflated once.
        inflated: HashMap<String, Vec<u8>>,
    },
    /// Byte ranges of each storage in the file.
    Legacy {
        data: &'m [u8],
        ranges: HashMap<String, (usize, usize)>,
    },
}

fn open_zip<'m>(
    path: &Path,
    data: &'m [u8],
    budget: u64,
) -> Result<(Pickle, Blobs<'m>, bool), WeightsError> {
    let mut archive = ZipArchive::new(Cursor::new(data)).map_err(|e| WeightsError::Truncated {
        path: path.into(),
        what: format!("zip directory unreadable: {e}"),
    })?;
    // `<top>/data.pkl`, with the shallowest top folder (nested archives or
    // extra files could also end in data.pkl).
    let pkl = archive
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.len()))
        .map(|n| n.into_owned())
        .ok_or_else(|| not_checkpoint(path, "zip archive without data.pkl"))?;
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
    let zerr = |e| WeightsError::Zip {
        path: path.into(),
        source: e,
    };
    let pkl_bytes = read_entry(path, &mut archive, &pkl, budget)?;
    let big_endian = match archive.by_name(&format!("{prefix}byteorder")) {
        Ok(mut f) => {
            let mut s = String::new();
            (&mut f)
                .take(16)
                .read_to_string(&mut s)
                .map_err(|e| WeightsError::io(path, e))?;
            match s.trim() {
                "little" => false,
                "big" => true,
                other => {
                    return Err(WeightsError::invalid(
                        path,
                        format!("unknown byteorder {other:?}"),
                    ))
                }
            }
        }
        Err(zip::result::ZipError::FileNotFound) => false,
        Err(e) => return Err(zerr(e)),
    };
    let pk = pickle::load(&pkl_bytes).map_err(|e| WeightsError::pickle(path, "data.pkl", e))?;
    Ok((
        pk,
        Blobs::Zip {
            data,
            archive,
            prefix,
            inflated: HashMap::new(),
        },
        big_endian,
    ))
}

/// Reads a whole zip entry, at most `limit` bytes of it.
fn read_entry(
    path: &Path,
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, WeightsError> {
    let f = archive.by_name(name).map_err(|e| WeightsError::Zip {
        path: path.into(),
        source: e,
    })?;
    let declared = f.size();
    if declared > limit {
        return Err(WeightsError::invalid(
            path,
            format!("zip entry {name} declares {declared} bytes, over the limit"),
        ));
    }
    let mut out = Vec::with_capacity(declared as usize);
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| WeightsError::Truncated {
            path: path.into(),
            what: format!("zip entry {name}: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(WeightsError::invalid(
            path,
            format!("zip entry {name} inflates past the limit"),
        ));
    }
    Ok(out)
}

fn open_legacy<'m>(path: &Path, data: &'m [u8]) -> Result<(Pickle, Blobs<'m>, bool), WeightsError> {
    let magic = pickle::load(data)
        .map_err(|_| not_checkpoint(path, "a pickle without the torch magic number"))?;
    if magic.root != Value::BigInt(LEGACY_MAGIC[..].into()) {
        return Err(not_checkpoint(
            path,
            "a pickle without the torch magic number",
        ));
    }
    let mut pos = magic.consumed;
    let mut next = |what: &str| -> Result<Pickle, WeightsError> {
        let pk = pickle::load(&data[pos..]).map_err(|e| WeightsError::pickle(path, what, e))?;
        pos += pk.consumed;
        Ok(pk)
    };
    let proto = next("protocol version")?;
    if proto.root != Value::Int(LEGACY_PROTOCOL) {
        return Err(WeightsError::invalid(
            path,
            format!(
                "legacy protocol version {} (expected {LEGACY_PROTOCOL})",
                proto.describe(&proto.root)
            ),
        ));
    }
    let sys_info = next("sys_info")?;
    let big_endian = sys_info
        .dict_items(&sys_info.root)
        .and_then(|items| {
            items
                .iter()
                .find(|(k, _)| k.as_str() == Some("little_endian"))
        })
        .map(|(_, v)| *v == Value::Bool(false))
        .unwrap_or(false);
    let main = next("checkpoint object")?;
    let keys_pk = next("storage key list")?;
    let keys = keys_pk
        .seq_items(&keys_pk.root)
        .ok_or_else(|| WeightsError::invalid(path, "storage key list is not a list"))?;

    // Element sizes: torch sizes each storage's data by the dtype of its first
    // reference in the object pickle.
    let mut elem_of: HashMap<String, Elem> = HashMap::new();
    for obj in &main.objs {
        if let Obj::PersistentId(pid) = obj {
            if let Ok(Some(s)) = parse_storage_pid(&main, pid) {
                elem_of.entry(s.key).or_insert(s.elem);
            }
        }
    }
    let mut ranges = HashMap::new();
    for k in keys {
        let key = key_string(k)
            .ok_or_else(|| WeightsError::invalid(path, "storage key is not a string"))?;
        let elem = *elem_of.get(&key).ok_or_else(|| {
            WeightsError::invalid(path, format!("storage {key} is never referenced"))
        })?;
        let head = data
            .get(pos..pos + 8)
            .ok_or_else(|| WeightsError::Truncated {
                path: path.into(),
                what: format!("storage {key} header"),
            })?;
        let mut b = [0u8; 8];
        b.copy_from_slice(head);
        let numel = if big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        };
        let start = pos + 8;
        let end = numel
            .checked_mul(elem.size() as u64)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| start.checked_add(n))
            .filter(|&e| e <= data.len())
            .ok_or_else(|| WeightsError::Truncated {
                path: path.into(),
                what: format!("storage {key} declares {numel} elements"),
            })?;
        ranges.insert(key, (start, end));
        pos = end;
    }
    Ok((main, Blobs::Legacy { data, ranges }, big_endian))
}

impl<'m> Blobs<'m> {
    /// The raw bytes of storage `key`; `budget` pays for inflating.
    fn get(&mut self, path: &Path, key: &str, budget: &mut u64) -> Result<&[u8], WeightsError> {
        match self {
            Blobs::Legacy { data, ranges } => {
                let (s, e) = *ranges.get(key).ok_or_else(|| {
                    WeightsError::invalid(path, format!("storage {key} has no data"))
                })?;
                Ok(&data[s..e])
            }
            Blobs::Zip {
                data,
                archive,
                prefix,
                inflated,
            } => {
                let name = format!("{prefix}data/{key}");
                if !inflated.contains_key(&name) {
                    let zerr = |e| WeightsError::Zip {
                        path: path.into(),
                        source: e,
                    };
                    let f = archive.by_name(&name).map_err(|e| match e {
                        zip::result::ZipError::FileNotFound => {
                            WeightsError::invalid(path, format!("storage entry {name} missing"))
                        }
                        e => zerr(e),
                    })?;
                    // torch stores storages uncompressed: slice the map.
                    if f.compression() == zip::CompressionMethod::Stored {
                        let start = f.data_start().map(|s| s as usize);
                        let len = f.size() as usize;
                        if let Some(s) = start {
                            let whole: &'m [u8] = data;
                            return whole.get(s..s.saturating_add(len)).ok_or_else(|| {
                                WeightsError::Truncated {
                                    path: path.into(),
                                    what: format!("zip entry {name}"),
                                }
                            });
                        }
                    }
                    drop(f);
                    let bytes = read_entry(path, archive, &name, *budget)?;
                    *budget -= bytes.len() as u64;
                    inflated.insert(name.clone(), bytes);
                }
                Ok(inflated.get(&name).map(Vec::as_slice).unwrap_or(&[]))
            }
        }
    }
}

// ---- storages and tensors -----------------------------------------------

/// Element types of torch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }

    /// `torch.FloatStorage` and friends (`torch.cuda.*` in old files).
    fn from_storage_class(module: &str, name: &str) -> Option<Elem> {
        if module != "torch" && module != "torch.cuda" {
            return None;
        }
        Some(match name {
            "FloatStorage" => Elem::F32,
            "DoubleStorage" => Elem::F64,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "CharStorage" => Elem::I8,
            "ByteStorage" | "UntypedStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }

    /// `torch.float32` and friends (the dtype argument of `_rebuild_tensor_v3`).
    fn from_dtype(module: &str, name: &str) -> Option<Elem> {
        if module != "torch" {
            return None;
        }
        Some(match name {
            "float32" | "float" => Elem::F32,
            "float64" | "double" => Elem::F64,
            "float16" | "half" => Elem::F16,
            "bfloat16" => Elem::BF16,
            "int64" | "long" => Elem::I64,
            "int32" | "int" => Elem::I32,
            "int16" | "short" => Elem::I16,
            "int8" => Elem::I8,
            "uint8" => Elem::U8,
            "bool" => Elem::Bool,
            _ => return None,
        })
    }
}

/// A decoded storage persistent id.
struct StorageRef {
    key: String,
    elem: Elem,
    /// Legacy storage views: (element offset, element count) in the root.
    view: Option<(usize, usize)>,
}

/// `Ok(None)`: not a storage id (e.g. a legacy `('module', ...)` id).
fn parse_storage_pid(pk: &Pickle, pid: &Value) -> Result<Option<StorageRef>, String> {
    let Some(t) = pk.tuple_items(pid) else {
        return Ok(None);
    };
    if t.first().and_then(Value::as_str) != Some("storage") {
        return Ok(None);
    }
    if t.len() < 5 {
        return Err("storage id with too few fields".into());
    }
    let (m, n) = pk
        .global(&t[1])
        .ok_or_else(|| format!("storage type is {}", pk.describe(&t[1])))?;
    let elem =
        Elem::from_storage_class(m, n).ok_or_else(|| format!("unsupported storage {m}.{n}"))?;
    let key = key_string(&t[2]).ok_or("storage key is not a string")?;
    let view = match t.get(5) {
        None | Some(Value::None) => None,
        Some(v) => {
            // (view_key, offset, size), both in elements.
            let vt = pk.tuple_items(v).ok_or("bad storage view")?;
            let off = vt
                .get(1)
                .and_then(Value::as_int)
                .ok_or("bad storage view")?;
            let len = vt
                .get(2)
                .and_then(Value::as_int)
                .ok_or("bad storage view")?;
            let off = usize::try_from(off).map_err(|_| "bad storage view")?;
            let len = usize::try_from(len).map_err(|_| "bad storage view")?;
            Some((off, len))
        }
    };
    Ok(Some(StorageRef { key, elem, view }))
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

const REBUILD_TENSOR: &[&str] = &[
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
];

/// Torch tensor constructors we know of but do not interpret: finding one
/// where a tensor belongs is an error, not a silent skip.
fn is_torch_tensorish(name: &str) -> bool {
    let Some((module, func)) = name.rsplit_once('.') else {
        return false;
    };
    (module == "torch" || module.starts_with("torch."))
        && (func.starts_with("_rebuild") || func == "_load_from_bytes")
}

struct Reader<'p, 'm> {
    path: &'p Path,
    pk: &'p Pickle,
    blobs: Blobs<'m>,
    big_endian: bool,
    /// Tensors already built, by pickle object (shared through the memo).
    cache: HashMap<usize, Tensor>,
    /// Bytes we may still materialize.
    budget: u64,
    visits: usize,
    skipped: Vec<String>,
}

type Found = (Vec<(String, Tensor)>, Layout, BTreeMap<String, String>);
type ModuleWeights = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// Keyed tensors with Python dict semantics: a repeated key keeps its first
/// position and its last value.
#[derive(Default)]
struct Entries {
    list: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl Entries {
    fn put(&mut self, key: String, t: Tensor) {
        match self.index.get(&key) {
            Some(&i) => self.list[i].1 = t,
            None => {
                self.index.insert(key.clone(), self.list.len());
                self.list.push((key, t));
            }
        }
    }
}

enum Kind {
    Module(String),
    StateDict,
    Wrapper,
    Other,
}

impl<'p> Reader<'p, '_> {
    fn invalid(&self, msg: impl Into<String>) -> WeightsError {
        WeightsError::invalid(self.path, msg)
    }

    fn find_weights(&mut self) -> Result<Found, WeightsError> {
        let pk = self.pk;
        let root = &pk.root;
        match self.kind(root) {
            Kind::Module(class) => {
                let (t, meta) = self.take_module(root)?;
                Ok((t, Layout::Module { class, key: None }, meta))
            }
            Kind::StateDict => {
                let t = self.take_state_dict(root)?;
                Ok((t, Layout::StateDict, BTreeMap::new()))
            }
            Kind::Wrapper => {
                let found = self.find_in_wrapper(root, "", 0)?;
                let (t, layout, mut meta) = found.ok_or_else(|| WeightsError::NoTensors {
                    path: self.path.into(),
                })?;
                // The wrapper's own plain facts (epoch, date, ...); module
                // attributes win on a name clash.
                for (k, v) in pk.dict_items(root).unwrap_or(&[]) {
                    let (Some(k), Some(j)) = (k.as_str(), scalar_json(v)) else {
                        continue;
                    };
                    meta.entry(k.to_string()).or_insert_with(|| j.to_string());
                }
                Ok((t, layout, meta))
            }
            Kind::Other => Err(WeightsError::NoTensors {
                path: self.path.into(),
            }),
        }
    }

    fn find_in_wrapper(
        &mut self,
        v: &Value,
        at: &str,
        depth: usize,
    ) -> Result<Option<Found>, WeightsError> {
        let pk = self.pk;
        let items = pk.dict_items(v).unwrap_or(&[]);
        let value_of = |key: &str| {
            items
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
        };
        let join = |k: &str| {
            if at.is_empty() {
                k.to_string()
            } else {
                format!("{at}/{k}")
            }
        };
        for key in WRAPPER_KEYS {
            let Some(val) = value_of(key) else { continue };
            if let Some(found) = self.take_candidate(val, &join(key), depth)? {
                return Ok(Some(found));
            }
        }
        // Otherwise, the single state dict or module among the other values.
        let others: Vec<(&str, &Value)> = items
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?, v)))
            .filter(|(k, _)| !WRAPPER_KEYS.contains(k))
            .filter(|(_, v)| matches!(self.kind(v), Kind::Module(_) | Kind::StateDict))
            .collect();
        if let [(k, val)] = others[..] {
            return self.take_candidate(val, &join(k), depth);
        }
        Ok(None)
    }

    /// The weights in `v` if it is a non-empty state dict or module, or a
    /// wrapper holding one (two levels at most).
    fn take_candidate(
        &mut self,
        v: &Value,
        key: &str,
        depth: usize,
    ) -> Result<Option<Found>, WeightsError> {
        match self.kind(v) {
            Kind::Module(class) => {
                let (t, meta) = self.take_module(v)?;
                let layout = Layout::Module {
                    class,
                    key: Some(key.to_string()),
                };
                Ok((!t.is_empty()).then_some((t, layout, meta)))
            }
            Kind::StateDict => {
                let t = self.take_state_dict(v)?;
                let layout = Layout::Wrapped {
                    key: key.to_string(),
                };
                Ok((!t.is_empty()).then_some((t, layout, BTreeMap::new())))
            }
            Kind::Wrapper if depth < 2 => self.find_in_wrapper(v, key, depth + 1),
            _ => Ok(None),
        }
    }

    fn kind(&self, v: &Value) -> Kind {
        let pk = self.pk;
        if self.module_state(v).is_some() {
            return Kind::Module(self.class_name(v).unwrap_or_else(|| "?".into()));
        }
        match pk.dict_items(v) {
            Some(items) if items.iter().any(|(_, x)| self.looks_like_tensor(x)) => Kind::StateDict,
            Some(_) => Kind::Wrapper,
            None => Kind::Other,
        }
    }

    fn looks_like_tensor(&self, v: &Value) -> bool {
        match self.pk.instance(v) {
            Some((_, Some(name))) => {
                REBUILD_TENSOR.contains(&name.as_str()) || is_torch_tensorish(&name)
            }
            _ => false,
        }
    }

    /// The `__dict__` of a pickled `nn.Module` (an object whose state has
    /// `_modules` or `_parameters`).
    fn module_state(&self, v: &Value) -> Option<&'p [(Value, Value)]> {
        let pk = self.pk;
        let (inst, _) = pk.instance(v)?;
        let state = inst.state.as_ref()?;
        // `__getstate__` may return (dict, slot_dict).
        let state = match pk.tuple_items(state) {
            Some([d, _]) => d,
            _ => state,
        };
        let items = pk.dict_items(state)?;
        items
            .iter()
            .any(|(k, _)| matches!(k.as_str(), Some("_modules") | Some("_parameters")))
            .then_some(items)
    }

    /// `module.Class` of an object: a global class, the class inside a legacy
    /// `('module', cls, file, source)` persistent id, or the class argument of
    /// `copyreg._reconstructor`.
    fn class_name(&self, v: &Value) -> Option<String> {
        let pk = self.pk;
        let (inst, name) = pk.instance(v)?;
        if name.as_deref() == Some("copyreg._reconstructor") {
            let cls = pk.tuple_items(&inst.args)?.first()?;
            return pk.global(cls).map(|(m, n)| format!("{m}.{n}"));
        }
        if let Some(name) = name {
            return Some(name);
        }
        if let Some(Obj::PersistentId(pid)) = pk.obj(&inst.callable) {
            let t = pk.tuple_items(pid)?;
            if t.first()?.as_str()? == "module" {
                return pk.global(t.get(1)?).map(|(m, n)| format!("{m}.{n}"));
            }
        }
        None
    }

    fn take_state_dict(&mut self, v: &Value) -> Result<Vec<(String, Tensor)>, WeightsError> {
        let pk = self.pk;
        let mut out = Entries::default();
        for (k, val) in pk.dict_items(v).unwrap_or(&[]) {
            let Some(key) = key_string(k) else {
                self.skipped.push(pk.describe(k));
                continue;
            };
            match self.tensor(val, &key, 0)? {
                Some(t) => out.put(key, t),
                None if *val == Value::None => {}
                None => self.skipped.push(key),
            }
        }
        Ok(out.list)
    }

    fn take_module(&mut self, v: &Value) -> Result<ModuleWeights, WeightsError> {
        let mut out = Entries::default();
        self.walk_module(v, "", 0, &mut out)?;
        let mut meta = BTreeMap::new();
        if let Some(state) = self.module_state(v) {
            for attr in ["names", "stride", "yaml"] {
                let Some((_, val)) = state.iter().find(|(k, _)| k.as_str() == Some(attr)) else {
                    continue;
                };
                let mut nodes = 100_000usize;
                if let Some(j) = self.json(val, 0, &mut nodes) {
                    meta.insert(attr.to_string(), j.to_string());
                }
            }
        }
        Ok((out.list, meta))
    }

    /// Appends the `state_dict()` entries of a pickled module: its parameters,
    /// its persistent buffers, then its children, recursively.
    fn walk_module(
        &mut self,
        v: &Value,
        prefix: &str,
        depth: usize,
        out: &mut Entries,
    ) -> Result<(), WeightsError> {
        if depth > MAX_MODULE_DEPTH {
            return Err(self.invalid("modules nested too deeply"));
        }
        self.visits += 1;
        if self.visits > MAX_MODULE_VISITS {
            return Err(self.invalid("too many module visits"));
        }
        let pk = self.pk;
        let Some(state) = self.module_state(v) else {
            return Ok(());
        };
        let attr = |name: &str| {
            state
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
        };
        let non_persistent: HashSet<&str> = attr("_non_persistent_buffers_set")
            .and_then(|s| pk.seq_items(s))
            .unwrap_or(&[])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for (group, persistent_only) in [("_parameters", false), ("_buffers", true)] {
            let items = attr(group).and_then(|d| pk.dict_items(d)).unwrap_or(&[]);
            for (k, val) in items {
                let Some(name) = key_string(k) else { continue };
                if persistent_only && non_persistent.contains(name.as_str()) {
                    continue;
                }
                let key = format!("{prefix}{name}");
                match self.tensor(val, &key, 0)? {
                    Some(t) => out.put(key, t),
                    None if *val == Value::None => {}
                    None => self.skipped.push(key),
                }
            }
        }
        let children = attr("_modules")
            .and_then(|d| pk.dict_items(d))
            .unwrap_or(&[]);
        for (k, child) in children {
            let Some(name) = key_string(k) else { continue };
            if *child == Value::None {
                continue;
            }
            if self.module_state(child).is_none() {
                self.skipped.push(format!("{prefix}{name}"));
                continue;
            }
            self.walk_module(child, &format!("{prefix}{name}."), depth + 1, out)?;
        }
        Ok(())
    }

    /// `Some(tensor)` if `v` is a tensor, `None` if it is some other value,
    /// an error if it is a torch tensor we cannot (or will not) build.
    fn tensor(
        &mut self,
        v: &Value,
        at: &str,
        depth: usize,
    ) -> Result<Option<Tensor>, WeightsError> {
        let pk = self.pk;
        let Value::Ref(id) = v else { return Ok(None) };
        if let Some(t) = self.cache.get(id) {
            return Ok(Some(t.clone()));
        }
        let Some((inst, Some(name))) = pk.instance(v) else {
            return Ok(None);
        };
        if depth > 8 {
            return Err(self.invalid(format!("{at}: tensor wrappers nested too deeply")));
        }
        let args = pk.tuple_items(&inst.args).unwrap_or(&[]);
        let t = match name.as_str() {
            "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v2" => {
                self.rebuild(args, None, at)?
            }
            "torch._utils._rebuild_tensor_v3" => {
                let elem = args
                    .get(6)
                    .and_then(|d| pk.global(d))
                    .and_then(|(m, n)| Elem::from_dtype(m, n))
                    .ok_or_else(|| {
                        self.invalid(format!("{at}: bad dtype in _rebuild_tensor_v3"))
                    })?;
                self.rebuild(args, Some(elem), at)?
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                self.inner_tensor(args.first(), at, depth)?
            }
            "torch._tensor._rebuild_from_type_v2" => {
                // (func, type, args, state): the tensor is func(*args); the
                // subclass type and Python state are dropped.
                let func = args.first();
                let inner_args = args.get(2).and_then(|a| pk.tuple_items(a));
                let fname = func
                    .and_then(|f| pk.global(f))
                    .map(|(m, n)| format!("{m}.{n}"));
                match (fname, inner_args) {
                    (Some(f), Some(a))
                        if f == "torch._utils._rebuild_tensor_v2"
                            || f == "torch._utils._rebuild_tensor" =>
                    {
                        self.rebuild(a, None, at)?
                    }
                    (Some(f), _) => {
                        return Err(WeightsError::UnsupportedGlobal {
                            path: self.path.into(),
                            global: f,
                            at: at.into(),
                        })
                    }
                    _ => return Err(self.invalid(format!("{at}: bad _rebuild_from_type_v2"))),
                }
            }
            n if is_torch_tensorish(n) => {
                return Err(WeightsError::UnsupportedGlobal {
                    path: self.path.into(),
                    global: n.into(),
                    at: at.into(),
                })
            }
            _ => return Ok(None),
        };
        self.cache.insert(*id, t.clone());
        Ok(Some(t))
    }

    fn inner_tensor(
        &mut self,
        v: Option<&Value>,
        at: &str,
        depth: usize,
    ) -> Result<Tensor, WeightsError> {
        let v = v.ok_or_else(|| self.invalid(format!("{at}: parameter without data")))?;
        match self.tensor(v, at, depth + 1)? {
            Some(t) => Ok(t),
            None => Err(self.not_a_tensor(v, at)),
        }
    }

    fn not_a_tensor(&self, v: &Value, at: &str) -> WeightsError {
        let pk = self.pk;
        match pk.instance(v).and_then(|(i, _)| pk.global(&i.callable)) {
            Some((m, n)) => WeightsError::UnsupportedGlobal {
                path: self.path.into(),
                global: format!("{m}.{n}"),
                at: at.into(),
            },
            None => match pk.global(v) {
                Some((m, n)) => WeightsError::UnsupportedGlobal {
                    path: self.path.into(),
                    global: format!("{m}.{n}"),
                    at: at.into(),
                },
                None => self.invalid(format!("{at}: expected a tensor, found {}", pk.describe(v))),
            },
        }
    }

    /// `_rebuild_tensor*(storage, storage_offset, size, stride, ...)`.
    fn rebuild(
        &mut self,
        args: &[Value],
        elem_override: Option<Elem>,
        at: &str,
    ) -> Result<Tensor, WeightsError> {
        let pk = self.pk;
        if args.len() < 4 {
            return Err(self.invalid(format!(
                "{at}: tensor rebuild with {} arguments",
                args.len()
            )));
        }
        let storage = match pk.obj(&args[0]) {
            Some(Obj::PersistentId(pid)) => parse_storage_pid(pk, pid)
                .map_err(|e| self.invalid(format!("{at}: {e}")))?
                .ok_or_else(|| self.invalid(format!("{at}: persistent id is not a storage")))?,
            _ => return Err(self.not_a_tensor(&args[0], at)),
        };
        let elem = elem_override.unwrap_or(storage.elem);
        let offset =
            as_index(&args[1]).ok_or_else(|| self.invalid(format!("{at}: bad storage offset")))?;
        let size = ints(pk, &args[2]).ok_or_else(|| self.invalid(format!("{at}: bad size")))?;
        let stride = ints(pk, &args[3]).ok_or_else(|| self.invalid(format!("{at}: bad stride")))?;
        if size.len() != stride.len() {
            return Err(self.invalid(format!("{at}: size and stride ranks differ")));
        }
        let numel = size
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.invalid(format!("{at}: size overflows")))?;
        let es = elem.size();
        let nbytes = (numel as u64).saturating_mul(es as u64);
        if nbytes > self.budget {
            return Err(self.invalid(format!("{at}: tensors exceed the size limit")));
        }
        self.budget -= nbytes;

        let mut budget = self.budget;
        let path = self.path;
        let all = self.blobs.get(path, &storage.key, &mut budget)?;
        self.budget = budget;
        let bytes = match storage.view {
            None => all,
            Some((off, len)) => off
                .checked_mul(es)
                .zip(len.checked_mul(es))
                .and_then(|(o, l)| all.get(o..o.checked_add(l)?))
                .ok_or_else(|| {
                    WeightsError::invalid(path, format!("{at}: storage view out of range"))
                })?,
        };
        let avail = bytes.len() / es;
        let mut out = Vec::with_capacity(numel * es);
        if numel > 0 {
            // Highest element touched must lie inside the storage.
            let last = size
                .iter()
                .zip(&stride)
                .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
            if !matches!(last, Some(l) if l < avail) {
                return Err(WeightsError::invalid(
                    path,
                    format!("{at}: view (offset {offset}, size {size:?}, stride {stride:?}) outside its storage of {avail} elements"),
                ));
            }
            gather(bytes, es, offset, &size, &stride, &mut out);
        }
        if self.big_endian && es > 1 {
            for c in out.chunks_exact_mut(es) {
                c.reverse();
            }
        }
        to_tensor(path, at, elem, &out, &size)
    }

    /// A value as JSON metadata: scalars, strings, lists, dicts and small
    /// tensors; `None` (skip the entry) for anything else.
    fn json(&mut self, v: &Value, depth: usize, nodes: &mut usize) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        if depth > 32 || *nodes == 0 {
            return None;
        }
        *nodes -= 1;
        if let Some(j) = scalar_json(v) {
            return Some(j);
        }
        let pk = self.pk;
        if let Some(items) = pk.seq_items(v) {
            let mut arr = Vec::with_capacity(items.len().min(1024));
            for x in items {
                arr.push(self.json(x, depth + 1, nodes)?);
            }
            return Some(J::Array(arr));
        }
        if let Some(items) = pk.dict_items(v) {
            let mut map = serde_json::Map::new();
            for (k, x) in items {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                map.insert(key, self.json(x, depth + 1, nodes)?);
            }
            return Some(J::Object(map));
        }
        let t = self.tensor(v, "metadata", 0).ok()??;
        if t.elem_count() > MAX_JSON_TENSOR {
            return None;
        }
        tensor_json(&t)
    }
}

fn as_index(v: &Value) -> Option<usize> {
    usize::try_from(v.as_int()?).ok()
}

fn ints(pk: &Pickle, v: &Value) -> Option<Vec<usize>> {
    pk.seq_items(v)?.iter().map(as_index).collect()
}

/// Copies the elements of a strided view into `out`, in row-major order.
fn gather(
    bytes: &[u8],
    es: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
    out: &mut Vec<u8>,
) {
    let numel: usize = size.iter().product();
    if is_contiguous(size, stride) {
        out.extend_from_slice(&bytes[offset * es..(offset + numel) * es]);
        return;
    }
    // Odometer over all dims but the last; the last dim is copied in runs.
    let nd = size.len();
    let (inner, inner_stride) = (size[nd - 1], stride[nd - 1]);
    let mut idx = vec![0usize; nd - 1];
    let mut base = offset;
    for _ in 0..numel / inner {
        if inner_stride == 1 {
            out.extend_from_slice(&bytes[base * es..(base + inner) * es]);
        } else {
            for i in 0..inner {
                let p = (base + i * inner_stride) * es;
                out.extend_from_slice(&bytes[p..p + es]);
            }
        }
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            base += stride[d];
            if idx[d] < size[d] {
                break;
            }
            base -= stride[d] * size[d];
            idx[d] = 0;
        }
    }
}

fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(d);
    }
    true
}

fn to_tensor(
    path: &Path,
    at: &str,
    elem: Elem,
    bytes: &[u8],
    shape: &[usize],
) -> Result<Tensor, WeightsError> {
    let dev = Device::Cpu;
    let cerr = |e| WeightsError::invalid(path, format!("{at}: {e}"));
    let raw = |d: DType| Tensor::from_raw_buffer(bytes, d, shape, &dev).map_err(cerr);
    match elem {
        Elem::F32 => raw(DType::F32),
        Elem::F64 => raw(DType::F64),
        Elem::F16 => raw(DType::F16),
        Elem::BF16 => raw(DType::BF16),
        Elem::I64 => raw(DType::I64),
        Elem::I32 => raw(DType::I32),
        Elem::I16 => raw(DType::I16),
        Elem::U8 => raw(DType::U8),
        Elem::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| (b != 0) as u8).collect();
            Tensor::from_vec(v, shape, &dev).map_err(cerr)
        }
        Elem::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, &dev).map_err(cerr)
        }
    }
}

fn scalar_json(v: &Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.to_string()),
        _ => return None,
    })
}

fn tensor_json(t: &Tensor) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    let flat = t.flatten_all().ok()?;
    let vals: Vec<J> = if is_float(t.dtype()) {
        flat.to_dtype(DType::F64)
            .ok()?
            .to_vec1::<f64>()
            .ok()?
            .into_iter()
            .map(|x| serde_json::Number::from_f64(x).map_or(J::Null, J::Number))
            .collect()
    } else {
        flat.to_dtype(DType::I64)
            .ok()?
            .to_vec1::<i64>()
            .ok()?
            .into_iter()
            .map(J::from)
            .collect()
    };
    // Re-nest row-major values into the tensor's shape.
    fn nest(vals: &[J], dims: &[usize]) -> J {
        match dims {
            [] => vals.first().cloned().unwrap_or(J::Null),
            [_] => J::Array(vals.to_vec()),
            [d, rest @ ..] => {
                let step = rest.iter().product::<usize>();
                J::Array(
                    (0..*d)
                        .map(|i| nest(&vals[i * step..(i + 1) * step], rest))
                        .collect(),
                )
            }
        }
    }
    Some(nest(&vals, t.dims()))
}
