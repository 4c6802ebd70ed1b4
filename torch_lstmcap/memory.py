"""Keep freed memory in the process: the programs' one process-wide memory setting.

glibc's malloc gives every block above its mmap threshold (which it moves between 128 KiB and
32 MiB) a mapping of its own and unmaps it on free, and it returns free memory at the top of
its heap to the system. A CNN's activations are such blocks: EfficientNet-Lite0 at batch 16
allocates some up to 77 MB, and each fresh mapping is faulted in page by page and zeroed by the
kernel. On the 2-core development machine that was about half of the encoder's time:
`benchmarks/caption_speed.py` measures the encoder alone with the setting, and with
GLIBC_TUNABLES=glibc.malloc.perturb=0 (a tunable that changes nothing) without it.

:func:`keep_freed_memory` raises both limits, so that blocks under 1 GiB come from the heap and
freed memory stays there for the next batch. The process then holds on to its peak memory
until it ends, which suits a captioning or training run. caption.py, train.py and the
benchmarks call it first thing; a library user decides for their own program.
"""

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes

# The environment variables through which a user sets glibc's malloc up themselves.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of giving it back.

    Nothing changes where the C library is not glibc (macOS, Windows, musl), or where the
    environment already sets glibc's malloc up (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_
    or GLIBC_TUNABLES): the user's own choice is left alone.

    Returns:
        True if the setting was applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not applied:
        log.debug("glibc refused the malloc settings; memory is returned as before")
    return applied
