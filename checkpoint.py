"""
Checkpoints and resume: what a stage writes, and how a run continues where it stopped.

A finished stage leaves the adapter and the projector as safetensors with a readable meta.json; a stage stopped
part-way (Ctrl-C, --save_every, a killed rank) leaves a mid-stage file holding all it takes to go on exactly. Running
the same command into the same --out again finds both, checks that the settings, data and base are the same, and
continues: the resumed run ends with the same weights and scores.
"""
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import subprocess

import torch
import torch.distributed as dist
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

import cli
import data
import pins
from base_model import projector
from methods import METHODS
from moelora import adapter_parameters, load_weights

# -----------------------------------------------------------------------------
# Checkpoints: adapter + projector as safetensors with a readable meta.json, written atomically

# A stage's folder, checkpoints/stage<j>-<Task>/, holds adapter.safetensors, then meta.json: the stage is finished
# once its meta.json exists. Until then midstage.pt holds the state to continue it. Every file is written to .tmp and
# renamed, so a kill at any moment leaves the previous version or the new one, never half a file. --out must be one
# folder that every rank sees (shared storage on several nodes): rank 0 writes, all ranks read.
MIDSTAGE = "midstage.pt"
# The continual-learning method's state after the stage (what its end_stage returned, e.g. a Fisher summed over
# the tasks so far), handed to the next stage's start; absent when the method keeps nothing
METHOD_STATE = "method_state.safetensors"

# A finished stage's meta.json and a mid-stage file carry a checksum of their tensors (tensor_checksum): a file
# damaged on disk is refused on resume, naming the stage that deleting it retrains, instead of training on garbage.
# Files written before checksums existed are loaded unchecked, and the run says so once.

# settings that may change when a run is continued: where output goes and how the same global batch is split
MAY_DIFFER = ("out", "resume", "save_every", "threads", "micro_batch", "grad_accum", "eval_batch", "grad_ckpt",
              "shard")
# settings that change only how the stages are evaluated: continuing a run under other values scores its finished
# stages again (each stage's weights are in its checkpoint) instead of refusing (coin.py: load_results)
EVALUATION = ("max_test", "max_new_tokens", "eval_images", "scoring", "ground_truth", "answers_from_test", "judge",
              "zero_shot")
# settings added later, with the value that runs written before them had in effect (when it is not the default)
BEFORE_ADDED = {"projector_lr_scale": 1.0, "eval_images": "pad"}


def stage_dir(cfg, j, task):
    return os.path.join(cfg.out, "checkpoints", f"stage{j + 1}-{task}")


@functools.cache
def git_commit():
    """The code's commit, plus '-dirty-' and a hash of `git diff HEAD` when files differ from it; None outside git."""
    def git(*args):
        out = subprocess.run(["git", *args], capture_output=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout if out.returncode == 0 else None
    try:
        commit, diff = git("rev-parse", "HEAD"), git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit is None:
        return None
    return commit.decode().strip() + (f"-dirty-{hashlib.sha1(diff).hexdigest()[:12]}" if diff else "")


def inputs_hash(train_sets, test_sets, model):
    """Hashes of what a run trains on besides its settings: a sample of every base weight ("base") and each task's
    train records ("train": {task: hash}). A resumed run checks them, so a regenerated data set or a rebuilt base
    never mixes into an earlier run's stages, while other test records (--max_test) or more tasks may be added to a
    finished run (check_same_run). "v1" is the one hash runs written before this split recorded (train and test
    records and base together), so that those still continue."""
    def with_base(h):  # a sample of every base weight, into hash h
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
        return h.hexdigest()
    return {"base": with_base(hashlib.sha1()),
            "train": {task: hashlib.sha1(json.dumps(recs, sort_keys=True).encode()).hexdigest()
                      for task, recs in train_sets.items()},
            "v1": with_base(hashlib.sha1(json.dumps([train_sets, test_sets], sort_keys=True).encode()))}


def same_inputs(saved, inputs):
    """Whether a file's recorded inputs (inputs_hash) are this run's: the same base, and the same train records for
    every task the file's run had (this run may have more tasks)."""
    if isinstance(saved, str):  # written before the split: train and test records and base in one hash
        return saved == (inputs["v1"] if isinstance(inputs, dict) else inputs)
    return (isinstance(saved, dict) and saved.get("base") == inputs["base"]
            and all(inputs["train"].get(task) == h for task, h in saved.get("train", {}).items()))


def run_info(cfg, world, inputs, global_batch):
    """What every checkpoint and results.json record about the run that wrote them."""
    own = METHODS[cfg.method].Settings
    return {"config": dataclasses.asdict(cfg), "seed": cfg.seed, "world_size": world,
            # the method's own settings and their defaults: how a study tells its strengths apart (study.run_key)
            "method_settings": {f.name: f.default for f in dataclasses.fields(own)} if own else {},
            "global_batch": global_batch, "inputs": inputs, "git": git_commit(),
            "torch": str(torch.__version__), "transformers": transformers.__version__, "numerics": pins.record()}


def setting_defaults(cfg):
    """{setting: the value a run written before that setting existed had in effect}: its default in cfg's dataclass,
    or what BEFORE_ADDED or its method's class (methods.Method.before_added) says."""
    before = {**BEFORE_ADDED, **{k: v for cls in METHODS.values() for k, v in cls.before_added.items()}}
    return {f.name: before.get(f.name, f.default) for f in dataclasses.fields(cfg)}


def check_same_run(saved, info, path, defaults):
    """Refuse to continue from a file another run wrote: settings that change results, data and base must match.
    `defaults` (setting_defaults) stands in for a setting that `saved` predates."""
    old, new = saved.get("config", {}), info["config"]
    for key in new:
        was = old.get(key, defaults[key])
        if key in MAY_DIFFER + EVALUATION or was == new[key] or key == "tasks" and extends(was, new[key], new):
            continue
        raise cli.UserError(f"{path}: written by a run with --{key}={was!r}, this one has --{key}={new[key]!r}; "
                            "continue it with the same settings (evaluation settings and more tasks after the "
                            "finished ones may change), or write to another --out")
    if saved.get("global_batch") != info["global_batch"]:
        raise cli.UserError(f"{path}: written with a global batch of {saved.get('global_batch')}, this run has "
                            f"{info['global_batch']} (micro_batch x ranks x grad_accum); keep it to continue that run")
    was = saved.get("numerics", {}).get("pins")  # None: written before the pins were recorded
    if was is not None and was != info["numerics"]["pins"]:
        raise cli.UserError(f"{path}: written under the numerics pins {was}, this run has {info['numerics']['pins']} "
                            "(pins.py); set the same variables (COIN_PINS=0: none) to continue it, or write to another "
                            "--out")
    if not same_inputs(saved.get("inputs"), info["inputs"]):
        raise cli.UserError(f"{path}: written by a run that read other data or another base (regenerated data or a "
                            "rebuilt base?); write to another --out")


def extends(old_tasks, new_tasks, cfg):
    """Whether --tasks=new_tasks continues a sequential run of --tasks=old_tasks: the old tasks, in order, then more."""
    old, new = data.parse_tasks(old_tasks), data.parse_tasks(new_tasks)
    return not cfg.get("multitask") and len(new) > len(old) and new[:len(old)] == old


def read_json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise cli.UserError(f"{path}: unreadable ({e}); delete it to redo what it recorded") from None


def whole(t):
    """`t` whole: a sharded tensor (--shard: a DTensor) gathered from every rank (a collective: every rank calls it),
    a plain one as it is. Checkpoints hold whole tensors, so a sharded run continues unsharded and the other way."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_held_by(t, param):
    """`t`, a whole tensor read from a checkpoint, as `param` is held: this rank's shard when it is sharded (no
    communication: every rank read the whole tensor)."""
    if not isinstance(param, DTensor) or t.shape != param.shape:  # a wrong shape stays, for the strict load to name
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def trainable_parameters(model):
    """{checkpoint key: parameter} of the adapter (every AdapterLayer's weights, frozen ones too) and the projector."""
    return {**dict(adapter_parameters(model)),
            **{f"projector.{k}": p for k, p in projector(model).named_parameters()}}


def trainable_state_dict(model):
    """The adapter's and projector's weights, whole, on the CPU (every rank calls it: a sharded model gathers)."""
    sd = {**dict(adapter_parameters(model)),
          **{f"projector.{k}": v for k, v in projector(model).state_dict().items()}}
    return {k: whole(v).detach().cpu().contiguous() for k, v in sd.items()}


def whole_optimizer_state(opt):
    """opt.state_dict() with every state tensor whole (a collective with --shard), in the unsharded layout."""
    sd = opt.state_dict()
    return {**sd, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in sd["state"].items()}}


def load_optimizer_state(opt, sd):
    """Load what whole_optimizer_state saved, each tensor as its parameter is held (sharded or whole). The state's
    keys number the parameters in the order of opt.param_groups, which fully_shard keeps."""
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.load_state_dict({**sd, "state": {i: {k: as_held_by(v, params[i]) if torch.is_tensor(v) else v
                                             for k, v in s.items()} for i, s in sd["state"].items()}})


def tensor_checksum(sd):
    """sha256 over the tensors of a state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_UNCHECKED_SAID = []


def verify_checksum(sd, path, expected, fix):
    """A description of the file for later messages: "<path> (checksum verified)", or "(no checksum: not checked)"
    for a file written before checksums existed (said once per run). A mismatch raises naming `path` and `fix`."""
    if expected is None:
        if not _UNCHECKED_SAID and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {path} was written before checkpoints carried a checksum: loaded without checking it "
                  "(and so are any others like it)", flush=True)
        _UNCHECKED_SAID.append(path)
        return f"{path} (no checksum: not checked)"
    if tensor_checksum(sd) != expected:
        raise cli.UserError(f"{path}: its tensors do not match their checksum (the file is damaged); {fix}")
    return f"{path} (checksum verified)"


class NonFiniteLoss(cli.UserError, FloatingPointError):
    """Training diverged (a loss or a weight is not finite): nothing was saved; the message says what stays."""


def finite_or_raise(sd, path, step):
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLoss(f"{path}: not written: {len(bad)} weights (e.g. {bad[0]}) are not finite after step "
                            f"{step}; the last good checkpoint stays (try a lower --lr)")


def save_checkpoint(model, stage_dir, meta, rank, state=None):
    """The end of a stage: adapter.safetensors and the method's state for the stages after it (`state`: {name:
    tensor}, what its end_stage returned; no file when empty), then meta.json with their checksums (the stage is
    finished), then the mid-stage file goes. Every rank calls it (a sharded model's weights are gathered from all);
    rank 0 writes."""
    path = os.path.join(stage_dir, "adapter.safetensors")
    sd = trainable_state_dict(model)
    finite_or_raise(sd, path, meta["step"])
    if rank:
        return
    os.makedirs(stage_dir, exist_ok=True)
    files = {"adapter.safetensors": sd}
    if state:
        files[METHOD_STATE] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for file, tensors in files.items():
        save_file(tensors, os.path.join(stage_dir, file) + ".tmp")
        os.replace(os.path.join(stage_dir, file) + ".tmp", os.path.join(stage_dir, file))
    checksums = {f"checksum_{METHOD_STATE}": tensor_checksum(files[METHOD_STATE])} if state else {}
    data.write_json(os.path.join(stage_dir, "meta.json"), {**meta, "checksum": tensor_checksum(sd), **checksums})
    if os.path.exists(os.path.join(stage_dir, MIDSTAGE)):
        os.remove(os.path.join(stage_dir, MIDSTAGE))


def load_trainable(model, sd, path):
    """Strict: `sd` (read from `path`) must hold exactly this model's adapter and projector weights, same shapes."""
    own = trainable_parameters(model)
    sd = {k: as_held_by(v, own[k]) if k in own else v for k, v in sd.items()}  # --shard: this rank's shards
    proj = {k.removeprefix("projector."): v for k, v in sd.items() if k.startswith("projector.")}
    adapter = {k: p for k, p in own.items() if not k.startswith("projector.")}
    try:
        load_weights(adapter, {k: v for k, v in sd.items() if not k.startswith("projector.")}, "the model's adapter")
        projector(model).load_state_dict(proj, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise cli.UserError(f"{path}: not a checkpoint of this model (another --base, --lora_r, --experts or "
                            f"--method?): {e.args[0]}") from None


def read_stage_file(path, meta, checksum_key):
    """The tensors of a stage's file, checked against the checksum its `meta` (meta.json's content) records under
    `checksum_key` when given; returns (tensors, the file's description: verify_checksum)."""
    try:
        sd = load_file(path)
    except (OSError, SafetensorError) as e:
        raise cli.UserError(f"{path}: unreadable checkpoint ({e})") from None
    checked = None
    if meta is not None:
        checked = verify_checksum(sd, path, meta.get(checksum_key), (
            f"delete {os.path.dirname(path)} and run the same command again: stage {meta.get('stage')} "
            f"({meta.get('task')}) is retrained, from the stage before it"))
    return sd, checked


def load_checkpoint(model, folder, meta=None):
    """Load a stage's adapter.safetensors (in `folder`) into `model`, checked against the checksum in its `meta`
    (meta.json's content) when given, and read the method's state it saved (checked the same way; {} when the stage
    saved none). Returns (the adapter file's description (verify_checksum) for later messages, the state on the CPU)."""
    path = os.path.join(folder, "adapter.safetensors")
    sd, checked = read_stage_file(path, meta, "checksum")
    load_trainable(model, sd, path)
    state, key = {}, f"checksum_{METHOD_STATE}"
    if meta is not None and key in meta:
        state, _ = read_stage_file(os.path.join(folder, METHOD_STATE), meta, key)
    return checked, state


def save_midstage(path, model, opt, step, losses, info, rank, world, device):
    """All it takes to continue a stage after `step` steps exactly: the trainable weights, AdamW's state, the step
    (the data order and the lr are functions of it) and every rank's RNG state (the dropout masks)."""
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    rngs = [rng]
    if world > 1:
        rngs = [None] * world if rank == 0 else None
        dist.gather_object(rng, rngs, dst=0)
    sd, optimizer = trainable_state_dict(model), whole_optimizer_state(opt)  # collectives with --shard
    if rank == 0:
        finite_or_raise(sd, path, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({**info, "step": step, "losses": losses, "weights": sd, "checksum": tensor_checksum(sd),
                    "optimizer": optimizer, "rng": rngs}, path + ".tmp")
        os.replace(path + ".tmp", path)
    if world > 1:
        dist.barrier()  # no rank stops (Ctrl-C) before the file is complete


def load_midstage(path, model, opt, info, defaults, rank, world, device):
    """Restore what save_midstage wrote into `model`, `opt` and this rank's RNG; returns (steps done, their losses,
    the file's description: verify_checksum)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise cli.UserError(f"{path}: unreadable mid-stage checkpoint ({e}); delete it to restart the stage") from None
    check_same_run(state, info, path, defaults)
    checked = verify_checksum(state["weights"], path, state.get("checksum"),
                              "delete it and run the same command again: the stage restarts from its beginning")
    if state["world_size"] != world:
        raise cli.UserError(f"{path}: written by {state['world_size']} ranks, this run has {world}: a stage continues "
                            "exactly only on as many ranks (one RNG state each); use that many, or delete it to "
                            "restart the stage")
    load_trainable(model, state["weights"], path)
    load_optimizer_state(opt, state["optimizer"])
    torch.set_rng_state(state["rng"][rank][0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"][rank][1], device)
    return state["step"], state["losses"], checked


# -----------------------------------------------------------------------------
# Resume: where an earlier run into --out stopped

def finished_stages(cfg, stages, info, rank):
    """How many stages, from the first, an earlier run into --out finished; 0 for a new --out."""
    if not cfg.resume:
        if os.path.exists(os.path.join(cfg.out, "results.json")) or os.path.isdir(os.path.join(cfg.out, "checkpoints")):
            raise cli.UserError(f"--out={cfg.out} holds a run already: --resume=true (the default) continues it; to "
                                "start over, delete that folder or choose another --out")
        return 0
    done, meta = 0, None
    for j, (name, *_) in enumerate(stages):
        path = os.path.join(stage_dir(cfg, j, name), "meta.json")
        if not os.path.exists(path):
            break
        meta = read_json_file(path)
        check_same_run(meta, info, path, setting_defaults(cfg))
        done = j + 1
    # other code is allowed (a fix elsewhere should not cost finished stages), but said
    if meta and meta.get("git") != info["git"] and rank == 0:
        print(f"note: stage {done} was trained by code {meta.get('git')}, this is {info['git']}; stages 1-{done} "
              "are kept", flush=True)
    return done


def load_results(cfg, tasks, rows, info, test_content):
    """The matrices and results.json extras this run extends: empty ones for a new --out, else the earlier run's
    `rows` (of its finished stages), its zero-shot row, its timings and what its method measured (results.json is only
    ever extended). A run with more tasks than the earlier one (--tasks extended) gets its rows in larger matrices.
    Under other evaluation settings (EVALUATION) or other test records (`test_content`: {task: a hash of its test
    records}) no score is kept: every finished stage is scored again from its checkpoint, and `reevaluated` records
    what changed."""
    T = len(tasks)
    if_matrix, gk_matrix = [[None] * T for _ in range(T)], [[None] * T for _ in range(T)]
    extra = {**info, "timing": {}}
    path = os.path.join(cfg.out, "results.json")
    if not (cfg.resume and os.path.exists(path)):
        return if_matrix, gk_matrix, extra
    old = read_json_file(path)
    defaults = setting_defaults(cfg)
    check_same_run(old, info, path, defaults)
    changed = {k: [old["config"].get(k, defaults[k]), info["config"][k]] for k in EVALUATION
               if old["config"].get(k, defaults[k]) != info["config"][k]}
    if not changed:  # the same settings, but other test records (a regenerated test file)
        changed = {f"test records of {t}": [was, test_content[t]] for t, was in old.get("test_content", {}).items()
                   if t in test_content and was != test_content[t]}
    extra["timing"] = old["timing"]
    if "reevaluated" in old:
        extra["reevaluated"] = old["reevaluated"]
    if changed:  # nothing of the old scores holds: the loop scores every finished stage again
        extra["reevaluated"] = extra.get("reevaluated", []) + [{"changed": changed, "stages": len(rows)}]
        return if_matrix, gk_matrix, extra
    n = len(old["tasks"])  # the earlier run's tasks: the first n of these
    for r in rows:
        if r < n:
            if_matrix[r][:n] = old["matrix"][r]
            gk_matrix[r][:n] = old["general_knowledge"]["matrix"][r]
    if "zero_shot" in old and all(t in old["zero_shot"] for t in tasks):
        extra["zero_shot"] = old["zero_shot"]
    if "measured" in old:  # what the method measured of each stage's evaluation; a stage scored again replaces it
        extra["measured"] = old["measured"]
    return if_matrix, gk_matrix, extra
