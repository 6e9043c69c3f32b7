"""
coin: continual instruction tuning of a multimodal LLM (CoIN, arXiv 2403.08350), from scratch.

Reads top to bottom: config -> DDP setup -> load the base -> inject MoELoRA -> for each task: train one epoch, save,
evaluate on every task seen so far -> results. `python coin.py --help` lists the settings.
"""
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor, CLIPVisionConfig,
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

import data
import eval as evaluate
from data import collate
from moelora import add_moelora, load_moelora_state_dict, mark_only_moelora_trainable, moelora_state_dict

# -----------------------------------------------------------------------------
# The embedded default's base: a tiny LLaVA of the real Hugging Face class, saved as an ordinary model directory
# (CLIP vision tower, 2-layer GELU projector, Llama LM, byte-level BPE tokenizer trained offline, CLIP image
# processor). It loads with from_pretrained exactly like llava-hf/llava-1.5-7b-hf; `--stage0` pretrains it.

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", data.IMAGE_TOKEN]


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE (as Llama-3/GPT-2 use), trained on the corpus; <s> prepended like Llama's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": data.IMAGE_TOKEN})
    # The system prompt opens every sequence; one token for it saves ~30 positions per example on a CPU.
    fast.add_tokens([data.SYSTEM])
    return fast


def build_tiny_base(out_dir, texts, image_size=48, patch_size=8, vision_dim=64, vision_layers=3, text_dim=128,
                    text_layers=4, heads=4, vocab_size=1000, seed=0):
    """Write a random-initialised tiny LLaVA (model + processor) to out_dir; returns (model, processor)."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=4 * vision_dim,
                                       num_hidden_layers=vision_layers, num_attention_heads=heads,
                                       image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(hidden_size=text_dim, intermediate_size=3 * text_dim, num_hidden_layers=text_layers,
                                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                                max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids(data.IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def corpus_texts(data_dir):
    """Every prompt and answer of CoIN-mini's train sets (all instruction sets) and its stage-0 corpus."""
    texts = []
    for iset in data.INSTRUCTIONS:
        for task in data.TASKS + ["Stage0"]:
            for ex in data.train_examples(data_dir, task, iset):
                texts.append(data.build_prompt(ex["question"], ex["image"] is not None))
                texts.append(" " + ex["answer"])
    return texts


# -----------------------------------------------------------------------------
# Config: one setting a line; override any with --key=value (unknown keys and wrong types are errors)

@dataclasses.dataclass
class Config:
    # --- data
    data_dir: str = "data/coin-mini"      # folder holding Instructions_*/ (`python data.py mini` writes CoIN-mini)
    image_dir: str = ""                   # image root; "" means <data_dir>/images
    instructions: str = "Original"        # instruction set: Original | Diverse | 10Type
    tasks: str = "all"                    # all | alphabet | comma-separated task names, in training order
    max_train: int = 0                    # use at most this many train records per task (0 = all)
    max_test: int = 0                     # evaluate on at most this many test records per task (0 = all)
    # --- model
    base: str = "assets/tiny-llava"       # a Hugging Face LLaVA directory (the pretrain-only base)
    dtype: str = "float32"                # float32 | bfloat16
    # --- adapter
    lora_r: int = 16                      # total rank r, split over the experts (official: 128)
    lora_alpha: float = 32.0              # scaling alpha / r (official: 256 / 128 = 2)
    experts: int = 8                      # E; 1 = plain LoRA, the baseline (official: 8)
    lora_dropout: float = 0.05            # official: 0.05
    train_projector: bool = True          # the projector trains along with the adapter, as in CoIN
    # --- optim
    lr: float = 2e-3                      # official 2e-4 at 7B; the tiny model wants a larger step
    micro_batch: int = 16                 # per rank, per forward
    grad_accum: int = 1                   # global_batch = micro_batch * world_size * grad_accum
    epochs: int = 1                       # CoIN trains one epoch per task
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "constant"            # constant (what the official DeepSpeed config runs) | cosine
    max_grad_norm: float = 1.0
    # --- eval
    eval_batch: int = 64
    max_new_tokens: int = 24
    scoring: str = "official"             # official | fixed (see README: the official scorers' quirks)
    judge: str = "exact"                  # General Knowledge judge: exact (CoIN-mini) | path to a HF causal LM
    zero_shot: bool = True                # evaluate the base on every task before the first stage
    # --- run
    out: str = "out/run"
    seed: int = 0
    threads: int = 0                      # torch threads per rank; 0 = cores / ranks
    stage0: bool = False                  # pretrain the tiny base on CoIN-mini's caption corpus instead
    stage0_epochs: int = 4                # stage 0: full fine-tuning of the whole tiny model on captions
    stage0_lr: float = 1e-3               # with a cosine schedule


def parse_config(argv):
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nSettings (--key=value):")
            for f in fields.values():
                print(f"  --{f.name}={getattr(cfg, f.name)!r}")
            sys.exit(0)
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in fields:
            close = [k for k in fields if key.split("_")[0] in k]
            raise SystemExit(f"unknown setting {arg!r}" + (f" (did you mean {', '.join('--' + c for c in close)}?)"
                                                          if close else "; see python coin.py --help"))
        typ = type(getattr(cfg, key))
        if typ is bool:
            if val.lower() not in ("", "1", "true", "0", "false"):
                raise SystemExit(f"--{key} takes true/false, not {val!r}")
            setattr(cfg, key, not eq or val.lower() in ("1", "true"))
            continue
        try:
            setattr(cfg, key, typ(val))
        except ValueError:
            raise SystemExit(f"--{key} takes a {typ.__name__}, not {val!r}") from None
    data.parse_tasks(cfg.tasks)  # fail now on an unknown task name
    for key, allowed in (("instructions", data.INSTRUCTIONS), ("schedule", ("constant", "cosine")),
                         ("scoring", ("official", "fixed")), ("dtype", ("float32", "bfloat16"))):
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)!r}: choose from {', '.join(allowed)}")
    return cfg


# -----------------------------------------------------------------------------
# Distributed setup: plain `python coin.py` is one rank; torchrun sets RANK/WORLD_SIZE (gloo on CPU, nccl on GPU)

def compute_init(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def all_reduce_(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------
# Training one task: one explicit loop. Gradients are averaged across ranks by hand, once per optimizer step.

def global_batches(n, global_batch, seed, epochs):
    """Index lists of each optimizer step: a seeded shuffle per epoch, cut into global batches (last one partial)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, global_batch):
            yield order[s:s + global_batch]


def lr_at(step, total, cfg):
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return cfg.lr


def train_one_task(model, dataset, params, cfg, rank, world, device, seed, desc):
    """One pass (cfg.epochs) over `dataset`, updating `params` with AdamW; returns the list of step losses.
    Loss = sum of answer-token cross-entropies / answer tokens in the whole global batch, so that 1 x N ranks,
    2 x N/2 and gradient accumulation give the same step. NOTE(fidelity): the official trainer averages per
    micro-batch instead (mean over that micro-batch's tokens, then mean over micro-batches and ranks)."""
    pad_id = dataset.tok.pad_token_id
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    global_batch = cfg.micro_batch * world * cfg.grad_accum
    steps = list(global_batches(len(dataset), global_batch, seed, cfg.epochs))
    model.train()
    losses = []
    bar = tqdm(steps, desc=desc, disable=rank != 0, leave=False, mininterval=2)
    for step, idx in enumerate(bar):
        mine = idx[rank::world]  # this rank's share of the global batch
        micro = [collate([dataset[i] for i in mine[k:k + cfg.micro_batch]], pad_id)
                 for k in range(0, len(mine), cfg.micro_batch)]
        n_tokens = all_reduce_(torch.tensor([float(sum((m["labels"] != -100).sum() for m in micro))]))[0]
        loss_sum = torch.zeros(1)
        for m in micro:
            logits = model(input_ids=m["input_ids"].to(device), attention_mask=m["attention_mask"].to(device),
                           pixel_values=None if m["pixel_values"] is None else
                           m["pixel_values"].to(device, dtype=model.dtype)).logits
            labels = m["labels"].to(device)
            # shift: position t predicts token t+1
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
            (ce / n_tokens).backward()
            loss_sum += ce.detach().cpu()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)  # sum over ranks: each rank already divided by the global token count
            off = 0
            for p, g in zip(params, grads):
                p.grad = flat[off:off + g.numel()].view_as(g).clone()
                off += g.numel()
        loss = all_reduce_(loss_sum)[0].item() / n_tokens.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss} at step {step}; stopping (last checkpoint kept)")
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(steps), cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


# -----------------------------------------------------------------------------
# Checkpoints: adapter + projector as safetensors with a readable meta.json, written atomically

def trainable_state_dict(model):
    sd = moelora_state_dict(model)
    sd.update({f"projector.{k}": v for k, v in projector(model).state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(model, cfg, stage_dir, meta):
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, "adapter.safetensors")
    save_file(trainable_state_dict(model), path + ".tmp")
    os.replace(path + ".tmp", path)
    meta = {**meta, "config": dataclasses.asdict(cfg), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}
    with open(os.path.join(stage_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(stage_dir, "meta.json.tmp"), os.path.join(stage_dir, "meta.json"))


def load_checkpoint(model, path):
    sd = load_file(path)
    proj = {k.removeprefix("projector."): v for k, v in sd.items() if k.startswith("projector.")}
    load_moelora_state_dict(model, {k: v for k, v in sd.items() if not k.startswith("projector.")})
    projector(model).load_state_dict(proj, strict=True)


# -----------------------------------------------------------------------------
# The model

def projector(model):
    return model.model.multi_modal_projector


def load_base(cfg, device):
    if not os.path.isdir(cfg.base):
        raise SystemExit(f"--base={cfg.base}: no such model directory (the embedded default is made by "
                         "`python coin.py --stage0`; see run.sh)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = AutoModelForImageTextToText.from_pretrained(cfg.base, dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(cfg.base)
    return model, processor


def evaluate_stage(model, processor, judge, cfg, tasks, rank, world, stage_name):
    """Generate and score every task in `tasks`; returns {task: (instruction following, general knowledge)}."""
    image_dir = cfg.image_dir or os.path.join(cfg.data_dir, "images")
    scores = {}
    for task in tasks:
        records = data.test_examples(cfg.data_dir, task, cfg.instructions)
        records = records[:cfg.max_test] if cfg.max_test else records
        preds = evaluate.generate(model, processor, records, image_dir, batch_size=cfg.eval_batch,
                                  max_new_tokens=cfg.max_new_tokens, rank=rank, world_size=world,
                                  desc=f"eval {stage_name} {task}")
        if rank == 0:
            pred_dir = os.path.join(cfg.out, "predictions", stage_name)
            evaluate.write_jsonl(os.path.join(pred_dir, f"{task}.jsonl"), preds)
            ann = os.path.join(cfg.data_dir, "annotations")  # official ground-truth files, where present
            s_if = evaluate.score_task(task, preds, records, scoring=cfg.scoring,
                                       annotations=ann if os.path.isdir(ann) else None)
            s_gk = judge.score(task, preds, records)
            evaluate.write_jsonl(os.path.join(pred_dir, f"{task}.judge.jsonl"), s_gk["rows"])
            scores[task] = (s_if["score"], s_gk["score"])
    return scores


# -----------------------------------------------------------------------------
# Stage 0: pretrain the tiny base on captions (full fine-tuning, the same loop), as LLaVA's base saw captions only

def pretrain_base(cfg, rank, world, device):
    texts = corpus_texts(cfg.data_dir)
    if rank == 0:
        build_tiny_base(cfg.base, texts, seed=cfg.seed)
    if world > 1:
        dist.barrier()
    model, processor = load_base(cfg, device)
    examples = data.train_examples(cfg.data_dir, "Stage0", cfg.instructions)
    ds = data.InstructionDataset(examples, processor, cfg.image_dir or os.path.join(cfg.data_dir, "images"))
    params = [p for p in model.parameters()]
    t0 = time.time()
    losses = train_one_task(model, ds, params, cfg, rank, world, device, cfg.seed, "stage-0 captions")
    print0(f"stage 0: {len(losses)} steps in {time.time() - t0:.0f}s, loss {losses[0]:.2f} -> "
           f"{sum(losses[-20:]) / 20:.2f}")
    if rank == 0:
        model.save_pretrained(cfg.base)
        processor.save_pretrained(cfg.base)
        print0(f"wrote the pretrained tiny base to {cfg.base}")


# -----------------------------------------------------------------------------
# The task loop

def main(argv):
    cfg = parse_config(argv)
    rank, world, device = compute_init(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.stage0:
        cfg.epochs, cfg.lr, cfg.schedule = cfg.stage0_epochs, cfg.stage0_lr, "cosine"
        return pretrain_base(cfg, rank, world, device)
    tasks = data.parse_tasks(cfg.tasks)
    image_dir = cfg.image_dir or os.path.join(cfg.data_dir, "images")
    train_sets = {t: data.train_examples(cfg.data_dir, t, cfg.instructions) for t in tasks}  # fail early on bad files
    model, processor = load_base(cfg, device)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = add_moelora(model, None, cfg.lora_r, cfg.lora_alpha, cfg.experts, cfg.lora_dropout)
    mark_only_moelora_trainable(model)
    for p in projector(model).parameters():
        p.requires_grad_(cfg.train_projector)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    print0(f"MoELoRA E={cfg.experts} r={cfg.lora_r} on {len(wrapped)} linears; trainable "
           f"{sum(p.numel() for p in params):,} of {sum(p.numel() for p in model.parameters()):,} parameters; "
           f"global batch {cfg.micro_batch * world * cfg.grad_accum} on {world} rank(s)")
    # the General Knowledge judge, built once, on rank 0 (which does all the scoring)
    judge = None if rank else evaluate.ExactJudge() if cfg.judge == "exact" else evaluate.LMJudge(cfg.judge)
    T = len(tasks)
    if_matrix = [[None] * T for _ in range(T)]
    gk_matrix = [[None] * T for _ in range(T)]
    extra = {"config": dataclasses.asdict(cfg), "world_size": world, "timing": {}}
    if cfg.zero_shot:
        t0 = time.time()
        zs = evaluate_stage(model, processor, judge, cfg, tasks, rank, world, "stage0-zeroshot")
        extra["zero_shot"] = {t: {"if": s[0], "gk": s[1]} for t, s in zs.items()}
        extra["timing"]["zero_shot_eval"] = time.time() - t0
    for j, task in enumerate(tasks):
        examples = train_sets[task][:cfg.max_train] if cfg.max_train else train_sets[task]
        ds = data.InstructionDataset(examples, processor, image_dir)
        t0 = time.time()
        losses = train_one_task(model, ds, params, cfg, rank, world, device, cfg.seed + j,
                                f"stage {j + 1}/{T} train {task}")
        t_train = time.time() - t0
        stage_name = f"stage{j + 1}-{task}"
        if rank == 0:
            save_checkpoint(model, cfg, os.path.join(cfg.out, "checkpoints", stage_name),
                            {"stage": j + 1, "task": task, "steps": len(losses), "final_loss": losses[-1],
                             "seed": cfg.seed, "global_batch": cfg.micro_batch * world * cfg.grad_accum})
        t0 = time.time()
        scores = evaluate_stage(model, processor, judge, cfg, tasks[:j + 1], rank, world, stage_name)
        extra["timing"][stage_name] = {"train": t_train, "eval": time.time() - t0}
        if rank == 0:
            for i, t in enumerate(tasks[:j + 1]):
                if_matrix[j][i], gk_matrix[j][i] = scores[t]
            print0(f"stage {j + 1} {task}: {len(losses)} steps, loss {losses[-1]:.3f}, {t_train:.0f}s; scores "
                   + ", ".join(f"{t} {s[0]:.1f}" for t, s in scores.items()))
            table = evaluate.write_results(cfg.out, tasks, if_matrix, gk_matrix, extra)
    if rank == 0:
        print0(table)
        print0(f"results: {os.path.join(cfg.out, 'results.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
