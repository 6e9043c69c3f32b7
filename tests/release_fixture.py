"""A miniature of the real CoIN release as downloaded, for the tests: every path, file name and field the official
scripts read (scripts/LLaVA/{Train,Eval}/*.sh, ETrain/Eval/LLaVA/CoIN/*.py), with four train and four test records
per task and small non-square images.

    <root>/Instructions_Original/<ScienceQA|TextVQA|ImageNet|GQA|VizWiz|Grounding|VQAv2|OCRVQA>/train.json
    <root>/Instructions_Original/<task folder>/test.json, or val.json for TextVQA, VizWiz and VQAv2
    <root>/cl_dataset/                       the image root (--image_dir), as the official scripts name it
        COCO2014/train2014/, COCO2014/val2014/, GQA/images/, ScienceQA/images/, TextVQA/train_images/,
        ImageNet_withlabel/, VizWiz/, OCR-VQA/images/
        ScienceQA/problems.json, ScienceQA/pid_splits.json, TextVQA/TextVQA_0.5.1_val.json,
        GQA/testdev_balanced_questions.json  (the official ground truth)
    <root>/results/CoIN/LLaVA/<task folder>/<Finetune|later task>/merge.jsonl   (an official results tree)
"""
import json
import os

from PIL import Image

import data

SIZES = [(64, 48), (40, 72), (96, 64), (56, 56)]  # (w, h): wide, tall, wide, square
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
UNANS = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT
BOX = "Please provide the bounding box coordinate of the region this sentence describes: "


def item(task, i):
    """Record i (0-3 train, 4-7 test) of `task`: (question_id, image path or None, question text, answer, extra)."""
    if task == "ScienceQA":  # pids are text; items 1 and 5 have no image
        pid = str(i + 1)
        split = "train" if i < 4 else "test"
        image = None if i in (1, 5) else f"ScienceQA/images/{split}/{pid}/image.png"
        return pid, image, f"Which is warmer?\nA. ice\nB. fire\n{LETTER}", "B" if i % 2 else "A", {}
    if task == "TextVQA":
        return 34602 + i, f"TextVQA/train_images/{i:016x}.jpg", f"what is written on the sign?\n{SHORT}", \
            ["stop", "exit", "open", "sale"][i % 4], {}
    if task == "ImageNet":
        synset = f"n0144353{i % 4}"
        return 100 + i, f"ImageNet_withlabel/train/{synset}/{synset}_{i}.JPEG", \
            f"What is the object in the image?\n{SHORT}", \
            ["goldfish", "tabby cat", "tench", "great white shark"][i % 4], {}
    if task == "GQA":  # ids are text
        return f"2013072{i:02d}", f"GQA/images/n16131{i}.jpg", f"Is the sky blue?\n{SHORT}", \
            ["yes", "no", "left", "red"][i % 4], {}
    if task == "VizWiz":
        split = "train" if i < 4 else "val"
        return f"VizWiz_{split}_{i:08d}.jpg", f"VizWiz/{split}/VizWiz_{split}_{i:08d}.jpg", f"What is this?\n{UNANS}", \
            ["unanswerable", "soup", "blue", "coffee"][i % 4], {}
    if task == "Grounding":  # a box in the string form of the release, normalised to the image padded to a square
        box = ["[0.12, 0.30, 0.45, 0.88]", "[0.05, 0.10, 0.50, 0.60]", "[0.40, 0.20, 0.95, 0.70]",
               "[0.25, 0.25, 0.75, 0.75]"][i % 4]
        w, h = SIZES[i % 4]
        return 7000 + i, f"COCO2014/train2014/COCO_train2014_{581857 + i:012d}.jpg", \
            f"{BOX}the woman on the left", box, {"answer_bbox": box, "size": [w, h]}
    if task == "VQAv2":
        return 262148000 + i, f"COCO2014/val2014/COCO_val2014_{262148 + i:012d}.jpg", \
            f"How many dogs are there?\n{SHORT}", ["2", "yes", "red", "1"][i % 4], {}
    if task == "OCR-VQA":
        return f"14029{i:05d}_1", f"OCR-VQA/images/14029{i:05d}.jpg", f"Who wrote this book?\n{SHORT}", \
            ["Jane Austen", "Cooking", "Mark Twain", "Travel"][i % 4], {}
    raise ValueError(task)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_release(root):
    """Write the release under `root`; returns (data_dir, image_dir, results_dir)."""
    image_dir = os.path.join(root, "cl_dataset")
    tests = {}
    for task in data.TASKS:
        train, test = [], []
        for i in range(8):
            qid, image, text, answer, extra = item(task, i)
            if image:
                os.makedirs(os.path.join(image_dir, os.path.dirname(image)), exist_ok=True)
                Image.new("RGB", SIZES[i % 4], (40 * i, 200 - 20 * i, 90)).save(os.path.join(image_dir, image))
            if i < 4:
                human = f"{data.IMAGE_TOKEN}\n{text}" if image else text
                rec = {"id": qid, "conversations": [{"from": "human", "value": human},
                                                    {"from": "gpt", "value": answer}]}
            else:
                rec = {"question_id": qid, "text": text, "answer": answer, **extra}
                if task == "Grounding" and i >= 6:
                    del rec["answer"]  # eval_grounding.py reads answer_bbox only; the release may leave answer out
            if image:
                rec["image"] = image
            (train if i < 4 else test).append(rec)
        write_json(data.task_file(root, task, "train"), train)
        write_json(data.task_file(root, task, "eval"), test)
        tests[task] = test
    # the official ground truth under the image root (data.GROUND_TRUTH)
    problems = {item("ScienceQA", i)[0]: {"question": "Which is warmer?", "choices": ["ice", "fire"],
                                          "answer": "AB".index(item("ScienceQA", i)[3]), "hint": "",
                                          "image": "image.png" if item("ScienceQA", i)[1] else None,
                                          "split": "train" if i < 4 else "test"} for i in range(8)}
    write_json(os.path.join(image_dir, "ScienceQA", "problems.json"), problems)
    write_json(os.path.join(image_dir, "ScienceQA", "pid_splits.json"),
               {"train": ["1", "2", "3", "4"], "val": [], "test": ["5", "6", "7", "8"]})
    humans = {"stop": ["stop"] * 10, "exit": ["exit"] * 2 + ["way out"] * 8, "open": ["open"] * 6 + ["opened"] * 4,
              "sale": ["sale"] * 9 + ["Sale!"]}
    write_json(os.path.join(image_dir, "TextVQA", "TextVQA_0.5.1_val.json"), {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question_id": r["question_id"], "question": "what is written on the sign?", "image_id": str(i),
                  "answers": humans[r["answer"]]} for i, r in enumerate(tests["TextVQA"])]
        # a question of the annotation file that is not in val.json (eval_textvqa.py scores a prediction for it)
        + [{"question_id": 99, "question": "what brand is it?", "image_id": "99", "answers": ["acme"] * 10}]})
    questions = {}
    for n, r in enumerate(tests["GQA"]):
        questions[r["question_id"]] = {
            "question": "Is the sky blue?", "answer": r["answer"], "imageId": r["image"], "semantic": [],
            "isBalanced": n != 3,  # one question outside the balanced set: eval_gqa.py leaves it out
            "types": {"structural": "verify" if r["answer"] in ("yes", "no") else "query", "semantic": "attr",
                      "detailed": "colorVerify"},
            "groups": {"global": None if r["answer"] in ("yes", "no") else r["answer"], "local": "c-sky"}}
    write_json(os.path.join(image_dir, "GQA", "testdev_balanced_questions.json"), questions)
    results = os.path.join(root, "results", "CoIN", "LLaVA")
    write_results_tree(results, tests)
    return root, image_dir, os.path.join(root, "results", "CoIN")


# What a model answers after each stage in the official results tree: right on the task just trained (with the
# answer forms the official scorers treat differently), then forgetting one more record at each later stage
RIGHT_FORMS = {"ScienceQA": lambda a: f"{a}. fire" if a == "B" else a, "TextVQA": lambda a: a.upper(),
               "ImageNet": lambda a: a.split()[-1], "GQA": lambda a: a.capitalize() + ".",
               "VizWiz": lambda a: a.capitalize(), "Grounding": lambda a: a, "VQAv2": lambda a: a,
               "OCR-VQA": lambda a: a.lower()}


def write_results_tree(results, tests):
    """results/CoIN/LLaVA/<task folder>/<Stage>/merge.jsonl: Stage 'Finetune' right after the task's own stage,
    then the name of each later task (its folder name, as the official scripts pass it), in the paper's order."""
    for j, task in enumerate(data.TASKS):
        for k, stage in enumerate(data.TASKS[j:]):
            rows = []
            for n, r in enumerate(tests[task]):
                truth = data.record_answer(r)
                text = RIGHT_FORMS[task](truth) if n >= k else "Unanswerable"
                rows.append({"question_id": r["question_id"], "prompt": r["text"], "text": text,
                             "answer_id": f"{task}{n}", "model_id": "llava-1.5-7b-lora", "metadata": {}})
            folder = "Finetune" if k == 0 else data.task_folder(stage)
            path = os.path.join(results, data.task_folder(task), folder, "merge.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
