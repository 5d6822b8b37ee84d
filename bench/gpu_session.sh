#!/usr/bin/env bash
# The issue-15/17 measurements of one device session on the two-GPU machine, as one background job:
#
#   setsid nohup bash bench/gpu_session.sh run [PART ...] > /tmp/session/driver.log 2>&1 &   # after gpu_setup.sh wheels
#   bash bench/gpu_session.sh status     # progress: which step runs, what finished
#   bash bench/gpu_session.sh collect    # results, logs and tables into $OUT (do it in every call: a machine
#                                        # given back takes everything with it)
#
# Parts (default: ddp fsdp speed fsdp_3.7b), each a function below:
#   ddp         DDP scaling of Gemma 3 270M LoRA (eager and compiled), per-rank profiles of its 1- and 2-GPU
#               steps, two independent 1-GPU runs side by side (host contention vs DDP)
#   ddp_logged  the compiled DDP scaling with a log line every 10 steps instead of every step
#   fsdp        full fine-tuning that does not fit one GPU, and 13B QLoRA with sharded 4-bit weights
#   speed       one GPU each, in parallel: GPU 0 the Gemma side of issue 15 (TRL baseline vs tunebench eager
#               vs train.compile, the generation variants, a 3-epoch megagon run), GPU 1 the 13B shape (TRL
#               baseline vs eager vs compile, then the tasks answered by the 4-bit 13B shape)
#   fsdp_3.7b   FSDP full fine-tuning of the 3.7B shape on 2 GPUs and 1
#   compiled_offload  one GPU each: Gemma (TRL vs compiled vs eager vs compiled with offload and smaller logits
#               blocks, a 3-epoch megagon run, a profile) and the 13B shape (TRL vs compiled with offload vs
#               compiled without vs eager, a profile)
#   graphs_final  the same after the compiled layers stopped recompiling per layer (Gemma: real model only,
#               a second process on the warm inductor cache, a profile of the decode step)
#   host        one GPU each: what takes the host time out of a training step: inductor's C++ wrapper, no
#               gradient checkpointing, inductor's CUDA graphs (Gemma 3 270M arch.: each with a 3-epoch run; 13B shape)
#   levers      one GPU each, the defaults that came of 'host' (gradient_checkpointing auto, train.cuda_graphs)
#               against TRL and without graphs, the memory-lean setting (checkpointing on), a 3-epoch run
#   dequant     the 13B shape QLoRA (GPU 1; GPU 0 the same on its own copy): defaults against train.compile_dequant
#               (4-bit weights dequantized by torch ops inside the compiled layers) and TRL, a profile of each
#   dequant_ab  the same, paired: compile_dequant beside TRL, beside the defaults, and with inductor's asserts off
#   qlora_defaults  the 13B shape with nothing set beside TRL, twice (GPUs swapped)
#   host13b     the 13B shape: inductor's C++ wrapper on top of the defaults beside TRL, the defaults (guard checks
#               skipped for shapes already trained) beside the previous defaults, and beside TRL
#   host13b_swap  after host13b: the same pairs with the GPUs swapped, the C++ wrapper beside the defaults
#   norms       one GPU: the uncompiled decode loop with fused RMSNorms (decode step profile on random Gemma
#               weights, then the real Gemma 3 270M + LoRA answering the tasks) against the norms as written
#   inputs      one GPU: the decode loop's own masks, cache writes, rotary table, penalty by ids and Gemma's fused
#               one-token layers against the loop before them (f7c5edb, /tmp/base): step profile, 100 tasks
#   inputs_check  one GPU: the loop after review on random-weight Gemma (kernel check, profile, the tasks)
#   inputs_13b  one GPU: the 4-bit 13B shape answering the tasks, the loop now and before (f7c5edb)
#   attn        one GPU: Gemma's one-token attention in Triton kernels against the loop before them (1e18115,
#               /tmp/base): kernel checks and step profile on random weights, then the real model + LoRA answering
#               the tasks in five processes (the first with an empty Triton cache)
#   attn_final  one GPU: the same, as committed (the chunk count a runtime argument), four processes
#   warmup      one GPU: the same with the kernels warmed while the model loads, against c0bc141 (/tmp/base)
#   graphs      one GPU each: tunebench's captured decode loop (generate.cuda_graphs) against transformers'
#               generate; GPU 0 Gemma 3 270M (random weights first, then the real model + LoRA once its GGUF
#               pieces are here), GPU 1 the 4-bit llm-jp-3-13b shape answering the tasks
# The real Gemma 3 270M is used when the GGUF has been converted (/tmp/model/converted), else its
# architecture with random weights. Every step has a timeout and a failure never stops the others;
# NVLink multicast is off in every process.
set -uo pipefail
export PYTHONPATH=/tmp/site:src TUNEBENCH_CACHE=${TUNEBENCH_CACHE:-/tmp/tbcache} BENCH_TOKENIZER=/tmp/gemma-tok
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
S=/tmp/session
mkdir -p $S
# train_speed.py at the course settings: Gemma 3 270M's architecture (random weights) and the 13B shape
GEMMA_SPEED=(python3 bench/train_speed.py --model gemmarandom --method lora --steps 30 --results $S/train_speed.jsonl)
LLMJP_SPEED=(python3 bench/train_speed.py --model llmjp13b --method qlora --steps 20 --results $S/train_speed.jsonl)

step() {  # step NAME TIMEOUT COMMAND...: run, log to $S/NAME.log, note the outcome in $S/done.txt
  local name=$1 limit=$2; shift 2
  echo "$(date +%T) start $name" >> $S/progress.txt
  local start=$SECONDS
  timeout "$limit" "$@" > "$S/$name.log" 2>&1
  echo "$(date +%T) $name exit $? after $((SECONDS - start)) s" >> $S/progress.txt
}

pieces() { ls /tmp/model/gemma.gguf.part.* 2>/dev/null | wc -l; }

convert_gemma() {  # once all five GGUF pieces are on the machine (gpu_setup.sh piece, one per call)
  [ "$(pieces)" = 5 ] && bash bench/gpu_setup.sh model > $S/convert.log 2>&1 && touch /tmp/model/converted
}

gemma_model() {  # the real model if its conversion is done or under way (waited for), else random weights
  local waited=0
  while [ "$(pieces)" = 5 ] && [ ! -f /tmp/model/converted ] && [ $waited -lt 180 ]; do sleep 5; waited=$((waited + 5)); done
  [ -f /tmp/model/converted ] && echo gemma || echo gemmarandom
}

ddp() {  # DDP scaling, per-rank profiles, two independent 1-GPU runs side by side, compiled layers
  step ddp_scaling 400 python3 bench/ddp_scaling.py --cases gemmarandom-lora --variants 1gpu,2gpu-same-gpu \
    --steps 20 --results $S/ddp_scaling.jsonl
  step profile_1gpu 240 python3 bench/step_profile.py --gpus 1 --label 1gpu --out-dir $S/profile
  step profile_2gpu 240 python3 bench/step_profile.py --gpus 2 --label 2gpu --out-dir $S/profile
  # two independent one-GPU runs at once: if each is as fast as alone, the host is not what slows DDP
  CUDA_VISIBLE_DEVICES=0 step profile_side0 240 python3 bench/step_profile.py --gpus 1 --label side0 \
    --out-dir $S/profile &
  CUDA_VISIBLE_DEVICES=1 step profile_side1 240 python3 bench/step_profile.py --gpus 1 --label side1 \
    --out-dir $S/profile
  wait
  # compiled layers cut the Python and launch work of each step, which two processes on one host share
  step ddp_scaling_compile 400 python3 bench/ddp_scaling.py --cases gemmarandom-lora --variants 1gpu,2gpu-same-gpu \
    --steps 20 --set train.compile=true --results $S/ddp_scaling.jsonl --out /tmp/bench-ddp-compile
}

ddp_logged() {  # a log line every 10 steps (the course config's), not every step: no per-step host sync across ranks
  step ddp_scaling_logged 400 python3 bench/ddp_scaling.py --cases gemmarandom-lora --variants 1gpu,2gpu-same-gpu \
    --steps 40 --set train.compile=true --set train.logging_steps=10 --results $S/ddp_scaling.jsonl \
    --out /tmp/bench-ddp-logged
}

fsdp() {  # full fine-tuning whose state does not fit one GPU (7.2B shape on 80 GB cards, 13B on H200), 13B QLoRA sharded
  convert_gemma &  # on the CPU while the FSDP cases run
  local big=7.2b
  [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 100000 ] && big=13b
  step multi_gpu 600 python3 bench/multi_gpu.py --cases fsdp-full-$big,full-$big-1gpu,fsdp-qlora-13b \
    --steps 10 --results $S/multi_gpu.jsonl --out /tmp/bench-multi-gpu
}

gemma_side() {  # GPU 0
  local model
  model=$(gemma_model)
  echo "gemma side uses $model" >> $S/progress.txt
  step speed_gemma_trl 300 python3 bench/train_speed.py --model "$model" --method lora --variant baseline --steps 30 \
    --results $S/train_speed.jsonl
  step speed_gemma_eager 300 python3 bench/train_speed.py --model "$model" --method lora --variant tunebench \
    --steps 30 --set train.compile=false --results $S/train_speed.jsonl
  step speed_gemma_compile 400 python3 bench/train_speed.py --model "$model" --method lora --variant tunebench \
    --steps 30 --set train.compile=true --results $S/train_speed.jsonl
  step generate_gemma 400 python3 bench/generate_speed.py --run "/tmp/bench-speed/$model-lora+compile=false-512" \
    --tasks /tmp/tv.jsonl --variants current merged merged+stops merged+stops+graphs --out-dir $S/generate-gemma
  local random=()
  [ "$model" = gemmarandom ] && random=(--set model.name_or_path=/tmp/gemma270m-random --set model.tokenizer=/tmp/gemma-tok)
  step epochs3_compile 400 python3 -m tunebench.cli train src/tunebench/presets/quickstart.yaml "${random[@]}" \
    --run-dir /tmp/epochs3-compile --set train.method=lora --set train.max_steps=null --set train.num_train_epochs=3 \
    --set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=4 --set train.warmup_steps=10 \
    --set train.logging_steps=10 --set train.save_steps=100000 --set data.max_seq_length=512 --set train.compile=true
}

llmjp_side() {  # GPU 1
  step speed_13b_trl 400 python3 bench/train_speed.py --model llmjp13b --method qlora --variant baseline --steps 20 \
    --results $S/train_speed.jsonl
  step speed_13b_eager 300 python3 bench/train_speed.py --model llmjp13b --method qlora --variant tunebench \
    --steps 20 --set train.compile=false --results $S/train_speed.jsonl
  step speed_13b_compile 400 python3 bench/train_speed.py --model llmjp13b --method qlora --variant tunebench \
    --steps 20 --set train.compile=true --results $S/train_speed.jsonl
  step generate_13b 330 python3 bench/generate_speed.py --run /tmp/bench-speed/llmjp13b-qlora+compile=false-512 \
    --tasks /tmp/tv.jsonl --fold-ids 99487 --one-prompt-tokens 64 --variants merged+stops merged+stops+graphs \
    --out-dir $S/generate-13b
}

speed() {  # issue 15, one GPU each
  CUDA_VISIBLE_DEVICES=0 gemma_side &
  CUDA_VISIBLE_DEVICES=1 llmjp_side
  wait
}

fsdp_3.7b() {
  step multi_gpu_3.7b 500 python3 bench/multi_gpu.py --cases fsdp-full-3.7b,full-3.7b-1gpu --steps 10 \
    --results $S/multi_gpu.jsonl --out /tmp/bench-multi-gpu
}

compiled_offload() {  # issue 15, one GPU each: compiled layers with frozen-weight offload
  CUDA_VISIBLE_DEVICES=0 compiled_offload_gemma &
  CUDA_VISIBLE_DEVICES=1 compiled_offload_13b
  wait
}

compiled_offload_gemma() {  # GPU 0: Gemma 3 270M architecture, random weights
  local speed=("${GEMMA_SPEED[@]}")
  step ci_gemma_trl 300 "${speed[@]}" --variant baseline
  step ci_gemma_default 300 "${speed[@]}" --variant tunebench
  step ci_gemma_eager 300 "${speed[@]}" --variant tunebench --set train.compile=false
  step ci_gemma_offload 300 "${speed[@]}" --variant tunebench --set train.offload_frozen=true
  step ci_gemma_offload_slab32 300 "${speed[@]}" --variant tunebench --set train.offload_frozen=true --logit-slab-mib 32
  step ci_gemma_offload_slab16 300 "${speed[@]}" --variant tunebench --set train.offload_frozen=true --logit-slab-mib 16
  step ci_gemma_epochs3 400 python3 -m tunebench.cli train src/tunebench/presets/quickstart.yaml \
    --set model.name_or_path=/tmp/gemma270m-random --set model.tokenizer=/tmp/gemma-tok \
    --run-dir /tmp/epochs3-compile --set train.method=lora --set train.max_steps=null --set train.num_train_epochs=3 \
    --set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=4 --set train.warmup_steps=10 \
    --set train.logging_steps=10 --set train.save_steps=100000 --set data.max_seq_length=512 \
    --set train.offload_frozen=true
  step ci_gemma_profile 300 python3 bench/step_profile.py --case gemmarandom-lora --label gemma-compiled \
    --out-dir $S/profile
}

compiled_offload_13b() {  # GPU 1: llm-jp-3-13b shape QLoRA
  local speed=("${LLMJP_SPEED[@]}")
  step ci_13b_trl 400 "${speed[@]}" --variant baseline
  step ci_13b_default 400 "${speed[@]}" --variant tunebench
  step ci_13b_no_offload 400 "${speed[@]}" --variant tunebench --set train.offload_frozen=false
  step ci_13b_eager 400 "${speed[@]}" --variant tunebench --set train.compile=false
  step ci_13b_profile 300 python3 bench/step_profile.py --case llmjp13b-qlora --label 13b-compiled-offload \
    --steps 10 --count 2 --set train.offload_frozen=true --out-dir $S/profile
}

random_gemma_run() {  # random_gemma_run STEP: a 5-step LoRA run of random-weight Gemma for the decode benches
  step "$1" 300 python3 bench/train_speed.py --model gemmarandom --method lora --variant tunebench \
    --steps 5 --set train.compile=false --results $S/train_speed.jsonl
}

real_gemma_run() {  # waits for the five GGUF pieces, converts them, trains a LoRA run of 30 steps on the real model
  local waited=0
  while [ "$(pieces)" != 5 ] && [ $waited -lt 400 ]; do sleep 3; waited=$((waited + 3)); done
  step gd_convert 300 bash bench/gpu_setup.sh model && touch /tmp/model/converted
  [ -f /tmp/model/converted ] || return 1
  step gd_train 300 python3 bench/train_speed.py --model gemma --method lora --variant tunebench --steps 30 \
    --set train.compile=false --results $S/train_speed.jsonl
}

graphs() {  # issue 15's generation bar, one GPU each
  CUDA_VISIBLE_DEVICES=0 graphs_gemma &
  CUDA_VISIBLE_DEVICES=1 graphs_13b
  wait
}

graphs_gemma() {  # GPU 0: random weights at once (every answer runs to 512 tokens), then the real model
  local gen=(python3 bench/generate_speed.py --tasks /tmp/tv.jsonl)
  random_gemma_run gd_random_train
  step gd_random_generate 400 "${gen[@]}" --run /tmp/bench-speed/gemmarandom-lora+compile=false-512 \
    --variants merged+stops+graphs+compile merged+stops+graphs merged+stops --out-dir $S/generate-gemmarandom
  real_gemma_run || return
  # a fresh inductor cache: the first `tunebench generate` on a machine; then a second process reuses it
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache-gemma
  step gd_generate 500 "${gen[@]}" --run /tmp/bench-speed/gemma-lora+compile=false-512 \
    --variants current merged+stops merged+stops+graphs+compile merged+stops+graphs --out-dir $S/generate-gemma
  step gd_generate_again 300 "${gen[@]}" --run /tmp/bench-speed/gemma-lora+compile=false-512 \
    --variants merged+stops+graphs+compile graphs-sdpa graphs-whole-batch --out-dir $S/generate-gemma
}

graphs_13b() {  # GPU 1: the 4-bit llm-jp-3-13b shape + LoRA (random weights) answering the tasks
  step gd_13b_train 400 python3 bench/train_speed.py --model llmjp13b --method qlora --variant tunebench \
    --steps 5 --set train.compile=false --results $S/train_speed.jsonl
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache-13b
  step gd_13b_generate 500 python3 bench/generate_speed.py --run /tmp/bench-speed/llmjp13b-qlora+compile=false-512 \
    --tasks /tmp/tv.jsonl --fold-ids 99487 --one-prompt-tokens 64 --variants merged+stops+graphs+compile \
    merged+stops+graphs merged+stops \
    --out-dir $S/generate-13b
}

graphs_final() {  # the compiled decode loop once each layer is no graph of its own: one GPU each
  CUDA_VISIBLE_DEVICES=0 graphs_final_gemma &
  CUDA_VISIBLE_DEVICES=1 graphs_13b
  wait
}

graphs_final_gemma() {  # GPU 0: the real Gemma 3 270M + LoRA (its GGUF pieces come one per call)
  local gen=(python3 bench/generate_speed.py --tasks /tmp/tv.jsonl --run /tmp/bench-speed/gemma-lora+compile=false-512)
  real_gemma_run || return
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache-gemma  # fresh: the first `tunebench generate` on a machine
  step gd_generate 400 "${gen[@]}" --variants merged+stops+graphs+compile merged+stops merged+stops+graphs \
    --out-dir $S/generate-gemma
  step gd_generate_again 300 "${gen[@]}" --variants merged+stops+graphs+compile --out-dir $S/generate-gemma-again
  step gd_profile 300 python3 bench/decode_profile.py --run /tmp/bench-speed/gemma-lora+compile=false-512
}

host() {  # issue 15's training bars, one GPU each: the host side of a step
  CUDA_VISIBLE_DEVICES=0 host_gemma &
  CUDA_VISIBLE_DEVICES=1 host_13b
  wait
}

epochs3() {  # epochs3 NAME [ENV=VALUE ...] -- [--set ...]: the 3-epoch megagon run (course settings, random-weight Gemma)
  local name=$1 envs=(); shift
  while [ "$#" -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  step "$name" 400 env "${envs[@]}" python3 -m tunebench.cli train src/tunebench/presets/quickstart.yaml \
    --set model.name_or_path=/tmp/gemma270m-random --set model.tokenizer=/tmp/gemma-tok \
    --run-dir "/tmp/$name" --set train.method=lora --set train.max_steps=null --set train.num_train_epochs=3 \
    --set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=4 --set train.warmup_steps=10 \
    --set train.logging_steps=10 --set train.save_steps=100000 --set data.max_seq_length=512 "$@"
}

host_gemma() {  # GPU 0: Gemma 3 270M architecture, random weights; checkpointing on (the default then) unless unset
  local speed=("${GEMMA_SPEED[@]}" --variant tunebench --set train.gradient_checkpointing=true)
  local nockpt=(--set train.gradient_checkpointing=false)
  step h_gemma_default 300 "${speed[@]}"
  step h_gemma_cpp 500 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" --tag cpp_wrapper
  step h_gemma_nockpt 300 "${speed[@]}" "${nockpt[@]}"
  step h_gemma_nockpt_graphs 400 env TORCHINDUCTOR_CUDAGRAPHS=1 "${speed[@]}" "${nockpt[@]}" --tag inductor_cudagraphs
  step h_gemma_nockpt_cpp 500 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" "${nockpt[@]}" --tag cpp_wrapper
  step h_gemma_graphs 300 env TORCHINDUCTOR_CUDAGRAPHS=1 "${speed[@]}" --tag inductor_cudagraphs
  step h_gemma_trl 300 "${GEMMA_SPEED[@]}" --variant baseline
  epochs3 epochs3-default -- --set train.gradient_checkpointing=true
  epochs3 epochs3-nockpt-graphs TORCHINDUCTOR_CUDAGRAPHS=1 -- "${nockpt[@]}"
  epochs3 epochs3-cpp TORCHINDUCTOR_CPP_WRAPPER=1 -- --set train.gradient_checkpointing=true
  step h_gemma_profile_nockpt 300 python3 bench/step_profile.py --case gemmarandom-lora --label gemma-nockpt \
    "${nockpt[@]}" --out-dir $S/profile
}

host_13b() {  # GPU 1: llm-jp-3-13b shape QLoRA
  local speed=("${LLMJP_SPEED[@]}")
  step h_13b_default 500 "${speed[@]}" --variant tunebench
  step h_13b_cpp 500 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" --variant tunebench --tag cpp_wrapper
  step h_13b_trl 400 "${speed[@]}" --variant baseline
}

levers() {  # issue 15's training bars with the levers of 'host' as defaults, one GPU each
  CUDA_VISIBLE_DEVICES=0 levers_gemma &
  CUDA_VISIBLE_DEVICES=1 levers_13b
  wait
  python3 bench/train_speed.py --compare /tmp/bench-speed/gemmarandom-lora-512 \
    /tmp/bench-speed/gemmarandom-lora+cuda_graphs=false-512 > $S/graphs_vs_compiled_losses.txt 2>&1
}

levers_gemma() {  # GPU 0: Gemma 3 270M architecture, random weights
  local speed=("${GEMMA_SPEED[@]}")
  step l_gemma_trl 300 "${speed[@]}" --variant baseline
  step l_gemma_default 300 "${speed[@]}" --variant tunebench
  step l_gemma_nographs 300 "${speed[@]}" --variant tunebench --set train.cuda_graphs=false
  step l_gemma_lean 300 "${speed[@]}" --variant tunebench --set train.gradient_checkpointing=true
  epochs3 epochs3-defaults --
}

levers_13b() {  # GPU 1: llm-jp-3-13b shape QLoRA
  local speed=("${LLMJP_SPEED[@]}")
  step l_13b_trl 400 "${speed[@]}" --variant baseline
  step l_13b_default 500 "${speed[@]}" --variant tunebench
}

dequant() {  # issue 15's 13B bar: bitsandbytes' per-matmul host calls replaced by traced dequantisation
  local speed=("${LLMJP_SPEED[@]}")
  CUDA_VISIBLE_DEVICES=1 step dq_13b_trl 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=0 step dq_13b_dequant 500 "${speed[@]}" --variant tunebench --set train.compile_dequant=true
  wait
  CUDA_VISIBLE_DEVICES=1 step dq_13b_default 500 "${speed[@]}" --variant tunebench &
  CUDA_VISIBLE_DEVICES=0 step dq_13b_profile 300 python3 bench/step_profile.py --case llmjp13b-qlora \
    --label 13b-compile-dequant --steps 10 --count 2 --set train.compile_dequant=true --out-dir $S/profile
  wait
}

dequant_ab() {  # the same again, paired: candidate beside TRL (GPUs swapped), then beside the defaults
  local speed=("${LLMJP_SPEED[@]}") dq=(--variant tunebench --set train.compile_dequant=true)
  CUDA_VISIBLE_DEVICES=0 step ab_13b_trl 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=1 step ab_13b_dequant 500 "${speed[@]}" "${dq[@]}"
  wait
  CUDA_VISIBLE_DEVICES=0 step ab_13b_default 500 "${speed[@]}" --variant tunebench &
  CUDA_VISIBLE_DEVICES=1 step ab_13b_dequant2 500 "${speed[@]}" "${dq[@]}"
  wait
  CUDA_VISIBLE_DEVICES=1 step ab_13b_trl2 400 "${speed[@]}" --variant baseline &
  TORCHINDUCTOR_SIZE_ASSERTS=0 TORCHINDUCTOR_ALIGNMENT_ASSERTS=0 CUDA_VISIBLE_DEVICES=0 \
    step ab_13b_dequant_noasserts 500 "${speed[@]}" "${dq[@]}" --tag noasserts
  wait
}

qlora_defaults() {  # the 13B shape with nothing set (compile_dequant auto) beside TRL, then the GPUs swapped
  local speed=("${LLMJP_SPEED[@]}")
  CUDA_VISIBLE_DEVICES=1 step qd_13b_trl 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=0 step qd_13b_default 500 "${speed[@]}" --variant tunebench
  wait
  CUDA_VISIBLE_DEVICES=0 step qd_13b_trl2 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=1 step qd_13b_default2 500 "${speed[@]}" --variant tunebench
  wait
}

host13b() {  # the 13B shape: dynamo's guard checks skipped (train.compile_skip_guards, auto: on), inductor's C++ wrapper
  local speed=("${LLMJP_SPEED[@]}")
  CUDA_VISIBLE_DEVICES=1 step hb_13b_trl 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=0 step hb_13b_cpp 900 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" --variant tunebench --tag cpp_wrapper
  wait
  CUDA_VISIBLE_DEVICES=0 step hb_13b_previous 500 "${speed[@]}" --variant tunebench --set train.compile_skip_guards=false &
  CUDA_VISIBLE_DEVICES=1 step hb_13b_guards 500 "${speed[@]}" --variant tunebench
  wait
  CUDA_VISIBLE_DEVICES=0 step hb_13b_trl2 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=1 step hb_13b_guards2 500 "${speed[@]}" --variant tunebench --tag again
  wait
}

host13b_swap() {  # after host13b (inductor's cache warm): the GPUs swapped
  local speed=("${LLMJP_SPEED[@]}")
  CUDA_VISIBLE_DEVICES=0 step hb_13b_trl3 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=1 step hb_13b_cpp2 600 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" --variant tunebench --tag cpp_swapped
  wait
  CUDA_VISIBLE_DEVICES=1 step hb_13b_trl4 400 "${speed[@]}" --variant baseline &
  CUDA_VISIBLE_DEVICES=0 step hb_13b_guards3 500 "${speed[@]}" --variant tunebench --tag swapped
  wait
  CUDA_VISIBLE_DEVICES=0 step hb_13b_cpp3 500 env TORCHINDUCTOR_CPP_WRAPPER=1 "${speed[@]}" --variant tunebench --tag beside_guards &
  CUDA_VISIBLE_DEVICES=1 step hb_13b_guards4 500 "${speed[@]}" --variant tunebench --tag beside_cpp
  wait
}

norms() {  # one GPU: the uncompiled decode loop with fused RMSNorms against the norms as written and compiled
  local gen=(python3 bench/generate_speed.py --tasks /tmp/tv.jsonl --run /tmp/bench-speed/gemma-lora+compile=false-512)
  random_gemma_run nr_random_train
  step nr_profile 300 python3 bench/decode_profile.py --run /tmp/bench-speed/gemmarandom-lora+compile=false-512
  real_gemma_run || return
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache-gemma  # fresh: the first `tunebench generate` on a machine
  step nr_generate 400 "${gen[@]}" --variants merged+stops+graphs graphs-unfused-norms merged+stops+graphs+compile \
    --out-dir $S/generate-gemma
  # a new process, the other order: the first variant in a process pays its CUDA start-up
  step nr_generate_swapped 300 "${gen[@]}" --variants graphs-unfused-norms merged+stops+graphs \
    --out-dir $S/generate-gemma-swapped
}

inputs() {  # one GPU: the loop's own step inputs (masks, cache writes, rotary table, penalty by ids) and Gemma's fused
  # one-token layers against the loop before them (commit f7c5edb's src and bench, unpacked in /tmp/base)
  local run=/tmp/bench-speed/gemma-lora+compile=false-512
  local now=(python3 bench/generate_speed.py --tasks /tmp/tv.jsonl --run $run)
  local before=(python3 /tmp/base/bench/generate_speed.py --tasks /tmp/tv.jsonl --run $run)
  random_gemma_run in_random_train
  step in_profile 400 python3 bench/decode_profile.py --run /tmp/bench-speed/gemmarandom-lora+compile=false-512
  real_gemma_run || return
  # four processes, now and before alternating: the first pass of a process pays its CUDA start-up; the first
  # process compiles decode_kernels' Triton kernel into a fresh cache (as on a new machine), the second reuses it
  export TRITON_CACHE_DIR=/tmp/triton-cache-generate
  step in_now 300 "${now[@]}" --phases --variants merged+stops+graphs graphs-no-layer-kernel graphs-unfused-layers \
    --out-dir $S/generate-now
  step in_before 200 "${before[@]}" --variants merged+stops+graphs --out-dir $S/generate-before
  step in_now_swapped 300 "${now[@]}" --variants graphs-no-layer-kernel merged+stops+graphs --out-dir $S/generate-now-swapped
  step in_before_again 200 "${before[@]}" --variants merged+stops+graphs --out-dir $S/generate-before-again
}

inputs_check() {  # one GPU: the loop as committed after review, on random-weight Gemma: the kernel check and step
  # profile, then the 100 tasks (every answer runs to 512 tokens) through the default and without the layer kernel
  random_gemma_run ic_random_train
  step ic_profile 400 python3 bench/decode_profile.py --run /tmp/bench-speed/gemmarandom-lora+compile=false-512
  step ic_generate 300 python3 bench/generate_speed.py --tasks /tmp/tv.jsonl \
    --run /tmp/bench-speed/gemmarandom-lora+compile=false-512 --variants merged+stops+graphs graphs-no-layer-kernel \
    --out-dir $S/generate-check
}

inputs_13b() {  # one GPU: the 4-bit llm-jp-3-13b shape + LoRA (random weights) answering the tasks, now and before
  local run=/tmp/bench-speed/llmjp13b-qlora+compile=false-512
  local args=(--tasks /tmp/tv.jsonl --run $run --fold-ids 99487 --one-prompt-tokens 64 --variants merged+stops+graphs)
  step in_13b_train 500 python3 bench/train_speed.py --model llmjp13b --method qlora --variant tunebench \
    --steps 5 --set train.compile=false --results $S/train_speed.jsonl
  step in_13b_now 300 python3 bench/generate_speed.py "${args[@]}" --out-dir $S/generate-13b-now
  step in_13b_before 300 python3 /tmp/base/bench/generate_speed.py "${args[@]}" --out-dir $S/generate-13b-before
}

attention_kernels() {  # attention_kernels PREFIX PROCESS...: Gemma's one-token attention in Triton kernels
  # (decode_attention_kernels.py) against the loop before them (commit 1e18115's src and bench, or for `warmup`
  # c0bc141's, in /tmp/base): kernel
  # checks and step profile on random weights, then the real model + LoRA answering the tasks, one process each
  # (now_cold: an empty Triton cache, as on a new machine; now: first pass timed by phases; before, before_again,
  # now_again: as the variant alone)
  local prefix=$1 run=/tmp/bench-speed/gemma-lora+compile=false-512
  shift
  local now=(python3 bench/generate_speed.py --tasks /tmp/tv.jsonl --run $run)
  local before=(python3 /tmp/base/bench/generate_speed.py --tasks /tmp/tv.jsonl --run $run)
  random_gemma_run ${prefix}_random_train
  step ${prefix}_profile 400 python3 bench/decode_profile.py --run /tmp/bench-speed/gemmarandom-lora+compile=false-512
  real_gemma_run || return
  export TRITON_CACHE_DIR=/tmp/triton-cache-$prefix
  local process
  for process in "$@"; do
    case $process in
      now_cold) step ${prefix}_now_cold 300 "${now[@]}" --first-pass-phases \
                  --variants merged+stops+graphs graphs-no-attention-kernels --out-dir $S/generate-now-cold ;;
      now) step ${prefix}_now 300 "${now[@]}" --first-pass-phases --variants merged+stops+graphs --out-dir $S/generate-now ;;
      now_again) step ${prefix}_now_again 300 "${now[@]}" --variants merged+stops+graphs --out-dir $S/generate-now-again ;;
      before*) step ${prefix}_$process 200 "${before[@]}" --variants merged+stops+graphs \
                 --out-dir $S/generate-${process//_/-} ;;
    esac
  done
}

# as run on the session's first machine (the chunk count then a compile-time constant; its now_cold also ran
# --phases and the variant without the kernels in now_again), and on the second, as committed
attn() { attention_kernels at now_cold before now before_again now_again; }
attn_final() { attention_kernels af now_cold before now now_again; }
# the kernels warmed while the model loads (decode_warmup.py) against the loop without (c0bc141 in /tmp/base)
warmup() { attention_kernels wu now_cold before now before_again now_again; }

collect() {
  local out=${OUT:-/tmp/out}
  mkdir -p "$out"
  cp -r $S/. "$out/" 2>/dev/null
  for run in /tmp/bench-speed/*-512 /tmp/bench-speed/*/*-512 /tmp/epochs3-*; do
    local name=${run#/tmp/bench-speed/}
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$out/metrics-${name//\//_}.jsonl"
  done
  for log in /tmp/bench-multi-gpu/*.log; do [ -f "$log" ] && tail -40 "$log" > "$out/multi_gpu-$(basename "$log")"; done
  python3 bench/train_speed.py --table $S/train_speed.jsonl 2>/dev/null
  python3 bench/ddp_scaling.py --table $S/ddp_scaling.jsonl 2>/dev/null
  python3 bench/step_profile.py --table --out-dir $S/profile 2>/dev/null
  for dir in $S/generate-*; do
    [ -f "$dir/generate_speed.jsonl" ] && python3 bench/generate_speed.py --table "$dir/generate_speed.jsonl" 2>/dev/null
  done
}

case "${1:-run}" in
  run) shift; for part in "${@:-ddp fsdp speed fsdp_3.7b}"; do for p in $part; do "$p"; done; done
       echo "$(date +%T) all done" >> $S/progress.txt ;;
  status) cat $S/progress.txt; nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader ;;
  collect) collect ;;
esac
