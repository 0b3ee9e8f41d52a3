"""Multiple-choice evaluation by log-likelihood (no generation), with confidence intervals.

Each option is scored by the log-probability the model gives to it as a continuation of the prompt; the prediction is
the best-scoring option. `acc` compares summed log-probabilities, `acc_token` the mean per token and `acc_char` the sum
divided by the option's length in characters (the OLMES "RC" convention, the default: it does not favour short
options). Accuracy comes with a 95% Wilson score interval, and the difference between two models on the same
questions with a 95% paired bootstrap interval. `collect_task_routing` routes evaluation texts by task through a
MOELORA model (which experts each task uses, per layer).

Used by `moe-peft eval`, `moe-peft train` and `benchmarks/science.py`; needs numpy and torch, nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .specialisation import TaskRoutingAccumulator


METRICS = ("acc_char", "acc_token", "acc")


@dataclass
class MCItem:
    """One multiple-choice question in cloze form: score `prompt + choices[i]`; `choices[label]` is correct."""

    id: str
    prompt: str
    choices: list[str]
    label: int

    @property
    def answered(self) -> str:
        """The question with its correct answer, as one text (e.g. to look at the routing of the task)."""
        return self.prompt + self.choices[self.label]

    def to_sft(self) -> dict:
        """The question as a prompt-completion training row (the correct choice is the completion)."""
        return {"prompt": self.prompt, "completion": self.choices[self.label]}


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved near 0 and 1 and for small n)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, samples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `b - a` and its 95% percentile bootstrap interval, resampling questions (paired)."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


@dataclass
class Scores:
    """Per-option log-likelihoods of a list of questions."""

    logprob: list[np.ndarray]  # per question: summed log-probability of each option
    num_tokens: list[np.ndarray]
    num_chars: list[np.ndarray]
    labels: np.ndarray

    def predictions(self, metric: str = "acc_char") -> np.ndarray:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        normaliser = {"acc": None, "acc_token": self.num_tokens, "acc_char": self.num_chars}[metric]
        preds = []
        for i, logprob in enumerate(self.logprob):
            score = logprob if normaliser is None else logprob / np.maximum(normaliser[i], 1)
            preds.append(int(np.argmax(score)))
        return np.array(preds)

    def correct(self, metric: str = "acc_char") -> np.ndarray:
        return (self.predictions(metric) == self.labels).astype(int)


@dataclass
class Accuracy:
    name: str
    metric: str
    correct: np.ndarray
    all_metrics: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def value(self) -> float:
        return float(self.correct.mean()) if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(int(self.correct.sum()), self.n)

    def to_dict(self) -> dict:
        low, high = self.interval
        return {
            "name": self.name,
            "metric": self.metric,
            "accuracy": self.value,
            "ci95": [low, high],
            "n": self.n,
            "all_metrics": self.all_metrics,
        }


def accuracy(name: str, scores: Scores, metric: str = "acc_char") -> Accuracy:
    all_metrics = {m: float(scores.correct(m).mean()) for m in METRICS}
    return Accuracy(name, metric, scores.correct(metric), all_metrics)


def _encode(tokenizer, items: Sequence[MCItem]) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, [option ids]) of every question."""
    encoded = []
    for item in items:
        context = tokenizer(item.prompt)["input_ids"]
        options = []
        for o, choice in enumerate(item.choices):
            continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not continuation:
                raise ValueError(f"Option {o} of question {item.id!r} is empty after tokenisation.")
            options.append(continuation)
        encoded.append((context, options))
    return encoded


def score_items(
    model,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    max_length: int = 1024,
    progress: bool = True,
    description: str = "scoring",
    after_forward: Optional[Callable[[object], None]] = None,
) -> Scores:
    """Log-likelihood of every option of every question under `model` (a transformers or peft causal LM).

    Where the prompt is most of a question's text, the prompt runs once and the options continue from its KV cache:
    the log-likelihoods of scoring every option as one sequence, up to rounding, for a fraction of the compute. A
    MOELORA model scores under `inference_only()`: no router losses or statistics, which nothing here reads.

    `after_forward(attention_mask)` is called after each forward, e.g. to collect the routing of a MOELORA model
    (`model.base_model.get_routing_stats()`) on the scored text at no extra cost. It needs the routing of whole
    texts, so with it every option runs as one sequence (prompt + option), as do questions longer than `max_length`
    (left-truncated to it).
    """
    import torch

    from .model import MoeLoraModel

    encoded = _encode(tokenizer, items)
    logprob = [np.zeros(len(item.choices)) for item in items]
    num_tokens = [np.array([len(option) for option in options], dtype=float) for _, options in encoded]
    num_chars = [np.array([len(c) for c in item.choices], dtype=float) for item in items]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=description, unit="q", leave=False)
    shared, whole = [], []
    for q, (context, options) in enumerate(encoded):
        fits = context and len(context) + max(len(option) for option in options) <= max_length
        # Sharing pays where the prompt tokens it saves outnumber the option tokens (measured on SmolLM2: 1.3-2.2x
        # faster on ARC, BoolQ, SIQA, WinoGrande, HellaSwag; slower on PIQA's short prompts and long options).
        saves = (len(options) - 1) * len(context) >= sum(len(option) for option in options)
        (shared if fits and saves and after_forward is None else whole).append(q)
    tuner = getattr(model, "base_model", None)
    logits_only = isinstance(tuner, MoeLoraModel) and after_forward is None
    with torch.inference_mode(), tuner.inference_only() if logits_only else contextlib.nullcontext():
        whole += _score_with_shared_prompts(model, tokenizer, encoded, shared, batch_size, logprob, bar)
        _score_whole_sequences(
            model, tokenizer, encoded, whole, batch_size, max_length, logprob, num_tokens, bar, after_forward
        )
    if bar is not None:
        bar.close()
    labels = np.array([item.label for item in items])
    return Scores(logprob, num_tokens, num_chars, labels)


def _log_softmax(logits):
    """Log-probabilities in at least float32 (half-precision logits would round them)."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def kv_cache_argument(model) -> str:
    """The keyword that passes a KV cache to `model`'s forward: transformers < 5.24 names it `past_key_values`, later
    versions `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _score_with_shared_prompts(model, tokenizer, encoded, questions, batch_size, logprob, bar) -> list[int]:
    """A batch of prompts (left-padded) with a KV cache, then every option of each from its prompt's cache. Returns
    the questions left to score as whole sequences: all of them if the model returns no KV cache."""
    import torch

    if not questions:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache_name = kv_cache_argument(model)
    order = sorted(questions, key=lambda q: -len(encoded[q][0]))  # similar prompt lengths share a batch
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        width = max(len(encoded[q][0]) for q in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, q in enumerate(batch):
            context = encoded[q][0]
            input_ids[row, width - len(context) :] = torch.tensor(context)
            attention_mask[row, width - len(context) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        outputs = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1)  # fmt: skip
        cache = getattr(outputs, cache_name, None)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            return order[begin:]
        first = _log_softmax(outputs.logits[:, -1])  # the prompt's last position predicts option token 0

        rows = [row for row, q in enumerate(batch) for _ in encoded[q][1]]
        options = [option for q in batch for option in encoded[q][1]]
        cache.batch_select_indices(torch.tensor(rows, device=device))
        option_width = max(len(option) for option in options)
        option_ids = torch.full((len(options), option_width), pad, dtype=torch.long)
        option_mask = torch.zeros((len(options), option_width), dtype=torch.long)
        for n, option in enumerate(options):
            option_ids[n, : len(option)] = torch.tensor(option)
            option_mask[n, : len(option)] = 1
        lengths = attention_mask.sum(-1)[rows]
        position_ids = lengths.unsqueeze(-1) + torch.arange(option_width)
        logits = model(input_ids=option_ids.to(device), attention_mask=torch.cat([attention_mask[rows], option_mask],
                       dim=-1).to(device), position_ids=position_ids.to(device), use_cache=True,
                       **{cache_name: cache}).logits  # fmt: skip
        n = 0
        for row, q in enumerate(batch):
            for o, option in enumerate(encoded[q][1]):
                total = first[row, option[0]].item()
                if len(option) > 1:
                    scores = _log_softmax(logits[n, : len(option) - 1])
                    total += scores.gather(-1, torch.tensor(option[1:], device=device)[:, None]).sum().item()
                logprob[q][o] = total
                n += 1
            if bar is not None:
                bar.update(1)
    return []


def _score_whole_sequences(
    model, tokenizer, encoded, questions, batch_size, max_length, logprob, num_tokens, bar, after_forward
) -> None:
    """Every option as one sequence, prompt + option, left-truncated to `max_length` (the scored tokens too, if the
    option alone is longer; without a prompt token, the option's first token has no prediction and is not scored)."""
    import torch

    if not questions:
        return
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    requests = []  # (question, option, token ids, option start)
    for q in questions:
        context, options = encoded[q]
        for o, option in enumerate(options):
            ids = (context + option)[-max_length:]
            requests.append((q, o, ids, max(1, len(ids) - len(option))))
    requests.sort(key=lambda request: -len(request[2]))  # similar lengths share a batch
    done_options = dict.fromkeys(questions, 0)
    for begin in range(0, len(requests), batch_size):
        batch = requests[begin : begin + batch_size]
        length = max(len(r[2]) for r in batch)
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (_, _, ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).logits
        if after_forward is not None:
            after_forward(attention_mask)
        for row, (q, o, ids, start) in enumerate(batch):
            # Token t is predicted by the logits at position t - 1.
            scores = _log_softmax(logits[row, start - 1 : len(ids) - 1])
            targets = torch.tensor(ids[start:], device=scores.device)
            logprob[q][o] = scores.gather(-1, targets[:, None]).sum().item()
            num_tokens[q][o] = len(targets)
            done_options[q] += 1
            if bar is not None and done_options[q] == len(encoded[q][1]):
                bar.update(1)


def collect_task_routing(
    model, tokenizer, texts: Mapping[str, Sequence[str]], batch_size: int = 8, max_length: int = 256
) -> TaskRoutingAccumulator:
    """Route the texts of each task through a MOELORA `model` and return which experts each task uses, per layer
    (a [`TaskRoutingAccumulator`] with its samples kept, for `chance_specialisation`).

    The model runs in eval mode without gradients and without router losses (`without_router_losses()`); its training
    mode and per-sample recording are restored afterwards.
    """
    import torch

    from .model import MoeLoraModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, MoeLoraModel):
        raise TypeError(f"collect_task_routing needs a PeftModel with a MOELORA adapter, got {type(model).__name__}.")
    if not texts or any(not task_texts for task_texts in texts.values()):
        raise ValueError("`texts` needs at least one text for each of at least one task.")
    device = next(model.parameters()).device
    accumulator = TaskRoutingAccumulator(tasks=list(texts), keep_samples=True)
    was_training, was_recording = model.training, tuner._routing_state.record_sample_routing
    model.eval()
    tuner.record_sample_routing(True)
    try:
        with torch.inference_mode(), tuner.without_router_losses():
            for task, task_texts in texts.items():
                for begin in range(0, len(task_texts), batch_size):
                    batch = tokenizer(list(task_texts[begin : begin + batch_size]), return_tensors="pt", padding=True,
                                      truncation=True, max_length=max_length).to(device)  # fmt: skip
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    accumulator.add(
                        tuner.get_routing_stats(), [task] * len(batch["input_ids"]), batch["attention_mask"]
                    )
    finally:
        tuner.record_sample_routing(was_recording)
        model.train(was_training)
    return accumulator


def macro_bootstrap(
    correct_a: Mapping[str, np.ndarray],
    correct_b: Optional[Mapping[str, np.ndarray]] = None,
    samples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The macro average over tasks (each task weighs the same) of `correct_a`, or of the paired difference
    `correct_b - correct_a`, and its 95% percentile bootstrap interval, resampling the questions within each task."""
    rng = np.random.default_rng(seed)
    means, totals = [], np.zeros(samples)
    for task, a in correct_a.items():
        values = np.asarray(a, dtype=float)
        if correct_b is not None:
            values = np.asarray(correct_b[task], dtype=float) - values
        means.append(values.mean())
        totals += values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(totals / len(means), [2.5, 97.5])
    return float(np.mean(means)), float(low), float(high)


def format_task_table(
    base: Mapping[str, Accuracy],
    tuned: Optional[Mapping[str, Accuracy]],
    title: str,
    chance: Optional[Mapping[str, float]] = None,
    label: str = "base",
) -> str:
    """Per-task accuracy of the base and the fine-tuned model (95% Wilson intervals), their paired difference (95%
    paired bootstrap interval) and the macro average (bootstrap within tasks), as a plain-text table. Without `tuned`,
    one model's accuracies, its column headed `label`."""
    width = max([len(task) for task in base] + [13])
    header = f"{'task':<{width}}  {'n':>4}  {label + ' [95% CI]':^21}"
    if tuned is not None:
        header += f"  {'fine-tuned [95% CI]':^21}  {'diff [paired 95% CI]':^21}"
    if chance is not None:
        header += f"  {'chance':>6}"
    lines = [title, header]

    def cells(result: Accuracy) -> str:
        low, high = result.interval
        return f"{100 * result.value:5.1f}% [{100 * low:5.1f}, {100 * high:5.1f}]"

    for task, result in base.items():
        line = f"{task:<{width}}  {result.n:>4}  {cells(result)}"
        if tuned is not None:
            mean, low, high = paired_bootstrap(result.correct, tuned[task].correct)
            line += f"  {cells(tuned[task])}  {100 * mean:+6.1f} [{100 * low:+5.1f}, {100 * high:+5.1f}]"
        if chance is not None:
            line += f"  {100 * chance[task]:5.1f}%"
        lines.append(line)
    if len(base) > 1:
        correct_base = {task: r.correct for task, r in base.items()}
        mean, low, high = macro_bootstrap(correct_base)
        n = sum(r.n for r in base.values())
        line = f"{'macro average':<{width}}  {n:>4}  {100 * mean:5.1f}% [{100 * low:5.1f}, {100 * high:5.1f}]"
        if tuned is not None:
            correct_tuned = {task: r.correct for task, r in tuned.items()}
            tuned_mean, tuned_low, tuned_high = macro_bootstrap(correct_tuned)
            diff, diff_low, diff_high = macro_bootstrap(correct_base, correct_tuned)
            line += (
                f"  {100 * tuned_mean:5.1f}% [{100 * tuned_low:5.1f}, {100 * tuned_high:5.1f}]  "
                f"{100 * diff:+6.1f} [{100 * diff_low:+5.1f}, {100 * diff_high:+5.1f}]"
            )
        if chance is not None:
            line += f"  {100 * float(np.mean(list(chance.values()))):5.1f}%"
        lines.append(line)
    lines.append(
        "Intervals: 95% Wilson per accuracy; differences (fine-tuned - base) by paired bootstrap over the questions; "
        "the macro average (every task weighs the same) by bootstrap within each task."
        if tuned is not None
        else "Intervals: 95% Wilson; the macro average (every task weighs the same) by bootstrap within each task."
    )
    return "\n".join(lines)


def chance_level(items: Sequence[MCItem]) -> float:
    return float(np.mean([1.0 / len(item.choices) for item in items]))


def format_table(
    results: Sequence[Accuracy], title: str, chance: Optional[float] = None, baseline: Optional[Accuracy] = None
) -> str:
    """A short plain-text table: accuracy and 95% CI per model, the paired difference against `baseline`."""
    width = max([len(r.name) for r in results] + [10])
    lines = [title, f"{'model':<{width}}  {'accuracy':>8}  95% CI (Wilson)      n"]
    for result in results:
        low, high = result.interval
        lines.append(
            f"{result.name:<{width}}  {100 * result.value:7.1f}%  [{100 * low:5.1f}, {100 * high:5.1f}]   {result.n}"
        )
    if baseline is not None:
        for result in results:
            if result is baseline:
                continue
            mean, low, high = paired_bootstrap(baseline.correct, result.correct)
            lines.append(
                f"{'difference':<{width}}  {100 * mean:+7.1f}   [{100 * low:+5.1f}, {100 * high:+5.1f}] points "
                f"({result.name} - {baseline.name}, paired bootstrap)"
            )
    if chance is not None:
        lines.append(f"{'chance':<{width}}  {100 * chance:7.1f}%")
    return "\n".join(lines)
