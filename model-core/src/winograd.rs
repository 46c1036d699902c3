//! 3x3 stride-1 convolutions on the CPU in f32 by Winograd's minimal
//! filtering F(4x4, 3x3) (Lavin and Gray, 2015): each 4x4 block of outputs
//! comes from a 6x6 block of input with 36 multiplications per (input,
//! output) channel pair instead of 144.
//!
//! - Every 3x3 filter `g` becomes `U = G g G^T` (6x6, computed in f64), and
//!   the 36 matrices `U[xi]` `[O, C]` are packed for the gemm. A layer does
//!   this on its first input with enough tiles ([`LazyWinograd`]).
//! - Per band of tile rows: each 6x6 input block `d` becomes `V = B^T d B`,
//!   laid out as 36 matrices `[C, tiles]`; 36 gemms `M[xi] = U[xi] V[xi]`
//!   ([`PackedLhs::tile_from_rows`], reading V in place); each output block
//!   is `A^T M A`, written with the bias, residual and activation.
//! - Both transforms run on whole rows of tiles, vectorised across the
//!   tiles: the input rows are split by column phase (`x % 4`), so that
//!   every tap of every tile in a row is one contiguous run.
//!
//! Accuracy: the transforms' coefficients (up to 8 and down to 1/24) cost a
//! few bits over the direct sum; see the tests and the conformance figures.

use std::sync::OnceLock;

use crate::cpu_conv::{check_parts, odd_lines, with_scratch, with_shared, ConvGeometry, Epilogue};
use crate::sgemm::{self, PackedLhs, SharedMut};
use crate::team;
use crate::vmath::avx2_dispatch;

/// Outputs per tile side.
const TILE: usize = 4;
/// Inputs per tile side: `TILE + 3 - 1`.
const ALPHA: usize = 6;
/// Products per tile: one gemm each.
const POINTS: usize = ALPHA * ALPHA;

/// `[f(0), ..., f(5)]` written out. `std::array::from_fn` stayed out of
/// line in the transforms' loops (`perf`: 5% of a 14x14 layer at batch 1,
/// a call per value and per row of tiles); a closure called directly is
/// always inlined.
macro_rules! six {
    (|$i:pat_param| $body:expr) => {{
        #[allow(unused_mut)]
        let mut f = |$i: usize| $body;
        [f(0), f(1), f(2), f(3), f(4), f(5)]
    }};
}

/// `[f(0), ..., f(3)]`, as [`six!`].
macro_rules! four {
    (|$i:pat_param| $body:expr) => {{
        #[allow(unused_mut)]
        let mut f = |$i: usize| $body;
        [f(0), f(1), f(2), f(3)]
    }};
}

/// `G` (6x3): the filter transform.
const G: [[f64; 3]; ALPHA] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A convolution's filters transformed for [`conv`]: `U[xi]` `[O, C]`,
/// packed. Four times the size of the 3x3 filters.
#[derive(Debug)]
pub struct WinogradWeights {
    u: Vec<PackedLhs>,
    out_channels: usize,
    in_channels: usize,
}

impl WinogradWeights {
    /// From `[O, C, 3, 3]` filters (a batch norm already folded in).
    pub fn new(weight: &[f32], out_channels: usize, in_channels: usize) -> Self {
        let (o, c) = (out_channels, in_channels);
        assert_eq!(weight.len(), o * c * 9, "weights are not [{o}, {c}, 3, 3]");
        let mut u = vec![vec![0f32; o * c]; POINTS];
        for (pair, g) in weight.chunks_exact(9).enumerate() {
            // G g, then (G g) G^T.
            let mut gg = [[0f64; 3]; ALPHA];
            for (row, gi) in gg.iter_mut().zip(&G) {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|k| gi[k] * g[k * 3 + j] as f64).sum();
                }
            }
            for (i, row) in gg.iter().enumerate() {
                for (j, gj) in G.iter().enumerate() {
                    u[i * ALPHA + j][pair] = (0..3).map(|k| row[k] * gj[k]).sum::<f64>() as f32;
                }
            }
        }
        Self {
            u: u.iter().map(|m| PackedLhs::new(m, o, c)).collect(),
            out_channels: o,
            in_channels: c,
        }
    }
}

/// A layer's [`WinogradWeights`], built from its direct kernel's packed
/// weights the first time an input has enough tiles ([`pays`]), in the
/// warm-up pass for a server. A layer whose inputs never do (ResNet-50's
/// 7x7 stage at 224 pixels) never holds them: the transformed filters are
/// four times the size of the 3x3 ones.
#[derive(Debug, Default)]
pub struct LazyWinograd(OnceLock<WinogradWeights>);

impl LazyWinograd {
    /// The transformed filters of `direct`, the `[O, C * 9]` weights of a
    /// 3x3 convolution packed for the direct kernel.
    pub fn get(&self, direct: &PackedLhs) -> &WinogradWeights {
        self.0.get_or_init(|| {
            let (o, depth) = (direct.rows(), direct.depth());
            WinogradWeights::new(&direct.unpack(), o, depth / 9)
        })
    }

    /// Whether the filters have been built.
    pub fn is_built(&self) -> bool {
        self.0.get().is_some()
    }
}

/// Whether [`conv`] is expected to beat the direct kernel on this input:
/// enough tiles per image that each pass over the transformed weights (four
/// times the filters' size) is shared by several register tiles. Below
/// that (ResNet-50's 7x7 maps: 4 tiles), streaming `U` costs more than the
/// multiplications it saves, at least at batch 1. Decided per image, not
/// per batch, so that an image's result does not depend on its batchmates
/// (Winograd's rounding differs from the direct kernel's).
pub fn pays(g: &ConvGeometry) -> bool {
    g.out_height.div_ceil(TILE) * g.out_width.div_ceil(TILE) >= MIN_TILES
}

/// The fewest tiles per image for which [`pays`] says yes.
const MIN_TILES: usize = 16;

/// Floats of transformed input per task (512 KiB, a core's L2).
const TASK_FLOATS: usize = 128 * 1024;

/// Rows of V (input channels) per depth block of the gemm: 256 rows of 16
/// values (16 KiB) stay in L1 while the weight panels pass over them.
const BLOCK_DEPTH: usize = 256;

/// Weight values per group of panels run over one column block (128 KiB).
const GROUP_FLOATS: usize = 32 * 1024;

/// `x` `[B, C, H, W]` (the channel concatenation of `parts`) convolved with
/// 3x3 filters at stride 1, returning `[B, O, Ho, Wo]` with the epilogue
/// applied.
pub fn conv(
    parts: &[&[f32]],
    g: &ConvGeometry,
    w: &WinogradWeights,
    epilogue: &Epilogue,
) -> Vec<f32> {
    assert!(
        g.kernel == 3 && g.stride == 1 && g.dilation == 1,
        "Winograd F(4x4, 3x3) takes 3x3 stride-1 convolutions"
    );
    let (c, o) = (g.in_channels, g.out_channels);
    assert_eq!((w.in_channels, w.out_channels), (c, o), "weight shape");
    check_parts(parts, g);
    assert_eq!(epilogue.bias.len(), o);
    let n = g.out_height * g.out_width;
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), g.batch * o * n);
    }
    if g.batch * n == 0 {
        return Vec::new();
    }
    let plan = Plan::new(g, team::threads());
    let mut out = Vec::<f32>::with_capacity(g.batch * o * n);
    let dst = SharedMut(out.as_mut_ptr());
    if plan.channel_tasks == 1 {
        plan.each_task_alone(parts, g, w, epilogue, dst);
    } else {
        plan.sharing_input(parts, g, w, epilogue, dst);
    }
    // SAFETY: the tasks cover every output value.
    unsafe { out.set_len(g.batch * o * n) };
    out
}

/// How [`conv`] splits its work: runs of tiles (numbered row by row, image
/// after image) in whole register tiles of [`sgemm::NR`], as even as they
/// can be; and, when those are too few for the threads, ranges of output
/// channels (which share their tiles' transformed input, and each read only
/// their part of the weights).
struct Plan {
    tiles_x: usize,
    tiles_y: usize,
    /// Tiles over the batch.
    total: usize,
    tile_tasks: usize,
    channels_per_task: usize,
    channel_tasks: usize,
}

impl Plan {
    fn new(g: &ConvGeometry, threads: usize) -> Self {
        const NR: usize = sgemm::NR;
        let tiles_x = g.out_width.div_ceil(TILE);
        let tiles_y = g.out_height.div_ceil(TILE);
        let tiles = g.batch * tiles_x * tiles_y;
        let units = tiles.div_ceil(NR);
        let per_task = (TASK_FLOATS / (POINTS * g.in_channels * NR)).max(1);
        let tile_tasks = units.div_ceil(per_task).max((2 * threads).min(units));
        let panels = g.out_channels.div_ceil(sgemm::MR);
        let splits = (2 * threads).div_ceil(tile_tasks).min(panels / 2).max(1);
        let channels_per_task = panels.div_ceil(splits) * sgemm::MR;
        Self {
            tiles_x,
            tiles_y,
            total: tiles,
            tile_tasks,
            channels_per_task,
            channel_tasks: g.out_channels.div_ceil(channels_per_task),
        }
    }

    /// The tiles of task `index`: its share of the register tiles.
    fn tiles(&self, index: usize) -> std::ops::Range<usize> {
        let units = self.total.div_ceil(sgemm::NR);
        let edge = |i: usize| (i * units / self.tile_tasks * sgemm::NR).min(self.total);
        edge(index)..edge(index + 1)
    }

    /// Each tile task transforms its tiles' input and runs every output
    /// channel of them.
    fn each_task_alone(
        &self,
        parts: &[&[f32]],
        g: &ConvGeometry,
        w: &WinogradWeights,
        epilogue: &Epilogue,
        dst: SharedMut,
    ) {
        let (c, o) = (g.in_channels, g.out_channels);
        team::for_each(self.tile_tasks, |task| {
            let tiles = self.tiles(task);
            let dims = self.v_dims(g, &tiles);
            let rest = self
                .transform_scratch(g)
                .max(self.finish_scratch(dims.1, o));
            with_scratch(POINTS * dims.0 + rest, |scratch| {
                let (v, rest) = scratch.split_at_mut(POINTS * dims.0);
                zero_spare_columns(v, c, tiles.len(), dims);
                let target = SharedMut(v.as_mut_ptr());
                // SAFETY: v is this task's V, of `dims`; this task writes
                // the output of its tiles, which no other task writes.
                unsafe {
                    self.transform(parts, g, &tiles, 0..c, target, dims, rest);
                    self.finish(g, w, epilogue, &tiles, 0..o, v, dims, dst, rest);
                }
            });
        });
    }

    /// With several tasks of output channels per tile task, their tiles'
    /// input is transformed once, by ranges of input channels in parallel,
    /// and shared, rather than once per task (at batch 1, ResNet-50's 3x3
    /// layers at 14x14 took 38% less time).
    fn sharing_input(
        &self,
        parts: &[&[f32]],
        g: &ConvGeometry,
        w: &WinogradWeights,
        epilogue: &Epilogue,
        dst: SharedMut,
    ) {
        let c = g.in_channels;
        let dims: Vec<_> = (0..self.tile_tasks)
            .map(|task| self.v_dims(g, &self.tiles(task)))
            .collect();
        // The tile tasks' Vs, one after another in the shared buffer.
        let starts: Vec<usize> = dims
            .iter()
            .scan(0, |end, d| {
                let start = *end;
                *end += POINTS * d.0;
                Some(start)
            })
            .collect();
        let total = dims.iter().map(|d| POINTS * d.0).sum();
        with_shared(total, |buf| {
            let base = SharedMut(buf.as_mut_ptr());
            let ranges = (2 * team::threads()).div_ceil(self.tile_tasks).min(c);
            team::for_each(self.tile_tasks * ranges, |job| {
                let (task, k) = (job / ranges, job % ranges);
                let (tiles, channels) = (self.tiles(task), k * c / ranges..(k + 1) * c / ranges);
                with_scratch(self.transform_scratch(g), |scratch| {
                    // SAFETY: each job writes its own input channels of
                    // its tile task's V, which starts at starts[task] and
                    // has that task's dims.
                    unsafe {
                        let v = SharedMut(base.get().add(starts[task]));
                        zero_spare_rows(v, channels.clone(), tiles.len(), dims[task]);
                        self.transform(parts, g, &tiles, channels, v, dims[task], scratch)
                    };
                });
            });
            let buf = &*buf;
            team::for_each(self.tile_tasks * self.channel_tasks, |task| {
                let tile_task = task / self.channel_tasks;
                let (tiles, dims) = (self.tiles(tile_task), dims[tile_task]);
                let first = task % self.channel_tasks * self.channels_per_task;
                let outs = first..(first + self.channels_per_task).min(g.out_channels);
                with_scratch(self.finish_scratch(dims.1, outs.len()), |scratch| {
                    let v = &buf[starts[tile_task]..][..POINTS * dims.0];
                    // SAFETY: this task writes the output of its tiles in
                    // its output channels, which no other task writes.
                    unsafe { self.finish(g, w, epilogue, &tiles, outs, v, dims, dst, scratch) };
                });
            });
        });
    }

    /// V's dims for `tiles`: values between two points' matrices (an odd
    /// number of cache lines, so that the 36 values of one tile do not all
    /// fall in one L1 set) and columns per row (whole register tiles).
    fn v_dims(&self, g: &ConvGeometry, tiles: &std::ops::Range<usize>) -> (usize, usize) {
        let tp = tiles.len().next_multiple_of(sgemm::NR);
        (odd_lines(g.in_channels * tp), tp)
    }

    /// The tile rows `tiles` touch: (image, tile row, its tiles, the column
    /// of the first in V and M).
    fn rows(
        &self,
        tiles: &std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>, usize)> + Clone + '_ {
        let (tx, start, end) = (self.tiles_x, tiles.start, tiles.end);
        (start / tx..end.div_ceil(tx)).map(move |row| {
            let span = start.max(row * tx) - row * tx..end.min(row * tx + tx) - row * tx;
            let column = row * tx + span.start - start;
            (row / self.tiles_y, row % self.tiles_y, span, column)
        })
    }

    /// The input transform of input channels `channels` of `tiles` into V
    /// (`[36][C][tp]`, `dims` from [`Plan::v_dims`]).
    ///
    /// `scratch` holds [`Plan::transform_scratch`] values.
    ///
    /// # Safety
    /// `v` holds such a V, and no other thread touches these channels' rows
    /// of it meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn transform(
        &self,
        parts: &[&[f32]],
        g: &ConvGeometry,
        tiles: &std::ops::Range<usize>,
        channels: std::ops::Range<usize>,
        v: SharedMut,
        dims: (usize, usize),
        scratch: &mut [f32],
    ) {
        let stage = self.stage();
        let (phases, rest) = scratch.split_at_mut(stage);
        let (columns, padded) = rest.split_at_mut(stage);
        for (image, ty, span, column) in self.rows(tiles) {
            let planes = parts.iter().flat_map(|part| {
                let len = part.len() / g.batch;
                part[image * len..][..len].chunks_exact(g.height * g.width)
            });
            // The span's input split by column phase: six rows of four
            // phases of `len + 1` values (a tile reads one value of the
            // next).
            let line = TILE * (span.len() + 1);
            for (ch, plane) in planes.enumerate().take(channels.end).skip(channels.start) {
                for i in 0..ALPHA {
                    let iy = (ty * TILE + i).checked_sub(g.pad_top);
                    let src = iy
                        .filter(|&iy| iy < g.height)
                        .map(|iy| &plane[iy * g.width..][..g.width]);
                    let out = &mut phases[i * line..][..line];
                    split_phases(src, g.pad_left, span.start * TILE, padded, out);
                }
                input_columns(&phases[..ALPHA * line], &mut columns[..ALPHA * line], line);
                // SAFETY: channel ch is this call's (see above).
                unsafe { input_rows(&columns[..ALPHA * line], v, ch, column, dims) };
            }
        }
    }

    /// Values of a row of tiles' stage: six rows of a row's tiles and one
    /// more.
    fn stage(&self) -> usize {
        ALPHA * TILE * (self.tiles_x + 1)
    }

    /// Scratch values [`Plan::transform`] takes.
    fn transform_scratch(&self, g: &ConvGeometry) -> usize {
        2 * self.stage() + (TILE * (self.tiles_x + 1)).max(g.width + g.pad_left)
    }

    /// Scratch values [`Plan::finish`] takes for `tp` columns of `outs`
    /// output channels: M and two stages.
    fn finish_scratch(&self, tp: usize, outs: usize) -> usize {
        POINTS * odd_lines(outs * tp) + 2 * self.stage()
    }

    /// The gemms and output transforms of `tiles` in output channels `outs`
    /// (starting on a panel), from their V (`dims` from [`Plan::v_dims`]).
    /// `scratch` holds [`Plan::finish_scratch`] values.
    ///
    /// # Safety
    /// `dst` holds the `[B, O, Ho, Wo]` output; no other task writes these
    /// tiles of these channels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish(
        &self,
        g: &ConvGeometry,
        w: &WinogradWeights,
        epilogue: &Epilogue,
        tiles: &std::ops::Range<usize>,
        outs: std::ops::Range<usize>,
        v: &[f32],
        (vs, tp): (usize, usize),
        dst: SharedMut,
        scratch: &mut [f32],
    ) {
        let ms = odd_lines(outs.len() * tp);
        let (m, rest) = scratch.split_at_mut(POINTS * ms);
        let (ends, block) = rest.split_at_mut(self.stage());
        gemms(w, v, m, &outs, (vs, ms, tp));
        let n = g.out_height * g.out_width;
        for (image, ty, span, column) in self.rows(tiles) {
            let x0 = span.start * TILE;
            let width = (span.end * TILE).min(g.out_width) - x0;
            for (k, ch) in outs.clone().enumerate() {
                output_tiles(m, k, column, span.len(), (ms, tp), ends, block);
                let index = image * g.out_channels + ch;
                for r in 0..TILE.min(g.out_height - ty * TILE) {
                    let start = (ty * TILE + r) * g.out_width + x0;
                    // SAFETY: these outputs are this task's (see
                    // `conv`), written whole before the slice over them
                    // is made.
                    let out = unsafe {
                        let at = dst.get().add(index * n + start);
                        let src = &block[r * TILE * span.len()..][..width];
                        std::ptr::copy_nonoverlapping(src.as_ptr(), at, width);
                        std::slice::from_raw_parts_mut(at, width)
                    };
                    epilogue.finish_at(out, index, start, n, g.out_channels);
                }
            }
        }
    }
}

/// The spare columns of the rows of `channels`, through a pointer that
/// other tasks may write other rows of ([`zero_spare_columns`]).
///
/// # Safety
/// `v` addresses a V of `dims` whose `channels` rows no other task touches.
unsafe fn zero_spare_rows(
    v: SharedMut,
    channels: std::ops::Range<usize>,
    tiles: usize,
    (vs, tp): (usize, usize),
) {
    for point in 0..POINTS {
        for ch in channels.clone() {
            let row = v.get().add(point * vs + ch * tp);
            std::slice::from_raw_parts_mut(row.add(tiles), tp - tiles).fill(0.0);
        }
    }
}

/// The gemm reads whole register tiles: zeroes V's columns past its `tiles`.
fn zero_spare_columns(v: &mut [f32], channels: usize, tiles: usize, (vs, tp): (usize, usize)) {
    assert!(v.len() >= (POINTS - 1) * vs + channels * tp && tiles <= tp);
    // SAFETY: v holds every row addressed, and is borrowed mutably.
    unsafe { zero_spare_rows(SharedMut(v.as_mut_ptr()), 0..channels, tiles, (vs, tp)) }
}

/// The 36 gemms `M[xi] = U[xi] V[xi]` for output channels `outs`: V is
/// `[36][C][tp]`, M `[36][outs][tp]`, each point's matrix `vs` and `ms`
/// values apart.
fn gemms(
    w: &WinogradWeights,
    v: &[f32],
    m: &mut [f32],
    outs: &std::ops::Range<usize>,
    (vs, ms, tp): (usize, usize, usize),
) {
    const NR: usize = sgemm::NR;
    const MR: usize = sgemm::MR;
    let (c, o) = (w.in_channels, outs.len());
    let block = BLOCK_DEPTH.min(c);
    let offsets: Vec<usize> = (0..block).map(|ch| ch * tp).collect();
    let panels = outs.start / MR..outs.end.div_ceil(MR);
    for (xi, u) in w.u.iter().enumerate() {
        let v = &v[xi * vs..][..c * tp];
        let m = &mut m[xi * ms..][..o * tp];
        for c0 in (0..c).step_by(block) {
            let depth = c0..(c0 + block).min(c);
            let offsets = &offsets[..depth.len()];
            let group = (GROUP_FLOATS / (depth.len() * MR)).max(1);
            for first in panels.clone().step_by(group) {
                for p in (0..tp).step_by(NR) {
                    for panel in first..panels.end.min(first + group) {
                        let h = MR.min(outs.end - panel * MR);
                        let row = panel * MR - outs.start;
                        // SAFETY: every offset plus p + NR lies within V's
                        // rows of tp values; M holds h rows of tp values
                        // from row `row`.
                        unsafe {
                            u.tile_from_rows(
                                panel,
                                (p == 0).then_some(panel + 1),
                                depth.clone(),
                                v[c0 * tp + p..].as_ptr(),
                                offsets,
                                m[row * tp + p..].as_mut_ptr(),
                                tp,
                                (h, NR),
                                c0 > 0,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// One input row (`None`: a row of the padding) zero-padded by `pad` on the
/// left and split by column phase from padded column `first` on:
/// `out[q * (len / 4) + u]` = padded column `first + 4 u + q`.
fn split_phases(
    src: Option<&[f32]>,
    pad: usize,
    first: usize,
    padded: &mut [f32],
    out: &mut [f32],
) {
    let Some(src) = src else {
        out.fill(0.0);
        return;
    };
    let line = &mut padded[..(first + out.len()).max(pad + src.len())];
    line[..pad].fill(0.0);
    line[pad..pad + src.len()].copy_from_slice(src);
    line[pad + src.len()..].fill(0.0);
    deinterleave(&line[first..][..out.len()], out);
}

avx2_dispatch! {
    /// `out[q * n + u] = src[4 u + q]` for the four phases `q`, `n = len / 4`.
    fn deinterleave(src: &[f32], out: &mut [f32]) {
        let n = out.len() / TILE;
        let (p0, rest) = out.split_at_mut(n);
        let (p1, rest) = rest.split_at_mut(n);
        let (p2, p3) = rest.split_at_mut(n);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above); every access is
            // within the slices' lengths.
            done = unsafe { x86::deinterleave(src, [p0, p1, p2, p3], n) };
        }
        for u in done..n {
            let q = &src[TILE * u..][..TILE];
            (p0[u], p1[u], p2[u], p3[u]) = (q[0], q[1], q[2], q[3]);
        }
    }
}

avx2_dispatch! {
    /// `out[4 u + q] = src[q * n + u]` for the four phases `q`, `n = len / 4`:
    /// the inverse of [`deinterleave`].
    fn interleave(src: &[f32], out: &mut [f32]) {
        let n = out.len() / TILE;
        let p: [&[f32]; TILE] = four!(|q| &src[q * n..][..n]);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as in `deinterleave`.
            done = unsafe { x86::interleave(p, out, n) };
        }
        for u in done..n {
            let q = &mut out[TILE * u..][..TILE];
            (q[0], q[1], q[2], q[3]) = (p[0][u], p[1][u], p[2][u], p[3][u]);
        }
    }
}

/// The 4-way (de)interleaving with AVX2: eight tiles per step, as a 4x4
/// transpose within each 128-bit lane and a permutation across them.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Tiles `0..8k` of [`super::deinterleave`]; returns `8k`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn deinterleave(src: &[f32], out: [&mut [f32]; 4], n: usize) -> usize {
        let steps = n / 8;
        // Lane order after the in-lane transpose: tiles 0 2 4 6 | 1 3 5 7.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let [p0, p1, p2, p3] = out;
        assert!(
            src.len() >= 32 * steps
                && [&*p0, &*p1, &*p2, &*p3]
                    .iter()
                    .all(|p| p.len() >= 8 * steps)
        );
        for i in 0..steps {
            let s = src.as_ptr().add(32 * i);
            let (a, b) = (_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8)));
            let (c, d) = (_mm256_loadu_ps(s.add(16)), _mm256_loadu_ps(s.add(24)));
            let (t0, t1) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let (t2, t3) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
            let q0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let q1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let q2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let q3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            for (p, q) in [
                (&mut *p0, q0),
                (&mut *p1, q1),
                (&mut *p2, q2),
                (&mut *p3, q3),
            ] {
                _mm256_storeu_ps(
                    p.as_mut_ptr().add(8 * i),
                    _mm256_permutevar8x32_ps(q, order),
                );
            }
        }
        8 * steps
    }

    /// Tiles `0..8k` of [`super::interleave`]; returns `8k`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave(p: [&[f32]; 4], out: &mut [f32], n: usize) -> usize {
        let steps = n / 8;
        // Tiles 0 2 4 6 | 1 3 5 7 in each phase vector, for the in-lane transpose.
        let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        assert!(out.len() >= 32 * steps && p.iter().all(|p| p.len() >= 8 * steps));
        for i in 0..steps {
            let load = |q: usize| {
                _mm256_permutevar8x32_ps(_mm256_loadu_ps(p[q].as_ptr().add(8 * i)), order)
            };
            let (q0, q1, q2, q3) = (load(0), load(1), load(2), load(3));
            let (t0, t1) = (_mm256_unpacklo_ps(q0, q1), _mm256_unpackhi_ps(q0, q1));
            let (t2, t3) = (_mm256_unpacklo_ps(q2, q3), _mm256_unpackhi_ps(q2, q3));
            let a = _mm256_shuffle_ps::<0x44>(t0, t2);
            let b = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let c = _mm256_shuffle_ps::<0x44>(t1, t3);
            let d = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let o = out.as_mut_ptr().add(32 * i);
            _mm256_storeu_ps(o, a);
            _mm256_storeu_ps(o.add(8), b);
            _mm256_storeu_ps(o.add(16), c);
            _mm256_storeu_ps(o.add(24), d);
        }
        8 * steps
    }
}

/// `B^T` applied to six values.
#[inline(always)]
fn input_transform(d: [f32; ALPHA]) -> [f32; ALPHA] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * (d[1] + d[2]) + d[3] + d[4],
        4.0 * (d[1] - d[2]) - d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        2.0 * (d[1] - d[3]) - d[2] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// `A^T` applied to six values.
#[inline(always)]
fn output_transform(m: [f32; ALPHA]) -> [f32; TILE] {
    let (s12, d12) = (m[1] + m[2], m[1] - m[2]);
    let (s34, d34) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m[5],
    ]
}

avx2_dispatch! {
    /// The transform down the six input rows of a tile row, `line` values
    /// each: `columns[a] = sum_i B^T[a][i] phases[i]`.
    fn input_columns(phases: &[f32], columns: &mut [f32], line: usize) {
        let d: [&[f32]; ALPHA] = six!(|i| &phases[i * line..][..line]);
        let mut rows = columns.chunks_exact_mut(line);
        let mut out: [&mut [f32]; ALPHA] = six!(|_| rows.next().unwrap());
        for x in 0..line {
            let t = input_transform(six!(|i| d[i][x]));
            for (row, v) in out.iter_mut().zip(t) {
                row[x] = v;
            }
        }
    }
}

avx2_dispatch! {
    /// The transform along the tiles of one row in `columns` (six rows,
    /// split by column phase: `len` tiles and the next tile's values), into
    /// V `[36][C][tp]` at channel `ch`, from column `at` on.
    ///
    /// # Safety
    /// `v` holds V (`dims`: values between points, columns per row), and no
    /// other thread touches channel `ch`'s rows of it meanwhile.
    unsafe fn input_rows(columns: &[f32], v: SharedMut, ch: usize, at: usize, dims: (usize, usize)) {
        let (vs, tp) = dims;
        let line = columns.len() / ALPHA;
        let width = line / TILE;
        let len = width - 1;
        for (a, row) in columns.chunks_exact(line).enumerate() {
            // Tap j of tile u: phase j % 4, column u + j / 4.
            let d: [&[f32]; ALPHA] =
                six!(|j| &row[(j % TILE) * width + j / TILE..][..len]);
            // SAFETY: six disjoint runs of this channel's rows (see above).
            let mut out: [&mut [f32]; ALPHA] = six!(|b| unsafe {
                let point = (a * ALPHA + b) * vs;
                std::slice::from_raw_parts_mut(v.get().add(point + ch * tp + at), len)
            });
            for u in 0..len {
                let t = input_transform(six!(|j| d[j][u]));
                for (point, v) in out.iter_mut().zip(t) {
                    point[u] = v;
                }
            }
        }
    }
}

avx2_dispatch! {
    /// Output channel `k` of `tx` tiles of one tile row (columns
    /// `at..at + tx` of M `[36][o][tp]`) as four output rows of `4 tx`
    /// values in `block`.
    fn output_tiles(
        m: &[f32],
        k: usize,
        at: usize,
        tx: usize,
        dims: (usize, usize),
        ends: &mut [f32],
        block: &mut [f32],
    ) {
        let (ms, tp) = dims;
        // Down the columns: ends[r][b] = sum_a A^T[r][a] M[a * 6 + b].
        let ends = &mut ends[..TILE * ALPHA * tx];
        for b in 0..ALPHA {
            let src: [&[f32]; ALPHA] =
                six!(|a| &m[(a * ALPHA + b) * ms + k * tp + at..][..tx]);
            let mut rows = ends.chunks_exact_mut(ALPHA * tx).map(|r| &mut r[b * tx..][..tx]);
            let mut out: [&mut [f32]; TILE] = four!(|_| rows.next().unwrap());
            for u in 0..tx {
                let t = output_transform(six!(|a| src[a][u]));
                for (row, v) in out.iter_mut().zip(t) {
                    row[u] = v;
                }
            }
        }
        // Along the rows, then each tile's four values side by side.
        let (block, quads) = block.split_at_mut(TILE * TILE * tx);
        let quads = &mut quads[..TILE * tx];
        for (r, end) in ends.chunks_exact(ALPHA * tx).enumerate() {
            let src: [&[f32]; ALPHA] = six!(|b| &end[b * tx..][..tx]);
            {
                let mut rows = quads.chunks_exact_mut(tx);
                let mut out: [&mut [f32]; TILE] = four!(|_| rows.next().unwrap());
                for u in 0..tx {
                    let t = output_transform(six!(|b| src[b][u]));
                    for (row, v) in out.iter_mut().zip(t) {
                        row[u] = v;
                    }
                }
            }
            interleave(quads, &mut block[r * TILE * tx..][..TILE * tx]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::cpu_conv::reference::dense_at;

    /// `len` deterministic values in [-0.5, 0.5), from `seed` on.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (seed..seed + len)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect()
    }

    /// Against the convolution written out in f64: sizes that are and are
    /// not multiples of the tile, paddings 0-2, a concatenation of parts,
    /// depth blocks, channels split across tasks, the epilogue.
    #[test]
    fn matches_the_direct_sum() {
        // (batch, channels, out channels, h, w, pad)
        let cases = [
            (1, 3, 5, 8, 8, 1),
            (2, 7, 13, 9, 11, 1),
            (1, 4, 6, 7, 7, 0),
            (3, 5, 8, 5, 13, 2),
            (1, 300, 14, 6, 10, 1),
            (1, 16, 64, 4, 4, 1),
            (2, 6, 9, 23, 18, 1),
            (1, 5, 7, 6, 75, 1),
        ];
        for (b, c, o, h, w, pad) in cases {
            let g = ConvGeometry::padded(b, c, (h, w), o, 3, 1, pad);
            let (ho, wo) = (g.out_height, g.out_width);
            let (x, weight, bias) = (
                values(b * c * h * w, 0),
                values(o * c * 9, 5),
                values(o, 11),
            );
            let residual = values(b * o * ho * wo, 17);
            // The input as two parts: channels [0, c1) and [c1, c).
            let c1 = c / 3;
            let plane = h * w;
            let part = |range: std::ops::Range<usize>| -> Vec<f32> {
                (0..b)
                    .flat_map(|i| {
                        x[(i * c + range.start) * plane..(i * c + range.end) * plane].to_vec()
                    })
                    .collect()
            };
            let (first, second) = (part(0..c1), part(c1..c));
            let weights = WinogradWeights::new(&weight, o, c);
            let epilogue = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                act: Activation::Relu,
            };
            let got = conv(&[&first, &second], &g, &weights, &epilogue);
            let packed = crate::sgemm::PackedLhs::new(&weight, o, c * 9);
            let direct = crate::cpu_conv::dense(&[&first, &second], &g, &packed, &epilogue);
            let (mut worst, mut direct_worst, mut scale) = (0f64, 0f64, 0f64);
            for (index, ((&got, &r), &d)) in got.iter().zip(&residual).zip(&direct).enumerate() {
                let oc = index / (ho * wo) % o;
                let sum = dense_at(&x, &weight, &g, index) + bias[oc] as f64 + r as f64;
                let want = sum.max(0.0);
                worst = worst.max((got as f64 - want).abs());
                direct_worst = direct_worst.max((d as f64 - want).abs());
                scale = scale.max(want.abs());
            }
            // A few bits less than the direct sum (5e-7 to 6e-6 of the
            // largest output here, the direct kernel 1e-7 to 6e-7): within
            // the 1e-4 of scale the model fixtures allow, with room.
            let (rel, direct_rel) = (worst / scale, direct_worst / scale);
            eprintln!(
                "{b}x{c}x{h}x{w} -> {o}: Winograd {rel:.1e}, direct {direct_rel:.1e} of scale"
            );
            assert!(rel < 2e-5, "{b}x{c}x{h}x{w} -> {o}, pad {pad}: {rel:e}");
        }
    }

    /// The values do not depend on how the work is split: on 1, 2 and 4
    /// threads, tile tasks alone or output channels split with the
    /// transformed input shared (both occur below), the same bits.
    #[test]
    fn every_split_gives_the_same_values() {
        let mut paths = std::collections::HashSet::new();
        let teams: Vec<_> = (1..=4)
            .map(|n| team::Team::new(n, std::time::Duration::from_micros(50)))
            .collect();
        // (batch, channels, out channels, size)
        for (b, c, o, size) in [
            (1, 40, 64, 14),
            (1, 24, 30, 7),
            (1, 16, 48, 20),
            (2, 9, 40, 9),
            (1, 8, 12, 56),
        ] {
            let g = ConvGeometry::padded(b, c, (size, size), o, 3, 1, 1);
            let (x, weight, bias) = (
                values(b * c * size * size, 0),
                values(o * c * 9, 5),
                values(o, 11),
            );
            let weights = WinogradWeights::new(&weight, o, c);
            let epilogue = Epilogue {
                bias: &bias,
                residual: None,
                act: Activation::Silu,
            };
            let on = |threads: usize| {
                let team = teams[threads - 1];
                let y = team::with_team(team, || conv(&[&x], &g, &weights, &epilogue));
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let one = on(1);
            for threads in [2, 4] {
                paths.insert(Plan::new(&g, threads).channel_tasks > 1);
                assert!(one == on(threads), "{g:?} on {threads} threads");
            }
        }
        assert_eq!(paths.len(), 2, "both ways of splitting the work");
    }

    #[test]
    fn phases_split_and_join() {
        for n in [1, 7, 8, 9, 16, 21] {
            let src: Vec<f32> = (0..4 * n).map(|v| v as f32).collect();
            let mut split = vec![f32::NAN; 4 * n];
            deinterleave(&src, &mut split);
            for (u, q) in (0..n).flat_map(|u| (0..4).map(move |q| (u, q))) {
                assert_eq!(split[q * n + u], src[4 * u + q], "n {n}");
            }
            let mut joined = vec![f32::NAN; 4 * n];
            interleave(&split, &mut joined);
            assert_eq!(joined, src, "n {n}");
        }
    }

    #[test]
    fn plans_cover_the_work() {
        for (b, c, o, size, threads) in
            [(1, 512, 512, 7, 2), (8, 64, 64, 56, 2), (1, 64, 70, 20, 4)]
        {
            let g = ConvGeometry::padded(b, c, (size, size), o, 3, 1, 1);
            let plan = Plan::new(&g, threads);
            // Every tile in exactly one task, in whole register tiles but
            // the last, and each task's share within one register tile of
            // the others'.
            let spans: Vec<_> = (0..plan.tile_tasks).map(|t| plan.tiles(t)).collect();
            assert_eq!(spans[0].start, 0);
            assert_eq!(spans.last().unwrap().end, plan.total);
            for pair in spans.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[0].len() % sgemm::NR, 0);
            }
            let sizes = spans.iter().map(|s| s.len().div_ceil(sgemm::NR));
            assert!(sizes.clone().max().unwrap() - sizes.min().unwrap() <= 1);
            assert!(plan.channel_tasks * plan.channels_per_task >= o);
            assert_eq!(plan.channels_per_task % sgemm::MR, 0);
        }
    }
}
