"""kernels.autograd: zero-copy gradients through inference tensors (pure torch)."""
import contextlib

import pytest
import torch



def _inference_mlp(dtype=torch.float32):
    with torch.inference_mode():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        m.register_buffer("scale", torch.full((4,), 2.0))
        m = m.to(dtype)
    return m


def _forward(m, x):
    return m(x) * m.scale


def test_inference_weights_refuse_backward_without_help(K):
    m = _inference_mlp()
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _forward(m, x).sum().backward()


def test_alias_shares_storage_and_is_normal(K):
    m = _inference_mlp()
    w = m[0].weight
    a = K.autograd.alias(w)
    assert w.is_inference() and not a.is_inference()
    assert a.data_ptr() == w.data_ptr() and torch.equal(a, w)


def test_differentiable_weights_gives_grads_without_copying(K):
    m = _inference_mlp()
    before = K.fingerprint.state_digest(m.state_dict())
    originals = {n: p for n, p in m.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    x = torch.randn(3, 8, requires_grad=True)
    with K.autograd.differentiable_weights(m, trainable={"2.weight"}) as view:
        # inside: every parameter is a zero-copy alias of the original storage
        for n, p in m.named_parameters():
            assert not p.is_inference() and p.data_ptr() == ptrs[n]
        _forward(m, x).pow(2).sum().backward()
        g = view.trainable["2.weight"].grad
    assert view.copied_bytes == 0 and view.aliased == 7  # 6 parameters + 1 buffer
    assert g is not None and g.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # gradient matches a reference computed on plain (cloned) weights
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ref.load_state_dict({k: v.clone() for k, v in m.state_dict().items() if k != "scale"})
    xr = x.detach().clone().requires_grad_(True)
    (ref(xr) * 2.0).pow(2).sum().backward()
    assert torch.allclose(g, ref[2].weight.grad) and torch.allclose(x.grad, xr.grad)
    # after: the very same parameter objects are back, weights bit-identical
    assert all(p is originals[n] for n, p in m.named_parameters())
    assert K.fingerprint.state_digest(m.state_dict()) == before


def test_low_precision_trainables_get_fp32_grads(K):
    m = _inference_mlp(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with K.autograd.differentiable_weights(m, trainable=lambda n: n == "0.weight") as view:
        p = view.trainable["0.weight"]
        out = torch.nn.functional.linear(x, p.to(torch.bfloat16), m[0].bias)
        out.float().sum().backward()
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    assert view.copied_bytes == 16 * 8 * 4


def test_in_place_write_is_detected_and_params_restored(K):
    m = _inference_mlp()
    originals = [p for p in m.parameters()]
    with pytest.raises(RuntimeError, match="modified in place"):
        with K.autograd.differentiable_weights(m):
            with torch.no_grad():
                m[0].bias.add_(1.0)
    assert all(a is b for a, b in zip(m.parameters(), originals))


def test_params_restored_when_the_block_raises(K):
    m = _inference_mlp()
    originals = [p for p in m.parameters()]
    with pytest.raises(KeyError):
        with K.autograd.differentiable_weights(m):
            raise KeyError("boom")
    assert all(a is b for a, b in zip(m.parameters(), originals))


def test_must_leave_inference_mode(K):
    m = _inference_mlp()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        with K.autograd.differentiable_weights(m):
            pass


class _InPlaceBlock(torch.nn.Module):
    """The pattern ComfyUI's transformer blocks use: residual updates done in place."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = self.proj(x) + x
        h = self.norm(x)  # saves x for backward
        x += h            # ...which is then modified in place
        return x


def test_in_place_activation_updates_differentiate_correctly(K):
    with torch.inference_mode():
        torch.manual_seed(1)
        m = _InPlaceBlock()
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        with K.autograd.differentiable_weights(m, snapshot_saved=False):
            m(x).pow(2).sum().backward()
    x.grad = None
    with K.autograd.differentiable_weights(m, trainable={"proj.weight"}) as view:
        m(x).pow(2).sum().backward()
        g = view.trainable["proj.weight"].grad
    # reference: the same maths written without in-place updates, on plain tensors
    ref = _InPlaceBlock()
    ref.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    xr = x.detach().clone().requires_grad_(True)
    y = ref.proj(xr) + xr
    (y + ref.norm(y)).pow(2).sum().backward()
    assert torch.allclose(g, ref.proj.weight.grad, atol=1e-6) and torch.allclose(x.grad, xr.grad, atol=1e-6)


class _CastLinear(torch.nn.Module):
    """What ComfyUI's manual-cast ops do: a low-precision weight cast to the compute dtype per call."""

    def __init__(self, n, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n).to(dtype), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))


class _CastBlock(torch.nn.Module):
    def __init__(self, n=16, dtype=torch.bfloat16):
        super().__init__()
        self.a, self.b = _CastLinear(n, dtype), _CastLinear(n, dtype)

    def forward(self, x):
        h = self.a(x)
        h += torch.tanh(h)  # an in-place update of a saved activation
        return self.b(torch.tanh(h))


def test_weight_casts_are_saved_by_reference_not_cloned(K):
    with torch.inference_mode():
        torch.manual_seed(2)
        m = _CastBlock()
    x = torch.randn(4, 16, requires_grad=True)
    with K.autograd.differentiable_weights(m) as view:
        m(x).pow(2).sum().backward()
    # reference without any hook, on plain fp32 copies of the bf16 weights
    wa, wb = (w.detach().clone().float() for w in (m.a.weight, m.b.weight))
    xr = x.detach().clone().requires_grad_(True)
    h = xr @ wa.t()
    h = h + torch.tanh(h)
    (torch.tanh(h) @ wb.t()).pow(2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    # only activations were snapshotted: none of the two fp32 weight casts (16x16x4 bytes each)
    activations = 4 * 16 * 4
    assert 0 < view.snapshot_bytes <= 4 * activations, view.snapshot_bytes


def test_a_weight_shaped_tensor_written_after_saving_is_refused(K):
    w = torch.randn(8, 8)
    x = torch.randn(8, 8, requires_grad=True)
    with K.autograd.activation_snapshots([w]):
        c = w.t().contiguous().t() * 1.0  # weight-shaped, outside autograd: saved by reference
        y = (x @ c).sum()
        c.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place before backward"):
        y.backward()


def test_weight_shaped_views_of_a_shared_buffer_are_still_snapshotted(K):
    """ComfyUI 0.33 casts offloaded weights into views of one cast buffer, reused by the next
    layer: such a view must be copied when saved, or the next layer's cast would overwrite it."""
    buffer = torch.empty(2 * 64)
    w1, w2 = torch.randn(8, 8), torch.randn(8, 8)
    x = torch.randn(8, 8, requires_grad=True)
    with K.autograd.activation_snapshots([w1, w2]):
        c = buffer[:64].view(8, 8)
        c.copy_(w1)                 # layer 1's cast
        y = x @ c
        c.copy_(w2)                 # layer 2 reuses the buffer
        z = (y @ c).sum()
    z.backward()
    xr = x.detach().clone().requires_grad_(True)
    ((xr @ w1) @ w2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing for in-place code, and weight casts made again at backward
# ---------------------------------------------------------------------------------------------
class _BlockWithInPlace(torch.nn.Module):
    """A block written as ComfyUI's are: it updates a saved activation in place (a norm read it),
    and updates its own input in place (Flux's blocks: ``img += ...``); it returns a tensor and a
    dict."""

    def __init__(self):
        super().__init__()
        self.norm, self.lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0, extra=None):
        y = self.norm(x)
        x += self.lin(y) * scale
        return x.sin(), {"aux": y.pow(2).sum(), "extra": extra}


def _plain_block(blk, x, scale):
    y = blk.norm(x)
    return (x + blk.lin(y) * scale).sin(), y.pow(2).sum()


def _block_grads(blk, run, rows=4):
    torch.manual_seed(3)
    x = torch.randn(rows, 8, requires_grad=True)
    out, aux = run(x * 1.0)
    (out.pow(2).sum() + aux).backward()
    grads = (x.grad.clone(), blk.lin.weight.grad.clone())
    blk.zero_grad()
    return grads


def test_torch_checkpoint_gets_in_place_blocks_wrong(K):
    """Why the pack has its own checkpointing: torch.utils.checkpoint (what ComfyUI's TrainLoraNode
    patches in) keeps the recomputation's saved tensors without autograd's version check, so a
    block that updates an activation in place after a norm read it (ComfyUI's transformer
    blocks: ``x += attn(norm(x))``) gets a wrong gradient, silently."""
    import torch.utils.checkpoint as ckpt
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def block(x, in_place):
        x = x * 1.0
        y = norm(x)
        if in_place:
            x += lin(y)
        else:
            x = x + lin(y)
        return x.sin()
    x = torch.randn(4, 8, requires_grad=True)
    plain = torch.autograd.grad(block(x, False).pow(2).sum(), x)[0]
    wrong = torch.autograd.grad(ckpt.checkpoint(block, x, True, use_reentrant=False).pow(2).sum(), x)[0]
    assert (wrong - plain).abs().max() > 1e-2
    with K.autograd.checkpointed_modules([]):
        right = torch.autograd.grad(K.autograd.checkpointed(block)(x, True).pow(2).sum(), x)[0]
    assert torch.allclose(right, plain, atol=1e-6)


def test_checkpointed_modules_give_the_plain_gradients_and_restore_the_module(K):
    torch.manual_seed(0)
    blk = _BlockWithInPlace()
    plain = _block_grads(blk, lambda x: _plain_block(blk, x, 2.0))
    marker = object()

    def run(x):
        with K.autograd.checkpointed_modules([blk]) as n:
            assert n == 1
            out, d = blk(x, scale=2.0, extra=marker)
        assert d["extra"] is marker            # non-tensor results come back as they were
        return out, d["aux"]
    got = _block_grads(blk, run)
    assert "forward" not in vars(blk)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


def test_checkpointed_inputs_can_wait_in_host_memory(K):
    """``offload``: the inputs are kept as host copies until backward (on a GPU: system memory);
    the gradients are the same, and the block's own inputs are not held."""
    torch.manual_seed(0)
    blk = _BlockWithInPlace()
    plain = _block_grads(blk, lambda x: _plain_block(blk, x, 2.0), rows=1024)
    made = []
    real = K.autograd._Offloaded.__init__

    def recording(self, t, host):
        made.append(tuple(t.shape))
        real(self, t, host)

    def run(x):
        with K.autograd.checkpointed_modules([blk], offload=torch.device("cpu")):
            out, d = blk(x, scale=2.0)
        return out, d["aux"]
    K.autograd._Offloaded.__init__ = recording
    try:
        got = _block_grads(blk, run, rows=1024)
    finally:
        K.autograd._Offloaded.__init__ = real
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert made == [(1024, 8)]            # the block's input (small ones stay where they are)


def test_checkpointing_keeps_only_the_inputs(K):
    """With autograd on, a checkpointed block keeps its inputs, not its activations: the graph
    holds no tensor made inside the block until backward runs it again."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                                       torch.nn.Linear(256, 64)) for _ in range(4)])
    x = torch.randn(32, 64, requires_grad=True)

    def saved_bytes(checkpointing):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        with contextlib.ExitStack() as stack:
            if checkpointing:
                stack.enter_context(K.autograd.checkpointed_modules(list(blocks)))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = blocks(x * 1.0)
        y.sum().backward()
        return sum(total)
    assert saved_bytes(True) == 0 < saved_bytes(False)


def test_a_block_that_trains_inside_is_differentiated_without_grad_inputs(K):
    """Extract's K/V weights collect their gradients themselves; the block is still run again at
    backward when nothing that enters it requires grad."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    ref = torch.autograd.grad(lin(x).pow(2).sum(), lin.weight)[0]
    lin.weight.grad = None
    with K.autograd.checkpointed_modules([lin], trains=lambda m: True):
        out = lin(x)
    assert out.requires_grad
    out.pow(2).sum().backward()
    assert torch.allclose(lin.weight.grad, ref)


def test_an_input_changed_after_the_block_ran_is_refused(K):
    blk = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 1.0
    with K.autograd.checkpointed_modules([blk]):
        y = blk(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the block ran"):
        y.sum().backward()


def test_weight_casts_made_again_at_backward_give_the_same_gradient(K, monkeypatch):
    """``recast``: a weight cast is not kept for backward but made again when backward needs it;
    the gradient is the same to the bit."""
    with torch.inference_mode():
        torch.manual_seed(2)
        m = _CastBlock()
    made, sources = [], {}

    def forward(self, x):                  # what the node layer does: know which layer cast what
        cast = self.weight.to(x.dtype)
        sources[id(cast)] = self.weight
        return torch.nn.functional.linear(x, cast)

    def recast(cast):
        source = sources.get(id(cast))
        if source is None:
            return None

        def remake():
            made.append(tuple(cast.shape))
            return source.to(cast.dtype)
        return remake
    monkeypatch.setattr(_CastLinear, "forward", forward)
    grads = []
    for rc in (None, recast):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with K.autograd.differentiable_weights(m, snapshot_saved=False) as view:
            weights = list(m.parameters())
            with K.autograd.activation_snapshots(weights, view, recast=rc):
                y = m(x).pow(2).sum()
            y.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert len(made) == 2                      # both casts were made again at backward
