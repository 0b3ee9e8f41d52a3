"""Configuration of the MOELORA PEFT method."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .constants import PEFT_TYPE


ROUTER_TYPES = ("topk", "soft")
# `router_sharing=True`: the projections of a decoder layer that read the same input in Llama-family models (Llama,
# Mistral, Qwen, Gemma, SmolLM, ...): the attention input (q/k/v) and the MLP input (gate/up).
DEFAULT_ROUTER_SHARING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DEFAULT_NUM_EXPERTS = 8  # `num_experts` when it is left unset (None) and there are no `expert_adapters`
BIAS_TYPES = ("none", "all", "moelora_only")

# LoRA fields that carry over unchanged (same name and meaning) in `MoeLoraConfig.from_lora_config`.
_SHARED_LORA_FIELDS = (
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "use_rslora",
    "trainable_token_indices",
)
# LoRA fields that MOELORA cannot represent, with the value that means "not used".
_UNSUPPORTED_LORA_FIELDS = {
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "megatron_config": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def _check_int_or_list(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ValueError(f"`{name}` must be a positive int or a non-empty list of positive ints, got {value!r}.")
    values = [value] if isinstance(value, int) else list(value)
    if not values:
        raise ValueError(f"`{name}` must be a positive int or a non-empty list of positive ints, got an empty list.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must contain only positive ints, got {v!r} in {value!r}.")


def _check_coef(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ValueError(f"`{name}` must be a float >= 0 (0 disables the loss), got {value!r}.")


def _normalize_router_sharing(value: Any) -> Union[bool, list[list[str]]]:
    """`router_sharing` as False, True, or a list of groups (lists of at least two distinct module names, no name in
    two groups); raises a `ValueError` naming the field otherwise."""
    if isinstance(value, bool):
        return value
    allowed = (
        "`router_sharing` must be a bool or a list of groups of module names, e.g. "
        '[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]'
    )
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{allowed}, got {value!r}.")
    groups, seen = [], set()
    for group in value:
        if isinstance(group, str) or not isinstance(group, (list, tuple)):
            raise ValueError(f"{allowed}; each group is a list of names, got {group!r}.")
        names = list(group)
        if len(names) < 2 or not all(isinstance(n, str) and n and "." not in n for n in names):
            raise ValueError(
                f"{allowed}; each group needs at least two module names (the name inside the parent module, "
                f"without dots), got {group!r}."
            )
        if len(set(names)) != len(names) or seen & set(names):
            raise ValueError(f"{allowed}; a module name may appear once, got {value!r}.")
        seen.update(names)
        groups.append(names)
    return groups


def router_sharing_groups(router_sharing: Union[bool, list[list[str]]]) -> tuple[tuple[str, ...], ...]:
    """The groups of module names that share a router under `router_sharing` (none when it is False)."""
    if router_sharing is True:
        return DEFAULT_ROUTER_SHARING_GROUPS
    if not router_sharing:
        return ()
    return tuple(tuple(group) for group in router_sharing)


def mola_group_sizes(num_layers: int, num_groups: int) -> list[int]:
    """Sizes of the groups of consecutive layers that a MoLA list with `num_groups` entries covers.

    The layers are split as evenly as possible: every group gets `num_layers // num_groups` layers, and the
    `num_layers % num_groups` remaining layers go one each to the groups at the ends, alternately from the first and the
    last group inwards (first, last, second, second to last, ...). 30 layers in 4 groups: `[8, 7, 7, 8]`; 7 layers in 3
    groups: `[3, 2, 2]`. When the remainder is even the sizes are symmetric, so an allocation and its reverse
    (`[2, 4, 6, 8]` and `[8, 6, 4, 2]`) have the same number of experts.
    """
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"Cannot split {num_layers} layers into {num_groups} non-empty groups.")
    base, extra = divmod(num_layers, num_groups)
    sizes = [base] * num_groups
    outside_in = [i // 2 if i % 2 == 0 else num_groups - 1 - i // 2 for i in range(num_groups)]
    for group in outside_in[:extra]:
        sizes[group] += 1
    return sizes


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's output scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (as peft's LoRA computes it)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def split_layer_name(key: str, layers_pattern: Union[str, list[str], None] = None) -> tuple[Optional[int], str]:
    """`(index of the decoder layer, name inside the layer)` of module `key`, e.g. `"model.layers.12.self_attn.q_proj"`
    -> `(12, "self_attn.q_proj")`; `(None, key)` outside numbered layers.

    The same rule as peft's `layers_to_transform`: the first number after a named container (`layers`, GPT-2's `h`,
    ...), or after one of `layers_pattern` when it is set. MoLA's per-layer expert counts, `moe-peft export --layers`
    and the routing figures all number layers this way.
    """
    if not layers_pattern:
        match = re.match(r"(?P<head>.*?\.[^.]*\.)(?P<idx>\d+)\.(?P<rest>.+)$", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?P<head>(?:^|.*?\.){pattern}\.)(?P<idx>\d+)\.(?P<rest>.+)$", key)
            if match is not None:
                break
    return (int(match.group("idx")), match.group("rest")) if match else (None, key)


def layer_index(key: str, layers_pattern: Union[str, list[str], None] = None) -> Optional[int]:
    """Index of the decoder layer that module `key` belongs to (see [`split_layer_name`])."""
    return split_layer_name(key, layers_pattern)[0]


def expand_per_layer(name: str, value: int | list[int], num_layers: int) -> list[int]:
    """Expand an int or a MoLA-style list into one value per decoder layer.

    A list with one entry per layer is used as is. A shorter list gives one value per group of consecutive layers,
    split as evenly as possible by [`mola_group_sizes`]: `[2, 4, 6, 8]` on 32 layers means layers 0-7 get 2, layers
    8-15 get 4, and so on; on 30 layers the groups have 8, 7, 7 and 8 layers.
    """
    if isinstance(value, int):
        return [value] * num_layers
    value = list(value)
    if len(value) == num_layers:
        return value
    if len(value) > num_layers:
        raise ValueError(
            f"`{name}` has {len(value)} entries, which does not fit a model with {num_layers} layers: give one entry "
            f"per layer ({num_layers}) or one per group of consecutive layers (at most {num_layers} groups)."
        )
    sizes = mola_group_sizes(num_layers, len(value))
    return [v for v, size in zip(value, sizes) for _ in range(size)]


@dataclass
class MoeLoraConfig(PeftConfig):
    """
    Configuration of a [`MoeLoraModel`]: every targeted linear layer gets `num_experts` LoRA experts and a router.

    The LoRA fields keep LoRA's names and meaning, so a LoRA recipe becomes a MOELORA recipe by changing the class (or
    `peft_type="MOELORA"`, or [`MoeLoraConfig.from_lora_config`]). The three published variants are presets of the
    same fields:

    - MoELoRA (arXiv 2402.12851): `num_experts=8, top_k=2, router_type="topk"`, load balancing and
      `contrastive_loss_coef > 0`.
    - MoLA (arXiv 2402.08562): `num_experts=[2, 4, 6, 8]` (one count per layer or per group of consecutive layers,
      the groups as even as possible).
    - MoLE (arXiv 2404.13628): `expert_adapters=[lora_dir_1, lora_dir_2, ...]`: trained LoRAs become frozen experts,
      a soft router with a learnable temperature is trained, optionally with `gate_balance_loss_coef`.

    Args:
        r (`int`):
            LoRA rank of every expert.
        lora_alpha (`int`):
            LoRA alpha; the expert outputs are scaled by `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA).
        lora_dropout (`float`):
            Dropout applied to the expert input, as in LoRA. The router always sees the input without dropout.
        target_modules (`Optional[Union[List[str], str]]`):
            Names of the modules to adapt (suffix match), a regex, or `"all-linear"`. `None` uses LoRA's defaults for
            known architectures. With `expert_adapters`, `None` means the modules the LoRAs adapt; a value in any of
            these forms must select exactly those modules (otherwise a `ValueError` lists the difference).
        exclude_modules (`Optional[Union[List[str], str]]`):
            Names or a regex of modules not to adapt.
        layers_to_transform (`Union[List[int], int]`):
            Only adapt the layers with these indices.
        layers_pattern (`Optional[Union[List[str], str]]`):
            Name of the layer list (e.g. `"layers"`), used with `layers_to_transform` and per-layer expert counts.
        modules_to_save (`Optional[List[str]]`):
            Modules trained fully and saved with the adapter, as in LoRA.
        bias (`str`):
            Which biases to train: `"none"`, `"all"` or `"moelora_only"` (the biases of the adapted layers).
        use_rslora (`bool`):
            Scale by `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
        init_weights (`bool`):
            `True`: experts start as zero updates (LoRA's B = 0), so the adapted model equals the base model.
            `False`: random non-zero experts (for tests and debugging).
        target_parameters (`Optional[List[str]]`):
            Not supported by MOELORA; declared because peft and TRL read it. Must stay `None`.
        trainable_token_indices (`Optional[Union[List[int], dict[str, List[int]]]]`):
            Token indices of the embedding to train, as in LoRA.
        num_experts (`Optional[Union[int, List[int]]]`):
            Experts per adapted layer. A list (MoLA) gives one count per decoder layer, or, when it is shorter, one
            count per group of consecutive layers. The groups are as even as possible: each has `L // G` layers (L
            layers, G entries) and the `L % G` remaining layers go one each to the groups at the ends, alternately
            from the first and the last inwards (30 layers, `[2, 4, 6, 8]`: groups of 8, 7, 7 and 8 layers; see
            [`~moe_peft_plugin.config.mola_group_sizes`]). `None` (unset) means 8, or one expert
            per LoRA with `expert_adapters`; an explicit value must then equal the number of `expert_adapters`.
        top_k (`Union[int, List[int]]`):
            Experts used per token with `router_type="topk"`; an int or a list with the same rules as `num_experts`.
        router_type (`Optional[str]`):
            `"topk"`: sparse routing to the `top_k` most probable experts, with their weights renormalised to sum to 1
            (MoELoRA/MoLA; with `top_k=1` the gate is the raw probability, as in Switch Transformers, so that the
            router keeps a gradient). `"soft"`: dense softmax over all experts (MoLE). `None` picks `"soft"` when
            `expert_adapters` is set and `"topk"` otherwise.
        router_temperature (`float`):
            Softmax temperature of the router (initial value when it is learnable).
        learn_router_temperature (`Optional[bool]`):
            Learn the router temperature (MoLE). `None` means `True` with `expert_adapters` and `False` otherwise.
        router_jitter_noise (`float`):
            Mixtral-style multiplicative jitter: during training the router input is multiplied by noise drawn from
            U(1 - jitter, 1 + jitter). 0 disables it.
        router_noise_std (`float`):
            Noisy top-k gating: during training Gaussian noise with this standard deviation is added to the router
            logits before the top-k selection. 0 disables it.
        aux_loss_coef (`float`):
            Weight of the Switch Transformer load-balancing loss `E * sum_e f_e * P_e` (padding tokens excluded when an
            attention mask is passed). 0 disables it.
        router_z_loss_coef (`float`):
            Weight of the ST-MoE router z-loss `mean(logsumexp(logits)^2)`. 0 disables it.
        contrastive_loss_coef (`float`):
            Weight of the expert contrastive loss (MoELoRA): an InfoNCE loss in which the output of each selected
            expert is pulled towards the mean output direction of the same expert over the batch (positive) and away
            from those of the other experts (negatives), so that experts learn distinct features. 0 disables it.
        contrastive_temperature (`float`):
            Temperature of the contrastive InfoNCE loss.
        gate_balance_loss_coef (`float`):
            Weight of the MoLE gating-balance loss `-log prod_e q_e` (paper eq. 14-16), where `q_e` is the mean gate
            weight of expert `e` over the batch. 0 disables it.
        expert_adapters (`Optional[List[str]]`):
            MoLE: folders of trained LoRA adapters of the same base model. Each LoRA becomes one expert in every layer
            it targets. The weights are copied into this adapter, so the saved MOELORA checkpoint is self-contained;
            after loading, this field is cleared and `expert_names` records where the experts came from.
        freeze_experts (`Optional[bool]`):
            Keep the expert weights frozen and train only the routers. `None` means `True` with `expert_adapters` and
            `False` otherwise.
        expert_names (`Optional[List[str]]`):
            Names of the experts (filled from `expert_adapters`); informational.
        router_sharing (`Union[bool, List[List[str]]]`):
            Opt-in, as MixLoRA does: the projections of one block that read the same input share one router, and the
            routing of a token is computed once for all of them. `True` groups q/k/v and gate/up (Llama-family
            names); a list of groups names them, e.g. `[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]`
            (names inside their parent module; the members of a group must sit in the same parent, e.g. one
            `self_attn`). The first member of each group holds the router; the others use it. The result is exactly
            that of identical copies of one router in every member (same outputs, router losses, statistics and, summed
            over the copies, gradients), at the cost of one router: its matmul and routing run once per input tensor.
            A member that gets another input tensor (e.g. the keys of a cross-attention) routes its own input with the
            shared router. This departs from MoELoRA and MoLA, which give every projection its own router: with `True`
            and all linear layers of a Llama block adapted, 4 routers instead of 7. `False` (default): one router
            per adapted projection.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of every expert."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha; expert outputs are scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the expert input, as in LoRA."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names to adapt (suffix match), a regex, or 'all-linear'. None uses LoRA's per-architecture "
            "defaults."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform and MoLA lists."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."}
    )
    bias: str = field(default="none", metadata={"help": "Biases to train: 'none', 'all' or 'moelora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by lora_alpha / sqrt(r) (rsLoRA)."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: experts start as zero updates. False: random non-zero experts."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by MOELORA (declared because peft and TRL read it)."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token indices of the embedding to train, as in LoRA."}
    )
    num_experts: Optional[Union[int, list[int]]] = field(
        default=None,
        metadata={
            "help": "Experts per layer: an int, or a list per layer / per group of layers (MoLA). None: 8, or one per "
            "LoRA of expert_adapters."
        },
    )
    top_k: Union[int, list[int]] = field(
        default=2, metadata={"help": "Experts per token for router_type='topk'; an int or a list like num_experts."}
    )
    router_type: Optional[Literal["topk", "soft"]] = field(
        default=None,
        metadata={"help": "'topk' (sparse, MoELoRA/MoLA) or 'soft' (dense, MoLE). None: 'soft' with expert_adapters."},
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router."})
    learn_router_temperature: Optional[bool] = field(
        default=None, metadata={"help": "Learn the router temperature (MoLE). None: True with expert_adapters."}
    )
    router_jitter_noise: float = field(
        default=0.0, metadata={"help": "Mixtral-style multiplicative jitter on the router input during training."}
    )
    router_noise_std: float = field(
        default=0.0, metadata={"help": "Std of Gaussian noise added to router logits during training (noisy top-k)."}
    )
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss (0 disables)."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the router z-loss (0 disables)."})
    contrastive_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the expert contrastive (InfoNCE) loss of MoELoRA (0 disables)."}
    )
    contrastive_temperature: float = field(default=0.1, metadata={"help": "Temperature of the contrastive loss."})
    gate_balance_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the MoLE gating-balance loss -log prod q (0 disables)."}
    )
    expert_adapters: Optional[list[str]] = field(
        default=None, metadata={"help": "MoLE: folders of trained LoRA adapters that become frozen experts."}
    )
    freeze_experts: Optional[bool] = field(
        default=None, metadata={"help": "Train only the routers. None: True with expert_adapters."}
    )
    expert_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Names of the experts (filled from expert_adapters); informational."}
    )
    router_sharing: Union[bool, list[list[str]]] = field(
        default=False,
        metadata={
            "help": "Projections that read the same input share one router (MixLoRA): True groups q/k/v and gate/up; "
            "or a list of groups of module names. False: one router per projection."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        """Bring the fields to their canonical types and resolve the `None` ("unset") defaults."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, set(value) if name == "target_modules" else list(value))
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        if isinstance(self.top_k, tuple):
            self.top_k = list(self.top_k)
        if self.expert_adapters is not None:
            if isinstance(self.expert_adapters, (str, bytes)) or not isinstance(self.expert_adapters, (list, tuple)):
                raise ValueError(
                    f"`expert_adapters` must be a list of LoRA adapter folders, got {self.expert_adapters!r}."
                )
            self.expert_adapters = [str(p) for p in self.expert_adapters]
        mole = bool(self.expert_adapters)
        if self.router_type is None:
            self.router_type = "soft" if mole else "topk"
        if self.learn_router_temperature is None:
            self.learn_router_temperature = mole
        if self.freeze_experts is None:
            self.freeze_experts = mole
        if self.num_experts is None:
            self.num_experts = len(self.expert_adapters) if mole else DEFAULT_NUM_EXPERTS
        self.router_sharing = _normalize_router_sharing(self.router_sharing)

    def _validate(self) -> None:
        """Check the normalised fields; raise a `ValueError` naming the field and what is allowed."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be a positive int, got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be a float in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_TYPES:
            raise ValueError(f"`bias` must be one of {BIAS_TYPES}, got {self.bias!r}.")
        if self.target_parameters:
            raise ValueError("`target_parameters` is not supported by MOELORA: target modules with `target_modules`.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (a regex).")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str (a regex).")
        if self.layers_pattern and not self.layers_to_transform and not isinstance(self.num_experts, list):
            raise ValueError("`layers_pattern` needs `layers_to_transform` or a per-layer `num_experts` list.")

        _check_int_or_list("num_experts", self.num_experts)
        _check_int_or_list("top_k", self.top_k)
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"`router_type` must be one of {ROUTER_TYPES} (or None), got {self.router_type!r}.")
        # With soft routing every expert is used and `top_k` is ignored.
        if self.router_type == "topk":
            if isinstance(self.num_experts, int) and isinstance(self.top_k, int) and self.top_k > self.num_experts:
                raise ValueError(f"`top_k` ({self.top_k}) must not be larger than `num_experts` ({self.num_experts}).")
            if (
                isinstance(self.num_experts, list)
                and isinstance(self.top_k, list)
                and len(self.top_k) == len(self.num_experts)
            ):
                for i, (k, e) in enumerate(zip(self.top_k, self.num_experts)):
                    if k > e:
                        raise ValueError(f"`top_k[{i}]` ({k}) must not be larger than `num_experts[{i}]` ({e}).")
            if (
                isinstance(self.top_k, int)
                and isinstance(self.num_experts, list)
                and self.top_k > min(self.num_experts)
            ):
                raise ValueError(
                    f"`top_k` ({self.top_k}) must not be larger than the smallest entry of `num_experts` "
                    f"({min(self.num_experts)}); pass `top_k` as a list to use a different k per layer."
                )
        for name in ("router_temperature", "contrastive_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be a float > 0, got {value!r}.")
        if not isinstance(self.router_jitter_noise, (int, float)) or not 0.0 <= self.router_jitter_noise < 1.0:
            raise ValueError(f"`router_jitter_noise` must be a float in [0, 1), got {self.router_jitter_noise!r}.")
        _check_coef("router_noise_std", self.router_noise_std)
        for name in ("aux_loss_coef", "router_z_loss_coef", "contrastive_loss_coef", "gate_balance_loss_coef"):
            _check_coef(name, getattr(self, name))

        if self.expert_adapters is not None:
            if len(self.expert_adapters) < 1:
                raise ValueError("`expert_adapters` must name at least one LoRA adapter folder.")
            if len(set(self.expert_adapters)) != len(self.expert_adapters):
                raise ValueError(f"`expert_adapters` contains the same folder twice: {self.expert_adapters}.")
            if isinstance(self.num_experts, list):
                raise ValueError(
                    "`num_experts` cannot be a per-layer list with `expert_adapters` (one expert per LoRA)."
                )
            if self.num_experts != len(self.expert_adapters):
                raise ValueError(
                    f"`num_experts` ({self.num_experts}) must equal the number of `expert_adapters` "
                    f"({len(self.expert_adapters)}), or be left unset (None)."
                )
            if self.router_type == "topk" and isinstance(self.top_k, int) and self.top_k > self.num_experts:
                raise ValueError(
                    f"`top_k` ({self.top_k}) must not be larger than the number of `expert_adapters` "
                    f"({self.num_experts})."
                )
            # `target_modules` may be given, but must select the modules the LoRAs adapt: checked against the
            # model, where the LoRAs are loaded (`MoeLoraModel._prepare_adapter_config`).
        elif self.gate_balance_loss_coef and self.router_type != "soft":
            raise ValueError("`gate_balance_loss_coef` (MoLE) requires `router_type='soft'`.")
        if self.expert_names is not None and len(self.expert_names) != self.num_experts:
            raise ValueError(
                f"`expert_names` has {len(self.expert_names)} entries but there are {self.num_experts} experts."
            )

    def to_dict(self) -> dict:
        config = super().to_dict()
        if self.expert_names is not None and self.expert_adapters:
            # The experts were copied into the adapter: the saved checkpoint must not depend on the LoRA folders.
            config["expert_adapters"] = None
        return config

    @classmethod
    def from_lora_config(cls, lora_config, **moe_fields) -> MoeLoraConfig:
        """
        Convert a `peft.LoraConfig` recipe into a `MoeLoraConfig`.

        The LoRA fields shared by both methods (rank, alpha, dropout, targets, layers, modules_to_save, rsLoRA, ...)
        are copied; `init_lora_weights` maps to `init_weights` and LoRA's `"lora_only"` bias to `"moelora_only"`.
        `moe_fields` set the MOELORA fields (`num_experts`, `top_k`, `aux_loss_coef`, ...) and override copied ones.

        Raises:
            ValueError: if the LoRA config uses a feature MOELORA cannot represent (DoRA, rank/alpha patterns, ...).
        """
        from peft import LoraConfig

        if not isinstance(lora_config, LoraConfig):
            raise ValueError(f"`lora_config` must be a peft.LoraConfig, got {type(lora_config).__name__}.")
        for name, unused in _UNSUPPORTED_LORA_FIELDS.items():
            value = getattr(lora_config, name, unused)
            if value not in (unused, None, {}, False) and name not in moe_fields:
                raise ValueError(f"LoRA field `{name}`={value!r} has no MOELORA equivalent; remove it to convert.")
        kwargs = {name: getattr(lora_config, name) for name in _SHARED_LORA_FIELDS if hasattr(lora_config, name)}
        if isinstance(kwargs.get("target_modules"), set):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        init = lora_config.init_lora_weights
        if not isinstance(init, bool):
            raise ValueError(
                f"LoRA field `init_lora_weights`={init!r} has no MOELORA equivalent; MOELORA supports True or False."
            )
        kwargs["init_weights"] = init
        kwargs["bias"] = "moelora_only" if lora_config.bias == "lora_only" else lora_config.bias
        kwargs.update(moe_fields)
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save `adapter_config.json`; when peft saves a whole adapter (`PeftModel.save_pretrained` writes its model
        card just before), also add how to load it and the papers it follows to that card (`model_card.py`)."""
        super().save_pretrained(save_directory, **kwargs)
        from .model_card import update_existing_model_card

        update_existing_model_card(save_directory, self)  # a config saved on its own gets no card
