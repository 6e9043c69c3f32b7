"""
The base models coin trains on: which module of a base is its projector; the tiny LLaVA of the embedded default, built
and pretrained here (stage 0, `python coin.py --stage0`); the pretrain-only LLaVA-1.5-7B, assembled from its three
public parts (`python coin.py assemble ...`).
"""
import dataclasses
import importlib.util
import logging
import os
import time

import torch
import torch.distributed as dist
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

import cli
import data
from cli import print0

# -----------------------------------------------------------------------------
# The projector: the module that maps vision features into the language model's space (it trains with the adapter)

PROJECTORS = ("multi_modal_projector",  # LLaVA: Linear, GELU, Linear
              "visual.merger")          # Qwen2-VL: the patch merger at the end of its vision tower


def projector(model):
    for name in PROJECTORS:
        try:
            return model.model.get_submodule(name)
        except AttributeError:
            pass
    raise cli.UserError(f"{type(model).__name__}: no projector found (looked for model."
                        f"{', model.'.join(PROJECTORS)}); add its module name to base_model.PROJECTORS")


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


def clip_image_processor():
    """transformers' CLIPImageProcessor class. Without torchvision (a CPU install of coin's requirements) transformers
    hands out its PIL implementation under that name, the one coin means, and logs a warning saying so at every start
    (once per rank); that one warning is filtered out here, where the class is taken."""
    logger = logging.getLogger("transformers.utils.import_utils")
    def quiet(record):
        return "requires torchvision (not installed)" not in record.getMessage()
    logger.addFilter(quiet)
    try:
        return transformers.CLIPImageProcessor
    finally:
        logger.removeFilter(quiet)


def build_tiny_base(out_dir, texts, image_size=48, patch_size=8, vision_dim=128, vision_layers=4, text_dim=128,
                    text_layers=4, heads=4, vocab_size=1000, seed=0):
    """Write a random-initialised tiny LLaVA (model + processor) to out_dir; returns (model, processor)."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size)
    image_processor = clip_image_processor()(size={"shortest_edge": image_size},
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
    for instruction_set in data.INSTRUCTIONS:
        restyled = data.asd_share(instruction_set) is not None  # an ASD set has no stage-0 corpus of its own
        for task in data.TASKS + ["Stage0"] * (not restyled):
            for ex in data.train_examples(data_dir, task, instruction_set):
                prompt = data.build_prompt(ex["question"], ex["image"] is not None, answer=ex["answer"])
                texts += [prompt.text, prompt.answer]
    return texts


# -----------------------------------------------------------------------------
# Stage 0: pretrain the tiny base on captions (full fine-tuning, the same loop), as LLaVA's base saw captions only

def pretrain_base(cfg, rank, world, device, load_base, train_one_task):
    """Build the tiny base at --base, then train all its weights on the stage-0 captions with coin's own loop (coin.py
    passes its load_base and train_one_task) at --stage0_epochs, --stage0_lr, cosine schedule, and save it over the
    random one."""
    cfg = dataclasses.replace(cfg, epochs=cfg.stage0_epochs, lr=cfg.stage0_lr, schedule="cosine")
    texts = corpus_texts(cfg.data_dir)
    if rank == 0:
        build_tiny_base(cfg.base, texts, seed=cfg.seed)
    if world > 1:
        dist.barrier()
    model, processor = load_base(cfg, device)
    examples = data.train_examples(cfg.data_dir, "Stage0", cfg.instructions)
    dataset = data.InstructionDataset(examples, processor, data.image_root(cfg.data_dir, cfg.image_dir))
    params = list(model.parameters())
    t0 = time.time()
    losses = train_one_task(model, dataset, params, cfg, rank, world, device, cfg.seed, "stage-0 captions")
    print0(f"stage 0: {len(losses)} steps in {time.time() - t0:.0f}s, loss {losses[0]:.2f} -> "
           f"{sum(losses[-20:]) / 20:.2f}")
    if rank == 0:
        model.save_pretrained(cfg.base)
        processor.save_pretrained(cfg.base)
        print0(f"wrote the pretrained tiny base to {cfg.base}")


# -----------------------------------------------------------------------------
# The CoIN base at 7B: the pretrain-only LLaVA-1.5, assembled from its three public parts into one Hugging Face
# LlavaForConditionalGeneration directory (`python coin.py assemble ...`; the README's real-scale section lists the
# downloads)

PROJECTOR_KEYS = {"model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",  # (d_text, d_vision)
                  "model.mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",      # (d_text,)
                  "model.mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",  # (d_text, d_text)
                  "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias"}      # (d_text,)


def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (google, for google.protobuf) is missing
        return False


def check_tokenizer_packages(vicuna_dir):
    """Vicuna-7B-v1.5 as downloaded holds its tokenizer as a sentencepiece tokenizer.model and no tokenizer.json;
    transformers reads that with the packages sentencepiece and protobuf (requirements-realscale.txt; the CPU path and
    the assembled base, which carries a tokenizer.json, need neither). A missing one stops here, named."""
    if os.path.isfile(os.path.join(vicuna_dir, "tokenizer.json")) or \
            not os.path.isfile(os.path.join(vicuna_dir, "tokenizer.model")):
        return
    missing = [package for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if not installed(module)]
    if missing:
        raise cli.UserError(f"{vicuna_dir}: its tokenizer is a sentencepiece tokenizer.model, and reading it needs "
                            f"{' and '.join(missing)}: pip install -r requirements-realscale.txt")


def assemble_llava15(vicuna_dir, clip_dir, projector_bin, out_dir):
    """Vicuna-7B-v1.5 (LlamaForCausalLM) + CLIP ViT-L/14-336 (its vision model) + the stage-1 mlp2x_gelu projector
    (mm_projector.bin) -> out_dir, a LlavaForConditionalGeneration with its LlavaProcessor, as LLaVA-1.5's
    pretraining left it: features from layer -2, the CLS token dropped ("default"), Linear-GELU-Linear. <image> is
    added to the tokenizer (one new embedding row, the mean of the others: image features replace it anyway). No chat
    template is saved: coin prompts this base with Vicuna v1, as the official code does. Every tensor name and shape
    is checked against the LLaVA class; anything missing, left over or misshapen is an error naming it."""
    check_tokenizer_packages(vicuna_dir)  # before minutes of loading weights
    proj = torch.load(projector_bin, map_location="cpu", weights_only=True)
    if set(proj) != set(PROJECTOR_KEYS):
        raise cli.UserError(f"{projector_bin}: expected exactly the keys {sorted(PROJECTOR_KEYS)} (LLaVA-1.5's stage-1 "
                            f"mlp2x_gelu projector), found {sorted(proj)}")
    # from_pretrained fills weights a directory lacks with random ones, with a warning: here that is an error
    lm, info_lm = LlamaForCausalLM.from_pretrained(vicuna_dir, dtype="auto", output_loading_info=True)
    clip, info_clip = CLIPVisionModel.from_pretrained(clip_dir, dtype=lm.dtype, output_loading_info=True)
    for part, loaded in ((vicuna_dir, info_lm), (clip_dir, info_clip)):
        if loaded["missing_keys"] or loaded["mismatched_keys"]:
            raise cli.UserError(f"{part}: not the expected model ({len(loaded['missing_keys'])} weights missing, "
                                f"e.g. {sorted(loaded['missing_keys'])[:3]}; mismatched "
                                f"{list(loaded['mismatched_keys'])[:3]}); --vicuna takes a Llama directory, --clip a "
                                "CLIP (vision) directory")
    tok = AutoTokenizer.from_pretrained(vicuna_dir)
    if data.IMAGE_TOKEN in tok.get_vocab():
        raise cli.UserError(f"{vicuna_dir}: the tokenizer has {data.IMAGE_TOKEN} already; give the plain Vicuna "
                            "directory")
    tok.add_special_tokens({"extra_special_tokens": [data.IMAGE_TOKEN]})  # one token, never split
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # LLaVA-1.5 (Vicuna v1) pads with <unk>
    vision_config, text_config = clip.config, lm.config
    text_config.vocab_size = len(tok)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tok.convert_tokens_to_ids(data.IMAGE_TOKEN),
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.device("meta"):  # the LLaVA's names and shapes, no memory
        llava = LlavaForConditionalGeneration(config)
    sd = {f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()}
    sd["lm_head.weight"] = lm.lm_head.weight.detach()
    sd.update({f"model.vision_tower.{k}": v for k, v in clip.state_dict().items()})
    sd.update({PROJECTOR_KEYS[k]: v.to(lm.dtype) for k, v in proj.items()})
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # (vocab, d) -> (vocab + 1, d)
        w = sd[key]
        sd[key] = torch.cat([w, w.mean(0, keepdim=True)])
    want = llava.state_dict()
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    if missing or unexpected:
        raise cli.UserError(f"assembling {out_dir}: {len(missing)} LLaVA weights missing {missing[:5]}, "
                            f"{len(unexpected)} unexpected {unexpected[:5]} (first 5 shown; is {vicuna_dir} a Llama "
                            f"and {clip_dir} a CLIP?)")
    wrong = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if sd[k].shape != v.shape]
    if wrong:
        raise cli.UserError(f"assembling {out_dir}: {len(wrong)} shapes differ from the LLaVA's (part != LLaVA), e.g. "
                            f"{wrong[0]} (a projector of another vision tower or language model?)")
    llava.load_state_dict(sd, strict=True, assign=True)
    llava.generation_config.pad_token_id, llava.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    processor = LlavaProcessor(image_processor=clip_image_processor().from_pretrained(clip_dir), tokenizer=tok,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    llava.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return llava, processor


@dataclasses.dataclass
class AssembleSettings:
    vicuna: str = ""                      # the Vicuna-7B-v1.5 folder (Hugging Face format)
    clip: str = ""                        # the CLIP ViT-L/14-336 folder
    projector: str = ""                   # the stage-1 mm_projector.bin of LLaVA-1.5's pretraining
    out: str = ""                         # the folder the assembled base is written to


def assemble_main(argv):
    usage = "usage: python coin.py assemble --vicuna=DIR --clip=DIR --projector=mm_projector.bin --out=DIR"
    opts, _ = cli.parse(AssembleSettings, argv, usage)
    missing = [f"--{k}: needed" for k, v in dataclasses.asdict(opts).items() if not v]
    missing += [f"--{k}={v}: no such file or folder" for k, v in dataclasses.asdict(opts).items()
                if v and k != "out" and not os.path.exists(v)]
    if missing:
        raise cli.UserError("\n".join(missing + [usage]))
    opts = dataclasses.asdict(opts)
    llava, _ = assemble_llava15(opts["vicuna"], opts["clip"], opts["projector"], opts["out"])
    print(f"wrote the pretrain-only LLaVA-1.5 base ({sum(p.numel() for p in llava.parameters()):,} parameters) to "
          f"{opts['out']}; train on it with --base={opts['out']}")
