"""
Tasks, prompts, datasets and CoIN-mini.

CoIN trains one multimodal LLM on eight instruction tasks in sequence. This file holds:
  1. the task list and the prompt template (one function builds prompts for training and evaluation),
  2. reading the official on-disk format (Instructions_*/<Task>/{train,test,val}.json + an image root) and
     checking it (`python data.py check --data=ROOT`: records per task and split, bad records, exit 1 on any),
  3. the PyTorch dataset and collate function used by the training loop,
  4. CoIN-mini: a seeded, pillow-only generator of eight synthetic tasks that mirror CoIN's eight, written
     in the official format, plus the "stage-0" caption corpus that pretrains the tiny base.

Run `python data.py mini --out=DIR` to generate CoIN-mini, `python data.py check --data=DIR` to check a release.
"""
import json
import os
import random
import sys

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# -----------------------------------------------------------------------------
# The task sequence (shared/coin-facts.md, section 1). Directory names are the official ones.

TASKS = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCR-VQA"]
ORDERS = {
    "paper": TASKS,
    # the order of the paper's order ablation, as listed in coin-facts.md (unverified upstream)
    "alphabet": ["GQA", "ImageNet", "OCR-VQA", "Grounding", "ScienceQA", "TextVQA", "VizWiz", "VQAv2"],
}


def parse_tasks(spec):
    """'all' | an order name | 'A,B,C' -> list of task names; rejects unknown names."""
    if spec in ("all", ""):
        return list(TASKS)
    if spec in ORDERS:
        return list(ORDERS[spec])
    names = [s.strip() for s in spec.split(",") if s.strip()]
    lower = {t.lower(): t for t in TASKS}
    out = []
    for n in names:
        if n.lower() not in lower:
            raise ValueError(f"unknown task {n!r}: choose from {', '.join(TASKS)} (or 'all', {', '.join(ORDERS)})")
        out.append(lower[n.lower()])
    if len(set(out)) != len(out):
        raise ValueError(f"--tasks lists a task twice: {spec!r}")
    return out


# -----------------------------------------------------------------------------
# Prompt template: Vicuna v1 for LLaVA-1.5 (as the official code uses it); any other backbone: the processor's own chat
# template. Training and evaluation both build prompts here, so the two cannot drift. Loss goes on the answer only.

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"


def chat_template(processor):
    """The processor's chat template, or None: a LLaVA-1.5 base (the assembled pretrain-only one, the tiny one) has
    none and takes Vicuna v1."""
    return getattr(processor, "chat_template", None) if processor is not None else None


def build_prompt(question, has_image, processor=None):
    """The text the model sees before its answer; training appends answer_text(answer) + eos to it.
    `question` has no <image> token; the image comes first, as LLaVA and the chat templates put it."""
    if chat_template(processor):
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    user = f"{IMAGE_TOKEN}\n{question}" if has_image else question
    return f"{SYSTEM} USER: {user} ASSISTANT:"


def answer_text(answer, processor=None):
    """The answer as it follows the prompt: Vicuna v1 has "ASSISTANT: <answer>"; a chat template's generation prompt
    ends its assistant header itself (with a newline)."""
    return answer if chat_template(processor) else " " + answer


def split_question(text):
    """(question without the format instruction, the instruction): the last line is the instruction."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) == 1:
        return text, ""
    return "\n".join(lines[:-1]), lines[-1]


# -----------------------------------------------------------------------------
# Reading the official format

def task_file(data_dir, task, split, instructions="Original"):
    return os.path.join(data_dir, f"Instructions_{instructions}", task, f"{split}.json")


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is --data_dir the folder holding Instructions_*/?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def parse_train_record(rec):
    """An official train record -> {id, image (rel path or None), question, answer}; ValueError saying what is wrong."""
    try:
        conv = rec["conversations"]
        human, gpt = conv[0]["value"], conv[1]["value"]
        assert conv[0]["from"] == "human" and conv[1]["from"] == "gpt" and isinstance(gpt, str)
    except (KeyError, IndexError, TypeError, AssertionError):
        raise ValueError("is not a LLaVA conversation ({'conversations': [{'from': 'human', ...}, "
                         "{'from': 'gpt', ...}]})") from None
    question = human.replace(IMAGE_TOKEN, "").strip("\n")
    return {"id": rec.get("id"), "image": rec.get("image"), "question": question, "answer": gpt}


def parse_test_record(rec):
    """An official test record, as stored ({question_id, image, text, answer, ...}); ValueError if a field lacks."""
    missing = [k for k in ("question_id", "text", "answer") if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return rec


def read_records(data_dir, task, split, instructions="Original"):
    """(path, [(index, parsed record or None, problem or None)]) of one task file: train files parse to examples,
    test and val files stay as stored. Only an unreadable file raises; a bad record is reported, not raised."""
    path = task_file(data_dir, task, split, instructions)
    parse = parse_train_record if split == "train" else parse_test_record
    out = []
    for i, rec in enumerate(read_json(path)):
        try:
            ex = parse(rec)
            out.append((i, ex if split != "train" or ex["id"] is not None else {**ex, "id": i}, None))
        except ValueError as e:
            out.append((i, None, f"record {i} {e.args[0]}"))
    return path, out


def read_or_raise(data_dir, task, split, instructions):
    """The records of one task file; the first bad record raises, naming the file and the record."""
    path, recs = read_records(data_dir, task, split, instructions)
    bad = [p for _, _, p in recs if p]
    if bad:
        raise ValueError(f"{path}: {bad[0]}")
    return [ex for _, ex, _ in recs]


def train_examples(data_dir, task, instructions="Original"):
    """Train records -> list of dicts {id, image (rel path or None), question, answer}; a bad record raises."""
    return read_or_raise(data_dir, task, "train", instructions)


def test_examples(data_dir, task, instructions="Original", split="test"):
    """Test records as stored: {question_id, image, text, answer, ...}; a bad record raises."""
    return read_or_raise(data_dir, task, split, instructions)


# -----------------------------------------------------------------------------
# Checking a release before any work: `python data.py check --data=ROOT`, and coin.py's check before training

PROBLEMS = ("malformed", "image missing", "image unreadable", "empty answer")


def check_split(data_dir, task, split, instructions, image_dir, open_images=True, processor=None):
    """(path, good records, problems) of one task file; problems are (kind, message) with kind in PROBLEMS.
    A record is bad if it is malformed, names an image that is missing (or, with open_images, cannot be decoded),
    or is a train record whose answer is blank (or, with `processor`, tokenises to nothing: no loss to learn from).
    Opening every image takes minutes at CoIN's size; existence alone takes seconds."""
    path, recs = read_records(data_dir, task, split, instructions)
    good, problems = [], []
    for i, rec, problem in recs:
        kind = "malformed" if problem else None
        if rec is not None and rec.get("image"):
            img = os.path.join(image_dir, rec["image"])
            if not os.path.isfile(img):
                kind, problem = "image missing", f"record {i}: image {rec['image']!r} missing under {image_dir}"
            elif open_images:
                try:
                    with Image.open(img) as im:
                        im.verify()
                except Exception as e:  # pillow raises many types for a broken file
                    kind, problem = "image unreadable", f"record {i}: image {img} unreadable ({e})"
        if rec is not None and kind is None and split == "train":
            empty = not rec["answer"].strip() or (processor is not None and not processor.tokenizer(
                answer_text(rec["answer"], processor), add_special_tokens=False)["input_ids"])
            if empty:
                kind, problem = "empty answer", (f"record {i} (id {rec['id']!r}): the answer {rec['answer']!r} "
                                                  "tokenises to nothing")
        if kind:
            problems.append((kind, problem))
        else:
            good.append(rec)
    return path, good, problems


def check_tasks(data_dir, tasks, instructions, image_dir, splits=("train", "test"), open_images=True,
                processor=None):
    """check_split over tasks x splits: {(task, split): (path, good, problems)}. A split in `splits` that is
    optional (val) is skipped when its file is absent."""
    out = {}
    for task in tasks:
        for split in splits:
            if split == "val" and not os.path.isfile(task_file(data_dir, task, split, instructions)):
                continue
            out[task, split] = check_split(data_dir, task, split, instructions, image_dir, open_images, processor)
    return out


def check_table(checked):
    """A markdown table of check_tasks' result: records and problems per task and split."""
    lines = ["| task | split | records | good | " + " | ".join(PROBLEMS) + " |",
             "|---|---|---|---|" + "---|" * len(PROBLEMS)]
    for (task, split), (_, good, problems) in checked.items():
        counts = [sum(k == kind for k, _ in problems) for kind in PROBLEMS]
        lines.append(f"| {task} | {split} | {len(good) + len(problems)} | {len(good)} | "
                     + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def check_main(argv):
    """`python data.py check --data=ROOT`: records per task and split, and every bad record; exit 1 on any."""
    opts = parse_options(argv, {"data": "data/coin-mini", "instructions": "Original", "image_dir": "", "tasks": "all"})
    image_dir = image_root(opts["data"], opts["image_dir"])
    checked, unreadable = {}, []
    for task in parse_tasks(opts["tasks"]):
        try:
            checked.update(check_tasks(opts["data"], [task], opts["instructions"], image_dir, ("train", "test", "val")))
        except (OSError, ValueError) as e:  # a file that is missing or not JSON at all
            unreadable.append(str(e))
    print(check_table(checked))
    problems = [f"{path}: {msg}" for path, _, found in checked.values() for _, msg in found]
    for line in unreadable + problems:
        print(line)
    n = len(unreadable) + len(problems)
    print(f"{n} problem(s)" if n else "no problems", f"in {opts['data']} (--instructions={opts['instructions']}, "
          f"--image_dir={image_dir})")
    return 1 if n else 0


def image_root(data_dir, image_dir=""):
    """Where records' relative image paths start: --image_dir, or <data_dir>/images (CoIN-mini's layout)."""
    return image_dir or os.path.join(data_dir, "images")


def load_image(image_dir, rel):
    path = os.path.join(image_dir, rel)
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image missing (record's image={rel!r}, --image_dir={image_dir})") from None
    except OSError as e:
        raise ValueError(f"{path}: image unreadable ({e})") from None


def expand2square(img, background):
    """Pad to a square with the processor's mean colour, as official LLaVA training does."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new(img.mode, (s, s), background)
    out.paste(img, ((s - w) // 2, (s - h) // 2))
    return out


def image_mean_rgb(processor):
    return tuple(int(m * 255) for m in processor.image_processor.image_mean)


# -----------------------------------------------------------------------------
# Training dataset: tokenised prompt + answer, labels on the answer (and eos) only

# tensors a processor returns with one value per token, padded like input_ids (with 0) rather than concatenated
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


class InstructionDataset(torch.utils.data.Dataset):
    def __init__(self, examples, processor, image_dir, max_len=2048):
        self.examples, self.processor, self.image_dir, self.max_len = examples, processor, image_dir, max_len
        self.tok = processor.tokenizer
        self.mean = image_mean_rgb(processor)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        has_image = ex["image"] is not None
        prompt = build_prompt(ex["question"], has_image, self.processor)
        if has_image:
            img = expand2square(load_image(self.image_dir, ex["image"]), self.mean)
            enc = self.processor(text=prompt, images=img, return_tensors="pt")
        else:
            enc = self.processor(text=prompt, return_tensors="pt")
        # the image tensors, with a leading image (LLaVA: pixel_values (1, 3, H, W)) or patch dimension (Qwen2-VL:
        # pixel_values (patches, C * t * p * p) and image_grid_thw (1, 3)); collate concatenates them along it
        images = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", *PER_TOKEN)} if has_image \
            else {}
        prompt_ids = enc["input_ids"][0]
        answer_ids = self.tok(answer_text(ex["answer"], self.processor), add_special_tokens=False,
                              return_tensors="pt")["input_ids"][0]
        if len(answer_ids) == 0:
            raise ValueError(f"example {ex['id']}: answer {ex['answer']!r} tokenises to nothing")
        answer_ids = torch.cat([answer_ids, torch.tensor([self.tok.eos_token_id])])
        ids = torch.cat([prompt_ids, answer_ids])[: self.max_len]
        labels = ids.clone()
        labels[: len(prompt_ids)] = -100  # no loss on the prompt
        # per-token tensors beside input_ids (Qwen2-VL: mm_token_type_ids, 1 on image tokens, for its 3D rope), with
        # or without an image: the answer tokens are text (0)
        per_token = {k: torch.cat([enc[k][0], torch.zeros_like(answer_ids)])[: self.max_len]
                     for k in PER_TOKEN if k in enc}
        return {"input_ids": ids, "labels": labels, "pixel_values": images.pop("pixel_values", None), **images,
                **per_token}


def collate(batch, pad_id):
    """Right-pad to the longest item; concatenate the image tensors of the items that have one (the model fills
    the image tokens with image features in order)."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[i, :L], labels[i, :L], mask[i, :L] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in {k for b in batch for k in b if k in PER_TOKEN}:
        out[key] = torch.zeros((len(batch), n), dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            out[key][i, :len(b[key])] = b[key]
    for key in {k for b in batch for k in b} - out.keys():
        parts = [b[key] for b in batch if b.get(key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out


# -----------------------------------------------------------------------------
# CoIN-mini: a synthetic world of coloured shapes, signs and book covers

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "pink": (245, 130, 190)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring", "bar", "pentagon"]
CORNERS = {"circle": 0, "ring": 0, "triangle": 3, "square": 4, "diamond": 4, "bar": 4, "pentagon": 5,
           "hexagon": 6, "star": 10, "cross": 12}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
WORDS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk",
         "yak", "emu", "bat", "rat", "ram", "gnu", "eel", "koi", "jay", "doe"]
TITLES = ["sun", "moon", "rain", "snow", "wind", "fire", "lake", "hill", "road", "sea",
          "gold", "iron", "rose", "leaf", "king", "frog"]
AUTHORS = ["ann", "bob", "cid", "dee", "eve", "gus", "hal", "ivy", "jon", "kim", "lou", "max"]
GENRES = {"poetry": (200, 50, 60), "travel": (40, 110, 200), "cooking": (230, 130, 30),
          "history": (120, 60, 160), "science": (40, 150, 80), "comics": (220, 200, 40)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]

# Format instructions: the last line of every question. Original = the official wording; Diverse = one other
# wording per task; 10Type = ten paraphrases, one drawn per example (section 2 of coin-facts.md).
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
UNANS = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT
BOX = "Please provide the bounding box coordinate of the region this sentence describes:"
INSTRUCTIONS = {
    "Original": {"ScienceQA": [LETTER], "TextVQA": [SHORT], "ImageNet": [SHORT], "GQA": [SHORT],
                 "VizWiz": [UNANS], "Grounding": [BOX], "VQAv2": [SHORT], "OCR-VQA": [SHORT]},
    "Diverse": {"ScienceQA": ["Reply with only the letter of the correct option."],
                "TextVQA": ["Give the text you read as a short answer."],
                "ImageNet": ["Name the object's class in one word."],
                "GQA": ["Respond with one word that answers the question about the scene."],
                "VizWiz": ["If the picture does not show enough, say 'Unanswerable'; otherwise answer in one word."],
                "Grounding": ["Give the normalised box [x1, y1, x2, y2] of the region described here:"],
                "VQAv2": ["Answer briefly with one word or a number."],
                "OCR-VQA": ["Read the cover and answer with a short phrase."]},
}
_TEN = ["{}", "Please: {}", "Note: {}", "{} Be brief.", "Instruction: {}", "Task: {}", "{} Thanks.",
        "Rule: {}", "Remember: {}", "Format: {}"]
INSTRUCTIONS["10Type"] = {t: [p.format(v[0]) for p in _TEN] for t, v in INSTRUCTIONS["Original"].items()}


def _noise_bg(rng, size):
    base = rng.randint(15, 55)
    img = Image.new("RGB", (size, size), (base, base, base + rng.randint(0, 15)))
    return img


def _cell_box(size, pos):
    """Box of grid cell `pos` (0..8) with a small margin, in pixels. Objects sit exactly in their cells, so a
    Grounding answer is one of nine boxes (chance 1/9): a 1M-parameter model can learn that in a few hundred steps."""
    c = size // 3
    r, k = divmod(pos, 3)
    m = max(1, c // 8)
    return [k * c + m, r * c + m, (k + 1) * c - m, (r + 1) * c - m]


def draw_shape(d, shape, box, color):
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "ring":
        d.ellipse(box, outline=color, width=max(2, w // 5))
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "bar":
        d.rectangle([x1, cy - h / 5, x2, cy + h / 5], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=color)
    elif shape == "cross":
        t = w / 6
        d.rectangle([cx - t, y1, cx + t, y2], fill=color)
        d.rectangle([x1, cy - t, x2, cy + t], fill=color)
    else:  # star, hexagon, pentagon: regular polygons
        import math
        n, inner = {"star": (5, 0.45), "hexagon": (6, 1.0), "pentagon": (5, 1.0)}[shape]
        pts = []
        for i in range(n * (2 if inner < 1 else 1)):
            rad = (w / 2) * (inner if (inner < 1 and i % 2) else 1.0)
            a = -math.pi / 2 + i * math.pi * 2 / (n * (2 if inner < 1 else 1))
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=color)


def make_scene(rng, size, n_objects, distinct=True):
    """1..n objects in distinct grid cells; returns objects [{shape, color, pos, box}]. With distinct=True no
    two objects share (shape, color), so every 'the <color> <shape>' names one object."""
    cells = rng.sample(range(9), n_objects)
    objs, seen = [], set()
    for pos in cells:
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            if not distinct or (shape, color) not in seen:
                break
        seen.add((shape, color))
        objs.append({"shape": shape, "color": color, "pos": pos, "box": _cell_box(size, pos)})
    return objs


def big_object(rng, size, shift=0):
    """One big object near the centre, as in ImageNet's and VizWiz's photos (radius size/4 .. 2*size/5)."""
    o = make_scene(rng, size, 1)[0]
    c, s = size // 2, rng.randint(size // 4, size * 2 // 5)
    x, y = c - s + rng.randint(-shift, shift), c - s + rng.randint(-shift, shift)
    o["box"], o["pos"] = [x, y, x + 2 * s, y + 2 * s], 4
    return o


def count_scene(rng, size):
    """1..4 objects of one shape (any colours) plus at most one other object: VQAv2's counting scenes.
    Returns (objects, shape, count)."""
    shape, k = rng.choice(SHAPES), rng.randint(1, 4)
    objs = make_scene(rng, size, k, distinct=False)
    for o in objs:
        o["shape"] = shape
    extra = [o for o in make_scene(rng, size, rng.randint(0, 1)) if o["shape"] != shape]
    used = {o["pos"] for o in objs}
    return objs + [o for o in extra if o["pos"] not in used], shape, k


def render_scene(rng, size, objs):
    img = _noise_bg(rng, size)
    d = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(d, o["shape"], o["box"], COLORS[o["color"]])
    return img


def _font(size):
    return ImageFont.load_default(size=size)


def render_sign(rng, size, word):
    img = _noise_bg(rng, size)
    d = ImageDraw.Draw(img)
    f = _font(size * 14 // 48)
    x1, y1, x2, y2 = d.textbbox((0, 0), word, font=f)
    x = rng.randint(1, max(1, size - (x2 - x1) - 3))
    y = rng.randint(1, max(1, size - (y2 + 2)))
    bg = rng.choice([(250, 250, 250), (240, 220, 60), (60, 200, 90)])
    d.rectangle([x - 1, y + y1 - 2, x + x2 + 1, y + y2 + 2], fill=bg)
    d.text((x, y), word, font=f, fill=(10, 10, 10))
    return img


def render_book(rng, size, title, author, genre):
    img = Image.new("RGB", (size, size), GENRES[genre])
    d = ImageDraw.Draw(img)
    def place(text, font_px, y, color):  # large type (a 1M-parameter reader needs it at 48 px), never clipped
        f = _font(size * font_px // 48)
        d.text((rng.randint(1, max(1, size - d.textbbox((0, 0), text, font=f)[2] - 1)), y), text, font=f, fill=color)

    title_y, author_y = rng.randint(0, 2), size * 30 // 48 + rng.randint(0, 1)
    # dark type on light bands, title above and author below, the genre's colour between: white type on the colour
    # (as first drawn) stayed unread by the tiny base (titles 4% after stage 0, dark authors on their band 37%)
    d.rectangle([0, 0, size, size * 17 // 48], fill=(235, 235, 225))  # the title's band
    place(title, 14, title_y, (20, 20, 20))
    d.rectangle([0, size * 29 // 48, size, size], fill=(235, 235, 225))  # the author's band
    place(author, 14, author_y, (20, 20, 20))
    return img


def degrade(rng, img):
    """VizWiz's unanswerable photos: blurred to a smear, darkened, or cut to a corner."""
    kind = rng.choice(["blur", "dark", "crop"])
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=img.size[0] / 6))
    if kind == "dark":
        return img.point(lambda v: v // 12)
    s = img.size[0]
    return img.crop((0, 0, s // 5, s // 5)).resize((s, s), Image.NEAREST)


# ScienceQA's choices: five per question type, always listed in this order. NOTE(fidelity): real ScienceQA
# shuffles its options; a fixed order lets a 1M-parameter model learn the letter format in ~200 steps (with
# shuffled options it stayed at chance), while the letter still has to come from the image or the knowledge.
SQA_CHOICES = {"color": ["red", "green", "blue", "yellow", "purple"],
               "shape": ["circle", "square", "triangle", "star", "cross"],
               "corners": ["3", "4", "5", "6", "10"]}


def _options(correct, kind):
    """The question type's five choices as 'A. x' lines -> (lines, letter of the correct one)."""
    choices = SQA_CHOICES[kind]
    lines = "\n".join(f"{l}. {c}" for l, c in zip("ABCDE", choices))
    return lines, "ABCDE"[choices.index(correct)]


def _box_str(box, size):
    return "[" + ", ".join(f"{v / size:.2f}" for v in box) + "]"


def _name(o):
    return f"{o['color']} {o['shape']}"


# Share of Grounding expressions that also say where the object is ("the red star on the left"), as RefCOCO's often
# do. One side only (a column or a row), so the other still has to be seen: with none, MoELoRA's Grounding in the
# sequence sat at 30.5-32.5 (LoRA 33.5-38.5) against a 3 x chance bar of 33.3; with half, 48.5 (LoRA 55.5; README
# section 5)
GROUNDING_WHERE = 0.5


def _expression(rng, o):
    """A Grounding referring expression for object o: its name, and with probability GROUNDING_WHERE one side of the
    picture it is on (left/right for its column, top/bottom for its row; "in the middle" for the centre cell)."""
    if rng.random() >= GROUNDING_WHERE:
        return f"the {_name(o)}"
    row, col = divmod(o["pos"], 3)
    sides = ["on the left"] * (col == 0) + ["on the right"] * (col == 2) + ["at the top"] * (row == 0) + \
        ["at the bottom"] * (row == 2)
    return f"the {_name(o)} {rng.choice(sides or ['in the middle'])}"


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _a(o):
    """'a red star', 'an orange ring'."""
    return f"{_article(o['color'])} {_name(o)}"


def plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def _relation(a, b):
    """Relations of object a to object b that hold (grid rows/columns)."""
    ra, ka = divmod(a["pos"], 3)
    rb, kb = divmod(b["pos"], 3)
    rel = []
    if ka < kb: rel.append("to the left of")
    if ka > kb: rel.append("to the right of")
    if ra < rb: rel.append("above")
    if ra > rb: rel.append("below")
    return rel


def describe(objs):
    parts = [f"{_a(o)} at the {POSITIONS[o['pos']]}" for o in objs]
    return "The picture shows " + ", ".join(parts) + "."


def make_item(task, rng, size):
    """One synthetic example of `task`: dict(image: PIL or None, question, answer, accept (content words the
    General Knowledge judge accepts), chance (1 / number of plausible answers), plus task extras)."""
    if task == "ScienceQA":
        if rng.random() < 0.25:  # text-only knowledge items, as ScienceQA has
            shape = rng.choice([s for s in SHAPES if str(CORNERS[s]) in SQA_CHOICES["corners"]])
            ans = str(CORNERS[shape])
            lines, letter = _options(ans, "corners")
            return dict(image=None, question=f"How many corners does a {shape} have?\n{lines}", answer=letter,
                        accept=[letter, ans], chance=0.2)
        objs = make_scene(rng, size, 1)
        o = objs[0]
        o["color"], o["shape"] = rng.choice(SQA_CHOICES["color"]), rng.choice(SQA_CHOICES["shape"])
        if rng.random() < 0.5:
            q, ans, kind = "What is the color of the object?", o["color"], "color"
        else:
            q, ans, kind = "Which shape is in the picture?", o["shape"], "shape"
        lines, letter = _options(ans, kind)
        return dict(image=render_scene(rng, size, objs), question=f"{q}\n{lines}", answer=letter,
                    accept=[letter, ans], chance=0.2)
    if task == "TextVQA":
        w = rng.choice(WORDS)
        q = rng.choice(["What word is written on the sign?", "What does the sign say?"])
        return dict(image=render_sign(rng, size, w), question=q, answer=w, accept=[w], chance=1 / len(WORDS))
    if task == "ImageNet":
        o = big_object(rng, size, shift=4)
        return dict(image=render_scene(rng, size, [o]), question="What is the object in the image?",
                    answer=o["shape"], accept=[o["shape"]], chance=1 / len(SHAPES))
    if task == "GQA":
        while True:
            objs = make_scene(rng, size, rng.randint(2, 3))
            a, b = rng.sample(objs, 2)
            rels = _relation(a, b)
            if not rels:
                continue
            rel = rng.choice(rels)
            others = [o for o in objs if o is not b and rel in _relation(o, b)]
            if len(others) == 1:
                break
        img = render_scene(rng, size, objs)
        u = rng.random()
        if u < 0.45:
            return dict(image=img, question=f"What shape is {rel} the {_name(b)}?", answer=a["shape"],
                        accept=[a["shape"]], chance=1 / len(SHAPES))
        if u < 0.9:
            return dict(image=img, question=f"What color is the shape {rel} the {_name(b)}?", answer=a["color"],
                        accept=[a["color"]], chance=1 / len(COLORS))
        yes = rng.random() < 0.5
        subj = a if yes else rng.choice([o for o in objs if o is not a and o is not b] or [b])
        holds = rel in _relation(subj, b) if subj is not b else False
        ans = "yes" if holds else "no"
        return dict(image=img, question=f"Is the {_name(subj)} {rel} the {_name(b)}?", answer=ans, accept=[ans],
                    chance=0.5)
    if task == "VizWiz":
        o = big_object(rng, size)
        img = render_scene(rng, size, [o])
        if rng.random() < 0.5:
            q, ans, n = "What color is this?", o["color"], len(COLORS) + 1
        else:
            q, ans, n = "What is this thing?", o["shape"], len(SHAPES) + 1
        if rng.random() < 0.3:
            img, ans = degrade(rng, img), "unanswerable"
        return dict(image=img, question=q, answer=ans, accept=[ans], chance=1 / n)
    if task == "Grounding":
        objs = make_scene(rng, size, rng.randint(2, 3))
        o = rng.choice(objs)
        # the expression draws from rng before render_scene does: moving it after would change every file of v3
        box, expression = _box_str(o["box"], size), _expression(rng, o)
        return dict(image=render_scene(rng, size, objs), question=None, expression=expression,
                    answer=box, accept=[POSITIONS[o["pos"]]], chance=1 / 9, answer_bbox=box, size=[size, size])
    if task == "VQAv2":
        u = rng.random()
        if u < 0.4:  # counting
            objs, shape, k = count_scene(rng, size)
            return dict(image=render_scene(rng, size, objs), question=f"How many {plural(shape)} are there?",
                        answer=str(k), accept=[str(k), NUMBER_WORDS[k]], chance=1 / 4)
        objs = make_scene(rng, size, rng.randint(1, 3))
        shapes = [o["shape"] for o in objs]
        o = rng.choice([o for o in objs if shapes.count(o["shape"]) == 1] or objs[:1])
        if shapes.count(o["shape"]) > 1:
            objs = [o]
        if u < 0.8:
            return dict(image=render_scene(rng, size, objs), question=f"What color is the {o['shape']}?",
                        answer=o["color"], accept=[o["color"]], chance=1 / len(COLORS))
        colors = [p["color"] for p in objs]
        if colors.count(o["color"]) > 1:
            objs = [o]
        return dict(image=render_scene(rng, size, objs), question=f"What shape is the {o['color']} object?",
                    answer=o["shape"], accept=[o["shape"]], chance=1 / len(SHAPES))
    if task == "OCR-VQA":
        title, author, genre = rng.choice(TITLES), rng.choice(AUTHORS), rng.choice(list(GENRES))
        img = render_book(rng, size, title, author, genre)
        u = rng.random()
        if u < 0.4:
            q, ans, n = "What is the title of this book?", title, len(TITLES)
        elif u < 0.75:
            q, ans, n = "Who is the author of this book?", author, len(AUTHORS)
        else:
            q, ans, n = "What is the genre of this book?", genre, len(GENRES)
        return dict(image=img, question=q, answer=ans, accept=[ans], chance=1 / n)
    raise ValueError(f"unknown task {task!r}")


def _count_phrase(k, shape):
    return f"{NUMBER_WORDS[k]} {shape if k == 1 else plural(shape)}"


def stage0_item(rng, size):
    """A caption-corpus item for pretraining the tiny base: (image or None, question, answer). It covers every
    kind of picture the eight tasks show (scenes, big single objects, repeated shapes, signs, book covers,
    degraded photos) and the content their questions ask about (names, colours, positions, relations, counts,
    words), always answered in full sentences: the base knows the world, not the tasks' answer formats."""
    kind = rng.choices(["scene", "big", "many", "sign", "book", "fact", "blur", "place"], [6, 2, 2, 2, 5, 1, 1, 1])[0]
    if kind == "fact":
        s = rng.choice(SHAPES)
        n = CORNERS[s]
        a = f"A {s} has {n} corners." if n else f"A {s} has no corners."
        return None, rng.choice([f"How many corners does a {s} have?", f"Tell me about the {s}."]), a
    if kind == "sign":
        w = rng.choice(WORDS)
        q = rng.choice(["Describe the image.", "What does the sign say?", "What is written here?"])
        return render_sign(rng, size, w), q, f"A sign with the word {w} written on it."
    if kind == "book":
        t, a, g = rng.choice(TITLES), rng.choice(AUTHORS), rng.choice(list(GENRES))
        img = render_book(rng, size, t, a, g)
        q, ans = rng.choice([("Describe the image.", f"A {g} book called {t}, written by {a}."),
                             ("What book is this?", f"It is {_article(g)} {g} book called {t}."),
                             ("Who wrote this book?", f"This book was written by {a}."),
                             ("What is written on the cover?", f"The cover says {t} and, below, {a}.")])
        return img, q, ans
    # a big object: always for "big", half the time for "blur" (the coin is tossed for both kinds)
    if kind in ("big", "blur") and (rng.random() < 0.5 or kind == "big"):
        o = big_object(rng, size, shift=4)
        img = render_scene(rng, size, [o])
        if kind == "blur":
            return degrade(rng, img), "What is this?", "The picture is too unclear to see anything."
        q, ans = rng.choice([("Describe the image.", f"A big {_name(o)} fills the picture."),
                             ("What is this?", f"It is {_a(o)}."),
                             ("What is the object in the picture?", f"The object is {_a(o)}.")])
        return img, q, ans
    if kind == "many":
        objs, shape, k = count_scene(rng, size)
        others = [o for o in objs if o["shape"] != shape]
        if rng.random() < 0.5:
            return render_scene(rng, size, objs), f"How many {plural(shape)} are there?", \
                f"There {'is' if k == 1 else 'are'} {_count_phrase(k, shape)}."
        tail = f" and {_a(others[0])}" if others else ""
        return render_scene(rng, size, objs), "Describe the image.", f"The picture shows {_count_phrase(k, shape)}{tail}."
    objs = make_scene(rng, size, rng.randint(1, 4))
    img = render_scene(rng, size, objs)
    if kind == "blur":
        return degrade(rng, img), "Describe the image.", "The picture is too unclear to see anything."
    u = rng.random()
    o = rng.choice(objs)
    where = POSITIONS[o["pos"]]
    if kind == "place":
        # where, also in numbers (fractions of the picture's width and height): the knowledge a Grounding answer
        # needs, in a sentence, not in the task's "[x1, y1, x2, y2]" format. A kind of its own, and rare: the loss
        # is a mean over answer tokens, and these long answers would otherwise crowd out everything else
        x1, y1, x2, y2 = (v / size for v in o["box"])
        return img, f"Where is the {_name(o)}?", (f"The {_name(o)} is at the {where}, from x {x1:.2f} to {x2:.2f} "
                                                  f"and y {y1:.2f} to {y2:.2f}.")
    if u < 0.3:
        return img, "Describe the image.", describe(objs)
    if u < 0.45:
        return img, f"Where is the {_name(o)}?", f"The {_name(o)} is at the {where} of the picture."
    if u < 0.6:
        return img, f"What is at the {where}?", f"There is {_a(o)} at the {where}."
    if u < 0.7:
        return img, f"What color is the {o['shape']} at the {where}?", f"The {o['shape']} at the {where} is {o['color']}."
    pairs = [(a, b, r) for a in objs for b in objs if a is not b for r in _relation(a, b)]
    if not pairs:
        return img, "Describe the image.", describe(objs)
    a, b, r = rng.choice(pairs)
    if rng.random() < 0.5:
        return img, f"Where is the {_name(a)} compared to the {_name(b)}?", f"The {_name(a)} is {r} the {_name(b)}."
    them = [x for x in objs if x is not b and r in _relation(x, b)]
    ans = " and ".join(_a(x) for x in them)
    return img, f"What is {r} the {_name(b)}?", f"There is {ans} {r} the {_name(b)}."


def write_json(path, obj):
    """Write obj as JSON to path atomically (to path.tmp, then renamed): a kill leaves the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# Train records per task, in units of n_train. The tiny model needs more steps for the two answer formats that carry
# no word it already says: ScienceQA's option letter and Grounding's box (LoRA on the task alone, 1 -> 2 epochs of
# 3,000 records: ScienceQA 55.5 -> 99.5, Grounding 29.5 -> 39.5; Grounding in the sequence: 33.0 at 2x, 38.5 at 3x;
# README section 5). The first n_train records are the same at any scale (one random stream per task and split).
TRAIN_SCALE = {"ScienceQA": 2, "Grounding": 3}
# Bumped whenever the generator writes different files for the same settings: `python data.py mini` regenerates a
# folder written by another version and leaves a current one alone.
MINI_VERSION = 3


def mini_settings(n_train, n_test, n_stage0, size, seed):
    """What fixes CoIN-mini's files: the generator's version and its settings (kept in coin_mini.json)."""
    return {"version": MINI_VERSION, "seed": seed, "size": size, "n_train": n_train, "n_test": n_test,
            "n_stage0": n_stage0, "train_records": {task: n_train * TRAIN_SCALE.get(task, 1) for task in TASKS}}


def mini_is_current(out, n_train, n_test, n_stage0, size, seed):
    """True if `out` holds a finished CoIN-mini written by this generator with these settings (coin_mini.json is
    written last, so an interrupted generation is never current)."""
    try:
        with open(os.path.join(out, "coin_mini.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    want = mini_settings(n_train, n_test, n_stage0, size, seed)
    return {k: meta.get(k) for k in want} == want


def generate_mini(out, n_train=3000, n_test=200, n_stage0=46000, size=48, seed=0, progress=True):
    """Write CoIN-mini under `out` in the official layout:
    out/Instructions_{Original,Diverse,10Type}/<Task>/{train,test}.json, out/images/<Task>/<split>/N.png,
    out/Stage0/train.json (caption corpus), out/annotations/TextVQA_0.5.1_val.json, out/coin_mini.json (meta)."""
    from tqdm import tqdm
    meta = dict(mini_settings(n_train, n_test, n_stage0, size, seed), chance={})
    img_dir = os.path.join(out, "images")
    textvqa_ann = []
    for ti, task in enumerate(TASKS):
        for split, n in (("train", meta["train_records"][task]), ("test", n_test)):
            rng = random.Random(f"{seed}-{task}-{split}")
            os.makedirs(os.path.join(img_dir, task, split), exist_ok=True)
            sets = {k: [] for k in INSTRUCTIONS}
            chance = 0.0
            for i in tqdm(range(n), desc=f"CoIN-mini {task} {split}", disable=not progress, leave=False):
                it = make_item(task, rng, size)
                rel = None
                if it["image"] is not None:
                    rel = f"{task}/{split}/{i:06d}.png"
                    it["image"].save(os.path.join(img_dir, rel))
                chance += it["chance"]
                for iset, table in INSTRUCTIONS.items():
                    instr = rng.choice(table[task]) if len(table[task]) > 1 else table[task][0]
                    if task == "Grounding":
                        text = f"{instr} {it['expression']}"
                    else:
                        text = f"{it['question']}\n{instr}"
                    qid = f"{task}_{split}_{i}"
                    if split == "train":
                        human = f"{IMAGE_TOKEN}\n{text}" if rel else text
                        rec = {"id": qid, "conversations": [{"from": "human", "value": human},
                                                            {"from": "gpt", "value": it["answer"]}]}
                    else:
                        rec = {"question_id": qid, "text": text, "answer": it["answer"], "accept": it["accept"]}
                        if task == "Grounding":
                            rec["answer_bbox"], rec["size"] = it["answer_bbox"], it["size"]
                    if rel:
                        rec["image"] = rel
                    sets[iset].append(rec)
                if split == "test" and task == "TextVQA":
                    # ten "human" answers: mostly the word, sometimes a slip (TextVQA's annotator noise)
                    ans = [it["answer"] if rng.random() < 0.9 else rng.choice(WORDS) for _ in range(10)]
                    textvqa_ann.append({"question_id": f"{task}_{split}_{i}", "answers": ans})
            for iset, recs in sets.items():
                write_json(task_file(out, task, split, iset), recs)
            if split == "test":
                meta["chance"][task] = 100 * chance / n
    write_json(os.path.join(out, "annotations", "TextVQA_0.5.1_val.json"), {"data": textvqa_ann})
    rng = random.Random(f"{seed}-stage0")
    os.makedirs(os.path.join(img_dir, "Stage0"), exist_ok=True)
    recs = []
    for i in tqdm(range(n_stage0), desc="CoIN-mini stage-0 captions", disable=not progress, leave=False):
        img, q, a = stage0_item(rng, size)
        rec = {"id": f"stage0_{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if img is not None:
            rec["image"] = f"Stage0/{i:06d}.png"
            img.save(os.path.join(img_dir, rec["image"]))
            rec["conversations"][0]["value"] = f"{IMAGE_TOKEN}\n{q}"
        recs.append(rec)
    for iset in INSTRUCTIONS:
        write_json(task_file(out, "Stage0", "train", iset), recs)
    write_json(os.path.join(out, "coin_mini.json"), meta)
    return meta


def parse_options(argv, defaults):
    """--key=value options of a small command line tool over `defaults` (whose values give the types);
    an unknown key or a value of the wrong type exits with a message."""
    opts = dict(defaults)
    for a in argv:
        k, _, v = a.removeprefix("--").partition("=")
        if k not in opts:
            sys.exit(f"unknown option --{k}; known: {', '.join('--' + o for o in opts)}")
        try:
            opts[k] = type(opts[k])(v)
        except ValueError:
            sys.exit(f"--{k} takes a {type(opts[k]).__name__}, not {v!r}")
    return opts


def main(argv):
    if argv and argv[0] == "check":
        sys.exit(check_main(argv[1:]))
    if not argv or argv[0] != "mini":
        sys.exit("usage: python data.py mini [--out=data/coin-mini] [--n_train=3000] [--n_test=200] "
                 "[--n_stage0=46000] [--size=48] [--seed=0]\n"
                 "       python data.py check [--data=ROOT] [--instructions=Original] [--image_dir=ROOT/images] "
                 "[--tasks=all]")
    opts = parse_options(argv[1:], {"out": "data/coin-mini", "n_train": 3000, "n_test": 200, "n_stage0": 46000,
                                    "size": 48, "seed": 0})
    if mini_is_current(**opts):
        print(f"CoIN-mini in {opts['out']} is current (generator version {MINI_VERSION}, same settings): kept")
        return
    meta = generate_mini(**opts)
    print(f"wrote CoIN-mini to {opts['out']} (chance levels %: "
          + ", ".join(f"{t} {c:.1f}" for t, c in meta["chance"].items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
