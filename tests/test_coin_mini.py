"""coin_mini.py: CoIN-mini is deterministic, in the official format, and answerable from what it draws."""
import json
import os
import random
import re

import pytest

import cli
import coin_mini
import data


def test_generator_is_deterministic_and_official_format(mini_data, tmp_path):
    again = str(tmp_path / "again")
    coin_mini.generate_mini(again, n_train=48, n_test=12, n_stage0=64, seed=0, progress=False)
    for task in data.TASKS:
        for split in ("train", "eval"):
            a = json.load(open(data.task_file(mini_data, task, split)))
            b = json.load(open(data.task_file(again, task, split)))
            assert a == b, (task, split)
        train = json.load(open(data.task_file(mini_data, task, "train")))
        test = json.load(open(data.task_file(mini_data, task, "eval")))
        assert len(train) == 48 * coin_mini.TRAIN_SCALE.get(task, 1) and len(test) == 12
        for rec in train:
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") == ("image" in rec)
        for rec in test:
            assert {"question_id", "text", "answer"} <= set(rec)
            assert "<image>" not in rec["text"]
            instr = data.split_question(rec["text"])[1] if task != "Grounding" else rec["text"]
            wordings = coin_mini.FORMAT_INSTRUCTIONS["Original"][task]
            assert any(instr.startswith(w) for w in wordings), (task, rec["text"])
            if "image" in rec:
                assert os.path.isfile(os.path.join(mini_data, "images", rec["image"]))
    # the same images, byte for byte
    rel = json.load(open(data.task_file(mini_data, "GQA", "eval")))[3]["image"]
    assert open(os.path.join(mini_data, "images", rel), "rb").read() == open(os.path.join(again, "images", rel), "rb").read()
    # a different seed gives different data
    other = str(tmp_path / "other")
    coin_mini.generate_mini(other, n_train=4, n_test=4, n_stage0=4, seed=1, progress=False)
    assert json.load(open(data.task_file(other, "GQA", "eval"))) != json.load(open(data.task_file(mini_data, "GQA", "eval")))[:4]


def test_scaled_tasks_extend_the_same_stream(mini_data, tmp_path):
    """ScienceQA and Grounding get TRAIN_SCALE x n_train records whose first ones do not depend on n_train, so a
    --max_train run sees the same records as before the scale existed."""
    assert coin_mini.TRAIN_SCALE == {"ScienceQA": 2, "Grounding": 3}
    half = str(tmp_path / "half")
    coin_mini.generate_mini(half, n_train=24, n_test=12, n_stage0=4, seed=0, progress=False)
    for task in ("ScienceQA", "Grounding", "GQA"):
        a = json.load(open(data.task_file(half, task, "train")))
        b = json.load(open(data.task_file(mini_data, task, "train")))
        assert len(a) == 24 * coin_mini.TRAIN_SCALE.get(task, 1) and a == b[:len(a)], task


def test_mini_is_regenerated_only_when_stale(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "mini")
    args = [f"--out={out}", "--n_train=4", "--n_test=4", "--n_stage0=4"]
    small = {"n_train": 4, "n_test": 4, "n_stage0": 4, "size": 48, "seed": 0}  # what args asks for
    assert not coin_mini.mini_is_current(out, **small)
    coin_mini.main(args)
    meta = os.path.join(out, "coin_mini.json")
    stamp = os.stat(meta).st_mtime_ns
    assert coin_mini.mini_is_current(out, **small)
    assert not coin_mini.mini_is_current(out, **dict(small, n_train=5))
    coin_mini.main(args)  # same generator, same settings: kept as it is
    assert "is current" in capsys.readouterr().out and os.stat(meta).st_mtime_ns == stamp
    monkeypatch.setattr(coin_mini, "MINI_VERSION", coin_mini.MINI_VERSION + 1)  # a newer generator: regenerated
    coin_mini.main(args)
    assert "wrote CoIN-mini" in capsys.readouterr().out and json.load(open(meta))["version"] == coin_mini.MINI_VERSION
    os.remove(meta)  # an interrupted generation (the meta file is written last) is never current
    assert not coin_mini.mini_is_current(out, **small)


def test_generator_command_and_the_old_one():
    """`python coin_mini.py` refuses a bad setting in one line; data.py's old `mini` command names the new one."""
    with pytest.raises(cli.UserError, match=r"^--n_test=0: must be at least 1 \(default: 200\)$"):
        coin_mini.main(["--n_test=0"])
    with pytest.raises(cli.UserError, match=r"^`python data.py mini` is now `python coin_mini.py`: run python "
                                            r"coin_mini.py --out=x --seed=1$"):
        data.main(["mini", "--out=x", "--seed=1"])


def test_scienceqa_has_text_only_items_and_letters(mini_data):
    recs = json.load(open(data.task_file(mini_data, "ScienceQA", "eval")))
    assert any("image" not in r for r in recs) and any("image" in r for r in recs)
    for r in recs:
        assert r["answer"] in "ABCDE" and f"\n{r['answer']}. " in "\n" + r["text"]


def test_items_are_answerable_from_their_content():
    """Each generated answer is consistent with the drawn content (checked on the scene description)."""
    rng, sides = random.Random(0), 0
    for _ in range(200):
        it = coin_mini.make_item("Grounding", rng, 48)
        x1, y1, x2, y2 = json.loads(it["answer"])
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        side = it["expression"].split(" ", 3)[3:]  # "the <colour> <shape>[ <side>]"
        where = {"on the left": x2 < 0.34, "on the right": x1 > 0.66, "at the top": y2 < 0.34,
                 "at the bottom": y1 > 0.66, "in the middle": 0.33 < x1 < x2 < 0.67 and 0.33 < y1 < y2 < 0.67}
        assert not side or where[side[0]], (it["expression"], it["answer"])
        sides += bool(side)
        it = coin_mini.make_item("VizWiz", rng, 48)
        assert it["answer"] in list(coin_mini.COLORS) + coin_mini.SHAPES + ["unanswerable"]
        it = coin_mini.make_item("OCR-VQA", rng, 48)
        assert it["answer"] in coin_mini.TITLES + coin_mini.AUTHORS + list(coin_mini.GENRES)
    assert 70 <= sides <= 130  # GROUNDING_WHERE = 0.5 of the expressions say a side


def test_instruction_sets(mini_data):
    for iset in ("Diverse", "10Type"):
        recs = json.load(open(data.task_file(mini_data, "VQAv2", "eval", iset)))
        base = json.load(open(data.task_file(mini_data, "VQAv2", "eval")))
        assert [r["answer"] for r in recs] == [r["answer"] for r in base]
        assert all(r["text"] != b["text"] for r, b in zip(recs, base)) or iset == "10Type"
    ten = json.load(open(data.task_file(mini_data, "VQAv2", "train", "10Type")))
    assert len({data.split_question(r["conversations"][0]["value"])[1] for r in ten}) > 3


def test_asd_restyles_the_stated_share_of_training_answers(mini_data, tmp_path):
    """Instructions_ASD/ as the CoIN-ASD release lays it out: train_x{X}.json restyles X% of each task's train records,
    in equal parts, into the four answer styles other than the task's own, each asked for by its last line; a smaller
    X restyles a subset of a larger one, the same way; train_ori.json and test.json are Original's records; the same
    seed writes the same files."""
    again = str(tmp_path / "again")
    coin_mini.generate_mini(again, n_train=48, n_test=12, n_stage0=4, seed=0, progress=False)
    original_style = {"ScienceQA": coin_mini.LETTER, "Grounding": coin_mini.BOX}
    for task in data.TASKS:
        folder = os.path.join(mini_data, "Instructions_ASD", data.task_folder(task))
        assert sorted(os.listdir(folder)) == ["test.json", "train_ori.json"] + [f"train_x{x}.json" for x in
                                                                                 (10, 20, 40, 60, 80)]
        original = json.load(open(data.task_file(mini_data, task, "train")))
        assert json.load(open(os.path.join(folder, "train_ori.json"))) == original
        assert json.load(open(os.path.join(folder, "test.json"))) == json.load(open(data.task_file(mini_data, task,
                                                                                                    "eval")))
        restyled_before = set()
        for x in data.ASD_SHARES:
            path = os.path.join(folder, f"train_x{x}.json")
            recs = json.load(open(path))
            assert recs == json.load(open(os.path.join(again, "Instructions_ASD", data.task_folder(task),
                                                       f"train_x{x}.json")))
            assert [r["id"] for r in recs] == [r["id"] for r in original]
            assert all(r.get("image") == o.get("image") for r, o in zip(recs, original))
            restyled = {i: r for i, (r, o) in enumerate(zip(recs, original)) if r != o}
            assert len(restyled) == round(x * len(recs) / 100), (task, x)
            assert restyled_before <= set(restyled)  # nested: X = 10 restyles a subset of X = 20, ...
            restyled_before = set(restyled)
            styles = {}
            for i, r in restyled.items():
                human, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
                question, instruction = data.split_question(human)
                style = {v: k for k, v in coin_mini.ASD_STYLES.items()}[instruction]
                styles[style] = styles.get(style, 0) + 1
                assert instruction != original_style.get(task, coin_mini.SHORT)  # never the task's own style
                if style == "mcq":
                    letters = re.findall(r"^([A-D])\. ", question, re.M)
                    assert answer in letters and len(letters) in (2, 4)
                elif style == "yn":
                    assert answer in ("yes", "no") and "\nIs the answer " in question
                elif style == "short":  # ScienceQA's option, asked without the options
                    assert not re.search(r"^[A-E]\. ", question, re.M) and " " not in answer
                else:
                    assert answer.endswith(".") and answer.count(". ") >= (style == "detail"), answer
            assert sorted(styles) == sorted(coin_mini.asd_styles(task))
            assert max(styles.values()) - min(styles.values()) <= 1, (task, x, styles)  # equal parts


def test_asd_answers_are_right():
    """A restyled answer says what the original one says: the right letter, yes exactly when the candidate is the
    answer, the answer first in an explanation."""
    rng = random.Random(0)
    for task in data.TASKS:
        for _ in range(40):
            item = coin_mini.make_item(task, rng, 48)
            content, pool = coin_mini.answer_pool(task, item, 48)
            assert content in pool
            for style in coin_mini.asd_styles(task):
                question, answer = coin_mini.restyle(task, item, style, rng, 48)
                body = question.split("\n")[:-1]
                if style == "mcq":
                    assert f"{answer}. {content}" in body
                elif style == "yn":
                    assert (answer == "yes") == (body[-1] == f"Is the answer {content}?")
                elif style == "short":
                    assert answer == content
                elif task != "Grounding":
                    assert answer.startswith(f"{content}. ")
                else:
                    assert item["expression"] in answer and content in question
