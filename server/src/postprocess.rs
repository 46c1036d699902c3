//! Turning raw detector outputs into answers, shared by the HTTP API and
//! `fovea detect`: the class filter, NMS and the mapping back to the
//! original image, and the JSON form of a detection.

use fovea_model_core::detection::{self, DetectOptions, Detection};
use fovea_model_core::letterbox::LetterboxTransform;
use serde_json::{json, Value};

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

/// Detections of one image, in its own pixels.
pub fn detect(
    raw: &[f32],
    num_classes: usize,
    transform: &LetterboxTransform,
    options: &DetectOptions,
) -> Vec<Detection> {
    let mut found = detection::postprocess(raw, num_classes, options);
    detection::to_source(&mut found, transform);
    found
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
