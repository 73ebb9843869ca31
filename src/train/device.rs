//! What the training device is and what it can do, read at run time: its name, its memory and,
//! on CUDA, its compute capability. Precision and the memory check are decided from this, never
//! from candle's `supports_bf16()` (which answers yes on every CUDA device).

use anyhow::Result;
use candle_core::Device;

/// A device as the precision policy and the memory estimator see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub id: String,
    /// Human-readable name: the GPU's marketing name, or the CPU model.
    pub name: String,
    /// `(major, minor)` on CUDA; `None` on the CPU.
    pub compute_capability: Option<(u32, u32)>,
    /// Total memory: device memory on a GPU, physical RAM on the CPU.
    pub total_memory_bytes: u64,
    /// Memory a job can use now: free device memory, or the kernel's `MemAvailable` on the CPU.
    pub available_memory_bytes: u64,
}

impl DeviceInfo {
    /// Reads the device's properties (cheap: a few driver calls or one read of `/proc/meminfo`).
    pub fn probe(device: &Device) -> Result<DeviceInfo> {
        match device {
            Device::Cpu => Ok(cpu_info()),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => cuda_info(cuda),
            #[allow(unreachable_patterns)]
            other => anyhow::bail!("unsupported device {other:?}"),
        }
    }

    pub fn is_cuda(&self) -> bool {
        self.compute_capability.is_some()
    }
}

fn cpu_info() -> DeviceInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo_kib(&meminfo, "MemTotal:").unwrap_or(0) * 1024;
    let available = meminfo_kib(&meminfo, "MemAvailable:")
        .map(|k| k * 1024)
        .unwrap_or(total);
    DeviceInfo {
        id: "cpu".into(),
        name: cpu_model_name().unwrap_or_else(|| "cpu".into()),
        compute_capability: None,
        total_memory_bytes: total,
        available_memory_bytes: available,
    }
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn cpu_model_name() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

#[cfg(feature = "cuda")]
fn cuda_info(cuda: &candle_core::CudaDevice) -> Result<DeviceInfo> {
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability()?;
    let (free, total) = ctx.mem_get_info()?;
    Ok(DeviceInfo {
        id: format!("cuda:{}", ctx.ordinal()),
        name: ctx.name()?,
        compute_capability: Some((major as u32, minor as u32)),
        total_memory_bytes: total as u64,
        available_memory_bytes: free as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_probe_reads_memory() {
        let info = DeviceInfo::probe(&Device::Cpu).unwrap();
        assert_eq!(info.id, "cpu");
        assert!(!info.is_cuda());
        assert!(info.total_memory_bytes > 0);
        assert!(info.available_memory_bytes <= info.total_memory_bytes);
    }

    #[test]
    fn meminfo_parses_kib() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal:"), Some(24_000_000));
        assert_eq!(meminfo_kib(text, "MemAvailable:"), Some(1000));
        assert_eq!(meminfo_kib(text, "Missing:"), None);
    }
}
