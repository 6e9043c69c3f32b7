"""eval.py: the official scorers and their quirks on hand-made cases, the judges, the aggregates on a hand-computed
matrix, the files, standalone scoring of coin's and the official layouts, and generation on the tiny LLaVA."""
import itertools
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import coin_mini
import data
import eval as E
from cli import UserError

# -----------------------------------------------------------------------------
# The scorers, case by case from the official scripts


def test_scienceqa_letter_parsing():
    s = E.score_scienceqa
    assert s("B", "B") == 1 and s("B. red", "B") == 1  # the whole answer, or "X. ..."
    assert s("The answer is B.", "B") == 1  # else the first one-character word
    assert s("b", "B") == 1  # ... upper-cased
    assert s("a red circle", "B") == 0 and s("a red circle", "A") == 1  # the official rule reads the article
    assert s("C", "B") == 0 and s("", "B") == 0 and s("red", "B") == 0
    assert s("B.red", "B") == 1  # not "X. ", falls to the word rule: "B" is a one-character word


def _vqa_accuracy_reference(pred, answers):
    """The VQA accuracy written out: the mean over the ten leave-one-out subsets of min(1, matches / 3)."""
    accs = [min(1, sum(a == pred for a in subset) / 3) for subset in itertools.combinations(answers, 9)]
    return sum(accs) / len(accs)


def test_textvqa_soft_accuracy_and_normalisation():
    n = E.normalize_vqa
    assert n("The Dog.") == "dog" and n("two") == "2" and n("None") == "0"  # articles, periods, number words
    assert n("dont") == "don't" and n("couldnt've") == "couldn't've" and n("im") == "im"  # contractions
    assert n("1.5") == "1.5" and n("hello-world") == "hello world" and n("well - done") == "well done"
    assert n("Hello, World?") == "hello world" and n("It's red!") == "it 's red"
    answers = ["cat"] * 3 + ["dog"] * 7
    assert E.score_textvqa("dog", answers) == 1.0
    assert abs(E.score_textvqa("The cat.", answers) - 0.9) < 1e-12  # 3 of 10: (3 * 2/3 + 7 * 1) / 10
    assert abs(E.score_textvqa("cat", ["cat"] + ["x"] * 9) - 0.3) < 1e-12
    assert E.score_textvqa("bird", answers) == 0.0
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice(["a cat", "cat", "dog", "Dog.", "two", "2"]) for _ in range(10)]
        pred = rng.choice(["cat", "dog", "2", "bird"])
        ref = _vqa_accuracy_reference(n(pred), [n(a) for a in answers])
        assert abs(E.score_textvqa(pred, answers) - ref) < 1e-12, (pred, answers)


def test_gqa_vizwiz_vqav2_ocrvqa_exact_match():
    assert E.score_gqa("Yes.", "yes") == 1 and E.score_gqa("yes..", "yes") == 1
    assert E.score_gqa(" yes", "yes") == 0 and E.score_gqa(" yes..", "yes", "fixed") == 1  # official strips no space
    assert E.score_gqa("Yes, it is", "yes") == 0
    assert E.score_gqa("left", "Left") == 0  # only the prediction is lower-cased
    assert E.score_exact_upper("Unanswerable", "unanswerable") == 1
    assert E.score_exact_upper("unanswerable.", "unanswerable") == 0
    assert E.score_exact_upper("two", "2") == 0  # VQAv2 here is plain exact match, no normalisation
    assert E.score_ocrvqa("Poetry", "poetry") == 1 and E.score_ocrvqa("poetry book", "poetry") == 0
    assert E.score_ocrvqa("Unanswerable", "unanswerable") == 0  # the official rule rejects 'Unanswerable' outright
    assert E.score_ocrvqa("unanswerable", "unanswerable") == 1  # ... case-sensitively


def test_imagenet_substring_rule_and_empty_quirk():
    for mode in E.SCORINGS:
        assert E.score_imagenet("a star", "star", mode) == 1  # ground truth in the answer
        assert E.score_imagenet("cat", "tabby cat", mode) == 1  # the answer in the ground truth
        assert E.score_imagenet("Star", "star", mode) == 0  # case-sensitive
        assert E.score_imagenet("circle", "star", mode) == 0
    assert E.score_imagenet("", "star", "official") == 1 and E.score_imagenet("", "star", "fixed") == 0
    assert E.score_imagenet(" ", "tabby cat", "official") == 1 and E.score_imagenet(" ", "tabby cat", "fixed") == 0


def test_grounding_iou_and_last_digit_quirk():
    gt = ("[0.10, 0.20, 0.50, 0.60]", [48, 48])
    for mode in E.SCORINGS:
        assert E.score_grounding("[0.10, 0.20, 0.50, 0.60]", gt, mode) == 1
        assert E.score_grounding(" [0.12, 0.22, 0.52, 0.62]", gt, mode) == 1  # IoU 0.82
        assert E.score_grounding("[0.50, 0.60, 0.90, 0.95]", gt, mode) == 0
        assert E.score_grounding("top left", gt, mode) == 0 and E.score_grounding("[0.1, 0.2, 0.3]", gt, mode) == 0
    # The official parser cuts a character from each end after removing the brackets: y2 0.19 reads 0.1
    assert E.parse_box("[0.10, 0.10, 0.20, 0.19]", "official") == [0.1, 0.1, 0.2, 0.1]
    assert E.parse_box("[0.10, 0.10, 0.20, 0.19]", "fixed") == [0.1, 0.1, 0.2, 0.19]
    assert E.parse_box("[1.00, 0.10, 0.20, 0.19]", "official")[0] == 0.0  # "1.00" -> ".00"
    small = ("[0.10, 0.10, 0.20, 0.19]", [640, 480])
    assert E.score_grounding("[0.10, 0.10, 0.20, 0.19]", small, "official") == 0  # the right box, scored wrong
    assert E.score_grounding("[0.10, 0.10, 0.20, 0.19]", small, "fixed") == 1
    # IoU must exceed 0.5; boxes are scaled by max(w, h) = 2 first
    assert E.iou([0, 0, 1, 2], [0, 0, 2, 2]) == 0.5
    assert E.score_grounding("[0, 0, 0.5, 1]", ("[0, 0, 1, 1]", [2, 1]), "fixed") == 0
    assert E.score_grounding("[0, 0, 0.6, 1]", ("[0, 0, 1, 1]", [2, 1]), "fixed") == 1


def _recs(task, n):
    return [{"question_id": f"{task}_{i}", "text": "What?\nAnswer briefly.", "answer": "red"} for i in range(n)]


def test_score_task_counts_missing_and_rejects_bad_predictions():
    recs = _recs("GQA", 4)
    preds = [{"question_id": "GQA_0", "text": "red"}, {"question_id": "GQA_1", "text": "Red."},
             {"question_id": "GQA_2", "text": "blue"}]
    res = E.score_task("GQA", preds, recs, "fixed")
    assert (res["score"], res["n"], res["missing"]) == (50.0, 4, 1)  # 2 right of 4; the missing one counts wrong
    res = E.score_task("GQA", preds, recs)  # official: eval_gqa.py divides by the questions predicted
    assert (res["score"], res["n"], res["missing"]) == (2 / 3 * 100, 3, 1)  # its arithmetic: mean x 100
    with pytest.raises(ValueError, match="question_id 'GQA_0' appears twice"):
        E.score_task("GQA", preds + preds[:1], recs, "fixed")
    with pytest.raises(ValueError, match="1 predictions for question_ids not in the test file"):
        E.score_task("GQA", preds + [{"question_id": "GQA_9", "text": "red"}], recs, "fixed")
    with pytest.raises(ValueError, match=r"GQA predictions: 1 question_ids not in the test file \(e.g. \['GQA_9'\]"):
        E.score_task("GQA", preds + [{"question_id": "GQA_9", "text": "red"}], recs)
    with pytest.raises(ValueError, match="scoring='strict'"):
        E.score_task("GQA", preds, recs, scoring="strict")
    grounding = [{"question_id": 1, "text": "x", "answer": "[0, 0, 1, 1]"}]
    with pytest.raises(ValueError, match="need 'size'"):
        E.score_task("Grounding", [], grounding)


def test_official_ground_truth_files(tmp_path):
    """ScienceQA problems.json + pid_splits.json, TextVQA's ten answers, GQA's testdev questions, under the image
    root's layout: their ground truth replaces the test file's; a missing one is an error naming it."""
    def write(name, obj):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(json.dumps(obj))
    write("ScienceQA/problems.json", {"7": {"answer": 2, "choices": ["x", "y", "z"]}})
    write("ScienceQA/pid_splits.json", {"test": ["7"]})
    write("TextVQA/TextVQA_0.5.1_val.json", {"data": [{"question_id": 5, "answers": ["stop"] * 2 + ["go"] * 8}]})
    write("GQA/testdev_balanced_questions.json", {"q1": {"answer": "no", "isBalanced": True}})
    write("bad/TextVQA/TextVQA_0.5.1_val.json", {"data": [{"question_id": 5, "answers": ["a"]}]})
    root = str(tmp_path)
    sqa = [{"question_id": "7", "text": "Q\nA. x\nB. y\nC. z\nI", "answer": "A"}]
    assert E.score_task("ScienceQA", [{"question_id": "7", "text": "C"}], sqa, ground_truth=root)["score"] == 100
    tv, stop = [{"question_id": 5, "text": "Q\nI", "answer": "stop"}], [{"question_id": 5, "text": "stop"}]
    for mode in E.SCORINGS:
        assert abs(E.score_task("TextVQA", stop, tv, mode, root)["score"] - 60) < 1e-9  # 2 of 10 humans said it
    assert E.score_task("TextVQA", stop, tv)["score"] == 100  # the test file's one answer, ten times
    gqa = [{"question_id": "q1", "text": "Q\nI", "answer": "yes"}]
    assert E.score_task("GQA", [{"question_id": "q1", "text": "No"}], gqa, ground_truth=root)["score"] == 100
    with pytest.raises(ValueError, match="needs 10"):
        E.score_task("TextVQA", stop, tv, ground_truth=str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match=r"bad/ScienceQA/problems.json: no such file.*--ground_truth.*"
                                                r"--answers_from_test=true"):
        E.score_task("ScienceQA", [], sqa, ground_truth=str(tmp_path / "bad"))


# -----------------------------------------------------------------------------
# Prediction files


def test_prediction_files_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "merge.jsonl")
    rows = [{"question_id": 1, "prompt": "<image>\nQ", "text": "A", "answer_id": "x", "model_id": "m", "metadata": {}},
            {"question_id": "2", "prompt": "Q", "text": "", "answer_id": "y", "model_id": "m", "metadata": {}}]
    E.write_jsonl(path, rows)
    assert E.read_predictions(path) == rows
    with open(path, "a") as f:
        f.write("\n")  # blank lines are skipped
    assert len(E.read_predictions(path)) == 2
    cases = {'{"question_id": 3, "text": "B"': "merge.jsonl:4: not valid JSON",  # a cut last line
             '{"question_id": 3}': "merge.jsonl:4: expected an object with question_id and text",
             '{"question_id": 3, "text": 7}': "merge.jsonl:4: expected an object",
             '{"question_id": "1", "text": "B"}': "merge.jsonl:4: question_id '1' already on line 1"}
    for line, msg in cases.items():
        bad = str(tmp_path / "bad" / "merge.jsonl")
        os.makedirs(os.path.dirname(bad), exist_ok=True)
        with open(bad, "w") as f:
            f.write(open(path).read() + line + "\n")
        with pytest.raises(ValueError, match=msg):
            E.read_predictions(bad)


# -----------------------------------------------------------------------------
# General Knowledge


def test_judge_prompt_layout():
    rec = {"question_id": 1, "text": "What color is the circle?\nAnswer the question using a single word or phrase.",
           "answer": "red"}
    system, user = E.judge_prompt("VQAv2", rec, "It is red.")
    assert system == "You are a helpful and precise assistant for checking the quality of the answer."
    assert user.startswith("[Context]\n[Question]\nWhat color is the circle?\n\n[Ground truth answer]\nred\n\n"
                           "[End of ground truth answer]\n\n[Assistant]\nIt is red.\n\n[End of Assistant]\n\n[System]\n"
                           "We would like to request your feedback")
    assert "single word" not in user and user.endswith("indicating the scores for the Assistant.\n\n")
    g = {"question_id": 2, "text": f"{coin_mini.BOX} the red bar", "answer": "[0.1, 0.2, 0.3, 0.4]",
         "answer_bbox": "[0.1, 0.2, 0.3, 0.4]"}
    _, user = E.judge_prompt("Grounding", g, "[0.1, 0.2, 0.3, 0.4]")
    assert f"[Question]\n{coin_mini.BOX} the red bar\n\n" in user and "[Ground truth answer]\n[0.1, 0.2, 0.3, 0.4]\n" in user
    assert ("response to the user question displayed above. The user asks the question on observing an image. For your"
            in user and "bottom right x, and bottom right y. \nPlease rate the accuracy of its responses" in user)


def test_judge_score_parsing():
    cases = {"8": 8, " 8.5\n": 8.5, "10": 10, "0": 0, "11": 0, "-3": 0, "8/10": 8, "12/10": 0, "Score: 7": 7,
             "Score: 7/10": 7, "I would rate it 9 out of 10.": 9, "none": 0, "": 0, "10 points": 10}
    for text, want in cases.items():
        assert E.parse_judge_score(text) == want, text


def _sqa_rec():
    options = "A. blue\nB. red\nC. green\nD. white\nE. pink"
    return {"question_id": "s", "text": f"What is the color of the object?\n{options}\n{coin_mini.LETTER}", "answer": "B",
            "accept": ["B", "red"]}


def test_exact_judge_rubric():
    j = E.ExactJudge()
    sqa = _sqa_rec()
    for answer, want in {"B": 10, "red": 10, "B. red": 10, "The answer is B.": 10, "A red circle.": 10, "(B)": 10,
                         "B is right": 10, "C": 0, "B or C": 0, "blue": 0, "red or blue": 0, "": 0, "A": 0}.items():
        assert j.judge_one("ScienceQA", sqa, answer)[1] == want, answer
    g = {"question_id": "g", "text": f"{coin_mini.BOX} the red bar", "answer": "[0.02, 0.02, 0.31, 0.31]",
         "answer_bbox": "[0.02, 0.02, 0.31, 0.31]", "accept": ["top left"], "size": [48, 48]}
    for answer, want in {"top left": 10, "It is at the top left.": 10, "top": 0, "left": 0, "top left or top right": 0,
                         "[0.03, 0.02, 0.30, 0.32]": 10, "The box is [0.02, 0.02, 0.31, 0.31].": 10,
                         "[0.5, 0.5, 0.9, 0.9]": 0}.items():
        assert j.judge_one("Grounding", g, answer)[1] == want, answer
    count = {"question_id": "c", "text": "How many stars are there?\nI", "answer": "2", "accept": ["2", "two"]}
    for answer, want in {"2": 10, "There are two stars.": 10, "12": 0, "three": 0}.items():
        assert j.judge_one("VQAv2", count, answer)[1] == want, answer
    yes = {"question_id": "y", "text": "Is there a star?\nI", "answer": "yes", "accept": ["yes"]}
    assert [j.judge_one("GQA", yes, a)[1] for a in ("Yes.", "yes and no", "no")] == [10, 0, 0]
    plain = {"question_id": "p", "text": "Q?\nI", "answer": "Red"}  # no accept (the real CoIN): the stored answer
    assert j.judge_one("VizWiz", plain, "it is red")[1] == 10


def test_judge_task_score_and_rows():
    recs = [_sqa_rec(), dict(_sqa_rec(), question_id="t"), dict(_sqa_rec(), question_id="u")]
    preds = [{"question_id": "s", "text": "red"}, {"question_id": "t", "text": "C"}]
    res = E.ExactJudge().score("ScienceQA", preds, recs)
    assert abs(res["score"] - 100 * 10 / 30) < 1e-9 and res["missing"] == 1 and res["n"] == 3  # 100 * sum / (10 N)
    assert [r["score"] for r in res["rows"]] == [10, 0, 0] and res["rows"][2]["judge_text"] == "missing prediction"


def test_lm_judge_batched_like_one_at_a_time(tiny_base, tmp_path):
    """Any Hugging Face causal LM folder works as the judge: a random tiny Llama with the tiny base's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    lm.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    recs = [_sqa_rec(), dict(_sqa_rec(), question_id="t", answer="C"), dict(_sqa_rec(), question_id="u")]
    preds = [{"question_id": "s", "text": "B"}, {"question_id": "t", "text": "a longer answer, red"},
             {"question_id": "u", "text": "C"}]
    batched = E.LMJudge(str(tmp_path / "judge"), batch_size=3, max_new_tokens=4).score("ScienceQA", preds, recs)
    single = E.LMJudge(str(tmp_path / "judge"), batch_size=1, max_new_tokens=4).score("ScienceQA", preds, recs)
    assert batched["rows"] == single["rows"] and len(batched["rows"]) == 3
    assert all(0 <= r["score"] <= 10 and isinstance(r["judge_text"], str) for r in batched["rows"])
    assert 0 <= batched["score"] <= 100 and batched["judge"] == "judge"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        E.LMJudge(str(tmp_path / "nope"))


# -----------------------------------------------------------------------------
# Aggregates and outputs

MATRIX = [[80.0, None, None],
          [60.0, 70.0, None],
          [50.0, 40.0, 90.0]]


def test_aggregates_hand_computed():
    agg = E.aggregates(MATRIX)
    assert abs(agg["MAA"] - (80 + (60 + 70) / 2 + (50 + 40 + 90) / 3) / 3) < 1e-9  # = 68.33
    assert agg["BWT"] == ((50 - 80) + (40 - 70)) / 3 == -20  # the paper: / T
    assert agg["BWT_classic"] == -30  # / (T - 1)
    assert agg["final_average"] == 60 and agg["stages"] == 3
    assert agg["forgetting"] == [30, 30, None]  # max(80, 60) - 50, 70 - 40
    partial = E.aggregates([[80.0, None, None], [60.0, 70.0, None], [None, None, None]])
    assert partial["stages"] == 2 and partial["BWT"] == -10 and partial["BWT_classic"] == -20
    assert partial["forgetting"] == [20, None, None] and partial["MAA"] == (80 + 65) / 2
    one = E.aggregates([[55.0, None], [None, None]])
    assert (one["MAA"], one["BWT"], one["BWT_classic"], one["final_average"]) == (55, 0, None, 55)
    assert E.aggregates([[None]])["MAA"] is None


def test_write_results_files(tmp_path):
    tasks = ["ScienceQA", "TextVQA", "ImageNet"]
    gk = [[90.0, None, None], [85.0, 80.0, None], [80.0, 75.0, 95.0]]
    md = E.write_results(str(tmp_path), tasks, MATRIX, gk, {"config": {"seed": 0},
                                                            "zero_shot": {t: {"if": 1.0, "gk": 2.0} for t in tasks}})
    res = json.load(open(tmp_path / "results.json"))
    assert res["tasks"] == tasks and res["matrix"] == MATRIX and res["BWT"] == -20 and res["BWT_classic"] == -30
    assert res["general_knowledge"]["matrix"] == gk and res["general_knowledge"]["BWT"] == ((80 - 90) + (75 - 80)) / 3
    assert res["config"] == {"seed": 0} and res["stages"] == 3 and res["forgetting"] == [30, 30, None]
    assert "| 3 ImageNet | 50.00 | 40.00 | 90.00 | 60.00 |" in md and "| 2 TextVQA | 60.00 | 70.00 |  | 65.00 |" in md
    assert "| 0 zero-shot | 1.00 | 1.00 | 1.00 |  |" in md and "MAA **68.33** · BWT **-20.00** (paper, /T)" in md
    assert open(tmp_path / "results.md").read() == md
    for name in ("heatmap_if.png", "heatmap_gk.png"):
        img = Image.open(tmp_path / name)
        assert img.size[0] > 300 and img.size[1] > 150
    E.write_results(str(tmp_path / "partial"), tasks, [[80.0, None, None], [None] * 3, [None] * 3], None)
    res = json.load(open(tmp_path / "partial" / "results.json"))
    assert res["stages"] == 1 and res["MAA"] == 80 and "general_knowledge" not in res


# -----------------------------------------------------------------------------
# Standalone scoring of prediction folders: coin's layout and the official one


def _perfect(records):
    return [{"question_id": r["question_id"], "prompt": r["text"], "text": r["answer"], "answer_id": "a",
             "model_id": "m"} for r in records]


def rounded(matrix):
    return [[v if v is None else round(v, 9) for v in row] for row in matrix]


def test_standalone_coin_and_official_layouts(mini_data, tmp_path, capsys):
    tasks = ["GQA", "ScienceQA", "Grounding"]
    recs = {t: data.test_examples(mini_data, t) for t in tasks}
    coin_dir, official_dir = tmp_path / "run" / "predictions", tmp_path / "official"
    for j, stage in enumerate(tasks):
        for task in tasks[:j + 1]:
            preds = _perfect(recs[task])
            if task != stage:
                preds[0]["text"] = "wrong"  # one forgotten item per later stage
            E.write_jsonl(str(coin_dir / f"stage{j + 1}-{stage}" / f"{task}.jsonl"), preds)
            E.write_jsonl(str(official_dir / task / ("Finetune" if task == stage else stage) / "merge.jsonl"), preds)
    for path in (coin_dir / "stage0-zeroshot" / "GQA.jsonl", official_dir / "GQA" / "Zero_shot" / "merge.jsonl"):
        E.write_jsonl(str(path), _perfect(recs["GQA"])[:6])
    results = []
    for src, extra in ((tmp_path / "run", []), (official_dir, ["--tasks=GQA,ScienceQA,Grounding"])):
        out = tmp_path / f"out-{src.name}"
        E.main([f"--predictions={src}", f"--data_dir={mini_data}", f"--out={out}", *extra])
        results.append(json.load(open(out / "results.json")))
    a, b = results
    assert a["tasks"] == b["tasks"] == tasks and a["matrix"] == b["matrix"] and a["zero_shot"] == b["zero_shot"]
    n = len(recs["GQA"])
    assert a["matrix"][0][0] == 100 and a["matrix"][2][0] == (n - 1) / n * 100 and a["matrix"][1][2] is None
    # the exact judge agrees on perfect and 'wrong' answers (its arithmetic, 100 * sum / (10 N), differs in the last bit)
    assert rounded(a["general_knowledge"]["matrix"]) == rounded(a["matrix"])
    assert a["zero_shot"]["GQA"]["if"] == 100.0  # 6 of 12 predictions: the official GQA scorer divides by 6
    assert "6 of 12 records without a prediction, not in the denominator" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out-run" / "judge" / "stage3-Grounding" / "GQA.judge.jsonl")
    E.main([f"--predictions={coin_dir / 'stage1-GQA' / 'GQA.jsonl'}", "--task=gqa", f"--data_dir={mini_data}"])
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["score"] == 100
    E.main([f"--compare={tmp_path / 'out-run'},{tmp_path / 'out-official'}"])
    table = capsys.readouterr().out
    assert table.count(f"out-run | {a['MAA']:.2f} | {a['BWT']:.2f} | {a['BWT_classic']:.2f} |") == 1, table
    assert table.count(f"out-official | {a['MAA']:.2f} | {a['BWT']:.2f} |") == 1, table
    E.main([f"--predictions={tmp_path / 'run'}", f"--data_dir={mini_data}", f"--out={tmp_path / 'no-judge'}",
            "--judge=none", "--scoring=fixed"])
    res = json.load(open(tmp_path / "no-judge" / "results.json"))
    assert rounded(res["matrix"]) == rounded(a["matrix"]) and "general_knowledge" not in res
    assert res["scoring"] == "fixed"
    assert res["zero_shot"]["GQA"]["if"] == 50.0  # fixed: the missing ones count wrong
    assert "6 of 12 records without a prediction, counted wrong" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown setting '--scorin=fixed': did you mean --scoring"):
        E.main(["--scorin=fixed"])
    with pytest.raises(UserError, match="--scoring=strict: must be one of official, fixed"):
        E.main(["--scoring=strict"])


# eval.py run as `python eval.py ARGS` with torch and transformers unimportable (None in sys.modules makes every
# import of them raise ImportError), as on a machine that has neither installed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
                 "sys.argv = ['eval.py'] + sys.argv[1:]; runpy.run_path('eval.py', run_name='__main__')")


def eval_without_torch(*args):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_scoring_compare_and_help_without_torch(mini_data, tmp_path):
    """Prediction files, --compare and --help work on a machine without torch and transformers, and score exactly as
    in a process that has them."""
    tasks = ["GQA", "ScienceQA"]
    recs = {t: data.test_examples(mini_data, t) for t in tasks}
    for j, stage in enumerate(tasks):
        for task in tasks[:j + 1]:
            preds = _perfect(recs[task])
            if task != stage:
                preds[0]["text"] = "wrong"  # one forgotten item after the second stage
            E.write_jsonl(str(tmp_path / "run" / "predictions" / f"stage{j + 1}-{stage}" / f"{task}.jsonl"), preds)
    assert "--predictions=" in eval_without_torch("--help")
    printed = eval_without_torch(f"--predictions={tmp_path / 'run'}", f"--data_dir={mini_data}",
                                 f"--out={tmp_path / 'scored'}")
    res = json.load(open(tmp_path / "scored" / "results.json"))
    forgot = (len(recs["GQA"]) - 1) / len(recs["GQA"]) * 100  # eval_gqa.py's arithmetic, to the last bit
    assert res["matrix"] == [[100.0, None], [forgot, 100.0]]
    assert rounded(res["general_knowledge"]["matrix"]) == rounded(res["matrix"])
    assert f"GQA.jsonl: GQA {forgot:.2f}, general knowledge {forgot:.2f}" in printed
    E.main([f"--predictions={tmp_path / 'run'}", f"--data_dir={mini_data}", f"--out={tmp_path / 'with-torch'}"])
    assert json.load(open(tmp_path / "with-torch" / "results.json")) == res
    assert f"scored | {res['MAA']:.2f} | {res['BWT']:.2f} |" in eval_without_torch(f"--compare={tmp_path / 'scored'}")


def test_scoring_50k_predictions_is_fast():
    """50,000 predictions through the eight scorers and the exact judge in well under 10 s."""
    rng = random.Random(0)
    t0 = time.time()
    for task in data.TASKS:
        recs, preds = [], []
        for i in range(6250):
            rec = {"question_id": i, "text": "What is it?\nA. red\nB. blue\nAnswer briefly.",
                   "answer": rng.choice(["red", "A"]), "accept": ["red"]}
            if task == "Grounding":
                rec.update(answer="[0.10, 0.20, 0.50, 0.60]", answer_bbox="[0.10, 0.20, 0.50, 0.60]", size=[48, 48],
                           accept=["top left"])
            recs.append(rec)
            answers = ["red", "A", "The answer is red.", "[0.1, 0.2, 0.5, 0.6]", f"word{i}"]
            preds.append({"question_id": i, "text": rng.choice(answers)})
        assert 0 <= E.score_task(task, preds, recs)["score"] <= 100
        assert 0 <= E.ExactJudge().score(task, preds, recs)["score"] <= 100
    assert time.time() - t0 < 10


# -----------------------------------------------------------------------------
# Generation on the tiny LLaVA


@pytest.fixture(scope="module")
def llava(tiny_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return AutoModelForImageTextToText.from_pretrained(tiny_base), AutoProcessor.from_pretrained(tiny_base)


def test_generate_batched_equals_one_at_a_time(llava, mini_data):
    model, processor = llava
    image_dir = os.path.join(mini_data, "images")
    recs = data.test_examples(mini_data, "ScienceQA")[:8] + data.test_examples(mini_data, "GQA")[:2]
    assert any(not r.get("image") for r in recs) and any(r.get("image") for r in recs)  # mixed batches
    model.train()
    side = processor.tokenizer.padding_side
    batched = E.generate(model, processor, recs, image_dir, batch_size=5, max_new_tokens=6)
    assert model.training and processor.tokenizer.padding_side == side  # both restored
    single = E.generate(model, processor, recs, image_dir, batch_size=1, max_new_tokens=6)
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert [r["question_id"] for r in batched] == [r["question_id"] for r in recs]
    text_only = next(r for r, rec in zip(batched, recs) if not rec.get("image"))
    assert not text_only["prompt"].startswith(data.IMAGE_TOKEN)
    assert set(batched[0]) >= {"question_id", "prompt", "text", "answer_id", "model_id"}
    assert batched[0]["prompt"] == f"{data.IMAGE_TOKEN}\n{recs[0]['text']}"


def test_generate_stripes_ranks_and_gathers_on_rank0(llava, mini_data, monkeypatch):
    """Two ranks simulated in one process: rank r answers records r, r + 2, ...; rank 0 returns all in order."""
    import torch.distributed as dist
    model, processor = llava
    image_dir = os.path.join(mini_data, "images")
    recs = data.test_examples(mini_data, "VQAv2")[:5]
    sent = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # transformers asks too
    monkeypatch.setattr(dist, "gather_object", lambda obj, parts, dst: sent.setdefault("rank1", obj))
    assert E.generate(model, processor, recs, image_dir, batch_size=2, max_new_tokens=4, rank=1, world_size=2) is None
    assert [i for i, _ in sent["rank1"]] == [1, 3]

    def gather(obj, parts, dst):
        parts[0], parts[1] = obj, sent["rank1"]
    monkeypatch.setattr(dist, "gather_object", gather)
    both = E.generate(model, processor, recs, image_dir, batch_size=2, max_new_tokens=4, rank=0, world_size=2)
    monkeypatch.undo()
    alone = E.generate(model, processor, recs, image_dir, batch_size=2, max_new_tokens=4)
    assert both == alone
