"""Errors of the `moe-peft` command line, and the translation of the mistakes new users make into actionable messages.

Every message says what went wrong *and* what to type instead. `UserError` is raised by the CLI code itself;
[`explain`] turns a few well-known exceptions from peft, transformers and the import system into a `UserError`.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A mistake in the command line, the environment or the input files; the CLI prints it without a traceback."""


PLUGIN_NOT_IMPORTED = (
    "This is a MOELORA adapter, but the MOELORA type is not registered with peft (peft raised KeyError: 'MOELORA'). "
    "peft has no plugin discovery: run `import moe_peft_plugin` before loading the adapter with "
    "`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` or `load_adapter`. The `moe-peft` commands do this for "
    "you; `moe-peft export` turns experts into plain LoRA adapters that load without the plugin."
)

MISSING_BITSANDBYTES = (
    "4-bit/8-bit (QLoRA) loading needs bitsandbytes, which is not installed: `pip install 'moe-peft-plugin[qlora]'` "
    "(or `pip install bitsandbytes`). Without it, drop `--load_in_4bit` / `--load_in_8bit`."
)


def missing_package(package: str, extra: str, purpose: str) -> UserError:
    return UserError(f"{purpose} needs the package `{package}`: `pip install 'moe-peft-plugin[{extra}]'`.")


def explain(error: BaseException) -> Optional[UserError]:
    """A `UserError` with an actionable message for a known mistake, or None for anything else."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, KeyError) and error.args and error.args[0] == "MOELORA":
        return UserError(PLUGIN_NOT_IMPORTED)
    if isinstance(error, (ImportError, ModuleNotFoundError)):
        name = (getattr(error, "name", None) or "").split(".")[0]
        text = str(error)
        if name == "bitsandbytes" or "bitsandbytes" in text:
            return UserError(MISSING_BITSANDBYTES)
        if name == "gguf" or "gguf" in text.lower() and "pip install" in text:
            return missing_package("gguf", "demo", "Converting the embedded GGUF model")
        if name == "matplotlib":
            return missing_package("matplotlib", "demo", "Writing PNG plots")
        if name == "trl":
            return missing_package("trl", "trl", "Training")
    text = str(error)
    if isinstance(error, (AssertionError, RuntimeError, ValueError)) and (
        "Torch not compiled with CUDA enabled" in text
        or "Found no NVIDIA driver" in text
        or "requires a GPU" in text
        or "no CUDA GPUs are available" in text
    ):
        return UserError(
            f"This option needs a CUDA GPU, and none is available ({text.strip().splitlines()[0]}). On a CPU machine, "
            "drop `--fp16` (use `--bf16` or nothing), `--device cuda` and `--attn_implementation flash_attention_2`."
        )
    return None
