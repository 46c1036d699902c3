//! Loading models from their SPEC and keeping the loaded ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device};
use fovea_model_core::classifier::ClassifierInfo;
use fovea_model_core::preprocess::Preprocess;
use fovea_weights::store::{Manifest, Store, StoredModel};

use crate::batcher::{BatchMetrics, BatchSettings, Batcher, JobError};
use crate::config::strip_arch;
use crate::metrics::Metrics;
use crate::network::{load_network, Decoder, InputPipeline, LoadOverrides, ModelInput, Task};

/// `cpu`, `cuda:N`, `metal:N`. Asking for a device this build lacks is an
/// error here, at start-up.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .with_context(|| format!("device {spec:?}"))?,
        ),
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => {
            bail!("device {spec}: this build has no CUDA support (build with --features cuda)")
        }
        "metal" if !cfg!(feature = "metal") => {
            bail!("device {spec}: this build has no Metal support (build with --features metal)")
        }
        "cuda" => Device::new_cuda(ordinal).with_context(|| {
            format!(
                "device {spec}: no usable NVIDIA GPU (is the driver installed, and new enough \
                 for the CUDA version this build was made with?)"
            )
        }),
        "metal" => Device::new_metal(ordinal)
            .with_context(|| format!("device {spec}: no usable Metal GPU")),
        _ => bail!("unknown device {spec:?}: use cpu, cuda:N or metal:N"),
    }
}

pub fn parse_dtype(spec: &str) -> anyhow::Result<DType> {
    match spec {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => bail!("unknown dtype {spec:?}: use f32, f16 or bf16"),
    }
}

pub fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// An accelerator's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

/// Free and total memory of a CUDA device (the driver's count, every
/// process's allocations included); None for the CPU and for Metal, whose
/// memory candle does not report.
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(DeviceMemory {
                free: free as u64,
                total: total as u64,
            })
        }
        _ => None,
    }
}

pub fn dtype_label(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Where a SPEC's weights are and what is known about them.
#[derive(Debug)]
pub struct Resolved {
    pub weights: PathBuf,
    pub arch: Option<String>,
    pub manifest: Option<Manifest>,
}

/// Resolve a SPEC: a `.safetensors` file, a model directory (with or
/// without a manifest), or a store/catalog name (pulled when `pull`).
pub fn resolve_spec(
    spec: &str,
    store: &Store,
    pull: bool,
    progress: &dyn Fn(fovea_weights::pull::PullStep),
) -> anyhow::Result<Resolved> {
    let (arch, rest) = strip_arch(spec);
    let path = Path::new(rest);
    if path.is_file() {
        return Ok(Resolved {
            weights: path.to_path_buf(),
            arch: arch.map(String::from),
            manifest: None,
        });
    }
    if path.is_dir() {
        let weights = path.join(fovea_weights::store::WEIGHTS_FILE);
        if !weights.is_file() {
            bail!(
                "{} has no {}",
                path.display(),
                fovea_weights::store::WEIGHTS_FILE
            );
        }
        let manifest = path
            .join(fovea_weights::store::MANIFEST_FILE)
            .is_file()
            .then(|| StoredModel::open(path).map(|m| m.manifest))
            .transpose()?;
        let arch = arch
            .map(String::from)
            .or(manifest.as_ref().map(|m| m.arch.clone()));
        return Ok(Resolved {
            weights,
            arch,
            manifest,
        });
    }
    let stored = match store.get(rest)? {
        Some(stored) => stored,
        None if fovea_weights::catalog::find(rest).is_some() => {
            if !pull {
                bail!(
                    "model {rest:?} is not in the store ({}); run `fovea pull {rest}`",
                    store.root().display()
                );
            }
            tracing::info!(model = rest, store = %store.root().display(), "pulling model into the store");
            fovea_weights::pull::pull(store, rest, &Default::default(), progress)?
        }
        None => bail!(
            "{spec:?} is neither a file, a model directory, a stored model nor a catalog name \
             (`fovea models` lists them)"
        ),
    };
    stored.verify()?;
    Ok(Resolved {
        weights: stored.weights_path(),
        arch: arch
            .map(String::from)
            .or(Some(stored.manifest.arch.clone())),
        manifest: Some(stored.manifest),
    })
}

/// The eval transform the reference library uses for an architecture. The
/// input size is the model's own (`ClassifierInfo::default_input_size`);
/// timm's pretrained configs pair each size with a crop_pct.
pub fn default_preprocess(info: &ClassifierInfo) -> Preprocess {
    use fovea_model_core::preprocess::Interpolation;
    const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
    const INCEPTION: [f32; 3] = [0.5, 0.5, 0.5];
    let size = info.default_input_size as u32;
    let lite = info.variant.contains("lite");
    if info.family == "vit" {
        return vit_preprocess(info.layout, size);
    }
    if info.family != "efficientnet" {
        return Preprocess::torchvision_imagenet();
    }
    if lite && info.layout == "lukemelas" {
        return Preprocess::efficientnet_lite(size);
    }
    let crop_pct = match (lite, size) {
        (true, 300) => 0.920,
        (_, 240) => 0.882,
        (true, 224) => 0.882,
        (_, 260) => 0.890,
        (_, 280 | 300) => 0.904,
        (_, 380) => 0.922,
        (_, 456) => 0.934,
        (_, 528) => 0.942,
        (_, 600) => 0.949,
        _ => 0.875,
    };
    let (mean, std) = if lite {
        (INCEPTION, INCEPTION)
    } else {
        (IMAGENET_MEAN, IMAGENET_STD)
    };
    Preprocess::timm(size, crop_pct, Interpolation::Bicubic, mean, std)
}

/// ViT: transformers' `ViTImageProcessor` resizes to the model's size
/// exactly (PIL bilinear, no crop); timm's configs resize the shorter side
/// at crop_pct 0.9 (bicubic) and centre-crop, except at 384 where they
/// "squash" (resize exactly, bicubic). Both normalise with mean/std 0.5.
fn vit_preprocess(layout: &str, size: u32) -> Preprocess {
    use fovea_model_core::preprocess::{Interpolation, Resize};
    const HALF: [f32; 3] = [0.5; 3];
    let exact = |interpolation| Preprocess {
        resize: Resize::Exact {
            width: size,
            height: size,
        },
        interpolation,
        crop: None,
        scale: 1.0 / 255.0,
        mean: HALF,
        std: HALF,
    };
    match (layout, size) {
        ("huggingface", _) => exact(Interpolation::Bilinear),
        (_, 384) => exact(Interpolation::Bicubic),
        _ => Preprocess::timm(size, 0.9, Interpolation::Bicubic, HALF, HALF),
    }
}

/// A model being served.
pub struct LoadedModel {
    pub name: String,
    pub family: String,
    pub variant: String,
    pub layout: String,
    pub task: Task,
    pub device: String,
    pub dtype: &'static str,
    pub num_classes: usize,
    pub pipeline: InputPipeline,
    /// How a detector's raw output becomes detections.
    pub decoder: Option<Decoder>,
    pub labels: Arc<Vec<String>>,
    pub source: String,
    /// Values of one image's raw output at the nominal input size (from
    /// the warm-up pass: YOLO's anchor count follows from it).
    pub raw_output_len: usize,
    pub batcher: Batcher<ModelInput, Vec<f32>>,
}

impl LoadedModel {
    pub fn settings(&self) -> &BatchSettings {
        self.batcher.settings()
    }
}

/// Why [`Registry::for_task`] found no model.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    NotFound(String),
    WrongTask {
        model: String,
        its_task: Task,
        task: Task,
        serving: Vec<String>,
    },
    NoneForTask(Task),
}

impl std::fmt::Display for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::NotFound(name) => write!(f, "model {name:?} is not loaded"),
            Lookup::WrongTask {
                model,
                its_task,
                task,
                serving,
            } => {
                write!(
                    f,
                    "model {model:?} does {}, not {}; ",
                    its_task.as_str(),
                    task.as_str()
                )?;
                if serving.is_empty() {
                    write!(f, "no loaded model does {}", task.as_str())
                } else {
                    write!(f, "{} is served by: {}", task.as_str(), serving.join(", "))
                }
            }
            Lookup::NoneForTask(task) => write!(f, "no loaded model does {}", task.as_str()),
        }
    }
}

/// All models being served, in configuration order.
pub struct Registry {
    models: Vec<Arc<LoadedModel>>,
}

impl Registry {
    pub fn new(models: Vec<Arc<LoadedModel>>) -> Self {
        Registry { models }
    }

    /// The model named, or the first one when no name is given.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<LoadedModel>> {
        match name {
            Some(name) => self.models.iter().find(|m| m.name == name),
            None => self.models.first(),
        }
    }

    /// The model named for a task, or the task's first model.
    pub fn for_task(&self, name: Option<&str>, task: Task) -> Result<&Arc<LoadedModel>, Lookup> {
        let serving = || -> Vec<String> {
            self.models
                .iter()
                .filter(|m| m.task == task)
                .map(|m| m.name.clone())
                .collect()
        };
        match name {
            Some(name) => {
                let model = self
                    .models
                    .iter()
                    .find(|m| m.name == name)
                    .ok_or_else(|| Lookup::NotFound(name.to_string()))?;
                if model.task != task {
                    return Err(Lookup::WrongTask {
                        model: name.to_string(),
                        its_task: model.task,
                        task,
                        serving: serving(),
                    });
                }
                Ok(model)
            }
            None => self
                .models
                .iter()
                .find(|m| m.task == task)
                .ok_or(Lookup::NoneForTask(task)),
        }
    }

    pub fn all(&self) -> &[Arc<LoadedModel>] {
        &self.models
    }

    /// Let every batcher finish its queue.
    pub fn shutdown(&self) {
        for m in &self.models {
            m.batcher.shutdown();
        }
    }
}

/// Load, warm up and start batching one configured model.
pub fn load_model(
    config: &crate::config::ModelConfig,
    store: &Store,
    pull: bool,
    device: &Device,
    dtype: DType,
    metrics: &Metrics,
) -> anyhow::Result<LoadedModel> {
    let start = Instant::now();
    let resolved = resolve_spec(&config.spec, store, pull, &|_| {})
        .with_context(|| format!("model {:?}", config.name))?;
    let overrides = LoadOverrides {
        preprocess: config.preprocess.clone(),
        input_size: config.input_size,
        max_input_size: config.max_input_size,
    };
    let loaded = load_network(&resolved, device, dtype, &overrides)
        .with_context(|| format!("model {:?}", config.name))?;
    let network = loaded.network.clone();
    let (h, w) = loaded.pipeline.nominal_input_size();
    let runner = loaded.runner();
    // Warm-up: the first forward pass allocates and initialises; do it
    // before the model is reported ready. On an accelerator it runs the
    // largest batch the batcher forms, so a batch that cannot fit in the
    // device's memory stops the start rather than failing requests later.
    let warm_batch = if device.is_cpu() {
        1
    } else {
        config.batching.max_batch_size
    };
    let inputs = vec![ModelInput::zeros(h as usize, w as usize); warm_batch];
    let warm_up = runner.forward(&inputs).map_err(|e| {
        let message = format!("{e:#}");
        let hint = match JobError::from_failure(message.clone()) {
            JobError::OutOfMemory(_) => {
                " (the device's memory does not hold this batch: lower max_batch_size)"
            }
            _ => "",
        };
        anyhow!(
            "model {:?}: warm-up with {warm_batch} image(s) of {h}x{w} on {} failed{hint}: {message}",
            config.name,
            device_label(device)
        )
    })?;
    let raw_output_len = warm_up.first().map_or(0, Vec::len);

    let name = config.name.as_str();
    let batch_metrics = BatchMetrics {
        queue_duration: metrics.queue_duration.with_label_values(&[name]),
        inference_duration: metrics.inference_duration.with_label_values(&[name]),
        batch_size: metrics.batch_size.with_label_values(&[name]),
        queue_depth: metrics.queue_depth.with_label_values(&[name]),
        images: metrics.images_total.with_label_values(&[name]),
        out_of_memory: metrics
            .batch_failures
            .with_label_values(&[name, "out_of_memory"]),
        errors: metrics.batch_failures.with_label_values(&[name, "error"]),
    };
    metrics.watch_device(device);
    let batcher = Batcher::spawn(name, config.batching.clone(), runner, batch_metrics);
    let device_name = device_label(device);
    metrics
        .model_info
        .with_label_values(&[
            name,
            network.family(),
            &network.variant(),
            &device_name,
            dtype_label(dtype),
        ])
        .set(1.0);
    // Touch the per-model series so they are exported from the start.
    metrics.images_total.with_label_values(&[name]);
    metrics.queue_depth.with_label_values(&[name]).set(0);
    metrics
        .model_load_duration
        .with_label_values(&[name])
        .observe(start.elapsed().as_secs_f64());
    tracing::info!(
        model = name,
        task = network.task().as_str(),
        family = network.family(),
        variant = %network.variant(),
        layout = network.layout(),
        classes = network.num_classes(),
        device = %device_name,
        dtype = dtype_label(dtype),
        load_s = start.elapsed().as_secs_f64(),
        "model ready"
    );
    Ok(LoadedModel {
        name: name.to_string(),
        family: network.family().to_string(),
        variant: network.variant(),
        layout: network.layout().to_string(),
        task: network.task(),
        device: device_name,
        dtype: dtype_label(dtype),
        num_classes: network.num_classes(),
        pipeline: loaded.pipeline,
        decoder: network.decoder(),
        labels: loaded.labels,
        source: config.spec.clone(),
        raw_output_len,
        batcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_prefixes() {
        use crate::config::strip_arch;
        assert_eq!(
            strip_arch("resnet50:/a/b.safetensors"),
            (Some("resnet50"), "/a/b.safetensors")
        );
        assert_eq!(
            strip_arch("efficientnet-lite0"),
            (None, "efficientnet-lite0")
        );
        assert_eq!(strip_arch("C:\\w.safetensors").0, None);
        assert_eq!(strip_arch("./a:b").0, None);
    }

    #[test]
    fn default_preprocessing_follows_the_architecture() {
        let info =
            |family: &'static str, variant: &str, layout: &'static str, size| ClassifierInfo {
                family,
                variant: variant.into(),
                layout,
                num_classes: 1000,
                default_input_size: size,
                device: Device::Cpu,
                dtype: DType::F32,
            };
        let resnet = default_preprocess(&info("resnet", "resnet50", "torchvision/timm", 224));
        assert_eq!(resnet, Preprocess::torchvision_imagenet());
        let lite = default_preprocess(&info(
            "efficientnet",
            "tf_efficientnet_lite0",
            "lukemelas",
            224,
        ));
        assert_eq!(lite, Preprocess::efficientnet_lite(224));
        let b3 = default_preprocess(&info("efficientnet", "efficientnet_b3", "timm", 300));
        assert_eq!(b3.input_size(), (300, 300));
        let lite4 = default_preprocess(&info("efficientnet", "tf_efficientnet_lite4", "timm", 300));
        assert_eq!(lite4.mean, [0.5; 3]);
        // ViT: per layout.
        use fovea_model_core::preprocess::{Interpolation, Resize};
        let hf = default_preprocess(&info("vit", "vit_base_patch16_224", "huggingface", 224));
        assert_eq!(
            (hf.resize, hf.interpolation, hf.crop),
            (
                Resize::Exact {
                    width: 224,
                    height: 224
                },
                Interpolation::Bilinear,
                None
            )
        );
        assert_eq!(
            (hf.mean, hf.std, hf.scale),
            ([0.5; 3], [0.5; 3], 1.0 / 255.0)
        );
        let timm = default_preprocess(&info("vit", "vit_base_patch16_224", "timm", 224));
        assert_eq!(
            timm,
            Preprocess::timm(224, 0.9, Interpolation::Bicubic, [0.5; 3], [0.5; 3])
        );
        assert_eq!(timm.resize, Resize::ShorterSide(248));
        let timm384 = default_preprocess(&info("vit", "vit_base_patch16_384", "timm", 384));
        assert_eq!(timm384.input_size(), (384, 384));
        assert_eq!(timm384.crop, None);
    }

    #[test]
    fn devices_and_dtypes() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert!(parse_device("tpu:0").is_err());
        assert!(parse_device("cuda:x").is_err());
        // The default build has no CUDA: asking for it is a clear error.
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        #[cfg(not(feature = "metal"))]
        assert!(parse_device("metal:0").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("int8").is_err());
    }

    #[test]
    fn unknown_specs_are_explained() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let err = resolve_spec("no-such-model", &store, false, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("neither a file"), "{err}");
        let err = resolve_spec("efficientnet-lite0", &store, false, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("fovea pull"), "{err}");
    }
}
