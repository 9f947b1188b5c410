#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (NVIDIA H100/H200), run there as is from the
# repository root, under 8 minutes:
#
#     bash benchmarks/gpu_wheels.sh                         # here, once: builds .wheels/
#     device run: bash benchmarks/gpu_check.sh               # there, carry [".wheels"]
#
# 1. the environment: the machine's python3 (torch with CUDA) in a venv that sees its packages,
#    plus transmute's own dependencies from the carried .wheels/ (nothing can be fetched there);
# 2. the CUDA tests (tests/test_cuda.py: the exact token patch, the ridge patch against the CPU's,
#    bf16, evaluation, a checkpoint and the CLI on the GPU) and the CPU suite's fast modules;
# 3. the quick start on --device cuda, when the embedded model is there (its GGUF is ~250 MB, over
#    the device tool's 64 MiB: carry a converted cache as .gpu-cache/ or it is skipped, and said);
# 4. python benchmarks/bench_scale.py --shape 8b --device cuda --dtype bfloat16.
#
# GPU_CHECK_STEPS="env tests" runs some steps only (a dry run on a CPU machine checks the script).
# Results: gpu-env.json, gpu-tests.json, gpu-quickstart.json, gpu-scale-8b.json in $OUT (the
# device tool's folder that comes back) or results/. Commit them with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-results}"
mkdir -p "$DEST"
PY=python3
if [ -d .wheels ]; then
  python3 -m venv --system-site-packages /tmp/transmute-gpu
  PY=/tmp/transmute-gpu/bin/python
  "$PY" -m pip install -q --no-index --find-links .wheels --no-deps -r .wheels/requirements.txt
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-cache ] && export TRANSMUTE_CACHE="$PWD/.gpu-cache"
TRANSMUTE=("$PY" -c "from transmute_cli.cli import main; main()")
STEPS=" ${GPU_CHECK_STEPS:-env tests quickstart scale} "
step() { [[ "$STEPS" == *" $1 "* ]]; }

step env && "$PY" - "$DEST/gpu-env.json" <<'PYEOF'
import json, platform, subprocess, sys
import torch, transformers
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError as e:
    smi = f"not run: {e}"
doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "nvidia_smi": smi,
       "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
       "python": platform.python_version()}
json.dump(doc, open(sys.argv[1], "w"), indent=2)
print(doc)
PYEOF

if step tests; then
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_trust.py tests/test_exact.py \
  tests/test_generate.py --junitxml=/tmp/gpu-tests.xml | tail -5
"$PY" - /tmp/gpu-tests.xml "$DEST/gpu-tests.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s[0]
    doc = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"time_s": float(s.get("time", 0))}
    doc["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:  # the run was killed before it wrote the file
    doc = {"error": repr(e)}
json.dump(doc, open(sys.argv[2], "w"), indent=2)
print(doc)
PYEOF
fi

if ! step quickstart; then
  :
elif "$PY" -c "from transmute_cli.models import alias_installed, cache_dir; import sys; sys.exit(not (alias_installed('gemma-3-270m') or (cache_dir() / 'models' / 'gemma-3-270m-q4_k_m' / 'config.json').is_file()))"; then
  timeout 180 "${TRANSMUTE[@]}" compute recipes/translate-en-fr.yaml --device cuda -o /tmp/gpu-quickstart \
    --overwrite --json --quiet > "$DEST/gpu-quickstart.json"
  echo "quick start: exit $?"
else
  echo '{"skipped": "the embedded model is not on this machine (carry a converted cache as .gpu-cache/)"}' \
    > "$DEST/gpu-quickstart.json"
  echo "quick start: skipped (no embedded model)"
fi

if step scale; then
  timeout 300 "$PY" benchmarks/bench_scale.py --shape 8b --device cuda --dtype bfloat16 --json "$DEST/gpu-scale-8b.json" \
    | tail -20
  echo "bench_scale: exit ${PIPESTATUS[0]}"
fi
ls -la "$DEST"/gpu-*.json
