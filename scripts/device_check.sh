#!/usr/bin/env bash
# The CUDA check, for a machine with a GPU and no network (torch and transformers preinstalled):
#   1. the engine's invariants on cuda with tiny models, fp32 and bf16 (tests/test_device.py: α = 0 equals
#      the base's own generate, cached == recomputed, batched == one at a time, speculative == plain);
#      placement: a base split across devices by a device map, roles on different devices stepping concurrently;
#   2. speed of a random-initialised ~1.1B / 0.2B trio: plain vs speculative vs LoRA pair (bf16);
#   3. roles in parallel: base on cuda:0, pair on cuda:1 (or the CPU), concurrent vs one after another.
# Run from the repository root: `bash scripts/device_check.sh`; results go to $OUT (default /tmp/device-check).
# The package runs from the tree (PYTHONPATH), so the preinstalled torch/transformers are used as they are;
# packages the machine lacks come from wheels in .whl/ (`make device-wheels` fetches them beforehand).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
for module in peft pytest accelerate; do
    python -c "import $module" 2>/dev/null || pip install -q --no-index --find-links .whl "$module" \
        || echo "missing $module and no wheel for it in .whl/"
done
python - <<'PY' | tee "$OUT/versions.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import proxytune
print("proxytune imports from", proxytune.__file__)
PY
status=0
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -25 | tee "$OUT/tests.txt" \
    || status=1
timeout 240 python benchmarks/device_trio.py --device cuda --dtype bfloat16 --tokens 64 --rounds 2 2>&1 \
    | grep -v Warning | tee "$OUT/device-trio-bf16.txt" || status=1
timeout 180 python benchmarks/parallel_roles.py --setting devices --tokens 64 --rounds 2 2>&1 \
    | grep -v Warning | tee "$OUT/parallel-roles.txt" || status=1
exit $status
