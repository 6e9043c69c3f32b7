"""
Evaluation for coin: batched greedy generation, the eight official Instruction Following scorers, the General
Knowledge judge, MAA/BWT, markdown tables and heatmaps. Scoring prediction files needs no model, no GPU and no
torch: only generate() and the LM judge import torch and transformers, when they run.

    python eval.py --predictions=out/run               # coin's files: predictions/<stage>/<Task>.jsonl
    python eval.py --predictions=results/CoIN          # the official code's <Task>/<Stage>/merge.jsonl
    python eval.py --predictions=merge.jsonl --task=GQA [--test_file=PATH]
    python eval.py --compare=out/lora,out/moelora      # final numbers of several runs side by side

The study over many runs and seeds is study.py's (`python study.py --out=out/study`), which imports this file; this
file imports nothing of it, nor of the CoIN-mini generator.

`python eval.py --help` lists the settings (--key=value; unknown keys are errors).

Scoring modes. --scoring=official (the default, what the paper's numbers come from) applies every rule of the
official scorers (ETrain/Eval/LLaVA/CoIN/eval_*.py), quirks included, with their pairing and denominators, to the
last digit; --scoring=fixed corrects the quirks:
  1. Grounding: the official parser removes the brackets, then cuts one more character from each end of the
     string ("0.12, 0.34, 0.56, 0.78" -> ".12, 0.34, 0.56, 0.7"): y2 loses its last digit and an x1 written "1.00"
     reads ".00"; it strips no space, so after a leading space it cuts the space instead of x1's first digit.
     fixed parses the four numbers as written.
  2. ImageNet: correct iff the ground truth is a substring of the answer or the answer a substring of the ground
     truth; "" is a substring of every string, so an empty answer counts correct. fixed counts an empty (or blank)
     answer wrong. Other short substrings ("cat" for "tabby cat") count in both modes, as intended.
  3. GQA: the answer is lower-cased and stripped of trailing '.' but not of spaces (" yes" is wrong); fixed strips
     surrounding white space.
  4. Denominators and pairing (score_official): ScienceQA counts every question of its split, a missing prediction
     as wrong; GQA counts the predicted questions marked isBalanced; the other six count prediction lines (a
     truncated merge.jsonl scores higher, a repeated line counts twice); ImageNet pairs line i with test record i;
     ScienceQA, VizWiz, Grounding and OCR-VQA match question_id as stored (7 is not "7"). fixed pairs by
     question_id, counts every test record once (a missing prediction wrong) and refuses repeated or unknown ids.
Ground truth: ScienceQA, TextVQA and GQA are scored against their source datasets' files (data.GROUND_TRUTH), found
under the image root as the official scripts keep them (or under --ground_truth); a missing one is an error, unless
--answers_from_test=true scores against the test file's one answer (TextVQA then scores each question 0 or 1, not
the VQA accuracy over ten human answers).
In both modes a malformed line is an error naming the file and line, and so is a line the official scorer would
fail on (an unknown question_id: KeyError).
"""
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import sys

from PIL import Image, ImageDraw, ImageFont

import cli
import data

# torch and transformers are imported inside generate() and LMJudge only, so that scoring prediction files and
# --compare (and study.py) run on a machine without them

SCORINGS = ("official", "fixed")

# -----------------------------------------------------------------------------
# Prediction files: one JSON object a line, the official merge.jsonl format


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def read_predictions(path, repeats=False):
    """Rows of a predictions JSONL (coin's or the official merge.jsonl): each line an object with at least
    `question_id` (text or a number) and `text`. Blank lines are skipped; anything else malformed is an error naming
    file and line, and so is a repeated question_id unless `repeats` (official scoring counts them as its scorers
    do)."""
    rows, seen = [], {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.UserError(f"{path}:{i}: not valid JSON ({e.msg}); a crashed run can leave a cut last line: "
                                    "delete it and regenerate that record") from None
            if (not isinstance(row, dict) or not isinstance(row.get("question_id"), (str, int, float))
                    or not isinstance(row.get("text"), str)):
                raise cli.UserError(f"{path}:{i}: expected an object with question_id and text (a string), "
                                    f"got {line.strip()[:80]!r}")
            qid = str(row["question_id"])
            if qid in seen and not repeats:
                raise cli.UserError(f"{path}:{i}: question_id {row['question_id']!r} already on line {seen[qid]}")
            seen.setdefault(qid, i)
            rows.append(row)
    return rows


def index_predictions(preds, records, where="predictions"):
    """{str(question_id): prediction}, refusing repeated ids and ids that are not in `records`."""
    by_qid = {}
    for p in preds:
        qid = str(p["question_id"])
        if qid in by_qid:
            raise cli.UserError(f"{where}: question_id {qid!r} appears twice")
        by_qid[qid] = p
    unknown = by_qid.keys() - {str(r["question_id"]) for r in records}
    if unknown:
        raise cli.UserError(f"{where}: {len(unknown)} predictions for question_ids not in the test file (e.g. "
                            f"{sorted(unknown)[:3]}): wrong task, test file or --max_test?")
    return by_qid


# -----------------------------------------------------------------------------
# Generation: batched greedy decoding with the KV cache, prompts left-padded so every answer starts in one column


def generate(model, processor, records, image_dir, batch_size=64, max_new_tokens=32, rank=0, world_size=1,
             desc=None, pad_images=True, strip_question=False):
    """Greedy answers to `records` (data.test_examples), striped over ranks (record i goes to rank i % world_size)
    and gathered on rank 0 in record order as merge.jsonl rows; other ranks get None. The prompt is training's
    (data.build_prompt, without the answer); `prompt` in the row is its user turn, as the official files store it.
    Images are padded to a square first with `pad_images` (else the processor alone crops them), the question stripped
    with `strip_question` (data.OFFICIAL_EVAL says what the official evaluation does per task). A row ends at the end
    of sequence or after max_new_tokens."""
    import torch
    import torch.distributed as dist
    distributed = world_size > 1
    assert not distributed or (dist.is_available() and dist.is_initialized()), \
        f"world_size={world_size} needs torch.distributed initialised"
    tok = processor.tokenizer
    mean = data.image_mean_rgb(processor)
    model_id = os.path.basename(os.path.normpath(getattr(model, "name_or_path", "") or "model"))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mine = list(range(rank, len(records), world_size))
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for s in cli.progress(range(0, len(mine), batch_size), desc=desc, disable=rank != 0):
                idx = mine[s:s + batch_size]
                batch = [records[i] for i in idx]
                items, users = [], []
                for r in batch:  # text-only records (some ScienceQA items) carry no image
                    image = data.load_image(image_dir, r["image"], r["question_id"]) if r.get("image") else None
                    if image is not None and pad_images:
                        image = data.expand2square(image, mean)
                    question = r["text"].strip() if strip_question else r["text"]
                    prompt = data.build_prompt(question, image is not None, processor)
                    items.append(data.encode(processor, prompt, image))
                    users.append(prompt.user)
                enc = data.collate(items, pad_id, left=True)
                enc = {k: v.to(model.device) for k, v in enc.items() if v is not None}
                if "pixel_values" in enc:
                    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=tok.eos_token_id)
                answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # (B,)
                for i, r, user, text in zip(idx, batch, users, answers):
                    text = text.strip()
                    answer_id = hashlib.sha1(f"{model_id}/{r['question_id']}/{text}".encode()).hexdigest()[:22]
                    rows.append((i, {"question_id": r["question_id"], "prompt": user, "text": text,
                                     "answer_id": answer_id, "model_id": model_id, "metadata": {}}))
    finally:
        model.train(was_training)
    if distributed:
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if rank != 0:
            return None
        rows = [row for part in parts for row in part]
    rows.sort(key=lambda x: x[0])
    assert [i for i, _ in rows] == list(range(len(records))), f"gathered {len(rows)} answers for {len(records)} records"
    return [row for _, row in rows]


# -----------------------------------------------------------------------------
# The standard VQA answer normalisation (EvalAI's, which TextVQA's m4c evaluator uses), rule for rule

_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
_COMMA_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # upstream writes (?!<=\d)(\.)(?!\d), which reduces to this
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without (one of) their apostrophes are restored: "dont" -> "don't", "couldnt've" ->
# "couldn't've". Upstream's table has exactly these keys plus: "somebody'd" -> "somebodyd" (backwards, kept),
# two identities, and four capitalised keys ("Im", ...) that never match lower-cased text (left out).
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"


@functools.lru_cache(maxsize=None)
def normalize_vqa(answer):
    """Lower case; drop ',' and '?'; split "'s"; punctuation removed (or made a space when it joins two words);
    periods not followed by a digit removed (at most 32: upstream passes re.UNICODE as re.sub's count); number
    words to digits; articles dropped; contractions restored."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    glued = _COMMA_IN_NUMBER.search(s) is not None
    out = s
    for p in _PUNCTUATION:  # upstream tests the text as it was before this loop, not as it goes
        out = out.replace(p, "" if (p + " " in s or " " + p in s or glued) else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


# -----------------------------------------------------------------------------
# The eight Instruction Following scorers: (answer text, ground truth, scoring) -> score in [0, 1]

LETTERS = ["A", "B", "C", "D", "E"]


def score_scienceqa(text, truth, scoring="official"):
    """ScienceQA (eval_science_qa.py): the letter is the whole answer if it is one of A-E, else the first character
    of "X. ...", else the first one-character word, upper-cased; correct iff it is the right option's letter."""
    if text in LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        m = re.search(r"\b(\w)\b", text)
        letter = m.group(1).upper() if m else None
    return float(letter == truth)


def score_textvqa(text, answers, scoring="official"):
    """TextVQA (m4c_evaluator.py): VQA soft accuracy. Answers normalised (normalize_vqa); the mean over the ten
    leave-one-out subsets of the human answers of min(1, matches / 3)."""
    pred = normalize_vqa(text)
    gts = [normalize_vqa(a) for a in answers]
    m = gts.count(pred)
    accs = [min(1, (m - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


def score_gqa(text, truth, scoring="official"):
    """GQA (convert_gqa_for_eval.py + eval_gqa.py): every trailing '.' stripped, lower-cased; exact match with the
    answer. Quirk: official strips no space (" yes" is wrong); fixed strips surrounding white space first."""
    text = text.strip() if scoring == "fixed" else text
    return float(text.rstrip(".").lower() == truth)


def score_exact_upper(text, truth, scoring="official"):
    """VizWiz and VQAv2 (eval_vizwiz.py, eval_vqav2.py): exact match after upper-casing both."""
    return float(text.upper() == truth.upper())


def score_ocrvqa(text, truth, scoring="official"):
    """OCR-VQA (eval_ocrvqa.py): wrong if the answer contains 'Unanswerable', else exact match lower-cased."""
    return 0.0 if "Unanswerable" in text else float(text.lower() == truth.lower())


def score_imagenet(text, truth, scoring="official"):
    """ImageNet (eval_ImagetNet.py): correct iff the ground truth is in the answer or the answer in the ground truth
    (case-sensitive). Quirk: "" is in every string; official counts an empty answer correct, fixed does not."""
    if scoring == "fixed" and not text.strip():
        return 0.0
    return float(truth in text or text in truth)


def parse_box(text, scoring="official"):
    """Grounding's box parser (eval_grounding.py): brackets removed, split on ',', four floats. Quirk: official first
    cuts one character from each end of the bracket-free string (it strips no space), so y2 loses its last digit,
    or, after a leading space, x1 keeps its first; fixed does not cut."""
    s = text.replace("[", "").replace("]", "")
    if scoring == "official":
        s = s[1:-1]
    try:
        box = [float(v) for v in s.split(",")]
    except ValueError:
        return None
    return box if len(box) == 4 else None


def iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 when the union is empty)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0


def score_grounding(text, truth, scoring="official"):
    """Grounding (eval_grounding.py): both boxes (normalised to the padded square) scaled by max(w, h); correct iff
    IoU > 0.5. An answer that does not parse to four numbers is wrong."""
    box_text, size = truth
    pred = parse_box(text, scoring)
    if pred is None:
        return 0.0
    gt = [float(v) for v in box_text.replace("[", "").replace("]", "").split(",")]
    s = max(size)
    return float(iou([v * s for v in pred], [v * s for v in gt]) > 0.5)


SCORERS = {"ScienceQA": score_scienceqa, "TextVQA": score_textvqa, "ImageNet": score_imagenet, "GQA": score_gqa,
           "VizWiz": score_exact_upper, "Grounding": score_grounding, "VQAv2": score_exact_upper,
           "OCR-VQA": score_ocrvqa}


@functools.lru_cache(maxsize=16)
def load_ground_truth(task, root):
    """The official ground truth of ScienceQA, TextVQA or GQA from its files under `root` (data.GROUND_TRUTH):
    ScienceQA {pid: option letter} over pid_splits.json's test split, in its order; TextVQA {question_id as text:
    the ten human answers}; GQA {questionId: (answer, isBalanced)}. A missing file raises (data.ground_truth_files)."""
    paths = data.ground_truth_files(task, root)
    if task == "ScienceQA":  # the answer is an option index
        problems, splits = (data.read_json(p) for p in paths)
        return {pid: LETTERS[problems[pid]["answer"]] for pid in splits["test"]}
    ann = data.read_json(paths[0])
    if task == "TextVQA":
        return {str(a["question_id"]): a["answers"] for a in ann["data"]}
    return {qid: (q["answer"], q["isBalanced"]) for qid, q in ann.items()}


def test_file_truth(task, rec):
    """The ground truth stored in a test record: Grounding (answer_bbox, size); TextVQA its one answer as all ten."""
    if task == "Grounding":
        return rec.get("answer_bbox", rec.get("answer")), rec["size"]
    return [rec["answer"]] * 10 if task == "TextVQA" else data.record_answer(rec)


def truth_of(task, rec, gt, path):
    """A test record's ground truth: from the official file's `gt` ({id: truth}, load_ground_truth) when given."""
    if gt is None:
        return test_file_truth(task, rec)
    qid = str(rec["question_id"])  # the files' ids are JSON keys (text), or made text (TextVQA)
    if qid not in gt:
        raise cli.UserError(f"question_id {qid!r} of the {task} test file is not in {path}")
    if task == "TextVQA" and len(gt[qid]) != 10:
        raise cli.UserError(f"{path}: question {qid} has {len(gt[qid])} answers; the VQA accuracy needs 10")
    return gt[qid][0] if task == "GQA" else gt[qid]


def score_task(task, preds, records, scoring="official", ground_truth=None, source=None):
    """Instruction Following score (0-100) of `preds` (prediction rows, in file order) on `records` (the task's test
    records). `ground_truth`: the folder holding the official ground-truth files (the image root's layout,
    data.GROUND_TRUTH), or None to score ScienceQA, TextVQA and GQA against the test records' answers. `source`: the
    prediction file, named in errors.
    Returns {task, score, n (the denominator), correct, missing, ...}; official and fixed differ in pairing and
    denominators (score_official, score_fixed)."""
    if scoring not in SCORINGS:
        raise cli.UserError(f"scoring={scoring!r}: choose from {', '.join(SCORINGS)}")
    if task == "Grounding" and any("size" not in r for r in records):
        raise cli.UserError("Grounding test records need 'size' ([w, h]) to scale the boxes")
    if not records:
        raise cli.UserError(f"{task}: no test records to score against (an empty test file, or all dropped): a "
                            "score on nothing is not 0")
    gt = load_ground_truth(task, ground_truth) if ground_truth and task in data.GROUND_TRUTH else None
    path = ground_truth and os.path.join(ground_truth, data.GROUND_TRUTH.get(task, ("",))[0])
    where = source or f"{task} predictions"
    result = (score_official if scoring == "official" else score_fixed)(task, preds, records, gt, path, where)
    return {"task": task, **result, "records": len(records), "scoring": scoring,
            "ground_truth": path if gt is not None else "test file"}


def score_fixed(task, preds, records, gt, path, where):
    """coin's corrected rules: predictions paired with test records by question_id (as text); every test record
    counts once, a missing prediction as wrong; a repeated or unknown question_id is an error. GQA counts the
    questions its ground truth marks balanced (all of them without it)."""
    by_qid = index_predictions(preds, records, where)
    if gt is not None and task == "GQA":
        records = [r for r in records if gt.get(str(r["question_id"]), (None, True))[1]]
    correct, missing = 0.0, 0
    for rec in records:
        pred = by_qid.get(str(rec["question_id"]))
        if pred is None:
            missing += 1
            continue
        correct += SCORERS[task](pred["text"], truth_of(task, rec, gt, path), "fixed")
    n = len(records)
    return {"score": 100 * correct / n if n else 0.0, "n": n, "correct": correct, "missing": missing}


# How each official scorer pairs a prediction line with its ground truth: by position (ImageNet), by question_id as
# text (TextVQA, VQAv2), or by question_id as stored (VizWiz, Grounding, OCR-VQA: a number does not find a text id)
PAIRED_BY_TEXT = ("TextVQA", "VQAv2")


def score_official(task, preds, records, gt, path, where):
    """The official scorers' own pairing and denominators, bit for bit (arithmetic in their order):
      - ScienceQA (eval_science_qa.py): every pid of the split (pid_splits.json's test, among `records`; without the
        file, every test record) counts; the last line of a repeated question_id counts; a question_id must equal the
        pid as stored (the number 7 is not the pid "7": missing); lines for other ids are left out. correct/n*100.
      - GQA (eval_gqa.py): the predictions, the last line of a repeated id, over the question ids of
        testdev_balanced_questions.json; only questions marked isBalanced count (missing ones do not). mean*100.
      - TextVQA, ImageNet, VizWiz, Grounding, VQAv2, OCR-VQA (eval_*.py): every prediction line counts, repeated ones
        too; test records without a line do not. TextVQA finds the ids in its annotation file, the others in the test
        file; a line whose id the scorer cannot find is an error (the official script fails with KeyError; ImageNet
        pairs line i with record i and fails past the last record)."""
    if task == "ScienceQA":
        return score_official_scienceqa(preds, records, gt, path)
    if task == "GQA":
        return score_official_gqa(preds, records, gt, path, where)
    if task == "ImageNet":
        if len(preds) > len(records):
            raise cli.UserError(f"{where}: {len(preds)} lines for {len(records)} ImageNet test records; the "
                                "official eval_ImagetNet.py pairs line i with record i and fails past the last record")
        truths = [data.record_answer(r) for r in records[:len(preds)]]
    else:
        key = str if task in PAIRED_BY_TEXT else (lambda qid: qid)
        # eval_textvqa.py looks the ids up in its annotation file only, the others in the test file
        from_file = task == "TextVQA" and gt is not None
        known = gt if from_file else {key(r["question_id"]): r for r in records}
        unknown = [p["question_id"] for p in preds if key(p["question_id"]) not in known]
        if unknown:
            raise cli.UserError(f"{where}: {len(unknown)} lines with a question_id not in "
                                f"{path if from_file else 'the test file'} (e.g. {unknown[:3]}; the official scorer "
                                "fails on them with KeyError): wrong task, test file or --max_test?")
        truths = [truth_of(task, p if from_file else known[key(p["question_id"])], gt, path) for p in preds]
    scores = [SCORERS[task](p["text"], truth, "official") for p, truth in zip(preds, truths)]
    n = len(preds)
    seen = {str(p["question_id"]) for p in preds}
    missing = len(records) - len(preds) if task == "ImageNet" else sum(str(r["question_id"]) not in seen
                                                                         for r in records)
    if task == "TextVQA":  # m4c_evaluator.py: 100 * (mean of the soft scores)
        score = 100.0 * (sum(scores) / n) if n else 0.0
    else:  # 100 * right / total
        score = 100.0 * int(sum(scores)) / n if n else 0.0
    return {"score": score, "n": n, "correct": sum(scores), "missing": missing,
            "repeated": n - len(seen) if task != "ImageNet" else 0}


def score_official_scienceqa(preds, records, gt, path):
    """eval_science_qa.py's loop: see score_official."""
    if gt is None:
        gt = {r["question_id"]: r["answer"] for r in records}
    else:
        outside = [r["question_id"] for r in records if str(r["question_id"]) not in gt]
        if outside:
            raise cli.UserError(f"question_id {outside[0]!r} of the ScienceQA test file is not in the test split of "
                                f"{os.path.join(os.path.dirname(path), 'pid_splits.json')}")
        scored = {str(r["question_id"]) for r in records}
        gt = {pid: letter for pid, letter in gt.items() if pid in scored}
    latest = {p["question_id"]: p["text"] for p in preds}  # a repeated id: the last line
    correct = sum(score_scienceqa(latest[pid], letter) for pid, letter in gt.items() if pid in latest)
    n = len(gt)
    return {"score": correct / n * 100 if n else 0.0, "n": n, "correct": correct,
            "missing": sum(pid not in latest for pid in gt), "left_out": sum(qid not in gt for qid in latest)}


def score_official_gqa(preds, records, gt, path, where):
    """convert_gqa_for_eval.py + eval_gqa.py's loop: see score_official."""
    if gt is None:
        gt = {r["question_id"]: (r["answer"], True) for r in records}
    latest = {p["question_id"]: p["text"] for p in preds}  # a repeated id: the last line
    unknown = [qid for qid in latest if qid not in gt]
    if unknown:
        raise cli.UserError(f"{where}: {len(unknown)} question_ids not in {path or 'the test file'} (e.g. "
                            f"{unknown[:3]}; the official eval_gqa.py fails on them with KeyError)")
    scores = [score_gqa(text, gt[qid][0], "official") for qid, text in latest.items() if gt[qid][1]]
    n = len(scores)
    answered = {str(qid) for qid in latest}
    balanced = [str(r["question_id"]) for r in records if gt.get(str(r["question_id"]), (None, True))[1]]
    return {"score": float(sum(scores)) / n * 100 if n else 0.0, "n": n, "correct": sum(scores),
            "missing": sum(qid not in answered for qid in balanced), "unbalanced": len(latest) - n}


# -----------------------------------------------------------------------------
# General Knowledge: a judge rates the answer's content against the ground truth, 0-10, never seeing the image

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RULE = ("We would like to request your feedback on the performance of an AI assistants in response to the user "
              "question displayed above.\nPlease rate the accuracy of its responses according to the ground truth "
              "answer displayed above. The assistant receives an overall score on a scale of 0 to 10, where a higher "
              "score indicates better overall performance.\nPlease output a single line containing only a values "
              "indicating the scores for the Assistant.")
JUDGE_RULE_GROUNDING = JUDGE_RULE.replace(
    "displayed above.\n", "displayed above. The user asks the question on observing an image. For your reference, the "
    "visual content in the image is represented with one descriptive sentence describing the same image and the "
    "bounding box coordinates of each object in the scene. These coordinates are in the form of bounding boxes, "
    "represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values correspond to the top "
    "left x, top left y, bottom right x, and bottom right y. \n", 1)


def judge_prompt(task, rec, answer):
    """(system, user) messages of the paper's judge (create_prompt.py, rule "CoIN"): the question without its last
    (instruction) line, the ground truth, the answer. Grounding (rule "CoIN_Grounding") keeps the whole one-line
    question, whose expression follows the instruction, and shows the box."""
    if task == "Grounding":
        question, truth, rule = rec["text"], rec.get("answer_bbox", rec.get("answer")), JUDGE_RULE_GROUNDING
    else:
        question, truth, rule = data.split_question(rec["text"])[0], rec["answer"], JUDGE_RULE
    user = (f"[Context]\n[Question]\n{question}\n\n[Ground truth answer]\n{truth}\n\n[End of ground truth answer]\n\n"
            f"[Assistant]\n{answer}\n\n[End of Assistant]\n\n[System]\n{rule}\n\n")
    return JUDGE_SYSTEM, user


def parse_judge_score(text):
    """The paper's parsing of the judge's reply: the reply as a number if it is one in [0, 10]; else "a/b" -> a if a
    is a whole number <= 10; else the first number in the reply if <= 10; else 0. NOTE(fidelity): the first whole
    number, not the first digit ("10" is 10, not 1); a negative reply counts 0 (the official script adds it)."""
    t = text.strip()
    try:
        x = float(t)
        return x if 0 <= x <= 10 else 0.0
    except ValueError:
        pass
    a = t.split("/")[0].strip()
    if "/" in t and a.isnumeric() and float(a) <= 10:
        return float(a)
    m = re.search(r"\d+(?:\.\d+)?", t)
    return float(m.group()) if m and float(m.group()) <= 10 else 0.0


class Judge:
    """Both judges: `judge(task, [(record, answer)])` -> [(judge_text, score 0-10)]; `score` does the rest.
    Task score = 100 * sum(scores) / (10 * N) over all N test records, a missing prediction scoring 0.
    NOTE(fidelity): the official script rounds the task score to a whole number, and its file pattern
    (prompt_[1-9]) leaves out the replies of chunk 0; here the score is not rounded and every item counts."""

    def score(self, task, preds, records):
        by_qid = index_predictions(preds, records, f"{task} predictions")
        items = [(r, by_qid[str(r["question_id"])]["text"]) for r in records if str(r["question_id"]) in by_qid]
        judged = iter(self.judge(task, items))
        rows = []
        for r in records:
            text, s = next(judged) if str(r["question_id"]) in by_qid else ("missing prediction", 0)
            rows.append({"question_id": r["question_id"], "judge_text": text, "score": s})
        n = len(records)
        if n == 0:
            raise cli.UserError(f"{task}: no test records to judge (an empty test file, or all dropped)")
        return {"task": task, "score": 100 * sum(row["score"] for row in rows) / (10 * n), "n": n,
                "missing": n - len(items), "judge": self.name, "rows": rows}


def _says(phrase, text):
    """`phrase` occurs in `text` as a whole word or phrase."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


_POSITION = re.compile(r"(?<!\w)(" + "|".join(sorted(data.POSITIONS, key=len, reverse=True)) + r")(?!\w)")
_OPTION_LETTER = re.compile(r"(?<!\w)([B-E]|A(?!\s+[a-z]))(?!\w)")  # "B", "B.", "(B)"; not the article "A red.."


class ExactJudge(Judge):
    """CoIN-mini's judge: it knows each synthetic item's content (the test record's `accept` list) and scores the
    answer's content whatever its format, 10 or 0 (judge_text says why). Rubric, on the lower-cased answer:
      - any task: 10 iff an accepted string occurs as a whole word or phrase ("red", "top left", "2" or "two"),
        and for a yes/no item the other word does not;
      - ScienceQA: the options are read from the question; 10 iff the answer names the right option (its capital
        letter standing alone, except an "A" starting a lower-case phrase, or its text) and no other;
      - Grounding: 10 iff the position phrases named are exactly the accepted one, or the answer holds a box with
        IoU > 0.5 (fixed parser).
    Records without `accept` (the real CoIN) fall back to the stored answer: a crude stand-in for the LM judge."""
    name = "exact"

    def judge(self, task, items):
        return [self.judge_one(task, rec, answer) for rec, answer in items]

    def judge_one(self, task, rec, answer):
        low = answer.lower()
        accept = [a.lower() for a in rec.get("accept") or [data.record_answer(rec)]]
        if task == "ScienceQA":
            options = dict(re.findall(r"^([A-E])\. (.+)$", rec["text"], re.M))
            right = rec["answer"]
            named = set(_OPTION_LETTER.findall(answer)) | {k for k, v in options.items() if _says(v.lower(), low)}
            if right in named and len(named) == 1:
                return f"10: names option {right} only", 10
            return f"0: names {sorted(named) or 'no option'}, right is {right}", 0
        if task == "Grounding":
            bracketed = re.search(r"\[[^\]]*\]", answer)  # the first "[...]" in the answer, or all of it
            box = parse_box(bracketed.group() if bracketed else answer, "fixed")
            gt = parse_box(rec.get("answer_bbox", rec.get("answer")), "fixed")
            if box is not None and gt is not None and iou(box, gt) > 0.5:
                return f"10: box IoU {iou(box, gt):.2f}", 10
            named = set(_POSITION.findall(low))
            if named and named <= set(accept):
                return f"10: position {sorted(named)}", 10
            return f"0: position {sorted(named)}, accepted {accept}", 0
        for a in accept:
            other = {"yes": "no", "no": "yes"}.get(a)
            if _says(a, low) and not (other and _says(other, low)):
                return f"10: says {a!r}", 10
        return f"0: none of {accept}", 0


class LMJudge(Judge):
    """The paper's judge with any local causal LM (a Hugging Face folder; the paper used Qwen1.5-32B-Chat): the
    judge_prompt messages through the tokenizer's chat template (plain "system\\n\\nuser" without one), greedy by
    default (NOTE(fidelity): the official script samples at temperature 0.2), batched with left padding."""

    def __init__(self, model_dir, batch_size=16, max_new_tokens=16, device=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if not os.path.isdir(model_dir):
            raise cli.MissingFile(f"judge {model_dir!r}: no such folder (give 'exact' or a Hugging Face causal LM)")
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(self.device).eval()
        self.name = os.path.basename(os.path.normpath(model_dir))

    def chat(self, system, user):
        if not self.tok.chat_template:
            return f"{system}\n\n{user}"
        return self.tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                            tokenize=False, add_generation_prompt=True)

    def judge(self, task, items):
        import torch
        prompts = [self.chat(*judge_prompt(task, rec, answer)) for rec, answer in items]
        replies = []
        with torch.no_grad():
            for s in range(0, len(prompts), self.batch_size):
                # a chat template writes its own special tokens
                enc = self.tok(prompts[s:s + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=not self.tok.chat_template).to(self.device)
                out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id)
                replies += self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [(r.strip(), parse_judge_score(r)) for r in replies]


# -----------------------------------------------------------------------------
# Aggregates over the T x T accuracy matrix a[j][i] = score on task i after training stage j (None: not evaluated)


def aggregates(matrix):
    """MAA = mean over stages j of mean(a[j][0..j]); BWT = sum over i < T-1 of (a[T-1][i] - a[i][i]), divided by T
    (the paper's main text) and by T - 1 (BWT_classic, the usual definition); final_average = mean of the last row;
    forgetting[i] = max over stages i..T-2 of a[.][i], minus a[T-1][i] (None for the last task and later ones).
    T = the number of leading stages whose rows are complete, so a run in progress gets its numbers so far."""
    assert all(len(row) == len(matrix) for row in matrix), f"not a square matrix: {[len(r) for r in matrix]}"
    T = 0
    while T < len(matrix) and all(v is not None for v in matrix[T][:T + 1]):
        T += 1
    out = {"stages": T, "MAA": None, "BWT": None, "BWT_classic": None, "final_average": None,
           "forgetting": [None] * len(matrix)}
    if T == 0:
        return out
    a, last = matrix, matrix[T - 1]
    drops = [last[i] - a[i][i] for i in range(T - 1)]
    out.update(MAA=sum(sum(a[j][:j + 1]) / (j + 1) for j in range(T)) / T, BWT=sum(drops) / T,
               BWT_classic=sum(drops) / (T - 1) if T > 1 else None, final_average=sum(last[:T]) / T)
    out["forgetting"][:T - 1] = [max(a[j][i] for j in range(i, T - 1)) - last[i] for i in range(T - 1)]
    return out


# -----------------------------------------------------------------------------
# Output: results.json, markdown tables, heatmaps


def _fmt(v, none=""):
    return none if v is None else f"{v:.2f}"


def markdown_table(tasks, matrix, title, zero_shot=None):
    """The matrix as a markdown table shaped like the paper's: a row per stage (the task just trained), a column per
    task, the stage's mean; then per-task forgetting and MAA / BWT."""
    agg = aggregates(matrix)
    lines = [f"### {title}", "", "| stage | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    if zero_shot:
        vals = [zero_shot.get(t) for t in tasks]
        lines.append("| 0 zero-shot | " + " | ".join(map(_fmt, vals)) + " |  |")
    for j, row in enumerate(matrix):
        seen = [v for v in row[:j + 1] if v is not None]
        mean = sum(seen) / len(seen) if len(seen) == j + 1 else None
        lines.append(f"| {j + 1} {tasks[j]} | " + " | ".join(map(_fmt, row)) + f" | {_fmt(mean)} |")
    lines.append("| forgetting | " + " | ".join(map(_fmt, agg["forgetting"])) + " |  |")
    f = {k: _fmt(agg[k], "-") for k in ("MAA", "BWT", "BWT_classic", "final_average")}
    lines += ["", f"MAA **{f['MAA']}** · BWT **{f['BWT']}** (paper, /T) · BWT {f['BWT_classic']} (classic, "
              f"/(T-1)) · final average {f['final_average']} · stages {agg['stages']}/{len(tasks)}", ""]
    return "\n".join(lines)


_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(v):
    """Viridis-like colour of a score in [0, 100]."""
    x = min(max(v, 0), 100) / 100 * (len(_VIRIDIS) - 1)
    k = min(int(x), len(_VIRIDIS) - 2)
    return tuple(round(c0 + (c1 - c0) * (x - k)) for c0, c1 in zip(_VIRIDIS[k], _VIRIDIS[k + 1]))


def heatmap(path, tasks, matrix, title):
    """Draw the matrix with pillow: a cell per (stage, task) coloured by score with its number, labels, a colour bar."""
    font, small, big = (ImageFont.load_default(size=s) for s in (13, 11, 15))
    agg = aggregates(matrix)
    labels = [f"{j + 1} {t}" for j, t in enumerate(tasks)]
    f = {k: _fmt(agg[k], "-") for k in ("MAA", "BWT", "BWT_classic", "final_average")}
    footer = (f"MAA {f['MAA']}   BWT {f['BWT']} (/T)   BWT {f['BWT_classic']} (/(T-1))   "
              f"final average {f['final_average']}   stages {agg['stages']}/{len(tasks)}")
    left = 24 + max(font.getlength(s) for s in labels)
    cw, ch, top, T = max(64, 10 + max(font.getlength(t) for t in tasks)), 30, 72, len(tasks)
    W = int(max(left + cw * T + 90, 20 + font.getlength(footer), 20 + big.getlength(title)))
    img = Image.new("RGB", (W, top + ch * T + 44), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, font=big, fill="black")
    d.text((10, 30), "row: after training stage j    column: task evaluated", font=small, fill=(90, 90, 90))
    for i, t in enumerate(tasks):
        d.text((left + cw * i + cw / 2, top - 5), t, font=font, fill="black", anchor="mb")
    for j, row in enumerate(matrix):
        y = top + ch * j
        d.text((10, y + ch / 2), labels[j], font=font, fill="black", anchor="lm")
        for i, v in enumerate(row):
            box = [left + cw * i, y, left + cw * (i + 1) - 1, y + ch - 1]
            if v is None:  # grey: to be evaluated (or missing); white: never (a task not yet trained)
                d.rectangle(box, fill=(242, 242, 242) if i <= j else "white", outline=(225, 225, 225))
                continue
            c = colour(v)
            d.rectangle(box, fill=c, outline="white")
            ink = "black" if 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2] > 120 else "white"
            d.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{v:.1f}", font=font, fill=ink, anchor="mm")
    x0, bar_h = left + cw * T + 16, ch * T  # the colour bar, 100 at the top
    for k in range(bar_h):
        d.line([(x0, top + k), (x0 + 14, top + k)], fill=colour(100 * (1 - k / max(1, bar_h - 1))))
    for v in (0, 25, 50, 75, 100):
        y = top + (bar_h - 1) * (1 - v / 100)
        d.line([(x0 + 14, y), (x0 + 18, y)], fill="black")
        d.text((x0 + 21, y), str(v), font=small, fill="black", anchor="lm")
    d.text((10, top + ch * T + 14), footer, font=font, fill="black")
    img.save(path)


# Printed under a table with the zero-shot row: a base that writes sentences gets ScienceQA credit by the official rule
ZERO_SHOT_SCIENCEQA = ("Zero-shot ScienceQA is not skill: the official rule takes the first one-letter word of a "
                       "reply for its option (\"A poetry book called ...\" reads A, and so does \"it has a tail\"), "
                       "so a base that writes sentences scores on the questions whose answer is A (docs/scoring.md).\n")


def latest_measured(res):
    """(the stage, {task: {name: number}}) of the latest stage in `measured` of results.json (or of its extras): what
    the method measured of that stage's evaluation (coin.py, Method.evaluating; HiDe-LLaVA's and DISCO's "routed");
    (None, {}) without any."""
    measured = res.get("measured") or {}
    if not measured:
        return None, {}
    stage = max(measured, key=lambda name: int(re.match(r"stage(\d+)-", name).group(1)))  # stage<j>-<task>
    return stage, measured[stage]


def write_results(out_dir, tasks, if_matrix, gk_matrix, extra=None):
    """Write results.json (tasks, matrix and every aggregate at the top level for Instruction Following, the same
    under general_knowledge, then `extra`), results.md and heatmap_if.png / heatmap_gk.png; return the markdown.
    gk_matrix may be None (no judge). Works on a partly filled matrix: stages still to come are None rows."""
    os.makedirs(out_dir, exist_ok=True)
    extra = dict(extra or {})
    zero_shot = extra.get("zero_shot") or {}
    res = {"tasks": list(tasks), "matrix": if_matrix, **aggregates(if_matrix)}
    md = markdown_table(tasks, if_matrix, "Instruction Following (accuracy %)",
                        {t: s["if"] for t, s in zero_shot.items()})
    if "ScienceQA" in zero_shot and "ScienceQA" in tasks:
        md += ZERO_SHOT_SCIENCEQA + "\n"
    stage, measured = latest_measured(extra)
    for name in dict.fromkeys(k for m in measured.values() for k in m):  # one line per number the method measures
        md += (f"\n{name} after {stage} (measured by the method, docs/methods.md): "
               + " · ".join(f"{t} {m[name]:.2f}" for t, m in measured.items() if name in m) + "\n")
    heatmap(os.path.join(out_dir, "heatmap_if.png"), tasks, if_matrix, "Instruction Following: accuracy (%)")
    if gk_matrix is not None:
        res["general_knowledge"] = {"tasks": list(tasks), "matrix": gk_matrix, **aggregates(gk_matrix)}
        md += "\n" + markdown_table(tasks, gk_matrix, "General Knowledge (judge score %)",
                                    {t: s["gk"] for t, s in zero_shot.items() if s.get("gk") is not None})
        heatmap(os.path.join(out_dir, "heatmap_gk.png"), tasks, gk_matrix, "General Knowledge: judge score (%)")
    clash = res.keys() & extra.keys()
    assert not clash, f"extra repeats results keys {sorted(clash)}"
    res.update(extra)
    data.write_json(os.path.join(out_dir, "results.json"), res)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return md


# -----------------------------------------------------------------------------
# Standalone: score prediction files written by coin or by the official CoIN code

@dataclasses.dataclass
class Options:
    predictions: str = ""                 # a run folder, its predictions/, the official results folder, or one file
    task: str = ""                        # with one file: its task
    test_file: str = ""                   # with one file: its test JSON (default: the task's, under --data_dir)
    data_dir: str = ""                    # folder holding Instructions_*/ (a coin run's files: the run's; else
                                          # required, or --test_file with one file)
    instructions: str = "Original"        # Original | Diverse | 10Type (a coin run folder: the run's)
    image_dir: str = ""                   # image root (default <data_dir>/images), where the official ground truth is
    ground_truth: str = ""                # a folder holding them instead, laid out as the image root (ScienceQA/...)
    answers_from_test: bool = False       # score ScienceQA, TextVQA, GQA by the test file's one answer (not the
                                          # paper's numbers)
    tasks: str = ""                       # task order (matrix columns); default: coin's stage numbers, else the paper's
    scoring: str = "official"             # official | fixed (see the top of this file)
    judge: str = "exact"                  # General Knowledge judge: exact | none | a Hugging Face causal LM folder
    judge_batch: int = 16                 # prompts per batch for an LM judge
    max_test: int = 0                     # score the first N test records only, as coin's --max_test (0 = all; a coin
                                          # run folder: the run's)
    out: str = "out/eval"                 # where results.json, results.md, heatmaps and judge files go
    compare: str = ""                     # run folders holding results.json, comma-separated: numbers side by side


RULES = {"scoring": cli.one_of(*SCORINGS), "instructions": cli.one_of(*data.INSTRUCTIONS),
         "judge_batch": cli.at_least(1), "max_test": cli.at_least(0)}


def parse_options(argv):
    """The Options of a command line as a dict, every setting checked (unknown keys, types, RULES)."""
    opts, given = cli.parse(Options, argv, __doc__, RULES)
    return {**dataclasses.asdict(opts), "given": given}


def test_set_id(records):
    """{n, sha1} of the question_ids of a test subset, in order: a run records it, a rescoring compares it."""
    ids = json.dumps([str(r["question_id"]) for r in records])
    return {"n": len(records), "sha1": hashlib.sha1(ids.encode()).hexdigest()}


# a coin run's settings that choose its test records: rescoring takes the run's and refuses others
RUN_SETTINGS = ("instructions", "max_test")
# where the run read its test records and ground truth: rescoring takes the run's unless the command line gives them
# (--data_dir may point elsewhere, to the same files: their question_ids are checked against the run's record of them)
RUN_LOCATIONS = ("data_dir", "image_dir", "ground_truth", "answers_from_test")


def run_of(predictions):
    """The coin run folder (it holds results.json) that --predictions is, or whose predictions/ it is, or in whose
    predictions/<stage>/<Task>.jsonl it is one file; None for anything else (the official results tree, a file
    elsewhere)."""
    folder = os.path.abspath(predictions if os.path.isdir(predictions) else os.path.dirname(os.path.dirname(
        os.path.abspath(predictions))))
    run = os.path.dirname(folder) if os.path.basename(folder) == "predictions" else (
        folder if os.path.isdir(predictions) else None)
    return run if run is not None and os.path.isfile(os.path.join(run, "results.json")) else None


def run_test_settings(opts, run_dir):
    """The settings of the coin run in `run_dir` (run_of) that chose its test records (RUN_SETTINGS, RUN_LOCATIONS),
    and its recorded {task: test_set_id}; the command line may not give other --instructions or --max_test."""
    path = os.path.join(run_dir, "results.json")
    run = data.read_json(path)
    config = run.get("config", {})
    clash = [f"--{k}={opts[k]}: the run in {run_dir} evaluated with --{k}={config[k]} (its results.json); "
             f"drop --{k} to score the test records it scored" for k in RUN_SETTINGS
             if k in opts["given"] and k in config and opts[k] != config[k]]
    if clash:
        raise cli.UserError("\n".join(clash))
    if "test_records" not in run:
        print(f"note: {path} does not record which test records the run scored (an older run): scoring the first "
              f"{config.get('max_test') or 'all'} of each test file, as its settings say, unverified")
    if config.get("skip_bad") and any(not k.endswith("/train") for k in run.get("dropped_records", {})):
        raise cli.UserError(f"{run_dir}: the run dropped bad test records (--skip_bad); rescoring it "
                            "needs the same records: use its results.json, or give one file with --test_file")
    taken = {k: config[k] for k in RUN_SETTINGS + RUN_LOCATIONS if k in config and k not in opts["given"]}
    return {**opts, **taken}, run.get("test_records", {})


def canonical_task(name):
    """A task's name from a folder or stage name: 'OCRVQA', 'ocr-vqa' -> 'OCR-VQA'; None if it is not a task."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return {re.sub(r"[^a-z0-9]", "", t.lower()): t for t in data.TASKS}.get(key)


def find_prediction_files(root):
    """[(stage number or None, stage, task, path)] under `root`. coin's layout: <stage>/<Task>.jsonl with stage
    folders 'stageN-<Task>' (N = 1, 2, ...) and 'stage0-zeroshot'. The official layout: <Task>/<Stage>/merge.jsonl
    with Stage 'Finetune' (right after training Task), a task name (after training that task) or 'Zero_shot'
    (scripts/LLaVA/Eval/*.sh write results/CoIN/LLaVA/<Task>/<Stage>/merge.jsonl: `root` may be results/CoIN, above
    the model's folder)."""
    if os.path.isdir(os.path.join(root, "predictions")):
        root = os.path.join(root, "predictions")

    def holds_results(folder):  # a task folder (the official layout) or a stage folder (coin's)
        return any(canonical_task(n) or re.fullmatch(r"stage\d+-.+", n) for n in os.listdir(folder))
    if not holds_results(root):  # results/CoIN: a folder per model (LLaVA, Qwen, ...) above the task folders
        models = sorted(m for m in os.listdir(root) if os.path.isdir(os.path.join(root, m))
                        and holds_results(os.path.join(root, m)))
        if len(models) > 1:
            raise cli.UserError(f"--predictions={root}: results of several models ({', '.join(models)}): give one, "
                                f"e.g. --predictions={os.path.join(root, models[0])}")
        root = os.path.join(root, models[0]) if models else root
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        m = re.fullmatch(r"stage(\d+)-(.+)", name)
        if m and os.path.isdir(folder):  # coin's layout
            stage = "zero-shot" if m.group(1) == "0" else canonical_task(m.group(2))
            for f in sorted(os.listdir(folder)):
                task = canonical_task(f.removesuffix(".jsonl"))
                if f.endswith(".jsonl") and not f.endswith(".judge.jsonl") and task and stage:
                    found.append((int(m.group(1)), stage, task, os.path.join(folder, f)))
        elif canonical_task(name) and os.path.isdir(folder):  # the official layout
            for s in sorted(os.listdir(folder)):
                path = os.path.join(folder, s, "merge.jsonl")
                key = re.sub(r"[^a-z]", "", s.lower())
                stage = {"finetune": canonical_task(name), "zeroshot": "zero-shot"}.get(key) or canonical_task(s)
                if os.path.isfile(path) and stage:
                    found.append((None, stage, canonical_task(name), path))
                elif os.path.isfile(path):
                    print(f"skipping {path}: stage {s!r} is not a task, Finetune or Zero_shot")
    if not found:
        raise cli.UserError(f"--predictions={root}: no prediction files (expected coin's <stage>/<Task>.jsonl or the "
                            "official <Task>/<Stage>/merge.jsonl)")
    return found


def counts_note(scored):
    """What a score left out, in words: test records without a prediction, repeated or unmatched lines."""
    official = scored["scoring"] == "official" and scored["task"] != "ScienceQA"
    parts = [f"{scored['n']} in the denominator",
             f"{scored['missing']} of {scored['records']} records without a prediction, "
             + ("not in the denominator, as in the official scorer" if official else "counted wrong")
             if scored["missing"] else "",
             f"{scored['repeated']} repeated lines (each counted, as in the official scorer)" if scored.get("repeated")
             else "", f"{scored['left_out']} lines for question_ids outside the split (left out)"
             if scored.get("left_out") else "", f"{scored['unbalanced']} questions not marked isBalanced (left out)"
             if scored.get("unbalanced") else ""]
    parts = [p for p in parts if p]
    return f" ({'; '.join(parts)})" if parts else ""


def task_order(files, spec):
    """Matrix columns: --tasks if given, else the order of coin's numbered stages, else the order the official tree
    shows: a task evaluated after the stages S was trained before each of them (the official stage folders are named
    by the task just trained), so the more stages a task has, the earlier it came; ties in the paper's order."""
    if spec:
        return data.parse_tasks(spec)
    numbered = sorted({(n, s) for n, s, _, _ in files if n})
    if numbered:
        return [s for _, s in numbered]
    present = {s for _, s, _, _ in files if s != "zero-shot"} | {t for _, _, t, _ in files}
    later = {t: {s for _, s, task, _ in files if task == t and s not in (t, "zero-shot")} for t in present}
    order = sorted(present, key=lambda t: (-len(later[t]), data.TASKS.index(t)))
    for i, t in enumerate(order):
        if not later[t] <= set(order[i + 1:]):
            raise cli.UserError(f"the stage folders do not fit one training order ({t} is evaluated after "
                                f"{', '.join(sorted(later[t] - set(order[i + 1:])))}, trained before it): give --tasks")
    return order


def compare(runs):
    """The final numbers of several runs side by side, then the settings in which their configs differ (a difference
    in any of them, --eval_images as much as --experts, can explain a difference in the numbers)."""
    head = "| run | MAA | BWT (/T) | BWT (/(T-1)) | final avg | GK MAA | GK BWT (/T) | stages |"
    lines, configs = [head, "|---" * 8 + "|"], []
    for run in runs:
        res = data.read_json(os.path.join(run, "results.json"))
        configs.append(res.get("config") or {})
        gk = res.get("general_knowledge", {})
        vals = [res.get(k) for k in ("MAA", "BWT", "BWT_classic", "final_average")] + [gk.get("MAA"), gk.get("BWT")]
        lines.append(f"| {run} | " + " | ".join(map(_fmt, vals)) + f" | {res.get('stages')}/{len(res['tasks'])} |")
    differ = sorted(k for k in set().union(*configs) - {"out"} if len({repr(c.get(k)) for c in configs}) > 1)
    if differ:
        lines += ["", "settings that differ: " + "; ".join(
            f"--{k}: " + ", ".join(repr(c.get(k)) for c in configs) for k in differ)]
    return "\n".join(lines)


def main(argv):
    if any(a.split("=")[0] in ("--study", "--readme") for a in argv):  # the study's old settings here
        new = [("--out" + a.removeprefix("--study")) if a.split("=")[0] == "--study" else a for a in argv]
        raise cli.UserError(f"`python eval.py --study/--readme` is now `python study.py`: run python study.py "
                            f"{shlex.join(new)}")
    opts = parse_options(argv)
    if opts["compare"]:
        print(compare([r for r in opts["compare"].split(",") if r]))
        return
    if not os.path.exists(opts["predictions"]):
        raise cli.MissingFile(f"--predictions={opts['predictions']!r}: no such folder or file (give a run folder, the "
                              "official results folder, or one file with --task; or --compare=RUN1,RUN2; see --help)")
    # a coin run's files: its own test subset and ground truth (run_test_settings), unless --test_file names the records
    one_file = os.path.isfile(opts["predictions"])
    run_dir = None if one_file and opts["test_file"] else run_of(opts["predictions"])
    opts, test_ids = run_test_settings(opts, run_dir) if run_dir else (opts, {})
    if not opts["data_dir"] and not (one_file and opts["test_file"]):
        raise cli.UserError(f"--predictions={opts['predictions']}: which test records does it answer? Give --data_dir "
                            "(the folder holding Instructions_*/)" + (" or --test_file (the task's test JSON)"
                                                                      if one_file else "")
                            + "; only a coin run's own files name theirs (in its results.json)")
    if not one_file and (out := cli.out_folder_problem(opts["out"])):
        raise cli.UserError(out)
    if opts["ground_truth"] and not os.path.isdir(opts["ground_truth"]):
        raise cli.MissingFile(f"--ground_truth={opts['ground_truth']}: no such folder (the one holding ScienceQA/, "
                              "TextVQA/ and GQA/ with the official ground-truth files)")
    ground_truth = None if opts["answers_from_test"] else (
        opts["ground_truth"] or data.image_root(opts["data_dir"], opts["image_dir"]))
    judge = (None if opts["judge"] == "none" else ExactJudge() if opts["judge"] == "exact"
             else LMJudge(opts["judge"], opts["judge_batch"]))
    records, sources = {}, {}

    def score(task, path, test_file=""):  # -> (Instruction Following result, the judge's result or None)
        first = task not in records
        if first:
            recs = data.test_examples(opts["data_dir"], task, opts["instructions"], path=test_file or None)
            records[task] = recs[:opts["max_test"]] if opts["max_test"] else recs
            sources[task] = (f"{test_file or data.task_file(opts['data_dir'], task, 'eval', opts['instructions'])}, "
                             f"{'the first' if opts['max_test'] else 'all'} {len(records[task])}")
            if task in test_ids and test_set_id(records[task]) != test_ids[task]:
                raise cli.UserError(
                    f"{task}: the test records under --data_dir={opts['data_dir']} are not the {test_ids[task]['n']} "
                    f"the run in {run_dir} scored (regenerated or edited data?); give the data it read")
        preds = read_predictions(path, repeats=opts["scoring"] == "official")
        scored = score_task(task, preds, records[task], opts["scoring"], ground_truth,
                            f"{path} (test records: {sources[task]})")
        # the judge sees one answer per test record (official scoring lets repeated lines through): the last one
        known = {str(r["question_id"]) for r in records[task]}
        latest = {str(p["question_id"]): p for p in preds if str(p["question_id"]) in known}
        judged = judge.score(task, list(latest.values()), records[task]) if judge else None
        print(f"{path}: {task} {scored['score']:.2f}" + (f", general knowledge {judged['score']:.2f}" if judged else "")
              + counts_note(scored) + (f"; test records: {sources[task]}" if first else ""))
        return scored, judged

    if os.path.isfile(opts["predictions"]):  # one file
        task = canonical_task(opts["task"])
        if not task:
            raise cli.UserError(f"--task={opts['task']!r}: one prediction file needs its task: {', '.join(data.TASKS)}")
        scored, judged = score(task, opts["predictions"], opts["test_file"])
        if judged:
            scored["general_knowledge"] = {k: v for k, v in judged.items() if k != "rows"}
        print(json.dumps(scored, indent=1))
        return
    files = find_prediction_files(opts["predictions"])
    tasks = task_order(files, opts["tasks"])
    T = len(tasks)
    if_matrix, gk_matrix, zero_shot = [[None] * T for _ in range(T)], [[None] * T for _ in range(T)], {}
    for _, stage, task, path in files:
        if task not in tasks or stage not in tasks + ["zero-shot"]:
            print(f"skipping {path}: {task} after {stage} is outside --tasks={','.join(tasks)}")
            continue
        if stage != "zero-shot" and tasks.index(task) > tasks.index(stage):
            print(f"skipping {path}: {task} is evaluated before it is trained (after {stage})")
            continue
        scored, judged = score(task, path)
        if judged:
            name = "stage0-zeroshot" if stage == "zero-shot" else f"stage{tasks.index(stage) + 1}-{stage}"
            write_jsonl(os.path.join(opts["out"], "judge", name, f"{task}.judge.jsonl"), judged["rows"])
        if stage == "zero-shot":
            zero_shot[task] = {"if": scored["score"], "gk": judged and judged["score"]}
        else:
            j, i = tasks.index(stage), tasks.index(task)
            if if_matrix[j][i] is not None:
                raise cli.UserError(f"{path}: a second prediction file for {task} after {stage}")
            if_matrix[j][i], gk_matrix[j][i] = scored["score"], judged and judged["score"]
    extra = {"source": opts["predictions"], "scoring": opts["scoring"], "judge": opts["judge"],
             "ground_truth": ground_truth or "test file", "answers_from_test": opts["answers_from_test"],
             "zero_shot": zero_shot}
    print(write_results(opts["out"], tasks, if_matrix, gk_matrix if judge else None, extra))
    print(f"wrote {os.path.join(opts['out'], 'results.json')}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
