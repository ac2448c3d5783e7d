#!/usr/bin/env bash
# The GPU check, one short script for a CUDA machine (CI never runs it):
#   1. tests/test_cuda_paths.py: every mixer plan on CUDA against the CPU, engine decoding, bf16/fp16 training;
#   2. the `gpu`-marked tests: mamba_ssm / causal-conv1d kernels against the PyTorch paths (outputs, grads);
#   3. bench/mixers on CUDA (bf16 autocast), kernels beside the PyTorch path -> bench/results/mixers/cuda/.
# Usage: bench/gpu/check.sh [LOG]   with xatl importable and, for 2, the `gpu` extra installed; LOG gets all
# the output (default gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/../.."
log=${1:-gpu_check.log}
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee -a "$log"
import importlib.util, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("transformers", transformers.__version__)
for name in ("mamba_ssm", "causal_conv1d", "triton"):
    print(name, "found" if importlib.util.find_spec(name) else "missing")
PY
status=0
# transformers' Mamba without the kernels loops over tokens in Python: only the shortest length then
if python3 -c "import mamba_ssm" 2>/dev/null; then slow_max=8192; else slow_max=512; fi
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py 2>&1 | tee -a "$log" || status=1
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/ops tests/mixers 2>&1 | tee -a "$log" || status=1
python3 bench/mixers/run.py --device cuda --precision bf16 --name mixers/cuda --threads 8 \
    --hidden 768 --heads 12 --layers 4 --lengths 512,2048,8192 --tokens-per-step 32768 --repeats 5 \
    --slow-tokens 32768 --slow-max-length $slow_max 2>&1 | tee -a "$log" || status=1
exit $status
