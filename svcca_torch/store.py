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

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from .functional._linalg import gram
from .utils.files import atomic_write as _atomic_write
from .functional.svcca import KEEP_RULES, ReducedBasis, svd_reduce
from .utils.validation import (
    check_activations,
    check_choice,
    check_device,
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
_STEP_DIR = re.compile(r"^step_\d+$")
_LAYER_FILE = re.compile(r"^\d{3,}-[A-Za-z0-9_.-]+\.(pt|q12)$")
_ARCHIVE = re.compile(r"^\d{8}T\d{6}Z-(after-\d+|all)(-\d+)?$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
#: Reads of one snapshot (index, then files) before a failure is reported: a writer that
#: rewrites the index meanwhile (archive_after) makes a reader read again.
_SNAPSHOT_TRIES = 8


class StoreCorruptError(ValueError):
    """A store file is missing, truncated or altered; the message names it."""


class StoreLockedError(RuntimeError):
    """Another writer holds the store: another process (the message names its PID) or,
    in this process, a store object not closed yet (the message says where it was opened)."""


class StoreVersionError(ValueError):
    """The store was written by a newer svcca-torch, in a format this version cannot read."""


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


def _link_or_copy(src: Path, dst: Path) -> None:
    if not stat.S_ISREG(os.lstat(src).st_mode):  # never link or copy through a symbolic link
        raise OSError(errno.EINVAL, "not a regular file", str(src))
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system
        shutil.copy2(src, dst, follow_symlinks=False)


def _remove_originals(folder: Path, rels: Sequence[str]) -> None:
    """Unlink the archived files (never a link's target) and the step folders they empty."""
    for rel in rels:
        (folder / rel).unlink(missing_ok=True)
    for sub in sorted({Path(rel).parts[0] for rel in rels}):
        try:
            (folder / sub).rmdir()
        except OSError:  # not empty (a later add, or something the store did not write): kept
            pass


_USABLE: Set[str] = set()  # devices found usable (checked once each)


def check_usable_device(device: Any, name: str = "device") -> Optional[torch.device]:
    """:func:`check_device`, and that the device can hold a tensor on this machine: an
    unavailable device is a ValueError about the device, never reported as a damaged file."""
    dev = check_device(device, name)
    if dev is None or dev.type == "cpu" or str(dev) in _USABLE:
        return dev
    why = None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device is available here"
    elif dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        why = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    else:
        try:
            torch.empty(0, device=dev)
        except Exception as err:  # RuntimeError (no driver, bad ordinal), AssertionError (a build without it)
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if why is not None:
        raise ValueError(f"`{name}` {str(dev)!r} cannot be used ({why}); pass an available device, e.g. 'cpu'.")
    _USABLE.add(str(dev))
    return dev


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


class _Mismatch(ValueError):
    """A layer file parses but is not what its index entry describes."""


def _read_payload(data: bytes, shape: Tuple[int, int]) -> Dict[str, Any]:
    """Parse one layer file whose index entry says ``shape`` (n, k). The declared shape and
    the size it implies are checked before anything of that size is allocated."""
    if not data.startswith(_MAGIC):
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # tensors of the file's size
        basis = payload.get("basis") if isinstance(payload, dict) else None
        if not isinstance(basis, torch.Tensor) or tuple(basis.shape) != shape:
            got = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
            raise _Mismatch(f"it holds a basis of shape {got} where the index says {shape}")
    else:
        end = data.index(b"\n", len(_MAGIC))
        header = json.loads(data[len(_MAGIC) : end])
        declared = header.get("shape") if isinstance(header, dict) else None
        if (not isinstance(declared, list) or len(declared) != 2 or not all(_is_int(v) for v in declared)
                or tuple(declared) != shape):
            said = tuple(declared) if isinstance(declared, list) else repr(declared)
            raise _Mismatch(f"it declares a basis of shape {said} where the index says {shape}")
        (n, k), off = shape, end + 1
        need = off + 8 * k + 3 * ((n * k + 1) // 2)
        if len(data) != need:
            raise _Mismatch(f"{len(data)} bytes where its {shape} basis needs {need}")
        scale = torch.from_numpy(np.frombuffer(data, "<f4", k, off).astype(np.float32))
        sv = torch.from_numpy(np.frombuffer(data, "<f4", k, off + 4 * k).astype(np.float32))
        codes = torch.from_numpy(np.frombuffer(data, np.uint8, offset=off + 8 * k).copy())
        payload = {"codes": codes, "scale": scale, "shape": [n, k], "singular_values": sv,
                   "n_neurons": header.get("n_neurons")}
    sv = payload.get("singular_values")
    if not isinstance(sv, torch.Tensor) or tuple(sv.shape) != (shape[1],):
        raise _Mismatch(f"its singular values are not {shape[1]} numbers")
    if not _is_int(payload.get("n_neurons")):
        raise _Mismatch(f"its neuron count is {payload.get('n_neurons')!r}")
    return payload


# ----------------------------------------------------------------------------- locking
# Writers of this process, by store folder: {realpath: (pid, fd or -1, owner token, where
# opened)}. flock is per open file, so a second store object of this process would get the
# lock again: it is refused here instead (two writers would mix their checkpoints).
_HELD: Dict[str, Tuple[int, int, object, str]] = {}
_HELD_LOCK = threading.Lock()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


_LIBRARIES = ("svcca_torch", "torch", "pytorch_lightning", "lightning")


def _opened_at() -> str:
    """Where a writer is being opened, for the error of the next one: the first caller
    outside this file and, when that is the library itself (a tracker), the first caller
    outside svcca-torch, PyTorch and Lightning (the user's code)."""
    frame, inner, user = sys._getframe(1), None, None
    while frame is not None and user is None:
        if inner is None and frame.f_code.co_filename != __file__:
            inner = frame
        if inner is not None and not str(frame.f_globals.get("__name__", "")).startswith(_LIBRARIES):
            user = frame
        frame = frame.f_back
    where = [f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})" for f in (inner, user) if f is not None]
    return ", called from ".join(dict.fromkeys(where)) or "unknown"


def _not_own(folder: Path, path: Union[str, Path], what: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"the store at {str(folder)!r} cannot be opened for writing: {str(path)!r} {what}. The store never writes "
        "such an entry, and cleaning or archiving through it could delete or change files outside the folder. "
        "Remove it or use another folder (run_dir); read_only=True still reads the store."
    )


def _link_target(path: Union[str, Path]) -> str:
    try:
        return f"is a symbolic link (to {os.readlink(path)!r})"
    except OSError:
        return "is a symbolic link"


def _acquire_lock(folder: Path, token: object) -> str:
    key = os.path.realpath(folder)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held[0] == os.getpid():
            raise StoreLockedError(
                f"the store at {str(folder)!r} is already open for writing in this process (opened at {held[3]} and "
                "not closed): two writers would mix their checkpoints. Close that one first (store.close(), or the "
                "tracker's close()/finish()), use another folder (run_dir) for this run, or open the store with "
                "read_only=True to read it."
            )
        fd = -1
        if fcntl is not None:
            path = folder / LOCK_NAME
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:  # the PID written below would land in the link's target
                    raise _not_own(folder, path, _link_target(path)) from None
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else \
                    f"has {st.st_nlink} hard links (writing the PID into it would change a file elsewhere)"
                raise _not_own(folder, path, what)
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
        _HELD[key] = (os.getpid(), fd, token, _opened_at())
    return key


def _release_lock(key: Optional[str], token: object) -> None:
    with _HELD_LOCK:
        held = _HELD.get(key) if key is not None else None
        if held is None or held[0] != os.getpid() or held[2] is not token:
            return
        del _HELD[key]
    if held[1] >= 0:
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
    if _is_int(version) and version > FORMAT_VERSION:
        raise StoreVersionError(
            f"the store at {str(path.parent)!r} was written by a newer svcca-torch (format {version}; this one reads "
            f"formats {list(READABLE_VERSIONS)}): upgrade svcca-torch (pip install -U svcca-torch) to read it."
        )
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
            if entry["k"] > n:  # an orthonormal (n, k) basis has k <= n; bounds what decoding allocates
                raise bad(f"{where}, layer {name!r}: 'k' is {entry['k']}, more directions than its {n} datapoints")
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
    similarity within 1e-3 of the float32 bases' (measured ~1e-6, see docs/store.md); ``"float32"``
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
    collection, or the process's end, a kill included); a second writer, in another process
    or in this one (another store object on the same folder, however the path is spelled),
    gets :class:`StoreLockedError` naming the holder. When a writer opens the store it
    removes what killed writes left (``.NAME.PID.tmp`` files, layer files no checkpoint
    lists, archive folders without an index), only entries named as the store names them
    and never through a link: a symbolic link among them (or a hard-linked ``.lock``) makes
    opening for writing fail with :class:`StoreCorruptError` naming it, and anything else
    the store did not write is left alone, with one warning.

    On reopening, the settings come from the index; passing different ``keep``,
    ``keep_rule`` or ``max_directions`` is an error (all checkpoints of one store must be
    reduced alike to be comparable). The index's structure is validated when the store is
    opened and a damaged or missing file raises :class:`StoreCorruptError` naming it (sizes
    are checked on opening, SHA-256 hashes and the declared shape when a file is loaded); no
    path in the index can point outside the store's folder. A reader whose index a writer
    replaced meanwhile (e.g. :meth:`archive_after`) reads the new one instead of reporting
    the moved files as damaged. A store of a newer format raises :class:`StoreVersionError`.
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
        self._token = object()
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
            self._lock = _acquire_lock(self.folder, self._token)
        try:
            if os.path.lexists(index_path):
                self._index = self._read_snapshot(index_path)
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
                self._verify_sizes(self._index)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Release the writer's lock (a no-op for a reader or a closed store)."""
        lock, self._lock = getattr(self, "_lock", None), None
        _release_lock(lock, getattr(self, "_token", None))

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
        """Remove what killed writes left behind (under the writer's lock).

        Only entries named as the store names them are removed, and never through a link:
        a symbolic link where the store keeps its files is refused (:class:`StoreCorruptError`
        naming it), anything else the store did not write is left alone and warned about."""
        listed = {e["file"] for ck in self._index["checkpoints"] for e in ck["files"].values()}
        me = str(os.getpid())
        remove: List[Path] = []
        archives: List[Tuple[Path, List[Path]]] = []
        odd: List[Path] = []
        step_dirs: List[Path] = []

        def entries(d: Path) -> List[os.DirEntry]:
            with os.scandir(d) as it:
                return sorted(it, key=lambda e: e.name)

        def leftover_tmp(e: os.DirEntry) -> bool:
            m = _TMP.match(e.name)
            return bool(m) and m.group(1) != me

        for e in entries(self.folder):
            managed = e.name in (INDEX_NAME, LOCK_NAME, "superseded") or _STEP_DIR.match(e.name) or _TMP.match(e.name)
            if not managed:
                continue  # the user's own files: the store never touches them
            if e.is_symlink():
                raise _not_own(self.folder, e.path, _link_target(e.path))
            if _STEP_DIR.match(e.name):
                (step_dirs if e.is_dir(follow_symlinks=False) else odd).append(Path(e.path))
            elif e.name == "superseded":
                if not e.is_dir(follow_symlinks=False):
                    odd.append(Path(e.path))
                    continue
                for a in entries(Path(e.path)):
                    if a.is_symlink():
                        raise _not_own(self.folder, a.path, _link_target(a.path))
                    if not a.is_dir(follow_symlinks=False) or not _ARCHIVE.match(a.name):
                        odd.append(Path(a.path))
                    elif not os.path.lexists(os.path.join(a.path, INDEX_NAME)):  # an archive_after that was killed
                        files = self._own_archive(Path(a.path), entries, leftover_tmp)
                        if files is None:
                            odd.append(Path(a.path))
                        else:
                            archives.append((Path(a.path), files))
            elif _TMP.match(e.name):
                if not e.is_file(follow_symlinks=False):
                    odd.append(Path(e.path))
                elif leftover_tmp(e):
                    remove.append(Path(e.path))
        for d in step_dirs:
            for e in entries(d):
                if e.is_symlink():
                    raise _not_own(self.folder, e.path, _link_target(e.path))
                if f"{d.name}/{e.name}" in listed:
                    continue
                if not e.is_file(follow_symlinks=False) or not (_LAYER_FILE.match(e.name) or _TMP.match(e.name)):
                    odd.append(Path(e.path))
                elif _LAYER_FILE.match(e.name) or leftover_tmp(e):
                    remove.append(Path(e.path))  # written by an add that never reached the index, or killed
        for p in remove:
            p.unlink(missing_ok=True)
        for d in step_dirs:
            if not any(os.scandir(d)):
                d.rmdir()
        for archive, files in archives:
            for p in files:
                p.unlink(missing_ok=True)
            for d in sorted({p.parent for p in files} - {archive}):
                if not any(os.scandir(d)):
                    d.rmdir()
            if not any(os.scandir(archive)):
                archive.rmdir()
        if odd:
            shown = ", ".join(repr(str(p)) for p in odd[:4]) + (f" and {len(odd) - 4} more" if len(odd) > 4 else "")
            warnings.warn(
                f"RepresentationStore: left alone {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} in "
                f"{str(self.folder)!r} that the store did not write: {shown}. Remove them if they are not needed.",
                stacklevel=3,
            )

    def _own_archive(self, archive: Path, entries, leftover_tmp) -> Optional[List[Path]]:
        """The files of an index-less archive folder when all are ones archive_after writes
        (``step_*/NNN-name.*``, temporary files), else None (it is left alone)."""
        files: List[Path] = []
        for e in entries(archive):
            if e.is_symlink():
                raise _not_own(self.folder, e.path, _link_target(e.path))
            if e.is_file(follow_symlinks=False) and _TMP.match(e.name):
                files.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False) and _STEP_DIR.match(e.name):
                for f in entries(Path(e.path)):
                    if f.is_symlink():
                        raise _not_own(self.folder, f.path, _link_target(f.path))
                    if not f.is_file(follow_symlinks=False) or not (_LAYER_FILE.match(f.name) or _TMP.match(f.name)):
                        return None
                    files.append(Path(f.path))
            else:
                return None
        return files

    def _own_dir(self, path: Path) -> Path:
        """``path`` (a folder the store writes into) created if missing; a link there is refused."""
        path.mkdir(exist_ok=True)
        if path.is_symlink():
            raise _not_own(self.folder, path, _link_target(path))
        return path

    # ------------------------------------------------------------------ reading
    def _read_index(self, path: Path) -> Dict[str, Any]:
        try:
            with open(path, "rb") as f:  # stat and content of one and the same file
                st = os.fstat(f.fileno())
                text = f.read()
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"store index {str(path)!r} is damaged ({err}); it cannot be read.") from None
        except OSError as err:
            raise StoreCorruptError(f"store index {str(path)!r} cannot be read ({err}).") from None
        index = _validate_index(raw, path)
        self._index_stat = (st.st_ino, st.st_size, st.st_mtime_ns)
        return index

    def _read_snapshot(self, path: Path) -> Dict[str, Any]:
        """The index, and for a reader a check that its files are there, from one consistent
        state: when a file is missing or resized and a writer replaced the index meanwhile
        (archive_after removes files only after rewriting it), read again."""
        for attempt in range(_SNAPSHOT_TRIES):
            index = self._read_index(path)
            if not self.read_only:  # a writer holds the lock: nothing changes under it
                return index
            try:
                self._verify_sizes(index)
                return index
            except StoreCorruptError:
                if attempt + 1 == _SNAPSHOT_TRIES or self._stat(path) == self._index_stat:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _stat(path: Path) -> Optional[Tuple[int, int, int]]:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Reread the index if another store object (or a writer, for a reader) changed it;
        whether it did."""
        path = self.folder / INDEX_NAME
        stat_ = self._stat(path)
        if stat_ is None or stat_ == getattr(self, "_index_stat", None):
            return False
        encoding = self._index["settings"]["encoding"]
        self._index = self._read_index(path)
        self._index["settings"]["encoding"] = encoding
        return True

    def _verify_sizes(self, index: Dict[str, Any]) -> None:
        for ck in index["checkpoints"]:
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
        device = check_usable_device(device)
        step = checkpoint.step if isinstance(checkpoint, Checkpoint) else checkpoint
        root = self._root()
        for attempt in range(_SNAPSHOT_TRIES):
            ck = self._entry(step)
            if layer not in ck["files"]:
                raise ValueError(
                    f"`layer` {layer!r} is not stored at step {ck['step']}; stored layers: {sorted(ck['files'])}."
                )
            entry = ck["files"][layer]
            path = self.folder / entry["file"]
            if root not in path.resolve().parents:  # a link pointing out of the store
                raise StoreCorruptError(f"store file {str(path)!r} points outside the store folder {str(root)!r}.")
            try:
                raw = path.read_bytes()  # read once: hashed and parsed from memory
            except OSError as err:
                failure = StoreCorruptError(f"store file {str(path)!r} cannot be read ({err}).")
            else:
                if hashlib.sha256(raw).hexdigest() == entry["sha256"]:
                    break
                failure = StoreCorruptError(
                    f"store file {str(path)!r} is damaged: its SHA-256 does not match the index.")
            # a writer may have moved or rewritten the file after this store read the index:
            # only a file that disagrees with the current index is damaged
            if attempt + 1 == _SNAPSHOT_TRIES or not self.refresh():
                raise failure
            if all(c["step"] != step for c in self._index["checkpoints"]):
                raise ValueError(
                    f"`checkpoint`: step {step} left the store at {str(self.folder)!r} while it was read (a writer "
                    f"moved it out with archive_after, into superseded/); stored steps are "
                    f"{[c['step'] for c in self._index['checkpoints']]}."
                )
        shape = (entry["n"], entry["k"])
        try:  # only what the bytes decode to can be damage; a device error stays a device error
            data = _read_payload(raw, shape)
        except _Mismatch as err:
            raise StoreCorruptError(f"store file {str(path)!r} is damaged: {err}.") from None
        except Exception as err:  # any parsing or unpickling failure means the file is not what was written
            raise StoreCorruptError(f"store file {str(path)!r} is damaged ({type(err).__name__}: {err}).") from None
        return ReducedBasis(
            basis=decode_basis(data, device),
            singular_values=data["singular_values"].to(device=device, dtype=torch.float32),
            n_neurons=int(data["n_neurons"]),
        )

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
        if self._lock is None:
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
        self._own_dir(self.folder / sub)
        files: Dict[str, Dict[str, Any]] = {}
        for name, value in activations.items():
            if not isinstance(name, str):
                raise ValueError(f"`activations` keys must be layer names (str), got {name!r}.")
            basis = self._reduce(name, value, settings)
            n = basis.n_datapoints
            if basis.k > n:
                raise ValueError(f"`activations[{name!r}]` is a basis of {basis.k} directions over {n} datapoints; an "
                                 "orthonormal basis has at most as many directions as datapoints.")
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
        without an index by a crash is removed when a writer next opens the store. Only the
        listed layer files move; anything else in a step folder stays where it is.

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
        base = self._own_dir(self.folder / "superseded") / (f"{stamp}-after-{step}" if step >= 0 else f"{stamp}-all")
        archive, n = base, 1
        while True:  # two archives within one second get distinct folders
            try:
                archive.mkdir(exist_ok=False)
                break
            except FileExistsError:
                n += 1
                archive = base.with_name(f"{base.name}-{n}")
        kept = [ck for ck in self._index["checkpoints"] if ck["step"] <= step]
        old = json.dumps(dict(self._index, checkpoints=later), indent=1).encode()
        rels = sorted(f["file"] for ck in later for f in ck["files"].values())
        for rel in rels:
            if (self.folder / rel).is_symlink():
                raise _not_own(self.folder, self.folder / rel, _link_target(self.folder / rel))
            (archive / rel).parent.mkdir(exist_ok=True)
            _link_or_copy(self.folder / rel, archive / rel)
        _atomic_write(archive / INDEX_NAME, lambda f: f.write(old))
        # the datapoint counts are those of the checkpoints kept: a new run (step=-1) with another probe size is
        # not held to the archived run's
        counts = {name: entry["n"] for ck in kept for name, entry in ck["files"].items()}
        layers = [name for name in self._index["layers"] if name in counts] if kept else []
        self._write_index(dict(self._index, checkpoints=kept, n_datapoints=counts, layers=layers))
        _remove_originals(self.folder, rels)
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
