"""Lightning loggers as :class:`svcca_torch.views.Sink` objects: one sink per
``trainer.loggers`` entry (:func:`sinks_for`).

* ``TensorBoardLogger`` (either Lightning package) -> :class:`~svcca_torch.views.TensorBoardSink`
  over ``logger.experiment`` (today's tags, layout, per-layer runs);
* any other logger -> :class:`LoggerSink`: scalars through ``log_metrics``; images through
  the logger's own image method where it has one, found by duck typing (no backend is
  imported): ``logger.log_image(key=, images=[...], step=)`` (``WandbLogger``, or any logger
  with that method), ``logger.experiment.log_image(logger.run_id, image, artifact_file)``
  (``MLFlowLogger``), ``logger.experiment.log_image(image, name=, step=)`` (``CometLogger``);
  text likewise (``log_text``); else scalars only, said once with ``rank_zero_info``.

Images are ``(H, W, 3)`` uint8 RGB arrays, drawn once for every sink.
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Tuple

import numpy as np
from lightning_utilities.core.rank_zero import rank_zero_info

from svcca_torch.views import Sink, TensorBoardSink

__all__ = ["LoggerSink", "sinks_for"]


def _image_method(logger: Any) -> Tuple[Optional[Callable[[str, np.ndarray, int], None]], Optional[str]]:
    """``(write(tag, image, step), how)`` for ``logger``'s images, or ``(None, None)``."""
    own = getattr(logger, "log_image", None)
    if callable(own):  # WandbLogger and anything with log_image(key, images, step)
        return (lambda tag, image, step: own(key=tag, images=[image], step=step)), "log_image"
    if "mlflow" in type(logger).__name__.lower() and hasattr(logger, "run_id"):
        exp = logger.experiment
        if callable(getattr(exp, "log_image", None)):
            return (lambda tag, image, step: exp.log_image(logger.run_id, image, f"{tag}/step_{step:08d}.png")), \
                "experiment.log_image (MLflow)"
    if "comet" in type(logger).__name__.lower():
        exp = logger.experiment
        if callable(getattr(exp, "log_image", None)):
            return (lambda tag, image, step: exp.log_image(image, name=tag, step=step)), "experiment.log_image (Comet)"
    return None, None


def _text_method(logger: Any) -> Optional[Callable[[str, str, int], None]]:
    own = getattr(logger, "log_text", None)
    if callable(own):  # WandbLogger.log_text(key, columns, data, step)
        return lambda tag, text, step: own(key=tag, columns=["step", "text"], data=[[step, text]], step=step)
    if "mlflow" in type(logger).__name__.lower() and hasattr(logger, "run_id"):
        exp = logger.experiment
        if callable(getattr(exp, "log_text", None)):
            return lambda tag, text, step: exp.log_text(logger.run_id, text, f"{tag}/step_{step:08d}.md")
    if "comet" in type(logger).__name__.lower():
        exp = logger.experiment
        if callable(getattr(exp, "log_text", None)):
            return lambda tag, text, step: exp.log_text(text, step=step, metadata={"tag": tag})
    return None


class LoggerSink(Sink):
    """A Lightning logger other than TensorBoard: every scalar series by ``log_metrics``
    (full layer names), images and text where the logger has a method for them (see the
    module docstring). ``images``/``text``: what it takes (found on the first use)."""

    all_scalars = True

    def __init__(self, logger: Any, owner: str = "SVCCACallback") -> None:
        self.logger = logger
        self.owner = owner
        self._image: Any = ...  # found on first use (a logger's experiment may start a run)
        self._text: Any = ...
        #: how images are written (``"log_image"``, ``"experiment.log_image (MLflow)"``, ...), or
        #: None: scalars (and text) only; known after the first image was offered
        self.image_method: Optional[str] = None

    def _find(self) -> None:
        if self._image is ...:
            self._image, self.image_method = _image_method(self.logger)
            self._text = _text_method(self.logger)
            if self._image is None:  # said once: found once
                rank_zero_info(f"{self.owner}: {type(self.logger).__name__} gets the SVCCA scalars only (it has "
                               f"no image method); the figures are in the run folder.")

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if scalars:
            self.logger.log_metrics(dict(scalars), step=int(step))

    def wants_image(self, tag: str, final: bool = False) -> bool:
        self._find()
        return self._image is not None

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._find()
        if self._image is not None:
            self._image(tag, image, int(step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._find()
        if self._text is not None:
            self._text(tag, text, int(step))


def sinks_for(loggers: List[Any], tensorboard: Tuple[type, ...], owner: str = "SVCCACallback") -> List[Sink]:
    """One sink per logger: TensorBoard's (``tensorboard``: its classes in every installed
    Lightning package) over ``logger.experiment``, a :class:`LoggerSink` for any other."""
    return [TensorBoardSink(lg.experiment) if isinstance(lg, tensorboard) else LoggerSink(lg, owner)
            for lg in loggers]
