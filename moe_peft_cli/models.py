"""Loading base models and adapters for the `moe-peft` commands (the embedded default or anything transformers loads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .errors import UserError


RUN_FILE = "moe_peft_run.json"  # written by `moe-peft train` next to the adapter: what it was trained on


def resolve_model(name_or_path: Optional[str]) -> str:
    """`None`, `"default"` or the embedded model's name -> the converted SmolLM2 folder; anything else unchanged."""
    from .data import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model

    if name_or_path in (None, "", "default", DEFAULT_MODEL_NAME) or (
        name_or_path is not None and Path(name_or_path) == default_model_dir()
    ):
        return str(ensure_default_model())
    return name_or_path


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} needs a CUDA GPU, and torch sees none here; use --device cpu.")
    return device


def native_bfloat16(device: str) -> bool:
    """Whether `device` runs bfloat16 matmuls natively: a CUDA GPU with bfloat16 support, or a CPU for which oneDNN has
    bfloat16 kernels (AVX-512 or AMX). Elsewhere, e.g. on a CPU with AVX2 only, a bfloat16 matmul is emulated: 8x slower
    than float32 on such a CPU here (docs/benchmarks.md), where it is ~2x faster than float32 on an AVX-512 one."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else False


def default_dtype(device: str) -> str:
    """The base-model dtype when `--dtype` is left out: bfloat16 where `device` runs it natively, else float32."""
    return "bfloat16" if native_bfloat16(device) else "float32"


def load_base(name_or_path: Optional[str], dtype: Optional[str] = None, device: str = "cpu"):
    """(model, tokenizer) in eval mode; the tokenizer pads on the right and has a pad token. `dtype` None: the
    [`default_dtype`] of `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    device = check_device(device)
    dtype = dtype or default_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as err:
        raise UserError(
            f"Cannot load the model {path!r} ({str(err).splitlines()[0]}). Pass a local folder or a hub id that this "
            "machine can reach with --base_model; without an argument the embedded SmolLM2-135M-Instruct is used."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


def adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{adapter_dir!r} is not a saved adapter folder (no adapter_config.json).")
    with open(path) as handle:
        return json.load(handle)


def run_info(adapter_dir: Optional[str]) -> dict:
    """What `moe-peft train` recorded about the run that produced `adapter_dir` ({} for other adapters)."""
    if not adapter_dir:
        return {}
    for folder in (adapter_dir, os.path.dirname(os.path.normpath(adapter_dir))):
        path = os.path.join(folder, RUN_FILE)
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
    return {}


def base_model_of(adapter_dir: str) -> Optional[str]:
    name = adapter_config(adapter_dir).get("base_model_name_or_path")
    if name and not os.path.exists(name) and os.path.basename(name.rstrip("/")) == "SmolLM2-135M-Instruct":
        return None  # trained on the embedded model in another cache: use this machine's copy
    return name


def load_adapter(model, adapter_dir: str, adapter_name: str = "default"):
    """Wrap `model` with the adapter in `adapter_dir` (MOELORA or any peft type), for inference."""
    from peft import PeftModel

    import moe_peft_plugin  # noqa: F401  (registers MOELORA with peft before loading)

    adapter_config(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=False).eval()
