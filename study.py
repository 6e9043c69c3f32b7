"""
The study: many runs over seeds -> the paper's tables with error bars, the claims tested, the curves.

One coin.py run per method and seed, each in its own folder under one root (run.sh section 5 writes them to
out/study). Runs are grouped by their config -- (multitask, experts, instructions) -- never by folder name, and
summarised over seeds as mean ± sample std: the paper's main table for Instruction Following and General Knowledge,
the expert and instruction-set ablations, the paper's findings checked against the spread, and one plot of every
task's score after each stage. Run it as

    python eval.py --study=out/study                   # -> out/study/study.md and study_curves.png

Like scoring prediction files, it reads results.json files only: no model, no torch.
"""
import collections
import itertools
import os

from PIL import Image, ImageDraw, ImageFont

import cli
import data

STUDY_FACTORS = ("multitask", "experts", "instructions")  # the settings that tell the methods apart
# settings that cannot change the scores; the seed is what the spread is over. Every other setting must be the same
# in all runs of a study (a study changes one thing at a time).
STUDY_FREE = ("out", "seed", "threads", "resume", "save_every", "eval_batch", "grad_ckpt", "zero_shot")
STUDY_SHOWN = ("tasks", "max_train", "max_test", "data_fraction", "lora_r", "lora_alpha", "lora_dropout", "lr",
               "base", "scoring", "judge")  # the shared settings study.md states
# LLaVA-1.5 in the paper's main table, Instruction Following; third-party readings of the paper, unverified
PAPER = {"LoRA": {"MAA": 32.97, "BWT": -32.62}, "MoELoRA E=8": {"MAA": 42.76, "BWT": -25.91}}
ORIGINAL = "Original"
Method = collections.namedtuple("Method", STUDY_FACTORS)  # what a run's config says it is; runs are grouped by it
LORA = Method(multitask=False, experts=1, instructions=ORIGINAL)  # sequential LoRA, the baseline


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


def method_name(key):
    multitask, experts, instructions = key
    name = "LoRA" if experts == 1 else f"MoELoRA E={experts}"
    name = f"multi-task ({name})" if multitask else name
    return name if instructions == ORIGINAL else f"{name}, {instructions}"


def summarise_run(res):
    """The numbers of one results.json the study uses: per metric (if, gk) the final row, MAA, BWT, final average
    and the matrix; the zero-shot row (None without one)."""
    tasks, zero_shot = res["tasks"], res.get("zero_shot")
    out = {"seed": res["config"]["seed"], "tasks": tasks, "zero_shot": None}
    for which, r in (("if", res), ("gk", res.get("general_knowledge") or {})):
        matrix = r.get("matrix") or [[None] * len(tasks) for _ in tasks]
        out[which] = {"final": matrix[-1], "matrix": matrix, **{k: r.get(k) for k in ("MAA", "BWT", "final_average")}}
    if zero_shot:
        out["zero_shot"] = {w: [zero_shot[t][w] if t in zero_shot else None for t in tasks] for w in ("if", "gk")}
    return out


def read_study(root):
    """Every finished run under root (<run>/results.json) grouped by its config -- (multitask, experts, instructions),
    never by folder name -- as ({key: [run summary, one per seed]}, the shared settings, [unfinished runs]). Runs
    that differ in any other setting but the seed (STUDY_FREE), or repeat a seed, are an error naming them."""
    groups, shared, first, unfinished = {}, None, None, []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if not os.path.isfile(path):
            continue
        res = data.read_json(path)
        cfg, T = res["config"], len(res["tasks"])
        # a config without `multitask` is a sequential run
        key = Method(cfg.get("multitask", False), cfg["experts"], cfg["instructions"])
        finished = all(v is not None for v in res["matrix"][-1]) if key.multitask else res["stages"] == T
        if not finished:
            unfinished.append(name if key.multitask else f"{name} ({res['stages']}/{T} stages)")
            continue
        rest = {k: v for k, v in cfg.items() if k not in STUDY_FACTORS + STUDY_FREE}
        if shared is None:
            shared, first = rest, name
        for k in shared.keys() | rest.keys():
            if shared.get(k) != rest.get(k):
                raise ValueError(f"{path}: --{k}={rest.get(k)!r}, but {first} has --{k}={shared.get(k)!r}; a study "
                                 "compares runs that differ only in --multitask, --experts, --instructions and --seed "
                                 "(move that run out of the folder, or give it a study of its own)")
        run = {"name": name, **summarise_run(res)}
        twin = [r["name"] for r in groups.get(key, []) if r["seed"] == run["seed"]]
        if twin:
            raise ValueError(f"{path}: {method_name(key)} with --seed={run['seed']} again (as {twin[0]}): a seed "
                             "counts once; delete one of the two")
        groups.setdefault(key, []).append(run)
    return groups, shared, unfinished


def sequential_methods(groups):
    """The sequential methods with Original instructions (LoRA and MoELoRA E=2, 4, 8), by number of experts."""
    return sorted(k for k in groups if not k.multitask and k.instructions == ORIGINAL)


def zero_shot_rows(groups):
    """The zero-shot rows ({'if': [...], 'gk': [...]}) of the Original-instruction runs that evaluated the base."""
    return [r["zero_shot"] for k, runs in groups.items() if k.instructions == ORIGINAL for r in runs if r["zero_shot"]]


def seed_list(runs):
    return ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))


def study_main_table(groups, tasks, which):
    """The paper's main table for one metric ('if' or 'gk'): a row per method (Original instructions), the final row
    of the matrix per task, MAA and BWT, each mean ± std over seeds. Zero-shot is the base before stage 1, as the runs
    that evaluate it (--zero_shot) score it (the same model, so std 0 unless something is not deterministic); n counts
    those runs."""
    lines = ["| method | n | " + " | ".join(tasks) + " | MAA | BWT |", "|---" * (len(tasks) + 4) + "|"]
    zero_shots = [z[which] for z in zero_shot_rows(groups)]
    if zero_shots:
        lines.append(f"| zero-shot | {len(zero_shots)} | "
                     + " | ".join(mean_pm_std(z[i] for z in zero_shots) for i in range(len(tasks))) + " |  |  |")
    for key in sorted((k for k in groups if k.instructions == ORIGINAL), key=lambda k: (not k.multitask, k.experts)):
        summaries = [r[which] for r in groups[key]]
        cells = [mean_pm_std(r["final"][i] for r in summaries) for i in range(len(tasks))]
        cells += [mean_pm_std(r[k] for r in summaries) for k in ("MAA", "BWT")]
        lines.append(f"| {method_name(key)} | {len(summaries)} | " + " | ".join(cells) + " |")
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


def study_claims(groups):
    """The paper's findings, each checked on the sequential runs with Original instructions and stated with its numbers,
    whichever way it goes. Spread: the std over seeds (claims 1, 2: per run), the standard error of a difference of
    two means (claim 3)."""
    lines, lora = [], groups.get(LORA, [])
    if lora:
        m, s, n = mean_std(r["if"]["BWT"] for r in lora)
        lines.append(f"- **Claim 1**, sequential LoRA forgets: BWT {mean_pm_std(r['if']['BWT'] for r in lora)} "
                     f"(n={n}): " + verdict(m, s, "**yes**, negative beyond 2 std", "**no**, positive beyond 2 std"))
        diff = [r["gk"]["BWT"] - r["if"]["BWT"] for r in lora if r["gk"]["BWT"] is not None]  # paired, run by run
        if diff:
            lines.append(f"- **Claim 2**, the forgetting is more of format than of knowledge: LoRA BWT, General "
                         f"Knowledge {mean_pm_std(r['gk']['BWT'] for r in lora)} vs Instruction Following "
                         f"{mean_pm_std(r['if']['BWT'] for r in lora)}; GK minus IF, run by run, {mean_pm_std(diff)}: "
                         + verdict(*mean_std(diff)[:2], "**no**, the GK drop is larger",
                                   "**yes**, the GK drop is smaller"))
    else:
        lines.append("- **Claims 1-3**: no finished sequential LoRA runs (--experts=1, Original instructions).")
    for key in [k for k in sequential_methods(groups) if k.experts > 1] if lora else []:
        parts = []
        for metric, higher in (("MAA", "**higher**"), ("BWT", "**higher**: forgets less")):
            delta, stderr = difference_of_means([r["if"][metric] for r in groups[key]],
                                                [r["if"][metric] for r in lora])
            call = verdict(delta, stderr, "**lower**" + ("" if metric == "MAA" else ": forgets more"), higher)
            parts.append(f"{metric} {delta:+.1f}" + ("" if stderr is None else f" ± {stderr:.1f}") + f" ({call})")
        lines.append(f"- **Claim 3**, {method_name(key)} minus LoRA, difference of means ± its standard error: "
                     + ", ".join(parts))
    seq = sequential_methods(groups)
    if len(seq) > 2:
        means = {k: {m: mean_std(r["if"][m] for r in groups[k])[0] for m in ("MAA", "BWT")} for k in seq}
        rises = {m: "**yes**" if all(means[b][m] > means[a][m] for a, b in zip(seq, seq[1:])) else "**no**"
                 for m in ("MAA", "BWT")}
        lines.append("- **Claim 4**, more experts, less forgetting: means by E "
                     + ", ".join(f"{k.experts}: MAA {means[k]['MAA']:.1f} BWT {means[k]['BWT']:.1f}" for k in seq)
                     + f"; MAA rises with every step: {rises['MAA']}, BWT: {rises['BWT']} (means only)")
    paper = "; ".join(f"{m} MAA {p['MAA']}, BWT {p['BWT']}" for m, p in PAPER.items())
    lines += ["", f"Paper, LLaVA-1.5, Instruction Following (third-party readings of its table, unverified): {paper}."]
    return lines


_LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _dashed(d, x0, x1, y, fill, dash=5):
    for x in range(int(x0), int(x1), 2 * dash):
        d.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=1)


def _diamond(d, x, y, r, fill):
    d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def study_curves(path, tasks, groups):
    """Draw with pillow the score on each task after every stage, mean over seeds with ± std bars: a panel per task,
    Instruction Following above, General Knowledge below; a line per sequential method (Original instructions), the
    base zero-shot as a dashed grey line, multi-task as a black diamond at the last stage."""
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    T, seq = len(tasks), sequential_methods(groups)
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
        raise cli.MissingFile(f"--study={root}: no such folder (`STUDY=1 bash run.sh` writes the runs to out/study)")
    groups, shared, unfinished = read_study(root)
    if not groups:
        raise cli.UserError(f"--study={root}: no finished run (<run>/results.json with every stage scored)" +
                            (f"; unfinished: {', '.join(unfinished)}" if unfinished else ""))
    tasks = next(iter(groups.values()))[0]["tasks"]  # the same in every run: --tasks is a shared setting
    n = sum(len(runs) for runs in groups.values())
    seq = sequential_methods(groups)
    instruction_sets = sorted((k for k in groups if not k.multitask and k.experts == 1),
                              key=lambda k: list(data.INSTRUCTIONS).index(k.instructions))
    md = [f"# CoIN-mini study: {n} finished runs in {root}", "",
          "Mean ± std over seeds (sample std, n - 1); n = runs. Shared settings: "
          + ", ".join(f"--{k}={shared.get(k)}" for k in STUDY_SHOWN) + "."]
    if unfinished:
        md.append(f"Left out, not finished: {', '.join(unfinished)}.")
    for which, title in (("if", "Instruction Following (accuracy %)"), ("gk", "General Knowledge (judge score %)")):
        md += ["", f"## {title}: the final row of the matrix, MAA and BWT (/T)", "",
               study_main_table(groups, tasks, which)]
    md += ["", "## MoELoRA experts (sequential, Original instructions; E = 1 is LoRA), same total rank", "",
           study_ablation(groups, seq, "E", lambda k: k.experts), "", "## Instruction sets (sequential LoRA)", "",
           study_ablation(groups, instruction_sets, "instructions", lambda k: k.instructions, zero_shot=True),
           "", "## The paper's findings", ""] + study_claims(groups)
    md += ["", "## Runs", "", "| method | seeds | folders |", "|---|---|---|"]
    md += [f"| {method_name(k)} | {seed_list(runs)} | {' '.join(r['name'] for r in runs)} |"
           for k, runs in sorted(groups.items())]
    study_curves(os.path.join(root, "study_curves.png"), tasks, groups)
    md += ["", "![accuracy per task across stages](study_curves.png)", ""]
    with open(os.path.join(root, "study.md"), "w") as f:
        f.write("\n".join(md))
    return "\n".join(md)
