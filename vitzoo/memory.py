"""How much memory one step needs: live tensor bytes at their peak, and the process's resident set.

CUDA keeps a peak counter for its allocator; CPU tensors have none, and the peak resident set of the
process moves with glibc's heap and the OS's page reuse by a few MiB from one run to the next. The
tensor count here is exact on every device, so two models' steps can be compared byte for byte;
the resident set is what the machine actually had to provide.
"""

from __future__ import annotations

import ctypes
import gc
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorPeak(TorchDispatchMode):
    """Counts the storages that ops create while the mode is on, until each is freed.

    A storage is new when no input of the op that returned it shares it (views, in-place ops and
    tensors that existed before, such as weights and the input batch, are not counted again). It
    leaves the count when its last reference dies, through a weak reference, so ``peak`` is the most
    bytes the step held at once on ``device``. Kernels that allocate outside torch's dispatcher (a
    ``torch.compile``'d graph) are not seen; measure those on CUDA or by the resident set.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.live.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device != self.device:
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key in inputs or key in self.live or not nbytes:
                continue
            self.live[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def peak_tensor_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The most bytes of tensors that ``step`` holds at once beyond what existed before it (weights,
    optimizer state, input batch). CUDA: the allocator's peak counter; elsewhere :class:`TensorPeak`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorPeak(device) as tracker:
        step()
    return tracker.peak


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_rss_bytes(step: Callable[[], None]) -> int | None:
    """The rise of the process's peak resident set while ``step`` runs, over the resident set before it
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``, after ``gc`` and ``malloc_trim`` hand
    freed heap pages back so that memory the step re-uses counts). None where the OS has no such counters.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS counter
        base = _proc_status_kib("VmRSS")
    except OSError:
        return None
    step()
    return (_proc_status_kib("VmHWM") - base) * 1024
