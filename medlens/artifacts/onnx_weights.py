"""The torch network back from an exported ``model.onnx`` (``medlens train --init-from
BUNDLED``): a bundled model ships no ``model.pt``.

The exported graph differs from the network in three ways, each undone here:

* weights stored as float16, or as int8 with a float32 scale per output channel
  (:func:`~medlens.artifacts.onnx.halve_weights`, :func:`~medlens.artifacts.onnx.quantize_weights`):
  the ``Cast``/``Mul`` nodes that rebuild them are evaluated (dequantized);
* the exporter folds each batch norm that follows a convolution into that convolution's weight
  and bias: the convolution takes the folded weight and the batch norm becomes the identity
  plus the folded bias (exact in eval mode); :func:`reestimate_batch_norm` then gives it
  statistics measured on images, so that a batch norm *training* on batch statistics also
  computes the base's function;
* parameters lose their names: the graph's parameter nodes (``Conv``, ``BatchNormalization``,
  ``Gemm``) that compute the logits are matched, in order, with the network's modules in the
  order a forward pass runs them; every tensor of the ``state_dict`` must be matched and every
  shape must agree, else :class:`~medlens.errors.ModelLoadError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medlens.errors import ModelLoadError

__all__ = ["OnnxWeights", "load_onnx_weights", "reestimate_batch_norm"]

_CONV, _BN, _LINEAR = (nn.Conv2d,), (nn.BatchNorm1d, nn.BatchNorm2d), (nn.Linear,)


@dataclass
class OnnxWeights:
    """What :func:`load_onnx_weights` did.

    Attributes:
        tensors: state_dict entries set.
        folded: the batch norms that had been folded into their convolution.
        storage: the graph's weight storage (float32, float16, int8 per output channel).
    """

    tensors: int
    folded: list[_BatchNorm] = field(default_factory=list)
    storage: str = "float32"


def load_onnx_weights(net: nn.Module, path: str | os.PathLike, image_size: int) -> OnnxWeights:
    """Set ``net``'s weights from the ONNX graph at ``path`` (its input ``image_size`` px).

    Raises:
        ModelLoadError: the graph's parameters do not match the network's one for one.
    """
    import onnx

    model = onnx.load(str(path))
    graph_ops = _graph_ops(model)
    torch_ops = _torch_ops(net, image_size)
    where = f"{path} ({len(graph_ops)} parameter operations)"
    if len(graph_ops) != len(torch_ops):
        raise ModelLoadError(
            f"{where} does not match the network ({len(torch_ops)} parameter modules); "
            "was it exported from another architecture, or is it an ensemble?"
        )
    assigned: dict[str, torch.Tensor] = {}
    folded: list[_BatchNorm] = []
    for (op, values), (kind, names, mods) in zip(graph_ops, torch_ops):
        if (op, kind) not in _COMPATIBLE:
            raise ModelLoadError(f"{where}: graph node {op} stands where the network has {kind}")
        if _assign(kind, names, mods, values, assigned):
            bn = mods[1]
            assert isinstance(bn, _BN)  # a conv_bn's second module
            folded.append(bn)
    _check_complete(net, assigned, where)
    with torch.no_grad():
        net.load_state_dict(assigned, strict=False)
    storage = {p.key: p.value for p in model.metadata_props}.get(
        "medlens.weights_storage", "float32"
    )
    return OnnxWeights(len(assigned), folded, storage)


_COMPATIBLE = {
    ("Conv", "conv"),
    ("Conv", "conv_bn"),
    ("BatchNormalization", "bn"),
    ("Gemm", "linear"),
}


def _graph_ops(model) -> list[tuple[str, list[np.ndarray | None]]]:
    """The parameter nodes the logits depend on, in graph order, with their constant inputs
    (weights dequantized); the Grad-CAM and statistics outputs are left out."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), ["logits"]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack += list(node.input)
    cache: dict[str, np.ndarray | None] = {}

    def value(name: str) -> np.ndarray | None:
        if name not in cache:
            cache[name] = _constant(name, inits, producer, value, numpy_helper)
        return cache[name]

    ops = []
    for node in graph.node:
        if id(node) in needed and node.op_type in ("Conv", "BatchNormalization", "Gemm"):
            values = [value(n) if n else None for n in node.input[1:]]
            if node.op_type == "Gemm" and values and values[0] is not None:
                attrs = {a.name: a.i for a in node.attribute}
                if not attrs.get("transB", 0):
                    values[0] = values[0].T
            ops.append((node.op_type, values))
    return ops


def _constant(name, inits, producer, value, numpy_helper) -> np.ndarray | None:
    """An initializer, or what a chain of Constant/Cast/Identity/Mul nodes makes of them."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type in ("Cast", "Identity"):
        v = value(node.input[0])
        return None if v is None else v.astype(np.float32)
    if node.op_type == "Mul":
        a, b = value(node.input[0]), value(node.input[1])
        return None if a is None or b is None else (a * b).astype(np.float32)
    return None


def _torch_ops(net: nn.Module, image_size: int) -> list[tuple[str, list[str], list[nn.Module]]]:
    """The network's parameter modules in the order a forward pass runs them; a convolution
    whose output goes straight into a batch norm is one ``conv_bn``."""
    names = {m: n for n, m in net.named_modules()}
    calls: list[tuple[nn.Module, int, int]] = []

    def hook(mod, inputs, output):
        calls.append((mod, id(inputs[0]), id(output)))

    handles = [m.register_forward_hook(hook) for m in names if isinstance(m, _CONV + _BN + _LINEAR)]
    channels = next(m for m in names if isinstance(m, _CONV)).in_channels
    was = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, channels, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    ops: list[tuple[str, list[str], list[nn.Module]]] = []
    i = 0
    while i < len(calls):
        mod, _, out = calls[i]
        if isinstance(mod, _CONV):
            nxt = calls[i + 1] if i + 1 < len(calls) else None
            if nxt is not None and isinstance(nxt[0], _BN) and nxt[1] == out:
                ops.append(("conv_bn", [names[mod], names[nxt[0]]], [mod, nxt[0]]))
                i += 2
                continue
            ops.append(("conv", [names[mod]], [mod]))
        else:
            ops.append(("bn" if isinstance(mod, _BN) else "linear", [names[mod]], [mod]))
        i += 1
    return ops


def _assign(kind: str, names: list[str], mods: list[nn.Module], values: list,
            out: dict[str, torch.Tensor]) -> bool:  # fmt: skip
    """Put one graph node's constants into ``out`` under the modules' state_dict names;
    True when a batch norm folded into its convolution was rebuilt as the identity."""

    def put(name: str, attr: str, v: np.ndarray | None) -> None:
        want = getattr(mods[0] if name == names[0] else mods[1], attr).shape
        if v is None or tuple(v.shape) != tuple(want):
            got = None if v is None else tuple(v.shape)
            raise ModelLoadError(
                f"model.onnx: {name}.{attr} has shape {tuple(want)} in the network but {got} in "
                "the graph"
            )
        out[f"{name}.{attr}"] = torch.from_numpy(np.array(v, dtype=np.float32, copy=True))

    conv_bias = values[1] if len(values) > 1 else None
    if kind == "bn":
        for attr, v in zip(("weight", "bias", "running_mean", "running_var"), values):
            put(names[0], attr, v)
        return False
    put(names[0], "weight", values[0])
    if kind in ("conv", "linear"):
        if mods[0].bias is not None:
            put(names[0], "bias", conv_bias)
        return False
    bn = mods[1]
    assert isinstance(bn, _BN)  # a conv_bn's second module
    width = bn.num_features
    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    put(names[1], "weight", ones)
    put(names[1], "bias", conv_bias if conv_bias is not None else zeros)
    put(names[1], "running_mean", zeros)
    put(names[1], "running_var", ones - np.float32(bn.eps))  # sqrt(var + eps) = 1
    return True


def _check_complete(net: nn.Module, assigned: dict, where: str) -> None:
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - set(assigned))
    if missing:
        raise ModelLoadError(
            f"{where}: {len(missing)} network tensor(s) have no counterpart in the graph "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
        )


def reestimate_batch_norm(
    net: nn.Module, folded: list[_BatchNorm], batches: Iterable[torch.Tensor]
) -> int:
    """Give each folded batch norm (the identity plus a bias, see :func:`load_onnx_weights`)
    the mean and variance of its input over ``batches`` (network inputs), keeping its eval
    output exactly: weight ``sqrt(var + eps)``, bias ``+ mean``. A batch norm that trains on
    batch statistics then computes (nearly) the base's function instead of rescaling every
    channel to unit variance.

    Returns:
        The images measured.
    """
    sums: dict[_BatchNorm, list] = {bn: [0.0, 0.0, 0] for bn in folded}

    def hook(mod, inputs, _output):
        x = inputs[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        s = sums[mod]
        s[0] = s[0] + x.sum(dims).double()
        s[1] = s[1] + (x * x).sum(dims).double()
        s[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_hook(hook) for bn in folded]
    was, seen = net.training, 0
    try:
        net.eval()
        with torch.no_grad():
            for b in batches:
                net(b)
                seen += len(b)
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    with torch.no_grad():
        for bn, (s, ss, n) in sums.items():
            if not n:
                continue
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0)
            running_mean, running_var = bn.running_mean, bn.running_var
            assert running_mean is not None and running_var is not None  # eval-mode statistics
            running_mean.copy_(mean.float())
            running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.add_(mean.float())
    return seen
