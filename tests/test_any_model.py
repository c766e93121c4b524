"""Any model a user brings (issue 21): default layers are the model's blocks (only what runs
in an eval forward), one freeze group per block, token sequences recorded as datapoints
(batch or sequence first, padding masks), several model inputs."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.freeze import default_layer_groups
from svcca_torch.models import ConvNet
from svcca_torch.recorder import ActivationRecorder, default_layers, direction_limits, is_block, model_inputs

tv = pytest.importorskip("torchvision.models")


# ------------------------------------------------------------------------------ sequence models
class EncoderClassifier(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder (its fused eval path never calls the
    attention's out_proj) -> mean -> linear."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor needs batch_first
            self.encoder = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids if self.batch_first else ids.t())
        return self.fc(self.encoder(h).mean(1 if self.batch_first else 0))


class LSTMClassifier(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=batch_first)
        self.fc = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(self.emb(ids if self.batch_first else ids.t()))
        return self.fc(h[-1])


class TwoInputs(nn.Module):
    """forward(ids, mask): mask 1 for a real token, 0 for padding (Hugging Face's convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids), src_key_padding_mask=mask == 0)
        m = mask[..., None].float()
        return self.fc((h * m).sum(1) / m.sum(1))


def _ids(n: int = 10, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def _mask(n: int = 10, length: int = 7) -> torch.Tensor:
    lengths = torch.tensor([7, 2, 5, 1, 7, 3, 6, 4, 7, 2])[:n]
    return (torch.arange(length)[None] < lengths[:, None]).long()


def _images(n: int = 6, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _vit() -> nn.Module:
    return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                num_classes=10)


def _googlenet() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tv.googlenet(num_classes=10, aux_logits=True, init_weights=True)


ZOO: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], Any], List[str]]] = {
    # 64 x 64: the last block's map is 2 x 2, so the common rows repeat fc's row per cell
    "resnet18": (lambda: tv.resnet18(num_classes=10), lambda: _images(side=64),
                 ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)] + ["fc"]),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), _images,
                           ["features.0.0"] + [f"features.{i}" for i in range(1, 12)]
                           + ["features.12.0", "classifier.0", "classifier.3"]),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), _images,
                        ["features.0.0"] + [f"features.{s}.{i}" for s, k in zip(range(1, 8), (1, 2, 2, 3, 3, 4, 1))
                                            for i in range(k)] + ["features.8.0", "classifier.1"]),
    "shufflenet_v2": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), _images,
                      ["conv1.0"] + [f"stage{s}.{i}" for s, k in ((2, 4), (3, 8), (4, 4)) for i in range(k)]
                      + ["conv5.0", "fc"]),
    "googlenet_aux": (_googlenet, _images,
                      ["conv1.conv", "conv2.conv", "conv3.conv"]
                      + [f"inception{b}" for b in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")] + ["fc"]),
    "vit": (_vit, _images, ["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1",
                            "heads.head"]),
    "transformer_encoder": (EncoderClassifier, _ids, ["emb", "encoder.layers.0", "encoder.layers.1", "fc"]),
    "lstm_batch_first": (LSTMClassifier, _ids, ["emb", "lstm", "fc"]),
    "lstm_sequence_first": (lambda: LSTMClassifier(batch_first=False), _ids, ["emb", "lstm", "fc"]),
    "embedding_two_inputs": (TwoInputs, lambda: (_ids(), _mask()), ["emb", "encoder.layers.0", "encoder.layers.1",
                                                                     "fc"]),
}


def _outputs(model: nn.Module, probe: Any, names: List[str]) -> Dict[str, torch.Tensor]:
    """Each named module's output on the probe (eval, no grad), from hooks of the test's own."""
    got: Dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in names]
    model.eval()
    try:
        with torch.no_grad():
            model(*probe) if isinstance(probe, tuple) else model(probe)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", list(ZOO))
def test_default_layers_are_the_blocks_that_run_one_group_each(name: str) -> None:
    torch.manual_seed(0)
    build, make_probe, expected = ZOO[name]
    model, probe = build(), make_probe()
    n = probe[0].shape[0] if isinstance(probe, tuple) else probe.shape[0]
    assert default_layers(model, probe) == expected
    rec = ActivationRecorder(model)
    assert rec.order_layers(probe) == expected and rec.ordered
    modules = dict(model.named_modules())
    # blocks (by type or name) or weight layers outside them; never a norm, never inside another
    for layer in expected:
        m = modules[layer]
        assert is_block(m) or not any(True for _ in m.children()), layer
        assert not any(o != layer and layer.startswith(o + ".") for o in expected), layer

    # one freeze group per block; a block's inner modules (squeeze-excitation, attention) in its group only
    groups = default_layer_groups(model, rec.layers)
    assert [g.name for g in groups] == expected
    owner: Dict[int, str] = {}
    for g in groups:
        assert any(layer == g.name or g.name.startswith(layer + ".") for layer in g.module_names)
        for p in g.parameters():
            assert owner.setdefault(id(p), g.name) == g.name, f"a parameter in groups {owner[id(p)]} and {g.name}"
    for block in (b for b in expected if is_block(modules[b])):
        group = next(g for g in groups if g.name == block)
        assert any(block == m or block.startswith(m + ".") for m in group.module_names)

    # datapoints: maps on their grid (2 x 2 at most), tokens up to max_tokens real ones per input, dense one row
    outs = _outputs(model, probe, expected)
    mask = probe[1] if isinstance(probe, tuple) else None
    per = rec.record(probe, rows="per_layer")
    common = rec.record(probe)
    assert list(per) == list(common) == expected
    kinds = set()
    for layer, t in outs.items():
        t = t if not getattr(t, "is_nested", False) else torch.nested.to_padded_tensor(t, 0.0)
        if t.ndim == 4:
            rows, kind = n * min(2, t.shape[2]) * min(2, t.shape[3]), "map"
        elif t.ndim == 3:
            length = t.shape[1] if t.shape[0] == n else t.shape[0]
            real = mask.sum(1) if mask is not None else torch.full((n,), length)
            rows, kind = int(real.clamp(max=rec.max_tokens).sum()), "tokens"
        else:
            rows, kind = n, "dense"
        kinds.add(kind)
        width = t.shape[1] if kind != "tokens" else t.shape[2]
        assert tuple(per[layer].shape) == (rows, width), layer
    if "tokens" in kinds and "map" in kinds:  # no common position: one row per input, tokens averaged
        assert all(t.shape[0] == n for t in common.values())
    elif "tokens" in kinds:  # the same tokens in every sequence layer
        token_rows = {per[layer].shape[0] for layer in expected if outs[layer].ndim == 3}
        assert len(token_rows) == 1 and {t.shape[0] for t in common.values()} == token_rows
    # datapoint checks count distinct datapoints, not a dense layer's rows repeated per cell or token
    limits = direction_limits(common)
    for layer, t in common.items():
        if outs[layer].ndim == 2:
            assert limits[layer] == max(1, len(torch.unique(rec.datapoint_index)) // 5), layer
        else:
            assert limits[layer] <= max(1, t.shape[0] // 5), layer


def test_mobilenet_squeeze_excitation_stays_in_its_block() -> None:
    model = tv.mobilenet_v3_small(num_classes=10)
    groups = default_layer_groups(model, example_input=_images(2))
    names = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    assert names and len(groups) == 15
    for se in names:
        holders = [g.name for g in groups if any(se == m or se.startswith(m + ".") for m in g.module_names)]
        assert holders == [se.rsplit(".block.", 1)[0]], se


# ------------------------------------------------------------------------------ tokens
def test_tokens_are_datapoints_evenly_spaced_and_aligned_across_layers() -> None:
    torch.manual_seed(0)
    model, ids = EncoderClassifier(), _ids(10, 7)
    rec = ActivationRecorder(model, max_tokens=3)
    per = rec.record(ids, rows="per_layer")
    outs = _outputs(model, ids, rec.layers)
    keep = torch.tensor([0, 2, 4])  # floor(j * 7 / 3)
    for layer in ("emb", "encoder.layers.0", "encoder.layers.1"):
        torch.testing.assert_close(per[layer], outs[layer][:, keep].reshape(30, 16))
        assert torch.equal(rec.layer_datapoint_index[layer], torch.arange(30) // 3)
        assert rec.layer_grids[layer] == (1, 3)
    assert per["fc"].shape == (10, 5)
    common = rec.record(ids)
    assert rec.conv_grid == (1, 3) and torch.equal(rec.datapoint_index, torch.arange(30) // 3)
    torch.testing.assert_close(common["encoder.layers.1"], per["encoder.layers.1"])
    torch.testing.assert_close(common["fc"], outs["fc"][rec.datapoint_index])  # repeated per token...
    assert direction_limits(common)["fc"] == 2  # ...but 10 distinct datapoints
    torch.testing.assert_close(rec.record(ids, layers=["fc"])["fc"], common["fc"])  # a capture of fc alone too
    # max_datapoints subsamples the token rows with a fixed seed
    capped = ActivationRecorder(model, max_tokens=3, max_datapoints=12, seed=1).record(ids)
    assert all(t.shape[0] == 12 for t in capped.values())


def test_sequence_first_is_found_from_the_batch_size_and_matches_batch_first() -> None:
    torch.manual_seed(0)
    first, seq = LSTMClassifier(), LSTMClassifier(batch_first=False)
    seq.load_state_dict(first.state_dict())
    ids = _ids(10, 7)  # 7 x 10 = 70 rows flattened would be neither the batch nor the tokens
    a = ActivationRecorder(first).record(ids, rows="per_layer")
    rec = ActivationRecorder(seq)
    b = rec.record(ids, rows="per_layer")
    assert rec.layouts == {"emb": "LND", "lstm": "LND", "fc": "ND"}
    assert list(a) == list(b) == ["emb", "lstm", "fc"]
    for layer in a:
        torch.testing.assert_close(a[layer], b[layer])
    assert b["lstm"].shape == (40, 12)  # 4 tokens of 12 neurons per input, not 7 x 12 neurons


def test_ambiguous_layout_is_an_error_that_says_how_to_name_it() -> None:
    torch.manual_seed(0)
    first, seq = LSTMClassifier(), LSTMClassifier(batch_first=False)
    seq.load_state_dict(first.state_dict())
    square = _ids(7, 7)  # sequence length == batch size
    with pytest.raises(ValueError, match=r"both of its first two dimensions equal the batch size.*layouts=\{'emb'"):
        ActivationRecorder(seq).record(square)
    named = ActivationRecorder(seq, layouts={"emb": "LND", "lstm": "LND"}).record(square)
    for layer, t in ActivationRecorder(first, layouts={"emb": "NLD", "lstm": "NLD"}).record(square).items():
        torch.testing.assert_close(named[layer], t)
    with pytest.raises(ValueError, match=r"not layout 'NHWC' \(as named in `layouts`\)"):
        ActivationRecorder(seq, ["lstm"], layouts={"lstm": "NHWC"}).record(square)
    with pytest.raises(ValueError, match=r"`layouts\['lstm'\]` must be one of"):
        ActivationRecorder(seq, layouts={"lstm": "NCL"})


def test_vit_tokens_are_datapoints_not_neurons() -> None:
    torch.manual_seed(0)
    model, x = _vit(), _images(6)
    rec = ActivationRecorder(model)
    per = rec.record(x, rows="per_layer")
    block = "encoder.layers.encoder_layer_0"
    assert per[block].shape == (24, 32)  # 4 of 17 tokens per image, 32 neurons (was 6 x 544)
    outs = _outputs(model, x, [block])
    torch.testing.assert_close(per[block], outs[block][:, torch.tensor([0, 4, 8, 12])].reshape(24, 32))
    # conv maps and tokens have no common position: one row per image, no repeated rows
    common = rec.record(x)
    assert all(t.shape[0] == 6 for t in common.values()) and rec.conv_grid == (1, 1)
    torch.testing.assert_close(common[block], outs[block].mean(1))
    assert direction_limits(common)[block] == 1


# ------------------------------------------------------------------------------ several inputs, padding
def test_two_inputs_as_tuple_dict_or_loader_with_padding_respected() -> None:
    torch.manual_seed(0)
    model, ids, mask = TwoInputs(), _ids(), _mask()
    rec = ActivationRecorder(model, batch_size=4)
    per = rec.record((ids, mask), rows="per_layer")
    index = rec.layer_datapoint_index
    common = rec.record((ids, mask))
    real = mask.sum(1)
    slots = real.clamp(max=4)
    assert per["emb"].shape[0] == int(slots.sum()) == 32
    # each input's kept tokens are evenly spaced over its real tokens, padding never kept
    outs = _outputs(model, (ids, mask), ["emb", "encoder.layers.1"])
    rows = [outs["emb"][i, (torch.arange(int(k)) * int(v)) // int(k)] for i, (k, v) in enumerate(zip(slots, real))]
    torch.testing.assert_close(per["emb"], torch.cat(rows))
    assert torch.equal(index["emb"], torch.repeat_interleave(torch.arange(10), slots))
    # the fused encoder path returns nested tensors: the same tokens, aligned in common rows
    assert rec.conv_grid is None and all(t.shape[0] == 32 for t in common.values())
    torch.testing.assert_close(common["encoder.layers.1"], per["encoder.layers.1"])
    # a dict probe (keywords), a DataLoader of (ids, mask, labels) and of dicts: the same rows
    for probe in ({"ids": ids, "mask": mask},
                  DataLoader(TensorDataset(ids, mask, torch.zeros(10)), batch_size=3),
                  [{"ids": ids[:6], "mask": mask[:6], "labels": None}, {"ids": ids[6:], "mask": mask[6:]}]):
        got = ActivationRecorder(model).record(probe, rows="per_layer")
        for layer in per:
            torch.testing.assert_close(got[layer], per[layer], rtol=1e-4, atol=1e-5)
    # padding_mask=False keeps every token (min(4, 7) per input)
    assert ActivationRecorder(model, padding_mask=False).record((ids, mask), rows="per_layer")["emb"].shape[0] == 40


def test_wrong_inputs_are_errors_naming_what_was_wrong() -> None:
    model, ids, mask = TwoInputs(), _ids(), _mask()
    with pytest.raises(ValueError, match=r"forward\(ids, mask\) cannot take the probe batch \(input 0: \(10, 7\) "
                                         r"int64\).*missing a required argument: 'mask'"):
        ActivationRecorder(model).record(ids)
    with pytest.raises(ValueError, match=r"share their first dimension.*\(10, 7\).*\(9, 7\)"):
        ActivationRecorder(model).record((ids, mask[:9]))
    with pytest.raises(ValueError, match=r"forward\(ids, mask\), which requires \['ids'\] too; the batch has keys "
                                         r"\['tokens', 'mask'\]"):
        ActivationRecorder(model).record({"tokens": ids, "mask": mask})
    with pytest.raises(ValueError, match=r"`padding_mask`='pad' names no input"):
        ActivationRecorder(model, padding_mask="pad").record((ids, mask))
    assert model_inputs((ids, mask, torch.zeros(10)), model).args[1] is mask


# ------------------------------------------------------------------------------ channels last
class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ChannelsLastBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, H, W, C), as Swin's blocks
        return x + self.lin(self.norm(x))


class ChannelsLastNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), Permute(), nn.LayerNorm(8))
        self.block = ChannelsLastBlock(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((1, 2)))


def test_channels_last_maps_found_by_the_trace() -> None:
    torch.manual_seed(0)
    model, x = ChannelsLastNet(), _images(5)
    rec = ActivationRecorder(model)
    per = rec.record(x, rows="per_layer")
    assert rec.layers == ["stem.0", "block", "head"] and rec.layouts["block"] == "NHWC"
    out = _outputs(model, x, ["block"])["block"]  # (5, 8, 8, 8) channels last
    pooled = nn.functional.adaptive_avg_pool2d(out.permute(0, 3, 1, 2), 2)
    torch.testing.assert_close(per["block"], pooled.permute(0, 2, 3, 1).reshape(20, 8))


def test_direction_limits_count_distinct_datapoints() -> None:
    torch.manual_seed(0)
    rec = ActivationRecorder(ConvNet(), ["features.block1", "fc"], grid=2)
    acts = rec.record(torch.randn(40, 1, 8, 8))
    assert acts["fc"].shape[0] == 160  # each image's dense row repeated for its 4 cells
    assert direction_limits(acts) == {"features.block1": 32, "fc": 8}
