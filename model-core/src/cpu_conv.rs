//! f32 convolutions on the CPU over NCHW buffers, for the two kinds of
//! convolution the conv families run: dense k x k (including 1x1) and
//! depthwise. Each writes its output once: bias, an optional residual and the
//! activation are applied while a tile of the output is still in cache.
//!
//! - Dense k x k (k > 1, any stride): bands of output rows; each band's
//!   input is copied into a zero-padded window split by stride phase, which
//!   the gemm's register tile ([`sgemm`]) reads in place at one offset per
//!   (channel, tap): no column matrix and no packing of the activations
//!   (`dense_direct`).
//! - Dense 1x1: tiles of output rows, each one gemm
//!   `[O, C] x [C, tile]` over the input read in place (stride 1) or
//!   subsampled into a per-thread scratch buffer (stride 2).
//! - The weights, PyTorch's `[O, C, k, k]` order, are packed into the gemm's
//!   row panels at load time.
//! - Depthwise: channels-last per image, the taps accumulated into each
//!   output pixel with the channels as the vector dimension.
//! - Threads: with enough tiles, each thread computes whole tiles alone (no
//!   synchronisation inside a layer); otherwise images are taken one at a
//!   time and the gemm, the column matrix and the epilogue are split across
//!   the threads of the [`team`](crate::team).

use std::cell::RefCell;
use std::ops::Range;

use crate::activation::{finish_row, Activation};
use crate::sgemm::{self, Lhs, PackedLhs, Rhs, SharedMut};
use crate::team;

/// The sizes a convolution reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    /// Zeros above and to the left; those below and to the right follow
    /// from the output size.
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeometry {
    /// `[batch, in_channels, height, width]` convolved with `pad` zeros on
    /// every side and no dilation.
    pub fn padded(
        batch: usize,
        in_channels: usize,
        (height, width): (usize, usize),
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        let out = |size: usize| (size + 2 * pad - kernel) / stride + 1;
        Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel,
            stride,
            dilation: 1,
            pad_top: pad,
            pad_left: pad,
            out_height: out(height),
            out_width: out(width),
        }
    }

    fn in_plane(&self) -> usize {
        self.height * self.width
    }

    fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }

    /// An unpadded 1x1 stride-1 convolution: the input is its own column matrix.
    fn reads_input_in_place(&self) -> bool {
        self.kernel == 1
            && self.stride == 1
            && self.pad_top == 0
            && self.pad_left == 0
            && self.out_height == self.height
            && self.out_width == self.width
    }
}

/// What happens to each output value after the convolution's sum:
/// `act(sum + bias[channel] + residual)`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// One per output channel.
    pub bias: &'a [f32],
    /// Same shape as the output.
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

impl Epilogue<'_> {
    /// Finishes the part of output row `index` (image * channels + channel,
    /// `row_len` values) that starts at column `start`.
    pub(crate) fn finish_at(
        &self,
        part: &mut [f32],
        index: usize,
        start: usize,
        row_len: usize,
        channels: usize,
    ) {
        let bias = self.bias[index % channels];
        let residual = self
            .residual
            .map(|r| &r[index * row_len + start..][..part.len()]);
        finish_row(part, bias, residual, self.act);
    }
}

/// Dense convolution (one group) of `x` `[B, C, H, W]` with `weight`
/// `[O, C * k * k]` (packed), returning `[B, O, Ho, Wo]`. `x` is given as
/// one or more parts `[B, C_j, H, W]` whose channels, in order, make the
/// `C`: a concatenation read where its parts lie, never copied into one.
pub fn dense(
    parts: &[&[f32]],
    g: &ConvGeometry,
    weight: &PackedLhs,
    epilogue: &Epilogue,
) -> Vec<f32> {
    let (n, o) = (g.out_plane(), g.out_channels);
    let depth = g.in_channels * g.kernel * g.kernel;
    check_parts(parts, g);
    assert_eq!((weight.rows(), weight.depth()), (o, depth));
    assert_eq!(epilogue.bias.len(), o);
    let per_image = o * n;
    let total = g.batch * per_image;
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), total);
    }
    let x = match parts {
        [x] if !runs_direct(g) => *x,
        _ => return dense_direct(parts, g, weight, epilogue),
    };
    // Left uninitialised: the gemm writes every value (without reading)
    // before the epilogue reads it, and the length is set after that.
    let mut out = Vec::<f32>::with_capacity(total);
    let in_place = g.reads_input_in_place();
    let image = |i: usize| &x[i * g.in_channels * g.in_plane()..][..g.in_channels * g.in_plane()];
    let lhs = Lhs::Packed(weight);

    // Tiles of whole output rows, sized so that a tile's column matrix stays
    // in the core's cache between being written and being read by the gemm
    // (and its output between the gemm and the epilogue).
    let tile_rows = (TILE_FLOATS / depth.max(1))
        .max(MIN_TILE_COLUMNS)
        .div_ceil(g.out_width)
        .min(g.out_height);
    let tiles_per_image = g.out_height.div_ceil(tile_rows);
    let tiles = g.batch * tiles_per_image;
    let threads = team::threads();
    let dst = SharedMut(out.as_mut_ptr());

    if threads == 1 || tiles >= 2 * threads {
        // Enough tiles for every thread: each computes whole tiles alone.
        team::for_each(tiles, |t| {
            let (i, oy0) = (t / tiles_per_image, t % tiles_per_image * tile_rows);
            let rows = tile_rows.min(g.out_height - oy0);
            let (c0, width) = (oy0 * g.out_width, rows * g.out_width);
            let cols_len = if in_place { 0 } else { depth * width };
            with_scratch(cols_len, |cols| {
                let rhs = if in_place {
                    Rhs::Rows {
                        data: &image(i)[c0..],
                        stride: n,
                    }
                } else {
                    im2col(image(i), g, cols, oy0..oy0 + rows, false);
                    Rhs::Rows {
                        data: cols,
                        stride: width,
                    }
                };
                // SAFETY: tile t writes columns c0..c0 + width of image i's
                // `o` rows, which no other tile writes; `out` has capacity
                // for them and outlives the loop.
                unsafe {
                    let y = dst.get().add(i * per_image + c0);
                    sgemm::matmul(y, n, lhs, rhs, (o, width, depth), false, None, false);
                    for c in 0..o {
                        let row = std::slice::from_raw_parts_mut(y.add(c * n), width);
                        epilogue.finish_at(row, i * o + c, c0, n, o);
                    }
                }
            })
        });
    } else {
        // Few, small images: one at a time, the gemm split across the threads.
        let mut cols = vec![0f32; if in_place { 0 } else { depth * n }];
        for i in 0..g.batch {
            let rhs = if in_place {
                image(i)
            } else {
                im2col(image(i), g, &mut cols, 0..g.out_height, true);
                &cols[..]
            };
            let rhs = Rhs::Rows {
                data: rhs,
                stride: n,
            };
            // SAFETY: image i's [o, n] output lies within out's capacity and
            // is written whole by the gemm before it is read.
            let y = unsafe {
                let y = dst.get().add(i * per_image);
                sgemm::matmul(y, n, lhs, rhs, (o, n, depth), false, None, true);
                std::slice::from_raw_parts_mut(y, per_image)
            };
            team::for_each_chunk(y, n, |c, row| epilogue.finish_at(row, i * o + c, 0, n, o));
        }
    }
    // SAFETY: every value was written above.
    unsafe { out.set_len(total) };
    out
}

/// Panics unless `parts` are `[B, C_j, H, W]` with `C` channels in all.
pub(crate) fn check_parts(parts: &[&[f32]], g: &ConvGeometry) {
    let per_channel = g.batch * g.in_plane();
    assert!(
        parts.iter().all(|p| p.len() % per_channel.max(1) == 0)
            && parts.iter().map(|p| p.len()).sum::<usize>() == g.in_channels * per_channel,
        "the parts are not [{}, C_j, {}, {}] with {} channels in all",
        g.batch,
        g.height,
        g.width,
        g.in_channels
    );
}

/// `len` rounded up to an odd number of 16-value cache lines: buffers laid
/// out that far apart put the values at the same offset in each in
/// different L1 sets, where a multiple of 4 KiB would put them all in one.
pub(crate) fn odd_lines(len: usize) -> usize {
    (len.div_ceil(16) | 1) * 16
}

/// Whether `dense_direct` computes this convolution of one part rather than
/// the gemm path: any with more than one tap (several parts always go
/// there). A 1x1 convolution over one part reads it in place, or a strided
/// subsample of it, through the gemm's own packing, which measured faster
/// for ResNet-50's wide 1x1 layers.
fn runs_direct(g: &ConvGeometry) -> bool {
    g.kernel > 1
}

/// Rows of B per depth block of `dense_direct`, about the gemm's own: 32
/// channels of 3x3 taps (288) or 256 of a 1x1 keep a block's weight panel
/// (6-7 KiB) and the input one register tile reads (32 x 3 rows, or 256
/// rows of 16 values) in L1.
const DIRECT_BLOCK_DEPTH: usize = 256;

/// Weight values per group of panels that [`dense_direct`] runs over one
/// tile of input before the next (128 KiB: a quarter of L2).
const DIRECT_GROUP_FLOATS: usize = 32 * 1024;

/// A convolution without a column matrix.
///
/// Each task takes a band of output rows of one image. It copies the input
/// the band reads into a zero-padded window (per-thread scratch): per
/// channel, one plane per stride phase `(y % s, x % s)` of the padded input
/// (one plane at stride 1), each holding `(y / s, x / s)` in rows of `wp`
/// values. Output pixel `(oy, ox)` then reads tap `(c, i, j)` at window
/// position `oy * wp + ox` plus a fixed offset per (channel, tap): the
/// gemm's register tile reads its right operand from the window in place
/// ([`PackedLhs::tile_from_rows`]), with no im2col (k x k copies of the
/// input) and no packing. The tiles run over the window's positions as one
/// flat row; the `wp - out_width` positions at each row's end compute values
/// nobody reads (2 of 82 for a 3x3 at 80 pixels, 2 of 9 at 7), so a tile is
/// always 16 pixels whatever the width. The epilogue copies the useful ones
/// out with bias, residual and activation while the band is in cache.
fn dense_direct(
    parts: &[&[f32]],
    g: &ConvGeometry,
    weight: &PackedLhs,
    epilogue: &Epilogue,
) -> Vec<f32> {
    const NR: usize = sgemm::NR;
    let (n, o, c, k, s) = (
        g.out_plane(),
        g.out_channels,
        g.in_channels,
        g.kernel,
        g.stride,
    );
    if g.batch * n == 0 {
        return Vec::new();
    }
    let phases = s * s;
    // Rows and columns past the band's own that the taps reach, per phase.
    let reach = (k - 1) * g.dilation / s;
    let wp = g.out_width + reach;
    let threads = team::threads();
    // Bands: a window of about TILE_FLOATS / 2.
    let fit = (TILE_FLOATS / 2 / (c * phases * wp))
        .saturating_sub(reach)
        .max(1);
    let panels = o.div_ceil(sgemm::MR);
    // At least two tasks per thread: more bands when the weights are small
    // beside the image, else ranges of output channels (a band task reads
    // all the weights: ResNet-50's 512-channel 3x3 layers at 7x7 read 9 MiB
    // of weights for 49 pixels, and ran at a third of the gemm's speed when
    // four bands of two rows each read them).
    let weights_heavy = o * c * k * k > g.batch * c * phases * (g.out_height + reach) * wp;
    let (band, splits) = if weights_heavy {
        let bands = g.batch * g.out_height.div_ceil(fit);
        let splits = (2 * threads).div_ceil(bands).min(panels / 2).max(1);
        (fit.min(g.out_height), splits)
    } else {
        let per_image = (2 * threads).div_ceil(g.batch);
        (fit.min(g.out_height.div_ceil(per_image)), 1)
    };
    let bands = g.out_height.div_ceil(band);
    let panels_per_task = panels.div_ceil(splits);
    // The flat positions a band computes, in whole tiles.
    let positions = (band * wp).next_multiple_of(NR);
    // A phase plane: the band's rows and those the taps reach below them,
    // what the last tile reads past them, rounded to an odd number of
    // 16-value lines so that the planes' rows fall in different L1 sets.
    let plane = {
        let len = (band + reach) * wp + NR + reach;
        odd_lines(len)
    };
    let taps = k * k;
    let block = (DIRECT_BLOCK_DEPTH / taps).max(32).min(c);
    let offsets: Vec<usize> = (0..block * taps)
        .map(|r| (r / taps * phases) * plane + tap_offset(r % taps, g, plane, wp))
        .collect();
    let window_len = c * phases * plane;

    // Left uninitialised: the epilogue writes every value.
    let mut out = Vec::<f32>::with_capacity(g.batch * o * n);
    let dst = SharedMut(out.as_mut_ptr());
    // Image i's planes of input channels `channels`, part after part.
    let image_planes = |i: usize, channels: Range<usize>| {
        let planes = parts.iter().flat_map(move |part| {
            let image = part.len() / g.batch;
            part[i * image..][..image].chunks_exact(g.in_plane())
        });
        planes.skip(channels.start).take(channels.len())
    };
    // Band t (image t / bands) over output channel panels `task_panels`,
    // from its window, into `sums` (o x positions) and then the output.
    let compute = |t: usize, task_panels: Range<usize>, window: &[f32], sums: &mut [f32]| {
        let (i, oy0) = (t / bands, t % bands * band);
        let rows = band.min(g.out_height - oy0);
        let used = (rows * wp).next_multiple_of(NR);
        for c0 in (0..c).step_by(block) {
            let channels = block.min(c - c0);
            let depth = c0 * taps..(c0 + channels) * taps;
            let offsets = &offsets[..channels * taps];
            let base = window[c0 * phases * plane..].as_ptr();
            // BLIS's order: the input a tile reads stays in L1 while
            // the weight panels of a group (in L2) pass over it.
            let group = (DIRECT_GROUP_FLOATS / (depth.len() * sgemm::MR)).max(1);
            for first in task_panels.clone().step_by(group) {
                for p in (0..used).step_by(NR) {
                    for panel in first..task_panels.end.min(first + group) {
                        let h = sgemm::MR.min(o - panel * sgemm::MR);
                        // SAFETY: the window holds what every offset
                        // reaches from position p < used (the plane's
                        // slack past the band's rows); sums holds h
                        // rows of `positions` >= used values from
                        // row panel * MR on.
                        unsafe {
                            let y = sums[panel * sgemm::MR * positions + p..].as_mut_ptr();
                            weight.tile_from_rows(
                                panel,
                                // The first tiles read the weights
                                // from memory.
                                (p == 0).then_some(panel + 1),
                                depth.clone(),
                                base.add(p),
                                offsets,
                                y,
                                positions,
                                (h, NR),
                                c0 > 0,
                            );
                        }
                    }
                }
            }
        }
        let start = oy0 * g.out_width;
        let channels = task_panels.start * sgemm::MR..(task_panels.end * sgemm::MR).min(o);
        for ch in channels {
            let sums = &sums[ch * positions..][..rows * wp];
            // SAFETY: this band's rows of channel ch of image i, which
            // no other task writes, each written whole before the
            // slice over them is made.
            let row = unsafe {
                let out = dst.get().add((i * o + ch) * n + start);
                for (y, sums) in sums.chunks_exact(wp).enumerate() {
                    let to = out.add(y * g.out_width);
                    std::ptr::copy_nonoverlapping(sums.as_ptr(), to, g.out_width);
                }
                std::slice::from_raw_parts_mut(out, rows * g.out_width)
            };
            epilogue.finish_at(row, i * o + ch, start, n, o);
        }
    };
    let band_rows = |t: usize| {
        let oy0 = t % bands * band;
        oy0..oy0 + band.min(g.out_height - oy0) + reach
    };
    let windows = g.batch * bands;
    if splits == 1 {
        team::for_each(windows, |t| {
            with_scratch(window_len + o * positions, |scratch| {
                let (window, sums) = scratch.split_at_mut(window_len);
                pad_window(
                    image_planes(t / bands, 0..c),
                    g,
                    band_rows(t),
                    wp,
                    plane,
                    window,
                );
                compute(t, 0..panels, window, sums)
            })
        });
    } else {
        // The tasks of a band share its window: built once, by ranges of
        // channels in parallel, rather than once per task (ResNet-50's
        // 512-channel layers at 7x7 built their 0.9 MiB window four times).
        with_shared(windows * window_len, |shared| {
            let base = SharedMut(shared.as_mut_ptr());
            let ranges = (2 * threads).div_ceil(windows).min(c);
            team::for_each(windows * ranges, |job| {
                let (t, r) = (job / ranges, job % ranges);
                let channels = r * c / ranges..(r + 1) * c / ranges;
                let span = phases * plane;
                // SAFETY: each job writes its own channels' planes of
                // window t, within the shared buffer.
                let window = unsafe {
                    std::slice::from_raw_parts_mut(
                        base.get().add(t * window_len + channels.start * span),
                        channels.len() * span,
                    )
                };
                pad_window(
                    image_planes(t / bands, channels),
                    g,
                    band_rows(t),
                    wp,
                    plane,
                    window,
                );
            });
            let shared = &*shared;
            team::for_each(windows * splits, |task| {
                let (t, split) = (task / splits, task % splits);
                let first = split * panels_per_task;
                let window = &shared[t * window_len..][..window_len];
                with_scratch(o * positions, |sums| {
                    compute(
                        t,
                        first..(first + panels_per_task).min(panels),
                        window,
                        sums,
                    )
                })
            });
        });
    }
    // SAFETY: the bands cover every output value.
    unsafe { out.set_len(g.batch * o * n) };
    out
}

/// Where tap `tap` (row-major in the k x k kernel) reads in one channel's
/// [`pad_window`], from the output pixel's position: in the plane of its
/// stride phase, `dy / s` rows and `dx / s` columns on.
fn tap_offset(tap: usize, g: &ConvGeometry, plane: usize, wp: usize) -> usize {
    let (k, s) = (g.kernel, g.stride);
    let (dy, dx) = (tap / k * g.dilation, tap % k * g.dilation);
    (dy % s * s + dx % s) * plane + dy / s * wp + dx / s
}

/// Copies what output rows `rows` read of every channel plane of one image
/// (`[H, W]` each, in order) into `window`: for each channel and each stride
/// phase `(qy, qx)`, a `plane` whose row `r` holds padded input row
/// `s * rows.start + s * r + qy` at columns `qx, qx + s, ...` (`wp` of
/// them), zero outside the input.
fn pad_window<'a>(
    channels: impl Iterator<Item = &'a [f32]>,
    g: &ConvGeometry,
    rows: Range<usize>,
    wp: usize,
    plane: usize,
    window: &mut [f32],
) {
    let s = g.stride;
    let mut planes = window.chunks_mut(plane);
    for src in channels {
        for (qy, qx) in (0..s * s).map(|q| (q / s, q % s)) {
            let dst = planes.next().expect("a plane per channel and phase");
            for (r, oy) in rows.clone().enumerate() {
                let row = &mut dst[r * wp..][..wp];
                let iy = (oy * s + qy).checked_sub(g.pad_top);
                match iy.filter(|&iy| iy < g.height) {
                    Some(iy) => phase_row(&src[iy * g.width..][..g.width], g.pad_left, s, qx, row),
                    None => row.fill(0.0),
                }
            }
        }
    }
}

/// `out[u]` = padded `input[u * stride + phase]`, the input padded by `pad`
/// zeros on the left and any number on the right. `phase` is any offset: a
/// stride phase of the window path, or a tap's column offset in im2col.
fn phase_row(input: &[f32], pad: usize, stride: usize, phase: usize, out: &mut [f32]) {
    // The first u whose column u * stride + phase - pad lies in the input.
    let lo = pad.saturating_sub(phase).div_ceil(stride);
    if lo >= out.len() {
        out.fill(0.0);
        return;
    }
    let first = lo * stride + phase - pad;
    let len = if first < input.len() {
        (input.len() - first).div_ceil(stride).min(out.len() - lo)
    } else {
        0
    };
    out[..lo].fill(0.0);
    let src = &input[first.min(input.len())..];
    let dst = &mut out[lo..lo + len];
    match stride {
        1 => dst.copy_from_slice(&src[..len]),
        2 => {
            // Pairs, so that the compiler vectorises the gather (even lanes
            // of two loads) instead of one indexed load per value.
            let pairs = len.min(src.len() / 2);
            for (v, pair) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
                *v = pair[0];
            }
            if pairs < len {
                dst[pairs] = src[2 * pairs];
            }
        }
        _ => {
            for (v, &x) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                *v = x;
            }
        }
    }
    out[lo + len..].fill(0.0);
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// What the tasks of one step share (see [`with_shared`]).
    static SHARED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch buffer, which is kept
/// for the next layer and request (no allocation, no zeroing). Its contents
/// are left over from earlier use: `f` must write before it reads. The
/// buffer grows to the largest band's window and sums, or the largest 1x1
/// tile's subsampled input (a few MiB for ResNet-50 and DETR).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    lend(&SCRATCH, len, f)
}

/// Runs `f` on `len` floats of the calling thread's shared buffer, for a
/// layer's input transformed once and then read by all of its tasks (a
/// band's window, Winograd's V). Kept across calls like [`with_scratch`]
/// (zeroing a fresh buffer took the leader 1% of ResNet-50's pass while
/// the other threads waited), with contents left over from earlier use.
pub(crate) fn with_shared<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    lend(&SHARED, len, f)
}

/// `f` on the first `len` floats of the thread's buffer `key`, grown as
/// needed; a fresh one if this thread has already lent it out.
fn lend<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread while its buffer is lent.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Floats of column matrix per tile (1 MiB): about what a core's L2 cache holds.
const TILE_FLOATS: usize = 256 * 1024;
/// The narrowest tile: narrower ones would pay the gemm's per-call work
/// (packing the column block) over too few columns.
const MIN_TILE_COLUMNS: usize = 512;

/// Depthwise convolution of `x` `[B, C, H, W]` with `taps` `[k, k, C]`
/// (tap-major: the layout [`pack_depthwise`] makes), returning `[B, C, Ho, Wo]`.
///
/// Large planes are computed plane by plane ([`depthwise_planar`]). Smaller
/// ones, usually with many channels, channels-last: each image transposed to
/// `[H, W, C]`, every output pixel accumulated over its taps with the
/// channels as the vector dimension, and transposed back. Planes of 7x7 or
/// 14x14 pixels, and strided taps, then cost no more per value than large
/// ones.
pub fn depthwise(x: &[f32], g: &ConvGeometry, taps: &[f32], epilogue: &Epilogue) -> Vec<f32> {
    let c = g.in_channels;
    assert_eq!(g.out_channels, c);
    assert_eq!(x.len(), g.batch * c * g.in_plane());
    assert_eq!(taps.len(), c * g.kernel * g.kernel);
    assert_eq!(epilogue.bias.len(), c);
    let n = g.out_plane();
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), g.batch * c * n);
    }
    if g.width >= PLANAR_MIN_WIDTH {
        return depthwise_planar(x, g, taps, epilogue);
    }
    depthwise_channels_last(x, g, taps, epilogue)
}

/// Input width from which [`depthwise`] works plane by plane. Measured on
/// EfficientNet-B0's layers, both ways in the same run: planes of 56 and 112
/// ran 1.3-2x faster plane by plane (96 channels at 112x112, stride 2:
/// 2.5-4.8 -> 5.6-8.4 GFLOP/s at batch 1), while at 28 and below, with
/// hundreds of channels, channels-last was up to 4x faster at batch 8.
/// EfficientNet-B0 as a whole: 8% faster at batch 1 and 8.
const PLANAR_MIN_WIDTH: usize = 56;

/// [`depthwise`] channels-last.
fn depthwise_channels_last(
    x: &[f32],
    g: &ConvGeometry,
    taps: &[f32],
    epilogue: &Epilogue,
) -> Vec<f32> {
    let c = g.in_channels;
    let n = g.out_plane();
    let per_image = c * n;
    let mut out = vec![0f32; g.batch * per_image];
    let image = |i: usize| &x[i * c * g.in_plane()..][..c * g.in_plane()];
    let threads = team::threads();
    let whole = if threads > 1 {
        g.batch / threads * threads
    } else {
        0
    };
    let (x_len, y_len) = (g.in_plane() * c, n * c);
    team::for_each_chunk(&mut out[..whole * per_image], per_image, |i, y| {
        with_scratch(x_len + y_len, |scratch| {
            let (xt, yt) = scratch.split_at_mut(x_len);
            depthwise_image(image(i), g, taps, epilogue, i, (xt, yt, y), false)
        })
    });
    with_scratch(x_len + y_len, |scratch| {
        let (xt, yt) = scratch.split_at_mut(x_len);
        for i in whole..g.batch {
            let y = &mut out[i * per_image..][..per_image];
            depthwise_image(
                image(i),
                g,
                taps,
                epilogue,
                i,
                (&mut *xt, &mut *yt, y),
                true,
            );
        }
    });
    out
}

/// Depthwise convolution one channel plane at a time, for large planes:
/// each task copies its plane into a zero-padded window (one plane per
/// stride phase, as [`dense_direct`]'s), where every tap is a fixed offset
/// from the output pixel's position, and sums the taps over runs of 16
/// output pixels held in registers. The input is read once and the output
/// written once, with no transposes.
fn depthwise_planar(x: &[f32], g: &ConvGeometry, taps: &[f32], epilogue: &Epilogue) -> Vec<f32> {
    let (c, k, s, d) = (g.in_channels, g.kernel, g.stride, g.dilation);
    let n = g.out_plane();
    let reach = (k - 1) * d / s;
    let (wp, hp) = (g.out_width + reach, g.out_height + reach);
    let plane = wp * hp;
    let offsets: Vec<usize> = (0..k * k).map(|t| tap_offset(t, g, plane, wp)).collect();
    let mut out = vec![0f32; g.batch * c * n];
    team::for_each_chunk(&mut out, n, |index, y| {
        let channel = index % c;
        let src = &x[index * g.in_plane()..][..g.in_plane()];
        let weights: Vec<f32> = (0..k * k).map(|t| taps[t * c + channel]).collect();
        with_scratch(s * s * plane, |window| {
            pad_window(std::iter::once(src), g, 0..hp, wp, plane, window);
            simd::depthwise_plane(y, window, &offsets, &weights, g.out_width, wp);
        });
        epilogue.finish_at(y, index, 0, n, c);
    });
    out
}

/// `[O, 1, k, k]` depthwise weights as the `[k, k, C]` taps [`depthwise`] reads.
pub fn pack_depthwise(weight: &[f32], channels: usize) -> Vec<f32> {
    let taps = weight.len() / channels;
    let mut packed = vec![0f32; weight.len()];
    transpose(weight, channels, taps, &mut packed, false);
    packed
}

/// One image of [`depthwise`]: `xt` `[H, W, C]` and `yt` `[Ho, Wo, C]` are
/// scratch, `y` `[C, Ho, Wo]` the output.
fn depthwise_image(
    x: &[f32],
    g: &ConvGeometry,
    taps: &[f32],
    epilogue: &Epilogue,
    index: usize,
    (xt, yt, y): (&mut [f32], &mut [f32], &mut [f32]),
    parallel: bool,
) {
    let (c, n) = (g.in_channels, g.out_plane());
    transpose(x, c, g.in_plane(), xt, parallel);
    // Without a residual the activation is applied channels-last, while the
    // pixel is in cache; with one, after the transpose back.
    let act = match epilogue.residual {
        None => epilogue.act,
        Some(_) => Activation::None,
    };
    let xt = &*xt;
    let row = |oy: usize, out: &mut [f32]| {
        simd::depthwise_row(out, xt, taps, epilogue.bias, act, oy, g);
    };
    for_each_chunk(yt, g.out_width * c, parallel, row);
    transpose(yt, n, c, y, parallel);
    if let Some(residual) = epilogue.residual {
        let residual = &residual[index * c * n..][..c * n];
        for (out, res) in y.chunks_exact_mut(n).zip(residual.chunks_exact(n)) {
            finish_row(out, 0.0, Some(res), epilogue.act);
        }
    }
}

/// `dst [cols, rows] = src [rows, cols]` transposed, in 8x8 tiles so that
/// both sides are read and written in runs of 8 values.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], parallel: bool) {
    const TILE: usize = 8;
    // Bands of dst rows (src columns), one task each when parallel.
    const BAND: usize = 8 * TILE;
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    let band = |j0: usize, out: &mut [f32]| {
        let width = out.len() / rows;
        for i0 in (0..rows).step_by(TILE) {
            for jt in (0..width).step_by(TILE) {
                let (h, w) = (TILE.min(rows - i0), TILE.min(width - jt));
                if h == TILE && w == TILE {
                    let mut tile = [[0f32; TILE]; TILE];
                    for (a, t) in tile.iter_mut().enumerate() {
                        t.copy_from_slice(&src[(i0 + a) * cols + j0 + jt..][..TILE]);
                    }
                    for b in 0..TILE {
                        let d = &mut out[(jt + b) * rows + i0..][..TILE];
                        for (a, v) in d.iter_mut().enumerate() {
                            *v = tile[a][b];
                        }
                    }
                } else {
                    for a in 0..h {
                        for b in 0..w {
                            out[(jt + b) * rows + i0 + a] = src[(i0 + a) * cols + j0 + jt + b];
                        }
                    }
                }
            }
        }
    };
    for_each_chunk(dst, BAND * rows, parallel, |b, out| band(b * BAND, out));
}

/// The input row that output row `oy` reads for kernel row `ki`, if inside.
fn input_row(oy: usize, ki: usize, g: &ConvGeometry) -> Option<usize> {
    let iy = (oy * g.stride + ki * g.dilation) as isize - g.pad_top as isize;
    (iy >= 0 && (iy as usize) < g.height).then_some(iy as usize)
}

/// The column matrix of output rows `oys` of one image `[C, H, W]`: row
/// `(c, ki, kj)` holds, for each of those output pixels, the input pixel that
/// tap reads (zero in the padding).
fn im2col(image: &[f32], g: &ConvGeometry, cols: &mut [f32], oys: Range<usize>, parallel: bool) {
    let k = g.kernel;
    let width = oys.len() * g.out_width;
    let fill = |r: usize, row: &mut [f32]| {
        let (c, tap) = (r / (k * k), r % (k * k));
        let (ki, kj) = (tap / k, tap % k);
        let plane = &image[c * g.in_plane()..][..g.in_plane()];
        for (oy, dst) in oys.clone().zip(row.chunks_exact_mut(g.out_width)) {
            match input_row(oy, ki, g) {
                Some(iy) => {
                    let src = &plane[iy * g.width..][..g.width];
                    phase_row(src, g.pad_left, g.stride, kj * g.dilation, dst);
                }
                None => dst.fill(0.0),
            }
        }
    };
    for_each_chunk(
        &mut cols[..g.in_channels * k * k * width],
        width,
        parallel,
        fill,
    );
}

/// `f(i, chunk)` for each `len`-value chunk of `buf` (the last may be
/// shorter), spread over the threads when `parallel`.
fn for_each_chunk(
    buf: &mut [f32],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if parallel {
        team::for_each_chunk(buf, len, f);
    } else {
        for (i, chunk) in buf.chunks_mut(len).enumerate() {
            f(i, chunk);
        }
    }
}

mod simd {
    use super::{input_row, ConvGeometry};
    use crate::activation::{finish_row_inline, Activation};
    use crate::vmath::avx2_dispatch;

    avx2_dispatch! {
        /// One output plane (`width` values per row) of a depthwise
        /// convolution from its padded window (rows of `wp`): each value is
        /// the sum over taps of `weights[t] * window[position + offsets[t]]`.
        pub fn depthwise_plane(
            out: &mut [f32],
            window: &[f32],
            offsets: &[usize],
            weights: &[f32],
            width: usize,
            wp: usize,
        ) {
            const RUN: usize = 16;
            for (oy, row) in out.chunks_exact_mut(width).enumerate() {
                for x0 in (0..width).step_by(RUN) {
                    let len = RUN.min(width - x0);
                    let base = oy * wp + x0;
                    let mut acc = [0f32; RUN];
                    if len == RUN {
                        for (&offset, &w) in offsets.iter().zip(weights) {
                            let src = &window[base + offset..][..RUN];
                            for (a, &v) in acc.iter_mut().zip(src) {
                                *a += w * v;
                            }
                        }
                    } else {
                        for (&offset, &w) in offsets.iter().zip(weights) {
                            let src = &window[base + offset..][..len];
                            for (a, &v) in acc.iter_mut().zip(src) {
                                *a += w * v;
                            }
                        }
                    }
                    row[x0..x0 + len].copy_from_slice(&acc[..len]);
                }
            }
        }
    }

    avx2_dispatch! {
        /// Output row `oy` of a depthwise convolution, channels-last:
        /// `out [Wo, C] = act(bias + sum over taps of taps[tap] * xt[pixel])`.
        pub fn depthwise_row(
            out: &mut [f32],
            xt: &[f32],
            taps: &[f32],
            bias: &[f32],
            act: Activation,
            oy: usize,
            g: &ConvGeometry,
        ) {
            let (c, k) = (g.in_channels, g.kernel);
            for (ox, acc) in out.chunks_exact_mut(c).enumerate() {
                acc.copy_from_slice(bias);
                for ki in 0..k {
                    let Some(iy) = input_row(oy, ki, g) else {
                        continue;
                    };
                    for kj in 0..k {
                        let ix = (ox * g.stride + kj * g.dilation) as isize - g.pad_left as isize;
                        if ix < 0 || ix as usize >= g.width {
                            continue;
                        }
                        let src = &xt[(iy * g.width + ix as usize) * c..][..c];
                        let w = &taps[(ki * k + kj) * c..][..c];
                        for ((a, &w), &v) in acc.iter_mut().zip(w).zip(src) {
                            *a += w * v;
                        }
                    }
                }
                finish_row_inline(acc, 0.0, None, act);
            }
        }
    }
}

/// The convolution written out in f64, for the kernels' tests.
#[cfg(test)]
pub(crate) mod reference {
    use super::ConvGeometry;

    /// Output `index` of `[B, O, Ho, Wo]`: the sum over the taps of a dense
    /// convolution (one group, no dilation) of `x` `[B, C, H, W]` with
    /// `weight` `[O, C, k, k]`, before bias and activation.
    pub(crate) fn dense_at(x: &[f32], weight: &[f32], g: &ConvGeometry, index: usize) -> f64 {
        let (c, k, s) = (g.in_channels, g.kernel, g.stride);
        let (plane, pos) = (index / g.out_plane(), index % g.out_plane());
        let (i, oc) = (plane / g.out_channels, plane % g.out_channels);
        let (oy, ox) = (pos / g.out_width, pos % g.out_width);
        let mut sum = 0f64;
        for ic in 0..c {
            for ki in 0..k {
                for kj in 0..k {
                    let iy = (oy * s + ki)
                        .checked_sub(g.pad_top)
                        .filter(|&y| y < g.height);
                    let ix = (ox * s + kj)
                        .checked_sub(g.pad_left)
                        .filter(|&x| x < g.width);
                    if let (Some(iy), Some(ix)) = (iy, ix) {
                        let v = x[((i * c + ic) * g.height + iy) * g.width + ix];
                        sum += weight[((oc * c + ic) * k + ki) * k + kj] as f64 * v as f64;
                    }
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_any_shape() {
        for (rows, cols) in [(1, 1), (3, 5), (8, 8), (17, 9), (96, 70), (5, 130)] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            for parallel in [false, true] {
                let mut dst = vec![0f32; rows * cols];
                transpose(&src, rows, cols, &mut dst, parallel);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(dst[j * rows + i], src[i * cols + j], "{rows}x{cols}");
                    }
                }
            }
        }
    }

    /// Both depthwise paths against the sum written out in f64: strides,
    /// dilation, uneven padding, a residual, widths on both sides of the
    /// switch between them.
    #[test]
    fn depthwise_paths_match_the_direct_sum() {
        // (channels, h, w, k, stride, dilation, pad_top, pad_left)
        let cases = [
            (3, 9, 60, 3, 1, 1, 1, 1),
            (5, 13, 57, 3, 2, 1, 0, 1),
            (4, 8, 56, 5, 2, 1, 2, 2),
            (2, 11, 70, 3, 1, 2, 2, 2),
            (6, 7, 20, 5, 1, 1, 2, 2),
            (3, 10, 17, 3, 2, 1, 1, 0),
        ];
        for (c, h, w, k, s, d, pt, pl) in cases {
            let span = (k - 1) * d + 1;
            let (ho, wo) = ((h + 2 * pt - span) / s + 1, (w + 2 * pl - span) / s + 1);
            let g = ConvGeometry {
                batch: 2,
                in_channels: c,
                height: h,
                width: w,
                out_channels: c,
                kernel: k,
                stride: s,
                dilation: d,
                pad_top: pt,
                pad_left: pl,
                out_height: ho,
                out_width: wo,
            };
            let value = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
            let x: Vec<f32> = (0..2 * c * h * w).map(value).collect();
            let weight: Vec<f32> = (0..c * k * k).map(|i| value(i + 5)).collect();
            let bias: Vec<f32> = (0..c).map(|i| value(i + 11)).collect();
            let residual: Vec<f32> = (0..2 * c * ho * wo).map(|i| value(i + 17)).collect();
            let taps = pack_depthwise(&weight, c);
            let epilogue = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                act: Activation::Relu,
            };
            let planar = depthwise_planar(&x, &g, &taps, &epilogue);
            let channels_last = depthwise_channels_last(&x, &g, &taps, &epilogue);
            for (index, ((p, q), r)) in planar.iter().zip(&channels_last).zip(&residual).enumerate()
            {
                let (plane, pos) = (index / (ho * wo), index % (ho * wo));
                let (ch, oy, ox) = (plane % c, pos / wo, pos % wo);
                let mut sum = bias[ch] as f64 + *r as f64;
                for ki in 0..k {
                    for kj in 0..k {
                        let iy = (oy * s + ki * d) as isize - pt as isize;
                        let ix = (ox * s + kj * d) as isize - pl as isize;
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            let v = x[plane * h * w + iy as usize * w + ix as usize];
                            sum += weight[ch * k * k + ki * k + kj] as f64 * v as f64;
                        }
                    }
                }
                let want = sum.max(0.0) as f32;
                for (path, got) in [("planar", p), ("channels-last", q)] {
                    assert!(
                        (got - want).abs() <= 1e-5,
                        "{path} {c}x{h}x{w} k{k} s{s} d{d} [{index}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The window path against the sum written out in f64, on both of its
    /// splits: small maps with many channels (ranges of output channels per
    /// task) and larger ones (bands of rows).
    #[test]
    fn dense_direct_matches_the_direct_sum() {
        // On one thread (each band alone) and on three (bands' windows
        // shared by the tasks of their output channels), the same bits.
        let teams = [1, 3].map(|n| team::Team::new(n, std::time::Duration::from_micros(50)));
        // (batch, channels, out channels, size, k, stride, pad)
        let cases = [
            (1, 40, 70, 5, 3, 1, 1),
            (1, 48, 64, 9, 3, 2, 1),
            (2, 30, 62, 4, 3, 1, 1),
            // ResNet-50's 7x7 shapes, fewer channels.
            (1, 32, 96, 7, 3, 1, 1),
            (1, 40, 64, 14, 3, 2, 1),
            (1, 3, 8, 30, 3, 1, 1),
            (3, 4, 7, 17, 5, 2, 2),
        ];
        for (b, c, o, size, k, s, pad) in cases {
            let g = ConvGeometry::padded(b, c, (size, size), o, k, s, pad);
            let value = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
            let x: Vec<f32> = (0..b * c * size * size).map(value).collect();
            let weight: Vec<f32> = (0..o * c * k * k).map(|i| value(i + 5)).collect();
            let bias: Vec<f32> = (0..o).map(|i| value(i + 11)).collect();
            let epilogue = Epilogue {
                bias: &bias,
                residual: None,
                act: Activation::None,
            };
            let packed = PackedLhs::new(&weight, o, c * k * k);
            let [one, three] = teams
                .map(|team| team::with_team(team, || dense_direct(&[&x], &g, &packed, &epilogue)));
            for (index, (&got, &other)) in one.iter().zip(&three).enumerate() {
                let want = reference::dense_at(&x, &weight, &g, index)
                    + bias[index / g.out_plane() % o] as f64;
                assert!(
                    (got as f64 - want).abs() <= 1e-4,
                    "{b}x{c}x{size} k{k}/{s} -> {o} [{index}]: {got} vs {want}"
                );
                assert_eq!(
                    got.to_bits(),
                    other.to_bits(),
                    "{b}x{c}x{size} k{k}/{s} [{index}]"
                );
            }
        }
    }

    /// A phase row against the padded input read directly.
    #[test]
    fn phase_rows_subsample_the_padded_input() {
        let input: Vec<f32> = (1..=11).map(|v| v as f32).collect();
        for stride in 1..=3 {
            for phase in 0..2 * stride + 2 {
                for pad in 0..4 {
                    for len in [1, 4, 7, 12] {
                        let mut out = vec![f32::NAN; len];
                        phase_row(&input, pad, stride, phase, &mut out);
                        for (u, &v) in out.iter().enumerate() {
                            let x = (u * stride + phase) as isize - pad as isize;
                            let want = usize::try_from(x)
                                .ok()
                                .and_then(|x| input.get(x).copied())
                                .unwrap_or(0.0);
                            assert_eq!(v, want, "s{stride} q{phase} p{pad} [{u}]");
                        }
                    }
                }
            }
        }
    }
}
