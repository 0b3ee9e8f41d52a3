import os

import pytest
import torch


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import moe_peft_plugin  # noqa: E402,F401  (registers MOELORA)

from .helpers import CORPUS, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and a locally trained tokenizer, saved like a hub model (no downloads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory) -> str:
    """A local dataset folder (`train.jsonl` of {"text": ...} rows) for the multi-process SFT runs."""
    import json

    path = tmp_path_factory.mktemp("sft-data")
    with open(path / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in CORPUS)
    return str(path)
