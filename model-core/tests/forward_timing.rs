//! Forward-pass timing of full-size ResNet-50 and EfficientNet-B0 with
//! random weights (the numbers do not depend on the weights). Ignored by
//! default; run it in release with the settings from cpu-performance.md:
//!
//! ```text
//! CANDLE_NUM_THREADS=1 cargo test -p fovea-model-core --release \
//!     --test forward_timing -- --ignored --nocapture
//! ```

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use fovea_model_core::classifier::Classifier;

/// Random checkpoint tensors by name, built up layer by layer.
#[derive(Default)]
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn add(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        // Fan-in scaled so activations stay O(1) through the depth.
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let std = (1.0 / fan_in as f64).sqrt();
        let t = Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?;
        self.0.insert(name.to_string(), t);
        Ok(())
    }

    fn conv(&mut self, name: &str, shape: [usize; 4]) -> Result<()> {
        self.add(&format!("{name}.weight"), &shape)
    }

    fn bn(&mut self, name: &str, c: usize) -> Result<()> {
        let cpu = Device::Cpu;
        self.0
            .insert(format!("{name}.weight"), Tensor::ones(c, DType::F32, &cpu)?);
        self.0
            .insert(format!("{name}.bias"), Tensor::zeros(c, DType::F32, &cpu)?);
        self.0.insert(
            format!("{name}.running_mean"),
            Tensor::zeros(c, DType::F32, &cpu)?,
        );
        self.0.insert(
            format!("{name}.running_var"),
            Tensor::ones(c, DType::F32, &cpu)?,
        );
        Ok(())
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<()> {
        self.add(&format!("{name}.weight"), &[out, inp])?;
        self.add(&format!("{name}.bias"), &[out])
    }
}

/// torchvision resnet50's keys and shapes.
fn resnet50() -> Result<HashMap<String, Tensor>> {
    let mut w = Weights::default();
    w.conv("conv1", [64, 3, 7, 7])?;
    w.bn("bn1", 64)?;
    let mut inp = 64;
    for (s, (blocks, planes)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
        .into_iter()
        .enumerate()
    {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", s + 1);
            w.conv(&format!("{p}.conv1"), [planes, inp, 1, 1])?;
            w.bn(&format!("{p}.bn1"), planes)?;
            w.conv(&format!("{p}.conv2"), [planes, planes, 3, 3])?;
            w.bn(&format!("{p}.bn2"), planes)?;
            w.conv(&format!("{p}.conv3"), [planes * 4, planes, 1, 1])?;
            w.bn(&format!("{p}.bn3"), planes * 4)?;
            if b == 0 {
                w.conv(&format!("{p}.downsample.0"), [planes * 4, inp, 1, 1])?;
                w.bn(&format!("{p}.downsample.1"), planes * 4)?;
            }
            inp = planes * 4;
        }
    }
    w.linear("fc", 1000, 2048)?;
    Ok(w.0)
}

/// timm efficientnet_b0's keys and shapes.
fn efficientnet_b0() -> Result<HashMap<String, Tensor>> {
    let mut w = Weights::default();
    w.conv("conv_stem", [32, 3, 3, 3])?;
    w.bn("bn1", 32)?;
    // (kernel, expansion, output width, blocks) per stage.
    let stages = [
        (3, 1, 16, 1),
        (3, 6, 24, 2),
        (5, 6, 40, 2),
        (3, 6, 80, 3),
        (5, 6, 112, 3),
        (5, 6, 192, 4),
        (3, 6, 320, 1),
    ];
    let mut inp = 32;
    for (s, (k, e, out, blocks)) in stages.into_iter().enumerate() {
        for b in 0..blocks {
            let p = format!("blocks.{s}.{b}");
            let mid = inp * e;
            let rd = (inp / 4).max(1);
            if e == 1 {
                w.conv(&format!("{p}.conv_dw"), [mid, 1, k, k])?;
                w.bn(&format!("{p}.bn1"), mid)?;
                w.conv(&format!("{p}.conv_pw"), [out, mid, 1, 1])?;
                w.bn(&format!("{p}.bn2"), out)?;
            } else {
                w.conv(&format!("{p}.conv_pw"), [mid, inp, 1, 1])?;
                w.bn(&format!("{p}.bn1"), mid)?;
                w.conv(&format!("{p}.conv_dw"), [mid, 1, k, k])?;
                w.bn(&format!("{p}.bn2"), mid)?;
                w.conv(&format!("{p}.conv_pwl"), [out, mid, 1, 1])?;
                w.bn(&format!("{p}.bn3"), out)?;
            }
            w.conv(&format!("{p}.se.conv_reduce"), [rd, mid, 1, 1])?;
            w.add(&format!("{p}.se.conv_reduce.bias"), &[rd])?;
            w.conv(&format!("{p}.se.conv_expand"), [mid, rd, 1, 1])?;
            w.add(&format!("{p}.se.conv_expand.bias"), &[mid])?;
            inp = out;
        }
    }
    w.conv("conv_head", [1280, 320, 1, 1])?;
    w.bn("bn2", 1280)?;
    w.linear("classifier", 1000, 1280)?;
    Ok(w.0)
}

/// Median forward time in milliseconds over `runs`, after one warm-up.
fn time_forward(model: &Classifier, batch: usize, runs: usize) -> Result<f64> {
    let x = Tensor::randn(0f32, 1., (batch, 3, 224, 224), &Device::Cpu)?;
    model.forward(&x)?;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            model.forward(&x).map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn forward_timing() -> Result<()> {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "unset".into());
    println!(
        "CANDLE_NUM_THREADS={} RAYON_NUM_THREADS={} GLIBC_TUNABLES={}",
        env("CANDLE_NUM_THREADS"),
        env("RAYON_NUM_THREADS"),
        env("GLIBC_TUNABLES")
    );
    for (arch, weights) in [
        ("resnet50", resnet50()?),
        ("efficientnet_b0", efficientnet_b0()?),
    ] {
        let model = Classifier::load(weights, Some(arch), &Device::Cpu, DType::F32).expect("load");
        for (batch, runs) in [(1, 7), (8, 3)] {
            let ms = time_forward(&model, batch, runs)?;
            println!(
                "{arch:16} batch {batch}: {ms:8.1} ms  {:6.1} img/s",
                batch as f64 * 1e3 / ms
            );
        }
    }
    Ok(())
}
