#!/usr/bin/env bash
# Run benchmarks/quality.py on a GPU machine without internet. Expects, in the repo root:
#   .whl/                 wheels of gguf, auto-round, pydantic, datasets (see docs/benchmarks.md)
#   .gpu/smol_data.pt     calibration/evaluation tokens (python -m benchmarks.quality --prepare_only ...)
#   /tmp/smol/model.gguf  the SmolLM2 GGUF, assembled from pieces sent in earlier calls
# Usage: bash benchmarks/device_quality.sh SCHEMES METHODS [extra quality.py args]
#        AQ_SETUP_ONLY=1 bash benchmarks/device_quality.sh   (install and convert only)
set -euo pipefail
rm -rf /tmp/aq_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aq_site .whl/*.whl
# install auto_quant itself (never put the checkout root on sys.path: its kernels/ folder would
# shadow the `kernels` package transformers probes for)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/aq_site .
export PYTHONPATH=/tmp/aq_site
export PYTHONUNBUFFERED=1
# auto-round imports `datasets` at import time; where its pyarrow/pandas are missing, a stand-in
# module that only provides the imported names lets it load (the benchmark hands it token tensors)
if ! python3 -c "import datasets" 2>/dev/null; then
    mkdir -p /tmp/aq_stub/datasets
    cat > /tmp/aq_stub/datasets/__init__.py <<'EOF'
"""Stand-in for `datasets` on machines without pyarrow (benchmarks/device_quality.sh)."""
__version__ = "0.0.0-stand-in"


def _missing(*args, **kwargs):
    raise ImportError("the `datasets` stand-in cannot load data; pass token tensors")


class _Missing:
    def __init__(self, *args, **kwargs):
        _missing()


Dataset = IterableDataset = Features = Sequence = Value = _Missing
load_dataset = load_from_disk = concatenate_datasets = _missing
EOF
    export PYTHONPATH=/tmp/aq_stub:$PYTHONPATH
    echo "device_quality: using the datasets stand-in" >&2
fi
# the GGUF once into a float32 safetensors folder: each run then loads in seconds instead of ~30 s
# of GGUF dequantization (the weights are the same dequantized values)
if [ -f /tmp/smol/model.gguf ] && [ ! -f /tmp/smol/hf/config.json ]; then
    (cd /tmp && python3 -) <<'EOF'
import torch
from auto_quant.models.loading import load_model

model, tok = load_model("/tmp/smol/model.gguf")
model = model.to(torch.float32)  # from_gguf returns it as a plain float model
model.save_pretrained("/tmp/smol/hf")
tok.save_pretrained("/tmp/smol/hf")
EOF
fi
[ -n "${AQ_SETUP_ONLY:-}" ] && exit 0
schemes=$1; methods=$2; shift 2
model=/tmp/smol/hf
[ -f $model/config.json ] || model=/tmp/smol/model.gguf
python3 benchmarks/quality.py --device cuda --model $model --data .gpu/smol_data.pt \
    --schemes "$schemes" --methods "$methods" --out "${OUT:-/tmp}/quality.json" "$@"
