//! Process-wide allocator settings for training on the CPU.
//!
//! glibc hands every freed block above its mmap threshold back to the kernel and trims the heap
//! top eagerly, so each training step's multi-megabyte activations were page-faulted and zeroed
//! afresh: about a fifth of the CPU time of a step went to the kernel. Pinning the threshold at
//! glibc's maximum (32 MiB) and not trimming keeps freed buffers in the heap for the next step.

/// Applies the settings; call once, first thing in `main`. A no-op off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only changes allocator tunables; it is called before any other thread
        // exists. A refused value (return 0) leaves glibc's default, which is merely slower.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, c_int::MAX);
        }
    }
}
