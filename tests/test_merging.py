"""RegLoRA (SEFE) and task-vector merging (MagMax, the mean) against transcriptions of their official code on small
tensors, file and line cited: SEFE github.com/jinpeng0528/SEFE at 2f61efe, MagMax github.com/danielm1405/magmax at
4f49f18. The formula tests run with the methods' default settings, which are asserted to be the official values: a
change of the ratio, the union, the 1/N, lambda or the max-magnitude rule breaks them."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from moelora import add_moelora, adapter_parameters

REG = methods.RegLoRA.Settings()
MAG = methods.MagMax.Settings()
MEAN = methods.MeanMerge.Settings()


# -----------------------------------------------------------------------------
# RegLoRA: transcriptions of the official code

def official_key_elements(lora_A, lora_B, legacy_top2=None):
    """key_elements_identification.py, lines 48-67, transcribed (one linear): the top 2% of |B A| as (row, column)
    pairs, concatenated with the earlier stages' pairs."""
    lora_res = (lora_B @ lora_A).to(torch.float32)
    param_importance = torch.abs(lora_res)
    k_1 = int(0.02 * param_importance.shape[0] * param_importance.shape[1])
    _, flat_indices = torch.topk(param_importance.view(-1), k_1)
    indices_2d = torch.stack([
        torch.div(flat_indices, param_importance.size(1), rounding_mode='floor'),
        flat_indices % param_importance.size(1)
    ]).T
    if legacy_top2 is not None:
        indices_2d = torch.cat((indices_2d, legacy_top2), dim=0)
    return indices_2d


def official_penalty(linears, regularization_info, n_linears):
    """llava/model/language_model/modeling_llama.py lines 791-801 (each linear's mean |(B A)[rows, cols]|, summed),
    line 1131 (/ 224: here / n_linears, the number of adapted linears) and llava/model/language_model/llava_llama.py
    line 114 (x 2.5e3), transcribed. linears: {name: (lora_A, lora_B)}."""
    loss_reg = 0
    for per_linear_name, (lora_A, lora_B) in linears.items():
        topk = regularization_info[per_linear_name]
        topk_row = topk[:, 0]
        topk_col = topk[:, 1]
        lora_metric = lora_B @ lora_A
        reg_region = lora_metric[topk_row, topk_col]
        loss_reg += torch.abs(reg_region).mean()
    loss_reg = loss_reg / n_linears
    return loss_reg * 2.5e3


def pairs(flat, cols):
    return torch.stack([flat // cols, flat % cols]).T.long()


def test_reglora_defaults_are_the_official_ones():
    """scripts/Train/2_TextVQA.sh line 12 (and every later stage's): --lora_r 128 --lora_alpha 256, PEFT's LoRA
    (A Kaiming-uniform); key_elements_identification.py line 55: 0.02, line 67: torch.cat; llava_llama.py line 114:
    2.5e3. coin's --lora_r and --lora_alpha are the run's (CoIN-mini: 16, 32: the same alpha / r = 2)."""
    assert (REG.reglora_lambda, REG.reglora_ratio) == (2.5e3, 0.02)
    assert REG.reglora_union == "concat" and REG.reglora_init == "kaiming"


def lora_pair(d_out, d_in, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)  # A (r, d_in), B (d_out, r)


def test_key_elements_and_their_union_equal_the_official_code():
    A1, B1 = lora_pair(40, 30, 3, 0)
    A2, B2 = lora_pair(40, 30, 3, 1)
    B2[:20] = B1[:20]  # the second stage's LoRA shares rows with the first: some keys are found again
    A2 = A1.clone()
    want1 = official_key_elements(A1, B1)
    got1 = methods.key_elements(B1 @ A1, REG.reglora_ratio)
    assert len(got1) == int(0.02 * 40 * 30) == 24 and got1.dtype == torch.int32
    assert torch.equal(pairs(got1, 30), want1)  # the same positions, in the same order
    want2 = official_key_elements(A2, B2, want1)
    got2 = methods.join_keys(got1, methods.key_elements(B2 @ A2, REG.reglora_ratio), REG.reglora_union)
    assert torch.equal(pairs(got2, 30), want2)
    assert len(got2) == 48 > len(torch.unique(got2))  # a key found again counts twice
    assert methods.join_keys(None, got1) is got1
    # the set union, the switch, keeps each position once
    assert torch.equal(methods.join_keys(got1, got2[:24], "set"), torch.unique(got2))


def merged_net(r=2, alpha=4.0, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20))
    net.requires_grad_(False)
    methods.add_merged_lora(net, ["0", "2"], r, alpha, dropout=0.0)
    for _, m in methods.merged_lora_layers(net):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return net


def test_reglora_penalty_and_its_gradient_equal_the_official_code():
    net = merged_net(r=3)
    layers = methods.merged_lora_layers(net)
    keys, info = {}, {}
    for i, (name, m) in enumerate(layers):  # two earlier stages' keys, as the official file holds them
        (A1, B1), (A2, B2) = lora_pair(m.lora_B.shape[0], m.lora_A.shape[1], 3, 10 + i), lora_pair(
            m.lora_B.shape[0], m.lora_A.shape[1], 3, 20 + i)
        B2[:5] = B1[:5]
        info[name] = official_key_elements(A2, B2, official_key_elements(A1, B1))
        keys[name] = methods.join_keys(methods.key_elements(B1 @ A1, REG.reglora_ratio),
                                       methods.key_elements(B2 @ A2, REG.reglora_ratio), REG.reglora_union)
        with torch.no_grad():
            m.lora_A.normal_()
            m.lora_B.normal_()
    got = methods.reglora_penalty(layers, keys, REG.reglora_lambda)
    got.backward()
    grads = [p.grad.clone() for _, m in layers for p in (m.lora_A, m.lora_B)]
    net.zero_grad()
    want = official_penalty({n: (m.lora_A, m.lora_B) for n, m in layers}, info, n_linears=2)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, p in zip(grads, [p for _, m in layers for p in (m.lora_A, m.lora_B)]):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
    # the method's hook: its penalty is this, at its keys, from the second stage on
    cfg = type("Cfg", (), {"reglora_lambda": REG.reglora_lambda})()
    method = methods.RegLoRA(cfg)
    method.keys = {}
    assert method.penalty(net) is None
    method.keys = keys
    torch.testing.assert_close(method.penalty(net), want, rtol=1e-6, atol=0)


def test_merged_lora_layer_equals_the_official_merged_weights():
    """Each stage's LoRA merged as PEFT's merge_and_unload does it (scripts/merge_lora_weights.py ->
    llava/model/builder.py line 70): W <- W + (alpha / r) B A, stage after stage; coin keeps the sum as factors."""
    net = merged_net(r=2, alpha=4.0)
    m = net[0]
    W, b, x = m.base.weight.clone(), m.base.bias.clone(), torch.randn(5, 30)
    torch.testing.assert_close(m(x), F.linear(x, W, b))  # nothing merged, B = 0: the base
    for stage in range(3):
        methods.fresh_lora(net, seed=7, stage=stage, init="kaiming")
        assert not m.lora_B.any()
        with torch.no_grad():
            m.lora_B.normal_()
        W = W + (m.lora_B @ m.lora_A).detach() * 2.0  # alpha / r
        torch.testing.assert_close(m(x), F.linear(x, W, b), rtol=1e-5, atol=1e-5)
        m.fold()
        torch.testing.assert_close(m(x), F.linear(x, W, b), rtol=1e-5, atol=1e-5)
    assert m.merged_A.shape == (6, 30) and m.merged_B.shape == (40, 6)
    # the fresh LoRA is PEFT's init, drawn from (seed, stage) alone
    methods.fresh_lora(net, seed=7, stage=1, init="kaiming")
    g = methods.seeded_generator(7, "reglora", 1)
    want = [nn.init.kaiming_uniform_(torch.empty(2, d), a=math.sqrt(5), generator=g) for d in (30, 40)]
    assert torch.equal(net[0].lora_A, want[0]) and torch.equal(net[2].lora_A, want[1])


def test_reglora_end_stage_keeps_keys_and_merged_factors_exactly():
    net = merged_net()
    cfg = type("Cfg", (), {"reglora_ratio": REG.reglora_ratio, "reglora_union": REG.reglora_union,
                           "reglora_init": "kaiming"})()
    method, state = methods.RegLoRA(cfg), {}
    x = torch.randn(3, 30)
    for j in range(3):
        stage = type("S", (), {"index": j, "seed": 1, "last": j == 2})()
        method.start_stage(net, stage, [], state)
        with torch.no_grad():
            for _, m in methods.merged_lora_layers(net):
                m.lora_B.normal_()
        before = net(x)
        products = {n: (m.lora_B @ m.lora_A).detach() for n, m in methods.merged_lora_layers(net)}
        old_keys = dict(method.keys)
        state = method.end_stage(net, stage, None, state)
        torch.testing.assert_close(net(x), before)  # merged: the same function
        for n, m in methods.merged_lora_layers(net):
            assert torch.equal(state[f"{n}.merged_A"], m.merged_A) and len(m.merged_A) == 2 * (j + 1)
            if j < 2:
                want = methods.join_keys(old_keys.get(n), methods.key_elements(products[n], 0.02))
                assert torch.equal(state[f"{n}.keys"], want)
            else:
                assert f"{n}.keys" not in state  # no stage reads the last stage's keys
    # a resumed run: a fresh model given the state computes the same
    other = merged_net()
    methods.RegLoRA(cfg).evaluating(other, None, state)
    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# MagMax and the mean: transcriptions of the official code

def official_merge_max_abs(task_vectors):
    """src/merging/task_vectors.py, merge_max_abs (lines 104-127), transcribed; task vectors as {key: tensor}."""
    new_vector = {}
    for key in task_vectors[0]:
        max_abs_tensor = task_vectors[0][key]
        for task_vector in task_vectors[1:]:
            current_tensor = task_vector[key]
            max_abs_tensor = torch.where(current_tensor.abs() >= max_abs_tensor.abs(), current_tensor, max_abs_tensor)
        new_vector[key] = max_abs_tensor
    return new_vector


def official_sum(task_vectors):
    """The built-in sum over TaskVectors (task_vectors.py lines 35-49: __radd__ of 0 is the first, then key-wise +)."""
    total = task_vectors[0]
    for tv in task_vectors[1:]:
        total = {key: total[key] + tv[key] for key in total}
    return total


def official_apply_to(pretrained_state_dict, vector, scaling_coef):
    """task_vectors.py, TaskVector.apply_to (lines 73-85), transcribed: pretrained + scaling_coef * vector."""
    return {key: pretrained_state_dict[key] + scaling_coef * vector[key] for key in pretrained_state_dict}


def official_ties_magnitude(T):
    """src/merging/ties.py, aggregate with agg_type "magnitude" (lines 238-240): argmax, the first stage on a tie."""
    max_indices = T.abs().argmax(dim=0)
    return T[max_indices, torch.arange(T.shape[1])]


def test_merging_defaults_are_the_official_ones():
    """merge_splitted.py lines 69-71 (and merge_8datasets.py lines 24-26): merge_max_abs at 0.5, sum at 1 / n."""
    assert MAG.magmax_lambda == 0.5 and MEAN.merge_lambda == 1.0


def test_max_magnitude_and_mean_equal_the_official_merges_ties_included():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=g) for _ in range(4)]
    taus[2][0, 0], taus[3][0, 0] = 5.0, -5.0  # an exact tie of |tau| with opposite signs: the later one is kept
    taus[0][1, 1], taus[1][1, 1] = -7.0, 7.0
    got = methods.max_magnitude(iter(taus))
    assert torch.equal(got, official_merge_max_abs([{"w": t} for t in taus])["w"])
    assert got[0, 0] == -5.0 and got[1, 1] == 7.0
    flat = torch.stack([t.flatten() for t in taus])  # ties.py's argmax would keep the first: it differs only there
    assert official_ties_magnitude(flat).view(6, 5)[0, 0] == 5.0
    assert torch.equal(official_ties_magnitude(flat).view(6, 5)[2:], got[2:])
    assert torch.equal(methods.summed(iter(taus)), official_sum([{"w": t} for t in taus])["w"])


class Toy(nn.Module):
    """A LLaVA-shaped stand-in: model.multi_modal_projector and model.language_model."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.multi_modal_projector = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4))
        self.model.language_model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, x):
        return self.model.language_model(self.model.multi_modal_projector(x))


def magmax_run(method_cls, stages=3):
    """Sequential stages on the toy model, each 'training' by setting new adapter and projector weights; returns the
    model, the method, its state, the base's weights and every stage's weights."""
    torch.manual_seed(0)
    model = Toy()
    model.requires_grad_(False)
    add_moelora(model, None, r=2, alpha=4.0, num_experts=1, dropout=0.0)
    cfg = type("Cfg", (), {"magmax_lambda": MAG.magmax_lambda, "merge_lambda": MEAN.merge_lambda})()
    method, state = method_cls(cfg), {}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trained = []
    for j in range(stages):
        stage = type("S", (), {"index": j, "last": j == stages - 1})()
        method.start_stage(model, stage, [], state)
        with torch.no_grad():
            for _, p in adapter_parameters(model):
                p.add_(torch.randn(p.shape))
            for p in model.model.multi_modal_projector.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
        trained.append({k: v.clone() for k, v in model.state_dict().items()})
        state = method.end_stage(model, stage, None, state)
    return model, method, state, base, trained


def official_task_vectors(base, trained):
    """theta_i - theta_0 (task_vectors.py line 33) of what trains: for each adapted linear the LoRA's delta-W,
    (alpha / r) B_i A_i (what merging it into W0 adds), for the projector its weights less the base's."""
    tvs = []
    for sd in trained:
        tv = {}
        for key in base:
            if key.endswith("base.weight"):
                layer = key.removesuffix("base.weight")
                tv[key] = 2.0 * (sd[layer + "lora_B"] @ sd[layer + "lora_A"])
            elif "multi_modal_projector" in key:
                tv[key] = sd[key] - base[key]
        tvs.append(tv)
    return tvs


def test_magmax_and_mean_evaluate_the_official_merge_and_restore_the_model_exactly():
    for cls, merge, coef in [(methods.MagMax, official_merge_max_abs, lambda n: 0.5),
                             (methods.MeanMerge, official_sum, lambda n: 1.0 / n)]:
        model, method, state, base, trained = magmax_run(cls)
        x = torch.randn(2, 3)
        after = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(torch.equal(after[k], trained[-1][k]) for k in after)  # training goes on from stage j's weights
        y = model(x)
        for j in range(3):
            tvs = official_task_vectors(base, trained[:j + 1])
            want = official_apply_to({k: base[k] for k in tvs[0]}, merge(tvs), coef(j + 1))
            stage = type("S", (), {"index": j})()
            with method.evaluating(model, stage, state):
                got = dict(model.named_parameters())
                assert isinstance(model.model.language_model[0], nn.Linear)  # the adapter steps out
                for key, w in want.items():
                    key = key.replace("base.weight", "weight") if "language_model" in key else key
                    assert torch.equal(got[key], w), (cls.name, j, key)
                merged_out = model(x)
            assert not torch.equal(merged_out, y)
            assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())  # restored bit for bit
            assert torch.equal(model(x), y)


# -----------------------------------------------------------------------------
# Through coin.py's loop: killed mid-stage and resumed, bit for bit; two gloo ranks train as one

import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import checkpoint  # noqa: E402
import coin  # noqa: E402
from test_resume import args, assert_killed_mid_stage, assert_same_run, finish, stage, start, wait_for  # noqa: E402

MERGING = ["reglora", "magmax", "merge_mean"]


@pytest.mark.parametrize("method", MERGING)
def test_merging_method_resumes_exactly(method, mini_data, tiny_base, tmp_path):
    """Two tasks of 12 steps, dropout on: SIGKILL in stage 2, rerun, the weights, predictions and scores of a run never
    stopped, bit for bit. The state a resumed run reads (RegLoRA's merged factors and key elements, every stage's task
    vector factors) comes only from the stage's method_state.safetensors."""
    ref, out, log = str(tmp_path / "ref"), str(tmp_path / "run"), str(tmp_path / "log")
    argv = lambda d: args(mini_data, tiny_base, d, f"--method={method}", "--experts=1")  # noqa: E731
    coin.main(argv(ref))
    proc = start(argv(out), log)
    wait_for(os.path.join(stage(out, 1), checkpoint.MIDSTAGE), proc, log)
    proc.kill()
    proc.wait()
    assert_killed_mid_stage(out, 1)
    coin.main(argv(out))
    assert_same_run(out, ref)
    state = load_file(os.path.join(stage(ref, 0), checkpoint.METHOD_STATE))
    weights = load_file(os.path.join(stage(ref, 0), "adapter.safetensors"))
    if method == "reglora":  # the test base's 2 layers x 7 linears, each with its merged factors and keys (2%)
        assert len([k for k in state if k.endswith(".keys")]) == 14
        meta = json.load(open(os.path.join(stage(ref, 1), "meta.json")))
        assert meta["final_penalty"] > 0 and meta["key_elements"] == sum(len(v) for k, v in state.items()
                                                                        if k.endswith(".keys"))
    else:  # the stage's LoRA and projector, and the base's projector
        assert {k.removeprefix("0.") for k in state if k.startswith("0.")} == set(weights)
        assert any(k.startswith("base.projector.") for k in state)


def test_magmax_trains_as_sequential(mini_data, tiny_base, tmp_path):
    """MagMax changes what is evaluated, not what trains: its stages' weights are sequential LoRA's, bit for bit."""
    for method in ("magmax", "sequential"):
        coin.main(args(mini_data, tiny_base, str(tmp_path / method), f"--method={method}", "--experts=1",
                       "--max_train=16", "--zero_shot=false"))
    for j in range(2):
        got, want = (load_file(os.path.join(stage(str(tmp_path / m), j), "adapter.safetensors"))
                     for m in ("magmax", "sequential"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["reglora", "magmax"])  # merge_mean keeps and merges as magmax does
def test_merging_method_on_two_ranks_equals_one(method, mini_data, tiny_base, tmp_path):
    """Two gloo ranks of 2 records give the weights and state of one rank of 4 (dropout 0: tests/test_ranks.py checks the masks):
    RegLoRA's penalty is added once per step after the ranks' gradients are summed, its keys and merge are computed
    alike on every rank; MagMax's evaluation merges alike on every rank."""
    def argv(d, *extra):
        return args(mini_data, tiny_base, d, f"--method={method}", "--experts=1", "--max_train=16", "--lr=1e-3",
                    "--lora_dropout=0", "--zero_shot=false", *extra)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    coin.main(argv(one))
    proc = start(argv(two), str(tmp_path / "two.log"), ranks=2)  # the same command: 2 records a rank
    assert finish(proc, str(tmp_path / "two.log")) == 0, open(tmp_path / "two.log").read()[-3000:]
    for j in range(2):
        for f in ("adapter.safetensors", checkpoint.METHOD_STATE):
            got, want = (load_file(os.path.join(stage(d, j), f)) for d in (two, one))
            assert got.keys() == want.keys()
            for k in want:
                if want[k].is_floating_point():  # float noise through Adam's normalisation, as test_resume's
                    torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=f"{j + 1} {f}: {k}")
                else:  # key elements: the same positions (two of near-equal |B A| may swap places in the order)
                    assert torch.equal(got[k].sort().values, want[k].sort().values), f"{j + 1} {f}: {k}"
    res = json.load(open(os.path.join(two, "results.json")))
    assert res["matrix"][1][0] is not None and res["world_size"] == 2


def test_merging_methods_refuse_moelora():
    from cli import UserError
    with pytest.raises(UserError, match=r"--method=reglora --experts=8: RegLoRA trains and merges one plain LoRA per "
                                        r"stage; give --experts=1"):
        coin.parse_config(["--method=reglora"])
    for method in ("magmax", "merge_mean"):
        with pytest.raises(UserError, match=rf"--method={method} --experts=8: merging needs each stage's delta-W"):
            coin.parse_config([f"--method={method}"])
    cfg = coin.parse_config(["--method=reglora", "--experts=1", "--reglora_union=set"])
    assert cfg.reglora_union == "set" and cfg.reglora_lambda == 2.5e3
