"""The method API (methods.py): a method written outside methods.py, as docs/methods.md tells a user to write one, runs
through coin.py's loop unchanged; killed mid-stage and resumed, it ends bit for bit where an uninterrupted run ends,
its state carried only through end_stage; a study folder of runs written before it still reads."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import coin
import methods
import study
from test_resume import ROOT, args, assert_killed_mid_stage, assert_same_run, fail, finish, stage, start, wait_for


def docs_example():
    """The L2 method's code block in docs/methods.md's "Write your own method", as a user pastes it."""
    text = open(os.path.join(ROOT, "docs", "methods.md")).read()
    section = text[text.index("## Write your own method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# A method whose end_stage rewrites the weights: after each stage the adapter and projector become the mean of every
# stage's trained weights so far, kept as their running sum in the end-of-stage state; the next stage trains on from
# the mean (a merging method's shape: state between stages, weights changed at a stage's end)
AVERAGE = '''
@register
class Average(Method):
    name = "average"

    def end_stage(self, model, stage, dataset, state):
        sums = {n: p.detach() + state[n] if state else p.detach().clone() for n, p in trainable(model)}
        with torch.no_grad():
            for n, p in trainable(model):
                p.copy_(sums[n] / (stage.index + 1))
        return sums
'''

@pytest.fixture
def registered():
    """Register a method from its source text in this process (as pasting it into methods.py would), for one test."""
    saved = dict(methods.METHODS)
    yield lambda source: exec(source, vars(methods))
    methods.METHODS.clear()
    methods.METHODS.update(saved)


@pytest.mark.parametrize("name, source, extra", [("l2", None, ["--l2_lambda=100"]), ("average", AVERAGE, [])])
def test_a_new_method_resumes_exactly(name, source, extra, registered, mini_data, tiny_base, tmp_path):
    registered(source or docs_example())
    ref, out, log = str(tmp_path / "ref"), str(tmp_path / "run"), str(tmp_path / "log")
    argv = args(mini_data, tiny_base, ref, f"--method={name}", *extra)
    coin.main(argv)
    # the same command in a child process (forked: the method registered in it as in this one), killed and rerun
    proc = start(args(mini_data, tiny_base, out, f"--method={name}", *extra), log)
    wait_for(os.path.join(stage(out, 1), checkpoint.MIDSTAGE), proc, log)
    proc.kill()
    proc.wait()
    assert_killed_mid_stage(out, 1)
    log = str(tmp_path / "resumed.log")
    proc = start(args(mini_data, tiny_base, out, f"--method={name}", *extra), log)
    if finish(proc, log) != 0:
        fail(proc, log, "the resumed run failed")
    assert_same_run(out, ref)
    res = json.load(open(os.path.join(ref, "results.json")))
    meta = json.load(open(os.path.join(stage(ref, 1), "meta.json")))
    if name == "l2":  # its setting reached the method, and its penalty acted
        assert res["config"]["l2_lambda"] == 100 and res["method_settings"] == {"l2_lambda": 1.0}
        assert meta["final_penalty"] > 0
    else:  # the stage's weights are the mean of the two stages' trained weights, whose sum is its saved state
        sums = load_file(os.path.join(stage(ref, 1), checkpoint.METHOD_STATE))
        weights = load_file(os.path.join(stage(ref, 1), "adapter.safetensors"))
        own = {k.removeprefix("model.multi_modal_projector."): k for k in sums}
        assert len(sums) == len(weights)
        for k, w in weights.items():
            key = k if k in sums else own[k.removeprefix("projector.")]
            torch.testing.assert_close(w, sums[key] / 2, rtol=0, atol=1e-7)


def test_older_study_folders_read_beside_a_new_method(registered, tmp_path):
    """The committed study's runs predate the method-settings record and any new method: with a new method's run
    beside them (its own setting in its config), every old row reads as before and the new one is a row of its own."""
    registered(docs_example())
    root = tmp_path / "study"
    src = os.path.join(ROOT, "assets", "results", "study-runs")
    for run in os.listdir(src):
        if os.path.isfile(os.path.join(src, run, "results.json")):
            os.makedirs(root / run)
            shutil.copy(os.path.join(src, run, "results.json"), root / run / "results.json")
    before = study.read_study(str(root))[0]
    res = json.load(open(root / "lora-s0" / "results.json"))
    res["config"].update(method="l2", l2_lambda=5.0)
    res["method_settings"] = {"l2_lambda": 1.0}
    os.makedirs(root / "l2-s0")
    json.dump(res, open(root / "l2-s0" / "results.json", "w"))
    groups = study.read_study(str(root))[0]
    new = [k for k in groups if k.method == "l2"]
    assert len(new) == 1 and study.method_name(new[0]) == "l2 (LoRA), --l2_lambda=5"
    assert {k: [r["name"] for r in v] for k, v in groups.items() if k.method != "l2"} == {
        k: [r["name"] for r in v] for k, v in before.items()}
    olora = [k for k in groups if k.method == "olora"]  # written before O-LoRA's official settings: named as it ran
    assert [study.method_name(k) for k in olora] == ["O-LoRA, --olora_targets=all, --olora_init=normal, "
                                                     "--olora_l2=squared, --olora_projector=True"]


def test_the_loop_names_no_method():
    """coin.py and checkpoint.py know methods only through the registry."""
    for file in ("coin.py", "checkpoint.py"):
        code = open(os.path.join(ROOT, file)).read()
        for name in methods.METHODS:
            if name != "sequential":
                assert not re.search(rf"\b{name}\b", code, re.I), f"{file} names --method={name}"
    assert open(os.path.join(ROOT, "coin.py")).read().count("cfg.method") <= 2
