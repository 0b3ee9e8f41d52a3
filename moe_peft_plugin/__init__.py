"""moe-peft-plugin: mixture-of-LoRA-experts (MoELoRA, MoLA, MoLE) as a peft method.

Importing this package registers the PEFT type `"MOELORA"` with peft, after which the usual peft API works:
`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, `load_adapter`, `save_pretrained`.
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
