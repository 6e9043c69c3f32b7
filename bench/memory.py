"""
How much GPU memory coin needs at LLaVA-1.5-7B's exact shapes, measured on a CPU: coin's training step and batched
generation run on fake tensors (torch's FakeTensorMode: every tensor has its shape, dtype and size in bytes, none
has memory or values), under PyTorch's memory trackers, which file every tensor alive at the peak as weights,
gradients, optimizer state, activations or temporaries.

    python bench/memory.py                      # the table of docs/real-scale.md, ~12 min on one core
    python bench/memory.py --only=train --ranks=8 --micro_batches=4 --grid=lists    # one configuration
    python bench/memory.py --against=out/bench-7b/results.jsonl --out=FAKE.jsonl   # GPU peaks beside fake ones

The step is coin's: the bf16 base built by transformers (LlavaConfig, CLIP ViT-L/14-336, Llama 7B), coin's MoELoRA
on every language-model linear (moelora.add_moelora, fp32), the projector trainable in fp32 (coin.train_in_fp32),
gradient checkpointing as coin.load_base turns it on, --shard as coin.shard_model (FSDP2) over a fake process group
of --ranks ranks (the memory of one rank), the loss coin.answer_ce over the global batch's answer tokens, backward,
clip_grad_norm_, AdamW. With gradient accumulation (--accum=2) the peak is in a step's last micro-batch, which holds
the earlier ones' gradients: one micro-batch runs after gradients and AdamW's state exist (two when sharded, where
FSDP keeps unsharded gradients between them). AdamW and the clipping run with foreach kernels, as on a GPU (on a CPU
torch defaults to a loop over tensors, with smaller temporaries). Evaluation (coin's greedy generate(), the KV cache
on) is the larger of two measured peaks: the prefill, the forward over a batch of --prompt tokens that fills the
cache, and the last step of decoding --new_tokens, the cache at prompt + new tokens (built by a forward outside the
tracker, then one step runs under it: generate() itself reads values, and 1024 steps would take an hour).

What it does not count: the CUDA context (~0.5-1.5 GB a GPU, by driver and card), the caching allocator's rounding
and fragmentation (what nvidia-smi shows beyond torch.cuda.max_memory_allocated), NCCL's buffers. The tensors are
fake CPU tensors (torch without CUDA cannot fake the CUDA device: backward aborts), so the kernels are the CPU's:
attention is the CPU's fused SDPA (no T x T matrix, like flash attention on a GPU). Two stand-ins, both checked
against real tensors in tests/test_memory.py:
- LLaVA checks that the image tokens match the image features by counting them, a value fake tensors do not have;
  transformers' switch TRANSFORMERS_DISABLE_TORCH_CHECK=1 skips that check (the inputs here are built to match).
- moelora's dropout builds sparse CSR matrices, which FakeTensorMode cannot (torch 2.13), from drops whose count is a
  random value: SizedExpertDropout allocates what ExpertDropoutLinear allocates, the same sizes in the same order,
  with the count at its expectation p E N d_in (the real count differs by about its square root: ~0.05% of the
  dropout's buffers at 7B, a few kB).

--tensors=real runs the same code on real CPU tensors (toy shapes): tests/test_memory.py checks that both agree.
"""
import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.fsdp import FSDPModule
from torch.testing._internal.distributed.fake_pg import FakeStore  # importing it registers the "fake" backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import coin  # noqa: E402
import moelora  # noqa: E402
from base_model import projector  # noqa: E402
from llava7b import EXPERTS, SHAPES, batch, llava_config  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

GIB = 2 ** 30
# the table of docs/real-scale.md: (adapter, dropout, gradient checkpointing, ranks, micro-batches)
TABLE = [("moelora", 0.05, True, 1, "1,4,8,16"), ("moelora", 0.0, True, 1, "1,4,8,16"),
         ("lora", 0.05, True, 1, "1,4,8,16"), ("moelora", 0.05, False, 1, "1,4,8"),
         ("moelora", 0.05, True, 8, "1,4,8,16"), ("moelora", 0.05, True, 16, "4,8,16")]
# the trackers' categories -> the printed columns
COLUMNS = {"weights": ("Parameter", "Buffer", "Sharded Param", "Unsharded Param"),
           "gradients": ("Gradient", "Sharded Grad", "Unsharded Grad"), "optimizer": ("Optstate", "OptState"),
           "activations": ("Activation",), "temporaries": ("Temp",),
           "other": ("Other", "Inputs", "All Gather", "Reduce Scatter")}


# -----------------------------------------------------------------------------
# The trackers

class BenchTracking:
    """What both trackers do differently here. The whole peak only: MemTracker also updates every module's own peak
    after every operation, a loop over the model's thousand modules that makes a 7B step ten times slower. Sparse
    tensors: see _track."""

    def _update_peak_stats(self, peak_state):
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device], self._peak_mem_snap[device] = snap["Total"], dict(snap)

    def _track(self, reftype, t):
        """A sparse CSR tensor (moelora's dropout, on real tensors) has no storage of its own: its index and value
        tensors' are tracked instead."""
        parts = (t.crow_indices(), t.col_indices(), t.values()) if t.layout == torch.sparse_csr else (t,)
        for part in parts:
            super()._track(reftype, part)


class Tracker(BenchTracking, MemTracker):
    """MemTracker for a model with a frozen base. MemTracker hooks every weight to file its gradient as one, and torch
    refuses a hook on a weight that takes no gradient: here only the trainable weights are hooked."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for p in module.parameters() if install_grad_hooks else []:
            if p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (p.register_hook(self._file_gradient),
                                                       p.register_post_accumulate_grad_hook(
                                                           lambda p: self._file_gradient(p.grad)))
        return memory

    def _file_gradient(self, grad):
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


class ShardedTracker(BenchTracking, FSDPMemTracker):
    """FSDPMemTracker (per rank: shards, gathered weights, all-gather and reduce-scatter buffers), the whole peak."""


# -----------------------------------------------------------------------------
# moelora's dropout on fake tensors

class SizedExpertDropout(torch.autograd.Function):
    """moelora.ExpertDropoutLinear's memory without its values: the same dense products, and empty tensors of the
    sizes and dtypes that its draw, sparse layout and sparse products allocate, in the same order and alive as long.
    Sizes from shapes: the records' chunks (moelora.drop_chunk) and K = p E sum_b L_b d_in drops, the expected
    count."""

    @staticmethod
    def forward(ctx, x, lora_A, router, num_experts, p, seeds, lengths):
        x2d, weight = x.reshape(-1, x.shape[-1]), lora_A if router is None else torch.cat([lora_A, router])
        z = x2d @ weight.t()  # (N, r [+ E])
        (N, d_in), (r, E) = x2d.shape, (lora_A.shape[0], num_experts)
        sparse_dtype = torch.promote_types(x.dtype, torch.float32)
        B = len(seeds)  # moelora.record_drops: the records' uniforms side by side, then in place their drops
        lengths = [N // B] * B if lengths is None else lengths
        C = -(-max(moelora.drop_chunk(L * d_in, p) for L in lengths) // 16) * 16
        grid = x.new_empty((E, B, C), dtype=torch.float64)
        inside = x.new_empty((E, B, C), dtype=torch.bool)
        K = sum(round(p * E * L * d_in) for L in lengths)
        dropped = x.new_empty(K, dtype=torch.float64)  # masked_select
        positions = x.new_empty(K, dtype=torch.long)  # .long()
        del dropped, grid, inside
        skips = x.new_empty(K, dtype=torch.long)  # pack_drops
        small = x.new_empty(K, dtype=torch.uint8)  # a byte a drop, kept for backward
        del skips
        crow, col = layout(positions, E * N, d_in)
        dropped_x = x.new_empty(K).to(sparse_dtype)  # index_select
        blocks = moelora.expert_blocks(lora_A.to(sparse_dtype), E)  # (E d_in, r/E)
        dropped_part = x.new_empty(E * N, r // E, dtype=sparse_dtype)  # D @ blocks
        z[:, :r] -= dropped_part.view(E, N, r // E).transpose(0, 1).reshape(N, r).to(z.dtype)
        # like ExpertDropoutLinear's locals, positions ... dropped_part live until forward returns
        ctx.save_for_backward(x, lora_A, router, small)
        ctx.num_experts, ctx.K = num_experts, K
        return z.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_z):
        x, lora_A, router, small = ctx.saved_tensors
        x2d, grad_z = x.reshape(-1, x.shape[-1]), grad_z.reshape(-1, grad_z.shape[-1])
        (N, d_in), (r, E), K = x2d.shape, (lora_A.shape[0], ctx.num_experts), ctx.K
        weight = lora_A if router is None else torch.cat([lora_A, router])
        grad_x = grad_z @ weight if ctx.needs_input_grad[0] else None  # (N, d_in)
        grad_router = None if router is None else grad_z[:, r:].t() @ x2d  # (E, d_in)
        sparse_dtype = torch.promote_types(x.dtype, torch.float32)
        positions = small[:K].long()  # unpack_drops
        crow, col = layout(positions, E * N, d_in)
        grad_experts = grad_z[:, :r].to(sparse_dtype).view(N, E, r // E).transpose(0, 1).reshape(E * N, r // E)
        if grad_x is not None:  # sampled_addmm: D's places (zeros), its result (values, indices), dz_e A_e there
            places = grad_experts.new_zeros(K)
            blocks = moelora.expert_blocks(lora_A.to(sparse_dtype), E)
            result = (crow.clone(), col.clone(), places.new_empty(K))  # noqa: F841 (alive until backward returns)
        grad_A = torch.empty(E, r // E, d_in, dtype=sparse_dtype, device=x.device)
        kept_x = torch.empty_like(x2d, dtype=sparse_dtype)  # noqa: F841 (m_e * x for one expert at a time)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, grad_A.view(r, d_in).to(lora_A.dtype), grad_router, None, None, None, None


def layout(positions, rows, d_in):
    """What moelora.expert_dropout_layout allocates for K = len(positions) drops: CSR row pointers (rows + 1) and
    columns (K), and its branch's passing buffers (a search per row, or a count of the drops per row)."""
    K, long = len(positions), dict(dtype=torch.long, device=positions.device)
    if K >= 16 * rows:
        starts = torch.empty(rows + 1, **long)  # arange * d_in
        crow = torch.empty(rows + 1, **long)  # searchsorted
        del starts
        return crow, torch.empty(K, **long)
    row = torch.empty(K, **long)  # positions // d_in
    crow = torch.empty(rows + 1, **long)
    counts = torch.empty(rows, **long)  # bincount
    del counts
    return crow, torch.empty(K, **long)  # col, while row is alive


@contextlib.contextmanager
def sized_dropout(on):
    """With `on`, MoELoRALinear's dropout runs as SizedExpertDropout. Set at the call site for this bench only: the
    real path is left as it is."""
    real = moelora.ExpertDropoutLinear
    if on:
        moelora.ExpertDropoutLinear = SizedExpertDropout
    try:
        yield
    finally:
        moelora.ExpertDropoutLinear = real


# -----------------------------------------------------------------------------
# The model, the step, the evaluation

def build(shapes, adapter, dropout, grad_ckpt, ranks):
    """coin's model on the meta device (no memory yet): the bf16 base, MoELoRA on every language-model linear (fp32),
    the projector trainable in fp32, gradient checkpointing, and sharded over `ranks` (FSDP2) when more than one."""
    s = SHAPES[shapes]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(llava_config(shapes), dtype=torch.bfloat16,
                                                           attn_implementation="sdpa")
    model.requires_grad_(False)
    moelora.add_moelora(model, None, s["r"], s["alpha"], EXPERTS[adapter], dropout)
    moelora.mark_only_moelora_trainable(model)
    projector(model).requires_grad_(True)
    coin.train_in_fp32(projector(model))
    if grad_ckpt:  # as coin.load_base
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if ranks > 1:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
        coin.shard_model(model)
    return model


def materialize(model, tensors):
    """The meta model's tensors made (fake or real, uninitialised), inside the tensor mode; real ones initialised:
    the vision tower's position ids are a buffer. Outside the mode, to_empty would fail on a weight that FakeTensorMode
    holds a weak reference to."""
    model.to_empty(device="cpu")
    if tensors == "real":
        with torch.no_grad():
            model.initialize_weights()


def tensor_mode(tensors):
    """A FakeTensorMode (the meta model's tensors become fake ones in it), or nothing for real tensors."""
    return FakeTensorMode(allow_non_fake_inputs=True) if tensors == "fake" else contextlib.nullcontext()


def as_mode(inputs, mode):
    """The batch's real tensors as tensors of `mode`: fake ones in a FakeTensorMode."""
    return {k: mode.from_tensor(v) for k, v in inputs.items()} if isinstance(mode, FakeTensorMode) else inputs


def columns(snapshot):
    """{column: bytes} of a tracker's peak snapshot, and the total."""
    snap = {getattr(k, "value", k): v for device_snap in snapshot.values() for k, v in device_snap.items()}
    out = {col: sum(snap.get(k, 0) for k in keys) for col, keys in COLUMNS.items()}
    out["total"] = snap.get("Total", 0)
    return out


def train_peak(model, shapes, micro_batch, accum, seq, answer, mode):
    """The peak memory of one rank in coin's optimizer step at this micro-batch: {column: bytes}."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = isinstance(model, FSDPModule)
    opt = torch.optim.AdamW(params, lr=2e-4, foreach=True)  # coin's two groups hold the same state
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's state exists from a run's second step on: a step on zero gradients makes it
    if sharded or accum == 1:
        opt.zero_grad(set_to_none=True)
    # unsharded, the later micro-batches hold the zero gradients as the earlier ones' gradients; sharded, FSDP holds
    # them unsharded until the last micro-batch reduce-scatters them: run them all
    runs = accum if sharded else 1
    b = as_mode(batch(shapes, micro_batch, "cpu", seq=seq, answer=answer), mode)
    n_tokens = accum * micro_batch * answer  # the global batch's answer tokens (one rank's share)
    if sharded:
        tracker = ShardedTracker(model, opt)
        tracker.track_inputs(tuple(b.values()))
    else:
        tracker = Tracker()
        tracker.track_external(model, opt, *b.values())
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The module hierarchy tracking")  # checkpointing's recompute, harmless
        for i in range(runs):
            if sharded:
                model.set_requires_gradient_sync(i == runs - 1)
            with moelora.dropout_records(range(micro_batch)):  # each record's dropout seed, as coin.py's step
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               pixel_values=b["pixel_values"]).logits  # (B, T, vocab)
                (coin.answer_ce(logits, b["labels"]) / n_tokens).backward()
            del logits
            tracker.reset_mod_stats()  # the tracker refuses a second forward of the model otherwise
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return columns(tracker.get_tracker_snapshot("peak"))


def cache_tensors(cache):
    """The key and value tensors of a transformers DynamicCache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def eval_peak(model, shapes, rows, prompt, new_tokens, mode):
    """The peak of batched greedy generation: {column: bytes} of the larger of the prefill's peak and the last
    decoding step's, plus "prefill", "last_step" and "kv_cache" (bytes)."""
    b = as_mode(batch(shapes, rows, "cpu", seq=prompt, seed=1), mode)
    b.pop("labels")
    tracker = Tracker()
    tracker.track_external(model, *b.values())
    with torch.no_grad(), tracker:  # generate()'s first forward (generate itself reads values: when to stop)
        model(**b, use_cache=True, logits_to_keep=1)
    prefill = columns(tracker.get_tracker_snapshot("peak"))
    long = as_mode(batch(shapes, rows, "cpu", seq=prompt + new_tokens - 1, seed=1), mode)
    long.pop("labels")
    with torch.no_grad():
        cache = model(**long, use_cache=True, logits_to_keep=1).cache  # prompt + new - 1 tokens
    step = {"input_ids": long["input_ids"][:, -1:], "attention_mask": torch.ones_like(long["input_ids"][:, :1])}
    step["attention_mask"] = torch.cat([long["attention_mask"], step["attention_mask"]], dim=1)
    tracker = Tracker()
    tracker.track_external(model, *cache_tensors(cache), *step.values())
    kv_cache = sum(t.untyped_storage().nbytes() for t in cache_tensors(cache))
    with torch.no_grad(), tracker:
        model(**step, cache=cache, use_cache=True, logits_to_keep=1)
    last = columns(tracker.get_tracker_snapshot("peak"))
    peak = max(prefill, last, key=lambda c: c["total"])
    return {**peak, "prefill": prefill["total"], "last_step": last["total"], "kv_cache": kv_cache}


# -----------------------------------------------------------------------------
# The grid, the printing

def training_grid(opts):
    """[(adapter, dropout, grad_ckpt, ranks, micro-batches)]: the table's rows, or every combination of the lists."""
    if opts.grid == "table":
        return [(a, d, g, r, [int(m) for m in mbs.split(",")]) for a, d, g, r, mbs in TABLE]
    return [(a, float(d), g == "1", int(r), [int(m) for m in opts.micro_batches.split(",")])
            for a in opts.adapters.split(",") for d in opts.dropout.split(",") for g in opts.grad_ckpt.split(",")
            for r in opts.ranks.split(",")]


def fmt(row):
    """One printed line: the configuration's batch, GiB by column, the peak."""
    label = (f"mb {row['micro_batch']:2d}" if "micro_batch" in row
             else f"eval batch {row['eval_batch']:2d}, {row['new_tokens']:4d} new tokens")
    parts = [f"{k} {row[k] / GIB:6.2f}" for k in (*COLUMNS, "kv_cache") if k in row]
    return " | ".join([label, *parts]) + f" | peak {row['total'] / GIB:6.2f} GiB"


def compare(real_file, fake_file):
    """bench/llava7b.py's GPU peaks beside this bench's figures for the same configuration (from --out)."""
    def key(r):
        """A configuration, from either file (llava7b.py: one micro-batch a step, its shapes' sequence length)."""
        if "micro_batch" in r and "ranks" in r:
            return ("train", r["adapter"], float(r["dropout"]), bool(r["grad_ckpt"]), r["ranks"], r["micro_batch"],
                    r["seq"], r["accum"])
        if "micro_batch" in r:
            ranks = r["world_size"] if r["shard"] else 1  # FSDP on one GPU: not this bench's (none to shard over)
            return ("train", r["adapter"], float(r["dropout"]), bool(r["grad_ckpt"]),
                    "fsdp on 1" if r["shard"] and ranks == 1 else ranks, r["micro_batch"],
                    r["tokens"] // r["micro_batch"], 1)
        if "eval_batch" in r:
            return ("eval", r["eval_batch"], r["new_tokens"], r["prompt"])
        return ("eval", r["gen_batch"], r["new_tokens"], SHAPES[r["shapes"]]["seq"])
    fake = {key(r): r for r in map(json.loads, open(fake_file)) if "total" in r}
    print("configuration | GPU peak (torch.cuda.max_memory_allocated) | fake-tensor peak | GPU / fake")
    for r in map(json.loads, open(real_file)):
        if not r.get("peak_gib") or r.get("oom") or ("micro_batch" not in r and "gen_batch" not in r):
            continue
        f = fake.get(key(r))
        figure = f"{f['total'] / GIB:.2f} GiB | {r['peak_gib'] / (f['total'] / GIB):.3f}" if f else "not measured |"
        print(f"{' '.join(map(str, key(r)))} | {r['peak_gib']:.2f} GiB | {figure}")


@dataclasses.dataclass
class Settings:
    # --- what
    shapes: str = "7b"                  # 7b (LLaVA-1.5-7B's exact shapes) | tiny (toy sizes, for tests)
    only: str = "train,eval"            # train (coin's optimizer step) and/or eval (batched generation)
    grid: str = "table"                 # table: docs/real-scale.md's rows; lists: every combination of the lists below
    tensors: str = "fake"               # fake (no memory: 7B on any CPU) | real (real CPU tensors: toy shapes, tests)
    # --- training (the lists: with --grid=lists)
    adapters: str = "moelora"           # lora (E=1) and/or moelora (E=8), comma-separated; r=128 at 7b
    dropout: str = "0.05"               # adapter dropout values, comma-separated
    grad_ckpt: str = "1"                # gradient checkpointing: 1, 0, or 1,0
    ranks: str = "1"                    # 1: a full replica a GPU; N > 1: --shard over N ranks, memory of one rank
    micro_batches: str = "1,4,8,16"     # micro-batch sizes
    accum: int = 2                      # micro-batches a step: 2 (gradient accumulation), 1 (bench/llava7b.py)
    seq: int = 800                      # tokens a training sequence (576 image tokens + text; padded length)
    answer: int = 32                    # answer tokens a sequence (those of the loss)
    # --- evaluation
    eval_batches: str = "4,16,32,64"    # evaluation batch sizes (MoELoRA E=8, one rank)
    new_tokens: str = "128,1024"        # new tokens generated (the official lengths: 128, or 1024 on four tasks)
    prompt: int = 700                   # prompt tokens a row (576 image tokens + text)
    # --- output
    out: str = ""                       # a .jsonl file to append every measurement to ("" = print only)
    against: str = ""                   # bench/llava7b.py's results.jsonl: its GPU peaks beside --out's, then exit


def lists_of(kind):
    return cli.Rule(lambda v: all(x.strip() for x in v.split(",")), f"a comma-separated list of {kind}")


RULES = {"shapes": cli.one_of(*SHAPES), "grid": cli.one_of("table", "lists"), "tensors": cli.one_of("fake", "real"),
         "only": cli.Rule(lambda v: set(v.split(",")) <= {"train", "eval"}, "train, eval or train,eval"),
         "adapters": cli.Rule(lambda v: set(v.split(",")) <= set(EXPERTS), f"a list of {', '.join(EXPERTS)}"),
         "grad_ckpt": cli.Rule(lambda v: set(v.split(",")) <= {"0", "1"}, "1, 0 or 1,0"),
         "dropout": lists_of("numbers in [0, 1)"), "ranks": lists_of("rank counts"),
         "micro_batches": lists_of("sizes"), "eval_batches": lists_of("sizes"), "new_tokens": lists_of("counts"),
         "accum": cli.POSITIVE, "seq": cli.POSITIVE, "answer": cli.POSITIVE, "prompt": cli.POSITIVE}


def main(argv):
    opts = cli.parse(Settings, argv, __doc__, RULES)[0]
    if opts.against:
        if not (os.path.isfile(opts.against) and os.path.isfile(opts.out)):
            raise cli.UserError(f"--against={opts.against} --out={opts.out}: both must be files (llava7b.py's "
                                "results and this bench's)")
        return compare(opts.against, opts.out)
    # LLaVA's image-token check reads a count, a value fake tensors lack: transformers' own switch turns it off
    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    torch.manual_seed(0)
    t0 = time.time()

    def emit(config, row):
        print(f"  {fmt(row)}   ({time.time() - t0:.0f} s)", flush=True)
        if opts.out:
            with open(opts.out, "a") as f:
                f.write(json.dumps({"shapes": opts.shapes, "tensors": opts.tensors, **config, **row}) + "\n")

    print(f"{opts.shapes} shapes, {opts.tensors} tensors, torch {torch.__version__}; GiB at the peak, per rank")
    with sized_dropout(opts.tensors == "fake"):
        for adapter, dropout, grad_ckpt, ranks, micro_batches in training_grid(opts) if "train" in opts.only else []:
            print(f"train: {adapter} (E={EXPERTS[adapter]}, r={SHAPES[opts.shapes]['r']}), dropout {dropout}, "
                  f"grad_ckpt {grad_ckpt}, " + (f"--shard over {ranks} ranks" if ranks > 1 else "one rank")
                  + f", {opts.accum} micro-batches a step of {opts.seq} tokens", flush=True)
            model = build(opts.shapes, adapter, dropout, grad_ckpt, ranks)
            with tensor_mode(opts.tensors) as mode:
                materialize(model, opts.tensors)
                model.train()
                for micro_batch in micro_batches:
                    config = {"adapter": adapter, "dropout": dropout, "grad_ckpt": grad_ckpt, "ranks": ranks,
                              "micro_batch": micro_batch, "accum": opts.accum, "seq": opts.seq}
                    row = train_peak(model, opts.shapes, micro_batch, opts.accum, opts.seq, opts.answer, mode)
                    emit(config, {"micro_batch": micro_batch, **row})
        if "eval" in opts.only:
            print(f"eval: moelora (E=8), one rank, prompts of {opts.prompt} tokens", flush=True)
            model = build(opts.shapes, "moelora", 0.0, False, 1)
            with tensor_mode(opts.tensors) as mode:
                materialize(model, opts.tensors)
                model.eval()
                for rows in [int(x) for x in opts.eval_batches.split(",")]:
                    for new in [int(x) for x in opts.new_tokens.split(",")]:
                        row = eval_peak(model, opts.shapes, rows, opts.prompt, new, mode)
                        emit({"eval_batch": rows, "new_tokens": new, "prompt": opts.prompt},
                             {"eval_batch": rows, "new_tokens": new, **row})
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
