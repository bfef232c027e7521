"""Export a trained model to ONNX and write its model card.

``medlens export --model RUN`` adds three files to a model folder:

* ``model.onnx`` - the :class:`~medlens.modeling.classifier.Classifier` traced by ``torch.onnx.export``
  with a dynamic batch axis. Input ``input``: the *normalised* ``float32 (N, C, S, S)``
  tensor that :meth:`Preprocess.normalize` produces (preprocessing stays in Python, so there
  is one definition of it). Outputs ``logits`` ``(N, outputs)``, ``features`` ``(N, F)`` (the
  penultimate features), ``cam`` ``(N, outputs, h, w)`` (Grad-CAM in closed form, see
  :class:`_InferenceGraph`) and ``stats`` (the activation statistics the out-of-distribution
  guard works on). The export is checked against the torch network on random input before it
  is written.
* ``model_card.json`` and ``model_card.md`` - labels, task, preprocessing, calibration,
  validation metrics with 95% intervals, training data, intended use and limitations, and the
  sha256 of ``model.onnx`` and ``model.pt`` (Mitchell et al., *Model Cards for Model
  Reporting*, FAT* 2019).

Inference through ONNX Runtime lives in :class:`medlens.inference.predictor.Predictor`; the session
options are made by :func:`ort_session`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from medlens.data.preprocess import Preprocess

if TYPE_CHECKING:
    import onnxruntime

    from medlens.modeling.classifier import Classifier


import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlens.artifacts.folders import MODEL_WEIGHTS, ONNX_FILE
from medlens.artifacts.model import ModelMeta
from medlens.errors import ExportError, ModelLoadError
from medlens.machine import usable_cores

OPSET = 17  # supported by the TorchScript exporter and by onnxruntime 1.31
INPUT, OUTPUTS = "input", ("logits", "features", "cam", "stats")


class _InferenceGraph(nn.Module):
    """Classifier -> (logits, penultimate features, class activation maps, activation
    statistics for the OOD guard): all four become ONNX outputs.

    ``cam`` ``(N, outputs, h, w)`` is Grad-CAM (Selvaraju et al. 2017) of every output logit on
    the last backbone stage, in closed form: the head (pooling, batch norm in eval mode,
    dropout, linear) is affine in the pooled features, so the gradient of logit ``k`` with
    respect to the feature map is the constant ``J[k] / (h * w)`` at every position, where
    ``J`` is the head's Jacobian. Grad-CAM's channel weights (spatial means of that gradient)
    are then ``J / (h * w)`` and the map is ``relu(sum_c weight_c * A_c)``, exactly what
    MONAI's ``GradCAM`` computes with autograd (tested), at the cost of a 1x1 convolution.
    """

    cam_weights: torch.Tensor  # a buffer: (outputs, features, 1, 1)

    def __init__(self, net):
        super().__init__()
        self.net = net
        head = net.head
        with torch.no_grad():
            eye = torch.eye(net.num_features)
            zero = torch.zeros(1, net.num_features)
            jac = (head.classify(eye) - head.classify(zero)).T  # (outputs, F)
            # The head must be affine for the closed form to be Grad-CAM.
            probe = torch.randn(3, net.num_features, generator=torch.Generator().manual_seed(0))
            if not torch.allclose(
                head.classify(probe), probe @ jac.T + head.classify(zero), rtol=1e-4, atol=1e-4
            ):
                raise ExportError(
                    "the classifier head is not affine in its features; the "
                    "closed-form Grad-CAM output cannot be exported"
                )
        self.register_buffer("cam_weights", jac[:, :, None, None].clone())

    def forward(self, x):
        fmap, stats = self.net.backbone_with_stats(x)
        feats = self.net.head.pooled(fmap)
        logits = self.net.head.classify(feats)
        area = fmap.shape[2] * fmap.shape[3]
        cam = torch.relu(nn.functional.conv2d(fmap, self.cam_weights) / area)
        return logits, feats, cam, stats


class EnsembleGraph(nn.Module):
    """K classifiers -> the mean of their logits and of their Grad-CAM maps (each resized to
    the first member's map), their features and activation statistics side by side.

    The input is normalised with the first member's ``Preprocess``; members normalised with
    other statistics (from-scratch runs use their training split's) get the per-channel
    affine map to theirs inside the graph. Members must share the geometry (size, channels,
    resize rule).
    """

    def __init__(self, nets: Sequence[Classifier], pres: Sequence[Preprocess]):
        super().__init__()
        self.members = nn.ModuleList(_InferenceGraph(n) for n in nets)
        mean0, std0 = torch.tensor(pres[0].mean), torch.tensor(pres[0].std)
        for i, pre in enumerate(pres):
            mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
            self.register_buffer(f"gain{i}", (std0 / std).view(1, -1, 1, 1).float())
            self.register_buffer(f"shift{i}", ((mean0 - mean) / std).view(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [
            m(x * getattr(self, f"gain{i}") + getattr(self, f"shift{i}"))
            for i, m in enumerate(self.members)
        ]
        size = outs[0][2].shape[-2:]
        cams = [
            o[2] if o[2].shape[-2:] == size else nn.functional.interpolate(o[2], size=size)
            for o in outs
        ]
        logits = torch.stack([o[0] for o in outs]).mean(0)
        cam = torch.stack(cams).mean(0)
        return logits, torch.cat([o[1] for o in outs], 1), cam, torch.cat([o[3] for o in outs], 1)


def onnx_bytes(net: Classifier | EnsembleGraph, meta: ModelMeta, opset: int = OPSET) -> bytes:
    """Trace ``net`` (or an :class:`EnsembleGraph`) to an ONNX model (bytes) with a dynamic
    batch axis.

    The legacy TorchScript exporter is used (``dynamo=False``): the torch.export-based one
    needs ``onnxscript``, which MedLens does not otherwise depend on.
    """
    import onnx

    # torch's stubs omit Module.to's memory_format (a documented keyword)
    net = net.float().to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    graph = net if isinstance(net, EnsembleGraph) else _InferenceGraph(net)
    pre = meta.preprocess
    dummy = torch.zeros(1, pre.channels, pre.image_size, pre.image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # "legacy exporter" deprecation notices on every export
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.eval(),
            (dummy,),
            buf,  # type: ignore[arg-type]  # a file object is documented; the stubs omit it
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={n: {0: "batch"} for n in (INPUT, *OUTPUTS)},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    # Provenance inside the graph: a stale model.onnx (exported before retraining) is
    # detected by comparing this hash with model.json's at load time.
    props = {
        "medlens.weights_sha256": meta.weights_sha256 or "",
        "medlens.labels": json.dumps(meta.labels),
        "medlens.preprocess": json.dumps(meta.preprocess.to_dict()),
        "medlens.temperature": repr(meta.temperature),
        "medlens.threshold": json.dumps(meta.threshold),
    }
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "medlens"
    return model.SerializeToString()


def _store_weights(model: bytes, encode: Callable, storage: str, min_elements: int) -> bytes:
    """Replace each float32 initializer of at least ``min_elements`` values by
    ``encode(name, array)`` -> (new initializers, nodes that rebuild ``name`` in float32).

    The rebuilding nodes (``Cast``, ``Mul``) read only initializers, so ONNX Runtime folds them
    into float32 constants when it loads the graph: inference runs as fast as before, and the
    only change is the rounding of the stored weights (re-measure the model after this step, as
    ``medlens export --half/--int8`` does).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load_from_string(model)
    kept, added, nodes = [], [], []
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if arr is None or arr.size < min_elements or not np.all(np.abs(arr) < 60000):
            kept.append(init)
            continue
        inits, rebuild = encode(init.name, arr)
        added += inits
        nodes += rebuild
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept + added)
    graph_nodes = nodes + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(graph_nodes)
    m.metadata_props.add(key="medlens.weights_storage", value=storage)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _as_float16(name: str, arr: np.ndarray) -> tuple[list, list]:
    from onnx import TensorProto, helper, numpy_helper

    stored = numpy_helper.from_array(arr.astype(np.float16), name=f"{name}.fp16")
    cast = helper.make_node(
        "Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT, name=f"{name}.to_fp32"
    )
    return [stored], [cast]


def _as_int8(name: str, arr: np.ndarray) -> tuple[list, list]:
    """Symmetric 8-bit integers with one float32 scale per output channel (axis 0); vectors
    (biases, norms) stay float16."""
    from onnx import TensorProto, helper, numpy_helper

    if arr.ndim < 2:
        return _as_float16(name, arr)
    peak = np.abs(arr.reshape(len(arr), -1)).max(axis=1)
    scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    scale = scale.reshape((-1,) + (1,) * (arr.ndim - 1))
    q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(q, name=f"{name}.int8"),
        numpy_helper.from_array(scale, name=f"{name}.scale"),
    ]
    nodes = [
        helper.make_node(
            "Cast", [f"{name}.int8"], [f"{name}.q"], to=TensorProto.FLOAT, name=f"{name}.to_fp32"
        ),
        helper.make_node("Mul", [f"{name}.q", f"{name}.scale"], [name], name=f"{name}.scaled"),
    ]
    return inits, nodes


def halve_weights(model: bytes, min_elements: int = 256) -> bytes:
    """Store the graph's large float32 weights as float16 (about 3 significant digits; half
    the size), computing in float32 as before (see :func:`_store_weights`)."""
    return _store_weights(model, _as_float16, "float16", min_elements)


def quantize_weights(model: bytes, min_elements: int = 256) -> bytes:
    """Store the graph's large weight matrices and kernels as 8-bit integers with a float32
    scale per output channel (a quarter of float32's size), computing in float32 as before
    (see :func:`_store_weights`). Weight-only: activations are not quantized."""
    return _store_weights(model, _as_int8, "int8 per output channel", min_elements)


def ort_session(
    model: bytes | str | os.PathLike, threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An ``onnxruntime.InferenceSession`` on the CPU, tuned for latency.

    Args:
        model: ``.onnx`` path or serialised model bytes.
        threads: intra-op threads; default every core this process may run on.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or usable_cores()
    so.inter_op_num_threads = 1  # the graph is a chain: no parallel branches to run
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def check_onnx(
    net: Classifier | EnsembleGraph,
    model: bytes,
    meta: ModelMeta,
    batch: int = 2,
    rtol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Compare ONNX Runtime's logits with the torch network's (or ensemble graph's) on random
    normal input.

    Returns:
        The relative error ``max|onnx - torch| / max|torch|``.

    Raises:
        ExportError: the relative error exceeds ``rtol``.
    """
    pre = meta.preprocess
    x = torch.randn(
        batch,
        pre.channels,
        pre.image_size,
        pre.image_size,
        generator=torch.Generator().manual_seed(seed),
    )
    # torch's stubs omit Module.to's memory_format (a documented keyword)
    net = net.float().to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    with torch.no_grad():
        ref = net(x)
        ref = (ref[0] if isinstance(net, EnsembleGraph) else ref).numpy()
    got = ort_session(model).run([OUTPUTS[0]], {INPUT: x.numpy()})[0]
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    if not err <= rtol:
        raise ExportError(
            f"the ONNX graph's logits differ from torch's by {err:.2e} (relative; "
            f"allowed {rtol:.0e}); the network uses an operation the exporter "
            "does not translate faithfully"
        )
    return err


def onnx_weights_sha256(session: onnxruntime.InferenceSession) -> str | None:
    """The ``model.pt`` hash recorded in an exported graph (None for foreign ONNX files)."""
    return session.get_modelmeta().custom_metadata_map.get("medlens.weights_sha256") or None


def check_onnx_matches(
    session: onnxruntime.InferenceSession, meta: ModelMeta, folder: Path
) -> None:
    """Refuse a ``model.onnx`` exported from other weights than ``model.pt``."""
    recorded = onnx_weights_sha256(session)
    expected = meta.weights_sha256
    if recorded and expected and recorded != expected:
        raise ModelLoadError(
            f"{folder / ONNX_FILE} was exported from other weights than "
            f"{folder / MODEL_WEIGHTS} (sha256 {recorded[:12]} vs "
            f"{expected[:12]}); re-run `medlens export --model {folder}`"
        )
