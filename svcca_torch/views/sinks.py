"""Where the training views go: a small :class:`Sink` interface and its plain-PyTorch
implementations, :class:`TensorBoardSink` and :class:`PNGSink`.

A sink receives finished data: scalars, ``(H, W, 3)`` uint8 RGB images (drawn once by
:mod:`svcca_torch.views.encoding`) and text. Required: :meth:`Sink.add_scalars`,
:meth:`Sink.add_image`, :meth:`Sink.add_text`; :meth:`Sink.flush` and :meth:`Sink.close`
default to nothing. What a sink takes is said by attributes and an optional method, not by
more required methods:

* ``all_scalars`` (default True): it gets every scalar series, the per-layer similarities
  under full layer names (``<name>/to_previous/<layer>``, ``<name>/to_final/<layer>``,
  ``<name>/freeze_signal/<group>``) and ``<name>/freeze/frozen_parameters``. TensorBoard's
  sink says False: at its default smoothing such front-loaded series are drawn wrong, and
  its images show every value;
* ``bounded`` (default True): it keeps what the views chose per image tag (at most
  ``max_images``, in step order); a file sink (False) gets its files whatever the budget;
* ``wants_image(tag, final)`` (default: every image);
* capabilities of TensorBoard's: ``set_layout(owner, categories)`` (custom scalars),
  ``add_run_scalar(run, tag, value, step)`` with ``layer_runs`` (one run per layer).

A new backend is one class with the three ``add_*`` methods (see
:mod:`svcca_torch.callbacks` for Lightning's loggers).
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from .encoding import save_png

__all__ = ["Sink", "TensorBoardSink", "PNGSink", "RUN_FIGURES"]

#: The run folder's figures: image tag (after ``<name>/``) -> file name.
RUN_FIGURES = {"dynamics/grid": "learning_dynamics.png", "dynamics/to_final_curves": "convergence.png",
               "live/to_previous_curves": "to_previous.png"}


def _suffix(tag: str) -> str:
    """``<name>/live/x`` -> ``live/x``."""
    return tag.split("/", 1)[1] if "/" in tag else tag


class Sink:
    """The interface the views write through (see the module docstring)."""

    #: gets every scalar series (per-layer similarities by full layer name, frozen parameters)
    all_scalars: bool = True
    #: keeps the images chosen per tag (at most ``max_images``, in step order)
    bounded: bool = True

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """``{tag: value}`` at ``step``."""
        raise NotImplementedError

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An ``(H, W, 3)`` uint8 RGB image at ``step``."""
        raise NotImplementedError

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A markdown text at ``step``."""
        raise NotImplementedError

    def wants_image(self, tag: str, final: bool = False) -> bool:
        """Whether this sink takes images of ``tag`` (``final``: the last of its tag in the
        run). Images nobody wants are never drawn."""
        return True

    def flush(self) -> None:
        """Write what is buffered."""

    def close(self) -> None:
        """Flush and release what the sink opened."""
        self.flush()


# TensorBoard shows one custom-scalars layout per run (the last written): every views object on
# one writer adds its categories to that writer's layout, so two of them (names) both show.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, Dict[Any, Dict[str, Any]]]" = weakref.WeakKeyDictionary()


class TensorBoardSink(Sink):
    """TensorBoard: a ``torch.utils.tensorboard.SummaryWriter`` (or Lightning's
    ``TensorBoardLogger.experiment``, or anything with ``add_image``, ``add_scalar``,
    ``add_text`` and ``add_custom_scalars``), or a log folder (a writer opened here, and
    closed by :meth:`close`; a writer passed in stays open).

    Args:
        writer: the writer, or a folder for a new ``SummaryWriter``.
        layer_runs: per-layer scalars (``layer_scalars=True`` of the views) go to one run per
            layer, ``<log_dir>/<name>/NN_short``, which TensorBoard colours apart (default
            when the writer is a ``SummaryWriter``); False: one tag per layer in this run.
    """

    all_scalars = False

    def __init__(self, writer: Any, *, layer_runs: Optional[bool] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._owned = isinstance(writer, (str, os.PathLike))
        if self._owned:
            writer = SummaryWriter(str(writer))
        missing = [m for m in ("add_image", "add_scalar", "add_text", "add_custom_scalars") if not hasattr(writer, m)]
        if missing:
            raise ValueError(f"`writer` must be a TensorBoard SummaryWriter (or have add_image, add_scalar, add_text, "
                             f"add_custom_scalars); {type(writer).__name__} lacks {', '.join(missing)}.")
        self.writer = writer
        log_dir = getattr(writer, "log_dir", None)
        if layer_runs is None:
            layer_runs = isinstance(writer, SummaryWriter) and isinstance(log_dir, str)
        elif layer_runs and not isinstance(log_dir, str):
            raise ValueError("`layer_runs=True` needs a writer with a `log_dir` (a torch SummaryWriter) to put the "
                             "per-layer runs in.")
        #: whether per-layer scalars go to one run per layer
        self.layer_runs = bool(layer_runs)
        self._runs: Dict[str, Any] = {}  # run name -> its SummaryWriter

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), int(step))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, int(step), dataformats="HWC")

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, int(step))

    def add_run_scalar(self, run: str, tag: str, value: float, step: int) -> None:
        """``tag`` in the run ``<log_dir>/<run>`` (a writer of its own, opened on first use)."""
        w = self._runs.get(run)
        if w is None:
            from torch.utils.tensorboard import SummaryWriter

            w = self._runs[run] = SummaryWriter(os.path.join(self.writer.log_dir, *run.split("/")))
        w.add_scalar(tag, float(value), int(step))

    def set_layout(self, owner: Any, categories: Mapping[str, Any]) -> None:
        """Custom Scalars: ``owner``'s categories, merged with every other owner's on this
        writer (TensorBoard shows the last layout written)."""
        try:
            merged = _LAYOUTS.setdefault(self.writer, {})
        except TypeError:  # a writer that cannot be weakly referenced: its own layout only
            merged = {}
        merged[owner] = dict(categories)
        layout: Dict[str, Any] = {}
        for cats in merged.values():
            layout.update(cats)
        self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        for w in [self.writer, *self._runs.values()]:
            if hasattr(w, "flush"):
                w.flush()

    def close(self) -> None:
        """Flush, close the per-layer runs' writers, and the writer if it was opened here."""
        self.flush()
        for w in self._runs.values():
            w.close()
        self._runs = {}
        if self._owned:
            self.writer.close()


class PNGSink(Sink):
    """Plain PNG files in ``folder``: the run folder's ``learning_dynamics.png`` (the grid),
    ``convergence.png`` (the to-final curves) and, with ``to_previous``, ``to_previous.png``
    (the whole run's to-previous curves, the last such image); with ``live=True`` also every
    live image, ``live/<kind>_<step>.png``. Scalars and text are not kept.

    The pixels are those every other sink gets (drawn once).
    """

    all_scalars = False
    bounded = False

    def __init__(self, folder: Union[str, os.PathLike], *, to_previous: bool = True, live: bool = False) -> None:
        self.folder = Path(folder)
        self.to_previous = bool(to_previous)
        self.live = bool(live)
        #: file -> the step of the image it holds
        self.files_written: Dict[str, int] = {}

    def _file(self, tag: str) -> Optional[str]:
        name = RUN_FIGURES.get(_suffix(tag))
        return None if name == "to_previous.png" and not self.to_previous else name

    def wants_image(self, tag: str, final: bool = False) -> bool:
        name = self._file(tag)
        live = self.live and _suffix(tag).startswith("live/")
        # the to-previous file shows the whole run: only the last curves image
        return live or (name is not None and (final or name != "to_previous.png"))

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def add_text(self, tag: str, text: str, step: int) -> None:
        pass

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        kind = _suffix(tag)
        if self.live and kind.startswith("live/"):
            (self.folder / "live").mkdir(exist_ok=True)
            save_png(image, self.folder / "live" / f"{kind[5:]}_{int(step)}.png")
        name = self._file(tag)
        if name is not None and (not kind.startswith("live/") or self.to_previous):
            save_png(image, self.folder / name)
            self.files_written[name] = int(step)
