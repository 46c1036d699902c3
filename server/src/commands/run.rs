//! `fovea run`: preprocessed tensors in, raw model outputs out. This is how
//! conformance with the PyTorch references is checked from outside.
//!
//! Input: `pixel_values` `[B, 3, H, W]` (and, for DETR, an optional
//! `pixel_mask` `[B, H, W]`). Output: the model's raw outputs by name
//! (`logits`; YOLO `output`; DETR `logits` and `pred_boxes`).

use std::collections::HashMap;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let default = crate::cli::DEFAULT_MODEL;
    let model = super::load(&args.model, default, None, &Default::default())?;
    let inputs = candle_core::safetensors::load(&args.input, &Device::Cpu)
        .with_context(|| format!("reading {}", args.input.display()))?;
    let Some(pixel_values) = inputs.get("pixel_values") else {
        bail!("{} has no `pixel_values` tensor", args.input.display());
    };
    if pixel_values.rank() != 4 || pixel_values.dim(1)? != 3 {
        bail!(
            "pixel_values must be [B,3,H,W], got {:?}",
            pixel_values.dims()
        );
    }
    let x = pixel_values
        .to_dtype(model.dtype)?
        .to_device(&model.device)?;
    let outputs = model.network.run(&x, inputs.get("pixel_mask"))?;
    let mut named = HashMap::new();
    for (name, output) in model.network.output_names().iter().zip(outputs) {
        let output = output.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        eprintln!(
            "wrote {name} {:?} to {}",
            output.dims(),
            args.output.display()
        );
        named.insert(name.to_string(), output);
    }
    candle_core::safetensors::save(&named, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}
