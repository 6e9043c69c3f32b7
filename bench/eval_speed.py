"""
How fast does eval.py score prediction files with no model? Writes a synthetic CoIN-mini-shaped test set (no images:
scoring never opens them) and a full 8 x 8 lower-triangular run of coin prediction files, 50,004 predictions in all,
then times `python eval.py --predictions=...` end to end (interpreter start and imports included): every official
scorer, the exact General Knowledge judge, results.json, tables and heatmaps.

    python bench/eval_speed.py          # prints the wall time; the target is under 10 s on a 2-core CPU
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coin_mini  # noqa: E402
import data  # noqa: E402
import eval as evaluate  # noqa: E402

N_PER_TASK = 1389  # 36 (stage, task) files x 1389 = 50,004 predictions


def record(task, i, rng):
    """A test record shaped like CoIN-mini's, with a plausible answer."""
    qid = f"{task}_test_{i}"
    if task == "ScienceQA":
        opts = rng.sample(list(coin_mini.COLORS), 5)
        k = rng.randrange(5)
        lines = "\n".join(f"{l}. {c}" for l, c in zip("ABCDE", opts))
        return {"question_id": qid, "text": f"What is the color of the object?\n{lines}\n{coin_mini.LETTER}",
                "answer": "ABCDE"[k], "accept": ["ABCDE"[k], opts[k]]}
    if task == "Grounding":
        x, y = rng.randint(0, 5) / 10, rng.randint(0, 5) / 10
        box = f"[{x:.2f}, {y:.2f}, {x + 0.3:.2f}, {y + 0.3:.2f}]"
        return {"question_id": qid, "text": f"{coin_mini.BOX} the red bar", "answer": box, "answer_bbox": box,
                "size": [48, 48], "accept": [rng.choice(coin_mini.POSITIONS)]}
    word = rng.choice(list(coin_mini.COLORS) + coin_mini.SHAPES + coin_mini.WORDS)
    return {"question_id": qid, "text": f"What is it?\n{coin_mini.SHORT}", "answer": word, "accept": [word]}


def prediction(rec, rng):
    """Right, right in another format, or wrong, about a third each."""
    u = rng.random()
    text = rec["answer"] if u < 0.4 else f"It is {rec['accept'][-1]}." if u < 0.7 else rng.choice(coin_mini.WORDS)
    return {"question_id": rec["question_id"], "prompt": rec["text"], "text": text, "answer_id": "x",
            "model_id": "bench"}


def main(root):
    rng = random.Random(0)
    tasks = data.TASKS
    recs = {t: [record(t, i, rng) for i in range(N_PER_TASK)] for t in tasks}
    for t in tasks:
        data.write_json(data.task_file(root, t, "eval"), recs[t])
    # the official ground truth of ScienceQA, TextVQA and GQA, under the image root (root/images)
    sqa = {r["question_id"]: {"answer": "ABCDE".index(r["answer"]), "choices": list("12345")}
           for r in recs["ScienceQA"]}
    textvqa = [{"question_id": r["question_id"], "answers": [r["answer"]] * 8 + ["other"] * 2} for r in recs["TextVQA"]]
    gqa = {r["question_id"]: {"answer": r["answer"], "isBalanced": True} for r in recs["GQA"]}
    for (task, rel), obj in zip([(t, rel) for t in ("ScienceQA", "TextVQA", "GQA") for rel in data.GROUND_TRUTH[t]],
                                (sqa, {"test": list(sqa)}, {"data": textvqa}, gqa)):
        data.write_json(os.path.join(root, "images", rel), obj)
    n = 0
    for j, stage in enumerate(tasks):
        for t in tasks[:j + 1]:
            preds = [prediction(r, rng) for r in recs[t]]
            evaluate.write_jsonl(os.path.join(root, "run", "predictions", f"stage{j + 1}-{stage}", f"{t}.jsonl"), preds)
            n += len(preds)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "eval.py", f"--predictions={root}/run", f"--data_dir={root}", f"--out={root}/eval"]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=repo)
    dt = time.time() - t0
    res = json.load(open(os.path.join(root, "eval", "results.json")))
    print(f"scored {n:,} predictions ({len(tasks)} x {len(tasks)} lower-triangular run) end to end in {dt:.1f} s "
          f"(target < 10 s); MAA {res['MAA']:.2f}, general knowledge MAA {res['general_knowledge']['MAA']:.2f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        main(tmp)
