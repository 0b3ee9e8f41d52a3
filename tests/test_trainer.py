"""MoeLoraSFTTrainer (and MoeLoraTrainerMixin on the plain Trainer) on a tiny Llama (CPU): router losses in the loss
and the gradient, logging, callbacks, errors."""

from __future__ import annotations

import copy
import json
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from trl import SFTConfig, SFTTrainer

from moe_peft_plugin import MoeLoraConfig, TaskRoutingAccumulator
from trainer_callbacks import (
    HEATMAP_FILENAME,
    MoeLoraSFTConfig,
    MoeLoraSFTTrainer,
    MoeLoraTrainerMixin,
    RouterLoadHeatmapCallback,
    RoutingCollapseCallback,
    TaskSpecialisationCallback,
)

from .helpers import CORPUS, build_tiny_llama


MOE = {"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
# Non-zero experts (so the routers get an LM gradient too) and every router loss of a top-k router.
MOE_ALL_LOSSES = {
    **MOE,
    "init_weights": False,
    "aux_loss_coef": 0.05,
    "router_z_loss_coef": 0.01,
    "contrastive_loss_coef": 0.05,
}
ARGS = {
    "report_to": [],
    "disable_tqdm": True,
    "bf16": False,  # CPU: no autocast
    "save_strategy": "no",
    "logging_steps": 1,
    "max_grad_norm": 0.0,  # no clipping, so the captured gradients are the raw ones
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 2,
    "router_load_heatmap": False,
    "router_collapse_patience": 0,
    "seed": 0,
}


def _dataset(n: int = 12) -> Dataset:
    return Dataset.from_dict({"text": CORPUS[:n]})


def _peft_model(moe: dict, seed: int = 0):
    base, tokenizer = build_tiny_llama(seed=0)
    torch.manual_seed(seed)
    return get_peft_model(base, MoeLoraConfig(**moe)), tokenizer


def _trainer(tmp_path, model=None, moe=None, train_dataset=None, callbacks=None, **kwargs) -> MoeLoraSFTTrainer:
    """A trainer on an already wrapped model (`model`), or on a base model with a `MoeLoraConfig` (`moe`)."""
    peft_config = None
    if model is None:
        model, tokenizer = build_tiny_llama(seed=0)
        peft_config = MoeLoraConfig(**(moe or MOE))
    else:
        _, tokenizer = build_tiny_llama(seed=0)
    args = MoeLoraSFTConfig(output_dir=str(tmp_path), **{**ARGS, **kwargs})
    return MoeLoraSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset if train_dataset is not None else _dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


class _GradientCapture(TrainerCallback):
    """Gradients of every optimizer step, as they reach the optimizer."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class _LogCapture(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class _RecordingCollator:
    """Wraps the trainer's collator and keeps every batch it builds, in order."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def _record_batches(trainer) -> _RecordingCollator:
    trainer.data_collator = recorder = _RecordingCollator(trainer.data_collator)
    return recorder


def _reference_grads(model, batches, accumulation_steps: int) -> dict[str, torch.Tensor]:
    """A plain loop: full logits, token-summed cross entropy over the step's tokens, plus aux_loss per micro-batch."""
    model.train()
    num_items = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    for batch in batches:
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits, labels = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
        lm_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        (lm_loss / num_items + outputs.aux_loss / accumulation_steps).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max((got[k] - expected[k]).abs().max().item() for k in expected)


def _without_router_losses(model):
    model = copy.deepcopy(model)
    model.base_model.set_router_loss_coefficients(
        aux_loss_coef=0.0, router_z_loss_coef=0.0, contrastive_loss_coef=0.0, gate_balance_loss_coef=0.0
    )
    return model


CHECKPOINTING_MODES = {
    "none": {"gradient_checkpointing": False},
    "non-reentrant": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    # What TRL forces for PEFT + DeepSpeed ZeRO-3 + checkpointing.
    "reentrant": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    "selective": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"selective": True}},
}


@pytest.mark.parametrize(
    "mode",
    [
        "none",
        "non-reentrant",
        "reentrant",
        pytest.param(
            "selective",
            marks=pytest.mark.xfail(
                strict=True,
                raises=ValueError,
                reason="TRL 1.16 selective checkpointing fails for every PEFT model (plain LoRA too): the 'selective' "
                "key reaches torch.utils.checkpoint ('Unexpected keyword arguments: selective')",
            ),
        ),
    ],
)
def test_router_gradients_match_a_reference_in_every_checkpointing_mode(mode, tmp_path):
    model, _ = _peft_model(MOE_ALL_LOSSES)
    pristine = copy.deepcopy(model)
    capture = _GradientCapture()
    trainer = _trainer(
        tmp_path, model=model, callbacks=[capture], max_steps=1, gradient_accumulation_steps=2,
        **CHECKPOINTING_MODES[mode],
    )  # fmt: skip
    recorder = _record_batches(trainer)
    trainer.train()

    layer = trainer.model.get_base_model().model.layers[0]
    checkpoint_kwargs = getattr(layer, "_gradient_checkpointing_func", None)
    if mode == "none":
        assert not layer.gradient_checkpointing
    else:
        assert layer.gradient_checkpointing
        assert checkpoint_kwargs.keywords["use_reentrant"] == (mode == "reentrant")
        assert ("context_fn" in checkpoint_kwargs.keywords) == (mode == "selective")

    expected = _reference_grads(copy.deepcopy(pristine), recorder.batches[:2], accumulation_steps=2)
    without = _reference_grads(_without_router_losses(pristine), recorder.batches[:2], accumulation_steps=2)
    got = capture.grads[0]
    router_keys = [k for k in expected if "moelora_router" in k]
    assert len(router_keys) == 28 and all(got[k].abs().sum() > 0 for k in router_keys)
    # The router losses are a real part of the router gradient (not drowned by the tolerance below).
    assert _max_diff({k: expected[k] for k in router_keys}, {k: without[k] for k in router_keys}) > 1e-3
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{mode}: {key}")


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    # Equal-length sequences (truncated, no padding) and a token-mean router loss (z-loss): GA=2 x batch 2 is then
    # mathematically the same step as GA=1 x batch 4.
    moe = {**MOE, "init_weights": False, "aux_loss_coef": 0.0, "router_z_loss_coef": 0.1}
    runs = {}
    for name, (batch_size, accumulation) in {"ga2": (2, 2), "ga1": (4, 1)}.items():
        model, _ = _peft_model(moe)
        capture = _GradientCapture()
        trainer = _trainer(
            tmp_path / name, model=model, callbacks=[capture], max_steps=1, max_length=8,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        recorder = _record_batches(trainer)
        trainer.train()
        rows = torch.cat([b["input_ids"] for b in recorder.batches[:accumulation]])
        runs[name] = (capture.grads[0], sorted(rows.tolist()))
    assert runs["ga2"][1] == runs["ga1"][1] and len(runs["ga1"][1]) == 4 and len(runs["ga1"][1][0]) == 8
    grads_ga2, grads_ga1 = runs["ga2"][0], runs["ga1"][0]
    assert any("moelora_router" in k and grads_ga1[k].abs().sum() > 0 for k in grads_ga1)
    for key in grads_ga1:
        torch.testing.assert_close(grads_ga2[key], grads_ga1[key], rtol=1e-5, atol=1e-7, msg=key)


def test_eval_loss_includes_router_losses_and_they_are_logged_as_eval_metrics(tmp_path):
    results = {}
    for name, overrides in {
        "on": {},
        "off": {"moelora_aux_loss_coef": 0.0, "moelora_contrastive_loss_coef": 0.0},
    }.items():
        model, tokenizer = _peft_model({**MOE, "init_weights": False, "contrastive_loss_coef": 0.1})
        trainer = _trainer(tmp_path / name, model=model, **overrides)
        results[name] = trainer.evaluate(eval_dataset=_dataset(6))
        if name == "on":
            # With the logits requested, TRL runs one more (no-grad) forward per batch: it must not count.
            trainer.args.prediction_loss_only = False
            with_logits = trainer.evaluate(eval_dataset=_dataset(6))
            for key in ("eval_loss", "eval_router/aux_loss", "eval_router/load_balancing"):
                assert with_logits[key] == pytest.approx(results[name][key], rel=1e-6), key
    on, off = results["on"], results["off"]
    for key in ("aux_loss", "load_balancing", "contrastive", "entropy", "dead_experts", "max_load_imbalance"):
        assert f"eval_router/{key}" in on, key
    assert on["eval_router/aux_loss"] > 0.01 and off["eval_router/aux_loss"] == 0.0
    assert "eval_router/load_balancing" not in off  # a loss with coefficient 0 is not computed
    # Same adapter, same data: the eval losses differ by exactly the router losses.
    assert on["eval_loss"] - off["eval_loss"] == pytest.approx(on["eval_router/aux_loss"], abs=2e-6)


def test_metrics_forward_is_not_counted_twice(tmp_path):
    """TRL's label-smoothing path runs a second (no-grad) forward for its metrics; only the loss forward counts."""
    model, _ = _peft_model({**MOE, "init_weights": False})
    trainer = _trainer(tmp_path, model=model, label_smoothing_factor=0.1)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    aux_values = []
    hook = trainer.model.get_base_model().register_forward_hook(
        lambda module, args, output: aux_values.append(output["aux_loss"].detach())
    )
    with_losses = trainer.compute_loss(trainer.model, dict(batch))
    trainer.router_loss_coefficients.set_scale(0.0)
    without = trainer.compute_loss(trainer.model, dict(batch))
    hook.remove()
    assert len(aux_values) == 4  # two forwards per call: loss (with logits) + metrics (fused head, no grad)
    # Counted once (twice would add another ~0.01); float32 losses of ~4 subtract to within ~1e-6.
    assert aux_values[0].item() > 1e-3
    assert with_losses.item() - without.item() == pytest.approx(aux_values[0].item(), abs=2e-6)
    window = trainer.router_stats.flush("train")
    assert window.num_forwards == 2  # one per compute_loss call


def test_routing_metrics_are_logged(tmp_path):
    logs = _LogCapture()
    aux_values = []
    model, _ = _peft_model({**MOE, "init_weights": False, "contrastive_loss_coef": 0.05})
    model.get_base_model().register_forward_hook(
        lambda module, args, output: aux_values.append(output["aux_loss"].item()) if torch.is_grad_enabled() else None
    )
    trainer = _trainer(
        tmp_path, model=model, callbacks=[logs], max_steps=4, logging_steps=2, router_stats_logging="full"
    )
    trainer.train()
    train_logs = [log for log in logs.logs if "loss" in log]
    assert len(train_logs) == 2
    for index, log in enumerate(train_logs):
        assert log["router/aux_loss"] == pytest.approx(np.mean(aux_values[2 * index : 2 * index + 2]), rel=1e-5)
        assert {"router/load_balancing", "router/contrastive", "router/entropy"} <= log.keys()
        loads = {}
        for key, value in log.items():
            if key.startswith("router/load/"):
                layer, expert = key[len("router/load/") :].rsplit("/", 1)
                loads.setdefault(layer, {})[int(expert)] = value
        assert len(loads) == 28 and all(sorted(v) == [0, 1, 2, 3] for v in loads.values())
        matrix = np.array([[v[e] for e in range(4)] for v in loads.values()])
        np.testing.assert_allclose(matrix.sum(1), 1.0, rtol=1e-5)
        assert log["router/max_load_imbalance"] == pytest.approx(matrix.max() * 4, rel=1e-5)
        # top-2 of 4: the share of a layer's tokens an expert gets is twice its share of the routing decisions.
        assert log["router/dead_experts"] == int((matrix * 2 < 0.01).sum())
        assert log["router/entropy"] == pytest.approx(np.mean([log[f"router/entropy/{k}"] for k in loads]), rel=1e-5)

    # The default ("summary") keeps the number of logged keys small; "none" logs nothing about routing.
    for setting, expected in {"summary": 6, "none": 0}.items():
        logs = _LogCapture()
        trainer = _trainer(tmp_path / setting, moe={**MOE, "contrastive_loss_coef": 0.05}, callbacks=[logs], max_steps=1,
                           router_stats_logging=setting)  # fmt: skip
        trainer.train()
        assert sum(key.startswith("router/") for key in logs.logs[0]) == expected, logs.logs[0]


def test_heatmap_is_written_at_each_save_and_at_the_end(tmp_path):
    # MoLA (2 then 4 experts): the heatmap shows the missing experts of the first layers as blanks.
    moe = {**MOE, "num_experts": [2, 4], "top_k": [1, 2]}
    trainer = _trainer(tmp_path, moe=moe, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2,
                       router_load_heatmap=True)  # fmt: skip
    trainer.train()
    paths = [tmp_path / "checkpoint-2" / HEATMAP_FILENAME, tmp_path / "checkpoint-4" / HEATMAP_FILENAME]
    paths.append(tmp_path / HEATMAP_FILENAME)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            assert image.width > 200 and image.height > 200 and pixels.std() > 10  # a picture, not a blank
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RouterLoadHeatmapCallback))
    assert callback.written == [str(p) for p in paths]
    heatmap = trainer.router_stats.take_heatmap()  # nothing new since the last one: the same data again
    assert heatmap.loads.shape == (28, 4)
    first_layer = [i for i, name in enumerate(heatmap.layer_names) if ".layers.0." in name]
    assert np.isnan(heatmap.loads[first_layer, 2:]).all() and not np.isnan(heatmap.loads[first_layer, :2]).any()


def _hide_matplotlib(monkeypatch):
    """Make `import matplotlib` (and its submodules) fail, as in `pip install moe-peft-plugin trl`."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_default_heatmap_without_matplotlib_warns_once_and_trains(tmp_path, monkeypatch, caplog):
    _hide_matplotlib(monkeypatch)
    args = {**{k: v for k, v in ARGS.items() if k != "router_load_heatmap"}, "save_strategy": "steps", "save_steps": 1}
    model, tokenizer = build_tiny_llama(seed=0)
    with caplog.at_level(logging.WARNING, logger="trainer_callbacks"):
        trainer = MoeLoraSFTTrainer(
            model=model,
            args=MoeLoraSFTConfig(output_dir=str(tmp_path), max_steps=2, **args),  # default heatmap setting
            train_dataset=_dataset(),
            processing_class=tokenizer,
            peft_config=MoeLoraConfig(**MOE),
        )
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(warnings) == 1 and "pip install matplotlib" in warnings[0], warnings
    assert not any(isinstance(c, RouterLoadHeatmapCallback) for c in trainer.callback_handler.callbacks)
    assert not list(tmp_path.rglob(HEATMAP_FILENAME))
    assert trainer.state.log_history[0]["router/aux_loss"] > 0  # the routing statistics are still logged

    # Asked for explicitly, the heatmap needs matplotlib: a clear error at construction, not a silent skip.
    with pytest.raises(ImportError, match="pip install matplotlib"):
        _trainer(tmp_path / "explicit", moe=MOE, router_load_heatmap=True)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        RouterLoadHeatmapCallback()


def test_collapse_warning(tmp_path, caplog):
    # Masking every expert but one is exactly what a collapsed router does: the others get no token.
    model, _ = _peft_model({**MOE, "top_k": 1, "target_modules": ["q_proj", "v_proj"]})
    model.base_model.set_expert_mask([0])
    collapse = RoutingCollapseCallback(patience=2)
    with caplog.at_level(logging.WARNING, logger="trainer_callbacks.callbacks"):
        trainer = _trainer(tmp_path, model=model, callbacks=[collapse], max_steps=3, logging_steps=1)
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "Routing collapse" in r.getMessage()]
    assert len(warnings) == 1 and "at step 2" in warnings[0] and "24 expert(s) in 8 layer(s)" in warnings[0]
    assert sorted({expert for _, expert in collapse.collapsed}) == [1, 2, 3]
    assert trainer.state.log_history[0]["router/dead_experts"] == 24


def test_collapse_warning_is_not_repeated_for_an_expert_hovering_at_the_threshold(caplog):
    """An expert that dips below the threshold, recovers for a window and dips again is one warning, not one per dip;
    only after `patience` live windows is it forgotten and can be reported again."""
    from types import SimpleNamespace

    class Window:
        def __init__(self, dead):
            self.dead = dead

        def dead_experts(self, threshold):
            return self.dead

    stats = SimpleNamespace(num_windows={"train": 0}, latest={}, dead_expert_threshold=0.01)
    collapse = RoutingCollapseCallback(patience=2)
    collapse.bind(SimpleNamespace(router_stats=stats))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    flapping = [("layer", 3)]
    windows = [flapping, flapping, [], flapping, flapping, [], flapping, [], [], flapping, flapping]
    with caplog.at_level(logging.WARNING, logger="trainer_callbacks.callbacks"):
        for step, dead in enumerate(windows, start=1):
            stats.num_windows["train"] += 1
            stats.latest["train"] = Window(dead)
            state.global_step = step
            collapse.on_log(None, state, None)
    steps = [r.getMessage().split(":")[0] for r in caplog.records if "Routing collapse" in r.getMessage()]
    assert steps == ["Routing collapse at step 2", "Routing collapse at step 11"]


def test_coefficient_overrides_and_warmup(tmp_path):
    logs = _LogCapture()
    trainer = _trainer(
        tmp_path, moe=MOE, callbacks=[logs], max_steps=3, moelora_aux_loss_coef=0.2, moelora_router_z_loss_coef=0.01,
        moelora_loss_warmup_steps=4,
    )  # fmt: skip
    layer = trainer.model.get_base_model().model.layers[1].mlp.up_proj
    assert layer.routing_options["default"].aux_loss_coef == 0.2
    trainer.train()
    train_logs = [log for log in logs.logs if "loss" in log]
    assert [log["router/loss_scale"] for log in train_logs] == [0.0, 0.25, 0.5]
    assert train_logs[0]["router/aux_loss"] == 0.0 and train_logs[2]["router/aux_loss"] > 0
    # Step 3 ran at half the coefficients: aux_loss (a mean over layers, like the logged components) is
    # 0.5 * (0.2 * load balancing + 0.01 * z-loss).
    components = 0.2 * train_logs[2]["router/load_balancing"] + 0.01 * train_logs[2]["router/router_z"]
    assert train_logs[2]["router/aux_loss"] == pytest.approx(0.5 * components, rel=1e-5)
    # The warm-up ends with the configured values; the saved adapter records the override.
    assert layer.routing_options["default"].aux_loss_coef == 0.2
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["aux_loss_coef"] == 0.2 and saved["router_z_loss_coef"] == 0.01


def test_resume_continues_the_loss_curve(tmp_path):
    kwargs = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "moelora_loss_warmup_steps": 4}
    moe = {**MOE, "contrastive_loss_coef": 0.05, "lora_dropout": 0.1}
    full = _trainer(tmp_path / "full", moe=moe, **kwargs)
    full.train()

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt

    interrupted = _trainer(tmp_path / "resumed", moe=moe, callbacks=[Crash()], **kwargs)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed = _trainer(tmp_path / "resumed", moe=moe, **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    def curve(trainer, start):
        return {
            log["step"]: (log["loss"], log["router/aux_loss"], log["router/loss_scale"])
            for log in trainer.state.log_history
            if "loss" in log and log["step"] > start
        }

    expected, got = curve(full, 3), curve(resumed, 3)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"moelora_aux_loss_coef": -0.1}, "moelora_aux_loss_coef"),
        ({"moelora_contrastive_loss_coef": float("nan")}, "moelora_contrastive_loss_coef"),
        ({"router_stats_logging": "verbose"}, "router_stats_logging"),
        ({"moelora_loss_warmup_steps": 2.5}, "moelora_loss_warmup_steps"),
        ({"router_dead_expert_threshold": 1.5}, "router_dead_expert_threshold"),
        ({"router_collapse_patience": -1}, "router_collapse_patience"),
    ],
)
def test_bad_config_values(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        MoeLoraSFTConfig(output_dir=str(tmp_path), **kwargs)


def test_bad_trainer_arguments(tmp_path):
    with pytest.raises(ValueError, match="moelora_aux_loss_coef"):
        _trainer(tmp_path, moe=MOE, router_aux_loss_coef=0.1)  # TRL's coefficient of MoE *base* models
    with pytest.raises(ValueError, match="no MOELORA adapter"):
        model, tokenizer = build_tiny_llama()
        MoeLoraSFTTrainer(
            model=model,
            args=MoeLoraSFTConfig(output_dir=str(tmp_path), moelora_aux_loss_coef=0.1, **ARGS),
            train_dataset=_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )
    with pytest.raises(ValueError, match="requires soft routing"):
        _trainer(tmp_path, moe=MOE, moelora_gate_balance_loss_coef=0.1)
    with pytest.raises(ValueError, match="patience"):
        RoutingCollapseCallback(patience=0)
    # Our callbacks on a plain SFTTrainer fail at the start of training, not silently.
    model, tokenizer = build_tiny_llama()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, disable_tqdm=True),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=MoeLoraConfig(**MOE),
        callbacks=[RoutingCollapseCallback(patience=1)],
    )
    with pytest.raises(RuntimeError, match="MoeLoraSFTTrainer"):
        trainer.train()


def test_refuses_to_train_without_router_loss_gradient(tmp_path):
    # A forward that loses `aux_loss` (registered before the trainer's own hook, after MOELORA's).
    model, _ = _peft_model(MOE)
    model.get_base_model().register_forward_hook(lambda module, args, output: output.__setitem__("aux_loss", None))
    trainer = _trainer(tmp_path / "no-aux", model=model, max_steps=1)
    with pytest.raises(RuntimeError, match="returned no `aux_loss`"):
        trainer.train()

    # A subclass that detaches the loss: the backward pass never reaches the router losses.
    class Detaching(MoeLoraSFTTrainer):
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs).detach().requires_grad_()

    model, tokenizer = _peft_model(MOE)
    trainer = Detaching(
        model=model,
        args=MoeLoraSFTConfig(output_dir=str(tmp_path / "detached"), max_steps=1, **ARGS),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    with pytest.raises(RuntimeError, match="did not reach them"):
        trainer.train()


def test_plain_models_and_sft_features_keep_working(tmp_path):
    # A plain LoRA: exactly an SFTTrainer, no router metrics.
    model, tokenizer = build_tiny_llama()
    trainer = MoeLoraSFTTrainer(
        model=model,
        args=MoeLoraSFTConfig(output_dir=str(tmp_path / "lora"), max_steps=1, **ARGS),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert trainer.router_stats is None and not any(k.startswith("router/") for k in trainer.state.log_history[0])

    # Padding-free BFD packing (no attention mask), then prompt-completion data with a plain SFTConfig.
    logs = _LogCapture()
    trainer = _trainer(tmp_path / "packed", moe=MOE, callbacks=[logs], max_steps=2, packing=True, max_length=32)
    trainer.train()
    assert trainer.padding_free and logs.logs[0]["router/aux_loss"] > 0

    model, tokenizer = build_tiny_llama()
    pairs = Dataset.from_dict(
        {"prompt": ["question: what is the capital of france?"] * 4, "completion": ["paris"] * 4}
    )
    trainer = MoeLoraSFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path / "pairs"), max_steps=1, report_to=[], bf16=False, disable_tqdm=True),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=MoeLoraConfig(**MOE),
    )
    trainer.train()
    assert trainer.state.log_history[0]["router/aux_loss"] > 0


def test_moe_base_model_router_loss_is_not_weighted_twice(tmp_path):
    """On a Mixture-of-Experts base, TRL's own router loss would also weight the MOELORA losses: refused, unless off."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _, tokenizer = build_tiny_llama()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, pad_token_id=1, bos_token_id=2,
        eos_token_id=3,
    )  # fmt: skip
    moe = {**MOE, "target_modules": ["q_proj", "v_proj"]}

    def trainer(**kwargs):
        torch.manual_seed(0)
        return MoeLoraSFTTrainer(
            model=MixtralForCausalLM(config),
            args=MoeLoraSFTConfig(output_dir=str(tmp_path), max_steps=1, **{**ARGS, **kwargs}),
            train_dataset=_dataset(),
            processing_class=tokenizer,
            peft_config=MoeLoraConfig(**moe),
        )

    with pytest.raises(ValueError, match="weighted twice"):
        trainer()  # Mixtral's config declares router_aux_loss_coef=0.001
    logs = _LogCapture()
    ok = trainer(router_aux_loss_coef=0.0)
    ok.add_callback(logs)
    ok.train()
    assert logs.logs[0]["router/aux_loss"] == pytest.approx(0.01 * logs.logs[0]["router/load_balancing"], rel=1e-5)


def test_plain_sft_trainer_warns_that_router_losses_are_dropped(tmp_path):
    """`trl.SFTTrainer` builds its loss from the logits and never adds `outputs.aux_loss`: the user is told, once."""
    model, tokenizer = build_tiny_llama()
    args = {k: v for k, v in ARGS.items() if not k.startswith("router_")}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, **args),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=MoeLoraConfig(**MOE),
    )
    with pytest.warns(UserWarning, match="MoeLoraSFTTrainer") as record:
        trainer.train()
    assert sum("outputs.aux_loss" in str(w.message) for w in record) == 1


@pytest.mark.parametrize(
    "argv,expected", [([], None), (["--router_load_heatmap"], True), (["--router_load_heatmap", "false"], False)]
)
def test_router_load_heatmap_flag_parses_like_other_booleans(tmp_path, argv, expected):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MoeLoraSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", *argv]
    )
    assert args.router_load_heatmap is expected


class _MoeLoraTrainer(MoeLoraTrainerMixin, Trainer):
    """The mixin on the plain transformers `Trainer`, whose loss is `outputs.loss` (router losses already in it)."""


def _plain_trainer_run(tmp_path, accumulation: int, compute_loss_func=None) -> tuple[dict, dict, list[dict]]:
    """One optimizer step of `_MoeLoraTrainer` over `accumulation` identical rows; its gradients, a plain loop's
    gradients of `outputs.loss` on one row (router losses counted once), and the logs."""
    model, tokenizer = _peft_model(MOE_ALL_LOSSES)
    pristine = copy.deepcopy(model)
    ids = tokenizer(CORPUS[1])["input_ids"]
    rows = {"input_ids": [ids] * accumulation, "attention_mask": [[1] * len(ids)] * accumulation}
    rows["labels"] = rows["input_ids"]
    capture, logs = _GradientCapture(), _LogCapture()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=1, max_steps=1, max_grad_norm=0.0,
        gradient_accumulation_steps=accumulation, report_to=[], disable_tqdm=True, save_strategy="no",
        logging_steps=1,
    )  # fmt: skip
    trainer = _MoeLoraTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows), data_collator=default_data_collator,
        callbacks=[capture, logs], compute_loss_func=compute_loss_func,
    )  # fmt: skip
    trainer.train()

    reference = pristine.train()
    reference(**{key: torch.tensor(value[:1]) for key, value in rows.items()}).loss.backward()
    expected = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
    return capture.grads[0], expected, logs.logs


@pytest.mark.parametrize("accumulation", [1, 3])
def test_mixin_with_the_plain_trainer_counts_router_losses_once(accumulation, tmp_path):
    """`Trainer.compute_loss` returns `outputs.loss`, which includes the router losses: the mixin does not add them
    again, and with gradient accumulation it removes the k - 1 extra copies the plain `Trainer` counts
    (tests/test_distributed.py): the gradient equals one plain step on `outputs.loss`."""
    got, expected, logs = _plain_trainer_run(tmp_path, accumulation)
    router_keys = [k for k in expected if "moelora_router" in k]
    assert len(router_keys) == 28 and all(got[k].abs().sum() > 0 for k in router_keys)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    logged = next(entry for entry in logs if "loss" in entry)
    metrics = ("aux_loss", "load_balancing", "router_z", "contrastive", "entropy", "dead_experts")
    assert all(np.isfinite(logged[f"router/{name}"]) for name in metrics), logged
    assert logged["router/aux_loss"] > 0


def test_mixin_with_the_plain_trainer_adds_router_losses_to_compute_loss_func(tmp_path):
    """With `compute_loss_func` the `Trainer` builds the loss from the logits, without the router losses: the mixin
    adds them, and the gradient equals a plain step on `outputs.loss`."""

    def language_model_loss(outputs, labels, num_items_in_batch=None):
        logits, labels = outputs.logits[:, :-1].float(), labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    got, expected, logs = _plain_trainer_run(tmp_path, 1, compute_loss_func=language_model_loss)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any("router/aux_loss" in entry for entry in logs)


@pytest.mark.parametrize("learn_temperature", [False, True])
def test_router_lr_ratio_scales_only_the_router_updates(learn_temperature, tmp_path):
    """With SGD at a constant rate, one step moves every router (and learned temperature) by ratio x lr x grad and
    every expert by lr x grad; no trainable parameter is left out of the optimizer or put in twice."""
    moe = {**MOE_ALL_LOSSES, "learn_router_temperature": learn_temperature}
    capture = _GradientCapture()
    trainer = _trainer(tmp_path, moe=moe, callbacks=[capture], moelora_router_lr_ratio=10.0, optim="sgd",
                       lr_scheduler_type="constant", weight_decay=0.0, max_steps=1)  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    grouped = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(id(p) for p in trainable)
    gating = ("moelora_router", "moelora_log_temperature")
    assert any("moelora_log_temperature" in n for n in before) == learn_temperature
    for name, parameter in trainer.model.named_parameters():
        if name not in before:
            continue
        lr = 1e-3 * (10.0 if any(g in name for g in gating) else 1.0)
        expected = before[name] - lr * capture.grads[0][name]
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-5, atol=1e-8, msg=name)
        assert not torch.equal(parameter.detach(), before[name]), name


def test_router_lr_ratio_refuses_an_optimizer_it_cannot_change(tmp_path):
    model, tokenizer = _peft_model(MOE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    args = MoeLoraSFTConfig(output_dir=str(tmp_path), **ARGS, moelora_router_lr_ratio=3.0)
    with pytest.raises(ValueError, match="moelora_router_lr_ratio.*optimizers"):
        MoeLoraSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tokenizer,
                          optimizers=(optimizer, None))  # fmt: skip
    with pytest.raises(ValueError, match="moelora_router_lr_ratio"):
        MoeLoraSFTConfig(output_dir=str(tmp_path), moelora_router_lr_ratio=0.0)


def test_task_specialisation_is_measured_over_training_and_logged(tmp_path):
    probe = {"animals": CORPUS[:3], "adapters": CORPUS[3:6]}
    callback = TaskSpecialisationCallback(probe, every_n_steps=2, batch_size=2)
    trainer = _trainer(tmp_path, moe={**MOE, "init_weights": False}, callbacks=[callback], max_steps=5,
                       logging_steps=2)  # fmt: skip
    trainer.train()
    assert [row["step"] for row in callback.history] == [0, 2, 4, 5]
    # Each measurement reaches the next training log (step 0's is replaced by step 2's; the last one goes with the
    # trainer's final summary log).
    logged = [log for log in trainer.state.log_history if "router/specialisation" in log]
    assert [log["step"] for log in logged] == [2, 4, 5]
    assert logged[1]["router/specialisation"] == callback.history[2]["router/specialisation"]
    for row in callback.history:
        assert 0.0 <= row["router/specialisation_chance"] <= 1.0
        assert 0.0 < row["router/specialisation"] <= row["router/specialisation_max"] <= 1.0
    # The last measurement equals a direct one with the trained model in eval mode.
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    model.base_model.record_sample_routing(True)
    accumulator = TaskRoutingAccumulator(tasks=list(probe))
    with torch.no_grad():
        for task, texts in probe.items():
            for begin in range(0, len(texts), 2):
                batch = tokenizer(texts[begin : begin + 2], return_tensors="pt", padding=True)
                model(**batch)
                accumulator.add(model.base_model.get_routing_stats(), [task] * len(batch["input_ids"]),
                                batch["attention_mask"])  # fmt: skip
    values = [r.specialisation for r in accumulator.results().values()]
    assert callback.history[-1]["router/specialisation"] == pytest.approx(np.mean(values), rel=1e-6)
    assert callback.history[-1]["router/specialisation_max"] == pytest.approx(np.max(values), rel=1e-6)
