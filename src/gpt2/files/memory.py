"""Memory a long-lived process gives back to the OS (no torch needed: encoding uses it too).

    return_large_frees()            # the server, on the CPU
    return_large_frees(1 << 17)     # the encoder's 256K-1M text pieces
"""

from __future__ import annotations

# glibc's mallopt parameter for the size from which allocations get their own mmap.
_M_MMAP_THRESHOLD = -3


def return_large_frees(threshold: int = 4 << 20) -> bool:
    """Make glibc give blocks of ``threshold`` bytes or more back to the OS when freed (for a
    long-lived CPU process whose big buffers keep changing size: the server's KV caches, the
    encoder's text pieces).

    By default glibc raises its mmap threshold as big blocks are freed, after which they come
    from the heap and its free space is kept: 64 streaming clients on 124M grew the server from
    1.45 to 1.87 GB in 10 minutes, and with a fixed 4 MiB threshold stayed at 1.18-1.20 GB
    at the same speed (bench/RESULTS.md, Serve). A ``MALLOC_MMAP_THRESHOLD_`` the user set
    wins. Returns whether the setting was made (False: not glibc, or left to the user).
    """
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
