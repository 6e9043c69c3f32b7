"""A finished run is scored again under other evaluation settings without training, and extended by more tasks
(the new stages continue from the last one, the matrix grows): both end where one fresh run with the final settings
ends. What would mix two trainings is still refused."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import coin
from cli import UserError
from test_resume import args, stage

TASKS = ["GQA", "VQAv2", "ScienceQA"]


def run(mini_data, tiny_base, out, tasks, *extra):
    coin.main(args(mini_data, tiny_base, out, "--max_train=16", "--zero_shot=false", *extra, tasks=tasks))
    return json.load(open(os.path.join(out, "results.json")))


def test_rescore_then_extend_equals_a_fresh_run(mini_data, tiny_base, tmp_path, capsys):
    out, fresh = str(tmp_path / "run"), str(tmp_path / "fresh")
    run(mini_data, tiny_base, out, TASKS, "--max_test=4")
    files = {j: os.path.getmtime(os.path.join(stage(out, j, TASKS), "adapter.safetensors")) for j in range(3)}
    capsys.readouterr()
    again = run(mini_data, tiny_base, out, TASKS, "--max_test=8")  # twice the test records: scored again, not trained
    log = capsys.readouterr().out
    assert " train " not in log and "steps, ce_last20" not in log, "a finished stage was trained again"
    assert files == {j: os.path.getmtime(os.path.join(stage(out, j, TASKS), "adapter.safetensors")) for j in range(3)}
    assert again["reevaluated"] == [{"changed": {"max_test": [4, 8]}, "stages": 3}]
    want = run(mini_data, tiny_base, fresh, TASKS + ["OCR-VQA"], "--max_test=8")
    assert [row[:3] for row in want["matrix"][:3]] == [row[:3] for row in again["matrix"]]

    extended = run(mini_data, tiny_base, out, TASKS + ["OCR-VQA"], "--max_test=8")  # one more task: one more stage
    assert extended["matrix"] == want["matrix"] and extended["BWT"] == want["BWT"]
    assert files == {j: os.path.getmtime(os.path.join(stage(out, j, TASKS), "adapter.safetensors")) for j in range(3)}
    got, ref = (load_file(os.path.join(stage(d, 3, TASKS + ["OCR-VQA"]), "adapter.safetensors")) for d in (out, fresh))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    with pytest.raises(UserError, match=r"written by a run with --tasks='GQA,VQAv2,ScienceQA', this one has "
                                        r"--tasks='GQA,ScienceQA'"):  # another sequence would mix two trainings
        run(mini_data, tiny_base, out, ["GQA", "ScienceQA"], "--max_test=8")
    with pytest.raises(UserError, match=r"--lr=0.01, this one has --lr=0.001"):
        run(mini_data, tiny_base, out, TASKS + ["OCR-VQA"], "--lr=1e-3")
