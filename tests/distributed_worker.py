"""The processes of the 2-process CPU runs in tests/test_distributed.py (gloo).

    torchrun --nproc_per_node 2 tests/distributed_worker.py ddp OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py fsdp OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py sft OUT_FILE SCRIPT_ARGS...

Rank 0 writes what the test checks with `torch.save`; the assertions live in the test. Every mode ends with a
`dist.barrier()` and `dist.destroy_process_group()`: without them gloo processes sometimes abort at exit
("terminate called without an active exception").
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_peft_plugin  # noqa: E402,F401  (registers MOELORA)
from moe_peft_plugin import MoeLoraConfig  # noqa: E402
from tests.helpers import CORPUS, build_tiny_llama  # noqa: E402


# Non-zero experts (so the routers get an LM gradient too) and every router loss of a top-k router.
MOE = {
    "r": 4,
    "lora_alpha": 8,
    "num_experts": 4,
    "top_k": 2,
    "target_modules": "all-linear",
    "task_type": "CAUSAL_LM",
    "init_weights": False,
    "aux_loss_coef": 0.05,
    "router_z_loss_coef": 0.01,
    "contrastive_loss_coef": 0.05,
}
PROBE_IDS = [[2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 3]]


def _peft_model():
    from peft import get_peft_model

    base, tokenizer = build_tiny_llama(seed=0)
    torch.manual_seed(0)
    return get_peft_model(base, MoeLoraConfig(**MOE)), tokenizer


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "moelora_" in n}


def _logits(model) -> torch.Tensor:
    ids = torch.tensor(PROBE_IDS)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    model.train(was_training)
    return logits


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _reload(adapter_dir) -> torch.Tensor:
    """Logits of the saved adapter on a fresh copy of the base model."""
    from peft import PeftModel

    base, _ = build_tiny_llama(seed=0)
    return _logits(PeftModel.from_pretrained(base, str(adapter_dir)))


def _finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _callbacks():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        """The adapter at the start and the end, and the gradients of the first step as the optimizer gets them."""

        def __init__(self):
            self.grads = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.initial = _adapter(model)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.final = _adapter(model)

    class Recorder:
        """Wraps a collator and keeps the first batch it builds."""

        def __init__(self, collator):
            self.collator, self.batch = collator, None

        def __call__(self, examples):
            batch = self.collator(examples)
            if self.batch is None:
                self.batch = {k: v.clone() for k, v in batch.items()}
            return batch

    return Capture, Recorder


def ddp(out: Path) -> None:
    """DDP (torchrun, `use_cpu=True`, gloo) with the plain transformers `Trainer`, then with `MoeLoraSFTTrainer`.

    Both ranks see the same rows, so a correct DDP gradient equals the gradient of one process on one rank's batch.
    """
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from trainer_callbacks import MoeLoraSFTConfig, MoeLoraSFTTrainer

    Capture, Recorder = _callbacks()
    common = {
        "use_cpu": True,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_grad_norm": 0.0,  # no clipping: the captured gradients are the raw ones
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    model, tokenizer = _peft_model()
    pristine = copy.deepcopy(model)

    # 1. The plain Trainer: 3 steps, the adapter saved by `save_model`.
    ids = tokenizer(CORPUS[1])["input_ids"]
    rows = {"input_ids": [ids] * 12, "attention_mask": [[1] * len(ids)] * 12, "labels": [ids] * 12}
    capture = Capture()
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=3, **common)
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows), data_collator=Recorder(default_data_collator),
        callbacks=[capture],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(out / "trainer"))
    plain = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "num_processes": trainer.accelerator.num_processes,
        "average_tokens_across_devices": args.average_tokens_across_devices,
        "initial": capture.initial,
        "final": capture.final,
        "grads": capture.grads,
        "batch": trainer.data_collator.batch,
        "log_history": trainer.state.log_history,
        "logits": _logits(trainer.model),
    }

    # 2. The plain Trainer without `average_tokens_across_devices`: one step from the same initial adapter.
    capture = Capture()
    args = TrainingArguments(
        output_dir=str(out / "no_average"), max_steps=1, average_tokens_across_devices=False, **common
    )
    trainer = Trainer(
        model=copy.deepcopy(pristine), args=args, train_dataset=Dataset.from_dict(rows),
        data_collator=default_data_collator, callbacks=[capture],
    )  # fmt: skip
    trainer.train()
    plain["grads_without_token_averaging"] = capture.grads

    # 3. MoeLoraSFTTrainer: one step from the same initial adapter.
    capture = Capture()
    args = MoeLoraSFTConfig(
        output_dir=str(out / "sft"), max_steps=1, bf16=False, gradient_checkpointing=False,
        router_load_heatmap=False, router_collapse_patience=0, **common,
    )  # fmt: skip
    trainer = MoeLoraSFTTrainer(
        model=copy.deepcopy(pristine), args=args, train_dataset=Dataset.from_dict({"text": [CORPUS[1]] * 12}),
        processing_class=tokenizer, callbacks=[capture],
    )  # fmt: skip
    trainer.data_collator = Recorder(trainer.data_collator)
    trainer.train()
    sft = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "grads": capture.grads,
        "batch": trainer.data_collator.batch,
    }

    if dist.get_rank() == 0:
        # One process, no DDP: the gradients of the same first batches, and of the router losses alone.
        def loss(batch):
            return lambda m: m(**batch).loss  # includes outputs.aux_loss

        def aux_loss(batch):
            return lambda m: m(**batch).aux_loss

        sft_batch = {k: v for k, v in sft["batch"].items() if k in ("input_ids", "attention_mask", "labels")}
        reference = copy.deepcopy(pristine).train()
        torch.save(
            {
                "plain": plain,
                "sft": sft,
                "single": {
                    "plain_batch": _grads(reference, loss(plain["batch"])),
                    "plain_batch_aux": _grads(reference, aux_loss(plain["batch"])),
                    "sft_batch": _grads(reference, loss(sft_batch)),
                },
                "reloaded_logits": _reload(out / "trainer"),
            },
            out / "result.pt",
        )
    _finish()


def sft(out_file: Path, argv: list[str]) -> None:
    """examples/sft_moelora.py under DDP (`--use_cpu true`), through its own `parse_args` and `main`."""
    sys.path.insert(0, str(ROOT / "examples"))
    import sft_moelora

    Capture, _ = _callbacks()
    capture = Capture()
    trainer = sft_moelora.main(*sft_moelora.parse_args(argv), callbacks=[capture])
    if trainer.is_world_process_zero():
        torch.save(
            {
                "wrapper": type(trainer.model_wrapped).__name__,
                "initial": capture.initial,
                "final": capture.final,
                "grads": capture.grads,
                "logits": _logits(trainer.model),
                "reloaded_logits": _reload(trainer.args.output_dir),
                "process_group_destroyed": not dist.is_initialized(),
            },
            out_file,
        )
    _finish()


def _fsdp_batches(tokenizer, world_size: int) -> list[dict[str, torch.Tensor]]:
    """One batch per rank (different rows), with padding, as the FSDP run uses them."""
    from tests.helpers import batch

    batches = []
    for rank in range(world_size):
        inputs = batch(tokenizer, CORPUS[2 * rank : 2 * rank + 2])
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        batches.append(inputs)
    return batches


def fsdp(out: Path) -> None:
    """PyTorch FSDP2 (`fully_shard`) on CPU: each decoder layer, then the PeftModel; then nested FSDP1."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, tokenizer = _peft_model()
    model.train()
    unsharded = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    adapter_params = {n: p for n, p in model.named_parameters() if "moelora_" in n}
    result = {
        "num_adapter_params": len(adapter_params),
        "all_dtensor": all(isinstance(p, DTensor) for p in adapter_params.values()),
        "local_numel": sum(p.to_local().numel() for p in adapter_params.values()),
        "full_numel": sum(p.numel() for p in adapter_params.values()),
    }

    # Three steps on different rows per rank; the first step's gradients are gathered and compared with the mean of
    # one-process gradients on each rank's rows (what data parallelism must give).
    batches = _fsdp_batches(tokenizer, world_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        outputs = model(**batches[rank])
        outputs.loss.backward()  # includes outputs.aux_loss
        if step == 0:
            result["aux_loss"] = outputs.aux_loss.detach()
            result["grads"] = {n: p.grad.full_tensor() for n, p in adapter_params.items()}  # collective
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:
        per_rank = [_grads(unsharded, lambda m, b=b: m(**b).loss) for b in batches]
        result["reference_grads"] = {n: sum(g[n] for g in per_rank) / world_size for n in per_rank[0]}
        result["initial"] = _adapter(unsharded)

    # Full state dict (every rank takes part; only rank 0 gets the tensors), saved with save_pretrained on rank 0.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    gathered = {n: p.full_tensor().detach().clone() for n, p in adapter_params.items()}  # collective
    logits = _logits(model)  # collective under FSDP
    if rank == 0:
        model.save_pretrained(str(out / "fsdp2"), state_dict=full)
        result["gathered"] = gathered
        result["saved"] = load_file(out / "fsdp2" / "adapter_model.safetensors")
        result["logits"] = logits
        result["reloaded_logits"] = _reload(out / "fsdp2")

    # Nested FSDP1 (each decoder layer wrapped): peft's own selection finds no adapter tensor there.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _ = _peft_model()
    expected = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "moelora_" in n}
    wrapped = FSDP(
        model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"),
        use_orig_params=True,
    )  # fmt: skip
    try:
        model.save_pretrained(str(out / "fsdp1"), is_main_process=rank == 0)  # state dict: a collective
        result["fsdp1"] = {"error": None}
    except ValueError as err:
        result["fsdp1"] = {"error": str(err)}
    if rank == 0:
        result["fsdp1"]["wrapper"] = type(wrapped).__name__
        result["fsdp1"]["expected"] = expected
        saved = out / "fsdp1" / "adapter_model.safetensors"
        result["fsdp1"]["saved"] = load_file(saved) if saved.exists() else None
        torch.save(result, out / "result.pt")
    _finish()


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "ddp":
        ddp(target)
    elif mode == "fsdp":
        fsdp(target)
    elif mode == "sft":
        sft(target, sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
