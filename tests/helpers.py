"""Tiny local models and tokenizers for the tests (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


REPO = Path(__file__).resolve().parents[1]


def installed_from_this_checkout() -> bool:
    """Whether moe-peft-plugin is installed (its metadata, console script) from this checkout."""
    # Every copy of the metadata: an editable install also leaves an `.egg-info` in the checkout, found first from it.
    for distribution in metadata.distributions(name="moe-peft-plugin"):
        url = json.loads(distribution.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://") and Path(url[len("file://") :]).resolve() == REPO:
            return True
    return False


def moe_peft_command() -> list[str]:
    """The `moe-peft` console script where this checkout is installed, else `python -m moe_peft_cli` (the same
    `moe_peft_cli:main`; a checkout next to another one's installation, e.g. a git worktree, has a stale script)."""
    script = os.path.join(os.path.dirname(sys.executable), "moe-peft")
    if installed_from_this_checkout() and os.path.isfile(script):
        return [script]
    return [sys.executable, "-m", "moe_peft_cli"]


CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a mixture of experts routes every token to a few experts",
    "low rank adapters train small matrices next to frozen weights",
    "question: what is the capital of france? answer: paris",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "experts learn distinct features when a contrastive loss pushes them apart",
] * 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama_config(vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_tiny_llama(seed: int = 0, **config_kwargs):
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=max(64, len(tokenizer)), **config_kwargs))
    return model.eval(), tokenizer


def batch(tokenizer, texts=None, pad_first_row: int = 3):
    """A padded batch (left padding on the first row) with an attention mask."""
    texts = texts or ["the cat sat on the mat", "experts learn distinct features when a loss pushes them apart"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
