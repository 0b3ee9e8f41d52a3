"""TRL integration of moe-peft-plugin: an `SFTTrainer` that trains MOELORA adapters right, the mixin that does it for
any `Trainer`, and its callbacks.

```py
import moe_peft_plugin  # registers MOELORA with peft
from trainer_callbacks import MoeLoraSFTConfig, MoeLoraSFTTrainer
```
"""

import moe_peft_plugin  # noqa: F401  (registers MOELORA with peft before any adapter is created or loaded)

from .callbacks import (
    HEATMAP_FILENAME,
    MoeLoraTrainerCallback,
    RouterLoadHeatmapCallback,
    RouterLossWarmupCallback,
    RoutingCollapseCallback,
    TaskSpecialisationCallback,
    save_load_heatmap,
)
from .coefficients import RouterLossCoefficients
from .config import MoeLoraSFTConfig
from .distributed import configured_state, deepspeed_requested, setup_deepspeed_without_cuda
from .mixin import MoeLoraTrainerMixin
from .plots import save_expert_load_summary, save_specialisation_report
from .sft_trainer import MoeLoraSFTTrainer
from .stats import LoadHeatmap, RouterStatsTracker, RoutingWindow


__all__ = [
    "HEATMAP_FILENAME",
    "LoadHeatmap",
    "MoeLoraSFTConfig",
    "MoeLoraSFTTrainer",
    "MoeLoraTrainerCallback",
    "MoeLoraTrainerMixin",
    "RouterLoadHeatmapCallback",
    "RouterLossCoefficients",
    "RouterLossWarmupCallback",
    "RouterStatsTracker",
    "RoutingCollapseCallback",
    "RoutingWindow",
    "TaskSpecialisationCallback",
    "configured_state",
    "deepspeed_requested",
    "save_expert_load_summary",
    "save_load_heatmap",
    "save_specialisation_report",
    "setup_deepspeed_without_cuda",
]
