//! The precision policy: which dtype the frozen base weights take on a device, and whether the
//! loss is scaled. Decided from the device's compute capability, read at run time, never from
//! candle's `supports_bf16()` (true on every CUDA device, though candle's bf16 kernels other than
//! casts exist only from compute capability 8.0).
//!
//! Only the frozen base weights (and the GEMMs over them) change dtype. LoRA weights, AdamW state,
//! the residual stream, norms, softmax, attention and the loss stay f32 under every policy.

use crate::train::device::DeviceInfo;
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The `precision` hyperparameter: what a job asks for.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The device's best: f32 on the CPU, bf16 from compute capability 8.0, f16 with loss
    /// scaling on 7.x, f32 below.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// A policy the device can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The dtype of the frozen base weights and of the inputs of the GEMMs over them.
    pub base_dtype: DType,
    /// Whether gradients are computed on a scaled loss (f16 only: its 5-bit exponent flushes
    /// small gradients to zero without it).
    pub loss_scaling: bool,
}

/// A request the device cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    #[error("precision bf16 needs a GPU of compute capability 8.0 or newer (Ampere, Hopper); {device} ({id}) has {major}.{minor}: use f16 (with loss scaling) or f32, or auto")]
    Bf16Unsupported {
        device: String,
        id: String,
        major: u32,
        minor: u32,
    },
    #[error("precision f16 needs a GPU of compute capability 5.3 or newer; {device} ({id}) has {major}.{minor}: use f32 or auto")]
    F16Unsupported {
        device: String,
        id: String,
        major: u32,
        minor: u32,
    },
}

/// Lowest compute capability with candle's bf16 kernels (beyond casts).
const BF16_MIN_CC: (u32, u32) = (8, 0);
/// Lowest compute capability with f16 arithmetic in candle's kernels.
const F16_MIN_CC: (u32, u32) = (5, 3);
/// Lowest compute capability where `auto` picks f16: tensor cores (Volta, Turing).
const F16_AUTO_MIN_CC: (u32, u32) = (7, 0);

impl Precision {
    /// The policy for this request on this device. On the CPU every precision runs (candle's CPU
    /// backend has f16 and bf16 kernels), which is how the GPU policies are tested without a GPU;
    /// `auto` keeps f32 there because f32 is the CPU's fastest.
    pub fn resolve(self, device: &DeviceInfo) -> Result<Resolved, PrecisionError> {
        let cc = device.compute_capability;
        let wanted = match (self, cc) {
            (Precision::Auto, None) => Precision::F32,
            (Precision::Auto, Some(cc)) if cc >= BF16_MIN_CC => Precision::Bf16,
            (Precision::Auto, Some(cc)) if cc >= F16_AUTO_MIN_CC => Precision::F16,
            (Precision::Auto, Some(_)) => Precision::F32,
            (p, _) => p,
        };
        let too_old = |min: (u32, u32)| cc.filter(|&c| c < min);
        match wanted {
            Precision::Bf16 => {
                if let Some((major, minor)) = too_old(BF16_MIN_CC) {
                    return Err(PrecisionError::Bf16Unsupported {
                        device: device.name.clone(),
                        id: device.id.clone(),
                        major,
                        minor,
                    });
                }
            }
            Precision::F16 => {
                if let Some((major, minor)) = too_old(F16_MIN_CC) {
                    return Err(PrecisionError::F16Unsupported {
                        device: device.name.clone(),
                        id: device.id.clone(),
                        major,
                        minor,
                    });
                }
            }
            Precision::F32 | Precision::Auto => {}
        }
        Ok(Resolved::of(wanted))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            _ => Err(format!(
                "unknown precision {s:?}: use auto, f32, bf16 or f16"
            )),
        }
    }
}

impl Resolved {
    /// The policy of a concrete (non-`auto`) precision, without a device check.
    pub fn of(p: Precision) -> Self {
        let base_dtype = match p {
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
            Precision::F32 | Precision::Auto => DType::F32,
        };
        Resolved {
            base_dtype,
            loss_scaling: base_dtype == DType::F16,
        }
    }

    /// `f32`, `bf16` or `f16`.
    pub fn name(&self) -> &'static str {
        match self.base_dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(major: u32, minor: u32) -> DeviceInfo {
        DeviceInfo {
            id: "cuda:0".into(),
            name: "Test GPU".into(),
            compute_capability: Some((major, minor)),
            total_memory_bytes: 16 << 30,
            available_memory_bytes: 15 << 30,
        }
    }

    fn cpu() -> DeviceInfo {
        DeviceInfo {
            id: "cpu".into(),
            name: "Test CPU".into(),
            compute_capability: None,
            total_memory_bytes: 24 << 30,
            available_memory_bytes: 20 << 30,
        }
    }

    #[test]
    fn auto_follows_the_compute_capability() {
        let auto = |d: &DeviceInfo| Precision::Auto.resolve(d).unwrap();
        assert_eq!(auto(&cpu()), Resolved::of(Precision::F32));
        // T4 (7.5), V100 (7.0): f16 with loss scaling.
        for cc in [(7, 5), (7, 0)] {
            let r = auto(&gpu(cc.0, cc.1));
            assert_eq!(r.base_dtype, DType::F16);
            assert!(r.loss_scaling);
        }
        // A100 (8.0), A10/RTX 30xx (8.6), L4 (8.9), H100/H200 (9.0): bf16, no scaling.
        for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)] {
            let r = auto(&gpu(cc.0, cc.1));
            assert_eq!(r.base_dtype, DType::BF16);
            assert!(!r.loss_scaling);
        }
        // Pascal (6.x): no tensor cores, f32.
        assert_eq!(auto(&gpu(6, 1)), Resolved::of(Precision::F32));
    }

    #[test]
    fn bf16_below_ampere_is_refused_with_the_device_named() {
        let e = Precision::Bf16.resolve(&gpu(7, 5)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("7.5") && text.contains("Test GPU"), "{text}");
        assert!(Precision::Bf16.resolve(&gpu(8, 0)).is_ok());
        assert!(Precision::F16.resolve(&gpu(5, 2)).is_err());
        assert!(Precision::F16.resolve(&gpu(7, 5)).is_ok());
        assert!(Precision::F32.resolve(&gpu(3, 5)).is_ok());
    }

    #[test]
    fn the_cpu_runs_every_precision() {
        for (p, dt) in [
            (Precision::F32, DType::F32),
            (Precision::Bf16, DType::BF16),
            (Precision::F16, DType::F16),
        ] {
            let r = p.resolve(&cpu()).unwrap();
            assert_eq!(r.base_dtype, dt);
            assert_eq!(r.loss_scaling, dt == DType::F16);
        }
    }

    #[test]
    fn names_round_trip() {
        for p in [
            Precision::Auto,
            Precision::F32,
            Precision::Bf16,
            Precision::F16,
        ] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert!("fp16".parse::<Precision>().is_err());
    }
}
