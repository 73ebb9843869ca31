//! Whether sftd's own CPU kernels serve an op, or candle's tensor ops do, as on a GPU.
//!
//! Every fused CPU kernel has a composed twin built from candle ops: the path a GPU runs, since
//! the kernels are CPU-only. `SFTD_CPU_KERNELS=off` turns the kernels off for the whole process,
//! so the CPU runs the GPU's graph (its shapes, casts, masks and each composed op's backward):
//! that is how that graph is checked where no GPU is, and how a difference between the two paths
//! is bisected. It is several times slower. Tests turn the kernels off for one thread with
//! [`off_in`] and compare both paths in one process.

use candle_core::Device;
use std::cell::Cell;
use std::sync::OnceLock;

const VARIABLE: &str = "SFTD_CPU_KERNELS";

thread_local! {
    static OFF_ON_THIS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether `value` of the variable leaves the kernels on, and why it was ignored if it was.
fn setting_from(value: Option<&str>) -> (bool, Option<String>) {
    on_off(VARIABLE, value)
}

/// An on/off switch's value (unset or empty: on), and why it was ignored if it was; shared with
/// `cuda_kernels`' switch.
pub(super) fn on_off(variable: &str, value: Option<&str>) -> (bool, Option<String>) {
    let value = value.unwrap_or_default();
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "on" => (true, None),
        "off" => (false, None),
        _ => (
            true,
            Some(format!(
                "{variable}={value:?} is not one of on, off; leaving them on"
            )),
        ),
    }
}

/// The process's setting, read once.
fn process_setting() -> &'static (bool, Option<String>) {
    static SETTING: OnceLock<(bool, Option<String>)> = OnceLock::new();
    SETTING.get_or_init(|| setting_from(std::env::var(VARIABLE).ok().as_deref()))
}

/// Why the variable's value was ignored, if it was (reported with `nn::kernel_isa`).
pub(super) fn note() -> Option<&'static str> {
    process_setting().1.as_deref()
}

/// Whether sftd's CPU kernels are on for ops dispatched from this thread.
pub fn enabled() -> bool {
    !OFF_ON_THIS_THREAD.with(Cell::get) && process_setting().0
}

/// Whether sftd's CPU kernels may serve an op on `device` (each kernel also checks its dtypes).
pub fn serve(device: &Device) -> bool {
    device.is_cpu() && enabled()
}

/// Runs `f` with the kernels off for ops dispatched from this thread (its forward and backward
/// passes alike), then restores the previous setting, also when `f` panics.
pub fn off_in<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF_ON_THIS_THREAD.with(|off| off.set(self.0));
        }
    }
    let _restore = Restore(OFF_ON_THIS_THREAD.with(|off| off.replace(true)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_turns_them_off_and_a_bad_value_is_reported() {
        assert_eq!(setting_from(None), (true, None));
        assert_eq!(setting_from(Some(" ON ")), (true, None));
        assert_eq!(setting_from(Some("off")), (false, None));
        let (on, note) = setting_from(Some("no"));
        assert!(on);
        assert!(note.unwrap().contains("not one of on, off"));
    }

    #[test]
    fn off_in_holds_for_its_closure_only() {
        let before = enabled();
        assert!(off_in(|| !enabled() && !serve(&Device::Cpu)));
        assert_eq!(enabled(), before);
        let nested = off_in(|| {
            off_in(|| {});
            !enabled()
        });
        assert!(nested, "an inner off_in must not turn the kernels back on");
        assert!(std::panic::catch_unwind(|| off_in(|| panic!("inside"))).is_err());
        assert_eq!(enabled(), before, "restored after a panic");
    }
}
