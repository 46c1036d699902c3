//! Postprocessing of a raw YOLO detection output: best class per anchor,
//! confidence threshold, non-maximum suppression, and mapping the boxes back
//! from the letterboxed input to the source image.
//!
//! The reference is Ultralytics' `non_max_suppression` with
//! `multi_label=False` (what its detection predictor runs), using
//! torchvision's CPU `nms` kernel, and `scale_boxes`. Details it pins down,
//! all reproduced here:
//!
//! - an anchor's class is the first class with the highest score; it is a
//!   candidate when that score is strictly greater than `confidence`; the
//!   `classes` filter then drops candidates whose best class is not listed
//!   (it does not fall back to a listed class with a lower score);
//! - boxes go from centre/size to corners in f32 (`x1 = cx - w / 2`);
//! - above [`MAX_NMS`] candidates only the highest-scoring ones are kept;
//! - class-aware NMS offsets each box by `class * 7680` ([`MAX_WH`]) in all
//!   four coordinates and runs one NMS; IoU is computed on the offset f32
//!   coordinates (`inter / (area_i + area_j - inter)`, as torchvision does,
//!   so the f32 rounding of large offsets is the same) and a box is suppressed
//!   when its IoU with a kept box is strictly greater than `iou`;
//! - the kept boxes come out by descending score, ties in anchor order
//!   (torchvision sorts stably), truncated to `max_detections`.
//!
//! Cost: one pass over the scores to find each anchor's best class, then NMS
//! over the candidates only. Boxes of different classes never overlap once
//! offset (when all boxes fit in a 7680-pixel span, which any real output
//! does), so the suppression loop only compares boxes of the same class, and
//! it stops as soon as `max_detections` boxes are kept (a box's fate depends
//! only on higher-scoring ones, so later ones cannot change the first ones).

use serde::Serialize;

use crate::letterbox::LetterboxTransform;

/// Most candidates that enter NMS (Ultralytics' `max_nms`).
pub const MAX_NMS: usize = 30_000;

/// Per-class coordinate offset of class-aware NMS (Ultralytics' `max_wh`).
pub const MAX_WH: f32 = 7680.0;

/// Thresholds and filters of [`postprocess`].
#[derive(Clone, Debug)]
pub struct DetectOptions {
    /// Keep anchors whose best class score is strictly above this.
    pub confidence: f32,
    /// Suppress boxes whose IoU with a better one is strictly above this.
    pub iou: f32,
    /// Keep at most this many detections (the best ones).
    pub max_detections: usize,
    /// Only these class ids, if given.
    pub classes: Option<Vec<usize>>,
    /// Suppress across classes instead of within each class.
    pub agnostic: bool,
}

impl Default for DetectOptions {
    fn default() -> Self {
        Self {
            confidence: 0.25,
            iou: 0.45,
            max_detections: 300,
            classes: None,
            agnostic: false,
        }
    }
}

impl DetectOptions {
    /// Thresholds within `0..=1` (Ultralytics asserts the same).
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.confidence) {
            return Err(format!(
                "confidence {} must be between 0 and 1",
                self.confidence
            ));
        }
        if !(0.0..=1.0).contains(&self.iou) {
            return Err(format!("iou {} must be between 0 and 1", self.iou));
        }
        Ok(())
    }
}

/// One detected object: class, score and corners `x1 < x2`, `y1 < y2` in
/// pixels (input pixels after [`postprocess`], source pixels after
/// [`to_source`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    pub class_id: usize,
    pub score: f32,
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

/// `output`: row-major [4+num_classes, anchors] f32 for one image (rows cx,
/// cy, w, h in input pixels, then the class scores after sigmoid). Returns the
/// detections in input (letterboxed) pixels, best first.
///
/// # Panics
/// If `num_classes` is 0 or `output.len()` is not a multiple of
/// `4 + num_classes`: the caller knows the model's output shape.
pub fn postprocess(output: &[f32], num_classes: usize, options: &DetectOptions) -> Vec<Detection> {
    let rows = 4 + num_classes;
    assert!(
        num_classes > 0 && output.len().is_multiple_of(rows),
        "YOLO output of {} values is not [4 + {num_classes}, anchors]",
        output.len()
    );
    let anchors = output.len() / rows;
    if anchors == 0 || options.max_detections == 0 {
        return Vec::new();
    }

    // Best class per anchor, scanning the scores class by class (contiguous
    // rows). The first maximum wins; a NaN wins like in torch.max.
    let scores = &output[4 * anchors..];
    let mut best = scores[..anchors].to_vec();
    let mut best_class = vec![0u32; anchors];
    for c in 1..num_classes {
        let row = &scores[c * anchors..(c + 1) * anchors];
        for ((b, bc), &s) in best.iter_mut().zip(best_class.iter_mut()).zip(row) {
            // Branch-free selects, so the loop vectorises.
            let take = s > *b || (s.is_nan() & !b.is_nan());
            *b = if take { s } else { *b };
            *bc = if take { c as u32 } else { *bc };
        }
    }

    let wanted: Option<Vec<bool>> = options.classes.as_ref().map(|list| {
        let mut mask = vec![false; num_classes];
        for &c in list.iter().filter(|&&c| c < num_classes) {
            mask[c] = true;
        }
        mask
    });
    let mut candidates: Vec<Detection> = Vec::new();
    for (a, (&score, &class)) in best.iter().zip(&best_class).enumerate() {
        // Strictly above; a NaN score is never a candidate.
        if score.partial_cmp(&options.confidence) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        if let Some(mask) = &wanted {
            if !mask[class as usize] {
                continue;
            }
        }
        let (cx, cy) = (output[a], output[anchors + a]);
        let (hw, hh) = (output[2 * anchors + a] / 2.0, output[3 * anchors + a] / 2.0);
        candidates.push(Detection {
            class_id: class as usize,
            score,
            x1: cx - hw,
            y1: cy - hh,
            x2: cx + hw,
            y2: cy + hh,
        });
    }

    // By descending score, ties in anchor order (stable sort). Ultralytics
    // cuts to MAX_NMS with an unstable argsort, which may order exact ties at
    // the cut differently; below MAX_NMS candidates the two are identical.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(MAX_NMS);
    let keep = nms(&candidates, options);
    keep.into_iter().map(|k| candidates[k].clone()).collect()
}

/// Greedy NMS over `sorted` (best first); the indices kept, in order.
fn nms(sorted: &[Detection], options: &DetectOptions) -> Vec<usize> {
    let n = sorted.len();
    // Offset corners and areas, in f32 exactly as torchvision sees them.
    let offset = |d: &Detection| {
        if options.agnostic {
            0.0
        } else {
            d.class_id as f32 * MAX_WH
        }
    };
    let boxes: Vec<[f32; 4]> = sorted
        .iter()
        .map(|d| {
            let o = offset(d);
            [d.x1 + o, d.y1 + o, d.x2 + o, d.y2 + o]
        })
        .collect();
    let areas: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();

    // Groups of boxes that can overlap: one per class when the offsets keep
    // classes apart, else everything together (always correct, just slower).
    let by_class = !options.agnostic && classes_are_disjoint(sorted);
    let mut group_of_class: Vec<usize> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut place = vec![(0usize, 0usize); n]; // (group, position in it)
    for (k, d) in sorted.iter().enumerate() {
        let g = if by_class {
            if group_of_class.len() <= d.class_id {
                group_of_class.resize(d.class_id + 1, usize::MAX);
            }
            if group_of_class[d.class_id] == usize::MAX {
                group_of_class[d.class_id] = groups.len();
                groups.push(Vec::new());
            }
            group_of_class[d.class_id]
        } else {
            if groups.is_empty() {
                groups.push(Vec::new());
            }
            0
        };
        place[k] = (g, groups[g].len());
        groups[g].push(k);
    }

    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        if keep.len() >= options.max_detections {
            break;
        }
        let [ix1, iy1, ix2, iy2] = boxes[i];
        let iarea = areas[i];
        let (g, p) = place[i];
        for &j in &groups[g][p + 1..] {
            if suppressed[j] {
                continue;
            }
            let [jx1, jy1, jx2, jy2] = boxes[j];
            let w = (ix2.min(jx2) - ix1.max(jx1)).max(0.0);
            let h = (iy2.min(jy2) - iy1.max(jy1)).max(0.0);
            let inter = w * h;
            let iou = inter / (iarea + areas[j] - inter);
            if iou > options.iou {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Whether offsetting by `class * MAX_WH` separates every pair of classes
/// (their offset x or y ranges cannot overlap, rounding included).
fn classes_are_disjoint(boxes: &[Detection]) -> bool {
    let span = |lo: fn(&Detection) -> f32, hi: fn(&Detection) -> f32| {
        let (mut min, mut max, mut big) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for d in boxes {
            let (a, b) = (f64::from(lo(d)), f64::from(hi(d)));
            min = min.min(a).min(b);
            max = max.max(a).max(b);
            big = big.max(a.abs()).max(b.abs());
        }
        (max - min, big)
    };
    let top_class = boxes.iter().map(|d| d.class_id).max().unwrap_or(0) as f64;
    let fits = |(span, big): (f64, f64)| {
        // Each offset coordinate is rounded once to f32 (relative error
        // 2^-24): leave room for that on both ends, plus a pixel.
        let rounding = (top_class * f64::from(MAX_WH) + big) / 16_777_216.0;
        span.is_finite() && span + 2.0 * rounding + 1.0 < f64::from(MAX_WH)
    };
    fits(span(|d| d.x1, |d| d.x2)) || fits(span(|d| d.y1, |d| d.y2))
}

/// Map detections from input (letterboxed) pixels back to the source image
/// and clip them to it, like Ultralytics' `scale_boxes` + `clip_boxes`.
pub fn to_source(detections: &mut [Detection], transform: &LetterboxTransform) {
    let (w, h) = (
        transform.source_width as f32,
        transform.source_height as f32,
    );
    for d in detections {
        let (x1, y1) = transform.to_source(d.x1, d.y1);
        let (x2, y2) = transform.to_source(d.x2, d.y2);
        d.x1 = x1.clamp(0.0, w);
        d.y1 = y1.clamp(0.0, h);
        d.x2 = x2.clamp(0.0, w);
        d.y2 = y2.clamp(0.0, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::letterbox::Letterbox;

    /// [4 + nc, anchors] from (cx, cy, w, h, class scores) rows per anchor.
    fn raw(anchors: &[([f32; 4], Vec<f32>)]) -> Vec<f32> {
        let nc = anchors[0].1.len();
        let n = anchors.len();
        let mut out = vec![0.0; (4 + nc) * n];
        for (a, (b, s)) in anchors.iter().enumerate() {
            for r in 0..4 {
                out[r * n + a] = b[r];
            }
            for (c, &v) in s.iter().enumerate() {
                out[(4 + c) * n + a] = v;
            }
        }
        out
    }

    #[test]
    fn suppresses_overlaps_within_a_class_only() {
        let out = raw(&[
            ([50.0, 50.0, 20.0, 20.0], vec![0.9, 0.1]),
            ([52.0, 50.0, 20.0, 20.0], vec![0.8, 0.1]), // IoU 0.82 with the first
            ([51.0, 50.0, 20.0, 20.0], vec![0.1, 0.7]), // other class
            ([200.0, 50.0, 20.0, 20.0], vec![0.25, 0.0]), // not above 0.25
            ([300.0, 50.0, 20.0, 20.0], vec![0.3, 0.3]), // tie: class 0
        ]);
        let dets = postprocess(&out, 2, &DetectOptions::default());
        let got: Vec<(usize, f32)> = dets.iter().map(|d| (d.class_id, d.score)).collect();
        assert_eq!(got, vec![(0, 0.9), (1, 0.7), (0, 0.3)]);
        assert_eq!(
            (dets[0].x1, dets[0].y1, dets[0].x2, dets[0].y2),
            (40.0, 40.0, 60.0, 60.0)
        );

        let agnostic = DetectOptions {
            agnostic: true,
            ..Default::default()
        };
        let got: Vec<f32> = postprocess(&out, 2, &agnostic)
            .iter()
            .map(|d| d.score)
            .collect();
        assert_eq!(got, vec![0.9, 0.3]);

        let only1 = DetectOptions {
            classes: Some(vec![1, 99]),
            ..Default::default()
        };
        let got: Vec<f32> = postprocess(&out, 2, &only1)
            .iter()
            .map(|d| d.score)
            .collect();
        assert_eq!(got, vec![0.7]);

        let one = DetectOptions {
            max_detections: 1,
            ..Default::default()
        };
        assert_eq!(postprocess(&out, 2, &one).len(), 1);
        let none = DetectOptions {
            max_detections: 0,
            ..Default::default()
        };
        assert!(postprocess(&out, 2, &none).is_empty());
    }

    #[test]
    fn iou_threshold_is_strict() {
        // Two 10x10 boxes sharing half their area: IoU = 50 / 150 = 1/3.
        let out = raw(&[
            ([5.0, 5.0, 10.0, 10.0], vec![0.9]),
            ([10.0, 5.0, 10.0, 10.0], vec![0.8]),
        ]);
        let at = |iou| {
            postprocess(
                &out,
                1,
                &DetectOptions {
                    iou,
                    ..Default::default()
                },
            )
            .len()
        };
        assert_eq!(at(1.0 / 3.0), 2);
        assert_eq!(at(0.33), 1);
    }

    #[test]
    fn empty_outputs() {
        assert!(postprocess(&[], 80, &DetectOptions::default()).is_empty());
        let out = raw(&[([5.0, 5.0, 10.0, 10.0], vec![f32::NAN, 0.9])]);
        assert!(postprocess(&out, 2, &DetectOptions::default()).is_empty());
    }

    #[test]
    fn to_source_undoes_the_letterbox_and_clips() {
        let t = Letterbox::new(640).transform(1920, 1080);
        let mut dets = vec![Detection {
            class_id: 0,
            score: 0.5,
            x1: 10.0,
            y1: 100.0,
            x2: 650.0,
            y2: 240.0,
        }];
        to_source(&mut dets, &t);
        let d = &dets[0];
        assert_eq!((d.x1, d.y1, d.x2, d.y2), (30.0, 0.0, 1920.0, 300.0));
    }
}
