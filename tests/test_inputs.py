"""Bad input is refused before any work, as lines naming the setting or file and the fix, with exit status 2 and no
traceback; nothing in --out is written or lost before that; no score is ever computed on a set the run did not
evaluate. A table of bad settings and bad files, each with the line it must print."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import checkpoint
import cli
import coin
import coin_mini
import data
import eval as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(data_dir, base, out, *extra):
    """A tiny run: GQA then ScienceQA, 8 train and 4 test records a task, 2 steps a stage."""
    return [f"--data_dir={data_dir}", f"--base={base}", f"--out={out}", "--tasks=GQA,ScienceQA", "--max_train=8",
            "--max_test=4", "--experts=2", "--lora_r=8", "--micro_batch=4", "--eval_batch=4", "--max_new_tokens=4",
            "--threads=1", "--zero_shot=false", *extra]


def refused(main, argv, capsys):
    """Run an entry point as its `__main__` does; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    return e.value.code, capsys.readouterr().err


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


# what args() reads: the Original instructions of GQA and ScienceQA, their images and ground truth
NOT_READ = ({t for t in data.TASKS if t not in ("GQA", "ScienceQA")} | set(data.TASK_FOLDERS.values())
            | {"Stage0", "Instructions_Diverse", "Instructions_10Type"})


@pytest.fixture
def data_copy(mini_data, tmp_path):
    """A copy of the CoIN-mini files that args() reads, to break."""
    return shutil.copytree(mini_data, tmp_path / "data", ignore=lambda folder, names: NOT_READ & set(names)).as_posix()


# -----------------------------------------------------------------------------
# Settings: (command line, a line the error must print)

SETTINGS = [
    (["--micro_batch=0"], "--micro_batch=0: must be at least 1 (default: 8)"),
    (["--grad_accum=0"], "--grad_accum=0: must be at least 1"),
    (["--grad_accum=-2"], "--grad_accum=-2: must be at least 1"),
    (["--epochs=0"], "--epochs=0: must be at least 1"),
    (["--lr=-1"], "--lr=-1.0: must be greater than 0"),
    (["--lr=nan"], "--lr=nan: takes a finite number"),
    (["--lr=inf"], "--lr=inf: takes a finite number"),
    (["--max_train=-5"], "--max_train=-5: must be at least 0"),
    (["--max_test=-1"], "--max_test=-1: must be at least 0"),
    (["--save_every=-3"], "--save_every=-3: must be at least 0"),
    (["--experts=0"], "--experts=0: must be at least 1"),
    (["--data_fraction=0"], "--data_fraction=0.0: must be in (0, 1]"),
    (["--lora_dropout=1"], "--lora_dropout=1.0: must be in [0, 1)"),
    (["--dtype=fp16"], "--dtype=fp16: must be one of float32, bfloat16"),
    (["--experts=2.5"], "--experts=2.5: takes a whole number"),
    (["--zero_shot=yes"], "--zero_shot=yes: takes true or false"),
    (["--learning_rate=1e-3"], "unknown setting '--learning_rate=1e-3': did you mean --lr?"),
    (["--expert=2"], "unknown setting '--expert=2': did you mean --experts?"),
    (["--batch_size=8"], "unknown setting '--batch_size=8': did you mean --micro_batch, --global_batch, --eval_batch?"),
    (["--tasks="], "--tasks=: names no task"),
    (["--tasks=GQA,Foo"], "--tasks: unknown task 'Foo'"),
    (["--tasks=GQA,gqa"], "--tasks lists a task twice"),
    (["--lora_r=6", "--experts=4"], "--lora_r=6 --experts=4: the rank is split evenly over the experts"),
    (["--global_batch=102"], "--global_batch=102 (102) on 1 rank(s) gives each 102 records a step, not a multiple of "
                             "--micro_batch=4: choose a --micro_batch that divides 102"),
    (["--global_batch=big"], "--global_batch=big: must be '', 'official' or a whole number > 0"),
    (["--data_dir=nowhere"], "--data_dir=nowhere: no such folder"),
    (["--base=nowhere"], "--base=nowhere: no such model directory"),
    (["--image_dir=nowhere"], "--image_dir=nowhere: no such folder"),
    (["--judge=nowhere"], "--judge=nowhere: no such folder"),
]


@pytest.mark.parametrize("extra, message", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_bad_setting_is_one_line_before_any_work(extra, message, mini_data, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("an earlier run's file")  # nothing in --out may change
    before = snapshot(out)
    status, err = refused(coin.main, args(mini_data, tiny_base, out) + extra, capsys)
    assert status == 2 and f"error: {message}" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert snapshot(out) == before


def test_every_problem_is_reported_at_once(mini_data, tiny_base, tmp_path, capsys):
    status, err = refused(coin.main, args(mini_data, tiny_base, tmp_path / "run", "--lr=-1", "--micro_batch=0",
                                          "--learning_rate=2", "--epochs=0"), capsys)
    assert status == 2 and len(err.splitlines()) == 4 and "--learning_rate" in err and "--epochs=0" in err, err
    assert not os.path.exists(tmp_path / "run")


def test_corrected_rerun_into_the_same_out_works(mini_data, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert refused(coin.main, args(mini_data, tiny_base, out, "--lr=-1"), capsys)[0] == 2
    coin.main(args(mini_data, tiny_base, out, "--tasks=GQA"))
    assert json.load(open(out / "results.json"))["matrix"][0][0] is not None


def test_every_setting_has_help_and_a_rule():
    docs = cli.setting_docs(coin.__file__, "Config", "methods.py")  # coin.py's, then each method's own
    settings, rules = coin.run_settings()
    assert [d.name for d in docs] == [f.name for f in coin.dataclasses.fields(settings)]
    assert all(d.help for d in docs), [d.name for d in docs if not d.help]
    assert set(rules) >= {d.name for d in cli.read_setting_docs(coin.__file__, "Config")}, "a setting needs a rule"
    for cls, module in ((E.Options, E), (data.CheckSettings, data)):
        assert all(d.help for d in cli.read_setting_docs(module.__file__, cls.__name__))


# -----------------------------------------------------------------------------
# Files: (how the data is broken, extra settings, a line the error must print)

def edit(data_dir, task, split, change):
    path = data.task_file(data_dir, task, split)
    recs = json.load(open(path))
    with open(path, "w") as f:
        json.dump(change(recs), f)
    return path


def set_field(i, key, value):
    def change(recs):
        recs[i][key] = value
        return recs
    return change


def drop_field(i, key):
    def change(recs):
        del recs[i][key]
        return recs
    return change


def set_turn(i, turn, value):
    def change(recs):
        recs[i]["conversations"][turn]["value"] = value
        return recs
    return change


def set_turns(i, *turns):
    return set_field(i, "conversations", [{"from": who, "value": "cross"} for who in turns])


def image_path(data_dir, task="GQA", split="test", i=0):
    """The path of record i's image."""
    return os.path.join(data_dir, "images", json.load(open(data.task_file(data_dir, task, split)))[i]["image"])


def save_test_image(data_dir, mode):
    """Record 0 of GQA's test file gets an image of `mode` (a TIFF, under the record's .png name: pillow goes by the
    content)."""
    from PIL import Image
    Image.new(mode, (8, 8), 1).save(image_path(data_dir), format="TIFF")


def truncate_image(data_dir, task, i):
    rec = json.load(open(data.task_file(data_dir, task, "test")))[i]
    path = os.path.join(data_dir, "images", rec["image"])
    with open(path, "r+b") as f:  # the header stays: only decoding finds it
        f.truncate(os.path.getsize(path) // 2)
    return rec


FILES = [
    ("test file a JSON object", lambda d: edit(d, "GQA", "test", lambda r: {"records": r}), ["--skip_bad"],
     "GQA/test.json: holds an object, not a list of records"),
    ("test file the number 42", lambda d: edit(d, "GQA", "test", lambda r: 42), [],
     "GQA/test.json: holds a number, not a list of records"),
    ("train file malformed JSON", lambda d: open(data.task_file(d, "GQA", "train"), "w").write("[{"), [],
     "GQA/train.json: malformed JSON at line 1"),
    ("test file missing", lambda d: os.remove(data.task_file(d, "ScienceQA", "test")), [],
     "ScienceQA/test.json: no such file"),
    ("GQA test record without image", lambda d: edit(d, "GQA", "test", drop_field(2, "image")), [],
     "GQA/test.json: record 2 (question_id 'GQA_test_2'): no `image`; every GQA question is about an image"),
    ("GQA train record without image", lambda d: edit(d, "GQA", "train", drop_field(1, "image")), [],
     "GQA/train.json: record 1: no `image`; every GQA question is about an image"),
    ("empty test answer", lambda d: edit(d, "GQA", "test", set_field(3, "answer", " ")), [],
     "GQA/test.json: record 3 (question_id 'GQA_test_3'): the answer ' ' is empty"),
    ("test answer not a string", lambda d: edit(d, "ScienceQA", "test", set_field(0, "answer", None)), [],
     "the answer None is not text: give it as a string"),
    ("repeated question_id", lambda d: edit(d, "GQA", "test", set_field(1, "question_id", "GQA_test_0")), [],
     "GQA/test.json: record 1 (question_id 'GQA_test_0'): question_id already used by record 0"),
    ("image that is not an image", lambda d: open(os.path.join(d, "images", json.load(open(data.task_file(
        d, "GQA", "test")))[0]["image"]), "wb").write(b"not a png"), [], "png unreadable (cannot identify image"),
    ("test record lacking text", lambda d: edit(d, "GQA", "test", drop_field(0, "text")), [],
     "GQA/test.json: record 0 lacks text"),
    ("every test record bad, --skip_bad", lambda d: edit(d, "GQA", "test", lambda r: [{"x": 1}]), ["--skip_bad"],
     "GQA/test.json: no usable records (all bad)"),
    # train records: the conversation
    ("train question null", lambda d: edit(d, "GQA", "train", set_turn(1, 0, None)), [],
     "GQA/train.json: record 1 has a human turn whose value is None, not text: give the question as a string"),
    ("train answer null", lambda d: edit(d, "GQA", "train", set_turn(1, 1, None)), [],
     "GQA/train.json: record 1 has a gpt turn whose value is None, not text: give the answer as a string"),
    ("train answer a number", lambda d: edit(d, "GQA", "train", set_turn(1, 1, 3)), [],
     "record 1 has a gpt turn whose value is 3, not text"),
    ("train answer a list", lambda d: edit(d, "GQA", "train", set_turn(1, 1, ["cross"])), [],
     "record 1 has a gpt turn whose value is ['cross'], not text"),
    ("train record without conversations", lambda d: edit(d, "GQA", "train", drop_field(1, "conversations")), [],
     "GQA/train.json: record 1 is not a LLaVA conversation"),
    ("train record a string", lambda d: edit(d, "GQA", "train", lambda r: r[:1] + ["cross"] + r[2:]), [],
     "GQA/train.json: record 1 is not a LLaVA conversation"),
    ("train conversation empty", lambda d: edit(d, "GQA", "train", set_turns(1)), [],
     "record 1 is not a LLaVA conversation of one question and its answer: its turns are from [], not "
     "['human', 'gpt']"),
    ("train conversation of three turns", lambda d: edit(d, "GQA", "train", set_turns(1, "human", "gpt", "human")),
     [], "its turns are from ['human', 'gpt', 'human'], not"),
    ("train conversation of two exchanges", lambda d: edit(d, "GQA", "train", set_turns(
        1, "human", "gpt", "human", "gpt")), [], "its turns are from ['human', 'gpt', 'human', 'gpt']"),
    ("train turns the wrong way round", lambda d: edit(d, "GQA", "train", set_turns(1, "gpt", "human")), [],
     "its turns are from ['gpt', 'human']"),
    ("<image> in an answer", lambda d: edit(d, "GQA", "train", set_turn(1, 1, "<image>\ncross")), [],
     "GQA/train.json: record 1 has <image> in its answer (the gpt turn)"),
    ("<image> in a text-only question", lambda d: edit(d, "ScienceQA", "train", drop_field(1, "image")), [],
     "ScienceQA/train.json: record 1: <image> in the question, but no `image`: add the image's path, or remove"),
    # test records
    ("test text null", lambda d: edit(d, "GQA", "test", set_field(0, "text", None)), [],
     "GQA/test.json: record 0 has text None: give the question"),
    ("test text a number", lambda d: edit(d, "GQA", "test", set_field(0, "text", 7)), [], "record 0 has text 7"),
    ("test text blank", lambda d: edit(d, "GQA", "test", set_field(0, "text", "\n")), [], "record 0 has text '\\n'"),
    ("<image> in a test text", lambda d: edit(d, "GQA", "test", lambda r: set_field(0, "text", "<image>\n" + r[0][
        "text"])(r)), [], "GQA/test.json: record 0 has <image> in its text: the evaluator puts the image"),
    ("test question_id null", lambda d: edit(d, "GQA", "test", set_field(0, "question_id", None)), [],
     "GQA/test.json: record 0 has question_id None"),
    ("test question_id a list", lambda d: edit(d, "GQA", "test", set_field(0, "question_id", [1])), [],
     "record 0 has question_id [1]"),
    # image paths and files
    ("absolute image path", lambda d: edit(d, "GQA", "test", set_field(0, "image", image_path(d))), [],
     "GQA/test.json: record 0 has an absolute image path"),
    ("image path out of the image root", lambda d: edit(d, "GQA", "train", lambda r: set_field(
        1, "image", "../images/" + r[1]["image"])(r)), [], "record 1 has image '../images/GQA/train/"),
    ("image path a number", lambda d: edit(d, "GQA", "test", set_field(0, "image", 5)), [],
     "record 0 has image 5, not a path"),
    ("image path empty", lambda d: edit(d, "ScienceQA", "test", lambda r: set_field(
        next(i for i, x in enumerate(r) if x.get("image")), "image", "")(r)), [], "has image '', not a path"),
    ("image a folder", lambda d: edit(d, "GQA", "test", set_field(0, "image", "GQA/test")), [],
     "record 0 (question_id 'GQA_test_0'): image"),
    ("float image", lambda d: save_test_image(d, "F"), [],
     "000000.png: mode F (32-bit floating-point pixels) has no standard 8-bit scale"),
    ("32-bit integer image", lambda d: save_test_image(d, "I"), [],
     "000000.png: mode I (32-bit integer pixels) has no standard 8-bit scale"),
]


@pytest.mark.parametrize("why, breaks, extra, message", FILES, ids=[f[0] for f in FILES])
def test_bad_file_is_refused_before_any_work(why, breaks, extra, message, data_copy, tiny_base, tmp_path, capsys):
    breaks(data_copy)
    status, err = refused(coin.main, args(data_copy, tiny_base, tmp_path / "run", *extra), capsys)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run")


GROUNDING = [
    (lambda r: r.pop("size"), "has size None: give the image's [width, height], by which Grounding scales the boxes"),
    (lambda r: r.update(size=[48]), "has size [48]"),
    (lambda r: r.update(size=[0, 48]), "has size [0, 48]"),
    (lambda r: r.update(size="48x48"), "has size '48x48'"),
    (lambda r: r.update(answer_bbox="[0.1, 0.2, 0.3]"),
     "has the box '[0.1, 0.2, 0.3]': give it as \"[x1, y1, x2, y2]\""),
    (lambda r: r.update(answer_bbox="[a, b, c, d]"), "has the box '[a, b, c, d]'"),
    (lambda r: r.pop("answer_bbox") and r.update(answer=None), "has the box None"),
]


@pytest.mark.parametrize("change, message", GROUNDING, ids=[m.split(":")[0] for _, m in GROUNDING])
def test_grounding_records_that_cannot_be_scored_are_refused(change, message, mini_data, tmp_path, capsys):
    """eval_grounding.py reads `answer_bbox` and `size`: a record without them is refused before training (coin.py,
    data.py check) and before scoring (eval.py), not when its stage is scored."""
    recs = data.test_examples(mini_data, "Grounding")
    change(recs[0])
    path = data.task_file(str(tmp_path), "Grounding", "test")
    data.write_json(path, recs)
    _, good, problems = data.check_split(str(tmp_path), "Grounding", "test", "Original",
                                         os.path.join(mini_data, "images"))
    assert [kind for kind, _ in problems] == ["malformed"] and problems[0][1].startswith(f"record 0 {message}")
    assert len(good) == len(recs) - 1
    preds = tmp_path / "merge.jsonl"
    E.write_jsonl(str(preds), [{"question_id": r["question_id"], "text": "[0, 0, 1, 1]"} for r in recs])
    status, err = refused(E.main, [f"--predictions={preds}", "--task=Grounding", f"--test_file={path}"], capsys)
    assert status == 2 and f"error: {path}: record 0 {message}" in err, err


def test_several_bad_records_are_all_listed(data_copy, tiny_base, tmp_path, capsys):
    edit(data_copy, "GQA", "test", set_field(3, "answer", ""))
    edit(data_copy, "ScienceQA", "test", set_field(1, "question_id", "ScienceQA_test_0"))
    edit(data_copy, "GQA", "train", drop_field(4, "image"))
    status, err = refused(coin.main, args(data_copy, tiny_base, tmp_path / "run"), capsys)
    assert status == 2 and "record 3" in err and "record 1" in err and "GQA/train.json: record 4" in err, err
    assert "--skip_bad drops these records" in err


def test_text_only_scienceqa_records_are_fine(mini_data):
    assert any(r.get("image") is None for r in data.test_examples(mini_data, "ScienceQA"))
    _, _, problems = data.check_split(mini_data, "ScienceQA", "test", "Original", os.path.join(mini_data, "images"))
    assert problems == []


def test_data_check_command_names_the_file(data_copy, capsys):
    edit(data_copy, "GQA", "test", lambda r: 42)
    assert data.check_main([f"--data={data_copy}", "--tasks=GQA"]) == 1
    assert "GQA/test.json: holds a number, not a list of records" in capsys.readouterr().out
    status, err = refused(data.main, ["check", "--dta=x"], capsys)
    assert status == 2 and "did you mean --data?" in err


def test_data_check_lists_bad_conversations_and_skip_bad_drops_them(data_copy, tiny_base, tmp_path, capsys):
    edit(data_copy, "GQA", "train", lambda r: set_turn(1, 0, None)(set_turn(2, 1, None)(set_turn(3, 1, "<image>")(r))))
    folder = image_path(data_copy, i=4)
    os.remove(folder)
    os.makedirs(folder)  # an image that is a folder
    assert data.check_main([f"--data={data_copy}", "--tasks=GQA"]) == 1
    out = capsys.readouterr().out
    assert "GQA/train.json: record 1 has a human turn whose value is None" in out, out
    assert "GQA/train.json: record 2 has a gpt turn whose value is None" in out
    assert "GQA/train.json: record 3 has <image> in its answer" in out
    assert f"record 4 (question_id 'GQA_test_4'): image {folder} is a folder, not an image file" in out
    assert "4 problem(s)" in out
    coin.main(args(data_copy, tiny_base, tmp_path / "run", "--tasks=GQA", "--skip_bad"))
    assert json.load(open(tmp_path / "run" / "results.json"))["dropped_records"] == {"GQA/train": 3, "GQA/test": 1}


def test_image_token_twice_with_an_image_is_taken_out_as_the_official_code_does():
    rec = {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is <image> here?"},
                                                        {"from": "gpt", "value": "a cat"}]}
    assert data.parse_train_record(rec)["question"] == "What is  here?"  # preprocess_multimodal: all taken out
    assert data.parse_train_record({**rec, "image": "sub/../a.png"})["image"] == "sub/../a.png"  # inside the root


def png16(pixels, mode):
    """PNG bytes at 16 bits a channel of 8-bit `pixels` ((H, W) or (H, W, C) uint8, C by `mode`: L, LA, RGB, RGBA),
    each value v written as v * 257 (v in the top byte and in the bottom one): pillow writes no 16-bit colour PNG."""
    import struct
    import zlib
    import numpy as np
    rows = (pixels.astype(np.uint16) * 257).astype(">u2").reshape(pixels.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    colour_type = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}[mode]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16,
                                                                colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_16_bit_images_read_as_the_same_image_at_8_bits(mode, tmp_path):
    import numpy as np
    from PIL import Image
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, channels) if channels > 1 else (6, 9), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(tmp_path / "8.png")
    (tmp_path / "16.png").write_bytes(png16(pixels, mode))
    files = ["16.png"]
    if mode == "L":  # 16-bit grey, as pillow writes it: a PNG, and a little-endian TIFF (I;16)
        for name, fmt in (("16w.png", "PNG"), ("16.tif", "TIFF")):
            Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / name, format=fmt)
            files.append(name)
    want = np.asarray(data.load_image(str(tmp_path), "8.png"))
    for name in files:
        with Image.open(tmp_path / name) as im:
            assert im.mode.startswith("I") == (mode == "L"), im.mode  # 16-bit grey reads as I;16: the case to handle
        assert np.array_equal(np.asarray(data.load_image(str(tmp_path), name)), want), name


def test_truncated_image_names_its_record(data_copy, tiny_base):
    from transformers import AutoProcessor
    rec = truncate_image(data_copy, "GQA", 0)
    _, _, problems = data.check_split(data_copy, "GQA", "test", "Original", os.path.join(data_copy, "images"),
                                      open_images=True)
    assert len(problems) == 1 and "image unreadable" in problems[0][0]  # `data.py check` decodes every image
    with pytest.raises(cli.UserError, match=f"record {rec['question_id']!r}'s image={rec['image']!r}"):
        data.load_image(os.path.join(data_copy, "images"), rec["image"], rec["question_id"])
    train = data.train_examples(data_copy, "GQA")
    ds = data.InstructionDataset([{**train[0], "image": rec["image"]}], AutoProcessor.from_pretrained(tiny_base),
                                 os.path.join(data_copy, "images"))
    with pytest.raises(cli.UserError, match=f"record {train[0]['id']!r}'s image"):
        ds[0]


def test_truncated_base_weights_name_the_folder(tiny_base, mini_data, tmp_path, capsys):
    base = shutil.copytree(tiny_base, tmp_path / "base").as_posix()
    weights = os.path.join(base, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    status, err = refused(coin.main, args(mini_data, base, tmp_path / "run"), capsys)
    assert status == 2 and f"--base={base}: its weights do not load" in err, err


# -----------------------------------------------------------------------------
# Checkpoints carry a checksum; a damaged one is refused naming the stage that deleting it retrains

def test_damaged_checkpoint_is_refused_and_old_ones_still_resume(mini_data, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    coin.main(args(mini_data, tiny_base, out))
    first, last = out / "checkpoints" / "stage1-GQA", out / "checkpoints" / "stage2-ScienceQA"
    meta = json.load(open(last / "meta.json"))
    assert meta["checksum"] == checkpoint.tensor_checksum(load_file(last / "adapter.safetensors"))
    raw = bytearray(open(last / "adapter.safetensors", "rb").read())
    raw[-64:] = bytes(64)  # the last tensor's bytes: the header stays intact and the file loads
    open(last / "adapter.safetensors", "wb").write(bytes(raw))
    capsys.readouterr()
    finished = open(out / "results.json", "rb").read()
    status, err = refused(coin.main, args(mini_data, tiny_base, out), capsys)
    assert status == 2 and "stage2-ScienceQA/adapter.safetensors: its tensors do not match their checksum" in err, err
    assert f"delete {last} and run the same command again: stage 2 (ScienceQA) is retrained" in err
    os.remove(last / "adapter.safetensors")  # (--eval_batch may differ in a run that goes on: its config is rewritten)
    status, err = refused(coin.main, args(mini_data, tiny_base, out, "--eval_batch=2"), capsys)
    assert status == 2 and "stage2-ScienceQA/adapter.safetensors: unreadable checkpoint" in err, err
    assert open(out / "results.json", "rb").read() == finished  # a run that cannot go on leaves the results alone
    # as the message says; and stage 1 as a run written before checksums: loaded unchecked, said once
    shutil.rmtree(last)
    meta = json.load(open(first / "meta.json"))
    data.write_json(str(first / "meta.json"), {k: v for k, v in meta.items() if k != "checksum"})
    checkpoint._UNCHECKED_SAID.clear()
    coin.main(args(mini_data, tiny_base, out))
    said = capsys.readouterr().out
    assert said.count("was written before checkpoints carried a checksum") == 1, said
    assert None not in json.load(open(out / "results.json"))["matrix"][1]


@pytest.mark.parametrize("where", ["out", "out/run"])
def test_out_that_is_a_file_is_refused(where, mini_data, tiny_base, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    status, err = refused(coin.main, args(mini_data, tiny_base, tmp_path / where), capsys)
    above = "" if where == "out" else f"{tmp_path / 'out'}, a folder above it, "
    assert status == 2 and f"--out={tmp_path / where}: {above}is a file, not a folder" in err, err
    status, err = refused(E.main, [f"--predictions={tmp_path}", f"--data_dir={mini_data}", f"--out={tmp_path / where}"],
                          capsys)
    assert status == 2 and f"--out={tmp_path / where}: {above}is a file, not a folder" in err, err
    status, err = refused(coin_mini.main, [f"--out={tmp_path / where}"], capsys)
    assert status == 2 and f"--out={tmp_path / where}: {above}is a file, not a folder" in err, err


def test_non_finite_loss_names_where_the_stage_started(mini_data, tiny_base, tmp_path):
    with pytest.raises(FloatingPointError, match=r"the loss is nan .* the stage started from the base model, with a "
                                                 r"fresh adapter; try a lower --lr \(now 1e\+30\)"):
        coin.main(args(mini_data, tiny_base, tmp_path / "run", "--tasks=GQA", "--lr=1e30", "--max_train=16"))


# -----------------------------------------------------------------------------
# eval.py rescoring a run: the run's own test subset, or an error

def test_rescoring_a_run_uses_its_test_subset(mini_data, tiny_base, tmp_path, capsys):
    data_dir = shutil.copytree(mini_data, tmp_path / "data").as_posix()
    out = tmp_path / "run"
    coin.main(args(data_dir, tiny_base, out, "--tasks=GQA"))
    matrix = json.load(open(out / "results.json"))["matrix"]
    capsys.readouterr()
    E.main([f"--predictions={out}", f"--out={tmp_path / 'scored'}"])  # no --data_dir, no --max_test: the run's
    assert json.load(open(tmp_path / "scored" / "results.json"))["matrix"] == matrix
    assert "without a prediction" not in capsys.readouterr().out
    status, err = refused(E.main, [f"--predictions={out}", "--max_test=0"], capsys)
    assert status == 2 and "--max_test=0: the run in" in err and "evaluated with --max_test=4" in err, err
    moved = shutil.copytree(data_dir, tmp_path / "moved").as_posix()  # the same files elsewhere: fine
    E.main([f"--predictions={out}", f"--data_dir={moved}", f"--out={tmp_path / 'scored-moved'}"])
    assert json.load(open(tmp_path / "scored-moved" / "results.json"))["matrix"] == matrix
    res = json.load(open(out / "results.json"))
    data.write_json(str(out / "results.json"), {k: v for k, v in res.items() if k != "test_records"})
    capsys.readouterr()
    E.main([f"--predictions={out}", f"--out={tmp_path / 'scored-old'}"])  # a run from before test_records: said
    assert "does not record which test records the run scored" in capsys.readouterr().out
    assert json.load(open(tmp_path / "scored-old" / "results.json"))["matrix"] == matrix
    data.write_json(str(out / "results.json"), res)
    E.main([f"--predictions={out / 'predictions'}", f"--out={tmp_path / 'scored-p'}"])  # its predictions/: the same
    assert json.load(open(tmp_path / "scored-p" / "results.json"))["matrix"] == matrix
    # one file of the run: the run's test records too, named in the first line
    preds = out / "predictions" / "stage1-GQA" / "GQA.jsonl"
    E.main([f"--predictions={preds}", "--task=GQA"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{preds}: GQA {matrix[0][0]:.2f}") and first.endswith(
        f"; test records: {data.task_file(data_dir, 'GQA', 'eval')}, the first 4"), first
    alone = shutil.copy(preds, tmp_path / "GQA.jsonl")  # elsewhere: which test records is for the user to say
    status, err = refused(E.main, [f"--predictions={alone}", "--task=GQA"], capsys)
    assert status == 2 and err == (f"error: --predictions={alone}: which test records does it answer? Give --data_dir "
                                   "(the folder holding Instructions_*/) or --test_file (the task's test JSON); only a "
                                   "coin run's own files name theirs (in its results.json)\n"), err
    status, err = refused(E.main, [f"--predictions={tmp_path / 'data'}"], capsys)  # no run there either
    assert status == 2 and "which test records does it answer? Give --data_dir (the folder holding " \
        "Instructions_*/); only" in err, err
    test_file = data.task_file(data_dir, "GQA", "eval")
    E.main([f"--predictions={alone}", "--task=GQA", f"--test_file={test_file}", "--answers_from_test=true"])
    assert capsys.readouterr().out.splitlines()[0].endswith(f"; test records: {test_file}, all 12")
    # a prediction for a question the test file lacks: the error names both files, in either scoring
    E.write_jsonl(str(alone), E.read_predictions(str(preds)) + [{"question_id": "GQA_test_99", "text": "red"}])
    for scoring in E.SCORINGS:
        status, err = refused(E.main, [f"--predictions={alone}", "--task=GQA", f"--data_dir={data_dir}",
                                       f"--scoring={scoring}"], capsys)
        assert status == 2 and f"error: {alone} (test records: {test_file}, all 12): 1 " in err, err
        assert "GQA_test_99" in err
    edit(data_dir, "GQA", "test", lambda r: r[1:])  # the data changed since the run
    status, err = refused(E.main, [f"--predictions={out}", f"--out={tmp_path / 'scored2'}"], capsys)
    assert status == 2 and "GQA: the test records under --data_dir" in err and "are not the 4" in err, err


def test_zero_shot_scienceqa_is_said_not_to_be_skill(tmp_path):
    assert E.score_scienceqa("A poetry book called sea", "A") == E.score_scienceqa("it has a tail", "A") == 1.0
    matrix = [[90.0, None], [50.0, 70.0]]
    base = {"zero_shot": {"ScienceQA": {"if": 20.0, "gk": 0.0}, "GQA": {"if": 0.0, "gk": 0.0}}}
    md = E.write_results(str(tmp_path), ["ScienceQA", "GQA"], matrix, None, base)
    assert "| 0 zero-shot | 20.00 | 0.00 |" in md and E.ZERO_SHOT_SCIENCEQA in md
    assert open(tmp_path / "results.md").read() == md
    assert E.ZERO_SHOT_SCIENCEQA not in E.write_results(str(tmp_path), ["ScienceQA", "GQA"], matrix, None)


def test_no_score_on_zero_records():
    with pytest.raises(cli.UserError, match="GQA: no test records to score against"):
        E.score_task("GQA", [], [])
    with pytest.raises(cli.UserError, match="GQA: no test records to judge"):
        E.ExactJudge().score("GQA", [], [])


# -----------------------------------------------------------------------------
# The command line as a user meets it

def test_user_error_has_no_traceback_and_a_bug_keeps_it(tmp_path):
    proc = subprocess.run([sys.executable, "coin.py", f"--data_dir={tmp_path}", "--lr=-1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: --lr=-1.0: must be greater than 0 (default: 0.001)\n", \
        proc.stderr
    assert proc.stdout == ""  # coin.py imported torch and transformers first: no warning of theirs either (an error
    # found later, --data_dir=nowhere, is one line too: SETTINGS)

    def bug(argv):
        raise KeyError("a bug in coin")
    with pytest.raises(KeyError):
        cli.run(bug, [])


HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("script", ["coin.py", "data.py", "eval.py", "coin_mini.py", "study.py"])
def test_help_answers_without_torch_and_describes_every_setting(script):
    """--help needs neither torch nor transformers (so it answers in well under 2 s) and exits 0."""
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, script, "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = [line for line in proc.stdout.splitlines() if line.startswith("  --")]
    assert settings and all(len(line.split(None, 1)) == 2 for line in settings), proc.stdout


def test_progress_in_a_log_file_is_a_few_plain_lines(capsys, monkeypatch):
    """Under pytest stderr is not a terminal: plain lines, a clock standing in for the loop's time."""
    def loop(n, step_seconds, desc="train GQA"):
        clock = iter(range(0, 10 ** 12, int(step_seconds * 10 ** 6)))  # microseconds
        monkeypatch.setattr(cli.time, "time", lambda: next(clock) / 10 ** 6)
        bar = cli.progress(range(n), desc=desc)
        for _ in bar:
            bar.set_postfix(loss="0.5")
        err = capsys.readouterr().err
        assert "\r" not in err and err.endswith(f"{desc}: {n}/{n} loss=0.5\n"), err
        return [int(line.split()[-2].split("/")[0]) for line in err.splitlines()]
    # every tenth of the loop (a 30-step stage: 3/30, 6/30, ...) ...
    assert loop(30, 2) == list(range(3, 31, 3))
    assert loop(1000, 0.2) == list(range(100, 1001, 100))
    # ... but a loop over within a second is one line, not ten
    assert loop(1000, 0.0005) == [1000]
    # and after a slow step, a line at least a minute after the last (25 s a step: 3 steps)
    steps = loop(100, 25, "eval GQA")
    assert set(range(10, 101, 10)) <= set(steps) and max(b - a for a, b in zip([0] + steps, steps)) == 3, steps


def test_one_prediction_file_with_a_bad_test_file(mini_data, tmp_path, capsys):
    recs = data.test_examples(mini_data, "GQA")
    preds = tmp_path / "merge.jsonl"
    E.write_jsonl(str(preds), [{"question_id": r["question_id"], "text": r["answer"]} for r in recs])
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps({"records": recs}))
    status, err = refused(E.main, [f"--predictions={preds}", "--task=GQA", f"--test_file={test_file}"], capsys)
    assert status == 2 and f"{test_file}: holds an object, not a list of records" in err, err
    test_file.write_text(json.dumps(recs + recs[:1]))
    status, err = refused(E.main, [f"--predictions={preds}", "--task=GQA", f"--test_file={test_file}"], capsys)
    assert status == 2 and (f"(question_id {recs[0]['question_id']!r}): question_id already used by record 0 "
                            "(make it unique)") in err, err
