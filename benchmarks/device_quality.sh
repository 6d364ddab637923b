#!/usr/bin/env bash
# Run benchmarks/quality.py on a GPU machine without internet. Expects, in the repo root:
#   .whl/                 wheels of gguf, auto-round and pydantic (see docs/benchmarks.md)
#   .gpu/smol_data.pt     calibration/evaluation tokens (python -m benchmarks.quality --prepare_only ...)
#   /tmp/smol/model.gguf  the SmolLM2 GGUF, assembled from pieces sent in earlier calls
# Usage: bash benchmarks/device_quality.sh SCHEMES METHODS [extra quality.py args]
set -euo pipefail
rm -rf /tmp/aq_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aq_site .whl/*.whl
# install auto_quant itself (never put the checkout root on sys.path: its kernels/ folder would
# shadow the `kernels` package transformers probes for)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/aq_site .
export PYTHONPATH=/tmp/aq_site
export PYTHONUNBUFFERED=1
schemes=$1; methods=$2; shift 2
python3 benchmarks/quality.py --device cuda --model /tmp/smol/model.gguf --data .gpu/smol_data.pt \
    --schemes "$schemes" --methods "$methods" --out "${OUT:-/tmp}/quality.json" "$@"
