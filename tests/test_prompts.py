"""LLaVA-1.5's prompts token for token, in training and evaluation, against the official algorithms written out here
(tokenizer_image_token in llava/mm_utils.py, preprocess_v1 in llava/train/train.py) on a Llama-style tokenizer built
offline; the per-task evaluation images and generation lengths of the official evaluation scripts."""
import json
import os

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoProcessor, CLIPImageProcessor, LlamaTokenizer, LlavaProcessor

import coin
import data
from cli import UserError

IMAGE_INDEX = -200  # IMAGE_TOKEN_INDEX of llava/constants.py: one placeholder, replaced by the image's features


def llama_style_tokenizer(legacy):
    """A Llama tokenizer as transformers builds one from Vicuna's sentencepiece tokenizer.model (LlamaTokenizer: BPE
    with byte fallback after a Metaspace pre-tokenizer, "▁" before the first piece of text with legacy=False, before
    every piece between special tokens with legacy=True), BOS added. Ids as Llama's: 0-2 <unk> <s> </s>, 3-258 the
    bytes <0x00>-<0xFF> (a newline is <0x0A> = 13), then pieces learned from a few prompts, "▁" alone among them; no
    piece holds a newline or a "▁" after its start, as in sentencepiece's vocabulary. <image> added as `assemble` adds
    it."""
    texts = [data.SYSTEM, "USER: What colour is the square? Answer the question using a single word or phrase.",
             "ASSISTANT: red", "Options: A. red B. blue",
             "Answer with the option's letter from the given choices directly.",
             "[0.12, 0.34, 0.56, 0.78]"] * 3
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"extra_special_tokens": [data.IMAGE_TOKEN]})
    tok.pad_token = tok.unk_token
    return tok


def llava_processor(tok, size=28):
    """A LlavaProcessor as the assembled LLaVA-1.5 has (CLIP preprocessing, patch 14, the CLS feature dropped) at a tiny
    size: 2 x 2 patches, 4 image tokens."""
    return LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                             crop_size={"height": size, "width": size}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def official_ids(tok, prompt, n_image_tokens):
    """tokenizer_image_token (llava/mm_utils.py), the algorithm as written there: chunks between <image>s tokenised
    one by one, separated by the image placeholder; if the first chunk starts with BOS it is kept once and the first
    token of every chunk and separator is dropped. The placeholder then becomes the image's tokens, as the HF LLaVA
    takes them (one <image> id per feature: the features land on the same positions)."""
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = int(len(chunks[0]) > 0 and chunks[0][0] == tok.bos_token_id)
    ids = [chunks[0][0]] if offset else []
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_INDEX] * (offset + 1))][:-1]
    for x in separated:
        ids.extend(x[offset:])
    image_id = tok.convert_tokens_to_ids(data.IMAGE_TOKEN)
    return [t for i in ids for t in ([image_id] * n_image_tokens if i == IMAGE_INDEX else [i])]


def official_training_item(tok, prompt, answer, n_image_tokens):
    """preprocess_v1 (llava/train/train.py) on one round "prompt answer</s>": input_ids, and labels with the BOS and the
    instruction masked (the tokens of "prompt " less 2: its BOS and the space's own token), the rest kept."""
    conversation = f"{prompt} {answer}</s>"
    ids = official_ids(tok, conversation, n_image_tokens)
    labels = list(ids)
    round_text = conversation.split("</s>")[0]
    before, after = round_text.split(" ASSISTANT: ")
    round_len = len(official_ids(tok, round_text, n_image_tokens))
    instruction_len = len(official_ids(tok, before + " ASSISTANT: ", n_image_tokens)) - 2
    labels[:1 + instruction_len] = [-100] * (1 + instruction_len)
    assert 1 + round_len == len(ids), "preprocess_v1's tokenization mismatch check"
    return ids, labels


QUESTIONS = ["What colour is the square?\nAnswer the question using a single word or phrase.",
             "Options: A. red B. blue\nAnswer with the option's letter from the given choices directly."]


@pytest.mark.parametrize("legacy", [False, True])
def test_vicuna_prompts_are_llava15s_tokens(legacy):
    """Evaluation prompts with and without an image: the ids of tokenizer_image_token, the image's tokens where its
    placeholder was, and after them "▁" then the newline's byte token, under either legacy setting."""
    tok = llama_style_tokenizer(legacy)
    processor = llava_processor(tok)
    assert data.vicuna_prompts(processor)
    space, newline, image_id = tok.convert_tokens_to_ids(["▁", "<0x0A>", data.IMAGE_TOKEN])
    assert newline == 13
    for question in QUESTIONS:
        prompt = data.build_prompt(question, True, processor).text
        got = data.encode(processor, data.build_prompt(question, True, processor),
                          Image.new("RGB", (40, 30), "red"))["input_ids"].tolist()
        assert got == official_ids(tok, prompt, 4)
        after = got.index(image_id) + 4
        assert got[after - 4:after + 2] == [image_id] * 4 + [space, newline]
        assert got[0] == tok.bos_token_id and got.count(tok.bos_token_id) == 1
        one_call = tok(prompt.replace(data.IMAGE_TOKEN, data.IMAGE_TOKEN * 4)).input_ids
        if legacy:  # "▁" before every piece of text: one call over the whole prompt gives the same ids
            assert one_call == got
        else:  # "▁" before the first piece only: one call has no "▁" after the image
            assert one_call == got[:after] + got[after + 1:]
        text_only = data.encode(processor, data.build_prompt(question, False, processor))
        assert text_only["input_ids"].tolist() == official_ids(tok, data.build_prompt(question, False).text, 4)
        assert text_only["pixel_values"] is None


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("answer", ["red", "B", "[0.12, 0.34, 0.56, 0.78]"])
def test_vicuna_training_items_are_preprocess_v1s(legacy, answer):
    """A training item's ids and labels equal preprocess_v1's: the whole conversation tokenised at once with </s> last,
    loss on the answer's tokens (as tokenised in context) and </s> only; with an image and without. The labelled part
    starts right after the evaluation prompt, which is the item's prefix."""
    tok = llama_style_tokenizer(legacy)
    processor = llava_processor(tok)
    for question in QUESTIONS:
        for image in (Image.new("RGB", (28, 28), "blue"), None):
            item = data.encode(processor, data.build_prompt(question, image is not None, processor, answer), image)
            prompt = data.build_prompt(question, image is not None).text
            want_ids, want_labels = official_training_item(tok, prompt, answer, 4)
            assert item["input_ids"].tolist() == want_ids and item["labels"].tolist() == want_labels
            evaluation = data.encode(processor, data.build_prompt(question, image is not None, processor), image)
            n_prompt = len(evaluation["input_ids"])
            assert want_ids[:n_prompt] == evaluation["input_ids"].tolist()
            assert want_labels[n_prompt - 1] == -100 and want_labels[n_prompt] != -100
            assert want_ids[-1] == want_labels[-1] == tok.eos_token_id


def test_tiny_base_prompts_keep_their_ids(tiny_base, mini_data):
    """The tiny base's byte-level BPE tokenises the text after <image> alone exactly as inside the whole prompt (the
    image token splits the text before the pre-tokenizer runs, and its pre-tokenizer adds no space): its prompts,
    labels and CoIN-mini's (square) pixels are what one processor call gives, as before tokenizer_image_token."""
    processor = AutoProcessor.from_pretrained(tiny_base)
    image_dir = os.path.join(mini_data, "images")
    for task in ("ScienceQA", "Grounding"):
        for ex in data.train_examples(mini_data, task)[:6]:
            image = data.load_image(image_dir, ex["image"]) if ex["image"] else None
            prompt = data.build_prompt(ex["question"], image is not None, processor, ex["answer"])
            item = data.encode(processor, prompt, image)
            enc = processor(text=prompt.text, images=image, return_tensors="pt")
            prompt_ids = enc["input_ids"][0].tolist()
            answer_ids = processor.tokenizer(" " + ex["answer"], add_special_tokens=False)["input_ids"]
            assert item["input_ids"].tolist() == prompt_ids + answer_ids + [processor.tokenizer.eos_token_id]
            assert item["labels"].tolist() == [-100] * len(prompt_ids) + answer_ids + [processor.tokenizer.eos_token_id]
            if image:
                assert image.size[0] == image.size[1] and torch.equal(item["pixel_values"], enc["pixel_values"])



def test_training_evaluation_and_prediction_file_share_one_prompt(tiny_base, mini_data, monkeypatch):
    """Training (the dataset), evaluation (generation) and the prediction file take the prompt from the one builder,
    data.build_prompt: for the same record, with and without an image, generation's ids are the training item's ids up
    to its first labelled token, and the file's `prompt` is the prompt's user turn."""
    import eval as E
    from transformers import AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(tiny_base)
    model = AutoModelForImageTextToText.from_pretrained(tiny_base)
    image_dir = os.path.join(mini_data, "images")
    tests = data.test_examples(mini_data, "ScienceQA")
    records = [next(r for r in tests if r.get("image")), next(r for r in tests if not r.get("image"))]
    examples = [{"id": r["question_id"], "image": r.get("image"), "question": r["text"], "answer": r["answer"]}
                for r in records]  # the same records as train examples
    built, encoded = [], []
    build_prompt, encode = data.build_prompt, data.encode
    monkeypatch.setattr(data, "build_prompt", lambda *a, **k: built.append(build_prompt(*a, **k)) or built[-1])
    monkeypatch.setattr(data, "encode", lambda *a, **k: encoded.append(encode(*a, **k)) or encoded[-1])
    dataset = data.InstructionDataset(examples, processor, image_dir)
    training = [dataset[i] for i in range(len(examples))]
    rows = E.generate(model, processor, records, image_dir, batch_size=2, max_new_tokens=1)
    assert len(built) == len(encoded) == 4  # two records, each once for training and once for evaluation
    for i, (record, row, item) in enumerate(zip(records, rows, training)):
        train_prompt, eval_prompt = built[i], built[len(records) + i]
        assert train_prompt.answer == " " + record["answer"] and eval_prompt == train_prompt._replace(answer=None)
        assert row["prompt"] == eval_prompt.user == (f"{data.IMAGE_TOKEN}\n" if record.get("image") else "") + \
            record["text"]
        prefix = encoded[len(records) + i]["input_ids"].tolist()
        n = len(prefix)
        assert item["input_ids"][:n].tolist() == prefix and (item["labels"][:n] == -100).all()
        assert item["labels"][n] != -100

def test_chat_templates_for_other_families(tiny_base):
    """A LLaVA without a chat template takes the Vicuna v1 prompt, a processor with one takes its template; any other
    processor without one is an error naming it."""
    tok = llama_style_tokenizer(False)
    assert data.vicuna_prompts(AutoProcessor.from_pretrained(tiny_base)) and data.vicuna_prompts(None)
    templated = llava_processor(tok)  # a LLaVA directory that carries a chat template is prompted with it
    templated.chat_template = "chat: {{ messages[0]['content'][-1]['text'] }}"
    assert not data.vicuna_prompts(templated) and data.build_prompt("What?", False, templated).text == "chat: What?"
    with pytest.raises(ValueError, match=r"CLIPImageProcessor\w* has no chat template, and only a LLaVA takes"):
        data.build_prompt("What?", False, CLIPImageProcessor())


def test_evaluation_images_and_lengths_per_task():
    """--eval_images=official: the tasks of model_vqa.py and model_vqa_science.py see the processor's centre crop,
    the others the padded square; --eval_images=pad pads all. --max_new_tokens=0: 1024 or 128 per task."""
    official = coin.parse_config([])
    assert (official.eval_images, official.max_new_tokens) == ("official", 24)
    padded = {t for t in data.TASKS if coin.evaluation_of(official, t)[0]}
    assert padded == {"TextVQA", "GQA", "VizWiz", "OCR-VQA"}
    assert all(coin.evaluation_of(coin.parse_config(["--eval_images=pad"]), t)[0] for t in data.TASKS)
    assert {coin.evaluation_of(official, t)[1] for t in data.TASKS} == {24}
    lengths = {t: coin.evaluation_of(coin.parse_config(["--max_new_tokens=0"]), t)[1] for t in data.TASKS}
    assert lengths == {"ScienceQA": 1024, "TextVQA": 128, "ImageNet": 1024, "GQA": 128, "VizWiz": 128,
                       "Grounding": 1024, "VQAv2": 1024, "OCR-VQA": 128}
    assert [t for t in data.TASKS if coin.evaluation_of(official, t)[2]] == ["ScienceQA"]  # its question stripped
    with pytest.raises(UserError, match="--eval_images=crop: must be one of official, pad"):
        coin.parse_config(["--eval_images=crop"])
    with pytest.raises(UserError, match="--max_new_tokens=-1: must be at least 0"):
        coin.parse_config(["--max_new_tokens=-1"])


def test_cropped_and_padded_pixels():
    """A wide image: cropped, the CLIP processor alone (shortest side resized, centre crop); padded, the same after
    expand2square with the mean colour. A square image is the same both ways (CoIN-mini's are all square)."""
    processor = llava_processor(llama_style_tokenizer(False))
    wide = Image.new("RGB", (56, 28), "white")
    wide.paste(Image.new("RGB", (14, 28), "black"), (0, 0))  # a black band on the left, cut off by the centre crop
    mean = data.image_mean_rgb(processor)
    prompt = data.build_prompt("What?", True, processor)
    cropped = data.encode(processor, prompt, wide)["pixel_values"]
    padded = data.encode(processor, prompt, data.expand2square(wide, mean))["pixel_values"]
    assert torch.equal(cropped, processor.image_processor(wide, return_tensors="pt")["pixel_values"])
    assert cropped.shape == padded.shape == (1, 3, 28, 28) and not torch.equal(cropped, padded)
    assert cropped.min() > 0 and padded.min() < 0  # no black left after the crop; the padded square keeps the band
    square = Image.new("RGB", (28, 28), "green")
    assert torch.equal(data.encode(processor, prompt, square)["pixel_values"],
                       data.encode(processor, prompt, data.expand2square(square, mean))["pixel_values"])
