"""Silence the import-time log lines of optional dependencies that say nothing about a fastnabla run.

Each entry is one logger and the start of one message; only that message is dropped, everything else the
dependency logs still shows. The filters are attached before the dependency is imported (``logging.getLogger``
returns the same object when the dependency asks for its logger later).
"""
from __future__ import annotations

import logging

_NOISE = {
    # bitsandbytes tries to fetch an optional 4-bit CPU matmul kernel from the hub (Hugging Face's `kernels`
    # package) on import and warns when it cannot; fastnabla uses bitsandbytes for its 8-bit optimizers only.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # DeepSpeed announces on import that it found no accelerator; a CPU run knows that already.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependency_logs() -> None:
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
