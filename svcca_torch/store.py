"""On-disk store of SVD-reduced layer representations, one per (checkpoint, layer).

Layout of a store folder::

    index.json                      what is complete: settings, layers, checkpoints, file sizes/hashes
    .lock                           held (fcntl.flock) by the one process writing; holds its PID
    step_000000120/003-layer2.0.q12 one ReducedBasis per (checkpoint, layer): int12 codes (raw, a JSON
                                    header line) or, as .pt, float32 tensors saved by torch.save
    superseded/<time>-after-<step>/ captures moved out by archive_after, a store of their own

A checkpoint exists only once it is listed in ``index.json``. Every file is written to a
temporary name and then renamed (``os.replace``, atomic on POSIX and Windows); the index is
rewritten last. A crash mid-checkpoint therefore leaves at most unlisted files and
``.NAME.PID.tmp`` files, which the next writer removes when it opens the store.

Index format version 2 (this one) adds per-layer datapoint counts and encoded bases;
version 1 stores (svcca-torch 0.1: float32 bases, one datapoint count) are read as they are
and upgraded to version 2 by the first write.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .functional._linalg import gram
from .functional.svcca import KEEP_RULES, ReducedBasis, svd_reduce
from .utils.validation import (
    check_activations,
    check_choice,
    check_fraction,
    check_keep,
    check_optional_positive_int,
    check_positive_int,
)

try:  # POSIX; on Windows the store is not locked (one writer at a time is then up to the user)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: How bases are written: ``"int12"`` (12-bit codes with a per-direction scale, 3/8 of
#: float32, re-orthonormalised on load) or ``"float32"`` (exact, svcca-torch 0.1's format).
ENCODINGS = ("int12", "float32")
_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")
_FILE = re.compile(r"^step_\d+/\d{3,}-[A-Za-z0-9_.-]+\.(pt|q12)$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class StoreCorruptError(ValueError):
    """A store file is missing, truncated or altered; the message names it."""


class StoreLockedError(RuntimeError):
    """Another process holds the store open for writing; the message names its PID."""


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


# ----------------------------------------------------------------------------- encoding
_MAGIC = b"svcca-torch int12 basis\n"


def encode_basis(basis: torch.Tensor, encoding: str = "int12") -> Dict[str, Any]:
    """Encode an ``(datapoints, k)`` orthonormal basis for disk, on its own device.

    ``"int12"``: each column is scaled by its largest magnitude and rounded to a 12-bit
    code in [-2047, 2047]; two codes pack into three bytes. Only the codes and the ``(k,)``
    scales (far smaller than the raw layer) leave the device. ``"float32"``: the basis as is.
    """
    if encoding == "float32":
        return {"basis": basis.detach().to("cpu", torch.float32).contiguous()}
    b = basis.detach().to(torch.float32)
    n, k = b.shape
    scale = b.abs().amax(0).clamp_min(torch.finfo(torch.float32).tiny) / 2047.0
    q = (torch.round(b / scale).clamp(-2047, 2047).to(torch.int32) + 2048).flatten()
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    lo, hi = q[0::2], q[1::2]
    packed = torch.stack([lo & 0xFF, (lo >> 8) | ((hi & 0xF) << 4), hi >> 4], 1).to(torch.uint8)
    return {"codes": packed.flatten().cpu(), "scale": scale.cpu(), "shape": [int(n), int(k)]}


def decode_basis(data: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Inverse of :func:`encode_basis`: a float32 ``(datapoints, k)`` basis on ``device``,
    re-orthonormalised (one Cholesky-QR step in float64 on a ``(k, k)`` Gram matrix) when
    it was quantised, so that its columns are orthonormal to float32 precision."""
    if "basis" in data:
        return data["basis"].to(device=device, dtype=torch.float32)
    n, k = (int(v) for v in data["shape"])
    p = data["codes"].to(device=device, dtype=torch.int16).view(-1, 3)  # codes < 4096 fit int16
    q = torch.empty(p.shape[0], 2, dtype=torch.int16, device=p.device)  # (lo, hi) code pairs
    torch.bitwise_or(p[:, 0], (p[:, 1] & 0xF) << 8, out=q[:, 0])
    torch.bitwise_or(p[:, 1] >> 4, p[:, 2] << 4, out=q[:, 1])
    scale = data["scale"].to(device=device, dtype=torch.float32)
    u = torch.addcmul(-2048.0 * scale, q.view(-1)[: n * k].view(n, k).to(torch.float32), scale)
    chol, info = torch.linalg.cholesky_ex(gram(u).to(torch.float64))
    if int(info) != 0:  # numerically singular: Householder QR instead
        return torch.linalg.qr(u).Q
    return torch.linalg.solve_triangular(chol.to(u.dtype).mT, u, upper=True, left=False)  # u R⁻¹


def _write_payload(f, payload: Dict[str, Any]) -> None:
    """One layer file: a float32 basis as torch.save'd tensors (0.1's format); an int12 one
    as raw little-endian sections after a one-line JSON header (no pickle to load)."""
    if "basis" in payload:
        torch.save(payload, f)
        return
    k = payload["shape"][1]
    header = {"shape": payload["shape"], "n_neurons": payload["n_neurons"], "k": k}
    f.write(_MAGIC + json.dumps(header).encode() + b"\n")
    for t in (payload["scale"], payload["singular_values"]):
        f.write(t.numpy().astype("<f4").tobytes())
    f.write(payload["codes"].numpy().tobytes())


def _read_payload(data: bytes) -> Dict[str, Any]:
    if not data.startswith(_MAGIC):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    end = data.index(b"\n", len(_MAGIC))
    header = json.loads(data[len(_MAGIC) : end])
    (n, k), off = header["shape"], end + 1
    need = off + 8 * k + 3 * ((n * k + 1) // 2)
    if len(data) != need:
        raise ValueError(f"{len(data)} bytes where the header implies {need}")
    scale = torch.from_numpy(np.frombuffer(data, "<f4", k, off).astype(np.float32))
    sv = torch.from_numpy(np.frombuffer(data, "<f4", k, off + 4 * k).astype(np.float32))
    codes = torch.from_numpy(np.frombuffer(data, np.uint8, offset=off + 8 * k).copy())
    return {"codes": codes, "scale": scale, "shape": [n, k], "singular_values": sv, "n_neurons": header["n_neurons"]}


# ----------------------------------------------------------------------------- locking
# Writers of this process, by store folder: {realpath: [pid, fd, count]}. flock is per open
# file, so two store objects of one process on one folder share one lock instead of refusing
# each other (each rereads the index before it writes); another process is refused.
_HELD: Dict[str, List[int]] = {}


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _acquire_lock(folder: Path) -> Optional[str]:
    if fcntl is None:  # pragma: no cover
        return None
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is not None and held[0] == os.getpid():
        held[2] += 1
        return key
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreLockedError(
            f"the store at {str(folder)!r} is open for writing by process {_holder(path)} (it holds "
            f"{str(path)!r}): two writers would lose each other's checkpoints. Use another folder (run_dir) "
            "for this run, stop the other one, or open the store with read_only=True to read it."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [os.getpid(), fd, 1]
    return key


def _release_lock(key: Optional[str]) -> None:
    held = _HELD.get(key) if key is not None else None
    if held is None or held[0] != os.getpid():
        return
    held[2] -= 1
    if held[2] == 0:
        del _HELD[key]
        try:
            fcntl.flock(held[1], fcntl.LOCK_UN)
        finally:
            os.close(held[1])


# ----------------------------------------------------------------------------- index schema
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_index(index: Any, path: Path) -> Dict[str, Any]:
    """Check the index's structure; return it as version 2 (a version 1 index is converted).

    Every failure is a :class:`StoreCorruptError` of one line naming the index and the entry.
    """

    def bad(what: str) -> StoreCorruptError:
        return StoreCorruptError(f"store index {str(path)!r} is damaged: {what}; it cannot be read.")

    if not isinstance(index, dict):
        raise bad("it is not a JSON object")
    version = index.get("version")
    if version not in READABLE_VERSIONS:
        raise bad(f"unknown format version {version!r} (this svcca-torch reads {list(READABLE_VERSIONS)})")
    for key in ("settings", "layers", "checkpoints"):
        if key not in index:
            raise bad(f"no {key!r}")
    settings = index["settings"]
    if not isinstance(settings, dict):
        raise bad("'settings' is not an object")
    try:
        keep = check_keep(settings.get("keep"))
        keep_rule = check_choice(settings.get("keep_rule"), "keep_rule", KEEP_RULES)
        max_directions = check_optional_positive_int(settings.get("max_directions"), "max_directions")
        encoding = check_choice(settings.get("encoding", "float32"), "encoding", ENCODINGS)
    except (ValueError, TypeError) as err:
        raise bad(f"settings: {' '.join(str(err).split())}") from None
    layers = index["layers"]
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or len(set(layers)) != len(layers):
        raise bad("'layers' is not a list of distinct layer names")
    raw_n = index.get("n_datapoints")
    if version == 1:
        if raw_n is not None and (not _is_int(raw_n) or raw_n < 1):
            raise bad(f"'n_datapoints' is {raw_n!r}, not a positive int")
        n_per_layer = {name: raw_n for name in layers} if raw_n is not None else {}
    else:
        if not isinstance(raw_n, dict) or not all(_is_int(v) and v >= 1 for v in raw_n.values()):
            raise bad("'n_datapoints' is not an object {layer: positive int}")
        n_per_layer = dict(raw_n)
    unknown = [n for n in n_per_layer if n not in layers]
    if unknown:
        raise bad(f"'n_datapoints' names layers {unknown} missing from 'layers'")
    cks = index["checkpoints"]
    if not isinstance(cks, list):
        raise bad("'checkpoints' is not a list")
    steps = set()
    out_cks = []
    for i, ck in enumerate(cks):
        if not isinstance(ck, dict):
            raise bad(f"checkpoint {i} is not an object")
        step = ck.get("step")
        where = f"checkpoint {i} (step {step!r})"
        if not _is_int(step) or step < 0:
            raise bad(f"{where}: the step is not an int >= 0")
        if step in steps:
            raise bad(f"step {step} is listed twice")
        steps.add(step)
        epoch, fraction = ck.get("epoch"), ck.get("fraction")
        if epoch is not None and (not _is_int(epoch) or epoch < 0):
            raise bad(f"{where}: 'epoch' is {epoch!r}, not an int >= 0 or null")
        if fraction is not None and (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                                     or not 0 <= fraction <= 1):
            raise bad(f"{where}: 'fraction' is {fraction!r}, not a number in [0, 1] or null")
        files = ck.get("files")
        if not isinstance(files, dict) or not files:
            raise bad(f"{where}: no 'files'")
        out_files = {}
        for name, entry in files.items():
            if name not in layers:
                raise bad(f"{where}: layer {name!r} is not in 'layers'")
            if not isinstance(entry, dict):
                raise bad(f"{where}, layer {name!r}: the entry is not an object")
            rel = entry.get("file")
            if not isinstance(rel, str) or not _FILE.match(rel):
                raise bad(f"{where}, layer {name!r}: file {rel!r} is not a step_*/NNN-name.pt path inside the store")
            for key in ("bytes", "k", "n_neurons"):
                if not _is_int(entry.get(key)) or entry[key] < (0 if key == "bytes" else 1):
                    raise bad(f"{where}, layer {name!r}: {key!r} is {entry.get(key)!r}")
            if not isinstance(entry.get("sha256"), str) or not _SHA.match(entry["sha256"]):
                raise bad(f"{where}, layer {name!r}: 'sha256' is not a SHA-256 hex digest")
            enc = entry.get("encoding", "float32")
            if enc not in ENCODINGS:
                raise bad(f"{where}, layer {name!r}: unknown encoding {enc!r}")
            n = entry.get("n", n_per_layer.get(name))
            if not _is_int(n) or n < 1:
                raise bad(f"{where}, layer {name!r}: no datapoint count")
            if n_per_layer.setdefault(name, n) != n:
                raise bad(f"{where}, layer {name!r}: {n} datapoints where the store holds {n_per_layer[name]}")
            out_files[name] = dict(entry, encoding=enc, n=n)
        out_cks.append({"step": step, "epoch": epoch, "fraction": fraction, "files": out_files})
    return {
        "version": FORMAT_VERSION,
        "settings": {"keep": keep, "keep_rule": keep_rule, "max_directions": max_directions, "encoding": encoding},
        "n_datapoints": n_per_layer,
        "layers": list(layers),
        "checkpoints": sorted(out_cks, key=lambda c: c["step"]),
    }


class RepresentationStore:
    """SVD-reduced layer representations over training, kept on disk.

    For each checkpoint (a training step, with its epoch and fraction of training) and each
    layer, only the reduced representation is kept: the top-k left singular directions of
    the centred activations ``(datapoints, neurons)`` (k chosen by ``keep``/``keep_rule``,
    see :func:`svcca_torch.svd_reduce`, capped at ``max_directions``) as an ``(n, k)``
    basis, plus the k singular values. That is everything SVCCA needs to compare the layer
    with any other stored layer later.

    Cost on disk: with ``encoding="int12"`` (the default for new stores) about
    ``n * sum_k * 1.5`` bytes per checkpoint (n probe datapoints of the layer, sum_k the
    directions kept summed over layers), 3/8 of the float32 bases, with every SVCCA
    similarity within 1e-3 of the float32 bases' (measured ~1e-6, see README); ``"float32"``
    keeps the exact bases (``n * sum_k * 4`` bytes). ``max_directions`` bounds sum_k and so
    the bytes per checkpoint. Loaded bases are float32 ``(n, k)`` in memory. Raw activations
    are never written, and :meth:`add` reduces one layer at a time.

    Layers may have different datapoint counts (e.g. conv layers pooled to their own grid);
    each layer keeps its count at every checkpoint.

    Args:
        folder: the store's folder; created if missing, reopened (and extendable) if it
            already holds a store (svcca-torch 0.1 stores included).
        keep: the SVD rule: an int (directions) or a float in (0, 1] (default 0.99).
        keep_rule: ``"singular_values"`` (default) or ``"variance"``.
        max_directions: cap on k per layer (default: none).
        encoding: ``"int12"`` (default for a new store) or ``"float32"``; for an existing
            store the stored setting is used unless given (files of both kinds are read).
        read_only: open an existing store to read it: no lock, never blocks, never writes.

    One writer at a time: a writer holds an exclusive lock (``fcntl.flock`` on
    ``<folder>/.lock``, which holds its PID) from opening until :meth:`close` (or garbage
    collection, or the process's end, a kill included); a second process opening the store
    for writing gets :class:`StoreLockedError` naming the holder's PID. When a writer opens
    the store it removes what killed writes left (``.NAME.PID.tmp`` files, layer files no
    checkpoint lists, archive folders without an index).

    On reopening, the settings come from the index; passing different ``keep``,
    ``keep_rule`` or ``max_directions`` is an error (all checkpoints of one store must be
    reduced alike to be comparable). The index's structure is validated when the store is
    opened and a damaged or missing file raises :class:`StoreCorruptError` naming it (sizes
    are checked on opening, SHA-256 hashes when a file is loaded); no path in the index can
    point outside the store's folder.
    """

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        *,
        keep: Optional[Union[int, float]] = None,
        keep_rule: Optional[str] = None,
        max_directions: Optional[int] = None,
        encoding: Optional[str] = None,
        read_only: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.read_only = bool(read_only)
        self._lock: Optional[str] = None
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"`folder` {str(self.folder)!r} exists and is not a directory.")
        settings = {
            "keep": None if keep is None else check_keep(keep),
            "keep_rule": None if keep_rule is None else check_choice(keep_rule, "keep_rule", KEEP_RULES),
            "max_directions": check_optional_positive_int(max_directions, "max_directions"),
        }
        encoding = None if encoding is None else check_choice(encoding, "encoding", ENCODINGS)
        index_path = self.folder / INDEX_NAME
        if self.read_only:
            if not index_path.is_file():
                raise ValueError(f"`folder` {str(self.folder)!r} holds no store ({INDEX_NAME} not found); "
                                 "read_only=True opens an existing store only.")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire_lock(self.folder)
        try:
            if index_path.exists():
                self._index = self._read_index(index_path)
                for key, value in settings.items():
                    if value is not None and value != self._index["settings"][key]:
                        raise ValueError(
                            f"`{key}`={value!r} differs from {self._index['settings'][key]!r}, with which the store "
                            f"at {str(self.folder)!r} was written; checkpoints reduced differently are not "
                            "comparable. Omit it (the stored setting is used) or use a new folder."
                        )
                if encoding is not None:  # how new files are written; files of both kinds stay readable
                    self._index["settings"]["encoding"] = encoding
            else:
                self._index = {
                    "version": FORMAT_VERSION,
                    "settings": {
                        "keep": 0.99 if settings["keep"] is None else settings["keep"],
                        "keep_rule": settings["keep_rule"] or "singular_values",
                        "max_directions": settings["max_directions"],
                        "encoding": encoding or "int12",
                    },
                    "n_datapoints": {},
                    "layers": [],
                    "checkpoints": [],
                }
            if not self.read_only:
                self._clean()
            self._verify_sizes()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Release the writer's lock (a no-op for a reader or a closed store)."""
        lock, self._lock = getattr(self, "_lock", None), None
        _release_lock(lock)

    def __enter__(self) -> "RepresentationStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _clean(self) -> None:
        """Remove what killed writes left behind (under the writer's lock)."""
        listed = {e["file"] for ck in self._index["checkpoints"] for e in ck["files"].values()}
        me = str(os.getpid())
        dirs = [self.folder] + sorted(p for p in self.folder.glob("step_*") if p.is_dir())
        for d in dirs:
            for p in list(d.iterdir()):
                m = _TMP.match(p.name)
                if m:
                    if p.is_file() and m.group(1) != me:
                        p.unlink(missing_ok=True)
                elif d is not self.folder and p.is_file() and f"{d.name}/{p.name}" not in listed:
                    p.unlink(missing_ok=True)  # written by an add that never reached the index
            if d is not self.folder and not any(d.iterdir()):
                d.rmdir()
        sup = self.folder / "superseded"
        if sup.is_dir():
            for p in sorted(sup.iterdir()):
                if p.is_dir() and not (p / INDEX_NAME).is_file():  # an archive_after that was killed
                    shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def _read_index(self, path: Path) -> Dict[str, Any]:
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"store index {str(path)!r} is damaged ({err}); it cannot be read.") from None
        except OSError as err:
            raise StoreCorruptError(f"store index {str(path)!r} cannot be read ({err}).") from None
        index = _validate_index(raw, path)
        self._index_stat = self._stat(path)
        return index

    @staticmethod
    def _stat(path: Path) -> Optional[Tuple[int, int, int]]:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> None:
        """Reread the index if another store object (or a writer, for a reader) changed it."""
        path = self.folder / INDEX_NAME
        stat = self._stat(path)
        if stat is not None and stat != getattr(self, "_index_stat", None):
            encoding = self._index["settings"]["encoding"]
            self._index = self._read_index(path)
            self._index["settings"]["encoding"] = encoding

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
        """The reduction settings: ``keep``, ``keep_rule``, ``max_directions``, ``encoding``."""
        return dict(self._index["settings"])

    @property
    def layers(self) -> List[str]:
        """Every stored layer name, in the order first added (the recorder's depth order)."""
        return list(self._index["layers"])

    @property
    def datapoints(self) -> Dict[str, int]:
        """``{layer: datapoints}``: rows of the layer's basis at every checkpoint."""
        return dict(self._index["n_datapoints"])

    @property
    def n_datapoints(self) -> Optional[int]:
        """Datapoints per layer when every layer has the same count; None while empty or
        when layers differ (see :attr:`datapoints`)."""
        counts = set(self._index["n_datapoints"].values())
        return counts.pop() if len(counts) == 1 else None

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
            f"datapoints={self.n_datapoints or self.datapoints}, settings={self.settings})"
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

    def _root(self) -> Path:
        if getattr(self, "_resolved", None) is None:
            self._resolved = self.folder.resolve()
        return self._resolved

    def load(
        self, checkpoint: CheckpointRef, layer: str, *, device: Optional[Union[str, torch.device]] = None
    ) -> ReducedBasis:
        """The :class:`~svcca_torch.ReducedBasis` of ``layer`` at ``checkpoint`` (a
        :class:`Checkpoint` or a step), float32 on ``device`` (default CPU): an orthonormal
        ``(datapoints, k)`` basis and its ``(k,)`` singular values. An int12 file is parsed
        without pickle, a float32 one read with ``torch.load(weights_only=True)``; an encoded
        basis is decoded on ``device``."""
        ck = self._entry(checkpoint)
        if layer not in ck["files"]:
            raise ValueError(
                f"`layer` {layer!r} is not stored at step {ck['step']}; stored layers: {sorted(ck['files'])}."
            )
        entry = ck["files"][layer]
        path = self.folder / entry["file"]
        root = self._root()
        if root not in path.resolve().parents:  # a link pointing out of the store
            raise StoreCorruptError(f"store file {str(path)!r} points outside the store folder {str(root)!r}.")
        try:
            raw = path.read_bytes()  # read once: hashed and parsed from memory
        except OSError as err:
            raise StoreCorruptError(f"store file {str(path)!r} cannot be read ({err}).") from None
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise StoreCorruptError(f"store file {str(path)!r} is damaged: its SHA-256 does not match the index.")
        try:
            data = _read_payload(raw)
            basis = decode_basis(data, device)
            if tuple(basis.shape) != (entry["n"], entry["k"]):
                raise ValueError(f"basis of shape {tuple(basis.shape)}, index says {(entry['n'], entry['k'])}")
            return ReducedBasis(
                basis=basis,
                singular_values=data["singular_values"].to(device=device, dtype=torch.float32),
                n_neurons=int(data["n_neurons"]),
            )
        except Exception as err:  # any unpickling failure means the file is not what was written
            raise StoreCorruptError(f"store file {str(path)!r} is damaged ({type(err).__name__}: {err}).") from None

    def load_checkpoint(
        self,
        checkpoint: CheckpointRef,
        layers: Optional[Sequence[str]] = None,
        *,
        device: Optional[Union[str, torch.device]] = None,
    ) -> Dict[str, ReducedBasis]:
        """``{layer: ReducedBasis}`` for ``layers`` (default: all stored) at ``checkpoint``."""
        ck = self._checkpoint(self._entry(checkpoint))
        return {name: self.load(ck, name, device=device) for name in (ck.layers if layers is None else layers)}

    # ------------------------------------------------------------------ writing
    def _writable(self) -> None:
        if self.read_only:
            raise ValueError(f"the store at {str(self.folder)!r} was opened with read_only=True; open it without "
                             "it to write (one writer at a time).")
        if self._lock is None and fcntl is not None:
            raise ValueError(f"the store at {str(self.folder)!r} is closed; open it again to write.")
        self.refresh()

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
                or already-reduced :class:`~svcca_torch.ReducedBasis` values. Each layer
                has the same datapoints at every checkpoint (layers may differ from each other).
                Reduction and encoding run on the tensors' device (a GPU when they are
                there); only the encoded basis is moved to the CPU for writing.
            step: the training step, an int >= 0 not stored yet.
            epoch: the epoch (optional).
            fraction: the fraction of training done, in [0, 1] (optional; used to pick
                checkpoints for figures, else step / last step is used).

        Returns:
            The stored :class:`Checkpoint`. Layers are reduced and written one at a time;
            the checkpoint becomes visible (in the index) only once all are on disk.
        """
        self._writable()
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
        counts = dict(self._index["n_datapoints"])
        layers = list(self._index["layers"])
        sub = f"step_{step:09d}"
        (self.folder / sub).mkdir(exist_ok=True)
        files: Dict[str, Dict[str, Any]] = {}
        for name, value in activations.items():
            if not isinstance(name, str):
                raise ValueError(f"`activations` keys must be layer names (str), got {name!r}.")
            basis = self._reduce(name, value, settings)
            n = basis.n_datapoints
            if counts.setdefault(name, n) != n:
                raise ValueError(
                    f"`activations[{name!r}]` has {n} datapoints but the store holds {counts[name]} for this "
                    "layer: use the same probe set (and recorder settings) at every checkpoint."
                )
            if name not in layers:
                layers.append(name)
            ext = "q12" if settings["encoding"] == "int12" else "pt"
            rel = f"{sub}/{layers.index(name):03d}-{_safe(name)}.{ext}"
            payload = encode_basis(basis.basis, settings["encoding"])
            payload["singular_values"] = basis.singular_values.detach().to("cpu", torch.float32).contiguous()
            payload["n_neurons"] = int(basis.n_neurons)
            path = self.folder / rel
            _atomic_write(path, lambda f, p=payload: _write_payload(f, p))
            files[name] = {"file": rel, "bytes": path.stat().st_size, "sha256": _sha256(path), "k": basis.k,
                           "n_neurons": int(basis.n_neurons), "n": n, "encoding": settings["encoding"]}
            del basis, payload
        new_index = dict(self._index)
        new_index["layers"] = layers
        new_index["n_datapoints"] = counts
        new_index["checkpoints"] = sorted(
            self._index["checkpoints"] + [{"step": step, "epoch": epoch, "fraction": fraction, "files": files}],
            key=lambda ck: ck["step"],
        )
        self._write_index(new_index)
        return self.checkpoint(step)

    def _write_index(self, index: Dict[str, Any]) -> None:
        text = json.dumps(index, indent=1).encode()
        _atomic_write(self.folder / INDEX_NAME, lambda f: f.write(text))
        self._index = index
        self._index_stat = self._stat(self.folder / INDEX_NAME)

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
        store's own directory entry, never the archive's file. An archive folder left
        without an index by a crash is removed when a writer next opens the store.

        Args:
            step: the last step kept; ``-1`` moves every checkpoint (a new run in the folder
                of an old one).

        Returns:
            The archive's folder, or ``None`` when no checkpoint is later than ``step``.
        """
        self._writable()
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
        self._write_index(dict(self._index, checkpoints=kept))
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
