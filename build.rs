//! With the `cuda` feature: compiles sftd's CUDA kernels (`src/train/nn/cuda/*.cu`) to PTX for the
//! compute capability in `CUDA_COMPUTE_CAP` (as candle's kernels are), into `$OUT_DIR/ptx.rs`,
//! which `src/train/nn/cuda_ops.rs` includes. Without it: nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::compile();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn compile() {
        println!("cargo::rerun-if-changed=src/train/nn/cuda");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("src/train/nn/cuda")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .unwrap_or_else(|e| panic!("compiling src/train/nn/cuda with nvcc: {e}"));
        ptx.write(out.join("ptx.rs"))
            .unwrap_or_else(|e| panic!("writing the PTX bindings: {e}"));
    }
}
