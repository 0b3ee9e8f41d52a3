"""Model outputs that carry `aux_loss` as a real dataclass field.

`MoeLoraModel` adds `aux_loss` (the router losses) to the output of the wrapped model. Most output classes of
transformers (`CausalLMOutputWithPast`, ...) have no such field, and a key set on a `ModelOutput` that is not a field
does not survive being flattened and rebuilt: DDP (with `find_unused_parameters`, the Trainer's default for peft
models) and FSDP rebuild the output as `type(outputs)(**fields)` and would fail with
`TypeError: ... unexpected keyword argument 'aux_loss'` or drop it. So such outputs are returned as an instance of a
subclass that declares the field; `isinstance` checks against the original class keep working, and the field is
appended last, so tuple positions of the original fields do not move.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from transformers.modeling_outputs import (
    CausalLMOutput,
    CausalLMOutputWithPast,
    Seq2SeqLMOutput,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import ModelOutput


_SUBCLASSES: dict[type, type] = {}


def _rebuild(base_class: type, values: dict) -> ModelOutput:
    """Unpickling helper: the subclasses are made at run time, so they are pickled through their base class."""
    return with_aux_loss_field(
        base_class(**{k: v for k, v in values.items() if k != "aux_loss"}), values.get("aux_loss")
    )


def _reduce(self: ModelOutput):
    return _rebuild, (type(self).__mro__[1], dict(self.items()))


def _subclass_with_aux_loss(base_class: type) -> type:
    subclass = _SUBCLASSES.get(base_class)
    if subclass is None:
        subclass = dataclasses.make_dataclass(
            base_class.__name__,
            [("aux_loss", Optional[torch.FloatTensor], dataclasses.field(default=None))],
            bases=(base_class,),
            namespace={
                "__doc__": f"{base_class.__doc__ or base_class.__name__}\n\n    aux_loss: the MOELORA router losses.",
                "__reduce__": _reduce,
            },
        )
        subclass.__module__ = base_class.__module__
        _SUBCLASSES[base_class] = subclass
    return subclass


def has_aux_loss_field(outputs: ModelOutput) -> bool:
    return any(f.name == "aux_loss" for f in dataclasses.fields(outputs))


def with_aux_loss_field(outputs: ModelOutput, aux_loss: Optional[torch.Tensor]) -> ModelOutput:
    """`outputs` with `aux_loss` set as a field (the same object when its class already has one)."""
    if not has_aux_loss_field(outputs):
        outputs = _subclass_with_aux_loss(type(outputs))(**outputs)
    outputs["aux_loss"] = aux_loss
    return outputs


# The usual outputs get their subclass at import: creating a class inside a forward traced by `torch.compile` would
# break the graph (`fullgraph=True` would fail) on the first call.
for _output_class in (CausalLMOutputWithPast, CausalLMOutput, SequenceClassifierOutputWithPast, Seq2SeqLMOutput):
    _subclass_with_aux_loss(_output_class)
