"""The names of the MOELORA method: its PEFT type and its parameter prefix (a leaf module: it imports nothing)."""

from __future__ import annotations


class _PeftTypeName(str):
    """`"MOELORA"` that also quacks like a `PeftType` member: peft (and its testers) read `config.peft_type.value`."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


PEFT_TYPE = _PeftTypeName("MOELORA")
PREFIX = "moelora_"
