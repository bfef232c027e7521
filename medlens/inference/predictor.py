"""Prediction and Grad-CAM explanations for a trained model.

:class:`Predictor` is the one inference path: decoded pixels -> :class:`Preprocess` (the
model's own saved spec: ``prepare`` then ``normalize``) -> network -> temperature-scaled
probabilities -> label at the stored threshold. Evaluation, ``medlens predict`` and the web
app all go through it.

The network's logits come from ONNX Runtime when the model folder has ``model.onnx``
(``medlens export``), or when asked with ``backend="onnx"`` (the graph is then exported in
memory); the torch network, when the folder has ``model.pt``, serves the torch backend and MONAI's
Grad-CAM. A folder with only ``model.json`` and ``model.onnx`` (a bundled model) runs on ONNX
Runtime alone, Grad-CAM included (the graph's ``cam`` output).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from numpy.typing import ArrayLike

from medlens.artifacts.folders import MODEL_JSON, MODEL_WEIGHTS, resolve_model
from medlens.artifacts.model import (
    ModelMeta,
    check_file,
    check_onnx_file,
    load_network,
    read_meta,
)
from medlens.errors import ModelLoadError, ModelOutputError
from medlens.evaluation.ood import Guard, OODVerdict
from medlens.inference.cam import cam_to_heat

NO_OOD: OODVerdict = {"flag": None, "score": None, "ratio": None}
"""What :attr:`Prediction.ood` holds for a model without an out-of-distribution guard."""


"""``features float32 (N, F)`` (penultimate, see :meth:`Classifier.features`) ->
``[{"flag": bool, "score": float}, ...]``, one per image."""


def load_ood_guard(folder: Path | None, meta: ModelMeta) -> Guard | None:
    """The model's out-of-distribution guard (``ood.npz``, see :mod:`medlens.evaluation.ood`), or None.

    The :class:`Predictor` passes every batch's activation statistics (or, for guards of
    older runs, penultimate features: ``guard.input`` says which) to it.
    """
    from medlens.artifacts.folders import OOD_FILE
    from medlens.evaluation.ood import load_guard

    if folder is None or not (Path(folder) / OOD_FILE).exists():
        return None
    path = Path(folder) / OOD_FILE
    ood = meta.ood
    check_file(path, ood.sha256 if ood else None, Path(folder) / MODEL_JSON)
    try:
        return load_guard(path)
    except Exception as e:  # noqa: BLE001 - a damaged zip (CRC), missing arrays, not an npz
        raise ModelLoadError(
            f"{path} cannot be read as the out-of-distribution guard ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); copy the model folder again, or "
            "re-export or retrain it"
        ) from None


class PredictionDict(TypedDict):
    """:meth:`Prediction.to_dict`: the prediction as JSON."""

    label: str
    probabilities: dict[str, float]
    threshold: float | None


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    threshold: float | None
    ood: OODVerdict = field(default_factory=lambda: OODVerdict(**NO_OOD))

    def to_dict(self) -> PredictionDict:
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "threshold": self.threshold,
        }


class Predictor:
    """A loaded model ready to predict.

    Args:
        ref: model folder or bundled-model name.
        model_dirs: more folders holding model folders.
        dtype: torch autocast dtype (torch backend only).
        tta: test-time augmentation: the logits are the mean of the image's and its mirror
            image's (left-right flip); the OOD statistics and Grad-CAM stay the image's own.
            Temperature and threshold were fitted without it.
        backend: ``"auto"``: ONNX Runtime when the folder has ``model.onnx``, else torch;
            ``"onnx"``: ONNX Runtime, exporting the network in memory when ``model.onnx`` is
            missing (nothing is written); ``"torch"``: torch only.
        threads: ONNX Runtime intra-op threads of the session (None: every core); a server
            or a Ray actor running several predictions at once gives each one thread.
        meta: the model's metadata, instead of the folder's ``model.json`` (``ref`` is then
            the folder as it is: an export assembling a bundle predicts through it before
            writing its ``model.json``).
    """

    def __init__(
        self,
        ref: str | os.PathLike,
        model_dirs: Iterable[str | os.PathLike] = (),
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        tta: bool = False,
        threads: int | None = None,
        meta: ModelMeta | None = None,
    ) -> None:
        from medlens.artifacts.folders import ONNX_FILE
        from medlens.artifacts.onnx import check_onnx_matches, onnx_bytes, ort_session

        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
        self.folder = Path(ref) if meta is not None else resolve_model(ref, model_dirs)
        onnx_path = self.folder / ONNX_FILE
        self.session, self.backend, self.net = None, "torch", None
        if (self.folder / MODEL_WEIGHTS).exists() or not onnx_path.exists():
            self.net, self.meta = load_network(self.folder, meta)
            # torch's stubs omit Module.to's memory_format (a documented keyword)
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        else:  # an inference-only folder (a bundled model): model.json + model.onnx
            self.meta = meta or read_meta(self.folder)
            if backend == "torch":
                raise ModelLoadError(
                    f"{self.folder} holds only {ONNX_FILE} (no "
                    f"{MODEL_WEIGHTS}): it runs with ONNX Runtime only"
                )
        self.pre = self.meta.preprocess
        self.dtype = dtype
        if backend != "torch" and onnx_path.exists():
            check_onnx_file(self.folder)
            self.session, self.backend = ort_session(onnx_path, threads=threads), "onnx"
            check_onnx_matches(self.session, self.meta, self.folder)
        elif backend == "onnx":
            assert self.net is not None  # no model.onnx: the network was loaded above
            self.session = ort_session(onnx_bytes(self.net, self.meta), threads=threads)
            self.backend = "onnx (exported in memory)"
        self.ood_guard = load_ood_guard(self.folder, self.meta)
        if (
            self.session is not None
            and self.ood_guard is not None
            and self.ood_guard.input not in {o.name for o in self.session.get_outputs()}
        ):
            raise ModelLoadError(
                f"{onnx_path} has no {self.ood_guard.input!r} output, which "
                f"the out-of-distribution guard needs; re-run `medlens export "
                f"--model {self.folder}`"
            )
        self._cam_lock = threading.Lock()
        self.tta = tta

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    def forward_prepared(
        self, x_uint8: ArrayLike, batch_size: int = 64, features: bool | str = False
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits ``(N, outputs)`` of prepared ``uint8 (N, C, S, S)`` images and, if asked,
        ``features=True`` / ``"features"``: the penultimate features ``(N, F)``, or
        ``"stats"``: the activation statistics of
        :meth:`~medlens.modeling.classifier.Classifier.forward_with_stats` (what the OOD guard reads)."""
        extra = "features" if features is True else features or None
        if extra not in (None, "features", "stats"):
            raise ValueError(f"features must be a bool, 'features' or 'stats', got {features!r}")
        if not isinstance(x_uint8, torch.Tensor):
            x_uint8 = np.asarray(x_uint8)
        logits, more = self._forward(x_uint8, batch_size, extra)
        if self.tta:
            mirrored = torch.as_tensor(np.asarray(x_uint8)).flip(-1)
            logits = (logits + self._forward(mirrored, batch_size, None)[0]) / 2
        if not bool(torch.isfinite(logits).all()):
            raise ModelOutputError(
                f"model {self.folder.name} answered with non-finite numbers (NaN or infinity): "
                f"its files in {self.folder} are damaged or do not fit this input; re-export "
                "or retrain it"
            )
        return logits, more

    def _forward(
        self, x_uint8: np.ndarray | torch.Tensor, batch_size: int, extra: str | None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.session is not None:
            names = ["logits", extra] if extra else ["logits"]
            outs = [
                self.session.run(
                    names,
                    {
                        "input": self.pre.normalize(
                            torch.as_tensor(x_uint8[i : i + batch_size])
                        ).numpy()
                    },
                )
                for i in range(0, len(x_uint8), batch_size)
            ]
            logits = torch.from_numpy(np.concatenate([o[0] for o in outs]))
            return logits, np.concatenate([o[1] for o in outs]) if extra else None
        from medlens.inference.runtime import compute_logits
        from medlens.inference.runtime import logits_and_stats as logits_and_stats

        net = self.net
        assert net is not None  # without an ONNX Runtime session the network is loaded
        net.eval()
        n_out = self.meta.num_outputs
        fn: Callable[[torch.Tensor], torch.Tensor]
        if extra == "features":

            def fn(b: torch.Tensor) -> torch.Tensor:
                return torch.cat(net.forward_with_features(b), 1)
        elif extra == "stats":

            def fn(b: torch.Tensor) -> torch.Tensor:
                return logits_and_stats(net, b)
        else:
            fn = net
        out = compute_logits(
            fn,
            x_uint8,
            batch_size,
            self.dtype,
            transform=lambda b: self.pre.normalize(b).contiguous(memory_format=torch.channels_last),
        )
        return out[:, :n_out], out[:, n_out:].numpy() if extra else None

    def logits_prepared(self, x_uint8: ArrayLike, batch_size: int = 64) -> torch.Tensor:
        """Raw logits of prepared ``uint8 (N, C, S, S)`` images."""
        return self.forward_prepared(x_uint8, batch_size)[0]

    def probs_prepared(self, x_uint8: ArrayLike, batch_size: int = 64) -> np.ndarray:
        """Calibrated ``(N, K)`` probabilities of prepared images."""
        from medlens.evaluation.calibration import logits_to_probs

        return logits_to_probs(
            self.logits_prepared(x_uint8, batch_size).numpy(), self.meta.temperature
        )

    def probs_and_ood_prepared(
        self, x_uint8: ArrayLike, batch_size: int = 64
    ) -> tuple[np.ndarray, list[OODVerdict]]:
        """Calibrated ``(N, K)`` probabilities and the OOD guard's verdict per image
        (:data:`NO_OOD` without a guard) of prepared ``uint8 (N, C, S, S)`` images."""
        from medlens.evaluation.calibration import logits_to_probs

        logits, feats = self.forward_prepared(
            x_uint8, batch_size, features=self.ood_guard.input if self.ood_guard else False
        )
        probs = logits_to_probs(logits.numpy(), self.meta.temperature)
        if self.ood_guard is None:
            return probs, [NO_OOD] * len(probs)
        assert feats is not None  # asked for with features=self.ood_guard.input
        return probs, self.ood_guard(feats)

    def predict_prepared(self, x_uint8: ArrayLike, batch_size: int = 64) -> list[Prediction]:
        """Prepared ``uint8 (N, C, S, S)`` images -> predictions (with the OOD verdict)."""
        probs, oods = self.probs_and_ood_prepared(x_uint8, batch_size)
        return [self.to_prediction(p, o) for p, o in zip(probs, oods)]

    def predict_pixels(self, pixels_list: list[np.ndarray]) -> list[Prediction]:
        """Decoded images (``uint8 (H,W)`` or ``(H,W,3)``) -> predictions."""
        return self.predict_prepared(np.stack([self.pre.prepare(p) for p in pixels_list]))

    def to_prediction(self, probs: np.ndarray, ood: OODVerdict | None = None) -> Prediction:
        from medlens.evaluation.metrics import predict_labels

        idx = int(predict_labels(probs[None], self.meta.threshold)[0])
        return Prediction(
            self.labels[idx],
            {c: round(float(v), 6) for c, v in zip(self.labels, probs)},
            None if self.meta.threshold is None else round(self.meta.threshold, 6),
            OODVerdict(**(ood or NO_OOD)),
        )

    @property
    def _onnx_cam(self) -> bool:
        return self.session is not None and "cam" in {o.name for o in self.session.get_outputs()}

    def explain(self, pixels: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, int]:
        """Grad-CAM (Selvaraju et al. 2017) of one class on the last backbone stage.

        With the torch backend it is MONAI's ``GradCAM`` (autograd through the network); with
        ONNX Runtime it is the graph's ``cam`` output, the same map in closed form (see
        :mod:`medlens.artifacts.onnx`), so inference-only model folders explain too.

        Returns:
            ``(cam, class_index)``: ``cam`` is ``float32 (S, S)`` in [0, 1] at the network's
            input size, 1 where the evidence for the class is strongest; for a binary model the
            map explains the positive-class logit.
        """
        x = self.pre(pixels)[None].contiguous()
        if self.session is not None and self._onnx_cam:
            logits, maps = self.session.run(["logits", "cam"], {"input": x.numpy()})
            if self.meta.binary:
                channel, idx = 0, 1
            else:
                idx = int(np.argmax(logits[0])) if class_index is None else int(class_index)
                channel = idx
            return cam_to_heat(torch.from_numpy(maps[:, channel : channel + 1]), x.shape[-2:]), idx
        # An input that requires grad keeps MONAI's full backward hook from warning that
        # "no inputs require gradients" on every call.
        x.requires_grad_(True)
        # GradCAM hooks the shared network: concurrent calls (web app threads) would record
        # each other's activations.
        with self._cam_lock:
            return self._explain(x, class_index)

    def _explain(self, x: torch.Tensor, class_index: int | None) -> tuple[np.ndarray, int]:
        from monai.visualize import GradCAM

        assert self.net is not None  # the torch backend (no graph cam output) has the network
        # torch's stubs omit Module.to's memory_format (a documented keyword)
        net = self.net.float().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        net.eval()
        # MONAI's default post-processing maps (min, max) to (1, 0), i.e. it inverts the map;
        # the raw map is taken and scaled by cam_to_heat instead.
        cam = GradCAM(
            nn_module=net,
            target_layers="backbone",
            postprocessing=lambda m: m,
            upsampler=lambda size: lambda m: m,
        )
        with torch.enable_grad():
            if self.meta.binary:
                # Grad-CAM of the single logit; class_idx 0 is that logit.
                acti = cam(x, class_idx=0)
                idx = 1
            else:
                if class_index is None:
                    with torch.no_grad():
                        class_index = int(net(x).argmax(1))
                acti = cam(x, class_idx=class_index)
                idx = class_index
        return cam_to_heat(acti.detach().float(), x.shape[-2:]), idx
