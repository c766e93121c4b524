"""Chance levels: what the freeze signal reads when nothing learnt is shared.

A layer's chance level is its signal similarity against the same layer of an independently
initialised copy of the model, on the same probe inputs and grid. A conv layer over image
patches reads ~1 whatever its weights (it spans nearly the same subspace of its input), so a
raw signal near 1 says nothing about it having settled; judged on ``(s - chance) / (1 -
chance)`` (:func:`calibrated_similarity`) it settles when it moved less in one window than
``1 - freeze_threshold`` of the way from an unrelated network.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ..dynamics import paired_similarity
from ..functional.svcca import ReducedBasis, svd_reduce
from ..utils.validation import NonFiniteError, ZeroVarianceError

if TYPE_CHECKING:  # pragma: no cover
    from .signal import FreezeSignal

__all__ = ["CHANCE_LIMIT", "CHANCE_SEED", "calibrated_similarity", "calibrate", "reinitialise"]

#: Seed of the independently initialised copy the chance levels are measured against.
CHANCE_SEED = 20170601

#: A layer whose chance level (its signal against an independently initialised copy of the
#: model) is above this is not judged on its own signal: the part of the similarity scale its
#: learning can move, ``1 - chance``, is under 1%, so its signal reads ~1 whatever it learns (a
#: first conv layer over image patches: 0.991 on digits, 0.9998 on resnet18; a linear map of a
#: low-dimensional input spans that input's space whatever its weights: exactly 1). Its group
#: goes with the next judged group above it.
CHANCE_LIMIT = 0.99



def calibrated_similarity(similarity: float, chance: Optional[float]) -> float:
    """A layer's signal judged on the part that can change: ``(s - chance) / (1 - chance)``,
    clipped to ``[0, 1]``.

    ``s`` is the layer's SVCCA similarity to itself one window earlier and ``chance`` the
    same measure against an independently initialised copy of the model (what ``s`` reads
    when the two share nothing learnt). The result is 1 for an unchanged layer and 0 for one
    no closer to its earlier self than an unrelated network is, so ``>= threshold`` means
    "moved less than ``1 - threshold`` of the way from an unrelated network in one window",
    whatever the layer's chance level. ``chance=None`` (not measured): ``s`` itself.
    """
    s = float(similarity)
    if chance is None:
        return s
    c = float(chance)
    if not c < 1.0:
        raise ValueError(f"`chance` must be < 1 to calibrate against (got {chance!r}); such a layer is not judged.")
    return min(1.0, max(0.0, (s - c) / (1.0 - c)))


def calibrate(signal: "FreezeSignal", step: int) -> None:
    """Measure each judgeable layer's chance level, once (at the start, on the writer).

    A layer's chance level is its signal similarity against the same layer of an
    independently initialised copy of the model, on the same probe images and grid: what
    the signal reads when nothing of the layer's learning is shared. A conv layer over
    image patches reads ~1 whatever its weights (it spans nearly the same subspace of
    its input), so a raw signal near 1 says nothing about it having settled; judged on
    ``(s - chance) / (1 - chance)`` (:func:`svcca_torch.freeze.calibrated_similarity`) it
    settles when it moved less in one window than ``1 - freeze_threshold`` of the way
    from an unrelated network. The copy is the model itself, re-initialised in place for
    one recording and restored bit for bit: ``reset_parameters()`` (or
    ``_reset_parameters()``) of every module that has it, under a fixed seed and a forked
    RNG (the caller's random streams are untouched); parameters no such method covers
    are redrawn by a random permutation of their own entries (the same values, so the
    same distribution for an i.i.d. initialisation). The model's recording here is also
    the signal's first recording. Not measured (every layer judged on its raw signal,
    the reason in :attr:`chance_info`) when it does not fit the signal's budget or the
    run resumed with frozen groups from a state without chance levels."""
    policy = signal.policy
    signal.chance = {}
    info: Dict[str, Any] = {"step": int(step), "seconds": 0.0, "error": None, "limit": CHANCE_LIMIT, "layers": {}}
    signal.chance_info = info
    groups = [g for g in policy.groups[:policy.max_frozen] if g not in policy.frozen]
    if not groups:
        return
    if policy.frozen:
        info["error"] = ("not measured: the run resumed with frozen groups from a state without chance levels; "
                         "every layer is judged on its raw signal")
        return
    t0 = time.perf_counter()
    try:
        layers, images, n_images = signal.plan(groups)

        def over(est: float) -> bool:
            spent = signal.stats["seconds"] + time.perf_counter() - t0
            if signal.settings.max_overhead is None or spent + est <= signal.allowance(signal.run.clock.split()[1]):
                return False
            info["error"] = (f"not measured: a recording of every judgeable layer (~{est:.2g} s) did not fit in "
                             "the signal's share of the budget; every layer is judged on its raw signal")
            return True

        if over(signal.estimate(layers)):
            return
        t1 = time.perf_counter()
        acts = signal.run.capture.record(layers, n_images)
        assert acts is not None and signal.run.capture.recorder is not None
        mine = signal._bases(acts, dict(signal.run.capture.recorder.layer_datapoint_index), layers, images, step)
        signal._costs[tuple(layers)] = time.perf_counter() - t1
        signal.ref = {"step": int(step), "bases": mine}  # the signal's recording at this step
        if over(signal._costs[tuple(layers)]):  # the copy's recording costs about the same
            return
        try:
            theirs = _record_independent(signal, layers, images, n_images)
        except Exception as err:  # anything about re-initialising a model we do not know: raw signals
            info["error"] = (f"not measured: the independently initialised copy failed ({type(err).__name__}: "
                             f"{err}); every layer is judged on its raw signal")
            theirs = None
        if theirs is None:
            return
        for n in layers:
            c: Optional[float] = None
            reason = None
            if n not in mine:
                reason = "not measured: constant over the probe at the start (judged on its raw signal)"
            elif n not in theirs:
                reason = "not measured: constant or not finite in the independent copy (judged on its raw signal)"
            else:
                c = paired_similarity({n: mine[n]}, {n: theirs[n]})[n]
            judged = c is None or c <= CHANCE_LIMIT
            if not judged:
                reason = (f"chance level {c:.5f} > {CHANCE_LIMIT:g}: its signal cannot tell learning from no "
                          "learning, so it is not judged on it; its group goes with the next judged group above")
            signal.chance[n] = c
            info["layers"][n] = {"chance": c, "judged": judged, "reason": reason}
    finally:
        dt = time.perf_counter() - t0
        info["seconds"] = round(dt, 6)
        signal.stats["seconds"] += dt
        signal.stats["calibration_seconds"] += dt


def _record_independent(signal: "FreezeSignal", layers: Sequence[str], images: Mapping[str, int], n_images: int
                        ) -> Dict[str, ReducedBasis]:
    """The signal's bases of ``layers`` on an independently initialised copy of the model
    (see :func:`calibrate`); layers constant or not finite there are left out."""
    assert signal.run.capture.recorder is not None
    restore = reinitialise(signal.run.model)
    try:
        acts = signal.run.capture.record(layers, n_images)
        index = dict(signal.run.capture.recorder.layer_datapoint_index)
    finally:
        restore()
    assert acts is not None
    out: Dict[str, ReducedBasis] = {}
    for n in layers:
        t = acts.pop(n)
        try:
            out[n] = svd_reduce(t[(index[n] < images[n]).to(t.device)], signal.KEEP, keep_rule="variance", name=n)
        except (ZeroVarianceError, NonFiniteError):
            pass
    return out


def reinitialise(model: nn.Module) -> Callable[[], None]:
    """Re-initialise ``model`` in place as an independently initialised copy of itself and
    return the function that restores it bit for bit (each parameter and buffer object put
    back, should a ``reset_parameters`` have replaced it, and its values copied back).

    Every module's ``reset_parameters()`` (``_reset_parameters()`` for
    ``nn.MultiheadAttention``) runs under :data:`CHANCE_SEED` with the RNG forked (the
    caller's random streams are untouched); a parameter no such method covers (an
    ``nn.Parameter`` set directly on a custom module: ViT's class token and position
    embedding) gets a random permutation of its own entries."""
    entries = []
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    entries.append((table, name, t, t.detach().clone()))

    def restore() -> None:
        with torch.no_grad():
            for table, name, t, saved in entries:
                table[name] = t
                t.copy_(saved)

    cuda = sorted({t.device.index or 0 for _, _, t, _ in entries if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(CHANCE_SEED)
            covered = set()
            for mod in model.modules():
                reset = getattr(mod, "reset_parameters", None)
                if not callable(reset):
                    reset = getattr(mod, "_reset_parameters", None)
                if callable(reset):
                    reset()
                    covered.update(id(p) for p in mod._parameters.values() if p is not None)
            for table, name, t, _ in entries:
                if isinstance(t, nn.Parameter) and id(t) not in covered and t.numel() > 1:
                    flat = t.detach().reshape(-1)
                    t.copy_(flat[torch.randperm(flat.numel(), device=t.device)].view_as(t))
    except BaseException:
        restore()
        raise
    return restore
