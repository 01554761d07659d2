#!/usr/bin/env bash
# The whole GPU check in one run of at most 8 minutes, from the repository root:
#
#     bash scripts/gpu_check.sh
#
# - the HF + PEFT anchor and bench.py on the same shapes, side by side in this one run: gpt2 at batch 16 x 512,
#   r=4, bf16 (ours eager, with a profile of where the time goes, then compiled), then gpt2-medium;
# - the CUDA tests (tests/test_cuda.py: bf16/fp16 against fp32, the bf16 output loss, half-precision answers and
#   CUDA-graph decoding, torch.compile, NCCL through torchrun, resume);
# - the seed recipe end to end (gpt2 shapes, random weights, the dev set as training data, 1200 steps of 50
#   sequences, the eval loss on 500 questions every 200 steps), evaluate.py on its checkpoint, and the same steps
#   split as the seed split them (5 x 10 micro-batches) for comparison;
# - answering all 11,873 dev questions;
# - last, if time is left: gpt2-xl shapes compiled, batch 4 x 512, with the base in bf16, nf4 and int8.
# scripts/gpu_summary.py prints the table last. Logs go to /tmp/gpu-check; with $OUT set (the folder the device
# tool brings back) they are packed into $OUT/gpu-check.tgz and the table is copied to $OUT/summary.txt. Steps have
# time limits and none starts after 560 s, so the table always comes.
#
# Data: the dev set, tiktoken's files and the anchor script come from $GPT2_LORA_SHARED, else .gpu/ (only the
# repository travels to the GPU machine: copy ../shared/{squad_v2,tiktoken_cache,anchors} there), else ../shared.
# Without CUDA the same steps run on gpt2-tiny shapes for a few steps, to check the script: no figure counts then.
set -u
cd "$(dirname "$0")/.."
SHARED=${GPT2_LORA_SHARED:-$( [[ -d .gpu/squad_v2 ]] && echo .gpu || echo ../shared )}
export GPT2_LORA_SHARED=$(cd "$SHARED" && pwd)
export TIKTOKEN_CACHE_DIR=$GPT2_LORA_SHARED/tiktoken_cache PYTHONUNBUFFERED=1
LOG=/tmp/gpu-check
rm -rf "$LOG" && mkdir -p "$LOG" && : > "$LOG/steps.jsonl"
DEADLINE=$((SECONDS + 560))
DEV=$GPT2_LORA_SHARED/squad_v2/dev-v2.0.json
ANCHOR=$GPT2_LORA_SHARED/anchors/hf_peft_bench.py
PY=${PYTHON:-python3}

if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  SMALL=gpt2 MEDIUM=gpt2-medium LARGE=gpt2-xl STEPS=1200 ANSWERS=11873 LIMIT=1000 SHORT=""
else
  GPU="no CUDA: a check of this script on gpt2-tiny shapes; no figure here counts"
  SMALL=gpt2-tiny MEDIUM=gpt2-tiny LARGE=gpt2-tiny STEPS=12 ANSWERS=64 LIMIT=16 SHORT="--steps 1 --warmup 1"
fi
echo "$GPU" | tee "$LOG/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG/gpu.txt"

step() {  # name, time limit in seconds, command...: runs it, logs it, records its exit code and duration
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  (( left < limit )) && limit=$left
  (( limit < 10 )) && { echo "skipped: out of time" > "$LOG/$name.log"; return; }
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local code=$?
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$code" "$((SECONDS - t0))" >> "$LOG/steps.jsonl"
  printf '%-14s exit %-3s %4ss\n' "$name" "$code" "$((SECONDS - t0))"
}
cuda_only() { if [[ $SMALL == gpt2 ]]; then "$@"; else echo "skipped: no CUDA" > "$LOG/$2.log"; fi; }

BENCH="bench.py --batch-size 16 --seq-len 512 --rank 4 --answer-batch-size 64 --max-new-tokens 32"
SEED="train.py --model $SMALL --init random --train-file $DEV --eval-file $DEV --eval-examples 500 --eval-answers 0"
cuda_only step anchor 80 $PY "$ANCHOR" --batch-size 16 --seq-len 512 --rank 4
step ours 60 $PY $BENCH --model $SMALL --profile $SHORT
step cuda-tests 200 $PY -m pytest -q -rs tests/test_cuda.py
step seed-recipe 120 $PY $SEED --micro-batch-size 50 --grad-accum 1 --max-steps $STEPS --out "$LOG/seed-run"
step seed-eval 60 $PY evaluate.py --checkpoint "$LOG/seed-run" --eval-file "$DEV" --limit $LIMIT --batch-size 256 \
  --out "$LOG/seed-run/metrics.json"
step dev-answers 80 $PY bench.py --model $SMALL --data "$DEV" --batch-size 50 --steps 1 --warmup 1 --answers $ANSWERS \
  --answer-batch-size 256 --max-new-tokens 32
step ours-compiled 120 $PY $BENCH --model $SMALL --compile --answers 0 $SHORT
cuda_only step anchor-medium 60 $PY "$ANCHOR" --model gpt2-medium --batch-size 16 --seq-len 512 --rank 4 --steps 10 \
  --gen-prompts 0
step ours-medium 50 $PY $BENCH --model $MEDIUM --steps 10 --answers 0 $SHORT
step seed-5x10 40 $PY $SEED --micro-batch-size 5 --grad-accum 10 --max-steps $((STEPS / 12)) --eval-every 100000 \
  --log-every 10 --out "$LOG/seed-5x10"
XL="bench.py --model $LARGE --batch-size 4 --seq-len 512 --rank 4 --answers 0 --compile $SHORT"
step xl-bf16 100 $PY $XL
step xl-nf4 100 $PY $XL --quantize nf4
step xl-int8 100 $PY $XL --quantize int8

$PY scripts/gpu_summary.py "$LOG" "$GPU" | tee "$LOG/summary.txt"
if [[ -n ${OUT:-} ]]; then
  tar czf "$OUT/gpu-check.tgz" -C "$LOG" --exclude='*.pt' . && cp "$LOG/summary.txt" "$OUT/"
fi
