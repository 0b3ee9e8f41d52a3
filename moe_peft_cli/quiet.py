"""Keep the import-time messages about bitsandbytes' optional CPU kernel out of the commands that use no 4-bit or 8-bit
model.

peft imports bitsandbytes whenever it is installed, and bitsandbytes (0.50), on CPUs with AVX512-BF16, tries at import
to fetch its CPU 4-bit matmul from the Hub repository `kernels-community/quantization-bitsandbytes` through the
`kernels` package (which transformers >= 5.25 installs), and logs when that fails: `kernels` that it skips the
publisher check offline (`HF_HUB_OFFLINE=1`), bitsandbytes that the kernel could not be loaded. That concerns 4-bit
models only: the commands hold these messages back, and `moe-peft train` with `--load_in_4bit` / `--load_in_8bit`
logs them after all.
"""

from __future__ import annotations

import logging


# The loggers that report on the kernel, and what their messages about it contain.
LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
KERNEL_REPOSITORY = "kernels-community"


class _HoldKernelsMessages(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if KERNEL_REPOSITORY in record.getMessage():
            self.held.append(record)
            return False
        return True


_FILTER = _HoldKernelsMessages()


def hold_bitsandbytes_kernels_warning() -> None:
    """Hold the messages back (call before anything imports peft)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)


def release_bitsandbytes_kernels_warning() -> None:
    """Stop holding the messages, and log those held, in order (for commands that load a 4-bit or 8-bit model)."""
    for name in LOGGERS:
        logging.getLogger(name).removeFilter(_FILTER)
    for record in _FILTER.held:
        logging.getLogger(record.name).handle(record)
    _FILTER.held.clear()
