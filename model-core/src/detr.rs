//! DETR in the Hugging Face `DetrForObjectDetection` checkpoint layout
//! (`facebook/detr-resnet-50`, `detr-resnet-101`): a timm ResNet backbone
//! with frozen batch norm (`model.backbone.conv_encoder.model.*`), a 1x1
//! input projection, sine position embeddings, a post-norm transformer
//! encoder and decoder, and the class / box heads.
//!
//! Both key spellings load: the published checkpoints' (`self_attn.out_proj`,
//! `layers.N.fc1`) and transformers 5's module names (`self_attn.o_proj`,
//! `layers.N.mlp.fc1`, `model.backbone.model.*`). The head count is not in
//! the weights: every published DETR uses 8, other counts are passed in.
//!
//! Two ways in:
//! - [`Detr::forward`] takes a padded batch and its `pixel_mask`, exactly as
//!   the reference does: the backbone runs over the padding and the mask is
//!   shrunk to the feature map by nearest interpolation.
//! - [`Detr::forward_images`] takes images of any sizes and runs the backbone
//!   on each alone, then pads the feature maps: every image's result is the
//!   reference's result for that image alone, whatever it is batched with
//!   (the encoder and decoder ignore padded positions through the masks).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::layers::{multi_head_attention, pad2d, Activation, LayerNorm, Linear, Placement};
use crate::model_error::ModelError;
use crate::resnet::{ResNet, ResNetConfig};
use crate::weight_map::{child_indices, dim_of, Shapes, WeightMap};

pub const LAYOUT: &str = "huggingface detr";
/// Where the published checkpoints keep the backbone.
const BACKBONE: &str = "model.backbone.conv_encoder.model.";
/// Every published DETR checkpoint has 8 attention heads.
pub const DEFAULT_HEADS: usize = 8;
/// `nn.LayerNorm`'s default epsilon.
const LN_EPS: f64 = 1e-5;
/// The sine position embedding's temperature and scale (`normalize=True`).
const TEMPERATURE: f32 = 10000.0;
const POSITION_SCALE: f32 = 2.0 * std::f32::consts::PI;

/// Does this checkpoint look like a Hugging Face DETR?
pub fn matches(shapes: &Shapes) -> bool {
    shapes.contains_key("model.query_position_embeddings.weight")
}

/// The published checkpoints' name for a key in either spelling.
fn canonical_name(key: &str) -> String {
    let key = match key.strip_prefix("model.backbone.model.") {
        Some(rest) => format!("{BACKBONE}{rest}"),
        None => key.to_string(),
    };
    key.replace(".o_proj.", ".out_proj.")
        .replace(".mlp.fc1.", ".fc1.")
        .replace(".mlp.fc2.", ".fc2.")
}

/// What was read from a DETR checkpoint.
#[derive(Debug, Clone)]
pub struct DetrInfo {
    /// `detr-resnet-50`, `detr-resnet-101` or `detr-custom`.
    pub variant: String,
    /// Classes without the no-object class (91 for COCO: ids 0..=90).
    pub num_classes: usize,
    pub num_queries: usize,
    pub d_model: usize,
    pub heads: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub device: Device,
    pub dtype: DType,
}

/// Multi-head attention with the 1/sqrt(head dim) scale folded into the
/// query projection.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(wm: &WeightMap, prefix: &str, d: usize, heads: usize, p: &Placement) -> Result<Self> {
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let qw = wm.get(&format!("{prefix}.q_proj.weight"), &[d, d])?;
        let qb = wm.get(&format!("{prefix}.q_proj.bias"), &[d])?;
        Ok(Self {
            q: Linear::new(&(qw * scale)?, &(qb * scale)?, p)?,
            k: Linear::load(wm, &format!("{prefix}.k_proj"), d, d, p)?,
            v: Linear::load(wm, &format!("{prefix}.v_proj"), d, d, p)?,
            out: Linear::load(wm, &format!("{prefix}.out_proj"), d, d, p)?,
            heads,
        })
    }

    /// Queries `[B, Nq, D]` attend over keys and values `[B, Nk, D]`; `mask`
    /// `[B, 1, 1, Nk]` is added to the scores (0 or -inf). Returns
    /// `residual + attention`, the add done in the output projection.
    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (b, nk) = (keys.dim(0)?, keys.dim(1)?);
        let key_bias = mask.map(|m| m.reshape((b, nk))).transpose()?;
        let ctx = multi_head_attention(
            &self.q.forward(queries)?,
            &self.k.forward(keys)?,
            &self.v.forward(values)?,
            self.heads,
            key_bias.as_ref(),
        )?;
        self.out
            .forward_with(&ctx, Activation::None, Some(residual))
    }
}

/// The feed-forward part of a layer with its residual: x + fc2(relu(fc1(x))).
#[derive(Debug, Clone)]
struct FeedForward {
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn load(wm: &WeightMap, prefix: &str, d: usize, ffn: usize, p: &Placement) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(wm, &format!("{prefix}.fc1"), d, ffn, p)?,
            fc2: Linear::load(wm, &format!("{prefix}.fc2"), ffn, d, p)?,
        })
    }

    /// `x + fc2(relu(fc1(x)))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.fc1.forward_with(x, Activation::Relu, None)?;
        self.fc2.forward_with(&hidden, Activation::None, Some(x))
    }
}

fn layer_norm(wm: &WeightMap, prefix: &str, d: usize, p: &Placement) -> Result<LayerNorm> {
    LayerNorm::load(wm, prefix, d, LN_EPS, p)
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_norm: LayerNorm,
    ffn: FeedForward,
    final_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(wm: &WeightMap, i: usize, c: &Dims, p: &Placement) -> Result<Self> {
        let pre = format!("model.encoder.layers.{i}");
        Ok(Self {
            self_attn: Attention::load(wm, &format!("{pre}.self_attn"), c.d, c.heads, p)?,
            self_attn_norm: layer_norm(wm, &format!("{pre}.self_attn_layer_norm"), c.d, p)?,
            ffn: FeedForward::load(wm, &pre, c.d, c.encoder_ffn, p)?,
            final_norm: layer_norm(wm, &format!("{pre}.final_layer_norm"), c.d, p)?,
        })
    }

    /// Post-norm: the position embeddings go into the queries and keys only.
    fn forward(&self, x: &Tensor, pos: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let qk = (x + pos)?;
        let x = self.self_attn.forward(&qk, &qk, x, Some(mask), x)?;
        let x = self.self_attn_norm.forward(&x)?;
        self.final_norm.forward(&self.ffn.forward(&x)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_norm: LayerNorm,
    cross_attn: Attention,
    cross_attn_norm: LayerNorm,
    ffn: FeedForward,
    final_norm: LayerNorm,
}

impl DecoderLayer {
    fn load(wm: &WeightMap, i: usize, c: &Dims, p: &Placement) -> Result<Self> {
        let pre = format!("model.decoder.layers.{i}");
        Ok(Self {
            self_attn: Attention::load(wm, &format!("{pre}.self_attn"), c.d, c.heads, p)?,
            self_attn_norm: layer_norm(wm, &format!("{pre}.self_attn_layer_norm"), c.d, p)?,
            cross_attn: Attention::load(wm, &format!("{pre}.encoder_attn"), c.d, c.heads, p)?,
            cross_attn_norm: layer_norm(wm, &format!("{pre}.encoder_attn_layer_norm"), c.d, p)?,
            ffn: FeedForward::load(wm, &pre, c.d, c.decoder_ffn, p)?,
            final_norm: layer_norm(wm, &format!("{pre}.final_layer_norm"), c.d, p)?,
        })
    }

    /// `memory_keys` is the encoder output plus its position embeddings.
    fn forward(
        &self,
        x: &Tensor,
        query_pos: &Tensor,
        memory: &Tensor,
        memory_keys: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let qk = x.broadcast_add(query_pos)?;
        let x = self.self_attn.forward(&qk, &qk, x, None, x)?;
        let x = self.self_attn_norm.forward(&x)?;
        let q = x.broadcast_add(query_pos)?;
        let x = self
            .cross_attn
            .forward(&q, memory_keys, memory, Some(mask), &x)?;
        let x = self.cross_attn_norm.forward(&x)?;
        self.final_norm.forward(&self.ffn.forward(&x)?)
    }
}

/// Sizes read from the weights.
#[derive(Debug, Clone)]
struct Dims {
    d: usize,
    heads: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_ffn: usize,
    decoder_ffn: usize,
    num_queries: usize,
    /// Including the no-object class.
    logits: usize,
}

impl Dims {
    fn detect(shapes: &Shapes, heads: usize) -> std::result::Result<Self, ModelError> {
        let need = |key: &str, i: usize| {
            dim_of(shapes, key, i).ok_or_else(|| ModelError::UnknownLayout {
                reason: format!("a DETR checkpoint needs `{key}`"),
                keys: String::new(),
            })
        };
        let (num_queries, d) = (
            need("model.query_position_embeddings.weight", 0)?,
            need("model.query_position_embeddings.weight", 1)?,
        );
        if heads == 0 || d % heads != 0 {
            return Err(ModelError::UnknownLayout {
                reason: format!("{heads} attention heads do not divide the model width {d}"),
                keys: String::new(),
            });
        }
        let count = |prefix: &str| {
            child_indices(shapes, prefix)
                .iter()
                .max()
                .map_or(0, |m| m + 1)
        };
        let ffn = |stack: &str| -> std::result::Result<usize, ModelError> {
            need(&format!("model.{stack}.layers.0.fc1.weight"), 0)
        };
        Ok(Self {
            d,
            heads,
            encoder_layers: count("model.encoder.layers"),
            decoder_layers: count("model.decoder.layers"),
            encoder_ffn: ffn("encoder")?,
            decoder_ffn: ffn("decoder")?,
            num_queries,
            logits: need("class_labels_classifier.weight", 0)?,
        })
    }
}

/// A loaded DETR detector.
#[derive(Debug, Clone)]
pub struct Detr {
    info: DetrInfo,
    backbone: ResNet,
    input_projection: Linear,
    /// `[1, Q, D]`.
    query_pos: Tensor,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    decoder_norm: LayerNorm,
    class_head: Linear,
    box_head: [Linear; 3],
    placement: Placement,
}

impl Detr {
    /// Loads a checkpoint; `heads` defaults to [`DEFAULT_HEADS`].
    pub fn load(
        tensors: HashMap<String, Tensor>,
        heads: Option<usize>,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .collect();
        let wm = WeightMap::new(tensors);
        let shapes = wm.shapes();
        if !matches(&shapes) {
            return Err(ModelError::unknown_layout(
                "not a DETR checkpoint (no `model.query_position_embeddings.weight`)",
                &shapes,
            ));
        }
        let backbone_shapes: Shapes = shapes
            .iter()
            .filter_map(|(k, s)| Some((k.strip_prefix(BACKBONE)?.to_string(), s.clone())))
            .collect();
        let backbone_config = ResNetConfig::detect_backbone(&backbone_shapes)?;
        let backbone_out = backbone_config.stages.last().map_or(0, |s| s.out);
        let variant = match backbone_config.variant() {
            "resnet50" => "detr-resnet-50",
            "resnet101" => "detr-resnet-101",
            _ => "detr-custom",
        }
        .to_string();
        let dims = Dims::detect(&shapes, heads.unwrap_or(DEFAULT_HEADS))?;
        let p = Placement::new(device, dtype);
        let backbone = ResNet::load_backbone(&wm, backbone_config, BACKBONE, &p)?;
        let d = dims.d;
        let input_projection =
            Linear::load_conv1x1(&wm, "model.input_projection", backbone_out, d, &p)?;
        let query_pos = wm.get(
            "model.query_position_embeddings.weight",
            &[dims.num_queries, d],
        )?;
        let query_pos = p.place(&query_pos.unsqueeze(0)?)?;
        let encoder = (0..dims.encoder_layers)
            .map(|i| EncoderLayer::load(&wm, i, &dims, &p))
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..dims.decoder_layers)
            .map(|i| DecoderLayer::load(&wm, i, &dims, &p))
            .collect::<Result<Vec<_>>>()?;
        let decoder_norm = layer_norm(&wm, "model.decoder.layernorm", d, &p)?;
        let class_head = Linear::load(&wm, "class_labels_classifier", d, dims.logits, &p)?;
        let mlp = |i: usize, out: usize| {
            Linear::load(&wm, &format!("bbox_predictor.layers.{i}"), d, out, &p)
        };
        let box_head = [mlp(0, d)?, mlp(1, d)?, mlp(2, 4)?];
        wm.finish(&format!("{LAYOUT} ({variant})"))?;
        Ok(Self {
            info: DetrInfo {
                variant,
                num_classes: dims.logits.saturating_sub(1),
                num_queries: dims.num_queries,
                d_model: d,
                heads: dims.heads,
                encoder_layers: dims.encoder_layers,
                decoder_layers: dims.decoder_layers,
                device: device.clone(),
                dtype,
            },
            backbone,
            input_projection,
            query_pos,
            encoder,
            decoder,
            decoder_norm,
            class_head,
            box_head,
            placement: p,
        })
    }

    pub fn info(&self) -> &DetrInfo {
        &self.info
    }

    /// The reference's forward: `pixel_values` `[B, 3, H, W]` (normalised,
    /// padded bottom/right), `pixel_mask` `[B, H, W]` (non-zero = image) ->
    /// `(logits [B, Q, classes + 1], pred_boxes [B, Q, 4])`, boxes as
    /// normalised (cx, cy, w, h) of each image's own (unpadded) extent.
    pub fn forward(&self, pixel_values: &Tensor, pixel_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) = pixel_values.dims4()?;
        if pixel_mask.dims() != [b, h, w] {
            candle_core::bail!(
                "pixel_mask has shape {:?}, expected [{b}, {h}, {w}] to match pixel_values",
                pixel_mask.dims()
            );
        }
        let x = self.placement.place(pixel_values)?;
        let features = self.backbone.features(&x)?;
        let (_, _, fh, fw) = features.dims4()?;
        let pixels: Vec<f32> = pixel_mask
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let (rows, cols) = (nearest_indices(h, fh), nearest_indices(w, fw));
        let mut mask = Vec::with_capacity(b * fh * fw);
        for i in 0..b {
            for &r in &rows {
                for &c in &cols {
                    mask.push(pixels[(i * h + r) * w + c] != 0.0);
                }
            }
        }
        self.transformer(&features, &mask)
    }

    /// Images of any sizes, each `[3, H_i, W_i]` (normalised, unpadded): the
    /// backbone runs on each alone, so each image's outputs are the ones it
    /// has alone. Outputs as in [`Detr::forward`], in the order given.
    pub fn forward_images(&self, images: &[Tensor]) -> Result<(Tensor, Tensor)> {
        if images.is_empty() {
            candle_core::bail!("no images");
        }
        let features = images
            .iter()
            .map(|img| {
                let img = self.placement.place(img)?;
                self.backbone.features(&img.unsqueeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let sizes: Vec<(usize, usize)> = features
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<_>>()?;
        let fh = sizes.iter().map(|s| s.0).max().unwrap_or(0);
        let fw = sizes.iter().map(|s| s.1).max().unwrap_or(0);
        let padded = features
            .iter()
            .zip(&sizes)
            .map(|(f, &(h, w))| pad2d(f, (0, fh - h, 0, fw - w)))
            .collect::<Result<Vec<_>>>()?;
        let mut mask = Vec::with_capacity(images.len() * fh * fw);
        for &(h, w) in &sizes {
            for r in 0..fh {
                mask.extend((0..fw).map(|c| r < h && c < w));
            }
        }
        self.transformer(&Tensor::cat(&padded, 0)?, &mask)
    }

    /// Encoder, decoder and heads over backbone features `[B, C, h, w]`;
    /// `mask` (`B * h * w`, row-major) marks the positions that are image.
    fn transformer(&self, features: &Tensor, mask: &[bool]) -> Result<(Tensor, Tensor)> {
        let (b, c, fh, fw) = features.dims4()?;
        let (n, d) = (fh * fw, self.info.d_model);
        let device = &self.placement.device;
        let tokens = features
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((b * n, c))?;
        let x = self.input_projection.forward(&tokens)?.reshape((b, n, d))?;
        let pos = sine_position_embedding(mask, b, fh, fw, d);
        let pos = self
            .placement
            .place(&Tensor::from_vec(pos, (b, n, d), &Device::Cpu)?)?;
        let additive: Vec<f32> = mask
            .iter()
            .map(|&m| if m { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let key_mask =
            self.placement
                .place(&Tensor::from_vec(additive, (b, 1, 1, n), &Device::Cpu)?)?;

        let mut memory = x;
        for layer in &self.encoder {
            memory = layer.forward(&memory, &pos, &key_mask)?;
        }
        let memory_keys = (&memory + &pos)?;
        let q = self.info.num_queries;
        let mut x = Tensor::zeros((b, q, d), self.placement.dtype, device)?;
        for layer in &self.decoder {
            x = layer.forward(&x, &self.query_pos, &memory, &memory_keys, &key_mask)?;
        }
        let x = self.decoder_norm.forward(&x)?.reshape((b * q, d))?;
        let logits = self.class_head.forward(&x)?;
        let hidden = self.box_head[0].forward(&x)?.relu()?;
        let hidden = self.box_head[1].forward(&hidden)?.relu()?;
        let boxes = candle_nn::ops::sigmoid(&self.box_head[2].forward(&hidden)?)?;
        Ok((
            logits.reshape((b, q, self.info.num_classes + 1))?,
            boxes.reshape((b, q, 4))?,
        ))
    }
}

/// PyTorch's `interpolate(mode="nearest")` source index for each of `output`
/// positions sampled from `input` (computed in f32, as it does).
fn nearest_indices(input: usize, output: usize) -> Vec<usize> {
    if input == output {
        return (0..output).collect();
    }
    if output == 2 * input {
        return (0..output).map(|i| i >> 1).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1))
        .collect()
}

/// DETR's normalised sine position embedding, `[B, h * w, d]` row-major:
/// the first d/2 channels encode the row, the last d/2 the column, each as
/// interleaved sin/cos pairs of the position (counted over the mask, divided
/// by the image's extent, times 2 pi) over geometric frequencies.
fn sine_position_embedding(mask: &[bool], b: usize, h: usize, w: usize, d: usize) -> Vec<f32> {
    let npf = d / 2;
    let freqs: Vec<f32> = (0..npf)
        .map(|k| TEMPERATURE.powf((2 * (k / 2)) as f32 / npf as f32))
        .collect();
    let mut out = vec![0f32; b * h * w * d];
    for i in 0..b {
        let m = &mask[i * h * w..(i + 1) * h * w];
        // Cumulative counts down the columns and along the rows.
        let mut y = vec![0f32; h * w];
        let mut x = vec![0f32; h * w];
        for r in 0..h {
            for c in 0..w {
                let v = m[r * w + c] as u8 as f32;
                y[r * w + c] = v + if r > 0 { y[(r - 1) * w + c] } else { 0.0 };
                x[r * w + c] = v + if c > 0 { x[r * w + c - 1] } else { 0.0 };
            }
        }
        for r in 0..h {
            for c in 0..w {
                let ye = y[r * w + c] / (y[(h - 1) * w + c] + 1e-6) * POSITION_SCALE;
                let xe = x[r * w + c] / (x[r * w + w - 1] + 1e-6) * POSITION_SCALE;
                let o = &mut out[((i * h + r) * w + c) * d..][..d];
                for (k, f) in freqs.iter().enumerate() {
                    let (vy, vx) = (ye / f, xe / f);
                    let (sy, sx) = if k % 2 == 0 {
                        (vy.sin(), vx.sin())
                    } else {
                        (vy.cos(), vx.cos())
                    };
                    o[k] = sy;
                    o[npf + k] = sx;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_key_spellings_are_one() {
        assert_eq!(
            canonical_name("model.backbone.model.layer1.0.conv1.weight"),
            "model.backbone.conv_encoder.model.layer1.0.conv1.weight"
        );
        assert_eq!(
            canonical_name("model.encoder.layers.3.self_attn.o_proj.bias"),
            "model.encoder.layers.3.self_attn.out_proj.bias"
        );
        assert_eq!(
            canonical_name("model.decoder.layers.0.mlp.fc2.weight"),
            "model.decoder.layers.0.fc2.weight"
        );
        let published = "model.decoder.layers.5.encoder_attn.out_proj.weight";
        assert_eq!(canonical_name(published), published);
    }

    #[test]
    fn nearest_matches_pytorch() {
        // F.interpolate(size=4) of 120 rows samples 0, 30, 60, 90.
        assert_eq!(nearest_indices(120, 4), vec![0, 30, 60, 90]);
        assert_eq!(nearest_indices(7, 3), vec![0, 2, 4]);
        assert_eq!(nearest_indices(5, 5), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn position_embedding_ignores_padding() {
        // A 2x3 image alone and the same image padded to 3x4: the image's
        // positions get the same embedding.
        let d = 8;
        let alone = sine_position_embedding(&[true; 6], 1, 2, 3, d);
        let mut mask = vec![false; 12];
        for r in 0..2 {
            for c in 0..3 {
                mask[r * 4 + c] = true;
            }
        }
        let padded = sine_position_embedding(&mask, 1, 3, 4, d);
        for r in 0..2 {
            for c in 0..3 {
                let a = &alone[(r * 3 + c) * d..][..d];
                let p = &padded[(r * 4 + c) * d..][..d];
                for (x, y) in a.iter().zip(p) {
                    assert!((x - y).abs() < 1e-6, "{r},{c}: {a:?} vs {p:?}");
                }
            }
        }
        // The last row and column sit at 2 pi: sin(2 pi / 1) = 0 on channel 0.
        let last = &alone[5 * d..][..d];
        assert!(last[0].abs() < 1e-5 && last[d / 2].abs() < 1e-5);
    }
}
