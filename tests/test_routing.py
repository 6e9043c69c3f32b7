"""HiDe-LLaVA and DISCO (methods.py, "Routing by CLIP features"): their layers, routers and kept features against
transcriptions of the official code (HiDe-LLaVA at 4dd0793, github.com/Ghy0501/HiDe-LLaVA; DISCO in MCITlib at 2956dfd,
github.com/Ghy0501/MCITlib, DISCO/), file and line cited at each; the router in left-padded batched generation; the
real-scale feature path on a tiny CLIP; features and routing accuracy equal on 2 gloo ranks and 1; the routing accuracy
in results.json against the router's weights computed by hand; a run killed mid-stage resumes exactly."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import coin
import data
import eval as E
import methods
from test_resume import assert_same_run, finish, start, stage, wait_for

D, TASKS_SEEN, RANK = 16, 3, 2  # d_in = d_out = 16, 3 tasks, rank 2 per expert


def layer(rule, seen=TASKS_SEEN, seed=0):
    """A TaskExpertLinear (d=16, 3 experts of rank 2, alpha/r = 3) with every A_i and B_i random."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, D)
    m = methods.TaskExpertLinear(base, r=RANK * TASKS_SEEN, alpha=18.0, experts=TASKS_SEEN, dropout=0.0, rule=rule)
    with torch.no_grad():
        for A, B in zip(m.lora_A, m.lora_B):
            A.copy_(torch.randn(A.shape, generator=g))
            B.copy_(torch.randn(B.shape, generator=g))
    m.seen = seen
    return m.eval()


# -----------------------------------------------------------------------------
# Transcriptions of the official code (names and steps as there; dropout is nn.Identity in eval)

def official_hide_lower(x, loraA, loraB, cur_task, scaling):
    """HiDe/peft/tuners/clitmoelora.py: HiDeMOELinearA.forward (lines 462-476) and HiDeMOELinearB.forward (514-528),
    as HiDeMOELoraLinear.forward calls them below the top layer (lines 412-415)."""
    r, in_features, out_features = loraA[0].shape[0], loraA[0].shape[1], loraB[0].shape[0]
    merge_weight = 1.0
    temp_mlp = nn.Linear(in_features, r, bias=False)
    fused_weight = torch.zeros((r, in_features))
    for i in range(cur_task + 1):
        fused_weight += merge_weight * loraA[i]
    with torch.no_grad():
        temp_mlp.weight.copy_(fused_weight)
    lora_a_output = temp_mlp(x)
    temp_mlp = nn.Linear(r, out_features, bias=False)
    fused_weight = torch.zeros((out_features, r))
    for i in range(cur_task + 1):
        fused_weight += merge_weight * loraB[i]
    with torch.no_grad():
        temp_mlp.weight.copy_(fused_weight)
    lora_b_output = temp_mlp(lora_a_output)
    return lora_b_output * scaling


def official_hide_top(x, loraA, loraB, expert_weight, scaling):
    """clitmoelora.py, HiDeMOELoraLinear.forward, the top layer (lines 416-424): each expert through its own A and B,
    times the scaling and its weight, summed (the base layer's output left out)."""
    result = 0
    for i in range(len(expert_weight)):
        result += F.linear(F.linear(x, loraA[i]), loraB[i]) * scaling * expert_weight[i]
    return result


def official_hide_router(image_guide_features, text_guide_features, image_anchors, text_anchors, expert_num):
    """llava/model/llava_arch.py, prepare_inputs_labels_for_multimodal at evaluation (lines 196-215); anchors are
    (1, 768) parameters there (llava_llama.py lines 58-64)."""
    image_sim = []
    text_sim = []
    for image_anchor in image_anchors:
        image_sims = F.cosine_similarity(image_guide_features.unsqueeze(1), image_anchor, dim=2)
        image_sim.append(image_sims.max().item())
    for text_anchor in text_anchors:
        text_sims = F.cosine_similarity(text_guide_features.unsqueeze(1), text_anchor, dim=2)
        text_sim.append(text_sims.max().item())
    image_sim = np.array(image_sim[:expert_num])
    text_sim = np.array(text_sim[:expert_num])
    sim = (image_sim + text_sim) / 2
    sim_tensor = torch.tensor(sim, dtype=torch.float32)
    sim_softmax = F.softmax(sim_tensor / 0.1, dim=0)  # the official call names no dim: 0 for a 1-D tensor
    return sim_softmax.tolist()


def official_hide_anchor(batches, init):
    """llava_arch.py, the training branch (lines 187-194), one task's anchor: `init` is its 0.1 * randn start
    (llava_llama.py lines 58-60), the boundary a bf16 one (lines 66-68)."""
    anchor = init.clone()
    boundary = torch.ones(1, dtype=torch.bfloat16)
    for current_features in batches:
        feature_sum = anchor * boundary + current_features.sum(dim=0)
        boundary.data += current_features.shape[0]
        anchor = feature_sum / boundary
    return anchor


def official_disco_layer(x, loraA, loraB, mask_signal, lora_AB_weight, scaling):
    """DISCO/CoIN/peft/tuners/clitmoelora.py: CoINMOELoraLinear.forward at evaluation (lines 400-420), with
    CoINMOELinearA.forward (456-470) and CoINMOELinearB.forward (501-515): all the slices' A's and B's concatenated,
    lora_AB the (r, r) block-diagonal matrix whose block i is mask_signal[i] I, set only where the signal is non-zero."""
    diag_size = loraA[0].shape[0]
    for i, flag in enumerate(mask_signal):
        if flag != 0:
            start = i * diag_size
            end = start + diag_size
            if end > start and diag_size > 0:
                lora_AB_weight[start:end, start:end] = torch.eye(diag_size) * flag
    lora_a_output = F.linear(x, torch.cat(loraA, dim=0))
    lora_ab_output = F.linear(lora_a_output, lora_AB_weight)
    lora_b_output = F.linear(lora_ab_output, torch.cat(loraB, dim=1))
    return lora_b_output * scaling


def official_disco_router(text_guide_features, global_text_feature, expert_num):
    """DISCO/llava/model/llava_arch.py (lines 175-182): the batch's mean text feature against every prototype."""
    text_guide_features_mean = text_guide_features.mean(dim=0, keepdim=True)
    global_text_feature = torch.stack([param for param in global_text_feature])
    cos_sim_text = F.cosine_similarity(global_text_feature, text_guide_features_mean, dim=1)
    cos_sim = cos_sim_text[:expert_num]
    cos_sim_softmax = F.softmax(cos_sim / 0.05, dim=0)
    return cos_sim_softmax.tolist()


def official_disco_prototype(batches, d):
    """DISCO/llava/model/llava_arch.py, the training branch (lines 186-197), one task's prototype: it starts at zeros
    (llava_llama.py lines 57-59) and its boundary stays 1 (the batch size is added to the feature, then overwritten),
    so the prototype is the running sum of the features."""
    global_text_feature = torch.zeros(d)
    text_boundary = torch.ones(1)
    for current_text_features in batches:
        text_sum = global_text_feature * text_boundary + current_text_features.sum(dim=0)
        global_text_feature.data += current_text_features.shape[0]
        global_text_feature = text_sum / text_boundary
    return global_text_feature


# -----------------------------------------------------------------------------
# The layers

def test_hide_lower_layers_apply_the_summed_factors_of_the_official_code():
    m = layer("sum")
    x = torch.randn(4, 5, D)
    A, B = [a.detach() for a in m.lora_A], [b.detach() for b in m.lora_B]
    for seen in (1, 2, 3):
        m.seen = seen
        want = m.base(x) + official_hide_lower(x, A, B, seen - 1, m.scaling)
        torch.testing.assert_close(m(x), want)
    # the cross terms B_i A_j count: not the sum of the experts' own products
    own = m.base(x) + sum(x @ a.t() @ b.t() for a, b in zip(A, B)) * m.scaling
    assert (m(x) - own).abs().max() > 1e-2


def test_hide_top_layer_weighs_each_record_as_the_official_code_at_batch_one():
    m = layer("weighted")
    x = torch.randn(4, 5, D)
    A, B = [a.detach() for a in m.lora_A], [b.detach() for b in m.lora_B]
    w = F.softmax(torch.randn(4, TASKS_SEEN), dim=1)
    m.weights = w
    got = m(x)
    for b in range(4):  # the official evaluation generates one record at a time
        want = m.base(x[b:b + 1]) + official_hide_top(x[b:b + 1], A, B, w[b].tolist(), m.scaling)
        torch.testing.assert_close(got[b:b + 1], want)
    m.weights = None
    with pytest.raises(AssertionError, match="evaluate inside the method's evaluating"):
        m(x)


def test_disco_block_diagonal_product_equals_the_weighted_sum():
    m = layer("weighted")
    x = torch.randn(3, 4, D)
    A, B = [a.detach() for a in m.lora_A], [b.detach() for b in m.lora_B]
    w = F.softmax(torch.randn(3, TASKS_SEEN), dim=1)
    m.weights = w
    got = m(x)
    for b in range(3):
        lora_AB = torch.zeros(RANK * TASKS_SEEN, RANK * TASKS_SEEN)
        want = m.base(x[b:b + 1]) + official_disco_layer(x[b:b + 1], A, B, w[b].tolist(), lora_AB, m.scaling)
        torch.testing.assert_close(got[b:b + 1], want)
    # DISCO's block left from the previous batch where a weight is exactly 0: coin uses the weight itself
    stale = torch.zeros(RANK * TASKS_SEEN, RANK * TASKS_SEEN)
    official_disco_layer(x[:1], A, B, [0.2, 0.3, 0.5], stale, m.scaling)
    m.weights = torch.tensor([[0.5, 0.5, 0.0]])
    kept = official_disco_layer(x[:1], A, B, [0.5, 0.5, 0.0], stale, m.scaling)  # block 3 still 0.5 I
    assert (m(x[:1]) - m.base(x[:1]) - kept).abs().max() > 1e-3


def test_training_runs_the_stage_expert_alone():
    m = layer("sum").train()
    methods.train_expert(nn.Sequential(m), 1)
    x = torch.randn(2, 3, D)
    want = m.base(x) + x @ m.lora_A[1].t() @ m.lora_B[1].t() * m.scaling  # clitmoelora.py lines 407-410
    torch.testing.assert_close(m(x), want)
    m(x).sum().backward()
    assert [p.grad is not None for p in m.lora_A] == [False, True, False]
    assert [p.requires_grad for p in m.lora_B] == [False, True, False]


# -----------------------------------------------------------------------------
# The routers and the kept features

def test_hide_router_equals_the_official_router():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    image_anchors, text_anchors = torch.randn(TASKS_SEEN, D, generator=g), torch.randn(TASKS_SEEN, D, generator=g)
    image[:, :4] += 3 * image_anchors[1, :4]  # a few records close to task 2, so that the weights are not uniform
    has = torch.ones(5, dtype=torch.bool)
    temperature = methods.HiDe.Settings().hide_temperature
    got = methods.hide_router(image, has, text, image_anchors, text_anchors, temperature)
    for b in range(5):  # per record: the official router at batch 1
        want = official_hide_router(image[b:b + 1], text[b:b + 1], list(image_anchors.unsqueeze(1)),
                                    list(text_anchors.unsqueeze(1)), TASKS_SEEN)
        torch.testing.assert_close(got[b], torch.tensor(want))
    assert got.max() > 0.5  # the temperature sharpens: at 1 no weight would pass 0.5 here
    # --hide_router=batch: the official code at a batch of 5
    want = official_hide_router(image, text, list(image_anchors.unsqueeze(1)), list(text_anchors.unsqueeze(1)),
                                TASKS_SEEN)
    batch = methods.hide_router(image, has, text, image_anchors, text_anchors, temperature, over="batch")
    torch.testing.assert_close(batch, torch.tensor(want).expand(5, -1))
    # a record without an image: its text cosine alone
    has[0] = False
    alone = methods.hide_router(image, has, text, image_anchors, text_anchors, temperature)
    cos = F.cosine_similarity(text[0:1], text_anchors)
    torch.testing.assert_close(alone[0], F.softmax(cos / temperature, dim=0))


def test_disco_router_and_prototype_equal_the_official_ones():
    g = torch.Generator().manual_seed(2)
    batches = [[torch.randn(4, D, generator=g) + 2 * t for _ in range(3)] for t in range(TASKS_SEEN)]  # 3 tasks
    official = [official_disco_prototype(b, D) for b in batches]
    disco = methods.DISCO(coin.run_settings()[0](method="disco"))
    mine = torch.stack([disco.keep(None, None, torch.cat(b), None)["text_prototypes"] for b in batches])
    for p, q in zip(official, mine):  # a sum against a mean: parallel, so every cosine is the same
        torch.testing.assert_close(p / p.norm(), q / q.norm())
    text = torch.randn(4, D, generator=g) + 2
    temperature = methods.DISCO.Settings().disco_temperature
    got = methods.disco_router(text, mine, temperature)
    for b in range(4):
        torch.testing.assert_close(got[b], torch.tensor(official_disco_router(text[b:b + 1], official, TASKS_SEEN)))
    batch = methods.disco_router(text, mine, temperature, over="batch")
    torch.testing.assert_close(batch, torch.tensor(official_disco_router(text, official, TASKS_SEEN)).expand(4, -1))


def test_hide_anchors_mean_and_official_running_mean():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, D, generator=g) + 1
    has = torch.arange(300) % 3 > 0  # a third of the records without an image: not in the image anchor
    settings = coin.run_settings()[0]
    stage = methods.Stage(index=2, name="GQA", count=3, earlier=[], train_sets={}, seed=5, rank=0, world=1,
                          device=torch.device("cpu"), record_loss=None)
    kept = methods.HiDe(settings(method="hide")).keep(rows, has, -rows, stage)
    torch.testing.assert_close(kept["image_anchors"], rows[has].mean(0))
    torch.testing.assert_close(kept["text_anchors"], -rows.mean(0))
    assert not methods.mean_feature(torch.zeros(0, D)).any()
    got = methods.HiDe(settings(method="hide", hide_anchor="official", micro_batch=8)).keep(rows, has, rows, stage)
    g = methods.seeded_generator(5, "hide", 2)  # the random starts: drawn from the method's own generator
    init_image, init_text = 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    image = rows[has]
    want = official_hide_anchor([image[s:s + 8] for s in range(0, len(image), 8)], init_image)
    torch.testing.assert_close(got["image_anchors"], want)
    torch.testing.assert_close(got["text_anchors"], official_hide_anchor([rows[s:s + 8] for s in range(0, 300, 8)],
                                                                         init_text))
    got = got["text_anchors"]
    # the random start counts as one record: not the mean
    assert (got - rows.mean(0)).abs().max() > 1e-4


def test_top_layer_and_rules_on_the_tiny_llava(tiny_base, mini_data):
    """HiDe-LLaVA weighs the top decoder layer alone (the official `int(self.layer) != 31` of 32 layers); DISCO every
    layer; every linear of the language model is adapted, as find_all_linear_names."""
    for method, want in (("hide", {1}), ("disco", {0, 1})):
        cfg = coin.parse_config([f"--base={tiny_base}", f"--data_dir={mini_data}", f"--method={method}",
                                 "--tasks=GQA,VQAv2", "--experts=2", "--lora_r=4"])
        model, _ = coin.load_base(cfg, torch.device("cpu"))
        coin.add_adapter(model, cfg, "cpu", methods.METHODS[method](cfg), 2)
        rules = {n: m.rule for n, m in model.named_modules() if isinstance(m, methods.TaskExpertLinear)}
        assert len(rules) == 2 * 7 and not any("vision" in n or "projector" in n for n in rules)
        assert {methods.layer_index(n) for n, r in rules.items() if r == "weighted"} == want
    problems = methods.HiDe.check(coin.run_settings()[0](tasks="GQA,VQAv2,ImageNet", experts=2))
    assert problems == ["--method=hide --experts=2: one expert per task, and --tasks has 3; give --experts=3 (or more)"]


# -----------------------------------------------------------------------------
# The router in left-padded batched generation, on the tiny LLaVA

def routed_model(tiny_base, mini_data, method):
    cfg = coin.parse_config([f"--base={tiny_base}", f"--data_dir={mini_data}", f"--method={method}",
                             "--tasks=ScienceQA,GQA", "--experts=2", "--lora_r=4"])
    model, processor = coin.load_base(cfg, torch.device("cpu"))
    hook = methods.METHODS[method](cfg)
    coin.add_adapter(model, cfg, "cpu", hook, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in methods.task_expert_layers(model):
            for B in m.lora_B:
                B.copy_(torch.randn(B.shape, generator=g))
    return cfg, model, processor, hook


@pytest.mark.parametrize("method", ["hide", "disco"])
def test_router_in_batched_left_padded_generation(method, tiny_base, mini_data):
    cfg, model, processor, hook = routed_model(tiny_base, mini_data, method)
    image_dir = os.path.join(mini_data, "images")
    train = {t: data.train_examples(mini_data, t)[:12] for t in ("ScienceQA", "GQA")}
    stage = methods.Stage(index=1, name="GQA", count=2, earlier=["ScienceQA"], train_sets=train, seed=0, rank=0,
                          world=1, device=torch.device("cpu"), record_loss=None)
    rng = torch.get_rng_state()
    state = {}
    for j, task in enumerate(train):
        state = hook.start_stage(model, methods.Stage(**{**vars(stage), "index": j, "name": task,
                                                         "earlier": list(train)[:j]}), train[task], state)
        state = hook.end_stage(model, None, None, state)
    assert torch.equal(torch.get_rng_state(), rng)  # the kept features draw no random number
    assert all(len(v) == 2 for v in state.values())
    recs = data.test_examples(mini_data, "ScienceQA")[:5] + data.test_examples(mini_data, "GQA")[:4]
    assert any(not r.get("image") for r in recs)  # text-only records among them, prompts of different lengths
    with hook.evaluating(model, stage, state) as router:
        batched = E.generate(model, processor, recs, image_dir, batch_size=4, max_new_tokens=4)
        per_batch = list(router.routed)
        single = E.generate(model, processor, recs, image_dir, batch_size=1, max_new_tokens=4)
    assert [len(r) for r in per_batch] == [4, 4, 1]  # once per prompt, not at the decoding steps
    assert torch.equal(torch.cat(per_batch), torch.cat(router.routed[3:]))  # each record's choice, batched or alone
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert all(m.weights is None for m in methods.task_expert_layers(model))  # undone on exit
    # the weights a record gets in generation are those of its own features (record_features), alone
    records = [{"question": r["text"], "image": r.get("image"), "id": r["question_id"]} for r in recs]
    weights = []
    with hook.evaluating(model, stage, state):
        top = next(m for m in methods.task_expert_layers(model) if m.rule == "weighted")
        for r in recs:
            E.generate(model, processor, [r], image_dir, batch_size=1, max_new_tokens=1, pad_images=True)
            weights.append(top.weights[0])
    image, has, text = methods.record_features(hook.features, processor, records, image_dir, chunk=3)
    torch.testing.assert_close(torch.stack(weights), hook.weigh(image, has, text, state), rtol=1e-5, atol=1e-6)


def routed_by_hand(hook, processor, records, image_dir, state, own, pad=True, strip=False):
    """The share of `records` whose largest router weight is expert `own`, without the TestTimeRouter: the prompts
    encoded as eval.generate encodes them (`pad`, `strip`: coin.evaluation_of), in one left-padded batch, their
    features read from the frozen towers and weighed by the method's router."""
    items = []
    for r in records:
        image = data.load_image(image_dir, r["image"], r["question_id"]) if r.get("image") else None
        if image is not None and pad:
            image = data.expand2square(image, data.image_mean_rgb(processor))
        question = r["text"].strip() if strip else r["text"]
        items.append(data.encode(processor, data.build_prompt(question, image is not None, processor), image))
    enc = data.collate(items, processor.tokenizer.pad_token_id, left=True)
    features = hook.features
    with torch.no_grad():
        pooled = (features.vision(pixel_values=enc["pixel_values"]).pooler_output
                  if enc.get("pixel_values") is not None else None)
        has = features.has_image(enc["input_ids"])
        w = hook.weigh(features.image(pooled, has), has, features.instruction(enc["input_ids"], enc["attention_mask"]),
                       state)  # (records, tasks)
    return int((w.argmax(1) == own).sum()) / len(records)


# -----------------------------------------------------------------------------
# The real-scale path: CLIP's text tower and visual projection, from a CLIP folder (here a tiny one)

def test_clip_folder_gives_the_official_features(tiny_base, mini_data, tmp_path):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextModel
    clip_dir = str(tmp_path / "clip")
    config = CLIPConfig(text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=48, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(clip_dir)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(clip_dir)  # any tokenizer: the test checks the path
    cfg, model, processor, hook = routed_model(tiny_base, mini_data, "disco")
    features = methods.RouterFeatures(model, processor.tokenizer, clip_dir)
    assert not any(p.requires_grad for p in features.text.model.parameters())
    pooled = torch.randn(2, 128)
    has = torch.tensor([True, False, True])
    W = load_file(os.path.join(clip_dir, "model.safetensors"))["visual_projection.weight"]
    got = features.image(pooled, has)
    torch.testing.assert_close(got[has], pooled @ W.t())
    assert not got[1].any()
    recs = data.train_examples(mini_data, "GQA")[:3]
    items = [data.encode(processor, data.build_prompt(r["question"], False, processor)) for r in recs]
    enc = data.collate(items, processor.tokenizer.pad_token_id, left=True)
    text = features.instruction(enc["input_ids"], enc["attention_mask"])
    clip_text = CLIPTextModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)(
        [r["question"] for r in recs], padding="longest", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = clip_text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    torch.testing.assert_close(text, want)
    with pytest.raises(Exception, match="no visual_projection.weight"):
        methods.visual_projection(str(tmp_path))


# -----------------------------------------------------------------------------
# Exactness: 2 ranks and 1 take the same features and measure the same routing; a run killed mid-stage resumes to the
# same run

ROUTED_TESTS = {"ScienceQA": 5, "GQA": 4}  # test records generated per task: uneven over 2 ranks (3 + 2, 2 + 2)


def two_task_routing(hook, model, processor, mini_data, rank=0, world=1):
    """(the kept features, [what task_done says]) on `rank` of `world`: ScienceQA then GQA keep the features of their
    first 6 training records; then, generated in batches of 2 inside evaluating(), ScienceQA's and GQA's test records
    together, measured as ScienceQA's (its expert is the right one for 5 of the 9), and GQA's alone."""
    train = {t: data.train_examples(mini_data, t)[:6] for t in ROUTED_TESTS}
    stage = methods.Stage(index=1, name="GQA", count=2, earlier=["ScienceQA"], train_sets=train, seed=0, rank=rank,
                          world=world, device=torch.device("cpu"), record_loss=None)
    state = {}
    for j, task in enumerate(train):
        state = hook.start_stage(model, dataclasses.replace(stage, index=j, name=task, earlier=list(train)[:j]),
                                 train[task], state)
        state = hook.end_stage(model, None, None, state)
    tests = {t: data.test_examples(mini_data, t)[:n] for t, n in ROUTED_TESTS.items()}
    shares = []
    with hook.evaluating(model, stage, state) as router:
        for task, records in (("ScienceQA", tests["ScienceQA"] + tests["GQA"]), ("GQA", tests["GQA"])):
            E.generate(model, processor, records, os.path.join(mini_data, "images"), batch_size=2, max_new_tokens=1,
                       rank=rank, world_size=world)
            shares.append(router.task_done(task))
    return state, shares


def _features_on_rank(rank, world, init_file, tiny_base, mini_data, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg, model, processor, hook = routed_model(tiny_base, mini_data, "hide")
    recs = data.train_examples(mini_data, "ScienceQA")[:10]
    got = methods.record_features(hook.features, processor, recs, os.path.join(mini_data, "images"), 3, rank, world)
    _, shares = two_task_routing(hook, model, processor, mini_data, rank, world)
    if rank == 0:
        torch.save((got, shares), out)
    dist.destroy_process_group()


def test_features_and_routing_on_two_gloo_ranks_equal_one(tiny_base, mini_data, tmp_path):
    # forked, not spawned: a spawned rank spends seconds importing torch again
    mp.start_processes(_features_on_rank, args=(2, str(tmp_path / "store"), tiny_base, mini_data,
                                                str(tmp_path / "two.pt")), nprocs=2, start_method="fork")
    two, two_shares = torch.load(tmp_path / "two.pt")
    cfg, model, processor, hook = routed_model(tiny_base, mini_data, "hide")
    recs = data.train_examples(mini_data, "ScienceQA")[:10]
    one = methods.record_features(hook.features, processor, recs, os.path.join(mini_data, "images"), 3)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not one[1].all() and one[1].any()  # ScienceQA has records with and without an image
    # the routing accuracy: the whole test set's on 2 ranks as on 1, and the router's argmax counted by hand
    state, shares = two_task_routing(hook, model, processor, mini_data)
    assert two_shares == shares
    tests = {t: data.test_examples(mini_data, t)[:n] for t, n in ROUTED_TESTS.items()}
    image_dir = os.path.join(mini_data, "images")
    want = [routed_by_hand(hook, processor, tests["ScienceQA"] + tests["GQA"], image_dir, state, own=0),
            routed_by_hand(hook, processor, tests["GQA"], image_dir, state, own=1)]
    assert shares == [{"routed": w} for w in want]
    assert 0 < want[0] < 1  # GQA's records among ScienceQA's are not ScienceQA's


ROUTE_TASKS = ["GQA", "VQAv2", "ScienceQA"]


def route_args(mini_data, tiny_base, out, method, *extra):
    """Three tasks of 16 records, 4 steps a stage at a global batch of 4, a mid-stage checkpoint every step, dropout on
    (the restored RNG state matters), three experts."""
    return [f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={out}", f"--tasks={','.join(ROUTE_TASKS)}",
            f"--method={method}", "--experts=3", "--lora_r=6", "--micro_batch=4", "--save_every=1", "--lr=1e-2",
            "--max_train=16", "--max_test=4", "--eval_batch=4", "--max_new_tokens=4", "--threads=1",
            "--zero_shot=false", *extra]


@pytest.mark.parametrize("method, extra", [("hide", ["--hide_anchor=official", "--hide_router=batch"]),
                                           ("disco", [])])
def test_routed_method_resumes_exactly(method, extra, mini_data, tiny_base, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    coin.main(route_args(mini_data, tiny_base, ref, method, *extra))
    log = str(tmp_path / "log")
    proc = start(route_args(mini_data, tiny_base, out, method, *extra), log)
    wait_for(os.path.join(stage(out, 2, ROUTE_TASKS), checkpoint.MIDSTAGE), proc, log)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(stage(out, 2, ROUTE_TASKS), "meta.json")), "stage 3 ended before the kill"
    proc = start(route_args(mini_data, tiny_base, out, method, *extra), log)
    assert finish(proc, log) == 0, open(log).read()[-3000:]
    assert_same_run(out, ref, ROUTE_TASKS, steps=4)  # results.json's measured (the routing) too
    # each stage's routing accuracy per task in results.json, as the router's weights say by hand (--hide_router=batch:
    # the 4 test records of a task are one batch, --eval_batch=4; ScienceQA's has a record without an image)
    cfg = coin.parse_config(route_args(mini_data, tiny_base, ref, method, *extra))
    model, processor = coin.load_base(cfg, torch.device("cpu"))
    hook = methods.METHODS[method](cfg)
    coin.add_adapter(model, cfg, "cpu", hook, 3)  # the features: the frozen towers, as the run's
    measured = json.load(open(os.path.join(ref, "results.json")))["measured"]
    for j in range(3):
        got, want = (load_file(os.path.join(stage(d, j, ROUTE_TASKS), checkpoint.METHOD_STATE)) for d in (out, ref))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert all(len(v) == j + 1 for v in want.values())  # one row of kept features per task so far
        routed = {}
        for i, task in enumerate(ROUTE_TASKS[:j + 1]):
            pad, _, strip = coin.evaluation_of(cfg, task)
            routed[task] = {"routed": routed_by_hand(hook, processor, data.test_examples(mini_data, task)[:4],
                                                     os.path.join(mini_data, "images"), want, i, pad, strip)}
        assert measured[os.path.basename(stage(ref, j, ROUTE_TASKS))] == routed
    line = " · ".join(f"{t} {routed[t]['routed']:.2f}" for t in ROUTE_TASKS)  # results.md: the last stage's
    assert f"routed after {os.path.basename(stage(ref, 2, ROUTE_TASKS))} (measured by the method, docs/methods.md): " \
           f"{line}\n" in open(os.path.join(ref, "results.md")).read()
    # stage j trained expert j alone: the later experts' B are still 0 after it
    weights = load_file(os.path.join(stage(ref, 0, ROUTE_TASKS), "adapter.safetensors"))
    assert all(not v.any() for k, v in weights.items() if ".lora_B.1" in k or ".lora_B.2" in k)
    assert any(v.any() for k, v in weights.items() if ".lora_B.0" in k)
