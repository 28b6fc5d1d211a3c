"""The CUDA path traced without a GPU: parameters as fake tensors on cuda:0, CUDA autocast's real policy, and
a count of every operator that makes the host wait for the GPU.

torch's FakeTensorMode runs each aten operator's shape and dtype rules without a kernel or a driver. What
still asks the driver is patched here, for the trace only:
- torch.cuda.is_available / is_bf16_supported, so CUDA autocast turns itself on with its own policy;
- the Python bindings of indexing, `to`, `~`, `contiguous` and `copy_`, which set the CUDA device in C++ before
  dispatching: they are re-expressed as the aten operators they dispatch to;
- the optimizers' graph-capture check and `pin_memory`, which query the driver.
Autograd asks the driver for a stream whenever it records a graph, so the forward runs with parameters not
requiring gradients (the same operators) and backward passes are traced piecewise; torch.compile cannot run
under fake tensors (Muon's Newton-Schulz runs uncompiled here).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Operators that copy a value to the host: .item(), bool(t), a boolean mask's nonzero, comparisons of whole tensors.
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
COPIES = {"_to_copy", "copy_"}


class HostWaits(TorchDispatchMode):
    """Records every operator that makes the host wait for the GPU: HOST_READS, and copies between the CPU
    and the GPU that are not non-blocking (a non-blocking copy from pinned memory is queued, not waited for)."""

    def __init__(self):
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS and args[0].device.type == "cuda":
            self.waits.append(name)
            if name == "_local_scalar_dense":  # a fake tensor has no value to read: 1 stands for it
                return 1.0 if args[0].dtype.is_floating_point else 1
        elif name in COPIES and _crosses_devices(args, kwargs) and not _non_blocking(name, args, kwargs):
            self.waits.append(f"blocking {name}")
        return func(*args, **kwargs)


def _crosses_devices(args, kwargs) -> bool:
    devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
    if kwargs.get("device") is not None:
        devices.add(torch.device(kwargs["device"]).type)
    return len(devices) > 1


def _non_blocking(name: str, args, kwargs) -> bool:
    if name == "copy_":
        return bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return bool(kwargs.get("non_blocking", False))


class AttentionInputs(TorchFunctionMode):
    """The dtypes of the queries, keys and values of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.dtypes.append(tuple(t.dtype for t in args[:3]))
        return func(*args, **(kwargs or {}))


def _basic_index(t: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """t after the ints, slices, None and ... of `index`, and the tensors of `index` by dimension (None elsewhere)."""
    index = index if isinstance(index, tuple) else (index,)
    named = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim, tensors = t, 0, []
    for i in index:
        if i is Ellipsis:
            tensors += [None] * (t.dim() - named)
            dim += t.dim() - named
        elif i is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
            tensors.append(None)
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            stop = 2**62 if i.stop is None else i.stop
            out, dim = aten.slice.Tensor(out, dim, i.start or 0, stop, i.step or 1), dim + 1
            tensors.append(None)
        else:
            tensors.append(i)
            dim += 1
    return out, tensors


def _getitem(t, index):
    view, tensors = _basic_index(t, index)
    return aten.index.Tensor(view, tensors) if any(i is not None for i in tensors) else view


def _setitem(t, index, value):
    view, tensors = _basic_index(t, index)
    if not isinstance(value, torch.Tensor):
        value = aten.full.default((), value, dtype=t.dtype, device=t.device)
    if any(i is not None for i in tensors):
        aten.index_put_.default(view, tensors, value)
    else:
        aten.copy_.default(view, value)


def _contiguous(t, memory_format=torch.contiguous_format):
    return t if t.is_contiguous(memory_format=memory_format) else aten.clone.default(t, memory_format=memory_format)


def _to(t, *args, copy: bool = False, **kwargs):
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    same = (device is None or torch.device(device) == t.device) and (dtype is None or dtype == t.dtype)
    if same and not copy:
        return _contiguous(t, memory_format) if memory_format is not None else t
    return aten._to_copy.default(t, dtype=dtype or t.dtype, device=device or t.device, non_blocking=non_blocking,
                                 memory_format=memory_format)


@contextlib.contextmanager
def fake_cuda():
    """Inside: FakeTensorMode, with the driver's answers patched as the module docstring says."""
    patches = [mock.patch("torch.cuda.is_available", lambda: True),
               mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
               mock.patch("torch.cuda.is_current_stream_capturing", lambda: False),
               mock.patch("torch.optim.Optimizer._accelerator_graph_capture_health_check", lambda self: None),
               mock.patch.object(torch.Tensor, "__getitem__", _getitem),
               mock.patch.object(torch.Tensor, "__setitem__", _setitem),
               mock.patch.object(torch.Tensor, "contiguous", _contiguous),
               mock.patch.object(torch.Tensor, "copy_", lambda t, s, non_blocking=False: aten.copy_.default(t, s, non_blocking)),
               mock.patch.object(torch.Tensor, "to", _to),
               mock.patch.object(torch.Tensor, "__invert__", lambda t: aten.bitwise_not.default(t)),
               mock.patch.object(torch.Tensor, "pin_memory", lambda t, *a, **k: t)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


def on_fake_cuda(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (built on the meta device) with every parameter and buffer a fake tensor on cuda:0; inside
    fake_cuda()."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cuda"))
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device="cuda")
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Parameters not requiring gradients inside: the forward's operators, with no autograd graph recorded."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
