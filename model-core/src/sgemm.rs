//! Fovea's f32 matrix multiply for the CPU layers: `C = A x B` or
//! `C += A x B`, row-major, in the BLIS style.
//!
//! - A 6 x 16 tile of C is held in twelve AVX registers while the depth is
//!   summed: per step, two vector loads of B, six broadcasts of A and twelve
//!   FMAs, so the FMA units, not the loads, set the pace.
//! - A is read in panels of 6 rows (`[k][6]`) and B in panels of 16 columns
//!   (`[k][16]`), so both are read sequentially. The depth is cut into
//!   blocks of [`KC`]: a B micro-panel then stays in L1 while the A panels of
//!   a block of [`MC`] rows (in L2) stream past it.
//! - Weights are packed into panels once, at load time ([`PackedLhs`] for a
//!   convolution's `[O, C*k*k]`, [`PackedRhs`] for a linear layer's `[in,
//!   out]`). Activations are packed per block into a per-thread scratch
//!   buffer. The `gemm` crate, used before, re-packed the weights on every
//!   call.
//! - A convolution can instead give the register tile its B rows where they
//!   lie, one offset per depth (`PackedLhs::tile_from_rows`): a padded input
//!   window read in place, with no packing.
//! - Without AVX2 and FMA (and off x86-64), a portable kernel does the same
//!   steps.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use crate::activation::{finish_block, Activation};
use crate::team;

/// A raw output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: the users write disjoint regions (the gemm's tasks, the
// convolutions' bands and tiles).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, so that closures capture the wrapper and not the raw field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile: two vectors of 8.
pub const NR: usize = 16;
/// Depth per block: a B micro-panel (KC x NR, 16 KiB) stays in L1.
const KC: usize = 256;
/// Rows of A per block: the A block (MC x KC, 72 KiB) stays in L2.
const MC: usize = 12 * MR;
/// Rows of A per block when B was packed at load time (weights that come
/// from memory): the A block (MC_WIDE x KC, 252 KiB) still fits L2, and
/// each B panel read serves up to 42 tiles instead of 12.
const MC_WIDE: usize = 42 * MR;
/// Columns of B per block when B is packed per call (KC x NC, 512 KiB).
const NC: usize = 32 * NR;

/// f32 values starting on a 64-byte boundary, so that a B panel row is one
/// cache line.
#[derive(Debug)]
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    const LANES: usize = 16;

    fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + Self::LANES];
        let start = buf.as_ptr().align_offset(64).min(Self::LANES);
        Self { buf, start, len }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..][..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..][..self.len]
    }
}

/// Lines of `k` values (A's rows, or B's columns) in panels of `width`
/// lines: `[lines / width][k][width]`, the last panel zero-padded.
#[derive(Debug)]
struct Panels {
    data: Aligned,
    lines: usize,
    k: usize,
}

impl Panels {
    /// Packs `src` `[lines, k]` row-major.
    fn new(src: &[f32], lines: usize, k: usize, width: usize) -> Self {
        assert_eq!(src.len(), lines * k, "operand is not [{lines}, {k}]");
        let mut data = Aligned::zeroed(lines.div_ceil(width) * k * width);
        let out = data.as_mut_slice();
        for (r, line) in src.chunks_exact(k.max(1)).enumerate().take(lines) {
            let panel = &mut out[r / width * k * width..][..k * width];
            for (p, &v) in line.iter().enumerate() {
                panel[p * width + r % width] = v;
            }
        }
        Self { data, lines, k }
    }

    /// Panel `index` (of `width` lines) from depth `pc` on.
    fn panel(&self, index: usize, pc: usize, width: usize) -> &[f32] {
        &self.data.as_slice()[(index * self.k + pc) * width..]
    }

    /// The `[lines, k]` source back, row-major.
    fn unpack(&self, width: usize) -> Vec<f32> {
        let data = self.data.as_slice();
        (0..self.lines * self.k)
            .map(|x| {
                let (r, p) = (x / self.k, x % self.k);
                data[(r / width * self.k + p) * width + r % width]
            })
            .collect()
    }
}

/// The left operand `[m, k]` in panels of [`MR`] rows. Cheap to clone
/// (shared).
#[derive(Debug, Clone)]
pub struct PackedLhs(Arc<Panels>);

impl PackedLhs {
    /// Packs row-major `a` `[m, k]`.
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        Self(Arc::new(Panels::new(a, m, k, MR)))
    }

    pub fn rows(&self) -> usize {
        self.0.lines
    }

    pub fn depth(&self) -> usize {
        self.0.k
    }

    /// The `[m, k]` matrix it was packed from.
    pub fn unpack(&self) -> Vec<f32> {
        self.0.unpack(MR)
    }

    fn panel(&self, ip: usize, pc: usize) -> &[f32] {
        self.0.panel(ip, pc, MR)
    }

    /// One tile of `c (+)= self[rows, depth] x B`: the `h` rows from
    /// `panel * MR` on, `w <= NR` columns, where B's row `p` (for depth
    /// `depth.start + p`) is the `NR` values at `base + offsets[p]`, read in
    /// place (a convolution's taps over a padded image: no column matrix, no
    /// packing). Meanwhile the same depths of panel `fetch` (weights about
    /// to come from memory) are fetched into the cache.
    ///
    /// # Safety
    /// `base + offsets[p]` is readable for `NR` values (even when `w < NR`)
    /// for every `p`; `c` holds `h` rows of `w` values `ldc` apart, written
    /// (and with `add` read) by this call only.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn tile_from_rows(
        &self,
        panel: usize,
        fetch: Option<usize>,
        depth: Range<usize>,
        base: *const f32,
        offsets: &[usize],
        c: *mut f32,
        ldc: usize,
        (h, w): (usize, usize),
        add: bool,
    ) {
        let kc = depth.len();
        assert_eq!(offsets.len(), kc, "one offset per depth");
        assert!(depth.end <= self.depth(), "depth past the operand");
        assert!(
            (1..=MR).contains(&h) && panel * MR + h <= self.rows(),
            "rows"
        );
        assert!((1..=NR).contains(&w), "columns");
        let a = &self.panel(panel, depth.start)[..kc * MR];
        let b = OffsetRows {
            base,
            offsets: offsets.as_ptr(),
        };
        let next = fetch
            .filter(|&f| f * MR < self.rows())
            .map_or(a.as_ptr(), |f| self.panel(f, depth.start).as_ptr());
        tile(has_avx2_fma(), kc, a, next, b, c, ldc, (h, w), add);
    }
}

/// The right operand `[k, n]` in panels of [`NR`] columns. Cheap to clone
/// (shared).
#[derive(Debug, Clone)]
pub struct PackedRhs(Arc<Panels>);

impl PackedRhs {
    /// Packs `b` given transposed, as `[n, k]` row-major (a linear layer's
    /// `[out, in]` weight).
    pub fn from_transposed(bt: &[f32], k: usize, n: usize) -> Self {
        Self(Arc::new(Panels::new(bt, n, k, NR)))
    }

    pub fn depth(&self) -> usize {
        self.0.k
    }

    pub fn columns(&self) -> usize {
        self.0.lines
    }

    fn panel(&self, jp: usize, pc: usize) -> &[f32] {
        self.0.panel(jp, pc, NR)
    }
}

/// The left operand of [`matmul`].
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    Packed(&'a PackedLhs),
    /// Row-major, rows `stride` values apart.
    Rows {
        data: &'a [f32],
        stride: usize,
    },
}

/// The right operand of [`matmul`].
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    Packed(&'a PackedRhs),
    /// Row-major, rows `stride` values apart.
    Rows {
        data: &'a [f32],
        stride: usize,
    },
}

/// What [`matmul`] does to its output once a column of tiles has its whole
/// sum, while those tiles are still in L1: `act(sum + bias[column] +
/// residual)` (a linear layer's epilogue). The output is then written once,
/// with no pass before the gemm to set the bias and none after it for the
/// activation.
#[derive(Debug, Clone, Copy)]
pub struct Finish<'a> {
    /// One per column of the output.
    pub bias: &'a [f32],
    /// `[m, n]`, rows the given number of values apart.
    pub residual: Option<(&'a [f32], usize)>,
    pub act: Activation,
}

impl Finish<'_> {
    fn check(&self, m: usize, n: usize) {
        assert_eq!(self.bias.len(), n, "bias is not one per column");
        if let Some((data, stride)) = self.residual {
            check_rows(data.len(), stride, m, n, "residual");
        }
    }

    /// Finishes `rows` x `cols` of the output, whose first value is at `c`
    /// and whose rows are `ldc` apart.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of that block.
    unsafe fn apply(&self, c: *mut f32, ldc: usize, rows: Range<usize>, cols: Range<usize>) {
        let (height, width) = (rows.len(), cols.len());
        if height == 0 || width == 0 {
            return;
        }
        let block = std::slice::from_raw_parts_mut(c, (height - 1) * ldc + width);
        let residual = self
            .residual
            .map(|(data, stride)| (&data[rows.start * stride + cols.start..], stride));
        let bias = &self.bias[cols.start..];
        finish_block(block, ldc, height, width, bias, residual, self.act);
    }
}

/// Panics unless a strided `[rows, cols]` matrix fits in `len` values.
fn check_rows(len: usize, stride: usize, rows: usize, cols: usize, what: &str) {
    assert!(cols <= stride || rows <= 1, "{what}: rows overlap");
    assert!(
        rows == 0 || len >= (rows - 1) * stride + cols,
        "{what}: {len} values are not [{rows}, {cols}] with stride {stride}"
    );
}

/// `dst [m, n] = lhs [m, k] x rhs [k, n]`, or `dst += lhs x rhs` when
/// `accumulate`, then `finish` if given; rows of `dst` are `dst_stride`
/// apart. With `parallel`, the work is split across the [`team`]'s threads. A
/// packed operand must have exactly the shape given.
///
/// Without `accumulate`, `dst` is only written, never read first: it may be
/// uninitialised memory.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of `m`
/// rows of `n` values `dst_stride` apart, not overlap the operands, and not
/// be accessed by anything else during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    dst: *mut f32,
    dst_stride: usize,
    lhs: Lhs,
    rhs: Rhs,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    finish: Option<&Finish>,
    parallel: bool,
) {
    if let Some(f) = finish {
        f.check(m, n);
    }
    match lhs {
        Lhs::Packed(p) => assert_eq!((p.rows(), p.depth()), (m, k), "packed lhs shape"),
        Lhs::Rows { data, stride } => check_rows(data.len(), stride, m, k, "lhs"),
    }
    match rhs {
        Rhs::Packed(p) => assert_eq!((p.depth(), p.columns()), (k, n), "packed rhs shape"),
        Rhs::Rows { data, stride } => check_rows(data.len(), stride, k, n, "rhs"),
    }
    assert!(n <= dst_stride || m <= 1, "dst rows overlap");
    if m == 0 || n == 0 {
        return;
    }
    let job = Job {
        dst: SharedMut(dst),
        ldc: dst_stride,
        lhs,
        rhs,
        k,
        accumulate,
        finish,
    };
    let threads = if parallel { team::threads() } else { 1 };
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Split the side that is packed per call (each thread then packs only
    // its own part), unless it has too few panels to share out evenly.
    let split_rows = match (lhs, rhs) {
        // Weights packed at load time, with activations that fit one A
        // block (ViT-B/16 at batch 1: 197 rows): split the weights, so that
        // each thread reads only its part of them from memory.
        (Lhs::Rows { .. }, Rhs::Packed(_)) if m <= MC_WIDE && col_panels >= 4 * threads => false,
        (Lhs::Rows { .. }, Rhs::Packed(_)) => row_panels >= 4 * threads || row_panels >= col_panels,
        // Weights packed at load time beside activations of one B block
        // (a 1x1 convolution at 14x14 or 7x7): split the weights too. Each
        // thread then packs all of B (small), but reads only its part of
        // the weights and computes whole rows of tiles: 196 columns split
        // 96 + 100 had left one thread waiting on the other's narrow strip
        // (ResNet-50's 256->1024 at 14x14: 199 -> 209 GFLOP/s).
        (Lhs::Packed(_), Rhs::Rows { .. }) if n <= NC => {
            row_panels >= 4 * threads || row_panels > col_panels
        }
        (Lhs::Packed(_), Rhs::Rows { .. }) => col_panels < 4 * threads && row_panels > col_panels,
        _ => row_panels >= col_panels,
    };
    let (panels, unit) = if split_rows {
        (row_panels, MR)
    } else {
        (col_panels, NR)
    };
    let tasks = threads.min(panels);
    if tasks <= 1 {
        job.block(0..m, 0..n);
        return;
    }
    // Cut at the panel boundary nearest each task's even share, so that a
    // last, partial panel (a narrow strip: cheap) goes to a task with a
    // full one less: 196 columns split 96 + 100, not 112 + 84.
    let len = if split_rows { m } else { n };
    let cut = |t: usize| ((2 * t * len + tasks * unit) / (2 * tasks * unit) * unit).min(len);
    team::for_each(tasks, |t| {
        let part = cut(t)..if t + 1 == tasks { len } else { cut(t + 1) };
        let (rows, cols) = if split_rows {
            (part, 0..n)
        } else {
            (0..m, part)
        };
        // SAFETY: the tasks write disjoint row or column ranges of dst.
        unsafe { job.block(rows, cols) }
    });
}

thread_local! {
    /// Per-thread buffers for the packed A and B blocks, kept across calls.
    static PACK: RefCell<(Aligned, Aligned)> =
        RefCell::new((Aligned::zeroed(MC_WIDE * KC), Aligned::zeroed(KC * NC)));
}

/// One [`matmul`] call's operands and output.
#[derive(Clone, Copy)]
struct Job<'a> {
    dst: SharedMut,
    ldc: usize,
    lhs: Lhs<'a>,
    rhs: Rhs<'a>,
    k: usize,
    accumulate: bool,
    finish: Option<&'a Finish<'a>>,
}

// SAFETY: dst is written by disjoint tasks only (see `matmul`); the rest is
// shared read-only.
unsafe impl Send for Job<'_> {}
unsafe impl Sync for Job<'_> {}

impl Job<'_> {
    /// `dst[rows, cols] (+)= lhs[rows, :] x rhs[:, cols]` on this thread.
    /// `rows.start` is a multiple of [`MR`] and `cols.start` of [`NR`].
    unsafe fn block(&self, rows: Range<usize>, cols: Range<usize>) {
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        if self.k == 0 {
            for i in rows {
                let out = self.dst.get().add(i * self.ldc + cols.start);
                if !self.accumulate {
                    // All-zero bits are 0.0.
                    std::ptr::write_bytes(out, 0, cols.len());
                }
                if let Some(f) = self.finish {
                    f.apply(out, self.ldc, i..i + 1, cols.clone());
                }
            }
            return;
        }
        PACK.with(|pack| match pack.try_borrow_mut() {
            Ok(mut bufs) => {
                let (a, b) = &mut *bufs;
                self.block_with(rows, cols, a, b)
            }
            // Re-entered on this thread: fresh buffers.
            Err(_) => {
                let (mut a, mut b) = (Aligned::zeroed(MC_WIDE * KC), Aligned::zeroed(KC * NC));
                self.block_with(rows, cols, &mut a, &mut b)
            }
        })
    }

    unsafe fn block_with(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        a_buf: &mut Aligned,
        b_buf: &mut Aligned,
    ) {
        let (k, ldc) = (self.k, self.ldc);
        let avx2 = has_avx2_fma();
        // Column blocks bound the packed B block; a B packed at load time
        // needs none, and then each A block is packed once rather than once
        // per column block.
        let nc_block = match self.rhs {
            Rhs::Packed(_) => cols.len(),
            Rhs::Rows { .. } => NC,
        };
        let mc_block = match self.rhs {
            Rhs::Packed(_) => MC_WIDE,
            Rhs::Rows { .. } => MC,
        };
        for jc in cols.clone().step_by(nc_block) {
            let nc = nc_block.min(cols.end - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let add = self.accumulate || pc > 0;
                let finish = self.finish.filter(|_| pc + kc == k);
                if let Rhs::Rows { data, stride } = self.rhs {
                    pack_rhs(data, stride, pc..pc + kc, jc..jc + nc, b_buf.as_mut_slice());
                }
                for ic in rows.clone().step_by(mc_block) {
                    let mc = mc_block.min(rows.end - ic);
                    if let Lhs::Rows { data, stride } = self.lhs {
                        pack_lhs(data, stride, ic..ic + mc, pc..pc + kc, a_buf.as_mut_slice());
                    }
                    for jp in 0..nc.div_ceil(NR) {
                        let j0 = jc + jp * NR;
                        let b = match self.rhs {
                            Rhs::Packed(p) => p.panel(j0 / NR, pc),
                            Rhs::Rows { .. } => &b_buf.as_slice()[jp * kc * NR..],
                        };
                        let a_panel = |ip: usize| match self.lhs {
                            Lhs::Packed(p) => &p.panel(ic / MR + ip, pc)[..kc * MR],
                            Lhs::Rows { .. } => &a_buf.as_slice()[ip * kc * MR..][..kc * MR],
                        };
                        let w = NR.min(cols.end - j0);
                        let b = &b[..kc * NR];
                        if avx2 && w <= NARROW_MAX {
                            // The matrix's last columns: no full tiles of
                            // padding (49 pixels are 3 tiles and 1 column).
                            let c = self.dst.get().add(ic * ldc + j0);
                            narrow_strip(kc, a_panel, mc, b.as_ptr(), c, ldc, w, add);
                        } else {
                            let panels = mc.div_ceil(MR);
                            for ip in 0..panels {
                                let i0 = ic + ip * MR;
                                let h = MR.min(rows.end - i0);
                                let c = self.dst.get().add(i0 * ldc + j0);
                                let (a, b) = (a_panel(ip), PanelRows(b.as_ptr()));
                                let next = match self.lhs {
                                    // Weights packed at load time come from
                                    // memory on the first column of tiles:
                                    // fetch the next panel during this one.
                                    Lhs::Packed(p) if jp == 0 && ip + 1 < panels => {
                                        p.panel(ic / MR + ip + 1, pc).as_ptr()
                                    }
                                    _ => a.as_ptr(),
                                };
                                tile(avx2, kc, a, next, b, c, ldc, (h, w), add);
                            }
                        }
                        // The column of tiles just summed is still in L1;
                        // finished together, the call's cost is shared.
                        if let Some(f) = finish {
                            let c = self.dst.get().add(ic * ldc + j0);
                            f.apply(c, ldc, ic..ic + mc, j0..j0 + w);
                        }
                    }
                }
            }
        }
    }
}

/// Where the register tile reads B's row `p` (its [`NR`] values).
pub(crate) trait BRows: Copy {
    /// # Safety
    /// `p` is below the tile's depth.
    unsafe fn row(self, p: usize) -> *const f32;
}

/// A packed panel: row `p` at `p * NR`.
#[derive(Clone, Copy)]
struct PanelRows(*const f32);

impl BRows for PanelRows {
    #[inline(always)]
    unsafe fn row(self, p: usize) -> *const f32 {
        self.0.add(p * NR)
    }
}

/// Rows read in place: row `p` at `base + offsets[p]` (a convolution's taps
/// over a padded image, see [`PackedLhs::tile_from_rows`]).
#[derive(Clone, Copy)]
struct OffsetRows {
    base: *const f32,
    offsets: *const usize,
}

impl BRows for OffsetRows {
    #[inline(always)]
    unsafe fn row(self, p: usize) -> *const f32 {
        self.base.add(*self.offsets.add(p))
    }
}

/// One register tile: `c[h, w] (+)= a x b` over depth `kc`, while the
/// `kc * MR` values at `next` (the next tile's A panel, or `a` itself) are
/// fetched into the cache.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<B: BRows>(
    avx2: bool,
    kc: usize,
    a: &[f32],
    next: *const f32,
    b: B,
    c: *mut f32,
    ldc: usize,
    (h, w): (usize, usize),
    add: bool,
) {
    debug_assert!(a.len() >= kc * MR);
    #[cfg(target_arch = "x86_64")]
    if avx2 && w == NR {
        // SAFETY: the CPU has AVX2 and FMA; c holds h full-width rows.
        return full_tile(avx512_tile(), h, kc, a.as_ptr(), next, b, c, ldc, add);
    }
    let run = |c: *mut f32, ldc: usize, add: bool| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA; the caller's c holds the tile.
            return unsafe { kernel_avx2::<MR, B>(kc, a.as_ptr(), next, b, c, ldc, add) };
        }
        let _ = avx2;
        unsafe { kernel_portable(kc, a, b, c, ldc, add) }
    };
    if h == MR && w == NR {
        run(c, ldc, add);
        return;
    }
    // A partial edge tile goes through a full one on the stack.
    let mut full = [0f32; MR * NR];
    run(full.as_mut_ptr(), NR, false);
    // Raw writes: without `add`, the destination may be uninitialised.
    for (i, src) in full.chunks_exact(NR).take(h).enumerate() {
        for (j, &s) in src[..w].iter().enumerate() {
            let d = c.add(i * ldc + j);
            d.write(if add { d.read() + s } else { s });
        }
    }
}

/// A full-width tile of `h` rows: [`kernel_avx512`] where the CPU has
/// AVX-512F (`wide`), else [`kernel_avx2`].
///
/// # Safety
/// As [`kernel_avx2`], and AVX-512F present when `wide`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn full_tile<B: BRows>(
    wide: bool,
    h: usize,
    kc: usize,
    a: *const f32,
    next: *const f32,
    b: B,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    macro_rules! rows {
        ($kernel:ident) => {
            match h {
                MR => $kernel::<MR, B>(kc, a, next, b, c, ldc, add),
                5 => $kernel::<5, B>(kc, a, next, b, c, ldc, add),
                4 => $kernel::<4, B>(kc, a, next, b, c, ldc, add),
                3 => $kernel::<3, B>(kc, a, next, b, c, ldc, add),
                2 => $kernel::<2, B>(kc, a, next, b, c, ldc, add),
                1 => $kernel::<1, B>(kc, a, next, b, c, ldc, add),
                _ => unreachable!("a tile has 1 to {MR} rows"),
            }
        };
    }
    if wide {
        rows!(kernel_avx512)
    } else {
        rows!(kernel_avx2)
    }
}

/// Whether the register tile runs on AVX-512F
/// ([`use_avx512`](crate::activation::use_avx512)).
fn avx512_tile() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::activation::use_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows `depth` x columns `cols` of strided `data` into `[cols / NR][depth][NR]`.
fn pack_rhs(data: &[f32], stride: usize, depth: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
    let kc = depth.len();
    let (full, rest) = (cols.len() / NR, cols.len() % NR);
    for (p, r) in depth.enumerate() {
        let row = &data[r * stride + cols.start..][..cols.len()];
        // Fixed-size copies: a slice copy of a run-time length would be a
        // memcpy call per 16 values.
        for (jp, src) in row.chunks_exact(NR).enumerate() {
            let d: &mut [f32; NR] = (&mut out[(jp * kc + p) * NR..][..NR]).try_into().unwrap();
            *d = src.try_into().unwrap();
        }
        if rest > 0 {
            let d = &mut out[(full * kc + p) * NR..][..NR];
            for (j, v) in d.iter_mut().enumerate() {
                *v = if j < rest { row[full * NR + j] } else { 0.0 };
            }
        }
    }
}

/// Rows `rows` x columns `depth` of strided `data` into `[rows / MR][depth][MR]`.
fn pack_lhs(data: &[f32], stride: usize, rows: Range<usize>, depth: Range<usize>, out: &mut [f32]) {
    let kc = depth.len();
    for (ip, i0) in rows.clone().step_by(MR).enumerate() {
        let h = MR.min(rows.end - i0);
        let row = |i: usize| &data[(i0 + i.min(h - 1)) * stride + depth.start..][..kc];
        let src: [&[f32]; MR] = std::array::from_fn(row);
        for (p, d) in out[ip * kc * MR..][..kc * MR]
            .chunks_exact_mut(MR)
            .enumerate()
        {
            for (i, v) in d.iter_mut().enumerate() {
                // Rows past the end repeat the last one (their results are
                // never stored) rather than branch per value.
                *v = src[i][p];
            }
        }
    }
}

/// The register tile with AVX2 + FMA: twelve accumulators of 8 (`H` =
/// [`MR`] rows; fewer for the last rows of a matrix, which then cost only
/// their own FMAs and are stored straight into `c`).
///
/// # Safety
/// AVX2 and FMA present; `a` holds `kc * MR` values, `b` `kc` rows of `NR`, `c` a
/// `H x NR` tile with rows `ldc` apart; `H <= MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const H: usize, B: BRows>(
    kc: usize,
    a: *const f32,
    next: *const f32,
    b: B,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let z = _mm256_setzero_ps();
    let mut acc = [[z; 2]; H];
    for p in 0..kc {
        let row = b.row(p);
        let b0 = _mm256_loadu_ps(row);
        let b1 = _mm256_loadu_ps(row.add(8));
        let ap = a.add(p * MR);
        // A hint only: any address is allowed.
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * MR) as *const i8);
        for (i, row) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*ap.add(i));
            row[0] = _mm256_fmadd_ps(x, b0, row[0]);
            row[1] = _mm256_fmadd_ps(x, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        let (mut v0, mut v1) = (row[0], row[1]);
        if add {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out.add(8)));
        }
        _mm256_storeu_ps(out, v0);
        _mm256_storeu_ps(out.add(8), v1);
    }
}

/// The register tile with AVX-512F: one 16-lane accumulator per row, the
/// same FMAs as [`kernel_avx2`] in the same order (the same bits) with half
/// the instructions. Zen 4 runs a 512-bit FMA as two 256-bit halves, so the
/// arithmetic takes as long; what it saves is issue slots and loads (per
/// depth: one load of B and six broadcasts against two and six): ResNet-50
/// at batch 1 took 3% less time in all, its layers up to 9% (`fovea bench
/// --profile`, minimum of four runs per layer).
///
/// # Safety
/// AVX-512F present; otherwise as [`kernel_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const H: usize, B: BRows>(
    kc: usize,
    a: *const f32,
    next: *const f32,
    b: B,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); H];
    for p in 0..kc {
        let row = _mm512_loadu_ps(b.row(p));
        let ap = a.add(p * MR);
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * MR) as *const i8);
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), row, *acc);
        }
    }
    for (i, &sum) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        let v = if add {
            _mm512_add_ps(sum, _mm512_loadu_ps(out))
        } else {
            sum
        };
        _mm512_storeu_ps(out, v);
    }
}

/// Widest last column panel that [`narrow_strip`] computes; a wider one
/// costs the full tile's twelve FMAs per depth either way.
const NARROW_MAX: usize = 8;

/// `c[rows, w] (+)= A x b` for the `w < NR` last columns of a matrix over
/// the `rows` (up to [`MC`]) of one A block, whose panel `ip` is
/// `a_panel(ip)` (`kc * MR` values): the full tile would spend the FMAs of
/// 16 columns on them.
///
/// # Safety
/// AVX2 and FMA present; `b` holds `kc` rows of [`NR`] values; `c` holds
/// `rows` rows of `w` values `ldc` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_strip<'a>(
    kc: usize,
    a_panel: impl Fn(usize) -> &'a [f32],
    rows: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    w: usize,
    add: bool,
) {
    // Panels per call so that the accumulators (panels x w) number 8 to
    // 12: enough independent FMA chains to hide their latency.
    #[cfg(target_arch = "x86_64")]
    match w {
        1 => narrow_panels::<1, 12>(kc, &a_panel, rows, b, c, ldc, add),
        2 => narrow_panels::<2, 6>(kc, &a_panel, rows, b, c, ldc, add),
        3 => narrow_panels::<3, 4>(kc, &a_panel, rows, b, c, ldc, add),
        4 => narrow_panels::<4, 3>(kc, &a_panel, rows, b, c, ldc, add),
        5 => narrow_panels::<5, 2>(kc, &a_panel, rows, b, c, ldc, add),
        6 => narrow_panels::<6, 2>(kc, &a_panel, rows, b, c, ldc, add),
        7 => narrow_panels::<7, 1>(kc, &a_panel, rows, b, c, ldc, add),
        8 => narrow_panels::<8, 1>(kc, &a_panel, rows, b, c, ldc, add),
        _ => unreachable!("1 to {NARROW_MAX} columns"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kc, a_panel, rows, b, c, ldc, w, add);
        unreachable!("called only where the CPU has AVX2")
    }
}

/// [`narrow_strip`] in groups of `P` row panels. The last group repeats
/// its last panel to fill `P` (those sums are not stored).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn narrow_panels<'a, const W: usize, const P: usize>(
    kc: usize,
    a_panel: &impl Fn(usize) -> &'a [f32],
    rows: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let panels = rows.div_ceil(MR);
    for first in (0..panels).step_by(P) {
        let a = std::array::from_fn(|q| a_panel((first + q).min(panels - 1)).as_ptr());
        let rows = (rows - first * MR).min(P * MR);
        kernel_narrow_avx2::<W, P>(kc, a, b, c.add(first * MR * ldc), ldc, rows, add);
    }
}

/// `P` panels of [`MR`] rows by `W` columns with AVX2 + FMA. A panel's six
/// rows at one depth are one vector (two lanes unused) and each column of
/// B a broadcast: per depth, `P` loads, `W` broadcasts and `P * W` FMAs.
/// Each sum runs over the depth in order from zero, then adds `c`, exactly
/// like [`kernel_avx2`], so a value does not depend on which kernel (and so
/// which tiling or batch) computed it.
///
/// # Safety
/// AVX2 and FMA present; each `a[q]` holds `kc * MR` values, `b` `kc` rows
/// of [`NR`]; `c` holds `rows <= P * MR` rows of `W` values `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_narrow_avx2<const W: usize, const P: usize>(
    kc: usize,
    a: [*const f32; P],
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); W]; P];
    // One depth: the P panels' six rows (`$load` of 8 lanes), times each of
    // the W columns of B.
    macro_rules! step {
        ($p:expr, $load:expr) => {{
            let p = $p;
            let rows: [__m256; P] = std::array::from_fn(|q| $load(a[q].add(p * MR)));
            for j in 0..W {
                let x = _mm256_broadcast_ss(&*b.add(p * NR + j));
                for q in 0..P {
                    acc[q][j] = _mm256_fmadd_ps(rows[q], x, acc[q][j]);
                }
            }
        }};
    }
    // Eight lanes read two values past a depth's six: the next depth's,
    // or, at the panel's last depth, nothing (masked).
    for p in 0..kc.saturating_sub(1) {
        step!(p, |x| _mm256_loadu_ps(x));
    }
    if kc > 0 {
        let mask = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
        step!(kc - 1, |x| _mm256_maskload_ps(x, mask));
    }
    let mut lanes = [0f32; 8];
    for (q, acc) in acc.iter().enumerate() {
        for (j, &sum) in acc.iter().enumerate() {
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            for (i, &v) in lanes
                .iter()
                .enumerate()
                .take(rows.saturating_sub(q * MR).min(MR))
            {
                // Raw writes: without `add`, c may be uninitialised.
                let d = c.add((q * MR + i) * ldc + j);
                d.write(if add { d.read() + v } else { v });
            }
        }
    }
}

/// The register tile in plain Rust (for CPUs without AVX2/FMA).
///
/// # Safety
/// `b` holds `kc` rows of `NR`; `c` is a `MR x NR` tile with rows `ldc` apart.
unsafe fn kernel_portable<B: BRows>(
    kc: usize,
    a: &[f32],
    b: B,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for (p, ap) in a.chunks_exact(MR).take(kc).enumerate() {
        let bp = std::slice::from_raw_parts(b.row(p), NR);
        for (row, &x) in acc.iter_mut().zip(ap) {
            for (v, &y) in row.iter_mut().zip(bp) {
                *v += x * y;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let d = c.add(i * ldc + j);
            d.write(if add { d.read() + v } else { v });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// `c (+)= a x b` in f64, strided like [`matmul`]'s operands.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        (m, n, k): (usize, usize, usize),
        add: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| a[i * lda + p] as f64 * b[p * ldb + j] as f64)
                    .sum();
                let d = &mut c[i * ldc + j];
                *d = if add {
                    (*d as f64 + s) as f32
                } else {
                    s as f32
                };
            }
        }
    }

    /// Every operand form, threaded or not, with and without accumulation,
    /// against f64, on shapes with partial tiles, several depth blocks and
    /// several row and column blocks; the padding of dst is never written.
    #[test]
    fn matches_f64_for_every_operand_form() {
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (6, 16, 256),
            (13, 33, 257),
            (73, 19, 600),
            (20, 530, 70),
            (260, 40, 300),
            (150, 40, 0),
        ];
        for &(m, n, k) in &shapes {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a = values(m * lda, 1);
            let b = values(k * ldb + n, 2);
            let a_dense: Vec<f32> = (0..m * k)
                .map(|x| a[x / k.max(1) * lda + x % k.max(1)])
                .collect();
            let bt: Vec<f32> = (0..n * k)
                .map(|x| b[x % k.max(1) * ldb + x / k.max(1)])
                .collect();
            let (pa, pb) = (
                PackedLhs::new(&a_dense, m, k),
                PackedRhs::from_transposed(&bt, k, n),
            );
            let lhs_forms = [
                Lhs::Packed(&pa),
                Lhs::Rows {
                    data: &a,
                    stride: lda,
                },
            ];
            let rhs_forms = [
                Rhs::Packed(&pb),
                Rhs::Rows {
                    data: &b,
                    stride: ldb,
                },
            ];
            let (bias, residual) = (values(n, 4), values(m * (n + 1), 5));
            let finishes = [
                None,
                Some(Finish {
                    bias: &bias,
                    residual: Some((&residual, n + 1)),
                    act: Activation::Relu,
                }),
                Some(Finish {
                    bias: &bias,
                    residual: None,
                    act: Activation::Gelu,
                }),
            ];
            for (form_a, lhs) in lhs_forms.into_iter().enumerate() {
                for (form_b, rhs) in rhs_forms.into_iter().enumerate() {
                    for add in [false, true] {
                        for parallel in [false, true] {
                            for finish in &finishes {
                                let init = values(m * ldc, 3);
                                let mut want = init.clone();
                                reference(&a, lda, &b, ldb, &mut want, ldc, (m, n, k), add);
                                if let Some(f) = finish {
                                    finish_reference(f, &mut want, ldc, (m, n));
                                }
                                let mut got = init.clone();
                                // SAFETY: got is m rows of ldc >= n values.
                                unsafe {
                                    matmul(
                                        got.as_mut_ptr(),
                                        ldc,
                                        lhs,
                                        rhs,
                                        (m, n, k),
                                        add,
                                        finish.as_ref(),
                                        parallel,
                                    )
                                };
                                for (x, (g, w)) in got.iter().zip(&want).enumerate() {
                                    let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 2.0;
                                    assert!(
                                        (g - w).abs() <= tol,
                                        "{m}x{n}x{k} forms {form_a}/{form_b} add {add} \
                                         par {parallel} finish {finish:?}: [{x}] {g} vs {w}"
                                    );
                                    if x % ldc >= n {
                                        assert_eq!(
                                            g.to_bits(),
                                            init[x].to_bits(),
                                            "padding written"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `c = act(c + bias + residual)` in f64.
    fn finish_reference(f: &Finish, c: &mut [f32], ldc: usize, (m, n): (usize, usize)) {
        for i in 0..m {
            for j in 0..n {
                let bias = f.bias[j];
                let residual = f.residual.map_or(0.0, |(r, stride)| r[i * stride + j]);
                let y = c[i * ldc + j] as f64 + bias as f64 + residual as f64;
                c[i * ldc + j] = match f.act {
                    Activation::None => y,
                    Activation::Relu => y.max(0.0),
                    Activation::Relu6 => y.clamp(0.0, 6.0),
                    Activation::Silu => y / (1.0 + (-y).exp()),
                    Activation::Gelu => crate::vmath::gelu(y as f32) as f64,
                } as f32;
            }
        }
    }

    /// The last columns of a matrix (computed by the narrow kernel when
    /// fewer than 9) are bit for bit what the full tile gives the same
    /// columns inside a wider matrix, for every width and row count: a
    /// value must not depend on the tiling.
    #[test]
    fn last_columns_match_the_full_tile_exactly() {
        let (k, wide) = (300, 2 * NR);
        for m in [1, 5, 6, 13, 71, 80] {
            let a = values(m * k, 11);
            let b = values(k * wide, 12);
            let init = values(m * wide, 13);
            for add in [false, true] {
                // The first n columns of a x b into a copy of init.
                let run = |n: usize| {
                    let mut c = init.clone();
                    let lhs = Lhs::Rows {
                        data: &a,
                        stride: k,
                    };
                    let rhs = Rhs::Rows {
                        data: &b,
                        stride: wide,
                    };
                    // SAFETY: c is m rows of `wide` >= n values.
                    unsafe { matmul(c.as_mut_ptr(), wide, lhs, rhs, (m, n, k), add, None, false) };
                    c
                };
                let full = run(wide);
                for n in NR + 1..wide {
                    let got = run(n);
                    for (x, (g, f)) in got.iter().zip(&full).enumerate() {
                        let want = if x % wide < n { f } else { &init[x] };
                        assert_eq!(g.to_bits(), want.to_bits(), "{m} rows, {n} columns: [{x}]");
                    }
                }
            }
        }
    }

    #[test]
    fn packing_round_trips() {
        for (m, k) in [(1, 1), (5, 3), (13, 300), (6, 0)] {
            let a = values(m * k, 7);
            assert_eq!(PackedLhs::new(&a, m, k).unpack(), a);
        }
    }

    /// A tile whose B rows are read in place at offsets (every tile shape,
    /// a depth range inside the operand) against f64; nothing outside the
    /// tile is written.
    #[test]
    fn tile_from_rows_matches_f64() {
        let (m, k) = (15, 40);
        let a = values(m * k, 7);
        let packed = PackedLhs::new(&a, m, k);
        let image = values(k * 23 + NR, 8);
        // Row p of B: 16 values at 23 * (k - 1 - p) + p % 5 (not in order).
        let depth = 3..37;
        let offsets: Vec<usize> = depth.clone().map(|p| 23 * (k - 1 - p) + p % 5).collect();
        for panel in 0..m.div_ceil(MR) {
            let h = MR.min(m - panel * MR);
            for w in [NR, 9, 1] {
                for add in [false, true] {
                    let ldc = 21;
                    let init = values(MR * ldc, 9);
                    let mut got = init.clone();
                    // SAFETY: every offset + NR lies inside image; got holds MR rows of ldc >= w.
                    unsafe {
                        packed.tile_from_rows(
                            panel,
                            Some(panel + 1),
                            depth.clone(),
                            image.as_ptr(),
                            &offsets,
                            got.as_mut_ptr(),
                            ldc,
                            (h, w),
                            add,
                        )
                    };
                    for i in 0..MR {
                        for j in 0..ldc {
                            let x = i * ldc + j;
                            if i >= h || j >= w {
                                assert_eq!(got[x].to_bits(), init[x].to_bits(), "written outside");
                                continue;
                            }
                            let row = panel * MR + i;
                            let s: f64 = depth
                                .clone()
                                .zip(&offsets)
                                .map(|(p, &off)| a[row * k + p] as f64 * image[off + j] as f64)
                                .sum();
                            let want = if add { init[x] as f64 + s } else { s };
                            assert!((got[x] as f64 - want).abs() < 1e-4, "{panel} {w} {i},{j}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 kernel and the portable one agree (where the CPU has AVX2)
    /// for 1 to MR rows, whose rows below `h` must stay untouched; the
    /// AVX-512 kernel (where the CPU has it) gives the AVX2 one's bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_agree() {
        if !has_avx2_fma() {
            return;
        }
        let kc = 37;
        let (a, b) = (values(kc * MR, 4), values(kc * NR, 5));
        for h in 1..=MR {
            let init = values(MR * 20, 6);
            let mut fast = init.clone();
            let mut wide = init.clone();
            let mut slow = init.clone();
            // SAFETY: AVX2 and FMA checked (AVX-512F below); the tiles have
            // MR rows of 20 >= NR.
            unsafe {
                let rows = PanelRows(b.as_ptr());
                let ap = a.as_ptr();
                full_tile(false, h, kc, ap, ap, rows, fast.as_mut_ptr(), 20, true);
                // The CPU's feature, not the switch: `FOVEA_AVX512=off` in
                // the environment must not skip the comparison.
                if is_x86_feature_detected!("avx512f") {
                    full_tile(true, h, kc, ap, ap, rows, wide.as_mut_ptr(), 20, true);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&wide), bits(&fast), "h {h}: AVX-512 against AVX2");
                }
                kernel_portable(kc, &a, rows, slow.as_mut_ptr(), 20, true);
            }
            for (x, (f, s)) in fast.iter().zip(&slow).enumerate() {
                if x / 20 < h && x % 20 < NR {
                    assert!((f - s).abs() <= 1e-5, "h {h} [{x}]: {f} vs {s}");
                } else {
                    assert_eq!(f.to_bits(), init[x].to_bits(), "h {h} [{x}] written");
                }
            }
        }
    }
}
