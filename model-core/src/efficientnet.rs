//! EfficientNet B0-B7 and Lite0-4 in two checkpoint layouts:
//!
//! - timm: `conv_stem`, `bn1`, `blocks.{stage}.{block}.*`, `conv_head`, `bn2`,
//!   `classifier`, with DepthwiseSeparable blocks (`conv_dw`, `bn1`, `se.*`,
//!   `conv_pw`, `bn2`) and InvertedResidual blocks (`conv_pw`, `bn1`,
//!   `conv_dw`, `bn2`, `se.*`, `conv_pwl`, `bn3`);
//! - lukemelas / EfficientNet-PyTorch (and its Lite fork): `_conv_stem`,
//!   `_bn0`, `_blocks.{n}.*` numbered flat across the stages, `_conv_head`,
//!   `_bn1`, `_fc`.
//!
//! Kernel sizes, widths, expansion, squeeze-excitation and block counts come
//! from the weights. What the keys cannot say (padding scheme, batch-norm
//! epsilon, activation) comes from [`Conventions`], chosen by the
//! architecture name or guessed from the layout.

use candle_core::{Module, Result, Tensor};

use crate::layers::{
    global_avg_pool, symmetric_pad, Activation, Conv2d, ConvSpec, Linear, Padding, Placement,
};
use crate::model_error::ModelError;
use crate::weight_map::{child_indices, dim_of, Shapes, WeightMap};

/// The stride of each of the seven stages' first block.
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// What a checkpoint's keys look like.
///
/// The two differ in one behaviour besides the names: timm adds the
/// residual whenever a block keeps the stride at 1 and the width unchanged;
/// lukemelas never does for the first block of a stage (its test compares
/// the stage's stride, stored as a list, with the integer 1), which matters
/// for narrow variants whose first stage keeps the stem's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffLayout {
    Timm,
    Lukemelas,
}

impl EffLayout {
    pub fn detect(shapes: &Shapes) -> Option<Self> {
        if shapes.contains_key("_conv_stem.weight")
            || shapes.contains_key("_blocks.0._depthwise_conv.weight")
        {
            Some(Self::Lukemelas)
        } else if shapes.contains_key("conv_stem.weight")
            || shapes.contains_key("blocks.0.0.conv_dw.weight")
        {
            Some(Self::Timm)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Timm => "timm",
            Self::Lukemelas => "lukemelas",
        }
    }

    /// (conv, batch norm) of the stem and of the head, and the classifier.
    fn top_keys(
        self,
    ) -> (
        (&'static str, &'static str),
        (&'static str, &'static str),
        &'static str,
    ) {
        match self {
            Self::Timm => (("conv_stem", "bn1"), ("conv_head", "bn2"), "classifier"),
            Self::Lukemelas => (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), "_fc"),
        }
    }
}

/// The key names inside one block: (conv, batch norm) per convolution.
struct BlockKeys {
    expand: (&'static str, &'static str),
    depthwise: (&'static str, &'static str),
    se: (&'static str, &'static str),
    project: (&'static str, &'static str),
}

impl BlockKeys {
    fn of(layout: EffLayout, expands: bool) -> Self {
        match (layout, expands) {
            // timm's DepthwiseSeparable block: no expansion, `conv_pw` projects.
            (EffLayout::Timm, false) => Self {
                expand: ("", ""),
                depthwise: ("conv_dw", "bn1"),
                se: ("se.conv_reduce", "se.conv_expand"),
                project: ("conv_pw", "bn2"),
            },
            // timm's InvertedResidual: `conv_pw` expands, `conv_pwl` projects.
            (EffLayout::Timm, true) => Self {
                expand: ("conv_pw", "bn1"),
                depthwise: ("conv_dw", "bn2"),
                se: ("se.conv_reduce", "se.conv_expand"),
                project: ("conv_pwl", "bn3"),
            },
            (EffLayout::Lukemelas, _) => Self {
                expand: ("_expand_conv", "_bn0"),
                depthwise: ("_depthwise_conv", "_bn1"),
                se: ("_se_reduce", "_se_expand"),
                project: ("_project_conv", "_bn2"),
            },
        }
    }
}

/// The two EfficientNet families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// B0-B7: squeeze-excitation, SiLU.
    B,
    /// Lite0-4: no squeeze-excitation, ReLU6.
    Lite,
}

/// What the weights cannot tell: padding, batch-norm epsilon, activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conventions {
    /// TF 'same' padding (the `tf_` models and lukemelas) or symmetric (timm).
    pub same_padding: bool,
    pub bn_eps: f64,
    pub act: Activation,
}

impl Conventions {
    /// `tf` selects TF 'same' padding with eps 1e-3 (timm's `tf_` models and
    /// every lukemelas model); otherwise symmetric padding with eps 1e-5.
    pub fn new(tf: bool, kind: Kind) -> Self {
        Self {
            same_padding: tf,
            bn_eps: if tf { 1e-3 } else { 1e-5 },
            act: match kind {
                Kind::B => Activation::Silu,
                Kind::Lite => Activation::Relu6,
            },
        }
    }

    fn padding(&self, kernel: usize, stride: usize) -> Padding {
        if self.same_padding {
            Padding::TfSame
        } else {
            Padding::Symmetric(symmetric_pad(kernel, stride, 1))
        }
    }
}

/// A parsed architecture name: `[tf_]efficientnet_{bN|liteN}`, `-` or `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchName {
    pub tf: bool,
    pub kind: Kind,
    pub number: usize,
}

impl ArchName {
    /// Parses a normalised (lowercase, `_`-separated) name.
    pub fn parse(name: &str) -> Option<Self> {
        let (tf, rest) = match name.strip_prefix("tf_") {
            Some(r) => (true, r),
            None => (false, name),
        };
        let rest = rest.strip_prefix("efficientnet_")?;
        let (kind, digits, max) = if let Some(d) = rest.strip_prefix("lite") {
            (Kind::Lite, d, 4)
        } else {
            (Kind::B, rest.strip_prefix('b')?, 7)
        };
        let number: usize = digits.parse().ok().filter(|n| *n <= max)?;
        Some(Self { tf, kind, number })
    }

    pub fn canonical(&self) -> String {
        variant_name(self.tf, self.kind, Some(self.number))
    }
}

/// `tf_efficientnet_lite0`, `efficientnet_b3`, `efficientnet_b-custom`...
fn variant_name(tf: bool, kind: Kind, number: Option<usize>) -> String {
    let kind = match kind {
        Kind::B => "b",
        Kind::Lite => "lite",
    };
    let number = number.map_or_else(|| "-custom".to_string(), |n| n.to_string());
    format!("{}efficientnet_{kind}{number}", if tf { "tf_" } else { "" })
}

/// The default input resolution of a variant.
pub fn input_size(kind: Kind, number: Option<usize>) -> usize {
    const B: [usize; 8] = [224, 240, 260, 300, 380, 456, 528, 600];
    const LITE: [usize; 5] = [224, 240, 260, 280, 300];
    let table: &[usize] = match kind {
        Kind::B => &B,
        Kind::Lite => &LITE,
    };
    number.and_then(|n| table.get(n).copied()).unwrap_or(224)
}

/// (stem width, head width, output width per stage, blocks per stage) of
/// the standard variants, as timm and lukemelas build them.
type Fingerprint = (usize, usize, [usize; 7], [usize; 7]);
const B_VARIANTS: [Fingerprint; 8] = [
    (
        32,
        1280,
        [16, 24, 40, 80, 112, 192, 320],
        [1, 2, 2, 3, 3, 4, 1],
    ),
    (
        32,
        1280,
        [16, 24, 40, 80, 112, 192, 320],
        [2, 3, 3, 4, 4, 5, 2],
    ),
    (
        32,
        1408,
        [16, 24, 48, 88, 120, 208, 352],
        [2, 3, 3, 4, 4, 5, 2],
    ),
    (
        40,
        1536,
        [24, 32, 48, 96, 136, 232, 384],
        [2, 3, 3, 5, 5, 6, 2],
    ),
    (
        48,
        1792,
        [24, 32, 56, 112, 160, 272, 448],
        [2, 4, 4, 6, 6, 8, 2],
    ),
    (
        48,
        2048,
        [24, 40, 64, 128, 176, 304, 512],
        [3, 5, 5, 7, 7, 9, 3],
    ),
    (
        56,
        2304,
        [32, 40, 72, 144, 200, 344, 576],
        [3, 6, 6, 8, 8, 11, 3],
    ),
    (
        64,
        2560,
        [32, 48, 80, 160, 224, 384, 640],
        [4, 7, 7, 10, 10, 13, 4],
    ),
];
/// Lite keeps the stem, the head and the first and last stages' depth fixed.
const LITE_VARIANTS: [Fingerprint; 5] = [
    (
        32,
        1280,
        [16, 24, 40, 80, 112, 192, 320],
        [1, 2, 2, 3, 3, 4, 1],
    ),
    (
        32,
        1280,
        [16, 24, 40, 80, 112, 192, 320],
        [1, 3, 3, 4, 4, 5, 1],
    ),
    (
        32,
        1280,
        [16, 24, 48, 88, 120, 208, 352],
        [1, 3, 3, 4, 4, 5, 1],
    ),
    (
        32,
        1280,
        [24, 32, 48, 96, 136, 232, 384],
        [1, 3, 3, 5, 5, 6, 1],
    ),
    (
        32,
        1280,
        [24, 32, 56, 112, 160, 272, 448],
        [1, 4, 4, 6, 6, 8, 1],
    ),
];

/// One mobile inverted bottleneck block, as read from the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Key prefix, e.g. `blocks.3.1` or `_blocks.7`.
    pub prefix: String,
    pub in_ch: usize,
    /// Width after the expansion (`in_ch` when there is none).
    pub mid_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Whether there is a 1x1 expansion convolution.
    pub expands: bool,
    /// Squeeze-excitation's reduced width, if the block has one.
    pub se: Option<usize>,
    /// Whether the input is added to the output.
    pub residual: bool,
}

/// Everything about an EfficientNet checkpoint's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfficientNetConfig {
    pub layout: EffLayout,
    pub stem: usize,
    pub stages: Vec<Vec<BlockConfig>>,
    pub head: usize,
    pub num_classes: usize,
}

fn unreadable(what: &str, keys: &[String]) -> ModelError {
    ModelError::UnknownLayout {
        reason: format!("cannot read the {what} of an EfficientNet: none of {keys:?} is present"),
        keys: String::new(),
    }
}

/// Dimension `i` of the first of `convs` weight / batch-norm weight present.
fn read_dim(
    shapes: &Shapes,
    what: &str,
    keys: &[String],
    i: usize,
) -> std::result::Result<usize, ModelError> {
    keys.iter()
        .find_map(|k| dim_of(shapes, k, i))
        .ok_or_else(|| unreadable(what, keys))
}

/// `{p}.{conv}.weight` then `{p}.{bn}.weight`: the output width of a conv+bn.
fn conv_bn_keys(p: &str, (conv, bn): (&str, &str)) -> Vec<String> {
    vec![format!("{p}.{conv}.weight"), format!("{p}.{bn}.weight")]
}

/// Reads one block's geometry (everything but the stride).
fn read_block(
    shapes: &Shapes,
    layout: EffLayout,
    prefix: String,
    in_ch: usize,
) -> std::result::Result<BlockConfig, ModelError> {
    let has = |k: &str| shapes.contains_key(&format!("{prefix}.{k}"));
    let expands = match layout {
        EffLayout::Timm => has("conv_pwl.weight") || has("bn3.weight"),
        EffLayout::Lukemelas => has("_expand_conv.weight") || has("_bn0.weight"),
    };
    let keys = BlockKeys::of(layout, expands);
    let mid_ch = if expands {
        read_dim(
            shapes,
            "expansion width",
            &conv_bn_keys(&prefix, keys.expand),
            0,
        )?
    } else {
        in_ch
    };
    let dw = format!("{prefix}.{}.weight", keys.depthwise.0);
    let kernel = read_dim(shapes, "kernel size", &[dw], 2)?;
    let out_ch = read_dim(
        shapes,
        "output width",
        &conv_bn_keys(&prefix, keys.project),
        0,
    )?;
    let se_keys = [
        format!("{prefix}.{}.weight", keys.se.0),
        format!("{prefix}.{}.bias", keys.se.0),
    ];
    let se = se_keys.iter().find_map(|k| dim_of(shapes, k, 0));
    Ok(BlockConfig {
        prefix,
        in_ch,
        mid_ch,
        out_ch,
        kernel,
        stride: 1,
        expands,
        se,
        residual: false,
    })
}

/// A block starts a new stage when its output width, kernel size or
/// expansion differs from the block before (within a stage all three stay).
fn starts_stage(prev: &BlockConfig, b: &BlockConfig) -> bool {
    prev.out_ch != b.out_ch || prev.kernel != b.kernel || prev.expands != b.expands
}

impl EfficientNetConfig {
    pub fn detect(shapes: &Shapes, layout: EffLayout) -> std::result::Result<Self, ModelError> {
        let ((stem_conv, stem_bn), (head_conv, head_bn), fc) = layout.top_keys();
        let stem = read_dim(
            shapes,
            "stem width",
            &[format!("{stem_conv}.weight"), format!("{stem_bn}.weight")],
            0,
        )?;
        let mut stages = match layout {
            EffLayout::Timm => Self::timm_stages(shapes, stem)?,
            EffLayout::Lukemelas => Self::lukemelas_stages(shapes, stem)?,
        };
        if stages.len() != STAGE_STRIDES.len() {
            return Err(ModelError::UnknownLayout {
                reason: format!(
                    "an EfficientNet has {} stages, these weights have {}",
                    STAGE_STRIDES.len(),
                    stages.len()
                ),
                keys: String::new(),
            });
        }
        for (stage, stride) in stages.iter_mut().zip(STAGE_STRIDES) {
            stage[0].stride = stride;
            for (i, b) in stage.iter_mut().enumerate() {
                b.residual =
                    b.stride == 1 && b.in_ch == b.out_ch && (i > 0 || layout == EffLayout::Timm);
            }
        }
        let head = read_dim(
            shapes,
            "head width",
            &[format!("{head_conv}.weight"), format!("{head_bn}.weight")],
            0,
        )?;
        let num_classes = read_dim(
            shapes,
            "class count",
            &[format!("{fc}.weight"), format!("{fc}.bias")],
            0,
        )?;
        Ok(Self {
            layout,
            stem,
            stages,
            head,
            num_classes,
        })
    }

    /// timm numbers stages and blocks: `blocks.{stage}.{block}`.
    fn timm_stages(
        shapes: &Shapes,
        stem: usize,
    ) -> std::result::Result<Vec<Vec<BlockConfig>>, ModelError> {
        let mut in_ch = stem;
        let mut stages = Vec::new();
        for s in child_indices(shapes, "blocks") {
            let mut blocks = Vec::new();
            for b in child_indices(shapes, &format!("blocks.{s}")) {
                let block = read_block(shapes, EffLayout::Timm, format!("blocks.{s}.{b}"), in_ch)?;
                in_ch = block.out_ch;
                blocks.push(block);
            }
            stages.push(blocks);
        }
        Ok(stages)
    }

    /// lukemelas numbers blocks flat: `_blocks.{n}`; stages are recovered
    /// from where the geometry changes.
    fn lukemelas_stages(
        shapes: &Shapes,
        stem: usize,
    ) -> std::result::Result<Vec<Vec<BlockConfig>>, ModelError> {
        let mut in_ch = stem;
        let mut stages: Vec<Vec<BlockConfig>> = Vec::new();
        for n in child_indices(shapes, "_blocks") {
            let block = read_block(shapes, EffLayout::Lukemelas, format!("_blocks.{n}"), in_ch)?;
            in_ch = block.out_ch;
            match stages.last_mut() {
                Some(stage)
                    if !starts_stage(stage.last().expect("stages are never empty"), &block) =>
                {
                    stage.push(block)
                }
                _ => stages.push(vec![block]),
            }
        }
        Ok(stages)
    }

    pub fn has_se(&self) -> bool {
        self.stages.iter().flatten().any(|b| b.se.is_some())
    }

    /// The family the weights look like: squeeze-excitation means B.
    pub fn kind(&self) -> Kind {
        if self.has_se() {
            Kind::B
        } else {
            Kind::Lite
        }
    }

    /// The standard variant number whose widths and depths these are.
    pub fn variant_number(&self) -> Option<usize> {
        let table: &[Fingerprint] = match self.kind() {
            Kind::B => &B_VARIANTS,
            Kind::Lite => &LITE_VARIANTS,
        };
        let outs: Vec<usize> = self.stages.iter().map(|s| s[0].out_ch).collect();
        let counts: Vec<usize> = self.stages.iter().map(Vec::len).collect();
        table.iter().position(|(stem, head, o, c)| {
            *stem == self.stem && *head == self.head && o[..] == outs[..] && c[..] == counts[..]
        })
    }

    /// The name these weights would have under `tf` conventions.
    pub fn detected_name(&self, tf: bool) -> String {
        variant_name(tf, self.kind(), self.variant_number())
    }

    /// Guesses the conventions when no name is given: lukemelas models are
    /// TF ports ('same' padding, eps 1e-3); timm models without SE are the
    /// `tf_efficientnet_lite` ports, with SE timm's own `efficientnet_b`.
    pub fn guess_tf(&self) -> bool {
        match self.layout {
            EffLayout::Lukemelas => true,
            EffLayout::Timm => !self.has_se(),
        }
    }
}

/// Squeeze-excitation: channel gates from the pooled activations. The 1x1
/// convolutions on a 1x1 map are linear layers.
#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce: Linear,
    expand: Linear,
    act: Activation,
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let s = self
            .act
            .apply(&self.reduce.forward(&global_avg_pool(x)?)?)?;
        let gate = candle_nn::ops::sigmoid(&self.expand.forward(&s)?)?;
        x.broadcast_mul(&gate.reshape((b, c, 1, 1))?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    expand: Option<Conv2d>,
    depthwise: Conv2d,
    se: Option<SqueezeExcite>,
    project: Conv2d,
    residual: bool,
}

impl Block {
    fn load(
        wm: &WeightMap,
        cfg: &BlockConfig,
        layout: EffLayout,
        conv: &Conventions,
        p: &Placement,
    ) -> Result<Self> {
        let keys = BlockKeys::of(layout, cfg.expands);
        let pre = &cfg.prefix;
        let conv_bn = |(c, bn): (&str, &str), spec: ConvSpec, act| {
            Conv2d::load_bn(
                wm,
                &format!("{pre}.{c}"),
                &format!("{pre}.{bn}"),
                spec,
                conv.bn_eps,
                act,
                p,
            )
        };
        let expand = if cfg.expands {
            let spec =
                ConvSpec::new(cfg.in_ch, cfg.mid_ch, 1, 1).with_padding(Padding::Symmetric(0));
            Some(conv_bn(keys.expand, spec, conv.act)?)
        } else {
            None
        };
        let dw_spec = ConvSpec::depthwise(cfg.mid_ch, cfg.kernel, cfg.stride)
            .with_padding(conv.padding(cfg.kernel, cfg.stride));
        let depthwise = conv_bn(keys.depthwise, dw_spec, conv.act)?;
        let se = match cfg.se {
            Some(rd) => Some(SqueezeExcite {
                reduce: Linear::load_conv1x1(
                    wm,
                    &format!("{pre}.{}", keys.se.0),
                    cfg.mid_ch,
                    rd,
                    p,
                )?,
                expand: Linear::load_conv1x1(
                    wm,
                    &format!("{pre}.{}", keys.se.1),
                    rd,
                    cfg.mid_ch,
                    p,
                )?,
                act: conv.act,
            }),
            None => None,
        };
        let proj_spec =
            ConvSpec::new(cfg.mid_ch, cfg.out_ch, 1, 1).with_padding(Padding::Symmetric(0));
        let project = conv_bn(keys.project, proj_spec, Activation::None)?;
        Ok(Self {
            expand,
            depthwise,
            se,
            project,
            residual: cfg.residual,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        y = self.depthwise.forward(&y)?;
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        y = self.project.forward(&y)?;
        if self.residual {
            y = (y + x)?;
        }
        Ok(y)
    }
}

/// A loaded EfficientNet classifier.
#[derive(Debug, Clone)]
pub struct EfficientNet {
    config: EfficientNetConfig,
    conventions: Conventions,
    stem: Conv2d,
    blocks: Vec<Block>,
    head: Conv2d,
    classifier: Linear,
}

impl EfficientNet {
    /// Builds the network; problems with individual keys are recorded in
    /// `wm` for its `finish`.
    pub fn load(
        wm: &WeightMap,
        config: EfficientNetConfig,
        conventions: Conventions,
        p: &Placement,
    ) -> Result<Self> {
        let c = &conventions;
        let ((stem_conv, stem_bn), (head_conv, head_bn), fc) = config.layout.top_keys();
        let stem_k = wm
            .shape_of(&format!("{stem_conv}.weight"))
            .and_then(|s| s.get(2).copied())
            .unwrap_or(3);
        let stem_spec = ConvSpec::new(3, config.stem, stem_k, 2).with_padding(c.padding(stem_k, 2));
        let stem = Conv2d::load_bn(wm, stem_conv, stem_bn, stem_spec, c.bn_eps, c.act, p)?;
        let blocks = config
            .stages
            .iter()
            .flatten()
            .map(|b| Block::load(wm, b, config.layout, c, p))
            .collect::<Result<Vec<_>>>()?;
        let last = config
            .stages
            .last()
            .and_then(|s| s.last())
            .map_or(config.stem, |b| b.out_ch);
        let head_spec = ConvSpec::new(last, config.head, 1, 1).with_padding(Padding::Symmetric(0));
        let head = Conv2d::load_bn(wm, head_conv, head_bn, head_spec, c.bn_eps, c.act, p)?;
        let classifier = Linear::load(wm, fc, config.head, config.num_classes, p)?;
        Ok(Self {
            config,
            conventions,
            stem,
            blocks,
            head,
            classifier,
        })
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    pub fn conventions(&self) -> &Conventions {
        &self.conventions
    }
}

impl Module for EfficientNet {
    /// `[B, 3, H, W]` -> logits `[B, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.stem.forward(x)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = self.head.forward(&x)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = ArchName::parse("tf_efficientnet_lite3").unwrap();
        assert_eq!((n.tf, n.kind, n.number), (true, Kind::Lite, 3));
        assert_eq!(
            ArchName::parse("efficientnet_b7").unwrap().canonical(),
            "efficientnet_b7"
        );
        assert!(ArchName::parse("efficientnet_b8").is_none());
        assert!(ArchName::parse("efficientnet_lite5").is_none());
        assert!(ArchName::parse("resnet50").is_none());
        assert_eq!(
            variant_name(true, Kind::B, None),
            "tf_efficientnet_b-custom"
        );
        assert_eq!(input_size(Kind::B, Some(3)), 300);
        assert_eq!(input_size(Kind::Lite, Some(3)), 280);
    }

    #[test]
    fn conventions() {
        let tf_lite = Conventions::new(true, Kind::Lite);
        assert_eq!(
            (tf_lite.same_padding, tf_lite.bn_eps, tf_lite.act),
            (true, 1e-3, Activation::Relu6)
        );
        let b = Conventions::new(false, Kind::B);
        assert_eq!(
            (b.same_padding, b.bn_eps, b.act),
            (false, 1e-5, Activation::Silu)
        );
        assert_eq!(b.padding(5, 2), Padding::Symmetric(2));
    }
}
