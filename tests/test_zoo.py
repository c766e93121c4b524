"""The zoo sweep (issue 21): DynamicsTracker and SVCCACallback at their defaults (plus
``freeze="adaptive"``) over a compact zoo of models nobody here wrote, on tiny inputs, a few
SGD steps each: torchvision classifiers (ResNet-18, MobileNetV3, GoogLeNet with its aux heads,
a ViT), an ``nn.TransformerEncoder`` text classifier, an LSTM one and a model whose forward
takes two inputs ``(ids, mask)``, under both Lightning packages. Each run must end, store every
default layer, write its summary, freeze a prefix of the forward order (if anything) and leave
the frozen weights bit for bit as they were when they froze. Probes of several inputs (a
tuple, a dict, a DataLoader of either) go through every path that runs the model: hashing,
the traced forwards, FLOPs, the signal's partial recordings, the frozen-prefix reuse, the
frozen-output cache and the DDP shards."""
from __future__ import annotations

import copy
import json
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.recorder import ActivationRecorder, Inputs
from svcca_torch.store import RepresentationStore
from svcca_torch.tracker import DynamicsTracker, probe_size

tv = pytest.importorskip("torchvision.models")

N_PROBE, BATCH, STEPS, WINDOW, VOCAB, LENGTH = 64, 16, 8, 2, 50, 8


# ------------------------------------------------------------------------------ the models
class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.emb(ids)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(self.emb(ids))
        return self.fc(h[-1])


class TwoInputs(nn.Module):
    """forward(ids, mask): mask 1 for a real token, 0 for padding. ``nested=True`` (the
    default of ``nn.TransformerEncoder``): its eval path turns padded batches into nested
    tensors."""

    def __init__(self, depth: int = 2, nested: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=nested)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids), src_key_padding_mask=mask == 0)
        m = mask[..., None].float()
        return self.fc((h * m).sum(1) / m.sum(1))


def _googlenet() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tv.googlenet(num_classes=10, aux_logits=True, init_weights=True)


def _vit() -> nn.Module:
    return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                num_classes=10)


def _images(n: int, seed: int) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def _ids(n: int, seed: int) -> Tuple[torch.Tensor, ...]:
    return (torch.randint(1, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed)),)


def _pair(n: int, seed: int) -> Tuple[torch.Tensor, ...]:
    (ids,) = _ids(n, seed)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return ids, (torch.arange(LENGTH)[None] < lengths[:, None]).long()


ZOO: Dict[str, Tuple[Callable[[], nn.Module], Callable[[int, int], Tuple[torch.Tensor, ...]]]] = {
    "resnet18": (lambda: tv.resnet18(num_classes=10), _images),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), _images),
    "googlenet_aux": (_googlenet, _images),
    "vit": (_vit, _images),
    "transformer_encoder": (EncoderClassifier, _ids),
    "lstm": (LSTMClassifier, _ids),
    "two_inputs": (TwoInputs, _pair),
}


def _probe(inputs: Tuple[torch.Tensor, ...]) -> Any:
    return inputs[0] if len(inputs) == 1 else inputs


def _logits(out: Any) -> torch.Tensor:
    return getattr(out, "logits", out)  # GoogLeNet in train mode: GoogLeNetOutputs(logits, aux2, aux1)


class FrozenWatch:
    """Each group's parameters and buffers copied when it froze; compared at the end."""

    def __init__(self, tracker: DynamicsTracker) -> None:
        self.tracker = tracker
        self.saved: Dict[str, List[torch.Tensor]] = {}

    @staticmethod
    def _tensors(group: Any) -> List[torch.Tensor]:
        return [t for m in group.modules for t in (*m.parameters(), *m.buffers())]

    def note(self, entry: Optional[Dict[str, Any]]) -> None:
        if entry is None:
            return
        groups = {g.name: g for g in self.tracker.groups}
        for name in entry["groups"]:
            self.saved[name] = [t.detach().clone() for t in self._tensors(groups[name])]

    def check(self) -> None:
        groups = {g.name: g for g in self.tracker.groups}
        for name, saved in self.saved.items():
            now = self._tensors(groups[name])
            assert all(torch.equal(a, b) for a, b in zip(saved, now)), f"group {name!r} changed after it froze"
            assert not any(p.requires_grad for m in groups[name].modules for p in m.parameters()), name


def _train(tracker: DynamicsTracker, model: nn.Module, data: Callable[[int, int], Tuple[torch.Tensor, ...]],
           steps: int = STEPS, repeat: bool = False) -> FrozenWatch:
    """``steps`` SGD steps on random batches (the same ``WINDOW`` batches over and over with
    ``repeat``), the tracker called after each, as the README's plain loop does."""
    watch = FrozenWatch(tracker)
    watch.note(tracker.start().freeze)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        seed = 100 + (step % WINDOW if repeat else step)
        x = data(BATCH, seed)
        y = torch.randint(0, 5, (BATCH,), generator=torch.Generator().manual_seed(seed))
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(_logits(model(*x)), y).backward()
        opt.step()
        watch.note(tracker.maybe_capture(step, epoch=(step - 1) // WINDOW).freeze)
    return watch


def _check_run(tracker: DynamicsTracker, run_dir: Path, watch: FrozenWatch) -> None:
    layers = tracker.recorder.layers
    assert len(layers) >= 3 and tracker.recorder.ordered
    store = RepresentationStore(run_dir / "store", read_only=True)
    assert sorted(store.layers) == sorted(layers)  # every default layer captured (some capture holds it)
    assert len(store) == len(tracker.captured_steps) >= 2 and tracker.captured_steps[0] == 0
    summary = json.loads((run_dir / "svcca_summary.json").read_text())
    assert sorted(summary["layers"]) == sorted(layers) and summary["failures"] == []
    # frozen groups: a prefix of the groups, which follow the traced forward order
    names = [g.name for g in tracker.groups]
    assert [n for n in layers if n in names] == names
    frozen = list(tracker.policy.frozen)
    assert frozen == names[:len(frozen)] and len(frozen) < len(names)
    assert sorted(tracker.freeze_steps) == sorted(g for g in frozen if {g.name: g for g in tracker.groups}[g].parameters())
    watch.check()


# ------------------------------------------------------------------------------ the sweep
@pytest.mark.parametrize("name", list(ZOO))
def test_tracker_at_its_defaults_with_adaptive_freezing_over_the_zoo(tmp_path, name):
    torch.manual_seed(0)
    build, data = ZOO[name]
    model = build()
    tracker = DynamicsTracker(model, _probe(data(N_PROBE, 1)), run_dir=tmp_path, freeze="adaptive",
                              freeze_window=WINDOW, total_steps=STEPS, final_heatmaps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = _train(tracker, model, data)
        analysis = tracker.finish(STEPS)
    assert analysis is not None and analysis.dynamics.layers
    _check_run(tracker, tmp_path, watch)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if name == "vit":  # the zero-initialised head: one warning, then recorded from the capture at which it varies
        assert any("'heads.head' is constant over the probe at step 0" in m for m in messages)
        assert tracker.constant_layers["heads.head"]["first_varied"] is not None
    if name == "googlenet_aux":  # aux heads run in train mode only: not recorded
        assert not any(n.startswith("aux") for n in tracker.recorder.layers)


# ------------------------------------------------------------------------------ several inputs
def _loader(ids: torch.Tensor, mask: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(ids, mask, torch.zeros(len(ids))), batch_size=24)


def test_probes_of_two_inputs_tuple_dict_or_loader_record_the_same(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs()
    ids, mask = _pair(N_PROBE, 1)
    probes = {"tuple": (ids, mask), "dict": {"mask": mask, "ids": ids}, "loader": _loader(ids, mask),
              "dicts": [{"ids": ids[:40], "mask": mask[:40], "labels": None}, {"ids": ids[40:], "mask": mask[40:]}]}
    bases = {}
    for kind, probe in probes.items():
        assert probe_size(probe, model) == N_PROBE
        tracker = DynamicsTracker(model, probe, run_dir=tmp_path / kind, final_analysis=False)
        tracker.start()
        bases[kind] = tracker.last_capture
        # the signal's partial recordings: every input sliced alike
        first = list(tracker.probe_batches.inputs(30))
        assert sum(b.rows for b in first) == 30 and all(isinstance(b, Inputs) for b in first)
        assert all(t.shape[0] == b.rows for b in first for t in b.tensors())
        head = tracker.probe_batches.head(3)
        assert isinstance(head, Inputs) and [t.shape[0] for t in head.tensors()] == [3, 3]
        tracker.close()
    for kind, got in bases.items():
        assert list(got) == list(bases["tuple"]), kind
        for layer, b in got.items():
            torch.testing.assert_close(b.singular_values, bases["tuple"][layer].singular_values, rtol=1e-4,
                                       atol=1e-6, msg=f"{kind} {layer}")


def test_the_probe_hash_covers_every_input(tmp_path):
    """A change in the mask alone (the second input) is a changed probe."""
    ids, mask = _pair(N_PROBE, 1)
    tracker = DynamicsTracker(TwoInputs(), (ids, mask), run_dir=tmp_path, final_analysis=False)
    tracker.start()
    tracker.capture(1)
    mask[5, -1] = 1 - mask[5, -1]
    with pytest.raises(ValueError, match=r"`probe` changed between captures \(batch 0 differs\)"):
        tracker.capture(2)
    tracker.close()


def test_two_inputs_freeze_with_flops_prefix_reuse_and_the_cache_exact(tmp_path):
    """A deeper two-input model frozen in two steps: the FLOPs saved are counted, the signal
    after the first freeze starts from the frozen prefix's kept output (checked against a
    full recording), the frozen-output cache turns itself off (the frozen encoder layers take
    the mask too, outside its key) and training with it is bit for bit what it is without it."""
    states = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = TwoInputs(depth=5, nested=False)
        tracker = DynamicsTracker(model, _pair(N_PROBE, 1), run_dir=tmp_path / str(cache), freeze="adaptive",
                                  freeze_window=WINDOW, total_steps=16, max_overhead=None, freeze_threshold=0.01,
                                  final_heatmaps=2, frozen_cache=cache)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            watch = _train(tracker, model, _pair, steps=16, repeat=True)
            tracker.finish(16)
        _check_run(tracker, tmp_path / str(cache), watch)
        assert len(tracker.freeze_log) >= 2, tracker.freeze_log  # frozen in more than one step
        assert all(e["backward_flops_saved"] > 0 for e in tracker.freeze_log)
        probe = tracker.frozen_prefix.stats().probe
        assert probe.served > 0 and probe.off is None, probe
        if cache:  # the encoder layers also take the mask, which the key does not cover: off, never served
            stats = tracker.frozen_cache_stats
            assert stats is not None and stats["served"] == 0 and "attention mask" in stats["off"], stats
        states[cache] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in states[False].items():
        assert torch.equal(v, states[True][k]), k


def test_the_nested_tensor_path_of_a_padded_encoder_is_left_alone(tmp_path):
    """nn.TransformerEncoder hands nested tensors between its layers in eval mode with a
    padding mask (and, in the FLOPs count's eval forward with grad on, from its first layer
    frozen to a trainable one, which refuses them): the FLOPs are counted with the fast path
    off, a nested boundary output is not kept for reuse, and the cache turns itself off with
    a reason."""
    torch.manual_seed(0)
    model = TwoInputs(depth=5)
    tracker = DynamicsTracker(model, _pair(N_PROBE, 1), run_dir=tmp_path, freeze="adaptive", freeze_window=WINDOW,
                              total_steps=12, max_overhead=None, freeze_threshold=0.01, final_heatmaps=2,
                              frozen_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watch = _train(tracker, model, _pair, steps=12, repeat=True)
        tracker.finish(12)
    _check_run(tracker, tmp_path, watch)
    assert tracker.freeze_log and all(e["backward_flops_saved"] > 0 for e in tracker.freeze_log)
    assert torch.backends.mha.get_fastpath_enabled()
    stats = tracker.frozen_cache_stats
    assert stats is not None and stats["off"] and "does not return one tensor" in stats["off"], stats


def test_sharded_recording_slices_every_input_and_equals_one_process():
    """The callback's DDP recording (every rank a slice, rows gathered on rank 0), ranks run as
    threads with an all_gather of their own: a (ids, mask) probe whose inputs keep different
    numbers of token rows, ranks with uneven slices or none, and a max_datapoints subsample
    give what one process records."""
    from svcca_torch.callbacks import SVCCACallback
    from svcca_torch.callbacks.sharding import record_sharded

    torch.manual_seed(0)
    model = TwoInputs().eval()
    cb = SVCCACallback(torch.randn(4, 2))
    for n, world, cap in ((10, 3, None), (10, 3, 17), (2, 3, None), (11, 2, 20)):
        ids, mask = _pair(n, 3)
        rec = ActivationRecorder(model, max_datapoints=cap)
        expected = rec.record((ids, mask))
        got = _threads(world, lambda r, t: record_sharded(t, ActivationRecorder(
            copy.deepcopy(model), rec.layers, max_datapoints=cap), Inputs((ids, mask))))
        assert all(g is None for g in got[1:])
        assert list(got[0]) == list(expected)
        for layer, t in expected.items():
            torch.testing.assert_close(got[0][layer], t, rtol=1e-5, atol=1e-6, msg=f"{n} {world} {cap} {layer}")
    # under DDP the callback shards a tuple/dict probe as it does a tensor one (a DataLoader: rank 0 records it)
    ids, mask = _pair(N_PROBE, 1)
    ddp = type("Trainer", (), {"world_size": 2, "global_rank": 0, "is_global_zero": True,
                               "strategy": type("Strategy", (), {"broadcast": lambda self, obj, src=0: obj})()})()
    for probe, sharded in (((ids, mask), True), ({"ids": ids, "mask": mask}, True), (_loader(ids, mask), False)):
        other = SVCCACallback(probe)
        other.setup(ddp, TwoInputs(), "fit")
        assert other.sharded is sharded
    # a tensor probe, as before
    images = torch.randn(9, 3, 16, 16)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(576, 3)).eval()
    expected = ActivationRecorder(net, ["0", "2", "4"], max_datapoints=25).record(images)
    got = _threads(2, lambda r, t: record_sharded(t, ActivationRecorder(copy.deepcopy(net), ["0", "2", "4"],
                                                                               max_datapoints=25), images))
    for layer, t in expected.items():
        torch.testing.assert_close(got[0][layer], t)


def test_the_tracker_hands_a_probe_of_several_inputs_to_its_sharded_recorder(tmp_path):
    seen = []

    def sharded(rec, inputs):
        seen.append(inputs)
        return rec.record(inputs)

    ids, mask = _pair(N_PROBE, 1)
    tracker = DynamicsTracker(TwoInputs(), _loader(ids, mask), run_dir=tmp_path, final_analysis=False,
                              sharded_record=sharded)
    tracker.start()
    tracker.close()
    [inputs] = seen
    assert isinstance(inputs, Inputs) and inputs.rows == N_PROBE
    assert torch.equal(inputs.args[0], ids) and torch.equal(inputs.args[1], mask)


class _Hub:
    """all_gather across threads: every rank's tensor stacked, as torch.distributed does."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: List[Any] = [None] * world

    def gather(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = torch.stack(self.slots)
        self.barrier.wait()
        return out


class _Rank:
    def __init__(self, rank: int, world: int, hub: _Hub) -> None:
        self.global_rank, self.world_size, self.is_global_zero = rank, world, rank == 0
        self.strategy = self
        self._hub = hub

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._hub.gather(self.global_rank, t)


def _threads(world: int, work: Callable[[int, _Rank], Any]) -> List[Any]:
    hub = _Hub(world)
    out: List[Any] = [None] * world
    errors: List[BaseException] = []

    def run(r: int) -> None:
        try:
            out[r] = work(r, _Rank(r, world, hub))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ------------------------------------------------------------------------------ both Lightning packages
from test_lightning_packages import PACKAGES, _package  # noqa: E402  (one list, one skip rule)


def _lightning(pkg, name: str):
    build, _ = ZOO[name]

    if name == "two_inputs":
        class Module(pkg.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = build()

            def forward(self, ids, mask):
                return self.net(ids, mask)

            def training_step(self, batch, batch_idx):
                ids, mask, y = batch
                return nn.functional.cross_entropy(self(ids, mask), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
    else:
        class Module(pkg.LightningModule):  # type: ignore[no-redef]
            def __init__(self) -> None:
                super().__init__()
                self.net = build()

            def forward(self, ids):
                return self.net(ids)

            def training_step(self, batch, batch_idx):
                ids, y = batch
                return nn.functional.cross_entropy(self(ids), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Module()


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("name,freeze", [("two_inputs", True), ("two_inputs", False), ("transformer_encoder", False)])
def test_callback_at_its_defaults_under_each_package(tmp_path, package, name, freeze):
    pkg = _package(package)
    from svcca_torch.callbacks import SVCCACallback

    pkg.seed_everything(0, verbose=False)
    _, data = ZOO[name]
    train = data(4 * BATCH, 7)
    y = torch.randint(0, 5, (4 * BATCH,), generator=torch.Generator().manual_seed(7))
    loader = DataLoader(TensorDataset(*train, y), batch_size=BATCH)
    cb = SVCCACallback(_probe(data(N_PROBE, 1)), freeze_training=freeze, final_heatmaps=2, progress=False)
    trainer = pkg.Trainer(default_root_dir=str(tmp_path), max_epochs=2, accelerator="cpu", devices=1, logger=False,
                          callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
    module = _lightning(pkg, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    tracker = cb.tracker
    assert tracker is not None and cb.captured_steps[0] == 0 and cb.captured_steps[-1] == trainer.global_step == 8
    assert tracker.recorder.layers == ["net.emb", "net.encoder.layers.0", "net.encoder.layers.1", "net.fc"]
    run_dir = tracker.run_dir
    store = RepresentationStore(run_dir / "store", read_only=True)
    assert sorted(store.layers) == sorted(tracker.recorder.layers)
    summary = json.loads((run_dir / "svcca_summary.json").read_text())
    assert summary["failures"] == [] and summary["probe_checksum"] == cb.probe_checksum
    if freeze:
        names = [g.name for g in tracker.groups]
        frozen = list(tracker.policy.frozen)
        assert frozen == names[:len(frozen)]
        assert all(e["backward_flops_saved"] is not None for e in tracker.freeze_log)


# ------------------------------------------------------------------------------ a layer swamped by its bias
class _Tiny(nn.Module):
    """An output layer over activations scaled by ``scale``: 1e-9 stands for a fresh
    MobileNetV3 in eval mode (BatchNorm running statistics not adapted yet: its pooled
    features are ~1e-9 on 32x32 inputs, and one SGD step gives classifier.3 a bias of ~5e-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.scale = 1e-9
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.body(x)))) * self.scale)


def test_a_layer_whose_variation_sinks_below_its_bias_rounding_is_left_out_not_an_error(tmp_path):
    """MobileNetV3-small's classifier.3 at step 1 of the sweep: its values vary over the probe
    (~1e-10) below the float32 rounding of a bias that grew to ~5e-3. It is not dead: one
    warning, left out until it varies again, then captured; a layer that did die (zeroed
    weights: exactly constant) is still an error."""
    torch.manual_seed(0)
    model = _Tiny()
    tracker = DynamicsTracker(model, torch.randn(200, 6), run_dir=tmp_path, max_overhead=None, final_heatmaps=2)
    tracker.start()
    assert "head" in tracker.last_capture  # tiny, but it varies relative to its mean
    with torch.no_grad():
        model.head.bias.fill_(5e-3)
    with pytest.warns(UserWarning, match=r"layer 'head' is constant over the probe at step 1 \(capture\), but it is "
                                         r"not dead: its values vary over the probe"):
        tracker.capture(1)
    assert "head" not in tracker.last_capture and tracker.constant_layers["head"]["first_varied"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.capture(2)  # still swamped: left out again, no second warning
    assert "head" not in tracker.last_capture
    model.scale = 1.0
    tracker.capture(3)
    assert "head" in tracker.last_capture and tracker.constant_layers["head"]["first_varied"] == 3
    with torch.no_grad():
        model.mid.weight.zero_()
        model.mid.bias.fill_(0.5)
    with pytest.raises(ValueError, match=r"layer 'mid' is constant over the probe at step 4 \(capture\).*died"):
        tracker.capture(4)
    tracker.close()
