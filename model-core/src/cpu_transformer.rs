//! f32 transformer kernels on the CPU.
//!
//! - Attention: each (image, head, block of queries) is one task: a gemm for
//!   the scores, a row softmax while they are in cache, a gemm into the
//!   context. The heads are read in place from the projections' output (no
//!   split into `[B, H, N, hd]`), and the context is written straight into the
//!   `[B, N, H * hd]` rows the output projection reads (no merge). A task
//!   depends only on its own image, so an answer never depends on batchmates.
//! - Linear: Fovea's gemm over the weights packed at load time, with bias,
//!   residual and activation applied to each tile of the output as its sum
//!   completes ([`sgemm::Finish`]).

use gemm::Parallelism;

use crate::activation::Activation;
use crate::cpu_conv::with_scratch;
use crate::sgemm::{self, Lhs, PackedRhs, Rhs, SharedMut};
use crate::team;
use crate::vmath::{avx2_dispatch, exp};

/// Sequences of feature rows in a buffer: feature `c` of row `i` of sequence
/// `b` is `data[offset + b * batch_stride + i * row_stride + c]`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
    /// Rows per sequence.
    pub len: usize,
}

impl Rows<'_> {
    /// Checks that `batch` sequences of `len` rows of `width` features lie
    /// inside the buffer.
    fn check(&self, batch: usize, width: usize, what: &str) {
        if batch == 0 || self.len == 0 {
            return;
        }
        let last = self.offset
            + (batch - 1) * self.batch_stride
            + (self.len - 1) * self.row_stride
            + width;
        assert!(last <= self.data.len(), "{what} rows run past their buffer");
    }

    /// A pointer to feature `c` of the first row of sequence `b`.
    fn at(&self, b: usize, c: usize) -> *const f32 {
        self.data[self.offset + b * self.batch_stride + c..].as_ptr()
    }
}

/// Scores kept per task: 32K floats (128 KiB) stay in L2 through the softmax
/// and the second gemm.
const SCORE_BLOCK_FLOATS: usize = 32 * 1024;

/// Multi-head scaled dot-product attention over `batch` sequences:
/// `softmax(q k^T + key_bias) v` per head, with `q` already scaled. `q`, `k`
/// and `v` have `heads * head_dim` features per row; `key_bias`, if any, is
/// `[batch, keys]` and added to every query's scores (0 or -inf masks keys).
/// Returns the context, `[batch, queries, heads * head_dim]`.
pub fn attention(
    q: Rows,
    k: Rows,
    v: Rows,
    key_bias: Option<&[f32]>,
    batch: usize,
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let d = heads * head_dim;
    let (nq, nk) = (q.len, k.len);
    assert_eq!(v.len, nk, "keys and values differ in length");
    q.check(batch, d, "query");
    k.check(batch, d, "key");
    v.check(batch, d, "value");
    if let Some(bias) = key_bias {
        assert_eq!(bias.len(), batch * nk, "key bias is not [batch, keys]");
    }
    let mut out = vec![0f32; batch * nq * d];
    if out.is_empty() || nk == 0 {
        return out;
    }
    // Query blocks of about equal size whose scores fit SCORE_BLOCK_FLOATS.
    let blocks = (nq * nk).div_ceil(SCORE_BLOCK_FLOATS).clamp(1, nq);
    let block_rows = nq.div_ceil(blocks);
    let blocks = nq.div_ceil(block_rows);
    let dst = SharedMut(out.as_mut_ptr());
    let task = |t: usize, scores: &mut [f32]| {
        let (b, rest) = (t / (heads * blocks), t % (heads * blocks));
        let (h, block) = (rest / blocks, rest % blocks);
        let first = block * block_rows;
        let rows = block_rows.min(nq - first);
        let col = h * head_dim;
        let scores = &mut scores[..rows * nk];
        // SAFETY: `check` bounds every row read; the scores are rows x nk; the
        // task writes rows first..first+rows, columns col..col+head_dim of
        // image b, which no other task writes.
        unsafe {
            let q_block = q.at(b, col).add(first * q.row_stride);
            gemm_strided(
                (rows, nk, head_dim),
                (scores.as_mut_ptr(), nk),
                (q_block, 1, q.row_stride),
                (k.at(b, col), k.row_stride, 1),
            );
        }
        let bias = key_bias.map(|kb| &kb[b * nk..][..nk]);
        for row in scores.chunks_exact_mut(nk) {
            softmax_row(row, bias);
        }
        unsafe {
            let out_block = dst.get().add((b * nq + first) * d + col);
            gemm_strided(
                (rows, head_dim, nk),
                (out_block, d),
                (scores.as_ptr(), 1, nk),
                (v.at(b, col), 1, v.row_stride),
            );
        }
    };
    // The scores in the thread's scratch buffer, kept across tasks and calls.
    team::for_each(batch * heads * blocks, |t| {
        with_scratch(block_rows * nk, |scores| task(t, scores))
    });
    out
}

/// `dst[m, n] = lhs[m, k] * rhs[k, n]` on one thread. Each operand is a
/// pointer with its (column, row) strides; `dst` is row-major with `dst.1`
/// between rows.
///
/// # Safety
/// Every addressed element must be valid; `dst` must not overlap the inputs.
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        false,
        lhs.0,
        lhs.1 as isize,
        lhs.2 as isize,
        rhs.0,
        rhs.1 as isize,
        rhs.2 as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

avx2_dispatch! {
    /// `row = softmax(row + bias)`, in place.
    fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
        if let Some(bias) = bias {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x += b;
            }
        }
        // Eight independent lanes so that the reductions vectorise.
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (m, &x) in lanes.iter_mut().zip(c) {
                *m = m.max(x);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (s, x) in sums.iter_mut().zip(c) {
                *x = exp(*x - max);
                *s += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        let scale = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= scale;
        }
    }
}

/// LayerNorm over rows of `weight.len()` features: `(x - mean) / sqrt(var
/// + eps) * weight + bias`, with the variance summed over the deviations
/// from the mean (not as `E[x^2] - mean^2`, which cancels). Rows are spread
/// over the [`team`].
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    assert_eq!(bias.len(), dim, "LayerNorm bias and weight differ");
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "input is not whole rows"
    );
    let mut out = vec![0f32; x.len()];
    team::for_each_chunk(&mut out, dim, |row, y| {
        norm_row(&x[row * dim..][..dim], weight, bias, eps, y)
    });
    out
}

avx2_dispatch! {
    /// One row of [`layer_norm`].
    fn norm_row(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, y: &mut [f32]) {
        let n = x.len() as f32;
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for ((y, &x), (&w, &b)) in y.iter_mut().zip(x).zip(weight.iter().zip(bias)) {
            *y = (x - mean) * inv_std * w + b;
        }
    }
}

/// `sum(f(x))` in sixteen independent lanes, so that it vectorises.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `act(x w + bias + residual)` for `x` `[rows, k]` and `w` `[k, n]`, both
/// row-major; `bias` is `[n]`, `residual` `[rows, n]`. Returns `[rows, n]`.
pub fn linear(
    x: &[f32],
    w: &PackedRhs,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Activation,
) -> Vec<f32> {
    let (k, n) = (w.depth(), w.columns());
    assert_eq!(bias.len(), n, "bias is not [n]");
    let rows = x.len() / k.max(1);
    assert_eq!(x.len(), rows * k, "input is not [rows, k]");
    if let Some(r) = residual {
        assert_eq!(r.len(), rows * n, "residual is not [rows, n]");
    }
    let mut out = Vec::<f32>::with_capacity(rows * n);
    let finish = sgemm::Finish {
        bias,
        residual: residual.map(|r| (r, n)),
        act,
    };
    let lhs = Lhs::Rows { data: x, stride: k };
    // SAFETY: out has room for rows x n values, which the gemm writes
    // (without reading them first) before it finishes them; it is not shared.
    unsafe {
        sgemm::matmul(
            out.as_mut_ptr(),
            n,
            lhs,
            Rhs::Packed(w),
            (rows, n, k),
            false,
            Some(&finish),
            true,
        );
        out.set_len(rows * n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: deterministic values in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Against f64 on rows with a common offset (where `E[x^2] -
    /// mean^2` would lose the variance) and on lengths that leave a tail.
    #[test]
    fn layer_norm_matches_f64() {
        for (rows, dim, offset) in [(3, 768, 0.0), (5, 37, 0.0), (4, 256, 10.0), (1, 1, 0.0)] {
            let x: Vec<f32> = values(rows * dim, 1).iter().map(|v| v + offset).collect();
            let (w, b) = (values(dim, 2), values(dim, 3));
            let got = layer_norm(&x, &w, &b, 1e-6);
            for r in 0..rows {
                let row: Vec<f64> = x[r * dim..][..dim].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / dim as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
                for j in 0..dim {
                    let want = (row[j] - mean) / (var + 1e-6).sqrt() * w[j] as f64 + b[j] as f64;
                    let err = (got[r * dim + j] as f64 - want).abs();
                    assert!(
                        err <= 2e-6 * (1.0 + want.abs()),
                        "{rows}x{dim}+{offset} [{r}, {j}]: {err:e}"
                    );
                }
            }
        }
    }

    /// The reference: per image and head, in f64, from the same layout.
    #[allow(clippy::too_many_arguments)]
    fn attention_f64(
        q: &Rows,
        k: &Rows,
        v: &Rows,
        bias: Option<&[f32]>,
        b: usize,
        h: usize,
        hd: usize,
    ) -> Vec<f64> {
        let (nq, nk, d) = (q.len, k.len, h * hd);
        let get = |r: &Rows, bi: usize, i: usize, c: usize| {
            r.data[r.offset + bi * r.batch_stride + i * r.row_stride + c] as f64
        };
        let mut out = vec![0f64; b * nq * d];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..nq {
                    let mut s: Vec<f64> = (0..nk)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|c| get(q, bi, i, hi * hd + c) * get(k, bi, j, hi * hd + c))
                                .sum();
                            dot + bias.map_or(0.0, |bb| bb[bi * nk + j] as f64)
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - max).exp());
                    let sum: f64 = s.iter().sum();
                    for c in 0..hd {
                        let ctx: f64 = (0..nk)
                            .map(|j| s[j] / sum * get(v, bi, j, hi * hd + c))
                            .sum();
                        out[(bi * nq + i) * d + hi * hd + c] = ctx;
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "{i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn attention_reads_fused_qkv_in_place() {
        // ViT's layout: one [B, N, 3D] buffer, q/k/v at column offsets 0, D, 2D.
        // 150 x 300 scores take several query blocks per head.
        for (b, n, h, hd) in [(1, 1, 1, 1), (2, 7, 3, 5), (3, 150, 2, 16), (1, 300, 1, 8)] {
            let d = h * hd;
            let data = values(b * n * 3 * d, n as u32);
            let rows = |offset| Rows {
                data: &data,
                offset,
                batch_stride: n * 3 * d,
                row_stride: 3 * d,
                len: n,
            };
            let (q, k, v) = (rows(0), rows(d), rows(2 * d));
            let got = attention(q, k, v, None, b, h, hd);
            assert_close(&got, &attention_f64(&q, &k, &v, None, b, h, hd), 1e-5);
        }
    }

    #[test]
    fn attention_with_separate_inputs_and_a_key_mask() {
        // DETR's layout: queries and keys of different lengths, separate buffers.
        let (b, nq, nk, h, hd) = (2, 9, 300, 4, 8);
        let d = h * hd;
        let (qd, kd, vd) = (
            values(b * nq * d, 1),
            values(b * nk * d, 2),
            values(b * nk * d, 3),
        );
        let rows = |data, len| Rows {
            data,
            offset: 0,
            batch_stride: len * d,
            row_stride: d,
            len,
        };
        let (q, k, v) = (rows(&qd, nq), rows(&kd, nk), rows(&vd, nk));
        // Image 0 sees its first 40 keys, image 1 all of them.
        let bias: Vec<f32> = (0..b * nk)
            .map(|i| {
                if i < 40 || i >= nk {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let got = attention(q, k, v, Some(&bias), b, h, hd);
        assert_close(
            &got,
            &attention_f64(&q, &k, &v, Some(&bias), b, h, hd),
            1e-5,
        );
        // The masked keys take no part: image 0 equals attention over 40 keys.
        let k40 = Rows { len: 40, ..k };
        let v40 = Rows { len: 40, ..v };
        let alone = attention(rows(&qd[..nq * d], nq), k40, v40, None, 1, h, hd);
        assert_close(
            &got[..nq * d],
            &alone.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            1e-6,
        );
    }

    #[test]
    fn linear_applies_bias_residual_and_activation() {
        let (rows, k, n) = (37, 19, 70);
        let (x, w, bias, res) = (
            values(rows * k, 4),
            values(k * n, 5),
            values(n, 6),
            values(rows * n, 7),
        );
        let wt: Vec<f32> = (0..n * k).map(|i| w[i % k * n + i / k]).collect();
        for act in [Activation::None, Activation::Relu, Activation::Gelu] {
            for residual in [None, Some(&res[..])] {
                let packed = PackedRhs::from_transposed(&wt, k, n);
                let got = linear(&x, &packed, &bias, residual, act);
                let want: Vec<f64> = (0..rows * n)
                    .map(|idx| {
                        let (i, j) = (idx / n, idx % n);
                        let dot: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * w[c * n + j] as f64)
                            .sum();
                        let y = dot + bias[j] as f64 + residual.map_or(0.0, |r| r[idx] as f64);
                        match act {
                            Activation::Relu => y.max(0.0),
                            Activation::Gelu => crate::vmath::gelu(y as f32) as f64,
                            _ => y,
                        }
                    })
                    .collect();
                assert_close(&got, &want, 1e-5);
            }
        }
    }
}
