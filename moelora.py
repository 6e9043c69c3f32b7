"""
MoELoRA, as CoIN defines it (arXiv 2403.08350, section 4; shared/coin-facts.md section 3).

A LoRA of total rank r whose rank is split into E experts of rank r/E, mixed per token by a dense softmax router:

    g(x) = softmax(W_g x)                                     W_g: (E, d_in), no bias, one router per linear
    y    = W0 x + (alpha / r) * sum_i g_i(x) * B_i A_i dropout_i(x)
                                                              A_i: (r/E, d_in), B_i: (d_out, r/E)

No top-k, no task id, no load-balancing loss. E = 1 is plain LoRA (no router). The experts are stored stacked,
A = [A_1; ...; A_E] (r, d_in) and B = [B_1 ... B_E] (d_out, r), so the sum over experts is two matrix products:

    sum_i g_i B_i A_i x = B ((A x) * repeat_interleave(g, r/E))
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MoELoRALinear(nn.Module):
    def __init__(self, base, r, alpha, num_experts, dropout=0.0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"MoELoRA wraps nn.Linear, got {type(base).__name__}"
        assert r % num_experts == 0, f"rank r={r} must split evenly over num_experts={num_experts}"
        self.base = base  # frozen W0 (and bias), kept inside so state-dict keys read <name>.base.weight
        self.r, self.num_experts, self.expert_rank = r, num_experts, r // num_experts
        self.scaling = alpha / r  # NOTE(fidelity): the *total* rank, as the official code scales
        self.dropout = dropout
        d_in, d_out = base.in_features, base.out_features
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, d_in, device=dev) * 0.01)  # A_i ~ N(0, 0.01^2), stacked by expert
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev))  # B_i = 0: the wrapped layer starts as W0
        self.router = nn.Linear(d_in, num_experts, bias=False, device=dev) if num_experts > 1 else None

    def forward(self, x):  # x: (..., d_in)
        y = self.base(x)  # (..., d_out)
        h = x.to(self.lora_A.dtype)
        E, re = self.num_experts, self.expert_rank
        if self.training and self.dropout > 0:
            # NOTE(fidelity): the official code loops over experts, each calling dropout on x, so every expert sees
            # its own mask. Here the E masks are drawn at once on an (..., E, d_in) copy and each expert's A_i is
            # applied to its own masked copy with one batched product: the same distribution, no Python loop.
            hx = F.dropout(h.unsqueeze(-2).expand(*h.shape[:-1], E, h.shape[-1]), self.dropout)  # (..., E, d_in)
            z = torch.einsum("...ed,erd->...er", hx, self.lora_A.view(E, re, -1)).flatten(-2)  # (..., r)
        else:
            z = h @ self.lora_A.t()  # (..., r): all experts' A_i x, stacked
        if self.router is not None:
            g = F.softmax(self.router(h), dim=-1)  # (..., E): dense gate per token
            z = z * g.repeat_interleave(re, dim=-1)  # (..., r): expert i's rows weighted by g_i
        return y + (z @ self.lora_B.t() * self.scaling).to(y.dtype)  # (..., d_out)

    def export_experts(self):
        """The per-expert view: A (E, r/E, d_in), B (E, d_out, r/E), router (E, d_in) or None, scaling."""
        E, re = self.num_experts, self.expert_rank
        B = self.lora_B.detach().view(-1, E, re).permute(1, 0, 2)  # (E, d_out, r/E)
        return {"A": self.lora_A.detach().view(E, re, -1).clone(), "B": B.clone(),
                "router": None if self.router is None else self.router.weight.detach().clone(),
                "scaling": float(self.scaling)}

    def merge(self):
        """E = 1: return a plain nn.Linear with W0 + (alpha/r) B A folded in (exact). E > 1 has no such weight."""
        if self.num_experts > 1:
            raise ValueError(f"cannot merge a {self.num_experts}-expert MoELoRA: its router weighs the experts "
                             "differently for every token, so there is no single weight delta to fold into W0")
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            merged.weight.copy_(self.base.weight.float() + delta)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def language_model(model):
    """The language model inside a multimodal model (transformers 5 layout: model.model.language_model)."""
    for path in ("model.language_model", "language_model", "model"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if mod is not None:
            return mod
    raise ValueError(f"no language model found in {type(model).__name__}")


def add_moelora(model, targets=None, r=128, alpha=256.0, num_experts=8, dropout=0.05):
    """Wrap the language model's nn.Linear layers (all of them by default, or those whose name ends with one of
    `targets`) in MoELoRALinear. lm_head, the vision tower and the projector are never touched. Returns the
    wrapped modules' full names."""
    lm = language_model(model)
    prefix = {m: n for n, m in model.named_modules()}[lm]
    chosen = [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Linear)
              and (targets is None or any(n.endswith(t) for t in targets)) and not n.endswith("lm_head")]
    assert chosen, f"no nn.Linear in {prefix or type(lm).__name__} matches targets={targets}"
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, MoELoRALinear(mod, r, alpha, num_experts, dropout))
    return [f"{prefix}.{n}" if prefix else n for n, _ in chosen]


def _is_adapter_param(name):
    return name.endswith(("lora_A", "lora_B", "router.weight")) and ".base." not in name


def mark_only_moelora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))


def moelora_state_dict(model):
    return {n: p for n, p in model.named_parameters() if _is_adapter_param(n)}


def load_moelora_state_dict(model, sd):
    """Strict: the keys must be exactly the model's adapter parameters, with the same shapes."""
    own = moelora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter state dict does not match the model: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for k, p in own.items():
        if p.shape != sd[k].shape:
            raise ValueError(f"adapter tensor {k}: checkpoint shape {tuple(sd[k].shape)} != model {tuple(p.shape)} "
                             "(a different rank, expert count or base model?)")
        with torch.no_grad():
            p.copy_(sd[k])
