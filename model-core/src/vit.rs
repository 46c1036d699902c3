//! Vision Transformer (ViT Ti/S/B/L, patch 16 or 32) for classification, in
//! two checkpoint layouts loaded as they are:
//!
//! - Hugging Face `ViTForImageClassification` (`vit.embeddings.*`,
//!   `vit.encoder.layer.N.attention.attention.{query,key,value}`,
//!   `vit.layernorm`, `classifier`), layer-norm eps 1e-12;
//! - timm `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
//!   `blocks.N.attn.qkv`, `norm`, `head`), eps 1e-6.
//!
//! Both are the same network: a patch embedding, a class token, learned
//! position embeddings, pre-norm encoder blocks (attention and an exact-erf
//! GELU MLP), a final layer norm and a linear head on the class token.
//!
//! Widths, depth, patch size, MLP width and the trained resolution are read
//! from the weights. The number of heads is not stored in a checkpoint: it
//! comes from the architecture name when one is given (`vit_tiny_*` 3,
//! `vit_small_*` 6, `vit_base_*` 12, `vit_large_*` 16), otherwise from the
//! width at 64 per head, the convention of every standard ViT.
//!
//! Speed: the query/key/value projections are one `[3D, D]` matmul (the
//! Hugging Face weights are concatenated once at load), the attention
//! scale is folded into the query weights, attention reads q, k and v in
//! place from that projection ([`multi_head_attention`]), and the residual
//! adds and the GELU happen in the projections' outputs. At another
//! resolution than the checkpoint's, the patch-grid position embeddings are
//! resampled the way both references do (PyTorch bicubic, a = -0.75,
//! `align_corners=False`, no antialiasing), once per grid size, and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Module, Result, Tensor};

use crate::layers::{multi_head_attention, Activation, LayerNorm, Linear, Placement};
use crate::model_error::ModelError;
use crate::weight_map::{child_indices, dim_of, Shapes, WeightMap};

/// Which key layout a ViT checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitLayout {
    HuggingFace,
    Timm,
}

impl VitLayout {
    /// What `ClassifierInfo::layout` says.
    pub fn name(self) -> &'static str {
        match self {
            Self::HuggingFace => "huggingface",
            Self::Timm => "timm",
        }
    }

    /// Recognises the layout from the keys (loosely: a checkpoint with some
    /// keys missing is still reported as a ViT with those keys named).
    pub fn detect(shapes: &Shapes) -> Option<Self> {
        let any = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
        if any("vit.embeddings.") || any("vit.encoder.layer.") {
            Some(Self::HuggingFace)
        } else if any("patch_embed.proj.")
            || (shapes.contains_key("cls_token") && shapes.contains_key("pos_embed"))
        {
            Some(Self::Timm)
        } else {
            None
        }
    }

    /// How the layout's reference resamples the position embeddings.
    fn resampling(self) -> Resampling {
        match self {
            Self::HuggingFace => Resampling::Bicubic,
            Self::Timm => Resampling::BicubicAntialias,
        }
    }

    fn eps(self) -> f64 {
        match self {
            Self::HuggingFace => 1e-12,
            Self::Timm => 1e-6,
        }
    }

    fn cls_token(self) -> &'static str {
        match self {
            Self::HuggingFace => "vit.embeddings.cls_token",
            Self::Timm => "cls_token",
        }
    }

    fn pos_embed(self) -> &'static str {
        match self {
            Self::HuggingFace => "vit.embeddings.position_embeddings",
            Self::Timm => "pos_embed",
        }
    }

    fn patch_proj(self) -> &'static str {
        match self {
            Self::HuggingFace => "vit.embeddings.patch_embeddings.projection",
            Self::Timm => "patch_embed.proj",
        }
    }

    fn blocks(self) -> &'static str {
        match self {
            Self::HuggingFace => "vit.encoder.layer",
            Self::Timm => "blocks",
        }
    }

    fn final_norm(self) -> &'static str {
        match self {
            Self::HuggingFace => "vit.layernorm",
            Self::Timm => "norm",
        }
    }

    fn head(self) -> &'static str {
        match self {
            Self::HuggingFace => "classifier",
            Self::Timm => "head",
        }
    }

    fn mlp_in(self, block: &str) -> String {
        match self {
            Self::HuggingFace => format!("{block}.intermediate.dense"),
            Self::Timm => format!("{block}.mlp.fc1"),
        }
    }
}

/// The standard sizes: (name, width, depth, heads).
const SIZES: [(&str, usize, usize, usize); 5] = [
    ("tiny", 192, 12, 3),
    ("small", 384, 12, 6),
    ("base", 768, 12, 12),
    ("large", 1024, 24, 16),
    ("huge", 1280, 32, 16),
];

/// Is this a ViT architecture name (`vit_base_patch16_224`, already
/// normalised: lower case, `_` separators)?
pub fn is_known_name(name: &str) -> bool {
    parse_name(name).is_some()
}

/// `vit_{size}_patch{p}_{res}` -> (heads, patch, res).
fn parse_name(name: &str) -> Option<(usize, usize, usize)> {
    let rest = name.strip_prefix("vit_")?;
    let mut parts = rest.split('_');
    let size = parts.next()?;
    let heads = SIZES.iter().find(|s| s.0 == size)?.3;
    let patch = parts.next()?.strip_prefix("patch")?.parse().ok()?;
    let res = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !matches!(patch, 16 | 32 | 14) {
        return None;
    }
    Some((heads, patch, res))
}

/// Everything about a ViT checkpoint's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VitConfig {
    pub layout: VitLayout,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub patch: usize,
    /// The patch grid the position embeddings were trained on (square).
    pub grid: usize,
    pub num_classes: usize,
}

fn unreadable(what: &str, key: &str) -> ModelError {
    ModelError::UnknownLayout {
        reason: format!("cannot read the {what} of a ViT: `{key}` is missing or misshapen"),
        keys: String::new(),
    }
}

impl VitConfig {
    /// Reads the architecture from the keys and shapes; `name` (normalised)
    /// gives the number of heads and is checked against the weights.
    pub fn detect(
        shapes: &Shapes,
        layout: VitLayout,
        name: Option<&str>,
    ) -> std::result::Result<Self, ModelError> {
        let cls = layout.cls_token();
        let hidden = match shapes.get(cls).map(Vec::as_slice) {
            Some(&[1, 1, d]) => d,
            _ => return Err(unreadable("width", cls)),
        };
        let proj = format!("{}.weight", layout.patch_proj());
        let patch = match shapes.get(&proj).map(Vec::as_slice) {
            Some(&[d, 3, p, q]) if d == hidden && p == q && p > 0 => p,
            _ => return Err(unreadable("patch size", &proj)),
        };
        let pos = layout.pos_embed();
        let grid = match shapes.get(pos).map(Vec::as_slice) {
            Some(&[1, n, d]) if d == hidden && n > 1 => {
                let g = ((n - 1) as f64).sqrt().round() as usize;
                if g * g != n - 1 {
                    return Err(ModelError::UnknownLayout {
                        reason: format!(
                            "`{pos}` holds {n} positions, not a class token plus a square patch grid"
                        ),
                        keys: String::new(),
                    });
                }
                g
            }
            _ => return Err(unreadable("position embeddings", pos)),
        };
        let depth = child_indices(shapes, layout.blocks()).len();
        if depth == 0 {
            return Err(unreadable("depth", &format!("{}.0.*", layout.blocks())));
        }
        let mlp_key = format!(
            "{}.weight",
            layout.mlp_in(&format!("{}.0", layout.blocks()))
        );
        let mlp = dim_of(shapes, &mlp_key, 0).ok_or_else(|| unreadable("MLP width", &mlp_key))?;
        let head = format!("{}.weight", layout.head());
        let num_classes =
            dim_of(shapes, &head, 0).ok_or_else(|| unreadable("class count", &head))?;
        let standard = SIZES.iter().find(|s| s.1 == hidden && s.2 == depth);
        let heads = match name.and_then(parse_name) {
            Some((heads, p, _)) => {
                if p != patch {
                    return Err(ModelError::ArchMismatch {
                        requested: name.unwrap_or_default().to_string(),
                        detected: format!("a ViT with {patch}x{patch} patches"),
                    });
                }
                if let Some(s) = standard {
                    if s.3 != heads {
                        return Err(ModelError::ArchMismatch {
                            requested: name.unwrap_or_default().to_string(),
                            detected: format!("vit_{}", s.0),
                        });
                    }
                }
                heads
            }
            None => match standard {
                Some(s) => s.3,
                None if hidden % 64 == 0 => hidden / 64,
                None => {
                    return Err(ModelError::UnknownLayout {
                        reason: format!(
                            "a ViT of width {hidden} is not a standard size and the checkpoint does \
                             not store the number of heads: name the architecture \
                             (vit_tiny_*: 3 heads, vit_small_*: 6, vit_base_*: 12, vit_large_*: 16)"
                        ),
                        keys: String::new(),
                    })
                }
            },
        };
        if heads == 0 || hidden % heads != 0 {
            return Err(ModelError::UnknownLayout {
                reason: format!("a ViT of width {hidden} cannot have {heads} heads"),
                keys: String::new(),
            });
        }
        Ok(Self {
            layout,
            hidden,
            depth,
            heads,
            mlp,
            patch,
            grid,
            num_classes,
        })
    }

    pub fn input_size(&self) -> usize {
        self.grid * self.patch
    }

    /// `vit_base_patch16_224` for the standard sizes, `vit-custom` otherwise.
    pub fn variant(&self) -> String {
        match SIZES
            .iter()
            .find(|s| s.1 == self.hidden && s.2 == self.depth && s.3 == self.heads)
        {
            Some(s) => format!("vit_{}_patch{}_{}", s.0, self.patch, self.input_size()),
            None => "vit-custom".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    /// `[D] -> [3D]`: queries (pre-scaled by 1/sqrt(head dim)), keys, values.
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn load(wm: &WeightMap, c: &VitConfig, i: usize, p: &Placement) -> Result<Self> {
        let (d, m, eps) = (c.hidden, c.mlp, c.layout.eps());
        let b = format!("{}.{i}", c.layout.blocks());
        let (w, bias) = match c.layout {
            VitLayout::Timm => (
                wm.get(&format!("{b}.attn.qkv.weight"), &[3 * d, d])?,
                wm.get(&format!("{b}.attn.qkv.bias"), &[3 * d])?,
            ),
            VitLayout::HuggingFace => {
                let part = |n: &str| -> Result<(Tensor, Tensor)> {
                    let pre = format!("{b}.attention.attention.{n}");
                    Ok((
                        wm.get(&format!("{pre}.weight"), &[d, d])?,
                        wm.get(&format!("{pre}.bias"), &[d])?,
                    ))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                (
                    Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                    Tensor::cat(&[&q.1, &k.1, &v.1], 0)?,
                )
            }
        };
        // Fold the attention scale into the query rows.
        let scale = 1.0 / ((d / c.heads) as f64).sqrt();
        let mut factors = vec![scale as f32; d];
        factors.extend(std::iter::repeat_n(1f32, 2 * d));
        let factors = Tensor::from_vec(factors, 3 * d, &Device::Cpu)?;
        let w = w.broadcast_mul(&factors.unsqueeze(1)?)?;
        let bias = (bias * &factors)?;
        let qkv = Linear::new(&w, &bias, p)?;
        let lin = |name: &str, i, o| Linear::load(wm, &format!("{b}.{name}"), i, o, p);
        let (norm1, proj, norm2, fc1, fc2) = match c.layout {
            VitLayout::Timm => (
                LayerNorm::load(wm, &format!("{b}.norm1"), d, eps, p)?,
                lin("attn.proj", d, d)?,
                LayerNorm::load(wm, &format!("{b}.norm2"), d, eps, p)?,
                lin("mlp.fc1", d, m)?,
                lin("mlp.fc2", m, d)?,
            ),
            VitLayout::HuggingFace => (
                LayerNorm::load(wm, &format!("{b}.layernorm_before"), d, eps, p)?,
                lin("attention.output.dense", d, d)?,
                LayerNorm::load(wm, &format!("{b}.layernorm_after"), d, eps, p)?,
                lin("intermediate.dense", d, m)?,
                lin("output.dense", m, d)?,
            ),
        };
        Ok(Self {
            norm1,
            qkv,
            proj,
            norm2,
            fc1,
            fc2,
            heads: c.heads,
        })
    }

    /// `x` `[B, N, D]` -> `[B, N, D]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        // q, k and v are column slices of the fused projection.
        let (q, k, v) = (
            qkv.narrow(2, 0, d)?,
            qkv.narrow(2, d, d)?,
            qkv.narrow(2, 2 * d, d)?,
        );
        let ctx = multi_head_attention(&q, &k, &v, self.heads, None)?;
        let x = self.proj.forward_with(&ctx, Activation::None, Some(x))?;
        let hidden = self
            .fc1
            .forward_with(&self.norm2.forward(&x)?, Activation::Gelu, None)?;
        self.fc2.forward_with(&hidden, Activation::None, Some(&x))
    }
}

/// A loaded ViT classifier.
#[derive(Debug, Clone)]
pub struct Vit {
    config: VitConfig,
    /// `[3 * p * p, D]`, rows in (channel, y, x) order like the conv weight.
    patch: Linear,
    /// The class token with its position embedding added, `[1, 1, D]`.
    cls: Tensor,
    /// The patch-grid position embeddings on the CPU in f32, `[g, g, D]`.
    grid_pos: Arc<Vec<f32>>,
    /// Position embeddings per patch grid `(gh, gw)`, `[1, gh * gw, D]` on
    /// the model's device.
    pos_cache: Arc<Mutex<HashMap<(usize, usize), Tensor>>>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    placement: Placement,
}

impl Vit {
    pub fn load(wm: &WeightMap, config: VitConfig, p: &Placement) -> Result<Self> {
        let (d, l) = (config.hidden, config.layout);
        let (pp, g) = (config.patch, config.grid);
        let proj_w = wm.get(&format!("{}.weight", l.patch_proj()), &[d, 3, pp, pp])?;
        let proj_b = wm.get(&format!("{}.bias", l.patch_proj()), &[d])?;
        let patch = Linear::new(&proj_w.reshape((d, 3 * pp * pp))?, &proj_b, p)?;
        let cls = wm.get(l.cls_token(), &[1, 1, d])?;
        let pos = wm.get(l.pos_embed(), &[1, g * g + 1, d])?;
        let cls = p.place(&(cls + pos.narrow(1, 0, 1)?)?)?;
        let grid_pos = pos.narrow(1, 1, g * g)?.flatten_all()?.to_vec1::<f32>()?;
        let native = p.place(&pos.narrow(1, 1, g * g)?)?;
        let blocks = (0..config.depth)
            .map(|i| Block::load(wm, &config, i, p))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(wm, l.final_norm(), d, l.eps(), p)?;
        let head = Linear::load(wm, l.head(), d, config.num_classes, p)?;
        Ok(Self {
            config,
            patch,
            cls,
            grid_pos: Arc::new(grid_pos),
            pos_cache: Arc::new(Mutex::new(HashMap::from([((g, g), native)]))),
            blocks,
            norm,
            head,
            placement: p.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The patch position embeddings for a `gh x gw` grid.
    fn pos_embed(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let mut cache = self.pos_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let (g, d) = (self.config.grid, self.config.hidden);
        let mode = self.config.layout.resampling();
        let data = resize_hwc(&self.grid_pos, (g, g), d, (gh, gw), mode);
        let t = self
            .placement
            .place(&Tensor::from_vec(data, (1, gh * gw, d), &Device::Cpu)?)?;
        cache.insert((gh, gw), t.clone());
        Ok(t)
    }

    /// `[B, 3, H, W]` -> logits `[B, classes]`. H and W need not be the
    /// trained size; what does not fill a whole patch at the bottom/right is
    /// dropped, like the reference's strided convolution does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (p, d) = (self.config.patch, self.config.hidden);
        let (gh, gw) = (h / p, w / p);
        if gh == 0 || gw == 0 {
            candle_core::bail!("a {h}x{w} input is smaller than one {p}x{p} patch");
        }
        // Patchify: [B, 3, gh, p, gw, p] -> [B, gh, gw, 3, p, p], one gemm.
        let x = x
            .narrow(2, 0, gh * p)?
            .narrow(3, 0, gw * p)?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let patches = self.patch.forward(&x)?.reshape((b, gh * gw, d))?;
        let patches = patches.broadcast_add(&self.pos_embed(gh, gw)?)?;
        let cls = self.cls.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let cls = self.norm.forward(&cls.contiguous()?)?;
        self.head.forward(&cls)
    }
}

/// How position embeddings are resampled to another patch grid: PyTorch's
/// `F.interpolate(size=..., mode="bicubic", align_corners=False)`, without
/// (transformers' `interpolate_pos_encoding`) or with (timm's
/// `resample_abs_pos_embed`, whose default is `antialias=True`) antialiasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampling {
    /// Cubic convolution with a = -0.75 on 4 taps, indices clamped at the borders.
    Bicubic,
    /// The separable Pillow-style filter: cubic with a = -0.5, stretched by
    /// the scale when shrinking, cut at the borders and renormalised.
    BicubicAntialias,
}

/// The cubic convolution kernel with parameter `a`.
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// For each output index along one axis: the source indices and weights.
fn taps(input: usize, output: usize, mode: Resampling) -> Vec<Vec<(usize, f64)>> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| match mode {
            Resampling::Bicubic => {
                // source = (dst + 0.5) * in / out - 0.5; 4 taps around it.
                let src = (o as f64 + 0.5) * scale - 0.5;
                let base = src.floor();
                let t = src - base;
                (-1i64..=2)
                    .map(|k| {
                        let i = (base as i64 + k).clamp(0, input as i64 - 1) as usize;
                        (i, cubic(t - k as f64, -0.75))
                    })
                    .collect()
            }
            Resampling::BicubicAntialias => {
                let stretch = scale.max(1.0);
                let support = 2.0 * stretch;
                let centre = (o as f64 + 0.5) * scale;
                let lo = ((centre - support + 0.5) as i64).max(0) as usize;
                let hi = ((centre + support + 0.5) as i64).min(input as i64) as usize;
                let mut w: Vec<(usize, f64)> = (lo..hi)
                    .map(|i| (i, cubic((i as f64 - centre + 0.5) / stretch, -0.5)))
                    .collect();
                let total: f64 = w.iter().map(|t| t.1).sum();
                if total != 0.0 {
                    w.iter_mut().for_each(|t| t.1 /= total);
                }
                w
            }
        })
        .collect()
}

/// Resamples an `[h, w, c]` grid (channels last) to `[oh, ow, c]`, as
/// PyTorch does on the `[c, h, w]` layout.
pub fn resize_hwc(
    src: &[f32],
    (h, w): (usize, usize),
    c: usize,
    (oh, ow): (usize, usize),
    mode: Resampling,
) -> Vec<f32> {
    let (ty, tx) = (taps(h, oh, mode), taps(w, ow, mode));
    let mut out = vec![0f32; oh * ow * c];
    let mut acc = vec![0f64; c];
    for (oy, wy) in ty.iter().enumerate() {
        for (ox, wx) in tx.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for &(sy, fy) in wy {
                for &(sx, fx) in wx {
                    let f = fy * fx;
                    let row = &src[(sy * w + sx) * c..][..c];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += f * f64::from(v);
                    }
                }
            }
            let dst = &mut out[(oy * ow + ox) * c..][..c];
            for (o, a) in dst.iter_mut().zip(&acc) {
                *o = *a as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(layout: VitLayout, d: usize, depth: usize, p: usize, g: usize) -> Shapes {
        let mut s = Shapes::new();
        let mut put = |k: String, v: Vec<usize>| {
            s.insert(k, v);
        };
        put(layout.cls_token().into(), vec![1, 1, d]);
        put(layout.pos_embed().into(), vec![1, g * g + 1, d]);
        put(format!("{}.weight", layout.patch_proj()), vec![d, 3, p, p]);
        for i in 0..depth {
            let b = format!("{}.{i}", layout.blocks());
            put(format!("{}.weight", layout.mlp_in(&b)), vec![4 * d, d]);
        }
        put(format!("{}.weight", layout.head()), vec![1000, d]);
        s
    }

    #[test]
    fn sizes_come_from_the_weights() {
        let s = shapes(VitLayout::Timm, 768, 12, 16, 14);
        assert_eq!(VitLayout::detect(&s), Some(VitLayout::Timm));
        let c = VitConfig::detect(&s, VitLayout::Timm, None).unwrap();
        assert_eq!((c.heads, c.mlp, c.input_size()), (12, 3072, 224));
        assert_eq!(c.variant(), "vit_base_patch16_224");
        let s = shapes(VitLayout::HuggingFace, 1024, 24, 32, 12);
        assert_eq!(VitLayout::detect(&s), Some(VitLayout::HuggingFace));
        let c = VitConfig::detect(&s, VitLayout::HuggingFace, None).unwrap();
        assert_eq!(c.variant(), "vit_large_patch32_384");
    }

    #[test]
    fn heads_of_a_custom_width_need_a_name() {
        let s = shapes(VitLayout::Timm, 48, 2, 16, 4);
        let err = VitConfig::detect(&s, VitLayout::Timm, None).unwrap_err();
        assert!(err.to_string().contains("name the architecture"), "{err}");
        let c = VitConfig::detect(&s, VitLayout::Timm, Some("vit_tiny_patch16_224")).unwrap();
        assert_eq!(c.heads, 3);
        // The wrong patch size, or a standard size under another name.
        assert!(VitConfig::detect(&s, VitLayout::Timm, Some("vit_tiny_patch32_224")).is_err());
        let s = shapes(VitLayout::Timm, 768, 12, 16, 14);
        assert!(VitConfig::detect(&s, VitLayout::Timm, Some("vit_small_patch16_224")).is_err());
    }

    #[test]
    fn malformed_position_embeddings_are_an_error() {
        let mut s = shapes(VitLayout::Timm, 192, 12, 16, 14);
        s.insert("pos_embed".into(), vec![1, 197 + 3, 192]);
        assert!(VitConfig::detect(&s, VitLayout::Timm, None).is_err());
        s.remove("pos_embed");
        assert!(VitConfig::detect(&s, VitLayout::Timm, None).is_err());
    }

    #[test]
    fn bicubic_at_the_same_size_is_the_identity() {
        let src: Vec<f32> = (0..4 * 5 * 2).map(|v| v as f32 * 0.37).collect();
        for mode in [Resampling::Bicubic, Resampling::BicubicAntialias] {
            assert_eq!(resize_hwc(&src, (4, 5), 2, (4, 5), mode), src);
        }
    }

    #[test]
    fn bicubic_matches_pytorch() {
        // torch.nn.functional.interpolate(torch.arange(9.).view(1,1,3,3) ** 2,
        //     size=(2, 4), mode="bicubic", align_corners=False)
        let src: Vec<f32> = (0..9).map(|v| (v * v) as f32).collect();
        let want = [
            0.935_634_6,
            2.008_327_5,
            4.969_211_6,
            7.684_482_6,
            29.348_543,
            36.258_278,
            48.344_27,
            56.896_57,
        ];
        let got = resize_hwc(&src, (3, 3), 1, (2, 4), Resampling::Bicubic);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
        // The same with antialias=True (timm's default).
        let want = [
            1.916_470_8,
            3.516_654_5,
            6.938_630_6,
            10.037_118,
            26.331_318,
            32.974_17,
            43.741_154,
            51.882_313,
        ];
        let got = resize_hwc(&src, (3, 3), 1, (2, 4), Resampling::BicubicAntialias);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
    }
}
