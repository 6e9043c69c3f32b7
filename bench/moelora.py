"""
What does MoELoRA cost over plain LoRA? Forward + backward time of one adapted linear at LLaVA-7B shapes, side by
side in one run: the frozen base linear alone, plain LoRA r = 128 (moelora.py with E = 1), PEFT's LoRA layer of the
same rank (if peft is installed), MoELoRA E = 8 r = 128 (moelora.py), and a per-expert loop MoELoRA written here
with the official code's structure (E LoRA pairs, E dropouts, a Python loop summing the gated outputs).

    python bench/moelora.py                   # about 70 s on a 2-core CPU; prints one table per shape
    python bench/moelora.py --dropout=0.05    # the training default: each expert its own dropout mask
    git show <commit>:moelora.py > /tmp/moelora_before.py      # an earlier version, to compare with
    python bench/moelora.py --baseline=/tmp/moelora_before.py   # adds that file's LoRA and MoELoRA rows, same run
    pip install --no-deps -r bench/requirements.txt   # optional: adds the PEFT row, leaves torch alone

Timings on a shared CPU are fragile: the variants run interleaved in a shuffled order each round and the table
shows medians (spread: the median deviation from the median); on a busy machine --clock=cpu times the CPU work
instead of the wall time, which other jobs disturb far less. Adapter cost = time over the base linear alone - 1,
and every ratio is the median over rounds of the ratio within a round.
Its FLOP share: 3 r (d_in + d_out) against 2 d_in d_out multiply-adds per token (the base is frozen, so it has no
weight gradient; the input needs one). Targets (at dropout 0 and at the training default 0.05, each variant with
the same dropout): MoELoRA E=8 within 1.15 x LoRA's time, its adapter cost within 1.5 x its FLOP share and at least
3 x below the loop's, LoRA no slower than PEFT's layer.

With dropout, each MoELoRA expert draws its own mask as the official code does. The loop pays E dense masks and E
dropped-out copies of x; moelora.py draws only the dropped positions (a fraction p) and corrects the dense product,
so the random numbers and the sparse work grow with p * E. Saved activations: the bytes autograd keeps for backward
(unique storages, the layer's weights not counted), counted with torch.autograd.graph.saved_tensors_hooks; target
with dropout: MoELoRA within 1.2 x LoRA's (no masks, no per-expert copies of x; the dropped positions for backward
in about one byte each, 0.4 bytes per entry of x at E = 8 and p = 0.05).
"""
import dataclasses
import importlib.util
import os
import random
import statistics
import sys
import time

# OpenMP threads that spin while a sibling thread is descheduled turn every small matmul into a wait for a CPU time
# slice on a machine shared with other jobs (seen here: LoRA's cost over the base x6). Waiting passively measures the
# adapter, not the neighbours. Must be set before torch loads OpenMP; OMP_WAIT_POLICY=ACTIVE in the shell overrides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import moelora  # noqa: E402
from moelora import MoELoRALinear  # noqa: E402


class LoopMoELoRA(nn.Module):
    """The official structure: one (A_i, B_i, dropout_i) per expert and a Python loop over them."""

    def __init__(self, base, r, alpha, num_experts, dropout):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        d_in, d_out, re = base.in_features, base.out_features, r // num_experts
        self.lora_A = nn.ModuleList(nn.Linear(d_in, re, bias=False) for _ in range(num_experts))
        self.lora_B = nn.ModuleList(nn.Linear(re, d_out, bias=False) for _ in range(num_experts))
        self.dropout = nn.ModuleList(nn.Dropout(dropout) for _ in range(num_experts))
        self.router = nn.Linear(d_in, num_experts, bias=False)

    def forward(self, x):  # (N, d_in)
        y = self.base(x)  # (N, d_out)
        g = F.softmax(self.router(x), dim=-1)  # (N, E)
        for i, (A, B, drop) in enumerate(zip(self.lora_A, self.lora_B, self.dropout)):
            y = y + B(A(drop(x))) * g[:, i:i + 1] * self.scaling
        return y


def peft_lora(base, r, alpha, dropout):
    """PEFT's LoRA layer on the same base, or None (with a note) when peft is not installed."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear
    except ImportError:
        print("note: peft is not importable, skipping the PEFT row (pip install --no-deps peft accelerate psutil)")
        return None
    layer = Linear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout), r=r,
                   lora_alpha=alpha, lora_dropout=dropout)
    layer.base_layer.requires_grad_(False)  # PEFT's layer leaves the base trainable; the model wrapper freezes it
    return layer


# wall: what a user waits; cpu: the CPU seconds of all this process's threads, the work done, which other jobs on a
# shared machine disturb far less (waiting for a time slice does not count)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def load_baseline(path):
    """Another version of moelora.py, imported under its own name, to time side by side with this one."""
    spec = importlib.util.spec_from_file_location("moelora_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_bytes(module, x):
    """Bytes autograd keeps for backward in one forward: unique storages, the module's weights not counted."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), moelora.dropout_records([0]):
        module(x)  # x: one record's tokens
    return sum(storages.values())


def step_time(module, x, grad_out, clock):
    """Seconds for one forward + backward; gradients are cleared outside the timed region."""
    t0 = clock()
    with moelora.dropout_records([0]):  # x: one record's tokens, its dropout seed (a --baseline layer ignores it)
        module(x).backward(grad_out)
    elapsed = clock() - t0
    x.grad = None
    for p in module.parameters():
        p.grad = None
    return elapsed


def bench_shape(d_in, d_out, args, rng):
    """Seconds of forward + backward, one list per variant, keyed base / lora / peft / moe / loop (and lora_before /
    moe_before with --baseline), and each variant's saved activation bytes."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)  # LLaMA linears have no bias
    variants = {"base": base,
                "lora": MoELoRALinear(base, args.r, args.alpha, 1, args.dropout),
                "peft": peft_lora(base, args.r, args.alpha, args.dropout),
                "moe": MoELoRALinear(base, args.r, args.alpha, args.experts, args.dropout),
                "loop": LoopMoELoRA(base, args.r, args.alpha, args.experts, args.dropout)}
    if args.baseline:
        before = load_baseline(args.baseline)
        variants["lora_before"] = before.MoELoRALinear(base, args.r, args.alpha, 1, args.dropout)
        variants["moe_before"] = before.MoELoRALinear(base, args.r, args.alpha, args.experts, args.dropout)
    variants = {key: m.train() for key, m in variants.items() if m is not None}
    x = torch.randn(args.tokens, d_in, requires_grad=True)  # (N, d_in): earlier adapters make the input need grad
    grad_out = torch.randn(args.tokens, d_out)  # (N, d_out)
    saved = {key: saved_bytes(m, x) for key, m in variants.items()}
    times = {key: [] for key in variants}
    for rnd in range(args.warmup + args.rounds):
        order = list(variants)
        rng.shuffle(order)  # interleaved, in a new order each round, so a slow spell hits every variant alike
        for key in order:
            t = step_time(variants[key], x, grad_out, CLOCKS[args.clock])
            if rnd >= args.warmup:
                times[key].append(t)
    return times, saved


def report(d_in, d_out, times, saved, args):
    """Print the table and the targets for one shape; True if every target is met."""
    labels = {"base": "base linear alone", "lora": f"LoRA r={args.r} (moelora.py, E=1)",
              "peft": f"PEFT LoRA r={args.r}", "moe": f"MoELoRA E={args.experts} r={args.r} (moelora.py)",
              "loop": f"per-expert loop E={args.experts} r={args.r}",
              "lora_before": f"LoRA r={args.r} (--baseline, E=1)",
              "moe_before": f"MoELoRA E={args.experts} r={args.r} (--baseline)"}
    med = {key: statistics.median(ts) for key, ts in times.items()}
    spread = {key: statistics.median(abs(t - med[key]) for t in ts) / med[key] for key, ts in times.items()}
    noise = statistics.median(spread.values())  # typical relative deviation of one timing from its median
    # ratios are taken within each round (the variants ran back to back there) and their median over rounds is kept:
    # a slow spell that hits a whole round cancels, where a ratio of medians would carry it
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    cost = {key: ratio(key, "base") - 1 for key in times}  # adapter cost: time over the base alone - 1
    share = 3 * args.r * (d_in + d_out) / (2 * d_in * d_out)  # adapter FLOPs over the base linear's, fwd + bwd
    print(f"\n{d_in} -> {d_out}, {args.tokens} tokens, fp32, dropout {args.dropout}, {args.threads} threads, "
          f"{args.clock} clock, "
          f"{args.rounds} rounds; a rank-{args.r} adapter adds {share:.1%} of the base linear's FLOPs")
    print(f"  {'variant':40s} {'median ms':>10s} {'spread':>7s} {'best ms':>9s} {'adapter cost':>13s} "
          f"{'saved MB':>9s}")
    for key, ts in times.items():
        print(f"  {labels[key]:40s} {med[key] * 1e3:10.1f} {spread[key]:7.1%} {min(ts) * 1e3:9.1f} {cost[key]:13.1%} "
              f"{saved[key] / 2 ** 20:9.1f}")
    # each check: (what, value, op, target, its miss as a fraction of the base's time, to compare with the noise)
    checks = [("MoE / LoRA time", ratio("moe", "lora"), "<=", 1.15, lambda v, t: abs(v / t - 1)),
              ("MoE adapter cost / its FLOP share", cost["moe"] / share, "<=", 1.5, lambda v, t: abs(v - t) * share),
              ("loop / MoE adapter cost", cost["loop"] / max(cost["moe"], 1e-9), ">=", 3.0,
               lambda v, t: abs(cost["loop"] / t - cost["moe"]))]
    if "peft" in med:
        checks.append(("LoRA / PEFT time", ratio("lora", "peft"), "<=", 1.0, lambda v, t: abs(v / t - 1)))
    print(f"  {'LoRA adapter cost / its FLOP share':36s} {cost['lora'] / share:6.2f}  (for reference)")
    saved_ratio = saved["moe"] / saved["lora"]
    if args.dropout > 0:  # a count, not a timing: no noise
        checks.append(("MoE / LoRA saved activations", saved_ratio, "<=", 1.2, lambda v, t: None))
    else:
        print(f"  {'MoE / LoRA saved activations':36s} {saved_ratio:6.2f}  (for reference; target with dropout)")
    for key in ("lora", "moe"):
        if f"{key}_before" in times:
            print(f"  {key + ' / --baseline time':36s} {ratio(key, key + '_before'):6.2f}  (for reference)")
    all_met = True
    for what, value, op, target, time_miss in checks:
        met = value <= target if op == "<=" else value >= target
        # a miss smaller than one timing's typical deviation is not resolved by this run: say so (not of a count)
        miss = time_miss(value, target)
        within = ", within the timing spread" if miss is not None and miss < noise else ""
        verdict = "met" if met else f"NOT met (by {abs(value / target - 1):.1%}{within})"
        print(f"  {what:36s} {value:6.2f}  target {op} {target:<5} {verdict}")
        all_met &= met
    return all_met


@dataclasses.dataclass
class Settings:
    threads: int = 2                     # torch CPU threads
    tokens: int = 512                    # tokens per step (N)
    shapes: str = "4096x4096,4096x11008"  # d_in x d_out of the adapted linears, comma-separated
    r: int = 128                         # total LoRA rank
    alpha: float = 256.0                 # LoRA alpha
    experts: int = 8                     # experts of the MoELoRA rows
    dropout: float = 0.0                 # adapter dropout (training default: 0.05)
    rounds: int = 11                     # timed rounds; each runs every variant once
    warmup: int = 1                      # untimed rounds first
    clock: str = "wall"                   # wall (what a user waits) | cpu (CPU seconds: steadier on a busy machine)
    baseline: str = ""                   # another moelora.py to time side by side (its LoRA, MoELoRA)


RULES = {"threads": cli.POSITIVE, "tokens": cli.POSITIVE, "r": cli.POSITIVE, "alpha": cli.POSITIVE,
         "experts": cli.POSITIVE, "dropout": cli.between(0, 1, high_open=True), "rounds": cli.POSITIVE,
         "warmup": cli.at_least(0), "clock": cli.one_of(*CLOCKS)}


def parse_shapes(text):
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)]; a UserError for anything else."""
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
        return shapes
    except (ValueError, AssertionError):
        raise cli.UserError(f"--shapes={text}: give d_in x d_out pairs, e.g. --shapes=4096x4096,4096x11008") from None


def main(argv):
    args = cli.parse(Settings, argv, __doc__, RULES)[0]
    shapes = parse_shapes(args.shapes)
    if args.r % args.experts:
        raise cli.UserError(f"--r={args.r} --experts={args.experts}: the rank must split evenly over the experts")
    if args.baseline and not os.path.isfile(args.baseline):
        raise cli.UserError(f"--baseline={args.baseline}: no such file (git show <commit>:moelora.py > FILE makes one)")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs"
          + ("  (busy machine: timings will be noisy)" if load > 0.5 else ""))
    t0, rng, all_met = time.time(), random.Random(0), True
    for d_in, d_out in shapes:
        all_met &= report(d_in, d_out, *bench_shape(d_in, d_out, args, rng), args)
    print(f"\n{'all targets met' if all_met else 'some targets NOT met'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
