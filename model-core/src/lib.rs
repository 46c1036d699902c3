//! Fovea's model core: candle implementations of the vision model families,
//! the image preprocessing that feeds them and the postprocessing of their
//! outputs. No I/O beyond the tensors and bytes handed to it.

pub mod activation;
pub mod classifier;
pub mod cpu_conv;
pub mod cpu_transformer;
pub mod detection;
pub mod detr;
pub mod detr_postprocess;
pub mod detr_preprocess;
pub mod efficientnet;
pub mod image_input;
pub mod labels;
pub mod layers;
pub mod letterbox;
pub mod model_error;
pub mod preprocess;
pub mod profile;
pub mod render;
pub mod resnet;
pub mod sgemm;
pub mod team;
pub mod topk;
pub mod vit;
pub mod vmath;
pub mod weight_map;
pub mod winograd;
pub mod yolo;
