"""Trainer callbacks for MOELORA training: router-loss warm-up, routing-collapse warning, expert-load heatmap, task
specialisation over training.

They work with [`MoeLoraSFTTrainer`] (or any trainer with [`MoeLoraTrainerMixin`]), which binds them to its routing
statistics and router-loss coefficients (also when they are passed in `callbacks=` or added with
`trainer.add_callback`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .plots import save_expert_load_summary
from .stats import LoadHeatmap


if TYPE_CHECKING:
    from .mixin import MoeLoraTrainerMixin


logger = logging.getLogger(__name__)

HEATMAP_FILENAME = "router_load_heatmap.png"


class MoeLoraTrainerCallback(TrainerCallback):
    """Base class of the callbacks that need a [`MoeLoraTrainerMixin`] trainer; the trainer calls `bind` on them."""

    def __init__(self) -> None:
        self._trainer: Optional[MoeLoraTrainerMixin] = None

    def bind(self, trainer: MoeLoraTrainerMixin) -> None:
        self._trainer = trainer

    def _require_trainer(self) -> MoeLoraTrainerMixin:
        if self._trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the routing statistics of a `trainer_callbacks.MoeLoraSFTTrainer` (or a "
                "trainer with `MoeLoraTrainerMixin`); it was not added to one."
            )
        return self._trainer


class RouterLossWarmupCallback(MoeLoraTrainerCallback):
    """
    Ramp the router-loss coefficients linearly from 0 to their configured value (like a learning-rate warm-up), so that
    the routers do not get pushed to uniform routing before the experts have learnt anything.

    The factor at optimizer step `s` is `min(1, s / warmup_steps)`; it depends only on the global step, so a resumed
    run continues the same schedule. `MoeLoraSFTConfig(moelora_loss_warmup_steps=...)` adds this callback.

    Args:
        warmup_steps (`float`): number of optimizer steps (int >= 1), or a fraction of the training steps (in (0, 1)).
    """

    def __init__(self, warmup_steps: float) -> None:
        super().__init__()
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) or warmup_steps <= 0:
            raise ValueError(f"`warmup_steps` must be > 0, got {warmup_steps!r}.")
        self.warmup_steps = warmup_steps
        self._num_steps: Optional[int] = None

    def factor(self, step: int) -> float:
        num_steps = self._num_steps or max(1, int(self.warmup_steps))
        return min(1.0, step / num_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._require_trainer()
        if self.warmup_steps < 1:
            self._num_steps = max(1, int(np.ceil(self.warmup_steps * state.max_steps)))
        else:
            self._num_steps = int(self.warmup_steps)
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        coefficients = self._require_trainer().router_loss_coefficients
        if coefficients is not None:
            coefficients.set_scale(1.0)

    def _apply(self, step: int) -> None:
        coefficients = self._require_trainer().router_loss_coefficients
        if coefficients is not None:
            coefficients.set_scale(self.factor(step))


class RoutingCollapseCallback(MoeLoraTrainerCallback):
    """
    Warn when routing collapses: an expert receives less than `threshold` of its layer's tokens in `patience`
    consecutive training logging windows. Each expert is reported once until it recovers, i.e. stays above the
    threshold for `patience` consecutive windows too (an expert hovering around the threshold is not reported again
    at every dip).

    The experts currently reported are in `collapsed` (`{(layer, expert): first step seen dead}`), so that scripts
    can react (e.g. stop training through a callback of their own).

    Args:
        patience (`int`): consecutive logging windows an expert must stay dead before the warning.
        threshold (`float`, *optional*): token share below which an expert is dead; the trainer's
            `router_dead_expert_threshold` by default.
    """

    def __init__(self, patience: int = 3, threshold: Optional[float] = None) -> None:
        super().__init__()
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an int >= 1, got {patience!r}.")
        if threshold is not None and not 0 <= threshold < 1:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}.")
        self.patience = patience
        self.threshold = threshold
        self.collapsed: dict[tuple[str, int], int] = {}
        self._dead_since: dict[tuple[str, int], int] = {}
        self._streak: dict[tuple[str, int], int] = {}
        self._alive_streak: dict[tuple[str, int], int] = {}  # consecutive live windows of a reported expert
        self._seen_windows = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        stats = self._require_trainer().router_stats
        if stats is None or stats.num_windows["train"] == self._seen_windows:
            return
        self._seen_windows = stats.num_windows["train"]
        threshold = stats.dead_expert_threshold if self.threshold is None else self.threshold
        dead = set(stats.latest["train"].dead_experts(threshold))
        self._streak = {key: self._streak.get(key, 0) + 1 for key in dead}
        for key in dead:
            self._dead_since.setdefault(key, state.global_step)
        for key in list(self._dead_since):
            if key not in dead:
                del self._dead_since[key]
        for key in list(self.collapsed):
            self._alive_streak[key] = 0 if key in dead else self._alive_streak.get(key, 0) + 1
            if self._alive_streak[key] >= self.patience:
                del self.collapsed[key], self._alive_streak[key]
        new = sorted(
            key for key, streak in self._streak.items() if streak >= self.patience and key not in self.collapsed
        )
        if not new:
            return
        for key in new:
            self.collapsed[key] = self._dead_since[key]
        if state.is_world_process_zero:
            by_layer: dict[str, list[int]] = {}
            for layer, expert in new:
                by_layer.setdefault(layer, []).append(expert)
            shown = "; ".join(f"{layer}: experts {experts}" for layer, experts in list(by_layer.items())[:8])
            more = f"; and {len(by_layer) - 8} more layers" if len(by_layer) > 8 else ""
            logger.warning(
                f"Routing collapse at step {state.global_step}: {len(new)} expert(s) in {len(by_layer)} layer(s) got "
                f"less than {threshold:.1%} of their layer's tokens for {self.patience} logging windows ({shown}{more}). "
                "Consider a larger `moelora_aux_loss_coef` (load balancing), router jitter/noise, or a lower learning "
                "rate for the routers; see the expert-load heatmap."
            )


class RouterLoadHeatmapCallback(MoeLoraTrainerCallback):
    """
    Write a heatmap of the expert load (the share of routing decisions each expert received since the previous
    heatmap; decoder layers x experts, one panel per module type, coloured relative to the fair share 1/E) as a PNG
    into each checkpoint folder and into `output_dir` at the end of training. A healthy router is white; a collapsed
    one shows a single red cell per row among blue ones.

    Args:
        filename (`str`, *optional*, defaults to `"router_load_heatmap.png"`): name of the PNG file.

    Raises:
        ImportError: if matplotlib is not installed (`pip install matplotlib`). The trainer's default
            (`router_load_heatmap=None`) does not create this callback then; it warns once instead.
    """

    def __init__(self, filename: str = HEATMAP_FILENAME) -> None:
        super().__init__()
        _require_matplotlib()
        self.filename = filename
        self.written: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._write(folder, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args.output_dir, state)

    def _write(self, folder: str, state) -> None:
        stats = self._require_trainer().router_stats
        heatmap = None if stats is None else stats.take_heatmap()
        if heatmap is None or not state.is_world_process_zero:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        save_load_heatmap(heatmap, path, title=f"Expert load (share of routing decisions), step {state.global_step}")
        self.written.append(path)


class TaskSpecialisationCallback(MoeLoraTrainerCallback):
    """
    Measure during training whether the experts specialise by task: every `every_n_steps` optimizer steps (and at the
    first and the last step), route a fixed probe of texts of each task through the model (no gradient, eval mode)
    and log, with the routing metrics of the next training log:

    - `router/specialisation`: the task specialisation of each adapted layer (mutual information between task and
      expert choice, normalised; [`~moe_peft_plugin.TaskRouting.specialisation`]), averaged over layers;
    - `router/specialisation_max`: the most specialised layer;
    - `router/specialisation_chance`: the average with the task labels shuffled (what a router that ignores the task
      scores on a probe of this size).

    Every measurement is also kept in `history` (a list of dicts with `step`), for plots after training. Use texts the
    model does not train on (e.g. validation questions); a few per task suffice for the trend.

    Args:
        probe (`Mapping[str, Sequence[str]]`): the texts of each task.
        every_n_steps (`int`, defaults to `25`): how often to measure.
        batch_size (`int`, defaults to `8`): texts per forward.
        max_length (`int`, defaults to `256`): truncation of the texts, in tokens.
    """

    def __init__(
        self, probe: Mapping[str, Sequence[str]], every_n_steps: int = 25, batch_size: int = 8, max_length: int = 256
    ) -> None:
        super().__init__()
        if not probe or any(not texts for texts in probe.values()):
            raise ValueError("`probe` needs at least one text for each of at least one task.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}.")
        self.probe = {task: list(texts) for task, texts in probe.items()}
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.max_length = max_length
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._measure(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self._measure(state)

    def _measure(self, state) -> None:
        from moe_peft_plugin import MoeLoraModel
        from moe_peft_plugin.evaluation import collect_task_routing

        trainer = self._require_trainer()
        if not isinstance(getattr(trainer.model, "base_model", None), MoeLoraModel):
            raise TypeError("TaskSpecialisationCallback needs a `PeftModel` with a MOELORA adapter.")
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        accumulator = collect_task_routing(trainer.model, tokenizer, self.probe, self.batch_size, self.max_length)
        values = [r.specialisation for r in accumulator.results().values()]
        values = [v for v in values if np.isfinite(v)]
        chance = [v for v in accumulator.chance_specialisation(num_permutations=3).values() if np.isfinite(v)]
        metrics = {
            "router/specialisation": float(np.mean(values)) if values else float("nan"),
            "router/specialisation_max": float(np.max(values)) if values else float("nan"),
            "router/specialisation_chance": float(np.mean(chance)) if chance else float("nan"),
        }
        self.history.append({"step": state.global_step, **metrics})
        trainer.report_routing_metrics(metrics)


def matplotlib_available() -> bool:
    """Whether the expert-load heatmap can be drawn (matplotlib is importable)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "The expert-load heatmap needs matplotlib: `pip install matplotlib` (or `pip install moe-peft-plugin[trl]`), "
            "or set `router_load_heatmap=False`."
        ) from err


def save_load_heatmap(heatmap: LoadHeatmap, path: str, title: str = "Expert load") -> None:
    """Plot `heatmap` (decoder layers x experts, one panel per module type; see
    [`trainer_callbacks.plots.save_expert_load_summary`]) to a PNG file, without touching pyplot's global state."""
    _require_matplotlib()
    save_expert_load_summary(dict(zip(heatmap.layer_names, heatmap.loads)), path, title=title)
