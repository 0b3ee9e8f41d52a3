"""moe-peft-plugin: mixture-of-LoRA-experts (MoELoRA, MoLA, MoLE) as a peft method.

Importing this package registers the PEFT type `"MOELORA"` with peft, after which the usual peft API works:
`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, `load_adapter`, `save_pretrained`.

Looking at the routing: `MoeLoraModel.get_routing_stats()` gives each layer's [`RoutingStats`] for the last forward.
To ask whether the experts specialise by task on a mixed data set, turn on per-sample routing
(`record_sample_routing(True)`), feed labelled batches to a [`TaskRoutingAccumulator`], and read each layer's
[`TaskRouting`]: the task x expert load and a specialisation number in [0, 1] (normalised mutual information between
task and expert; [`shuffled_specialisation`] / `chance_specialisation` give the level chance alone reaches).
[`task_routing`] computes the same from per-sample loads you collected yourself. These are pure numpy/torch; the
figures are in `trainer_callbacks.plots` (matplotlib).
"""

from .config import MoeLoraConfig
from .layer import Linear, MoeLoraLayer, MoeLoraMergeError
from .model import MoeLoraModel
from .registration import PEFT_TYPE, PREFIX, register
from .routing import RoutingOptions
from .specialisation import TaskRouting, TaskRoutingAccumulator, shuffled_specialisation, task_routing
from .state import AmbiguousRecomputationError, RoutingStats


__version__ = "0.1.0"

__all__ = [
    "AmbiguousRecomputationError",
    "PEFT_TYPE",
    "PREFIX",
    "Linear",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MoeLoraMergeError",
    "MoeLoraModel",
    "RoutingOptions",
    "RoutingStats",
    "TaskRouting",
    "TaskRoutingAccumulator",
    "register",
    "shuffled_specialisation",
    "task_routing",
]

register()
