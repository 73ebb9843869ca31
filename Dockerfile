# sftd container image: the one `sftd` binary on Debian slim, running as a non-root user.
#
#   docker build -t sftd .                       CPU image (the default)
#   docker build -t sftd:cuda \                  CUDA image (docs/cuda-build.md, docs/container.md)
#     --build-arg BUILD_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04 \
#     --build-arg FEATURES=cuda --build-arg CUDA_COMPUTE_CAP=75 .
#
# The CUDA image compiles with the toolkit of its devel image (nvcc on its PATH); CI compiles the
# same `cuda` feature with the same CUDA 13.0 compiler from PyPI wheels (scripts/cuda-build.sh).
# Its kernels are PTX for CUDA 13.0, so the host needs an NVIDIA driver R580 or newer.
#
# Needs BuildKit (Docker >= 23 default) or podman/buildah for the RUN --mount cache.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
# The rust image already has Rust, so this step does nothing there; a CUDA devel image gets a
# minimal toolchain from rustup, and g++ for nvcc's host code and candle-kernels' C++ runtime.
ARG RUST_TOOLCHAIN=stable
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN if ! command -v cargo >/dev/null 2>&1; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           ca-certificates curl gcc g++ libc6-dev pkg-config \
      && rm -rf /var/lib/apt/lists/* \
      && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
         | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$RUST_TOOLCHAIN"; \
    fi \
    && cargo --version

WORKDIR /src
# FEATURES=cuda for the CUDA image. CUDA_COMPUTE_CAP must then name the GPU generation, since no
# GPU is visible while the image builds: 75 T4, 80 A100, 86 A10G, 89 L4/L40S, 90 H100/H200.
ARG FEATURES=
ARG CUDA_COMPUTE_CAP=
RUN case "$FEATURES" in *cuda*) \
      if [ -z "$CUDA_COMPUTE_CAP" ]; then \
        echo "FEATURES=cuda needs --build-arg CUDA_COMPUTE_CAP (75 T4, 80 A100, 90 H100)" >&2; exit 1; \
      fi; \
      if ! command -v nvcc >/dev/null; then \
        echo "FEATURES=cuda needs a CUDA devel BUILD_IMAGE with nvcc on its PATH" >&2; exit 1; \
      fi; \
      nvcc --version | tail -n 2 ;; \
    esac

# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    if [ -n "$CUDA_COMPUTE_CAP" ]; then export CUDA_COMPUTE_CAP; else unset CUDA_COMPUTE_CAP; fi \
    && mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && cargo build --release --locked ${FEATURES:+--features "$FEATURES"} \
    && rm -rf src

# The crate itself (static/ and migrations/ are embedded in the binary at compile time).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    if [ -n "$CUDA_COMPUTE_CAP" ]; then export CUDA_COMPUTE_CAP; else unset CUDA_COMPUTE_CAP; fi \
    && touch src/main.rs src/lib.rs \
    && cargo build --release --locked ${FEATURES:+--features "$FEATURES"} \
    && install -m 0755 target/release/sftd /usr/local/bin/sftd

FROM ${RUNTIME_IMAGE}
# Ubuntu 24.04 (the CUDA 13 images) ships a user `ubuntu` with uid 1000: it gives way to `sftd`.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && stale_user=$(getent passwd 1000 | cut -d: -f1) \
    && if [ -n "$stale_user" ]; then userdel "$stale_user"; fi \
    && useradd --uid 1000 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin sftd \
    && mkdir -p /data \
    && chown sftd:sftd /data
COPY --from=build /usr/local/bin/sftd /usr/local/bin/sftd

ENV SFTD_ADDR=0.0.0.0:8080 \
    SFTD_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    SFTD_LOG_FORMAT=json
USER sftd
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["sftd", "healthcheck"]
# sftd checkpoints the running job, requeues it and exits 0 on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sftd"]
CMD ["serve"]
