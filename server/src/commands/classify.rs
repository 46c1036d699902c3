//! `fovea classify IMAGE...`: classification without a server.

use anyhow::Context;
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use fovea_model_core::topk::softmax_topk;
use serde_json::json;

use crate::cli::{ClassifyArgs, DEFAULT_MODEL};
use crate::network::Task;

pub fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let model = super::load(
        &args.model,
        DEFAULT_MODEL,
        Some(Task::Classification),
        &Default::default(),
    )?;
    let runner = model.runner();
    let mut inputs = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let decoded = decode_image(&bytes, &DecodeLimits::default())
            .with_context(|| format!("decoding {}", path.display()))?;
        inputs.push(model.pipeline.apply(&decoded.image)?.input);
    }
    let logits = runner.forward(&inputs)?;
    let top_k = args.top_k.clamp(1, model.labels.len());
    let results: Vec<Vec<(usize, f32)>> = logits.iter().map(|l| softmax_topk(l, top_k)).collect();

    if args.json {
        let results: Vec<_> = results
            .iter()
            .zip(&args.images)
            .map(|(preds, path)| {
                let predictions: Vec<_> = preds
                    .iter()
                    .map(|&(id, score)| json!({"class_id": id, "label": model.labels[id], "score": score}))
                    .collect();
                json!({"image": path, "predictions": predictions})
            })
            .collect();
        let out = json!({"model": args.model.model.as_deref().unwrap_or(DEFAULT_MODEL), "results": results});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (preds, path) in results.iter().zip(&args.images) {
        println!("{}", path.display());
        println!("  {:>4}  {:>8}  {:<6}  label", "rank", "score", "class");
        for (rank, &(id, score)) in preds.iter().enumerate() {
            println!(
                "  {:>4}  {:>8.4}  {:<6}  {}",
                rank + 1,
                score,
                id,
                model.labels[id]
            );
        }
    }
    Ok(())
}
