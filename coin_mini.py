"""
CoIN-mini: a synthetic CoIN in the official on-disk layout, drawn with pillow.

Eight seeded tasks that mirror CoIN's eight (arXiv 2403.08350) one for one, small enough for a 1M-parameter LLaVA
on a CPU: coloured shapes on a 3 x 3 grid, signs and book covers. They are written exactly as the official release
lays out its files (Instructions_{Original,Diverse,10Type}/<task folder>/{train,test|val}.json, images and the
official ground truth of ScienceQA, TextVQA and GQA under one root), so everything that reads the real CoIN reads
CoIN-mini unchanged; SEFE's answer-style diversification as its CoIN-ASD release lays it out (Instructions_ASD/<task
folder>/train_x{X}.json). A "stage-0" caption corpus pretrains the tiny base.

    python coin_mini.py --out=data/coin-mini    # ~35 s, ~360 MB; kept if the folder holds it with these settings

`python coin_mini.py --help` lists the settings (--key=value; unknown keys are errors).
"""
import dataclasses
import json
import math
import os
import random
import re
import sys

from PIL import Image, ImageDraw, ImageFilter, ImageFont

import cli
import data
from data import IMAGE_TOKEN, POSITIONS, TASKS

# -----------------------------------------------------------------------------
# The world the pictures show

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "pink": (245, 130, 190)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring", "bar", "pentagon"]
CORNERS = {"circle": 0, "ring": 0, "triangle": 3, "square": 4, "diamond": 4, "bar": 4, "pentagon": 5,
           "hexagon": 6, "star": 10, "cross": 12}
WORDS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk",
         "yak", "emu", "bat", "rat", "ram", "gnu", "eel", "koi", "jay", "doe"]
TITLES = ["sun", "moon", "rain", "snow", "wind", "fire", "lake", "hill", "road", "sea",
          "gold", "iron", "rose", "leaf", "king", "frog"]
AUTHORS = ["ann", "bob", "cid", "dee", "eve", "gus", "hal", "ivy", "jon", "kim", "lou", "max"]
GENRES = {"poetry": (200, 50, 60), "travel": (40, 110, 200), "cooking": (230, 130, 30),
          "history": (120, 60, 160), "science": (40, 150, 80), "comics": (220, 200, 40)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]

# -----------------------------------------------------------------------------
# Format instructions: the last line of every question, one wording per instruction set of the release
# (Instructions_<set>/). Original = the official wording of Instructions_Original; Diverse = one other wording per
# task; 10Type = ten paraphrases of the Original one, one drawn per example.

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
UNANS = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT
BOX = "Please provide the bounding box coordinate of the region this sentence describes:"
FORMAT_INSTRUCTIONS = {
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
TEN_TYPE_TEMPLATES = ["{}", "Please: {}", "Note: {}", "{} Be brief.", "Instruction: {}", "Task: {}", "{} Thanks.",
                      "Rule: {}", "Remember: {}", "Format: {}"]
FORMAT_INSTRUCTIONS["10Type"] = {task: [template.format(wording[0]) for template in TEN_TYPE_TEMPLATES]
                                 for task, wording in FORMAT_INSTRUCTIONS["Original"].items()}
# the sets that reword the format instruction; the ASD sets (restyled answers) are written from Original's records
assert tuple(FORMAT_INSTRUCTIONS) == tuple(s for s in data.INSTRUCTIONS if data.asd_share(s) is None), \
    (tuple(FORMAT_INSTRUCTIONS), data.INSTRUCTIONS)

# -----------------------------------------------------------------------------
# Drawing


def background(rng, size):
    """A flat dark grey of a random shade (slightly blue at random)."""
    base = rng.randint(15, 55)
    return Image.new("RGB", (size, size), (base, base, base + rng.randint(0, 15)))


def cell_box(size, pos):
    """Box of grid cell `pos` (0..8) with a small margin, in pixels. Objects sit exactly in their cells, so a
    Grounding answer is one of nine boxes (chance 1/9): a 1M-parameter model can learn that in a few hundred steps."""
    c = size // 3
    row, col = divmod(pos, 3)
    margin = max(1, c // 8)
    return [col * c + margin, row * c + margin, (col + 1) * c - margin, (row + 1) * c - margin]


def draw_shape(draw, shape, box, color):
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, w // 5))
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "bar":
        draw.rectangle([x1, cy - h / 5, x2, cy + h / 5], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=color)
    elif shape == "cross":
        t = w / 6
        draw.rectangle([cx - t, y1, cx + t, y2], fill=color)
        draw.rectangle([x1, cy - t, x2, cy + t], fill=color)
    else:  # star, hexagon, pentagon: regular polygons (a star alternates outer and inner corners)
        n, inner = {"star": (5, 0.45), "hexagon": (6, 1.0), "pentagon": (5, 1.0)}[shape]
        corners = n * (2 if inner < 1 else 1)
        points = []
        for i in range(corners):
            radius = (w / 2) * (inner if (inner < 1 and i % 2) else 1.0)
            angle = -math.pi / 2 + i * math.pi * 2 / corners
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=color)


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
        objs.append({"shape": shape, "color": color, "pos": pos, "box": cell_box(size, pos)})
    return objs


def big_object(rng, size, shift=0):
    """One big object near the centre, as in ImageNet's and VizWiz's photos (radius size/4 .. 2*size/5)."""
    obj = make_scene(rng, size, 1)[0]
    c, radius = size // 2, rng.randint(size // 4, size * 2 // 5)
    x, y = c - radius + rng.randint(-shift, shift), c - radius + rng.randint(-shift, shift)
    obj["box"], obj["pos"] = [x, y, x + 2 * radius, y + 2 * radius], 4
    return obj


def count_scene(rng, size):
    """1..4 objects of one shape (any colours) plus at most one other object: VQAv2's counting scenes.
    Returns (objects, shape, count)."""
    shape, k = rng.choice(SHAPES), rng.randint(1, 4)
    objs = make_scene(rng, size, k, distinct=False)
    for obj in objs:
        obj["shape"] = shape
    extra = [obj for obj in make_scene(rng, size, rng.randint(0, 1)) if obj["shape"] != shape]
    used = {obj["pos"] for obj in objs}
    return objs + [obj for obj in extra if obj["pos"] not in used], shape, k


def render_scene(rng, size, objs):
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        draw_shape(draw, obj["shape"], obj["box"], COLORS[obj["color"]])
    return img


def font(size):
    return ImageFont.load_default(size=size)


def render_sign(rng, size, word):
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    f = font(size * 14 // 48)
    x1, y1, x2, y2 = draw.textbbox((0, 0), word, font=f)
    x = rng.randint(1, max(1, size - (x2 - x1) - 3))
    y = rng.randint(1, max(1, size - (y2 + 2)))
    sign_color = rng.choice([(250, 250, 250), (240, 220, 60), (60, 200, 90)])
    draw.rectangle([x - 1, y + y1 - 2, x + x2 + 1, y + y2 + 2], fill=sign_color)
    draw.text((x, y), word, font=f, fill=(10, 10, 10))
    return img


def render_book(rng, size, title, author, genre):
    img = Image.new("RGB", (size, size), GENRES[genre])
    draw = ImageDraw.Draw(img)

    def place(text, font_px, y, color):  # large type (a 1M-parameter reader needs it at 48 px), never clipped
        f = font(size * font_px // 48)
        x = rng.randint(1, max(1, size - draw.textbbox((0, 0), text, font=f)[2] - 1))
        draw.text((x, y), text, font=f, fill=color)

    title_y, author_y = rng.randint(0, 2), size * 30 // 48 + rng.randint(0, 1)
    # dark type on light bands, title above and author below, the genre's colour between: the tiny base learns to
    # read dark type on a light band, and barely reads white type on the colour (4% of titles after stage 0)
    draw.rectangle([0, 0, size, size * 17 // 48], fill=(235, 235, 225))  # the title's band
    place(title, 14, title_y, (20, 20, 20))
    draw.rectangle([0, size * 29 // 48, size, size], fill=(235, 235, 225))  # the author's band
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


# -----------------------------------------------------------------------------
# Words about the pictures

# ScienceQA's choices: five per question type, always listed in this order. NOTE(fidelity): real ScienceQA
# shuffles its options; a fixed order lets a 1M-parameter model learn the letter format in ~200 steps (with
# shuffled options it stays at chance), while the letter still has to come from the image or the knowledge.
SQA_CHOICES = {"color": ["red", "green", "blue", "yellow", "purple"],
               "shape": ["circle", "square", "triangle", "star", "cross"],
               "corners": ["3", "4", "5", "6", "10"]}


def option_lines(correct, kind):
    """The question type's five choices as 'A. x' lines -> (lines, letter of the correct one)."""
    choices = SQA_CHOICES[kind]
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCDE", choices))
    return lines, "ABCDE"[choices.index(correct)]


def box_text(box, size):
    """A pixel box as Grounding's answer: '[x1, y1, x2, y2]', fractions of the picture, two decimals."""
    return "[" + ", ".join(f"{v / size:.2f}" for v in box) + "]"


def name(obj):
    """'red star'."""
    return f"{obj['color']} {obj['shape']}"


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def with_article(obj):
    """'a red star', 'an orange ring'."""
    return f"{article(obj['color'])} {name(obj)}"


def plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def count_phrase(k, shape):
    """'one star', 'three crosses'."""
    return f"{NUMBER_WORDS[k]} {shape if k == 1 else plural(shape)}"


def relations(a, b):
    """Relations of object a to object b that hold (grid rows/columns)."""
    row_a, col_a = divmod(a["pos"], 3)
    row_b, col_b = divmod(b["pos"], 3)
    out = []
    if col_a < col_b: out.append("to the left of")
    if col_a > col_b: out.append("to the right of")
    if row_a < row_b: out.append("above")
    if row_a > row_b: out.append("below")
    return out


def describe(objs):
    parts = [f"{with_article(obj)} at the {POSITIONS[obj['pos']]}" for obj in objs]
    return "The picture shows " + ", ".join(parts) + "."


# Share of Grounding expressions that also say where the object is ("the red star on the left"), as RefCOCO's often
# do. One side only (a column or a row), so the other still has to be seen: without them MoELoRA's Grounding in the
# sequence scores 30.5-32.5 (LoRA 33.5-38.5), under the 3 x chance bar of 33.3; with half of them 48.5 (LoRA 55.5;
# docs/coin-mini.md)
GROUNDING_WHERE = 0.5


def referring_expression(rng, obj):
    """A Grounding referring expression for obj: its name, and with probability GROUNDING_WHERE one side of the
    picture it is on (left/right for its column, top/bottom for its row; "in the middle" for the centre cell)."""
    if rng.random() >= GROUNDING_WHERE:
        return f"the {name(obj)}"
    row, col = divmod(obj["pos"], 3)
    sides = ["on the left"] * (col == 0) + ["on the right"] * (col == 2) + ["at the top"] * (row == 0) + \
        ["at the bottom"] * (row == 2)
    return f"the {name(obj)} {rng.choice(sides or ['in the middle'])}"


# -----------------------------------------------------------------------------
# One example per task. Each maker returns dict(image: PIL or None, question, answer, accept (content words the
# General Knowledge judge accepts), chance (1 / number of plausible answers), plus task extras). The order in which
# a maker draws from rng fixes the files it writes: reordering draws changes CoIN-mini (see MINI_VERSION).

def scienceqa_item(rng, size):
    """Five options A-E, answered by the letter: a quarter text-only knowledge items (as ScienceQA has), the rest
    the colour or shape of one object."""
    if rng.random() < 0.25:
        shape = rng.choice([s for s in SHAPES if str(CORNERS[s]) in SQA_CHOICES["corners"]])
        corners = str(CORNERS[shape])
        lines, letter = option_lines(corners, "corners")
        return dict(image=None, question=f"How many corners does a {shape} have?\n{lines}", answer=letter,
                    accept=[letter, corners], chance=0.2)
    objs = make_scene(rng, size, 1)
    obj = objs[0]
    obj["color"], obj["shape"] = rng.choice(SQA_CHOICES["color"]), rng.choice(SQA_CHOICES["shape"])
    if rng.random() < 0.5:
        question, answer, kind = "What is the color of the object?", obj["color"], "color"
    else:
        question, answer, kind = "Which shape is in the picture?", obj["shape"], "shape"
    lines, letter = option_lines(answer, kind)
    return dict(image=render_scene(rng, size, objs), question=f"{question}\n{lines}", answer=letter,
                accept=[letter, answer], chance=0.2)


def textvqa_item(rng, size):
    """The word on a sign."""
    word = rng.choice(WORDS)
    question = rng.choice(["What word is written on the sign?", "What does the sign say?"])
    return dict(image=render_sign(rng, size, word), question=question, answer=word, accept=[word],
                chance=1 / len(WORDS))


def imagenet_item(rng, size):
    """The class (shape) of one big object."""
    obj = big_object(rng, size, shift=4)
    return dict(image=render_scene(rng, size, [obj]), question="What is the object in the image?",
                answer=obj["shape"], accept=[obj["shape"]], chance=1 / len(SHAPES))


def gqa_item(rng, size):
    """A relation in a scene of 2-3 objects: the shape or colour of the one object in a relation to another, or
    whether a relation holds."""
    while True:  # a target and an anchor such that the target is the only object in that relation to the anchor
        objs = make_scene(rng, size, rng.randint(2, 3))
        target, anchor = rng.sample(objs, 2)
        holding = relations(target, anchor)
        if not holding:
            continue
        relation = rng.choice(holding)
        also = [obj for obj in objs if obj is not anchor and relation in relations(obj, anchor)]
        if len(also) == 1:
            break
    img = render_scene(rng, size, objs)
    roll = rng.random()
    if roll < 0.45:
        return dict(image=img, question=f"What shape is {relation} the {name(anchor)}?", answer=target["shape"],
                    accept=[target["shape"]], chance=1 / len(SHAPES))
    if roll < 0.9:
        return dict(image=img, question=f"What color is the shape {relation} the {name(anchor)}?",
                    answer=target["color"], accept=[target["color"]], chance=1 / len(COLORS))
    yes = rng.random() < 0.5
    subject = target if yes else rng.choice([obj for obj in objs if obj is not target and obj is not anchor]
                                            or [anchor])
    holds = relation in relations(subject, anchor) if subject is not anchor else False
    answer = "yes" if holds else "no"
    return dict(image=img, question=f"Is the {name(subject)} {relation} the {name(anchor)}?", answer=answer,
                accept=[answer], chance=0.5)


def vizwiz_item(rng, size):
    """The colour or kind of one big object; 30% of the photos are degraded and answered 'unanswerable'."""
    obj = big_object(rng, size)
    img = render_scene(rng, size, [obj])
    if rng.random() < 0.5:
        question, answer, n_answers = "What color is this?", obj["color"], len(COLORS) + 1
    else:
        question, answer, n_answers = "What is this thing?", obj["shape"], len(SHAPES) + 1
    if rng.random() < 0.3:
        img, answer = degrade(rng, img), "unanswerable"
    return dict(image=img, question=question, answer=answer, accept=[answer], chance=1 / n_answers)


def grounding_item(rng, size):
    """The box of the object a referring expression names, in a scene of 2-3 objects. No question: the record's
    text is the format instruction followed by the expression."""
    objs = make_scene(rng, size, rng.randint(2, 3))
    obj = rng.choice(objs)
    # the expression draws from rng before render_scene does (the background's shade): the other order writes
    # different files
    box, expression = box_text(obj["box"], size), referring_expression(rng, obj)
    return dict(image=render_scene(rng, size, objs), question=None, expression=expression,
                answer=box, accept=[POSITIONS[obj["pos"]]], chance=1 / 9, answer_bbox=box, size=[size, size])


def vqav2_item(rng, size):
    """Open questions about a scene: 40% counting, 40% an object's colour, 20% its shape."""
    roll = rng.random()
    if roll < 0.4:
        objs, shape, k = count_scene(rng, size)
        return dict(image=render_scene(rng, size, objs), question=f"How many {plural(shape)} are there?",
                    answer=str(k), accept=[str(k), NUMBER_WORDS[k]], chance=1 / 4)
    objs = make_scene(rng, size, rng.randint(1, 3))
    shapes = [obj["shape"] for obj in objs]
    obj = rng.choice([o for o in objs if shapes.count(o["shape"]) == 1] or objs[:1])
    if shapes.count(obj["shape"]) > 1:  # no object has a shape of its own: show only the one asked about
        objs = [obj]
    if roll < 0.8:
        return dict(image=render_scene(rng, size, objs), question=f"What color is the {obj['shape']}?",
                    answer=obj["color"], accept=[obj["color"]], chance=1 / len(COLORS))
    colors = [o["color"] for o in objs]
    if colors.count(obj["color"]) > 1:  # its colour does not name it: show only the one asked about
        objs = [obj]
    return dict(image=render_scene(rng, size, objs), question=f"What shape is the {obj['color']} object?",
                answer=obj["shape"], accept=[obj["shape"]], chance=1 / len(SHAPES))


def ocrvqa_item(rng, size):
    """The title, author or genre of a book cover."""
    title, author, genre = rng.choice(TITLES), rng.choice(AUTHORS), rng.choice(list(GENRES))
    img = render_book(rng, size, title, author, genre)
    roll = rng.random()
    if roll < 0.4:
        question, answer, n_answers = "What is the title of this book?", title, len(TITLES)
    elif roll < 0.75:
        question, answer, n_answers = "Who is the author of this book?", author, len(AUTHORS)
    else:
        question, answer, n_answers = "What is the genre of this book?", genre, len(GENRES)
    return dict(image=img, question=question, answer=answer, accept=[answer], chance=1 / n_answers)


ITEM_MAKERS = {"ScienceQA": scienceqa_item, "TextVQA": textvqa_item, "ImageNet": imagenet_item, "GQA": gqa_item,
               "VizWiz": vizwiz_item, "Grounding": grounding_item, "VQAv2": vqav2_item, "OCR-VQA": ocrvqa_item}
assert list(ITEM_MAKERS) == TASKS, (list(ITEM_MAKERS), TASKS)


def make_item(task, rng, size):
    """One synthetic example of `task` (see the makers above)."""
    if task not in ITEM_MAKERS:
        raise ValueError(f"unknown task {task!r}")
    return ITEM_MAKERS[task](rng, size)


# -----------------------------------------------------------------------------
# ASD: SEFE's answer-style diversification (arXiv 2505.02486), written from templates
#
# SEFE rewrites X% of each task's training records, in equal parts, into the four answer styles other than the task's
# own, out of five: short answer, multiple choice, yes/no, brief explanation, detailed explanation. Its release
# (CoIN-ASD) had an MLLM write the distractors and explanations (the prompts in SEFE's CoIN-ASD/prompts/); CoIN-mini
# draws them from the task's own answers and writes the explanations from templates, which a 1.9M-parameter model can
# learn. Each style is asked for by its own last line, as the tasks' formats are. Only the training records change.

ASD_STYLES = {"short": SHORT, "mcq": LETTER, "yn": "Please answer yes or no.",
              "brief": "Answer the question with a brief explanation.",
              "detail": "Answer the question with a detailed explanation."}
# Each task's own style: ScienceQA multiple choice, the others a short answer (Grounding's box counted as one).
NATIVE_STYLE = {"ScienceQA": "mcq"}
# The brief explanation after the answer (`{}`: the answer in words); the detailed one adds a sentence. Short ones
# (8 and 14 tokens on average): the loss is a mean over a batch's answer tokens, and SEFE's explanations of ~20 and
# ~50 words would crowd the one-word answers out of it at this size.
ASD_REASONS = {"ScienceQA": "It is the right answer.", "TextVQA": "The sign says {}.", "ImageNet": "The big object "
               "is a {}.", "GQA": "The picture shows it.", "VizWiz": "The picture shows it.", "VQAv2": "The picture "
               "shows it.", "OCR-VQA": "The cover shows it."}
UNCLEAR = "The picture is too unclear to see anything."


def asd_styles(task):
    """The four styles a task's records are restyled into: every style but its own."""
    return [style for style in ASD_STYLES if style != NATIVE_STYLE.get(task, "short")]


def answer_pool(task, item, size):
    """(the item's answer in words, the answers of its kind in a fixed order): multiple choice and yes/no draw their
    distractors from the pool, as SEFE's prompts ask an MLLM for plausible wrong answers of the same kind."""
    question, answer = item["question"] or "", item["answer"]
    if task == "ScienceQA":
        choices = re.findall(r"^[A-E]\. (.+)$", question, re.M)
        return choices["ABCDE".index(answer)], choices
    if task == "Grounding":
        return answer, [box_text(cell_box(size, pos), size) for pos in range(9)]
    if task == "TextVQA":
        return answer, WORDS
    if task == "OCR-VQA":
        return answer, TITLES if "title" in question else AUTHORS if "author" in question else list(GENRES)
    if task == "VizWiz":
        return answer, (list(COLORS) if "color" in question else SHAPES) + ["unanswerable"]
    if answer in ("yes", "no"):
        return answer, ["yes", "no"]
    if answer.isdigit():
        return answer, [str(k) for k in range(1, 5)]
    return answer, SHAPES if answer in SHAPES else list(COLORS)


def restyle(task, item, style, rng, size):
    """A train item asked and answered in an ASD style -> (question, its last line the style's instruction; answer).
    NOTE(fidelity): multiple-choice options keep their pool's order (four of them, or two for yes/no answers), as
    CoIN-mini's ScienceQA keeps its own; the release's MLLM-written options have no fixed order."""
    content, pool = answer_pool(task, item, size)
    others = [p for p in pool if p != content]
    asked = f"Where is {item['expression']}?" if task == "Grounding" else item["question"].split("\n")[0]
    if style == "short":
        question, answer = asked, content
    elif style == "mcq":
        drawn = {content, *rng.sample(others, min(3, len(others)))}
        options = [p for p in pool if p in drawn]
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
        question, answer = f"{asked}\n{lines}", "ABCD"[options.index(content)]
    elif style == "yn":  # half the candidates right, half a distractor (SEFE's yn.txt asks for one)
        right = rng.random() < 0.5
        question = f"{asked}\nIs the answer {content if right else rng.choice(others)}?"
        answer = "yes" if right else "no"
    elif task == "Grounding":  # SEFE's Grounding explanations describe the region of the box
        question = f"What is in the box {content}?"
        answer = f"It is {item['expression']}."
        if style == "detail":
            answer += f" So the box holds {item['expression']}."
    else:
        reason = UNCLEAR if content == "unanswerable" else ASD_REASONS[task].format(content)
        question, answer = asked, f"{content}. {reason}"
        if style == "detail":
            answer += f" So the answer is {content}."
    return f"{question}\n{ASD_STYLES[style]}", answer


def asd_records(task, records, items, share, seed, size):
    """The train records with `share` % of them restyled, in equal parts into asd_styles(task). The records to
    restyle are the first ones of a seeded order of all of them, so a smaller share restyles a subset of a larger
    one, each record the same way at every share (its own random stream)."""
    order = random.Random(f"{seed}-{task}-asd").sample(range(len(records)), len(records))
    styles = asd_styles(task)
    out = list(records)
    for j, i in enumerate(order[:round(share * len(records) / 100)]):
        question, answer = restyle(task, items[i], styles[j % len(styles)], random.Random(f"{seed}-{task}-asd-{i}"),
                                   size)
        rec = records[i]
        human = f"{IMAGE_TOKEN}\n{question}" if "image" in rec else question
        out[i] = {**rec, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    return out


def write_asd(out, task, records, items, tests, seed, size):
    """Instructions_ASD/<task folder>/ as the CoIN-ASD release lays it out: train_x{X}.json for X in
    data.ASD_SHARES, train_ori.json (the records as they are) and test.json (the evaluation records, under the name
    the release gives every task's)."""
    folder = os.path.join(out, "Instructions_ASD", data.task_folder(task))
    for share in data.ASD_SHARES:
        data.write_json(os.path.join(folder, f"train_x{share}.json"),
                        asd_records(task, records, items, share, seed, size))
    data.write_json(os.path.join(folder, "train_ori.json"), records)
    data.write_json(os.path.join(folder, "test.json"), tests)


# -----------------------------------------------------------------------------
# Stage 0: the caption corpus that pretrains the tiny base

def stage0_item(rng, size):
    """A caption-corpus item for pretraining the tiny base: (image or None, question, answer). It covers every
    kind of picture the eight tasks show (scenes, big single objects, repeated shapes, signs, book covers,
    degraded photos) and the content their questions ask about (names, colours, positions, relations, counts,
    words), always answered in full sentences: the base knows the world, not the tasks' answer formats."""
    kind = rng.choices(["scene", "big", "many", "sign", "book", "fact", "blur", "place"], [6, 2, 2, 2, 5, 1, 1, 1])[0]
    if kind == "fact":
        shape = rng.choice(SHAPES)
        n = CORNERS[shape]
        answer = f"A {shape} has {n} corners." if n else f"A {shape} has no corners."
        return None, rng.choice([f"How many corners does a {shape} have?", f"Tell me about the {shape}."]), answer
    if kind == "sign":
        word = rng.choice(WORDS)
        question = rng.choice(["Describe the image.", "What does the sign say?", "What is written here?"])
        return render_sign(rng, size, word), question, f"A sign with the word {word} written on it."
    if kind == "book":
        title, author, genre = rng.choice(TITLES), rng.choice(AUTHORS), rng.choice(list(GENRES))
        img = render_book(rng, size, title, author, genre)
        question, answer = rng.choice([
            ("Describe the image.", f"A {genre} book called {title}, written by {author}."),
            ("What book is this?", f"It is {article(genre)} {genre} book called {title}."),
            ("Who wrote this book?", f"This book was written by {author}."),
            ("What is written on the cover?", f"The cover says {title} and, below, {author}.")])
        return img, question, answer
    # a big object: always for "big", half the time for "blur" (the coin is tossed for both kinds)
    if kind in ("big", "blur") and (rng.random() < 0.5 or kind == "big"):
        obj = big_object(rng, size, shift=4)
        img = render_scene(rng, size, [obj])
        if kind == "blur":
            return degrade(rng, img), "What is this?", "The picture is too unclear to see anything."
        question, answer = rng.choice([("Describe the image.", f"A big {name(obj)} fills the picture."),
                                       ("What is this?", f"It is {with_article(obj)}."),
                                       ("What is the object in the picture?", f"The object is {with_article(obj)}.")])
        return img, question, answer
    if kind == "many":
        objs, shape, k = count_scene(rng, size)
        others = [obj for obj in objs if obj["shape"] != shape]
        if rng.random() < 0.5:
            return render_scene(rng, size, objs), f"How many {plural(shape)} are there?", \
                f"There {'is' if k == 1 else 'are'} {count_phrase(k, shape)}."
        tail = f" and {with_article(others[0])}" if others else ""
        return render_scene(rng, size, objs), "Describe the image.", \
            f"The picture shows {count_phrase(k, shape)}{tail}."
    objs = make_scene(rng, size, rng.randint(1, 4))
    img = render_scene(rng, size, objs)
    if kind == "blur":
        return degrade(rng, img), "Describe the image.", "The picture is too unclear to see anything."
    roll = rng.random()
    obj = rng.choice(objs)
    where = POSITIONS[obj["pos"]]
    if kind == "place":
        # where, also in numbers (fractions of the picture's width and height): the knowledge a Grounding answer
        # needs, in a sentence, not in the task's "[x1, y1, x2, y2]" format. A kind of its own, and rare: the loss
        # is a mean over answer tokens, and these long answers would otherwise crowd out everything else
        x1, y1, x2, y2 = (v / size for v in obj["box"])
        return img, f"Where is the {name(obj)}?", (f"The {name(obj)} is at the {where}, from x {x1:.2f} to {x2:.2f} "
                                                   f"and y {y1:.2f} to {y2:.2f}.")
    if roll < 0.3:
        return img, "Describe the image.", describe(objs)
    if roll < 0.45:
        return img, f"Where is the {name(obj)}?", f"The {name(obj)} is at the {where} of the picture."
    if roll < 0.6:
        return img, f"What is at the {where}?", f"There is {with_article(obj)} at the {where}."
    if roll < 0.7:
        return img, f"What color is the {obj['shape']} at the {where}?", \
            f"The {obj['shape']} at the {where} is {obj['color']}."
    pairs = [(a, b, r) for a in objs for b in objs if a is not b for r in relations(a, b)]
    if not pairs:
        return img, "Describe the image.", describe(objs)
    a, b, relation = rng.choice(pairs)
    if rng.random() < 0.5:
        return img, f"Where is the {name(a)} compared to the {name(b)}?", f"The {name(a)} is {relation} the {name(b)}."
    them = [x for x in objs if x is not b and relation in relations(x, b)]
    listed = " and ".join(with_article(x) for x in them)
    return img, f"What is {relation} the {name(b)}?", f"There is {listed} {relation} the {name(b)}."


# -----------------------------------------------------------------------------
# Writing CoIN-mini

# Train records per task, in units of n_train. The tiny model needs more steps for the two answer formats that carry
# no word it already says: ScienceQA's option letter and Grounding's box (LoRA on the task alone, 1 -> 2 epochs of
# 3,000 records: ScienceQA 55.5 -> 99.5, Grounding 29.5 -> 39.5; Grounding in the sequence: 33.0 at 2x, 38.5 at 3x;
# docs/coin-mini.md). The first n_train records are the same at any scale (one random stream per task and split).
TRAIN_SCALE = {"ScienceQA": 2, "Grounding": 3}
# The generator's version: a new one whenever the generator writes different files for the same settings, so that
# `python coin_mini.py` regenerates a folder written by another version and leaves a current one alone.
MINI_VERSION = 5


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


def add_ground_truth(task, qid, item, image, problems, gqa_questions):
    """A test item into the official ground truth of ScienceQA (problems.json: the options and the right one's index)
    or GQA (testdev_balanced_questions.json: the answer, isBalanced and the fields eval_gqa.py reads); no random
    draws, so the records stay the same."""
    if task == "ScienceQA":
        choices = re.findall(r"^[A-E]\. (.+)$", item["question"], re.M)
        problems[qid] = {"question": item["question"].split("\n")[0], "choices": choices,
                         "answer": "ABCDE".index(item["answer"]), "hint": "", "image": image and "image.png",
                         "split": "test"}
    elif task == "GQA":
        kind = "verify" if item["answer"] in ("yes", "no") else "query"
        gqa_questions[qid] = {"question": item["question"], "answer": item["answer"], "isBalanced": True,
                              "imageId": qid, "types": {"structural": kind, "semantic": "rel", "detailed": kind},
                              "groups": {"global": None if kind == "verify" else item["answer"], "local": None},
                              "semantic": []}


def generate_mini(out, n_train=3000, n_test=200, n_stage0=46000, size=48, seed=0, progress=True):
    """Write CoIN-mini under `out` in the official layout: out/Instructions_{Original,Diverse,10Type}/<task folder>/
    {train,<eval split>}.json (OCR-VQA in OCRVQA/; val.json for TextVQA, VizWiz, VQAv2: data.task_file), SEFE's
    restyled train sets in the CoIN-ASD release's layout (out/Instructions_ASD/<task folder>/{train_x{X},train_ori,
    test}.json: write_asd),
    out/images/<Task>/<split>/N.png, the official ground truth under the image root (out/images/ScienceQA/
    {problems,pid_splits}.json, out/images/TextVQA/TextVQA_0.5.1_val.json, out/images/GQA/
    testdev_balanced_questions.json: data.GROUND_TRUTH), out/Instructions_*/Stage0/train.json (caption corpus) and
    out/coin_mini.json (meta)."""
    meta = dict(mini_settings(n_train, n_test, n_stage0, size, seed), chance={})
    img_dir = os.path.join(out, "images")
    textvqa_ann, problems, gqa_questions = [], {}, {}
    for task in TASKS:
        for split, n in (("train", meta["train_records"][task]), ("test", n_test)):
            rng = random.Random(f"{seed}-{task}-{split}")
            os.makedirs(os.path.join(img_dir, task, split), exist_ok=True)
            sets = {iset: [] for iset in FORMAT_INSTRUCTIONS}
            items = []  # the train items without their pictures, for ASD
            chance = 0.0
            for i in cli.progress(range(n), desc=f"CoIN-mini {task} {split}", disable=not progress):
                item = make_item(task, rng, size)
                if split == "train":
                    items.append({k: v for k, v in item.items() if k != "image"})
                rel = None
                if item["image"] is not None:
                    rel = f"{task}/{split}/{i:06d}.png"
                    item["image"].save(os.path.join(img_dir, rel))
                chance += item["chance"]
                for iset, wordings in FORMAT_INSTRUCTIONS.items():
                    instruction = rng.choice(wordings[task]) if len(wordings[task]) > 1 else wordings[task][0]
                    if task == "Grounding":
                        text = f"{instruction} {item['expression']}"
                    else:
                        text = f"{item['question']}\n{instruction}"
                    qid = f"{task}_{split}_{i}"
                    if split == "train":
                        human = f"{IMAGE_TOKEN}\n{text}" if rel else text
                        rec = {"id": qid, "conversations": [{"from": "human", "value": human},
                                                            {"from": "gpt", "value": item["answer"]}]}
                    else:
                        rec = {"question_id": qid, "text": text, "answer": item["answer"], "accept": item["accept"]}
                        if task == "Grounding":
                            rec["answer_bbox"], rec["size"] = item["answer_bbox"], item["size"]
                    if rel:
                        rec["image"] = rel
                    sets[iset].append(rec)
                if split == "test":
                    add_ground_truth(task, f"{task}_{split}_{i}", item, rel, problems, gqa_questions)
                if split == "test" and task == "TextVQA":
                    # ten "human" answers: mostly the word, sometimes a slip (TextVQA's annotator noise)
                    answers = [item["answer"] if rng.random() < 0.9 else rng.choice(WORDS) for _ in range(10)]
                    textvqa_ann.append({"question_id": f"{task}_{split}_{i}", "answers": answers})
            for iset, recs in sets.items():
                data.write_json(data.task_file(out, task, "eval" if split == "test" else split, iset), recs)
            if split == "train":
                train_records, train_items = sets["Original"], items
            else:
                meta["chance"][task] = 100 * chance / n
                write_asd(out, task, train_records, train_items, sets["Original"], seed, size)
    (problems_file, splits_file), (textvqa_file,), (gqa_file,) = (
        [os.path.join(img_dir, rel) for rel in data.GROUND_TRUTH[task]] for task in ("ScienceQA", "TextVQA", "GQA"))
    data.write_json(problems_file, problems)
    data.write_json(splits_file, {"train": [], "val": [], "test": list(problems)})
    data.write_json(textvqa_file, {"data": textvqa_ann})
    data.write_json(gqa_file, gqa_questions)
    rng = random.Random(f"{seed}-stage0")
    os.makedirs(os.path.join(img_dir, "Stage0"), exist_ok=True)
    recs = []
    for i in cli.progress(range(n_stage0), desc="CoIN-mini stage-0 captions", disable=not progress):
        img, question, answer = stage0_item(rng, size)
        rec = {"id": f"stage0_{i}", "conversations": [{"from": "human", "value": question},
                                                      {"from": "gpt", "value": answer}]}
        if img is not None:
            rec["image"] = f"Stage0/{i:06d}.png"
            img.save(os.path.join(img_dir, rec["image"]))
            rec["conversations"][0]["value"] = f"{IMAGE_TOKEN}\n{question}"
        recs.append(rec)
    for iset in FORMAT_INSTRUCTIONS:
        data.write_json(data.task_file(out, "Stage0", "train", iset), recs)
    data.write_json(os.path.join(out, "coin_mini.json"), meta)
    return meta


@dataclasses.dataclass
class MiniSettings:
    out: str = "data/coin-mini"           # the folder CoIN-mini is written to
    n_train: int = 3000                   # train records per task
    n_test: int = 200                     # test records per task
    n_stage0: int = 46000                 # captions of the stage-0 pretraining corpus
    size: int = 48                        # image side in pixels
    seed: int = 0                         # the generator's seed


RULES = {"n_train": cli.at_least(1), "n_test": cli.at_least(1), "n_stage0": cli.at_least(1), "size": cli.at_least(1)}


def main(argv):
    """Generate CoIN-mini with --key=value settings, unless `--out` already holds it with these settings."""
    opts, _ = cli.parse(MiniSettings, argv, __doc__, RULES)
    if out := cli.out_folder_problem(opts.out):
        raise cli.UserError(out)
    opts = dataclasses.asdict(opts)
    if mini_is_current(**opts):
        print(f"CoIN-mini in {opts['out']} is current (generator version {MINI_VERSION}, same settings): kept")
        return
    meta = generate_mini(**opts)
    print(f"wrote CoIN-mini to {opts['out']} (chance levels %: "
          + ", ".join(f"{t} {c:.1f}" for t, c in meta["chance"].items()) + ")")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
