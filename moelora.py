"""
MoELoRA as CoIN defines it (arXiv 2403.08350; shared/coin-facts.md section 3): a LoRA of total rank r split into
E experts of rank r/E, mixed per token by a dense softmax router that reads the wrapped layer's own input.

    g(x) = softmax(W_g x)                                    W_g: (E, d_in), no bias, one router per linear
    y    = W0 x + (alpha / r) * sum_i g_i(x) * B_i A_i dropout_i(x)
                                                             A_i: (r/E, d_in), B_i: (d_out, r/E)

No top-k, no task id, no load-balancing loss; the scaling uses the *total* rank r; E = 1 is plain LoRA (no router).
The experts are stored stacked, lora_A = [A_1; ...; A_E] (r, d_in) and lora_B = [B_1 ... B_E] (d_out, r), so the
sum over experts is two matrix products, as cheap as one LoRA of rank r (export_experts() gives the per-expert view):

    sum_i g_i B_i A_i x = lora_B ((lora_A x) * repeat_interleave(g, r/E))

Usage:
    names = add_moelora(model)                # every nn.Linear of the language model, lm_head excluded
    mark_only_moelora_trainable(model)        # then switch the projector on if the recipe trains it
    torch.save(moelora_state_dict(model), path); load_moelora_state_dict(model, torch.load(path))
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MoELoRALinear(nn.Module):
    """A frozen nn.Linear (self.base) plus E LoRA experts of rank r/E mixed per token by a softmax router."""

    def __init__(self, base, r, alpha, num_experts, dropout=0.0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"MoELoRALinear wraps an nn.Linear, got {type(base).__name__}"
        assert r % num_experts == 0, f"rank r={r} must split evenly over num_experts={num_experts}"
        assert 0.0 <= dropout < 1.0, f"dropout={dropout} must be in [0, 1)"
        self.base = base.requires_grad_(False)  # W0 (and bias), frozen; state-dict key <name>.base.weight
        self.r, self.num_experts, self.expert_rank = r, num_experts, r // num_experts
        self.scaling = alpha / r  # NOTE(fidelity): alpha over the *total* rank r, not r/E, as the official code
        self.dropout = dropout
        d_in, d_out, device = base.in_features, base.out_features, base.weight.device
        # adapter weights in the default dtype (fp32) even on a bf16 base: inputs are cast in and results back
        # NOTE(fidelity): A_i ~ N(0, 0.01^2) as the official MoELoRA, also for E = 1, whereas the paper's LoRA
        # baseline (stock PEFT) draws A Kaiming-uniform: E = 1 is that LoRA in every respect but this init.
        self.lora_A = nn.Parameter(torch.randn(r, d_in, device=device) * 0.01)  # (r, d_in): A_1..A_E stacked
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device))  # B_i = 0: starts as the base layer
        self.router = nn.Linear(d_in, num_experts, bias=False, device=device) if num_experts > 1 else None

    def forward(self, x):  # x: (..., d_in), any dtype
        y = self.base(x)  # (..., d_out)
        h = x.to(self.lora_A.dtype)
        E, re = self.num_experts, self.expert_rank
        if self.training and self.dropout > 0:
            # NOTE(fidelity): the official code loops over experts and calls dropout once per expert, so each expert
            # sees its own mask. We draw all E masks in one F.dropout call on an (E, ..., d_in) copy of x, i.e. the
            # same independent Bernoulli(1 - p) per expert, token and feature, scaled by 1 / (1 - p) (not the same
            # random stream), and apply expert i's A_i to its own copy with one batched product: no Python loop.
            # This costs E masks of x's size per step, as the official loop does; one shared mask would not.
            hx = F.dropout(h.expand(E, *h.shape), self.dropout)  # (E, ..., d_in)
            z = torch.einsum("e...d,erd->...er", hx, self.lora_A.view(E, re, -1))  # (..., E, r/E)
            logits = None if self.router is None else self.router(h)  # (..., E)
        elif self.router is None:  # p = 0 or eval: no dropout work, one product for all experts' A_i x
            z, logits = (h @ self.lora_A.t()).unflatten(-1, (E, re)), None  # (..., E, r/E)
        else:
            # the router's E rows ride along with A's r rows: one pass over x (a memory-bound read at these shapes)
            # instead of two, forward and backward; the (r + E, d_in) copy is small next to x
            z, logits = (h @ torch.cat([self.lora_A, self.router.weight]).t()).split([self.r, E], dim=-1)
            z = z.unflatten(-1, (E, re))  # (..., E, r/E), and logits (..., E)
        if logits is None:
            z = z * self.scaling
        else:
            g = F.softmax(logits, dim=-1)  # (..., E): dense gates, one per expert and token
            z = z * (g * self.scaling).unsqueeze(-1)  # (..., E, r/E): = * repeat_interleave(g, r/E), no copy
        z = z.flatten(-2)  # (..., r)
        if y.dtype != z.dtype:  # a bf16 base: the adapter computes in fp32, its output is cast back
            return y + (z @ self.lora_B.t()).to(y.dtype)  # (..., d_out)
        # y + z B^T in one addmm: no (..., d_out) temporary for z B^T. Out of place on purpose: an in-place addmm_ on
        # y's 2-D view makes autograd copy the output's gradient in backward (measured: slower in a whole step)
        return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, self.r), self.lora_B.t()).view(y.shape)

    def export_experts(self):
        """The per-expert view as plain tensors, to check the module against the written-out formula:
        A (E, r/E, d_in), B (E, d_out, r/E), router (E, d_in) or None when E = 1, and the float scaling."""
        E, re = self.num_experts, self.expert_rank
        return {"A": self.lora_A.detach().view(E, re, -1).clone(),
                "B": self.lora_B.detach().view(-1, E, re).permute(1, 0, 2).clone(),  # columns of B -> experts
                "router": None if self.router is None else self.router.weight.detach().clone(),
                "scaling": float(self.scaling)}

    def merge(self):
        """E = 1: a plain nn.Linear computing W0 x + (alpha/r) B A x, for adapter-free inference (self is unchanged)."""
        if self.num_experts > 1:
            raise ValueError(f"cannot merge a MoELoRA with {self.num_experts} experts: its router weighs the experts "
                             "differently for every token, so there is no single weight delta to fold into W0; "
                             "keep the adapter unmerged for inference")
        w = self.base.weight
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            merged.weight.copy_(w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float()))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged.requires_grad_(False)


# -----------------------------------------------------------------------------
# Helpers: inject, freeze, save, load

NOT_LANGUAGE_MODEL = ("lm_head", "vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector")


def language_model_linears(model):
    """Names of the language model's nn.Linear layers: those under a module called `language_model` (transformers
    LLaVA: model.language_model.*), or in a model without one every linear outside lm_head, vision and projector."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_lm = [n for n in names if "language_model" in n.split(".")]
    return [n for n in (in_lm or names) if not set(n.split(".")) & set(NOT_LANGUAGE_MODEL)]


def add_moelora(model, targets=None, r=128, alpha=256.0, num_experts=8, dropout=0.05):
    """Wrap the language model's nn.Linear layers in MoELoRALinear, in place: all of them (targets=None) or those
    whose name ends with one of `targets` (e.g. ["q_proj", "v_proj"]). Never lm_head, the vision tower or the
    projector. Defaults are the official E = 8, r = 128, alpha = 256, dropout 0.05. Returns the wrapped names."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    assert not wrapped, f"the model already has MoELoRA layers ({wrapped[0]}, ...): add_moelora runs once"
    names = language_model_linears(model)
    targets = [targets] if isinstance(targets, str) else targets
    if targets is not None:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"add_moelora: no nn.Linear of the language model of {type(model).__name__} matches "
                         f"targets={targets}; pass name suffixes such as ['q_proj', 'v_proj'] or None for all")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                MoELoRALinear(model.get_submodule(name), r, alpha, num_experts, dropout))
    return names


def moelora_parameters(model):
    """(name, parameter) of every adapter weight: lora_A, lora_B and router.weight of each MoELoRALinear."""
    for module_name, m in model.named_modules():
        if isinstance(m, MoELoRALinear):
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    yield f"{module_name}.{name}", p


def mark_only_moelora_trainable(model):
    """Freeze everything but the adapters (whether the projector trains is the training loop's choice)."""
    model.requires_grad_(False)
    for _, p in moelora_parameters(model):
        p.requires_grad_(True)


def moelora_state_dict(model):
    """The adapter weights only, keyed as in model.state_dict() (e.g. '...q_proj.lora_A')."""
    return {name: p.detach() for name, p in moelora_parameters(model)}


def load_moelora_state_dict(model, sd):
    """Strict load: sd must hold exactly the model's adapter weights, with the same shapes."""
    own = dict(moelora_parameters(model))
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"adapter state dict does not match the model's MoELoRA layers: {len(missing)} missing "
                       f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (first 5 of each shown)")
    for name, p in own.items():
        if p.shape != sd[name].shape:
            raise ValueError(f"adapter weight {name}: checkpoint shape {tuple(sd[name].shape)} != model shape "
                             f"{tuple(p.shape)} (a different rank, number of experts or base model?)")
        with torch.no_grad():
            p.copy_(sd[name])
