"""
The study: many runs over seeds -> the paper's tables with error bars, the claims tested, the curves.

One coin.py run per method and seed, each in its own folder under one root (run.sh section 5 writes them to
out/study). Runs are grouped by their config -- (multitask, experts, instructions, method) -- never by folder name,
and summarised over seeds as mean ± sample std: the paper's main table for Instruction Following and General
Knowledge, each task right after training it (the diagonal), the expert and instruction-set ablations, the paper's
findings checked against the spread, the seeds a finding needs, and one plot of every task's score after each stage.
Run it as

    python study.py --out=out/study                      # -> out/study/study.md and study_curves.png
    python study.py --readme=README.md,docs/study.md     # refills their generated blocks (refill_figures below)

`python study.py --help` lists the settings. Like scoring prediction files, it reads results.json files only: no
model, no torch.

The aggregates, as multimodal continual instruction tuning papers name them (MCITlib, arXiv 2508.07307; HiDe-LLaVA,
arXiv 2503.12941, calls MFN "Last"), for the T x T matrix a[j][i] = score on task i after training stage j (1-based):
  - MFT, mean finetune accuracy: (1/T) sum_i a[i][i], each task right after training it (the diagonal);
  - MFN, mean final accuracy: (1/T) sum_i a[T][i], the last row (results.json's final_average);
  - MAA, mean average accuracy: (1/T) sum_j (1/j) sum_{i<=j} a[j][i];
  - BWT, backward transfer: sum_{i<T} (a[T][i] - a[i][i]) divided by T, as the CoIN paper's main text does
    (MCITlib divides by T - 1, results.json's BWT_classic);
  - routed, for the methods that route at test time (HiDe-LLaVA, DISCO): after the last stage, the share of each
    task's test records whose largest router weight is the task's own expert, mean over the tasks (ROUTED_NOTE).
A task counts as learned in a run when its diagonal entry reaches 3 x its chance level (CoIN-mini's coin_mini.json
holds each task's chance: the mean over its test records of 1 / the number of plausible answers); below that the
run's BWT on the task measures the loss of a format it never learned, so such runs are flagged (†), and the claims
repeat the comparison with MoELoRA on BWT over the learned tasks only (bwt_learned).

The claims (study_findings): 1. sequential LoRA forgets (BWT < 0); 2. more of format than of knowledge (General
Knowledge BWT minus Instruction Following BWT, run by run, > 0); 3. MoELoRA forgets less than LoRA; 4. the more
experts the less (the means rise at every step of E); 5. MoELoRA forgets less than LwF and EWC (the paper's
baselines); and the peers' usual ordering, Replay and O-LoRA forgetting least. A claim on one sample (1, 2) holds
when its mean lies more than 2 std from 0; a comparison of two methods (3, 5, the peers) when the difference of their
means lies more than 2 standard errors of that difference from 0 (difference_of_means). seeds_needed turns that rule
around: the seeds per method that resolve a difference of a given size, given the spreads.
"""
import ast
import collections
import dataclasses
import functools
import itertools
import math
import os
import re
import statistics
import sys

from PIL import Image, ImageDraw, ImageFont

import cli
import data
import eval as evaluate

STUDY_FACTORS = ("multitask", "experts", "instructions", "method", "strength")  # what tells the methods apart
# Each method's own settings (its class in methods.py) act under that method only. A run that changes one from its
# default is a method of its own (its `strength`, named in its row), so one study can hold, e.g., EWC at two lambdas.
# settings that cannot change the scores; the seed is what the spread is over. Every other setting must be the same
# in all runs of a study (a study changes one thing at a time).
STUDY_FREE = ("out", "seed", "threads", "resume", "save_every", "eval_batch", "grad_ckpt", "zero_shot")
STUDY_SHOWN = ("tasks", "max_train", "max_test", "data_fraction", "lora_r", "lora_alpha", "lora_dropout", "lr",
               "base", "scoring", "judge", "eval_images", "max_new_tokens")  # the shared settings study.md states
# LLaVA-1.5 in the paper's main table, Instruction Following; third-party readings of the paper, unverified
PAPER = {"LoRA": {"MAA": 32.97, "BWT": -32.62}, "MoELoRA E=8": {"MAA": 42.76, "BWT": -25.91}}
PAPER_BWT_GAIN = PAPER["MoELoRA E=8"]["BWT"] - PAPER["LoRA"]["BWT"]  # +6.71: the effect the seeds are sized for
ORIGINAL = "Original"
SEQUENTIAL = "sequential"  # plain sequential tuning: the paper's LoRA and MoELoRA rows (coin.py --method)
# coin.py --method: the paper's baselines (LwF, EWC), then the peers' (Replay, O-LoRA), as their rows are named
METHOD_NAMES = {"lwf": "LwF", "ewc": "EWC", "replay": "Replay", "olora": "O-LoRA", "reglora": "RegLoRA",
                "magmax": "MagMax", "merge_mean": "mean merge", "hide": "HiDe-LLaVA", "disco": "DISCO"}
OWN_ADAPTER = ("olora", "reglora", "hide", "disco")  # methods that build their own adapter: named alone
METHOD_ORDER = (SEQUENTIAL, *METHOD_NAMES)
CHANCE_TIMES = 3  # a task is learned when its score right after training reaches 3 x chance
FLAG_NOTE = (f"† k: k of the method's runs score some task under {CHANCE_TIMES} x chance right after training it: "
             "not learned, so BWT there measures the loss of a format never learned.")
ROUTED_NOTE = ("routed: after the last stage, the share (%) of each task's test records whose largest router weight is "
               "that task's own expert, mean over the tasks (results.json's measured; HiDe-LLaVA and DISCO route, "
               "blank for the methods that do not).")
# what a run's config says it is; runs are grouped by it. strength: ((setting, value), ...) where not the default
Method = collections.namedtuple("Method", STUDY_FACTORS, defaults=((),))
LORA = Method(multitask=False, experts=1, instructions=ORIGINAL, method=SEQUENTIAL)  # sequential LoRA, the baseline


def mean_std(values):
    """(mean, sample standard deviation (divides by n - 1), n) of the values that are not None; the std is None
    below two values, the mean below one."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None, len(xs)


def mean_pm_std(values):
    """'mean ± std' of the values, one decimal ('' without values, the mean alone for one)."""
    m, s, _ = mean_std(values)
    return "" if m is None else f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"


def mean_of_all(values):
    """The mean of the values, None if any is None (a row or diagonal not complete)."""
    values = list(values)
    return None if not values or None in values else sum(values) / len(values)


def method_name(key):
    multitask, experts, instructions, method, strength = key
    name = "LoRA" if experts == 1 else f"MoELoRA E={experts}"
    if method in OWN_ADAPTER:
        name = METHOD_NAMES[method]  # its own adapter (a LoRA per task, merged LoRAs, a LoRA expert per task)
    elif method != SEQUENTIAL:
        name = f"{METHOD_NAMES.get(method, method)} ({name})"
    name = f"multi-task ({name})" if multitask else name
    name = name if instructions == ORIGINAL else f"{name}, {instructions}"
    return ", ".join([name] + [f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}" for k, v in strength])


def method_order(key):
    """Table order: multi-task first, then sequential LoRA and MoELoRA by E, then LwF, EWC, Replay, O-LoRA."""
    rank = METHOD_ORDER.index(key.method) if key.method in METHOD_ORDER else len(METHOD_ORDER)
    return not key.multitask, rank, key.method, key.experts, key.strength


def run_key(res):
    """A run's Method from its results.json: one without `multitask` is not multi-task, one without `method`
    sequential; its strength: its method's own settings where they differ from their defaults (a setting the run
    predates reads as the value it had in effect then: the method's before_added, else the default)."""
    cfg = res["config"]
    method = cfg.get("method", SEQUENTIAL)
    own = method_settings(res)
    strength = tuple((k, cfg.get(k, was)) for k, (default, was) in own.items() if cfg.get(k, was) != default)
    return Method(cfg.get("multitask", False), cfg["experts"], cfg["instructions"], method, strength)


def method_settings(res):
    """{setting: (default, value before it existed)} of the run's method's own settings: as results.json records them
    (coin.py writes `method_settings`), else as methods.py declares them (runs written before that record)."""
    recorded = res.get("method_settings")
    if recorded is not None:
        return {k: (v, v) for k, v in recorded.items()}
    docs, before = declared_method_settings().get(res["config"].get("method", SEQUENTIAL), ([], {}))
    return {d.name: (ast.literal_eval(d.default), before.get(d.name, ast.literal_eval(d.default))) for d in docs}


@functools.cache
def declared_method_settings():
    """{method: ([SettingDoc], before_added)} as methods.py declares them, read from its source (no torch import)."""
    return cli.read_method_settings(os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods.py"))


@functools.cache
def setting_defaults():
    """{setting: its default} of coin.py's Config, read from its source: how a run reads a setting it predates."""
    docs = cli.read_setting_docs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "coin.py"), "Config")
    return {d.name: ast.literal_eval(d.default) for d in docs}


def summarise_run(res):
    """The numbers of one results.json the study uses: per metric (if, gk) the final row, the diagonal, MFT, MFN, MAA,
    BWT, final average and the matrix; the zero-shot row (None without one); the routing accuracy (ROUTED_NOTE, None
    for a method without a router)."""
    tasks, zero_shot = res["tasks"], res.get("zero_shot")
    out = {"seed": res["config"]["seed"], "tasks": tasks, "zero_shot": None}
    for which, r in (("if", res), ("gk", res.get("general_knowledge") or {})):
        matrix = r.get("matrix") or [[None] * len(tasks) for _ in tasks]
        diagonal = [matrix[i][i] for i in range(len(tasks))]  # None for a multi-task run: it has one stage
        out[which] = {"final": matrix[-1], "matrix": matrix, "diagonal": diagonal, "MFT": mean_of_all(diagonal),
                      "MFN": mean_of_all(matrix[-1]), **{k: r.get(k) for k in ("MAA", "BWT", "final_average")}}
    if zero_shot:
        out["zero_shot"] = {w: [zero_shot[t][w] if t in zero_shot else None for t in tasks] for w in ("if", "gk")}
    _, measured = evaluate.latest_measured(res)  # the last stage's, for a finished run
    routed = [m["routed"] for m in measured.values() if "routed" in m]
    out["routed"] = 100 * sum(routed) / len(routed) if routed else None
    out["seconds"] = run_seconds(res.get("timing"))
    return out


def run_seconds(timing):
    """The seconds a run spent training and evaluating, summed over its results.json's timing (stages, zero-shot);
    None without timing. A resumed run's lost partial stage is not in it: a lower bound then."""
    if not timing:
        return None
    return sum(run_seconds(v) or 0 if isinstance(v, dict) else v for v in timing.values())


def finished(res):
    """A run's results.json says it is finished: the last row of its matrix is filled (a sequential run's last
    stage, a multi-task run's only one). run.sh's study skips such a run."""
    return all(v is not None for v in res["matrix"][-1])


def read_study(root):
    """Every finished run under root (<run>/results.json) grouped by its config -- (multitask, experts, instructions,
    method), never by folder name -- as ({key: [run summary, one per seed]}, the shared settings, [unfinished runs]).
    Runs that differ in any other setting but the seed (STUDY_FREE), or repeat a seed, are an error naming them."""
    groups, shared, first, unfinished = {}, None, None, []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if not os.path.isfile(path):
            continue
        res = data.read_json(path)
        cfg, T = res["config"], len(res["tasks"])
        key = run_key(res)
        if not finished(res):
            unfinished.append(name if key.multitask else f"{name} ({res['stages']}/{T} stages)")
            continue
        # a method's own settings are in the key where the run's method reads them, and act nowhere else; a setting
        # a run predates reads as its default, so a setting added to coin.py never splits a study
        method_own = {d.name for docs, _ in declared_method_settings().values() for d in docs} | set(
            res.get("method_settings", {}))
        rest = {k: v for k, v in {**setting_defaults(), **cfg}.items()
                if k not in STUDY_FACTORS + STUDY_FREE and k not in method_own}
        if shared is None:
            shared, first = rest, name
        for k in shared.keys() | rest.keys():
            if shared.get(k) != rest.get(k):
                raise cli.UserError(f"{path}: --{k}={rest.get(k)!r}, but {first} has --{k}={shared.get(k)!r}; a "
                                    "study compares runs that differ only in --multitask, --experts, --instructions, "
                                    "--method and its settings, and --seed (move that run out of the folder, or give "
                                    "it a study of its own)")
        run = {"name": name, **summarise_run(res)}
        twin = [r["name"] for r in groups.get(key, []) if r["seed"] == run["seed"]]
        if twin:
            raise cli.UserError(f"{path}: {method_name(key)} with --seed={run['seed']} again (as {twin[0]}): a seed "
                                "counts once; delete one of the two")
        groups.setdefault(key, []).append(run)
    return groups, shared, unfinished


def sequential_methods(groups):
    """The sequential methods with Original instructions (LoRA and MoELoRA E=2, 4, 8), by number of experts."""
    return sorted(k for k in groups if not k.multitask and k.instructions == ORIGINAL and k.method == SEQUENTIAL)


def other_methods(groups):
    """The continual-learning methods beside plain sequential tuning (LwF, EWC, Replay, O-LoRA), Original
    instructions."""
    return sorted((k for k in groups if not k.multitask and k.instructions == ORIGINAL and k.method != SEQUENTIAL),
                  key=method_order)


def zero_shot_rows(groups):
    """The zero-shot rows ({'if': [...], 'gk': [...]}) of the Original-instruction runs that evaluated the base."""
    return [r["zero_shot"] for k, runs in groups.items() if k.instructions == ORIGINAL for r in runs if r["zero_shot"]]


def routes(groups):
    """Whether some run of the study measured its routing: then its tables have a routed column."""
    return any(r["routed"] is not None for runs in groups.values() for r in runs)


def seed_list(runs):
    return ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))


# -----------------------------------------------------------------------------
# Chance levels and the tasks a run learned


def chance_levels(cfg, tasks):
    """({task: chance %}, note) for the runs of one config, read from the coin_mini.json that CoIN-mini's generator
    writes into its --data_dir (each task's mean over its test records of 1 / the number of plausible answers); the
    note says where it came from. (None, why) when there is none: real CoIN data has no chance level (free answers)."""
    path = os.path.join(cfg.get("data_dir") or "", "coin_mini.json")
    if not os.path.isfile(path):
        return None, (f"Chance levels unknown: no {path} (the runs' --data_dir, seen from here), so no run is "
                      "checked against 3 x chance")
    meta = data.read_json(path)
    missing = [t for t in tasks if t not in meta.get("chance", {})]
    if missing:
        return None, f"Chance levels unknown: {path} has none for {', '.join(missing)}, so no run is checked"
    note = f"Chance levels from {path}"
    n_test, max_test = meta.get("n_test"), cfg.get("max_test") or 0
    if max_test and n_test and max_test < n_test:
        note += f" (over all {n_test} test records; the runs score the first {max_test})"
    return {t: meta["chance"][t] for t in tasks}, note


def not_learned(run, tasks, chance):
    """[(task, score right after training it, 3 x chance)] for the tasks this run did not learn (Instruction
    Following); [] without chance levels or without a diagonal (multi-task)."""
    if not chance:
        return []
    return [(t, v, CHANCE_TIMES * chance[t]) for t, v in zip(tasks, run["if"]["diagonal"])
            if v is not None and v < CHANCE_TIMES * chance[t]]


def bwt_learned(run, tasks, chance):
    """BWT over the tasks the run learned (diagonal >= 3 x chance): the sum of their drops a[T][i] - a[i][i]
    (i < T) divided by their number, the last task counting (with a drop of 0) when learned, as BWT's /T counts it;
    equal to BWT when every task is learned; None when none is."""
    matrix, T = run["if"]["matrix"], len(tasks)
    gone = {t for t, _, _ in not_learned(run, tasks, chance)}
    learned = [i for i, t in enumerate(tasks) if t not in gone]
    if not learned:
        return None
    return sum(matrix[T - 1][i] - matrix[i][i] for i in learned if i < T - 1) / len(learned)


def flag_mark(count):
    """The table marker for `count` runs with a task not learned ('' for none)."""
    return f" †{count}" if count else ""


# -----------------------------------------------------------------------------
# Tables


def method_rows(groups, tasks, chance, cells, flag_at):
    """The method rows of the main and summary tables: one per method with Original instructions, in method order,
    | name | n | cells(runs) |, with † k on cell flag_at when k of its runs left a task under 3 x chance; then
    FLAG_NOTE when any did."""
    rows, flagged = [], 0
    for key in sorted((k for k in groups if k.instructions == ORIGINAL), key=method_order):
        runs = groups[key]
        row, count = cells(runs), sum(1 for r in runs if not_learned(r, tasks, chance))
        row[flag_at] += flag_mark(count)
        flagged += count
        rows.append(f"| {method_name(key)} | {len(runs)} | " + " | ".join(row) + " |")
    return rows + (["", FLAG_NOTE] if flagged else [])


def study_main_table(groups, tasks, which, chance=None):
    """The paper's main table for one metric ('if' or 'gk'): a row per method (Original instructions), the final row
    of the matrix per task, then MFT, MFN, MAA and BWT, each mean ± std over seeds. Zero-shot is the base before
    stage 1, as the runs that evaluate it (--zero_shot) score it (the same model, so std 0 unless something is not
    deterministic; its MFN is the mean of its row); n counts those runs. With chance levels, MFT carries † k when k of
    the method's runs left some task under 3 x chance right after training it. Instruction Following has a routed
    column too when some run routes (ROUTED_NOTE)."""
    routed = which == "if" and routes(groups)
    lines = ["| method | n | " + " | ".join(tasks) + " | MFT | MFN | MAA | BWT |" + " routed |" * routed,
             "|---" * (len(tasks) + 6 + routed) + "|"]
    zero_shots = [z[which] for z in zero_shot_rows(groups)]
    if zero_shots:
        lines.append(f"| zero-shot | {len(zero_shots)} | "
                     + " | ".join(mean_pm_std(z[i] for z in zero_shots) for i in range(len(tasks)))
                     + f" |  | {mean_pm_std(mean_of_all(z) for z in zero_shots)} |  |  |" + "  |" * routed)

    def cells(runs):
        summaries = [r[which] for r in runs]
        return ([mean_pm_std(r["final"][i] for r in summaries) for i in range(len(tasks))]
                + [mean_pm_std(r[k] for r in summaries) for k in ("MFT", "MFN", "MAA", "BWT")]
                + [mean_pm_std(r["routed"] for r in runs)] * routed)
    return "\n".join(lines + method_rows(groups, tasks, chance, cells, flag_at=len(tasks))
                     + ["", ROUTED_NOTE] * routed)


def study_summary_table(groups, tasks, chance=None):
    """The main table's aggregates only, Instruction Following then General Knowledge: a row per method (Original
    instructions), MFT, MFN, MAA and BWT, each mean ± std over seeds, and routed after the Instruction Following ones
    when some run routes (ROUTED_NOTE); zero-shot and multi-task have MFN only. † k on the MFT as in
    study_main_table."""
    keys, routed = ("MFT", "MFN", "MAA", "BWT"), routes(groups)
    lines = ["| method | n | " + " | ".join(keys) + " |" + " routed |" * routed + " GK " + " | GK ".join(keys) + " |",
             "|---" * (10 + routed) + "|"]
    zero_shots = zero_shot_rows(groups)
    if zero_shots:
        means = {w: mean_pm_std(mean_of_all(z[w]) for z in zero_shots) for w in ("if", "gk")}
        lines.append(f"| zero-shot | {len(zero_shots)} |  | {means['if']} |  |  |" + "  |" * routed
                     + f"  | {means['gk']} |  |  |")

    def cells(runs):
        if_cells, gk_cells = ([mean_pm_std(r[which][k] for r in runs) for k in keys] for which in ("if", "gk"))
        return if_cells + [mean_pm_std(r["routed"] for r in runs)] * routed + gk_cells
    return "\n".join(lines + method_rows(groups, tasks, chance, cells, flag_at=0) + ["", ROUTED_NOTE] * routed)


def study_diagonal_table(groups, tasks, which, chance=None):
    """Each task's score right after training it (the diagonal a[i][i]) and its mean, MFT, per method trained in
    sequence (every instruction set), mean ± std over seeds. With chance levels (Instruction Following): a
    '3 x chance' row first, and † k after a cell when k of the method's runs stay under it on that task."""
    lines = ["| method | n | " + " | ".join(tasks) + " | MFT |", "|---" * (len(tasks) + 3) + "|"]
    if chance:
        lines.append(f"| {CHANCE_TIMES} x chance |  | "
                     + " | ".join(f"{CHANCE_TIMES * chance[t]:.1f}" for t in tasks) + " |  |")
    keys = sorted((k for k in groups if not k.multitask),
                  key=lambda k: (list(data.INSTRUCTIONS).index(k.instructions), method_order(k)))
    for key in keys:
        runs = groups[key]
        cells = []
        for i, task in enumerate(tasks):
            under = sum(1 for r in runs if any(t == task for t, _, _ in not_learned(r, tasks, chance)))
            cells.append(mean_pm_std(r[which]["diagonal"][i] for r in runs) + flag_mark(under))
        cells.append(mean_pm_std(r[which]["MFT"] for r in runs))
        lines.append(f"| {method_name(key)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_ablation(groups, keys, label, first_column, zero_shot=False):
    """One row per group in `keys`: MAA, BWT and final average for Instruction Following and General Knowledge
    (and, with zero_shot, the base's mean over the tasks before stage 1: it depends on the instructions)."""
    cols = [(w, k) for w in ("if", "gk") for k in ("MAA", "BWT", "final_average")]
    head = f"| {label} | n | seeds |" + (" zero-shot avg |" if zero_shot else "")
    lines = [head + " MAA | BWT | final avg | GK MAA | GK BWT | GK final avg |", "|---" * (9 + zero_shot) + "|"]
    for key in keys:
        runs = groups[key]
        zero_shot_averages = [mean_std(r["zero_shot"]["if"])[0] for r in runs if r["zero_shot"]]
        lines.append(f"| {first_column(key)} | {len(runs)} | {seed_list(runs)} | "
                     + (f"{mean_pm_std(zero_shot_averages)} | " if zero_shot else "")
                     + " | ".join(mean_pm_std(r[w][k] for r in runs) for w, k in cols) + " |")
    return "\n".join(lines)


def study_cost(groups):
    """Minutes per run (train and evaluation, from each results.json's timing: wall time of the run's process) per
    method, and the study's total; runs without timing are left out and said."""
    lines = ["| method | n | minutes per run | minutes in all |", "|---|---|---|---|"]
    total, untimed = 0.0, []
    for key, runs in sorted(groups.items(), key=lambda kv: method_order(kv[0])):
        minutes = [r["seconds"] / 60 for r in runs if r["seconds"] is not None]
        untimed += [r["name"] for r in runs if r["seconds"] is None]
        total += sum(minutes)
        lines.append(f"| {method_name(key)} | {len(minutes)} | {mean_pm_std(minutes)} | {sum(minutes):.0f} |")
    lines += ["", f"All timed runs: {total:.0f} minutes of one process each ({total / 60:.1f} h; run.sh runs "
              "STUDY_JOBS = 2 at a time, one thread each, so the study's wall time is about half of it on 2 cores)."
              + (f" No timing in: {', '.join(untimed)}." if untimed else "")]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The claims


def verdict(difference, spread, below, above):
    """`below` / `above` when the difference lies more than 2 x spread below / above 0, else not resolved (or no
    spread)."""
    if difference is None or spread is None:
        return "**cannot tell** (one seed: no spread)"
    if difference < -2 * spread:
        return below
    return above if difference > 2 * spread else "**not resolved**, within 2 spreads of 0"


def difference_of_means(a, b):
    """(mean(a) - mean(b), its standard error sqrt(sa^2 / na + sb^2 / nb)); None where either has no spread."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    if ma is None or mb is None:
        return None, None
    return ma - mb, None if sa is None or sb is None else (sa ** 2 / na + sb ** 2 / nb) ** 0.5


def seeds_needed(sd_a, sd_b, difference, power=0.8):
    """Seeds per method (n each) for the 2-standard-error rule to resolve a true difference of means `difference`
    with probability `power`, when the two methods' spreads over seeds are sd_a and sd_b. The observed difference
    scatters around the true one with standard error se = sqrt((sd_a^2 + sd_b^2) / n); the rule resolves it when it
    lies beyond 2 se, which happens with probability about Phi(difference / se - 2). Asking that to be `power`:

        n >= (2 + z_power)^2 (sd_a^2 + sd_b^2) / difference^2,     z_power = Phi^-1(power)

    power 0.5 (z = 0) puts the expected difference exactly at 2 se: a coin flip; 0.8 (z = 0.84) is the usual choice.
    At least 2 (a spread needs two seeds). The spreads are themselves estimates from few seeds: a rough guide."""
    z = statistics.NormalDist().inv_cdf(power)
    return max(2, math.ceil((2 + z) ** 2 * (sd_a ** 2 + sd_b ** 2) / difference ** 2 - 1e-9))


def seeds_line(name_a, sd_a, name_b, sd_b, difference):
    """One line of study.md: the seeds per method that the claim `name_a` against `name_b` needs."""
    return (f"- {name_a} against {name_b}: BWT sd {sd_a:.1f} and {sd_b:.1f}, a true difference of {difference:+.1f}: "
            f"{seeds_needed(sd_a, sd_b, difference, 0.5)} seeds each for an even chance of resolving it, "
            f"{seeds_needed(sd_a, sd_b, difference, 0.8)} for 80%, {seeds_needed(sd_a, sd_b, difference, 0.9)} for 90%")


def study_seeds(groups):
    """The seeds each MoELoRA-against-LoRA claim needs to be resolved when MoELoRA's gain in BWT is the paper's
    (+6.7 at E = 8), given the spreads measured here (seeds_needed)."""
    lora = [r["if"]["BWT"] for r in groups.get(LORA, [])]
    lines = []
    for key in [k for k in sequential_methods(groups) if k.experts > 1]:
        sds = mean_std([r["if"]["BWT"] for r in groups[key]])[1], mean_std(lora)[1]
        if None not in sds:
            lines.append(seeds_line(method_name(key), sds[0], "LoRA", sds[1], PAPER_BWT_GAIN))
    return lines or ["- needs two seeds or more of LoRA and of a MoELoRA (a spread each)"]


def _bold(text):
    """The verdict word of a verdict() string: '**yes**, negative ...' -> '**yes**'."""
    return re.match(r"\*\*[^*]*\*\*", text).group(0)


def _signed(delta, stderr):
    return "n/a" if delta is None else f"{delta:+.1f}" + ("" if stderr is None else f" ± {stderr:.1f}")


def _compact(items):
    """'**word**: a, b' when every (verdict, text) item has the same verdict word, else 'a (**w1**), b (**w2**)'."""
    words = {_bold(v) for v, _ in items}
    if len(words) == 1:
        return f"{words.pop()}: " + ", ".join(t for _, t in items)
    return ", ".join(f"{t} ({_bold(v)})" for v, t in items)


def bwt_versus(runs_a, runs_b, value=lambda r: r["if"]["BWT"]):
    """(difference of mean BWT a - b, its standard error, verdict): does a forget less than b, beyond 2 standard
    errors?"""
    delta, stderr = difference_of_means([value(r) for r in runs_a], [value(r) for r in runs_b])
    return delta, stderr, verdict(delta, stderr, "**lower**: forgets more", "**higher**: forgets less")


def study_findings(groups, tasks=None, chance=None):
    """The paper's findings, each checked on the runs with Original instructions and stated with its numbers,
    whichever way it goes: [{'claim': the claim in short, 'result': verdict and numbers in short, 'lines': the full
    lines}]. Spread: the std over seeds for claims on one sample (1, 2), the standard error of a difference of two
    means for comparisons (3, 5, the peers, the robustness row). `chance` ({task: %}, or a string saying why there is
    none) adds the runs that did not learn a task and claim 3 on the tasks each run learned."""
    found, lora = [], groups.get(LORA, [])
    if lora:
        m, s, n = mean_std(r["if"]["BWT"] for r in lora)
        call = verdict(m, s, "**yes**, negative beyond 2 std", "**no**, positive beyond 2 std")
        found.append({"claim": "1. sequential instruction tuning forgets (LoRA BWT below 0 by more than 2 std)",
                      "result": f"{_bold(call)}: {mean_pm_std(r['if']['BWT'] for r in lora)}",
                      "lines": [f"- **Claim 1**, sequential LoRA forgets: BWT "
                                f"{mean_pm_std(r['if']['BWT'] for r in lora)} (n={n}): " + call]})
        diff = [r["gk"]["BWT"] - r["if"]["BWT"] for r in lora if r["gk"]["BWT"] is not None]  # paired, run by run
        if diff:
            m, s, _ = mean_std(diff)
            call = verdict(m, s, "**no**, the GK drop is larger", "**yes**, the GK drop is smaller")
            found.append({"claim": "2. the forgetting is more of format than of knowledge (GK BWT minus IF BWT, run "
                                   "by run, above 0 by more than 2 std)",
                          "result": f"{_bold(call)}: {_signed(m, s)}",
                          "lines": [f"- **Claim 2**, the forgetting is more of format than of knowledge: LoRA BWT, "
                                    f"General Knowledge {mean_pm_std(r['gk']['BWT'] for r in lora)} vs Instruction "
                                    f"Following {mean_pm_std(r['if']['BWT'] for r in lora)}; GK minus IF, run by run, "
                                    f"{mean_pm_std(diff)}: " + call]})
    else:
        found.append({"claim": "1-3. sequential LoRA", "result": "no finished runs",
                      "lines": ["- **Claims 1-3**: no finished sequential LoRA runs (--experts=1, Original "
                                "instructions)."]})
    moes = [k for k in sequential_methods(groups) if k.experts > 1]
    if lora and moes:
        lines, items = [], []
        for key in moes:
            delta, stderr = difference_of_means([r["if"]["MAA"] for r in groups[key]], [r["if"]["MAA"] for r in lora])
            maa = f"MAA {_signed(delta, stderr)} ({verdict(delta, stderr, '**lower**', '**higher**')})"
            delta, stderr, call = bwt_versus(groups[key], lora)
            items.append((call, f"{_signed(delta, stderr)} (E={key.experts})"))
            lines.append(f"- **Claim 3**, {method_name(key)} minus LoRA, difference of means ± its standard error: "
                         f"{maa}, BWT {_signed(delta, stderr)} ({call})")
        found.append({"claim": "3. MoELoRA forgets less than LoRA (BWT difference beyond 2 standard errors)",
                      "result": _compact(items), "lines": lines})
    seq = sequential_methods(groups)
    if len(seq) > 2:
        means = {k: {m: mean_std(r["if"][m] for r in groups[k])[0] for m in ("MAA", "BWT")} for k in seq}
        rises = {m: "**yes**" if all(means[b][m] > means[a][m] for a, b in zip(seq, seq[1:])) else "**no**"
                 for m in ("MAA", "BWT")}
        found.append({"claim": "4. ... more so with more experts (MAA and BWT means rise at every step of E)",
                      "result": "**yes**" if rises["MAA"] == rises["BWT"] == "**yes**" else "**no**",
                      "lines": ["- **Claim 4**, more experts, less forgetting: means by E "
                                + ", ".join(f"{k.experts}: MAA {means[k]['MAA']:.1f} BWT {means[k]['BWT']:.1f}"
                                            for k in seq)
                                + f"; MAA rises with every step: {rises['MAA']}, BWT: {rises['BWT']} (means only)"]})
    found += method_findings(groups)
    if chance is not None:
        found += learned_findings(groups, tasks, chance)
    return found


def method_findings(groups, value=None):
    """Claim 5 (the paper: MoELoRA forgets less than LwF and EWC; here its largest E against LwF and EWC on LoRA) and
    the peers' usual ordering (Replay and O-LoRA forget least), when those runs are there. value: the BWT a run is
    measured by (default its BWT; learned_findings passes BWT over the tasks each run learned: robustness rows)."""
    robust, value = value is not None, value or (lambda r: r["if"]["BWT"])
    claim, line = ("robustness: ", "- **Robustness**, ") if robust else ("", "- ")
    over = " over the tasks each run learned" if robust else ""
    found, moes = [], [k for k in sequential_methods(groups) if k.experts > 1]
    defaults = [k for k in other_methods(groups) if not k.strength]  # the claims compare coin.py's default strengths
    by_method = {k.method: k for k in defaults if k.experts == 1}
    baselines = [by_method[m] for m in ("lwf", "ewc") if m in by_method]
    if moes and baselines:
        moe, items, parts = moes[-1], [], []
        for base in baselines:
            delta, stderr, call = bwt_versus(groups[moe], groups[base], value)
            items.append((call, f"{_signed(delta, stderr)} ({METHOD_NAMES[base.method]})"))
            parts.append(f"{method_name(base)} {_signed(delta, stderr)} ({call})")
        found.append({"claim": f"{claim}5. MoELoRA forgets less than LwF and EWC ({method_name(moe)} minus each, BWT"
                               f"{over + ',' if robust else ''} difference beyond 2 standard errors)",
                      "result": _compact(items),
                      "lines": [f"{line}{'claim 5' if robust else '**Claim 5**'}, {method_name(moe)} forgets less "
                                f"than LwF and EWC: BWT{over} minus " + ", ".join(parts)]})
    elif not robust:
        missing = " and ".join(m for m, have in (("MoELoRA (--experts>1)", moes), ("LwF or EWC (--method=lwf, "
                                                 "--method=ewc)", baselines)) if not have)
        found.append({"claim": "5. MoELoRA forgets less than LwF and EWC", "result": f"not tested: no {missing} runs",
                      "lines": [f"- **Claim 5**, MoELoRA forgets less than LwF and EWC: not tested, no finished "
                                f"{missing} runs"]})
    best = [by_method[m] for m in ("replay", "olora") if m in by_method]
    others = [k for k in sequential_methods(groups) + defaults if k not in best]
    means = {k: mean_std(value(r) for r in groups[k])[0] for k in best + others}
    means = {k: m for k, m in means.items() if m is not None}  # none for a method that learned no task
    if best and any(k in means for k in others):
        runner_up = max((k for k in others if k in means), key=lambda k: means[k])  # the best of the rest
        top = "**yes**" if all(k in means and means[k] > means[runner_up] for k in best) else "**no**"
        items = [(call, f"{METHOD_NAMES[k.method]} {_signed(delta, stderr)}")
                 for k in best for delta, stderr, call in [bwt_versus(groups[k], groups[runner_up], value)]]
        found.append({"claim": f"{claim}peers: Replay and O-LoRA forget least (their BWT{over} means the highest; "
                               "each minus the best other method, beyond 2 standard errors)",
                      "result": f"{top}; " + _compact(items) + f" against {method_name(runner_up)}",
                      "lines": [f"{line}{'the peers' if robust else '**Peers**'}, Replay and O-LoRA forget least: "
                                f"BWT{over} means, highest first: "
                                + ", ".join(f"{method_name(k)} {means[k]:.1f}" for k in sorted(means, key=means.get,
                                                                                           reverse=True))
                                + f"; {' and '.join(method_name(k) for k in best)} above every other: {top}; minus "
                                f"the best other, {method_name(runner_up)}: "
                                + ", ".join(f"{t} ({c})" for c, t in items)]})
    return found


def learned_findings(groups, tasks, chance):
    """The runs that left a task under 3 x chance right after training it, and claim 3 again on BWT over the tasks
    each run learned (bwt_learned). `chance` is {task: %}, or a string saying why the levels are unknown."""
    if not isinstance(chance, dict):
        return [{"claim": f"runs with a task under {CHANCE_TIMES} x chance right after training it",
                 "result": chance, "lines": [f"- **Not learned**: {chance}."]}]
    flagged = sorted((r["name"], gone) for runs in groups.values() for r in runs
                     for gone in [not_learned(r, tasks, chance)] if gone)
    text = "; ".join(f"{name} ({', '.join(f'{t} {v:.1f} < {bar:.1f}' for t, v, bar in gone)})"
                     for name, gone in flagged) or "none"
    found = [{"claim": f"runs with a task under {CHANCE_TIMES} x chance right after training it (†)",
              "result": "none" if not flagged else ", ".join(name for name, _ in flagged),
              "lines": [f"- **Not learned** (†), runs with a task under {CHANCE_TIMES} x chance right after "
                        f"training it (score < {CHANCE_TIMES} x chance): {text}"]}]
    lora = groups.get(LORA, [])
    moes = [k for k in sequential_methods(groups) if k.experts > 1]
    if lora and moes:
        learned = lambda r: bwt_learned(r, tasks, chance)  # noqa: E731
        items = []
        for key in moes:
            delta, stderr, call = bwt_versus(groups[key], lora, learned)
            items.append((call, f"{_signed(delta, stderr)} (E={key.experts})"))
        per_method = ", ".join(f"{method_name(k)} {mean_pm_std(learned(r) for r in groups[k])}"
                               for k in sequential_methods(groups) + other_methods(groups))
        found.append({"claim": "robustness: 3. MoELoRA forgets less than LoRA (BWT over the tasks each run "
                               "learned, difference beyond 2 standard errors)", "result": _compact(items),
                      "lines": [f"- **Robustness**, claim 3 on BWT over the tasks each run learned (diagonal >= "
                                f"{CHANCE_TIMES} x chance): {per_method}; MoELoRA minus LoRA: "
                                + ", ".join(f"{t} ({c})" for c, t in items)]})
    return found + method_findings(groups, lambda r: bwt_learned(r, tasks, chance))


def study_claims(groups, tasks=None, chance=None):
    """The findings' lines (study_findings), then the paper's numbers."""
    lines = [line for f in study_findings(groups, tasks, chance) for line in f["lines"]]
    paper = "; ".join(f"{m} MAA {p['MAA']}, BWT {p['BWT']}" for m, p in PAPER.items())
    return lines + ["", f"Paper, LLaVA-1.5, Instruction Following (third-party readings of its table, unverified): "
                        f"{paper}."]


def claims_table(groups, tasks, chance):
    """The findings in two columns: the claim, and what the study finds (for the README)."""
    rows = [f"| {f['claim']} | {f['result']} |" for f in study_findings(groups, tasks, chance)]
    return "\n".join(["| the paper's claim | CoIN-mini |", "|---|---|"] + rows)


_LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]


def _dashed(d, x0, x1, y, fill, dash=5):
    for x in range(int(x0), int(x1), 2 * dash):
        d.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=1)


def _diamond(d, x, y, r, fill):
    d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def study_curves(path, tasks, groups):
    """Draw with pillow the score on each task after every stage, mean over seeds with ± std bars: a panel per task,
    Instruction Following above, General Knowledge below; a line per method trained in sequence (Original
    instructions), the base zero-shot as a dashed grey line, multi-task as a black diamond at the last stage."""
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    T, seq = len(tasks), sequential_methods(groups) + other_methods(groups)
    multi = [k for k in groups if k.multitask and k.instructions == ORIGINAL]
    zero_shots = zero_shot_rows(groups)
    pw, ph, gap, left, row_h = 150, 120, 18, 40, 200  # panel size, gap between panels, left margin, height of a row
    W, H = left + T * (pw + gap), 20 + 2 * row_h + 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    rows = (("if", "Instruction Following: accuracy (%)"), ("gk", "General Knowledge: judge score (%)"))
    for row, (which, title) in enumerate(rows):
        top = 20 + row * row_h
        d.text((10, top), f"{title}, after each stage; mean ± std over seeds", font=font, fill="black")
        for i, task in enumerate(tasks):
            x0, y0 = left + i * (pw + gap), top + 40

            def at(j, v):  # stage index j (0-based), score v -> pixel
                return x0 + 8 + j * (pw - 16) / max(1, T - 1), y0 + ph - v / 100 * ph

            d.text((x0 + pw / 2, y0 - 4), task, font=font, fill="black", anchor="mb")
            for v in (0, 50, 100):
                d.line([(x0, at(0, v)[1]), (x0 + pw, at(0, v)[1])], fill=(225, 225, 225))
                if i == 0:
                    d.text((x0 - 4, at(0, v)[1]), str(v), font=small, fill="black", anchor="rm")
            for j in range(T):
                d.text((at(j, 0)[0], y0 + ph + 3), str(j + 1), font=small, fill=(90, 90, 90), anchor="mt")
            d.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(160, 160, 160))
            zero_shot_mean = mean_std(z[which][i] for z in zero_shots)[0]
            if zero_shot_mean is not None:
                _dashed(d, x0, x0 + pw, at(0, zero_shot_mean)[1], (120, 120, 120))
            for c, key in zip(itertools.cycle(_LINE_COLOURS), seq):
                points = []
                for j in range(i, T):  # task i is scored from the stage that trains it on
                    m, s, _ = mean_std(r[which]["matrix"][j][i] for r in groups[key])
                    if m is not None:
                        points.append(at(j, m))
                        if s:
                            d.line([at(j, m - s), at(j, m + s)], fill=c)
                if len(points) > 1:
                    d.line(points, fill=c, width=2)
                for x, y in points:
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            for key in multi:
                m = mean_std(r[which]["final"][i] for r in groups[key])[0]
                if m is not None:
                    _diamond(d, *at(T - 1, m), 5, "black")
        d.text((left, top + 40 + ph + 16), "stage (1 = after the first task)", font=small, fill=(90, 90, 90))
    x, y = 10, H - 26
    for c, key in zip(itertools.cycle(_LINE_COLOURS), seq):
        d.line([(x, y), (x + 24, y)], fill=c, width=2)
        d.text((x + 30, y), method_name(key), font=font, fill="black", anchor="lm")
        x += 50 + font.getlength(method_name(key))
    _dashed(d, x, x + 24, y, (120, 120, 120))
    d.text((x + 30, y), "zero-shot", font=font, fill="black", anchor="lm")
    x += 50 + font.getlength("zero-shot")
    _diamond(d, x + 12, y, 5, "black")
    d.text((x + 30, y), "multi-task", font=font, fill="black", anchor="lm")
    img.save(path)


def write_study(root):
    """Read every run under root, write root/study.md and root/study_curves.png; return the markdown."""
    if not os.path.isdir(root):
        raise cli.MissingFile(f"--out={root}: no such folder (`STUDY=1 bash run.sh` writes the runs to out/study)")
    groups, shared, unfinished = read_study(root)
    if not groups:
        raise cli.UserError(f"--out={root}: no finished run (<run>/results.json with every stage scored)" +
                            (f"; unfinished: {', '.join(unfinished)}" if unfinished else ""))
    tasks = next(iter(groups.values()))[0]["tasks"]  # the same in every run: --tasks is a shared setting
    chance, chance_note = chance_levels(shared, tasks)  # --data_dir and --max_test are shared settings too
    n = sum(len(runs) for runs in groups.values())
    seq = sequential_methods(groups)
    instruction_sets = sorted((k for k in groups if not k.multitask and k.experts == 1 and k.method == SEQUENTIAL),
                              key=lambda k: list(data.INSTRUCTIONS).index(k.instructions))
    md = [f"# CoIN-mini study: {n} finished runs in {root}", "",
          "Mean ± std over seeds (sample std, n - 1); n = runs. Shared settings: "
          + ", ".join(f"--{k}={shared.get(k)}" for k in STUDY_SHOWN) + f". {chance_note}."]
    if unfinished:
        md.append(f"Left out, not finished: {', '.join(unfinished)}.")
    for which, title in (("if", "Instruction Following (accuracy %)"), ("gk", "General Knowledge (judge score %)")):
        levels = chance if which == "if" else None  # chance is the exact scorers'; the judge accepts any format
        md += ["", f"## {title}: the final row of the matrix, MFT, MFN, MAA and BWT (/T)", "",
               study_main_table(groups, tasks, which, levels), "",
               "Each task right after training it (the diagonal of the matrix) and their mean, MFT"
               + (f"; † k: k of the runs score under {CHANCE_TIMES} x chance there:" if levels else ":"), "",
               study_diagonal_table(groups, tasks, which, levels)]
    md += ["", "## MoELoRA experts (sequential, Original instructions; E = 1 is LoRA), same total rank", "",
           study_ablation(groups, seq, "E", lambda k: k.experts), "", "## Instruction sets (sequential LoRA)", "",
           study_ablation(groups, instruction_sets, "instructions", lambda k: k.instructions, zero_shot=True),
           "", "## The paper's findings", ""] + study_claims(groups, tasks, chance or chance_note)
    md += ["", "## Seeds the MoELoRA claim needs", "",
           f"For claim 3 to be resolved when MoELoRA's BWT gain is the paper's ({PAPER_BWT_GAIN:+.1f} at E = 8), "
           "given the spreads above: n >= (2 + z)^2 (sd_a^2 + sd_b^2) / difference^2 seeds per method, z = 0 for an "
           "even chance, 0.84 for 80%, 1.28 for 90% (study.py, seeds_needed).", ""] + study_seeds(groups)
    md += ["", "## Cost", "", study_cost(groups)]
    flagged = {r["name"] for runs in groups.values() for r in runs if not_learned(r, tasks, chance)}
    md += ["", "## Runs", "", "| method | seeds | folders" + (" (†: a task not learned)" if chance else "") + " |",
           "|---|---|---|"]
    md += [f"| {method_name(k)} | {seed_list(runs)} | "
           + " ".join(r["name"] + (" †" if r["name"] in flagged else "") for r in runs) + " |"
           for k, runs in sorted(groups.items(), key=lambda kv: method_order(kv[0]))]
    study_curves(os.path.join(root, "study_curves.png"), tasks, groups)
    md += ["", "![accuracy per task across stages](study_curves.png)", ""]
    with open(os.path.join(root, "study.md"), "w") as f:
        f.write("\n".join(md))
    return "\n".join(md)


# -----------------------------------------------------------------------------
# Generated blocks of markdown files (README.md, docs/*.md): python study.py --readme=FILE[,FILE...] [--check]
# A block opens with <!-- figures: KIND ARGS --> and closes with the next <!-- /figures -->; FOLDERS are relative to
# where study.py runs (the repository root). Kinds:
#   diagonal RUN...  each run's diagonal (Instruction Following) and its mean, under a 3 x chance row and the first
#                    run's zero-shot row
#   compare RUN...   what python eval.py --compare=RUN,... prints
#   study DIR        the study's aggregates (study_summary_table) and its findings in two columns
#   study-full DIR   DIR/study.md (python study.py --out=DIR writes it) after its title, without its plot

FIGURES = re.compile(r"(<!-- figures: ([^\n]*?) -->\n)(.*?)(<!-- /figures -->)", re.S)


def read_run(run):
    path = os.path.join(run, "results.json")
    if not os.path.isfile(path):
        raise cli.UserError(f"no {path} (run.sh writes the runs; refill after they finish)")
    return data.read_json(path)


def run_label(res):
    """A run's row in a diagonal block, from its results.json: 'LoRA (E=1)', 'MoELoRA (E=8)', 'LwF (LoRA)',
    'O-LoRA'..."""
    key = run_key(res)
    if key.multitask or key.method != SEQUENTIAL:
        return method_name(key)
    name = "LoRA (E=1)" if key.experts == 1 else f"MoELoRA (E={key.experts})"
    return name if key.instructions == ORIGINAL else f"{name}, {key.instructions}"


def diagonal_block(runs):
    """Each run's score on every task right after training it, and their mean (MFT), below a '3 x chance' row (the
    first run's data) and the base's zero-shot row (the first run's)."""
    results = [read_run(r) for r in runs]
    tasks, T = results[0]["tasks"], len(results[0]["tasks"])
    for run, res in zip(runs, results):
        if res["tasks"] != tasks:
            raise cli.UserError(f"{run} trains {','.join(res['tasks'])} but {runs[0]} {','.join(tasks)}: a diagonal "
                                "block compares runs of the same tasks")

    def row(label, values, mean=True):  # one decimal, the mean last ('' where None)
        cells = values + [mean_of_all(values) if mean else None]
        return f"| {label} | " + " | ".join("" if v is None else f"{v:.1f}" for v in cells) + " |"

    lines = ["| | " + " | ".join(tasks) + " | mean |", "|---" * (T + 2) + "|"]
    chance, note = chance_levels(results[0]["config"], tasks)
    lines.append(row(f"{CHANCE_TIMES} x chance", [CHANCE_TIMES * chance[t] for t in tasks], mean=False) if chance
                 else row(f"{CHANCE_TIMES} x chance: {note}", [None] * T, mean=False))
    zero_shot = results[0].get("zero_shot")
    lines.append(row("base, zero-shot", [zero_shot[t]["if"] if t in zero_shot else None for t in tasks])
                 if zero_shot else row(f"base, zero-shot: not evaluated in {runs[0]}", [None] * T, mean=False))
    labels = [run_label(res) for res in results]
    for label, res in zip(labels, results):
        label += f", seed {res['config']['seed']}" if labels.count(label) > 1 else ""
        lines.append(row(label, [res["matrix"][i][i] for i in range(T)]))
    return "\n".join(lines)


def study_block(root):
    """The study's aggregates (MFT, MFN, MAA, BWT; Instruction Following and General Knowledge) and its findings in
    two columns."""
    groups, shared, _ = read_study(root)
    if not groups:
        raise cli.UserError(f"{root}: no finished run (python study.py --out={root} says more)")
    tasks = next(iter(groups.values()))[0]["tasks"]
    chance, note = chance_levels(shared, tasks)
    return study_summary_table(groups, tasks, chance) + "\n\n" + claims_table(groups, tasks, chance or note)


def study_full_block(root):
    """root/study.md after its title line, without the plot (its link is relative to root)."""
    path = os.path.join(root, "study.md")
    if not os.path.isfile(path):
        raise cli.UserError(f"no {path} (python study.py --out={root} writes it)")
    lines = open(path).read().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = [line for line in lines if not re.fullmatch(r"!\[[^\]]*\]\(study_curves\.png\)", line)]
    return "\n".join(lines).strip("\n")


def figure_block(spec):
    """The text of the generated block `spec` ('KIND ARGS'), without its markers."""
    kind, *args = spec.split()
    makers = {"diagonal": diagonal_block, "compare": lambda runs: evaluate.compare(runs)}
    if kind in makers and args:
        for run in args:
            read_run(run)  # a missing run is an error naming it, for --compare too
        return makers[kind](args)
    folders = {"study": study_block, "study-full": study_full_block}
    if kind in folders and len(args) == 1:
        return folders[kind](args[0])
    raise cli.UserError("expected 'diagonal RUN...', 'compare RUN...', 'study DIR' or 'study-full DIR'")


def refill_figures(paths, check=False):
    """Refill every generated block of the markdown files `paths` (comma-separated) from the run folders they name;
    a block whose folders do not exist (yet) is kept, and said. With check, change nothing and exit 1 (naming the
    blocks) if any file would change."""
    stale = []
    for path in [p for p in paths.split(",") if p]:
        if not os.path.isfile(path):
            raise cli.MissingFile(f"--readme={path}: no such file")
        with open(path) as f:
            text = f.read()
        opened, blocks = text.count("<!-- figures:"), FIGURES.findall(text)
        if opened != len(blocks):
            raise cli.UserError(f"{path}: {opened} '<!-- figures: KIND ARGS -->' markers but {len(blocks)} blocks: "
                                "close each with '<!-- /figures -->'")
        changed, kept = [], []

        def refill(m):
            missing = [folder for folder in m.group(2).split()[1:] if not os.path.isdir(folder)]
            if missing:  # refill what has been run; a block whose runs are not there yet keeps its figures
                kept.append(f"{m.group(2)} (no {', '.join(missing)})")
                return m.group(0)
            try:
                body = figure_block(m.group(2)) + "\n"
            except (ValueError, FileNotFoundError) as e:
                raise cli.UserError(f"{path}: block '{m.group(2)}': {e}") from None
            if body != m.group(3):
                changed.append(m.group(2))
            return m.group(1) + body + m.group(4)

        text = FIGURES.sub(refill, text)
        if kept:
            print(f"{path}: kept as they are: " + "; ".join(kept))
        if not changed:
            print(f"{path}: {len(blocks)} generated blocks, up to date")
        elif check:
            print(f"{path}: would change: " + "; ".join(changed))
            stale.append(path)
        else:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            print(f"{path}: refilled " + "; ".join(changed))
    if stale:
        raise SystemExit(f"--check: {', '.join(stale)} would change; refill with python study.py --readme={paths}")


# -----------------------------------------------------------------------------
# The command line

@dataclasses.dataclass
class StudySettings:
    out: str = "out/study"                # the study's folder: its runs, one folder each (run.sh section 5), are read
                                          # from it, study.md and study_curves.png written to it
    readme: str = ""                      # instead: markdown files, comma-separated, whose generated blocks are
                                          # refilled from the run folders they name
    check: bool = False                   # with --readme: change nothing, exit 1 if a block would change


def main(argv):
    opts, given = cli.parse(StudySettings, argv, __doc__)
    if opts.check and not opts.readme:
        raise cli.UserError("--check: only with --readme (it checks the generated blocks of those files)")
    if opts.readme:
        if "out" in given:
            raise cli.UserError(f"--out={opts.out} with --readme: the blocks name their own folders; give one of them")
        return refill_figures(opts.readme, opts.check)
    print(write_study(opts.out))
    print(f"wrote {os.path.join(opts.out, 'study.md')} and study_curves.png")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
