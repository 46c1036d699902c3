//! Server settings. Precedence: command-line flags > `FOVEA_*` environment
//! variables (both through clap) > the TOML file > built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use fovea_model_core::preprocess::Preprocess;
use serde::Deserialize;

use crate::batcher::BatchSettings;
use crate::cli::ServeArgs;

pub use crate::cli::{DEFAULT_DETECTION_MODEL, DEFAULT_MODEL};

/// What `fovea serve` serves when no model is configured: one model per task.
pub const DEFAULT_MODELS: [&str; 2] = [DEFAULT_MODEL, DEFAULT_DETECTION_MODEL];

/// The TOML file, every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub grpc_max_message_bytes: Option<usize>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub home: Option<PathBuf>,
    pub pull: Option<bool>,
    pub shutdown_timeout_s: Option<u64>,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub batching: FileBatching,
    #[serde(default)]
    pub models: Vec<FileModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_body_bytes: Option<usize>,
    pub max_image_pixels: Option<u64>,
    pub max_images_per_request: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBatching {
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_ms: Option<u64>,
    pub queue_capacity: Option<usize>,
    pub request_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModel {
    pub name: String,
    pub spec: String,
    #[serde(flatten)]
    pub batching: FileBatching,
    /// Replaces a classifier's preprocessing.
    pub preprocess: Option<Preprocess>,
    /// A YOLO detector's letterbox side (a multiple of 32); DETR's
    /// shorter side.
    pub input_size: Option<u32>,
    /// DETR's cap on the longer side.
    pub max_input_size: Option<u32>,
}

/// Request limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_images_per_request: usize,
}

/// One model to serve.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub spec: String,
    pub batching: BatchSettings,
    pub preprocess: Option<Preprocess>,
    pub input_size: Option<u32>,
    pub max_input_size: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Largest gRPC message, decoded or encoded.
    pub grpc_max_message_bytes: usize,
    pub device: String,
    pub dtype: String,
    pub home: PathBuf,
    /// Pull catalog models missing from the store.
    pub pull: bool,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
    pub models: Vec<ModelConfig>,
}

const DEFAULT_BATCHING: BatchingDefaults = BatchingDefaults {
    max_batch_size: 8,
    max_queue_delay_ms: 5,
    queue_capacity: 256,
    request_timeout_ms: 30_000,
};

struct BatchingDefaults {
    max_batch_size: usize,
    max_queue_delay_ms: u64,
    queue_capacity: usize,
    request_timeout_ms: u64,
}

pub fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl ServeConfig {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: &ServeArgs, file: FileConfig) -> anyhow::Result<ServeConfig> {
        let cli_batching = FileBatching {
            max_batch_size: args.max_batch_size,
            max_queue_delay_ms: args.max_queue_delay_ms,
            queue_capacity: args.queue_capacity,
            request_timeout_ms: args.request_timeout_ms,
        };
        let batching_for = |model: &FileBatching| -> anyhow::Result<BatchSettings> {
            let pick = |f: fn(&FileBatching) -> Option<u64>, default: u64| {
                f(&cli_batching)
                    .or(f(model))
                    .or(f(&file.batching))
                    .unwrap_or(default)
            };
            let settings = BatchSettings {
                max_batch_size: pick(
                    |b| b.max_batch_size.map(|v| v as u64),
                    DEFAULT_BATCHING.max_batch_size as u64,
                ) as usize,
                max_queue_delay: Duration::from_millis(pick(
                    |b| b.max_queue_delay_ms,
                    DEFAULT_BATCHING.max_queue_delay_ms,
                )),
                queue_capacity: pick(
                    |b| b.queue_capacity.map(|v| v as u64),
                    DEFAULT_BATCHING.queue_capacity as u64,
                ) as usize,
                request_timeout: Duration::from_millis(pick(
                    |b| b.request_timeout_ms,
                    DEFAULT_BATCHING.request_timeout_ms,
                )),
            };
            if settings.max_batch_size == 0 {
                bail!("max_batch_size must be at least 1");
            }
            if settings.queue_capacity < settings.max_batch_size {
                bail!(
                    "queue_capacity ({}) must be at least max_batch_size ({})",
                    settings.queue_capacity,
                    settings.max_batch_size
                );
            }
            if settings.request_timeout.is_zero() {
                bail!("request_timeout_ms must be positive");
            }
            Ok(settings)
        };

        let mut models = Vec::new();
        if !args.models.is_empty() {
            for entry in &args.models {
                let (name, spec) = parse_model_arg(entry)?;
                // A file entry of the same name still lends its settings.
                let from_file = file.models.iter().find(|m| m.name == name);
                let batching = from_file.map(|m| m.batching.clone()).unwrap_or_default();
                models.push(ModelConfig {
                    name,
                    spec,
                    batching: batching_for(&batching)?,
                    preprocess: from_file.and_then(|m| m.preprocess.clone()),
                    input_size: from_file.and_then(|m| m.input_size),
                    max_input_size: from_file.and_then(|m| m.max_input_size),
                });
            }
        } else if !file.models.is_empty() {
            for m in &file.models {
                models.push(ModelConfig {
                    name: m.name.clone(),
                    spec: m.spec.clone(),
                    batching: batching_for(&m.batching)?,
                    preprocess: m.preprocess.clone(),
                    input_size: m.input_size,
                    max_input_size: m.max_input_size,
                });
            }
        } else {
            for default in DEFAULT_MODELS {
                models.push(ModelConfig {
                    name: default.into(),
                    spec: default.into(),
                    batching: batching_for(&FileBatching::default())?,
                    preprocess: None,
                    input_size: None,
                    max_input_size: None,
                });
            }
        }
        for (i, m) in models.iter().enumerate() {
            if !fovea_weights::store::is_valid_name(&m.name) {
                bail!(
                    "invalid model name {:?} (letters, digits, '-', '_', '.')",
                    m.name
                );
            }
            if models[..i].iter().any(|other| other.name == m.name) {
                bail!("model {:?} is configured twice", m.name);
            }
        }

        let limits = Limits {
            max_body_bytes: args
                .max_body_bytes
                .or(file.limits.max_body_bytes)
                .unwrap_or(32 << 20),
            max_image_pixels: args
                .max_image_pixels
                .or(file.limits.max_image_pixels)
                .unwrap_or(40_000_000),
            max_images_per_request: args
                .max_images_per_request
                .or(file.limits.max_images_per_request)
                .unwrap_or(64),
        };
        Ok(ServeConfig {
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| "0.0.0.0:8080".parse().expect("valid address")),
            grpc_addr: args
                .grpc_addr
                .or(file.grpc_addr)
                .unwrap_or_else(|| "0.0.0.0:8081".parse().expect("valid address")),
            grpc_max_message_bytes: args
                .grpc_max_message_bytes
                .or(file.grpc_max_message_bytes)
                .unwrap_or(limits.max_body_bytes),
            device: args
                .device
                .clone()
                .or(file.device)
                .unwrap_or_else(|| "cpu".into()),
            dtype: args
                .dtype
                .clone()
                .or(file.dtype)
                .unwrap_or_else(|| "f32".into()),
            home: args
                .home
                .clone()
                .or(file.home)
                .unwrap_or_else(fovea_weights::store::default_home),
            pull: !args.no_pull && file.pull.unwrap_or(true),
            shutdown_timeout: Duration::from_secs(
                args.shutdown_timeout_s
                    .or(file.shutdown_timeout_s)
                    .unwrap_or(30),
            ),
            limits,
            models,
        })
    }
}

/// Split `arch:path` into its parts; the arch is only taken when it looks
/// like an architecture name (so `C:\...` or `./a:b` stay paths).
pub fn strip_arch(spec: &str) -> (Option<&str>, &str) {
    if let Some((arch, rest)) = spec.split_once(':') {
        let looks_like_arch = arch.len() > 1
            && arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && arch.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if looks_like_arch && !rest.is_empty() {
            return (Some(arch), rest);
        }
    }
    (None, spec)
}

/// `NAME=SPEC`, or a bare `SPEC` named after its file or catalog name.
pub fn parse_model_arg(arg: &str) -> anyhow::Result<(String, String)> {
    if let Some((name, spec)) = arg.split_once('=') {
        if name.is_empty() || spec.is_empty() {
            bail!("--model expects NAME=SPEC, got {arg:?}");
        }
        return Ok((name.to_string(), spec.to_string()));
    }
    Ok((default_name(arg), arg.to_string()))
}

/// A name for a model given only by its spec: the catalog name, or the
/// file (or directory) name without its extension.
pub fn default_name(spec: &str) -> String {
    let path = strip_arch(spec).1;
    let p = Path::new(path);
    let stem = if p.file_name().is_some_and(|f| f == "model.safetensors") {
        p.parent().and_then(|d| d.file_name())
    } else {
        p.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .filter(|s| fovea_weights::store::is_valid_name(s))
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(line: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(line);
        Wrapper::parse_from(argv).serve
    }

    #[test]
    fn defaults_serve_a_classifier_and_a_detector() {
        let c = ServeConfig::merge(&args(&[]), FileConfig::default()).unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].name, DEFAULT_MODEL);
        assert_eq!(c.models[1].name, DEFAULT_DETECTION_MODEL);
        assert_eq!(c.http_addr.port(), 8080);
        assert_eq!(c.grpc_addr.port(), 8081);
        assert_eq!(c.grpc_max_message_bytes, c.limits.max_body_bytes);
        assert_eq!(c.models[0].batching.max_batch_size, 8);
    }

    #[test]
    fn grpc_settings_from_the_file_and_flags() {
        let file = || -> FileConfig {
            toml::from_str(
                r#"
                grpc_addr = "127.0.0.1:9001"
                grpc_max_message_bytes = 1000
                [limits]
                max_body_bytes = 5000
                "#,
            )
            .unwrap()
        };
        let c = ServeConfig::merge(&args(&[]), file()).unwrap();
        assert_eq!(c.grpc_addr.port(), 9001);
        assert_eq!(c.grpc_max_message_bytes, 1000);
        let c = ServeConfig::merge(
            &args(&[
                "--grpc-addr",
                "127.0.0.1:0",
                "--grpc-max-message-bytes",
                "77",
            ]),
            file(),
        )
        .unwrap();
        assert_eq!(c.grpc_addr.port(), 0);
        assert_eq!(c.grpc_max_message_bytes, 77);
        // Unset, the message limit follows the body limit.
        let c =
            ServeConfig::merge(&args(&["--max-body-bytes", "123"]), FileConfig::default()).unwrap();
        assert_eq!(c.grpc_max_message_bytes, 123);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            http_addr = "127.0.0.1:9000"
            dtype = "f16"
            [batching]
            max_batch_size = 4
            queue_capacity = 100
            [[models]]
            name = "a"
            spec = "efficientnet-lite0"
            max_queue_delay_ms = 20
            [[models]]
            name = "b"
            spec = "resnet50:/m/r.safetensors"
            [[models]]
            name = "yolo"
            spec = "yolov5s"
            input_size = 320
            "#,
        )
        .unwrap();
        let c = ServeConfig::merge(
            &args(&["--max-batch-size", "16", "--http-addr", "127.0.0.1:7000"]),
            file,
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 7000);
        assert_eq!(c.dtype, "f16");
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[2].input_size, Some(320));
        assert_eq!(c.models[0].input_size, None);
        let a = &c.models[0].batching;
        assert_eq!(a.max_batch_size, 16, "flag over file");
        assert_eq!(a.queue_capacity, 100, "file over default");
        assert_eq!(
            a.max_queue_delay,
            Duration::from_millis(20),
            "per-model file setting"
        );
        assert_eq!(
            c.models[1].batching.max_queue_delay,
            Duration::from_millis(5)
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let err = ServeConfig::merge(&args(&["--max-batch-size", "0"]), FileConfig::default());
        assert!(err.is_err());
        let err = ServeConfig::merge(
            &args(&["--model", "a=x", "--model", "a=y"]),
            FileConfig::default(),
        );
        assert!(err.unwrap_err().to_string().contains("twice"));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }

    #[test]
    fn model_arguments() {
        assert_eq!(
            parse_model_arg("lite=efficientnet-lite0").unwrap(),
            ("lite".into(), "efficientnet-lite0".into())
        );
        assert_eq!(
            parse_model_arg("resnet50:/w/my-net.safetensors").unwrap().0,
            "my-net"
        );
        assert_eq!(
            parse_model_arg("/store/m1/model.safetensors").unwrap().0,
            "m1"
        );
        assert!(parse_model_arg("=x").is_err());
    }
}
