"""MoLE: turn trained LoRA adapters into the frozen experts of a MOELORA adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Union

import torch
from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key
from torch import nn

from .config import lora_scaling


_LORA_A_SUFFIX = ".lora_A.weight"
_LORA_B_SUFFIX = ".lora_B.weight"


@dataclass
class LoraExperts:
    """The LoRAs of `expert_adapters`, stacked per module: A `(E, r, in)`, B `(E, out, r)` with scaling folded in B."""

    names: list[str]
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name (relative to the base model) -> (A, B)


def _module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _load_lora(path: str) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    if not os.path.isdir(path):
        raise ValueError(f"`expert_adapters`: {path!r} is not a folder with a saved LoRA adapter.")
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as err:  # peft raises several types for a missing or unreadable adapter_config.json
        raise ValueError(f"`expert_adapters`: cannot read the adapter config in {path!r}: {err}") from err
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"`expert_adapters`: {path!r} holds a {config.peft_type} adapter; only LoRA adapters can become experts."
        )
    unsupported = {
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "modules_to_save": config.modules_to_save,
        "trainable_token_indices": config.trainable_token_indices,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(
                f"`expert_adapters`: the LoRA in {path!r} uses `{name}`={value!r}, which a MoLE expert cannot represent."
            )
    state_dict = load_peft_weights(path, device="cpu")
    weights = {}
    for key, lora_A in state_dict.items():
        if key.endswith(_LORA_A_SUFFIX):
            module = _module_name(key, _LORA_A_SUFFIX)
            key_B = key[: -len(_LORA_A_SUFFIX)] + _LORA_B_SUFFIX
            if key_B not in state_dict or lora_A.dim() != 2:
                raise ValueError(f"`expert_adapters`: the LoRA in {path!r} has no usable linear weights for {module}.")
            weights[module] = (lora_A, state_dict[key_B])
        elif not key.endswith(_LORA_B_SUFFIX):
            raise ValueError(
                f"`expert_adapters`: the LoRA in {path!r} contains {key!r}; only linear LoRA weights (lora_A/lora_B) "
                "can become experts."
            )
    if not weights:
        raise ValueError(f"`expert_adapters`: the LoRA in {path!r} contains no lora_A/lora_B weights.")
    return config, weights


def _scaling(config: LoraConfig, module: str, rank: int) -> float:
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), module), config.lora_alpha)
    return lora_scaling(alpha, rank, config.use_rslora)


def load_lora_experts(model: nn.Module, paths: list[str]) -> LoraExperts:
    """Load and check the LoRA adapters of `expert_adapters` against `model` (the base model, not a PeftModel).

    Raises:
        ValueError: if an adapter is not a LoRA of this base model, uses features an expert cannot represent, or the
            adapters do not all adapt the same modules.
    """
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    modules = dict(model.named_modules())
    loaded = []
    for path in paths:
        config, weights = _load_lora(path)
        base = config.base_model_name_or_path
        if (
            base
            and model_name
            and os.path.basename(str(base).rstrip("/")) != os.path.basename(str(model_name).rstrip("/"))
        ):
            raise ValueError(
                f"`expert_adapters`: the LoRA in {path!r} was trained on {base!r}, but the model is {model_name!r}."
            )
        for module, (lora_A, lora_B) in weights.items():
            target = modules.get(module)
            base_layer = getattr(target, "base_layer", target)
            in_features = getattr(base_layer, "in_features", None)
            out_features = getattr(base_layer, "out_features", None)
            if target is None or (lora_A.shape[1], lora_B.shape[0]) != (in_features, out_features):
                found = "missing" if target is None else f"({in_features} -> {out_features})"
                raise ValueError(
                    f"`expert_adapters`: the LoRA in {path!r} adapts {module} with shape "
                    f"({lora_A.shape[1]} -> {lora_B.shape[0]}), but that module is {found} in this model; the LoRA "
                    "was trained on another base model."
                )
        loaded.append((path, config, weights))

    first_path, _, first_weights = loaded[0]
    for path, _, weights in loaded[1:]:
        if set(weights) != set(first_weights):
            only_here = sorted(set(weights) - set(first_weights))[:3]
            only_first = sorted(set(first_weights) - set(weights))[:3]
            raise ValueError(
                f"`expert_adapters`: the LoRAs must adapt the same modules; {path!r} and {first_path!r} differ "
                f"(only in the first: {only_here}, only in the second: {only_first})."
            )

    # Experts of different ranks are zero-padded to the largest rank, which leaves their output unchanged.
    rank = max(lora_A.shape[0] for _, _, weights in loaded for lora_A, _ in weights.values())
    stacked = {}
    for module in first_weights:
        stack_A, stack_B = [], []
        for _, config, weights in loaded:
            lora_A, lora_B = weights[module]
            r = lora_A.shape[0]
            padded_A = lora_A.new_zeros(rank, lora_A.shape[1])
            padded_A[:r] = lora_A
            padded_B = lora_B.new_zeros(lora_B.shape[0], rank)
            padded_B[:, :r] = lora_B * _scaling(config, module, r)
            stack_A.append(padded_A.float())
            stack_B.append(padded_B.float())
        stacked[module] = (torch.stack(stack_A), torch.stack(stack_B))
    names = [os.path.basename(os.path.normpath(path)) for path, _, _ in loaded]
    return LoraExperts(names=names, rank=rank, weights=stacked)


def _describe(modules: set[str]) -> str:
    """`"4 (k_proj, o_proj)"`: how many modules, and their distinct names without the layer path."""
    return f"{len(modules)} ({', '.join(sorted({name.rsplit('.', 1)[-1] for name in modules}))})"


def check_target_modules(
    model: nn.Module,
    target_modules: Union[str, list[str], set[str]],
    task_type: Union[str, None],
    experts: LoraExperts,
) -> None:
    """Check that `target_modules` (any form peft accepts) selects exactly the modules that the LoRA experts adapt.

    Only `target_modules` is compared; `exclude_modules` and `layers_to_transform` still restrict the placement, as
    they do when `target_modules` is unset.

    Raises:
        ValueError: listing the modules selected by only one of the two.
    """
    # The matching of peft itself (suffixes, regex, "all-linear"), without the fields that only restrict it.
    probe = SimpleNamespace(
        target_modules=target_modules,
        task_type=task_type,
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    probe = _maybe_include_all_linear_layers(probe, model)
    selected = {name for name, _ in model.named_modules() if name and check_target_module_exists(probe, name)}
    adapted = set(experts.weights)
    if selected == adapted:
        return
    shown = sorted(target_modules) if isinstance(target_modules, set) else target_modules
    differences = []
    if adapted - selected:
        differences.append(
            f"adapted by the LoRAs but not selected by `target_modules`: {_describe(adapted - selected)}"
        )
    if selected - adapted:
        differences.append(f"selected but not adapted by the LoRAs: {_describe(selected - adapted)}")
    raise ValueError(
        f"`target_modules`={shown!r} must select exactly the modules that the `expert_adapters` LoRAs adapt, or be "
        f"left unset; modules {'; '.join(differences)}."
    )
