//! The `fovea` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The default classifier (`fovea classify`, and served by default).
pub const DEFAULT_MODEL: &str = "efficientnet-lite0";
/// The default detector (`fovea detect`, and served by default).
pub const DEFAULT_DETECTION_MODEL: &str = "yolov5s";

#[derive(Debug, Parser)]
#[command(
    name = "fovea",
    version,
    about = "Fovea: an inference server for vision models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over HTTP.
    Serve(ServeArgs),
    /// Classify images with a model, without a server.
    Classify(ClassifyArgs),
    /// Detect objects in images with a model, without a server.
    Detect(DetectArgs),
    /// Feed preprocessed tensors to a model and write its raw outputs.
    Run(RunArgs),
    /// Convert a PyTorch checkpoint (.pt/.pth) to safetensors, executing nothing.
    Import(ImportArgs),
    /// Fetch a model into the model store: a catalog name, hf:ORG/NAME[@REVISION] or a URL.
    Pull(PullArgs),
    /// List the model store and the catalog.
    Models(ModelsArgs),
    /// Measure forward-pass and end-to-end HTTP throughput.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "FOVEA_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "FOVEA_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// gRPC listen address [default: 0.0.0.0:8081].
    #[arg(long, env = "FOVEA_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// A model to serve, NAME=SPEC (repeatable; the environment takes a comma-separated list).
    /// SPEC is a catalog or store name, a .safetensors file or model directory, optionally
    /// prefixed by the architecture (resnet50:path). [default: efficientnet-lite0 and yolov5s]
    #[arg(long = "model", env = "FOVEA_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// cpu, cuda:N or metal:N [default: cpu].
    #[arg(long, env = "FOVEA_DEVICE")]
    pub device: Option<String>,
    /// f32, f16 or bf16 [default: f32].
    #[arg(long, env = "FOVEA_DTYPE")]
    pub dtype: Option<String>,
    /// Model store directory [default: $FOVEA_HOME or the user cache dir].
    #[arg(long, env = "FOVEA_HOME")]
    pub home: Option<PathBuf>,
    /// Do not pull catalog models that are missing from the store.
    #[arg(long, env = "FOVEA_NO_PULL")]
    pub no_pull: bool,
    /// Images per forward pass, at most [default: 8].
    #[arg(long, env = "FOVEA_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// How long the first image of a batch waits for others, in ms (0: take what is waiting)
    /// [default: 5].
    #[arg(long, env = "FOVEA_MAX_QUEUE_DELAY_MS")]
    pub max_queue_delay_ms: Option<u64>,
    /// Images admitted per model and not yet computed; beyond it requests get 429
    /// [default: 256].
    #[arg(long, env = "FOVEA_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Deadline of a request that sets none (`timeout_ms`), in ms [default: 30000].
    #[arg(long, env = "FOVEA_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Largest request body in bytes [default: 33554432].
    #[arg(long, env = "FOVEA_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest gRPC message in bytes, received or sent [default: the largest request body].
    #[arg(long, env = "FOVEA_GRPC_MAX_MESSAGE_BYTES")]
    pub grpc_max_message_bytes: Option<usize>,
    /// Largest image in pixels (width x height), checked before decoding [default: 40000000].
    #[arg(long, env = "FOVEA_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// Most images in one request [default: 64].
    #[arg(long, env = "FOVEA_MAX_IMAGES_PER_REQUEST")]
    pub max_images_per_request: Option<usize>,
    /// Longest wait for in-flight work at shutdown, in seconds [default: 30].
    #[arg(long, env = "FOVEA_SHUTDOWN_TIMEOUT_S")]
    pub shutdown_timeout_s: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "FOVEA_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model SPEC: catalog or store name, .safetensors file or model directory,
    /// optionally prefixed by the architecture (resnet50:path)
    /// [default: efficientnet-lite0 to classify, yolov5s to detect].
    #[arg(long, env = "FOVEA_MODEL")]
    pub model: Option<String>,
    /// cpu, cuda:N or metal:N.
    #[arg(long, env = "FOVEA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, env = "FOVEA_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Model store directory.
    #[arg(long, env = "FOVEA_HOME")]
    pub home: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Predictions per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print JSON (as the HTTP API answers) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Images to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Lowest score kept [default: 0.25 for YOLO, 0.5 for DETR].
    #[arg(long)]
    pub confidence: Option<f32>,
    /// IoU above which the lower-scored of two boxes of a class is dropped
    /// (YOLO; DETR has no NMS).
    #[arg(long, default_value_t = 0.45)]
    pub iou: f32,
    /// Most detections per image.
    #[arg(long, default_value_t = 300)]
    pub max_detections: usize,
    /// Keep only these classes (names or ids, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Suppress overlapping boxes across classes too.
    #[arg(long)]
    pub agnostic: bool,
    /// YOLO: letterbox side (a multiple of 32) [default: the model's, 640].
    /// DETR: the shorter side [default: 800].
    #[arg(long)]
    pub size: Option<u32>,
    /// DETR: the longest the longer side may be [default: 1333].
    #[arg(long)]
    pub max_size: Option<u32>,
    /// Print JSON (as the HTTP API answers) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the image with the boxes drawn (JPEG); with several images,
    /// OUT-1.jpg, OUT-2.jpg, ...
    #[arg(long, value_name = "OUT.jpg")]
    pub save: Option<PathBuf>,
    /// Images to look at.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// safetensors file with the inputs (`pixel_values`).
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file for the raw outputs (`logits`; YOLO: `output`).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// PyTorch checkpoint (.pt/.pth, zip or legacy format).
    pub input: PathBuf,
    /// safetensors file to write.
    pub output: PathBuf,
}

#[derive(Debug, Args)]
#[command(after_long_help = PULL_HELP)]
pub struct PullArgs {
    /// What to pull: a catalog name (see `fovea models`), hf:ORG/NAME[@REVISION] (a Hugging
    /// Face hub model) or an https:// URL of a checkpoint (with --sha256, or URL#sha256=HEX).
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Store the model under this name [default: the catalog name, the hub repository's name
    /// (timm/resnet50.a1_in1k -> resnet50.a1_in1k) or the URL's file name without extension].
    #[arg(long = "name", value_name = "NAME")]
    pub store_as: Option<String>,
    /// URL pulls: the sha256 the downloaded file must have.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// URL pulls: the architecture (resnet50, efficientnet_b0, vit_base_patch16_224, yolo, ...)
    /// [default: recognised from the weights].
    #[arg(long)]
    pub arch: Option<String>,
    /// Model store directory.
    #[arg(long, env = "FOVEA_HOME")]
    pub home: Option<PathBuf>,
}

const PULL_HELP: &str = "\
Examples:
  fovea pull efficientnet-lite0
  fovea pull hf:timm/resnet50.a1_in1k
  fovea pull hf:google/vit-base-patch16-224@main --name vit-b16
  fovea pull hf:facebook/detr-resnet-50
  fovea pull https://example.org/weights/resnet50.pth --sha256 <64 hex digits>

Hugging Face hub (hf:ORG/NAME[@REVISION], REVISION a branch, tag or commit, default main):
  fetches config.json, model.safetensors (else pytorch_model.bin, imported without running
  any pickled code) and preprocessor_config.json; the manifest records the labels (timm
  label_names or id2label), the preprocessing when it maps exactly onto Fovea's transform
  (timm pretrained_cfg, ViT-style image processors; else the server's default applies and
  the pull says so), hf:ORG/NAME@COMMIT, the license and the sha256. Large files are
  checked against the sha256 the hub announces and resumed where a download stopped.
  HF_ENDPOINT       the hub [default: https://huggingface.co]
  HF_TOKEN          bearer token for private or gated models (else the file HF_TOKEN_PATH
                    or $HF_HOME/token); sent to the hub only, never to its storage hosts
  HF_HUB_CACHE      the file cache, shared with Python's huggingface_hub
                    [default: $HF_HOME/hub, else ~/.cache/huggingface/hub]
  HF_HUB_OFFLINE=1  use the cache only

URLs (https://, or http://): the download is resumed from $FOVEA_HOME/downloads when cut
short, checked against --sha256 (or URL#sha256=HEX) before anything is imported, then
stored (safetensors as is, PyTorch checkpoints imported).";

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Model store directory.
    #[arg(long, env = "FOVEA_HOME")]
    pub home: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Forward pass: the model SPEC to time.
    #[arg(long)]
    pub model: Option<String>,
    /// Forward pass: batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Forward pass: input size (default: the model's).
    #[arg(long)]
    pub size: Option<usize>,
    /// End to end: the URL to POST images to (e.g. http://127.0.0.1:8080/v1/classify).
    #[arg(long)]
    pub http: Option<String>,
    /// End to end: the image to send (its Content-Type is taken from the extension).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// End to end: concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds of measurement per configuration (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, env = "FOVEA_HOME")]
    pub home: Option<PathBuf>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Forward pass: after timing, run it 3 more times per batch size with
    /// the per-layer profile on and print where the time went.
    #[arg(long)]
    pub profile: bool,
}
