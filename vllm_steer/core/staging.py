"""Host <-> device copies that never make the host wait for the device.

Admission, release and the step writers run on the host between steps, while a GPU may still
be running the previous step (async scheduling). A copy from pageable host memory, or a read
of a device value, would wait for that step to end. These copies go through pinned memory
instead: torch's pinned-memory allocator records the asynchronous copy and does not hand the
block out again before the copy has finished. On a CPU device they are plain tensors.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, copied asynchronously."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's value on the host: the copy starts now, ``numpy()`` waits for it
    (call that from the control plane, never from the step path)."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cpu":
            self._host = tensor.detach().clone()
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def ready(self) -> bool:
        """Whether the copy is complete: ``numpy()`` would not wait."""
        return self._event is None or self._event.query()

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class HostTable:
    """A small device table edited on the host: admission and release write entries of
    ``host`` (numpy: a write costs well under a microsecond, a device tensor's several), and
    ``push`` copies the whole table to the device, once per step that changed it, before the
    step reads it."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.host = table.cpu().numpy().copy()
        self.changed = False

    def write(self, index, value) -> None:
        self.host[index] = value
        self.changed = True

    def push(self) -> bool:
        """Copy ``host`` to the device if it changed; whether it did."""
        if not self.changed:
            return False
        # to_device copies a pinned snapshot, so ``host`` may be edited again at once.
        self.table.copy_(to_device(torch.from_numpy(self.host), self.table.device))
        self.changed = False
        return True
