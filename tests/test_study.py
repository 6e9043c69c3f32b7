"""study.py: hand-made results.json files of known matrices (two tasks) against means, stds and claims
computed by hand; runs grouped by their config, not their folder names; the plot; and one tiny real study."""
import ast
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import eval as E
import study as S
from cli import UserError
from test_inputs import HIDE_TORCH, ROOT

TASKS = ["ScienceQA", "TextVQA"]
# (folder, multitask, experts, instructions, seed, IF matrix, GK matrix). Folder names are deliberately unhelpful:
# the study must group by config. Two tasks: MAA = (a00 + (a10 + a11) / 2) / 2, BWT = (a10 - a00) / 2.
RUNS = [
    ("a", False, 1, "Original", 0, [[80, None], [40, 60]], [[50, None], [45, 55]]),  # MAA 65.0, BWT -20; GK 50, -2.5
    ("b", False, 1, "Original", 1, [[70, None], [40, 70]], [[50, None], [40, 50]]),  # MAA 62.5, BWT -15; GK 47.5, -5
    ("c", False, 1, "Original", 2, [[90, None], [50, 80]], [[60, None], [55, 60]]),  # MAA 77.5, BWT -20; GK 58.75, -2.5
    ("d", False, 2, "Original", 0, [[80, None], [60, 70]], [[50, None], [50, 50]]),  # MAA 72.5, BWT -10
    ("e", False, 2, "Original", 1, [[80, None], [70, 70]], [[50, None], [50, 50]]),  # MAA 75.0, BWT -5
    ("f", True, 1, "Original", 0, [[None, None], [90, 84]], [[None, None], [70, 64]]),  # multi-task
    ("g", True, 1, "Original", 1, [[None, None], [80, 80]], [[None, None], [60, 60]]),
    ("h", False, 1, "Diverse", 0, [[60, None], [20, 40]], [[40, None], [30, 40]]),  # MAA 45.0, BWT -20
]
ZERO_SHOT = {"ScienceQA": {"if": 20.0, "gk": 30.0}, "TextVQA": {"if": 0.0, "gk": 10.0}}


def write_run(root, name, multitask, experts, instructions, seed, if_m, gk_m, stages=None, timing=None, measured=None,
              **config):
    cfg = {"tasks": ",".join(TASKS), "max_train": 1500, "lora_r": 16, "lr": 1e-3, "out": os.path.join(root, name),
           "threads": 1, "seed": seed, "multitask": multitask, "experts": experts, "instructions": instructions,
           **config}
    res = {"tasks": TASKS, "matrix": if_m, **E.aggregates(if_m),
           "general_knowledge": {"tasks": TASKS, "matrix": gk_m, **E.aggregates(gk_m)},
           "config": cfg, "zero_shot": ZERO_SHOT}
    # the method's own settings with their defaults, as coin.py records them (runs written before that lack it)
    docs, _ = S.declared_method_settings().get(cfg.get("method", "sequential"), ([], {}))
    res["method_settings"] = {d.name: ast.literal_eval(d.default) for d in docs}
    if stages is not None:
        res["stages"] = stages
    if timing is not None:
        res["timing"] = timing
    if measured is not None:
        res["measured"] = measured
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "results.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture
def study(tmp_path):
    root = str(tmp_path / "study")
    for run in RUNS:
        write_run(root, *run)
    write_run(root, "unfinished", False, 8, "Original", 0, [[50, None], [None, None]], [[50, None], [None, None]])
    return root


def test_groups_by_config_and_skips_unfinished(study):
    groups, shared, unfinished = S.read_study(study)
    assert sorted(groups) == [(False, 1, "Diverse", "sequential", ()), (False, 1, "Original", "sequential", ()),
                              (False, 2, "Original", "sequential", ()), (True, 1, "Original", "sequential", ())]
    assert [r["name"] for r in groups[S.LORA]] == ["a", "b", "c"] and [r["seed"] for r in groups[S.LORA]] == [0, 1, 2]
    assert unfinished == ["unfinished (1/2 stages)"] and shared["max_train"] == 1500


def test_means_and_stds_by_hand(study):
    groups, _, _ = S.read_study(study)
    lora = groups[S.LORA]
    m, s, n = S.mean_std(r["if"]["BWT"] for r in lora)  # -20, -15, -20
    assert n == 3 and abs(m + 55 / 3) < 1e-9 and abs(s - (25 / 3) ** 0.5) < 1e-9  # squares 25/9 * (1 + 4 + 1), / 2
    m, s, _ = S.mean_std(r["if"]["MAA"] for r in lora)  # 65, 62.5, 77.5
    assert abs(m - 205 / 3) < 1e-9 and abs(s - (387.5 / 6) ** 0.5) < 1e-9
    assert S.mean_std([4.0]) == (4.0, None, 1) and S.mean_std([None]) == (None, None, 0)
    assert S.mean_pm_std([-20, -15, -20]) == "-18.3 ± 2.9" and S.mean_pm_std([7]) == "7.0" and S.mean_pm_std([]) == ""
    table = S.study_main_table(groups, TASKS, "if").splitlines()
    # MFT = mean of the diagonal, MFN = mean of the last row: LoRA MFT 70, 70, 85; MFN 50, 55, 65
    assert table[0] == "| method | n | ScienceQA | TextVQA | MFT | MFN | MAA | BWT |"
    # every Original run evaluates the base; its MFN is the mean of its row
    assert table[2] == "| zero-shot | 7 | 20.0 ± 0.0 | 0.0 ± 0.0 |  | 10.0 ± 0.0 |  |  |"
    assert table[3] == "| multi-task (LoRA) | 2 | 85.0 ± 7.1 | 82.0 ± 2.8 |  | 83.5 ± 4.9 |  |  |"  # no diagonal
    assert table[4] == "| LoRA | 3 | 43.3 ± 5.8 | 70.0 ± 10.0 | 75.0 ± 8.7 | 56.7 ± 7.6 | 68.3 ± 8.0 | -18.3 ± 2.9 |"
    assert table[5] == "| MoELoRA E=2 | 2 | 65.0 ± 7.1 | 70.0 ± 0.0 | 75.0 ± 0.0 | 67.5 ± 3.5 | 73.8 ± 1.8 | -7.5 ± 3.5 |"
    assert len(table) == 6  # the Diverse run is not in the main table
    gk = S.study_main_table(groups, TASKS, "gk").splitlines()
    assert gk[2] == "| zero-shot | 7 | 30.0 ± 0.0 | 10.0 ± 0.0 |  | 20.0 ± 0.0 |  |  |"
    # GK LoRA: MFT 52.5, 50, 60; MFN 50, 45, 57.5
    assert gk[4] == "| LoRA | 3 | 46.7 ± 7.6 | 55.0 ± 5.0 | 54.2 ± 5.2 | 50.8 ± 6.3 | 52.1 ± 5.9 | -3.3 ± 1.4 |"


def test_ablations_and_claims(study):
    groups, _, _ = S.read_study(study)
    md = S.write_study(study)
    assert ("| 1 | 3 | 0,1,2 | 68.3 ± 8.0 | -18.3 ± 2.9 | 56.7 ± 7.6 | 52.1 ± 5.9 | -3.3 ± 1.4 | 50.8 ± 6.3 |"
            in md)
    assert "| 2 | 2 | 0,1 | 73.8 ± 1.8 | -7.5 ± 3.5 | 67.5 ± 3.5 |" in md
    assert "| Diverse | 1 | 0 | 10.0 | 45.0 | -20.0 | 30.0 | 37.5 | -5.0 | 35.0 |" in md
    claims = S.study_claims(groups)
    # 1: -18.3 + 2 x 2.9 < 0
    assert claims[0].startswith("- **Claim 1**, sequential LoRA forgets: BWT -18.3 ± 2.9 (n=3): **yes**")
    # 2: GK BWT - IF BWT per run: 17.5, 10, 17.5 -> 15.0 ± 4.3, above 2 std
    assert "GK minus IF, run by run, 15.0 ± 4.3: **yes**, the GK drop is smaller" in claims[1]
    # 3: MAA 73.75 - 68.33 = +5.4, se sqrt(3.125 / 2 + 64.58 / 3) = 4.8: not resolved; BWT +10.8, se 3.0: higher
    assert claims[2] == ("- **Claim 3**, MoELoRA E=2 minus LoRA, difference of means ± its standard error: "
                         "MAA +5.4 ± 4.8 (**not resolved**, within 2 spreads of 0), BWT +10.8 ± 3.0 (**higher**: "
                         "forgets less)")
    assert not any("Claim 4" in c for c in claims)  # a trend needs three sequential methods
    assert "MoELoRA E=8 MAA 42.76, BWT -25.91" in claims[-1]


def test_claims_go_either_way(tmp_path):
    root = str(tmp_path)
    for seed, (a00, a10) in enumerate([(20, 30), (20, 32), (20, 34)]):  # LoRA gains: BWT +5, +6, +7
        write_run(root, f"s{seed}", False, 1, "Original", seed, [[a00, None], [a10, 50]], [[50, None], [20, 50]])
    claims = S.study_claims(S.read_study(root)[0])
    assert "**no**, positive beyond 2 std" in claims[0] and "**no**, the GK drop is larger" in claims[1]
    root1 = str(tmp_path / "one")
    write_run(root1, "x", False, 1, "Original", 0, [[50, None], [40, 50]], [[50, None], [40, 50]])
    assert "**cannot tell**" in S.study_claims(S.read_study(root1)[0])[0]


def test_refuses_mixed_settings_and_repeated_seeds(tmp_path):
    root = str(tmp_path / "mixed")
    write_run(root, "a", False, 1, "Original", 0, *RUNS[0][5:])
    write_run(root, "b", False, 2, "Original", 0, *RUNS[3][5:], max_train=3000)
    with pytest.raises(ValueError, match="max_train=3000"):
        S.read_study(root)
    root = str(tmp_path / "twice")
    write_run(root, "a", False, 1, "Original", 0, *RUNS[0][5:])
    write_run(root, "lora-s0-again", False, 1, "Original", 0, *RUNS[1][5:], threads=2)  # threads may differ
    with pytest.raises(ValueError, match="seed=0 again"):
        S.read_study(root)


def test_evaluation_settings_tell_runs_apart(tmp_path):
    """--eval_images changes scores as any setting does: a study refuses runs that differ in it, --compare names it."""
    root = str(tmp_path / "mixed")
    write_run(root, "a", False, 1, "Original", 0, *RUNS[0][5:], eval_images="official")
    write_run(root, "b", False, 2, "Original", 0, *RUNS[3][5:], eval_images="pad")
    with pytest.raises(ValueError, match="--eval_images='pad', but a has --eval_images='official'"):
        S.read_study(root)
    printed = E.compare([os.path.join(root, "a"), os.path.join(root, "b")])
    assert printed.endswith("settings that differ: --eval_images: 'official', 'pad'; --experts: 1, 2")


def test_writes_study_md_and_a_png(study):
    """`python study.py --out=DIR`, run as a command on a machine without torch and transformers."""
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, "study.py", f"--out={study}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = open(os.path.join(study, "study.md")).read()
    assert md.startswith("# CoIN-mini study: 8 finished runs") and "Left out, not finished: unfinished" in md
    assert md in proc.stdout and proc.stdout.endswith(f"wrote {os.path.join(study, 'study.md')} and study_curves.png\n")
    with Image.open(os.path.join(study, "study_curves.png")) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


def test_settings_and_the_old_commands(study, capsys):
    """--check goes with --readme only; eval.py's old --study and --readme name the study.py command instead."""
    with pytest.raises(UserError, match="--check: only with --readme"):
        S.main(["--check"])
    with pytest.raises(UserError, match="--out=x with --readme: the blocks name their own folders"):
        S.main(["--out=x", "--readme=README.md"])
    with pytest.raises(UserError, match=r"is now `python study.py`: run python study.py --out=out/x$"):
        E.main(["--study=out/x"])
    with pytest.raises(UserError, match=r"is now `python study.py`: run python study.py --readme=README.md --check$"):
        E.main(["--readme=README.md", "--check"])


def test_tiny_study_end_to_end(mini_data, tiny_base, tmp_path):
    """Wiring: real coin.py runs (LoRA, two seeds; multi-task) into one folder, then the study over them."""
    import coin
    root = tmp_path / "study"
    for name, extra in (("lora-s0", ["--seed=0"]), ("lora-s1", ["--seed=1"]), ("multitask-s0", ["--multitask=true"])):
        coin.main([f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={root / name}", "--tasks=GQA,ScienceQA",
                   "--experts=1", "--max_train=8", "--max_test=4", "--micro_batch=8", "--eval_batch=8",
                   "--max_new_tokens=8", "--lora_r=8", "--lora_dropout=0", "--threads=1", *extra])
    md = S.write_study(str(root))
    assert "| LoRA | 2 |" in md and "| multi-task (LoRA) | 1 |" in md and "| zero-shot | 3 |" in md
    assert os.path.isfile(root / "study_curves.png")


# --- the diagonal (MFT), the runs that did not learn a task, the robustness row, the seeds, the other methods

CHANCE = {"ScienceQA": 20.0, "TextVQA": 10.0}  # 3 x chance: 60 and 30


def data_dir_with_chance(tmp_path, chance=CHANCE):
    """A --data_dir holding only what the study reads from it: CoIN-mini's coin_mini.json."""
    path = tmp_path / "coin-mini"
    path.mkdir()
    (path / "coin_mini.json").write_text(json.dumps({"n_test": 200, "chance": chance}))
    return str(path)


# LoRA: seed 0 leaves ScienceQA under 60, seed 2 TextVQA under 30; MoELoRA E=2 learns both at both seeds
FLAG_RUNS = [
    ("lora-s0", False, 1, "Original", 0, [[50, None], [30, 60]]),  # BWT -10; learned TextVQA only: 0 / 1 = 0
    ("lora-s1", False, 1, "Original", 1, [[80, None], [40, 70]]),  # BWT -20; learned both: -20, as BWT
    ("lora-s2", False, 1, "Original", 2, [[90, None], [50, 20]]),  # BWT -20; learned ScienceQA only: -40 / 1
    ("moe-s0", False, 2, "Original", 0, [[80, None], [70, 70]]),   # BWT -5
    ("moe-s1", False, 2, "Original", 1, [[80, None], [60, 70]]),   # BWT -10
]


@pytest.fixture
def flagged_study(tmp_path):
    root, data_dir = str(tmp_path / "study"), data_dir_with_chance(tmp_path)
    for name, multitask, experts, instructions, seed, m in FLAG_RUNS:
        write_run(root, name, multitask, experts, instructions, seed, m, m, data_dir=data_dir)
    return root


def test_mft_is_the_diagonal_and_mfn_the_last_row():
    res = {"tasks": TASKS, "matrix": [[80, None], [40, 60]], "config": {"seed": 0}}
    run = S.summarise_run(res)["if"]
    assert run["diagonal"] == [80, 60] and run["MFT"] == 70 and run["MFN"] == 50
    multitask = S.summarise_run({"tasks": TASKS, "matrix": [[None, None], [90, 84]], "config": {"seed": 0}})["if"]
    assert multitask["MFT"] is None and multitask["MFN"] == 87  # one stage: no diagonal
    assert S.mean_of_all([1, 2, 3]) == 2 and S.mean_of_all([1, None]) is None and S.mean_of_all([]) is None


def test_flags_runs_under_3x_chance(flagged_study):
    groups, shared, _ = S.read_study(flagged_study)
    chance, note = S.chance_levels(shared, TASKS)
    assert chance == CHANCE and note.startswith("Chance levels from ")
    lora = {r["name"]: r for r in groups[S.LORA]}
    assert S.not_learned(lora["lora-s0"], TASKS, chance) == [("ScienceQA", 50, 60.0)]
    assert S.not_learned(lora["lora-s1"], TASKS, chance) == []
    assert S.not_learned(lora["lora-s2"], TASKS, chance) == [("TextVQA", 20, 30.0)]
    diagonal = S.study_diagonal_table(groups, TASKS, "if", chance).splitlines()
    assert diagonal[2] == "| 3 x chance |  | 60.0 | 30.0 |  |"
    # ScienceQA 50, 80, 90 (one under 60); TextVQA 60, 70, 20 (one under 30); MFT 55, 75, 55
    assert diagonal[3] == "| LoRA | 3 | 73.3 ± 20.8 †1 | 50.0 ± 26.5 †1 | 61.7 ± 11.5 |"
    assert diagonal[4] == "| MoELoRA E=2 | 2 | 80.0 ± 0.0 | 70.0 ± 0.0 | 75.0 ± 0.0 |"
    main = S.study_main_table(groups, TASKS, "if", chance)
    assert "| LoRA | 3 | 40.0 ± 10.0 | 50.0 ± 26.5 | 61.7 ± 11.5 †2 |" in main  # two LoRA runs flagged
    assert "| 75.0 ± 0.0 | 67.5 ± 3.5 |" in main and "† k: k of the method's runs" in main
    md = S.write_study(flagged_study)
    assert ("- **Not learned** (†), runs with a task under 3 x chance right after training it (score < 3 x chance): "
            "lora-s0 (ScienceQA 50.0 < 60.0); lora-s2 (TextVQA 20.0 < 30.0)") in md
    assert "| LoRA | 0,1,2 | lora-s0 † lora-s1 lora-s2 † |" in md and "| moe-s0 moe-s1 |" in md
    # the General Knowledge tables carry no chance row and no flags: chance is the exact scorers'
    gk = md[md.index("## General Knowledge"):md.index("## MoELoRA experts")]
    assert "3 x chance |" not in gk and "†" not in gk


def test_robustness_row_is_bwt_over_learned_tasks(flagged_study):
    groups, shared, _ = S.read_study(flagged_study)
    chance, _ = S.chance_levels(shared, TASKS)
    bwt = {r["name"]: S.bwt_learned(r, TASKS, chance) for runs in groups.values() for r in runs}
    assert bwt == {"lora-s0": 0.0, "lora-s1": -20.0, "lora-s2": -40.0, "moe-s0": -5.0, "moe-s1": -10.0}
    learned_all = [r for runs in groups.values() for r in runs if not S.not_learned(r, TASKS, chance)]
    assert len(learned_all) == 3 and all(bwt[r["name"]] == r["if"]["BWT"] for r in learned_all)  # = BWT then
    claims = S.study_claims(groups, TASKS, chance)
    # LoRA 0, -20, -40: -20 ± 20; E=2 -5, -10: -7.5 ± 3.5; +12.5, se sqrt(3.54^2 / 2 + 20^2 / 3) = 11.8
    assert ("- **Robustness**, claim 3 on BWT over the tasks each run learned (diagonal >= 3 x chance): LoRA -20.0 ± "
            "20.0, MoELoRA E=2 -7.5 ± 3.5; MoELoRA minus LoRA: +12.5 ± 11.8 (E=2) (**not resolved**, within 2 "
            "spreads of 0)") in claims
    assert "MoELoRA E=8 MAA 42.76, BWT -25.91" in claims[-1]  # the paper's numbers stay last


def test_unknown_chance_is_said_not_guessed(tmp_path):
    root = str(tmp_path / "study")
    for name, multitask, experts, instructions, seed, m in FLAG_RUNS:
        write_run(root, name, multitask, experts, instructions, seed, m, m, data_dir=str(tmp_path / "nowhere"))
    md = S.write_study(root)
    assert f"Chance levels unknown: no {tmp_path / 'nowhere' / 'coin_mini.json'}" in md
    assert "- **Not learned**: Chance levels unknown" in md and "†" not in md and "3 x chance |" not in md


def test_seeds_needed_formula():
    # n >= (2 + z)^2 (sa^2 + sb^2) / d^2: LoRA sd 3.9, MoELoRA E=8 sd 2.0, the paper's +6.7
    assert S.seeds_needed(3.9, 2.0, 6.7, power=0.5) == 2   # 4 x 19.21 / 44.89 = 1.71
    assert S.seeds_needed(3.9, 2.0, 6.7, power=0.8) == 4   # 2.84^2 x 19.21 / 44.89 = 3.46
    assert S.seeds_needed(3.9, 2.0, 6.7, power=0.9) == 5   # 3.28^2 x 0.428 = 4.61
    assert S.seeds_needed(3.9, 6.9, 6.7, power=0.8) == 12  # E=4's sd 6.9: 8.07 x 62.82 / 44.89 = 11.3
    assert S.seeds_needed(3.0, 4.0, 5.0, power=0.5) == 4   # exactly 4 x 25 / 25
    assert S.seeds_needed(0.1, 0.1, 50.0) == 2             # a spread needs two seeds
    for sa, sb, d in ((3.9, 2.0, 6.7), (4.1, 3.9, 6.7), (6.9, 3.9, 3.0)):
        n = S.seeds_needed(sa, sb, d, power=0.5)  # the smallest n that puts d at 2 standard errors
        assert d >= 2 * ((sa ** 2 + sb ** 2) / n) ** 0.5 and (n == 2 or d < 2 * ((sa ** 2 + sb ** 2) / (n - 1)) ** 0.5)
    assert S.seeds_line("MoELoRA E=8", 2.0, "LoRA", 3.9, 6.71) == (
        "- MoELoRA E=8 against LoRA: BWT sd 2.0 and 3.9, a true difference of +6.7: 2 seeds each for an even chance "
        "of resolving it, 4 for 80%, 5 for 90%")


def test_study_md_shows_the_seeds_needed(study):
    md = S.write_study(study)
    # measured: E=2 BWT -10, -5 (sd 3.54), LoRA -20, -15, -20 (sd 2.89)
    assert "## Seeds the MoELoRA claim needs" in md
    assert S.seeds_line("MoELoRA E=2", 50 ** 0.5 / 2, "LoRA", (25 / 3) ** 0.5, S.PAPER_BWT_GAIN) in md


# BWT: LoRA -20, -15, -20; MoELoRA E=8 -5, -10; LwF -20, -30; EWC -15, -10; Replay -1, -2; O-LoRA -3, -4
METHOD_RUNS = [(f"m{i}", e, method, seed, [[80, None], [80 + 2 * bwt, 70]])
               for i, (e, method, seed, bwt) in enumerate([
                   (8, "sequential", 0, -5), (8, "sequential", 1, -10), (1, "lwf", 0, -20), (1, "lwf", 1, -30),
                   (1, "ewc", 0, -15), (1, "ewc", 1, -10), (1, "replay", 0, -1), (1, "replay", 1, -2),
                   (1, "olora", 0, -3), (1, "olora", 1, -4)])]


@pytest.fixture
def method_study(tmp_path):
    root = str(tmp_path / "study")
    for run in RUNS[:2]:  # LoRA seeds 0 and 1: results.json without `method`, as before --method existed
        write_run(root, *run)
    write_run(root, *RUNS[2][:5], *RUNS[2][5:], method="sequential")  # seed 2 says it
    for name, experts, method, seed, m in METHOD_RUNS:
        write_run(root, name, False, experts, "Original", seed, m, m, method=method)
    return root


def test_groups_by_method_and_names_the_rows(method_study):
    groups, _, _ = S.read_study(method_study)
    assert [r["name"] for r in groups[S.LORA]] == ["a", "b", "c"]  # no `method` = sequential
    table = S.study_main_table(groups, TASKS, "if").splitlines()
    assert [line.split(" | ")[0] for line in table[3:]] == ["| LoRA", "| MoELoRA E=8", "| LwF (LoRA)", "| EWC (LoRA)",
                                                            "| Replay (LoRA)", "| O-LoRA"]
    assert table[5].endswith("| -25.0 ± 7.1 |") and table[8].endswith("| -3.5 ± 0.7 |")
    assert S.method_name(S.Method(False, 8, "Original", "lwf")) == "LwF (MoELoRA E=8)"
    claims = S.study_claims(groups)
    # E=8 -7.5 ± 3.54 minus LwF -25 ± 7.07: +17.5, se sqrt(6.25 + 25) = 5.6, beyond 2 se; minus EWC -12.5 ± 3.54:
    # +5.0, se 3.5, within
    assert ("- **Claim 5**, MoELoRA E=8 forgets less than LwF and EWC: BWT minus LwF (LoRA) +17.5 ± 5.6 (**higher**: "
            "forgets less), EWC (LoRA) +5.0 ± 3.5 (**not resolved**, within 2 spreads of 0)") in claims
    # Replay -1.5 ± 0.71, O-LoRA -3.5 ± 0.71 above the best other, E=8 -7.5 ± 3.54: +6.0 and +4.0, se 2.5
    assert ("- **Peers**, Replay and O-LoRA forget least: BWT means, highest first: Replay (LoRA) -1.5, O-LoRA -3.5, "
            "MoELoRA E=8 -7.5, EWC (LoRA) -12.5, LoRA -18.3, LwF (LoRA) -25.0; Replay (LoRA) and O-LoRA above every "
            "other: **yes**; minus the best other, MoELoRA E=8: Replay +6.0 ± 2.5 (**higher**: forgets less), O-LoRA "
            "+4.0 ± 2.5 (**not resolved**, within 2 spreads of 0)") in claims
    assert any(c.startswith("- **Claim 3**, MoELoRA E=8 minus LoRA") for c in claims)
    compact = S.claims_table(groups, TASKS, None)
    assert ("| 5. MoELoRA forgets less than LwF and EWC (MoELoRA E=8 minus each, BWT difference beyond 2 standard "
            "errors) | +17.5 ± 5.6 (LwF) (**higher**), +5.0 ± 3.5 (EWC) (**not resolved**) |") in compact
    assert "| **not resolved**: +10.8 ± 3.0 (E=8) |" not in compact and "| **yes**: -18.3 ± 2.9 |" in compact


def test_routing_column_for_the_runs_that_route(tmp_path):
    """HiDe-LLaVA's runs record their routing (results.json's measured): the Instruction Following tables show the
    last stage's mean over the tasks, mean ± std over seeds, blank for LoRA; the General Knowledge table has none."""
    root = str(tmp_path)
    for run in RUNS[:2]:
        write_run(root, *run)
    for seed, last in ((0, [1.0, 0.8]), (1, [0.7, 0.9])):  # means 90 and 80: 85.0 ± 7.1
        measured = {"stage1-ScienceQA": {"ScienceQA": {"routed": 0.5}},  # not the last stage: not in the column
                    "stage2-TextVQA": {t: {"routed": v} for t, v in zip(TASKS, last)}}
        write_run(root, f"hide{seed}", False, 8, "Original", seed, RUNS[seed][5], RUNS[seed][6], measured=measured,
                  method="hide")
    groups, _, _ = S.read_study(root)
    table = S.study_main_table(groups, TASKS, "if").splitlines()
    assert table[0].endswith("| MFT | MFN | MAA | BWT | routed |") and table[1].count("|---") == 9
    assert table[3].startswith("| LoRA |") and table[3].endswith("| -17.5 ± 3.5 |  |")
    assert table[4].startswith("| HiDe-LLaVA |") and table[4].endswith("| -17.5 ± 3.5 | 85.0 ± 7.1 |")
    assert table[-1] == S.ROUTED_NOTE
    assert "routed" not in S.study_main_table(groups, TASKS, "gk")
    summary = S.study_summary_table(groups, TASKS).splitlines()
    assert summary[0] == "| method | n | MFT | MFN | MAA | BWT | routed | GK MFT | GK MFN | GK MAA | GK BWT |"
    assert summary[2] == "| zero-shot | 4 |  | 10.0 ± 0.0 |  |  |  |  | 20.0 ± 0.0 |  |  |"
    assert summary[4].startswith("| HiDe-LLaVA |") and "| -17.5 ± 3.5 | 85.0 ± 7.1 | 51.2 ± 1.8 |" in summary[4]
    assert S.ROUTED_NOTE in S.write_study(root)


def test_robustness_rows_of_claim_5_and_the_peers(tmp_path):
    """Claim 5 and the peers' ordering again on BWT over the tasks each run learned: an O-LoRA that never learns
    TextVQA (diagonal 5 < 3 x chance 30) looks as if it forgot little, and over what it learned forgets the most."""
    root, data_dir = str(tmp_path / "study"), data_dir_with_chance(tmp_path)
    for run in RUNS[:3]:
        write_run(root, *run, data_dir=data_dir)
    for name, experts, method, seed, m in METHOD_RUNS[:8]:
        write_run(root, name, False, experts, "Original", seed, m, m, method=method, data_dir=data_dir)
    for seed, kept in ((0, 40), (1, 50)):  # BWT -20 and -15; over ScienceQA alone -40 and -30
        m = [[80, None], [kept, 5]]
        write_run(root, f"olora-{seed}", False, 1, "Original", seed, m, m, method="olora", data_dir=data_dir)
    groups, shared, _ = S.read_study(root)
    claims = S.study_claims(groups, TASKS, S.chance_levels(shared, TASKS)[0])
    assert ("- **Robustness**, claim 5, MoELoRA E=8 forgets less than LwF and EWC: BWT over the tasks each run learned "
            "minus LwF (LoRA) +17.5 ± 5.6 (**higher**: forgets less), EWC (LoRA) +5.0 ± 3.5 (**not resolved**, within "
            "2 spreads of 0)") in claims  # every run of these learned both tasks: as claim 5
    # O-LoRA -40, -30: -35 ± 7.07, minus MoELoRA E=8 -7.5 ± 3.54: -27.5, se sqrt(50 / 2 + 12.5 / 2) = 5.6
    assert ("- **Robustness**, the peers, Replay and O-LoRA forget least: BWT over the tasks each run learned means, "
            "highest first: Replay (LoRA) -1.5, MoELoRA E=8 -7.5, EWC (LoRA) -12.5, LoRA -18.3, LwF (LoRA) -25.0, "
            "O-LoRA -35.0; Replay (LoRA) and O-LoRA above every other: **no**; minus the best other, MoELoRA E=8: "
            "Replay +6.0 ± 2.5 (**higher**: forgets less), O-LoRA -27.5 ± 5.6 (**lower**: forgets more)") in claims
    assert any(c.startswith("- **Peers**, Replay and O-LoRA forget least: BWT means, highest first: Replay (LoRA) "
                            "-1.5, MoELoRA E=8 -7.5, EWC (LoRA) -12.5, O-LoRA -17.5,") for c in claims)


def test_a_method_at_another_strength_is_a_row_of_its_own(tmp_path):
    """EWC at coin.py's default lambda and at 1e4 in one study: two rows, the second named by its setting; the claims
    compare with the default one; a setting of another method (lwf_alpha in an EWC run) does not split a study."""
    root = str(tmp_path / "study")
    for run in RUNS[:5]:  # LoRA and MoELoRA E=2 (BWT -10, -5)
        write_run(root, *run)
    ewc = [(0, -15, 0.1), (1, -10, 0.1), (0, -2, 1e4), (1, -4, 1e4)]
    for i, (seed, bwt, lam) in enumerate(ewc):
        m = [[80, None], [80 + 2 * bwt, 70]]
        write_run(root, f"ewc{i}", False, 1, "Original", seed, m, m, method="ewc", ewc_lambda=lam, ewc_samples=1000,
                  lwf_alpha=0.1 if i else 0.5)
    for seed, bwt in ((0, -1), (1, -2)):
        m = [[80, None], [80 + 2 * bwt, 70]]
        write_run(root, f"replay{seed}", False, 1, "Original", seed, m, m, method="replay", replay_ratio=0.1)
    groups = S.read_study(root)[0]
    default = S.Method(False, 1, "Original", "ewc")
    strong = S.Method(False, 1, "Original", "ewc", (("ewc_lambda", 1e4),))
    assert [r["name"] for r in groups[default]] == ["ewc0", "ewc1"] and [r["name"] for r in groups[strong]] == [
        "ewc2", "ewc3"]
    assert S.method_name(strong) == "EWC (LoRA), --ewc_lambda=10000"
    table = S.study_main_table(groups, TASKS, "if")
    assert table.index("| EWC (LoRA) | 2 |") < table.index("| EWC (LoRA), --ewc_lambda=10000 | 2 |")
    claim_5, peers = S.method_findings(groups)  # E=2 -7.5 ± 3.54 minus the default EWC's -12.5 ± 3.54 (1e4's: -3.0)
    assert claim_5["claim"].startswith("5. ") and claim_5["result"] == "**not resolved**: +5.0 ± 3.5 (EWC)"
    # the peers' ordering too: Replay (-1.5) against the best other default (E=2, -7.5), not against EWC at 1e4
    assert peers["result"] == "**yes**; **higher**: Replay +6.0 ± 2.5 against MoELoRA E=2", peers["result"]
    docs, _ = S.declared_method_settings()["ewc"]  # read from methods.py's EWC class, as coin.py --help shows it
    assert {d.name: d.default for d in docs} == {"ewc_lambda": "0.1", "ewc_samples": "1000"}


def test_claim_5_says_when_it_cannot_be_tested(study):
    claims = S.study_claims(S.read_study(study)[0])
    assert ("- **Claim 5**, MoELoRA forgets less than LwF and EWC: not tested, no finished LwF or EWC "
            "(--method=lwf, --method=ewc) runs") in claims


# --- README blocks


def test_readme_blocks_refill_and_check(study, tmp_path, capsys):
    data_dir = data_dir_with_chance(tmp_path)
    lora, moe = str(tmp_path / "out" / "lora"), str(tmp_path / "out" / "moelora")
    write_run(str(tmp_path / "out"), "lora", False, 1, "Original", 0, [[80, None], [40, 60]], [[80, None], [40, 60]],
              data_dir=data_dir)
    write_run(str(tmp_path / "out"), "moelora", False, 8, "Original", 0, [[80, None], [60, 70]],
              [[80, None], [60, 70]], data_dir=data_dir)
    S.write_study(study)
    readme, docs = tmp_path / "README.md", tmp_path / "study.md"
    readme.write_text(f"# title\n\n<!-- figures: diagonal {lora} {moe} -->\nstale\n<!-- /figures -->\ntext between\n"
                      f"<!-- figures: compare {lora} {moe} -->\n<!-- /figures -->\n\n"
                      f"<!-- figures: study {study} -->\n| old |\n<!-- /figures -->\nthe end\n")
    docs.write_text(f"# study\n\n<!-- figures: study-full {study} -->\n<!-- /figures -->\n\n![plot](x.png)\n")
    S.main([f"--readme={readme},{docs}"])
    text = readme.read_text()
    assert text.startswith(f"# title\n\n<!-- figures: diagonal {lora} {moe} -->\n"
                           "| | ScienceQA | TextVQA | mean |\n|---|---|---|---|\n"
                           "| 3 x chance | 60.0 | 30.0 |  |\n"
                           "| base, zero-shot | 20.0 | 0.0 | 10.0 |\n"
                           "| LoRA (E=1) | 80.0 | 60.0 | 70.0 |\n"
                           "| MoELoRA (E=8) | 80.0 | 70.0 | 75.0 |\n<!-- /figures -->\ntext between\n")
    assert f"<!-- figures: compare {lora} {moe} -->\n{E.compare([lora, moe])}\n<!-- /figures -->\n\n" in text
    groups = S.read_study(study)[0]
    assert S.study_summary_table(groups, TASKS) in text and "| the paper's claim | CoIN-mini |" in text
    assert "| zero-shot | 7 |  | 10.0 ± 0.0 |  |  |  | 20.0 ± 0.0 |  |  |" in text  # by hand from RUNS
    assert ("| LoRA | 3 | 75.0 ± 8.7 | 56.7 ± 7.6 | 68.3 ± 8.0 | -18.3 ± 2.9 | 54.2 ± 5.2 | 50.8 ± 6.3 | 52.1 ± 5.9 | "
            "-3.3 ± 1.4 |") in text
    claim_1 = "| 1. sequential instruction tuning forgets (LoRA BWT below 0 by more than 2 std) | **yes**: -18.3 ± 2.9 |"
    assert claim_1 in text and text.endswith("<!-- /figures -->\nthe end\n")
    full = docs.read_text()
    study_md = open(os.path.join(study, "study.md")).read()
    assert study_md.split("\n", 2)[2].split("\n![accuracy")[0].strip("\n") in full  # after the title, no plot
    assert "CoIN-mini study:" not in full and "study_curves.png" not in full and full.endswith("\n\n![plot](x.png)\n")
    capsys.readouterr()
    S.main([f"--readme={readme},{docs}", "--check"])  # up to date: no exit
    assert "README.md: 3 generated blocks, up to date" in capsys.readouterr().out
    readme.write_text(text.replace("| 80.0 | 70.0 | 75.0 |", "| 80.0 | 70.0 | 99.0 |"))
    stale = readme.read_text()
    with pytest.raises(SystemExit, match="--check: .*README.md would change"):
        S.main([f"--readme={readme}", "--check=true"])
    assert readme.read_text() == stale and f"would change: diagonal {lora} {moe}" in capsys.readouterr().out
    os.makedirs(tmp_path / "unfinished")
    readme.write_text(f"<!-- figures: compare {tmp_path / 'unfinished'} -->\n<!-- /figures -->\n")
    with pytest.raises(UserError, match=r"block 'compare .*unfinished': no .*unfinished/results.json"):
        S.main([f"--readme={readme}"])
    # a block whose run folders are not there (yet) keeps its figures, and says so
    kept = f"<!-- figures: compare {tmp_path / 'not-run'} -->\n| old |\n<!-- /figures -->\n"
    readme.write_text(kept)
    capsys.readouterr()
    S.main([f"--readme={readme}", "--check"])
    assert readme.read_text() == kept and "kept as they are: compare" in capsys.readouterr().out
    readme.write_text(f"<!-- figures: diagonal {lora} -->\nnever closed\n")
    with pytest.raises(UserError, match="close each with"):
        S.main([f"--readme={readme}"])
    readme.write_text(f"<!-- figures: heatmap {lora} -->\n<!-- /figures -->\n")
    with pytest.raises(UserError, match="expected 'diagonal RUN...'"):
        S.main([f"--readme={readme}"])


def test_cost_sums_each_runs_timing(tmp_path):
    root = str(tmp_path / "study")
    timing = {"zero_shot_eval": 30.0, "stage1-ScienceQA": {"train": 240.0, "eval": 6.0},
              "stage2-TextVQA": {"train": 120.0, "eval": 4.0}}  # 400 s
    for name, seed, seconds in (("a", 0, 1.0), ("b", 1, 2.0)):  # 400 s and 800 s: 6.7 and 13.3 minutes
        write_run(root, name, False, 1, "Original", seed, *RUNS[0][5:], timing={
            k: ({kk: vv * seconds for kk, vv in v.items()} if isinstance(v, dict) else v * seconds)
            for k, v in timing.items()})
    write_run(root, "c", False, 2, "Original", 0, *RUNS[3][5:])  # no timing
    S.main([f"--out={root}"])
    md = open(os.path.join(root, "study.md")).read()
    assert "| LoRA | 2 | 10.0 ± 4.7 | 20 |" in md and "| MoELoRA E=2 | 0 |  | 0 |" in md
    assert "All timed runs: 20 minutes" in md and "No timing in: c." in md
