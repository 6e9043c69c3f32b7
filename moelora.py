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
dropped positions alone (record_drops() draws them); backward rebuilds them from the gaps between them, kept in about
one byte each, so no mask and no masked copy of x is ever stored.

Every record draws its masks from a seed of its own (record_drops), which the training loop gives each forward with
dropout_records(): a record's masks depend on the run's seed, the stage, the optimizer step, the record's place in
that step's global batch and the layer, not on the rank that draws them, the other records of its micro-batch, its
padding, a resumed run's RNG state or gradient checkpointing's recomputation. A training forward with dropout and no
seeds is an error.

Usage:
    names = add_moelora(model)                # every nn.Linear of the language model, lm_head excluded
    mark_only_moelora_trainable(model)        # then switch the projector on if the recipe trains it
    with dropout_records(seeds, lengths):     # training: each record's dropout seed (record_seed) and token count
        model(**batch).loss.backward()
    torch.save(moelora_state_dict(model), path); load_moelora_state_dict(model, torch.load(path))
"""
import contextlib
import hashlib
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

    def __init__(self, base, r, alpha, num_experts, dropout=0.0, key=0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"MoELoRALinear wraps an nn.Linear, got {type(base).__name__}"
        assert r % num_experts == 0, f"rank r={r} must split evenly over num_experts={num_experts}"
        assert 0.0 <= dropout < 1.0, f"dropout={dropout} must be in [0, 1)"
        self.base = base.requires_grad_(False)  # W0 (and bias), frozen; state-dict key <name>.base.weight
        self.r, self.num_experts, self.expert_rank = r, num_experts, r // num_experts
        self.scaling = alpha / r  # NOTE(fidelity): alpha over the *total* rank r, not r/E, as the official code
        self.dropout, self.key = dropout, key  # key: which layer, in its records' dropout seeds (layer_records)
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
            # distribution (iid Bernoulli(1 - p) per expert, token and feature) from another random stream, seeded
            # per record (record_drops), and the 1 / (1 - p) multiplies A_i (m_i * x) instead of x: the same in exact
            # arithmetic
            seeds, lengths = layer_records(self.key)
            z = ExpertDropoutLinear.apply(h, self.lora_A, router, E, self.dropout, seeds, lengths)  # (..., r [+ E])
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
# Dropout per expert without masked copies of x: draw the dropped positions only, correct the dense product. Each
# record's masks from a seed of its own (dropout_records), whatever rank, micro-batch or padding it is drawn in

_records = None  # (seeds, lengths) of the records whose forward and backward run now (dropout_records), or None


@contextlib.contextmanager
def dropout_records(seeds, lengths=None):
    """The records that the forwards and backwards inside run on (backward too: gradient checkpointing runs the
    forward again there): their dropout seeds (B ints, record_seed) and token counts (B ints: a right-padded batch's
    records are its first lengths[b] tokens; None: no padding). A training forward with dropout reads them
    (layer_records); outside, it fails."""
    global _records
    previous, _records = _records, (list(seeds), None if lengths is None else list(lengths))
    try:
        yield
    finally:
        _records = previous


def mix_seed(*parts):
    """A seed in [0, 2^63) from a few values (ints, a name): the first 8 bytes of the BLAKE2b hash of their repr, so
    that the seeds of different parts (records, layers, experts) share no structure."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def record_seed(seed, step, index):
    """The dropout seed of the record at `index` of optimizer step `step`'s global batch, in a stage trained from
    `seed`: the same on any number of ranks and in a resumed run."""
    return mix_seed("dropout", seed, step, index)


def layer_records(key, what="MoELoRALinear"):
    """(the records' seeds for the layer `key`, their token counts or None) of the forward in flight: what
    dropout_records set, each record's seed mixed with the layer's key. Without dropout_records: an error, rather than
    masks from some other random stream, which would differ between ranks and runs."""
    if _records is None:
        raise RuntimeError(f"{what}: a training forward with dropout needs its records' dropout seeds: run it inside "
                           "moelora.dropout_records(seeds, lengths) (coin.py's training step does), or in eval mode, "
                           "or with dropout 0")
    seeds, lengths = _records
    return [mix_seed(seed, key) for seed in seeds], lengths


def record_drops(seeds, lengths, num_experts, N, d_in, p, device="cpu"):
    """Where the E experts' dropout masks are 0 for x (N, d_in) holding B = len(seeds) records of T = N / B tokens each
    (x (B, T, d_in) flattened): sorted int64 flat positions into the (E, N, d_in) stack of the experts' inputs.
    Record b's masks cover its first L_b = lengths[b] tokens (right padding, which no answer token reads, keeps every
    entry) and come from seeds[b] alone: one draw of E chunks of c_b = drop_chunk(L_b d_in, p) uniforms, the e-th
    giving expert e's drops among the record's L_b d_in entries as draw_drops gives them (a chunk short of them,
    about once in 1e15, goes on from a generator seeded by (seeds[b], e)). So a record's masks do not depend on which
    rank draws them, the other records of its micro-batch or their padding.
    The choice (docs/performance.md): a seed per record costs a generator seeding and a chunk margin per record where
    a seed per micro-batch costs one draw, 2-10% of a tiny MoELoRA training step at dropout 0.05 (10% of its
    instructions); in exchange a record's masks are its own whatever the split of the global batch (2 ranks of 4, 1 of
    8 and 1 of 4 x 2 accumulation steps draw the same), where a micro-batch's would change with its records.
    The drops are laid out expert after expert, record after record, as the stack is: the arithmetic runs on all of
    them at once, C (a multiple of 16) a row, so every entry goes through the same vector kernel (one thread: a
    record's drops do not depend on the other rows to the last bit)."""
    B, E = len(seeds), num_experts
    T = N // B
    lengths = [T] * B if lengths is None else lengths
    assert B * T == N and len(lengths) == B and all(0 < L <= T for L in lengths), \
        f"{N} tokens do not hold {B} records of at most {N // max(B, 1)} tokens each: token counts {lengths}"
    chunks = [drop_chunk(L * d_in, p) for L in lengths]
    C = -(-max(chunks) // 16) * 16
    u = torch.ones(E, B, C, dtype=torch.float64, device=device)  # u = 1: an infinite gap, past each row's chunk
    gen = torch.Generator(device=device)
    for b, (seed, chunk) in enumerate(zip(seeds, chunks)):
        u[:, b, :chunk].uniform_(generator=gen.manual_seed(seed))  # (E, c_b): the record's E chunks, in one draw
    drops = u.neg_().add_(1).log_().mul_(1 / math.log1p(-p)).floor_().add_(1).cumsum_(2).sub_(1)  # as draw_drops
    n = torch.tensor(lengths, dtype=torch.float64, device=device) * d_in  # (B,): each expert's entries in a record
    last = drops[:, torch.arange(B, device=device), torch.tensor(chunks, device=device) - 1]  # (E, B)
    if bool((last < n - 1).any()):  # the rest of a short row from a generator of its own: Bernoulli after its last drop
        more = {(e, b): draw_drops(mix_seed(seeds[b], e), int(n[b] - 1 - last[e, b]), p, device) + int(last[e, b]) + 1
                for e, b in (last < n - 1).nonzero().tolist()}
        drops = torch.cat([drops, drops.new_full((E, B, max(map(len, more.values()))), math.inf)], dim=2)
        for (e, b), positions in more.items():
            drops[e, b, C:C + len(positions)] = positions
    inside = drops < n.view(B, 1)  # (E, B, C)
    # expert e's drop at t d_in + j of record b sits at e N d_in + (b T + t) d_in + j of the stack
    drops += (torch.arange(E, device=device).view(E, 1, 1) * (N * d_in) +
              torch.arange(B, device=device).view(B, 1) * (T * d_in))
    return torch.masked_select(drops, inside).long()  # (K,): sorted, as the rows are in the stack's order


def record_dropout(x, p, key, what):
    """nn.Dropout(p) on x (..., d_in) holding the records of dropout_records, each record's mask drawn from its seed
    and the layer `key` as a one-expert MoELoRA's (record_drops): the same on any rank. A dense mask, for the methods'
    adapter layers (methods.py), whose input is a plain LoRA's: kept for backward as a byte per entry, as nn.Dropout's.
    what: the layer's kind, for the error without dropout_records."""
    seeds, lengths = layer_records(key, what)
    kept = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    kept.view(-1)[record_drops(seeds, lengths, 1, x[..., 0].numel(), x.shape[-1], p, x.device)] = False
    return x * kept / (1 - p)


def draw_drops(seed, total, p, device="cpu"):
    """Where a Bernoulli(p) sequence of `total` entries is 1 (an expert's dropout mask is 0): sorted int64 positions
    (K,). The gaps between consecutive drops are iid Geometric(p), P(gap > k) = (1 - p)^k, so drawing the gaps gives
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
    drops = skips.add_(1).cumsum_(0).sub_(1)  # (K',): positions, the last ones past the sequence's end
    return drops[:int(torch.searchsorted(drops, float(total)))].long()  # the drops inside the sequence


def drop_chunk(total, p):
    """How many gaps draw_drops draws at a time: the expected number of drops among `total` entries plus 8 standard
    deviations, so that one chunk covers the whole sequence but about once in 1e15 draws. A size from shapes alone:
    bench/memory.py sizes the draw's buffers with it on fake tensors, which have no values to count drops in."""
    expected = total * p
    return int(expected + 8 * math.sqrt(expected) + 16)


def pack_drops(positions):
    """The sorted drop positions (K,) in about one byte each, all that backward keeps of the masks (a quarter of the
    bytes of int32 positions): the skips (kept entries before each drop: gap - 1) saturated at 255, and the rare larger
    ones (P(skip > 255) = (1 - p)^256, 2e-6 at p = 0.05) in full, with their indices. unpack_drops gives them back."""
    skips = torch.empty_like(positions)  # (K,): the first drop's skip is its position
    skips[:1] = positions[:1]
    torch.sub(positions[1:], positions[:-1], out=skips[1:]).sub_(1)
    if not len(skips) or skips.max() <= 255:  # every skip fits its byte: nothing to keep in full
        return skips.to(torch.uint8), skips.new_empty(0), skips.new_empty(0)
    large = torch.nonzero(skips > 255).squeeze(1)  # (L,)
    return skips.clamp(max=255).to(torch.uint8), large, skips[large]


def unpack_drops(small, large, large_skips):
    """The positions that pack_drops packed: sorted int64 (K,)."""
    skips = small.long()  # (K,)
    skips[large] = large_skips
    return skips.add_(1).cumsum_(0).sub_(1)  # gap = skip + 1; the first drop sits at gap - 1


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

    The masks come from record_drops(seeds, lengths, ...) in forward, x holding len(seeds) records; backward
    rebuilds them from the gaps between the drops, packed in about one byte each (pack_drops: 0.4 bytes per entry of
    x at E = 8, p = 0.05, against x's own 4).
    Nothing else but x, A and W_g is saved, no mask and no masked copy of x. The sparse kernels run in fp32 at least
    (the CPU's have no bf16); outputs and gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, lora_A, router, num_experts, p, seeds, lengths):
        # x (..., d_in), lora_A (r, d_in), router (E, d_in); seeds, lengths: x's records' (record_drops)
        x2d, weight = x.reshape(-1, x.shape[-1]), lora_A if router is None else torch.cat([lora_A, router])
        z = x2d @ weight.t()  # (N, r [+ E]): the dense product, as without dropout
        (N, d_in), (r, E) = x2d.shape, (lora_A.shape[0], num_experts)
        sparse_dtype = torch.promote_types(x.dtype, torch.float32)  # the CPU's sparse kernels have no bf16
        positions = record_drops(seeds, lengths, E, N, d_in, p, x.device)  # (K,): into the (E, N, d_in) stack
        packed = pack_drops(positions)
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
        return grad_x, grad_A.view(r, d_in).to(lora_A.dtype), grad_router, None, None, None, None


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
    return wrap_linears(model, names, lambda linear, key, name: MoELoRALinear(linear, r, alpha, num_experts, dropout,
                                                                             key))


def wrap_linears(model, names, wrap):
    """Replace each nn.Linear `names[k]` of `model` by wrap(linear, k, name), in the linear's mode (a model in eval
    mode stays in it); k, the layer's place in `names`, is its key in the records' dropout seeds (layer_records): the
    same on every rank. Returns names."""
    for key, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, wrap(linear, key, name).train(linear.training))
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
