//! `fovea pull https://.../FILE --sha256 HEX` (or `URL#sha256=HEX`): a
//! checkpoint from a plain URL, pinned by its sha256.
//!
//! The download goes to `$FOVEA_HOME/downloads/<sha256>.incomplete` and is
//! continued from there (HTTP `Range`) when a try or an earlier pull was
//! cut short; the whole file's sha256 must match before anything is
//! imported. A verified download stays as `downloads/<sha256>` until it is
//! stored (so a pull that failed on a wrong `--arch` does not download again). A safetensors file is stored as is, a PyTorch checkpoint
//! (`.pt/.pth/.bin`) is imported with Fovea's own unpickler. Classifiers
//! are loaded once to check them (the architecture from `--arch` or the
//! weights), YOLO checkpoints are recognised by their module names.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device};
use fovea_model_core::classifier::Classifier;
use reqwest::Url;

use crate::http::Http;
use crate::pull::{detector_facts, Header, PullError, PullStep};
use crate::store::{is_valid_name, sha256_file, Labels, Manifest, Source, Store, StoredModel};

/// Input size of a YOLO checkpoint pulled from a URL (Ultralytics' default).
pub const DEFAULT_DETECTION_SIZE: u32 = 640;

/// The URL and the sha256 its content must have, from `URL#sha256=HEX`
/// and/or `--sha256 HEX`.
pub fn parse_url_spec(spec: &str, sha256: Option<&str>) -> Result<(Url, String), PullError> {
    let (base, in_url) = match spec.split_once("#sha256=") {
        Some((base, hex)) => (base, Some(hex.to_ascii_lowercase())),
        None => (spec, None),
    };
    let given = sha256.map(|s| s.trim().to_ascii_lowercase());
    let sha = match (in_url, given) {
        (Some(a), Some(b)) if a != b => {
            return Err(PullError::Other(format!(
                "the URL's #sha256={a} and --sha256 {b} differ"
            )))
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(PullError::Other(
                "a URL pull needs the file's sha256: --sha256 HEX or URL#sha256=HEX".into(),
            ))
        }
    };
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PullError::Other(format!(
            "{sha:?} is not a sha256 (64 hex digits)"
        )));
    }
    let url = Url::parse(base).map_err(|e| PullError::Other(format!("{base:?}: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(PullError::Other(format!(
            "{url}: only https:// and http:// URLs"
        )));
    }
    Ok((url, sha))
}

/// The store name a URL pull gets unless told: the file name without its
/// extension (`.../resnet50-0676ba61.pth` -> `resnet50-0676ba61`).
pub fn default_name(url: &Url) -> Option<String> {
    let file = url.path_segments()?.next_back()?;
    let stem = file.split('.').next()?;
    is_valid_name(stem).then(|| stem.to_string())
}

/// Download, verify, import and store.
pub fn pull_url(
    store: &Store,
    url: &Url,
    sha256: &str,
    name: Option<&str>,
    arch: Option<&str>,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    pull_url_with(
        store,
        url,
        sha256,
        name,
        arch,
        &Http::new(None, None)?,
        progress,
    )
}

pub fn pull_url_with(
    store: &Store,
    url: &Url,
    sha256: &str,
    name: Option<&str>,
    arch: Option<&str>,
    http: &Http,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    let name = match name {
        Some(n) => n.to_string(),
        None => default_name(url)
            .ok_or_else(|| PullError::Other(format!("{url}: no usable file name; pass --name")))?,
    };
    if !is_valid_name(&name) {
        return Err(PullError::Other(format!(
            "{name:?} cannot name a stored model (letters, digits, '-', '_', '.')"
        )));
    }
    let downloads = store
        .root()
        .parent()
        .unwrap_or(store.root())
        .join("downloads");
    fs::create_dir_all(&downloads)
        .map_err(|e| PullError::Other(format!("{}: {e}", downloads.display())))?;
    let partial = downloads.join(format!("{sha256}.incomplete"));
    // A verified download whose import failed (say, a wrong --arch) is kept
    // for the next try.
    let complete = downloads.join(sha256);
    if !(complete.is_file() && sha256_file(&complete)? == sha256) {
        progress(PullStep::Downloading {
            what: url
                .path_segments()
                .and_then(|mut s| s.next_back())
                .unwrap_or(url.as_str()),
        });
        http.download(url, &partial, None, progress)?;
        progress(PullStep::Verifying);
        let actual = sha256_file(&partial)?;
        if actual != sha256 {
            let _ = fs::remove_file(&partial);
            return Err(PullError::Checksum {
                what: url.to_string(),
                expected: sha256.to_string(),
                actual,
            });
        }
        fs::rename(&partial, &complete)
            .map_err(|e| PullError::Other(format!("{}: {e}", complete.display())))?;
    } else {
        progress(PullStep::Cached { what: url.as_str() });
    }
    let partial = complete;
    let work = tempfile::tempdir().map_err(|e| PullError::Other(e.to_string()))?;
    let safetensors = if Header::read(&partial).is_ok() {
        partial.clone()
    } else {
        progress(PullStep::Importing);
        let out = work.path().join("model.safetensors");
        crate::pth::import_pth(&partial, &out)
            .map_err(|e| PullError::Other(format!("importing {url}: {e}")))?;
        out
    };
    let mut recorded = url.clone();
    recorded.set_query(None);
    recorded.set_fragment(None);
    let source = Source {
        kind: "url".into(),
        location: recorded.to_string(),
        file: None,
        sha256: Some(sha256.to_string()),
    };
    let manifest = describe_weights(&name, &safetensors, arch, source)?;
    progress(PullStep::Storing);
    let stored = store.put(&safetensors, manifest)?;
    let _ = fs::remove_file(&partial);
    Ok(stored)
}

/// A manifest from the weights alone: a YOLO detector (module names, class
/// names and strides from the checkpoint) or a classifier the loader runs.
fn describe_weights(
    name: &str,
    safetensors: &Path,
    arch: Option<&str>,
    source: Source,
) -> Result<Manifest, PullError> {
    let header = Header::read(safetensors)?;
    let yolo = arch.is_some_and(|a| a.starts_with("yolo"))
        || (arch.is_none() && header.shapes.contains_key("model.0.conv.weight"));
    let (family, arch, task, num_classes, labels, input_size, stride) = if yolo {
        let (n, labels, stride) = detector_facts(&header)?;
        (
            "yolo".to_string(),
            arch.unwrap_or("yolo").to_string(),
            "detection",
            n,
            labels,
            Some(DEFAULT_DETECTION_SIZE),
            stride,
        )
    } else {
        let tensors: HashMap<_, _> =
            crate::safetensors_io::load_safetensors(safetensors, DType::F32, &Device::Cpu)
                .map_err(|e| PullError::Other(e.to_string()))?
                .into_iter()
                .collect();
        let model = Classifier::load(tensors, arch, &Device::Cpu, DType::F32)
            .map_err(|e| PullError::Other(format!("Fovea cannot run these weights: {e}")))?;
        let info = model.info();
        let arch = match arch {
            Some(a) => a.to_string(),
            None if info.variant.contains("custom") => {
                return Err(PullError::Other(format!(
                    "the weights are a non-standard {} ({}): pass --arch",
                    info.family, info.variant
                )))
            }
            None => info.variant.clone(),
        };
        let labels = if info.num_classes == 1000 {
            Labels::Builtin("imagenet-1k".into())
        } else {
            Labels::Builtin("none".into())
        };
        (
            info.family.to_string(),
            arch,
            "classification",
            info.num_classes,
            labels,
            None,
            Vec::new(),
        )
    };
    Ok(Manifest {
        name: name.to_string(),
        family,
        arch,
        task: task.into(),
        num_classes,
        labels,
        preprocess: None,
        input_size,
        stride,
        source,
        sha256: String::new(),
        license: None,
    })
}
