"""glibc heap settings: freed pages go back to the system, and a network's tensors stay in the heap."""

from __future__ import annotations

import ctypes


def libc() -> ctypes.CDLL | None:
    """glibc, for the heap settings below; None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim():
    """glibc's malloc_trim, or None: gives freed heap pages back to the system."""
    return getattr(libc(), "malloc_trim", None)


MALLOC_TRIM = _malloc_trim()
TRIM_EVERY_S = 30.0  # how often the service loop hands freed pages back


def keep_tensor_heap() -> bool:
    """glibc heap settings for a process that runs a network on the CPU (infer); False where not glibc.

    The services' environment fixes the mmap threshold at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), which would
    make each activation tensor of a batch a fresh mmap whose pages fault in again on every batch, costing
    system time comparable to the model's own. Here large blocks come from the heap and stay there between
    batches; the service loop's ``malloc_trim`` every ``TRIM_EVERY_S`` still hands idle pages back, so the
    RSS stays flat.
    """
    c = libc()
    if c is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(c.mallopt(m_mmap_max, 0)) and bool(c.mallopt(m_trim_threshold, 512 << 20))
