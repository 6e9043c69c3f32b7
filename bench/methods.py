"""
What does each continual-learning method (methods.py) cost per training step over plain sequential fine-tuning?
One step of coin's loop (forward, answer-token cross-entropy over the batch's answer tokens, backward, clip, AdamW)
plus each method's extra work, on the embedded tiny LLaVA (random weights, built from config: no download), side by
side in one run: the methods run interleaved in a shuffled order each round; each ratio is the median over rounds of
(method's step time / sequential's, within the round), so a busy spell that hits a whole round cancels.

    python bench/methods.py [--threads=2] [--rounds=7] [--experts=1] [--tasks_before=3] [--fisher_records=16]

- replay: the same step (its cost is more steps: x (1 + replay_ratio) per later task, not a slower one);
- ewc: + the penalty (lambda/2) sum F (theta - theta*)^2 and its backward; and once per task, the Fisher: one
  forward + backward per record at batch 1, printed as the time of --fisher_records records in sequential steps;
- lwf: + the teacher's forward (the same model with the previous stage's adapter and projector swapped in, no
  grad, eval mode) and the distillation term;
- olora: the O-LoRA adapter with --tasks_before frozen subspaces plus the trained one, + the orthogonality term
  (its step also differs from sequential's by the frozen subspaces' forward and input gradient); with --experts=1
  only, as coin.py allows it.
"""
import dataclasses
import os
import random
import statistics
import sys
import time

# passive OpenMP waits on a shared machine (see bench/moelora.py); set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# the repository first: `import methods` is the top-level methods.py, not this script (Python puts bench/ first)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # bench/train_step.py's tiny model and batch
import cli  # noqa: E402
import coin  # noqa: E402
import methods  # noqa: E402
import moelora  # noqa: E402
from moelora import target_linears  # noqa: E402
from train_step import SIZES, batch_for, build, prepare  # noqa: E402


def prepare_olora(tasks_before, dropout):
    """The tiny model with O-LoRA at task tasks_before + 1, as coin.py trains it by default (the official choices):
    q and v adapted, earlier subspaces frozen (given values), only the newest trained."""
    model = build("tiny")
    model.requires_grad_(False)
    r = SIZES["tiny"][-1]
    methods.add_olora(model, target_linears(model, ["q_proj", "v_proj"]), r, 2.0 * r, dropout, tasks_before + 1)
    methods.init_subspaces(model, seed=0, init="kaiming")
    with torch.no_grad():
        for m in methods.olora_layers(model):
            for B in m.lora_B:
                B.normal_(std=0.01)
    methods.set_active(model, tasks_before + 1)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def answer_ce(logits, labels):
    """coin's loss for one micro-batch: the sum of answer-token cross-entropies over the answer-token count."""
    return coin.answer_ce(logits, labels) / (labels[:, 1:] != -100).sum()


def step(method, model, opt, b, state):
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "lwf":
        teacher = methods.teacher_logits(model, state["teacher"], inputs)
    with moelora.dropout_records(range(len(b["input_ids"]))):  # each record's dropout seed, as coin.py's step
        logits = model(**inputs).logits  # (B, T, vocab)
        loss = answer_ce(logits, b["labels"])
        if method == "lwf":
            n_tokens = (b["labels"][:, 1:] != -100).sum()
            loss = loss + 0.1 * methods.lwf_distillation(logits, teacher, b["labels"], 2.0) / n_tokens
        loss.backward()
    if method == "ewc":
        methods.ewc_penalty(state["named"], state["fisher"], state["anchor"], 0.1).backward()
    if method == "olora":
        methods.olora_penalty(model, 0.5, 0.0).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def fisher_time(model, b, n_records):
    """Seconds for the Fisher of n_records records (batch 1 each), in eval mode as coin computes it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    records = [{k: v[i:i + 1] for k, v in b.items()} for i in range(len(b["input_ids"]))]

    def record_loss(i):
        r = records[i % len(records)]
        return answer_ce(model(input_ids=r["input_ids"], attention_mask=r["attention_mask"],
                               pixel_values=r["pixel_values"]).logits, r["labels"])
    model.eval()
    t = time.perf_counter()
    methods.ewc_fisher(named, record_loss, list(range(n_records)))
    model.train()
    return time.perf_counter() - t


@dataclasses.dataclass
class Settings:
    threads: int = 2                     # torch threads
    rounds: int = 7                      # interleaved rounds; every ratio is a median over them
    experts: int = 1                     # the adapter: 1 = LoRA (O-LoRA runs too), > 1 = MoELoRA
    tasks_before: int = 3                # O-LoRA's frozen subspaces (it trains task tasks_before + 1)
    fisher_records: int = 16             # records EWC's Fisher is timed on
    dropout: float = 0.05                # adapter dropout


def main(argv):
    rules = {f.name: cli.at_least(1) for f in dataclasses.fields(Settings)} | {"tasks_before": cli.at_least(0),
                                                                               "dropout": cli.between(0, 1)}
    opts = dataclasses.asdict(cli.parse(Settings, argv, __doc__, rules)[0])
    torch.set_num_threads(opts["threads"])
    runs = {name: prepare("tiny", opts["experts"], opts["dropout"]) for name in ("sequential", "replay", "ewc", "lwf")}
    if opts["experts"] == 1:  # O-LoRA is a LoRA per task: compared with sequential LoRA only
        runs["olora"] = prepare_olora(opts["tasks_before"], opts["dropout"])
    b = batch_for(runs["sequential"][0], "tiny")
    named = [(n, p) for n, p in runs["ewc"][0].named_parameters() if p.requires_grad]
    states = {"ewc": {"named": named, "fisher": {n: torch.rand_like(p) for n, p in named},
                      "anchor": {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in named}},
              "lwf": {"teacher": {n: p.detach() + 0.01 * torch.randn_like(p)
                                  for n, p in runs["lwf"][0].named_parameters() if p.requires_grad}}}
    times = {name: [] for name in runs}
    for name, (model, opt) in runs.items():  # warm-up
        step(name, model, opt, b, states.get(name))
    order = list(runs)
    for _ in range(opts["rounds"]):
        random.shuffle(order)
        for name in order:
            model, opt = runs[name]
            t = time.perf_counter()
            step(name, model, opt, b, states.get(name))
            times[name].append(time.perf_counter() - t)
    seq = statistics.median(times["sequential"])
    t_fisher = fisher_time(runs["ewc"][0], b, opts["fisher_records"])
    adapter = "LoRA" if opts["experts"] == 1 else f"MoELoRA E={opts['experts']}"
    print(f"tiny LLaVA, {adapter} r={SIZES['tiny'][-1]}, "
          f"micro-batch {len(b['input_ids'])} x {b['input_ids'].shape[1]} tokens, {opts['threads']} threads, "
          f"{opts['rounds']} interleaved rounds; sequential step {1e3 * seq:.0f} ms (median)")
    print("| method | step time / sequential's (median of per-round ratios) |")
    print("|---|---|")
    for name in runs:
        ratio = statistics.median(t / s for t, s in zip(times[name], times["sequential"]))
        note = {"replay": " (and x (1 + replay_ratio) steps)",
                "olora": f" (at task {opts['tasks_before'] + 1}, with the orthogonality term)"}.get(name, "")
        print(f"| {name} | {ratio:.2f}{note} |")
    n = opts["fisher_records"]
    print(f"EWC's Fisher, once per task: {n} records (batch 1) take {t_fisher / seq:.1f} sequential steps of "
          f"{len(b['input_ids'])} records (--ewc_samples=1000: x {1000 / n:.0f})")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
