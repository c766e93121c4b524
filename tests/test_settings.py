"""One settings object (issue 20): every setting declared, documented, defaulted and validated
once, shared by the tracker and the callback; nothing configured behind an object's back."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from svcca_torch.settings import CACHE_BYTES, DEFAULT_THRESHOLD, TrackerSettings
from svcca_torch.tracker import DynamicsTracker


def test_every_setting_is_documented_and_defaulted():
    fields = dataclasses.fields(TrackerSettings)
    assert len(fields) == len(TrackerSettings.names()) >= 25
    for f in fields:
        assert f.metadata["doc"].strip(), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    assert TrackerSettings().freeze_threshold == DEFAULT_THRESHOLD


def test_values_are_normalised_and_checked_in_one_place():
    s = TrackerSettings(freeze=True, frozen_cache=True, run_dir="r", grid_fractions=[0, 0.5, 1],
                        analysis_device="cpu")
    assert s.freeze == "adaptive" and s.cache_bytes == CACHE_BYTES and s.run_dir == Path("r")
    assert s.grid_fractions == (0.0, 0.5, 1.0) and s.analysis_device == torch.device("cpu")
    assert TrackerSettings(frozen_cache=False).cache_bytes is None
    for bad, match in [(dict(max_overhead=1.5), "`max_overhead` must be a number in"),
                       (dict(freeze="often"), "registered policy name"),
                       (dict(schedule_start=0.8, schedule_end=0.2), "`schedule_end`"),
                       (dict(final_heatmaps=1), "`final_heatmaps` must be an int >= 2"),
                       (dict(frozen_cache="yes"), "`frozen_cache` must be True"),
                       (dict(freeze_options=[1]), "`freeze_options` must be a mapping"),
                       (dict(grid=0), "`grid` must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            TrackerSettings(**bad)


def test_settings_are_immutable_and_replace_validates_again():
    s = TrackerSettings(max_overhead=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_overhead = 0.2  # type: ignore[misc]
    t = s.replace(total_steps=100)
    assert (s.total_steps, t.total_steps, t.max_overhead) == (None, 100, 0.1)
    assert t.replace() == t  # normalised values validate again unchanged
    with pytest.raises(ValueError, match="`total_steps`"):
        s.replace(total_steps=0)
    with pytest.raises(TypeError, match=r"unknown setting \['max_overheads'\]"):
        s.replace(max_overheads=0.1)


def test_the_tracker_takes_settings_or_keywords_and_reads_through():
    model, probe = nn.Linear(3, 2), torch.randn(8, 3)
    base = TrackerSettings(max_overhead=None, freeze_window=4)
    tracker = DynamicsTracker(model, probe, settings=base, run_dir="elsewhere")
    assert tracker.settings == base.replace(run_dir="elsewhere")
    assert tracker.max_overhead is None and tracker.freeze_window == 4 and tracker.run_dir == Path("elsewhere")
    with pytest.raises(TypeError, match="unknown setting"):
        DynamicsTracker(model, probe, freeze_windows=4)
    with pytest.raises(ValueError, match="`settings` must be a TrackerSettings"):
        DynamicsTracker(model, probe, settings={"freeze": True})


def test_writing_a_setting_after_construction_warns_once_with_the_new_spelling():
    tracker = DynamicsTracker(nn.Linear(3, 2), torch.randn(8, 3))
    with pytest.warns(FutureWarning, match=r"pass total_steps= to DynamicsTracker"):
        tracker.total_steps = 50
    assert tracker.settings.total_steps == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.total_steps = 60  # once per setting
    assert tracker.total_steps == 60
