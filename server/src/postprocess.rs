//! Turning raw detector outputs into answers, shared by the HTTP API and
//! `fovea detect`: the class filter, NMS (YOLO) or the score threshold
//! (DETR), the mapping back to the original image, and the JSON form of a
//! detection.

use anyhow::Context;
use fovea_model_core::detection::{self, DetectOptions, Detection};
use fovea_model_core::detr_postprocess::{self, DetrPostprocess};
use fovea_model_core::letterbox::LetterboxTransform;
use serde_json::{json, Value};

use crate::network::Decoder;

impl Decoder {
    /// The lowest score kept when a request names none: each family's
    /// reference default (Ultralytics 0.25, transformers' DETR 0.5).
    pub fn default_confidence(self) -> f32 {
        match self {
            Decoder::Yolo { .. } => 0.25,
            Decoder::Detr { .. } => 0.5,
        }
    }
}

/// Class ids from names or ids (`"person"`, `"0"`), each checked against
/// the model's labels.
pub fn class_filter(values: &[String], labels: &[String]) -> Result<Vec<usize>, String> {
    let mut ids = Vec::with_capacity(values.len());
    for value in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        let id = match value.parse::<usize>() {
            Ok(id) if id < labels.len() => id,
            Ok(id) => {
                return Err(format!(
                    "class id {id} is out of range: the model has {} classes",
                    labels.len()
                ))
            }
            Err(_) => labels
                .iter()
                .position(|l| l == value)
                .ok_or_else(|| format!("the model has no class named {value:?}"))?,
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Err("the class filter names no class".into());
    }
    Ok(ids)
}

/// Detections of one `(width, height)` image, in its own pixels, best
/// first. DETR has no NMS: `iou` and `agnostic` do not apply to it.
pub fn detect(
    raw: &[f32],
    decoder: Decoder,
    letterbox: Option<&LetterboxTransform>,
    (width, height): (u32, u32),
    options: &DetectOptions,
) -> anyhow::Result<Vec<Detection>> {
    match decoder {
        Decoder::Yolo { num_classes } => {
            let transform = letterbox.context("a YOLO input is letterboxed")?;
            let mut found = detection::postprocess(raw, num_classes, options);
            detection::to_source(&mut found, transform);
            Ok(found)
        }
        Decoder::Detr { num_queries } => {
            let split = raw
                .len()
                .checked_sub(4 * num_queries)
                .context("DETR output shorter than its boxes")?;
            let (logits, boxes) = raw.split_at(split);
            let settings = DetrPostprocess::from_detect_options(options);
            let mut found =
                detr_postprocess::postprocess(logits, boxes, (height, width), &settings)?;
            // Query order is arbitrary; answer best first as for YOLO.
            found.sort_by(|a, b| b.score.total_cmp(&a.score));
            Ok(found)
        }
    }
}

pub fn detection_json(d: &Detection, labels: &[String]) -> Value {
    json!({
        "class_id": d.class_id,
        "label": labels.get(d.class_id).map(String::as_str).unwrap_or(""),
        "score": d.score,
        "box": {"x1": d.x1, "y1": d.y1, "x2": d.x2, "y2": d.y2},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_by_name_or_id() {
        let labels: Vec<String> = ["person", "bicycle", "car"].map(String::from).to_vec();
        let f = |v: &[&str]| {
            class_filter(
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &labels,
            )
        };
        assert_eq!(f(&["person", "2"]), Ok(vec![0, 2]));
        assert_eq!(f(&["car", "car", " 2 "]), Ok(vec![2]));
        assert!(f(&["3"]).unwrap_err().contains("out of range"));
        assert!(f(&["truck"]).unwrap_err().contains("no class named"));
        assert!(f(&[""]).is_err());
    }
}
