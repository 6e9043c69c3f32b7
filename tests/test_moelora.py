"""moelora.py against the written-out formula: y = W0 x + (alpha/r) sum_i g_i(x) B_i A_i dropout_i(x)."""
import pytest
import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from moelora import (MoELoRALinear, add_moelora, load_moelora_state_dict, mark_only_moelora_trainable,
                     moelora_state_dict)


def make(E, r=8, d_in=12, d_out=10, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(d_in, d_out), r=r, alpha=16.0, num_experts=E, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every bug below
    return layer


def reference(layer, x):
    """The equation, one expert at a time, from the per-expert export."""
    w = layer.export_experts()
    out = layer.base(x)
    g = torch.softmax(x @ w["router"].t(), -1) if w["router"] is not None else torch.ones(*x.shape[:-1], 1)
    for i in range(layer.num_experts):
        out = out + w["scaling"] * g[..., i:i + 1] * (x @ w["A"][i].t() @ w["B"][i].t())
    return out


@pytest.mark.parametrize("E", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(5, 12), (3, 4, 12)])
def test_matches_written_out_loop(E, shape):
    layer = make(E)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    # the reference from detached copies of the same weights, with their own grads
    w = layer.export_experts()
    A = w["A"].clone().requires_grad_()
    B = w["B"].clone().requires_grad_()
    R = w["router"].clone().requires_grad_() if E > 1 else None
    x2 = x.detach().clone().requires_grad_()
    ref = layer.base(x2)
    g = torch.softmax(x2 @ R.t(), -1) if E > 1 else torch.ones(*shape[:-1], 1)
    for i in range(E):
        ref = ref + w["scaling"] * g[..., i:i + 1] * (x2 @ A[i].t() @ B[i].t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad.view(E, -1, 12), A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad.view(10, E, -1).permute(1, 0, 2), B.grad, rtol=1e-5, atol=1e-6)
    if E > 1:
        torch.testing.assert_close(layer.router.weight.grad, R.grad, rtol=1e-5, atol=1e-6)


def test_starts_as_the_base_and_init():
    base = nn.Linear(16, 8)
    layer = MoELoRALinear(base, r=8, alpha=16, num_experts=4)
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.all(layer.lora_B == 0) and abs(layer.lora_A.std().item() - 0.01) < 0.003
    assert layer.scaling == 2.0 and layer.router.weight.shape == (4, 16) and layer.router.bias is None
    with pytest.raises(AssertionError, match="r=6 must split evenly over num_experts=4"):
        MoELoRALinear(base, r=6, alpha=12, num_experts=4)


def test_e1_is_plain_lora():
    layer = make(1)
    assert layer.router is None
    x = torch.randn(7, 12)
    lora = layer.base(x) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), lora)


def test_dropout_masks_are_independent_per_expert():
    """Each expert sees its own mask: with A_i = I-like rows reading one input feature, the experts' outputs
    disagree on which features were dropped; with p = 0 in eval mode there is no randomness at all."""
    E, d = 4, 64
    layer = MoELoRALinear(nn.Linear(d, d, bias=False), r=E, alpha=E, num_experts=E, dropout=0.5)
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_A[:, 0] = 1.0  # every expert's single row reads feature 0
        layer.router.weight.zero_()  # equal gates 1/E
        layer.lora_B.zero_()
        for i in range(E):
            layer.lora_B[i, i] = 1.0  # expert i writes to output i
        layer.base.weight.zero_()
    layer.train()
    x = torch.ones(4000, d)
    out = layer(x)[:, :E]  # (N, E): expert i's A_i dropout_i(x) at feature 0, times g_i * scaling
    kept = out != 0
    # each expert keeps about half, and two experts agree only at chance (~50%), not always
    assert torch.allclose(kept.float().mean(0), torch.full((E,), 0.5), atol=0.05)
    agree = (kept[:, 0] == kept[:, 1]).float().mean()
    assert 0.4 < agree < 0.6, agree
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_bf16_in_and_out():
    layer = make(4)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    ref = reference(layer, x.float())
    layer.base.to(torch.bfloat16)  # a bf16 base model; the adapter stays fp32 and casts in and back
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_merge():
    layer = make(1)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer.merge()(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router weighs the experts differently for every token"):
        make(2).merge()


def tiny_llava():
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
                      image_token_index=299)
    return LlavaForConditionalGeneration(cfg)


def test_injection_touches_exactly_the_language_model_linears():
    model = tiny_llava()
    before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = add_moelora(model, None, r=8, alpha=16, num_experts=4)
    lm = {n for n in before if n.startswith("model.language_model.")}
    assert set(names) == lm and len(names) == 2 * 7  # q k v o gate up down, 2 layers
    assert all(isinstance(model.get_submodule(n), MoELoRALinear) for n in names)
    for n in before - lm:  # lm_head, vision tower, projector untouched
        assert type(model.get_submodule(n)) is nn.Linear, n
    only_qv = add_moelora(tiny_llava(), ["q_proj", "v_proj"], r=8, alpha=16, num_experts=2)
    assert len(only_qv) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in only_qv)


def test_trainable_and_state_dict_round_trip():
    model = tiny_llava()
    add_moelora(model, None, r=8, alpha=16, num_experts=4)
    mark_only_moelora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)
    sd = {k: torch.randn_like(v) for k, v in moelora_state_dict(model).items()}
    assert set(sd) == trainable
    other = tiny_llava()
    add_moelora(other, None, r=8, alpha=16, num_experts=4)
    load_moelora_state_dict(other, sd)
    assert all(torch.equal(v, moelora_state_dict(other)[k]) for k, v in sd.items())
    key = next(iter(sd))
    with pytest.raises(KeyError, match="missing .*" + key.replace(".", r"\.")):
        load_moelora_state_dict(other, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(KeyError, match=r"unexpected \['extra.lora_A'\]"):
        load_moelora_state_dict(other, {**sd, "extra.lora_A": torch.zeros(1)})
    wrong = tiny_llava()
    add_moelora(wrong, None, r=16, alpha=16, num_experts=4)
    with pytest.raises(ValueError, match="checkpoint shape"):
        load_moelora_state_dict(wrong, sd)
