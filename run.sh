#!/usr/bin/env bash
# coin, end to end on a laptop CPU: the CoIN experiment in miniature.
# A tiny LLaVA is instruction-tuned on eight tasks in sequence (ScienceQA, TextVQA, ImageNet, GQA, VizWiz,
# Grounding, VQAv2, OCR-VQA), evaluated after each task on every task seen so far, once with plain LoRA and once
# with MoELoRA (8 experts, same total rank). About 12 minutes on 2 cores. Everything lands under out/.
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false
T0=$(date +%s); TSTART=$T0; PHASES=""
phase() { PHASES+="$(printf '%-34s %5d s' "$1" $(( $(date +%s) - T0 )))\n"; T0=$(date +%s); }  # wall time per section
STUDY_NAMES="multitask lora moelora-e2 moelora-e4 moelora-e8 lora-diverse lora-10type lwf ewc replay olora"
STUDY_NAMES+=" reglora magmax merge-mean hide disco lora-asd sefe"  # the field's methods (issues 30, 31): rows to come
for m in ${STUDY_METHODS:-}; do  # section 5's run names, checked before any work
  [[ " $STUDY_NAMES " == *" $m "* ]] ||
    { echo "STUDY_METHODS: no study run is named '$m'; the names: $STUDY_NAMES" >&2; exit 1; }
done

# --- 1. CoIN-mini: eight synthetic tasks in the official CoIN layout, plus the stage-0 caption corpus.
# Seeded and deterministic (pillow only). ~35 s, ~360 MB in data/coin-mini. Kept if the folder already holds this
# generator's CoIN-mini with these settings (its coin_mini.json says so), regenerated otherwise.
python coin_mini.py --out=data/coin-mini
phase "1. CoIN-mini data"

# --- 2. The tiny base: a 1.9M-parameter LlavaForConditionalGeneration (CLIP tower, projector, Llama LM) with its
# own BPE tokenizer, pretrained on the stage-0 captions only, so it knows the content of the images but none of
# the tasks' answer formats -- like the pretrain-only LLaVA-1.5 base of the paper. It ships in assets/tiny-llava;
# to rebuild it (~40 min on 2 idle cores): python coin.py --stage0 --base=assets/tiny-llava
[ -f assets/tiny-llava/config.json ] || python coin.py --stage0 --base=assets/tiny-llava
phase "2. tiny base"

# --- 3. Sequential instruction tuning, two runs side by side: plain LoRA (E = 1, r = 16), the baseline, and MoELoRA
# (E = 8 experts of rank 2, total r = 16, a dense softmax router per linear). ~14 min for both (851 s measured).
# coin.py pins the CPU numerics before torch loads (pins.py): torch's kernels at AVX2, MKL's matmul on its CNR branch
# for every x86-64 CPU, oneDNN off, one thread: these figures to the last digit on any x86-64 CPU with AVX2 (torch
# 2.13.0), at ~1.8x the time of unpinned runs (383 s and 416 s of training unpinned, 696 s and 726 s pinned). COIN_PINS=0 bash run.sh: faster, other digits on another CPU.
# Each evaluates the base zero-shot first, then trains each task one epoch and evaluates every task seen so far.
# One thread each on the 2 cores: a tiny model's step is mostly Python and small kernels, so one thread is only
# ~12% slower than two (measured side by side: the pair took 524 s, LoRA alone at two threads 303 s). LoRA's
# progress shows here; MoELoRA writes its own to out/moelora/log.txt. Adapter dropout off in both runs (official:
# 0.05): on a CPU, per-expert dropout makes a MoELoRA run take ~15 min instead of ~7 (LoRA ~10; docs/performance.md),
# and on CoIN-mini it takes away MoELoRA's BWT gain over LoRA (docs/study.md, "With the paper's adapter dropout").
mkdir -p out/moelora
python coin.py --tasks=all --experts=8 --lora_dropout=0 --threads=1 --out=out/moelora > out/moelora/log.txt 2>&1 &
MOE=$!
trap 'kill "$MOE" 2>/dev/null || true' EXIT  # stopping run.sh stops both runs (either resumes when run again)
python coin.py --tasks=all --experts=1 --lora_dropout=0 --threads=1 --out=out/lora
echo "LoRA done; waiting for MoELoRA (out/moelora/log.txt)"
wait "$MOE" || { echo "MoELoRA failed: see out/moelora/log.txt" >&2; exit 1; }
trap - EXIT
echo; echo "## MoELoRA E=8"; cat out/moelora/results.md  # its matrices, MAA and BWT, as LoRA's printed above
phase "3. LoRA and MoELoRA, 8 stages each"

# --- 4. The comparison: final accuracies, MAA and BWT for Instruction Following and General Knowledge. Instant.
python eval.py --compare=out/lora,out/moelora

phase "4. comparison"

# --- 5. The study: the paper's findings with error bars; runs only with `STUDY=1 bash run.sh` or `bash run.sh study`.
# 11 runs per seed into out/study/<method>-s<seed>: multi-task, sequential LoRA (E = 1), MoELoRA E = 2, 4, 8 at the same
# total rank (r = 16), LoRA with the Diverse and 10Type instruction sets (LoRA Original is shared), and LwF, EWC,
# Replay and O-LoRA on LoRA with their default settings (--method); then the field's methods, 7 more runs per seed:
# RegLoRA, MagMax, the mean merge, HiDe-LLaVA and DISCO (E = 8: a rank-2 expert per task), LoRA on SEFE's ASD set, and
# SEFE (ASD + RegLoRA). Zero-shot is the base, which the LoRA runs score before their first stage (results.json:
# zero_shot; the others skip it: same base).
# Every task's train records, as section 3 trains them (STUDY_MAX_TRAIN=0): the tiny model learns ScienceQA's letter
# from ~6,000 records and Grounding's box from ~9,000, so on fewer a run's diagonal sits near chance there and its
# BWT measures the loss of a format never learned (study.py flags such runs with a †).
# Cost, measured (study.md's "Cost"): a run takes 6-8 min of one core beside another, 305 min for the 44 runs; at
# STUDY_JOBS=2 on 2 cores the study took 2 h 45 min (~40-45 min a seed). 4 seeds: with the BWT spreads the study
# measured (sd LoRA 4.5, MoELoRA E=8 2.7), a BWT gain as large as the paper's (+6.7 at E = 8) is resolved beyond 2
# standard errors with an even chance from 3 seeds, 80% from 5; the measured gains (+8.5 to +11.4) are, at every E.
# study.md recomputes this from the spreads it measures ("Seeds the MoELoRA claim needs").
# Interrupted? Run the same command again: every run resumes into its folder (a finished one is skipped).
# Sizes are settings of the runs: to change STUDY_MAX_TRAIN use another STUDY_OUT. Each run logs to
# <out>/<run>/log.txt; then study.py writes out/study/study.md and study_curves.png.
if [ "${STUDY:-0}" = 1 ] || [ "${1:-}" = study ]; then
  STUDY_OUT=${STUDY_OUT:-out/study}                # one folder per run under it
  STUDY_SEEDS=${STUDY_SEEDS:-"0 1 2 3"}
  STUDY_MAX_TRAIN=${STUDY_MAX_TRAIN:-0}            # the first N train records of each task (0 = all): the study's size
  STUDY_JOBS=${STUDY_JOBS:-2}                      # runs at a time, --threads=1 each
  STUDY_ARGS=${STUDY_ARGS:-}                       # more coin.py settings for every run, e.g. "--max_test=100"
  STUDY_METHODS=${STUDY_METHODS:-}                 # only these runs, named without -s<seed>, e.g. "lora moelora-e8"
  study_runs=()
  for s in $STUDY_SEEDS; do  # seed by seed, so a partial study already has every method
    study_runs+=("multitask-s$s --multitask=true --experts=1 --seed=$s --zero_shot=false" "lora-s$s --experts=1 --seed=$s"
                 "moelora-e2-s$s --experts=2 --seed=$s --zero_shot=false" "moelora-e4-s$s --experts=4 --seed=$s --zero_shot=false"
                 "moelora-e8-s$s --experts=8 --seed=$s --zero_shot=false" "lora-diverse-s$s --experts=1 --instructions=Diverse --seed=$s"
                 "lora-10type-s$s --experts=1 --instructions=10Type --seed=$s"
                 "lwf-s$s --experts=1 --method=lwf --seed=$s --zero_shot=false"
                 "ewc-s$s --experts=1 --method=ewc --seed=$s --zero_shot=false"
                 "replay-s$s --experts=1 --method=replay --seed=$s --zero_shot=false"
                 "olora-s$s --experts=1 --method=olora --seed=$s --zero_shot=false"
                 "reglora-s$s --experts=1 --method=reglora --seed=$s --zero_shot=false"
                 "magmax-s$s --experts=1 --method=magmax --seed=$s --zero_shot=false"
                 "merge-mean-s$s --experts=1 --method=merge_mean --seed=$s --zero_shot=false"
                 "hide-s$s --experts=8 --method=hide --seed=$s --zero_shot=false"
                 "disco-s$s --experts=8 --method=disco --seed=$s --zero_shot=false"
                 "lora-asd-s$s --experts=1 --instructions=ASD --seed=$s --zero_shot=false"
                 "sefe-s$s --experts=1 --method=reglora --instructions=ASD --seed=$s --zero_shot=false")
  done
  if [ -n "$STUDY_METHODS" ]; then  # keep the runs whose name, less its -s<seed>, is listed
    kept=()
    for r in "${study_runs[@]}"; do name=${r%% *}; [[ " $STUDY_METHODS " == *" ${name%-s*} "* ]] && kept+=("$r"); done
    study_runs=("${kept[@]}")
  fi
  study_run() {  # <run name> <coin.py settings...>: one run, its output to its log
    local out="$STUDY_OUT/$1"; shift
    # a finished run (the last row of its results.json filled) is not started again: the tables need only its
    # results.json, so a study can go on elsewhere from the results.json files alone
    if [ -f "$out/results.json" ] && python -c "import sys, data, study
sys.exit(not study.finished(data.read_json(sys.argv[1])))" "$out/results.json"; then
      echo "study: $(basename "$out") finished already"; return 0
    fi
    mkdir -p "$out"
    echo "study: $(basename "$out") started"
    # shellcheck disable=SC2086  # STUDY_ARGS: several settings, split on spaces
    if python coin.py --tasks=all --lora_r=16 --lora_dropout=0 --threads=1 --max_train="$STUDY_MAX_TRAIN" \
         --out="$out" "$@" $STUDY_ARGS >> "$out/log.txt" 2>&1; then
      echo "study: $(basename "$out") done"
    else
      echo "study: $(basename "$out") FAILED, see $out/log.txt" >&2; return 1
    fi
  }
  export -f study_run; export STUDY_OUT STUDY_MAX_TRAIN STUDY_ARGS
  study_failed=0
  printf '%s\n' "${study_runs[@]}" | xargs -P "$STUDY_JOBS" -L 1 bash -c 'study_run "$@"' _ || study_failed=1
  # the tables over seeds, the claims, the plot: unfinished runs are left out
  python study.py --out="$STUDY_OUT" || study_failed=1
  [ "$study_failed" = 0 ] || echo "some study runs failed (above): run the same command again to resume them" >&2
  phase "5. study (${#study_runs[@]} runs)"
fi
printf "\nWall time by section:\n${PHASES}total %34d s\n" $(( $(date +%s) - TSTART ))
