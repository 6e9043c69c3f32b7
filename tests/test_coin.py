"""coin.py: config parsing, the training loop's arithmetic, the tiny base, and a whole (tiny) run end to end."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import checkpoint
import coin
import moelora
import data
from cli import UserError


def test_config_overrides_and_rejections():
    cfg = coin.parse_config(["--experts=2", "--lr=1e-3", "--zero_shot=false", "--stage0", "--tasks=GQA,VQAv2"])
    assert (cfg.experts, cfg.lr, cfg.zero_shot, cfg.stage0, cfg.tasks) == (2, 1e-3, False, True, "GQA,VQAv2")
    with pytest.raises(UserError, match="unknown setting '--expert=2'.*--experts"):
        coin.parse_config(["--expert=2"])
    with pytest.raises(UserError, match="--experts=eight: takes a whole number"):
        coin.parse_config(["--experts=eight"])
    with pytest.raises(UserError, match="--zero_shot=maybe: takes true or false"):
        coin.parse_config(["--zero_shot=maybe"])
    with pytest.raises(UserError, match="unknown task 'Foo'"):
        coin.parse_config(["--tasks=GQA,Foo"])
    with pytest.raises(UserError, match="--schedule=linear: must be one of constant, cosine"):
        coin.parse_config(["--schedule=linear"])
    # the space-separated form too, as in `torchrun coin.py --tasks all`; a bare bool flag stays a flag
    cfg = coin.parse_config(["--tasks", "all", "--experts", "4", "--stage0", "--zero_shot", "false", "--resume"])
    assert (cfg.tasks, cfg.experts, cfg.stage0, cfg.zero_shot, cfg.resume) == ("all", 4, True, False, True)
    with pytest.raises(UserError, match="--experts needs a value"):
        coin.parse_config(["--experts"])
    with pytest.raises(UserError, match="unknown setting 'all'"):
        coin.parse_config(["--stage0", "all"])


def test_global_batches_cover_each_epoch_once():
    steps = list(coin.global_batches(10, 4, seed=3, epochs=2))
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) and sorted(sum(steps[3:], [])) == list(range(10))
    assert steps == list(coin.global_batches(10, 4, seed=3, epochs=2))


def test_lr_schedule():
    cfg = coin.Config(lr=1.0, warmup_ratio=0.1, schedule="constant")
    assert [coin.lr_at(s, 20, cfg) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    cfg.schedule = "cosine"
    assert coin.lr_at(2, 20, cfg) == 1.0 and coin.lr_at(19, 20, cfg) < 0.01


def test_tiny_base_loads_like_a_real_llava(tiny_base):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    processor = AutoProcessor.from_pretrained(tiny_base)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    enc = processor(text=data.build_prompt("What is it?", True).text, images=[data.Image.new("RGB", (48, 48))],
                    return_tensors="pt")
    assert (enc["input_ids"] == model.config.image_token_index).sum() == model.config.image_seq_length
    assert processor.tokenizer.convert_ids_to_tokens(enc["input_ids"][0][:2].tolist())[1] == data.SYSTEM
    out = model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def run(mini_data, tiny_base, out, *extra):
    coin.main([f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={out}", "--max_test=8", "--eval_batch=8",
               "--micro_batch=8", "--max_new_tokens=12", "--lora_r=8", "--threads=1", *extra])
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_end_to_end_two_tasks(mini_data, tiny_base, tmp_path):
    out = str(tmp_path / "run")
    res = run(mini_data, tiny_base, out, "--tasks=GQA,ScienceQA", "--experts=4")
    assert res["tasks"] == ["GQA", "ScienceQA"]
    m = res["matrix"]
    assert m[0][1] is None and all(isinstance(v, float) for v in (m[0][0], m[1][0], m[1][1]))
    for key in ("matrix", "MAA", "BWT"):
        assert key in res["general_knowledge"]
    assert abs(res["MAA"] - (m[0][0] + (m[1][0] + m[1][1]) / 2) / 2) < 1e-6
    for stage in ("stage1-GQA", "stage2-ScienceQA"):
        ckpt = os.path.join(out, "checkpoints", stage)
        meta = json.load(open(os.path.join(ckpt, "meta.json")))
        assert meta["config"]["experts"] == 4 and meta["task"] == stage.split("-", 1)[1]
        sd = load_file(os.path.join(ckpt, "adapter.safetensors"))
        assert any(k.startswith("projector.") for k in sd) and any("router" in k for k in sd)
    assert os.path.isfile(os.path.join(out, "predictions", "stage2-ScienceQA", "GQA.jsonl"))


def test_training_moves_only_adapter_and_projector(mini_data, tiny_base, tmp_path):
    """After one stage, the frozen weights are untouched and the adapter checkpoint reproduces the model."""
    out = str(tmp_path / "run")
    run(mini_data, tiny_base, out, "--tasks=VQAv2", "--experts=2", "--zero_shot=false", "--max_test=4")
    base = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    moelora.add_moelora(model, None, 8, 32.0, 2, 0.05)
    checkpoint.load_checkpoint(model, os.path.join(out, "checkpoints", "stage1-VQAv2"))
    sd = load_file(os.path.join(out, "checkpoints", "stage1-VQAv2", "adapter.safetensors"))
    base_proj = base.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(sd[f"projector.{k}"], v) for k, v in base_proj.items()), "projector did not train"
    lm = dict(base.model.language_model.named_parameters())
    for name, p in model.model.language_model.named_parameters():
        key = name.replace(".base.", ".")
        if key in lm:
            assert torch.equal(p, lm[key]), name


def test_projector_lr_scales_only_the_projectors_steps(mini_data, tiny_base, tmp_path):
    """--projector_lr_scale gives the projector its own lr: at 1e-6 x lr it stays put (AdamW moves a weight by about
    lr per step) while the adapter learns as usual; at 1 it moves at lr."""
    base = LlavaForConditionalGeneration.from_pretrained(tiny_base).model.multi_modal_projector.state_dict()
    moved = {}
    for name, extra in (("same", ["--projector_lr_scale=1"]), ("slow", ["--projector_lr_scale=1e-6"])):
        out = str(tmp_path / name)
        run(mini_data, tiny_base, out, "--tasks=VQAv2", "--experts=2", "--zero_shot=false", "--max_test=4", *extra)
        sd = load_file(os.path.join(out, "checkpoints", "stage1-VQAv2", "adapter.safetensors"))
        moved[name] = max((sd[f"projector.{k}"] - v).abs().max().item() for k, v in base.items())
        assert max(v.abs().max().item() for k, v in sd.items() if "lora_B" in k) > 1e-4, name  # the adapter learned
    assert moved["same"] > 1e-3 and moved["slow"] < 1e-6, moved


def test_continuing_checks_settings_added_since():
    """A run written before --projector_lr_scale existed trained the projector at lr: continuing it at the new
    default would change its results, so it is refused; the value it had passes."""
    cfg = dataclasses.asdict(coin.parse_config([]))
    defaults = checkpoint.setting_defaults(coin.parse_config([]))
    saved = {"config": {k: v for k, v in cfg.items() if k != "projector_lr_scale"}, "global_batch": 8, "inputs": "x"}
    with pytest.raises(UserError, match="--projector_lr_scale=1.0, this one has --projector_lr_scale=0.1"):
        checkpoint.check_same_run(saved, {"config": cfg, "global_batch": 8, "inputs": "x"}, "meta.json", defaults)
    checkpoint.check_same_run(saved, {"config": dict(cfg, projector_lr_scale=1.0), "global_batch": 8, "inputs": "x"},
                              "p", defaults)


def test_two_gloo_ranks_equal_one_process_and_grad_accum(mini_data, tiny_base, tmp_path):
    """The same global batch of 8 as 1 x 8, 2 ranks x 4 (gloo; forked as torchrun would start them: torchrun itself
    in test_resume's elastic restart) and 1 x 4 x 2 accumulation steps gives the same adapter weights: the loss is
    normalised by the answer tokens of the whole global batch."""
    from test_resume import finish, start
    common = [f"--data_dir={mini_data}", f"--base={tiny_base}", "--tasks=VQAv2", "--experts=2", "--lora_r=8",
              "--lora_dropout=0", "--zero_shot=false", "--max_test=4", "--eval_batch=4", "--max_new_tokens=4",
              "--threads=1"]
    runs = {"1x8": ["--micro_batch=8"], "1x4x2": ["--micro_batch=4", "--grad_accum=2"]}
    for name, args in runs.items():
        coin.main(common + args + [f"--out={tmp_path / name}"])
    log = str(tmp_path / "2x4.log")
    proc = start(common + [f"--out={tmp_path / '2x4'}"], log, ranks=2)  # 1x8's command
    assert finish(proc, log) == 0, open(log).read()[-3000:]
    ckpt = lambda name: load_file(str(tmp_path / name / "checkpoints" / "stage1-VQAv2" / "adapter.safetensors"))
    ref = ckpt("1x8")
    for name in ("1x4x2", "2x4"):
        other = ckpt(name)
        assert set(other) == set(ref)
        for k in ref:
            # float noise in near-zero gradients passes through Adam's normalisation: allow 5% of one lr step
            torch.testing.assert_close(other[k], ref[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
    res = json.load(open(tmp_path / "2x4" / "results.json"))
    assert res["world_size"] == 2 and res["matrix"][0][0] is not None
