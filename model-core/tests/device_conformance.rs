//! Every family against its PyTorch reference on one device, in each dtype:
//! the conformance check that `deploy/cuda/gpu-check.sh` runs on a GPU with
//! this same test binary.
//!
//! - `FOVEA_TEST_DEVICE`: `cpu` (the default), `cuda:N` or `metal:N`.
//! - `FOVEA_TEST_DTYPES`: a comma-separated list, default `f32,f16,bf16`.
//! - `FOVEA_FULL_FIXTURES`: also every full-size fixture in that directory
//!   (the generators' `--full DIR`).
//! - `FOVEA_SMALL_FIXTURES`: where the committed fixtures are, for a test
//!   binary run from another checkout (default: this crate's).
//!
//! f32 must match the reference within the fixture's tolerance (1e-4 of the
//! output's scale). f16 and bf16 must stay within a bound per family and
//! keep the reference's top-1 class wherever the reference's margin between
//! its first two classes is wider than the error measured. On the CPU the
//! f16/bf16 runs, and the f32 run of `candle_ops_f32_matches` (which turns
//! Fovea's CPU kernels off), take the candle code path that CUDA and Metal
//! run. (`FOVEA_HOST_KERNELS=off` is for f32 on the CPU: candle's own CPU
//! convolution has no bf16 matmul.)

mod common;

use common::rel_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use fovea_model_core::classifier::Classifier;
use fovea_model_core::detr::Detr;
use fovea_model_core::yolo::Yolo;

fn test_device() -> Result<Device> {
    let spec = std::env::var("FOVEA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let (kind, ordinal) = spec.split_once(':').unwrap_or((spec.as_str(), "0"));
    let ordinal: usize = ordinal.parse().context("FOVEA_TEST_DEVICE ordinal")?;
    Ok(match kind {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(ordinal)?,
        "metal" => Device::new_metal(ordinal)?,
        _ => bail!("FOVEA_TEST_DEVICE={spec}: use cpu, cuda:N or metal:N"),
    })
}

fn test_dtypes() -> Result<Vec<DType>> {
    let list = std::env::var("FOVEA_TEST_DTYPES").unwrap_or_else(|_| "f32,f16,bf16".into());
    list.split(',')
        .map(|s| match s.trim() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => bail!("FOVEA_TEST_DTYPES: unknown dtype {other}"),
        })
        .collect()
}

/// What a fixture directory holds, told apart by its golden tensors.
enum Family {
    Classifier,
    Yolo,
    Detr,
}

struct Fixture {
    name: String,
    family: Family,
    weights: HashMap<String, Tensor>,
    golden: HashMap<String, Tensor>,
    config: serde_json::Value,
}

impl Fixture {
    fn load(dir: &Path) -> Result<Self> {
        let cpu = Device::Cpu;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &cpu)?;
        let family = if golden.contains_key("pixel_mask") {
            Family::Detr
        } else if golden.contains_key("output") {
            Family::Yolo
        } else if golden.contains_key("logits") {
            Family::Classifier
        } else {
            bail!("{dir:?}: no logits or output in golden.safetensors");
        };
        let pt = dir.join("model.pt");
        let weights = if pt.exists() {
            fovea_weights::pth::load_pth(&pt)?
                .tensors
                .into_iter()
                .collect()
        } else {
            candle_core::safetensors::load(dir.join("model.safetensors"), &cpu)?
        };
        Ok(Self {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            family,
            weights,
            golden,
            config,
        })
    }

    fn golden(&self, key: &str) -> Result<&Tensor> {
        self.golden
            .get(key)
            .with_context(|| format!("{key} in {}", self.name))
    }

    fn tolerance(&self) -> f32 {
        self.config["tolerance_rel"].as_f64().unwrap_or(1e-4) as f32
    }

    /// The input in the model's dtype on its device.
    fn input(&self, key: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        Ok(self.golden(key)?.to_dtype(dtype)?.to_device(device)?)
    }

    /// Runs the fixture; returns (what, relative difference, reference, ours)
    /// for each output compared, the outputs back on the CPU in f32.
    fn run(&self, device: &Device, dtype: DType) -> Result<Vec<(String, f32, Tensor, Tensor)>> {
        let weights = self.weights.clone();
        let back =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
        let mut out = Vec::new();
        match self.family {
            Family::Classifier => {
                let arch = self.config["arch"].as_str();
                let model = Classifier::load(weights, arch, device, dtype)?;
                let got = back(model.forward(&self.input("pixel_values", device, dtype)?)?)?;
                let want = self.golden("logits")?.clone();
                out.push(("logits".into(), rel_diff(&got, &want)?, want, got));
            }
            Family::Yolo => {
                let model = Yolo::load(weights, device, dtype)?;
                let got = back(model.forward(&self.input("pixel_values", device, dtype)?)?)?;
                let want = self.golden("output")?;
                let nc = want.dim(1)? - 4;
                for (what, start, len) in [("boxes", 0, 4), ("scores", 4, nc)] {
                    let (w, g) = (want.narrow(1, start, len)?, got.narrow(1, start, len)?);
                    out.push((what.into(), rel_diff(&g, &w)?, w, g));
                }
            }
            Family::Detr => {
                let model = Detr::load(weights, None, device, dtype)?;
                let mask = self.golden("pixel_mask")?.to_device(device)?;
                let (logits, boxes) =
                    model.forward(&self.input("pixel_values", device, dtype)?, &mask)?;
                for (what, got) in [("logits", logits), ("pred_boxes", boxes)] {
                    let (want, got) = (self.golden(what)?.clone(), back(got)?);
                    out.push((what.into(), rel_diff(&got, &want)?, want, got));
                }
            }
        }
        Ok(out)
    }

    /// The bound for f16/bf16, relative to the output's scale. These are
    /// random-weight models, which amplify rounding: PyTorch's own bf16 runs
    /// of the tiny ResNet-50 and EfficientNet-B0 fixtures differ from its f32
    /// run by 0.17-0.18 (f16: 0.03-0.12). Logits (classifiers, DETR's
    /// classes) get those bounds with room; YOLO's boxes and scores measured
    /// 10x closer. The tiny YOLOv5's random weights amplify rounding about a
    /// hundredfold more (its f32 reference is 1.8e-5 from f64), so it is
    /// only checked for NaNs.
    fn half_bound(&self, dtype: DType) -> Option<f32> {
        let bf16 = dtype == DType::BF16;
        match self.family {
            Family::Yolo if self.config["version"] == "v5" => None,
            Family::Yolo => Some(if bf16 { 0.1 } else { 2e-2 }),
            Family::Classifier | Family::Detr => Some(if bf16 { 0.3 } else { 0.1 }),
        }
    }
}

/// Rows (of a `[rows, classes]` or `[b, q, classes]` tensor) whose top-1
/// differs from the reference's while the reference's top-2 margin is
/// wider than twice the largest error measured: a changed answer that
/// rounding cannot explain.
fn top1_changes(want: &Tensor, got: &Tensor) -> Result<usize> {
    let classes = want.dim(D::Minus1)?;
    let want = want.reshape(((), classes))?;
    let got = got.reshape(((), classes))?;
    let err = (&got - &want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let mut changed = 0;
    for (w, g) in want.to_vec2::<f32>()?.iter().zip(got.to_vec2::<f32>()?) {
        let argmax = |v: &[f32]| {
            (0..v.len())
                .max_by(|&a, &b| v[a].total_cmp(&v[b]))
                .unwrap_or(0)
        };
        let top = argmax(w);
        let runner_up = (0..classes)
            .filter(|&i| i != top)
            .map(|i| w[i])
            .fold(f32::NEG_INFINITY, f32::max);
        if argmax(&g) != top && w[top] - runner_up > 2.0 * err {
            changed += 1;
        }
    }
    Ok(changed)
}

fn fixture_dirs() -> Result<Vec<PathBuf>> {
    // A binary carried to another machine finds the committed fixtures
    // through FOVEA_SMALL_FIXTURES: the path compiled in is this checkout's.
    let small = match std::env::var_os("FOVEA_SMALL_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models"),
    };
    let mut dirs = Vec::new();
    let full = std::env::var("FOVEA_FULL_FIXTURES").ok();
    for root in std::iter::once(small).chain(full.map(PathBuf::from)) {
        for entry in std::fs::read_dir(&root).with_context(|| format!("{root:?}"))? {
            let dir = entry?.path();
            if dir.join("golden.safetensors").exists() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Runs every fixture on the test device in each dtype; returns the
/// failures, and prints one line per output compared.
fn check_all(device: &Device, dtypes: &[DType]) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    println!(
        "{:34} {:5} {:10} {:>10} {:>8}",
        "fixture", "dtype", "output", "rel diff", "top-1"
    );
    for dir in fixture_dirs()? {
        let fixture = Fixture::load(&dir)?;
        for &dtype in dtypes {
            let results = fixture
                .run(device, dtype)
                .with_context(|| format!("{} {dtype:?} on {device:?}", fixture.name))?;
            for (what, rel, want, got) in results {
                let classes = what == "logits";
                let changed = if classes {
                    top1_changes(&want, &got)?
                } else {
                    0
                };
                println!(
                    "{:34} {:5} {what:10} {rel:>10.2e} {:>8}",
                    fixture.name,
                    format!("{dtype:?}"),
                    if classes {
                        changed.to_string()
                    } else {
                        "-".into()
                    },
                );
                let label = format!("{} {dtype:?} {what}", fixture.name);
                let bound = match dtype {
                    DType::F32 => Some(fixture.tolerance()),
                    _ => fixture.half_bound(dtype),
                };
                if !rel.is_finite() {
                    failures.push(format!("{label}: not finite"));
                } else if bound.is_some_and(|b| rel > b) {
                    failures.push(format!("{label}: {rel:.2e} over {:.0e}", bound.unwrap()));
                }
                if changed > 0 {
                    failures.push(format!("{label}: {changed} rows changed their top-1"));
                }
            }
        }
    }
    Ok(failures)
}

#[test]
fn every_family_matches_on_the_test_device() -> Result<()> {
    let device = test_device()?;
    let failures = check_all(&device, &test_dtypes()?)?;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// f32 through candle's own ops, as CUDA and Metal run it: this binary is
/// run again with `FOVEA_HOST_KERNELS=off` (read once per process) and only
/// the test above selected.
#[test]
fn candle_ops_f32_matches() -> Result<()> {
    if std::env::var_os("FOVEA_HOST_KERNELS").is_some() || test_device()?.is_cuda() {
        return Ok(());
    }
    let status = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "every_family_matches_on_the_test_device",
            "--nocapture",
        ])
        .env("FOVEA_HOST_KERNELS", "off")
        .env("FOVEA_TEST_DTYPES", "f32")
        .env_remove("FOVEA_FULL_FIXTURES")
        .status()?;
    assert!(status.success(), "the candle-ops run failed: {status}");
    Ok(())
}
