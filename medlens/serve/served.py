"""Models loaded for serving: a predictor, the API's description and the model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medlens.artifacts.card import model_card, model_version
from medlens.inference.predictor import Predictor


@dataclass
class ServedModel:
    """A model loaded for serving: its predictor, API description and model card."""

    name: str
    folder: Path
    predictor: Predictor
    info: dict
    card: dict

    @classmethod
    def load(
        cls,
        name: str,
        folder: Path,
        backend: str = "onnx",
        threads: int | None = None,
        tta: bool = False,
    ) -> ServedModel:
        """Load a model folder; ``threads``: ONNX Runtime intra-op threads of its session
        (None: the Predictor's default, every core); ``tta``: see the Predictor."""
        pred = _serving_predictor(folder, backend, threads)
        pred.tta = tta
        meta = pred.meta
        card = model_card(meta, folder)
        info = {
            "name": name,
            "title": card["title"],
            "task": card["task"],
            "labels": list(meta.labels),
            "input": {"modality": card["input"]["modality"], "size": meta.preprocess.image_size},
            "version": model_version(meta, folder),
            "metrics": card["metrics"],
        }
        return cls(name, folder, pred, info, card)


def _serving_predictor(folder: Path, backend: str, threads: int | None) -> Predictor:
    """A :class:`Predictor` whose ONNX Runtime session has ``threads`` intra-op threads.

    The app computes several predictions at once, one per worker (see :func:`create_app`):
    a session per request that spreads over every core would make the concurrent runs fight
    for the same cores, so serving sessions default to one thread each.
    """
    return Predictor(folder, backend=backend, threads=threads)
