#!/usr/bin/env bash
# coin, end to end on a laptop CPU: the CoIN experiment in miniature.
# A tiny LLaVA is instruction-tuned on eight tasks in sequence (ScienceQA, TextVQA, ImageNet, GQA, VizWiz,
# Grounding, VQAv2, OCR-VQA), evaluated after each task on every task seen so far, once with plain LoRA and once
# with MoELoRA (8 experts, same total rank). About 10-15 minutes on 2 cores. Everything lands under out/.
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false
T0=$(date +%s); TSTART=$T0; PHASES=""
phase() { PHASES+="$(printf '%-34s %5d s' "$1" $(( $(date +%s) - T0 )))\n"; T0=$(date +%s); }  # wall time per section

# --- 1. CoIN-mini: eight synthetic tasks in the official CoIN layout, plus the stage-0 caption corpus.
# Seeded and deterministic (pillow only). ~20 s, ~200 MB in data/coin-mini. Skipped if already there.
[ -f data/coin-mini/coin_mini.json ] || python data.py mini --out=data/coin-mini
phase "1. CoIN-mini data"

# --- 2. The tiny base: a 1.9M-parameter LlavaForConditionalGeneration (CLIP tower, projector, Llama LM) with its
# own BPE tokenizer, pretrained on the stage-0 captions only, so it knows the content of the images but none of
# the tasks' answer formats -- like the pretrain-only LLaVA-1.5 base of the paper. It ships in assets/tiny-llava;
# to rebuild it (~30 min on 2 idle cores): python coin.py --stage0 --base=assets/tiny-llava
[ -f assets/tiny-llava/config.json ] || python coin.py --stage0 --base=assets/tiny-llava
phase "2. tiny base"

# --- 3. Sequential instruction tuning with plain LoRA (E = 1, r = 16): the baseline. ~5 min.
# Evaluates the base zero-shot first, then trains each task one epoch and evaluates every task seen so far.
# Adapter dropout off in both runs (official: 0.05): on a CPU, drawing a mask per expert costs MoELoRA E=8 more
# than its whole adapter (README sections 7 and 8).
python coin.py --tasks=all --experts=1 --lora_dropout=0 --out=out/lora
phase "3. LoRA, 8 stages (see results.json timing)"

# --- 4. The same with MoELoRA (E = 8 experts of rank 2, total r = 16, dense softmax router per linear). ~5 min.
python coin.py --tasks=all --experts=8 --lora_dropout=0 --out=out/moelora
phase "4. MoELoRA, 8 stages"

# --- 5. The comparison: final accuracies, MAA and BWT for Instruction Following and General Knowledge. Instant.
python eval.py --compare=out/lora,out/moelora

phase "5. comparison"
printf "\nWall time by section:\n${PHASES}total %34d s\n" $(( $(date +%s) - TSTART ))
