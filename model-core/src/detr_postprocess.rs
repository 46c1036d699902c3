//! DETR output postprocessing, as transformers'
//! `DetrImageProcessor.post_process_object_detection(outputs, threshold,
//! target_sizes)` does it for one image:
//!
//! - softmax over each query's logits, whose last class is "no object";
//! - the query's class is the most probable of the others (the first one on
//!   a tie), its score that probability;
//! - the box goes from normalised (cx, cy, w, h) to corners, `cx - 0.5 * w`
//!   and so on in f32, then times the original width or height (f32);
//! - queries whose score is strictly above the threshold are kept, in query
//!   order. Boxes are not clipped to the image, as in the reference.
//!
//! The softmax subtracts the row's maximum in f32 as torch does, then
//! exponentiates and sums in f64 and rounds the score to f32 once, so it is
//! within a few f32 ulps of torch's (whose `exp` is vectorised f32). A score
//! that close to the threshold could therefore land on the other side; the
//! class is taken from the logits, so two classes whose probabilities torch
//! rounds to the same f32 could be told apart here.
//!
//! Beyond the reference, for the server's options: a class filter (the
//! query's best class must be listed; there is no fallback to a listed class
//! with a lower score, as in [`crate::detection`]) and a maximum count, which
//! keeps the highest scores (ties to the earlier query). The result stays in
//! query order; sort it by score if best-first is wanted.

use crate::detection::{DetectOptions, Detection};

/// Threshold and filters of [`postprocess`].
#[derive(Clone, Debug, PartialEq)]
pub struct DetrPostprocess {
    /// Keep queries whose score is strictly above this (the reference's
    /// default is 0.5).
    pub threshold: f32,
    /// Only these class ids, if given.
    pub classes: Option<Vec<usize>>,
    /// Keep at most this many detections (the best ones), if given.
    pub max_detections: Option<usize>,
}

impl Default for DetrPostprocess {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            classes: None,
            max_detections: None,
        }
    }
}

impl DetrPostprocess {
    /// The server's detection options: `confidence` is the threshold; DETR
    /// has no NMS, so `iou` and `agnostic` do not apply.
    pub fn from_detect_options(options: &DetectOptions) -> Self {
        Self {
            threshold: options.confidence,
            classes: options.classes.clone(),
            max_detections: Some(options.max_detections),
        }
    }
}

/// Output shapes that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DetrShapeError {
    #[error("{0} box values are not [queries, 4] with at least one query")]
    Boxes(usize),
    #[error("{logits} logits are not [{queries}, classes + 1] with at least one class")]
    Logits { logits: usize, queries: usize },
}

/// Detections of one image. `logits`: row-major `[queries, classes + 1]`;
/// `boxes`: `[queries, 4]` normalised (cx, cy, w, h); `original`: the
/// image's (height, width) in pixels, which the boxes are scaled to.
/// Returns the kept queries in query order.
pub fn postprocess(
    logits: &[f32],
    boxes: &[f32],
    original: (u32, u32),
    options: &DetrPostprocess,
) -> Result<Vec<Detection>, DetrShapeError> {
    let queries = boxes.len() / 4;
    if queries == 0 || !boxes.len().is_multiple_of(4) {
        return Err(DetrShapeError::Boxes(boxes.len()));
    }
    let row = logits.len() / queries;
    if row < 2 || !logits.len().is_multiple_of(queries) {
        return Err(DetrShapeError::Logits {
            logits: logits.len(),
            queries,
        });
    }
    let classes = row - 1;
    let wanted = options.classes.as_ref().map(|list| {
        let mut mask = vec![false; classes];
        for &c in list.iter().filter(|&&c| c < classes) {
            mask[c] = true;
        }
        mask
    });
    // As torch.Tensor(target_sizes): f32, exact for any real image side.
    let (height, width) = (original.0 as f32, original.1 as f32);

    let mut kept: Vec<(usize, Detection)> = Vec::new();
    for (q, (row, b)) in logits
        .chunks_exact(row)
        .zip(boxes.chunks_exact(4))
        .enumerate()
    {
        let (class_id, score) = best_class(row);
        // Strictly above; a NaN score never is.
        if score.partial_cmp(&options.threshold) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        if wanted.as_ref().is_some_and(|mask| !mask[class_id]) {
            continue;
        }
        let (cx, cy, w, h) = (b[0], b[1], b[2], b[3]);
        kept.push((
            q,
            Detection {
                class_id,
                score,
                x1: (cx - 0.5 * w) * width,
                y1: (cy - 0.5 * h) * height,
                x2: (cx + 0.5 * w) * width,
                y2: (cy + 0.5 * h) * height,
            },
        ));
    }
    if let Some(max) = options.max_detections {
        if kept.len() > max {
            // Best scores first, earlier queries first among equals (the
            // sort is stable), then back to query order.
            kept.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
            kept.truncate(max);
            kept.sort_by_key(|&(q, _)| q);
        }
    }
    Ok(kept.into_iter().map(|(_, d)| d).collect())
}

/// The most probable real class of one query's logits and its softmax
/// probability (over all classes, "no object" included).
fn best_class(row: &[f32]) -> (usize, f32) {
    let (real, _) = row.split_at(row.len() - 1);
    let mut best = 0;
    for (c, &v) in real.iter().enumerate().skip(1) {
        if v > real[best] {
            best = c;
        }
    }
    // A NaN anywhere makes torch's max, and so every probability, NaN; the
    // sum below is then NaN too.
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp = |v: f32| f64::from(v - max).exp();
    let sum: f64 = row.iter().map(|&v| exp(v)).sum();
    (best, (exp(real[best]) / sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two queries, three real classes.
    fn outputs() -> (Vec<f32>, Vec<f32>) {
        let logits = vec![
            1.0, 4.0, 0.5, 0.0, // class 1 wins
            0.0, 0.0, 0.0, 6.0, // "no object"
        ];
        let boxes = vec![0.5, 0.5, 0.25, 0.5, 0.1, 0.1, 0.1, 0.1];
        (logits, boxes)
    }

    #[test]
    fn softmax_drops_no_object_and_scales_boxes() {
        let (logits, boxes) = outputs();
        let found = postprocess(&logits, &boxes, (200, 100), &DetrPostprocess::default()).unwrap();
        assert_eq!(found.len(), 1);
        let d = &found[0];
        let e = [1.0f64, 4.0, 0.5, 0.0].map(f64::exp);
        let p = e[1] / e.iter().sum::<f64>();
        assert_eq!((d.class_id, d.score), (1, p as f32));
        assert_eq!((d.x1, d.y1, d.x2, d.y2), (37.5, 50.0, 62.5, 150.0));
        // The "no object" query has its best real class at 1/(3 + e^6).
        let all = postprocess(
            &logits,
            &boxes,
            (200, 100),
            &DetrPostprocess {
                threshold: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].class_id, 0); // first of the tied classes
    }

    #[test]
    fn threshold_is_strict() {
        // Two equal logits and a "no object" at -inf: score exactly 0.5.
        let logits = [0.0, 0.0, f32::NEG_INFINITY];
        let boxes = [0.5; 4];
        let at = |t: f32| {
            let o = DetrPostprocess {
                threshold: t,
                ..Default::default()
            };
            postprocess(&logits, &boxes, (10, 10), &o).unwrap().len()
        };
        assert_eq!((at(0.5), at(0.4999)), (0, 1));
        let nan = [f32::NAN, 1.0, 0.0];
        let o = DetrPostprocess {
            threshold: 0.0,
            ..Default::default()
        };
        assert!(postprocess(&nan, &boxes, (10, 10), &o).unwrap().is_empty());
    }

    #[test]
    fn class_filter_and_max_detections() {
        // Four queries of classes 0, 1, 0, 1 with rising scores.
        let logits: Vec<f32> = (0..4)
            .flat_map(|q| {
                let s = 1.0 + q as f32;
                if q % 2 == 0 {
                    [s, 0.0, 0.0]
                } else {
                    [0.0, s, 0.0]
                }
            })
            .collect();
        let boxes = vec![0.5; 16];
        let run = |classes: Option<Vec<usize>>, max| {
            let o = DetrPostprocess {
                threshold: 0.1,
                classes,
                max_detections: max,
            };
            postprocess(&logits, &boxes, (10, 10), &o)
                .unwrap()
                .iter()
                .map(|d| d.class_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(None, None), [0, 1, 0, 1]);
        assert_eq!(run(Some(vec![1, 7]), None), [1, 1]);
        let scores = |max| {
            let o = DetrPostprocess {
                threshold: 0.1,
                classes: None,
                max_detections: max,
            };
            postprocess(&logits, &boxes, (10, 10), &o)
                .unwrap()
                .iter()
                .map(|d| d.score)
                .collect::<Vec<_>>()
        };
        let all = scores(None);
        // The two best (queries 2 and 3), still in query order.
        assert_eq!(scores(Some(2)), all[2..]);
        assert!(scores(Some(0)).is_empty());
        assert_eq!(run(Some(vec![0]), Some(1)), [0]);
    }

    #[test]
    fn shapes_are_checked() {
        let o = DetrPostprocess::default();
        assert_eq!(
            postprocess(&[0.0; 6], &[], (1, 1), &o),
            Err(DetrShapeError::Boxes(0))
        );
        assert_eq!(
            postprocess(&[0.0; 6], &[0.0; 5], (1, 1), &o),
            Err(DetrShapeError::Boxes(5))
        );
        assert!(postprocess(&[0.0; 5], &[0.0; 8], (1, 1), &o).is_err());
        assert!(postprocess(&[0.0; 2], &[0.0; 8], (1, 1), &o).is_err()); // no real class
        assert!(postprocess(&[0.0; 4], &[0.0; 8], (1, 1), &o).is_ok());
    }

    #[test]
    fn options_from_the_server() {
        let d = DetectOptions {
            confidence: 0.7,
            classes: Some(vec![3]),
            max_detections: 5,
            ..Default::default()
        };
        let o = DetrPostprocess::from_detect_options(&d);
        assert_eq!(
            o,
            DetrPostprocess {
                threshold: 0.7,
                classes: Some(vec![3]),
                max_detections: Some(5)
            }
        );
    }
}
