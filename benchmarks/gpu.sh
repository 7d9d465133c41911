#!/usr/bin/env bash
# GPU figures (issue 14), at most ~8 minutes on one H200; run on the lent machine from the repo
# root after benchmarks/gpu_prepare.sh ran here (it brings torch-lucent + kornia wheels in .whl/
# and the SqueezeNet weights in .devdata/). Prints each benchmark's JSON line; the last line is
# one JSON object with all figures. Output also goes to ${OUT:-runs/gpu}/gpu.log.
#   1. generator vs lucent on CUDA: 64 SqueezeNet class units, 128 steps, 227 px (target >= 30x)
#   2. bf16 autocast vs float32: the same 64 units, time and objective parity
#   3. a timed sweep of the 1000 class units of torchvision GoogLeNet (random weights), 224 px,
#      512 steps: a timed subset, extrapolated (the whole sweep would not fit the lease)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 FVSANITY_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import lucent" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import IPython" 2>/dev/null; then  # lucent imports IPython.display for notebooks only
  mkdir -p /tmp/stubs/IPython && : > /tmp/stubs/IPython/__init__.py && : > /tmp/stubs/IPython/display.py
  export PYTHONPATH="$PYTHONPATH:/tmp/stubs"
fi
[ -z "${FVSANITY_DATA:-}" ] && [ -d .devdata ] && export FVSANITY_DATA="$PWD/.devdata"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  timeout 240 python3 benchmarks/generator_vs_lucent.py --model imagenet-squeezenet --units 64 --steps 128 --device cuda --lucent-weights frozen
  timeout 200 python3 benchmarks/gpu_figures.py --device cuda
} 2>&1 | tee "$out/gpu.log"
python3 - "$out/gpu.log" <<'PY'
import json, sys
figs = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
        d = json.loads(line)
        figs[d.get("benchmark", "generator_vs_lucent")] = d
print(json.dumps(figs))
PY
