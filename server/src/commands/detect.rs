//! `fovea detect IMAGE...`: object detection without a server.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fovea_model_core::detection::DetectOptions;
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use fovea_model_core::render::{encode_jpeg, render};
use serde_json::json;

use crate::cli::{DetectArgs, DEFAULT_DETECTION_MODEL};
use crate::network::{LoadOverrides, Task};
use crate::postprocess::{class_filter, detect as detect_one, detection_json};

const JPEG_QUALITY: u8 = 90;

pub fn detect(args: DetectArgs) -> anyhow::Result<()> {
    let overrides = LoadOverrides {
        input_size: args.size,
        max_input_size: args.max_size,
        ..Default::default()
    };
    let model = super::load(
        &args.model,
        DEFAULT_DETECTION_MODEL,
        Some(Task::Detection),
        &overrides,
    )?;
    let classes = if args.classes.is_empty() {
        None
    } else {
        Some(class_filter(&args.classes, &model.labels).map_err(anyhow::Error::msg)?)
    };
    let decoder = model
        .network
        .decoder()
        .context("a detector decodes its output")?;
    let options = DetectOptions {
        confidence: args
            .confidence
            .unwrap_or_else(|| decoder.default_confidence()),
        iou: args.iou,
        max_detections: args.max_detections,
        classes,
        agnostic: args.agnostic,
    };
    options.validate().map_err(anyhow::Error::msg)?;

    let runner = model.runner();
    let mut results = Vec::with_capacity(args.images.len());
    for (i, path) in args.images.iter().enumerate() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let decoded = decode_image(&bytes, &DecodeLimits::default())
            .with_context(|| format!("decoding {}", path.display()))?;
        let prepared = model.pipeline.apply(&decoded.image)?;
        // One image per pass: a batch would hold every image in memory.
        let raw = runner.forward(&[prepared.input])?.remove(0);
        let found = detect_one(
            &raw,
            decoder,
            prepared.letterbox.as_ref(),
            decoded.image.dimensions(),
            &options,
        )?;
        if let Some(save) = &args.save {
            let out = save_path(save, i, args.images.len());
            std::fs::write(
                &out,
                encode_jpeg(&render(&decoded.image, &found, &model.labels), JPEG_QUALITY),
            )
            .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        results.push((path, decoded.image.dimensions(), found));
    }

    if args.json {
        let results: Vec<_> = results
            .iter()
            .map(|(path, (w, h), found)| {
                let detections: Vec<_> = found
                    .iter()
                    .map(|d| detection_json(d, &model.labels))
                    .collect();
                json!({"image": path, "width": w, "height": h, "detections": detections})
            })
            .collect();
        let name = args
            .model
            .model
            .as_deref()
            .unwrap_or(DEFAULT_DETECTION_MODEL);
        let out = json!({"model": name, "results": results});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (path, (w, h), found) in &results {
        println!("{} ({w}x{h}): {} objects", path.display(), found.len());
        if found.is_empty() {
            continue;
        }
        println!(
            "  {:>8}  {:<6}  {:<16}  box (x1, y1, x2, y2)",
            "score", "class", "label"
        );
        for d in found {
            println!(
                "  {:>8.4}  {:<6}  {:<16}  {:.1}, {:.1}, {:.1}, {:.1}",
                d.score, d.class_id, model.labels[d.class_id], d.x1, d.y1, d.x2, d.y2
            );
        }
    }
    Ok(())
}

/// `OUT.jpg` for one image; `OUT-1.jpg`, `OUT-2.jpg`, ... for several.
fn save_path(save: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return save.to_path_buf();
    }
    let stem = save.file_stem().unwrap_or_default().to_string_lossy();
    let name = match save.extension() {
        Some(ext) => format!("{stem}-{}.{}", index + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", index + 1),
    };
    save.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_image() {
        let p = Path::new("out/boxes.jpg");
        assert_eq!(save_path(p, 0, 1), PathBuf::from("out/boxes.jpg"));
        assert_eq!(save_path(p, 1, 3), PathBuf::from("out/boxes-2.jpg"));
        assert_eq!(save_path(Path::new("x"), 0, 2), PathBuf::from("x-1"));
    }
}
