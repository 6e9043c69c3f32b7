"""Real scale on tiny stand-ins: the official data layout and its check, --skip_bad, the baselines (multi-task, data
fraction), the batch table and gradient checkpointing. Everything here is written by the tests themselves."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor

import coin
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def release(mini_data, tmp_path):
    """An official-layout release of GQA, ScienceQA and Grounding (16 train, 6 test, 4 val records each), its images
    under a separate image root as the real release keeps them: every field the official files have."""
    root, image_dir = tmp_path / "CoIN", tmp_path / "playground"
    for task in ("GQA", "ScienceQA", "Grounding"):
        for split, n, src in (("train", 16, "train"), ("test", 6, "test"), ("val", 4, "test")):
            recs = json.load(open(data.task_file(mini_data, task, src)))[:n]
            for r in recs:
                r.pop("accept", None)  # CoIN-mini's own field, not the release's
                if r.get("image"):
                    os.makedirs(image_dir / os.path.dirname(r["image"]), exist_ok=True)
                    shutil.copy(os.path.join(mini_data, "images", r["image"]), image_dir / r["image"])
            os.makedirs(root / "Instructions_Original" / task, exist_ok=True)
            json.dump(recs, open(data.task_file(str(root), task, split), "w"))
    return str(root), str(image_dir)


def break_release(root, image_dir):
    """A missing image (GQA test 1), an unreadable one (GQA train 2), a malformed record (ScienceQA train 0: no gpt
    turn) and a blank answer (Grounding train 3)."""
    test = json.load(open(data.task_file(root, "GQA", "test")))
    os.remove(os.path.join(image_dir, test[1]["image"]))
    train = json.load(open(data.task_file(root, "GQA", "train")))
    open(os.path.join(image_dir, train[2]["image"]), "wb").write(b"not a png")
    sqa = json.load(open(data.task_file(root, "ScienceQA", "train")))
    sqa[0]["conversations"] = sqa[0]["conversations"][:1]
    json.dump(sqa, open(data.task_file(root, "ScienceQA", "train"), "w"))
    gr = json.load(open(data.task_file(root, "Grounding", "train")))
    gr[3]["conversations"][1]["value"] = "  "
    json.dump(gr, open(data.task_file(root, "Grounding", "train"), "w"))
    return test[1]["image"], train[2]["image"]


def check(root, image_dir):
    return subprocess.run([sys.executable, "data.py", "check", f"--data={root}", f"--image_dir={image_dir}",
                           "--tasks=GQA,ScienceQA,Grounding"], cwd=ROOT, capture_output=True, text=True)


def test_release_reads_with_every_field(release):
    root, image_dir = release
    checked = data.check_tasks(root, ["ScienceQA", "Grounding"], "Original", image_dir, ("train", "test", "val"))
    assert {k: len(v[1]) for k, v in checked.items()} == {
        (t, s): n for t in ("ScienceQA", "Grounding") for s, n in (("train", 16), ("test", 6), ("val", 4))}
    assert all(not problems for _, _, problems in checked.values())
    train = checked["ScienceQA", "train"][1]
    assert any(ex["image"] is None for ex in train), "a text-only ScienceQA item"
    assert all(data.IMAGE_TOKEN not in ex["question"] and ex["answer"] for ex in train)
    gr = checked["Grounding", "test"][1][0]
    assert {"question_id", "image", "text", "answer", "answer_bbox", "size"} <= set(gr)


def test_check_command_counts_and_fails_on_problems(release):
    root, image_dir = release
    ok = check(root, image_dir)
    assert ok.returncode == 0 and "no problems" in ok.stdout, ok.stdout + ok.stderr
    assert "| GQA | val | 4 | 4 | 0 | 0 | 0 | 0 |" in ok.stdout
    missing, corrupt = break_release(root, image_dir)
    bad = check(root, image_dir)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert "| GQA | train | 16 | 15 | 0 | 0 | 1 | 0 |" in out
    assert "| GQA | test | 6 | 5 | 0 | 1 | 0 | 0 |" in out
    assert "| ScienceQA | train | 16 | 15 | 1 | 0 | 0 | 0 |" in out
    assert "| Grounding | train | 16 | 15 | 0 | 0 | 0 | 1 |" in out
    assert f"GQA/test.json: record 1: image {missing!r} missing" in out
    assert f"{corrupt} unreadable" in out and "ScienceQA/train.json: record 0 is not a LLaVA conversation" in out
    assert "| GQA | val | 4 | 3 | 0 | 1 | 0 | 0 |" in out  # val shares that image
    assert "5 problem(s)" in out


def run(release, tiny_base, out, *extra):
    root, image_dir = release
    coin.main([f"--data_dir={root}", f"--image_dir={image_dir}", f"--base={tiny_base}", f"--out={out}",
               "--micro_batch=8", "--eval_batch=8", "--max_new_tokens=4", "--lora_r=8", "--experts=2", "--threads=1",
               "--zero_shot=false", *extra])
    return json.load(open(os.path.join(out, "results.json")))


def test_training_refuses_bad_records_or_skips_them_counted(release, tiny_base, tmp_path):
    root, image_dir = release
    break_release(root, image_dir)
    with pytest.raises(ValueError, match=r"(?s)GQA/test.json: 1 bad record\(s\); the first: record 1: image .* "
                                         r"missing.*ScienceQA/train.json: 1 bad record.*--skip_bad drops them"):
        run(release, tiny_base, str(tmp_path / "refused"), "--tasks=GQA,ScienceQA")
    assert not os.path.exists(tmp_path / "refused")
    # the corrupt image is found when read (existence only is checked up front): train GQA on the other records
    res = run(release, tiny_base, str(tmp_path / "skipped"), "--tasks=ScienceQA,Grounding", "--skip_bad")
    assert res["dropped_records"] == {"ScienceQA/train": 1, "Grounding/train": 1}
    assert res["matrix"][1][0] is not None


def test_multitask_and_data_fraction(release, tiny_base, tmp_path):
    """Multi-task: one stage on the union of the train sets, every task evaluated, scores in the last row. Data
    fraction: a seeded subset of each train set (fewer steps, the same subset for the same seed)."""
    res = run(release, tiny_base, str(tmp_path / "mt"), "--tasks=GQA,ScienceQA", "--multitask")
    assert res["matrix"][0] == [None, None] and None not in res["matrix"][1]
    assert res["multitask_average"]["if"] == pytest.approx(sum(res["matrix"][1]) / 2)
    meta = json.load(open(tmp_path / "mt" / "checkpoints" / "stage1-MultiTask" / "meta.json"))
    assert meta["step"] == 4  # 32 records, global batch 8
    cfg = coin.parse_config([f"--data_dir={release[0]}", f"--image_dir={release[1]}", "--tasks=GQA,ScienceQA",
                             "--data_fraction=0.5"])
    proc = AutoProcessor.from_pretrained(tiny_base)
    a, _, _ = coin.read_inputs(cfg, ["GQA", "ScienceQA"], proc)
    b, _, _ = coin.read_inputs(cfg, ["GQA", "ScienceQA"], proc)
    full, _, _ = coin.read_inputs(coin.parse_config([f"--data_dir={release[0]}", f"--image_dir={release[1]}"]),
                                  ["GQA"], proc)
    assert len(a["GQA"]) == 8 and a == b and a["GQA"] != full["GQA"][:8]
    assert all(ex in full["GQA"] for ex in a["GQA"])


def test_global_batch_table_sets_grad_accum():
    cfg = coin.parse_config(["--global_batch=official", "--micro_batch=8"])
    assert {t: coin.grad_accum_for(cfg, t, 8) for t in ("ScienceQA", "ImageNet", "GQA", "OCR-VQA")} == \
        {"ScienceQA": 14, "ImageNet": 16, "GQA": 6, "OCR-VQA": 10}  # 8 GPUs: 896, 1024, 384, 640
    assert coin.grad_accum_for(coin.parse_config(["--global_batch=64", "--micro_batch=4"]), "GQA", 2) == 8
    with pytest.raises(SystemExit, match="global batch 384 is not a multiple of micro_batch x ranks = 5 x 8"):
        coin.grad_accum_for(coin.parse_config(["--global_batch=official", "--micro_batch=5"]), "GQA", 8)
    with pytest.raises(SystemExit, match="no batch for stage 'MultiTask'"):
        coin.grad_accum_for(cfg, "MultiTask", 8)
    with pytest.raises(SystemExit, match="--global_batch='big'"):
        coin.parse_config(["--global_batch=big"])


def test_gradient_checkpointing_gives_the_same_gradients(mini_data, tiny_base):
    """--grad_ckpt on the frozen base + adapters: the adapters still get gradients (non-reentrant checkpointing), the
    same ones as without it, dropout included (the recomputed forward redraws the same masks)."""
    proc = AutoProcessor.from_pretrained(tiny_base)
    ds = data.InstructionDataset(data.train_examples(mini_data, "GQA")[:4], proc, os.path.join(mini_data, "images"))
    batch = data.collate([ds[i] for i in range(4)], proc.tokenizer.pad_token_id)
    grads = []
    for ckpt in (False, True):
        cfg = coin.parse_config([f"--base={tiny_base}", f"--grad_ckpt={ckpt}"])
        model, _ = coin.load_base(cfg, torch.device("cpu"))
        assert model.model.language_model.gradient_checkpointing == ckpt
        coin.add_moelora(model, None, 8, 16.0, 2, 0.1)
        coin.mark_only_moelora_trainable(model)
        for p in model.model.language_model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))  # B != 0
        model.train()
        torch.manual_seed(0)
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        batch["labels"] = labels
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# -----------------------------------------------------------------------------
# The pretrain-only LLaVA-1.5 base, assembled from tiny random stand-ins of its three public parts


def byte_bpe(texts, specials, vocab_size=300):
    """A byte-level BPE tokenizer (any text tokenises) with `specials`, like the real ones but trained in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


@pytest.fixture
def llava15_parts(tmp_path):
    """A tiny 'Vicuna' (LlamaForCausalLM + tokenizer without <image>), a tiny 'CLIP ViT-L/14-336' (CLIPVisionModel +
    CLIPImageProcessor, 28 px, patch 14: 4 patches + CLS) and its stage-1 projector as mm_projector.bin."""
    from tokenizers import processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    torch.manual_seed(0)
    tok = byte_bpe([data.SYSTEM, "USER: what colour is it? ASSISTANT: red"] * 4, ["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vicuna, clip = str(tmp_path / "vicuna"), str(tmp_path / "clip")
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                                 max_position_embeddings=256)).save_pretrained(vicuna)
    tok.save_pretrained(vicuna)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=28, patch_size=14)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip)
    proj = {"model.mm_projector.0.weight": torch.randn(32, 24), "model.mm_projector.0.bias": torch.randn(32),
            "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)}
    torch.save(proj, tmp_path / "mm_projector.bin")
    return vicuna, clip, str(tmp_path / "mm_projector.bin"), proj


def test_assembled_llava15_base_loads_and_trains(llava15_parts, mini_data, tmp_path):
    from transformers import LlavaForConditionalGeneration
    vicuna, clip, bin_path, proj = llava15_parts
    out = str(tmp_path / "llava-1.5-7b-pretrain")
    r = subprocess.run([sys.executable, "coin.py", "assemble", f"--vicuna={vicuna}", f"--clip={clip}",
                        f"--projector={bin_path}", f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    c = model.config
    assert (c.vision_feature_layer, c.vision_feature_select_strategy, c.projector_hidden_act) == (-2, "default", "gelu")
    mp = model.model.multi_modal_projector
    for i, layer in ((0, mp.linear_1), (2, mp.linear_2)):
        assert torch.equal(layer.weight, proj[f"model.mm_projector.{i}.weight"])
        assert torch.equal(layer.bias, proj[f"model.mm_projector.{i}.bias"])
    from transformers import CLIPVisionModel, LlamaForCausalLM
    lm, vt = LlamaForCausalLM.from_pretrained(vicuna), CLIPVisionModel.from_pretrained(clip)
    assert torch.equal(model.model.language_model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(model.model.vision_tower.encoder.layers[2].mlp.fc1.weight, vt.encoder.layers[2].mlp.fc1.weight)
    n = lm.config.vocab_size
    assert torch.equal(model.lm_head.weight[:n], lm.lm_head.weight) and model.lm_head.weight.shape[0] == n + 1
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == c.image_token_index == n
    assert data.chat_template(processor) is None  # Vicuna v1 prompts
    enc = processor(text=data.build_prompt("What is it?", True), images=[data.Image.new("RGB", (40, 30))],
                    return_tensors="pt")
    assert (enc["input_ids"] == c.image_token_index).sum() == 4  # 2 x 2 patches, CLS dropped
    # the same loop trains and evaluates it
    res = coin.main([f"--data_dir={mini_data}", f"--base={out}", f"--out={tmp_path / 'run'}", "--tasks=VQAv2",
                     "--max_train=16", "--max_test=4", "--micro_batch=8", "--eval_batch=4", "--max_new_tokens=3",
                     "--lora_r=4", "--experts=2", "--threads=1", "--zero_shot=false"])
    assert json.load(open(tmp_path / "run" / "results.json"))["matrix"][0][0] is not None


def test_assembly_checks_every_name_and_shape(llava15_parts, tmp_path):
    vicuna, clip, bin_path, proj = llava15_parts
    bad = str(tmp_path / "bad.bin")
    torch.save({**proj, "model.mm_projector.0.weight": torch.randn(32, 16)}, bad)  # a projector for another tower
    with pytest.raises(ValueError, match=r"1 shapes differ .*linear_1.weight: \(32, 16\) != \(32, 24\)"):
        coin.assemble_llava15(vicuna, clip, bad, str(tmp_path / "out"))
    torch.save({k.replace("model.", ""): v for k, v in proj.items()}, bad)
    with pytest.raises(ValueError, match=r"bad.bin: expected exactly the keys .*found \['mm_projector.0.bias'"):
        coin.assemble_llava15(vicuna, clip, bad, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"vicuna: not the expected model \(\d+ weights missing, e.g. \['embeddings"):
        coin.assemble_llava15(vicuna, vicuna, bin_path, str(tmp_path / "out"))  # a Llama where CLIP belongs
    assert not os.path.exists(tmp_path / "out")
