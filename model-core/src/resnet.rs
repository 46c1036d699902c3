//! ResNet 18/34/50/101/152 in the torchvision / timm checkpoint layout
//! (`conv1`, `bn1`, `layerN.M.conv1/bn1/...`, `layerN.M.downsample.0/1`, `fc`).
//!
//! The block type, the number of blocks per stage, the widths and the class
//! count are all read from the weights, so narrow or re-headed variants load
//! as well as the standard ones. Bottleneck blocks put the stride on the 3x3
//! convolution (ResNet v1.5, as torchvision and timm do).

use candle_core::{Module, Result, Tensor};

use crate::layers::{global_avg_pool, max_pool2d, Activation, Conv2d, ConvSpec, Linear, Placement};
use crate::model_error::ModelError;
use crate::weight_map::{child_indices, dim_of, Shapes, WeightMap};

/// torchvision's and timm's batch-norm epsilon (PyTorch's default).
const BN_EPS: f64 = 1e-5;
/// Stage strides: the first stage follows the stem's max pool at full rate.
const STAGE_STRIDES: [usize; 4] = [1, 2, 2, 2];
pub const LAYOUT: &str = "torchvision/timm";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet 18/34).
    Basic,
    /// 1x1 reduce, 3x3, 1x1 expand (ResNet 50/101/152).
    Bottleneck,
}

/// The shape of one stage, as read from the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageConfig {
    pub blocks: usize,
    /// Width inside the blocks (`conv1`'s output).
    pub planes: usize,
    /// Width of the blocks' output.
    pub out: usize,
}

/// Everything about a ResNet checkpoint's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetConfig {
    pub block: BlockKind,
    pub stem_width: usize,
    pub stages: Vec<StageConfig>,
    pub num_classes: usize,
}

/// Does this checkpoint look like a torchvision/timm ResNet? Loose on
/// purpose: a ResNet with a few keys missing should be reported as such,
/// with the missing keys named, not as an unknown layout.
pub fn matches(shapes: &Shapes) -> bool {
    let any = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    any("layer1.0.") && any("layer4.") && any("fc.")
}

/// The first of `keys` present in the checkpoint, dimension `i`.
fn first_dim(shapes: &Shapes, keys: &[String], i: usize) -> Option<usize> {
    keys.iter().find_map(|k| dim_of(shapes, k, i))
}

fn unreadable(what: &str, keys: &[String]) -> ModelError {
    ModelError::UnknownLayout {
        reason: format!("cannot read the {what} of a ResNet: none of {keys:?} is present"),
        keys: String::new(),
    }
}

impl ResNetConfig {
    /// Reads the architecture from the checkpoint's key names and shapes.
    pub fn detect(shapes: &Shapes) -> std::result::Result<Self, ModelError> {
        let mut config = Self::detect_backbone(shapes)?;
        config.num_classes = first_dim(shapes, &["fc.weight".into(), "fc.bias".into()], 0)
            .ok_or_else(|| unreadable("class count", &["fc.weight".into(), "fc.bias".into()]))?;
        Ok(config)
    }

    /// The stem and stages only (a detector's backbone has no `fc`);
    /// `num_classes` is 0.
    pub fn detect_backbone(shapes: &Shapes) -> std::result::Result<Self, ModelError> {
        let block = if shapes.contains_key("layer1.0.conv3.weight") {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        let width = |what: &str, keys: Vec<String>| {
            first_dim(shapes, &keys, 0).ok_or_else(|| unreadable(what, &keys))
        };
        let stem_width = width(
            "stem width",
            vec!["conv1.weight".into(), "bn1.weight".into()],
        )?;
        let last = match block {
            BlockKind::Basic => "2",
            BlockKind::Bottleneck => "3",
        };
        let mut stages = Vec::new();
        for s in 1..=STAGE_STRIDES.len() {
            let blocks = child_indices(shapes, &format!("layer{s}"));
            if blocks.is_empty() {
                return Err(unreadable(
                    &format!("stage {s}"),
                    &[format!("layer{s}.0.*")],
                ));
            }
            let p = format!("layer{s}.0");
            stages.push(StageConfig {
                // Counted as the highest index + 1 so that a missing block is
                // reported as missing keys rather than silently skipped.
                blocks: blocks.iter().max().map_or(0, |m| m + 1),
                planes: width(
                    "width",
                    vec![format!("{p}.conv1.weight"), format!("{p}.bn1.weight")],
                )?,
                out: width(
                    "output width",
                    vec![
                        format!("{p}.conv{last}.weight"),
                        format!("{p}.bn{last}.weight"),
                    ],
                )?,
            });
        }
        Ok(Self {
            block,
            stem_width,
            stages,
            num_classes: 0,
        })
    }

    /// `resnet18` ... `resnet152` from the block type and counts, else `resnet-custom`.
    pub fn variant(&self) -> &'static str {
        let counts: Vec<usize> = self.stages.iter().map(|s| s.blocks).collect();
        match (self.block, counts.as_slice()) {
            (BlockKind::Basic, [2, 2, 2, 2]) => "resnet18",
            (BlockKind::Basic, [3, 4, 6, 3]) => "resnet34",
            (BlockKind::Bottleneck, [3, 4, 6, 3]) => "resnet50",
            (BlockKind::Bottleneck, [3, 4, 23, 3]) => "resnet101",
            (BlockKind::Bottleneck, [3, 8, 36, 3]) => "resnet152",
            _ => "resnet-custom",
        }
    }
}

/// The architecture names this module answers to.
pub fn is_known_name(name: &str) -> bool {
    matches!(
        name,
        "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152"
    )
}

#[derive(Debug, Clone)]
struct Block {
    /// `conv1`..`conv3` (two for Basic), batch norm folded; all but the last with ReLU.
    convs: Vec<Conv2d>,
    downsample: Option<Conv2d>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn load(
        wm: &WeightMap,
        prefix: &str,
        kind: BlockKind,
        in_ch: usize,
        stage: &StageConfig,
        stride: usize,
        p: &Placement,
    ) -> Result<Self> {
        let (planes, out) = (stage.planes, stage.out);
        // (in, out, kernel, stride) per convolution.
        let geometry: Vec<(usize, usize, usize, usize)> = match kind {
            BlockKind::Basic => vec![(in_ch, planes, 3, stride), (planes, out, 3, 1)],
            BlockKind::Bottleneck => vec![
                (in_ch, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, out, 1, 1),
            ],
        };
        // Every convolution ends in a ReLU; the last one's comes after the
        // shortcut is added (`Conv2d::forward_add`).
        let act = Activation::Relu;
        let convs = geometry
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                let (conv, bn) = (
                    format!("{prefix}.conv{}", i + 1),
                    format!("{prefix}.bn{}", i + 1),
                );
                Conv2d::load_bn(wm, &conv, &bn, ConvSpec::new(ci, co, k, s), BN_EPS, act, p)
            })
            .collect::<Result<Vec<_>>>()?;
        let ds = format!("{prefix}.downsample");
        let needs_projection = stride != 1 || in_ch != out;
        let downsample = if needs_projection || wm.contains(&format!("{ds}.0.weight")) {
            let spec = ConvSpec::new(in_ch, out, 1, stride);
            let (conv, bn) = (format!("{ds}.0"), format!("{ds}.1"));
            Some(Conv2d::load_bn(
                wm,
                &conv,
                &bn,
                spec,
                BN_EPS,
                Activation::None,
                p,
            )?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        let (last, first) = self.convs.split_last().expect("a block has convolutions");
        let mut y = x.clone();
        for conv in first {
            y = conv.forward(&y)?;
        }
        // The last convolution adds the shortcut and applies the block's
        // ReLU in its own output pass.
        last.forward_add(&y, &shortcut)
    }
}

/// A loaded ResNet classifier.
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: Conv2d,
    blocks: Vec<Block>,
    /// The classifier; `None` for a backbone.
    fc: Option<Linear>,
}

impl ResNet {
    /// Builds the network from the checkpoint; problems with individual keys
    /// are recorded in `wm` for its `finish`.
    pub fn load(wm: &WeightMap, config: ResNetConfig, p: &Placement) -> Result<Self> {
        Self::load_at(wm, config, "", true, p)
    }

    /// The stem and stages under `prefix` (e.g. a detector's
    /// `model.backbone.conv_encoder.model.`), without a classifier.
    pub fn load_backbone(
        wm: &WeightMap,
        config: ResNetConfig,
        prefix: &str,
        p: &Placement,
    ) -> Result<Self> {
        Self::load_at(wm, config, prefix, false, p)
    }

    fn load_at(
        wm: &WeightMap,
        config: ResNetConfig,
        prefix: &str,
        with_fc: bool,
        p: &Placement,
    ) -> Result<Self> {
        let stem_spec = ConvSpec::new(3, config.stem_width, 7, 2);
        let (conv1, bn1) = (format!("{prefix}conv1"), format!("{prefix}bn1"));
        let stem = Conv2d::load_bn(wm, &conv1, &bn1, stem_spec, BN_EPS, Activation::Relu, p)?;
        let mut blocks = Vec::new();
        let mut in_ch = config.stem_width;
        for (s, stage) in config.stages.iter().enumerate() {
            for m in 0..stage.blocks {
                let stride = if m == 0 { STAGE_STRIDES[s] } else { 1 };
                let block = format!("{prefix}layer{}.{m}", s + 1);
                blocks.push(Block::load(
                    wm,
                    &block,
                    config.block,
                    in_ch,
                    stage,
                    stride,
                    p,
                )?);
                in_ch = stage.out;
            }
        }
        let fc = if with_fc {
            Some(Linear::load(
                wm,
                &format!("{prefix}fc"),
                in_ch,
                config.num_classes,
                p,
            )?)
        } else {
            None
        };
        Ok(Self {
            config,
            stem,
            blocks,
            fc,
        })
    }

    /// The last stage's feature map, `[B, C, H/32, W/32]` (rounded up).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.stem.forward(x)?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }
}

impl Module for ResNet {
    /// `[B, 3, H, W]` -> logits `[B, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.features(x)?;
        match &self.fc {
            Some(fc) => fc.forward(&global_avg_pool(&features)?),
            None => candle_core::bail!("a ResNet backbone has no classifier"),
        }
    }
}
