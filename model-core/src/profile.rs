//! An opt-in per-layer profile: when enabled, timed layers add their wall
//! time and arithmetic to a table keyed by what they are (kind and shape), so
//! `fovea bench --profile` can show where a forward pass spends its time.
//! Disabled, a timed layer costs one relaxed atomic load. On a GPU, where
//! work is queued and runs later, each timed layer waits for the device
//! before and after it, so that its time is the time it ran.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<String, Entry>>> = Mutex::new(None);
/// The device timed layers wait for: none on the CPU.
static DEVICE: Mutex<Option<Device>> = Mutex::new(None);

/// The accumulated time of one kind of layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    pub calls: u64,
    pub time: Duration,
    /// Floating-point operations (a multiply-add counts two).
    pub flops: u64,
}

/// Starts (or stops) recording; starting clears the table.
pub fn enable(on: bool) {
    set(on, None);
}

/// Starts recording layers that run on `device`.
pub fn enable_on(device: &Device) {
    set(true, (!device.is_cpu()).then(|| device.clone()));
}

/// The switch, and the device to wait for while on (none once off).
fn set(on: bool, device: Option<Device>) {
    *DEVICE.lock().unwrap_or_else(|e| e.into_inner()) = device.filter(|_| on);
    if on {
        *TABLE.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Waits for the queued work of the device being profiled, if it queues.
/// A failure to wait shows up in the forward pass itself.
fn wait_for_device() {
    if let Some(device) = DEVICE.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = device.synchronize();
    }
}

/// The start of a timed layer: after the work queued before it.
pub fn start() -> Instant {
    wait_for_device();
    Instant::now()
}

/// The time since `start`, once the layer's queued work has run.
pub fn elapsed(start: Instant) -> Duration {
    wait_for_device();
    start.elapsed()
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, and when profiling adds its time to the entry `key()` names.
pub fn timed<R>(key: impl FnOnce() -> String, flops: u64, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let begun = start();
    let out = f();
    record(key(), elapsed(begun), flops);
    out
}

/// Adds one call of `time` and `flops` to the entry `key`.
pub fn record(key: String, time: Duration, flops: u64) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let entry = table
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_default();
    entry.calls += 1;
    entry.time += time;
    entry.flops += flops;
}

/// The table so far, slowest first.
pub fn entries() -> Vec<(String, Entry)> {
    let table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = table
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(&b.0)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled() {
        assert_eq!(timed(|| "off".into(), 1, || 7), 7);
        enable(true);
        timed(|| "layer".into(), 10, || ());
        timed(|| "layer".into(), 10, || ());
        let rows = entries();
        enable(false);
        assert!(rows.iter().all(|(k, _)| k != "off"));
        let layer = &rows.iter().find(|(k, _)| k == "layer").unwrap().1;
        assert_eq!((layer.calls, layer.flops), (2, 20));
    }
}
