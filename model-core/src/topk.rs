//! Classification postprocessing: softmax and the k best classes.

use std::cmp::Ordering;

/// Softmax over `logits`, then the `k` most probable classes as
/// `(class_id, probability)`, best first; equal probabilities keep the lower
/// class id first. `k` is clamped to the number of classes.
///
/// Numerically stable: the maximum is subtracted before exponentiating and
/// the sum is accumulated in f64, so large logits neither overflow nor lose
/// the small classes. Infinite logits get the limit of the softmax (the
/// `+inf` classes share probability 1); NaN logits give NaN scores, ranked
/// last.
pub fn softmax_topk(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    top_k(&softmax(logits), k)
}

/// The `k` largest values as `(index, value)`, best first; equal values
/// keep the lower index first, NaN ranks last. `k` is clamped to the length.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = values.iter().copied().enumerate().collect();
    let k = k.min(ranked.len());
    if k == 0 {
        return Vec::new();
    }
    // Partial selection first: with 1000 classes and k = 5 a full sort would
    // mostly order classes nobody looks at.
    if k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, rank);
        ranked.truncate(k);
    }
    ranked.sort_unstable_by(rank);
    ranked
}

/// Softmax of `logits` as f32, computed in f64.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    // Unnormalised weights. The infinite cases take the softmax's limit, as
    // exp(inf - inf) would be NaN.
    let weight = |v: f32| -> f64 {
        match max {
            _ if v.is_nan() => f64::NAN,
            f32::INFINITY => f64::from(u8::from(v == f32::INFINITY)),
            // Every logit is -inf: all equal, so uniform.
            f32::NEG_INFINITY => 1.0,
            _ => (f64::from(v) - f64::from(max)).exp(),
        }
    };
    let weights: Vec<f64> = logits.iter().map(|&v| weight(v)).collect();
    let sum: f64 = weights.iter().filter(|w| !w.is_nan()).sum();
    weights.into_iter().map(|w| (w / sum) as f32).collect()
}

/// Best first: higher probability, then lower class id; NaN after everything.
fn rank(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
        (a_nan, b_nan) => a_nan.cmp(&b_nan),
    }
    .then(a.0.cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn probabilities_sum_to_one_and_are_sorted() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        let top = softmax_topk(&logits, 4);
        let ids: Vec<usize> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0, 3]);
        let total: f32 = top.iter().map(|t| t.1).sum();
        assert!(close(total, 1.0));
        let denom: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!(close(top[0].1, 3.0f32.exp() / denom));
    }

    #[test]
    fn k_is_clamped_and_zero_is_empty() {
        assert_eq!(softmax_topk(&[0.0, 1.0], 10).len(), 2);
        assert!(softmax_topk(&[0.0, 1.0], 0).is_empty());
        assert!(softmax_topk(&[], 5).is_empty());
    }

    #[test]
    fn ties_keep_the_lower_index_first() {
        let top = softmax_topk(&[2.0, 5.0, 2.0, 5.0, 5.0], 4);
        let ids: Vec<usize> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 4, 0]);
        assert_eq!(top[0].1, top[2].1);
    }

    #[test]
    fn large_logits_are_stable() {
        let top = softmax_topk(&[1000.0, 999.0, -1000.0], 3);
        assert!(close(top[0].1, 1.0 / (1.0 + (-1.0f32).exp())));
        assert_eq!(top[2], (2, 0.0));
        let top = softmax_topk(&[-1e30, -1e30], 2);
        assert_eq!(top, [(0, 0.5), (1, 0.5)]);
    }

    #[test]
    fn partial_selection_matches_a_full_sort() {
        // A deterministic scramble of 1000 logits with repeats.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 613) as f32 / 50.0)
            .collect();
        let full = softmax_topk(&logits, 1000);
        for k in [1, 5, 37, 999] {
            assert_eq!(softmax_topk(&logits, k), full[..k]);
        }
        assert!(full
            .windows(2)
            .all(|w| w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0)));
    }

    #[test]
    fn infinities_and_nans_are_handled() {
        let top = softmax_topk(&[f32::INFINITY, 0.0, f32::INFINITY, f32::NEG_INFINITY], 4);
        assert_eq!(top, [(0, 0.5), (2, 0.5), (1, 0.0), (3, 0.0)]);
        let top = softmax_topk(&[f32::NEG_INFINITY; 2], 2);
        assert_eq!(top, [(0, 0.5), (1, 0.5)]);
        let top = softmax_topk(&[f32::NAN, 1.0, 1.0], 3);
        assert_eq!(&top[..2], &[(1, 0.5), (2, 0.5)]);
        assert!(top[2].0 == 0 && top[2].1.is_nan());
    }
}
