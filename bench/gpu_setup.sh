#!/usr/bin/env bash
# Set up the lent GPU machine (see bench/README.md). Usage: gpu_setup.sh wheels | piece | model
set -euo pipefail
export TUNEBENCH_CACHE=${TUNEBENCH_CACHE:-/tmp/tbcache}
case "$1" in
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -c "import importlib.util as u; print('wheels ok', [m for m in ('bitsandbytes', 'trl', 'datasets', 'gguf') if u.find_spec(m)])"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
  piece)
    mkdir -p /tmp/model && cp .gpu/gemma.gguf.part.* /tmp/model/ && ls /tmp/model | wc -l ;;
  model)
    cat /tmp/model/gemma.gguf.part.* > /tmp/model/gemma-3-270m-q4_k_m.gguf
    echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  /tmp/model/gemma-3-270m-q4_k_m.gguf" | sha256sum -c
    PYTHONPATH=/tmp/site:src python3 -c "
from pathlib import Path
from tunebench.models.embedded import checkpoint_dir, convert_gguf
target = checkpoint_dir()
convert_gguf(Path('/tmp/model/gemma-3-270m-q4_k_m.gguf'), target)
print('converted to', target)" ;;
esac
