"""Do the experts specialise by task? Task x expert load and a specialisation number per layer.

On a mixed evaluation set (several tasks, each sample labelled with its task), turn on per-sample routing
(`model.base_model.record_sample_routing(True)`), feed the batches, and give each forward's routing statistics to a
[`TaskRoutingAccumulator`]:

```py
accumulator = TaskRoutingAccumulator()
for batch in batches:
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    accumulator.add(model.base_model.get_routing_stats(), batch["task"], batch["attention_mask"])
results = accumulator.results()  # {module name: TaskRouting}
results["model.layers.12.mlp.down_proj"].load  # (tasks, experts): p(expert | task), rows sum to 1
results["model.layers.12.mlp.down_proj"].specialisation  # 0: every task routes alike ... 1: task fixes the experts
```

What is measured. One *routing decision* is one of the k experts that one token is sent to (top-k routing makes k
decisions per token; a soft router counts its most probable expert, k = 1). Draw a decision at random from all the
decisions of the evaluation set: `T` is the task of its sample and `X` the expert it went to. Their joint distribution
`p(t, x)` is the token-weighted sum of the per-sample loads (`RoutingStats.sample_load[s, x]` is sample s's share of
its decisions that went to expert x; a sample weighs its number of real tokens). From it:

- the task x expert load `p(x | t)`, what each task does with the experts;
- the mutual information `I(T; X)` (nats): how much knowing the task tells about the expert (and back). It is 0 exactly
  when every task spreads its decisions over the experts the same way;
- the specialisation `I(T; X) / min(H(T), log(E / k))`, see [`TaskRouting.specialisation`] for why this normaliser.

`I(T; X)` is estimated from a finite set of samples, so it is slightly above 0 even when the router ignores the task.
Keep the samples (`TaskRoutingAccumulator(keep_samples=True)`) and compare with
[`TaskRoutingAccumulator.chance_specialisation`] (the same number with the task labels shuffled across samples).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch


ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


@dataclass
class TaskRouting:
    """How the tasks of a mixed data set use the experts of one layer (see the module docstring for the definitions).

    Build it with [`task_routing`] from per-sample loads, with [`TaskRoutingAccumulator`] over many forwards, or with
    [`TaskRouting.from_joint`] from the token-weighted task x expert sums.
    """

    tasks: list  # task labels, in row order
    load: np.ndarray  # (num_tasks, num_experts): p(expert | task), rows sum to 1 (NaN rows: a task without tokens)
    task_share: np.ndarray  # (num_tasks,): p(task), each task's share of the routing decisions (of the tokens)
    num_samples: np.ndarray  # (num_tasks,): samples seen per task
    experts_per_token: int  # k: routing decisions per token (1 for soft routers)
    mutual_information: float  # I(T; X) in nats
    task_entropy: float  # H(T) in nats
    expert_entropy: float  # H(X) in nats

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @property
    def expert_load(self) -> np.ndarray:
        """(num_experts,): p(expert) over all tasks, i.e. the layer's expert load on this data (sums to 1)."""
        return np.nansum(self.task_share[:, None] * self.load, axis=0)

    @property
    def max_mutual_information(self) -> float:
        """The largest `I(T; X)` this task mix and router can reach: `min(H(T), log(E / k))`.

        `I(T; X) <= H(T)`, and `I(T; X) = H(X) - H(X | T) <= log E - log k`: a token's k decisions go to k different
        experts, so no task can put more than 1/k of its decisions on one expert and `H(X | T=t) >= log k`.
        """
        return min(self.task_entropy, math.log(self.num_experts / max(self.experts_per_token, 1)))

    @property
    def specialisation(self) -> float:
        """`I(T; X) / min(H(T), log(E / k))` in [0, 1]; NaN with a single task or when every token uses every expert.

        0: every task uses the experts the same way. 1: the routing is as task-specific as the router allows: each
        expert serves a single task (knowing the expert gives the task, `I = H(T)`), or, with more tasks than expert
        sets, each task sends all its tokens to one fixed set of k experts and the experts are evenly used
        (`I = log(E / k)`; with uneven task shares this is not exactly reachable and the maximum is a little below 1).

        Why this normaliser rather than the usual ones:

        - `I / H(T)` (how much of the task the expert reveals) cannot reach 1 under top-k routing with more than E / k
          tasks: 8 tasks on 8 experts with top-2 can share at most log 4 nats, i.e. 0.67 of H(T) = log 8, so a fully
          specialised router would read as "two thirds".
        - `I / min(H(T), H(X))` has the same ceiling problem, and its denominator comes from the observed routing: a
          collapsed router (H(X) near log k) divides a tiny, noisy I by a tiny number and looks specialised.
        - `min(H(T), log(E / k))` is the true ceiling of I for this task mix and router and depends on nothing the
          router learnt, so it is the same in every layer with the same E and k: the per-layer curve compares
          `I(T; X)` itself, and 1 means what it says.
        """
        ceiling = self.max_mutual_information
        return self.mutual_information / ceiling if ceiling > 1e-12 else float("nan")

    @classmethod
    def from_joint(
        cls,
        joint: ArrayLike,
        tasks: Optional[Sequence[Hashable]] = None,
        experts_per_token: int = 1,
        num_samples: Optional[ArrayLike] = None,
    ) -> TaskRouting:
        """From `joint[t, x]`: the token-weighted sum of the loads of the samples of task t on expert x (any scale)."""
        joint = _to_numpy(joint).astype(np.float64)
        if joint.ndim != 2:
            raise ValueError(f"`joint` must have shape (num_tasks, num_experts), got {joint.shape}.")
        if (joint < 0).any() or not np.isfinite(joint).all():
            raise ValueError("`joint` must be finite and non-negative.")
        num_tasks, num_experts = joint.shape
        tasks = list(range(num_tasks)) if tasks is None else list(tasks)
        if len(tasks) != num_tasks:
            raise ValueError(f"{len(tasks)} task names for {num_tasks} rows.")
        total = joint.sum()
        p = joint / total if total > 0 else joint
        task_share = p.sum(1)
        expert_share = p.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            load = p / task_share[:, None]
            ratio = p / (task_share[:, None] * expert_share[None, :])
        positive = p > 0
        mutual_information = float((p[positive] * np.log(ratio[positive])).sum())
        return cls(
            tasks=tasks,
            load=load,
            task_share=task_share,
            num_samples=np.zeros(num_tasks, dtype=np.int64) if num_samples is None else _to_numpy(num_samples),
            experts_per_token=int(experts_per_token),
            mutual_information=max(mutual_information, 0.0),  # rounding can give -1e-17
            task_entropy=_entropy(task_share),
            expert_entropy=_entropy(expert_share),
        )


def task_routing(
    sample_load: ArrayLike,
    task_labels: Sequence[Hashable],
    token_counts: Optional[ArrayLike] = None,
    *,
    experts_per_token: int = 1,
    tasks: Optional[Sequence[Hashable]] = None,
) -> TaskRouting:
    """Task x expert load and specialisation of one layer from its per-sample loads.

    Args:
        sample_load: `(num_samples, num_experts)`, each sample's share of its routing decisions per expert (rows sum
            to 1, or 0 for a sample without tokens): `RoutingStats.sample_load`, stacked over batches.
        task_labels: `(num_samples,)`, the task of each sample (any hashable: names or ids).
        token_counts: `(num_samples,)` real tokens per sample, or the `(num_samples, seq_len)` attention mask: each
            sample weighs its number of routing decisions. None: every sample weighs the same (equal lengths).
        experts_per_token: k of the layer's top-k routing (`RoutingStats.experts_per_token`; 1 for soft routers).
        tasks: the tasks, in the order of the rows; the sorted labels by default. A task without samples gets a NaN row.
    """
    load = _to_numpy(sample_load).astype(np.float64)
    if load.ndim != 2:
        raise ValueError(f"`sample_load` must have shape (num_samples, num_experts), got {load.shape}.")
    labels = _labels(task_labels)
    if len(labels) != load.shape[0]:
        raise ValueError(f"{len(labels)} task labels for {load.shape[0]} samples.")
    weights = np.ones(len(labels)) if token_counts is None else _token_counts(token_counts, len(labels)).numpy()
    tasks = _task_order(labels) if tasks is None else list(tasks)
    index = _task_indices(labels, {task: i for i, task in enumerate(tasks)})
    joint = np.zeros((len(tasks), load.shape[1]))
    np.add.at(joint, index, load * weights[:, None])
    num_samples = np.bincount(index, minlength=len(tasks))
    return TaskRouting.from_joint(joint, tasks, experts_per_token, num_samples)


def shuffled_specialisation(
    sample_load: ArrayLike,
    task_labels: Sequence[Hashable],
    token_counts: Optional[ArrayLike] = None,
    *,
    experts_per_token: int = 1,
    num_permutations: int = 20,
    seed: int = 0,
) -> float:
    """The specialisation that chance alone gives on these samples: the mean over `num_permutations` shufflings of the
    task labels across samples (same task sizes, no relation between task and routing). A measured specialisation is
    only meaningful well above this."""
    load = _to_numpy(sample_load).astype(np.float64)
    labels = _labels(task_labels)
    weights = np.ones(len(labels)) if token_counts is None else _token_counts(token_counts, len(labels)).numpy()
    tasks = _task_order(labels)
    index = _task_indices(labels, {task: i for i, task in enumerate(tasks)})
    return _shuffled(load * weights[:, None], index, len(tasks), experts_per_token, num_permutations, seed)


class TaskRoutingAccumulator:
    """
    Collects per-sample expert loads over many forwards, with each sample's task, and returns per layer the task x
    expert load and the specialisation ([`TaskRouting`]).

    Needs `model.base_model.record_sample_routing(True)` (a `MoeLoraModel` records per-sample loads only on request).
    The sums stay on the model's device; nothing is synchronised with the device until [`results`] unless
    `keep_samples=True`.

    Args:
        tasks (`Sequence`, *optional*): the tasks, in row order. Without it the rows are the sorted labels seen.
        adapter_name (`str`, *optional*): the adapter to follow; all of them by default (layers of adapters other than
            "default" are keyed `"{module name}[{adapter}]"`, as in the trainer's routing metrics).
        keep_samples (`bool`, defaults to `False`): also keep every sample's load (on the CPU) for
            [`chance_specialisation`]. Costs `num_samples x num_layers x num_experts` floats.
    """

    def __init__(
        self,
        tasks: Optional[Sequence[Hashable]] = None,
        adapter_name: Optional[str] = None,
        keep_samples: bool = False,
    ) -> None:
        self._fixed_tasks = tasks is not None
        self._tasks: list = [] if tasks is None else list(tasks)
        self._task_index = {task: i for i, task in enumerate(self._tasks)}
        if len(self._task_index) != len(self._tasks):
            raise ValueError(f"`tasks` has duplicates: {self._tasks}.")
        self.adapter_name = adapter_name
        self.keep_samples = keep_samples
        self._sums: dict[str, torch.Tensor] = {}  # layer -> (num_tasks, num_experts) float64, token-weighted loads
        self._experts_per_token: dict[str, int] = {}
        self._num_samples: list[int] = [0] * len(self._tasks)
        self._samples: dict[str, list[np.ndarray]] = {}  # layer -> [(batch, num_experts) weighted loads]
        self._sample_tasks: list[np.ndarray] = []

    @property
    def tasks(self) -> list:
        return list(self._tasks)

    @property
    def num_samples(self) -> int:
        return sum(self._num_samples)

    def add(
        self,
        stats: Mapping[str, Mapping[str, object]],
        task_labels: Union[Sequence[Hashable], torch.Tensor, np.ndarray],
        token_counts: ArrayLike,
    ) -> None:
        """Add one forward.

        Args:
            stats: `model.base_model.get_routing_stats()` right after the forward.
            task_labels: `(batch,)`, the task of each sample of the batch.
            token_counts: `(batch,)` real tokens per sample, or the batch's `(batch, seq_len)` attention mask.
        """
        labels = _labels(task_labels)
        counts = _token_counts(token_counts, len(labels))
        # Check everything before changing anything: a failed `add` leaves the accumulator as it was.
        records = []
        for name, by_adapter in stats.items():
            for adapter, record in by_adapter.items():
                if self.adapter_name is not None and adapter != self.adapter_name:
                    continue
                key = name if adapter == "default" else f"{name}[{adapter}]"
                if record.sample_load is None:
                    raise ValueError(
                        f"No per-sample routing recorded for {key!r}: call `model.base_model.record_sample_routing(True)` "
                        "before the forward (and give inputs of shape (batch, sequence))."
                    )
                if record.sample_load.shape[0] != len(labels):
                    raise ValueError(
                        f"{key!r} routed {record.sample_load.shape[0]} samples but {len(labels)} task labels were given."
                    )
                records.append((key, record))
        if not records:
            raise ValueError(
                "The routing statistics contain no MOELORA layer"
                + (f" of the adapter {self.adapter_name!r}." if self.adapter_name else ".")
            )
        if self._fixed_tasks:
            unknown = [label for label in dict.fromkeys(labels) if label not in self._task_index]
            if unknown:
                raise ValueError(f"Tasks {unknown} are not among `tasks` {self._tasks}.")
        for label in labels:
            if label not in self._task_index:
                self._task_index[label] = len(self._tasks)
                self._tasks.append(label)
                self._num_samples.append(0)
        index = torch.as_tensor(_task_indices(labels, self._task_index), dtype=torch.long)
        for position in index.tolist():
            self._num_samples[position] += 1
        if self.keep_samples:
            self._sample_tasks.append(index.numpy())
        for key, record in records:
            sample_load = record.sample_load.detach()
            dtype = torch.float32 if sample_load.device.type == "mps" else torch.float64  # MPS has no float64
            weighted = sample_load.to(dtype) * counts.to(dtype).to(sample_load.device)[:, None]
            self._accumulate(key, weighted, index.to(sample_load.device))
            self._experts_per_token[key] = record.experts_per_token
            if self.keep_samples:
                self._samples.setdefault(key, []).append(weighted.float().cpu().numpy())

    def _accumulate(self, key: str, weighted: torch.Tensor, index: torch.Tensor) -> None:
        sums = self._sums.get(key)
        if sums is None:
            sums = weighted.new_zeros(len(self._tasks), weighted.shape[1])  # float64 (float32 on MPS)
        elif sums.shape[0] < len(self._tasks):  # new tasks appeared
            sums = torch.cat([sums, sums.new_zeros(len(self._tasks) - sums.shape[0], sums.shape[1])])
        self._sums[key] = sums.index_add_(0, index, weighted)

    def results(self) -> dict[str, TaskRouting]:
        """`{layer: TaskRouting}` in model order; rows in the order of `tasks` (the sorted labels by default)."""
        order = self._row_order()
        tasks = [self._tasks[i] for i in order]
        num_samples = np.asarray(self._num_samples, dtype=np.int64)[order]
        results = {}
        for key, sums in self._sums.items():
            joint = np.zeros((len(self._tasks), sums.shape[1]))
            joint[: sums.shape[0]] = sums.cpu().numpy()
            results[key] = TaskRouting.from_joint(joint[order], tasks, self._experts_per_token[key], num_samples)
        return results

    def chance_specialisation(self, num_permutations: int = 20, seed: int = 0) -> dict[str, float]:
        """`{layer: specialisation with the task labels shuffled across the samples}`, the level chance alone gives
        (see [`shuffled_specialisation`]). Needs `keep_samples=True`."""
        if not self.keep_samples:
            raise ValueError(
                "`chance_specialisation` needs the samples: create the accumulator with keep_samples=True."
            )
        if not self._sample_tasks:
            return {}
        index = np.concatenate(self._sample_tasks)
        return {
            key: _shuffled(
                np.concatenate(parts).astype(np.float64),
                index,
                len(self._tasks),
                self._experts_per_token[key],
                num_permutations,
                seed,
            )
            for key, parts in self._samples.items()
        }

    def reset(self) -> None:
        """Forget everything added (the fixed `tasks` stay)."""
        self.__init__(self._tasks if self._fixed_tasks else None, self.adapter_name, self.keep_samples)

    def _row_order(self) -> list[int]:
        if self._fixed_tasks:
            return list(range(len(self._tasks)))
        try:
            return sorted(range(len(self._tasks)), key=lambda i: self._tasks[i])
        except TypeError:  # labels of mixed types: order of appearance
            return list(range(len(self._tasks)))


def _shuffled(
    weighted: np.ndarray, index: np.ndarray, num_tasks: int, experts_per_token: int, num_permutations: int, seed: int
) -> float:
    if num_permutations < 1:
        raise ValueError(f"`num_permutations` must be >= 1, got {num_permutations}.")
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(num_permutations):
        joint = np.zeros((num_tasks, weighted.shape[1]))
        np.add.at(joint, generator.permutation(index), weighted)
        values.append(TaskRouting.from_joint(joint, experts_per_token=experts_per_token).specialisation)
    return float(np.mean(values))


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _labels(task_labels) -> list:
    if isinstance(task_labels, (torch.Tensor, np.ndarray)):
        return task_labels.tolist()
    return list(task_labels)


def _task_order(labels: list) -> list:
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:
        return unique


def _task_indices(labels: list, task_index: dict) -> np.ndarray:
    missing = [label for label in dict.fromkeys(labels) if label not in task_index]
    if missing:
        raise ValueError(f"Task labels {missing} are not among the tasks {list(task_index)}.")
    return np.asarray([task_index[label] for label in labels], dtype=np.int64)


def _token_counts(token_counts: ArrayLike, num_samples: int) -> torch.Tensor:
    """(num_samples,) float64 on the CPU, from counts or from a (num_samples, seq_len) attention mask."""
    counts = torch.as_tensor(_to_numpy(token_counts) if not isinstance(token_counts, torch.Tensor) else token_counts)
    counts = counts.detach().cpu().double()
    if counts.dim() == 2:
        counts = counts.sum(-1)
    if counts.shape != (num_samples,):
        raise ValueError(
            f"`token_counts` must be (batch,) token counts or a (batch, seq_len) attention mask for {num_samples} "
            f"samples, got shape {tuple(counts.shape)}."
        )
    if (counts < 0).any():
        raise ValueError("`token_counts` must be non-negative.")
    return counts
