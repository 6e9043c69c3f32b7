"""
coin: continual instruction tuning of a multimodal LLM (CoIN, arXiv 2403.08350), from scratch.

Reads top to bottom: config -> DDP setup -> load the base -> inject the adapter -> for each task: the method's start,
train one epoch, the method's end, save, evaluate on every task seen so far -> results. `python coin.py --help` lists
the settings. Running the same command into the same --out again continues where it stopped (killed, Ctrl-C, a lost
rank), to the same weights and scores: checkpoint.py holds what a stage writes and how a run continues; base_model.py
builds the bases (stage 0, assemble); methods.py the continual-learning methods (--method), each one class whose hooks
this loop calls.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings

import cli
import pins

if __name__ == "__main__" and sys.argv[1:2] != ["assemble"] and cli.wants_help(sys.argv[1:]):
    # answered here, from the sources of the Config block and the methods' settings, before torch loads (seconds)
    cli.exit_with_help(cli.setting_docs(__file__, "Config", "methods.py"), __doc__)
if __name__ == "__main__":
    pins.apply()  # the same bits on every x86-64 CPU with AVX2 (pins.py); COIN_PINS=0 opts out. Before torch loads

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForImageTextToText, AutoProcessor

import data
import eval as evaluate
import moelora
from base_model import assemble_main, pretrain_base, projector
from checkpoint import (MIDSTAGE, NonFiniteLoss, finished_stages, inputs_hash, load_checkpoint, load_midstage,
                        load_results, read_json_file, run_info, save_checkpoint, save_midstage, setting_defaults,
                        stage_dir)
from cli import print0
from data import collate
from methods import METHODS, Method, Stage

# -----------------------------------------------------------------------------
# Config: one setting a line, its comment is its --help line; override any with --key=value or --key value (unknown
# keys and wrong types are errors). RULES below says what each accepts; every setting is checked before any work.

@dataclasses.dataclass
class Config:
    # --- data
    data_dir: str = "data/coin-mini"      # folder holding Instructions_*/ (`python coin_mini.py` writes CoIN-mini)
    image_dir: str = ""                   # image root; "" means <data_dir>/images
    instructions: str = "Original"        # instruction set: Original | Diverse | 10Type | ASD (ASD-x10 ... -x80)
    tasks: str = "all"                    # all | alphabet | comma-separated task names, in training order
    max_train: int = 0                    # use at most this many train records per task (0 = all)
    max_test: int = 0                     # evaluate on at most this many test records per task (0 = all)
    data_fraction: float = 1.0            # train on a seeded random fraction of each train set (the paper's ablation)
    skip_bad: bool = False                # drop bad records (listed by `python data.py check`), counted and reported;
                                          # by default a bad record stops the run before any work, naming its file
    multitask: bool = False               # the multi-task baseline: one stage on the union of all train sets
    # --- model
    base: str = "assets/tiny-llava"       # any Hugging Face image-text-to-text model directory (CoIN: the
                                          # pretrain-only LLaVA-1.5, `python coin.py assemble`; or Qwen2-VL, ...)
    dtype: str = "float32"                # float32 | bfloat16 (7B on GPUs: bfloat16, as the official runs)
    attn: str = "sdpa"                    # attention kernel: sdpa (PyTorch's fused attention) | eager
    grad_ckpt: bool = False               # gradient checkpointing: recompute activations in backward (7B on GPUs: on)
    shard: bool = False                   # FSDP2: each rank holds 1/ranks of the base, adapter, gradients, AdamW state
    # --- adapter
    lora_r: int = 16                      # total rank r, split over the experts (official: 128)
    lora_alpha: float = 32.0              # scaling alpha / r (official: 256 / 128 = 2)
    experts: int = 8                      # E; 1 = plain LoRA, the baseline (official: 8)
    lora_dropout: float = 0.05            # dropout on the adapter's input (official: 0.05)
    train_projector: bool = True          # the projector trains along with the adapter, as in CoIN
    projector_lr_scale: float = 0.1       # the projector's lr = lr x this. 0.1: the official scripts' 2e-5 at lr
                                          # 2e-4 (their DeepSpeed config overrides it: 1.0 is what they run in effect)
    # --- optim
    lr: float = 1e-3                      # official 2e-4 at 7B; the tiny model's image features scramble at 2e-3
    micro_batch: int = 8                  # records per forward, at most (CoIN-mini: 375 steps of 8 learn more than
                                          # 188 of 16)
    grad_accum: int = 1                   # accumulation steps on one rank: the global batch is micro_batch x this
    global_batch: str = ""                # "" = micro_batch x grad_accum; N; or "official" (the per-task table). The
                                          # same on any number of ranks: each takes global/ranks records a step
    epochs: int = 1                       # CoIN trains one epoch per task
    weight_decay: float = 0.0             # AdamW's decoupled weight decay (official: 0)
    warmup_ratio: float = 0.03            # linear warmup over this fraction of a stage's steps (official: 0.03)
    schedule: str = "constant"            # constant (what the official DeepSpeed config runs) | cosine
    max_grad_norm: float = 1.0            # gradients clipped to this global norm (official: 1.0)
    # --- continual-learning method (methods.py; its own settings are listed under it below)
    method: str = "sequential"            # sequential: the paper's LoRA and MoELoRA rows; or a method of methods.py,
                                          # listed below with its own settings
    # --- eval
    eval_batch: int = 64                  # test records per generation batch, per rank
    max_new_tokens: int = 24              # generation stops at eos or here; 0 = each task's official length (1024
                                          # or 128, data.OFFICIAL_EVAL); 24 fits every CoIN-mini answer
    eval_images: str = "official"         # official: per task, as the official evaluation (ScienceQA, ImageNet,
                                          # Grounding, VQAv2 cropped by the processor, the others padded to a square)
                                          # | pad: every task padded, as training pads
    scoring: str = "official"             # official | fixed (see README: the official scorers' quirks)
    ground_truth: str = ""                # folder of ScienceQA's, TextVQA's and GQA's official ground-truth files,
                                          # laid out as the image root (where they are by default: TextVQA/...json)
    answers_from_test: bool = False       # score those three against the test file's one answer instead
    judge: str = "exact"                  # General Knowledge judge: exact (CoIN-mini) | path to a HF causal LM
    zero_shot: bool = True                # evaluate the base on every task before the first stage
    # --- run
    out: str = "out/run"                  # the run's folder: checkpoints/, predictions/, results.json
    seed: int = 0                         # data order, adapter init, dropout masks, --data_fraction's draw
    threads: int = 0                      # torch threads per rank; 0 = cores / ranks (pinned, on a CPU: 1)
    # Re-running a command into the same --out continues it: finished stages are kept (checkpoint and results rows),
    # a stage stopped part-way goes on from its mid-stage checkpoint, and a resumed run ends with the same weights
    # and scores. Settings, data and base must be the same (checked); --resume=false refuses an --out with a run.
    resume: bool = True                   # continue the run --out holds (as above); false: refuse an --out with a run
    save_every: int = 0                   # mid-stage checkpoint every N optimizer steps (0 = only on Ctrl-C)
    stage0: bool = False                  # pretrain the tiny base on CoIN-mini's caption corpus instead
    stage0_epochs: int = 5                # stage 0: full fine-tuning of the whole tiny model on captions
    stage0_lr: float = 1e-3               # with a cosine schedule


# What each setting accepts (cli.Rule); a new setting gets its row here. Combinations are checked in check_config.
RULES = {
    # --- data
    "data_dir": cli.ANY, "image_dir": cli.ANY, "instructions": cli.one_of(*data.INSTRUCTIONS), "tasks": cli.ANY,
    "max_train": cli.at_least(0), "max_test": cli.at_least(0), "data_fraction": cli.between(0, 1, low_open=True),
    "skip_bad": cli.ANY, "multitask": cli.ANY,
    # --- model
    "base": cli.ANY, "dtype": cli.one_of("float32", "bfloat16"), "attn": cli.one_of("sdpa", "eager"),
    "grad_ckpt": cli.ANY, "shard": cli.ANY,
    # --- adapter
    "lora_r": cli.at_least(1), "lora_alpha": cli.POSITIVE, "experts": cli.at_least(1),
    "lora_dropout": cli.between(0, 1, high_open=True), "train_projector": cli.ANY,
    "projector_lr_scale": cli.at_least(0),
    # --- optim
    "lr": cli.POSITIVE, "micro_batch": cli.at_least(1), "grad_accum": cli.at_least(1),
    "global_batch": cli.Rule(lambda v: v in ("", "official") or v.isdigit() and int(v) > 0,
                             "'', 'official' or a whole number > 0"),
    "epochs": cli.at_least(1), "weight_decay": cli.at_least(0), "warmup_ratio": cli.between(0, 1),
    "schedule": cli.one_of("constant", "cosine"), "max_grad_norm": cli.POSITIVE,
    # --- continual-learning method: "method" and each method's own settings, from the registry (run_settings)
    # --- eval
    "eval_batch": cli.at_least(1), "max_new_tokens": cli.at_least(0), "eval_images": cli.one_of(*data.EVAL_IMAGES),
    "scoring": cli.one_of("official", "fixed"), "ground_truth": cli.ANY, "answers_from_test": cli.ANY,
    "judge": cli.ANY, "zero_shot": cli.ANY,
    # --- run
    "out": cli.Rule(bool, "a folder name"), "seed": cli.ANY, "threads": cli.at_least(0), "resume": cli.ANY,
    "save_every": cli.at_least(0), "stage0": cli.ANY, "stage0_epochs": cli.at_least(1), "stage0_lr": cli.POSITIVE,
}


def run_settings():
    """(the settings dataclass, its rules) of a run: Config and RULES above, then each registered method's own
    settings (its class's Settings and rules, methods.py), so a method's settings are written once, in its class."""
    cls = cli.extend_settings(Config, [m.Settings for m in METHODS.values() if m.Settings])
    own_rules = {k: rule for m in METHODS.values() for k, rule in m.rules.items()}
    return cls, {**RULES, "method": cli.one_of(*METHODS), **own_rules}


def parse_config(argv):
    """The settings of a command line (run_settings), every one checked (the rules, then check_config): all problems
    at once, as one UserError, before anything is read, loaded or written (main then checks the folders)."""
    settings, rules = run_settings()
    # each setting in range first (the combinations below assume it), then check_config
    docs = cli.setting_docs(__file__, "Config", "methods.py") if cli.wants_help(argv) else None  # read from the source
    cfg, _ = cli.parse(settings, argv, __doc__, rules, docs=docs)
    problems = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if problems:
        raise cli.UserError("\n".join(problems))
    return cfg


def check_config(cfg, world):
    """Problems of settings taken together, on `world` ranks."""
    problems = []
    try:
        tasks = data.parse_tasks(cfg.tasks)
    except ValueError as e:
        problems.append(str(e))
        tasks = []
    if cfg.shard and cfg.stage0:
        problems.append("--shard with --stage0: stage 0 trains the whole tiny base unsharded; drop --shard")
    method = METHODS[cfg.method]
    problems += method.check(cfg)
    if cfg.multitask and method is not Method:
        problems.append(f"--multitask --method={method.name}: one stage has no earlier task to work on; use "
                        "--method=sequential with --multitask")
    if cfg.shard and not method.shardable:
        problems.append(f"--shard --method={method.name}: the method's state (methods.py) is kept whole, not sharded; "
                        "run it without --shard")
    if cfg.lora_r % cfg.experts:
        problems.append(f"--lora_r={cfg.lora_r} --experts={cfg.experts}: the rank is split evenly over the experts; "
                        f"give a --lora_r that is a multiple of {cfg.experts}")
    for name, *_ in plan_stages(cfg, tasks) if not cfg.stage0 else []:
        try:
            batch_plan(cfg, name, world)
        except cli.UserError as e:
            problems.append(str(e))
            break  # the same fix serves every stage
    return problems


def check_folders(cfg):
    """Every folder the settings name must exist, and --out must be one or not exist yet: all problems in one
    UserError."""
    problems = []
    if not os.path.isdir(cfg.data_dir):
        problems.append(f"--data_dir={cfg.data_dir}: no such folder (the one holding Instructions_*/; "
                        f"`python coin_mini.py --out={cfg.data_dir}` writes CoIN-mini there)")
    if cfg.image_dir and not os.path.isdir(cfg.image_dir):
        problems.append(f"--image_dir={cfg.image_dir}: no such folder (the image root; '' means <data_dir>/images)")
    if not cfg.stage0 and not os.path.isdir(cfg.base):
        problems.append(f"--base={cfg.base}: no such model directory (the embedded default is made by "
                        "`python coin.py --stage0`; see run.sh)")
    if cfg.ground_truth and not os.path.isdir(cfg.ground_truth):
        problems.append(f"--ground_truth={cfg.ground_truth}: no such folder (laid out as the image root: "
                        "ScienceQA/problems.json, TextVQA/TextVQA_0.5.1_val.json, GQA/testdev_balanced_questions.json)")
    if cfg.judge != "exact" and not os.path.isdir(cfg.judge):
        problems.append(f"--judge={cfg.judge}: no such folder (give 'exact' or a Hugging Face causal LM folder)")
    if out := cli.out_folder_problem(cfg.out):
        problems.append(out)
    if problems:
        raise cli.UserError("\n".join(problems))


# The official global batch of each task (8 GPUs x grad-accum 8 x the scripts' per-device batch): --global_batch=
# official
OFFICIAL_GLOBAL_BATCH = {"ScienceQA": 896, "TextVQA": 896, "ImageNet": 1024, "GQA": 384, "VizWiz": 896,
                         "Grounding": 384, "VQAv2": 512, "OCR-VQA": 640}


def batch_plan(cfg, stage, world):
    """(global batch, micro-batch, accumulation steps) of `stage` on `world` ranks. The global batch is a setting of
    the experiment, the same on any number of ranks: --global_batch (N, or the official table's for the stage), by
    default --micro_batch x --grad_accum, what one rank runs. Each rank takes global / world records a step, a
    contiguous run of the global batch, in micro-batches of --micro_batch (fewer if its share is smaller):

        global_batch = micro_batch * world_size * grad_accum

    so `torchrun --nproc_per_node=N coin.py ...` trains the experiment `python coin.py ...` trains, N times as fast:
    the same records and dropout masks (each record's own), the same update up to float rounding, and to the last bit
    on a CPU where 2 ranks each run one of the two micro-batches of one rank's step (--micro_batch = global / 2: the
    same micro-batches, the same sum of their two gradients; with more, ranks and accumulation add them in other
    orders). A global batch that the ranks or the micro-batch cannot split is refused, naming what to set."""
    if cfg.global_batch == "official" and stage not in OFFICIAL_GLOBAL_BATCH:
        raise cli.UserError(f"--global_batch=official: the official table has no batch for stage {stage!r}; give "
                            "--global_batch=N")
    if cfg.global_batch == "official":
        want, where = OFFICIAL_GLOBAL_BATCH[stage], f"stage {stage}'s official global batch"
    elif cfg.global_batch:
        want, where = int(cfg.global_batch), f"--global_batch={cfg.global_batch}"
    else:
        want, where = cfg.micro_batch * cfg.grad_accum, (f"the global batch --micro_batch x --grad_accum = "
                                                         f"{cfg.micro_batch} x {cfg.grad_accum}")
    if want % world:
        raise cli.UserError(f"{where} ({want}) does not split over {world} ranks: give a --global_batch that {world} "
                            f"divides, or run on a number of ranks that divides {want}")
    share = want // world
    micro = min(cfg.micro_batch, share)
    if share % micro:
        raise cli.UserError(f"{where} ({want}) on {world} rank(s) gives each {share} records a step, not a multiple "
                            f"of --micro_batch={micro}: choose a --micro_batch that divides {share}")
    return want, micro, share // micro


def plan_batches(cfg, stages, world):
    """{stage: (micro-batch, accumulation steps)} (fails now on a global batch the ranks cannot split), and the global
    batch the run records: one number if every stage has it (the usual case), else the table {stage: batch}."""
    plans = {name: batch_plan(cfg, name, world) for name, *_ in stages}
    batches = {name: plan[0] for name, plan in plans.items()}
    return ({name: plan[1:] for name, plan in plans.items()},
            batches[stages[0][0]] if len(set(batches.values())) == 1 else batches)


# -----------------------------------------------------------------------------
# Distributed setup: plain `python coin.py` is one rank; torchrun sets RANK/WORLD_SIZE (gloo on CPU, nccl on GPU)

def compute_init(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives an elastic restart (--max-restarts), and restarted ranks would read the dead
            # ones' addresses from it and fail to connect (pytorch/pytorch#135712): each restart gets its own keys
            store = dist.PrefixStore(f"restart{os.environ['TORCHELASTIC_RESTART_COUNT']}",
                                     dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world))
        # on GPUs nccl sums the gradients; the step's token count and loss are CPU tensors, which nccl cannot reduce
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world)
    if device.type == "cuda":
        # the adapter computes in fp32 on a bf16 base: TF32 tensor cores instead of plain fp32 (~8x the FLOP rate on
        # A100/H100), still finer than the bf16 the official DeepSpeed runs compute the adapter in
        torch.backends.cuda.matmul.allow_tf32 = True
    pinned = device.type == "cpu" and pins.active()
    if pinned:  # oneDNN (convolutions, GELU) promises the same bits on the same CPU only; MKL's matmul is pinned
        torch.backends.mkldnn.enabled = False
    # pinned, one thread per rank unless --threads says otherwise: the thread count changes reduction orders
    torch.set_num_threads(cfg.threads or (1 if pinned else max(1, (os.cpu_count() or 1) // world)))
    return rank, world, device


def all_reduce_(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_grads(params):
    """Sum the gradients of `params` over ranks with one collective, through one flat fp32 buffer: the adapter's are
    fp32, a bf16 base's projector's bf16, and each goes back in its own dtype. A missing gradient counts as zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off:off + g.numel()].view_as(g).to(g.dtype, copy=True)
        off += g.numel()


# -----------------------------------------------------------------------------
# Training one task: one explicit loop. Gradients are summed across ranks by hand once per optimizer step, or with
# --shard by FSDP's reduce-scatter after each backward (the same sum).

def global_batches(n, global_batch, seed, epochs):
    """Index lists of each optimizer step: a seeded shuffle per epoch, cut into global batches (last one partial)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, global_batch):
            yield order[s:s + global_batch]


def fsdp_fillers(dataset, step_indices, share, micro_batch, n_mine, pad_id):
    """--shard: FSDP gathers weights in every forward and backward, a collective, so every rank must run as many
    micro-batches as rank 0, which holds the most of a global batch (its first `share` records; the last batch of an
    epoch can be short). The missing ones are fillers: a micro-batch with no answer token (labels all -100), whose
    loss and gradients are exactly zero, whatever their dropout masks."""
    n_most = len(rank_micro_batches(len(step_indices), 0, share, micro_batch))
    if n_mine == n_most:
        return []
    filler = collate([dataset[step_indices[0]]], pad_id)
    filler["labels"] = torch.full_like(filler["labels"], -100)
    return [filler] * (n_most - n_mine)


def rank_micro_batches(n, rank, share, micro_batch):
    """This rank's micro-batches of a global batch of n records, as ranges of places in it: its share, a contiguous
    run of `share` places (fewer in a short last batch), cut into micro-batches. They are the micro-batches one rank
    running the whole global batch in micro-batches of this size runs, so N ranks and 1 compute the same sums."""
    places = range(rank * share, min((rank + 1) * share, n))
    return [places[k:k + micro_batch] for k in range(0, len(places), micro_batch)]


def lr_at(step, total, cfg):
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return cfg.lr


def model_inputs(batch, model, device):
    """A collated batch's model inputs on `device`: input_ids, attention_mask and the image tensors (pixel_values;
    image_grid_thw for Qwen2-VL), the pixels in the model's dtype."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and v is not None}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def answer_ce(logits, labels):
    """The sum of the answer tokens' cross-entropies; shifted: position t predicts token t+1 (labels -100 elsewhere)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")


def train_one_task(model, dataset, params, cfg, rank, world, device, seed, desc, midstage=None, info=None,
                   started_from="the base model", method=None):
    """One pass (cfg.epochs) over `dataset`, updating `params` with AdamW; returns the list of step losses (the
    cross-entropy per answer token of each global batch). `method` (methods.py; None: plain fine-tuning) adds its
    loss term and penalty (accumulate_gradients). With `midstage` (a file; `info` is run_info) the stage can stop and
    go on: the state is saved there every cfg.save_every steps and on Ctrl-C, and a run that finds the file continues
    the stage from it, exactly. `started_from` names the weights the stage starts from (and their checksum's state),
    for the non-finite loss message."""
    method = method or Method(cfg)
    opt, pad_id, sharded = adamw(model, params, cfg), dataset.tok.pad_token_id, cfg.shard and world > 1
    share = cfg.micro_batch * cfg.grad_accum  # the records each rank takes a step: global batch / world (batch_plan)
    steps = list(global_batches(len(dataset), share * world, seed, cfg.epochs))
    # anything drawn from torch's stream depends on (seed, stage) only: a resumed run that skips finished stages draws
    # the same (the adapters' dropout masks do not draw from it: each record has a seed of its own, below)
    torch.manual_seed(seed)
    start, losses, last_checkpoint = 0, [], started_from
    if midstage and os.path.exists(midstage):
        start, losses, last_checkpoint = load_midstage(midstage, model, opt, info, setting_defaults(cfg), rank, world,
                                                       device)
        print0(f"{desc}: continuing after step {start} of {len(steps)} ({midstage})")
    model.train()
    bar = cli.progress(range(start, len(steps)), desc=desc, disable=rank != 0, initial=start, total=len(steps))
    with sigint_flag() if midstage else contextlib.nullcontext([]) as stop:
        for step in bar:
            chunks = rank_micro_batches(len(steps[step]), rank, share, cfg.micro_batch)
            micro = [collate([dataset[steps[step][i]] for i in chunk], pad_id) for chunk in chunks]
            # each record's dropout seed, from its place in the global batch: the same masks on any number of ranks,
            # in any micro-batch, and in a resumed run
            seeds = [[moelora.record_seed(seed, step, i) for i in chunk] for chunk in chunks]
            # one all_reduce: the global batch's answer-token count, and whether any rank was sent Ctrl-C
            n_tokens, stopping = all_reduce_(torch.tensor([float(sum((m["labels"] != -100).sum() for m in micro)),
                                                           float(len(stop))]))
            if stopping:  # every rank sees it at the same step: all save together, then stop
                save_midstage(midstage, model, opt, step, losses, info, rank, world, device)
                print0(f"{desc}: interrupted before step {step + 1} of {len(steps)}; saved {midstage}. Run the same "
                       "command again to continue from there.")
                raise SystemExit(130)
            if sharded:
                fillers = fsdp_fillers(dataset, steps[step], share, cfg.micro_batch, len(micro), pad_id)
                micro, seeds = micro + fillers, seeds + [[moelora.record_seed(seed, step, -1)]] * len(fillers)
            loss, term = accumulate_gradients(model, micro, seeds, n_tokens, params, method, sharded, world, device)
            if not math.isfinite(loss + term):  # raise before the step: no weight and no checkpoint sees it
                raise NonFiniteLoss(f"{desc}: the loss is {loss + term} at step {step + 1} of {len(steps)}; stopped "
                                    f"without saving, the last good checkpoint stays ({last_checkpoint}); the "
                                    f"stage started from {started_from}; try a lower --lr (now {cfg.lr})")
            # the optimizer step: clip the global batch's gradient, set this step's lr, AdamW
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, len(steps), cfg) * group["lr_scale"]
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            bar.set_postfix(ce_last20=f"{recent_loss(losses):.3f}",
                            **({"method_term": f"{term:.3g}"} if type(method) is not Method else {}))
            if midstage and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < len(steps):
                save_midstage(midstage, model, opt, step + 1, losses, info, rank, world, device)
                last_checkpoint = f"{midstage}, saved by this run after step {step + 1}, checksum recorded"
    return losses


def recent_loss(losses, n=20):
    """What the progress line and a stage's summary call ce_last20: the mean of the last n steps' cross-entropy per
    answer token (one step's is noisy)."""
    return sum(losses[-n:]) / len(losses[-n:])


def adamw(model, params, cfg):
    """AdamW over `params` in two groups, the projector's with an lr of its own: lr_scale multiplies the schedule's lr
    for the group (stage 0 trains the whole model at one lr)."""
    proj = set() if cfg.stage0 else {id(p) for p in projector(model).parameters()}
    groups = [{"params": [p for p in params if id(p) not in proj], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in proj], "lr_scale": cfg.projector_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def accumulate_gradients(model, micro, seeds, n_tokens, params, method, sharded, world, device):
    """The global batch's gradient in `params`' .grad: each of this rank's micro-batches' loss (the answer tokens'
    cross-entropy sum, plus the method's loss term; `seeds`: each micro-batch's records' dropout seeds, as
    moelora.dropout_records takes them) divided by the global batch's answer-token count `n_tokens`, then
    summed over micro-batches and ranks, so that 1 x N ranks, 2 x N/2 and gradient accumulation give the same step.
    Then the method's penalty, once, on every rank after the sum (the same gradient added to the same sum). Returns
    (the cross-entropy per answer token, the method's loss terms and penalty on that scale).
    NOTE(fidelity): the official trainer averages per micro-batch instead (mean over that micro-batch's tokens, then
    mean over micro-batches and ranks)."""
    sums, penalty_value = torch.zeros(2), 0.0  # (cross-entropy, the method's loss term), summed over answer tokens
    for i, (m, records) in enumerate(zip(micro, seeds)):
        if sharded:  # FSDP reduce-scatters once a step, after the last backward: all_reduce_grads' sum
            model.set_requires_gradient_sync(i == len(micro) - 1)
        inputs = model_inputs(m, model, device)
        # the records' dropout seeds and token counts (right-padded), for the forward and for the backward, where
        # gradient checkpointing runs the forward again
        with moelora.dropout_records(records, m["attention_mask"].sum(1).tolist()):
            logits = model(**inputs).logits  # (B, T, vocab)
            labels = m["labels"].to(device)
            ce = answer_ce(logits, labels)
            term = method.loss_term(model, inputs, logits, labels)
            ((ce if term is None else ce + term) / n_tokens).backward()
        sums[0] += ce.detach().cpu()
        if term is not None:
            sums[1] += term.detach().cpu()
    if world > 1 and not sharded:
        all_reduce_grads(params)  # a sum: each rank already divided by the global batch's token count
    penalty = method.penalty(model)
    if penalty is not None:
        penalty.backward()
        penalty_value = penalty.item()
    sums = all_reduce_(sums)
    return sums[0].item() / n_tokens.item(), penalty_value + sums[1].item() / n_tokens.item()


def record_loss(model, device, dataset, i):
    """Record i's own training loss, its answer tokens' mean cross-entropy (the loss a global batch of that one record
    gives), with its graph: for a method that needs per-record gradients (methods.Stage.record_loss)."""
    batch = collate([dataset[i]], dataset.tok.pad_token_id)
    labels = batch["labels"].to(device)
    return answer_ce(model(**model_inputs(batch, model, device)).logits, labels) / (labels[:, 1:] != -100).sum()


@contextlib.contextmanager
def sigint_flag():
    """While training, Ctrl-C only appends to the list this yields: the step in flight completes, then every rank
    saves a mid-stage checkpoint and the run exits. Elsewhere (loading, evaluating) Ctrl-C stops at once, as usual."""
    flag = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.append(signum))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# The model: the base (any Hugging Face image-text-to-text directory), MoELoRA on its language model, its projector

def load_processor(cfg):
    # the PIL image backend: the official code's CLIPImageProcessor resizes with PIL; with torchvision installed,
    # transformers would otherwise pick its torchvision backend, whose resize gives other pixels
    try:
        return AutoProcessor.from_pretrained(cfg.base, backend="pil")
    except (OSError, ValueError) as e:
        raise cli.UserError(f"--base={cfg.base}: no processor loads from it ({str(e).splitlines()[0]}); give a Hugging "
                            "Face image-text-to-text model folder") from None


def load_base(cfg, device, processor=None):
    """Any Hugging Face image-text-to-text directory (LLaVA, Qwen2-VL, ...) and its processor (`processor`, if the
    caller loaded it already)."""
    processor = processor or load_processor(cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if not sys.stderr.isatty():  # its loading bar would fill a log file with carriage returns
        transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForImageTextToText.from_pretrained(cfg.base, dtype=dtype, attn_implementation=cfg.attn)
    except (OSError, SafetensorError) as e:  # a weight file cut short or damaged: the library's message lacks the path
        raise cli.UserError(f"--base={cfg.base}: its weights do not load ({str(e).splitlines()[0]}); copy or rebuild "
                            "that folder (a download or copy cut short?)") from None
    except ValueError as e:  # a model of another kind (a text-only LM, ...)
        raise cli.UserError(f"--base={cfg.base}: not an image-text-to-text model ({str(e).splitlines()[0]})") from None
    model.to(device)
    if cfg.grad_ckpt:
        # non-reentrant checkpointing: gradients reach the adapters although every block's input (the frozen
        # embeddings) has requires_grad=False; the recomputed forward draws the same dropout masks (the records'
        # seeds, moelora.dropout_records)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def add_adapter(model, cfg, device, method=None, n_stages=1):
    """Freeze the base, let the method wrap its language model's linears for a run of `n_stages` stages
    (methods.Method.add_adapter: MoELoRA, whose init draws from the global RNG, or the method's own adapter; None:
    MoELoRA), and let the projector train along (--train_projector); returns (the parameters that train now, the
    number of wrapped linears)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = (method or Method(cfg)).add_adapter(model, n_stages)
    for p in projector(model).parameters():
        p.requires_grad_(cfg.train_projector)
    if cfg.train_projector:
        train_in_fp32(projector(model))  # the adapters are fp32 already (moelora.py)
    model.to(device)
    return [p for p in model.parameters() if p.requires_grad], len(wrapped)


def train_in_fp32(module):
    """Keep a trainable module of a bf16 model in fp32 (master weights, as DeepSpeed's bf16 mode keeps them: a 2e-4
    AdamW step is below bf16's resolution for most weights, so bf16 weights would mostly not move). Its inputs are
    cast to fp32 on the way in, its output back to the model's dtype on the way out."""
    out_dtype = next(module.parameters()).dtype
    if out_dtype == torch.float32:
        return
    module.float()
    module.register_forward_pre_hook(lambda m, args, kwargs: (
        tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args),
        {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}),
        with_kwargs=True)
    module.register_forward_hook(lambda m, args, out: out.to(out_dtype) if torch.is_tensor(out) else out)


def evaluation_of(cfg, task):
    """(pad the images to a square, max new tokens, strip the question) of `task`'s evaluation under --eval_images and
    --max_new_tokens (data.OFFICIAL_EVAL: what the official evaluation does)."""
    official = data.OFFICIAL_EVAL[task]
    return (official.pad or cfg.eval_images == "pad", cfg.max_new_tokens or official.max_new_tokens, official.strip)


def ground_truth_root(cfg):
    """Where ScienceQA's, TextVQA's and GQA's official ground truth is (eval.score_task): --ground_truth, else the
    image root, as the official scripts keep it; None with --answers_from_test."""
    return None if cfg.answers_from_test else cfg.ground_truth or data.image_root(cfg.data_dir, cfg.image_dir)


def shard_model(model):
    """--shard on several ranks (FSDP2, PyTorch's fully_shard): instead of a full replica, every rank keeps 1/ranks
    of each weight (the frozen base, the adapter, the projector), of each gradient and of AdamW's state; a group's
    weights are gathered whole only for its forward and backward, its gradients reduce-scattered after. Groups: each
    block of the language model (the elements of its ModuleLists: 7B's bulk), and the rest together at the root
    (embeddings, lm_head, the vision tower, the projector: ~1.2 GB at 7B, gathered from forward to backward). The
    vision tower stays in the root's group because generate() runs it on its own, outside the model's forward, which
    FSDP2 allows only for modules without a group of their own. Returns the trainable parameters, new objects
    (fully_shard replaces every parameter with a DTensor); checkpoints still hold whole tensors (checkpoint.whole)."""
    blocks = [block for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
              and "language_model" in name.split(".") for block in m]
    if not blocks:
        raise cli.UserError(f"--shard: {type(model).__name__} has no language_model.* layer list to shard; run "
                            "without --shard")
    for module in [*blocks, model]:  # the blocks first: fully_shard goes bottom-up
        # the root's weights stay gathered from forward to backward, which begins with them (lm_head)
        fully_shard(module, reshard_after_forward=module is not model)
    # FSDP warns that an output tensor is a view (an in-place change to it would skip a gather); coin's loop changes
    # no output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # FSDP averages gradients over ranks by default; coin sums them (as all_reduce_grads), each rank's loss
            # being divided by the global batch's token count already. A plain SUM: gloo has no pre-scaled sum.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def whole_weights(model):
    """Inside, a sharded model (--shard) has every weight gathered whole on every rank, and keeps it so through all
    forwards: in evaluation each rank generates its own share of the records, a different number of forwards per
    rank, which per-block gathering (a collective in every forward) cannot do. Memory: one full replica, as the
    official evaluation (one model per GPU) needs too. An unsharded model is left as it is."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model set it


def evaluate_stage(model, processor, judge, cfg, test_sets, rank, world, stage_name, evaluation=None):
    """Generate and score every task of `test_sets` ({task: test records}); returns ({task: (instruction following,
    general knowledge)}, {task: what the method measured of its evaluation}: `evaluation` is what the method's
    evaluating() context gave, None or an object whose task_done(task) says it, Method.evaluating)."""
    image_dir = data.image_root(cfg.data_dir, cfg.image_dir)
    scores, measured = {}, {}
    for task, records in test_sets.items():
        pad, max_new_tokens, strip = evaluation_of(cfg, task)
        with whole_weights(model):
            preds = evaluate.generate(model, processor, records, image_dir, batch_size=cfg.eval_batch,
                                      max_new_tokens=max_new_tokens, rank=rank, world_size=world,
                                      desc=f"eval {stage_name} {task}", pad_images=pad, strip_question=strip)
        if evaluation is not None:  # on every rank, after the same task: the method may sum over the ranks
            measured[task] = evaluation.task_done(task)
        if rank == 0:
            pred_dir = os.path.join(cfg.out, "predictions", stage_name)
            evaluate.write_jsonl(os.path.join(pred_dir, f"{task}.jsonl"), preds)
            following = evaluate.score_task(task, preds, records, scoring=cfg.scoring,
                                            ground_truth=ground_truth_root(cfg))
            knowledge = judge.score(task, preds, records)
            evaluate.write_jsonl(os.path.join(pred_dir, f"{task}.judge.jsonl"), knowledge["rows"])
            scores[task] = (following["score"], knowledge["score"])
    return scores, measured


# -----------------------------------------------------------------------------
# Before any work: check the inputs and plan the stages

def read_inputs(cfg, tasks, processor):
    """Every task's train and test records, read and checked before any work (data.check_tasks, the code path of
    `python data.py check`): a file that is not a list of records, a malformed record, a missing or unreadable image
    (its header: decoding every image takes minutes at CoIN's size; `data.py check` does), an empty answer or a
    repeated question_id stops the run now, every problem named, or with --skip_bad is dropped, counted and reported.
    Then --data_fraction (seeded per task) and --max_train / --max_test. Returns ({task: train}, {task: test},
    dropped)."""
    image_dir = data.image_root(cfg.data_dir, cfg.image_dir)
    checked = data.check_tasks(cfg.data_dir, tasks, cfg.instructions, image_dir, open_images=False, processor=processor)
    bad = {key: c for key, c in checked.items() if c[2]}
    if bad and not cfg.skip_bad:
        raise cli.UserError("\n".join(data.problem_lines(bad)) + f"\n(`python data.py check --data={cfg.data_dir} "
                            f"--image_dir={image_dir}` lists every problem; --skip_bad drops these records, counted)")
    if bad:
        print0("--skip_bad: dropping bad records\n" + data.check_table(bad))
    empty = [f"{path}: no {'usable ' if problems else ''}records{' (all bad)' if problems else ''}; fix the file, or "
             f"leave {task} out of --tasks" for (task, _), (path, good, problems) in checked.items() if not good]
    if empty:
        raise cli.UserError("\n".join(empty))
    dropped = {f"{task}/{split}": len(c[2]) for (task, split), c in bad.items()}
    if ground_truth_root(cfg):  # a missing ground-truth file fails now, not after hours of training
        for task in tasks:
            data.ground_truth_files(task, ground_truth_root(cfg))
    train_sets, test_sets = {}, {}
    for task in tasks:
        train = checked[task, "train"][1]
        if cfg.data_fraction < 1:  # the same records for a seed, whatever the other settings
            keep = random.Random(f"{cfg.seed}-{task}").sample(range(len(train)),
                                                              max(1, round(cfg.data_fraction * len(train))))
            train = [train[i] for i in sorted(keep)]
        train_sets[task] = train[:cfg.max_train or None]
        test_sets[task] = checked[task, data.eval_split(task)][1][:cfg.max_test or None]
    return train_sets, test_sets, dropped


def plan_stages(cfg, tasks):
    """The stages as data: (name, tasks trained on, tasks evaluated after it, its row of the accuracy matrix).
    Sequential (CoIN): stage j trains task j, then evaluates tasks 1..j. Multi-task (the paper's upper baseline): one
    stage on the union of all train sets, evaluated on every task; its scores fill the matrix's last row."""
    if cfg.multitask:
        return [("MultiTask", list(tasks), list(tasks), len(tasks) - 1)]
    return [(task, [task], tasks[:j + 1], j) for j, task in enumerate(tasks)]


# -----------------------------------------------------------------------------
# After each stage: its scores into the matrices; on resume, the last finished stage's weights back into the model

def record_scores(cfg, tasks, row, scores, if_matrix, gk_matrix, extra):
    """Rank 0: a stage's {task: (instruction following, general knowledge)} into its `row` of both matrices, then
    results.json rewritten; returns the table it prints."""
    for task, (following, knowledge) in scores.items():
        if_matrix[row][tasks.index(task)], gk_matrix[row][tasks.index(task)] = following, knowledge
    if cfg.multitask:  # no sequence, so no MAA or BWT: the mean over tasks is the number
        extra["multitask_average"] = {"if": sum(s[0] for s in scores.values()) / len(scores),
                                      "gk": sum(s[1] for s in scores.values()) / len(scores)}
    return evaluate.write_results(cfg.out, tasks, if_matrix, gk_matrix, extra)


def load_stage(model, cfg, stages, j, device):
    """Load the adapter and projector that finished stage j (-1: none, the adapter stays as it is, fresh) and the
    method's state it saved, each checked against its meta.json's checksum. Returns (what the model now holds, for the
    non-finite loss message; the state, on `device`)."""
    if j < 0:
        return "the base model, with a fresh adapter", {}
    folder = stage_dir(cfg, j, stages[j][0])
    checked, state = load_checkpoint(model, folder, read_json_file(os.path.join(folder, "meta.json")))
    return checked, {k: v.to(device) for k, v in state.items()}


# -----------------------------------------------------------------------------
# The task loop

def describe_evaluation(extra, cfg, tasks, test_records, dropped):
    """What results.json records about how the run evaluates: the records --skip_bad left out, each task's images and
    generation length, and the test records scored (so that `eval.py --predictions` rescores the same ones)."""
    if dropped:
        extra["dropped_records"] = dropped  # per task file
    extra["evaluation"] = {}  # under --eval_images and --max_new_tokens
    for task in tasks:
        pad, max_new_tokens, _ = evaluation_of(cfg, task)
        extra["evaluation"][task] = {"images": "pad" if pad else "crop", "max_new_tokens": max_new_tokens}
    extra["test_records"] = test_records


def stage_of(cfg, stages, tasks, j, train_sets, model, rank, world, device):
    """What the method's hooks are told about stage j (methods.Stage)."""
    return Stage(index=j, name=stages[j][0], count=len(stages), earlier=tasks[:j], train_sets=train_sets,
                 seed=cfg.seed, rank=rank, world=world, device=device,
                 record_loss=functools.partial(record_loss, model, device))


def train_stage(model, processor, method, cfg, stage, stages, train_sets, batches, info, started_from, state, rank,
                world, device):
    """One stage: the method's start (its records), one epoch (train_one_task), the method's end (the state the later
    stages need), the checkpoint (weights and that state). Returns (the state, what the model now holds)."""
    t0, j, (name, train_tasks, _, _) = time.time(), stage.index, stages[stage.index]
    records = method.start_stage(model, stage, [ex for t in train_tasks for ex in train_sets[t]], state)
    params = [p for p in model.parameters() if p.requires_grad]  # the method may have changed what trains
    dataset = data.InstructionDataset(records, processor, data.image_root(cfg.data_dir, cfg.image_dir))
    micro_batch, grad_accum = batches[name]  # this stage's split of its global batch over the ranks (batch_plan)
    stage_cfg = dataclasses.replace(cfg, micro_batch=micro_batch, grad_accum=grad_accum)
    losses = train_one_task(model, dataset, params, stage_cfg, rank, world, device, cfg.seed + j,
                            f"stage {j + 1}/{len(stages)} train {name}",
                            os.path.join(stage_dir(cfg, j, name), MIDSTAGE), info, started_from, method)
    with torch.no_grad():  # the method's penalty at the stage's final weights, to see its scale
        penalty = method.penalty(model)
        notes = {**({"final_penalty": penalty.item()} if penalty is not None else {}), **method.notes(model)}
    state = method.end_stage(model, stage, dataset, state)
    save_checkpoint(model, stage_dir(cfg, j, name), {"stage": j + 1, "task": name, "step": len(losses),
                                                     "final_loss": losses[-1], **notes, **info}, rank, state)
    print0(f"stage {j + 1} {name}: {len(losses)} steps, ce_last20 {recent_loss(losses):.3f}, "
           f"{time.time() - t0:.0f}s" + "".join(f", {k} {v:.4g}" for k, v in notes.items()))
    written = os.path.join(stage_dir(cfg, j, name), "adapter.safetensors")
    return state, f"{written}, written by this run, checksum recorded"


def main(argv):
    # every setting, then every input file, is checked before anything is loaded or written to --out
    cfg = parse_config(argv)
    check_folders(cfg)
    rank, world, device = compute_init(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.stage0:  # build and pretrain the tiny base instead (base_model.py), with this file's loop
        return pretrain_base(cfg, rank, world, device, load_base, train_one_task)
    tasks = data.parse_tasks(cfg.tasks)
    stages = plan_stages(cfg, tasks)
    # read and check every file first (processor only: a 7B model takes minutes to load): a problem fails now
    processor = load_processor(cfg)
    train_sets, test_sets, dropped = read_inputs(cfg, tasks, processor)
    model, processor = load_base(cfg, device, processor)
    batches, global_batch = plan_batches(cfg, stages, world)
    info = run_info(cfg, world, inputs_hash(train_sets, test_sets, model), global_batch)
    done = finished_stages(cfg, stages, info, rank)  # stages an earlier run into --out finished (checkpoint.py)
    method = METHODS[cfg.method](cfg)  # the continual-learning method (methods.py): its hooks below
    _, n_wrapped = add_adapter(model, cfg, device, method, len(stages))
    if cfg.shard and world > 1:  # one rank has nothing to shard over
        shard_model(model)
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{method.describe()}, method {method.name}, on {n_wrapped} linears; trainable {trains:,} of "
           f"{sum(p.numel() for p in model.parameters()):,} parameters before the first stage; global batch "
           f"{global_batch} on {world} rank(s)" + (", sharded (FSDP2)" if cfg.shard and world > 1 else ""))
    micro_batch, grad_accum = batches[stages[0][0]]
    print0(f"each optimizer step: {world} rank(s) x {grad_accum} micro-batch(es) of at most {micro_batch} records "
           "(the global batch is the experiment's, the same on any number of ranks: --global_batch)")
    # the General Knowledge judge, built once, on rank 0 (which does all the scoring)
    judge = None if rank else evaluate.ExactJudge() if cfg.judge == "exact" else evaluate.LMJudge(cfg.judge)
    # which test records the run scores (their question_ids, for eval.py's rescoring) and what they hold: a finished
    # run continued with other ones (--max_test, a regenerated test file) scores its stages again
    test_records = {task: evaluate.test_set_id(recs) for task, recs in test_sets.items()}
    test_content = {task: hashlib.sha1(json.dumps(recs, sort_keys=True).encode()).hexdigest()
                    for task, recs in test_sets.items()}
    if_matrix, gk_matrix, extra = load_results(cfg, tasks, [row for *_, row in stages[:done]], info, test_content)
    describe_evaluation(extra, cfg, tasks, test_records, dropped)
    extra["test_content"] = test_content
    if cfg.zero_shot and "zero_shot" not in extra:  # the base on every task: the row before the first stage
        t0 = time.time()
        base_scores, _ = evaluate_stage(model, processor, judge, cfg, test_sets, rank, world, "stage0-zeroshot")
        extra["zero_shot"] = {task: {"if": s[0], "gk": s[1]} for task, s in base_scores.items()}
        extra["timing"]["zero_shot_eval"] = time.time() - t0
    # the checkpoint to go on from (the weights and the method's state the last finished stage left) loads and is
    # checked before results.json is written: a run that cannot go on leaves an earlier run's results as they were
    if done:
        print0(f"{cfg.out}: an earlier run finished {done} of {len(stages)} stages; continuing after stage {done}")
    holds = done - 1  # the stage whose weights the model holds
    started_from, state = load_stage(model, cfg, stages, holds, device)
    if rank == 0:
        table = evaluate.write_results(cfg.out, tasks, if_matrix, gk_matrix, extra)
    # the paper's loop: for each task the method's start, train, the method's end, save, evaluate every task seen so far
    for j, (name, train_tasks, eval_tasks, row) in enumerate(stages):
        stage_name = f"stage{j + 1}-{name}"
        if j < done and if_matrix[row][tasks.index(eval_tasks[-1])] is not None:
            continue  # trained and scored by an earlier run
        t0, stage = time.time(), stage_of(cfg, stages, tasks, j, train_sets, model, rank, world, device)
        wanted = j if j < done else j - 1  # a finished stage is scored with its own weights; a new one trains on
        if holds != wanted:  # (only after finished stages were scored again under other evaluation settings)
            holds = wanted
            started_from, state = load_stage(model, cfg, stages, holds, device)
        if j >= done:  # (from the stage's mid-stage checkpoint, if an earlier run left one)
            state, started_from = train_stage(model, processor, method, cfg, stage, stages, train_sets, batches, info,
                                              started_from, state, rank, world, device)
            holds = j
        t_train, t0 = time.time() - t0, time.time()
        with method.evaluating(model, stage, state) as evaluation:
            scores, measured = evaluate_stage(model, processor, judge, cfg, {t: test_sets[t] for t in eval_tasks},
                                              rank, world, stage_name, evaluation)
        extra["timing"][stage_name] = {"train": t_train, "eval": time.time() - t0}
        if measured:  # e.g. a test-time router's accuracy: {task: {"routed": share}}
            extra.setdefault("measured", {})[stage_name] = measured
        if rank == 0:
            print0(f"stage {j + 1} {name} scores: " + ", ".join(
                f"{t} {s[0]:.1f}" + "".join(f" ({k} {v:.3g})" for k, v in measured.get(t, {}).items())
                for t, s in scores.items()))
            table = record_scores(cfg, tasks, row, scores, if_matrix, gk_matrix, extra)
    if rank == 0:
        print0(table)
        print0(f"results: {os.path.join(cfg.out, 'results.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["assemble"]:  # assemble the LLaVA-1.5 base from its parts (base_model.py)
        cli.run(assemble_main, sys.argv[2:])
    else:
        cli.run(main, sys.argv[1:])
