"""
One training step of coin's loop (forward, backward, AdamW), timed side by side in one run for two model sizes and
two adapters, against this machine's matmul peak measured in the same run:

- models: the embedded tiny LLaVA (built from config, random weights) and a ~100M-parameter LLaVA-shaped model
  (CLIP d384 x 6 on 112 px, Llama d768 x 12, 32k vocabulary), both random-initialised: no download;
- adapters: plain LoRA (E=1) and MoELoRA (E=8), r=16 on the tiny model and r=24 on the 100M one (r/d as LLaVA-7B's),
  on every language-model linear, projector trainable, as coin.py trains them.

Prints tokens/s, achieved FLOP/s (matmul FLOPs of the step counted by torch's FlopCounterMode, which counts a
sparse-dense product as dense: with dropout, MoELoRA's FLOPs are over-counted) as a fraction of the peak of one
large torch.mm, and the adapter's share of the step (step time with the adapter minus the same step
of the frozen model with no adapter, where only the projector trains, taken within each round), then the MoELoRA
step over the LoRA step (the median of the within-round ratios). Medians of interleaved rounds, a new order each;
about 2 minutes on 2 cores.

    python bench/train_step.py [--threads=2] [--rounds=5] [--steps=1] [--only=tiny|100m] [--dropout=0.05]
                               [--clock=wall|cpu]   # cpu: CPU seconds instead of wall time, for a busy machine
    git show <commit>:moelora.py > /tmp/moelora_before.py       # an earlier version, to compare with
    python bench/train_step.py --baseline=/tmp/moelora_before.py  # adds that file's LoRA and MoELoRA rows, same run
"""
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time

# OpenMP threads that spin while a sibling thread is descheduled turn every small matmul into a wait for a CPU time
# slice on a machine shared with other jobs, and count as CPU time while they spin. Must be set before torch loads
# OpenMP; OMP_WAIT_POLICY=ACTIVE in the shell overrides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import cli  # noqa: E402
import moelora  # noqa: E402
from bench.moelora import CLOCKS, load_baseline  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

SIZES = {  # name: (vision d, layers, image px, patch, text d, layers, vocab, micro batch, text tokens, r)
    "tiny": (128, 4, 48, 8, 128, 4, 1000, 16, 40, 16),
    "100m": (384, 6, 112, 14, 768, 12, 32000, 8, 64, 24),  # r/d = 24/768 ~ LLaVA-7B's 128/4096
}


def build(size):
    vd, vl, px, patch, td, tl, vocab, *_ = SIZES[size]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vd, intermediate_size=4 * vd, num_hidden_layers=vl,
                                       num_attention_heads=max(1, vd // 64), image_size=px, patch_size=patch),
        text_config=LlamaConfig(hidden_size=td, intermediate_size=int(8 / 3 * td) // 64 * 64 or 3 * td,
                                num_hidden_layers=tl, num_attention_heads=max(1, td // 64), vocab_size=vocab,
                                max_position_embeddings=1024),
        image_token_index=vocab - 1, image_seq_length=(px // patch) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg)


def batch_for(model, size):
    _, _, px, patch, _, _, vocab, mb, n_text, _ = SIZES[size]
    n_img = (px // patch) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, vocab - 1, (mb, n_text), generator=g)
    ids = torch.cat([text[:, :1], torch.full((mb, n_img), vocab - 1), text[:, 1:]], dim=1)  # (B, 1 + n_img + T-1)
    labels = ids.clone()
    labels[:, : 1 + n_img + n_text // 2] = -100  # loss on the second half of the text: the "answer"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(mb, 3, px, px, generator=g)}


def prepare(size, experts, dropout, adapter=moelora):
    """The model as coin.py trains it: everything frozen, adapter (if any, from the module `adapter`) and projector
    trainable."""
    model = build(size)
    for p in model.parameters():
        p.requires_grad_(False)
    if experts:
        r = SIZES[size][-1]
        adapter.add_moelora(model, None, r, 2.0 * r, experts, dropout=dropout)
        adapter.mark_only_moelora_trainable(model)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, opt, b):
    with moelora.dropout_records(range(len(b["input_ids"]))):  # a seed per record, as coin.py (--baseline: ignored)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())  # (B*(L-1), V), (B*(L-1),)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def matmul_peak(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(ts)


@dataclasses.dataclass
class Settings:
    threads: int = 2                     # torch threads
    rounds: int = 5                      # interleaved rounds; every figure is a median over them
    steps: int = 1                       # timed training steps per variant and round
    only: str = ""                       # tiny | 100m: one model only ("" = both)
    dropout: float = 0.05                # adapter dropout
    clock: str = "wall"                   # wall (what a user waits) | cpu (CPU seconds: steadier on a shared machine)
    baseline: str = ""                   # another moelora.py: adds its LoRA and MoELoRA rows to the same run


def main(argv):
    opts = dataclasses.asdict(cli.parse(Settings, argv, __doc__, {"clock": cli.one_of(*CLOCKS)})[0])
    clock = CLOCKS[opts["clock"]]  # bench/moelora.py's: wall time, or CPU time (steadier on a shared machine)
    torch.set_num_threads(opts["threads"])
    peak = matmul_peak()
    print(f"matmul peak (2048^3 fp32 torch.mm, {opts['threads']} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"adapter dropout {opts['dropout']}")
    print("| model | params | adapter | tokens/step | step ms | tokens/s | GFLOP/step | % of peak | adapter share "
          "of time | of FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    moe_over_lora_lines = []  # printed after the table, which stays one markdown table
    for size in [s for s in SIZES if not opts["only"] or s == opts["only"]]:
        variants = [("none", 0, moelora), ("LoRA E=1", 1, moelora), ("MoELoRA E=8", 8, moelora)]
        if opts["baseline"]:
            before = load_baseline(opts["baseline"])
            variants += [("LoRA E=1 (--baseline)", 1, before), ("MoELoRA E=8 (--baseline)", 8, before)]
        runs = {name: prepare(size, e, opts["dropout"], adapter) for name, e, adapter in variants}
        b = batch_for(runs["none"][0], size)
        flops, times = {}, {k: [] for k in runs}
        for name, (model, opt) in runs.items():
            with FlopCounterMode(display=False) as fc:
                step(model, opt, b)  # also the warm-up
            flops[name] = fc.get_total_flops()
        rng = random.Random(0)
        for _ in range(opts["rounds"]):  # interleaved, in a new order each round: a busy spell hits every variant alike
            order = list(runs)
            rng.shuffle(order)  # a fixed order would favour some places in it (seen: 5% between identical variants)
            for name in order:
                model, opt = runs[name]
                t = clock()
                for _ in range(opts["steps"]):
                    step(model, opt, b)
                times[name].append((clock() - t) / opts["steps"])
        n_params = sum(p.numel() for p in runs["none"][0].parameters())
        tokens = b["input_ids"].numel()
        for name in runs:
            t = statistics.median(times[name])
            # the share from each round's pair (this variant and "none" ran back to back), median over rounds: a
            # slow spell that hits a whole round cancels
            ratio = statistics.median(a / n for a, n in zip(times[name], times["none"]))
            share = "- | -" if name == "none" else (f"{100 * (1 - 1 / ratio):.1f}% | "
                                                    f"{100 * (flops[name] - flops['none']) / flops[name]:.1f}%")
            print(f"| {size} | {n_params / 1e6:.1f}M | {name} | {tokens} | {1e3 * t:.0f} | {tokens / t:,.0f} | "
                  f"{flops[name] / 1e9:.2f} | {100 * flops[name] / t / peak:.0f}% | {share} |")
        for num, den in (("MoELoRA E=8", "LoRA E=1"), ("MoELoRA E=8", "MoELoRA E=8 (--baseline)"),
                         ("LoRA E=1", "LoRA E=1 (--baseline)"), ("MoELoRA E=8 (--baseline)", "LoRA E=1 (--baseline)")):
            if den not in times:
                continue
            ratios = sorted(a / b for a, b in zip(times[num], times[den]))  # within each round, then the median
            target = "; target <= 1.3 at the training default dropout 0.05" if den == "LoRA E=1" else ""
            moe_over_lora_lines.append(f"{size}: {num} step / {den} step {statistics.median(ratios):.2f} "
                                       f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f}{target})")
        del runs
    print("\n".join(moe_over_lora_lines))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
