"""Registration of the MOELORA method with peft.

peft's `register_peft_method` only accepts names that are members of its closed `PeftType` enum. `PeftType` is a `str`
enum, so a plain `"MOELORA"` string key works in every lookup peft does (`get_peft_config`, `PeftConfig.from_pretrained`,
`PeftModel.from_pretrained`, `load_adapter`, saving and loading state dicts). We therefore write the same three mapping
entries that `register_peft_method` writes, with a string key, and use the official helper if peft ever gains
`PeftType.MOELORA`.
"""

from __future__ import annotations

from .config import MoeLoraConfig
from .constants import PEFT_TYPE, PREFIX
from .model import MoeLoraModel


__all__ = ["PEFT_TYPE", "PREFIX", "register"]


def register() -> None:
    """Register `MOELORA` with peft. Idempotent: calling it again is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE)
    if registered is MoeLoraConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is MoeLoraModel:
        return
    if registered is not None:
        raise RuntimeError(
            f"The PEFT type {PEFT_TYPE!r} is already registered with {registered.__module__}.{registered.__name__}; "
            "two different packages (or two copies of moe_peft_plugin) provide it."
        )
    # peft checks prefix uniqueness against the mapping's keys instead of its values, so check it here.
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX and peft_type != PEFT_TYPE:
            raise RuntimeError(f"The adapter prefix {PREFIX!r} is already used by the PEFT type {peft_type!r}.")

    if PEFT_TYPE in PeftType.__members__:
        from peft.utils import register_peft_method

        register_peft_method(name=PEFT_TYPE.lower(), config_cls=MoeLoraConfig, model_cls=MoeLoraModel, prefix=PREFIX)
        return
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MoeLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MoeLoraModel
