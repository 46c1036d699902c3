//! The server-facing image classifier: loads a checkpoint in any supported
//! layout (detected from its keys, or named), runs `[B, 3, H, W]` pixel
//! batches to `[B, classes]` logits, and says what it is.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};

use crate::efficientnet::{
    self, ArchName, Conventions, EffLayout, EfficientNet, EfficientNetConfig,
};
use crate::layers::Placement;
pub use crate::model_error::ModelError;
use crate::resnet::{self, ResNet, ResNetConfig};
use crate::vit::{self, Vit, VitConfig, VitLayout};
use crate::weight_map::{Shapes, WeightMap};

/// What the weights are, before anything is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedArch {
    /// `resnet`, `efficientnet` or `vit`.
    pub family: &'static str,
    /// `resnet50`, `tf_efficientnet_lite0`, `efficientnet_b-custom`, ...
    pub variant: String,
    /// `torchvision/timm`, `timm`, `lukemelas` or `huggingface`.
    pub layout: &'static str,
    pub num_classes: usize,
}

/// What a loaded classifier is (for `/v1/models`, metrics labels, logs).
#[derive(Debug, Clone)]
pub struct ClassifierInfo {
    pub family: &'static str,
    pub variant: String,
    pub layout: &'static str,
    pub num_classes: usize,
    /// The resolution the variant was trained at (square).
    pub default_input_size: usize,
    pub device: Device,
    pub dtype: DType,
}

/// A parsed `arch` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requested {
    ResNet(String),
    EfficientNet(ArchName),
    Vit(String),
}

/// The architecture names `load` accepts (besides `-` for `_` and timm tags).
pub const KNOWN_ARCHS: &str = "resnet18, resnet34, resnet50, resnet101, resnet152, \
     efficientnet_b0..b7, tf_efficientnet_b0..b7, efficientnet_lite0..4, tf_efficientnet_lite0..4, \
     vit_{tiny,small,base,large}_patch{16,32}_{224,384}";

/// Lower case, `-` as `_`, without a `timm/` prefix or a `.tag` suffix
/// (`timm/resnet50.a1_in1k` -> `resnet50`, `efficientnet-lite0` -> `efficientnet_lite0`).
fn normalise_name(name: &str) -> String {
    let name = name.trim().to_ascii_lowercase().replace('-', "_");
    let name = name.strip_prefix("timm/").unwrap_or(&name);
    name.split('.').next().unwrap_or_default().to_string()
}

fn parse_arch(name: &str) -> Result<Requested, ModelError> {
    let norm = normalise_name(name);
    if resnet::is_known_name(&norm) {
        Ok(Requested::ResNet(norm))
    } else if let Some(a) = ArchName::parse(&norm) {
        Ok(Requested::EfficientNet(a))
    } else if vit::is_known_name(&norm) {
        Ok(Requested::Vit(norm))
    } else {
        Err(ModelError::UnknownArch {
            name: name.to_string(),
            known: KNOWN_ARCHS.to_string(),
        })
    }
}

/// Everything needed to build the model, decided from the keys and the name.
enum Plan {
    ResNet(ResNetConfig, String),
    EfficientNet(EfficientNetConfig, Conventions, String),
    Vit(VitConfig, String),
}

impl Plan {
    fn make(shapes: &Shapes, arch: Option<&str>) -> Result<Self, ModelError> {
        let requested = arch.map(parse_arch).transpose()?;
        if resnet::matches(shapes) {
            let config = ResNetConfig::detect(shapes)?;
            let detected = config.variant();
            let variant = match requested {
                None => detected.to_string(),
                Some(Requested::ResNet(name)) => {
                    // A standard variant other than the one asked for is a mistake;
                    // a custom one (narrow, re-headed) takes the name it is given.
                    if detected != "resnet-custom" && detected != name {
                        return Err(mismatch(arch, detected));
                    }
                    name
                }
                Some(Requested::EfficientNet(_) | Requested::Vit(_)) => {
                    return Err(mismatch(arch, "a ResNet"))
                }
            };
            return Ok(Self::ResNet(config, variant));
        }
        if let Some(layout) = VitLayout::detect(shapes) {
            let name = match &requested {
                None => None,
                Some(Requested::Vit(name)) => Some(name.as_str()),
                Some(_) => return Err(mismatch(arch, "a ViT")),
            };
            let config = VitConfig::detect(shapes, layout, name)?;
            let detected = config.variant();
            let variant = match name {
                // A custom size takes the name it was given (which set its heads).
                Some(name) if detected == "vit-custom" => name.to_string(),
                _ => detected,
            };
            return Ok(Self::Vit(config, variant));
        }
        let Some(layout) = EffLayout::detect(shapes) else {
            return Err(ModelError::unknown_layout(
                "expected a torchvision/timm ResNet (`layer1.0.conv1.weight`, `fc.weight`), a timm EfficientNet \
                 (`conv_stem.weight`, `blocks.0.0.*`), a lukemelas EfficientNet (`_conv_stem.weight`, `_blocks.0.*`) \
             or a Hugging Face / timm ViT (`vit.embeddings.*` / `patch_embed.proj.weight`, `blocks.0.attn.*`)",
                shapes,
            ));
        };
        let config = EfficientNetConfig::detect(shapes, layout)?;
        let (tf, kind, variant) = match requested {
            None => {
                let tf = config.guess_tf();
                (tf, config.kind(), config.detected_name(tf))
            }
            Some(Requested::EfficientNet(name)) => {
                // lukemelas only implements TF 'same' padding, whatever the name says.
                let tf = name.tf || layout == EffLayout::Lukemelas;
                let detected = config.variant_number();
                let canonical = ArchName { tf, ..name }.canonical();
                if detected.is_some()
                    && (detected != Some(name.number) || config.kind() != name.kind)
                {
                    return Err(mismatch(arch, &config.detected_name(tf)));
                }
                (tf, name.kind, canonical)
            }
            Some(Requested::ResNet(_) | Requested::Vit(_)) => {
                return Err(mismatch(arch, "an EfficientNet"))
            }
        };
        Ok(Self::EfficientNet(
            config,
            Conventions::new(tf, kind),
            variant,
        ))
    }

    /// What the mismatch report calls the layout.
    fn describe(&self) -> String {
        match self {
            Self::ResNet(_, v) => format!("{} resnet ({v})", resnet::LAYOUT),
            Self::EfficientNet(c, _, v) => format!("{} efficientnet ({v})", c.layout.name()),
            Self::Vit(c, v) => format!("{} vit ({v})", c.layout.name()),
        }
    }

    fn detected(&self) -> DetectedArch {
        match self {
            Self::ResNet(c, v) => DetectedArch {
                family: "resnet",
                variant: v.clone(),
                layout: resnet::LAYOUT,
                num_classes: c.num_classes,
            },
            Self::EfficientNet(c, _, v) => DetectedArch {
                family: "efficientnet",
                variant: v.clone(),
                layout: c.layout.name(),
                num_classes: c.num_classes,
            },
            Self::Vit(c, v) => DetectedArch {
                family: "vit",
                variant: v.clone(),
                layout: c.layout.name(),
                num_classes: c.num_classes,
            },
        }
    }

    fn input_size(&self) -> usize {
        match self {
            Self::ResNet(..) => 224,
            Self::EfficientNet(c, _, v) => {
                let number = ArchName::parse(v).map(|a| a.number);
                efficientnet::input_size(c.kind(), number)
            }
            Self::Vit(c, _) => c.input_size(),
        }
    }
}

fn mismatch(requested: Option<&str>, detected: &str) -> ModelError {
    ModelError::ArchMismatch {
        requested: requested.unwrap_or_default().to_string(),
        detected: detected.to_string(),
    }
}

/// Says what a checkpoint is from its key names and shapes, optionally
/// checked against an architecture name.
pub fn detect_architecture(
    shapes: &Shapes,
    arch: Option<&str>,
) -> Result<DetectedArch, ModelError> {
    Ok(Plan::make(shapes, arch)?.detected())
}

#[derive(Debug, Clone)]
enum Inner {
    ResNet(ResNet),
    EfficientNet(EfficientNet),
    Vit(Vit),
}

/// A loaded image classifier on a device.
#[derive(Debug, Clone)]
pub struct Classifier {
    inner: Inner,
    info: ClassifierInfo,
}

impl Classifier {
    /// Loads a checkpoint (original key names, any float dtype) onto
    /// `device` in `dtype`. `arch` names the architecture when the keys
    /// cannot tell (e.g. `tf_efficientnet_b0` vs `efficientnet_b0`).
    ///
    /// Weights that do not fit are reported all at once: every missing,
    /// unexpected and wrongly shaped key.
    pub fn load(
        tensors: HashMap<String, Tensor>,
        arch: Option<&str>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let wm = WeightMap::new(tensors);
        let plan = Plan::make(&wm.shapes(), arch)?;
        let placement = Placement::new(device, dtype);
        let detected = plan.detected();
        let input_size = plan.input_size();
        let layout = plan.describe();
        let inner = match plan {
            Plan::ResNet(config, _) => Inner::ResNet(ResNet::load(&wm, config, &placement)?),
            Plan::EfficientNet(config, conv, _) => {
                Inner::EfficientNet(EfficientNet::load(&wm, config, conv, &placement)?)
            }
            Plan::Vit(config, _) => Inner::Vit(Vit::load(&wm, config, &placement)?),
        };
        wm.finish(&layout)?;
        Ok(Self {
            inner,
            info: ClassifierInfo {
                family: detected.family,
                variant: detected.variant,
                layout: detected.layout,
                num_classes: detected.num_classes,
                default_input_size: input_size,
                device: device.clone(),
                dtype,
            },
        })
    }

    /// `pixel_values` `[B, 3, H, W]` (any size; moved to the model's device
    /// and dtype if needed) -> logits `[B, classes]` in the model's dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, _, _) = pixel_values.dims4()?;
        if c != 3 {
            candle_core::bail!(
                "expected pixel_values [B, 3, H, W], got {:?}",
                pixel_values.dims()
            );
        }
        let x = pixel_values
            .to_device(&self.info.device)?
            .to_dtype(self.info.dtype)?;
        match &self.inner {
            Inner::ResNet(m) => m.forward(&x),
            Inner::EfficientNet(m) => m.forward(&x),
            Inner::Vit(m) => m.forward(&x),
        }
    }

    pub fn info(&self) -> &ClassifierInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        assert_eq!(normalise_name("timm/ResNet50.a1_in1k"), "resnet50");
        assert_eq!(normalise_name("efficientnet-lite0"), "efficientnet_lite0");
        assert!(matches!(
            parse_arch("resnet-50"),
            Err(ModelError::UnknownArch { .. })
        ));
        assert!(matches!(
            parse_arch("tf_efficientnet_b3"),
            Ok(Requested::EfficientNet(_))
        ));
    }

    #[test]
    fn unknown_layout_lists_keys() {
        let shapes: Shapes = [("model.0.conv.weight".to_string(), vec![16, 3, 3, 3])]
            .into_iter()
            .collect();
        let err = detect_architecture(&shapes, None).unwrap_err().to_string();
        assert!(err.contains("model.0.conv.weight"), "{err}");
    }
}
