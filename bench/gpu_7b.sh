#!/usr/bin/env bash
# coin at LLaVA-1.5-7B's shapes on one GPU machine, about 9 minutes; every result goes to one folder:
#   bash bench/gpu_7b.sh [OUT]      (default out/bench-7b/; results.jsonl, one JSON line a measurement, and the logs)
# Needs a CUDA build of torch 2.13 and requirements.txt; no download (random weights, bench/llava7b.py). Each section
# has a time budget (--budget_s: no new measurement after it) inside a hard timeout; at the end every GPU peak is
# printed beside bench/memory.py's fake-tensor figure for the same configuration. On several GPUs, section 4 gives
# the memory per GPU when sharded over all of them. SHAPES=tiny runs the same script at toy shapes (a CPU will do).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/bench-7b}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee "$OUT/versions.txt"
ARGS=(bench/llava7b.py --shapes="${SHAPES:-7b}" --out="$OUT/results.jsonl")
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

# 0. The same configurations on fake tensors (bench/memory.py: no GPU, one CPU core each, in the background while the
#    GPU works, ~5 min): printed at the end beside every GPU peak. llava7b.py's step has one micro-batch (--accum=1)
SEQ=$([ "${SHAPES:-7b}" = tiny ] && echo 24 || echo 700)   # llava7b.py's sequence and prompt length
FAKE=(bench/memory.py --shapes="${SHAPES:-7b}" --grid=lists --accum=1 --seq="$SEQ" --prompt="$SEQ")
export OMP_NUM_THREADS=1
timeout 900 python "${FAKE[@]}" --only=train --adapters=lora,moelora --dropout=0,0.05 --grad_ckpt=1 \
    --micro_batches=1,4,8,16 --out="$OUT/fake-1.jsonl" > "$OUT/0-fake-1.txt" 2>&1 &
timeout 900 python "${FAKE[@]}" --only=train --adapters=lora,moelora --dropout=0.05 --grad_ckpt=0 \
    --micro_batches=1,4,8 --out="$OUT/fake-2.jsonl" > "$OUT/0-fake-2.txt" 2>&1 &
timeout 900 python "${FAKE[@]}" --only=eval --eval_batches=16,64 --new_tokens=32 --out="$OUT/fake-3.jsonl" \
    > "$OUT/0-fake-3.txt" 2>&1 &
if [ "$GPUS" -gt 1 ]; then
    timeout 900 python "${FAKE[@]}" --only=train --adapters=moelora --dropout=0.05 --ranks="$GPUS" \
        --micro_batches=1,4,8 --out="$OUT/fake-4.jsonl" > "$OUT/0-fake-4.txt" 2>&1 &
fi
unset OMP_NUM_THREADS

# 1. The 7B recipe (gradient checkpointing on): LoRA vs MoELoRA (r=128, E=8), dropout 0 vs 0.05, micro-batches
#    1/4/8/16, then generation at batch 16 and 64 (~4.5 min)
timeout 300 python "${ARGS[@]}" --adapters=lora,moelora --dropout=0,0.05 --grad_ckpt=1 --micro_batches=1,4,8,16 \
    --gen_batches=16,64 --budget_s=260 2>&1 | tee "$OUT/1-grad-ckpt.txt"
# 2. Without gradient checkpointing: faster steps, and where memory runs out (~2 min)
timeout 140 python "${ARGS[@]}" --adapters=lora,moelora --dropout=0.05 --grad_ckpt=0 --micro_batches=1,4,8 \
    --gen_batches= --budget_s=110 2>&1 | tee "$OUT/2-no-grad-ckpt.txt"
# 3. FSDP2 (coin.py --shard) on one rank: what its gather/scatter machinery costs with nothing to shard over (~1 min)
timeout 80 python "${ARGS[@]}" --adapters=moelora --dropout=0.05 --grad_ckpt=1 --shard=1 --micro_batches=4,8 \
    --gen_batches=16 --budget_s=50 2>&1 | tee "$OUT/3-shard-1-gpu.txt"
# 4. Sharded over every GPU of the machine (several GPUs only): memory held and peak per GPU
if [ "$GPUS" -gt 1 ]; then
    timeout 120 torchrun --nproc_per_node="$GPUS" "${ARGS[@]}" --adapters=moelora \
        --dropout=0.05 --grad_ckpt=1 --shard=1 --micro_batches=1,4,8 --gen_batches=16 --budget_s=90 2>&1 \
        | tee "$OUT/4-shard-$GPUS-gpus.txt"
fi
# 5. Every GPU peak beside the fake-tensor peak of section 0 (the CUDA context is in neither)
wait
cat "$OUT"/fake-*.jsonl > "$OUT/fake.jsonl" 2>/dev/null
python bench/memory.py --against="$OUT/results.jsonl" --out="$OUT/fake.jsonl" | tee "$OUT/5-gpu-vs-fake.txt"
echo "results: $OUT/results.jsonl, fake-tensor figures: $OUT/fake.jsonl"
