"""Counting a job's device memory without computing it: torch's fake tensors and a live-bytes counter.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every tensor carries its shape, dtype and
device but no data, and every operation runs only its shape rules. A model of any size is built
through ComfyUI's own classes in a second, and a whole node (sampler, autograd, checkpointing)
runs through its real code path in seconds. :class:`AllocationCounter` sees every tensor an
operation returns (a ``TorchDispatchMode`` above the fake mode), counts each new storage's bytes
once, and takes them off when the storage dies (a weak-reference finaliser). Its peak is the
most bytes alive at once: what a caching allocator would have to hold, before its own
fragmentation and the kernels' workspaces (:data:`FRAGMENTATION`, :data:`WORKSPACE_BYTES`).

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it tracks module states through
global module hooks, refuses a root module that runs more than once in its block ("multiple
iterative calls", which every sampler does), and registers gradient hooks on every parameter,
which fails on the frozen weights of an inference model. Its storage accounting, the part that
matters here, is what :class:`AllocationCounter` does.

What fake tensors need from the code they run, and how :func:`fake_job` provides it:

- Data-dependent Python values (``float(t)``, ``bool(t)``, ``torch.equal``): the counter answers
  them itself (0.5 / 0 / False; a value the memory does not depend on) instead of the fake mode's
  ``DataDependentOutputException``. The job's numbers are meaningless; its allocations are not.
- ``Module.to(...)``: fake parameters carry a weak reference, so ``torch.utils.swap_tensors``
  (which ``Module._apply`` uses for tensor subclasses) refuses them; a move on the same device
  is done with ``set_data`` instead.
- Weights that a partially loaded model keeps on the offload device: the same fake device is both
  the "GPU" and the host here, so the counter is told which storages live on the host
  (:meth:`AllocationCounter.exclude`); their per-layer casts to the compute dtype are new
  storages and are counted.

The counts are checked against real process memory on cases a CPU can run
(``python -m benchmarks scale --section fit``: ``fit.counter_vs_rss``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map_only

GIB = float(1 << 30)
#: The kind of tensors made by code that keeps them in host memory (not counted).
HOST = "host"

#: The margin the reported peaks add for what a fake count cannot see. The CUDA caching
#: allocator rounds blocks and keeps freed blocks split (fragmentation, about 5-15 % of the memory
#: allocated during a step in PyTorch's own reports; 10 % is taken on everything above the
#: weights), and cuDNN / attention kernels take workspaces outside the tensors (a fixed 0.25 GiB).
FRAGMENTATION = 0.10
WORKSPACE_BYTES = int(0.25 * GIB)


def with_margin(peak_bytes: int, weight_bytes: int) -> int:
    """A counted peak plus the margin: :data:`FRAGMENTATION` of what lies above the weights, plus
    :data:`WORKSPACE_BYTES`."""
    return int(peak_bytes + FRAGMENTATION * max(0, peak_bytes - weight_bytes) + WORKSPACE_BYTES)


@dataclass
class Phase:
    name: str
    peak: int = 0
    start: int = 0


class AllocationCounter(TorchDispatchMode):
    """Live bytes of every storage created under it (and of tensors given to :meth:`track`),
    their peak, and the peak inside named phases (:meth:`phase`). Storages marked with
    :meth:`exclude` are not counted (weights held on the host)."""

    _SCALARS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default)

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, int] = {}
        self._tensor_key: dict[int, int] = {}     # id(tensor) -> the storage it was counted on
        self._excluded: set[int] = set()
        self._phases: list[Phase] = []
        self.phases: dict[str, Phase] = {}
        self.by_kind: dict[str, int] = {}
        #: at the peak: live bytes by kind (what made them: weights and inputs made before the
        #: work, or the forward with / without autograd, or the backward), and where it was
        self.peak_by_kind: dict[str, int] = {}
        self.peak_where: str = ""
        self.where: list[str] = []        # labels of what runs now (module hooks push them)
        #: with ``detail=True``: the largest live tensors at the peak (shape, dtype, kind, where)
        self.detail = False
        self.peak_largest: list = []
        self._info: dict[int, tuple] = {}
        self._snapped = 0

    # ----- bookkeeping -------------------------------------------------------------------
    def _add(self, t: torch.Tensor) -> None:
        # A storage is told by its handle (``_cdata``; Python's storage objects are made afresh
        # for real tensors) and lives while any tensor seen on it lives: each tensor holds a count,
        # dropped by a finaliser on the tensor (weak references to storages do not last).
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return
        tid = id(t)
        if tid in self._tensor_key:               # seen before (an in-place result)
            return
        self._add_storage(t, key)
        self._tensor_key[tid] = key
        self._refs[key] = self._refs.get(key, 0) + 1
        weakref.finalize(t, self._forget, tid)

    def _add_storage(self, t: torch.Tensor, key: int) -> None:
        if key in self._sizes or key in self._excluded:
            return
        n = int(t.untyped_storage().nbytes())
        kind = self._kind()
        if kind == HOST:                          # made by code that keeps its tensors in host memory
            self._excluded.add(key)
            return
        self._sizes[key] = (n, kind)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.live += n
        if self.detail:
            self._info[key] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), kind, " > ".join(self.where[-2:]))
        if self.live > self.peak:
            self._new_peak()
        for p in self._phases:
            p.peak = max(p.peak, self.live)

    def _forget(self, tid: int) -> None:
        key = self._tensor_key.pop(tid, None)
        if key is not None:
            self._release(key)

    def moved(self, t: torch.Tensor, old_key: int) -> None:
        """``t`` now holds another storage (``set_data``, what a module move does here): its count
        moves from the old storage to the new one (its finaliser reads ``_tensor_key``)."""
        tid = id(t)
        if self._tensor_key.get(tid) != old_key:
            return
        self._release(old_key)
        key = t.untyped_storage()._cdata
        self._add_storage(t, key)
        self._tensor_key[tid] = key
        self._refs[key] = self._refs.get(key, 0) + 1

    def _new_peak(self) -> None:
        self.peak = self.live
        self.peak_by_kind = dict(self.by_kind)
        self.peak_where = " > ".join(self.where[-3:]) + (" (backward)" if self._in_backward() else "")
        if self.detail and self.live > 1.01 * self._snapped:
            self._snapped = self.live
            groups: dict = {}
            for k, (b, _kind) in self._sizes.items():
                info = self._info.get(k) or ((), "", _kind, "")
                g = (info[2], info[3], info[1])
                n, c, shapes = groups.get(g, (0, 0, {}))
                shapes[info[0]] = shapes.get(info[0], 0) + 1
                groups[g] = (n + b, c + 1, shapes)
            top = sorted(groups.items(), key=lambda e: -e[1][0])[:12]
            self.peak_largest = [(round(n / 2 ** 30, 3), g, cnt, sorted(sh.items(), key=lambda e: -e[1])[:3])
                                 for g, (n, cnt, sh) in top]

    def _release(self, key: int) -> None:
        left = self._refs.get(key, 0) - 1
        if left > 0:
            self._refs[key] = left
            return
        self._refs.pop(key, None)
        self._excluded.discard(key)           # the handle may be reused by a new storage
        n, kind = self._sizes.pop(key, (0, ""))
        self._info.pop(key, None)
        self.live -= n
        if kind:
            self.by_kind[kind] -= n

    kind_override: str | None = None

    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _kind(self) -> str:
        if self.kind_override:
            return self.kind_override
        if self._in_backward():
            return "backward"
        return "forward with autograd" if torch.is_grad_enabled() else "no autograd"

    @contextlib.contextmanager
    def labelled(self, kind: str) -> Iterator[None]:
        """Count what is made in the block as ``kind`` (e.g. "weights")."""
        old, self.kind_override = self.kind_override, kind
        try:
            yield
        finally:
            self.kind_override = old

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made outside the counter (a model built before it was entered)."""
        for t in tensors:
            self._add(t)

    def exclude(self, tensors: Iterable[torch.Tensor]) -> int:
        """Stop counting these tensors' storages (they live on the host); returns their bytes."""
        freed = 0
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self._sizes:
                n, kind = self._sizes.pop(key)
                self.live -= n
                self.by_kind[kind] -= n
                freed += n
            self._excluded.add(key)
        return freed

    def include(self, tensors: Iterable[torch.Tensor], kind: str = "weights") -> int:
        """Count again storages :meth:`exclude` took off (weights loaded back); returns the bytes."""
        added = 0
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self._excluded and key in self._refs:
                self._excluded.discard(key)
                n = int(t.untyped_storage().nbytes())
                self._sizes[key] = (n, kind)
                self.by_kind[kind] = self.by_kind.get(kind, 0) + n
                self.live += n
                added += n
        if self.live > self.peak:
            self._new_peak()
        return added

    def keep_only(self, tensors: Iterable[torch.Tensor]) -> int:
        """Stop counting every live storage but those of ``tensors`` (a model's weights, once it
        is built: what building made besides them was host memory); returns the bytes dropped."""
        keep = {t.untyped_storage()._cdata for t in tensors}
        drop = [k for k in self._sizes if k not in keep]
        freed = 0
        for key in drop:
            n, kind = self._sizes.pop(key)
            self.live -= n
            self.by_kind[kind] -= n
            self._excluded.add(key)
            freed += n
        return freed

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_by_kind = dict(self.by_kind)
        self.peak_where = ""

    @contextlib.contextmanager
    def watching(self, modules: dict) -> Iterator[None]:
        """Label the peak with the module that runs (``{label: module}``, forward hooks)."""
        handles = []
        for label, m in modules.items():
            if m is None:
                continue
            handles.append(m.register_forward_pre_hook(lambda *_a, _l=label: self.where.append(_l)))
            handles.append(m.register_forward_hook(lambda *_a, _l=label: self._pop(_l)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.where.clear()

    def _pop(self, label: str) -> None:
        if label in self.where:
            del self.where[len(self.where) - 1 - self.where[::-1].index(label)]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Record the peak of live bytes while the block runs (phases may nest)."""
        p = Phase(name, self.live, self.live)
        self._phases.append(p)
        try:
            yield p
        finally:
            self._phases.remove(p)
            old = self.phases.get(name)
            self.phases[name] = p if old is None or old.peak < p.peak else old

    # ----- dispatch ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if leaves and not any(isinstance(a, FakeTensor) for a in leaves):
            # Only real tensors in: small host values (a sigma schedule kept real so that the
            # code branching on it runs as it would), computed for real and not counted.
            with _disable_current_modes():
                return func(*args, **(kwargs or {}))
        if func in self._SCALARS:
            # A Python value read off a tensor; fake tensors have none. The memory of the job
            # does not depend on it (a loss for a progress text, a sigma compared to the max).
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                return 0.5 if args[0].is_floating_point() else 0
            return False
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


@contextlib.contextmanager
def _moves_on_one_fake_device(counter: "AllocationCounter | None" = None) -> Iterator[None]:
    """``Module.to`` on fake parameters: ``set_data`` where ``swap_tensors`` refuses them (the
    counter is told that the parameter now holds another storage)."""
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor) and t1.device == t2.device:
            old = t1.untyped_storage()._cdata
            t1.data = t2
            if counter is not None:
                counter.moved(t1, old)
            return None
        return original(t1, t2)

    # ``Module._apply`` wraps the moved tensor in a Parameter before swapping; for a fake inference
    # weight (built under inference_mode, as ComfyUI builds models) moved outside it, as ComfyUI
    # 0.3.75's partial load does, that wrapper may not require grad (the parameter itself keeps its
    # flag: only its data changes)
    parameter_new = torch.nn.Parameter.__new__

    def new(cls, data=None, requires_grad=True):
        if (requires_grad and isinstance(data, FakeTensor) and data.is_inference()
                and not torch.is_inference_mode_enabled()):
            requires_grad = False
        return parameter_new(cls, data, requires_grad)

    torch.utils.swap_tensors = swap
    torch.nn.Parameter.__new__ = staticmethod(new)
    try:
        yield
    finally:
        torch.utils.swap_tensors = original
        torch.nn.Parameter.__new__ = staticmethod(parameter_new)


@contextlib.contextmanager
def real() -> Iterator[None]:
    """Real tensors inside a fake job (small host values: a model's sigma schedule)."""
    with _disable_current_modes():
        yield


@dataclass
class FakeJob:
    """What :func:`fake_job` yields: the counter, and the fake mode (to make inputs)."""
    counter: AllocationCounter
    mode: object
    notes: list = field(default_factory=list)


@contextlib.contextmanager
def fake_job() -> Iterator[FakeJob]:
    """Fake tensors and a counter for the block: build models and run nodes inside it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter = AllocationCounter()
    with _moves_on_one_fake_device(counter), mode, counter:
        yield FakeJob(counter, mode)


def fakeify(*modules) -> None:
    """Replace the real tensors a model built under :func:`fake_job` still holds with fake ones
    (a constant a module makes with ``torch.tensor``, such as BatchNorm's ``num_batches_tracked``
    in Flux.2's VAE, stays real, and aliasing it in fake mode fails)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    mode = next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)), None)
    if mode is None:
        return
    for module in modules:
        for m in module.modules():
            for slots in (m._parameters, m._buffers):
                for name, t in slots.items():
                    if t is not None and not isinstance(t, FakeTensor):
                        fake = mode.from_tensor(t)
                        slots[name] = (torch.nn.Parameter(fake, requires_grad=t.requires_grad)
                                       if isinstance(t, torch.nn.Parameter) else fake)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of modules (each storage once)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += int(t.untyped_storage().nbytes())
    return total


class HeapPeak(TorchDispatchMode):
    """The process heap's bytes in use (glibc's ``mallinfo2``: small blocks plus mmap'd large ones,
    where torch's CPU tensors live), read after every torch operation under it: the peak of what a
    real run on this CPU holds, at operation granularity. ``peak - start`` is what the block added
    at its worst. For real tensors, where :class:`AllocationCounter` cannot follow storages
    (torch makes their Python storage objects afresh)."""

    def __init__(self):
        super().__init__()
        import ctypes

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Info
        self._read = libc.mallinfo2
        self.start = self.peak = self.used()

    def used(self) -> int:
        info = self._read()
        return int(info.uordblks + info.hblkhd)

    def __enter__(self):
        self.start = self.peak = self.used()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.used())
        return out

    @property
    def added(self) -> int:
        return self.peak - self.start
