"""
MoELoRA as CoIN defines it (the paper, arXiv 2403.08350, and its official code, github.com/zackschen/CoIN, whose
MoELoRA layer keeps one (A_i, B_i, dropout) per expert and sums the gated expert outputs in a Python loop): a LoRA of
total rank r split into E experts of rank r/E, mixed per token by a dense softmax router that reads the wrapped
layer's own input.

    g(x) = softmax(W_g x)                                    W_g: (E, d_in), no bias, one router per linear
    y    = W0 x + (alpha / r) * sum_i g_i(x) * B_i A_i dropout_i(x)
                                                             A_i: (r/E, d_in), B_i: (d_out, r/E)

No top-k, no task id, no load-balancing loss; the scaling uses the *total* rank r; E = 1 is plain LoRA (no router).
The experts are stored stacked, lora_A = [A_1; ...; A_E] (r, d_in) and lora_B = [B_1 ... B_E] (d_out, r), so the
sum over experts is two matrix products, as cheap as one LoRA of rank r (export_experts() gives the per-expert view):

    sum_i g_i B_i A_i x = lora_B ((lora_A x) * repeat_interleave(g, r/E))

Dropout (training only) gives every expert its own mask m_i, iid Bernoulli(1 - p) per token and feature, with
dropout_i(x) = m_i * x / (1 - p), as the official loop's one nn.Dropout call per expert. Only about p of the entries
drop, so each expert's product is the shared dense one minus the dropped entries' part:

    A_i dropout_i(x) = (A_i x - A_i ((1 - m_i) * x)) / (1 - p)

ExpertDropoutLinear computes the dense A x as above and subtracts the sparse A_i ((1 - m_i) * x), found from the
dropped positions alone (draw_drops() draws them); backward rebuilds them from the gaps between them, kept in about
one byte each, so no mask and no masked copy of x is ever stored.

Usage:
    names = add_moelora(model)                # every nn.Linear of the language model, lm_head excluded
    mark_only_moelora_trainable(model)        # then switch the projector on if the recipe trains it
    torch.save(moelora_state_dict(model), path); load_moelora_state_dict(model, torch.load(path))
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterLayer(nn.Module):
    """What every adapter layer is (MoELoRALinear, and a method's own, e.g. methods.OLoRALinear): a module holding a
    frozen nn.Linear as self.base, whose other parameters are the adapter's: what a checkpoint saves
    (adapter_parameters), trains and loads back."""


class MoELoRALinear(AdapterLayer):
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
        E, rank = self.num_experts, self.expert_rank
        router = None if self.router is None else self.router.weight
        scaling = self.scaling
        if self.training and self.dropout > 0:
            # each expert's A_i reads its own dropout of x, the router reads x itself (as the official code's router).
            # NOTE(fidelity): the official loop calls nn.Dropout once per expert; the masks here have the same
            # distribution (iid Bernoulli(1 - p) per expert, token and feature) from another random stream, and the
            # 1 / (1 - p) multiplies A_i (m_i * x) instead of x: the same in exact arithmetic
            z = ExpertDropoutLinear.apply(h, self.lora_A, router, E, self.dropout, dropout_seed())  # (..., r [+ E])
            scaling = self.scaling / (1 - self.dropout)
        elif router is None:  # p = 0 or eval: one product for all experts' A_i x
            z = h @ self.lora_A.t()  # (..., r)
        else:
            # the router's E rows ride along with A's r rows: one pass over x (a memory-bound read at these shapes)
            # instead of two, forward and backward; the (r + E, d_in) copy is small next to x
            z = h @ torch.cat([self.lora_A, router]).t()  # (..., r + E)
        if router is None:
            z = z.unflatten(-1, (E, rank)) * scaling  # (..., E, r/E)
        else:
            z, logits = z.split([self.r, E], dim=-1)  # (..., r), (..., E)
            g = F.softmax(logits, dim=-1)  # (..., E): dense gates, one per expert and token
            z = z.unflatten(-1, (E, rank)) * (g * scaling).unsqueeze(-1)  # (..., E, r/E): = * repeat_interleave(g)
        z = z.flatten(-2)  # (..., r)
        if y.dtype != z.dtype:  # a bf16 base: the adapter computes in fp32, its output is cast back
            return y + (z @ self.lora_B.t()).to(y.dtype)  # (..., d_out)
        # y + z B^T in one addmm: no (..., d_out) temporary for z B^T. Out of place on purpose: an in-place addmm_ on
        # y's 2-D view makes autograd copy the output's gradient in backward (measured: slower in a whole step)
        return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, self.r), self.lora_B.t()).view(y.shape)

    def export_experts(self):
        """The per-expert view as plain tensors, to check the module against the written-out formula:
        A (E, r/E, d_in), B (E, d_out, r/E), router (E, d_in) or None when E = 1, and the float scaling."""
        E, rank = self.num_experts, self.expert_rank
        return {"A": self.lora_A.detach().view(E, rank, -1).clone(),
                "B": self.lora_B.detach().view(-1, E, rank).permute(1, 0, 2).clone(),  # columns of B -> experts
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
# Dropout per expert without masked copies of x: draw the dropped positions only, correct the dense product

def dropout_seed():
    """The seed of one forward's dropout masks, drawn from torch's default CPU generator: the run's seed, a resumed
    run's restored RNG state and gradient checkpointing's replayed RNG state all give the same masks again."""
    return int(torch.randint(2 ** 62, ()))


def draw_drops(seed, total, p, device="cpu"):
    """Where a Bernoulli(p) sequence of `total` entries is 1 (an expert's dropout mask is 0): sorted int64 positions
    (K,), and the same drops packed in about one byte each for backward (unpack_drops gives the positions back).
    The gaps between consecutive drops are iid Geometric(p), P(gap > k) = (1 - p)^k, so drawing the gaps gives
    exactly that sequence from about p * total random numbers instead of total. A gap is drawn by inverting that
    tail, 1 + floor(log(1 - u) / log(1 - p)) for u uniform in [0, 1), in float64, whose integers are exact up to 2^53;
    skip = gap - 1 is the number of kept entries before the drop. The arithmetic runs in place: a fresh tensor of
    this size costs about as much in page faults as the arithmetic itself."""
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = drop_chunk(total, p)
    skips, end = [], 0  # end: one past the last drop so far
    while end < total:  # continue the sequence until it has passed the last entry
        u = torch.rand(chunk, dtype=torch.float64, device=device, generator=gen)  # [0, 1)
        skips.append(u.neg_().add_(1).log_().mul_(1 / math.log1p(-p)).floor_())  # (chunk,): 0, 1, 2, ... (1 - u first)
        end += int(skips[-1].sum()) + chunk  # the sum of the gaps
    skips = torch.cat(skips) if len(skips) > 1 else skips[0]
    small, large, large_skips = pack_skips(skips)
    drops = skips.add_(1).cumsum_(0).sub_(1)  # (K',): positions, the last ones past the sequence's end
    K = int(torch.searchsorted(drops, float(total)))  # the drops inside the sequence
    inside = large < K
    return drops[:K].long(), (small[:K], large[inside], large_skips[inside])


def drop_chunk(total, p):
    """How many gaps draw_drops draws at a time: the expected number of drops among `total` entries plus 8 standard
    deviations, so that one chunk covers the whole sequence but about once in 1e15 draws. A size from shapes alone:
    bench/memory.py sizes the draw's buffers with it on fake tensors, which have no values to count drops in."""
    expected = total * p
    return int(expected + 8 * math.sqrt(expected) + 16)


def pack_skips(skips):
    """The skips in one byte each, saturated at 255, and the rare larger ones (P(skip > 255) = (1 - p)^256, 2e-6 at
    p = 0.05) in full, with their indices: a quarter of the bytes of int32 positions, all that backward keeps of the
    masks."""
    if skips.max() <= 255:  # every skip fits its byte: nothing to keep in full
        return skips.to(torch.uint8), skips.new_empty(0, dtype=torch.long), skips.new_empty(0)
    large = torch.nonzero(skips > 255).squeeze(1)  # (L,)
    return skips.clamp(max=255).to(torch.uint8), large, skips[large]


def unpack_drops(small, large, large_skips):
    """The positions that draw_drops returned with these packed skips: sorted int64 (K,)."""
    skips = small.long()  # (K,)
    skips[large] = large_skips.long()
    return skips.add_(1).cumsum_(0).sub_(1)  # gap = skip + 1; the first drop sits at gap - 1


def dropped_positions(seed, num_experts, numel, p, device="cpu"):
    """Where the experts' dropout masks are 0: sorted int64 flat positions into the (E, N, d_in) stack of the E
    experts' inputs (numel = N * d_in entries each), every entry dropped independently with probability p, drawn
    as one Bernoulli(p) sequence over the E * numel entries (draw_drops)."""
    return draw_drops(seed, num_experts * numel, p, device)[0]


def expert_dropout_layout(positions, num_experts, N, d_in):
    """Where the entries that the experts' masks drop sit in the sparse CSR matrix D of shape (E N, E d_in), in
    block-diagonal layout: row e N + t, column e d_in + j holds x[t, j] if expert e drops it. Then D @ [A_1^T; ...;
    A_E^T] (E d_in, r/E) stacks every expert's A_e ((1 - m_e) * x) in one sparse product. positions: the drops'
    sorted flat positions into the (E, N, d_in) stack (K,), overwritten with the flat positions into x of D's
    entries. Returns D's row pointers (E N + 1,) and columns (K,), those positions into x (K,), and where each
    expert's entries start and end (E + 1 ints)."""
    n, rows, device = N * d_in, num_experts * N, positions.device
    power_of_two = d_in & (d_in - 1) == 0  # then bit operations divide, far cheaper than integer division
    if len(positions) >= 16 * rows:  # many drops per row: a binary search per row start
        crow = torch.searchsorted(positions, torch.arange(rows + 1, device=device) * d_in)  # (E N + 1,)
        col = positions & (d_in - 1) if power_of_two else positions % d_in  # (K,): j, as n is a multiple of d_in
    else:  # a few drops per row: counting them is cheaper than a search per row
        row = positions >> (d_in.bit_length() - 1) if power_of_two else positions // d_in  # (K,): e N + t
        crow = torch.zeros(rows + 1, dtype=torch.long, device=device)  # (E N + 1,)
        torch.cumsum(torch.bincount(row, minlength=rows), 0, out=crow[1:])
        col = torch.sub(positions, row, alpha=d_in)  # (K,): j
    bounds = crow[::N].tolist()  # (E + 1,): expert e's entries are [bounds[e], bounds[e + 1])
    in_x = positions
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        in_x[start:end] -= e * n  # e N d_in + t d_in + j -> t d_in + j
        col[start:end] += e * d_in  # j -> e d_in + j
    return crow, col, in_x, bounds


def sparse_csr(crow, col, values, shape):
    """torch's CSR tensor from a layout that expert_dropout_layout builds right: no invariant checks, no warning."""
    with warnings.catch_warnings():  # torch calls its CSR layout beta; tests/test_moelora.py checks it against a loop
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def expert_blocks(lora_A, num_experts):
    """[A_1^T; ...; A_E^T] (E d_in, r/E): the right factor of the products with D (expert_dropout_layout)."""
    r, d_in = lora_A.shape
    return lora_A.view(num_experts, r // num_experts, d_in).transpose(1, 2).reshape(num_experts * d_in, -1)


class ExpertDropoutLinear(torch.autograd.Function):
    """x -> [A_1 (m_1 * x), ..., A_E (m_E * x), W_g x]: every expert's product with its own dropout mask m_i (1 =
    kept; the 1 / (1 - p) is left to the caller) and the router's logits (when W_g is given) on x itself.

    Only about p of each mask is 0, so each expert's product is the dense one minus the dropped entries' part, and
    so are the gradients (dz_i: the output gradient of expert i's r/E columns):

        forward   z_i     = A_i x - A_i ((1 - m_i) * x)                 a sparse product over the dropped entries
        backward  dL/dx   = [dz, dg] [A; W_g] - sum_i (1 - m_i) * (dz_i A_i)   dz_i A_i sampled where m_i = 0
                  dL/dA_i = dz_i^T (m_i * x)                            x with expert i's dropped entries zeroed

    The masks come from draw_drops(seed, ...) in forward; backward rebuilds them from the gaps between the drops,
    packed in about one byte each (pack_skips: 0.4 bytes per entry of x at E = 8, p = 0.05, against x's own 4).
    Nothing else but x, A and W_g is saved, no mask and no masked copy of x. The sparse kernels run in fp32 at least
    (the CPU's have no bf16); outputs and gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, lora_A, router, num_experts, p, seed):  # x (..., d_in), lora_A (r, d_in), router (E, d_in)
        x2d, weight = x.reshape(-1, x.shape[-1]), lora_A if router is None else torch.cat([lora_A, router])
        z = x2d @ weight.t()  # (N, r [+ E]): the dense product, as without dropout
        (N, d_in), (r, E) = x2d.shape, (lora_A.shape[0], num_experts)
        sparse_dtype = torch.promote_types(x.dtype, torch.float32)  # the CPU's sparse kernels have no bf16
        positions, packed = draw_drops(seed, E * x2d.numel(), p, x.device)  # (K,): into the (E, N, d_in) stack
        crow, col, in_x, _ = expert_dropout_layout(positions, E, N, d_in)
        dropped_x = x2d.reshape(-1).index_select(0, in_x).to(sparse_dtype)  # (K,)
        dropped = sparse_csr(crow, col, dropped_x, (E * N, E * d_in))  # D: the dropped entries of x
        dropped_part = dropped @ expert_blocks(lora_A.to(sparse_dtype), E)  # (E N, r/E): rows (e, t)
        z[:, :r] -= dropped_part.view(E, N, r // E).transpose(0, 1).reshape(N, r).to(z.dtype)
        ctx.save_for_backward(x, lora_A, router, *packed)
        ctx.num_experts = num_experts
        return z.view(*x.shape[:-1], -1)  # (..., r [+ E])

    @staticmethod
    def backward(ctx, grad_z):  # grad_z (..., r [+ E])
        x, lora_A, router, *packed = ctx.saved_tensors
        x2d, grad_z = x.reshape(-1, x.shape[-1]), grad_z.reshape(-1, grad_z.shape[-1])  # (N, d_in), (N, r [+ E])
        (N, d_in), (r, E) = x2d.shape, (lora_A.shape[0], ctx.num_experts)
        weight = lora_A if router is None else torch.cat([lora_A, router])
        grad_x = grad_z @ weight if ctx.needs_input_grad[0] else None  # (N, d_in): the dense part, as without dropout
        grad_router = None if router is None else grad_z[:, r:].t() @ x2d  # (E, d_in)
        sparse_dtype = torch.promote_types(x.dtype, torch.float32)  # the CPU's sparse kernels have no bf16
        crow, col, in_x, bounds = expert_dropout_layout(unpack_drops(*packed), E, N, d_in)
        grad_experts = grad_z[:, :r].to(sparse_dtype).view(N, E, r // E).transpose(0, 1).reshape(E * N, r // E)
        if grad_x is not None:  # dz_e A_e at the dropped entries only (beta=0 and zeros: D's places, not its values)
            dropped = sparse_csr(crow, col, grad_experts.new_zeros(len(col)), (E * N, E * d_in))  # D's places only
            A_blocks = expert_blocks(lora_A.to(sparse_dtype), E)  # (E d_in, r/E)
            at_dropped = torch.sparse.sampled_addmm(dropped, grad_experts, A_blocks.t(), beta=0.0).values()  # (K,)
            grad_x.view(-1).index_add_(0, in_x, at_dropped.to(grad_x.dtype), alpha=-1)
        grad_A = torch.empty(E, r // E, d_in, dtype=sparse_dtype, device=x.device)
        kept_x = torch.empty_like(x2d, dtype=sparse_dtype)  # (N, d_in): m_e * x for one expert at a time
        for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
            kept_x.copy_(x2d).view(-1).index_fill_(0, in_x[start:end], 0.0)
            grad_A[e] = grad_experts[e * N:(e + 1) * N].t() @ kept_x  # (r/E, d_in)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, grad_A.view(r, d_in).to(lora_A.dtype), grad_router, None, None, None


# -----------------------------------------------------------------------------
# Helpers: inject, freeze, save, load

NOT_LANGUAGE_MODEL = ("lm_head", "vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector")


def language_model_linears(model):
    """Names of the language model's nn.Linear layers: those under a module called `language_model` (transformers
    LLaVA: model.language_model.*), or in a model without one every linear outside lm_head, vision and projector."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_lm = [n for n in names if "language_model" in n.split(".")]
    return [n for n in (in_lm or names) if not set(n.split(".")) & set(NOT_LANGUAGE_MODEL)]


def target_linears(model, targets=None):
    """Names of the language model's nn.Linear layers to adapt: all of them (targets=None) or those whose name ends with
    one of `targets` (e.g. ["q_proj", "v_proj"]). Never lm_head, the vision tower or the projector."""
    names = language_model_linears(model)
    targets = [targets] if isinstance(targets, str) else targets
    if targets is not None:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear of the language model of {type(model).__name__} matches targets={targets}; "
                         "pass name suffixes such as ['q_proj', 'v_proj'] or None for all")
    return names


def add_moelora(model, targets=None, r=128, alpha=256.0, num_experts=8, dropout=0.05):
    """Wrap the language model's nn.Linear layers in MoELoRALinear, in place: all of them (targets=None) or those
    whose name ends with one of `targets` (target_linears). Defaults are the official E = 8, r = 128, alpha = 256,
    dropout 0.05. Returns the wrapped names."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    assert not wrapped, f"the model already has MoELoRA layers ({wrapped[0]}, ...): add_moelora runs once"
    names = target_linears(model, targets)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                MoELoRALinear(model.get_submodule(name), r, alpha, num_experts, dropout))
    return names


def adapter_parameters(model):
    """(name, parameter) of every adapter weight of the model, keyed as in model.state_dict(): the parameters of each
    AdapterLayer but its frozen base's (frozen adapter weights too, e.g. O-LoRA's earlier tasks')."""
    for module_name, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    yield f"{module_name}.{name}", p


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
    load_weights(dict(moelora_parameters(model)), sd, "the model's MoELoRA layers")


def load_weights(own, sd, what):
    """Copy sd into own ({name: parameter}, e.g. the adapter's), strictly: the same names, the same shapes.
    what: whose weights own are, for the error."""
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"adapter state dict does not match {what}: {len(missing)} missing "
                       f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (first 5 of each shown)")
    for name, p in own.items():
        if p.shape != sd[name].shape:
            raise ValueError(f"adapter weight {name}: checkpoint shape {tuple(sd[name].shape)} != model shape "
                             f"{tuple(p.shape)} (a different rank, number of experts or base model?)")
        with torch.no_grad():
            p.copy_(sd[name])
