# syntax=docker/dockerfile:1
#
# clipstream worker image: the release binary on CUDA 13 + cuDNN 9 (Ubuntu
# 24.04), with ONNX Runtime's GPU build (CUDA and TensorRT providers; the
# same library runs on CPU when no GPU is given).
#
#   docker build -t clipstream:0.1.0 .
#   docker run --rm --gpus all -v "$PWD/models:/models:ro" -v "$PWD/pipelines:/config:ro" \
#       clipstream:0.1.0 run /config/pipeline.toml
#
# No model is baked in: mount one at the path the pipeline names (the Helm
# chart mounts a PVC or volume there), or build FROM this image and COPY one.
# The TensorRT provider also needs TensorRT 10 libraries, which this image
# does not carry (CUDA then CPU works out of the box).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG ORT_VERSION=1.31.1

# --- build: the clipstream binary -------------------------------------------
FROM ${RUST_IMAGE} AS build
# librdkafka is built from source by rdkafka-sys (cmake, perl, a C++ compiler);
# SSL and SASL headers for its ssl / gssapi features; nasm for libjpeg-turbo's
# SIMD JPEG decoder (the `jpeg-simd` feature, on by default).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Not rust-toolchain.toml: the image's toolchain (1.95) builds it without
# rustup fetching another one. tests/ is listed because the clipstream
# package names an end-to-end test file there.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p clipstream \
 && install -D -m 0755 target/release/clipstream /out/clipstream

# --- ort: ONNX Runtime GPU libraries from the PyPI wheel ---------------------
FROM ${PYTHON_IMAGE} AS ort
ARG ORT_VERSION
RUN pip download --no-deps --only-binary=:all: --dest /wheels "onnxruntime-gpu==${ORT_VERSION}"
RUN python - <<'PY'
import glob, os, zipfile
wheel = glob.glob("/wheels/onnxruntime_gpu-*.whl")[0]
os.makedirs("/out/lib")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        # onnxruntime/capi/*.so*: the runtime and its providers (not the Python module)
        if name.startswith("onnxruntime/capi/") and ".so" in base and not base.startswith("onnxruntime_pybind11"):
            with z.open(name) as src, open(os.path.join("/out/lib", base), "wb") as dst:
                dst.write(src.read())
PY
RUN test -f "/out/lib/libonnxruntime.so.${ORT_VERSION}" \
 && ln -s "libonnxruntime.so.${ORT_VERSION}" /out/lib/libonnxruntime.so \
 && ls -l /out/lib

# --- runtime -----------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG ORT_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3t64 libsasl2-2 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=ort /out/lib/ /opt/onnxruntime/lib/
COPY --from=build /out/clipstream /usr/local/bin/clipstream
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.${ORT_VERSION} \
    LD_LIBRARY_PATH=/opt/onnxruntime/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    HOME=/tmp
USER 65532:65532
WORKDIR /tmp
EXPOSE 9464
ENTRYPOINT ["clipstream"]
CMD ["--help"]
