#!/usr/bin/env bash
# Run HERE (the CPU machine, repo root) before benchmarks/gpu.sh is sent to a lent GPU machine.
# The GPU image has torch, torchvision, timm, scipy, matplotlib, safetensors and tqdm, but not
# torch-lucent (nor its rotation dependency kornia), and it reaches no registry: both travel as
# wheels in .whl/ (git-ignored). The SqueezeNet weights travel in .devdata/weights (git-ignored).
# Then call the device tool with: carry [".whl", ".devdata"], command "bash benchmarks/gpu.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .devdata/weights
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .whl torch-lucent==0.1.8 kornia==0.4.1
src="${FVSANITY_DATA:-../shared/data}/weights/imagenet_squeezenet1_0_deepcompression.pt"
[ -f "$src" ] && cp "$src" .devdata/weights/ || echo "gpu_prepare: no SqueezeNet weights at $src (the GPU run will skip it)"
ls -la .whl .devdata/weights
