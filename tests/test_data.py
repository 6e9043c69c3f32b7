"""data.py: the task list, the prompt template, the official format and the dataset."""
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
