//! YOLOv8 and YOLOv5 (v6.0+) object detectors in the Ultralytics checkpoint
//! layout (`model.N.conv/bn`, `model.N.cv1/cv2/cv3/m.K`, the YOLOv8 head at
//! `model.22` with `cv2.L` / `cv3.L` / `dfl.conv`, the YOLOv5 head at
//! `model.24` with `m.L` and the `anchors` buffer).
//!
//! The version comes from the head's keys; every width, the bottleneck
//! counts, the class count, the anchors and the DFL bins are read from the
//! weights, so the n/s/m/l/x scales and custom ones (other widths, depths or
//! class counts) load alike. The topology is the one of Ultralytics'
//! `yolov8.yaml` and the original repository's `yolov5*.yaml` (v6.0+: 6x6
//! stride-2 stem, C3, SPPF). Every batch norm (eps 1e-3, what both code
//! bases set) is folded into its convolution at load time.
//!
//! # Output
//!
//! [`Yolo::forward`] maps `pixel_values` `[B, 3, H, W]` (0..1, H and W
//! multiples of 32) to `[B, 4 + classes, anchors]`, the layout of
//! Ultralytics' YOLOv8 `Detect` in inference: rows 0..4 are the box centre x,
//! y, width and height in input pixels, the other rows the class scores
//! (after the sigmoid). Anchors run level by level (strides 8, 16, 32).
//!
//! - YOLOv8: within a level, row-major cells (y, then x); each box is
//!   decoded from the DFL distances (softmax over `reg_max` bins, the
//!   expectation against the `dfl.conv` weights) around the cell centre
//!   (`x + 0.5`, `y + 0.5`), times the stride. This is exactly
//!   `DetectionModel.eval()(x)[0]`.
//! - YOLOv5: within a level, (anchor, y, x), as the original `Detect`
//!   flattens them; `xy = (2 sigmoid - 0.5 + cell) * stride`,
//!   `wh = (2 sigmoid)^2 * anchor`, with the pixel anchors being the
//!   `anchors` buffer (stored in stride units by v6.0+ checkpoints) times
//!   the stride. The original `Detect` returns `[B, anchors, 5 + classes]`
//!   (`cx, cy, w, h, objectness, class scores`); the output here is derived
//!   from it as `[cx, cy, w, h, objectness * class scores]`, transposed to
//!   the YOLOv8 layout, so one postprocessing serves both versions (the
//!   original NMS multiplies the same way: `conf = obj_conf * cls_conf`).
//!   An `anchor_grid` buffer, which some v6.0 checkpoints carry, holds the
//!   same numbers in pixels; it is accepted and not used (the original code
//!   recomputes it from `anchors`, too).
//!
//! The grid tensors (cell offsets, strides, anchors per output column) depend
//! on the input size only; they are built with tensor ops on first use and
//! kept for the last size seen.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::layers::{
    is_host_f32, max_pool2d, with_host_f32, Activation, Conv2d, ConvSpec, Padding, Placement,
};
pub use crate::model_error::ModelError;
use crate::vmath::{avx2_dispatch, exp};
use crate::weight_map::{child_indices, dim_of, Shapes, WeightMap};

/// The batch-norm epsilon of both Ultralytics code bases (`initialize_weights`).
pub const BN_EPS: f64 = 1e-3;
/// The strides of the three detection levels (P3, P4, P5).
pub const STRIDES: [usize; 3] = [8, 16, 32];
/// Input sides must be multiples of this (the coarsest stride).
pub const STRIDE_MULTIPLE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloVersion {
    /// Anchor-based YOLOv5, v6.0 and later.
    V5,
    /// Anchor-free YOLOv8 with the DFL box head.
    V8,
}

impl YoloVersion {
    /// `yolov5` / `yolov8`.
    pub fn family_name(self) -> &'static str {
        match self {
            Self::V5 => "yolov5",
            Self::V8 => "yolov8",
        }
    }
}

/// What a loaded YOLO model is.
#[derive(Clone, Debug)]
pub struct YoloInfo {
    pub version: YoloVersion,
    /// `yolov8n` ... `yolov8x`, `yolov5n` ... `yolov5x` when the widths and
    /// depths are those of a standard scale, else `yolov8-custom` /
    /// `yolov5-custom`.
    pub variant: String,
    pub num_classes: usize,
    /// `[8, 16, 32]`.
    pub strides: Vec<usize>,
    pub device: Device,
    pub dtype: DType,
}

// ----------------------------------------------------------------------------
// the topologies
// ----------------------------------------------------------------------------

/// One layer of the `model.N` sequence, as the yaml files declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Conv + BN + SiLU with kernel, stride, padding; `width` the yaml's channels.
    Conv {
        k: usize,
        s: usize,
        p: usize,
        width: usize,
    },
    /// YOLOv8's C2f with `repeats` bottlenecks (before depth scaling).
    C2f {
        shortcut: bool,
        width: usize,
        repeats: usize,
    },
    /// YOLOv5's C3.
    C3 {
        shortcut: bool,
        width: usize,
        repeats: usize,
    },
    Sppf {
        width: usize,
    },
    /// Nearest-neighbour upsampling by 2.
    Upsample,
    /// Channel concatenation of the previous layer's output and layer `.0`'s.
    Concat(usize),
}

const fn conv(k: usize, s: usize, width: usize) -> Op {
    Op::Conv {
        k,
        s,
        p: k / 2,
        width,
    }
}

const fn c2f(width: usize, repeats: usize, shortcut: bool) -> Op {
    Op::C2f {
        shortcut,
        width,
        repeats,
    }
}

const fn c3(width: usize, repeats: usize, shortcut: bool) -> Op {
    Op::C3 {
        shortcut,
        width,
        repeats,
    }
}

/// `yolov8.yaml`: backbone 0-9, neck 10-21; the head reads 15, 18, 21.
const V8_LAYERS: [Op; 22] = [
    conv(3, 2, 64),
    conv(3, 2, 128),
    c2f(128, 3, true),
    conv(3, 2, 256),
    c2f(256, 6, true),
    conv(3, 2, 512),
    c2f(512, 6, true),
    conv(3, 2, 1024),
    c2f(1024, 3, true),
    Op::Sppf { width: 1024 },
    Op::Upsample,
    Op::Concat(6),
    c2f(512, 3, false),
    Op::Upsample,
    Op::Concat(4),
    c2f(256, 3, false),
    conv(3, 2, 256),
    Op::Concat(12),
    c2f(512, 3, false),
    conv(3, 2, 512),
    Op::Concat(9),
    c2f(1024, 3, false),
];
const V8_HEAD_INPUTS: [usize; 3] = [15, 18, 21];

/// `yolov5s.yaml` (v6.0+): backbone 0-9, neck 10-23; the head reads 17, 20, 23.
const V5_LAYERS: [Op; 24] = [
    Op::Conv {
        k: 6,
        s: 2,
        p: 2,
        width: 64,
    },
    conv(3, 2, 128),
    c3(128, 3, true),
    conv(3, 2, 256),
    c3(256, 6, true),
    conv(3, 2, 512),
    c3(512, 9, true),
    conv(3, 2, 1024),
    c3(1024, 3, true),
    Op::Sppf { width: 1024 },
    conv(1, 1, 512),
    Op::Upsample,
    Op::Concat(6),
    c3(512, 3, false),
    conv(1, 1, 256),
    Op::Upsample,
    Op::Concat(4),
    c3(256, 3, false),
    conv(3, 2, 256),
    Op::Concat(14),
    c3(512, 3, false),
    conv(3, 2, 512),
    Op::Concat(10),
    c3(1024, 3, false),
];
const V5_HEAD_INPUTS: [usize; 3] = [17, 20, 23];

/// The standard scales: (name, depth, width, max channels).
const V8_SCALES: [(&str, f64, f64, usize); 5] = [
    ("n", 0.33, 0.25, 1024),
    ("s", 0.33, 0.50, 1024),
    ("m", 0.67, 0.75, 768),
    ("l", 1.00, 1.00, 512),
    ("x", 1.00, 1.25, 512),
];
const V5_SCALES: [(&str, f64, f64, usize); 5] = [
    ("n", 0.33, 0.25, usize::MAX),
    ("s", 0.33, 0.50, usize::MAX),
    ("m", 0.67, 0.75, usize::MAX),
    ("l", 1.00, 1.00, usize::MAX),
    ("x", 1.33, 1.25, usize::MAX),
];

fn layers_of(version: YoloVersion) -> (&'static [Op], [usize; 3]) {
    match version {
        YoloVersion::V5 => (&V5_LAYERS, V5_HEAD_INPUTS),
        YoloVersion::V8 => (&V8_LAYERS, V8_HEAD_INPUTS),
    }
}

/// (output channels, bottlenecks) per layer: what names a scale.
type Signature = Vec<(usize, usize)>;

/// The [`Signature`] of the standard topology at a scale, as the yaml parsers
/// compute them: channels `ceil(min(c, max) * width / 8) * 8`, repeats
/// `max(round(n * depth), 1)` for n > 1.
fn scaled_signature(layers: &[Op], depth: f64, width: f64, max_ch: usize) -> Signature {
    let ch = |c: usize| ((c.min(max_ch) as f64 * width / 8.0).ceil() as usize) * 8;
    let n = |r: usize| {
        if r > 1 {
            ((r as f64 * depth).round() as usize).max(1)
        } else {
            r
        }
    };
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(layers.len());
    for op in layers {
        let prev = out.last().map_or(3, |o| o.0);
        out.push(match *op {
            Op::Conv { width, .. } | Op::Sppf { width } => (ch(width), 0),
            Op::C2f { width, repeats, .. } | Op::C3 { width, repeats, .. } => {
                (ch(width), n(repeats))
            }
            Op::Upsample => (prev, 0),
            Op::Concat(j) => (prev + out[j].0, 0),
        });
    }
    out
}

/// Which version the keys are, or why they are none.
fn detect_version(shapes: &Shapes) -> std::result::Result<YoloVersion, ModelError> {
    let any = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    if any("model.22.cv2.") || any("model.22.cv3.") || any("model.22.dfl.") {
        return Ok(YoloVersion::V8);
    }
    if any("model.24.m.") || shapes.contains_key("model.24.anchors") {
        return Ok(YoloVersion::V5);
    }
    let reason = if shapes.contains_key("model.0.conv.conv.weight") {
        "a YOLOv5 before v6.0 (Focus stem, `model.0.conv.conv`): only v6.0 and later are supported"
            .to_string()
    } else if let Some(i) = (0..40).find(|i| any(&format!("model.{i}.dfl.")) && *i != 22) {
        format!(
            "a DFL detection head at `model.{i}`, not at `model.22`: another Ultralytics \
             architecture than YOLOv8 (e.g. YOLO11, or a P2/P6 variant), which is not supported"
        )
    } else {
        "no YOLOv8 head (`model.22.cv2/cv3/dfl`) and no YOLOv5 v6.0+ head \
         (`model.24.m`, `model.24.anchors`)"
            .to_string()
    };
    Err(ModelError::unknown_layout(&reason, shapes))
}

/// Output channels of the Conv module at `prefix` (its conv weight, or
/// failing that its batch norm, so that one missing key is reported as
/// missing rather than as an unreadable layout).
fn out_channels(shapes: &Shapes, prefix: &str) -> std::result::Result<usize, ModelError> {
    [
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
    ]
    .iter()
    .find_map(|k| dim_of(shapes, &format!("{prefix}.{k}"), 0))
    .ok_or_else(|| unreadable(&format!("the width of `{prefix}`"), shapes))
}

fn unreadable(what: &str, shapes: &Shapes) -> ModelError {
    ModelError::unknown_layout(
        &format!("cannot read {what} from an Ultralytics YOLO checkpoint"),
        shapes,
    )
}

/// The number of bottlenecks in `{prefix}.m` (the highest index + 1, so a
/// missing one is reported as missing keys).
fn repeats(shapes: &Shapes, prefix: &str) -> usize {
    child_indices(shapes, &format!("{prefix}.m"))
        .last()
        .map_or(0, |m| m + 1)
}

// ----------------------------------------------------------------------------
// blocks
// ----------------------------------------------------------------------------

/// Ultralytics' `Conv`: convolution, batch norm (folded), SiLU.
fn conv_bn_silu(
    wm: &WeightMap,
    prefix: &str,
    c_in: usize,
    c_out: usize,
    (k, s, p): (usize, usize, usize),
    placement: &Placement,
) -> Result<Conv2d> {
    let spec = ConvSpec::new(c_in, c_out, k, s).with_padding(Padding::Symmetric(p));
    Conv2d::load_bn(
        wm,
        &format!("{prefix}.conv"),
        &format!("{prefix}.bn"),
        spec,
        BN_EPS,
        Activation::Silu,
        placement,
    )
}

#[derive(Debug, Clone)]
struct Bottleneck {
    cv1: Conv2d,
    cv2: Conv2d,
    add: bool,
}

impl Bottleneck {
    /// `c -> c`; `k1` is 3 in YOLOv8 (C2f) and 1 in YOLOv5 (C3).
    fn load(
        wm: &WeightMap,
        prefix: &str,
        c: usize,
        k1: usize,
        add: bool,
        p: &Placement,
    ) -> Result<Self> {
        Ok(Self {
            cv1: conv_bn_silu(wm, &format!("{prefix}.cv1"), c, c, (k1, 1, k1 / 2), p)?,
            cv2: conv_bn_silu(wm, &format!("{prefix}.cv2"), c, c, (3, 1, 1), p)?,
            add,
        })
    }
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.cv2.forward(&self.cv1.forward(x)?)?;
        if self.add {
            y + x
        } else {
            Ok(y)
        }
    }
}

/// YOLOv8's C2f: `cv1` to 2c channels, split in two halves, each bottleneck
/// applied to the last output, all of them concatenated into `cv2`.
#[derive(Debug, Clone)]
struct C2f {
    cv1: Conv2d,
    m: Vec<Bottleneck>,
    cv2: Conv2d,
    hidden: usize,
}

impl C2f {
    /// Of the channel concatenation of `x`, as every block here: the
    /// concatenations, inside the block and before it, are read in place
    /// by the 1x1 convolutions that take them ([`Conv2d::forward_cat`]).
    fn forward(&self, x: &[Tensor]) -> Result<Tensor> {
        let y = self.cv1.forward_cat(x)?;
        let c = self.hidden;
        // y's two halves, concatenated, are y.
        let mut last = y.narrow(1, c, c)?;
        let mut parts = Vec::with_capacity(1 + self.m.len());
        parts.push(y);
        for m in &self.m {
            last = m.forward(&last)?;
            parts.push(last.clone());
        }
        self.cv2.forward_cat(&parts)
    }
}

/// YOLOv5's C3: `cv3(cat(m(cv1(x)), cv2(x)))`.
#[derive(Debug, Clone)]
struct C3 {
    cv1: Conv2d,
    cv2: Conv2d,
    cv3: Conv2d,
    m: Vec<Bottleneck>,
}

impl C3 {
    fn forward(&self, x: &[Tensor]) -> Result<Tensor> {
        let mut y = self.cv1.forward_cat(x)?;
        for m in &self.m {
            y = m.forward(&y)?;
        }
        self.cv3.forward_cat(&[y, self.cv2.forward_cat(x)?])
    }
}

/// Spatial pyramid pooling, fast: `cv1`, three 5x5 stride-1 max pools in a
/// row, the four concatenated into `cv2`.
#[derive(Debug, Clone)]
struct Sppf {
    cv1: Conv2d,
    cv2: Conv2d,
}

impl Sppf {
    fn forward(&self, x: &[Tensor]) -> Result<Tensor> {
        let y0 = self.cv1.forward_cat(x)?;
        // 5x5, stride 1, padding 2.
        let y1 = max_pool2d(&y0, 5, 1, 2)?;
        let y2 = max_pool2d(&y1, 5, 1, 2)?;
        let y3 = max_pool2d(&y2, 5, 1, 2)?;
        self.cv2.forward_cat(&[y0, y1, y2, y3])
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    C2f(C2f),
    C3(C3),
    Sppf(Sppf),
    Upsample,
    Concat(usize),
}

/// A loaded `model.0` .. `model.(head - 1)`: the layers, which outputs later
/// layers read, and the channels of each output.
#[derive(Debug, Clone)]
struct Body {
    layers: Vec<Layer>,
    /// Whether a layer's output is read again later (by a Concat or the head).
    keep: Vec<bool>,
    head_inputs: [usize; 3],
}

impl Body {
    /// Loads the layers, reading every width and depth from `shapes`.
    /// Returns the body, the channels of each layer's output and the
    /// (channels, bottlenecks) signature that names the scale.
    fn load(
        wm: &WeightMap,
        shapes: &Shapes,
        version: YoloVersion,
        p: &Placement,
    ) -> std::result::Result<(Self, Vec<usize>, Signature), ModelError> {
        let (ops, head_inputs) = layers_of(version);
        let mut layers = Vec::with_capacity(ops.len());
        let mut channels: Vec<usize> = Vec::with_capacity(ops.len());
        let mut signature = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let prefix = format!("model.{i}");
            let c_in = channels.last().copied().unwrap_or(3);
            let (layer, c_out, n) = match *op {
                Op::Conv { k, s, p: pad, .. } => {
                    let c_out = out_channels(shapes, &prefix)?;
                    let conv = conv_bn_silu(wm, &prefix, c_in, c_out, (k, s, pad), p)?;
                    (Layer::Conv(conv), c_out, 0)
                }
                Op::C2f { shortcut, .. } => {
                    let hidden = out_channels(shapes, &format!("{prefix}.cv1"))? / 2;
                    let c_out = out_channels(shapes, &format!("{prefix}.cv2"))?;
                    let n = repeats(shapes, &prefix);
                    let block = C2f {
                        cv1: conv_bn_silu(
                            wm,
                            &format!("{prefix}.cv1"),
                            c_in,
                            2 * hidden,
                            (1, 1, 0),
                            p,
                        )?,
                        m: (0..n)
                            .map(|j| {
                                Bottleneck::load(
                                    wm,
                                    &format!("{prefix}.m.{j}"),
                                    hidden,
                                    3,
                                    shortcut,
                                    p,
                                )
                            })
                            .collect::<Result<_>>()?,
                        cv2: conv_bn_silu(
                            wm,
                            &format!("{prefix}.cv2"),
                            (2 + n) * hidden,
                            c_out,
                            (1, 1, 0),
                            p,
                        )?,
                        hidden,
                    };
                    (Layer::C2f(block), c_out, n)
                }
                Op::C3 { shortcut, .. } => {
                    let hidden = out_channels(shapes, &format!("{prefix}.cv1"))?;
                    let c_out = out_channels(shapes, &format!("{prefix}.cv3"))?;
                    let n = repeats(shapes, &prefix);
                    let one = |name: &str, ci: usize, co: usize| {
                        conv_bn_silu(wm, &format!("{prefix}.{name}"), ci, co, (1, 1, 0), p)
                    };
                    let block = C3 {
                        cv1: one("cv1", c_in, hidden)?,
                        cv2: one("cv2", c_in, hidden)?,
                        cv3: one("cv3", 2 * hidden, c_out)?,
                        m: (0..n)
                            .map(|j| {
                                Bottleneck::load(
                                    wm,
                                    &format!("{prefix}.m.{j}"),
                                    hidden,
                                    1,
                                    shortcut,
                                    p,
                                )
                            })
                            .collect::<Result<_>>()?,
                    };
                    (Layer::C3(block), c_out, n)
                }
                Op::Sppf { .. } => {
                    let hidden = out_channels(shapes, &format!("{prefix}.cv1"))?;
                    let c_out = out_channels(shapes, &format!("{prefix}.cv2"))?;
                    let one = |name: &str, ci: usize, co: usize| {
                        conv_bn_silu(wm, &format!("{prefix}.{name}"), ci, co, (1, 1, 0), p)
                    };
                    let block = Sppf {
                        cv1: one("cv1", c_in, hidden)?,
                        cv2: one("cv2", 4 * hidden, c_out)?,
                    };
                    (Layer::Sppf(block), c_out, 0)
                }
                Op::Upsample => (Layer::Upsample, c_in, 0),
                Op::Concat(j) => (Layer::Concat(j), c_in + channels[j], 0),
            };
            layers.push(layer);
            channels.push(c_out);
            signature.push((c_out, n));
        }
        let mut keep = vec![false; ops.len()];
        for op in ops {
            if let Op::Concat(j) = op {
                keep[*j] = true;
            }
        }
        for &j in &head_inputs {
            keep[j] = true;
        }
        Ok((
            Self {
                layers,
                keep,
                head_inputs,
            },
            channels,
            signature,
        ))
    }

    /// The three feature maps the head reads.
    fn forward(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let mut saved: Vec<Option<Tensor>> = vec![None; self.layers.len()];
        // The last output as channel parts: a Concat only adds a part, which
        // the next block's convolutions read in place.
        let mut x = vec![x.clone()];
        let join = |parts: &[Tensor]| match parts {
            [x] => Ok(x.clone()),
            _ => Tensor::cat(parts, 1),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let y = match layer {
                Layer::Conv(m) => m.forward_cat(&x)?,
                Layer::C2f(m) => m.forward(&x)?,
                Layer::C3(m) => m.forward(&x)?,
                Layer::Sppf(m) => m.forward(&x)?,
                Layer::Upsample => {
                    let x = join(&x)?;
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(2 * h, 2 * w)?
                }
                Layer::Concat(j) => {
                    let other = saved[*j].as_ref().ok_or_else(|| {
                        candle_core::Error::Msg(format!("layer {j} output was not kept"))
                    })?;
                    x.push(other.clone());
                    if self.keep[i] {
                        saved[i] = Some(join(&x)?);
                    }
                    continue;
                }
            };
            x = vec![y];
            if self.keep[i] {
                saved[i] = Some(x[0].clone());
            }
        }
        let take = |j: usize| {
            saved[j]
                .clone()
                .ok_or_else(|| candle_core::Error::Msg(format!("layer {j} output was not kept")))
        };
        Ok([
            take(self.head_inputs[0])?,
            take(self.head_inputs[1])?,
            take(self.head_inputs[2])?,
        ])
    }
}

// ----------------------------------------------------------------------------
// heads
// ----------------------------------------------------------------------------

/// YOLOv8's Detect: per level a box branch (two Convs and a biased 1x1 to
/// `4 * reg_max`) and a class branch (two Convs and a biased 1x1 to the
/// classes); DFL over the box logits.
#[derive(Debug, Clone)]
struct V8Head {
    boxes: Vec<[Conv2d; 3]>,
    classes: Vec<[Conv2d; 3]>,
    /// The DFL bins' values, `[1, 1, reg_max, 1]` (0, 1, ..., reg_max - 1).
    bins: Tensor,
    reg_max: usize,
    num_classes: usize,
}

/// YOLOv5's Detect: per level a biased 1x1 convolution to
/// `anchors * (5 + classes)` channels, its output channels reordered at load
/// time from (anchor, value) to (value, anchor), so that `[B, value,
/// anchor * cells]` is a free reshape of the output.
#[derive(Debug, Clone)]
struct V5Head {
    convs: Vec<Conv2d>,
    /// Per level, `[num_anchors, 2]` anchor sizes in stride units (f32, CPU).
    anchors: Vec<Tensor>,
    num_anchors: usize,
    num_classes: usize,
}

#[derive(Debug, Clone)]
enum Head {
    V8(V8Head),
    V5(V5Head),
}

fn biased_1x1(
    wm: &WeightMap,
    prefix: &str,
    c_in: usize,
    c_out: usize,
    p: &Placement,
) -> Result<Conv2d> {
    Conv2d::load_biased(
        wm,
        prefix,
        ConvSpec::new(c_in, c_out, 1, 1),
        Activation::None,
        p,
    )
}

impl V8Head {
    fn load(
        wm: &WeightMap,
        shapes: &Shapes,
        in_channels: [usize; 3],
        p: &Placement,
    ) -> std::result::Result<Self, ModelError> {
        let h = "model.22";
        let reg_max = dim_of(shapes, &format!("{h}.cv2.0.2.weight"), 0)
            .or_else(|| dim_of(shapes, &format!("{h}.cv2.0.2.bias"), 0))
            .map(|c| c / 4)
            .or_else(|| dim_of(shapes, &format!("{h}.dfl.conv.weight"), 1))
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                unreadable("the DFL bins (`model.22.cv2.0.2`, `model.22.dfl`)", shapes)
            })?;
        let num_classes = dim_of(shapes, &format!("{h}.cv3.0.2.weight"), 0)
            .or_else(|| dim_of(shapes, &format!("{h}.cv3.0.2.bias"), 0))
            .ok_or_else(|| unreadable("the class count (`model.22.cv3.0.2`)", shapes))?;
        let c2 = out_channels(shapes, &format!("{h}.cv2.0.0"))?;
        let c3 = out_channels(shapes, &format!("{h}.cv3.0.0"))?;
        let branch =
            |name: &str, l: usize, x: usize, c: usize, out: usize| -> Result<[Conv2d; 3]> {
                let pre = format!("{h}.{name}.{l}");
                Ok([
                    conv_bn_silu(wm, &format!("{pre}.0"), x, c, (3, 1, 1), p)?,
                    conv_bn_silu(wm, &format!("{pre}.1"), c, c, (3, 1, 1), p)?,
                    biased_1x1(wm, &format!("{pre}.2"), c, out, p)?,
                ])
            };
        let mut boxes = Vec::with_capacity(3);
        let mut classes = Vec::with_capacity(3);
        for (l, &x) in in_channels.iter().enumerate() {
            boxes.push(branch("cv2", l, x, c2, 4 * reg_max)?);
            classes.push(branch("cv3", l, x, c3, num_classes)?);
        }
        let bins = wm.get(&format!("{h}.dfl.conv.weight"), &[1, reg_max, 1, 1])?;
        Ok(Self {
            boxes,
            classes,
            bins: p.place(&bins.reshape((1, 1, reg_max, 1))?)?,
            reg_max,
            num_classes,
        })
    }

    /// `[B, 4 + classes, anchors]` from the three feature maps.
    fn forward(&self, feats: &[Tensor; 3], grids: &Grids) -> Result<Tensor> {
        let b = feats[0].dim(0)?;
        let mut box_logits = Vec::with_capacity(3);
        let mut cls_logits = Vec::with_capacity(3);
        for (l, x) in feats.iter().enumerate() {
            let (_, _, h, w) = x.dims4()?;
            let run = |convs: &[Conv2d; 3]| -> Result<Tensor> {
                convs[2].forward(&convs[1].forward(&convs[0].forward(x)?)?)
            };
            box_logits.push(run(&self.boxes[l])?.reshape((b, 4 * self.reg_max, h * w))?);
            cls_logits.push(run(&self.classes[l])?.reshape((b, self.num_classes, h * w))?);
        }
        let box_logits = Tensor::cat(&box_logits, 2)?;
        let cls_logits = Tensor::cat(&cls_logits, 2)?;
        let anchors = box_logits.dim(2)?;
        // DFL: softmax over the bins of each side, expectation against the
        // bins' values; sum(e * v) / sum(e) saves normalising every bin.
        let dist = if is_host_f32(&box_logits) {
            let y = with_host_f32(&box_logits, |logits| {
                with_host_f32(&self.bins, |bins| {
                    let mut dist = vec![0f32; b * 4 * anchors];
                    dfl_rows(&mut dist, logits, bins, anchors);
                    dist
                })
            })??;
            Tensor::from_vec(y, (b, 4, anchors), &Device::Cpu)?
        } else {
            let d = box_logits.reshape((b, 4, self.reg_max, anchors))?;
            let e = d.broadcast_sub(&d.max_keepdim(2)?)?.exp()?;
            e.broadcast_mul(&self.bins)?.sum(2)?.div(&e.sum(2)?)?
        };
        // dist2bbox (left, top, right, bottom -> centre, size), as Ultralytics
        // computes it, then times the stride.
        let lt = dist.narrow(1, 0, 2)?;
        let rb = dist.narrow(1, 2, 2)?;
        let x1y1 = grids.points.broadcast_sub(&lt)?;
        let x2y2 = grids.points.broadcast_add(&rb)?;
        let centre = ((&x1y1 + &x2y2)? / 2.0)?;
        let size = (x2y2 - x1y1)?;
        let boxes = Tensor::cat(&[centre, size], 1)?.broadcast_mul(&grids.strides)?;
        Tensor::cat(&[boxes, candle_nn::ops::sigmoid(&cls_logits)?], 1)
    }
}

avx2_dispatch! {
    /// DFL on the CPU: logits `[B * 4, R, A]` (R bins per side) ->
    /// distances `[B * 4, A]`, `sum(e * v) / sum(e)` with `e = exp(l - max)`.
    /// The anchors are the vector dimension: each step is a pass over rows.
    fn dfl_rows(dist: &mut [f32], logits: &[f32], bins: &[f32], anchors: usize) {
        let r = bins.len();
        let mut max = vec![0f32; anchors];
        let mut den = vec![0f32; anchors];
        for (side, dist) in dist.chunks_exact_mut(anchors).enumerate() {
            let rows = &logits[side * r * anchors..][..r * anchors];
            max.fill(f32::NEG_INFINITY);
            for row in rows.chunks_exact(anchors) {
                for (m, &l) in max.iter_mut().zip(row) {
                    *m = m.max(l);
                }
            }
            den.fill(0.0);
            dist.fill(0.0);
            for (row, &v) in rows.chunks_exact(anchors).zip(bins) {
                for (((d, s), &l), &m) in dist.iter_mut().zip(den.iter_mut()).zip(row).zip(&max) {
                    let e = exp(l - m);
                    *s += e;
                    *d += e * v;
                }
            }
            for (d, &s) in dist.iter_mut().zip(&den) {
                *d /= s;
            }
        }
    }
}

impl V5Head {
    fn load(
        wm: &WeightMap,
        shapes: &Shapes,
        in_channels: [usize; 3],
        p: &Placement,
    ) -> std::result::Result<Self, ModelError> {
        let h = "model.24";
        let num_anchors = dim_of(shapes, &format!("{h}.anchors"), 1).unwrap_or(3);
        let outputs = dim_of(shapes, &format!("{h}.m.0.weight"), 0)
            .or_else(|| dim_of(shapes, &format!("{h}.m.0.bias"), 0))
            .ok_or_else(|| unreadable("the class count (`model.24.m.0.weight`)", shapes))?;
        if num_anchors == 0 || outputs % num_anchors != 0 || outputs / num_anchors <= 5 {
            return Err(unreadable(
                &format!(
                    "the class count: `{h}.m.0` has {outputs} outputs, \
                     not a multiple of {num_anchors} anchors times (5 + classes)"
                ),
                shapes,
            ));
        }
        let per_anchor = outputs / num_anchors;
        let num_classes = per_anchor - 5;
        let all_anchors = wm.get(&format!("{h}.anchors"), &[3, num_anchors, 2])?;
        let anchor_grid = format!("{h}.anchor_grid");
        if wm.contains(&anchor_grid) {
            // Same numbers in pixels; see the module notes.
            wm.get(&anchor_grid, &[3, 1, num_anchors, 1, 1, 2])?;
        }
        let mut convs = Vec::with_capacity(3);
        let mut anchors = Vec::with_capacity(3);
        for (l, &x) in in_channels.iter().enumerate() {
            let pre = format!("{h}.m.{l}");
            let w = wm.get(&format!("{pre}.weight"), &[outputs, x, 1, 1])?;
            let bias = wm.get(&format!("{pre}.bias"), &[outputs])?;
            // (anchor, value) -> (value, anchor) output channels.
            let w = w
                .reshape((num_anchors, per_anchor, x))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((outputs, x, 1, 1))?;
            let bias = bias
                .reshape((num_anchors, per_anchor))?
                .t()?
                .contiguous()?
                .reshape(outputs)?;
            let spec = ConvSpec::new(x, outputs, 1, 1);
            convs.push(Conv2d::from_folded(&w, &bias, spec, Activation::None, p)?);
            anchors.push(all_anchors.get(l)?);
        }
        Ok(Self {
            convs,
            anchors,
            num_anchors,
            num_classes,
        })
    }

    fn forward(&self, feats: &[Tensor; 3], grids: &Grids) -> Result<Tensor> {
        let b = feats[0].dim(0)?;
        let per_anchor = 5 + self.num_classes;
        let levels = feats
            .iter()
            .zip(&self.convs)
            .map(|(x, conv)| {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(x)?
                    .reshape((b, per_anchor, self.num_anchors * h * w))
            })
            .collect::<Result<Vec<_>>>()?;
        let s = candle_nn::ops::sigmoid(&Tensor::cat(&levels, 2)?)?;
        let xy = s
            .narrow(1, 0, 2)?
            .affine(2.0, 0.0)?
            .broadcast_add(&grids.points)?
            .broadcast_mul(&grids.strides)?;
        let wh = s.narrow(1, 2, 2)?.affine(2.0, 0.0)?.sqr()?.broadcast_mul(
            grids
                .anchors
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("YOLOv5 grids without anchors".into()))?,
        )?;
        let conf = s
            .narrow(1, 5, self.num_classes)?
            .broadcast_mul(&s.narrow(1, 4, 1)?)?;
        Tensor::cat(&[xy, wh, conf], 1)
    }
}

// ----------------------------------------------------------------------------
// grids
// ----------------------------------------------------------------------------

/// Per output column: the cell offset, the stride and (YOLOv5) the anchor size.
#[derive(Debug, Clone)]
struct Grids {
    /// `[1, 2, anchors]`: YOLOv8 the cell centre (`x + 0.5`, `y + 0.5`),
    /// YOLOv5 the cell minus a half (`x - 0.5`, `y - 0.5`), in cells.
    points: Tensor,
    /// `[1, 1, anchors]`.
    strides: Tensor,
    /// YOLOv5: `[1, 2, anchors]`, anchor width and height in pixels.
    anchors: Option<Tensor>,
}

impl Grids {
    /// For an input of `h` x `w`, built with tensor ops on the CPU in f32
    /// and placed once.
    fn build(head: &Head, h: usize, w: usize, p: &Placement) -> Result<Self> {
        let cpu = Device::Cpu;
        let (offset, per_cell) = match head {
            Head::V8(_) => (0.5, 1),
            Head::V5(v5) => (-0.5, v5.num_anchors),
        };
        let mut points = Vec::with_capacity(3);
        let mut strides = Vec::with_capacity(3);
        let mut anchors = Vec::with_capacity(3);
        for (l, &s) in STRIDES.iter().enumerate() {
            let (gh, gw) = (h / s, w / s);
            let cells = gh * gw;
            let xs = (Tensor::arange(0f32, gw as f32, &cpu)? + offset)?
                .reshape((1, gw))?
                .broadcast_as((gh, gw))?;
            let ys = (Tensor::arange(0f32, gh as f32, &cpu)? + offset)?
                .reshape((gh, 1))?
                .broadcast_as((gh, gw))?;
            // [2, per_cell, cells]: the same cells for every anchor.
            let xy = Tensor::stack(&[xs, ys], 0)?
                .reshape((2, 1, cells))?
                .broadcast_as((2, per_cell, cells))?
                .reshape((2, per_cell * cells))?;
            points.push(xy);
            strides.push(Tensor::full(s as f32, (1, per_cell * cells), &cpu)?);
            if let Head::V5(v5) = head {
                // [na, 2] in stride units -> [2, na, cells] in pixels.
                let wh = (v5.anchors[l].t()? * s as f64)?
                    .reshape((2, per_cell, 1))?
                    .broadcast_as((2, per_cell, cells))?
                    .reshape((2, per_cell * cells))?;
                anchors.push(wh);
            }
        }
        let place =
            |parts: &[Tensor]| -> Result<Tensor> { p.place(&Tensor::cat(parts, 1)?.unsqueeze(0)?) };
        Ok(Self {
            points: place(&points)?,
            strides: place(&strides)?,
            anchors: if anchors.is_empty() {
                None
            } else {
                Some(place(&anchors)?)
            },
        })
    }
}

// ----------------------------------------------------------------------------
// the model
// ----------------------------------------------------------------------------

/// A loaded YOLO detector on a device.
#[derive(Debug)]
pub struct Yolo {
    body: Body,
    head: Head,
    info: YoloInfo,
    placement: Placement,
    /// The grids of the last input size.
    grids: Mutex<Option<((usize, usize), Grids)>>,
}

impl Clone for Yolo {
    fn clone(&self) -> Self {
        Self {
            body: self.body.clone(),
            head: self.head.clone(),
            info: self.info.clone(),
            placement: self.placement.clone(),
            grids: Mutex::new(None),
        }
    }
}

impl Yolo {
    /// Loads weights in the Ultralytics state-dict key layout (any float
    /// dtype; `num_batches_tracked` ignored) onto `device` in `dtype`.
    ///
    /// The version, widths, depths, class count and anchors come from the
    /// keys and shapes. Weights that do not fit are reported all at once
    /// (missing, unexpected and wrongly shaped keys) as
    /// [`ModelError::WeightsMismatch`]; keys that are no YOLOv8/YOLOv5 at all
    /// as [`ModelError::UnknownLayout`].
    pub fn load(
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Yolo, ModelError> {
        let wm = WeightMap::new(tensors);
        let shapes = wm.shapes();
        let version = detect_version(&shapes)?;
        let placement = Placement::new(device, dtype);
        let (body, channels, signature) = Body::load(&wm, &shapes, version, &placement)?;
        let head_in = body.head_inputs.map(|j| channels[j]);
        let head = match version {
            YoloVersion::V8 => Head::V8(V8Head::load(&wm, &shapes, head_in, &placement)?),
            YoloVersion::V5 => Head::V5(V5Head::load(&wm, &shapes, head_in, &placement)?),
        };
        let variant = variant_name(version, &signature);
        wm.finish(&format!(
            "ultralytics {} ({variant})",
            version.family_name()
        ))?;
        let num_classes = match &head {
            Head::V8(h) => h.num_classes,
            Head::V5(h) => h.num_classes,
        };
        Ok(Self {
            body,
            head,
            info: YoloInfo {
                version,
                variant,
                num_classes,
                strides: STRIDES.to_vec(),
                device: device.clone(),
                dtype,
            },
            placement,
            grids: Mutex::new(None),
        })
    }

    /// `pixel_values` `[B, 3, H, W]` (0..1, H and W multiples of 32; moved to
    /// the model's device and dtype if needed) -> `[B, 4 + classes,
    /// anchors]`: boxes (cx, cy, w, h) in input pixels and class scores
    /// (see the module notes), in the model's dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4()?;
        if c != 3 || h == 0 || w == 0 || h % STRIDE_MULTIPLE != 0 || w % STRIDE_MULTIPLE != 0 {
            candle_core::bail!(
                "expected pixel_values [B, 3, H, W] with H and W multiples of {STRIDE_MULTIPLE}, got {:?}",
                pixel_values.dims()
            );
        }
        let x = pixel_values
            .to_device(&self.info.device)?
            .to_dtype(self.info.dtype)?;
        let feats = self.body.forward(&x)?;
        let grids = self.grids_for(h, w)?;
        match &self.head {
            Head::V8(head) => head.forward(&feats, &grids),
            Head::V5(head) => head.forward(&feats, &grids),
        }
    }

    pub fn info(&self) -> &YoloInfo {
        &self.info
    }

    /// The number of output columns (anchors) for an `h` x `w` input.
    pub fn num_anchors(&self, h: usize, w: usize) -> usize {
        let per_cell = match &self.head {
            Head::V8(_) => 1,
            Head::V5(head) => head.num_anchors,
        };
        STRIDES.iter().map(|s| (h / s) * (w / s)).sum::<usize>() * per_cell
    }

    fn grids_for(&self, h: usize, w: usize) -> Result<Grids> {
        // A poisoned lock only means another forward panicked mid-build;
        // the cache is rebuilt from scratch whenever it is not a match.
        let mut cache = self.grids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((size, grids)) = cache.as_ref() {
            if *size == (h, w) {
                return Ok(grids.clone());
            }
        }
        let grids = Grids::build(&self.head, h, w, &self.placement)?;
        *cache = Some(((h, w), grids.clone()));
        Ok(grids)
    }
}

/// `yolov8n` etc. when every layer's channels and bottleneck count are
/// those of a standard scale, else `yolov8-custom` / `yolov5-custom`.
fn variant_name(version: YoloVersion, signature: &[(usize, usize)]) -> String {
    let (layers, _) = layers_of(version);
    let scales = match version {
        YoloVersion::V5 => &V5_SCALES,
        YoloVersion::V8 => &V8_SCALES,
    };
    let family = version.family_name();
    scales
        .iter()
        .find(|(_, d, w, max)| scaled_signature(layers, *d, *w, *max) == signature)
        .map_or_else(
            || format!("{family}-custom"),
            |(name, ..)| format!("{family}{name}"),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_dfl_is_the_expected_bin() {
        // 2 images x 4 sides, 16 bins, 5 anchors.
        let (r, a) = (16, 5);
        let logits: Vec<f32> = (0..2 * 4 * r * a)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let bins: Vec<f32> = (0..r).map(|v| v as f32).collect();
        let mut dist = vec![0f32; 2 * 4 * a];
        dfl_rows(&mut dist, &logits, &bins, a);
        for side in 0..8 {
            for anchor in 0..a {
                let l: Vec<f64> = (0..r)
                    .map(|k| logits[(side * r + k) * a + anchor] as f64)
                    .collect();
                let max = l.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = l.iter().map(|v| (v - max).exp()).collect();
                let want = e.iter().zip(&bins).map(|(e, &v)| e * v as f64).sum::<f64>()
                    / e.iter().sum::<f64>();
                let got = dist[side * a + anchor] as f64;
                assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");
            }
        }
    }

    /// The published layer widths of yolov8n/s and yolov5s.
    #[test]
    fn standard_scales() {
        let v8n = scaled_signature(&V8_LAYERS, 0.33, 0.25, 1024);
        let widths: Vec<usize> = v8n.iter().map(|s| s.0).collect();
        assert_eq!(
            widths,
            vec![
                16, 32, 32, 64, 64, 128, 128, 256, 256, 256, 256, 384, 128, 128, 192, 64, 64, 192,
                128, 128, 384, 256
            ]
        );
        let depths: Vec<usize> = v8n.iter().map(|s| s.1).filter(|&n| n > 0).collect();
        assert_eq!(depths, vec![1, 2, 2, 1, 1, 1, 1, 1]);
        let v8x = scaled_signature(&V8_LAYERS, 1.0, 1.25, 512);
        assert_eq!(v8x[7].0, 640);
        assert_eq!(v8x[4].1, 6);
        let v5s = scaled_signature(&V5_LAYERS, 0.33, 0.5, usize::MAX);
        assert_eq!(v5s[0].0, 32);
        assert_eq!(v5s[6], (256, 3));
        assert_eq!(v5s[23].0, 512);
        assert_eq!(variant_name(YoloVersion::V5, &v5s), "yolov5s");
        assert_eq!(variant_name(YoloVersion::V8, &v8n), "yolov8n");
        assert_eq!(variant_name(YoloVersion::V8, &v5s), "yolov8-custom");
        let v5x = scaled_signature(&V5_LAYERS, 1.33, 1.25, usize::MAX);
        assert_eq!(v5x[6], (640, 12));
    }

    #[test]
    fn unknown_keys_are_an_unknown_layout() {
        let mut shapes = Shapes::new();
        shapes.insert("model.0.conv.conv.weight".into(), vec![32, 12, 3, 3]);
        let err = detect_version(&shapes).unwrap_err().to_string();
        assert!(err.contains("Focus"), "{err}");
        shapes.clear();
        shapes.insert("model.23.dfl.conv.weight".into(), vec![1, 16, 1, 1]);
        let err = detect_version(&shapes).unwrap_err().to_string();
        assert!(err.contains("model.23"), "{err}");
        shapes.clear();
        shapes.insert("fc.weight".into(), vec![10, 5]);
        assert!(matches!(
            detect_version(&shapes),
            Err(ModelError::UnknownLayout { .. })
        ));
    }
}
