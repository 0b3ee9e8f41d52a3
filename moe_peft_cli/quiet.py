"""Keep one import-time warning of bitsandbytes out of the commands that use no 4-bit or 8-bit model.

peft imports bitsandbytes whenever it is installed, and bitsandbytes (0.50) logs at import, on CPUs with AVX512-BF16,
that the optional `kernels` package for its CPU 4-bit matmul is missing. That concerns 4-bit models only: the commands
hold the message back, and `moe-peft train` with `--load_in_4bit` / `--load_in_8bit` logs it after all.
"""

from __future__ import annotations

import logging


LOGGER = "bitsandbytes.backends.cpu.ops"
MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _HoldKernelsWarning(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(MESSAGE):
            self.held.append(record)
            return False
        return True


_FILTER = _HoldKernelsWarning()


def hold_bitsandbytes_kernels_warning() -> None:
    """Hold the message back (call before anything imports peft)."""
    logging.getLogger(LOGGER).addFilter(_FILTER)


def release_bitsandbytes_kernels_warning() -> None:
    """Stop holding the message, and log it if it was held (for commands that load a 4-bit or 8-bit model)."""
    logger = logging.getLogger(LOGGER)
    logger.removeFilter(_FILTER)
    for record in _FILTER.held:
        logger.handle(record)
    _FILTER.held.clear()
