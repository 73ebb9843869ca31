//! What `sftd bench` needs to know about a GPU beyond the step itself: its vendor-rated dense
//! fp16/bf16 tensor-core peak (the MFU denominator) and the most device memory in use during a run.

use crate::train::device::DeviceInfo;
use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Dense (no structured sparsity) fp16/bf16 tensor-core peaks in FLOP/s, from NVIDIA's
/// datasheets, matched against the CUDA device name. Not measured here. More specific names
/// come before names they contain ("A100" before "A10", "L40S" before "L4").
const DENSE_PEAKS: [(&str, &str, f64); 9] = [
    ("H200", "H200", 989e12),
    ("H100 PCIe", "H100 PCIe", 756e12),
    ("H100", "H100 SXM", 989e12),
    ("A100", "A100", 312e12),
    ("A10", "A10", 125e12),
    ("L40S", "L40S", 362e12),
    ("L4", "L4", 121e12),
    ("V100", "V100 SXM2", 125e12),
    ("T4", "T4", 65e12),
];

/// The dense fp16/bf16 peak of a known GPU and the name it was matched as; `None` for the CPU
/// and for GPUs not in the table.
pub fn dense_peak_flops(info: &DeviceInfo) -> Option<(f64, &'static str)> {
    if !info.is_cuda() {
        return None;
    }
    let words: Vec<&str> = info.name.split([' ', '-']).collect();
    DENSE_PEAKS.iter().find_map(|&(key, label, flops)| {
        let key_words: Vec<&str> = key.split(' ').collect();
        words
            .windows(key_words.len())
            .any(|w| w == key_words.as_slice())
            .then_some((flops, label))
    })
}

/// Polls the device's free memory on a background thread and keeps the lowest value seen.
pub struct DeviceMemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl DeviceMemorySampler {
    pub fn start(device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, device) = (stop.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            loop {
                if let Ok(i) = DeviceInfo::probe(&device) {
                    peak = peak.max(
                        i.total_memory_bytes
                            .saturating_sub(i.available_memory_bytes),
                    );
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling; returns the most memory in use seen, in bytes.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str) -> DeviceInfo {
        DeviceInfo {
            id: "cuda:0".into(),
            name: name.into(),
            compute_capability: Some((8, 0)),
            total_memory_bytes: 0,
            available_memory_bytes: 0,
        }
    }

    #[test]
    fn known_gpus_match_by_name() {
        for (name, label) in [
            ("Tesla T4", "T4"),
            ("NVIDIA A100-SXM4-80GB", "A100"),
            ("NVIDIA A100 80GB PCIe", "A100"),
            ("NVIDIA A10", "A10"),
            ("NVIDIA H100 80GB HBM3", "H100 SXM"),
            ("NVIDIA H100 PCIe", "H100 PCIe"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA L40S", "L40S"),
            ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ] {
            assert_eq!(
                dense_peak_flops(&gpu(name)).map(|p| p.1),
                Some(label),
                "{name}"
            );
        }
        assert_eq!(dense_peak_flops(&gpu("NVIDIA A10G")), None);
        assert_eq!(dense_peak_flops(&gpu("NVIDIA GeForce RTX 4090")), None);
        let mut cpu = gpu("T4");
        cpu.compute_capability = None;
        assert_eq!(dense_peak_flops(&cpu), None);
    }

    #[test]
    fn sampler_reports_memory_in_use() {
        let s = DeviceMemorySampler::start(&Device::Cpu);
        assert!(s.stop() > 0);
    }
}
