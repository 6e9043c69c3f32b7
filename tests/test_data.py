"""data.py: the task list, the prompt template, the official format and the dataset."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoProcessor

import data


def test_parse_tasks():
    assert data.parse_tasks("all") == data.TASKS
    assert data.parse_tasks("alphabet")[0] == "GQA"
    assert data.parse_tasks("gqa, ScienceQA") == ["GQA", "ScienceQA"]
    with pytest.raises(ValueError, match="unknown task 'SQA'"):
        data.parse_tasks("SQA,GQA")
    with pytest.raises(ValueError, match="twice"):
        data.parse_tasks("GQA,gqa")


def test_prompt_template_is_vicuna_v1():
    question = "What is it?\nAnswer the question using a single word or phrase."
    p = data.build_prompt(question, has_image=True, answer="red")
    assert p.text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert p.text.endswith(f" USER: <image>\n{question} ASSISTANT:") and p.answer == " red"
    assert p.user == f"<image>\n{question}" and data.build_prompt(question, True) == p._replace(answer=None)
    text_only = data.build_prompt("Text only?", has_image=False)
    assert "<image>" not in text_only.text and text_only.user == "Text only?"
    assert data.split_question("Q?\nA. x\nInstr.") == ("Q?\nA. x", "Instr.")


def test_dataset_masks_prompt_and_collates(mini_data, tiny_base):
    processor = AutoProcessor.from_pretrained(tiny_base)
    ex = data.train_examples(mini_data, "ScienceQA")
    ds = data.InstructionDataset(ex, processor, os.path.join(mini_data, "images"))
    items = [ds[i] for i in range(6)]
    tok = processor.tokenizer
    for e, it in zip(ex, items):
        answer = it["input_ids"][it["labels"] != -100]
        assert tok.decode(answer[:-1]).strip() == e["answer"] and answer[-1] == tok.eos_token_id
        assert (it["pixel_values"] is None) == (e["image"] is None)
    batch = data.collate(items, tok.pad_token_id)
    n = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (6, n) and batch["attention_mask"].sum() == sum(len(i["input_ids"]) for i in items)
    assert batch["pixel_values"].shape[0] == sum(e["image"] is not None for e in ex[:6])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum() == batch["pixel_values"].shape[0] * 36


def test_bad_input_messages(tmp_path):
    d = tmp_path / "Instructions_Original" / "GQA"
    d.mkdir(parents=True)
    (d / "train.json").write_text('[{"id": 1, "conversations": [')
    with pytest.raises(ValueError, match=r"train.json: malformed JSON at line 1"):
        data.train_examples(str(tmp_path), "GQA")
    (d / "train.json").write_text('[{"id": 1, "conv": []}]')
    with pytest.raises(ValueError, match=r"train.json: record 0 is not a LLaVA conversation"):
        data.train_examples(str(tmp_path), "GQA")
    with pytest.raises(FileNotFoundError, match="TextVQA/train.json: no such file"):
        data.train_examples(str(tmp_path), "TextVQA")
    with pytest.raises(FileNotFoundError, match="image missing"):
        data.load_image(str(tmp_path), "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: image unreadable"):
        data.load_image(str(tmp_path), "bad.png")


def test_data_and_coin_mini_import_without_torch():
    """Scoring prediction files and generating CoIN-mini need neither torch nor transformers."""
    hide = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
    for module in ("data", "coin_mini"):
        subprocess.run([sys.executable, "-c", hide + f"import {module}"], check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_asd_reads_the_release_layout_and_trains(mini_data, tiny_base, tmp_path, capsys):
    """--instructions=ASD trains on Instructions_ASD/<task folder>/train_x20.json (ASD-x<X> on another X), as the
    CoIN-ASD release names its files, and evaluates on Instructions_Original's test and val files; `data.py check`
    reads it, and one training step runs on its restyled records."""
    import coin
    assert data.asd_share("ASD") == 20 and data.asd_share("ASD-x40") == 40 and data.asd_share("Diverse") is None
    assert data.task_file("D", "OCR-VQA", "train", "ASD") == os.path.join("D", "Instructions_ASD", "OCRVQA",
                                                                         "train_x20.json")
    assert data.task_file("D", "VQAv2", "train", "ASD-x80").endswith(os.path.join("Instructions_ASD", "VQAv2",
                                                                                  "train_x80.json"))
    for split in ("eval", "test", "val"):
        assert data.task_file("D", "VQAv2", split, "ASD") == data.task_file("D", "VQAv2", split)
    assert data.task_file("D", "Stage0", "train", "ASD") == data.task_file("D", "Stage0", "train")
    restyled = [ex for ex, o in zip(data.train_examples(mini_data, "TextVQA", "ASD"),
                                    data.train_examples(mini_data, "TextVQA")) if ex != o]
    assert len(restyled) == round(0.2 * 48)
    assert data.check_main([f"--data={mini_data}", "--instructions=ASD"]) == 0
    assert "no problems" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"train_x20.json: no such file; --instructions=ASD trains on the "
                                                r"CoIN-ASD release's train_x20.json: download the dataset "
                                                r"jinpeng0528/CoIN-ASD"):
        data.train_examples(str(tmp_path), "GQA", "ASD")
    # one step: the ASD records (a restyled one among them) through coin's loop, scored on the Original tests
    first = [i for i, (ex, o) in enumerate(zip(data.train_examples(mini_data, "TextVQA", "ASD"),
                                               data.train_examples(mini_data, "TextVQA"))) if ex != o][0]
    out = str(tmp_path / "run")
    coin.main([f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={out}", "--tasks=TextVQA",
               "--instructions=ASD", f"--max_train={first + 1}", f"--micro_batch={first + 1}", "--max_test=4",
               "--eval_batch=4", "--max_new_tokens=4", "--lora_r=8", "--threads=1", "--zero_shot=false"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert isinstance(res["matrix"][0][0], float)
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions", "stage1-TextVQA", "TextVQA.jsonl"))]
    originals = {r["question_id"]: r["text"] for r in data.test_examples(mini_data, "TextVQA")}
    assert len(preds) == 4 and all(originals[p["question_id"]] in p["prompt"] for p in preds)
