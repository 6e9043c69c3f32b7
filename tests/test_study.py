"""study.py (eval.py --study): hand-made results.json files of known matrices (two tasks) against means, stds and claims
computed by hand; runs grouped by their config, not their folder names; the plot; and one tiny real study."""
import json
import os

import pytest
from PIL import Image

import eval as E
import study as S

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


def write_run(root, name, multitask, experts, instructions, seed, if_m, gk_m, stages=None, **config):
    cfg = {"tasks": ",".join(TASKS), "max_train": 1500, "lora_r": 16, "lr": 1e-3, "out": os.path.join(root, name),
           "threads": 1, "seed": seed, "multitask": multitask, "experts": experts, "instructions": instructions,
           **config}
    res = {"tasks": TASKS, "matrix": if_m, **E.aggregates(if_m),
           "general_knowledge": {"tasks": TASKS, "matrix": gk_m, **E.aggregates(gk_m)},
           "config": cfg, "zero_shot": ZERO_SHOT}
    if stages is not None:
        res["stages"] = stages
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
    assert sorted(groups) == [(False, 1, "Diverse"), (False, 1, "Original"), (False, 2, "Original"),
                              (True, 1, "Original")]
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
    assert table[0] == "| method | n | ScienceQA | TextVQA | MAA | BWT |"
    assert table[2] == "| zero-shot | 7 | 20.0 ± 0.0 | 0.0 ± 0.0 |  |  |"  # every Original run evaluates the base
    assert table[3] == "| multi-task (LoRA) | 2 | 85.0 ± 7.1 | 82.0 ± 2.8 |  |  |"
    assert table[4] == "| LoRA | 3 | 43.3 ± 5.8 | 70.0 ± 10.0 | 68.3 ± 8.0 | -18.3 ± 2.9 |"
    assert table[5] == "| MoELoRA E=2 | 2 | 65.0 ± 7.1 | 70.0 ± 0.0 | 73.8 ± 1.8 | -7.5 ± 3.5 |"
    assert len(table) == 6  # the Diverse run is not in the main table
    gk = S.study_main_table(groups, TASKS, "gk").splitlines()
    assert gk[2] == "| zero-shot | 7 | 30.0 ± 0.0 | 10.0 ± 0.0 |  |  |"
    assert gk[4] == "| LoRA | 3 | 46.7 ± 7.6 | 55.0 ± 5.0 | 52.1 ± 5.9 | -3.3 ± 1.4 |"


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
    E.main([f"--study={study}"])
    md = open(os.path.join(study, "study.md")).read()
    assert md.startswith("# CoIN-mini study: 8 finished runs") and "Left out, not finished: unfinished" in md
    with Image.open(os.path.join(study, "study_curves.png")) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


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
