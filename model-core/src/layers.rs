//! Building blocks shared by the convolutional families: convolutions with
//! their batch norm folded in at load time, activations, linear layers.
//!
//! Everything runs through candle ops on whatever `Device` the model lives
//! on; nothing here is CPU-specific. The weights are folded in f32 on the
//! CPU (see [`WeightMap`]) and moved to the model's device and dtype once.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor, D};

pub use crate::activation::Activation;
use crate::cpu_conv::{self, ConvGeometry, Epilogue};
use crate::cpu_transformer;
use crate::sgemm::{PackedLhs, PackedRhs};
use crate::team;
use crate::weight_map::WeightMap;
use crate::winograd::{self, LazyWinograd};

/// Where and in what precision a model's weights live.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Placement {
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
        }
    }

    /// Moves a folded f32 CPU tensor to the model's device and dtype, laid
    /// out contiguously so that no op has to copy it again per forward.
    pub fn place(&self, t: &Tensor) -> Result<Tensor> {
        t.to_dtype(self.dtype)?
            .to_device(&self.device)?
            .contiguous()
    }

    /// Whether the model runs on the host kernels (f32 on the CPU).
    pub fn is_host_f32(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32 && host_kernels_enabled()
    }
}

/// Whether 3x3 stride-1 convolutions on the host run by Winograd's
/// F(4x4, 3x3) where it pays (the default); `FOVEA_WINOGRAD=off` keeps them
/// on the direct kernel, to compare the two.
pub fn winograd_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| switched_on("FOVEA_WINOGRAD"))
}

/// Whether Fovea's own CPU kernels run (the default). With
/// `FOVEA_HOST_KERNELS=off` every layer goes through candle's ops instead,
/// exactly as on CUDA and Metal: the GPU code path can then be checked
/// against the references on a CPU, and the kernels' gain measured.
pub fn host_kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| switched_on("FOVEA_HOST_KERNELS"))
}

/// A switch that is on unless the environment variable says `off`, `0` or
/// `false`.
fn switched_on(var: &str) -> bool {
    !matches!(std::env::var(var).as_deref(), Ok("off" | "0" | "false"))
}

/// A folded f32 CPU tensor's elements, row-major, for the host kernels.
fn host_vec(t: &Tensor) -> Result<Arc<[f32]>> {
    Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into())
}

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of zeros on every side (PyTorch's `padding=p`).
    Symmetric(usize),
    /// TensorFlow's 'SAME': the output is `ceil(in / stride)` and the extra
    /// zero, if the total is odd, goes to the bottom/right. It depends on the
    /// input size, so it is computed per forward.
    TfSame,
}

/// `(before, after)` zeros for one spatial dimension under TF 'same' padding.
pub fn tf_same_pad(input: usize, kernel: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let needed = (out.saturating_sub(1)) * stride + (kernel - 1) * dilation + 1;
    let total = needed.saturating_sub(input);
    (total / 2, total - total / 2)
}

/// timm's symmetric padding for odd kernels: `((stride - 1) + dilation * (k - 1)) / 2`.
pub fn symmetric_pad(kernel: usize, stride: usize, dilation: usize) -> usize {
    ((stride - 1) + dilation * (kernel - 1)) / 2
}

/// The geometry of a convolution, as the architecture knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
    pub padding: Padding,
}

impl ConvSpec {
    /// A plain convolution: dilation 1, one group.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            dilation: 1,
            groups: 1,
            padding: Padding::Symmetric(kernel / 2),
        }
    }

    /// One filter per channel.
    pub fn depthwise(channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            groups: channels,
            ..Self::new(channels, channels, kernel, stride)
        }
    }

    pub fn with_padding(self, padding: Padding) -> Self {
        Self { padding, ..self }
    }

    /// The shape PyTorch stores the weight in: `[out, in / groups, k, k]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups.max(1),
            self.kernel,
            self.kernel,
        ]
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.in_channels == self.out_channels
    }
}

/// How the forward pass computes a convolution, picked once at load time.
#[derive(Debug, Clone)]
enum ConvKernel {
    /// f32 on the CPU, one group: Fovea's own kernel ([`cpu_conv::dense`]),
    /// weights `[O, C * k * k]` packed for the gemm, bias `[O]`; for a 3x3
    /// at stride 1 also the Winograd form ([`winograd::conv`]), run (and
    /// its weights built) where the input has enough tiles
    /// ([`winograd::pays`]).
    CpuDense(PackedLhs, Arc<[f32]>, Option<Arc<LazyWinograd>>),
    /// f32 on the CPU, depthwise ([`cpu_conv::depthwise`]): taps
    /// `[k, k, C]` ([`cpu_conv::pack_depthwise`]), bias `[C]`.
    CpuDepthwise(Arc<[f32]>, Arc<[f32]>),
    /// 1x1, unpadded, one group: a plain gemm over the channels, `[O, C]`
    /// (after subsampling, if strided). candle's own 1x1 path copies the
    /// input and output element by element and its strided path builds an
    /// im2col matrix; this measured 2x (stride 1) and 1.6-3x (stride 2)
    /// faster on the CPU.
    Pointwise(Tensor),
    /// One filter per channel: one `[1, C, 1, 1]` weight tensor per tap, in
    /// row-major tap order. candle's grouped convolution runs one convolution
    /// per channel (on every device), 15-60x slower here than this sum of
    /// shifted, scaled views, which is plain elementwise work.
    Depthwise(Vec<Tensor>),
    /// k x k with one group on the CPU: an im2col matrix built from shifted
    /// views (one copy), then one gemm per image. The weights are `[O, k*k*C]`
    /// with the taps outermost, matching the rows of the matrix. candle's
    /// CPU convolution re-lays out the weights and the input on every call;
    /// this measured 1.5-2x faster.
    Im2col(Tensor),
    /// Anything else, and k x k on other devices (where candle has cuDNN /
    /// its own kernels): candle's convolution, `[O, C / groups, k, k]`.
    General(Tensor),
}

/// A convolution (with its batch norm folded in, if it had one), a bias and
/// an activation.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: ConvKernel,
    /// `[1, O, 1, 1]`, ready to broadcast over the output.
    bias: Tensor,
    spec: ConvSpec,
    act: Activation,
}

/// The four tensors of a batch norm, f32 on the CPU.
struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl BatchNorm {
    fn load(wm: &WeightMap, prefix: &str, channels: usize) -> Result<Self> {
        let get = |name: &str| wm.get(&format!("{prefix}.{name}"), &[channels]);
        Ok(Self {
            gamma: get("weight")?,
            beta: get("bias")?,
            mean: get("running_mean")?,
            var: get("running_var")?,
        })
    }

    /// Folds this batch norm into the preceding convolution:
    /// `w' = w * s`, `b' = beta + (b - mean) * s` with `s = gamma / sqrt(var + eps)`
    /// per output channel.
    fn fold(&self, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<(Tensor, Tensor)> {
        let scale = self.gamma.broadcast_div(&(&self.var + eps)?.sqrt()?)?;
        let out = scale.dim(0)?;
        let w = weight.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
        let centred = match bias {
            Some(b) => (b - &self.mean)?,
            None => self.mean.neg()?,
        };
        let b = (centred * &scale)?.add(&self.beta)?;
        Ok((w, b))
    }
}

impl Conv2d {
    /// A bias-free convolution at `conv` followed by the batch norm at `bn`,
    /// folded into one convolution.
    pub fn load_bn(
        wm: &WeightMap,
        conv: &str,
        bn: &str,
        spec: ConvSpec,
        eps: f64,
        act: Activation,
        placement: &Placement,
    ) -> Result<Self> {
        let weight = wm.get(&format!("{conv}.weight"), &spec.weight_shape())?;
        let conv_bias = if wm.contains(&format!("{conv}.bias")) {
            Some(wm.get(&format!("{conv}.bias"), &[spec.out_channels])?)
        } else {
            None
        };
        let bn = BatchNorm::load(wm, bn, spec.out_channels)?;
        let (w, b) = bn.fold(&weight, conv_bias.as_ref(), eps)?;
        Self::from_folded(&w, &b, spec, act, placement)
    }

    /// A convolution with its own bias and no batch norm.
    pub fn load_biased(
        wm: &WeightMap,
        prefix: &str,
        spec: ConvSpec,
        act: Activation,
        placement: &Placement,
    ) -> Result<Self> {
        let w = wm.get(&format!("{prefix}.weight"), &spec.weight_shape())?;
        let b = wm.get(&format!("{prefix}.bias"), &[spec.out_channels])?;
        Self::from_folded(&w, &b, spec, act, placement)
    }

    /// Builds the convolution from f32 CPU weights `[O, C/g, k, k]` and bias `[O]`.
    pub fn from_folded(
        weight: &Tensor,
        bias: &Tensor,
        spec: ConvSpec,
        act: Activation,
        placement: &Placement,
    ) -> Result<Self> {
        let [o, c, k, _] = spec.weight_shape();
        // A 1x1 convolution never pads under TF 'same' (ceil(in / s) outputs
        // fit without), and timm's symmetric padding for it is 0.
        let unpadded = matches!(spec.padding, Padding::Symmetric(0) | Padding::TfSame);
        let cpu_f32 = placement.is_host_f32();
        let kernel = if cpu_f32 && spec.groups == 1 {
            let w = host_vec(weight)?;
            let winograd = (k == 3 && spec.stride == 1 && spec.dilation == 1 && winograd_enabled())
                .then(Arc::default);
            ConvKernel::CpuDense(PackedLhs::new(&w, o, c * k * k), host_vec(bias)?, winograd)
        } else if cpu_f32 && spec.is_depthwise() {
            let packed = cpu_conv::pack_depthwise(&host_vec(weight)?, o);
            ConvKernel::CpuDepthwise(packed.into(), host_vec(bias)?)
        } else if k == 1 && spec.groups == 1 && spec.dilation == 1 && unpadded {
            ConvKernel::Pointwise(placement.place(&weight.reshape((o, c))?)?)
        } else if spec.is_depthwise() {
            // In the dtype the taps are summed in (see `depthwise_sum`).
            let sums = Placement::new(&placement.device, accumulation_dtype(placement.dtype));
            let taps = weight.reshape((o, k * k))?.t()?.contiguous()?;
            let taps = (0..k * k)
                .map(|i| sums.place(&taps.get(i)?.reshape((1, o, 1, 1))?))
                .collect::<Result<Vec<_>>>()?;
            ConvKernel::Depthwise(taps)
        } else if spec.groups == 1 && placement.device.is_cpu() && host_kernels_enabled() {
            let taps_first = weight
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .reshape((o, k * k * c))?;
            ConvKernel::Im2col(placement.place(&taps_first)?)
        } else {
            ConvKernel::General(placement.place(weight)?)
        };
        Ok(Self {
            kernel,
            bias: placement.place(&bias.reshape((1, o, 1, 1))?)?,
            spec,
            act,
        })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// `(top, bottom, left, right)` zeros for an `h` x `w` input.
    fn pads(&self, h: usize, w: usize) -> (usize, usize, usize, usize) {
        let s = &self.spec;
        match s.padding {
            Padding::Symmetric(p) => (p, p, p, p),
            Padding::TfSame => {
                let (t, b) = tf_same_pad(h, s.kernel, s.stride, s.dilation);
                let (l, r) = tf_same_pad(w, s.kernel, s.stride, s.dilation);
                (t, b, l, r)
            }
        }
    }

    /// `act(conv(x) + bias + residual)`: the residual (the output's shape)
    /// is added before the activation, as in a ResNet block.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.profiled(x.dims4()?, "+res", || {
            if self.runs_on_host() {
                return self.host_forward(std::slice::from_ref(x), Some(residual));
            }
            self.act.apply(&(self.conv_bias(x)? + residual)?)
        })
    }

    /// The convolution of the channel concatenation of `parts` (`[B, C_j,
    /// H, W]` each), as `forward(&Tensor::cat(parts, 1))` computes it. Fovea's
    /// dense CPU kernel reads the parts where they lie; elsewhere they are
    /// concatenated first.
    pub fn forward_cat(&self, parts: &[Tensor]) -> Result<Tensor> {
        let on_host = matches!(self.kernel, ConvKernel::CpuDense(..));
        match parts {
            [x] => self.forward(x),
            _ if on_host && parts.iter().all(is_host_f32) => {
                let (b, _, h, w) = parts[0].dims4()?;
                let mut channels = 0;
                for part in parts {
                    let (pb, c, ph, pw) = part.dims4()?;
                    if (pb, ph, pw) != (b, h, w) {
                        candle_core::bail!(
                            "cannot concatenate {:?} with {:?}",
                            part.dims(),
                            parts[0].dims()
                        )
                    }
                    channels += c;
                }
                self.profiled((b, channels, h, w), " cat", || {
                    self.host_forward(parts, None)
                })
            }
            _ => self.forward(&Tensor::cat(parts, 1)?),
        }
    }

    /// Runs `f` under the per-layer profile (see [`crate::profile`]).
    fn profiled(
        &self,
        (b, c, h, w): (usize, usize, usize, usize),
        extra: &str,
        f: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if !crate::profile::enabled() {
            return f();
        }
        let start = crate::profile::start();
        let y = f()?;
        let time = crate::profile::elapsed(start);
        let (_, o, ho, wo) = y.dims4()?;
        let s = &self.spec;
        let k = s.kernel;
        let kind = if s.is_depthwise() { " dw" } else { "" };
        let key = format!(
            "conv {k}x{k}/{}{kind} {c}->{o} at {h}x{w} {:?}{extra}",
            s.stride, self.act
        );
        // 2 flops per multiply-add: outputs * inputs per output.
        let taps = (c / s.groups.max(1) * k * k) as u64;
        crate::profile::record(key, time, 2 * (b * o * ho * wo) as u64 * taps);
        Ok(y)
    }

    fn runs_on_host(&self) -> bool {
        matches!(
            self.kernel,
            ConvKernel::CpuDense(..) | ConvKernel::CpuDepthwise(..)
        )
    }

    /// The whole layer through [`cpu_conv`], reading the input (the channel
    /// concatenation of `parts`, which share their other dimensions) and the
    /// residual in place.
    fn host_forward(&self, parts: &[Tensor], residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, h, w) = parts[0].dims4()?;
        let c = parts.iter().map(|p| p.dim(1)).sum::<Result<usize>>()?;
        if c != self.spec.in_channels {
            candle_core::bail!("{c} input channels, expected {}", self.spec.in_channels)
        }
        let s = &self.spec;
        let (top, bottom, left, right) = self.pads(h, w);
        let span = (s.kernel - 1) * s.dilation + 1;
        let (hp, wp) = (h + top + bottom, w + left + right);
        if hp < span || wp < span {
            candle_core::bail!("a {h}x{w} input is smaller than the {span}x{span} kernel")
        }
        let g = ConvGeometry {
            batch: b,
            in_channels: c,
            height: h,
            width: w,
            out_channels: s.out_channels,
            kernel: s.kernel,
            stride: s.stride,
            dilation: s.dilation,
            pad_top: top,
            pad_left: left,
            out_height: (hp - span) / s.stride + 1,
            out_width: (wp - span) / s.stride + 1,
        };
        let out_shape = (b, g.out_channels, g.out_height, g.out_width);
        if let Some(r) = residual {
            if r.dims() != [out_shape.0, out_shape.1, out_shape.2, out_shape.3] {
                candle_core::bail!(
                    "residual {:?} does not match the output {out_shape:?}",
                    r.dims()
                )
            }
        }
        let y = with_host_f32_parts(parts, |xs| match residual {
            Some(r) => with_host_f32(r, |rs| self.host_kernel(xs, &g, Some(rs))),
            None => Ok(self.host_kernel(xs, &g, None)),
        })??;
        Tensor::from_vec(y, out_shape, &Device::Cpu)
    }

    fn host_kernel(&self, x: &[&[f32]], g: &ConvGeometry, residual: Option<&[f32]>) -> Vec<f32> {
        let epilogue = |bias| Epilogue {
            bias,
            residual,
            act: self.act,
        };
        match (&self.kernel, x) {
            (ConvKernel::CpuDense(w, b, Some(lazy)), _) if winograd::pays(g) => {
                winograd::conv(x, g, lazy.get(w), &epilogue(b))
            }
            (ConvKernel::CpuDense(w, b, _), _) => cpu_conv::dense(x, g, w, &epilogue(b)),
            (ConvKernel::CpuDepthwise(w, b), [x]) => cpu_conv::depthwise(x, g, w, &epilogue(b)),
            _ => unreachable!("host_kernel runs the host kernels, a depthwise one on one part"),
        }
    }

    /// Convolution and bias, without the activation.
    fn conv_bias(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let pads = self.pads(h, w);
        let y = match &self.kernel {
            ConvKernel::CpuDense(..) | ConvKernel::CpuDepthwise(..) => {
                unreachable!("the host kernels finish the whole layer in host_forward")
            }
            ConvKernel::Pointwise(w2) => pointwise(&subsample(x, self.spec.stride)?, w2)?,
            ConvKernel::Depthwise(taps) => depthwise(&pad2d(x, pads)?, taps, &self.spec)?,
            ConvKernel::Im2col(w2) => im2col(&pad2d(x, pads)?, w2, &self.spec)?,
            ConvKernel::General(weight) => {
                let (t, b, l, r) = pads;
                let s = &self.spec;
                if t == b && l == r && t == l {
                    x.conv2d(weight, t, s.stride, s.dilation, s.groups)?
                } else {
                    // candle pads symmetrically only: pad the odd zero explicitly.
                    pad2d(x, pads)?.conv2d(weight, 0, s.stride, s.dilation, s.groups)?
                }
            }
        };
        y.broadcast_add(&self.bias)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.profiled(x.dims4()?, "", || {
            if self.runs_on_host() {
                return self.host_forward(std::slice::from_ref(x), None);
            }
            self.act.apply(&self.conv_bias(x)?)
        })
    }
}

/// Whether `t` is f32 on the CPU: the host kernels' domain.
pub fn is_host_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && host_kernels_enabled()
}

/// Calls `f` with the elements of an f32 CPU tensor in row-major order,
/// without a copy when the tensor is already contiguous.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_host_f32_parts(std::slice::from_ref(t), |data| f(data[0]))
}

/// [`with_host_f32`] for several tensors at once.
pub fn with_host_f32_parts<R>(ts: &[Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (t, (storage, layout)) in ts.iter().zip(&guards) {
        match &**storage {
            Storage::Cpu(CpuStorage::F32(data)) => {
                let start = layout.start_offset();
                slices.push(&data[start..start + layout.shape().elem_count()]);
            }
            _ => candle_core::bail!(
                "expected an f32 CPU tensor, got {:?} on {:?}",
                t.dtype(),
                t.device()
            ),
        }
    }
    Ok(f(&slices))
}

/// `kernel x kernel` max pool of `[B, C, H, W]` with stride `stride` and
/// `pad` pixels of padding on every side that never win (PyTorch pads with
/// -inf), so every window is cut at the image's edges. On the host one pass
/// per plane along the rows and one down the columns (a max filter is
/// separable), the planes spread over the threads; elsewhere candle's pool
/// over edge-replicated padding, which gives the same maxima: a window that
/// reaches past an edge contains the edge pixel itself.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h.min(w) + 2 * pad < kernel || pad >= kernel || stride == 0 {
        candle_core::bail!("max pool {kernel}/{stride} pad {pad} does not fit a {h}x{w} input");
    }
    if !is_host_f32(x) {
        return x
            .pad_with_same(2, pad, pad)?
            .pad_with_same(3, pad, pad)?
            .max_pool2d_with_stride(kernel, stride);
    }
    let out_side = |n: usize| (n + 2 * pad - kernel) / stride + 1;
    let (ho, wo) = (out_side(h), out_side(w));
    // Output index o reads input [o * stride - pad, o * stride - pad + kernel).
    let window = |n: usize, o: usize| {
        (o * stride).saturating_sub(pad)..(o * stride + kernel).saturating_sub(pad).min(n)
    };
    let y = with_host_f32(x, |x| {
        let mut out = vec![0f32; b * c * ho * wo];
        // Runs of planes, one buffer of column maxima each.
        let planes = b * c;
        let run = planes.div_ceil((4 * team::threads()).min(planes).max(1));
        team::for_each_chunk(&mut out, run * ho * wo, |index, outs| {
            let mut columns = vec![0f32; w];
            for (k, out) in outs.chunks_exact_mut(ho * wo).enumerate() {
                let plane = &x[(index * run + k) * h * w..][..h * w];
                for (oy, dst) in out.chunks_exact_mut(wo).enumerate() {
                    // Down the columns over whole rows (contiguous, in
                    // vectors), then along the row.
                    columns.fill(f32::NEG_INFINITY);
                    for src in window(h, oy).map(|r| &plane[r * w..][..w]) {
                        for (m, &v) in columns.iter_mut().zip(src) {
                            *m = m.max(v);
                        }
                    }
                    match stride {
                        1 => row_max::<1>(&columns, dst, kernel, pad),
                        2 => row_max::<2>(&columns, dst, kernel, pad),
                        _ => {
                            for (o, d) in dst.iter_mut().enumerate() {
                                *d = columns[window(w, o)]
                                    .iter()
                                    .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                            }
                        }
                    }
                }
            }
        });
        out
    })?;
    Tensor::from_vec(y, (b, c, ho, wo), &Device::Cpu)
}

/// `dst[o]` = the maximum of `src[o * S - pad ..][..kernel]`, cut at the
/// row's ends. `S` is a constant so that the strided reads vectorise.
fn row_max<const S: usize>(src: &[f32], dst: &mut [f32], kernel: usize, pad: usize) {
    let n = src.len();
    // Outputs whose windows lie inside the row.
    let first = pad.div_ceil(S).min(dst.len());
    let last = if n + pad >= kernel {
        ((n + pad - kernel) / S + 1).clamp(first, dst.len())
    } else {
        first
    };
    let cut = |o: usize| {
        let start = (o * S).saturating_sub(pad);
        src[start..(o * S + kernel).saturating_sub(pad).min(n)]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
    };
    for o in (0..first).chain(last..dst.len()) {
        dst[o] = cut(o);
    }
    let inside = &mut dst[first..last];
    if inside.is_empty() {
        return;
    }
    inside.fill(f32::NEG_INFINITY);
    for tap in 0..kernel {
        let from = first * S + tap - pad;
        for (o, d) in inside.iter_mut().enumerate() {
            *d = d.max(src[from + o * S]);
        }
    }
}

/// Zero-pads the two spatial dimensions; a no-op when all pads are zero.
pub fn pad2d(
    x: &Tensor,
    (top, bottom, left, right): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let x = if top + bottom > 0 {
        x.pad_with_zeros(2, top, bottom)?
    } else {
        x.clone()
    };
    if left + right > 0 {
        x.pad_with_zeros(3, left, right)
    } else {
        Ok(x)
    }
}

/// 1x1 stride-1 convolution as `[O, C] x [B, C, H*W]`, broadcasting the
/// weights over the batch without copying them.
fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let x = x.contiguous()?.reshape((b, c, h * wd))?;
    let y = if b == 1 {
        w.matmul(&x.squeeze(0)?)?.unsqueeze(0)?
    } else {
        w.broadcast_as((b, o, c))?.matmul(&x)?
    };
    y.reshape((b, o, h, wd))
}

/// Every `stride`-th row and column, starting with the first: what an
/// unpadded 1x1 convolution with that stride reads.
fn subsample(x: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    phase(
        &interleave(x, stride, h.div_ceil(stride), w.div_ceil(stride))?,
        0,
        0,
    )
}

/// Depthwise convolution of an already padded input. On the CPU one image
/// at a time: each image's ~2k*k passes then stay in the cache, which
/// measured 2-3x faster at batch 8 than passes over the whole batch. On a GPU
/// over the whole batch: there each pass is a kernel launch, and per image
/// they made EfficientNet-B0's throughput flat from batch 8 to 64.
fn depthwise(x: &Tensor, taps: &[Tensor], spec: &ConvSpec) -> Result<Tensor> {
    let b = x.dim(0)?;
    if b == 1 || !x.device().is_cpu() {
        return depthwise_sum(x, taps, spec);
    }
    let outs = (0..b)
        .map(|i| depthwise_sum(&x.narrow(0, i, 1)?, taps, spec))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

/// The sum over the `k*k` taps of the input (one image or a batch) shifted
/// by the tap's offset, scaled by the tap's per-channel weight (`taps`,
/// placed in the dtype of the sums).
fn depthwise_sum(x: &Tensor, taps: &[Tensor], spec: &ConvSpec) -> Result<Tensor> {
    // f16/bf16 sum the taps in f32, as PyTorch's kernels do. Summed in
    // bf16 (with the pooling below), the tiny EfficientNet fixtures were
    // 6-12x further from the f32 reference than PyTorch's own bf16 run.
    let dtype = x.dtype();
    let x = x.to_dtype(accumulation_dtype(dtype))?;
    let (_, _, h, w) = x.dims4()?;
    let (k, stride, dilation) = (spec.kernel, spec.stride, spec.dilation);
    let span = (k - 1) * dilation + 1;
    let ho = (h - span) / stride + 1;
    let wo = (w - span) / stride + 1;
    // With a stride, every tap reads one of stride*stride interleaved grids:
    // split them out once so that each tap is a plain shifted view.
    let phases = Phases::split(&x, stride, ho, wo, span)?;
    let mut acc: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            let view = phases.view(i * dilation, j * dilation, ho, wo)?;
            let term = view.broadcast_mul(&taps[i * k + j])?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise convolution without taps".into()))?
        .to_dtype(dtype)
}

/// The dtype sums are accumulated in: f32 for the half-precision types.
fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Convolution of an already padded input as im2col + gemm, one image at a
/// time so that the column matrix (k*k times the input) stays small.
fn im2col(x: &Tensor, w2: &Tensor, spec: &ConvSpec) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (k, stride, dilation) = (spec.kernel, spec.stride, spec.dilation);
    let span = (k - 1) * dilation + 1;
    let ho = (h - span) / stride + 1;
    let wo = (w - span) / stride + 1;
    let o = w2.dim(0)?;
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        let phases = Phases::split(&x.narrow(0, i, 1)?, stride, ho, wo, span)?;
        let mut views = Vec::with_capacity(k * k);
        for di in (0..k).map(|i| i * dilation) {
            for dj in (0..k).map(|j| j * dilation) {
                views.push(phases.view(di, dj, ho, wo)?);
            }
        }
        // [k*k, C, ho, wo]: row (tap, channel) of the column matrix.
        let cols = Tensor::cat(&views, 0)?.reshape((k * k * c, ho * wo))?;
        outs.push(w2.matmul(&cols)?.reshape((1, o, ho, wo))?);
    }
    Tensor::cat(&outs, 0)
}

/// The `stride x stride` sub-grids of a tensor: grid `(a, b)` holds the
/// pixels at rows `a, a + s, ...` and columns `b, b + s, ...`.
struct Phases {
    stride: usize,
    grids: Vec<Tensor>,
}

/// `x` as `[B, C, gh, s, gw, s]` (cropped or zero-padded at the bottom/right
/// to `gh * s` x `gw * s`), so that a sub-grid is two `narrow`s away.
fn interleave(x: &Tensor, stride: usize, gh: usize, gw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (hp, wp) = (gh * stride, gw * stride);
    let x = x.narrow(2, 0, h.min(hp))?.narrow(3, 0, w.min(wp))?;
    let x = pad2d(&x, (0, hp.saturating_sub(h), 0, wp.saturating_sub(w)))?;
    x.contiguous()?.reshape((b, c, gh, stride, gw, stride))
}

/// Sub-grid `(a, b)` of an [`interleave`]d tensor, contiguous `[B, C, gh, gw]`.
fn phase(xi: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    xi.narrow(3, a, 1)?
        .narrow(5, b, 1)?
        .squeeze(5)?
        .squeeze(3)?
        .contiguous()
}

impl Phases {
    /// Splits `x` into the grids an `ho x wo` output with taps spanning
    /// `span` pixels reads: each needs `ho + (span - 1) / stride` rows.
    fn split(x: &Tensor, stride: usize, ho: usize, wo: usize, span: usize) -> Result<Self> {
        if stride == 1 {
            return Ok(Self {
                stride,
                grids: vec![x.clone()],
            });
        }
        let extra = (span - 1) / stride;
        let xi = interleave(x, stride, ho + extra, wo + extra)?;
        let mut grids = Vec::with_capacity(stride * stride);
        for a in 0..stride {
            for b in 0..stride {
                grids.push(phase(&xi, a, b)?);
            }
        }
        Ok(Self { stride, grids })
    }

    /// The `ho x wo` window that tap offset `(di, dj)` reads.
    fn view(&self, di: usize, dj: usize, ho: usize, wo: usize) -> Result<Tensor> {
        let s = self.stride;
        let grid = &self.grids[(di % s) * s + dj % s];
        grid.narrow(2, di / s, ho)?.narrow(3, dj / s, wo)
    }
}

/// A fully connected layer, weights stored transposed (`[in, out]`) so the
/// forward is one gemm with no per-call re-layout.
#[derive(Debug, Clone)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    weights: LinearWeights,
}

#[derive(Debug, Clone)]
enum LinearWeights {
    /// f32 on the CPU, for [`cpu_transformer::linear`]: `[in, out]` packed
    /// for the gemm.
    Host {
        weight_t: PackedRhs,
        bias: Arc<[f32]>,
    },
    /// Anywhere else: `[in, out]` and `[out]` on the model's device.
    Tensors { weight_t: Tensor, bias: Tensor },
}

impl Linear {
    /// `prefix.weight` `[out, in]` and `prefix.bias` `[out]`.
    pub fn load(
        wm: &WeightMap,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        placement: &Placement,
    ) -> Result<Self> {
        let w = wm.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let b = wm.get(&format!("{prefix}.bias"), &[out_features])?;
        Self::new(&w, &b, placement)
    }

    /// A 1x1 convolution with bias used as a linear layer (squeeze-excitation
    /// on a pooled `[B, C, 1, 1]` input).
    pub fn load_conv1x1(
        wm: &WeightMap,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        placement: &Placement,
    ) -> Result<Self> {
        let w = wm.get(
            &format!("{prefix}.weight"),
            &[out_features, in_features, 1, 1],
        )?;
        let b = wm.get(&format!("{prefix}.bias"), &[out_features])?;
        Self::new(&w.reshape((out_features, in_features))?, &b, placement)
    }

    /// From f32 CPU `weight` `[out, in]` and `bias` `[out]`.
    pub fn new(weight: &Tensor, bias: &Tensor, placement: &Placement) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let weights = if placement.is_host_f32() {
            LinearWeights::Host {
                weight_t: PackedRhs::from_transposed(&host_vec(weight)?, in_features, out_features),
                bias: host_vec(bias)?,
            }
        } else {
            LinearWeights::Tensors {
                weight_t: placement.place(&weight.t()?)?,
                bias: placement.place(bias)?,
            }
        };
        Ok(Self {
            in_features,
            out_features,
            weights,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `act(x W^T + bias + residual)` over the last dimension of `x`;
    /// `residual`, if any, has the output's shape.
    pub fn forward_with(
        &self,
        x: &Tensor,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (i, o) = (self.in_features, self.out_features);
        let rows = x.elem_count() / i.max(1);
        let key = || {
            let res = if residual.is_some() { " +res" } else { "" };
            format!("linear {i}->{o} {act:?}{res}")
        };
        crate::profile::timed(key, 2 * (rows * i * o) as u64, || {
            let mut dims = x.dims().to_vec();
            match dims.last_mut() {
                Some(last) if *last == i => *last = o,
                _ => candle_core::bail!("linear {i}->{o} got an input {:?}", x.dims()),
            }
            if let Some(r) = residual {
                if r.dims() != dims.as_slice() {
                    candle_core::bail!("residual {:?} is not the output {dims:?}", r.dims())
                }
            }
            match &self.weights {
                LinearWeights::Host { weight_t, bias } => {
                    let y = with_host_f32(x, |xs| match residual {
                        Some(r) => with_host_f32(r, |rs| {
                            cpu_transformer::linear(xs, weight_t, bias, Some(rs), act)
                        }),
                        None => Ok(cpu_transformer::linear(xs, weight_t, bias, None, act)),
                    })??;
                    Tensor::from_vec(y, dims, &Device::Cpu)
                }
                LinearWeights::Tensors { weight_t, bias } => {
                    let y = x.broadcast_matmul(weight_t)?.broadcast_add(bias)?;
                    let y = match residual {
                        Some(r) => (y + r)?,
                        None => y,
                    };
                    act.apply(&y)
                }
            }
        })
    }
}

impl Module for Linear {
    /// `[..., in]` -> `[..., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Activation::None, None)
    }
}

/// Multi-head scaled dot-product attention: `q` `[B, Nq, D]` (already
/// scaled by `1/sqrt(D / heads)`), `k` and `v` `[B, Nk, D]`, `key_bias`
/// `[B, Nk]` added to each query's scores (0, or -inf to mask a key).
/// Returns the context `[B, Nq, D]`, heads concatenated. On the CPU in f32,
/// `q`, `k` and `v` are read in place when their last dimension is
/// contiguous (such as column slices of one fused projection).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, d) = q.dims3()?;
    let nk = k.dim(1)?;
    if d % heads != 0 || k.dims() != [b, nk, d] || v.dims() != [b, nk, d] {
        candle_core::bail!(
            "attention over q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let hd = d / heads;
    let flops = 4 * (b * nq * nk * d) as u64;
    crate::profile::timed(
        || format!("attention {nq}x{nk} {heads} heads"),
        flops,
        || {
            if is_host_f32(q) {
                let bias = key_bias.map(|t| t.contiguous()?.flatten_all()?.to_vec1::<f32>());
                let bias = bias.transpose()?;
                let y = with_rows(q, |q| {
                    with_rows(k, |k| {
                        with_rows(v, |v| {
                            cpu_transformer::attention(q, k, v, bias.as_deref(), b, heads, hd)
                        })
                    })
                })???;
                return Tensor::from_vec(y, (b, nq, d), &Device::Cpu);
            }
            let split = |x: &Tensor, n: usize| -> Result<Tensor> {
                x.reshape((b, n, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b * heads, n, hd))
            };
            let (qh, kh, vh) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
            let mut scores = qh.matmul(&kh.t()?)?;
            if let Some(bias) = key_bias {
                scores = scores
                    .reshape((b, heads, nq, nk))?
                    .broadcast_add(&bias.reshape((b, 1, 1, nk))?)?
                    .reshape((b * heads, nq, nk))?;
            }
            candle_nn::ops::softmax_last_dim(&scores)?
                .matmul(&vh)?
                .reshape((b, heads, nq, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, nq, d))
        },
    )
}

/// Calls `f` with an f32 CPU tensor `[B, N, D]` as [`cpu_transformer::Rows`],
/// in place when its last dimension is contiguous.
fn with_rows<R>(t: &Tensor, f: impl FnOnce(cpu_transformer::Rows) -> R) -> Result<R> {
    let t = if t.stride()[2] == 1 {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (_, len, _) = t.dims3()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Ok(f(cpu_transformer::Rows {
            data,
            offset: layout.start_offset(),
            batch_stride: layout.stride()[0],
            row_stride: layout.stride()[1],
            len,
        })),
        _ => candle_core::bail!("expected an f32 CPU tensor, got {:?}", t.dtype()),
    }
}

/// A layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(wm: &WeightMap, prefix: &str, dim: usize, eps: f64, p: &Placement) -> Result<Self> {
        Ok(Self {
            weight: p.place(&wm.get(&format!("{prefix}.weight"), &[dim])?)?,
            bias: p.place(&wm.get(&format!("{prefix}.bias"), &[dim])?)?,
            eps: eps as f32,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::timed(
            || format!("layer_norm {}", self.weight.elem_count()),
            0,
            || {
                if !is_host_f32(x) {
                    return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps);
                }
                let parts = [x.clone(), self.weight.clone(), self.bias.clone()];
                let y = with_host_f32_parts(&parts, |p| {
                    cpu_transformer::layer_norm(p[0], p[1], p[2], self.eps)
                })?;
                Tensor::from_vec(y, x.shape(), &Device::Cpu)
            },
        )
    }
}

/// Mean over the spatial dimensions: `[B, C, H, W]` -> `[B, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    // One reduction over a flattened axis is cheaper than two; f16/bf16
    // sum in f32 (candle's CPU reduction accumulates in the input's dtype).
    x.contiguous()?
        .reshape((b, c, h * w))?
        .to_dtype(accumulation_dtype(x.dtype()))?
        .mean(D::Minus1)?
        .to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The host pool against candle's (which f64 takes), on odd sizes,
    /// negative values and the two pools the families use.
    #[test]
    fn host_max_pool_matches_candle() -> Result<()> {
        for (k, s, p) in [
            (3, 2, 1),
            (5, 1, 2),
            (2, 2, 0),
            (3, 1, 0),
            (3, 3, 1),
            (4, 2, 1),
        ] {
            for (h, w) in [(1, 1), (2, 5), (3, 3), (3, 7), (20, 20), (9, 4), (112, 112)] {
                if h.min(w) + 2 * p < k {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu)?;
                let got = max_pool2d(&x, k, s, p)?;
                let want = max_pool2d(&x.to_dtype(DType::F64)?, k, s, p)?.to_dtype(DType::F32)?;
                assert_eq!(got.dims(), want.dims(), "{k}/{s}/{p} {h}x{w}");
                assert_eq!(max_diff(&got, &want), 0.0, "{k}/{s}/{p} {h}x{w}");
            }
        }
        assert!(max_pool2d(
            &Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu)?,
            5,
            1,
            1
        )
        .is_err());
        Ok(())
    }

    fn cpu() -> Placement {
        Placement::new(&Device::Cpu, DType::F32)
    }

    /// Within 1e-4, or for a layer that may run by Winograd (3x3, stride 1,
    /// f32 on the host) within 3e-5 of the output's scale (`max |want|`):
    /// its transforms cost a few bits (up to 1.4e-5 of scale measured here,
    /// where the direct kernel is within 6e-7), still under the model
    /// fixtures' 1e-4 of scale.
    fn assert_close(got: &Tensor, want: &Tensor, winograd: bool, what: &str) {
        let diff = max_diff(got, want);
        if winograd {
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff / scale.max(1.0) < 3e-5, "{what}: {diff:e} of {scale}");
        } else {
            assert!(diff < 1e-4, "{what}: {diff:e}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn tf_same_padding_is_asymmetric() {
        assert_eq!(tf_same_pad(224, 3, 2, 1), (0, 1));
        assert_eq!(tf_same_pad(225, 3, 2, 1), (1, 1));
        assert_eq!(tf_same_pad(112, 5, 2, 1), (1, 2));
        assert_eq!(tf_same_pad(7, 3, 1, 1), (1, 1));
        assert_eq!(tf_same_pad(7, 1, 1, 1), (0, 0));
    }

    /// Every fast path against candle's reference convolution, with odd
    /// sizes: f32 runs Fovea's CPU kernels, f64 the candle-op paths that other
    /// devices and dtypes use.
    #[test]
    fn conv_paths_match_candle() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            conv_paths_match_candle_in(dtype)?;
        }
        Ok(())
    }

    fn conv_paths_match_candle_in(dtype: DType) -> Result<()> {
        let dev = Device::Cpu;
        let placement = Placement::new(&dev, dtype);
        let cases = [
            // (c_in, c_out, k, stride, dilation, groups, padding)
            (6, 5, 1, 1, 1, 1, Padding::Symmetric(0)),
            (6, 5, 1, 2, 1, 1, Padding::TfSame),
            (6, 5, 1, 2, 1, 1, Padding::Symmetric(0)),
            (6, 5, 3, 1, 1, 1, Padding::Symmetric(1)),
            (6, 5, 3, 2, 1, 1, Padding::TfSame),
            (6, 5, 3, 1, 2, 1, Padding::TfSame),
            (3, 5, 7, 2, 1, 1, Padding::Symmetric(3)),
            (6, 6, 3, 1, 1, 6, Padding::Symmetric(1)),
            (6, 6, 3, 2, 1, 6, Padding::TfSame),
            (6, 6, 3, 1, 2, 6, Padding::Symmetric(2)),
            (6, 6, 5, 2, 1, 6, Padding::TfSame),
            (6, 6, 5, 2, 1, 6, Padding::Symmetric(2)),
            (6, 6, 5, 1, 1, 6, Padding::TfSame),
            (6, 4, 3, 1, 1, 2, Padding::Symmetric(1)),
            (4, 3, 3, 2, 1, 1, Padding::Symmetric(0)),
            (4, 3, 2, 2, 1, 1, Padding::Symmetric(0)),
            (5, 5, 3, 3, 1, 5, Padding::Symmetric(1)),
            // More channels, odd output sizes.
            (16, 17, 3, 1, 1, 1, Padding::Symmetric(1)),
            (17, 16, 3, 1, 1, 1, Padding::TfSame),
            (16, 16, 3, 1, 1, 1, Padding::Symmetric(0)),
        ];
        for (ci, co, k, s, d, g, padding) in cases {
            for (h, w) in [(11, 8), (9, 13), (7, 7)] {
                let x = Tensor::randn(0f32, 1., (2, ci, h, w), &dev)?;
                let weight = Tensor::randn(0f32, 1., (co, ci / g, k, k), &dev)?;
                let bias = Tensor::randn(0f32, 1., co, &dev)?;
                let spec = ConvSpec {
                    groups: g,
                    dilation: d,
                    padding,
                    ..ConvSpec::new(ci, co, k, s)
                };
                let conv = Conv2d::from_folded(&weight, &bias, spec, Activation::None, &placement)?;
                let got = conv.forward(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
                let pads = conv.pads(h, w);
                let want = pad2d(&x, pads)?
                    .conv2d(&weight, 0, s, d, g)?
                    .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
                assert_eq!(got.dims(), want.dims(), "{dtype:?} {spec:?} {h}x{w}");
                let winograd = dtype == DType::F32 && (k, s, d, g) == (3, 1, 1, 1);
                assert_close(
                    &got,
                    &want,
                    winograd,
                    &format!("{dtype:?} {spec:?} {h}x{w}"),
                );
            }
        }
        Ok(())
    }

    /// The depthwise sums over a whole batch at once (as on a GPU) equal
    /// those one image at a time (as on the CPU), value for value.
    #[test]
    fn depthwise_over_a_batch_matches_per_image() -> Result<()> {
        let dev = Device::Cpu;
        for (k, stride, dilation) in [(3, 1, 1), (3, 2, 1), (5, 2, 1), (3, 1, 2)] {
            let spec = ConvSpec {
                dilation,
                ..ConvSpec::depthwise(6, k, stride)
            };
            let x = Tensor::randn(0f32, 1., (3, 6, 13, 11), &dev)?;
            let taps = (0..k * k)
                .map(|_| Tensor::randn(0f32, 1., (1, 6, 1, 1), &dev))
                .collect::<Result<Vec<_>>>()?;
            let whole = depthwise_sum(&x, &taps, &spec)?;
            let per_image = depthwise(&x, &taps, &spec)?;
            assert_eq!(whole.dims(), per_image.dims());
            let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(values(&whole)?, values(&per_image)?, "{spec:?}");
        }
        Ok(())
    }

    /// The fused epilogue: `act(conv + bias + residual)` for every activation,
    /// at batch sizes that take both of the kernels' threading paths.
    #[test]
    fn residual_and_activation_are_fused() -> Result<()> {
        let dev = Device::Cpu;
        for act in [
            Activation::None,
            Activation::Relu,
            Activation::Relu6,
            Activation::Silu,
        ] {
            for (ci, co, k, g) in [(4, 6, 3, 1), (6, 6, 3, 6), (5, 7, 1, 1)] {
                for batch in [1, 2, 3] {
                    let x = Tensor::randn(0f32, 2., (batch, ci, 9, 7), &dev)?;
                    let weight = Tensor::randn(0f32, 1., (co, ci / g, k, k), &dev)?;
                    let bias = Tensor::randn(0f32, 1., co, &dev)?;
                    let res = Tensor::randn(0f32, 3., (batch, co, 9, 7), &dev)?;
                    let spec = ConvSpec {
                        groups: g,
                        ..ConvSpec::new(ci, co, k, 1)
                    };
                    let conv = Conv2d::from_folded(&weight, &bias, spec, act, &cpu())?;
                    let want = x
                        .conv2d(&weight, k / 2, 1, 1, g)?
                        .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
                    let with_res = act.apply(&(&want + &res)?)?;
                    let without = act.apply(&want)?;
                    let what = format!("{act:?} k{k} g{g} batch {batch}");
                    let winograd = (k, g) == (3, 1);
                    assert_close(&conv.forward_add(&x, &res)?, &with_res, winograd, &what);
                    assert_close(&conv.forward(&x)?, &without, winograd, &what);
                }
            }
        }
        Ok(())
    }

    /// A convolution of a concatenation read in place equals the
    /// convolution of the concatenated tensor, on the host kernels (1x1 and
    /// 3x3, batches taking both threading paths) and on candle's (f64).
    #[test]
    fn convolutions_read_concatenations_in_place() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for (k, batch) in [(1, 1), (1, 3), (3, 2)] {
                // Past 256 channels a 1x1 runs in two depth blocks, one
                // of them across a part's edge.
                let sizes = if k == 1 { [150, 7, 140] } else { [5, 16, 3] };
                let parts = sizes
                    .iter()
                    .map(|&c| Tensor::randn(0f32, 1., (batch, c, 9, 20), &dev)?.to_dtype(dtype))
                    .collect::<Result<Vec<_>>>()?;
                let c: usize = sizes.iter().sum();
                let weight = Tensor::randn(0f32, 0.1, (7, c, k, k), &dev)?;
                let bias = Tensor::randn(0f32, 1., 7, &dev)?;
                let spec = ConvSpec::new(c, 7, k, 1);
                let placement = Placement::new(&dev, dtype);
                let conv = Conv2d::from_folded(&weight, &bias, spec, Activation::Silu, &placement)?;
                let want = conv.forward(&Tensor::cat(&parts, 1)?)?;
                let got = conv.forward_cat(&parts)?;
                let what = format!("{dtype:?} k{k} batch {batch}");
                assert_eq!(got.dims(), want.dims(), "{what}");
                let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
                assert!(max_diff(&got, &want) < 1e-4, "{what}");
            }
        }
        let conv = Conv2d::from_folded(
            &Tensor::zeros((2, 4, 1, 1), DType::F32, &dev)?,
            &Tensor::zeros(2, DType::F32, &dev)?,
            ConvSpec::new(4, 2, 1, 1),
            Activation::None,
            &cpu(),
        )?;
        let empty = Tensor::zeros((0, 2, 5, 5), DType::F32, &dev)?;
        assert_eq!(
            conv.forward_cat(&[empty.clone(), empty])?.dims(),
            [0, 2, 5, 5]
        );
        let a = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev)?;
        let b = Tensor::zeros((1, 2, 4, 5), DType::F32, &dev)?;
        assert!(
            conv.forward_cat(&[a.clone(), b]).is_err(),
            "mismatched sizes"
        );
        assert!(
            conv.forward_cat(&[a.clone(), a.clone(), a]).is_err(),
            "too many channels"
        );
        Ok(())
    }

    /// Inputs large enough to be split into tiles or bands of output rows (a
    /// partial last one included) and, past 32 input channels, into depth
    /// blocks, with a residual and an activation.
    #[test]
    fn tiled_convolutions_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (ci, co, k, s) in [
            (64, 8, 3, 1),
            (600, 5, 1, 1),
            (64, 6, 3, 2),
            (256, 16, 3, 1),
            (40, 13, 5, 2),
            (33, 7, 3, 1),
        ] {
            for batch in [1, 3, 4] {
                let (h, w) = (41, 40);
                let x = Tensor::randn(0f32, 1., (batch, ci, h, w), &dev)?;
                let weight = Tensor::randn(0f32, 0.1, (co, ci, k, k), &dev)?;
                let bias = Tensor::randn(0f32, 1., co, &dev)?;
                let spec = ConvSpec::new(ci, co, k, s);
                let conv = Conv2d::from_folded(&weight, &bias, spec, Activation::Silu, &cpu())?;
                let want = x
                    .conv2d(&weight, k / 2, s, 1, 1)?
                    .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
                let res = Tensor::randn(0f32, 1., want.dims(), &dev)?;
                let want = (want + &res)?.silu()?;
                let got = conv.forward_add(&x, &res)?;
                let what = format!("{ci}->{co} k{k} s{s} batch {batch}");
                assert_close(&got, &want, (k, s) == (3, 1), &what);
            }
        }
        Ok(())
    }

    /// A 3x3 stride-1 layer builds its Winograd filters on the first input
    /// with enough tiles, not at load time, and not for smaller inputs.
    #[test]
    fn winograd_weights_are_built_on_first_use() -> Result<()> {
        if !winograd_enabled() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.1, (8, 8, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1., 8, &dev)?;
        let conv = Conv2d::from_folded(
            &weight,
            &bias,
            ConvSpec::new(8, 8, 3, 1),
            Activation::None,
            &cpu(),
        )?;
        let ConvKernel::CpuDense(_, _, Some(lazy)) = &conv.kernel else {
            panic!("an f32 3x3 stride-1 layer on the CPU has a Winograd form");
        };
        assert!(!lazy.is_built(), "built at load time");
        for (size, built) in [(7, false), (16, true)] {
            let x = Tensor::randn(0f32, 1., (2, 8, size, size), &dev)?;
            let want = x
                .conv2d(&weight, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, 8, 1, 1))?)?;
            assert_close(&conv.forward(&x)?, &want, built, &format!("{size}px"));
            assert_eq!(lazy.is_built(), built, "{size}px");
        }
        Ok(())
    }

    #[test]
    fn batch_norm_is_folded() -> Result<()> {
        let dev = Device::Cpu;
        let (c, o) = (3, 4);
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("conv.weight", Tensor::randn(0f32, 1., (o, c, 3, 3), &dev)?),
            ("bn.weight", t(&[0.5, 1.0, 1.5, 2.0])),
            ("bn.bias", t(&[0.1, -0.2, 0.3, 0.0])),
            ("bn.running_mean", t(&[0.3, 0.0, -1.0, 2.0])),
            ("bn.running_var", t(&[1.0, 0.25, 4.0, 0.5])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let wm = WeightMap::new(tensors.clone());
        let spec = ConvSpec::new(c, o, 3, 1);
        let conv = Conv2d::load_bn(&wm, "conv", "bn", spec, 1e-3, Activation::Relu, &cpu())?;
        wm.finish("test").unwrap();
        let x = Tensor::randn(0f32, 1., (2, c, 6, 5), &dev)?;
        let y = x.conv2d(&tensors["conv.weight"], 1, 1, 1, 1)?;
        let shape = (1, o, 1, 1);
        let norm = y
            .broadcast_sub(&tensors["bn.running_mean"].reshape(shape)?)?
            .broadcast_div(&(tensors["bn.running_var"].reshape(shape)? + 1e-3)?.sqrt()?)?
            .broadcast_mul(&tensors["bn.weight"].reshape(shape)?)?
            .broadcast_add(&tensors["bn.bias"].reshape(shape)?)?
            .relu()?;
        assert!(max_diff(&conv.forward(&x)?, &norm) < 1e-4);
        Ok(())
    }

    #[test]
    fn activations() -> Result<()> {
        let x = Tensor::new(&[-2f32, 0.5, 7.0], &Device::Cpu)?;
        let v = |a: Activation| a.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(Activation::Relu6), vec![0.0, 0.5, 6.0]);
        assert_eq!(v(Activation::Relu), vec![0.0, 0.5, 7.0]);
        let silu = v(Activation::Silu);
        assert!((silu[0] - (-2.0 / (1.0 + 2f32.exp()))).abs() < 1e-6);
        Ok(())
    }
}
