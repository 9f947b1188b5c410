#!/usr/bin/env bash
# Build .wheels/: what benchmarks/gpu_check.sh installs on a lent GPU machine, where nothing can be
# fetched. That machine's python3 (3.12) holds torch with CUDA, numpy and the usual packages;
# transmute needs newer transformers / huggingface-hub / tokenizers and a few more, so every
# pure dependency of this checkout's environment is downloaded here for Python 3.12 manylinux
# (torch, the CUDA packages and numpy excepted: the machine's own are used). ~36 MB, inside the
# device tool's 64 MiB working-tree limit with the repository. Run here, then carry ".wheels".
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .wheels && mkdir -p .wheels
"$PIP" freeze --exclude-editable \
  | grep -v -i -E '^(torch|nvidia|triton|numpy|sympy|mpmath|networkx|setuptools|pip|transmute|gemma3|llm[-_]smollm2|cuda)' \
  > .wheels/requirements.txt
"$PIP" download -q -d .wheels --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -r .wheels/requirements.txt
du -sh .wheels
