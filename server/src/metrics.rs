//! Prometheus metrics, named as DESIGN.md gives them.

use std::sync::Mutex;

use candle_core::Device;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Request and stage latencies: from 1 ms to about 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const DETECTION_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0];
const LOAD_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub preprocess_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub images_total: IntCounterVec,
    pub model_info: GaugeVec,
    pub model_load_duration: HistogramVec,
    pub detections_per_image: HistogramVec,
    pub batch_failures: IntCounterVec,
    pub device_memory_used: IntGaugeVec,
    pub device_memory_total: IntGaugeVec,
    /// The accelerators whose memory is read at each scrape.
    devices: Mutex<Vec<Device>>,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            requests_total: IntCounterVec::new(
                Opts::new(
                    "fovea_requests_total",
                    "Requests answered, by model, route and status.",
                ),
                &["model", "route", "status"],
            )
            .expect("valid counter"),
            request_duration: histogram(
                "fovea_request_duration_seconds",
                "Time from receiving a request to answering it.",
                &["model", "route"],
                LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "fovea_queue_duration_seconds",
                "Time an image waited in the batcher's queue.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            preprocess_duration: histogram(
                "fovea_preprocess_duration_seconds",
                "Time to decode and preprocess one image.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inference_duration: histogram(
                "fovea_inference_duration_seconds",
                "Time of one batched forward pass.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "fovea_batch_size",
                "Images per forward pass.",
                &["model"],
                BATCH_BUCKETS,
            ),
            queue_depth: IntGaugeVec::new(
                Opts::new("fovea_queue_depth", "Images admitted and not yet computed."),
                &["model"],
            )
            .expect("valid gauge"),
            images_total: IntCounterVec::new(
                Opts::new(
                    "fovea_images_total",
                    "Images computed; its rate is the FPS.",
                ),
                &["model"],
            )
            .expect("valid counter"),
            model_info: GaugeVec::new(
                Opts::new("fovea_model_info", "Loaded models (always 1)."),
                &["model", "family", "variant", "device", "dtype"],
            )
            .expect("valid gauge"),
            model_load_duration: histogram(
                "fovea_model_load_duration_seconds",
                "Time to load and warm up a model.",
                &["model"],
                LOAD_BUCKETS,
            ),
            detections_per_image: histogram(
                "fovea_detections_per_image",
                "Objects found in one image by a detector.",
                &["model"],
                DETECTION_BUCKETS,
            ),
            batch_failures: IntCounterVec::new(
                Opts::new(
                    "fovea_batch_failures_total",
                    "Forward passes that failed, by reason (out_of_memory, error).",
                ),
                &["model", "reason"],
            )
            .expect("valid counter"),
            device_memory_used: IntGaugeVec::new(
                Opts::new(
                    "fovea_device_memory_used_bytes",
                    "Accelerator memory in use (by every process), read at each scrape.",
                ),
                &["device"],
            )
            .expect("valid gauge"),
            device_memory_total: IntGaugeVec::new(
                Opts::new(
                    "fovea_device_memory_total_bytes",
                    "Accelerator memory in all.",
                ),
                &["device"],
            )
            .expect("valid gauge"),
            devices: Mutex::new(Vec::new()),
        };
        for c in m.collectors() {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests_total.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.queue_duration.clone()),
            Box::new(self.preprocess_duration.clone()),
            Box::new(self.inference_duration.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.images_total.clone()),
            Box::new(self.model_info.clone()),
            Box::new(self.model_load_duration.clone()),
            Box::new(self.detections_per_image.clone()),
            Box::new(self.batch_failures.clone()),
            Box::new(self.device_memory_used.clone()),
            Box::new(self.device_memory_total.clone()),
        ]
    }

    /// Reports `device`'s memory from now on, if it is an accelerator whose
    /// memory can be read (CUDA).
    pub fn watch_device(&self, device: &Device) {
        if crate::registry::device_memory(device).is_none() {
            return;
        }
        let label = crate::registry::device_label(device);
        let mut devices = self.devices.lock().expect("devices lock");
        if !devices
            .iter()
            .any(|d| crate::registry::device_label(d) == label)
        {
            devices.push(device.clone());
        }
    }

    fn read_device_memory(&self) {
        for device in self.devices.lock().expect("devices lock").iter() {
            if let Some(memory) = crate::registry::device_memory(device) {
                let label = crate::registry::device_label(device);
                let used = memory.total.saturating_sub(memory.free);
                self.device_memory_used
                    .with_label_values(&[&label])
                    .set(used as i64);
                self.device_memory_total
                    .with_label_values(&[&label])
                    .set(memory.total as i64);
            }
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.read_device_memory();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_once_touched() {
        let m = Metrics::new();
        m.requests_total
            .with_label_values(&["a", "/v1/classify", "200"])
            .inc();
        m.images_total.with_label_values(&["a"]).inc_by(3);
        m.batch_size.with_label_values(&["a"]).observe(3.0);
        let text = m.render();
        assert!(
            text.contains(r#"fovea_requests_total{model="a",route="/v1/classify",status="200"} 1"#)
        );
        assert!(text.contains(r#"fovea_images_total{model="a"} 3"#));
        assert!(text.contains(r#"fovea_batch_size_bucket{model="a",le="4"} 1"#));
    }
}
