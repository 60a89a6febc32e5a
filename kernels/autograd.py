"""Gradients through models whose weights are inference tensors.

ComfyUI builds and runs models under ``torch.inference_mode()``. Tensors created there are
*inference tensors*: autograd refuses to save them for backward, even later inside
``torch.inference_mode(False)`` ("Inference tensors cannot be saved for backward").

The usual workaround, cloning every weight, keeps a second full copy of the model in memory.
We avoid that: an inference tensor's *storage* is an ordinary storage; only the tensor object
carries the inference flag. ``alias(t)`` builds a fresh, normal tensor object over the same
storage (same data pointer, no copy), which autograd accepts. ``differentiable_weights``
swaps such aliases into a module for the duration of a ``with`` block and puts the original
parameter objects back afterwards, whatever happens inside.

The aliases share memory with the model, so nothing may write to them in place. The context
manager verifies this cheaply on exit (version counters), and the test suite checks the
weights bit for bit.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch


def alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor sharing ``t``'s storage, without copying.

    Works for inference and normal tensors alike, and must be called outside inference mode
    (inside it, every new tensor is an inference tensor again).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "alias() must run outside torch.inference_mode(); wrap the call in "
            "torch.inference_mode(False)")
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


def storage_key(t: torch.Tensor) -> int:
    """Which storage a tensor lives in (its aliases and views share the key). The storage object's
    own handle, not its data pointer: tensors without data (fake tensors, used to count a job's
    memory) all report data pointer 0."""
    return t.untyped_storage()._cdata


@dataclass
class WeightView:
    """What :func:`differentiable_weights` hands back inside its block."""

    trainable: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    """Aliased parameters that require grad, by qualified name. Read ``.grad`` after backward."""

    aliased: int = 0
    """How many parameters and buffers were aliased (zero-copy)."""

    copied_bytes: int = 0
    """Bytes copied: only trainable tensors whose dtype had to change (e.g. fp16 -> fp32)."""

    snapshot_bytes: int = 0
    """Bytes of activation snapshots taken for backward so far (see ``snapshot_saved``)."""


def _named_slots(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, bool]]:
    """(qualified name, owning module, local name, is_parameter) for every parameter and buffer."""
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for local, p in list(mod._parameters.items()):
            if p is not None:
                yield prefix + local, mod, local, True
        for local, b in list(mod._buffers.items()):
            if b is not None:
                yield prefix + local, mod, local, False


@contextlib.contextmanager
def differentiable_weights(
    module: torch.nn.Module,
    trainable: Iterable[str] | Callable[[str], bool] = (),
    grad_dtype: torch.dtype | None = torch.float32,
    snapshot_saved: bool = True,
) -> Iterator[WeightView]:
    """Make ``module`` usable with autograd without changing or copying its weights.

    Inside the block every parameter and buffer of ``module`` is a normal tensor that aliases
    the original storage. Parameters named in ``trainable`` (a collection of qualified names,
    or a predicate on them) require grad; their gradients land in ``view.trainable[name].grad``.

    ``grad_dtype``: trainable weights stored in a lower precision are given as a copy in this
    dtype (fp32 by default) so that gradients are computed in fp32; only those few tensors are
    copied. Pass ``None`` to keep the stored dtype.

    ``snapshot_saved``: inference code often updates activations in place (``x += attn(x)``),
    which autograd rejects at backward ("modified by an inplace operation") when the old value
    was saved. With this on (default), every activation autograd saves is saved as a snapshot
    (a clone at save time), so such code differentiates correctly without being rewritten.
    Weights are still saved by reference. The cost is one copy of each saved activation.

    Must be entered outside ``torch.inference_mode()``. On exit every original parameter object
    is restored, and a ``RuntimeError`` is raised if anything wrote to the shared storage.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "differentiable_weights() must be entered inside torch.inference_mode(False)")
    wanted = trainable if callable(trainable) else set(trainable).__contains__
    view = WeightView()
    saved: list[tuple[torch.nn.Module, str, bool, torch.Tensor, torch.Tensor, int]] = []
    seen: set[tuple[int, str]] = set()
    try:
        for qual, owner, local, is_param in _named_slots(module):
            if (id(owner), local) in seen:
                continue  # a shared submodule reached twice
            seen.add((id(owner), local))
            orig = owner._parameters[local] if is_param else owner._buffers[local]
            a = alias(orig)
            if is_param:
                train = bool(wanted(qual))
                if train and grad_dtype is not None and a.dtype != grad_dtype and a.is_floating_point():
                    a = a.to(grad_dtype)
                    view.copied_bytes += a.numel() * a.element_size()
                new = torch.nn.Parameter(a, requires_grad=train)
                if train:
                    view.trainable[qual] = new
                owner._parameters[local] = new
            else:
                new = a
                owner._buffers[local] = new
            view.aliased += 1
            saved.append((owner, local, is_param, orig, new, new._version))
        if snapshot_saved:
            with activation_snapshots((e[4] for e in saved), view):
                yield view
        else:
            yield view
    finally:
        written = []
        for owner, local, is_param, orig, new, version in reversed(saved):
            if is_param:
                owner._parameters[local] = orig
            else:
                owner._buffers[local] = orig
            if new._version != version and storage_key(new) == storage_key(orig):
                written.append(local)
        # Drop our references so the aliases are freed with the graph.
        saved.clear()
    if written:
        raise RuntimeError(
            f"differentiable_weights: {len(written)} shared weight tensor(s) were modified in "
            f"place inside the block (first: {written[0]}); the model's own weights may have "
            "changed. This is a bug in the calling code.")


@contextlib.contextmanager
def activation_snapshots(weights: Iterable[torch.Tensor] = (), view: WeightView | None = None,
                         recast: Callable[[torch.Tensor], Callable[[], torch.Tensor] | None] | None = None
                         ) -> Iterator[None]:
    """Make code that updates activations in place (``x += f(x)``) differentiable.

    Autograd saves some inputs for backward and refuses, at backward time, those that were later
    modified in place ("modified by an inplace operation"). Inside this block every saved
    activation is saved as a snapshot taken at save time: one clone per (tensor, version), held
    through weak references so the cache never keeps a graph alive. Tensors sharing storage with
    ``weights`` are saved by reference (they must not be written in place), and so are casts of
    them (tensors outside autograd with a weight's shape: what manual-cast ops make of fp8, fp16
    or bf16 weights on each call), with a check at backward that they were not written since.
    Snapshot bytes are added to ``view.snapshot_bytes`` when a view is given.

    ``recast``: given such a weight cast, a function that makes it again (or None). With it, a
    cast is not kept for backward at all: it is made again when backward needs it (a fp8 model
    computing in bf16 then holds no bf16 copy of its weights during backward; the cast costs one
    more copy per layer at backward time).
    """
    weights = list(weights)
    keep = {storage_key(w) for w in weights}
    weight_shapes = {tuple(w.shape) for w in weights if w.dim() >= 2}
    cache: dict[tuple, tuple] = {}

    def pack(t: torch.Tensor):
        if storage_key(t) in keep:
            return t
        base = t if t._base is None else t._base
        if (not t.requires_grad and t.grad_fn is None and tuple(base.shape) in weight_shapes
                and t.numel() == base.numel()):
            # A weight cast (manual-cast ops: fp8/fp16/bf16 weights cast to the compute dtype for
            # each call), or its transpose (what a linear layer saves). Cloning it would keep a
            # second copy of the weight; save it by reference and check at backward that nothing
            # wrote to it meanwhile. Views into a larger tensor are still cloned: ComfyUI 0.33
            # casts offloaded weights into views of a cast buffer that the next layer reuses.
            remake = recast(base) if recast is not None else None
            if remake is not None:
                return _Recompute(remake, t.size(), t.stride(), t.storage_offset(), t.dtype)
            return _ByReference(t, t._version)
        key = (id(t), t._version)
        hit = cache.get(key)
        if hit is not None and hit[0]() is t:
            snap = hit[1]()
            if snap is not None:
                return snap
        snap = t.clone()
        if view is not None:
            view.snapshot_bytes += snap.numel() * snap.element_size()
        drop = lambda _ref, key=key: cache.pop(key, None)  # noqa: E731  (entry dies with either tensor)
        cache[key] = (weakref.ref(t, drop), weakref.ref(snap, drop))
        return snap

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


class _ByReference:
    """A saved tensor kept by reference, with its version at save time."""
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int):
        self.tensor, self.version = tensor, version


class _Recompute:
    """A saved weight cast kept as the recipe that makes it (and the view of it that was saved)."""
    __slots__ = ("remake", "size", "stride", "offset", "dtype")

    def __init__(self, remake, size, stride, offset, dtype):
        self.remake, self.size, self.stride, self.offset, self.dtype = remake, size, stride, offset, dtype


def _unpack(saved):
    if isinstance(saved, _Recompute):
        base = saved.remake()
        if base.dtype != saved.dtype:
            raise RuntimeError(f"activation_snapshots: a weight cast was made again as {base.dtype}, "
                               f"not {saved.dtype}; this is a bug in the pack (kernels/autograd.py).")
        return base.as_strided(saved.size, saved.stride, saved.offset)
    if isinstance(saved, _ByReference):
        if saved.tensor._version != saved.version:
            raise RuntimeError(
                "activation_snapshots: a tensor saved by reference as a weight cast was modified "
                "in place before backward; its gradient would be wrong. This is a bug in the pack "
                "(kernels/autograd.py): the tensor should have been snapshotted.")
        return saved.tensor
    return saved


# ---------------------------------------------------------------------------------------------
# gradient checkpointing that is right for code updating activations in place
# ---------------------------------------------------------------------------------------------
#: What a checkpointed call keeps until backward, per call: its tensor inputs (by reference,
#: version-checked) and how to run it again.
class _CheckpointedCall(torch.autograd.Function):
    """Run ``fn`` without keeping its activations; at backward, run it again with autograd (inside
    :func:`activation_snapshots`, so in-place updates inside it differentiate correctly) and
    back-propagate through that.

    ``torch.utils.checkpoint`` (non-reentrant, what ComfyUI's own TrainLoraNode uses) keeps the
    tensors the recomputation saves by reference, without autograd's version check: a block that
    updates a saved activation in place afterwards (``x += attn(x)`` after a norm read ``x``, as
    ComfyUI's transformer blocks do) then gets a wrong gradient, silently. Measured on a
    LayerNorm + in-place add: 0.25 off in the input gradient. Here the recomputation is an
    ordinary autograd forward under the snapshot hook, which autograd checks as usual.
    """

    @staticmethod
    def forward(ctx, call, _anchor, *tensors):
        ctx.call = call
        if call.offload is not None:     # kept in host memory until backward (copies: no version to check)
            ctx.inputs = [(to_host(t, call.offload), None) for t in tensors]
        else:
            ctx.inputs = [(t, t._version) for t in tensors]
        # the block may update its inputs in place (Flux's blocks do: img += ...); it runs on
        # copies, so the inputs kept for the recomputation stay what the block was given
        flat = torch.utils._pytree.tree_flatten(call.run([_copy(t) for t in tensors]))
        call.out_spec = flat[1]
        call.out_items = [_TENSOR if isinstance(o, torch.Tensor) else o for o in flat[0]]
        outs = tuple(o for o in flat[0] if isinstance(o, torch.Tensor))
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        leaves = []
        for t, version in ctx.inputs:
            if version is not None and t._version != version:
                raise RuntimeError(
                    "checkpointed block: an input was modified in place after the block ran; its "
                    "recomputation would differ. This is a bug in the pack (kernels/autograd.py).")
            if isinstance(t, _Offloaded):
                t = t.back()
            leaf = t.detach()
            if t.requires_grad and t.is_floating_point():
                leaf.requires_grad_(True)
            leaves.append(leaf)
        ctx.inputs = None
        with torch.enable_grad(), activation_snapshots(call.weights, recast=call.recast):
            # copies again: the block may update its inputs in place, which autograd refuses on
            # a leaf that requires grad
            out = call.run([_copy(x) for x in leaves])
            outs = [o for o in torch.utils._pytree.tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *[x.grad if x.requires_grad else None for x in leaves])


_TENSOR = object()   # where a checkpointed call's result had a tensor


class _Offloaded:
    """A checkpointed block's input kept in host memory: a copy, and where it came from."""
    __slots__ = ("copy", "device", "requires_grad")

    def __init__(self, t: torch.Tensor, host):
        self.copy = t.detach().to(host, copy=True)
        self.device, self.requires_grad = t.device, t.requires_grad

    def back(self) -> torch.Tensor:
        t = self.copy.to(self.device, copy=True)
        return t.requires_grad_(True) if self.requires_grad else t

    @property
    def _version(self):
        return None


def to_host(t: torch.Tensor, host) -> "_Offloaded | torch.Tensor":
    """A checkpointed block's floating-point input, copied to ``host`` memory until backward
    (other inputs, small, stay as they are)."""
    return _Offloaded(t, host) if t.is_floating_point() and t.numel() > 4096 else t


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_floating_point() else t


class _Call:
    """One checkpointed call: its function, how to put tensors back into its arguments, and (after
    the forward) the structure of its result."""
    __slots__ = ("fn", "flat", "where", "spec", "weights", "recast", "offload", "out_spec", "out_items")

    def __init__(self, fn, flat, spec, weights, recast, offload=None):
        self.fn, self.flat, self.spec, self.weights, self.recast = fn, flat, spec, weights, recast
        self.offload = offload
        self.where = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        # the tensors themselves are not kept here (the Function keeps what it must, maybe offloaded)
        self.flat = [None if isinstance(a, torch.Tensor) else a for a in flat]
        self.out_spec = self.out_items = None

    def run(self, tensors):
        items = list(self.flat)
        for i, t in zip(self.where, tensors):
            items[i] = t
        args, kwargs = torch.utils._pytree.tree_unflatten(items, self.spec)
        return self.fn(*args, **kwargs)

    def result(self, outs):
        outs = iter(outs if isinstance(outs, tuple) else (outs,))
        items = [next(outs) if o is _TENSOR else o for o in self.out_items]
        return torch.utils._pytree.tree_unflatten(items, self.out_spec)


def checkpointed(fn: Callable, weights: Iterable[torch.Tensor] = (), trains_inside: bool = False,
                 recast=None, offload=None) -> Callable:
    """``fn`` (a block's forward) with gradient checkpointing that is right for in-place code
    (see :class:`_CheckpointedCall`): with autograd on, only its tensor inputs are kept, and it
    runs again at backward. ``weights``: the block's weights (saved by reference in the
    recomputation, as :func:`activation_snapshots` does; ``recast`` as there). ``trains_inside``:
    the block holds weights that collect their gradients themselves (Extract's K/V scores), so it
    is differentiated even when no input requires grad. ``offload``: a device (the host) where the
    inputs wait for backward instead of the compute device. Without autograd it simply runs ``fn``."""
    weights = list(weights)

    def run(*args, **kwargs):
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if not (torch.is_grad_enabled() and (trains_inside or any(t.requires_grad for t in tensors))):
            return fn(*args, **kwargs)
        call = _Call(fn, flat, spec, weights, recast, offload)
        anchor = torch.zeros((), requires_grad=trains_inside)
        return call.result(_CheckpointedCall.apply(call, anchor, *tensors))

    return run


@contextlib.contextmanager
def checkpointed_modules(modules: Iterable[torch.nn.Module], weights: Iterable[torch.Tensor] = (),
                         trains: Callable[[torch.nn.Module], bool] = lambda m: False,
                         recast=None, offload=None) -> Iterator[int]:
    """Gradient checkpointing for each of ``modules`` (:func:`checkpointed` over its forward) for
    the duration of the ``with``; yields how many were wrapped. The wrappers are instance
    attributes over the class's forward, removed on exit: nothing of the modules changes."""
    weights = list(weights)
    wrapped = []
    try:
        for m in modules:
            if "forward" in vars(m):
                continue
            own = [p for p in m.parameters()] + [b for b in m.buffers()]
            m.forward = checkpointed(m.forward, own or weights, trains(m), recast, offload)
            wrapped.append(m)
        yield len(wrapped)
    finally:
        for m in wrapped:
            del m.forward
