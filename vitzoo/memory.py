"""How much memory one step needs: live tensor bytes at their peak, and the process's resident set.

CUDA keeps a peak counter for its allocator; torch's CPU allocator has none, and the peak resident
set of the process moves with glibc's heap and the OS's page reuse by a few MiB from one run to
the next. The tensor count here is exact on every device, eager or compiled, so two models' steps
can be compared byte for byte; the resident set is what the machine actually had to provide.
Training on the CPU also asks glibc to keep large freed blocks for reuse (:func:`reuse_freed_host_memory`).
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_host_memory(limit: int = 1 << 30) -> bool:
    """Have glibc's malloc serve and keep blocks of up to ``limit`` bytes in its heap, for reuse, instead of
    mapping fresh pages for each and handing them back to the OS when freed.

    Why: glibc maps every allocation above its mmap threshold (which it raises to at most 32 MiB) and unmaps it on
    free, so a CPU training step whose activations are larger (the MLP's hidden tensor of vit_tiny_patch16_224 at
    batch 64 is 38 MiB, ViT-B's four times that) faults all of their pages in again, every step. Kept in the
    heap, one training step of vit_tiny_patch16_224 at batch 64 took 2.61 instead of 3.14 s (BENCHMARKS.md, "End
    to end"); blocks of several sizes kept there can raise the peak resident set (3.0 to 3.6 GiB in that step,
    no rise in the end-to-end run). The setting is the whole process's and stays; loader workers forked later
    inherit it. Returns False, changing nothing, where the C library is not glibc.
    """
    return bool(_glibc("mallopt", _M_MMAP_THRESHOLD, limit)) and bool(_glibc("mallopt", _M_TRIM_THRESHOLD, limit))


def _glibc(function: str, *args: int) -> int | None:
    """glibc's ``function(*args)``; None where the C library is not glibc (no libc.so.6, or no such function)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        return None


def peak_tensor_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The most bytes of tensors that ``step`` holds at once beyond what existed before it (weights,
    optimizer state, input batch). CUDA: the caching allocator's peak counter. Elsewhere: every
    allocation and free that torch's allocator reports to the profiler, replayed in time order, so
    compiled graphs and kernels' own buffers count too."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler logs every start and stop otherwise
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    changes = []
    events = list(profiler.profiler.kineto_results.experimental_event_tree())
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == device.type:
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))  # a free is negative
    current = peak = 0
    for _, change in sorted(changes):
        current += change
        peak = max(peak, current)
    return peak


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_rss_bytes(step: Callable[[], None]) -> int | None:
    """The rise of the process's peak resident set while ``step`` runs, over the resident set before it
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``, after ``gc`` and glibc's ``malloc_trim`` hand
    freed heap pages back so that memory the step re-uses counts). None where the OS has no such counters.
    """
    gc.collect()
    _glibc("malloc_trim", 0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS counter
        base = _proc_status_kib("VmRSS")
    except OSError:
        return None
    step()
    return (_proc_status_kib("VmHWM") - base) * 1024
