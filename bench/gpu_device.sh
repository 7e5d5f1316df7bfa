#!/usr/bin/env bash
# `make gpu-check` on the lent GPU machine, which has its own python3 with CUDA torch and no network:
# no .venv there, so the package is put on PYTHONPATH as a namespace (prefixserve.<folder> -> <folder>),
# and the few locked packages that image lacks travel as wheels in .whl/ (README.md, "GPU check").
#   device run: bash bench/gpu_device.sh [bench.gpu_check args]     (carry: [".whl"])
set -u
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/ns/prefixserve
for d in adapters server trainer; do ln -sfn "$PWD/$d" "/tmp/ns/prefixserve/$d"; done
export PYTHONPATH="/tmp/ns:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, peft, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda,
 'transformers', transformers.__version__, 'peft', peft.__version__, 'pydantic', pydantic.__version__)" || exit 1
log="${OUT:-/tmp}/gpu_check.log"
python3 -m bench.gpu_check "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
tar czf "${OUT:-/tmp}/gpu_results.tgz" -C bench/results gpu  # one file back (the device returns at most 8)
exit "$rc"
