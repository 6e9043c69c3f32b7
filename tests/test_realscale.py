"""Real scale on tiny stand-ins: the official data layout and its check, --skip_bad, the baselines (multi-task, data
fraction, zero-shot), the batch table, gradient checkpointing, the LLaVA-1.5 base assembly and a second backbone
family (Qwen2-VL). Everything here is written by the tests themselves."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoProcessor

import base_model
import coin
import moelora
import data
from cli import UserError

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
        for rel in data.GROUND_TRUTH.get(task, ()):  # ScienceQA's and GQA's ground truth, under the image root
            shutil.copy(os.path.join(mini_data, "images", rel), image_dir / rel)
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
    assert f"GQA/test.json: record 1 (question_id 'GQA_test_1'): image {missing!r} missing" in out
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
    with pytest.raises(UserError, match=r"(?s)GQA/test.json: record 1 \(question_id .*\): image .* "
                                        r"missing.*ScienceQA/train.json: record 0 is not a LLaVA.*"
                                        r"--skip_bad drops these"):
        run(release, tiny_base, str(tmp_path / "refused"), "--tasks=GQA,ScienceQA")
    assert not os.path.exists(tmp_path / "refused")
    # --skip_bad: the bad records are dropped, counted per file
    res = run(release, tiny_base, str(tmp_path / "skipped"), "--tasks=ScienceQA,Grounding", "--skip_bad")
    assert res["dropped_records"] == {"ScienceQA/train": 1, "Grounding/train": 1}
    assert res["matrix"][1][0] is not None


def test_multitask_and_data_fraction(release, tiny_base, tmp_path):
    """Multi-task: one stage on the union of the train sets, every task evaluated, scores in the last row. Data
    fraction: a seeded subset of each train set (fewer steps, the same subset for the same seed)."""
    res = run(release, tiny_base, str(tmp_path / "mt"), "--tasks=GQA,ScienceQA", "--multitask")
    assert res["matrix"][0] == [None, None] and None not in res["matrix"][1]
    assert res["evaluation"] == {"GQA": {"images": "pad", "max_new_tokens": 4},  # as model_gqa.py, model_vqa_science.py
                                 "ScienceQA": {"images": "crop", "max_new_tokens": 4}}
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
    assert {t: coin.batch_plan(cfg, t, 8)[2] for t in ("ScienceQA", "ImageNet", "GQA", "OCR-VQA")} == \
        {"ScienceQA": 14, "ImageNet": 16, "GQA": 6, "OCR-VQA": 10}  # 8 GPUs: 896, 1024, 384, 640
    assert coin.batch_plan(coin.parse_config(["--global_batch=64", "--micro_batch=4"]), "GQA", 2) == (64, 4, 8)
    with pytest.raises(UserError, match="gives each 48 records a step, not a multiple of --micro_batch=5"):
        coin.batch_plan(dataclasses.replace(cfg, micro_batch=5), "GQA", 8)  # parse_config checks 1 rank: 896
    with pytest.raises(UserError, match="no batch for stage 'MultiTask'"):
        coin.batch_plan(cfg, "MultiTask", 8)


def test_torchrun_keeps_the_experiments_global_batch():
    """The default global batch is what one rank runs (micro_batch x grad_accum), on any number of ranks: 2 ranks
    take half of it each, in smaller micro-batches when the half is smaller; what cannot split is refused."""
    cfg = coin.parse_config([])  # micro-batch 8: the README's run
    assert coin.batch_plan(cfg, "GQA", 1) == (8, 8, 1) and coin.batch_plan(cfg, "GQA", 2) == (8, 4, 1)
    assert coin.batch_plan(cfg, "GQA", 8) == (8, 1, 1)
    cfg = coin.parse_config(["--micro_batch=2", "--grad_accum=4"])
    assert coin.batch_plan(cfg, "GQA", 2) == (8, 2, 2)
    with pytest.raises(UserError, match=r"the global batch --micro_batch x --grad_accum = 8 x 1 \(8\) does not split "
                                        r"over 3 ranks: give a --global_batch that 3 divides"):
        coin.batch_plan(coin.parse_config([]), "GQA", 3)
    with pytest.raises(UserError, match="not a multiple of --micro_batch=3: choose a --micro_batch that divides 4"):
        coin.batch_plan(dataclasses.replace(coin.parse_config(["--global_batch=8"]), micro_batch=3), "GQA", 2)
    with pytest.raises(UserError, match="--global_batch=big"):
        coin.parse_config(["--global_batch=big"])


def test_gradient_all_reduce_keeps_each_dtype(tmp_path):
    """A bf16 base on several GPUs: the projector's gradients are bf16, the adapter's fp32. They are summed in one fp32
    buffer and each goes back in its own dtype (assigning the fp32 sum to a bf16 parameter's .grad is an error)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        adapter, proj, unused = (torch.nn.Parameter(torch.zeros(3)),
                                 torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                 torch.nn.Parameter(torch.zeros(2)))
        adapter.grad, proj.grad = torch.tensor([1.0, 2.0, 3.0]), torch.full((2, 2), 0.5, dtype=torch.bfloat16)
        coin.all_reduce_grads([adapter, proj, unused])
    finally:
        dist.destroy_process_group()
    assert (adapter.grad.dtype, proj.grad.dtype, unused.grad.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    assert adapter.grad.tolist() == [1.0, 2.0, 3.0] and proj.grad.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert unused.grad.tolist() == [0.0, 0.0]  # every rank steps every parameter, in sync


def test_bf16_base_trains_its_projector_in_fp32(mini_data, tiny_base, tmp_path):
    """--dtype=bfloat16: the frozen base is bf16, the trainable projector fp32 master weights (a small AdamW step is
    lost in bf16), fed bf16 features and handing bf16 back; the whole loop runs and the saved projector moved."""
    import safetensors.torch
    coin.main([f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={tmp_path / 'run'}", "--tasks=VQAv2",
               "--dtype=bfloat16", "--max_train=16", "--max_test=4", "--micro_batch=8", "--eval_batch=4",
               "--max_new_tokens=3", "--lora_r=4", "--experts=2", "--threads=1", "--zero_shot=false"])
    ckpt = safetensors.torch.load_file(str(tmp_path / "run" / "checkpoints" / "stage1-VQAv2" / "adapter.safetensors"))
    proj = {k: v for k, v in ckpt.items() if k.startswith("projector.")}
    assert proj and all(v.dtype == torch.float32 for v in proj.values())
    from transformers import LlavaForConditionalGeneration
    base = LlavaForConditionalGeneration.from_pretrained(tiny_base).model.multi_modal_projector.state_dict()
    moved = [(v - base[k.removeprefix("projector.")].float()).abs().max().item() for k, v in proj.items()]
    assert max(moved) > 0  # it trained
    assert json.load(open(tmp_path / "run" / "results.json"))["matrix"][0][0] is not None
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).bfloat16()
    coin.train_in_fp32(model)
    y = model(torch.randn(2, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and model[0].weight.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(mini_data, tiny_base):
    """--grad_ckpt on the frozen base + adapters: the adapters still get gradients (non-reentrant checkpointing), the
    same ones as without it, dropout included (the recomputed forward, inside the same dropout_records, draws the same
    masks)."""
    proc = AutoProcessor.from_pretrained(tiny_base)
    ds = data.InstructionDataset(data.train_examples(mini_data, "GQA")[:4], proc, os.path.join(mini_data, "images"))
    batch = data.collate([ds[i] for i in range(4)], proc.tokenizer.pad_token_id)
    grads = []
    for ckpt in (False, True):
        cfg = coin.parse_config([f"--base={tiny_base}", f"--grad_ckpt={ckpt}"])
        model, _ = coin.load_base(cfg, torch.device("cpu"))
        assert model.model.language_model.gradient_checkpointing == ckpt
        moelora.add_moelora(model, None, 8, 16.0, 2, 0.1)
        moelora.mark_only_moelora_trainable(model)
        for p in model.model.language_model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))  # B != 0
        model.train()
        labels = batch.pop("labels")
        with moelora.dropout_records(range(4), batch["attention_mask"].sum(1).tolist()):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits[:, :-1].flatten(0, 1),
                                                     labels[:, 1:].flatten())
            loss.backward()
        batch["labels"] = labels
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
    # `python coin.py assemble ...` (coin.py hands it to assemble_main: test_assembly_names_the_packages_... runs that
    # command line), in this process: no interpreter start and imports
    base_model.assemble_main([f"--vicuna={vicuna}", f"--clip={clip}", f"--projector={bin_path}", f"--out={out}"])
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
    enc = processor(text=data.build_prompt("What is it?", True).text, images=[data.Image.new("RGB", (40, 30))],
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
        base_model.assemble_llava15(vicuna, clip, bad, str(tmp_path / "out"))
    torch.save({k.replace("model.", ""): v for k, v in proj.items()}, bad)
    with pytest.raises(ValueError, match=r"bad.bin: expected exactly the keys .*found \['mm_projector.0.bias'"):
        base_model.assemble_llava15(vicuna, clip, bad, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"vicuna: not the expected model \(\d+ weights missing, e.g. \['embeddings"):
        base_model.assemble_llava15(vicuna, vicuna, bin_path, str(tmp_path / "out"))  # a Llama where CLIP belongs
    assert not os.path.exists(tmp_path / "out")


def vicuna_as_downloaded(folder, tokenizer_model, vocab_size):
    """A tiny 'lmsys/vicuna-7b-v1.5' laid out as downloaded: weights, a sentencepiece tokenizer.model and its
    tokenizer_config.json (legacy false, BOS added), no tokenizer.json. Dimensions fit the llava15_parts projector."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                 max_position_embeddings=256)).save_pretrained(folder)
    open(os.path.join(folder, "tokenizer.model"), "wb").write(tokenizer_model)
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
               "model_max_length": 4096, "padding_side": "right"},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return folder


def test_assembly_names_the_packages_a_sentencepiece_tokenizer_needs(tmp_path, monkeypatch):
    """Vicuna's sentencepiece tokenizer.model needs sentencepiece and protobuf (not in requirements.txt): without them
    assemble stops at once with one line naming the missing ones and the install command. Here they are hidden (CI
    has neither anyway)."""
    vicuna = vicuna_as_downloaded(str(tmp_path / "vicuna"), b"not read", 300)
    hide = "import sys; sys.modules['sentencepiece'] = sys.modules['google.protobuf'] = None; "
    r = subprocess.run([sys.executable, "-c", hide + "import runpy; runpy.run_path('coin.py', run_name='__main__')",
                        "assemble", f"--vicuna={vicuna}", f"--clip={vicuna}", f"--projector={vicuna}/config.json",
                        f"--out={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        f"error: {vicuna}: its tokenizer is a sentencepiece tokenizer.model, and reading it needs sentencepiece and protobuf: "
        "pip install -r requirements-realscale.txt"), r.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    if base_model.installed("sentencepiece"):
        with pytest.raises(UserError, match=r"it needs protobuf: pip install -r requirements-realscale.txt"):
            base_model.check_tokenizer_packages(vicuna)
    os.remove(os.path.join(vicuna, "tokenizer.model"))  # a tokenizer.json (or nothing) needs neither
    base_model.check_tokenizer_packages(vicuna)
    assert not os.path.exists(tmp_path / "out")


def test_assembly_reads_vicunas_sentencepiece_tokenizer(llava15_parts, tmp_path):
    """With sentencepiece and protobuf (requirements-realscale.txt; skipped where they are not installed, as in CI):
    assemble reads a sentencepiece Vicuna as downloaded, and the assembled base carries a tokenizer.json, so training
    reads it without them. Its prompts are LLaVA-1.5's: each piece around <image> as sentencepiece itself encodes it,
    the "▁" (Vicuna's 29871) and the newline's byte token (13) after the image."""
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import io
    texts = [data.SYSTEM, "USER: What colour is it? Answer the question using a single word or phrase. ASSISTANT: red",
             "Options: A. red B. blue 12 34"] * 20
    model = io.BytesIO()
    # Llama's trainer settings: BPE, byte fallback, digits split, whitespace kept as written, no normalisation
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    _, clip, bin_path, _ = llava15_parts
    vicuna = vicuna_as_downloaded(str(tmp_path / "vicuna-sp"), model.getvalue(), sp.get_piece_size())
    out = str(tmp_path / "assembled")
    base_model.assemble_llava15(vicuna, clip, bin_path, out)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    hide = "import sys; sys.modules['sentencepiece'] = sys.modules['google.protobuf'] = None; "
    r = subprocess.run([sys.executable, "-c", hide + f"from transformers import AutoProcessor; "
                        f"print(AutoProcessor.from_pretrained({out!r}).tokenizer('<image>')['input_ids'])"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split("\n")[-2] == f"[1, {sp.get_piece_size()}]", r.stderr[-2000:]
    processor = AutoProcessor.from_pretrained(out)
    assert data.vicuna_prompts(processor)
    question = "What colour is it?\nAnswer the question using a single word or phrase."
    prompt = data.build_prompt(question, True, processor)
    got = data.encode(processor, prompt, data.Image.new("RGB", (40, 30)))["input_ids"].tolist()
    before, after = prompt.text.split(data.IMAGE_TOKEN)
    image_id = processor.tokenizer.convert_tokens_to_ids(data.IMAGE_TOKEN)
    assert got == [1] + sp.encode(before) + [image_id] * 4 + sp.encode(after)
    assert sp.id_to_piece(got[got.index(image_id) + 4:got.index(image_id) + 6]) == ["▁", "<0x0A>"]


# -----------------------------------------------------------------------------
# Another family: a tiny random Qwen2-VL (3D rope over image patches, a patch merger as projector, ChatML prompts)

# ChatML as Qwen2-VL's template writes it: an image item becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the processor expands to one <|image_pad|> per merged patch
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
          "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
          "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]


def qwen2vl_processor_class():
    """Qwen2VLProcessor, or without torchvision the same processor minus its video part. Its video processor needs
    torchvision, which has no CPU build to go with a CPU torch: there the test registers this image-only subclass
    (CoIN has no videos); everything else (image processor, tokenizer, template, model) is Qwen2-VL's own."""
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    try:
        import torchvision  # noqa: F401
        return Qwen2VLProcessor
    except ImportError:
        pass

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
    return ImageOnlyQwen2VLProcessor


@pytest.fixture(scope="module")
def tiny_qwen2vl(mini_data, tmp_path_factory):
    """A random Qwen2VLForConditionalGeneration (2 text layers of d64, a 2-layer d32 vision tower, patch 14, 2 x 2
    merge) with its processor, saved as a model directory: CoIN-mini's 48 px images become 56 x 56, 16 patches, 4 image
    tokens. Tokenizer: byte-level BPE with Qwen's special tokens, eos <|im_end|> (the end of a ChatML turn)."""
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor)
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(base_model.corpus_texts(mini_data), QWEN_SPECIALS, 500),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    cls = qwen2vl_processor_class()
    parts = {"video_processor": transformers.Qwen2VLVideoProcessor()} if "video_processor" in cls.get_attributes() \
        else {}
    processor = cls(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56), tokenizer=tok,
                    chat_template=CHATML, **parts)
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS)))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         # head_dim 16: 8 rotary frequencies split over (time, height, width)
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
    out = str(tmp_path_factory.mktemp("tiny-qwen2vl"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_qwen2vl_trains_one_task_and_evaluates(tiny_qwen2vl, mini_data, tmp_path):
    """The same loop on a Qwen2-VL directory: adapters on exactly the language model's linears (found by type), the
    patch merger trained as the projector, ChatML prompts; the zero-shot row is the base's own answers."""
    from transformers import AutoModelForImageTextToText
    import eval as evaluate
    out = tmp_path / "run"
    coin.main([f"--data_dir={mini_data}", f"--base={tiny_qwen2vl}", f"--out={out}", "--tasks=ScienceQA",
               "--max_train=16", "--max_test=6", "--micro_batch=8", "--eval_batch=3", "--max_new_tokens=3",
               "--lora_r=4", "--experts=2", "--threads=1", "--grad_ckpt"])
    res = json.load(open(out / "results.json"))
    assert res["matrix"][0][0] is not None and set(res["zero_shot"]) == {"ScienceQA"}
    sd = load_file(str(out / "checkpoints" / "stage1-ScienceQA" / "adapter.safetensors"))
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl)
    linears = {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")}
    assert {k.rsplit(".", 1)[0].removesuffix(".router") for k in sd if not k.startswith("projector.")} == linears
    merger = base.model.visual.merger.state_dict()
    assert {k.removeprefix("projector.") for k in sd if k.startswith("projector.")} == set(merger)
    assert any(not torch.equal(sd[f"projector.{k}"], v) for k, v in merger.items()), "the merger did not train"
    # zero-shot: the wrapped model before training (B = 0) answers exactly as the plain base does
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl)
    records = data.test_examples(mini_data, "ScienceQA")[:6]
    assert records[0].get("image") and not records[1].get("image"), "text-only items and images mixed in one batch"
    want = evaluate.generate(base, processor, records, os.path.join(mini_data, "images"), batch_size=3, max_new_tokens=3)
    got = [json.loads(line) for line in open(out / "predictions" / "stage0-zeroshot" / "ScienceQA.jsonl")]
    assert [r["text"] for r in got] == [r["text"] for r in want]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_padded_batches_equal_single_items(family, tiny_base, tiny_qwen2vl, mini_data):
    """Collation and batched generation change nothing: each item's loss in a right-padded batch mixing text-only
    items and images equals its loss alone, and left-padded batched greedy answers equal one-by-one answers. This is
    where a family's extra tensors (Qwen2-VL: image_grid_thw, the per-token mm_token_type_ids of its 3D rope) and the
    image features' order go wrong if they do."""
    from transformers import AutoModelForImageTextToText
    import eval as evaluate
    base = {"llava": tiny_base, "qwen2vl": tiny_qwen2vl}[family]
    model, processor = AutoModelForImageTextToText.from_pretrained(base).eval(), AutoProcessor.from_pretrained(base)
    image_dir = os.path.join(mini_data, "images")
    ds = data.InstructionDataset(data.train_examples(mini_data, "ScienceQA")[:4], processor, image_dir)
    assert [ds.examples[i]["image"] is None for i in range(4)] == [True, False, False, False]

    def item_losses(items):
        batch = data.collate(items, processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if v is not None}).logits  # (B, T, vocab)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        return ce.sum(1)  # (B,)

    together = item_losses([ds[i] for i in range(4)])
    alone = torch.cat([item_losses([ds[i]]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    records = data.test_examples(mini_data, "ScienceQA")[:4]
    answers = [[r["text"] for r in evaluate.generate(model, processor, records, image_dir, batch_size=b,
                                                     max_new_tokens=4)] for b in (4, 1)]
    assert answers[0] == answers[1]
