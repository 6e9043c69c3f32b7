"""The real CoIN release as downloaded (a miniature: tests/release_fixture.py): its layout and check, the official
ground truth under the image root, the official scorers' rules, the official results tree, and a training run over
all eight tasks, end to end."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import coin
import data
from cli import UserError
import eval as E
from release_fixture import write_release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(data_dir, image_dir, official results folder) of the miniature release; tests that change it copy it."""
    return write_release(str(tmp_path_factory.mktemp("release")))


def check(*args):
    return subprocess.run([sys.executable, "data.py", "check", *args], cwd=ROOT, capture_output=True, text=True)


def test_layout_and_check(release):
    root, image_dir, _ = release
    assert os.path.isfile(os.path.join(root, "Instructions_Original", "OCRVQA", "test.json"))
    assert [data.task_file(root, t, "eval").rsplit(os.sep, 2)[1:] for t in ("TextVQA", "OCR-VQA")] == \
        [["TextVQA", "val.json"], ["OCRVQA", "test.json"]]
    assert data.parse_tasks("ocrvqa") == data.parse_tasks("OCR-VQA") == ["OCR-VQA"]  # --tasks takes either name
    ok = check(f"--data={root}", f"--image_dir={image_dir}")
    assert ok.returncode == 0 and "no problems" in ok.stdout and "note:" not in ok.stdout, ok.stdout + ok.stderr
    for task, split in (("TextVQA", "val"), ("VizWiz", "val"), ("VQAv2", "val"), ("OCR-VQA", "test"),
                        ("ScienceQA", "test"), ("Grounding", "test")):
        assert f"| {task} | {split} | 4 | 4 | 0 | 0 | 0 | 0 |" in ok.stdout, (task, ok.stdout)
    checked = data.check_tasks(root, data.TASKS, "Original", image_dir)
    assert sum(ex["image"] is None for ex in checked["ScienceQA", "train"][1]) == 1  # a text-only item
    grounding = checked["Grounding", "test"][1]
    assert "answer" not in grounding[3] and data.record_answer(grounding[3]) == grounding[3]["answer_bbox"]
    # a ground-truth file that is not there: a note (training does not need it; scoring does)
    moved = shutil.copytree(image_dir, os.path.join(os.path.dirname(root), "images-without-gqa"))
    os.remove(os.path.join(moved, "GQA", "testdev_balanced_questions.json"))
    noted = check(f"--data={root}", f"--image_dir={moved}", "--tasks=GQA")
    assert noted.returncode == 0 and "note: " in noted.stdout and \
        "GQA/testdev_balanced_questions.json: no such file" in noted.stdout, noted.stdout


def test_grounding_record_without_answer_scores_and_judges(release):
    root, image_dir, _ = release
    recs = data.test_examples(root, "Grounding")
    assert sum("answer" not in r for r in recs) == 2
    preds = [{"question_id": r["question_id"], "text": r["answer_bbox"]} for r in recs]
    for mode in E.SCORINGS:
        assert E.score_task("Grounding", preds, recs, mode)["score"] == 100
    assert E.ExactJudge().score("Grounding", preds, recs)["score"] == 100


# -----------------------------------------------------------------------------
# The official scorers' rules, on hand-made prediction files (the numbers in the comments are the official
# scripts' own: each case was run through them)


def preds(*rows):
    return [{"question_id": q, "text": t} for q, t in rows]


def test_official_scienceqa_rules(release):
    root, image_dir, _ = release
    recs = data.test_examples(root, "ScienceQA")  # pids "5".."8", right letters A B A B
    res = E.score_task("ScienceQA", preds(("5", "C"), ("5", "A"), (6, "B"), ("7", "a"), ("99", "A")), recs,
                       "official", image_dir)
    # the last line of "5" counts (right); 6 is a number, not the pid "6" (missing); "7": "a" reads A (right);
    # "8" missing; "99" is outside the split: 2 of the split's 4; the lines of 6 and "99" match no pid (left out)
    assert (res["score"], res["n"], res["missing"], res["left_out"]) == (50.0, 4, 2, 2)
    with pytest.raises(ValueError, match="appears twice"):
        E.score_task("ScienceQA", preds(("5", "C"), ("5", "A")), recs, "fixed", image_dir)


def test_official_gqa_rules(release):
    root, image_dir, _ = release
    recs = data.test_examples(root, "GQA")  # yes, no, left, red; the 4th is not marked isBalanced
    ids = [r["question_id"] for r in recs]
    res = E.score_task("GQA", preds((ids[0], " yes"), (ids[1], "No."), (ids[1], "No.."), (ids[3], "red")), recs,
                       "official", image_dir)
    # " yes" keeps its space (wrong); "No.." -> "no" (right); the unbalanced question is left out; ids[2] missing
    assert (res["score"], res["n"], res["missing"], res["unbalanced"]) == (50.0, 2, 1, 1)
    fixed = E.score_task("GQA", preds((ids[0], " yes"), (ids[1], "No.."), (ids[3], "red")), recs, "fixed", image_dir)
    assert (fixed["score"], fixed["n"]) == (100 * 2 / 3, 3)  # balanced records, " yes" right, ids[2] wrong
    with pytest.raises(ValueError, match="question_ids not in .*testdev_balanced_questions.json"):
        E.score_task("GQA", preds((int(ids[0]), "yes")), recs, "official", image_dir)  # eval_gqa.py: KeyError


def test_official_line_counting_tasks(release):
    root, image_dir, _ = release
    viz = data.test_examples(root, "VizWiz")  # unanswerable, soup, blue, coffee
    ids = [r["question_id"] for r in viz]
    res = E.score_task("VizWiz", preds((ids[1], "Soup"), (ids[1], "soup"), (ids[2], "blue.")), viz, "official")
    # both lines of ids[1] count, "blue." is wrong; eval_vizwiz.py's arithmetic 100. * right / total, to the last bit
    assert (res["score"], res["n"], res["missing"], res["repeated"]) == (100.0 * 2 / 3, 3, 2, 1)
    ocr = data.test_examples(root, "OCR-VQA")
    with pytest.raises(ValueError, match=r"OCR-VQA predictions: 1 lines with a question_id not in the test file"):
        E.score_task("OCR-VQA", preds((ocr[0]["question_id"] + "x", "Cooking")), ocr, "official")
    imagenet = data.test_examples(root, "ImageNet")  # goldfish, tabby cat, tench, great white shark
    swapped = preds((imagenet[1]["question_id"], "goldfish"), (imagenet[0]["question_id"], "cat"))
    assert E.score_task("ImageNet", swapped, imagenet, "official")["score"] == 100  # line i <-> record i
    assert E.score_task("ImageNet", swapped, imagenet, "fixed")["score"] == 0  # by question_id, 2 missing
    tv = data.test_examples(root, "TextVQA")  # stop, exit (2 of 10 humans), open, sale
    res = E.score_task("TextVQA", preds((tv[1]["question_id"], "EXIT"), (tv[1]["question_id"], "way out")), tv,
                       "official", image_dir)
    assert res["score"] == 100.0 * ((0.6 + 1.0) / 2) and res["n"] == 2  # m4c: 2 of 10 -> 0.6; 8 of 10 -> 1
    # eval_textvqa.py finds ids in its annotation file only: question 99 is there, not in val.json
    assert E.score_task("TextVQA", preds((99, "Acme.")), tv, "official", image_dir)["score"] == 100
    with pytest.raises(ValueError, match="question_id not in the test file"):
        E.score_task("TextVQA", preds((99, "Acme.")), tv, "official")  # --answers_from_test: the test file's ids


def test_official_grounding_parser_keeps_spaces():
    """eval_grounding.py cuts one character from each end of the bracket-free string and strips no space."""
    assert E.parse_box("[1.00, 0.10, 0.20, 0.19]", "official") == [0.0, 0.1, 0.2, 0.1]  # "1.00" -> ".00"
    assert E.parse_box(" [1.00, 0.10, 0.20, 0.19]", "official") == [1.0, 0.1, 0.2, 0.1]  # cuts the space instead
    assert E.parse_box("[1.00, 0.10, 0.20, 0.19] ", "official") == [0.0, 0.1, 0.2, 0.19]  # ... or the last one
    assert E.parse_box(" [1.00, 0.10, 0.20, 0.19] ", "fixed") == [1.0, 0.1, 0.2, 0.19]


# -----------------------------------------------------------------------------
# Ground truth and the official results tree through eval.py


def test_ground_truth_is_required_or_opted_out(release, tmp_path, capsys):
    root, image_dir, results = release
    tv = os.path.join(results, "LLaVA", "TextVQA", "Finetune", "merge.jsonl")
    E.main([f"--predictions={tv}", "--task=TextVQA", f"--data_dir={root}", f"--image_dir={image_dir}"])
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["score"] == 90.0  # ten human answers
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError, match=r"empty/TextVQA/TextVQA_0.5.1_val.json: no such file.*"
                                                r"--answers_from_test=true"):
        E.main([f"--predictions={tv}", "--task=TextVQA", f"--data_dir={root}", f"--ground_truth={empty}"])
    with pytest.raises(FileNotFoundError, match="TextVQA_0.5.1_val.json: no such file"):  # no image root there
        E.main([f"--predictions={tv}", "--task=TextVQA", f"--data_dir={root}"])
    E.main([f"--predictions={tv}", "--task=TextVQA", f"--data_dir={root}", "--answers_from_test=true"])
    scored = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert scored["score"] == 100.0 and scored["ground_truth"] == "test file"  # "EXIT" matches the one answer
    out = tmp_path / "scored"
    E.main([f"--predictions={results}", f"--data_dir={root}", "--answers_from_test=true", f"--out={out}",
            "--judge=none"])
    assert json.load(open(out / "results.json"))["answers_from_test"] is True


def test_official_results_tree(release, tmp_path, capsys):
    """results/CoIN/LLaVA/<task folder>/<Finetune|later task>/merge.jsonl: the order comes from the tree."""
    root, image_dir, results = release
    out = tmp_path / "official"
    E.main([f"--predictions={results}", f"--data_dir={root}", f"--image_dir={image_dir}", f"--out={out}"])
    res = json.load(open(out / "results.json"))
    assert res["tasks"] == data.TASKS and res["stages"] == 8 and res["ground_truth"] == image_dir
    m = res["matrix"]
    assert [m[j][j] for j in range(8)] == [100.0, 90.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]
    # after k later stages the first k records answer "Unanswerable": ScienceQA 3 of 4 after TextVQA, none at the end;
    # VizWiz's first answer is "unanswerable", so it stays right
    assert m[1][0] == 75.0 and m[7][0] == 0.0 and m[6][4] == 75.0
    with pytest.raises(UserError, match="several models"):
        shutil.copytree(os.path.join(results, "LLaVA"), tmp_path / "two" / "Qwen")
        shutil.copytree(os.path.join(results, "LLaVA"), tmp_path / "two" / "LLaVA")
        E.main([f"--predictions={tmp_path / 'two'}", f"--data_dir={root}", f"--image_dir={image_dir}"])
    capsys.readouterr()


# -----------------------------------------------------------------------------
# End to end: check, train all eight tasks on the release, score coin's predictions again


def test_train_all_eight_tasks_then_score(release, tiny_base, tmp_path):
    root, image_dir, _ = release
    out = str(tmp_path / "run")
    coin.main([f"--data_dir={root}", f"--image_dir={image_dir}", f"--base={tiny_base}", f"--out={out}",
               "--micro_batch=4", "--eval_batch=8", "--max_new_tokens=3", "--lora_r=4", "--experts=2", "--threads=1",
               "--zero_shot=false"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["tasks"] == data.TASKS and res["stages"] == 8
    assert os.path.isfile(os.path.join(out, "predictions", "stage8-OCR-VQA", "TextVQA.jsonl"))
    E.main([f"--predictions={out}", f"--data_dir={root}", f"--image_dir={image_dir}", f"--out={tmp_path / 'again'}"])
    again = json.load(open(tmp_path / "again" / "results.json"))
    assert again["matrix"] == res["matrix"] and again["general_knowledge"]["matrix"] == \
        res["general_knowledge"]["matrix"]
    # the run folder alone: its data, image root and ground truth come from its results.json
    E.main([f"--predictions={out}", f"--out={tmp_path / 'alone'}"])
    assert json.load(open(tmp_path / "alone" / "results.json"))["matrix"] == res["matrix"]


def test_training_stops_up_front_without_ground_truth(release, tiny_base, tmp_path):
    """A missing ground-truth file fails before any training, not after the stage that needs it."""
    root, image_dir, _ = release
    images = shutil.copytree(image_dir, tmp_path / "images")
    os.remove(images / "TextVQA" / "TextVQA_0.5.1_val.json")
    out = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"TextVQA/TextVQA_0.5.1_val.json: no such file; TextVQA is scored "
                                                r"against it.*--answers_from_test=true"):
        coin.main([f"--data_dir={root}", f"--image_dir={images}", f"--base={tiny_base}", f"--out={out}",
                   "--tasks=ScienceQA,TextVQA"])
    assert not os.path.exists(out)
