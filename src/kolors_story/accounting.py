"""Count what a piece of torch code costs, on any device (the meta device included: real Kolors
sizes cost no memory there): peak tensor bytes (:class:`PeakTensorMemory`) and FLOPs (:class:`FlopCount`).

Used by the bench and the memory numbers in the README; independent of the CUDA allocator, so the
same code gives the same number on every run and on every machine.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block, on any device (meta too).

    The CPU counterpart of ``torch.cuda.max_memory_allocated() - memory_allocated()`` at entry:
    every storage an op creates is counted until it is freed (activations saved for backward,
    gradients, optimizer state, temporaries). Independent of the allocator's caching, so the same
    code gives the same number on every run. Tensors that existed before the block are not counted.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            # torch keeps one Python object per live storage: its weakref dies with the storage.
            self._live[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run inside the block, counted exactly as ``FlopCounterMode`` counts
    them (its formula registry, and its rule of decomposing ops the registry does not know) but
    without its per-module tracker: that tracker's hooks keep gradient-checkpointed activations
    alive, which would corrupt the peak memory measured in the same pass (and it costs time).
    tests/test_bench.py checks the totals equal FlopCounterMode's."""

    def __init__(self):
        super().__init__()
        self.total = 0
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default and func not in self.registry:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out
