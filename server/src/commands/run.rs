//! `fovea run`: preprocessed tensors in, raw model outputs out. This is how
//! conformance with the PyTorch references is checked from outside.

use std::collections::HashMap;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let model = super::load(&args.model)?;
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
    let logits = model
        .classifier
        .forward(&x)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let outputs = HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&outputs, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote logits {:?} to {}",
        outputs["logits"].dims(),
        args.output.display()
    );
    Ok(())
}
