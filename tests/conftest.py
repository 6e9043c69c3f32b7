"""Shared fixtures: a small CoIN-mini tree and a random-initialised tiny LLaVA built from it (seconds, offline)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# unpinned (pins.py): the tests compare coin.py's child processes with coin.main() run in this process, which torch
# has loaded unpinned; tests/test_pins.py runs its children pinned
os.environ["COIN_PINS"] = "0"

import coin_mini  # noqa: E402
from base_model import build_tiny_base, corpus_texts  # noqa: E402


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """CoIN-mini with 48 train / 12 test items per task and 64 stage-0 captions."""
    out = str(tmp_path_factory.mktemp("coin-mini"))
    coin_mini.generate_mini(out, n_train=48, n_test=12, n_stage0=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_base(mini_data, tmp_path_factory):
    """Directory of a random tiny LlavaForConditionalGeneration + LlavaProcessor (untrained)."""
    out = str(tmp_path_factory.mktemp("tiny-base"))
    build_tiny_base(out, corpus_texts(mini_data), vision_layers=2, text_layers=2, vocab_size=600)
    return out
