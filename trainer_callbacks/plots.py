"""Routing figures that read at a glance: the trainer's expert-load heatmap, `moe-peft inspect`, task specialisation.

- [`save_expert_load_summary`]: decoder layers x experts, one panel per module type (q_proj, ..., down_proj), coloured
  by each expert's load relative to its fair share 1/E. 210 adapted modules (SmolLM2, all-linear) become 7 panels of
  30 x 8 cells instead of a 210-row heatmap with long module names.
- [`save_specialisation_report`]: the specialisation of every module per decoder layer (one line per module type), and
  the task x expert load of the most specialised modules, each panel titled with its number
  ([`moe_peft_plugin.TaskRouting`]).

matplotlib is imported when a figure is drawn (it is an optional dependency) and drawn on an Agg canvas, without
pyplot's global state, so these functions are safe in training processes and threads. Figures stay within 1600 x 1600
pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moe_peft_plugin import TaskRouting
from moe_peft_plugin.config import split_layer_name


MAX_INCHES = 16.0  # at 100 dpi: at most 1600 px on each side
DPI = 100
# Colour scale of a load relative to fair share (load x E), symmetric in log space around 1.
RELATIVE_LOAD_RANGE = (0.25, 4.0)


def layer_index_and_type(name: str) -> tuple[Optional[int], str]:
    """`"model.layers.12.self_attn.q_proj"` -> `(12, "self_attn.q_proj")`; `(None, name)` outside numbered layers.

    The layer numbering of the core (`moe_peft_plugin.config.split_layer_name`, peft's `layers_to_transform` rule)."""
    return split_layer_name(name)


@dataclass
class _Grouped:
    """Module names arranged as decoder layer x module type."""

    layers: list[int]  # the decoder layer indices present, sorted
    types: list[str]  # module types (e.g. "self_attn.q_proj"), in model order
    labels: dict[str, str]  # module type -> short label ("q_proj")
    cells: dict[tuple[int, str], str]  # (layer, type) -> module name
    other: list[str]  # names outside numbered layers (e.g. "lm_head")


def _group(names: Sequence[str]) -> _Grouped:
    cells, types, layers, other = {}, {}, set(), []
    for name in names:
        index, rest = split_layer_name(name)
        if index is None:
            other.append(name)
            continue
        # Modules of different stacks (an encoder and a decoder, a vision tower) are different types.
        prefix = name[: len(name) - len(rest) - len(str(index)) - 2].rsplit(".", 1)[0]
        key = f"{prefix}|{rest}"
        types.setdefault(key, None)
        layers.add(index)
        cells[(index, key)] = name
    labels = {key: key.split("|")[1].split(".")[-1] for key in types}
    if len(set(labels.values())) < len(labels):
        labels = {key: key.split("|")[1] for key in types}
    if len(set(labels.values())) < len(labels):
        labels = {key: f"{key.split('|')[0].split('.')[-1]}.{key.split('|')[1]}".lstrip(".") for key in types}
    return _Grouped(sorted(layers), list(types), labels, cells, other)


def _matplotlib(purpose: str):
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{purpose} needs matplotlib: `pip install matplotlib`.") from err
    return matplotlib, Figure, FigureCanvasAgg


def _relative_load_style(matplotlib):
    """Colour map and norm of `load x E`: blue below the fair share, white at it, red above; grey: no such expert."""
    cmap = matplotlib.colormaps["RdBu_r"]
    cmap = cmap.with_extremes(under=cmap(0.0), over=cmap(1.0), bad="0.85")
    norm = matplotlib.colors.LogNorm(*RELATIVE_LOAD_RANGE)
    return cmap, norm


def _relative(loads: np.ndarray) -> np.ndarray:
    """`load x E` per row, E = the row's finite entries; zeros kept positive so that the log colour scale shows them."""
    num_experts = np.isfinite(loads).sum(-1, keepdims=True)
    return np.clip(loads * num_experts, 1e-6, None)


def _relative_load_colorbar(figure, image, axes, label: str = "load / fair share (1/E)") -> None:
    colorbar = figure.colorbar(image, ax=axes, extend="both", fraction=0.04, pad=0.02, aspect=30)
    ticks = [0.25, 0.5, 1, 2, 4]
    colorbar.set_ticks(ticks, labels=["¼", "½", "1", "2", "4"])
    colorbar.minorticks_off()
    colorbar.set_label(label, fontsize=8)
    colorbar.ax.tick_params(labelsize=8)


def _tick_step(count: int, max_labels: int) -> int:
    return max(1, math.ceil(count / max_labels))


def _size(width: float, height: float) -> tuple[float, float]:
    return min(max(width, 4.0), MAX_INCHES), min(max(height, 3.0), MAX_INCHES)


def _save(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def save_expert_load_summary(
    loads: Mapping[str, Sequence[float]],
    path: str,
    title: str = "Expert load",
    expert_names: Optional[Sequence[str]] = None,
) -> str:
    """
    Draw the expert load of every adapted module as decoder layers (rows) x experts (columns), one panel per module
    type, to a PNG file; return `path`.

    Colour: each expert's load relative to its fair share 1/E (white: fair; blue: less, darkest below ¼, i.e. nearly
    dead; red: more, darkest above 4x). A balanced router is white, a collapsed one shows one red cell per row among
    blue ones. Grey: the module has fewer experts (MoLA) or the layer is not adapted. Modules outside numbered layers
    (e.g. `lm_head`) get a panel of their own.

    Args:
        loads: `{module name: (E,) share of the routing decisions per expert}`, in model order, e.g.
            `{name: stats.expert_load for name, stats in ...}`. E may differ between modules; NaN entries count as
            missing experts (a NaN-padded matrix row is fine).
        path: the PNG file to write (folders are created).
        title: the figure title.
        expert_names: column labels (MoLE: the source adapters); expert indices by default.
    """
    if not loads:
        raise ValueError("No expert loads to draw.")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib("Drawing the expert-load summary")
    rows = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in loads.items()}
    max_experts = max(len(row) for row in rows.values())
    grouped = _group(list(rows))
    panels: list[tuple[str, list[str], np.ndarray]] = []  # (panel title, row labels, (rows, max_experts) loads)
    for key in grouped.types:
        matrix = np.full((len(grouped.layers), max_experts), np.nan)
        for row, layer in enumerate(grouped.layers):
            name = grouped.cells.get((layer, key))
            if name is not None:
                matrix[row, : len(rows[name])] = rows[name]
        panels.append((grouped.labels[key], [str(layer) for layer in grouped.layers], _relative(matrix)))
    if grouped.other:
        matrix = np.full((len(grouped.other), max_experts), np.nan)
        for row, name in enumerate(grouped.other):
            matrix[row, : len(rows[name])] = rows[name]
        panels.append(("other modules" if grouped.types else "modules", grouped.other, _relative(matrix)))

    num_rows = max(len(labels) for _, labels, _ in panels)
    label_width = 0.07 * max(len(label) for label in panels[-1][1]) if grouped.other else 0.0
    figure = Figure(
        figsize=_size(len(panels) * (0.2 * max_experts + 0.35) + 1.6 + label_width, 0.2 * num_rows + 1.6),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    cmap, norm = _relative_load_style(matplotlib)
    x_step = _tick_step(max_experts, 8)
    image = None
    for index, (ax, (panel_title, row_labels, matrix)) in enumerate(zip(axes, panels)):
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(panel_title, fontsize=9)
        if len(row_labels) < num_rows:  # e.g. one `lm_head` row: as tall as the others, at the top
            ax.set_ylim(num_rows - 0.5, -0.5)
            ax.spines[["bottom", "left", "right"]].set_visible(False)
        ax.set_xticks(range(0, max_experts, x_step))
        if expert_names:
            ax.set_xticklabels(list(expert_names)[:max_experts:x_step], rotation=90, fontsize=7)
        else:
            ax.tick_params(axis="x", labelsize=7)
        y_step = _tick_step(len(row_labels), 40)
        ax.set_yticks(range(0, len(row_labels), y_step))
        is_other = grouped.other and index == len(panels) - 1
        if index == 0 or is_other:
            ax.set_yticklabels(row_labels[::y_step], fontsize=7)
        else:
            ax.set_yticklabels([])
        if is_other and index > 0:
            ax.yaxis.tick_right()
        ax.tick_params(length=2)
    if grouped.types:
        axes[0].set_ylabel("decoder layer", fontsize=8)
    figure.supxlabel("expert", fontsize=8)
    figure.suptitle(title, fontsize=10)
    _relative_load_colorbar(figure, image, list(axes))
    return _save(figure, path)


def save_specialisation_report(
    results: Mapping[str, TaskRouting],
    path: str,
    title: str = "Do the experts specialise by task?",
    chance: Optional[Mapping[str, float]] = None,
    modules: Optional[Sequence[str]] = None,
    max_panels: int = 6,
    spread: bool = False,
) -> str:
    """
    Draw the task specialisation of every module to a PNG file; return `path`.

    Top: the specialisation (`TaskRouting.specialisation`: 0 every task routes alike, 1 the task fixes the experts) per
    decoder layer, one line per module type and their mean in black; the chance level (same number with shuffled task
    labels) dashed, when given. Below: task x expert load of a few modules (rows: tasks and all tasks together; cells:
    % of the task's routing decisions; colour: relative to the fair share 1/E as in [`save_expert_load_summary`]),
    titled with their specialisation.

    Args:
        results: `{module name: TaskRouting}`, e.g. `TaskRoutingAccumulator.results()`.
        path: the PNG file to write (folders are created).
        title: the figure title.
        chance: `{module name: chance specialisation}`, e.g. `TaskRoutingAccumulator.chance_specialisation()`.
        modules: the modules to show as task x expert panels; by default the `max_panels` most specialised.
        max_panels: how many panels at most.
        spread: by default, the most specialised modules of the whole model (often all from the last layers); with
            `spread=True`, the most specialised module of each of `max_panels` consecutive groups of decoder layers,
            to see how the routing changes with depth.
    """
    if not results:
        raise ValueError("No task routing to draw.")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib("Drawing the specialisation report")
    if modules is None:
        modules = _most_specialised(results, max_panels, spread)
    else:
        unknown = [name for name in modules if name not in results]
        if unknown:
            raise ValueError(f"Unknown modules {unknown}; known: {list(results)[:5]}...")
        modules = list(modules)[:max_panels]
    num_panels = len(modules)
    num_columns = min(3, max(num_panels, 1))
    num_panel_rows = math.ceil(num_panels / num_columns) if num_panels else 0
    max_experts = max((results[name].num_experts for name in modules), default=1)
    max_tasks = max((len(results[name].tasks) for name in modules), default=1)
    task_label_width = 0.065 * max((len(str(task)) for name in modules for task in results[name].tasks), default=3)
    panel_width = 0.36 * max_experts + 0.6 + task_label_width
    panel_height = 0.26 * (max_tasks + 1) + 0.9
    line_height = 3.2
    figure = Figure(
        figsize=_size(max(9.0, num_columns * panel_width + 1.0), line_height + num_panel_rows * panel_height + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        1 + num_panel_rows, num_columns, height_ratios=[line_height] + [panel_height] * num_panel_rows
    )
    _draw_specialisation_lines(figure.add_subplot(grid[0, :]), results, chance)
    cmap, norm = _relative_load_style(matplotlib)
    image, panel_axes = None, []
    for index, name in enumerate(modules):
        ax = figure.add_subplot(grid[1 + index // num_columns, index % num_columns])
        image = _draw_task_panel(ax, name, results[name], cmap, norm, chance, show_tasks=index % num_columns == 0)
        panel_axes.append(ax)
    if image is not None:
        _relative_load_colorbar(figure, image, panel_axes)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _most_specialised(results: Mapping[str, TaskRouting], max_panels: int, spread: bool) -> list[str]:
    finite = [name for name, result in results.items() if math.isfinite(result.specialisation)]
    groups = [finite]
    if spread:
        layers = sorted({layer_index_and_type(name)[0] for name in finite} - {None})
        if layers:
            bounds = np.array_split(np.asarray(layers), min(max_panels, len(layers)))
            groups = [[name for name in finite if layer_index_and_type(name)[0] in set(part)] for part in bounds]
    chosen = set()
    for group in groups:
        ranked = sorted(group, key=lambda name: -results[name].specialisation)
        chosen.update(ranked[: max(1, max_panels // len(groups))])
    return [name for name in results if name in chosen][:max_panels]  # model order


def _nanmean(values: Sequence[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def _short(name: str) -> str:
    layer, module_type = layer_index_and_type(name)
    return name if layer is None else f"L{layer} {module_type.split('.')[-1]}"


def _draw_specialisation_lines(ax, results: Mapping[str, TaskRouting], chance: Optional[Mapping[str, float]]) -> None:
    names = list(results)
    grouped = _group(names)
    values = {name: results[name].specialisation for name in names}
    if grouped.types:
        x = grouped.layers
        series = {
            grouped.labels[key]: [values.get(grouped.cells.get((layer, key)), np.nan) for layer in x]
            for key in grouped.types
        }
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)  # layers without a number (a single task, E = k) stay visible as gaps
        names_at = [
            [grouped.cells[(layer, key)] for key in grouped.types if (layer, key) in grouped.cells] for layer in x
        ]
    else:  # no numbered layers: one point per module, in model order
        x = list(range(len(names)))
        series = {"module": [values[name] for name in names]}
        ax.set_xticks(x, [_short(name) for name in names], rotation=90, fontsize=6)
        names_at = [[name] for name in names]
    markers = "osD^v<>ph*"
    for index, (label, ys) in enumerate(series.items()):
        ax.plot(x, ys, marker=markers[index % len(markers)], markersize=3, linewidth=0.8, alpha=0.75, label=label)
    mean = [_nanmean([values[name] for name in group]) for group in names_at]
    if len(series) > 1:
        ax.plot(x, mean, color="black", linewidth=2.0, label="mean")
    text = f"mean specialisation {_nanmean(list(values.values())):.3f}"
    if chance:
        chance_mean = [_nanmean([chance.get(name, np.nan) for name in group]) for group in names_at]
        ax.plot(x, chance_mean, color="0.4", linestyle="--", linewidth=1.2, label="chance (shuffled tasks)")
        text += f"; chance {_nanmean([chance.get(name, np.nan) for name in names]):.3f}"
    top = np.nanmax([0.05, *[v for v in values.values() if np.isfinite(v)], *(chance or {}).values()])
    ax.set_ylim(0, min(1.0, top * 1.15) if top < 0.9 else 1.02)
    ax.set_ylabel("specialisation", fontsize=8)
    ax.set_title(
        f"Specialisation per layer: 0 = every task routes alike, 1 = the task fixes the experts ({text})", fontsize=9
    )
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(series) + 2, 5), loc="best", frameon=False)


def _draw_task_panel(ax, name: str, result: TaskRouting, cmap, norm, chance, show_tasks: bool):
    matrix = np.vstack([result.load, result.expert_load[None, :]])  # tasks, then all tasks together
    image = ax.imshow(
        np.ma.masked_invalid(_relative(matrix)), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
    )
    num_rows, num_experts = matrix.shape
    for row in range(num_rows):
        for column in range(num_experts):
            value = matrix[row, column]
            if np.isfinite(value):
                relative = value * num_experts
                dark = relative < 0.4 or relative > 2.5
                ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")  # fmt: skip
    ax.axhline(num_rows - 1.5, color="black", linewidth=0.8)
    heading = f"{_short(name)}: specialisation {result.specialisation:.3f}"
    if chance and name in chance:
        heading += f" (chance {chance[name]:.3f})"
    ax.set_title(heading, fontsize=8)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_rows))
    ax.set_yticklabels([str(task) for task in result.tasks] + ["all"] if show_tasks else [], fontsize=7)
    ax.tick_params(labelsize=7, length=2)
    ax.set_xlabel("expert (cells: % of the task's decisions)", fontsize=7)
    return image
