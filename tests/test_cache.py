"""The frozen prefix's output kept per training input (svcca_torch.frozen_prefix's training cache, issue 10)."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import pytest
import torch
from torch import nn

from svcca_torch.frozen_prefix import FrozenPrefix, bits_hash
from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.models import ConvBNReLU, ConvNet
from svcca_torch.tracker import DynamicsTracker

from _modules import Skip, Twice

# every group settles at once: the signal freezes bottom-up, one window (epoch) after another
SIGNAL = dict(freeze="adaptive", freeze_threshold=1e-6, freeze_patience=2, max_overhead=None, frozen_cache=True,
              final_analysis=False)


def _batches(n_train: int = 640, batch: int = 64):
    train, _ = load_digits_dataset()
    x, y = train.tensors
    return x[:n_train], y[:n_train], probe_set(train, 300, seed=0)


def _fit(model: nn.Module, run_dir, epochs: int = 6, augment: Optional[Callable] = None, seed: int = 0,
         pass_epoch: bool = True, before: Optional[Callable] = None, **kwargs):
    """Epochs over the same 640 digits (reshuffled each epoch): the tracker, the losses of every
    step and the training cache's stats at the end (None without it). ``before(step, model)``
    runs before each step and may return a context for its forward."""
    x, y, probe = _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = DynamicsTracker(model, probe, run_dir=run_dir, freeze_window=5, **{**SIGNAL, **kwargs})
    tracker.start()
    g = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    step = 0
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = x[idx] if augment is None else augment(x[idx], g)
            model.train()
            opt.zero_grad()
            with (before and before(step, model)) or contextlib.nullcontext():
                loss = nn.functional.cross_entropy(model(xb), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            tracker.maybe_capture(step, epoch=epoch if pass_epoch else None)
    tracker.finish(step)
    return tracker, losses, tracker.frozen_prefix.stats().cache


@pytest.fixture
def counted(monkeypatch):
    """Training images each ConvBNReLU block really computes."""
    real = {"n": 0}
    forward = ConvBNReLU.forward

    def count(self, x):
        if self.training:  # training forwards only: the tracker's captures (eval mode) vary with its schedule
            real["n"] += x.shape[0]
        return forward(self, x)

    monkeypatch.setattr(ConvBNReLU, "forward", count)
    return real


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(width=8, depth=6, hidden=32)


# adaptive: freezes at window ends; schedule: in mid-epoch (older kept levels serve while the newest fills)
POLICIES = {"adaptive": {}, "schedule": dict(freeze="schedule", total_steps=60, schedule_start=0.15,
                                             schedule_end=0.5)}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_cached_training_matches_training_without_the_cache(tmp_path, counted, policy):
    """Same freezes, same losses (float32: the kept rows were computed in other batches) and
    same weights, with the frozen blocks computing far fewer images."""
    cached, losses, cache = _fit(_model(), tmp_path / "cached", **POLICIES[policy])
    served_images = counted["n"]
    counted["n"] = 0
    plain, plain_losses, _ = _fit(_model(), tmp_path / "plain", frozen_cache=False, **POLICIES[policy])
    assert len(plain.freeze_log) >= 3, "the run should freeze groups one epoch after another"
    assert [e["groups"] for e in cached.freeze_log] == [e["groups"] for e in plain.freeze_log]
    assert cache is not None and cache.off is None and cache.served > 0
    assert cached.frozen_cache_stats["served"] == cache.served and plain.frozen_cache_stats is None
    assert served_images < 0.8 * counted["n"]
    # a float32 step is exact to ~1e-6 relative; 60 SGD steps amplify that a little
    assert torch.allclose(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    for p, q in zip(cached.model.parameters(), plain.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
    # training is over: the frozen modules' own forwards are back
    assert not any("forward" in m.__dict__ for m in cached.model.modules())


def test_random_augmentation_turns_the_cache_off_and_changes_nothing(tmp_path):
    noise = lambda xb, g: xb + 0.01 * torch.randn(xb.shape, generator=g)  # noqa: E731
    cached, losses, cache = _fit(_model(), tmp_path / "cached", augment=noise)
    plain, plain_losses, _ = _fit(_model(), tmp_path / "plain", augment=noise, frozen_cache=False)
    stats = cached.frozen_cache_stats
    assert stats["served"] == 0 and "random augmentation" in stats["off"]
    assert losses == plain_losses  # nothing was served: bit-identical training


def test_a_skip_past_the_prefix_turns_the_cache_off(tmp_path):
    torch.manual_seed(0)
    tracker, _, _ = _fit(Skip(), tmp_path / "skip", epochs=4)
    assert tracker.freeze_log, "the run should freeze block1"
    stats = tracker.frozen_cache_stats
    assert stats["served"] == 0 and "skip connection" in stats["off"]


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(ConvBNReLU(1, 8), nn.Dropout(0.2))
        self.block2 = ConvBNReLU(8, 8)
        self.block3 = ConvBNReLU(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.block1(x))).mean((2, 3)))


def test_randomness_in_the_prefix_turns_the_cache_off_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    cached, losses, _ = _fit(_Dropout(), tmp_path / "cached", freeze_groups=[["block1"], ["block2"], ["block3"],
                                                                               ["fc"]])
    torch.manual_seed(0)
    plain, plain_losses, _ = _fit(_Dropout(), tmp_path / "plain", frozen_cache=False,
                                  freeze_groups=[["block1"], ["block2"], ["block3"], ["fc"]])
    assert cached.freeze_log
    stats = cached.frozen_cache_stats
    assert stats["served"] == 0 and "random numbers" in stats["off"]
    assert losses == plain_losses  # nothing was served: bit-identical training, dropout included


def test_memory_cap_suspends_the_cache(tmp_path):
    tracker, _, cache = _fit(_model(), tmp_path / "small", epochs=4, frozen_cache=1000)
    assert cache is not None and cache.served == 0 and "more than 1000 bytes" in cache.suspended


def _hash(x: torch.Tensor):
    return bits_hash(x.reshape(x.shape[0], -1))


def test_keys_follow_the_bits_of_each_sample():
    x = torch.randn(5, 1, 8, 8)
    keys = _hash(x)
    assert len(set(keys)) == 5
    assert _hash(x[[3, 1]]) == [keys[3], keys[1]]  # per sample, whatever the batch
    y = x.clone()
    y[2, 0, 4, 4] = torch.nextafter(y[2, 0, 4, 4], torch.tensor(10.0))  # one ulp
    assert _hash(y) == keys[:2] + [_hash(y)[2]] + keys[3:] and _hash(y)[2] != keys[2]


def test_keys_of_float64_and_int64_inputs_use_32_bit_words():
    """A sign flip changes a float64 word by 2^63: hashed as one 64-bit word, half of the
    random weights would map it to 0 (a pair of lanes colliding for 1 in 4 such pairs)."""
    x = torch.randn(256, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys, flipped = _hash(x), _hash(-x)
    assert len(set(keys) | set(flipped)) == 512
    ids = torch.randint(0, 1000, (256, 16), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[:, 0] ^= 1 << 62  # a difference in the upper word only
    assert not set(_hash(ids)) & set(_hash(other))


def _frozen_after_two_steps(tmp_path):
    """(model, training inputs, tracker) with the lowest groups frozen and the cache on."""
    model = _model()
    x, _, probe = _batches()
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, freeze_window=1, **SIGNAL)
    tracker.start()
    tracker.maybe_capture(1)
    tracker.maybe_capture(2)
    assert tracker.policy.frozen and tracker.frozen_prefix.stats().cache.boundary is not None
    model.train()
    return model, x, tracker


def test_a_changed_frozen_weight_turns_the_cache_off(tmp_path):
    model, x, tracker = _frozen_after_two_steps(tmp_path)
    for _ in range(3):  # kept, checked against a real forward, served
        model(x[:64])
    assert tracker.frozen_prefix.stats().cache.served == 64
    with torch.no_grad():
        next(p for p in model.parameters() if not p.requires_grad).add_(1.0)
    model(x[:64])
    cache = tracker.frozen_prefix.stats().cache
    assert cache.served == 64 and "changed" in cache.off
    tracker.finish(2)


def test_a_frozen_weight_changed_before_the_next_freeze_turns_the_cache_off(tmp_path):
    """Kept outputs of an older boundary would be served after the next freeze: a change made
    between the last forward and that freeze must be seen too."""
    model, x, tracker = _frozen_after_two_steps(tmp_path)
    model(x[:64])  # kept
    with torch.no_grad():
        next(p for p in model.parameters() if not p.requires_grad).mul_(2.0)
    first = tracker.groups[len(tracker.policy.frozen)]
    tracker.policy.frozen.append(first.name)  # the next freeze, as the policy would decide it
    with tracker.accounted():  # as maybe_capture runs it: the cache is paused
        tracker.freezer.apply(3)
    cache = tracker.frozen_prefix.stats().cache
    assert "changed" in cache.off and cache.bytes == 0 and cache.boundary is None
    tracker.finish(3)


def test_the_cache_is_opt_in():
    """Exactness needs a forward that depends on its input and its modules' state alone, which
    the checks test but cannot prove for any model: off unless asked for."""
    assert DynamicsTracker(nn.Linear(2, 2), torch.randn(4, 2)).frozen_cache is None
    assert DynamicsTracker(nn.Linear(2, 2), torch.randn(4, 2), frozen_cache=True).frozen_cache == 1 << 30


def test_frozen_cache_argument_is_checked():
    with pytest.raises(ValueError, match="`frozen_cache` must be True"):
        DynamicsTracker(nn.Linear(2, 2), torch.randn(4, 2), frozen_cache="yes")


def test_lightning_with_validation_under_inference_mode(tmp_path):
    """Validation forwards between epochs (eval mode, ``torch.inference_mode``, keyed apart from
    training ones) leave training under the cache with the weights of training without it."""
    import pytorch_lightning as pl

    from svcca_torch.callbacks import SVCCACallback

    from _lightning_helpers import DigitsModule, digits_loaders, trainer

    class WithValidation(DigitsModule):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    weights = []
    for cache in (True, False):
        loader, probe = digits_loaders()  # a new loader: the same shuffling in both runs
        val = torch.utils.data.DataLoader(loader.dataset, batch_size=128)
        pl.seed_everything(0)
        model = WithValidation()
        cb = SVCCACallback(probe, freeze_training=True, freeze_threshold=1e-6, freeze_patience=1,
                           frozen_cache=cache, final_analysis=False, progress=False, run_dir=tmp_path / str(cache))
        trainer(tmp_path, max_epochs=5, callbacks=[cb]).fit(model, loader, val)
        weights.append([p.detach().clone() for p in model.parameters()])
        if cache:
            stats = cb.tracker.frozen_cache_stats
            assert stats["served"] > 0 and stats["off"] is None
    for p, q in zip(*weights):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)  # float32 steps, as the test above


class _TrainableInside(nn.Module):
    """``mid`` is in no freeze group: it keeps training between the frozen block1 and block2."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = ConvBNReLU(1, 8)
        self.mid = nn.Conv2d(8, 8, 1)
        self.block2 = ConvBNReLU(8, 8)
        self.block3 = ConvBNReLU(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.mid(self.block1(x)))).mean((2, 3)))


def test_a_trainable_module_inside_the_prefix_turns_the_cache_off(tmp_path):
    groups = [["block1"], ["block2"], ["block3"], ["fc"]]
    torch.manual_seed(0)
    cached, losses, _ = _fit(_TrainableInside(), tmp_path / "cached", freeze_groups=groups)
    torch.manual_seed(0)
    plain, plain_losses, _ = _fit(_TrainableInside(), tmp_path / "plain", freeze_groups=groups, frozen_cache=False)
    assert [g for e in cached.freeze_log for g in e["groups"]][:2] == ["block1", "block2"]
    stats = cached.frozen_cache_stats
    assert "'mid' runs inside or around the frozen prefix" in stats["off"]
    assert losses == plain_losses


def test_a_frozen_module_called_twice_turns_the_cache_off():
    model = Twice()
    model.lin.requires_grad_(False)
    prefix = FrozenPrefix(model, cache_bytes=1 << 20)
    prefix.update({"lin": model.lin}, torch.randn(8, 3))
    stats = prefix.stats()
    assert stats.cache.off == stats.probe.off == "a frozen module is not called exactly once per forward"
    assert stats.checks_failed == 1
    assert "forward" not in model.lin.__dict__ and model.training  # nothing left installed, modes restored


# ---------------------------------------------------------------- the contract (issue 19)
GROUPS = [["block1"], ["block2"], ["block3"], ["fc"]]


class _Chain(nn.Module):
    """Three blocks and a head; ``block1`` may be replaced to put something in the prefix."""

    def __init__(self, block1: Optional[nn.Module] = None, head_dropout: float = 0.0, norm: bool = True) -> None:
        super().__init__()
        block = ConvBNReLU if norm else (lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU()))
        self.block1 = block1 or block(1, 8)
        self.block2 = block(8, 8)
        self.block3 = block(8, 8)
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.block3(self.block2(self.block1(x))).mean((2, 3))))


class _StochasticDepth(nn.Module):
    """A residual block whose branch is dropped for the whole batch (torchvision's "batch" mode)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth
        self.stem = ConvBNReLU(1, 8)
        self.branch = ConvBNReLU(8, 8)
        self.sd = StochasticDepth(0.1, "batch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.sd(self.branch(x))


class _DrawsUnused(ConvBNReLU):
    """Draws a random number it does not use: its output does not depend on it, the stream does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.rand(1)
        return super().forward(x)


def _both(tmp_path, make: Callable[[], nn.Module], **kwargs):
    """The same seeded run with the cache and without: (cached tracker, losses, plain losses, cache)."""
    runs = []
    for cache in (True, False):
        torch.manual_seed(0)
        runs.append(_fit(make(), tmp_path / str(cache), freeze_groups=GROUPS, frozen_cache=cache, **kwargs))
    (cached, losses, cache), (plain, plain_losses, _) = runs
    assert [e["groups"] for e in cached.freeze_log] == [e["groups"] for e in plain.freeze_log]
    assert cached.freeze_log, "the run should freeze block1"
    return cached, losses, plain_losses, cache


@pytest.mark.parametrize("make", [lambda: _Chain(_StochasticDepth()), lambda: _Chain(_DrawsUnused(1, 8), 0.5)],
                         ids=["batch-stochastic-depth", "draws-unused-random-numbers"])
def test_a_prefix_that_draws_random_numbers_turns_the_cache_off_and_changes_nothing(tmp_path, make):
    """Batch-level stochastic depth can pass a one-batch comparison by chance; a module that
    draws numbers it does not use would, skipped, shift the dropout masks above it."""
    cached, losses, plain_losses, _ = _both(tmp_path, make)
    stats = cached.frozen_cache_stats
    assert stats["served"] == 0 and "draws random numbers" in stats["off"]
    assert losses == plain_losses


def _reassign_buffer(model: nn.Module) -> None:
    bn = model.block1.bn
    bn.running_var = bn.running_var * 4  # a new tensor: its version counter starts afresh


def _set_attribute(model: nn.Module) -> None:
    model.block1.bn.eps = 0.5  # a plain attribute the forward reads


def _rebind_data(model: nn.Module) -> None:
    w = model.block1.conv.weight
    w.data = w.data * 2  # no version counter counts this


@pytest.mark.parametrize("change", [_reassign_buffer, _set_attribute, _rebind_data],
                         ids=["reassigned-buffer", "attribute", "rebound-data"])
def test_state_changed_after_the_check_turns_the_cache_off_before_it_serves(tmp_path, change):
    """The same change at the same step in both runs (after serving began): same losses."""
    def before(step: int, model: nn.Module):
        if step == 25:
            change(model)

    cached, losses, plain_losses, _ = _both(tmp_path, _Chain, before=before)
    assert torch.allclose(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    stats = cached.frozen_cache_stats
    assert stats["served"] > 0 and "changed after the frozen prefix was checked" in stats["off"]


def test_a_weight_changed_in_place_through_data_is_seen_at_the_windows_end(tmp_path):
    def before(step: int, model: nn.Module):
        if step == 25:
            model.block1.conv.weight.data.mul_(2)  # in place, not counted: the contract's one late case

    cached, _, _, _ = _both(tmp_path, _Chain, before=before)
    off = cached.frozen_cache_stats["off"]  # by the window's bit comparison, or a new level's check before it
    assert "values changed" in off or "differs between two forwards" in off


def test_autocast_is_part_of_the_key(tmp_path):
    """Rows kept under bfloat16 autocast are never served to a float32 forward, nor back."""
    def before(step: int, model: nn.Module):
        on = step < 35  # kept, checked and served under autocast, then float32 forwards of the same inputs
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)

    # blocks without normalisation: their outputs are bfloat16 under autocast
    cached, losses, plain_losses, cache = _both(tmp_path, lambda: _Chain(norm=False), before=before)
    assert cache.served > 0
    # bfloat16 convolutions of other batches: ~1e-3 relative per step, amplified a little by training
    assert torch.allclose(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-2, atol=1e-3)


def test_a_cache_that_serves_nothing_frees_its_memory_without_epochs(tmp_path):
    """Random augmentation in a loop that does not pass ``epoch=``: off, memory freed, at the
    end of the first window after the one in which it began keeping."""
    noise = lambda xb, g: xb + 0.01 * torch.randn(xb.shape, generator=g)  # noqa: E731
    tracker, losses, cache = _fit(_model(), tmp_path / "cached", augment=noise, pass_epoch=False)
    stats = tracker.frozen_cache_stats
    assert stats["served"] == 0 and "served 0 of the 320 training samples" in stats["off"]
    assert stats["bytes"] == 0 and cache.lookups < 1000  # freed early: 60 steps x 64 = 3840 lookups otherwise


class _Masked(nn.Module):
    """Frozen blocks that also take a mask from outside the prefix (as encoder layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Linear(8, 8)
        self.block2 = _MaskedLinear()
        self.block3 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = torch.ones_like(x) if mask is None else mask
        return self.fc(torch.relu(self.block3(self.block2(self.block1(x), mask))))


class _MaskedLinear(nn.Linear):
    def __init__(self) -> None:
        super().__init__(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * mask)


def test_a_frozen_module_that_takes_another_input_turns_the_cache_off():
    """The key covers the first frozen module's input only: a mask handed to a later frozen
    module could change its output for the same key, so the cache must not serve."""
    torch.manual_seed(0)
    model = _Masked().eval()
    for m in (model.block1, model.block2):
        m.requires_grad_(False)
    prefix = FrozenPrefix(model, cache_bytes=1 << 20)
    prefix.update({"block1": model.block1, "block2": model.block2}, torch.randn(8, 8))
    stats = prefix.stats()
    assert "attention mask" in stats.cache.off  # seen by the check's forwards, before anything is kept
    assert stats.probe.off is None  # a probe input's index stands for its mask: the probe's rows may serve
    prefix.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
