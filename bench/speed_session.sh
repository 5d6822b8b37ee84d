#!/usr/bin/env bash
# One device call of the issue-7 benchmark: bench/speed_session.sh RUN [RUN ...], where RUN is
#   MODEL:METHOD:SEQ:VARIANT[:override,override...]  e.g. llmjp13b:qlora:512:baseline
#                                                     or  gemma:lora:512:tunebench:train.offload_frozen=false
# Each run is its own process (peak memory per run); results accumulate in /tmp/train_speed.jsonl
# (kept on the warm machine) and the table of everything so far is printed last and copied to $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:src TUNEBENCH_CACHE=${TUNEBENCH_CACHE:-/tmp/tbcache}
export BENCH_TOKENIZER=${BENCH_TOKENIZER:-/tmp/gemma-tok}
[ -f /tmp/gemma-tok/tokenizer.json ] || { mkdir -p /tmp/gemma-tok && tar -xJf .gpu/tok.tar.xz -C /tmp/gemma-tok; }
for spec in "$@"; do
  IFS=: read -r model method seq variant sets <<< "$spec"
  args=(--model "$model" --method "$method" --seq "$seq" --variant "$variant" --steps "${STEPS:-20}")
  IFS=, read -ra overrides <<< "${sets:-}"
  for o in "${overrides[@]}"; do args+=(--set "$o"); done
  echo "=== $spec" >&2
  timeout "${RUN_LIMIT:-540}" python3 bench/train_speed.py "${args[@]}" 2>&1 | grep -v Warning | tail -4 >&2
done
python3 bench/train_speed.py --table /tmp/train_speed.jsonl | tee "${OUT:-/tmp}/table.txt"
cp /tmp/train_speed.jsonl "${OUT:-/tmp}/" 2>/dev/null
true
