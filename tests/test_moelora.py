"""moelora.py against the written-out formula, one expert at a time:

    y = W0 x + (alpha / r) * sum_i g_i(x) * B_i A_i dropout_i(x),    g = softmax(W_g x)
"""
import contextlib
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointError, checkpoint
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

from bench.moelora import saved_bytes
from moelora import (MoELoRALinear, add_moelora, draw_drops, drop_chunk, dropout_records, layer_records,
                     load_moelora_state_dict, mark_only_moelora_trainable, mix_seed, moelora_state_dict, pack_drops,
                     record_drops, unpack_drops)

D_IN, D_OUT, R = 12, 10, 8


def make_layer(E, dropout=0.0, seed=0):
    """A MoELoRA layer with random B (B = 0 at init would hide every bug in the adapter path)."""
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), r=R, alpha=16.0, num_experts=E, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def loop_reference(layer, x, masks=None):
    """The formula with an explicit loop over experts, on leaf copies of the exported per-expert weights.
    masks: (E, ..., d_in) dropout multipliers (0 or 1/(1-p)) per expert, or None for no dropout."""
    w = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in layer.export_experts().items()}
    E = layer.num_experts
    g = torch.ones(*x.shape[:-1], 1) if E == 1 else torch.softmax(x @ w["router"].t(), dim=-1)  # (..., E)
    y = layer.base(x)
    for i in range(E):
        xi = x if masks is None else x * masks[i]
        y = y + w["scaling"] * g[..., i:i + 1] * (xi @ w["A"][i].t() @ w["B"][i].t())
    return y, w


def assert_same_output_and_grads(layer, x, y, x_ref, ref, w):
    """y = layer(x) and ref = loop_reference(layer, x_ref): same values, same gradients for x and every weight."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (ref * upstream).sum().backward()
    E, rank = layer.num_experts, layer.expert_rank
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad.view(E, rank, D_IN), w["A"].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad.view(D_OUT, E, rank).permute(1, 0, 2), w["B"].grad,
                               rtol=1e-5, atol=1e-6)
    if E > 1:
        torch.testing.assert_close(layer.router.weight.grad, w["router"].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(D_IN,), (5, D_IN), (3, 4, D_IN)])
def test_matches_written_out_loop(E, shape):
    layer = make_layer(E)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref, w = loop_reference(layer, x_ref)
    assert_same_output_and_grads(layer, x, layer(x), x_ref, ref, w)


def written_out_drops(seed, E, n, p):
    """A record's E experts' drops as record_drops defines them, written out: E chunks of drop_chunk(n, p) uniforms
    from the record's generator, expert e's gaps 1 + floor(log(1 - u) / log(1 - p)) from the e-th, continued after its
    last drop from a generator seeded by (seed, e) if they end before n. (E, n) bool, True where dropped."""
    u = torch.rand(E, drop_chunk(n, p), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    dropped = torch.zeros(E, n, dtype=torch.bool)
    for e in range(E):
        positions = ((1 - u[e]).log() / math.log1p(-p)).floor().add(1).cumsum(0).sub(1)
        last = int(positions[-1])
        if last < n - 1:
            positions = torch.cat([positions, draw_drops(mix_seed(seed, e), n - 1 - last, p) + last + 1])
        dropped[e, positions[positions < n].long()] = True
    return dropped


def masks_of(seeds, E, shape, p, lengths=None, key=0):
    """The dropout multipliers (E, *shape) that layer `key` applies to an input of `shape` holding len(seeds) records
    in a forward inside dropout_records(seeds, lengths): 0 where dropped, 1/(1-p) elsewhere, each record's drawn alone
    over its first lengths[b] tokens (written_out_drops)."""
    with dropout_records(seeds, lengths):
        seeds, lengths = layer_records(key)
    kept = torch.ones(E, len(seeds), math.prod(shape[:-1]) // len(seeds), shape[-1])  # (E, B, T, d_in)
    for b, (seed, L) in enumerate(zip(seeds, lengths or [kept.shape[2]] * len(seeds))):
        kept[:, b, :L] = ~written_out_drops(seed, E, L * shape[-1], p).view(E, L, -1)
    return kept.view(E, *shape) / (1 - p)


@pytest.mark.parametrize("E", [1, 4, 8])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_dropout_matches_written_out_loop(E, x_needs_grad):
    """In training each expert applies its own mask, each record's drawn from its own seed (masks_of writes them out):
    same output and same gradients as the written-out loop, padded records too."""
    p = 0.3
    layer = make_layer(E, dropout=p).train()
    x = torch.randn(3, 4, D_IN, requires_grad=x_needs_grad)  # 3 records of at most 4 tokens: 4, 2 and 3 of them
    with dropout_records([7, 8, 9], [4, 2, 3]):
        y = layer(x)
    masks = masks_of([7, 8, 9], E, x.shape, p, [4, 2, 3])  # (E, 3, 4, d_in): 0 or 1/(1-p)
    assert (masks[:, 1, 2:] != 0).all() and (masks[:, 2, 3:] != 0).all()  # padding: nothing dropped
    assert (masks == 0).any() and (masks != 0).any()
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    ref, w = loop_reference(layer, x_ref, masks)
    if x_needs_grad:
        assert_same_output_and_grads(layer, x, y, x_ref, ref, w)
    else:  # the input of the first adapted layer: only the weights get gradients
        y.sum().backward()
        ref.sum().backward()
        assert x.grad is None
        torch.testing.assert_close(layer.lora_A.grad.view(E, layer.expert_rank, D_IN), w["A"].grad)


@pytest.mark.parametrize("d_in, p", [(12, 0.3), (16, 0.3), (60, 0.5), (64, 0.5), (16, 0.004)])
def test_dropout_layouts_match_the_loop(d_in, p):
    """Every way the dropped entries are laid out: few per row (row pointers by counting) or many (by binary search),
    d_in a power of two (bit operations) or not, and gaps over 256 (p = 0.004: the packed gaps' escape path)."""
    E, N = 4, 40  # sums over 40 tokens: float32 rounding of about 1e-6 on gradients of about 10
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(d_in, D_OUT), r=R, alpha=16.0, num_experts=E, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(N, d_in, requires_grad=True)  # 4 records of 10 tokens
    with dropout_records([5, 6, 7, 8]):
        y = layer(x)
    masks = masks_of([5, 6, 7, 8], E, x.shape, p)  # (E, N, d_in)
    assert (masks == 0).any()
    x_ref = x.detach().clone().requires_grad_()
    ref, w = loop_reference(layer, x_ref, masks)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.view(E, layer.expert_rank, d_in), w["A"].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, w["router"].grad, rtol=1e-5, atol=1e-5)


def test_packed_drops_give_the_positions_back():
    """What backward keeps of the masks, one byte per drop and the rare gaps over 256 in full, gives back exactly the
    positions the forward drew, with and without such gaps, and none."""
    for p, total, any_large in ((0.3, 10_000, False), (0.05, 100_000, False), (0.003, 100_000, True), (0.01, 1, 0)):
        positions = record_drops([7], None, 1, total, 1, p)  # one record, one expert: draw_drops itself
        assert torch.equal(positions, draw_drops(7, total, p))
        small, large, large_skips = packed = pack_drops(positions)
        assert small.dtype == torch.uint8 and len(small) == len(positions) and bool(len(large)) == any_large
        assert torch.equal(unpack_drops(*packed), positions)


def test_dropped_positions_are_iid_bernoulli():
    """The drawn masks are the official ones in distribution: each entry of each expert dropped with probability p,
    independently of the other experts, tokens and features (joint drops at rate p^2). Bounds: 5 binomial standard
    deviations (the draws are seeded, so the test is deterministic)."""
    E, N, d, p = 4, 400, 500, 0.05
    dropped = ~(masks_of([7], E, (N, d), p) > 0)  # (E, N, d): True where dropped
    n = dropped[0].numel()

    def assert_rate(observed, q, count):
        bound = 5 * (q * (1 - q) / count) ** 0.5
        assert abs(observed - q) < bound, (observed, q, bound)

    for e in range(E):
        assert_rate(dropped[e].float().mean().item(), p, n)
        for f in range(e + 1, E):  # two experts' masks: independent
            assert_rate((dropped[e] & dropped[f]).float().mean().item(), p * p, n)
    assert_rate((dropped[:, :, 1:] & dropped[:, :, :-1]).float().mean().item(), p * p, E * N * (d - 1))  # features
    assert_rate((dropped[:, 1:] & dropped[:, :-1]).float().mean().item(), p * p, E * (N - 1) * d)  # tokens
    # the count of drops is Binomial(n, p), not fixed: its spread over seeds matches n p (1 - p)
    counts = torch.tensor([float(len(draw_drops(s, 1000, p))) for s in range(400)])
    assert abs(counts.mean().item() - 50) < 5 * (47.5 / 400) ** 0.5, counts.mean()
    assert 0.7 < counts.var().item() / 47.5 < 1.3, counts.var()
    pos = record_drops(range(4), [100, 50, 100, 7], E, N, d, p)  # sorted, distinct, in range
    assert pos.dtype == torch.int64 and torch.all(pos[1:] > pos[:-1]) and 0 <= pos.min() and pos.max() < E * n


def test_dropout_masks_are_the_records_own():
    """A record's masks come from its seed and the layer alone: the same in any micro-batch, beside any records, with
    any padding; another seed or another layer, others. torch's default generator is neither read nor advanced, and a
    training forward with dropout and no seeds fails rather than draw from some other stream."""
    p, E, d_in = 0.2, 4, 16
    masks = {}
    for key in (0, 1):
        # record 5 has 6 tokens: alone, beside others in a batch padded to 6, or to 7 tokens
        for seeds, lengths in (([5], None), ([9, 5, 3], [2, 6, 1]), ([5, 9], [6, 7])):
            state = torch.get_rng_state()
            torch.manual_seed(len(seeds))  # other RNG states: nothing changes
            x_shape = torch.Size((len(seeds), max(lengths or [6]), d_in))
            m = masks_of(seeds, E, x_shape, p, lengths, key)
            masks[key, len(seeds)] = m[:, seeds.index(5), :6]  # record 5's first 6 tokens
            torch.set_rng_state(state)
    for key in (0, 1):
        assert torch.equal(masks[key, 1], masks[key, 3]) and torch.equal(masks[key, 1], masks[key, 2])
    assert not torch.equal(masks[0, 1], masks[1, 1])
    layer = MoELoRALinear(nn.Linear(d_in, D_OUT), r=8, alpha=16.0, num_experts=E, dropout=p, key=1).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6, d_in)
    state = torch.get_rng_state()
    with dropout_records([9, 5]):
        y = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    ref, _ = loop_reference(layer, x, masks_of([9, 5], E, x.shape, p, key=1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    with dropout_records([9, 6]):
        assert not torch.equal(layer(x)[1], y[1]) and torch.equal(layer(x)[0], y[0])  # record 2's seed: its output
    with pytest.raises(RuntimeError, match=r"needs its records' dropout seeds: run it inside moelora.dropout_records"):
        layer(x)


def test_dropout_with_bf16():
    """A bf16 base with the fp32 adapter (coin's setting) and an all-bf16 layer: the dropout path runs (its sparse
    kernels in fp32) and matches the loop on the same masks, gradients included."""
    p = 0.2
    layer = make_layer(4, dropout=p).train()
    x = torch.randn(2, 3, D_IN).bfloat16()
    masks = masks_of([9, 10], 4, x.shape, p)
    ref, w = loop_reference(layer, x.float(), masks)
    layer.base.bfloat16()
    with dropout_records([9, 10]):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.detach(), rtol=0.03, atol=0.05)
    y.float().sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(layer.lora_A.grad.view(4, layer.expert_rank, D_IN), w["A"].grad, rtol=0.02, atol=0.02)
    layer.bfloat16()
    xg = x.clone().requires_grad_()
    with dropout_records([9, 10]):
        y16 = layer(xg)
    y16.sum().backward()
    assert y16.dtype == xg.grad.dtype == layer.lora_A.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref.detach(), rtol=0.03, atol=0.1)


@pytest.mark.parametrize("E", [1, 4])
def test_dropout_under_gradient_checkpointing(E):
    """Non-reentrant checkpointing (coin.py's --grad_ckpt) recomputes the forward in backward, inside the same
    dropout_records: the recomputation draws the same masks (the records' seeds; no call counter, no RNG state), so
    the gradients equal those without checkpointing. A recomputation with other seeds would give other masks (the test
    can tell), and one outside dropout_records fails."""
    layer = make_layer(E, dropout=0.2).train()
    x = torch.randn(5, D_IN)  # one record of 5 tokens

    def grads_of(ckpt, backward_seeds=(11,)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with dropout_records([11]):
            y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        with dropout_records(backward_seeds) if backward_seeds else contextlib.nullcontext():
            (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
        return [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    plain = grads_of(False)
    for a, b in zip(plain, grads_of(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs its records' dropout seeds"):
        grads_of(True, backward_seeds=None)
    try:  # other masks: torch's checkpoint refuses a recomputation whose packed masks differ in size from the forward's
        other = grads_of(True, backward_seeds=(12,))
    except CheckpointError:
        return
    assert not all(torch.equal(a, b) for a, b in zip(plain, other))  # same size, other masks: other gradients


def test_dropout_saves_no_masks():
    """What the dropout path keeps for backward: x (which a LoRA keeps too) and small (N, r) activations, no mask
    and no per-expert copy of x: MoELoRA E=8 keeps about what LoRA does, and far less than E copies of x. Counted
    as bench/moelora.py counts it."""
    base = nn.Linear(512, 512, bias=False).requires_grad_(False)
    x = torch.randn(64, 512, requires_grad=True)  # x: 128 KiB
    moe = saved_bytes(MoELoRALinear(base, 32, 64, 8, dropout=0.05).train(), x)
    lora = saved_bytes(MoELoRALinear(base, 32, 64, 1, dropout=0.05).train(), x)
    assert moe <= 1.2 * lora and moe < 2 * x.numel() * 4, (moe, lora)


def test_dropout_masks_are_independent_per_expert():
    """Expert i reads x through A_i = I and writes output block i, so the output shows each expert's mask per token
    and feature: every expert keeps about 1-p of the features, scaled by 1/(1-p), and two experts' masks agree only
    as often as independent ones would (p^2 + (1-p)^2), not always."""
    E, d, p = 4, 8, 0.3
    layer = MoELoRALinear(nn.Linear(d, E * d, bias=False), r=E * d, alpha=E * d, num_experts=E, dropout=p)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_A.copy_(torch.eye(d).repeat(E, 1))  # A_i = I (d, d)
        layer.lora_B.copy_(torch.eye(E * d))  # B_i writes output block i
        layer.router.weight.zero_()  # g_i = 1/E
    x = torch.ones(20000, d)
    with dropout_records(range(100)):  # 100 records of 200 tokens
        out = layer.train()(x).view(-1, E, d) * E  # (N, E, d): dropout_i(x), scaling = 1
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(1 / (1 - p))), out[kept].unique()
    rate = kept.float().mean(dim=(0, 2))  # (E,)
    assert torch.allclose(rate, torch.full((E,), 1 - p), atol=0.01), rate
    for i in range(1, E):
        agree = (kept[:, 0] == kept[:, i]).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01, (i, agree)
    # eval mode, or p = 0 in training: exactly the formula without dropout, and no random numbers drawn at all
    for module in (layer.eval(), make_layer(4, dropout=0.0).train()):
        state = torch.get_rng_state()
        y = module(torch.ones(3, module.base.in_features))
        assert torch.equal(torch.get_rng_state(), state), "dropout work in a no-dropout forward"
        assert torch.equal(y, module(torch.ones(3, module.base.in_features)))


def test_init_and_e1_is_plain_lora():
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), r=64, alpha=128, num_experts=8)
    assert layer.scaling == 2.0 and torch.all(layer.lora_B == 0)
    assert abs(layer.lora_A.std().item() - 0.01) < 0.001, layer.lora_A.std()
    assert layer.router.weight.shape == (8, D_IN) and layer.router.bias is None
    assert not any(p.requires_grad for p in layer.base.parameters())
    n_params = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base."))
    assert n_params == 64 * (D_IN + D_OUT) + 8 * D_IN  # LoRA of rank r plus E x d_in for the router
    with pytest.raises(AssertionError, match="r=6 must split evenly over num_experts=4"):
        MoELoRALinear(nn.Linear(D_IN, D_OUT), r=6, alpha=12, num_experts=4)
    lora = make_layer(1)
    assert lora.router is None
    x = torch.randn(7, D_IN)
    expected = lora.base(x) + (16.0 / R) * (x @ lora.lora_A.t() @ lora.lora_B.t())  # W0 x + (alpha/r) B A x
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-6)


def test_export_experts_is_plain_tensors():
    w = make_layer(4).export_experts()
    assert w["A"].shape == (4, R // 4, D_IN) and w["B"].shape == (4, D_OUT, R // 4) and w["router"].shape == (4, D_IN)
    assert all(type(w[k]) is torch.Tensor and not w[k].requires_grad for k in ("A", "B", "router"))
    assert isinstance(w["scaling"], float) and make_layer(1).export_experts()["router"] is None


def test_bf16_in_and_out():
    layer = make_layer(4)
    x = torch.randn(2, 3, D_IN).bfloat16()
    ref, _ = loop_reference(layer, x.float())
    layer.base.bfloat16()  # a bf16 base model with an fp32 adapter: cast in, compute, cast back
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.detach(), rtol=0.03, atol=0.05)
    y16 = layer.bfloat16()(x)  # everything bf16
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref.detach(), rtol=0.03, atol=0.1)


def test_merge():
    layer = make_layer(1)
    x = torch.randn(5, D_IN)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router weighs the experts differently for every token"):
        make_layer(2).merge()


def tiny_llava():
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
                      image_token_index=299)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_logits(model):
    """Logits for a prompt with one image (16 patch tokens), so the vision tower and projector run too."""
    torch.manual_seed(1)
    ids = torch.tensor([[1, 5] + [299] * 16 + [7, 8, 9]])
    return model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits


def test_injection_touches_exactly_the_language_model_linears():
    model = tiny_llava()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = llava_logits(model)
    names = add_moelora(model, None, r=8, alpha=16, num_experts=4)
    lm = {n for n in linears if n.startswith("model.language_model.")}
    assert set(names) == lm and len(names) == 2 * 7, names  # q k v o gate up down in 2 layers
    for n in linears - lm:  # lm_head, vision tower, projector
        assert type(model.get_submodule(n)) is nn.Linear, n
    torch.testing.assert_close(llava_logits(model), before, rtol=0, atol=0)  # B = 0: the base model at init
    with pytest.raises(AssertionError, match="already has MoELoRA layers"):
        add_moelora(model)
    only_qv = add_moelora(tiny_llava(), ["q_proj", "v_proj"], r=8, alpha=16, num_experts=2)
    assert sorted(only_qv) == sorted(n for n in lm if n.endswith(("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="no nn.Linear of the language model"):
        add_moelora(tiny_llava(), ["fc1"])  # a vision tower linear: never a target
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=300))
    assert len(add_moelora(llama, r=8, alpha=16, num_experts=2)) == 14 and type(llama.lm_head) is nn.Linear


def test_only_adapters_train_and_state_dict_round_trips_strictly():
    model = tiny_llava()
    names = add_moelora(model, None, r=8, alpha=16, num_experts=4)
    mark_only_moelora_trainable(model)
    expected = {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B", "router.weight")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    sd = moelora_state_dict(model)
    assert set(sd) == expected and set(sd) <= set(model.state_dict())
    trained = {k: torch.randn_like(v) for k, v in sd.items()}
    other = tiny_llava()
    add_moelora(other, None, r=8, alpha=16, num_experts=4)
    load_moelora_state_dict(other, trained)
    load_moelora_state_dict(model, trained)
    assert all(torch.equal(v, moelora_state_dict(other)[k]) for k, v in trained.items())
    torch.testing.assert_close(llava_logits(other), llava_logits(model), rtol=0, atol=0)
    key = sorted(trained)[0]
    with pytest.raises(KeyError, match=r"1 missing \['" + key.replace(".", r"\.")):
        load_moelora_state_dict(other, {k: v for k, v in trained.items() if k != key})
    with pytest.raises(KeyError, match=r"1 unexpected \['extra\.lora_A'\]"):
        load_moelora_state_dict(other, {**trained, "extra.lora_A": torch.zeros(1)})
    wrong_rank = tiny_llava()
    add_moelora(wrong_rank, None, r=16, alpha=16, num_experts=4)
    with pytest.raises(ValueError, match="checkpoint shape"):
        load_moelora_state_dict(wrong_rank, trained)
