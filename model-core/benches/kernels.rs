//! Micro-benchmarks of the CPU convolution kernels on the layer shapes that
//! dominate the families' profiles (`fovea bench --profile`), beside candle's
//! own `conv2d` on the same input, and of Fovea's gemm beside the `gemm`
//! crate (candle's matmul engine): GFLOP/s, higher is better. Last, the
//! CPU work in front of every forward pass: decoding and preprocessing one
//! photo (`-- preprocess`).
//!
//! `cargo bench -p fovea-model-core --bench kernels [-- FILTER]`
//! (`RAYON_NUM_THREADS` sets the threads; prints figures, asserts nothing.)

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use fovea_model_core::layers::{Activation, Conv2d, ConvSpec, Placement};
use fovea_model_core::letterbox::Letterbox;
use fovea_model_core::preprocess::Preprocess;
use fovea_model_core::sgemm::{self, Lhs, PackedLhs, PackedRhs, Rhs};
use fovea_model_core::{cpu_conv, cpu_transformer, winograd};

/// (name, batch, in, out, kernel, stride, groups, size, activation)
// The allocator `fovea` runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Case = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    Activation,
);

const CASES: &[Case] = &[
    // Batch 1: one image's gemm split across the threads.
    (
        "b1 r50 1x1 512->2048 7px",
        1,
        512,
        2048,
        1,
        1,
        1,
        7,
        Activation::Relu,
    ),
    (
        "b1 r50 1x1 256->1024 14px",
        1,
        256,
        1024,
        1,
        1,
        1,
        14,
        Activation::Relu,
    ),
    (
        "b1 r50 1x1 1024->256 14px",
        1,
        1024,
        256,
        1,
        1,
        1,
        14,
        Activation::Relu,
    ),
    (
        "b1 eff 1x1 24->144 56px",
        1,
        24,
        144,
        1,
        1,
        1,
        56,
        Activation::Silu,
    ),
    ("resnet 3x3 64", 8, 64, 64, 3, 1, 1, 56, Activation::Relu),
    ("resnet 3x3 256", 8, 256, 256, 3, 1, 1, 14, Activation::Relu),
    (
        "resnet 1x1 64->256",
        8,
        64,
        256,
        1,
        1,
        1,
        56,
        Activation::Relu,
    ),
    (
        "resnet 1x1 1024->256",
        8,
        1024,
        256,
        1,
        1,
        1,
        14,
        Activation::Relu,
    ),
    (
        "resnet stem 7x7/2",
        8,
        3,
        64,
        7,
        2,
        1,
        224,
        Activation::Relu,
    ),
    (
        "yolo 3x3/2 16->32",
        1,
        16,
        32,
        3,
        2,
        1,
        320,
        Activation::Silu,
    ),
    ("yolo 3x3 16->16", 1, 16, 16, 3, 1, 1, 160, Activation::Silu),
    ("yolo 3x3 32->32", 1, 32, 32, 3, 1, 1, 80, Activation::Silu),
    ("yolo 3x3 64->64", 8, 64, 64, 3, 1, 1, 40, Activation::Silu),
    ("yolo 1x1 32->32", 1, 32, 32, 1, 1, 1, 160, Activation::Silu),
    (
        "effnet 1x1 16->96",
        8,
        16,
        96,
        1,
        1,
        1,
        112,
        Activation::Silu,
    ),
    (
        "effnet 1x1 16->96 no act",
        8,
        16,
        96,
        1,
        1,
        1,
        112,
        Activation::None,
    ),
    (
        "effnet dw 3x3/2 96",
        8,
        96,
        96,
        3,
        2,
        96,
        112,
        Activation::Silu,
    ),
    (
        "effnet dw 5x5 672",
        8,
        672,
        672,
        5,
        1,
        672,
        14,
        Activation::Silu,
    ),
    (
        "effnet dw 5x5 1152",
        8,
        1152,
        1152,
        5,
        1,
        1152,
        7,
        Activation::Silu,
    ),
];

/// (name, m, n, k, weights on the left) of `[m, k] x [k, n]`: the weights
/// side is packed, as at load time.
const GEMMS: &[(&str, usize, usize, usize, bool)] = &[
    // ViT-B/16 at batch 8 (1576 tokens): activations x packed weights.
    ("gemm vit fc1 b8", 1576, 3072, 768, false),
    ("gemm vit fc2 b8", 1576, 768, 3072, false),
    ("gemm vit qkv b1", 197, 2304, 768, false),
    // ResNet-50 convolutions as packed weights x a column tile.
    ("gemm r50 3x3 256 14px", 256, 196, 2304, true),
    ("gemm r50 1x1 1024>256", 256, 784, 1024, true),
    ("gemm r50 1x1 256>1024 14px", 1024, 196, 256, true),
    ("gemm yolo 3x3 32 tile", 32, 512, 288, true),
];

/// (name, rows, in, out, activation, residual) of transformer linear
/// layers: `cpu_transformer::linear` (bias, residual and activation applied
/// per tile inside the gemm) beside the bare gemm on the same operands, so
/// the second column pair is the epilogue's floor. The weights are read
/// from memory, as in a whole model (see `linear_cases`).
const LINEARS: &[(&str, usize, usize, usize, Activation, bool)] = &[
    (
        "linear vit fc1 gelu b1",
        197,
        768,
        3072,
        Activation::Gelu,
        false,
    ),
    (
        "linear vit fc2 +res b1",
        197,
        3072,
        768,
        Activation::None,
        true,
    ),
    (
        "linear vit fc1 gelu b8",
        1576,
        768,
        3072,
        Activation::Gelu,
        false,
    ),
];

/// (name, batch, in, out, size) of 3x3 stride-1 layers: Winograd F(4x4,
/// 3x3) beside the direct kernel on the same input (GFLOP/s counted as the
/// direct convolution's multiply-adds).
const WINOGRAD: &[(&str, usize, usize, usize, usize)] = &[
    ("wino yolo 64 80px b1", 1, 64, 64, 80),
    ("wino yolo 128 40px b1", 1, 128, 128, 40),
    ("wino yolo 256 20px b1", 1, 256, 256, 20),
    ("wino yolo 256 20px b8", 8, 256, 256, 20),
    ("wino r50 64 56px b1", 1, 64, 64, 56),
    ("wino r50 128 28px b1", 1, 128, 128, 28),
    ("wino r50 256 14px b1", 1, 256, 256, 14),
    ("wino r50 256 14px b8", 8, 256, 256, 14),
    ("wino r50 512 7px b1", 1, 512, 512, 7),
    ("wino r50 512 7px b8", 8, 512, 512, 7),
];

fn winograd_cases(filter: Option<&String>) {
    for &(name, b, c, o, size) in WINOGRAD {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let (x, w, bias) = (
            values(b * c * size * size, 0),
            values(o * c * 9, 1),
            values(o, 2),
        );
        let g = cpu_conv::ConvGeometry::padded(b, c, (size, size), o, 3, 1, 1);
        let epilogue = cpu_conv::Epilogue {
            bias: &bias,
            residual: None,
            act: Activation::Silu,
        };
        let packed = PackedLhs::new(&w, o, c * 9);
        let transformed = winograd::WinogradWeights::new(&w, o, c);
        let ours = time(&|| {
            winograd::conv(&[&x], &g, &transformed, &epilogue);
        });
        let direct = time(&|| {
            cpu_conv::dense(&[&x], &g, &packed, &epilogue);
        });
        print_pair(
            name,
            2.0 * (b * o * size * size * c * 9) as f64,
            ours,
            direct,
        );
    }
}

fn gemm_cases(filter: Option<&String>) {
    let threads = rayon::current_num_threads();
    let values = |len: usize| {
        (0..len)
            .map(|i| (i % 17) as f32 / 17.0 - 0.5)
            .collect::<Vec<_>>()
    };
    for &(name, m, n, k, weights_left) in GEMMS {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let (a, b) = (values(m * k), values(k * n));
        let (pa, pb) = if weights_left {
            (Some(PackedLhs::new(&a, m, k)), None)
        } else {
            let bt: Vec<f32> = (0..n * k).map(|i| b[i % k * n + i / k]).collect();
            (None, Some(PackedRhs::from_transposed(&bt, k, n)))
        };
        let mut c = vec![0f32; m * n];
        let cp = c.as_mut_ptr() as usize;
        let ours = time(&|| {
            let lhs = pa.as_ref().map_or(
                Lhs::Rows {
                    data: &a,
                    stride: k,
                },
                Lhs::Packed,
            );
            let rhs = pb.as_ref().map_or(
                Rhs::Rows {
                    data: &b,
                    stride: n,
                },
                Rhs::Packed,
            );
            // SAFETY: c is m x n and only this call touches it.
            unsafe { sgemm::matmul(cp as *mut f32, n, lhs, rhs, (m, n, k), false, None, true) }
        });
        let crate_gemm = time(&|| {
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: as above; row-major operands.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    cp as *mut f32,
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            }
        });
        print_pair(name, 2.0 * (m * n * k) as f64, ours, crate_gemm);
    }
}

/// (name, batch, in, out, size, kernel, stride) of layers whose weights
/// outweigh their input: each timed with its weights coming from memory
/// (twelve copies used in turn, as in a model) beside the same layer with
/// one copy left in the cache.
const WEIGHT_STREAMS: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
    ("cold r50 1x1 512>2048 7px", 1, 512, 2048, 7, 1, 1),
    ("cold r50 1x1 2048>512 7px", 1, 2048, 512, 7, 1, 1),
    ("cold r50 1x1 256>1024 14px", 1, 256, 1024, 14, 1, 1),
    ("cold r50 3x3 512 7px", 1, 512, 512, 7, 3, 1),
    ("cold r50 3x3/2 512 14px", 1, 512, 512, 14, 3, 2),
];

fn weight_stream_cases(filter: Option<&String>) {
    for &(name, b, c, o, size, k, stride) in WEIGHT_STREAMS {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let (x, w, bias) = (
            values(b * c * size * size, 0),
            values(o * c * k * k, 1),
            values(o, 2),
        );
        let g = cpu_conv::ConvGeometry::padded(b, c, (size, size), o, k, stride, k / 2);
        let epilogue = cpu_conv::Epilogue {
            bias: &bias,
            residual: None,
            act: Activation::Relu,
        };
        let copies: Vec<PackedLhs> = (0..12).map(|_| PackedLhs::new(&w, o, c * k * k)).collect();
        let w = in_turn(&copies);
        let cold = time(&|| {
            cpu_conv::dense(&[&x], &g, w(), &epilogue);
        });
        let warm = time(&|| {
            cpu_conv::dense(&[&x], &g, &copies[0], &epilogue);
        });
        let pixels = g.out_height * g.out_width;
        print_pair(name, 2.0 * (b * o * pixels * c * k * k) as f64, cold, warm);
    }
}

fn linear_cases(filter: Option<&String>) {
    for &(name, rows, k, n, act, with_residual) in LINEARS {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let (x, wt, bias, residual) = (
            values(rows * k, 0),
            values(n * k, 1),
            values(n, 2),
            values(rows * n, 3),
        );
        // Twelve copies, as ViT-B/16's twelve blocks.
        let copies: Vec<PackedRhs> = (0..12)
            .map(|_| PackedRhs::from_transposed(&wt, k, n))
            .collect();
        let w = in_turn(&copies);
        let residual = with_residual.then_some(&residual[..]);
        let ours = time(&|| {
            cpu_transformer::linear(&x, w(), &bias, residual, act);
        });
        let mut c = vec![0f32; rows * n];
        let cp = c.as_mut_ptr() as usize;
        let bare = time(&|| {
            let lhs = Lhs::Rows {
                data: &x,
                stride: k,
            };
            // SAFETY: c is rows x n and only this call touches it.
            unsafe {
                sgemm::matmul(
                    cp as *mut f32,
                    n,
                    lhs,
                    Rhs::Packed(w()),
                    (rows, n, k),
                    false,
                    None,
                    true,
                )
            }
        });
        print_pair(name, 2.0 * (rows * n * k) as f64, ours, bare);
    }
}

/// One request's CPU work on a 600x400 JPEG (the photo `compare.py --http`
/// sends): decoding it, then the classifiers' resize and crop to 224 or the
/// detectors' letterbox to 640, each with the normalisation to f32. On a
/// GPU this is what stays on the CPU, one thread per image.
fn preprocess_cases(filter: Option<&String>) {
    if filter.is_some_and(|f| !"preprocess".contains(f.as_str())) {
        return;
    }
    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/images/coffee.png");
    let photo = image::open(photo)
        .expect("tests/images/coffee.png")
        .to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&photo)
        .expect("JPEG encoding");
    let limits = DecodeLimits::default();
    let decoded = decode_image(&jpeg, &limits).expect("decodable").image;
    let (classify, letterbox) = (Preprocess::torchvision_imagenet(), Letterbox::new(640));
    let steps: [(&str, &dyn Fn()); 3] = [
        ("decode 600x400 JPEG", &|| {
            decode_image(&jpeg, &limits).unwrap();
        }),
        ("resize+crop 224", &|| {
            classify.apply(&decoded).unwrap();
        }),
        ("letterbox 640", &|| {
            letterbox.apply(&decoded);
        }),
    ];
    for (name, step) in steps {
        println!("{name:24} {:10.2}", time(step).as_secs_f64() * 1e3);
    }
}

/// `len` deterministic values in [-0.5, 0.5).
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5)
        .collect()
}

/// Each call returns the next of `copies`, round and round: as in a model
/// of that many layers, each call's weights come from memory, not from the
/// cache the last call left.
fn in_turn<'a, T>(copies: &'a [T]) -> impl Fn() -> &'a T {
    let next = std::sync::atomic::AtomicUsize::new(0);
    move || &copies[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % copies.len()]
}

/// One row: ms and GFLOP/s of Fovea's kernel, then of the other.
fn print_pair(name: &str, flops: f64, ours: Duration, other: Duration) {
    let gf = |t: Duration| flops / t.as_secs_f64() / 1e9;
    let ms = |t: Duration| t.as_secs_f64() * 1e3;
    println!(
        "{name:24} {:10.2} {:10.1} {:10.2} {:10.1}",
        ms(ours),
        gf(ours),
        ms(other),
        gf(other)
    );
}

fn time(f: &dyn Fn()) -> Duration {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || start.elapsed() < Duration::from_millis(700) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn main() -> candle_core::Result<()> {
    // As `fovea` runs candle: its elementwise pool off (see the README).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dev = Device::Cpu;
    let placement = Placement::new(&dev, DType::F32);
    println!(
        "{:24} {:>10} {:>10} {:>10} {:>10}",
        "layer", "Fovea ms", "GFLOP/s", "candle ms", "GFLOP/s"
    );
    for &(name, b, ci, co, k, s, g, size, act) in CASES {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let x = Tensor::randn(0f32, 1., (b, ci, size, size), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (co, ci / g, k, k), &dev)?;
        let bias = Tensor::randn(0f32, 0.1, co, &dev)?;
        let spec = ConvSpec {
            groups: g,
            ..ConvSpec::new(ci, co, k, s)
        };
        let conv = Conv2d::from_folded(&w, &bias, spec, act, &placement)?;
        let out = conv.forward(&x)?;
        let (_, _, ho, wo) = out.dims4()?;
        let flops = 2.0 * (b * co * ho * wo * (ci / g) * k * k) as f64;
        let fovea = time(&|| {
            conv.forward(&x).unwrap();
        });
        let gf = |t: Duration| flops / t.as_secs_f64() / 1e9;
        let ms = |t: Duration| t.as_secs_f64() * 1e3;
        print!("{name:24} {:10.2} {:10.1}", ms(fovea), gf(fovea));
        // candle runs a grouped convolution as one convolution per group:
        // minutes for these shapes, so only dense layers are compared.
        if g == 1 {
            let b4 = bias.reshape((1, co, 1, 1))?;
            let candle = time(&|| {
                let y = x.conv2d(&w, k / 2, s, 1, g).unwrap();
                act.apply(&y.broadcast_add(&b4).unwrap()).unwrap();
            });
            print!(" {:10.2} {:10.1}", ms(candle), gf(candle));
        }
        println!();
    }
    println!(
        "\n{:24} {:>10} {:>10} {:>10} {:>10}",
        "matmul", "Fovea ms", "GFLOP/s", "gemm ms", "GFLOP/s"
    );
    gemm_cases(filter.as_ref());
    println!(
        "\n{:24} {:>10} {:>10} {:>10} {:>10}",
        "linear", "Fovea ms", "GFLOP/s", "bare ms", "GFLOP/s"
    );
    linear_cases(filter.as_ref());
    println!(
        "\n{:24} {:>10} {:>10} {:>10} {:>10}",
        "weights from memory", "Fovea ms", "GFLOP/s", "cached ms", "GFLOP/s"
    );
    weight_stream_cases(filter.as_ref());
    println!(
        "\n{:24} {:>10} {:>10} {:>10} {:>10}",
        "3x3/1", "Winograd", "GFLOP/s", "direct ms", "GFLOP/s"
    );
    winograd_cases(filter.as_ref());
    println!("\n{:24} {:>10}", "preprocess", "ms");
    preprocess_cases(filter.as_ref());
    Ok(())
}
