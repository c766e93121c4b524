"""One keyed source of kept boundary outputs (the probe's, or the training inputs'): its
levels, byte cap, counters and off/suspended state. :class:`~.core.FrozenPrefix` holds one per
source and decides, per forward, which one it asks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

Key = Tuple[Any, ...]  # (the forward's context with the train flags up to the boundary, the sample's id)


@dataclass
class Level:
    """The rows kept at one boundary (the last frozen module to run of a frozen prefix)."""

    boundary: str
    position: int  # its place in the call order of the frozen modules
    rows: Dict[Key, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    verified: bool = False  # its first serve was compared with a real forward
    modules: List[nn.Module] = field(default_factory=list)  # what runs up to the boundary (train flags: key)

    def keys(self, context: Tuple[Any, ...], ids: List[Tuple[Any, ...]]) -> List[Key]:
        """Its keys of samples with these ids (hashes of their bits, and the probe's index), under this context."""
        context = (*context, tuple(m.training for m in self.modules))
        return [(context, *i) for i in ids]


@dataclass(frozen=True)
class SourceStats:
    """What one source of keyed inputs did (samples counted per forward of the first frozen module).

    Attributes:
        lookups: samples looked up (forwards it could have served).
        served: samples whose prefix forward was skipped (wholly or up to an older boundary).
        forwards_served: forwards (batches) in which it served.
        bytes: bytes kept now (host memory), all levels.
        boundary: the newest level's boundary module, or None.
        off: why it is off for the rest of the run (None while it may serve).
        suspended: why it is off until the next freeze (its byte cap), or None.
    """

    lookups: int
    served: int
    forwards_served: int
    bytes: int
    boundary: Optional[str]
    off: Optional[str]
    suspended: Optional[str]

    def summary(self) -> Dict[str, Any]:
        """The plain-data summary of 0.2 (``tracker.frozen_cache_stats``, ``svcca_summary.json``'s
        ``"frozen_cache"``)."""
        return {"lookups": self.lookups, "served": self.served, "bytes": self.bytes, "boundary": self.boundary,
                "off": self.off, "suspended": self.suspended}


class KeptRows:
    """Kept boundary outputs of one source, per sample key, at each boundary of the frozen
    prefix (oldest first), at most ``max_bytes`` in all."""

    def __init__(self, source: str, max_bytes: int) -> None:
        self.source = source
        self.max_bytes = int(max_bytes)
        self.levels: List[Level] = []
        self.lookups = self.served = self.forwards_served = 0
        self.off: Optional[str] = None
        self.suspended: Optional[str] = None
        # the rule for a training cache that serves nothing: training samples looked up and
        # served this window, and how many rows the newest level kept before the window began
        self.window = [0, 0]
        self.kept_train = 0
        self.kept_at_window_start = 0

    @property
    def nbytes(self) -> int:
        return sum(lv.nbytes for lv in self.levels)

    def stats(self) -> SourceStats:
        return SourceStats(self.lookups, self.served, self.forwards_served, self.nbytes,
                           self.levels[-1].boundary if self.levels else None, self.off, self.suspended)

    def turn_off(self, why: str) -> None:
        """Off for the rest of the run, rows freed (the first reason is kept)."""
        if self.off is None:
            self.off = why
        self.levels = []

    def drop_rows(self) -> None:
        """Forget every kept row (the prefix's state changed): kept again, verified again."""
        for lv in self.levels:
            lv.rows, lv.nbytes, lv.verified = {}, 0, False
        self.kept_train = self.kept_at_window_start = 0

    def follow(self, order: List[str]) -> None:
        """A new frozen prefix (call order ``order``): levels whose boundary still runs stay
        valid (frozen modules never change), a new level at its last module; unsuspended."""
        self.suspended = None
        self.levels = [lv for lv in self.levels if lv.boundary in order]
        for lv in self.levels:
            lv.position = order.index(lv.boundary)
        if not self.levels or self.levels[-1].boundary != order[-1]:
            self.levels.append(Level(order[-1], len(order) - 1))
            self.kept_train = self.kept_at_window_start = 0  # a new level is judged from its second window

    def count(self, n: int, served: bool, training: bool) -> None:
        self.lookups += n
        if training:
            self.window[0] += n
        if served:
            self.served += n
            self.forwards_served += 1
            if training:
                self.window[1] += n

    def find(self, keys: Dict[int, List[Key]]) -> Optional[Tuple[Level, torch.Tensor]]:
        """The newest level that keeps every sample, with their rows stacked; None when none does."""
        for lv in reversed(self.levels):
            if all(k in lv.rows for k in keys[lv.position]):
                return lv, torch.stack([lv.rows[k] for k in keys[lv.position]])
        return None

    def keep(self, level: Level, keys: List[Key], out: Any, training: bool) -> Optional[str]:
        """Keep ``out`` (``level``'s boundary output) for the samples it lacks; why it cannot
        (then the source turns off), else None. Every level that runs gets them, not only the
        newest: after a freeze in mid-epoch the older levels complete within the epoch and serve
        the next, while the newest fills."""
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.is_nested or out.shape[0] != len(keys):
            return f"{level.boundary!r} does not return one tensor with a row per input"
        new = [i for i, k in enumerate(keys) if k not in level.rows]
        if not new or self.suspended is not None:
            return None
        size = out[0].numel() * out.element_size() * len(new)
        if level is not self.levels[-1] and self.nbytes + size > self.max_bytes:
            return None  # an older level is a convenience: never at the newest's expense
        while self.nbytes + size > self.max_bytes and len(self.levels) > 1:
            self.levels.pop(0)  # the oldest level first
        if self.nbytes + size > self.max_bytes:
            self.levels = [Level(level.boundary, level.position, modules=level.modules)]
            self.kept_train = self.kept_at_window_start = 0
            self.suspended = (f"the kept outputs of {level.boundary!r} need more than {self.max_bytes} bytes "
                              "(raise the cache's size)")
            return None
        rows = out.detach()[new].to("cpu", copy=True)  # host memory: a GPU's is not held
        for i, row in zip(new, rows):
            level.rows[keys[i]] = row
        level.nbytes += size
        if training and level is self.levels[-1]:
            self.kept_train += len(new)
        # an older level all of whose inputs the newest keeps can never serve again
        newest = self.levels[-1]
        self.levels = [lv for lv in self.levels[:-1]
                       if len(lv.rows) > len(newest.rows) or not all(k in newest.rows for k in lv.rows)] + [newest]
        return None

    #: a window after the newest level began keeping that serves less than this share of its
    #: training lookups turns the source off (random augmentation: nothing repeats)
    MIN_SERVED = 0.25

    def end_window(self, name: str) -> Optional[str]:
        """Why a window that began with training rows kept at the newest level and served less
        than ``MIN_SERVED`` of its training lookups shows that nothing repeats, else None (and
        the next window begins)."""
        looked, served = self.window
        if self.kept_at_window_start and looked and served < self.MIN_SERVED * looked:
            return (f"it served {served} of the {looked} training samples of a whole {name} "
                    "(random augmentation? the cache serves inputs that repeat exactly)")
        self.window = [0, 0]
        self.kept_at_window_start = self.kept_train
        return None
