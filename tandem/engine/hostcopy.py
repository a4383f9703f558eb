"""Host<->device copies that never block on the GPU stream.

With asynchronous scheduling the next step is queued on the GPU while the host still works on the
previous one, so nothing on the step path may synchronize the stream. A plain
`torch.tensor(list, device="cuda")` (or indexing a CUDA tensor with a Python list) copies from pageable
memory and then waits for the whole stream, i.e. for the step just queued. These helpers go through
pinned memory with non-blocking copies instead; on CPU they are plain tensors.
"""
from __future__ import annotations

import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without a stream sync on CUDA."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


class HostIds:
    """Sampled token ids on their way to the host: a pinned double buffer filled by a non-blocking copy,
    with an event to wait on. Two buffers suffice because at most one step is in flight while the
    previous one is read (the engine reads step N before it launches step N+2)."""

    def __init__(self, device: torch.device, capacity: int):
        self.device = device
        self.capacity = capacity
        self._cuda = device.type == "cuda"
        self._bufs = [torch.empty(capacity, dtype=torch.long, pin_memory=True) for _ in range(2)] \
            if self._cuda else []
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if self._cuda else []
        self._flip = 0

    def start(self, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Queue the copy of `ids` ([n] long, on the device); returns a handle for `get`."""
        if not self._cuda:
            return ids, None
        n = ids.shape[0]
        if n > self.capacity:                       # never expected (rows <= max_num_seqs); stay correct
            return ids, None
        i, self._flip = self._flip, self._flip ^ 1
        buf = self._bufs[i][:n]
        buf.copy_(ids, non_blocking=True)
        ev = self._events[i]
        ev.record()
        return buf, ev

    def start_any(self, t: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Queue the copy of any small tensor (e.g. packed logprobs) into fresh pinned memory (the
        caching host allocator keeps it until the copy is done); a handle for `get`."""
        if not self._cuda:
            return t, None
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return buf, ev

    @staticmethod
    def get(handle: tuple[torch.Tensor, object]) -> list:
        """Wait for a copy started by `start` / `start_any` and return the data as (nested) lists."""
        buf, ev = handle
        if ev is not None:
            ev.synchronize()
        return buf.tolist()
