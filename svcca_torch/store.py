"""On-disk store of SVD-reduced layer representations, one per (checkpoint, layer).

Layout of a store folder::

    index.json                      what is complete: settings, layers, checkpoints, file sizes/hashes
    step_000000120/003-layer2.0.pt  one ReducedBasis per (checkpoint, layer), torch.save'd tensors

A checkpoint exists only once it is listed in ``index.json``. Every file is written to a
temporary name and then renamed (``os.replace``, atomic on POSIX and Windows); the index is
rewritten last. A crash mid-checkpoint therefore leaves at most unlisted files, which are
ignored and overwritten when that step is added again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .functional.svcca import KEEP_RULES, ReducedBasis, svd_reduce
from .utils.validation import (
    check_activations,
    check_choice,
    check_fraction,
    check_keep,
    check_optional_positive_int,
    check_positive_int,
)

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


class StoreCorruptError(ValueError):
    """A store file is missing, truncated or altered; the message names it."""


@dataclass(frozen=True)
class Checkpoint:
    """One moment of training held in a :class:`RepresentationStore`.

    Attributes:
        step: the training step (unique key in the store).
        epoch: the epoch, if given.
        fraction: the fraction of training done, in [0, 1], if given.
        layers: the layers stored for it, in store order.
        nbytes: bytes on disk of its layer files.
    """

    step: int
    epoch: Optional[int]
    fraction: Optional[float]
    layers: Tuple[str, ...]
    nbytes: int


CheckpointRef = Union[Checkpoint, int]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "layer"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system
        shutil.copy2(src, dst)


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(file)`` to a temporary sibling, flush to disk, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable (POSIX; directories cannot be opened on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RepresentationStore:
    """SVD-reduced layer representations over training, kept on disk.

    For each checkpoint (a training step, with its epoch and fraction of training) and each
    layer, only the reduced representation is kept: the top-k left singular directions of
    the centred activations ``(datapoints, neurons)`` (k chosen by ``keep``/``keep_rule``,
    see :func:`svcca_torch.svd_reduce`, capped at ``max_directions``) as an ``(n, k)``
    float32 tensor, plus the k singular values. That is everything SVCCA needs to compare
    the layer with any other stored layer later.

    Cost: bytes per checkpoint are about ``n * sum_k * 4`` (n probe datapoints, sum_k the
    directions kept summed over layers), on disk and in memory when a checkpoint is loaded,
    e.g. 4,096 datapoints x 10 layers x 100 directions = 16 MB. ``max_directions`` bounds
    it. Raw activations are never written, and :meth:`add` reduces one layer at a time.

    Args:
        folder: the store's folder; created if missing, reopened (and extendable) if it
            already holds a store.
        keep: the SVD rule: an int (directions) or a float in (0, 1] (default 0.99).
        keep_rule: ``"singular_values"`` (default) or ``"variance"``.
        max_directions: cap on k per layer (default: none).

    On reopening, the settings come from the index; passing different ones is an error
    (all checkpoints of one store must be reduced alike to be comparable). A damaged or
    missing file raises :class:`StoreCorruptError` naming it: sizes are checked when the
    store is opened, SHA-256 hashes when a file is loaded. One writer at a time.
    """

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        *,
        keep: Optional[Union[int, float]] = None,
        keep_rule: Optional[str] = None,
        max_directions: Optional[int] = None,
    ) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"`folder` {str(self.folder)!r} exists and is not a directory.")
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = {
            "keep": None if keep is None else check_keep(keep),
            "keep_rule": None if keep_rule is None else check_choice(keep_rule, "keep_rule", KEEP_RULES),
            "max_directions": check_optional_positive_int(max_directions, "max_directions"),
        }
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            self._index = self._read_index(index_path)
            for key, value in settings.items():
                if value is not None and value != self._index["settings"][key]:
                    raise ValueError(
                        f"`{key}`={value!r} differs from {self._index['settings'][key]!r}, with which the store "
                        f"at {str(self.folder)!r} was written; checkpoints reduced differently are not "
                        "comparable. Omit it (the stored setting is used) or use a new folder."
                    )
            self._verify_sizes()
        else:
            self._index = {
                "version": FORMAT_VERSION,
                "settings": {
                    "keep": 0.99 if settings["keep"] is None else settings["keep"],
                    "keep_rule": settings["keep_rule"] or "singular_values",
                    "max_directions": settings["max_directions"],
                },
                "n_datapoints": None,
                "layers": [],
                "checkpoints": [],
            }

    # ------------------------------------------------------------------ reading
    def _read_index(self, path: Path) -> Dict[str, Any]:
        try:
            index = json.loads(path.read_text())
            if index.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {index.get('version')!r}")
            for key in ("settings", "layers", "checkpoints"):
                index[key]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"store index {str(path)!r} is damaged ({err}); it cannot be read.") from None
        return index

    def _verify_sizes(self) -> None:
        for ck in self._index["checkpoints"]:
            for entry in ck["files"].values():
                path = self.folder / entry["file"]
                if not path.is_file():
                    raise StoreCorruptError(f"store file {str(path)!r} listed in {INDEX_NAME} is missing.")
                size = path.stat().st_size
                if size != entry["bytes"]:
                    raise StoreCorruptError(
                        f"store file {str(path)!r} is damaged: {size} bytes on disk, {entry['bytes']} written."
                    )

    @property
    def settings(self) -> Dict[str, Any]:
        """The reduction settings: ``keep``, ``keep_rule``, ``max_directions``."""
        return dict(self._index["settings"])

    @property
    def layers(self) -> List[str]:
        """Every stored layer name, in the order first added (the recorder's depth order)."""
        return list(self._index["layers"])

    @property
    def n_datapoints(self) -> Optional[int]:
        """Probe datapoints per layer (rows of every basis), None while empty."""
        return self._index["n_datapoints"]

    @property
    def checkpoints(self) -> List[Checkpoint]:
        """Stored checkpoints, sorted by step."""
        return [self._checkpoint(ck) for ck in self._index["checkpoints"]]

    def __len__(self) -> int:
        return len(self._index["checkpoints"])

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.folder)!r}, checkpoints={len(self)}, layers={len(self.layers)}, "
            f"n_datapoints={self.n_datapoints}, settings={self.settings})"
        )

    def _checkpoint(self, ck: Dict[str, Any]) -> Checkpoint:
        order = {n: i for i, n in enumerate(self._index["layers"])}
        names = tuple(sorted(ck["files"], key=order.__getitem__))
        return Checkpoint(
            step=ck["step"],
            epoch=ck["epoch"],
            fraction=ck["fraction"],
            layers=names,
            nbytes=sum(e["bytes"] for e in ck["files"].values()),
        )

    def _entry(self, checkpoint: CheckpointRef) -> Dict[str, Any]:
        step = checkpoint.step if isinstance(checkpoint, Checkpoint) else checkpoint
        for ck in self._index["checkpoints"]:
            if ck["step"] == step:
                return ck
        steps = [ck["step"] for ck in self._index["checkpoints"]]
        raise ValueError(f"`checkpoint`: no checkpoint at step {step!r}; stored steps are {steps}.")

    def checkpoint(self, step: int) -> Checkpoint:
        """The checkpoint stored at ``step``."""
        return self._checkpoint(self._entry(step))

    @property
    def final(self) -> Checkpoint:
        """The last checkpoint (highest step)."""
        if not len(self):
            raise ValueError(f"the store at {str(self.folder)!r} holds no checkpoint yet.")
        return self._checkpoint(self._index["checkpoints"][-1])

    def fraction_of(self, checkpoint: CheckpointRef) -> float:
        """The checkpoint's fraction of training: as stored, else step / last step."""
        ck = self._entry(checkpoint)
        if ck["fraction"] is not None:
            return float(ck["fraction"])
        last = self._index["checkpoints"][-1]["step"]
        return ck["step"] / last if last else 1.0

    def nearest(self, fraction: float) -> Checkpoint:
        """The stored checkpoint whose fraction of training is nearest ``fraction``."""
        fraction = check_fraction(fraction, "fraction", low_inclusive=True, high_inclusive=True)
        if not len(self):
            raise ValueError(f"the store at {str(self.folder)!r} holds no checkpoint yet.")
        best = min(self._index["checkpoints"], key=lambda ck: abs(self.fraction_of(ck["step"]) - fraction))
        return self._checkpoint(best)

    def load(self, checkpoint: CheckpointRef, layer: str) -> ReducedBasis:
        """The :class:`~svcca_torch.ReducedBasis` of ``layer`` at ``checkpoint`` (a
        :class:`Checkpoint` or a step). Loaded with ``torch.load(weights_only=True)``."""
        ck = self._entry(checkpoint)
        if layer not in ck["files"]:
            raise ValueError(
                f"`layer` {layer!r} is not stored at step {ck['step']}; stored layers: {sorted(ck['files'])}."
            )
        entry = ck["files"][layer]
        path = self.folder / entry["file"]
        try:
            digest = _sha256(path)
        except OSError as err:
            raise StoreCorruptError(f"store file {str(path)!r} cannot be read ({err}).") from None
        if digest != entry["sha256"]:
            raise StoreCorruptError(f"store file {str(path)!r} is damaged: its SHA-256 does not match the index.")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return ReducedBasis(
                basis=data["basis"], singular_values=data["singular_values"], n_neurons=int(data["n_neurons"])
            )
        except Exception as err:  # any unpickling failure means the file is not what was written
            raise StoreCorruptError(f"store file {str(path)!r} is damaged ({type(err).__name__}: {err}).") from None

    def load_checkpoint(
        self, checkpoint: CheckpointRef, layers: Optional[Sequence[str]] = None
    ) -> Dict[str, ReducedBasis]:
        """``{layer: ReducedBasis}`` for ``layers`` (default: all stored) at ``checkpoint``."""
        ck = self._checkpoint(self._entry(checkpoint))
        return {name: self.load(ck, name) for name in (ck.layers if layers is None else layers)}

    # ------------------------------------------------------------------ writing
    def add(
        self,
        activations: Mapping[str, Union[torch.Tensor, ReducedBasis]],
        *,
        step: int,
        epoch: Optional[int] = None,
        fraction: Optional[float] = None,
    ) -> Checkpoint:
        """Reduce and store one checkpoint's layers.

        Args:
            activations: ``{layer name: (datapoints, neurons)}`` as returned by
                :meth:`svcca_torch.ActivationRecorder.record` (conv maps already folded),
                or already-reduced :class:`~svcca_torch.ReducedBasis` values. Every layer
                has the same datapoints, and the same number as earlier checkpoints.
            step: the training step, an int >= 0 not stored yet.
            epoch: the epoch (optional).
            fraction: the fraction of training done, in [0, 1] (optional; used to pick
                checkpoints for figures, else step / last step is used).

        Returns:
            The stored :class:`Checkpoint`. Layers are reduced and written one at a time;
            the checkpoint becomes visible (in the index) only once all are on disk.
        """
        step = check_positive_int(step, "step", minimum=0)
        if epoch is not None:
            epoch = check_positive_int(epoch, "epoch", minimum=0)
        if fraction is not None:
            fraction = check_fraction(fraction, "fraction", low_inclusive=True, high_inclusive=True)
        if not isinstance(activations, Mapping) or not activations:
            raise ValueError("`activations` must be a non-empty dict {layer name: (datapoints, neurons) tensor}.")
        if any(ck["step"] == step for ck in self._index["checkpoints"]):
            raise ValueError(f"`step` {step} is already stored in {str(self.folder)!r}; each step is stored once.")
        settings = self._index["settings"]
        n_expected = self._index["n_datapoints"]
        layers = list(self._index["layers"])
        sub = f"step_{step:09d}"
        (self.folder / sub).mkdir(exist_ok=True)
        files: Dict[str, Dict[str, Any]] = {}
        for name, value in activations.items():
            if not isinstance(name, str):
                raise ValueError(f"`activations` keys must be layer names (str), got {name!r}.")
            basis = self._reduce(name, value, settings)
            if n_expected is None:
                n_expected = basis.n_datapoints
            elif basis.n_datapoints != n_expected:
                raise ValueError(
                    f"`activations[{name!r}]` has {basis.n_datapoints} datapoints but the store holds "
                    f"{n_expected} per layer: use the same probe set (and recorder settings) at every checkpoint."
                )
            if name not in layers:
                layers.append(name)
            rel = f"{sub}/{layers.index(name):03d}-{_safe(name)}.pt"
            payload = {
                "basis": basis.basis.detach().to("cpu", torch.float32).contiguous(),
                "singular_values": basis.singular_values.detach().to("cpu", torch.float32).contiguous(),
                "n_neurons": int(basis.n_neurons),
            }
            path = self.folder / rel
            _atomic_write(path, lambda f, p=payload: torch.save(p, f))
            files[name] = {"file": rel, "bytes": path.stat().st_size, "sha256": _sha256(path),
                           "k": basis.k, "n_neurons": int(basis.n_neurons)}
            del basis, payload
        new_index = dict(self._index)
        new_index["layers"] = layers
        new_index["n_datapoints"] = n_expected
        new_index["checkpoints"] = sorted(
            self._index["checkpoints"] + [{"step": step, "epoch": epoch, "fraction": fraction, "files": files}],
            key=lambda ck: ck["step"],
        )
        text = json.dumps(new_index, indent=1).encode()
        _atomic_write(self.folder / INDEX_NAME, lambda f: f.write(text))
        self._index = new_index
        return self.checkpoint(step)

    def archive_after(self, step: int) -> Optional[Path]:
        """Move every checkpoint later than ``step`` out of the store, into a store of its own.

        For a training run resumed from an earlier checkpoint: the captures that the lost run
        made after that point describe weights that no longer exist and must not mix with the
        resumed run's. Nothing is deleted: they become a complete store in
        ``<folder>/superseded/<UTC time>-after-<step>/`` (open it with
        :class:`RepresentationStore`). The files are hard-linked (or copied) into the archive
        and its index written, then this store's index is rewritten without them, and only
        then are the originals removed: after a crash at any point either this store still
        lists them or the archive is complete, and a step stored again later replaces the
        store's own directory entry, never the archive's file.

        Args:
            step: the last step kept; ``-1`` moves every checkpoint (a new run in the folder
                of an old one).

        Returns:
            The archive's folder, or ``None`` when no checkpoint is later than ``step``.
        """
        step = check_positive_int(step, "step", minimum=-1)
        later = [ck for ck in self._index["checkpoints"] if ck["step"] > step]
        if not later:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = self.folder / "superseded" / (f"{stamp}-after-{step}" if step >= 0 else f"{stamp}-all")
        archive, n = base, 1
        while True:  # two archives within one second get distinct folders
            try:
                archive.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                archive = base.with_name(f"{base.name}-{n}")
        kept = [ck for ck in self._index["checkpoints"] if ck["step"] <= step]
        old = json.dumps(dict(self._index, checkpoints=later), indent=1).encode()
        subs = sorted({Path(f["file"]).parts[0] for ck in later for f in ck["files"].values()})
        for sub in subs:
            shutil.copytree(self.folder / sub, archive / sub, copy_function=_link_or_copy)
        _atomic_write(archive / INDEX_NAME, lambda f: f.write(old))
        new_index = dict(self._index, checkpoints=kept)
        new = json.dumps(new_index, indent=1).encode()
        _atomic_write(self.folder / INDEX_NAME, lambda f: f.write(new))
        self._index = new_index
        for sub in subs:
            shutil.rmtree(self.folder / sub, ignore_errors=True)
        return archive

    @staticmethod
    def _reduce(name: str, value: Any, settings: Mapping[str, Any]) -> ReducedBasis:
        if isinstance(value, ReducedBasis):
            return value
        if isinstance(value, torch.Tensor) and value.ndim == 4:
            raise ValueError(
                f"`activations[{name!r}]` is a conv map {tuple(value.shape)}; fold it to (datapoints, neurons) "
                "first (ActivationRecorder does, or svcca_torch.conv_to_datapoints)."
            )
        x = check_activations(value, f"activations[{name!r}]")
        try:
            return svd_reduce(
                x, settings["keep"], keep_rule=settings["keep_rule"], max_directions=settings["max_directions"]
            )
        except ValueError as err:
            raise ValueError(f"`activations[{name!r}]`: {err}") from None
