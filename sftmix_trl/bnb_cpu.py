"""bitsandbytes on a CPU: silence its run-time attempt to fetch a Hub kernel this package never calls.

bitsandbytes 0.50.2, on a CPU with AVX512-BF16, tries at import to download `gemm_4bit_forward` from the Hub
repository kernels-community/quantization-bitsandbytes (through the optional `kernels` package) and, when that fails
(no `kernels`, or offline), logs "Failed to load CPU gemm_4bit_forward ... pip install kernels" in every process of
every run. That kernel only serves weights repacked into bitsandbytes' AVX512-BF16 CPU layout, and
`sftmix_trl.model.disable_bnb_cpu_repack` turns that repacking off (it corrupts saved checkpoints), so the kernel
would never run: installing `kernels` would only add a download. The warning is advice that does not apply here.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def silence_hub_kernel_warning() -> None:
    """Drop that one record (nothing else bitsandbytes logs). Must run before bitsandbytes is first imported, which
    `import sftmix_trl` does; idempotent."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropHubKernelWarning) for f in logger.filters):
        logger.addFilter(_DropHubKernelWarning())
