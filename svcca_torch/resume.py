"""What a tracked run saves (:meth:`DynamicsTracker.state_dict`, JSON) and how it resumes.

The state holds the capture history, the probe's digests, the freeze policy with its
signal, the freeze log and the capture schedule's log. On resume at ``step``
(:meth:`DynamicsTracker.start`), captures made after ``step`` by a run that was not kept are
archived (``superseded/``, never deleted), the policy's frozen groups are frozen again and the
last kept capture becomes the one the next is compared with. States saved by 0.2 (the signal's
records at the top level) load as they are.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping

from .capture import model_device

if TYPE_CHECKING:  # pragma: no cover
    from .tracker import DynamicsTracker

__all__ = ["state_of", "normalise", "apply_history", "resume_at"]


def state_of(tracker: "DynamicsTracker") -> Dict[str, Any]:
    """``tracker``'s JSON-serialisable state."""
    return {
        "captured_steps": list(tracker.captured_steps),
        "to_previous": [dict(e) for e in tracker.to_previous],
        "probe_checksum": tracker.probe_checksum,
        "probe_digests": list(tracker.probe_batches.digests),
        "run_dir": str(tracker.settings.run_dir),
        "policy": None if tracker.policy is None else tracker.policy.state_dict(),
        "freeze_window": tracker.settings.freeze_window,
        "freeze_log": [dict(e) for e in tracker.freeze_log],
        "baseline_backward_flops": tracker.baseline_backward_flops,
        "schedule": tracker.schedule.state_dict(),
        "constant_layers": {k: dict(v) for k, v in tracker.constant_layers.items()},
    }


def normalise(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A saved state in this version's shape (0.2 kept the adaptive signal's records at the
    top level; they now belong to the policy)."""
    out = dict(state)
    policy = out.get("policy")
    if policy is not None and policy.get("kind") == "adaptive" and "signal" not in policy:
        out["policy"] = {**policy, "signal": {
            "log": out.get("signal_log", []), "raw": out.get("signal_raw", []), "stats": out.get("signal_stats", {}),
            "chance": out.get("chance"), "chance_info": out.get("chance_info")}}
    return out


def apply_history(tracker: "DynamicsTracker", state: Mapping[str, Any]) -> None:
    """Give the tracker's parts (set up) the saved history: captures, constant layers, freeze log."""
    capturer = tracker.capturer
    assert capturer is not None
    capturer.captured_steps = list(state.get("captured_steps", []))
    capturer.to_previous = [dict(e) for e in state.get("to_previous", [])]
    capturer.constant.layers = {k: dict(v) for k, v in state.get("constant_layers", {}).items()}
    if tracker.freezer is not None:
        tracker.freezer.load_state_dict({k: state[k] for k in ("freeze_log", "baseline_backward_flops") if k in state})


def resume_at(tracker: "DynamicsTracker", state: Mapping[str, Any], step: int) -> None:
    """Resume ``tracker`` (set up, its store open) from ``state`` at ``step``."""
    capturer = tracker.capturer
    assert capturer is not None
    # captures after the checkpoint's step belong to a run that was not kept
    capturer.keep_until(step)
    if tracker.freezer is not None:
        tracker.freezer.keep_until(step)
    tracker.schedule.keep_until(step)
    if state.get("policy") is not None:
        if tracker.policy is None or tracker.freezer is None:
            raise ValueError(
                f"the saved state holds a {state['policy']['kind']!r} freeze-training state but this "
                f"{type(tracker).__name__} has freeze_training=False; resume with the same settings.")
        tracker.policy.load_state_dict(state["policy"])
        tracker.policy.keep_until(step)
        tracker.freezer.apply(step, silent=True)
    store = tracker.store
    if store is not None and len(store):
        tracker.archived = store.archive_after(step)
        done = [c for c in store.checkpoints if c.step <= step]
        if done:
            capturer.last = store.load_checkpoint(done[-1], device=model_device(tracker.model))
