"""
coin's training step and batched generation at LLaVA-1.5-7B's exact shapes, measured: random weights, no download.

The model is built on the meta device (no memory), gets coin's adapter there (coin.add_adapter: MoELoRA on every
language-model linear, the projector trainable in fp32), is sharded if asked (coin.shard_model, FSDP2), and only then
materialised on the device (to_empty) and initialised: the base in bf16, the adapter and projector in fp32, as
`coin.py --dtype=bfloat16` trains them. One configuration = adapter x dropout x gradient checkpointing x sharding;
for each it measures, at every micro-batch, the time of coin's optimizer step (forward, sum of answer-token CE over
the token count, backward, clip, AdamW), tokens/s, FLOP utilisation, the memory held between steps (weights and
AdamW state: this rank's shards when sharded) and the peak memory of the device; then the throughput of batched
greedy generation.

FLOPs: counted by torch's FlopCounterMode (every matmul and attention kernel, forward and backward) in one step at
micro-batch 1 with gradient checkpointing off, times the micro-batch (matmul FLOPs grow linearly with it at a fixed
sequence length): the model's FLOPs, without recomputation. Backward through the frozen base computes input
gradients only, so a step is ~4 x 7B x tokens, not the 6 x of full fine-tuning. Utilisation = those FLOPs / step time
/ the peak of one large bf16 matmul measured in the same run (and / the spec-sheet dense bf16 peak for known GPUs).

Shapes ("7b", the real configs: lmsys/vicuna-7b-v1.5 and openai/clip-vit-large-patch14-336 config.json, LLaVA-1.5's
projector and feature layer): Llama d=4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000 + 1 (<image>, as
`coin.py assemble` adds it); CLIP ViT-L/14 at 336 px (576 patches + CLS), d=1024, 24 layers, 16 heads, MLP 4096,
features from layer -2; a sequence of --seq tokens: <s>, the 576 image tokens, text, the last --answer tokens the
answer. "tiny" runs the same code at toy sizes on a CPU in seconds (tests/test_bench.py).

    python bench/llava7b.py [--shapes=7b|tiny] [--adapters=lora,moelora] [--dropout=0,0.05] [--grad_ckpt=1]
        [--shard=0] [--micro_batches=1,4,8,16] [--steps=2] [--gen_batches=16,64] [--new_tokens=32]
        [--budget_s=0] [--out=FILE.jsonl]
    torchrun --nproc_per_node=8 bench/llava7b.py --shard=1 ...   (memory per GPU when sharded over 8)

Lists (comma-separated) multiply into configurations. --budget_s stops starting new measurements after that many
seconds (0: no limit); --out appends one JSON line per measurement. A micro-batch that does not fit prints OOM.
"""
import json
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coin  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import moelora  # noqa: E402
from moelora import MoELoRALinear  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

SHAPES = {
    "7b": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
           "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32001, max_position_embeddings=4096, rms_norm_eps=1e-5),
           "seq": 700, "answer": 32, "r": 128, "alpha": 256.0},  # the official r and alpha
    "tiny": {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14, hidden_act="quick_gelu"),
             "text": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=101, max_position_embeddings=128),
             "seq": 24, "answer": 6, "r": 8, "alpha": 16.0},
}
EXPERTS = {"lora": 1, "moelora": 8}
SPEC_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "RTX 4090": 165, "RTX 3090": 71}


def llava_config(shapes):
    """LLaVA-1.5's configuration at SHAPES[shapes]: CLIP features from layer -2 without CLS, a 2-layer GELU projector,
    the image token the last of the vocabulary."""
    s = SHAPES[shapes]
    return LlavaConfig(vision_config=CLIPVisionConfig(**s["vision"]), text_config=LlamaConfig(**s["text"]),
                       image_token_index=s["text"]["vocab_size"] - 1,
                       image_seq_length=(s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build(shapes, adapter, dropout, grad_ckpt, shard, device):
    """The model on `device`: the base in bf16 with coin's adapter (and sharded with shard=True), random weights.
    Gradient checkpointing goes on after the FLOPs are counted (measure_training)."""
    s = SHAPES[shapes]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(llava_config(shapes), dtype=torch.bfloat16,
                                                           attn_implementation="sdpa")
    cfg = coin.Config(lora_r=s["r"], lora_alpha=s["alpha"], experts=EXPERTS[adapter], lora_dropout=dropout,
                      grad_ckpt=grad_ckpt, dtype="bfloat16")
    params, _ = coin.add_adapter(model, cfg, torch.device("meta"))
    if shard:
        params = coin.shard_model(model)
    model.to_empty(device=device)  # every rank allocates only its shards
    with torch.no_grad():
        model.initialize_weights()  # Hugging Face's init (also the rotary and position buffers)
        for m in model.modules():
            if isinstance(m, MoELoRALinear):  # as MoELoRALinear draws them
                m.lora_A.normal_(0, 0.01)
                m.lora_B.zero_()
    model.train()
    return model, params, cfg


def batch(shapes, micro_batch, device, seed=0, seq=None, answer=None):
    """micro_batch sequences of `seq` tokens (the shapes' own by default): <s>, the image's tokens, random text; the
    loss on the last `answer`."""
    s = SHAPES[shapes]
    seq, answer = seq or s["seq"], answer or s["answer"]
    image_token, px = s["text"]["vocab_size"] - 1, s["vision"]["image_size"]
    n_image = (px // s["vision"]["patch_size"]) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, image_token, (micro_batch, seq - n_image), generator=g)
    ids = torch.cat([text[:, :1], torch.full((micro_batch, n_image), image_token), text[:, 1:]], dim=1)  # (B, seq)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(micro_batch, 3, px, px, generator=g).to(device, torch.bfloat16),
            "labels": labels.to(device)}


def train_step(model, opt, params, b):
    """coin.py's optimizer step on one micro-batch: sum of answer-token CE / answer tokens, backward, clip, AdamW."""
    with moelora.dropout_records(range(len(b["input_ids"]))):  # each record's dropout seed, as coin.py's step
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits  # (B, T, vocab)
        (coin.answer_ce(logits, b["labels"]) / (b["labels"][:, 1:] != -100).sum()).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def state_gib(device):
    """Memory held between steps: weights, AdamW state (this rank's shards with --shard=1)."""
    return torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def matmul_peak(device, n=8192, reps=10):
    """FLOP/s of one large bf16 matmul on this device (fp32 on a CPU, smaller)."""
    dtype, n = (torch.bfloat16, n) if device.type == "cuda" else (torch.float32, 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def step_flops(model, opt, params, shapes, device):
    """Model FLOPs of one step at micro-batch 1, counted (before gradient checkpointing is on: no recomputation)."""
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, params, batch(shapes, 1, device))
    return counter.get_total_flops()


def measure_training(model, params, cfg, opts, device, peak, emit):
    opt = torch.optim.AdamW(params, lr=1e-5)  # the same state as coin's two groups (lr aside)
    flops_per_sequence = step_flops(model, opt, params, opts["shapes"], device)
    if cfg.grad_ckpt:  # as coin.load_base sets it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for micro_batch in [int(x) for x in opts["micro_batches"].split(",")]:
        if opts["budget_s"] and time.time() - T0 > opts["budget_s"]:
            return emit({"skipped": "budget", "micro_batch": micro_batch})
        b = batch(opts["shapes"], micro_batch, device)
        reset_peak(device)
        try:
            train_step(model, opt, params, b)  # warm-up
            sync(device)
            state = state_gib(device)
            t = time.perf_counter()
            for _ in range(opts["steps"]):
                train_step(model, opt, params, b)
            sync(device)
            step_s = (time.perf_counter() - t) / opts["steps"]
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            emit({"micro_batch": micro_batch, "oom": True, "peak_gib": peak_gib(device)})
            continue
        tokens = micro_batch * b["input_ids"].shape[1]
        emit({"micro_batch": micro_batch, "tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
              "tflop_per_step": flops_per_sequence * micro_batch / 1e12,
              "mfu": flops_per_sequence * micro_batch / step_s / peak, "state_gib": state,
              "peak_gib": peak_gib(device)})


def measure_generation(model, opts, device, emit):
    """Batched greedy generation of --new_tokens (all of them: min_new_tokens) after an image and --seq prompt."""
    model.eval()
    for gen_batch in [int(x) for x in opts["gen_batches"].split(",") if x]:
        if opts["budget_s"] and time.time() - T0 > opts["budget_s"]:
            return emit({"skipped": "budget", "gen_batch": gen_batch})
        b = batch(opts["shapes"], gen_batch, device, seed=1)
        b.pop("labels")
        reset_peak(device)
        try:
            with torch.no_grad(), coin.whole_weights(model):
                generate = lambda: model.generate(**b, do_sample=False, max_new_tokens=opts["new_tokens"],
                                                  min_new_tokens=opts["new_tokens"], pad_token_id=0)
                generate()  # warm-up
                sync(device)
                t = time.perf_counter()
                out = generate()
                sync(device)
                gen_s = time.perf_counter() - t
        except torch.OutOfMemoryError:
            emit({"gen_batch": gen_batch, "oom": True})
            continue
        new = out.shape[1] - b["input_ids"].shape[1]
        emit({"gen_batch": gen_batch, "new_tokens": new, "gen_s": gen_s, "gen_tokens_per_s": gen_batch * new / gen_s,
              "peak_gib": peak_gib(device)})
    model.train()


def fmt(row):
    """One printed line of a measurement."""
    keys = [("micro_batch", "mb {}"), ("gen_batch", "generate batch {}"), ("oom", "OOM"), ("skipped", "skipped ({})"),
            ("step_s", "step {:.3f} s"), ("tokens_per_s", "{:,.0f} tok/s"), ("tflop_per_step", "{:.3g} TFLOP"),
            ("mfu", "MFU {:.1%}"), ("new_tokens", "{} new tokens"), ("gen_s", "{:.2f} s"),
            ("gen_tokens_per_s", "{:,.0f} new tok/s"), ("state_gib", "held {:.2f} GiB"),
            ("peak_gib", "peak {:.2f} GiB")]
    return " | ".join(f.format(row[k]) for k, f in keys if row.get(k) not in (None, False))


def init_distributed(device):
    """The process group coin.shard_model needs: torchrun's, or one rank of our own."""
    if dist.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


T0 = time.time()


@dataclasses.dataclass
class Settings:
    shapes: str = "7b"                    # 7b (LLaVA-1.5-7B's exact shapes) | tiny (a few small layers, for a CPU)
    adapters: str = "lora,moelora"       # comma-separated: lora (E=1) and/or moelora (E=8), r=128 at 7b
    dropout: str = "0,0.05"              # adapter dropout values to measure, comma-separated
    grad_ckpt: str = "1"                 # gradient checkpointing: 1, 0, or "0,1" for both
    shard: str = "0"                     # FSDP2 sharding over the ranks: 1, 0, or "0,1" for both
    micro_batches: str = "1,4,8,16"      # micro-batch sizes to measure
    steps: int = 2                       # timed steps per micro-batch (after one warm-up step)
    gen_batches: str = "16,64"           # batch sizes for the generation throughput
    new_tokens: int = 32                 # tokens generated per sequence in the generation measurement
    budget_s: float = 0.0                # stop starting new measurements after this many seconds (0 = no limit)
    out: str = ""                        # a .jsonl file to append every measurement to ("" = print only)


def main(argv):
    opts = dataclasses.asdict(cli.parse(Settings, argv, __doc__)[0])
    if opts["shapes"] not in SHAPES:
        sys.exit(f"--shapes={opts['shapes']}: choose from {', '.join(SHAPES)}")
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as coin.compute_init: the fp32 adapter on TF32 tensor cores
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    world = int(os.environ.get("WORLD_SIZE", 1))
    header = {"device": name, "world_size": world, "matmul_peak_tflops": peak / 1e12, "spec_bf16_tflops": spec,
              "shapes": opts["shapes"], "torch": torch.__version__}
    if rank == 0:
        print(f"{name} x {world}: one large matmul {peak / 1e12:.1f} TFLOP/s"
              + (f" (spec-sheet dense bf16: {spec} TFLOP/s)" if spec else "") + f"; shapes {opts['shapes']}",
              flush=True)

    def emit(row):
        if rank:
            return
        print("  " + fmt(row), flush=True)
        if opts["out"]:
            with open(opts["out"], "a") as f:
                f.write(json.dumps({**header, **config, **row}) + "\n")

    for adapter in opts["adapters"].split(","):
        for dropout in [float(x) for x in opts["dropout"].split(",")]:
            for grad_ckpt in [x == "1" for x in opts["grad_ckpt"].split(",")]:
                for shard in [x == "1" for x in opts["shard"].split(",")]:
                    config = {"adapter": adapter, "dropout": dropout, "grad_ckpt": grad_ckpt, "shard": shard}
                    if opts["budget_s"] and time.time() - T0 > opts["budget_s"]:
                        emit({"skipped": "budget"})
                        continue
                    if shard:
                        init_distributed(device)
                    model, params, cfg = build(opts["shapes"], adapter, dropout, grad_ckpt, shard, device)
                    if rank == 0:
                        trainable = sum(p.numel() for p in params)
                        total = sum(p.numel() for p in model.parameters())
                        print(f"{adapter} (E={cfg.experts}, r={cfg.lora_r}), dropout {dropout}, grad_ckpt "
                              f"{grad_ckpt}, shard {shard}: {total:,} parameters, {trainable:,} trainable", flush=True)
                    measure_training(model, params, cfg, opts, device, peak, emit)
                    measure_generation(model, opts, device, emit)
                    del model, params
                    reset_peak(device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
