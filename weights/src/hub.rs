//! `fovea pull hf:ORG/NAME[@REVISION]`: a model from the Hugging Face hub.
//!
//! Files are resolved as the hub's own client does it, through
//! `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`: the answer (or, for a
//! large file, the redirect to the storage host) names the commit
//! (`X-Repo-Commit`), the content's etag (`X-Linked-Etag`, the sha256 of an
//! LFS file, else `ETag`) and its size (`X-Linked-Size`). Files land in the
//! hub's standard cache, in the layout Python's `huggingface_hub` uses, so
//! each reuses what the other downloaded:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//!   models--ORG--NAME/
//!     blobs/<etag>                       the content (<etag>.incomplete while downloading)
//!     snapshots/<commit>/<file>          a relative symlink to the blob (a copy where links fail)
//!     refs/<revision>                    the commit the revision pointed to
//! ```
//!
//! Downloads continue a partial `.incomplete` blob with an HTTP `Range`
//! request, and an LFS file's sha256 (its etag) is checked before the blob
//! is kept. `HF_TOKEN` (else the token file `huggingface-cli login` writes)
//! is sent as a bearer token to the hub only, never to the storage host.
//! With `HF_HUB_OFFLINE=1` only the cache is read.
//!
//! What is fetched: `config.json`, the weights (`model.safetensors`, else
//! `pytorch_model.bin`, imported with Fovea's own unpickler) and
//! `preprocessor_config.json` when there is one (`README.md` too when the
//! config names no license). The manifest takes the labels from the config
//! (timm's `label_names`, else `id2label`), the preprocessing from timm's
//! `pretrained_cfg` or a ViT-style `preprocessor_config.json` when it maps
//! exactly onto Fovea's transform (otherwise the server's default for the
//! architecture applies, and the pull says so), and records
//! `hf:ORG/NAME@COMMIT`, the license and the weights' sha256.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fovea_model_core::classifier::Classifier;
use fovea_model_core::preprocess::{
    Interpolation, Preprocess, Resize, Size, IMAGENET_MEAN, IMAGENET_STD,
};
use reqwest::{StatusCode, Url};
use serde_json::Value;

use crate::http::Http;
use crate::pull::{PullError, PullStep};
use crate::store::{is_valid_name, sha256_file, Labels, Manifest, Source, Store, StoredModel};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub const CONFIG_FILE: &str = "config.json";
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
/// Weights files, in order of preference.
pub const WEIGHTS_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// `hf:ORG/NAME[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
}

impl HubSpec {
    /// Parses `hf:ORG/NAME[@REVISION]` (the revision defaults to `main`).
    pub fn parse(spec: &str) -> Result<HubSpec, PullError> {
        let bad = |why: &str| {
            PullError::Other(format!("{spec:?}: {why}; expected hf:ORG/NAME[@REVISION]"))
        };
        let rest = spec
            .strip_prefix("hf:")
            .ok_or_else(|| bad("no hf: prefix"))?;
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let part_ok = |p: &&str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(part_ok) {
            return Err(bad("not a repository name"));
        }
        let revision_ok = !revision.is_empty()
            && revision.len() <= 256
            && revision
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && revision
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '\\' | '?' | '#' | '%'));
        if !revision_ok {
            return Err(bad("not a revision"));
        }
        Ok(HubSpec {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The store name a pull gets unless told otherwise: the repository's
    /// name without its organisation (`timm/resnet50.a1_in1k` -> `resnet50.a1_in1k`).
    pub fn default_name(&self) -> &str {
        self.repo.rsplit('/').next().unwrap_or(&self.repo)
    }
}

/// The hub's file cache.
#[derive(Clone, Debug)]
pub struct HubCache {
    pub root: PathBuf,
}

impl HubCache {
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub fn from_env() -> HubCache {
        HubCache {
            root: match env("HF_HUB_CACHE") {
                Some(cache) => PathBuf::from(cache),
                None => hf_home().join("hub"),
            },
        }
    }

    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn blob(&self, repo: &str, etag: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(etag)
    }

    pub fn snapshot(&self, repo: &str, commit: &str, file: &str) -> PathBuf {
        self.repo_dir(repo)
            .join("snapshots")
            .join(commit)
            .join(file)
    }

    pub fn ref_path(&self, repo: &str, revision: &str) -> PathBuf {
        self.repo_dir(repo).join("refs").join(revision)
    }

    /// The commit a revision pointed to when last resolved.
    pub fn read_ref(&self, repo: &str, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(self.ref_path(repo, revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    fn write_ref(&self, repo: &str, revision: &str, commit: &str) -> Result<(), PullError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_path(repo, revision);
        if fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        create_parent(&path)?;
        fs::write(&path, commit).map_err(|e| io(&path, e))
    }

    /// Point `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative
    /// symlink (as `huggingface_hub` does), or a copy where links fail.
    fn link(&self, repo: &str, commit: &str, file: &str, etag: &str) -> Result<PathBuf, PullError> {
        let snapshot = self.snapshot(repo, commit, file);
        let blob = self.blob(repo, etag);
        create_parent(&snapshot)?;
        if fs::symlink_metadata(&snapshot).is_ok() {
            fs::remove_file(&snapshot).map_err(|e| io(&snapshot, e))?;
        }
        // snapshots/<commit>/<dirs of file>/<name> -> ../../(../ per dir)blobs/<etag>
        let depth = 2 + file.matches('/').count();
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &snapshot).is_ok();
        #[cfg(not(unix))]
        let linked = false;
        if !linked {
            fs::copy(&blob, &snapshot).map_err(|e| io(&snapshot, e))?;
        }
        Ok(snapshot)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn hf_home() -> PathBuf {
    if let Some(home) = env("HF_HOME") {
        return PathBuf::from(home);
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("huggingface")
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(path: &Path, e: std::io::Error) -> PullError {
    PullError::Other(format!("{}: {e}", path.display()))
}

fn create_parent(path: &Path) -> Result<(), PullError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| io(parent, e))
}

/// Where and how to reach the hub.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, default the public hub.
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`).
    pub token: Option<String>,
    pub cache: HubCache,
    /// `HF_HUB_OFFLINE`: read the cache only.
    pub offline: bool,
}

impl HubOptions {
    pub fn from_env() -> HubOptions {
        let token = env("HF_TOKEN").or_else(|| {
            let path = env("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home().join("token"));
            fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        HubOptions {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache: HubCache::from_env(),
            offline,
        }
    }
}

/// A file of the repository, in the cache.
#[derive(Clone, Debug)]
pub struct CachedFile {
    pub name: String,
    /// The snapshot path (a link to the blob).
    pub path: PathBuf,
    pub commit: String,
    /// The content's sha256 when the hub gave it (LFS files).
    pub sha256: Option<String>,
    /// Whether this pull downloaded it (false: it was in the cache).
    pub downloaded: bool,
}

/// Resolves and caches files of one repository.
pub struct HubClient<'a> {
    options: &'a HubOptions,
    http: Option<Http>,
}

impl<'a> HubClient<'a> {
    pub fn new(options: &'a HubOptions) -> Result<HubClient<'a>, PullError> {
        let http = if options.offline {
            None
        } else {
            let endpoint = Url::parse(&options.endpoint).map_err(|e| {
                PullError::Other(format!("HF_ENDPOINT {:?}: {e}", options.endpoint))
            })?;
            Some(Http::new(options.token.as_deref(), Some(&endpoint))?)
        };
        Ok(HubClient { options, http })
    }

    /// Shorten the pause between download retries (tests).
    pub fn set_retry_pause(&mut self, pause: std::time::Duration) {
        if let Some(http) = &mut self.http {
            http.retry_pause = pause;
        }
    }

    /// `file` of `repo` at `revision` (a branch, tag or commit), from the
    /// cache or the hub; `None` when the repository has no such file.
    pub fn fetch(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        progress: &dyn Fn(PullStep),
    ) -> Result<Option<CachedFile>, PullError> {
        let cache = &self.options.cache;
        let Some(http) = &self.http else {
            let commit = cache.read_ref(repo, revision).ok_or_else(|| {
                PullError::Other(format!(
                    "HF_HUB_OFFLINE is set and the cache ({}) has no {repo}@{revision}",
                    cache.root.display()
                ))
            })?;
            let path = cache.snapshot(repo, &commit, file);
            return Ok(path.is_file().then(|| CachedFile {
                name: file.to_string(),
                path,
                commit,
                sha256: None,
                downloaded: false,
            }));
        };
        let url = format!(
            "{}/{repo}/resolve/{}/{file}",
            self.options.endpoint,
            revision.replace('/', "%2F")
        );
        let url = Url::parse(&url).map_err(|e| PullError::Other(format!("{url}: {e}")))?;
        let head = http.head(&url)?;
        match head.status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND
                if head.header("x-error-code").as_deref() != Some("RepoNotFound")
                    && head.header("x-error-code").as_deref() != Some("RevisionNotFound") =>
            {
                return Ok(None)
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let hint = if self.options.token.is_some() {
                    "the token (HF_TOKEN) was refused, or the repository does not exist"
                } else {
                    "the repository does not exist, or it is private or gated: set HF_TOKEN"
                };
                return Err(PullError::Other(format!(
                    "{repo}: HTTP {} from the hub: {hint}",
                    head.status.as_u16()
                )));
            }
            s => {
                let code = head.header("x-error-code").unwrap_or_default();
                return Err(PullError::Other(format!(
                    "{url}: HTTP {} {code}",
                    s.as_u16()
                )));
            }
        }
        let commit = head.header("x-repo-commit").filter(|c| is_commit(c)).ok_or_else(|| {
            PullError::Other(format!(
                "{url}: the answer names no commit (X-Repo-Commit); is HF_ENDPOINT a Hugging Face hub?"
            ))
        })?;
        let etag = head
            .header("x-linked-etag")
            .or_else(|| head.header("etag"))
            .map(|e| normalise_etag(&e))
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
            .ok_or_else(|| PullError::Other(format!("{url}: the answer has no ETag")))?;
        let size = head
            .header("x-linked-size")
            .or_else(|| head.header("content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        let sha256 = is_sha256(&etag).then(|| etag.clone());

        let snapshot = cache.snapshot(repo, &commit, file);
        let blob = cache.blob(repo, &etag);
        let mut downloaded = false;
        let cached_ok = blob.is_file()
            && match &sha256 {
                Some(expected) => sha256_file(&blob)? == *expected,
                None => size.is_none_or(|n| fs::metadata(&blob).is_ok_and(|m| m.len() == n)),
            };
        if !cached_ok {
            progress(PullStep::Downloading { what: file });
            create_parent(&blob)?;
            let partial = blob.with_file_name(format!("{etag}.incomplete"));
            http.download(&head.url, &partial, size, progress)?;
            if let Some(expected) = &sha256 {
                let actual = sha256_file(&partial)?;
                if actual != *expected {
                    // Unusable for a resume too: start afresh next time.
                    let _ = fs::remove_file(&partial);
                    return Err(PullError::Checksum {
                        what: format!("{repo}/{file}"),
                        expected: expected.clone(),
                        actual,
                    });
                }
            } else if let Some(n) = size {
                let got = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                if got != n {
                    let _ = fs::remove_file(&partial);
                    return Err(PullError::Other(format!(
                        "{repo}/{file}: {got} bytes downloaded, the hub announced {n}"
                    )));
                }
            }
            fs::rename(&partial, &blob).map_err(|e| io(&blob, e))?;
            downloaded = true;
        } else {
            progress(PullStep::Cached { what: file });
        }
        let snapshot_ok = fs::canonicalize(&snapshot)
            .ok()
            .zip(fs::canonicalize(&blob).ok())
            .is_some_and(|(a, b)| a == b);
        let path = if snapshot_ok && !downloaded {
            snapshot
        } else {
            cache.link(repo, &commit, file, &etag)?
        };
        Ok(Some(CachedFile {
            name: file.to_string(),
            path,
            commit,
            sha256,
            downloaded,
        }))
    }
}

/// `W/"abc"` -> `abc`.
fn normalise_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// What `fovea pull hf:...` did.
#[derive(Debug)]
pub struct HubPull {
    pub stored: StoredModel,
    pub files: Vec<CachedFile>,
    /// Things the user should know (preprocessing left to the server, ...).
    pub notes: Vec<String>,
}

/// Pull `spec` into `store` under `name` (default: the repository's name).
pub fn pull_hf(
    store: &Store,
    spec: &HubSpec,
    name: Option<&str>,
    client: &HubClient,
    progress: &dyn Fn(PullStep),
) -> Result<HubPull, PullError> {
    let name = name.unwrap_or(spec.default_name());
    if !is_valid_name(name) {
        return Err(PullError::Other(format!(
            "{name:?} cannot name a stored model (letters, digits, '-', '_', '.'); pass --name"
        )));
    }
    let repo = spec.repo.as_str();
    let config = client
        .fetch(repo, &spec.revision, CONFIG_FILE, progress)?
        .ok_or_else(|| {
            PullError::Other(format!(
                "{repo}@{}: no {CONFIG_FILE}; not a model Fovea can pull",
                spec.revision
            ))
        })?;
    // The other files come from the same commit.
    let commit = config.commit.clone();
    client
        .options
        .cache
        .write_ref(repo, &spec.revision, &commit)?;
    let mut weights = None;
    for file in WEIGHTS_FILES {
        if let Some(found) = client.fetch(repo, &commit, file, progress)? {
            weights = Some(found);
            break;
        }
    }
    let weights = weights.ok_or_else(|| {
        PullError::Other(format!(
            "{repo}@{commit}: neither {} nor {}",
            WEIGHTS_FILES[0], WEIGHTS_FILES[1]
        ))
    })?;
    let preprocessor = client.fetch(repo, &commit, PREPROCESSOR_FILE, progress)?;

    let config_json = read_json(&config.path)?;
    let preprocessor_json = preprocessor
        .as_ref()
        .map(|p| read_json(&p.path))
        .transpose()?;
    let mut facts = describe(repo, &config_json, preprocessor_json.as_ref());
    let mut files = vec![config, weights.clone()];
    files.extend(preprocessor);
    if facts.license.is_none() {
        if let Some(readme) = client.fetch(repo, &commit, "README.md", progress)? {
            let text = fs::read_to_string(&readme.path).unwrap_or_default();
            facts.license = readme_license(&text);
            files.push(readme);
        }
    }

    let work = tempfile::tempdir().map_err(|e| PullError::Other(e.to_string()))?;
    let safetensors = if weights.name.ends_with(".safetensors") {
        weights.path.clone()
    } else {
        progress(PullStep::Importing);
        let out = work.path().join("model.safetensors");
        crate::pth::import_pth(&weights.path, &out)
            .map_err(|e| PullError::Other(format!("importing {repo}/{}: {e}", weights.name)))?;
        out
    };
    progress(PullStep::Verifying);
    let original_sha = match &weights.sha256 {
        Some(sha) => sha.clone(),
        None => sha256_file(&weights.path)?,
    };
    let source = Source {
        kind: "hf".into(),
        location: format!("hf:{repo}@{commit}"),
        file: Some(weights.name.clone()),
        sha256: Some(original_sha),
    };
    let (manifest, notes) = manifest_for(name, &facts, &safetensors, source)?;
    progress(PullStep::Storing);
    let stored = store.put(&safetensors, manifest)?;
    for note in &notes {
        progress(PullStep::Note { message: note });
    }
    Ok(HubPull {
        stored,
        files,
        notes,
    })
}

fn read_json(path: &Path) -> Result<Value, PullError> {
    let text = fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| PullError::Other(format!("{}: not JSON: {e}", path.display())))
}

/// What a hub repository's configuration says about the model.
#[derive(Clone, Debug, PartialEq)]
pub struct HubFacts {
    /// `classification` or `detection`.
    pub task: String,
    /// The architecture name for the loader (timm's `architecture`, a
    /// derived `vit_*` name, else the config's `model_type`).
    pub arch: String,
    /// `model_type` (transformers) or the timm architecture's family.
    pub family: String,
    pub labels: Option<Vec<String>>,
    /// The preprocessing, or why it does not map onto Fovea's transform.
    pub preprocess: Result<Preprocess, String>,
    pub license: Option<String>,
}

/// Read the task, architecture, labels, preprocessing and license of a hub
/// model from its `config.json` (and `preprocessor_config.json`).
pub fn describe(repo: &str, config: &Value, preprocessor: Option<&Value>) -> HubFacts {
    let timm = config.get("architecture").and_then(Value::as_str);
    let pretrained = config.get("pretrained_cfg");
    let model_type = config.get("model_type").and_then(Value::as_str);
    let detection = config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|n| n.ends_with("ForObjectDetection"))
        })
        || model_type.is_some_and(|t| t.contains("detr") || t == "yolos");
    let arch = if let Some(arch) = timm {
        arch.to_string()
    } else if model_type == Some("vit") {
        hf_vit_arch(config).unwrap_or_else(|| repo_arch(repo))
    } else if let Some(t) = model_type {
        match config.get("backbone").and_then(Value::as_str) {
            Some(b) if detection => format!("{t}_{}", b.replace(['-', '.', '/'], "_")),
            _ => t.to_string(),
        }
    } else {
        repo_arch(repo)
    };
    let family = match (timm, model_type) {
        (Some(arch), _) => arch
            .trim_start_matches("tf_")
            .split(|c: char| !c.is_ascii_alphabetic())
            .next()
            .unwrap_or(arch)
            .to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => arch.clone(),
    };
    let labels = string_list(config.get("label_names"))
        .or_else(|| string_list(pretrained.and_then(|p| p.get("label_names"))))
        .or_else(|| id2label(config.get("id2label")?));
    let preprocess = if detection {
        Err("detectors letterbox or resize by their own rules".to_string())
    } else if let Some(cfg) = pretrained {
        timm_preprocess(cfg)
    } else if let Some(pp) = preprocessor {
        hf_preprocess(pp)
    } else {
        Err(format!(
            "{repo} has neither a pretrained_cfg nor a {PREPROCESSOR_FILE}"
        ))
    };
    let license = [
        config.get("license"),
        pretrained.and_then(|p| p.get("license")),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.as_str().map(str::to_string))
    .filter(|l| !l.is_empty());
    HubFacts {
        task: if detection {
            "detection"
        } else {
            "classification"
        }
        .into(),
        arch,
        family,
        labels,
        preprocess,
        license,
    }
}

fn repo_arch(repo: &str) -> String {
    repo.rsplit('/').next().unwrap_or(repo).to_string()
}

fn string_list(value: Option<&Value>) -> Option<Vec<String>> {
    let items = value?.as_array()?;
    let names: Option<Vec<String>> = items
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect();
    names.filter(|n| !n.is_empty())
}

/// transformers' `id2label` (`{"0": "tench", ...}`) as a list; gaps become
/// `N/A` (as DETR's COCO map writes them). The placeholder names
/// transformers invents (`LABEL_0`, ...) are no labels.
fn id2label(value: &Value) -> Option<Vec<String>> {
    let map = value.as_object()?;
    let mut pairs = Vec::with_capacity(map.len());
    for (k, v) in map {
        pairs.push((k.parse::<usize>().ok()?, v.as_str()?.to_string()));
    }
    let len = pairs.iter().map(|(i, _)| i + 1).max()?;
    if len > 1_000_000 {
        return None;
    }
    let mut names = vec!["N/A".to_string(); len];
    for (i, name) in pairs {
        names[i] = name;
    }
    let placeholders = names
        .iter()
        .enumerate()
        .all(|(i, n)| *n == format!("LABEL_{i}"));
    (!placeholders).then_some(names)
}

/// transformers' ViT config -> `vit_{size}_patch{p}_{res}`, the size named
/// by the width (else the head count).
fn hf_vit_arch(config: &Value) -> Option<String> {
    let get = |k: &str| config.get(k).and_then(Value::as_u64);
    let size = match (get("hidden_size")?, get("num_attention_heads")?) {
        (192, _) | (_, 3) => "tiny",
        (384, _) | (_, 6) => "small",
        (768, _) | (_, 12) => "base",
        (1024, _) | (_, 16) => "large",
        _ => return None,
    };
    Some(format!(
        "vit_{size}_patch{}_{}",
        get("patch_size")?,
        get("image_size")?
    ))
}

fn interpolation(name: &str) -> Result<Interpolation, String> {
    match name {
        "bilinear" => Ok(Interpolation::Bilinear),
        "bicubic" => Ok(Interpolation::Bicubic),
        other => Err(format!("{other} interpolation")),
    }
}

fn triple(value: Option<&Value>, default: [f32; 3]) -> Result<[f32; 3], String> {
    let Some(value) = value else {
        return Ok(default);
    };
    let items: Vec<f64> = match value {
        Value::Number(n) => vec![n.as_f64().unwrap_or(f64::NAN); 3],
        Value::Array(a) => a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect(),
        _ => return Err(format!("mean/std {value}")),
    };
    match items.as_slice() {
        [a, b, c] if items.iter().all(|v| v.is_finite()) => Ok([*a as f32, *b as f32, *c as f32]),
        _ => Err(format!("mean/std {value}")),
    }
}

/// timm's eval transform from a `pretrained_cfg`: resize then centre crop
/// at `crop_pct`, exactly as `timm.data.create_transform` builds it for
/// square inputs (`center`) and for `squash`. `border` and non-square
/// `center` crops (`ResizeKeepRatio`) have no exact counterpart.
pub fn timm_preprocess(cfg: &Value) -> Result<Preprocess, String> {
    let size: Vec<u64> = cfg
        .get("input_size")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let [channels, h, w] = size[..] else {
        return Err("pretrained_cfg has no input_size [3, H, W]".into());
    };
    if channels != 3 || h == 0 || w == 0 || h > 8192 || w > 8192 {
        return Err(format!("input_size {size:?}"));
    }
    let interpolation = interpolation(
        cfg.get("interpolation")
            .and_then(Value::as_str)
            .unwrap_or("bilinear"),
    )?;
    let crop_pct = cfg.get("crop_pct").and_then(Value::as_f64).unwrap_or(0.875);
    if !(crop_pct > 0.0 && crop_pct <= 1.0) {
        return Err(format!("crop_pct {crop_pct}"));
    }
    let mean = triple(cfg.get("mean"), IMAGENET_MEAN)?;
    let std = triple(cfg.get("std"), IMAGENET_STD)?;
    // Python's math.floor(x / crop_pct) on the JSON's own doubles.
    let scale = |x: u64| (x as f64 / crop_pct).floor() as u32;
    let (sh, sw) = (scale(h), scale(w));
    let resize = match cfg
        .get("crop_mode")
        .and_then(Value::as_str)
        .unwrap_or("center")
    {
        "center" if sh == sw => Resize::ShorterSide(sh),
        "center" => return Err("a non-square centre crop (ResizeKeepRatio)".into()),
        "squash" => Resize::Exact {
            width: sw,
            height: sh,
        },
        other => return Err(format!("crop_mode {other}")),
    };
    let p = Preprocess {
        resize,
        interpolation,
        crop: Some(Size {
            width: w as u32,
            height: h as u32,
        }),
        scale: 1.0 / 255.0,
        mean,
        std,
    };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// A transformers image processor that resizes to a fixed size (ViT's):
/// exact resize, no crop (or a crop of the same size), rescale, normalise.
/// Shortest-edge resizes with a centre crop do not map exactly (transformers
/// rounds the crop offset down where torchvision rounds it to even).
pub fn hf_preprocess(pp: &Value) -> Result<Preprocess, String> {
    let kind = pp
        .get("image_processor_type")
        .or_else(|| pp.get("feature_extractor_type"))
        .and_then(Value::as_str)
        .unwrap_or("an unnamed image processor");
    let vit_like = kind.starts_with("ViT");
    let flag = |k: &str| pp.get(k).and_then(Value::as_bool).unwrap_or(true);
    if !flag("do_resize") {
        return Err(format!("{kind} without a resize"));
    }
    let (height, width) = match pp.get("size") {
        Some(Value::Number(n)) if vit_like => {
            let n = n.as_u64().unwrap_or(0);
            (n, n)
        }
        Some(Value::Object(o)) if o.contains_key("height") && o.contains_key("width") => (
            o["height"].as_u64().unwrap_or(0),
            o["width"].as_u64().unwrap_or(0),
        ),
        Some(other) => return Err(format!("{kind} size {other}")),
        None if vit_like => (224, 224),
        None => return Err(format!("{kind} without a size")),
    };
    if height == 0 || width == 0 || height > 8192 || width > 8192 {
        return Err(format!("{kind} size {height}x{width}"));
    }
    if pp.get("do_center_crop").and_then(Value::as_bool) == Some(true) {
        let same = pp.get("crop_size").is_some_and(|c| {
            c.get("height").and_then(Value::as_u64) == Some(height)
                && c.get("width").and_then(Value::as_u64) == Some(width)
        });
        if !same {
            return Err(format!("{kind} centre crop"));
        }
    }
    let interpolation = match pp.get("resample").map(Value::as_u64) {
        // PIL's numbering: 2 BILINEAR, 3 BICUBIC.
        Some(Some(2)) => Interpolation::Bilinear,
        Some(Some(3)) => Interpolation::Bicubic,
        None if vit_like => Interpolation::Bilinear,
        other => return Err(format!("{kind} resample {other:?}")),
    };
    let scale = if flag("do_rescale") {
        pp.get("rescale_factor")
            .and_then(Value::as_f64)
            .map(|f| f as f32)
            .unwrap_or(1.0 / 255.0)
    } else {
        1.0
    };
    let (mean, std) = if flag("do_normalize") {
        let default = if vit_like { Some([0.5; 3]) } else { None };
        let get = |k: &str| match (pp.get(k), default) {
            (None, None) => Err(format!("{kind} without {k}")),
            (v, d) => triple(v, d.unwrap_or([0.0; 3])),
        };
        (get("image_mean")?, get("image_std")?)
    } else {
        ([0.0; 3], [1.0; 3])
    };
    let p = Preprocess {
        resize: Resize::Exact {
            width: width as u32,
            height: height as u32,
        },
        interpolation,
        crop: None,
        scale,
        mean,
        std,
    };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// `license:` in a model card's YAML front matter.
pub fn readme_license(text: &str) -> Option<String> {
    let mut lines = text.lines();
    if lines.next()?.trim() != "---" {
        return None;
    }
    lines
        .take_while(|l| l.trim() != "---")
        .find_map(|l| l.strip_prefix("license:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        .filter(|v| !v.is_empty())
}

/// The manifest of a pulled model, and notes for the user. Classifiers are
/// loaded once to check that Fovea can run them (and to count the classes);
/// detectors are stored as described (their labels from the config).
pub fn manifest_for(
    name: &str,
    facts: &HubFacts,
    safetensors: &Path,
    source: Source,
) -> Result<(Manifest, Vec<String>), PullError> {
    let mut notes = Vec::new();
    let (family, num_classes, preprocess) = if facts.task == "classification" {
        let tensors: HashMap<_, _> =
            crate::safetensors_io::load_safetensors(safetensors, DType::F32, &Device::Cpu)
                .map_err(|e| PullError::Other(e.to_string()))?
                .into_iter()
                .collect();
        let model = Classifier::load(tensors, Some(&facts.arch), &Device::Cpu, DType::F32)
            .map_err(|e| {
                PullError::Other(format!(
                    "{}: Fovea cannot run this classifier ({}): {e}",
                    source.location, facts.arch
                ))
            })?;
        let info = model.info();
        let preprocess = match &facts.preprocess {
            Ok(p) => Some(p.clone()),
            Err(why) => {
                notes.push(format!(
                    "preprocessing: {why} does not map exactly onto Fovea's transform; \
                     the server's default for {} applies (set `preprocess` in fovea.toml to change it)",
                    info.variant
                ));
                None
            }
        };
        (info.family.to_string(), info.num_classes, preprocess)
    } else {
        let n = facts.labels.as_ref().map(Vec::len).unwrap_or(0);
        if n == 0 {
            return Err(PullError::Other(format!(
                "{}: the config names no classes (id2label)",
                source.location
            )));
        }
        notes.push(format!(
            "{} is a {} detector: its preprocessing is left to the server",
            facts.arch, facts.family
        ));
        (facts.family.clone(), n, None)
    };
    let labels = match &facts.labels {
        Some(names) if names.len() == num_classes => Labels::Names(names.clone()),
        Some(names) => {
            return Err(PullError::Other(format!(
                "{}: the config names {} classes, the weights have {num_classes}",
                source.location,
                names.len()
            )))
        }
        None if num_classes == 1000 => Labels::Builtin("imagenet-1k".into()),
        None => {
            notes.push(format!(
                "the config names no labels: classes are called class_0..class_{}",
                num_classes.saturating_sub(1)
            ));
            Labels::Builtin("none".into())
        }
    };
    if facts.license.is_none() {
        notes.push("license: unknown (neither the config nor the model card names one)".into());
    }
    Ok((
        Manifest {
            name: name.to_string(),
            family,
            arch: facts.arch.clone(),
            task: facts.task.clone(),
            num_classes,
            labels,
            preprocess,
            input_size: None,
            stride: Vec::new(),
            source,
            sha256: String::new(),
            license: facts.license.clone(),
        },
        notes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::{sha256_hex, StandinHub};
    use serde_json::json;
    use std::time::Duration;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn fixture(path: &str) -> Vec<u8> {
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
    }

    /// The tiny timm ResNet-50 of the conformance fixtures (64 classes).
    fn tiny_resnet() -> Vec<u8> {
        fixture("../model-core/tests/fixtures/models/timm_resnet50_tiny/model.safetensors")
    }

    fn timm_config() -> Vec<u8> {
        let names: Vec<String> = (0..64).map(|i| format!("thing {i}")).collect();
        serde_json::to_vec(&json!({
            "architecture": "resnet50",
            "num_classes": 64,
            "label_names": names,
            "pretrained_cfg": {
                "input_size": [3, 224, 224],
                "interpolation": "bicubic",
                "crop_pct": 0.95,
                "crop_mode": "center",
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "license": "apache-2.0"
            }
        }))
        .unwrap()
    }

    struct Setup {
        hub: StandinHub,
        dir: tempfile::TempDir,
        options: HubOptions,
    }

    impl Setup {
        fn new() -> Setup {
            let hub = StandinHub::start();
            let dir = tempfile::tempdir().unwrap();
            let options = HubOptions {
                endpoint: hub.endpoint.clone(),
                token: None,
                cache: HubCache {
                    root: dir.path().join("hf/hub"),
                },
                offline: false,
            };
            Setup { hub, dir, options }
        }

        fn store(&self) -> Store {
            Store::new(self.dir.path().join("fovea"))
        }

        fn pull(&self, spec: &str) -> Result<HubPull, PullError> {
            self.pull_with(&self.options, spec)
        }

        fn pull_with(&self, options: &HubOptions, spec: &str) -> Result<HubPull, PullError> {
            let mut client = HubClient::new(options)?;
            client.set_retry_pause(Duration::from_millis(10));
            pull_hf(
                &self.store(),
                &HubSpec::parse(spec)?,
                None,
                &client,
                &|_| {},
            )
        }
    }

    #[test]
    fn specs() {
        let s = HubSpec::parse("hf:timm/resnet50.a1_in1k").unwrap();
        assert_eq!(
            (s.repo.as_str(), s.revision.as_str()),
            ("timm/resnet50.a1_in1k", "main")
        );
        assert_eq!(s.default_name(), "resnet50.a1_in1k");
        let s = HubSpec::parse("hf:google/vit-base-patch16-224@refs/pr/1").unwrap();
        assert_eq!(s.revision, "refs/pr/1");
        assert_eq!(HubSpec::parse("hf:gpt2").unwrap().default_name(), "gpt2");
        for bad in [
            "timm/x",
            "hf:",
            "hf:a/b/c",
            "hf:../x",
            "hf:a/..",
            "hf:a/b@",
            "hf:a/b@../../x",
            "hf:a b/c",
            "hf:a/b@x?y",
        ] {
            assert!(HubSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timm_configs_describe_the_model() {
        let config: Value = serde_json::from_slice(&timm_config()).unwrap();
        let facts = describe("timm/resnet50.a1_in1k", &config, None);
        assert_eq!(facts.task, "classification");
        assert_eq!(
            (facts.arch.as_str(), facts.family.as_str()),
            ("resnet50", "resnet")
        );
        assert_eq!(facts.labels.as_ref().unwrap()[63], "thing 63");
        assert_eq!(facts.license.as_deref(), Some("apache-2.0"));
        assert_eq!(
            facts.preprocess.unwrap(),
            Preprocess::timm(
                224,
                0.95,
                Interpolation::Bicubic,
                IMAGENET_MEAN,
                IMAGENET_STD
            )
        );
        // 224 / 0.875 = 256 (the default crop_pct), squash, and what has no
        // exact counterpart.
        let p = timm_preprocess(&json!({"input_size": [3, 224, 224]})).unwrap();
        assert_eq!(p.resize, Resize::ShorterSide(256));
        assert_eq!(p.interpolation, Interpolation::Bilinear);
        let p = timm_preprocess(&json!({"input_size": [3, 384, 384], "crop_pct": 1.0,
            "crop_mode": "squash", "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": 0.5}))
        .unwrap();
        assert_eq!(
            p.resize,
            Resize::Exact {
                width: 384,
                height: 384
            }
        );
        assert_eq!((p.mean, p.std), ([0.5; 3], [0.5; 3]));
        for bad in [
            json!({"input_size": [3, 224, 224], "crop_mode": "border"}),
            json!({"input_size": [3, 224, 160]}),
            json!({"input_size": [3, 224, 224], "interpolation": "lanczos"}),
            json!({"input_size": [3, 224, 224], "crop_pct": 0}),
            json!({"input_size": [1, 224, 224]}),
            json!({}),
        ] {
            assert!(timm_preprocess(&bad).is_err(), "{bad}");
        }
        // Without labels a 1000-class timm model is ImageNet's.
        let facts = describe("timm/x", &json!({"architecture": "efficientnet_b0"}), None);
        assert_eq!(
            (facts.labels, facts.family.as_str()),
            (None, "efficientnet")
        );
    }

    #[test]
    fn transformers_configs_describe_the_model() {
        let config = json!({
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "hidden_size": 768, "num_attention_heads": 12, "patch_size": 16, "image_size": 224,
            "id2label": {"1": "b", "0": "a", "2": "c"}
        });
        let pp = json!({"feature_extractor_type": "ViTFeatureExtractor", "do_normalize": true,
            "do_resize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "resample": 2, "size": 224});
        let facts = describe("google/vit-base-patch16-224", &config, Some(&pp));
        assert_eq!(facts.arch, "vit_base_patch16_224");
        assert_eq!(
            (facts.family.as_str(), facts.task.as_str()),
            ("vit", "classification")
        );
        assert_eq!(facts.labels.unwrap(), ["a", "b", "c"]);
        assert_eq!(facts.license, None);
        let p = facts.preprocess.unwrap();
        assert_eq!(
            p.resize,
            Resize::Exact {
                width: 224,
                height: 224
            }
        );
        assert_eq!((p.crop, p.interpolation), (None, Interpolation::Bilinear));
        assert_eq!((p.scale, p.mean, p.std), (1.0 / 255.0, [0.5; 3], [0.5; 3]));
        let p = hf_preprocess(&json!({"image_processor_type": "ViTImageProcessor",
            "size": {"height": 96, "width": 80}, "resample": 3, "do_rescale": true,
            "rescale_factor": 0.00392156862745098, "image_mean": [0.1, 0.2, 0.3],
            "image_std": [0.4, 0.5, 0.6]}))
        .unwrap();
        assert_eq!(
            p.resize,
            Resize::Exact {
                width: 80,
                height: 96
            }
        );
        assert_eq!(p.interpolation, Interpolation::Bicubic);
        for bad in [
            json!({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875}),
            json!({"image_processor_type": "ViTImageProcessor", "size": 224, "resample": 1}),
            json!({"image_processor_type": "DeiTImageProcessor", "size": {"height": 256, "width": 256},
                "do_center_crop": true, "crop_size": {"height": 224, "width": 224}, "resample": 3}),
            json!({"image_processor_type": "ViTImageProcessor", "do_resize": false}),
        ] {
            assert!(hf_preprocess(&bad).is_err(), "{bad}");
        }
        // transformers' placeholder names are no labels.
        let c = json!({"model_type": "vit", "id2label": {"0": "LABEL_0", "1": "LABEL_1"}});
        assert_eq!(describe("a/b", &c, None).labels, None);
    }

    #[test]
    fn detr_configs_describe_a_detector() {
        let config = json!({
            "architectures": ["DetrForObjectDetection"], "model_type": "detr",
            "backbone": "resnet50", "license": "apache-2.0",
            "id2label": {"0": "N/A", "1": "person", "3": "car"}
        });
        let pp = json!({"image_processor_type": "DetrImageProcessor",
            "size": {"shortest_edge": 800, "longest_edge": 1333}});
        let facts = describe("facebook/detr-resnet-50", &config, Some(&pp));
        assert_eq!(facts.task, "detection");
        assert_eq!(
            (facts.arch.as_str(), facts.family.as_str()),
            ("detr_resnet50", "detr")
        );
        assert_eq!(facts.labels.unwrap(), ["N/A", "person", "N/A", "car"]);
        assert!(facts.preprocess.is_err());
    }

    #[test]
    fn licenses_from_model_cards() {
        let card = "---\nlibrary_name: timm\nlicense: \"apache-2.0\"\ntags:\n- x\n---\n# Model\nlicense: mit\n";
        assert_eq!(readme_license(card).as_deref(), Some("apache-2.0"));
        assert_eq!(readme_license("# no front matter\nlicense: mit\n"), None);
        assert_eq!(readme_license("---\ntags: []\n---\nlicense: mit\n"), None);
    }

    #[test]
    fn a_pull_fills_the_hub_cache_and_the_second_reuses_it() {
        let s = Setup::new();
        let weights = tiny_resnet();
        let repo = "timm/resnet50.tiny";
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &timm_config(), false),
                ("model.safetensors", &weights, true),
            ],
        );
        let pulled = s.pull("hf:timm/resnet50.tiny").unwrap();
        let m = &pulled.stored.manifest;
        assert_eq!(m.name, "resnet50.tiny");
        assert_eq!(
            (m.task.as_str(), m.arch.as_str(), m.family.as_str()),
            ("classification", "resnet50", "resnet")
        );
        assert_eq!(m.num_classes, 64);
        assert!(matches!(&m.labels, Labels::Names(n) if n.len() == 64 && n[1] == "thing 1"));
        assert_eq!(
            m.preprocess,
            Some(Preprocess::timm(
                224,
                0.95,
                Interpolation::Bicubic,
                IMAGENET_MEAN,
                IMAGENET_STD
            ))
        );
        assert_eq!(m.source.kind, "hf");
        assert_eq!(m.source.location, format!("hf:{repo}@{COMMIT}"));
        assert_eq!(m.source.file.as_deref(), Some("model.safetensors"));
        assert_eq!(
            m.source.sha256.as_deref(),
            Some(sha256_hex(&weights).as_str())
        );
        assert_eq!(m.sha256, sha256_hex(&weights), "stored as published");
        assert_eq!(m.license.as_deref(), Some("apache-2.0"));
        pulled.stored.verify().unwrap();
        assert!(pulled.files.iter().all(|f| f.downloaded));

        // huggingface_hub's layout.
        let cache = &s.options.cache;
        let dir = cache.repo_dir(repo);
        assert!(dir.ends_with("models--timm--resnet50.tiny"));
        let sha = sha256_hex(&weights);
        assert_eq!(fs::read(dir.join("blobs").join(&sha)).unwrap(), weights);
        let snapshot = dir.join("snapshots").join(COMMIT).join("model.safetensors");
        #[cfg(unix)]
        assert_eq!(
            fs::read_link(&snapshot).unwrap(),
            Path::new("../../blobs").join(&sha)
        );
        assert_eq!(fs::read(&snapshot).unwrap(), weights);
        assert!(dir
            .join("snapshots")
            .join(COMMIT)
            .join("config.json")
            .is_file());
        assert_eq!(fs::read_to_string(dir.join("refs/main")).unwrap(), COMMIT);
        assert!(!dir.join("blobs").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".incomplete")));
        // The storage host was asked once, with GET only; the optional
        // files were looked for and missed.
        assert_eq!(s.hub.storage_gets(repo, "model.safetensors").len(), 1);
        let log = s.hub.log();
        assert!(log
            .iter()
            .any(|l| l.path.ends_with("/preprocessor_config.json")));
        assert!(!log.iter().any(|l| l.path.ends_with("/pytorch_model.bin")));
        assert!(log
            .iter()
            .filter(|l| l.host == "cdn")
            .all(|l| l.method == "GET"));

        // Again: everything from the cache, no second download.
        let again = s.pull("hf:timm/resnet50.tiny@main").unwrap();
        assert!(
            again.files.iter().all(|f| !f.downloaded),
            "{:?}",
            again.files
        );
        assert_eq!(s.hub.storage_gets(repo, "model.safetensors").len(), 1);
        assert_eq!(again.stored.manifest, *m);

        // And offline, from the cache alone (by branch or by commit).
        let offline = HubOptions {
            offline: true,
            endpoint: "http://127.0.0.1:9".into(),
            ..s.options.clone()
        };
        let requests = s.hub.log().len();
        s.pull_with(&offline, "hf:timm/resnet50.tiny").unwrap();
        s.pull_with(&offline, &format!("hf:timm/resnet50.tiny@{COMMIT}"))
            .unwrap();
        assert_eq!(s.hub.log().len(), requests);
        let err = s.pull_with(&offline, "hf:timm/other").unwrap_err();
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn a_cache_written_by_python_is_reused() {
        // huggingface_hub's files: a blob and a snapshot link, no refs.
        let s = Setup::new();
        let weights = tiny_resnet();
        let config = timm_config();
        let repo = "org/m";
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &config, false),
                ("model.safetensors", &weights, true),
            ],
        );
        let cache = &s.options.cache;
        let sha = sha256_hex(&weights);
        fs::create_dir_all(cache.repo_dir(repo).join("blobs")).unwrap();
        fs::write(cache.blob(repo, &sha), &weights).unwrap();
        cache.link(repo, COMMIT, "model.safetensors", &sha).unwrap();
        let pulled = s.pull("hf:org/m").unwrap();
        let w = pulled
            .files
            .iter()
            .find(|f| f.name == "model.safetensors")
            .unwrap();
        assert!(!w.downloaded);
        assert!(s.hub.storage_gets(repo, "model.safetensors").is_empty());
        // A damaged blob is not trusted: it is downloaded again.
        fs::write(cache.blob(repo, &sha), b"damaged").unwrap();
        let pulled = s.pull("hf:org/m").unwrap();
        assert!(pulled
            .files
            .iter()
            .any(|f| f.name == "model.safetensors" && f.downloaded));
        assert_eq!(fs::read(cache.blob(repo, &sha)).unwrap(), weights);
    }

    #[test]
    fn tokens_are_required_and_kept_from_the_storage_host() {
        let s = Setup::new();
        let repo = "org/private";
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &timm_config(), false),
                ("model.safetensors", &tiny_resnet(), true),
            ],
        );
        s.hub.require_token(repo, "hf_secret");
        let err = s.pull("hf:org/private").unwrap_err().to_string();
        assert!(err.contains("401") && err.contains("set HF_TOKEN"), "{err}");
        let wrong = HubOptions {
            token: Some("hf_wrong".into()),
            ..s.options.clone()
        };
        let err = s
            .pull_with(&wrong, "hf:org/private")
            .unwrap_err()
            .to_string();
        assert!(err.contains("token (HF_TOKEN) was refused"), "{err}");
        assert!(s.store().list().unwrap().is_empty());

        let with = HubOptions {
            token: Some("hf_secret".into()),
            ..s.options.clone()
        };
        s.pull_with(&with, "hf:org/private").unwrap();
        let log = s.hub.log();
        assert!(log
            .iter()
            .any(|l| l.host == "hub" && l.authorization.as_deref() == Some("Bearer hf_secret")));
        assert!(log.iter().filter(|l| l.host == "cdn").count() >= 1);
        assert!(
            log.iter()
                .filter(|l| l.host == "cdn")
                .all(|l| l.authorization.is_none()),
            "{log:?}"
        );
    }

    #[test]
    fn pytorch_weights_are_the_fallback_and_detectors_keep_id2label() {
        let s = Setup::new();
        let checkpoint = fixture("tests/fixtures/wrapped_zip.pt");
        let config = serde_json::to_vec(&json!({
            "architectures": ["DetrForObjectDetection"], "model_type": "detr", "backbone": "resnet50",
            "id2label": {"0": "N/A", "1": "person", "2": "bicycle"}
        }))
        .unwrap();
        let repo = "facebook/detr-tiny";
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &config, false),
                ("pytorch_model.bin", &checkpoint, true),
                (
                    "README.md",
                    b"---\nlicense: apache-2.0\n---\n# DETR\n",
                    false,
                ),
            ],
        );
        let pulled = s.pull("hf:facebook/detr-tiny").unwrap();
        let m = &pulled.stored.manifest;
        assert_eq!(
            (m.name.as_str(), m.task.as_str()),
            ("detr-tiny", "detection")
        );
        assert_eq!(
            (m.arch.as_str(), m.family.as_str(), m.num_classes),
            ("detr_resnet50", "detr", 3)
        );
        assert_eq!(
            m.labels,
            Labels::Names(vec!["N/A".into(), "person".into(), "bicycle".into()])
        );
        assert_eq!(m.preprocess, None);
        assert_eq!(m.source.file.as_deref(), Some("pytorch_model.bin"));
        assert_eq!(
            m.source.sha256.as_deref(),
            Some(sha256_hex(&checkpoint).as_str())
        );
        assert_eq!(
            m.license.as_deref(),
            Some("apache-2.0"),
            "from the model card"
        );
        assert!(pulled
            .notes
            .iter()
            .any(|n| n.contains("preprocessing is left to the server")));
        // Imported: the store holds safetensors, not the pickle.
        assert!(crate::pull::Header::read(&pulled.stored.weights_path()).is_ok());
        let log = s.hub.log();
        assert!(log
            .iter()
            .any(|l| l.method == "HEAD" && l.path.ends_with("/model.safetensors")));

        // Neither weights file: a clear error.
        s.hub
            .add_repo("org/empty", COMMIT, &[("config.json", &config, false)]);
        let err = s.pull("hf:org/empty").unwrap_err().to_string();
        assert!(
            err.contains("neither model.safetensors nor pytorch_model.bin"),
            "{err}"
        );
        let err = s.pull("hf:org/nothing").unwrap_err().to_string();
        assert!(err.contains("401"), "{err}");
        let err = s.pull("hf:facebook/detr-tiny@v9").unwrap_err().to_string();
        assert!(
            err.contains("404") && err.contains("RevisionNotFound"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_sha256_is_refused() {
        let s = Setup::new();
        let repo = "org/bad";
        let weights = tiny_resnet();
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &timm_config(), false),
                ("model.safetensors", &weights, true),
            ],
        );
        let mut other = weights.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        s.hub.corrupt(repo, "model.safetensors", &other);
        let err = s.pull("hf:org/bad").unwrap_err();
        match &err {
            PullError::Checksum {
                what,
                expected,
                actual,
            } => {
                assert_eq!(what, "org/bad/model.safetensors");
                assert_eq!(*expected, sha256_hex(&weights));
                assert_eq!(*actual, sha256_hex(&other));
            }
            e => panic!("{e}"),
        }
        let blobs = s.options.cache.repo_dir(repo).join("blobs");
        let kept: Vec<_> = fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !kept
                .iter()
                .any(|n| n.to_string_lossy().starts_with(&sha256_hex(&weights))),
            "{kept:?}"
        );
        assert!(s.store().list().unwrap().is_empty());
    }

    #[test]
    fn an_interrupted_download_is_resumed() {
        let s = Setup::new();
        let repo = "org/flaky";
        let weights = tiny_resnet();
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &timm_config(), false),
                ("model.safetensors", &weights, true),
            ],
        );
        // Cut short once: the next try asks for the rest.
        s.hub.cut_once(repo, "model.safetensors", 100_000);
        let pulled = s.pull("hf:org/flaky").unwrap();
        let gets = s.hub.storage_gets(repo, "model.safetensors");
        assert_eq!(gets.len(), 2, "{gets:?}");
        assert_eq!(gets[0].range, None);
        assert_eq!(gets[1].range.as_deref(), Some("bytes=100000-"));
        assert_eq!(pulled.stored.manifest.sha256, sha256_hex(&weights));

        // A partial blob left by an earlier run (or by Python) is continued.
        let s = Setup::new();
        s.hub.add_repo(
            repo,
            COMMIT,
            &[
                ("config.json", &timm_config(), false),
                ("model.safetensors", &weights, true),
            ],
        );
        let partial = s
            .options
            .cache
            .blob(repo, &format!("{}.incomplete", sha256_hex(&weights)));
        fs::create_dir_all(partial.parent().unwrap()).unwrap();
        fs::write(&partial, &weights[..12345]).unwrap();
        s.pull("hf:org/flaky").unwrap();
        let gets = s.hub.storage_gets(repo, "model.safetensors");
        assert_eq!(gets.len(), 1);
        assert_eq!(gets[0].range.as_deref(), Some("bytes=12345-"));
        assert!(!partial.exists());
    }

    #[test]
    fn url_pulls_are_checked_resumed_and_stored() {
        let s = Setup::new();
        let weights = tiny_resnet();
        let sha = sha256_hex(&weights);
        let url = s.hub.add_plain("resnet50-tiny.safetensors", &weights);
        s.hub.cut_plain_once("resnet50-tiny.safetensors", 50_000);
        let mut http = Http::new(None, None).unwrap();
        http.retry_pause = Duration::from_millis(10);
        let (parsed, sum) =
            crate::url::parse_url_spec(&format!("{url}#sha256={sha}"), None).unwrap();
        let stored = crate::url::pull_url_with(
            &s.store(),
            &parsed,
            &sum,
            None,
            Some("resnet50"),
            &http,
            &|_| {},
        )
        .unwrap();
        let m = &stored.manifest;
        assert_eq!(
            (m.name.as_str(), m.arch.as_str(), m.num_classes),
            ("resnet50-tiny", "resnet50", 64)
        );
        assert_eq!(
            (m.source.kind.as_str(), m.source.location.as_str()),
            ("url", url.as_str())
        );
        assert_eq!(m.source.sha256.as_deref(), Some(sha.as_str()));
        let ranges: Vec<_> = s
            .hub
            .log()
            .into_iter()
            .filter(|l| l.path.starts_with("/files/"))
            .map(|l| l.range)
            .collect();
        assert_eq!(ranges, [None, Some("bytes=50000-".to_string())]);
        // The download is not kept once stored.
        assert_eq!(
            fs::read_dir(s.dir.path().join("fovea/downloads"))
                .unwrap()
                .count(),
            0
        );

        // Without --arch the loader names it (a ResNet-50 by its blocks);
        // a wrong one is refused.
        let stored =
            crate::url::pull_url_with(&s.store(), &parsed, &sum, Some("x"), None, &http, &|_| {})
                .unwrap();
        assert_eq!(stored.manifest.arch, "resnet50");
        let err = crate::url::pull_url_with(
            &s.store(),
            &parsed,
            &sum,
            Some("z"),
            Some("resnet18"),
            &http,
            &|_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
        // The verified download was kept for the next try, which uses it.
        let downloads = s.dir.path().join("fovea/downloads");
        assert!(downloads.join(&sha).is_file());
        let requests = s.hub.log().len();
        crate::url::pull_url_with(
            &s.store(),
            &parsed,
            &sum,
            Some("z"),
            Some("resnet50"),
            &http,
            &|_| {},
        )
        .unwrap();
        assert_eq!(s.hub.log().len(), requests);
        assert_eq!(fs::read_dir(&downloads).unwrap().count(), 0);

        // The wrong sum: refused, nothing stored, nothing kept.
        let wrong = sha256_hex(b"other");
        let err = crate::url::pull_url_with(
            &s.store(),
            &parsed,
            &wrong,
            Some("y"),
            Some("resnet50"),
            &http,
            &|_| {},
        )
        .unwrap_err();
        assert!(matches!(err, PullError::Checksum { .. }), "{err}");
        assert!(s.store().get("y").unwrap().is_none());
        assert_eq!(
            fs::read_dir(s.dir.path().join("fovea/downloads"))
                .unwrap()
                .count(),
            0
        );

        // Spelling of the spec.
        assert!(crate::url::parse_url_spec(&url, None)
            .unwrap_err()
            .to_string()
            .contains("--sha256"));
        assert!(crate::url::parse_url_spec(&format!("{url}#sha256={sha}"), Some(&wrong)).is_err());
        assert!(crate::url::parse_url_spec("ftp://x/y", Some(&sha)).is_err());
        assert!(crate::url::parse_url_spec(&url, Some("abc")).is_err());
        assert_eq!(
            crate::url::parse_url_spec(&url, Some(&sha.to_uppercase()))
                .unwrap()
                .1,
            sha
        );
        let missing = format!("{}/files/none.pth", s.hub.storage);
        let err = crate::url::pull_url_with(
            &s.store(),
            &Url::parse(&missing).unwrap(),
            &sha,
            None,
            None,
            &http,
            &|_| {},
        )
        .unwrap_err();
        assert!(matches!(err, PullError::Http { status: 404, .. }), "{err}");
    }
}
