#!/usr/bin/env bash
# The whole GPU check in one call, from the repository root; it cannot come back empty:
#
#     bash scripts/gpu_check.sh          # on the device: OUT=<the folder that comes back>, a time limit of 590 s
#
# 1. A preflight: the dev set, tiktoken's files and the anchor script must be there (only the repository travels
#    to the GPU machine: copy ../shared/{squad_v2,tiktoken_cache,anchors} into .gpu/ first), else it says in one
#    line what is missing and stops. No download is tried (HF_HUB_OFFLINE=1). The GPU, torch, CUDA and the
#    attention backends SDPA can use at gpt2 shapes go in the log.
# 2. The steps, most valuable first, within $GPU_CHECK_BUDGET seconds (480) in all: the HF + PEFT anchor and
#    bench.py at gpt2 shapes, batch 16 x 512, r=4 (ours eager with a profile, then compiled); the seed recipe end to
#    end (1200 steps of 50 sequences cut in two where padding is least, the eval loss on 500 questions every 200
#    steps) and evaluate.py on it; answering all 11,873 dev questions; the CUDA tests (a time limit per test); the
#    gpt2-medium pair; answers/s with 1, 4 and 16 adapters mixed in one batch (serve.py's batching) against one
#    adapter at a time; gpt2-xl shapes eager with the base in bf16, then nf4; the seed's steps without the cut.
#    Each step runs under `timeout -k` (SIGTERM at its limit, SIGKILL 10 s later); a step that no longer fits the
#    budget is skipped. Every step, run, failed, cut off or skipped, is a row of the summary.
# 3. After EVERY step the summary (scripts/gpu_summary.py) is rewritten, and with $OUT set the logs are packed
#    into $OUT/gpu-check.tgz and the summary copied to $OUT/summary.txt: a run cut off at any point still returns
#    everything measured before the cut. SIGTERM or Ctrl-C to this script ends the current step, records it as
#    cut off, and publishes.
#
# Without CUDA the same steps run on gpt2-tiny shapes for a few steps, to check the script: no figure counts then.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds for everything; the device call gets 590
DEADLINE=$((SECONDS + BUDGET))
LOG=${GPU_CHECK_LOG:-/tmp/gpu-check}  # the logs, packed into $OUT after every step
rm -rf "$LOG" && mkdir -p "$LOG" && : > "$LOG/steps.jsonl"
GPU="(preflight)"

publish() {  # the summary, and with $OUT the logs and the summary there; run after every step
  $PY scripts/gpu_summary.py "$LOG" "$GPU" > "$LOG/summary.txt" 2>&1
  if [[ -n ${OUT:-} ]]; then
    tar czf "$OUT/.gpu-check.tgz" -C "$LOG" --exclude='*.pt' --exclude='*.safetensors' . \
      && mv "$OUT/.gpu-check.tgz" "$OUT/gpu-check.tgz"
    cp "$LOG/summary.txt" "$OUT/summary.txt"
  fi
}
row() {  # name, status, exit code, seconds, why
  printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %d, "why": "%s"}\n' "$@" >> "$LOG/steps.jsonl"
  printf '%-14s %-9s %4ss  %s\n' "$1" "$2" "$4" "$5"
}

# ---------------------------------------------------------------------------------------------------- preflight
SHARED=${GPT2_LORA_SHARED:-$( [[ -d .gpu ]] && echo .gpu || echo ../shared )}
export GPT2_LORA_SHARED=$(cd "$SHARED" 2>/dev/null && pwd || echo "$SHARED")
export TIKTOKEN_CACHE_DIR=$GPT2_LORA_SHARED/tiktoken_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DEV=$GPT2_LORA_SHARED/squad_v2/dev-v2.0.json
ANCHOR=$GPT2_LORA_SHARED/anchors/hf_peft_bench.py
missing=()
[[ -f $DEV ]] || missing+=("the dev set ($DEV)")
[[ -n $(ls -A "$TIKTOKEN_CACHE_DIR" 2>/dev/null) ]] || missing+=("tiktoken's files ($TIKTOKEN_CACHE_DIR)")
[[ -f $ANCHOR ]] || missing+=("the anchor script ($ANCHOR)")
if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  SMALL=gpt2 MEDIUM=gpt2-medium LARGE=gpt2-xl SHAPE="--batch-size 16 --seq-len 512" SHORT=""
  XL_SHAPE="--batch-size 4 --seq-len 512" SEED_BATCH=50 MEDIUM_STEPS=10 STEPS=1200 EVERY=200 UNSPLIT=100 EVAL=500 ANSWERS=11873 LIMIT=1000 MIXED=512
elif command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then
  missing+=("CUDA for torch (nvidia-smi sees a GPU, torch.cuda does not)")
else
  GPU="no CUDA: a check of this script on gpt2-tiny shapes; no figure here counts"
  SMALL=gpt2-tiny MEDIUM=gpt2-tiny LARGE=gpt2-tiny SHAPE="--batch-size 2 --seq-len 64" XL_SHAPE=$SHAPE
  SHORT="--steps 1 --warmup 1 --answers 4" SEED_BATCH=4 MEDIUM_STEPS=1 STEPS=2 EVERY=2 UNSPLIT=2 EVAL=8 ANSWERS=8 LIMIT=8 MIXED=8
fi
if (( ${#missing[@]} )); then
  why="missing: $(IFS=';'; echo "${missing[*]}") (copy ../shared/{squad_v2,tiktoken_cache,anchors} into .gpu/)"
  row preflight failed 1 "$SECONDS" "${why//\"/\'}"
  publish
  echo "gpu_check: $why" >&2
  exit 1
fi
{
  echo "$GPU"
  $PY - <<'PY'
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():  # which SDPA kernels take gpt2's attention (bf16, 16 x 12 heads x 512 x 64)
    q = torch.randn(16, 12, 512, 64, device="cuda", dtype=torch.bfloat16)
    usable = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            usable.append(backend.name)
        except RuntimeError:
            pass
    print("SDPA backends usable at gpt2 shapes (in torch's order of preference):", ", ".join(usable))
PY
} 2>&1 | tee "$LOG/gpu.txt"
row preflight ok 0 "$SECONDS" "$(head -2 "$LOG/gpu.txt" | tail -1)"
publish

# -------------------------------------------------------------------------------------------------------- steps
running="" current="(between steps)" t0=$SECONDS
cut_off() {  # SIGTERM or Ctrl-C to the script: end the running step, record it, publish what there is
  [[ -n $running ]] && kill -TERM "$running" 2> /dev/null && wait "$running"
  row "$current" "cut off" 143 "$((SECONDS - t0))" "the check itself was stopped"
  publish
  exit 143
}
trap cut_off TERM INT

step() {  # name, time limit in seconds, command...: runs it under timeout -k, records a row, publishes
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))  # the 10 s of grace before SIGKILL come out of the budget too
  t0=$SECONDS current=$name
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    row "$name" skipped null 0 "out of time: ${left} s of the ${BUDGET} s budget left"
  else
    timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1 &
    running=$!
    wait "$running"
    local code=$?
    running="" current="(between steps)"
    case $code in
      0) row "$name" ok 0 "$((SECONDS - t0))" "" ;;
      124|137) row "$name" "timed out" "$code" "$((SECONDS - t0))" "stopped at its limit of ${limit} s" ;;
      *) row "$name" failed "$code" "$((SECONDS - t0))" "exit $code: see $name.log" ;;
    esac
  fi
  publish
}
cuda_only() {  # step ... on a GPU; a skipped row on the CPU
  if [[ $SMALL == gpt2 ]]; then step "$@"; else row "$1" skipped null 0 "no CUDA"; publish; fi
}
pytest_flags="-q -rs --durations=15"
$PY -c "import pytest_timeout" 2> /dev/null && pytest_flags+=" --timeout=60"

BENCH="bench.py $SHAPE --rank 4 --answer-batch-size 64 --max-new-tokens 32 $SHORT"
SEED="train.py --model $SMALL --init random --train-file $DEV --eval-file $DEV --eval-examples $EVAL --eval-answers 0
      --micro-batch-size $SEED_BATCH --grad-accum 1"
cuda_only anchor 75 $PY "$ANCHOR" --batch-size 16 --seq-len 512 --rank 4
step ours 50 $PY $BENCH --model $SMALL --profile
step ours-compiled 80 $PY $BENCH --model $SMALL --compile --answers 0
step seed-recipe 120 $PY $SEED --micro-batch-split 2 --max-steps $STEPS --eval-every $EVERY --out "$LOG/seed-run"
step seed-eval 40 $PY evaluate.py --checkpoint "$LOG/seed-run" --eval-file "$DEV" --limit $LIMIT --batch-size 256 \
  --out "$LOG/seed-run/metrics.json"
step dev-answers 60 $PY bench.py --model $SMALL --data "$DEV" --batch-size $SEED_BATCH --steps 1 --warmup 1 --answers $ANSWERS \
  --answer-batch-size 256 --max-new-tokens 32
step cuda-tests 100 $PY -m pytest $pytest_flags tests/test_cuda.py
cuda_only anchor-medium 40 $PY "$ANCHOR" --model gpt2-medium --batch-size 16 --seq-len 512 --rank 4 --steps 10 \
  --gen-prompts 0
step ours-medium 35 $PY $BENCH --model $MEDIUM --steps $MEDIUM_STEPS --answers 0
step mixed-adapters 40 $PY bench.py --model $SMALL $SHAPE --rank 4 --steps 1 --warmup 1 --answers $MIXED \
  --answer-batch-size 64 --max-new-tokens 32 --mixed-adapters 1 4 16
XL="bench.py --model $LARGE $XL_SHAPE $SHORT --rank 4 --answers 0"
step xl-bf16 50 $PY $XL
step xl-nf4 50 $PY $XL --quantize nf4
step seed-unsplit 30 $PY $SEED --max-steps $UNSPLIT --eval-every 100000 --log-every 10 --out "$LOG/seed-unsplit"
cat "$LOG/summary.txt"
