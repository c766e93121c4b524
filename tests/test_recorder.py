"""ActivationRecorder: layer choice, shapes, common datapoints, hooks/modes restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.models import ConvNet, resnet_small
from svcca_torch.functional.conv import conv_datapoint_indices
from svcca_torch.recorder import ActivationRecorder, default_layers, direction_limits, select_layers
from _modules import Scrambled, Twice


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class TinyBlock(nn.Module):
    """A residual block without svcca_torch's layer_names convention."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = TinyBlock(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_default_layers_heuristic_and_declared() -> None:
    # heuristic: convs/linears outside blocks + the block output, not the conv inside it
    assert default_layers(TinyResNet()) == ["stem", "block", "head"]
    # svcca_torch models declare their representation layers
    net = resnet_small()
    assert ActivationRecorder(net).layers == net.layer_names
    assert ActivationRecorder(ConvNet()).layers == ConvNet().layer_names


def test_select_by_type_and_pattern() -> None:
    net = ConvNet()
    assert select_layers(net, [nn.Linear]) == ["fc1", "fc"]
    assert select_layers(net, ["features.block*.conv"]) == [f"features.block{i}.conv" for i in range(1, 5)]
    # the order given is kept (the recorder puts it in forward order), not re-sorted
    assert select_layers(net, ["fc", "features.block1"]) == ["fc", "features.block1"]
    convs = [f"features.block{i}.conv" for i in range(1, 5)]
    assert select_layers(net, ["fc", "features.block*.conv", "fc"]) == ["fc"] + convs


def test_unknown_layer_lists_existing_names() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*features\.block1 \(ConvBNReLU\)"):
        ActivationRecorder(ConvNet(), ["fc", "nope"])


def test_dense_shapes_and_values_match_manual_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    x = torch.randn(50, 5)
    out = ActivationRecorder(net, batch_size=16).record(x)
    assert list(out) == ["0", "2"]
    with torch.no_grad():
        pre = net[0](x)
        logits = net[2](torch.relu(pre))
    # the in-place ReLU that follows layer 0 must not have clipped what was recorded
    assert (out["0"] < 0).any()
    torch.testing.assert_close(out["0"], pre)
    torch.testing.assert_close(out["2"], logits)


def test_inplace_relu_after_unpooled_conv_does_not_corrupt() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(inplace=True))
    x = torch.randn(20, 2, 2, 2)  # a 2x2 map is already on the grid: no pooling copy
    out = ActivationRecorder(net, ["0"]).record(x)
    with torch.no_grad():
        expected = net[0](x).permute(0, 2, 3, 1).reshape(80, 3)
    assert (out["0"] < 0).any()
    torch.testing.assert_close(out["0"], expected)


def test_conv_maps_pooled_to_common_grid_and_dense_rows_aligned() -> None:
    torch.manual_seed(0)
    net = ConvNet()  # 8x8 input: blocks 1-2 at 8x8, blocks 3-4 at 4x4, then fc1, fc
    x = torch.randn(40, 1, 8, 8)
    rec = ActivationRecorder(net, ["features.block1", "features.block3", "fc"], grid=2)
    out = rec.record(x)
    assert rec.conv_grid == (2, 2)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "features.block1": (160, 16), "features.block3": (160, 32), "fc": (160, 10)
    }
    net.eval()
    with torch.no_grad():
        b1 = net.features.block1(x)
        logits = net(x)
    manual = F.adaptive_avg_pool2d(b1, 2).permute(0, 2, 3, 1).reshape(160, 16)
    torch.testing.assert_close(out["features.block1"], manual)
    # row r is image r // 4 for every layer, the dense layer repeated per cell
    assert torch.equal(rec.datapoint_index, torch.arange(160) // 4)
    torch.testing.assert_close(out["fc"], logits[rec.datapoint_index])


def test_max_datapoints_same_rows_every_call() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.randn(64, 1, 8, 8)
    rec = ActivationRecorder(net, max_datapoints=100, seed=3)
    a = rec.record(x)
    idx_a = rec.datapoint_index.clone()
    assert all(v.shape[0] == 100 for v in a.values())
    b = rec.record(x)
    assert torch.equal(idx_a, rec.datapoint_index)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_dataloader_and_tensor_probe_agree_across_batch_sizes() -> None:
    torch.manual_seed(0)
    net = resnet_small()
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 10, (30,))
    a = ActivationRecorder(net, batch_size=7).record(x)
    b = ActivationRecorder(net).record(DataLoader(TensorDataset(x, y), batch_size=11))
    assert list(a) == list(b) == net.layer_names
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_result_in_execution_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.early = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(x))

    out = ActivationRecorder(Reversed()).record(torch.randn(10, 3))
    assert list(out) == ["early", "late"]


def test_tuple_outputs_use_first_tensor() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor):
            h = self.lin(x)
            return h, {"aux": h * 2}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(x)[0]

    net = Net()
    x = torch.randn(9, 3)
    out = ActivationRecorder(net, ["pair"]).record(x)
    with torch.no_grad():
        torch.testing.assert_close(out["pair"], net.pair.lin(x))


def test_modes_restored_and_eval_during_record() -> None:
    net = ConvNet()
    net.train()
    net.features.block2.eval()  # a user-frozen submodule stays in eval
    before = {n: m.training for n, m in net.named_modules()}
    seen = []
    net.features.block1.bn.register_forward_hook(lambda m, i, o: seen.append(m.training))
    ActivationRecorder(net).record(torch.randn(8, 1, 8, 8))
    assert seen == [False]
    assert {n: m.training for n, m in net.named_modules()} == before
    assert _hook_count(net) == 1  # only the test's own hook is left


def test_hooks_removed_and_modes_restored_when_forward_raises() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.lin(x)

    net = Flaky()
    net.train()
    with pytest.raises(RuntimeError, match="boom"):
        ActivationRecorder(net, batch_size=4).record(torch.randn(10, 3))
    assert _hook_count(net) == 0
    assert net.training and net.lin.training


def test_shared_module_is_an_error() -> None:
    net = Twice()
    with pytest.raises(ValueError, match="'lin'.*more than once"):
        ActivationRecorder(net).record(torch.randn(5, 3))
    assert _hook_count(net) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`grid`"):
        ActivationRecorder(ConvNet(), grid=0)
    with pytest.raises(ValueError, match="`resize`"):
        ActivationRecorder(ConvNet(), resize="nearest")
    with pytest.raises(ValueError, match="`probe`"):
        ActivationRecorder(ConvNet()).record(42)


def test_bfloat16_model_gets_inputs_in_its_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(10, 3, 8, 8)
    ref = ActivationRecorder(model, ["3"]).record(x)["3"]
    got = ActivationRecorder(model.to(torch.bfloat16), ["3"]).record(x)["3"]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got, ref, atol=0.1, rtol=0.05)


def test_dict_batches_use_the_input_key_not_the_first_key() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(12, 6)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> dict:
            return {"label": i % 3, "image": x[i]}

    got = ActivationRecorder(model).record(DataLoader(Dicts(), batch_size=5))
    ref = ActivationRecorder(model).record(x)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)
    unnamed = [{"a": x[:4], "b": x[:4]}]
    with pytest.raises(ValueError, match="name the model input"):
        ActivationRecorder(model).record(unnamed)


# ---------------------------------------------------------------- forward order, subsets, rows


def test_layers_put_in_forward_order_by_the_first_record() -> None:
    net, x = Scrambled(), torch.randn(10, 5)
    rec = ActivationRecorder(net)
    assert rec.layers == ["head", "hidden", "body"] and not rec.ordered  # registration order until traced
    out = rec.record(x)
    assert list(out) == ["body", "hidden", "head"]
    assert rec.layers == ["body", "hidden", "head"] and rec.ordered
    assert ActivationRecorder(net, example_input=x).layers == ["body", "hidden", "head"]


def test_subset_record_stops_the_forward_after_its_last_layer() -> None:
    torch.manual_seed(0)
    net, x = Scrambled(), torch.randn(20, 5)
    net.train()
    # layers given: default layers would be chosen on one traced batch first (a fourth forward)
    rec = ActivationRecorder(net, ["head", "hidden", "body"], batch_size=8)
    full = rec.record(x)  # 3 batches, full forwards (the trace)
    assert net.head_calls == 3 and not rec.last_stopped_early
    assert rec.last_seconds is not None and rec.last_seconds > 0
    low = rec.record(x, layers=["hidden", "body"])
    assert list(low) == ["body", "hidden"]
    assert net.head_calls == 3 and rec.last_stopped_early  # the top of the network never ran
    for name in low:
        torch.testing.assert_close(low[name], full[name], rtol=0, atol=0)
    assert _hook_count(net) == 0 and all(m.training for m in net.modules())
    with pytest.raises(ValueError, match=r"`layers`: \['fc'\] are not recorded"):
        rec.record(x, layers=["fc"])


def test_early_stop_survives_a_forward_that_catches_exceptions() -> None:
    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b_calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                h = self.a(x)
            except Exception:  # a model's own error handling must not swallow the stop
                h = x
            self.b_calls += 1
            return self.b(h)

    net, x = Guarded(), torch.randn(6, 3)
    rec = ActivationRecorder(net, example_input=x)
    calls = net.b_calls
    out = rec.record(x, layers=["a"])
    assert net.b_calls == calls and rec.last_stopped_early
    with torch.no_grad():
        torch.testing.assert_close(out["a"], net.a(x))


def test_shared_module_found_before_early_stop_can_hide_it() -> None:
    with pytest.raises(ValueError, match="'lin'.*more than once"):
        ActivationRecorder(Twice(), example_input=torch.randn(4, 3))


class DeepOneByOne(nn.Module):
    """8x8 -> conv (8x8 map) -> strided conv (1x1 map) -> linear: the ImageNet-stem-on-32x32 case."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.deep = nn.Conv2d(4, 6, 8, stride=8)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.deep(torch.relu(self.conv(x)))).flatten(1))


def test_per_layer_rows_keep_each_layers_own_grid() -> None:
    torch.manual_seed(0)
    net, x = DeepOneByOne().eval(), torch.randn(12, 2, 8, 8)
    rec = ActivationRecorder(net, grid=2)
    common = rec.record(x)
    assert rec.conv_grid == (1, 1) and all(t.shape[0] == 12 for t in common.values())  # 1x1 forces all
    per = rec.record(x, rows="per_layer")
    assert {n: tuple(t.shape) for n, t in per.items()} == {"conv": (48, 4), "deep": (12, 6), "fc": (12, 3)}
    assert rec.layer_grids == {"conv": (2, 2), "deep": (1, 1), "fc": (1, 1)}
    assert torch.equal(rec.layer_datapoint_index["conv"], torch.arange(48) // 4)
    assert torch.equal(rec.layer_datapoint_index["fc"], torch.arange(12))
    with torch.no_grad():
        c = net.conv(x)
    torch.testing.assert_close(per["conv"], F.adaptive_avg_pool2d(c, 2).permute(0, 2, 3, 1).reshape(48, 4))
    torch.testing.assert_close(per["deep"], common["deep"], rtol=0, atol=0)
    # one pass gives both, identical to two separate records
    both_common, both_per = rec.record_both(x)
    for name in per:
        torch.testing.assert_close(both_per[name], per[name], rtol=0, atol=0)
        torch.testing.assert_close(both_common[name], common[name], rtol=0, atol=0)
    assert rec.conv_grid == (1, 1) and rec.layer_grids["conv"] == (2, 2)
    with pytest.raises(ValueError, match="`rows`"):
        rec.record(x, rows="both")


def test_per_layer_max_datapoints_caps_each_layer_with_fixed_rows() -> None:
    torch.manual_seed(0)
    net, x = DeepOneByOne().eval(), torch.randn(30, 2, 8, 8)
    rec = ActivationRecorder(net, grid=2, max_datapoints=50, seed=1, rows="per_layer")
    a = rec.record(x)
    idx = {n: i.clone() for n, i in rec.layer_datapoint_index.items()}
    assert {n: t.shape[0] for n, t in a.items()} == {"conv": 50, "deep": 30, "fc": 30}
    b = rec.record(x)
    for name in a:
        assert torch.equal(idx[name], rec.layer_datapoint_index[name])
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # the kept conv rows are the fold's rows: row r of the result is image idx[r]
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(net.conv(x), 2)
    folded = pooled.permute(0, 2, 3, 1).reshape(120, 4)
    kept = conv_datapoint_indices(30, (2, 2), max_datapoints=50, seed=1)
    torch.testing.assert_close(a["conv"], folded[kept])
    assert torch.equal(idx["conv"], kept // 4)
    assert direction_limits(a) == {"conv": 10, "deep": 6, "fc": 6}


def test_outputs_on_the_model_device_float32_and_out_device() -> None:
    net, x = DeepOneByOne().to(torch.bfloat16), torch.randn(5, 2, 8, 8)
    rec = ActivationRecorder(net)
    out = rec.record(x)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in out.values())
    moved = rec.record(x, out_device="meta")  # any device other than the model's
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in moved.values())
    assert rec.datapoint_index.device.type == "cpu"
    assert all(t.device.type == "meta" for t in ActivationRecorder(net, out_device="meta").record(x).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only)")
def test_cuda_capture_stays_on_device_and_matches_cpu() -> None:
    torch.manual_seed(0)
    net, x = ConvNet(), torch.randn(40, 1, 8, 8)
    ref = ActivationRecorder(net).record(x)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # TF32 convolutions (a CUDA default) are ~1e-3 relative: compare float32 with float32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _check_cuda_capture(net, x, ref)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _check_cuda_capture(net: nn.Module, x: torch.Tensor, ref: dict) -> None:
    rec = ActivationRecorder(net.cuda())
    got = rec.record(x)
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in got.values())
    assert rec.datapoint_index.device.type == "cpu"
    on_cpu = rec.record(x, out_device="cpu")
    for name in ref:
        assert on_cpu[name].device.type == "cpu"
        torch.testing.assert_close(got[name].cpu(), ref[name], rtol=1e-4, atol=1e-4)


def test_order_layers_fallback_and_errors() -> None:
    from svcca_torch.recorder import LayerOrderWarning

    net = Scrambled()
    rec = ActivationRecorder(net)
    with pytest.warns(LayerOrderWarning, match="could not be traced"):
        assert rec.order_layers(torch.randn(3, 4)) == ["head", "hidden", "body"]  # wrong input width
    assert not rec.ordered and _hook_count(net) == 0

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        ActivationRecorder(Skips(), ["used", "unused"]).order_layers([(torch.randn(4, 3), torch.zeros(4))])
    # the default layers are those that run
    assert ActivationRecorder(Skips()).order_layers([(torch.randn(4, 3), torch.zeros(4))]) == ["used"]


def test_subset_before_the_order_is_known_traces_one_batch_first() -> None:
    torch.manual_seed(0)
    net, x = Scrambled(), torch.randn(9, 5)
    rec = ActivationRecorder(net, batch_size=4)
    low = rec.record(x, layers=["body"])
    # one traced batch reached the head; the 3 batches of the capture stopped after body
    assert net.head_calls == 1 and rec.last_stopped_early and rec.ordered
    with torch.no_grad():
        torch.testing.assert_close(low["body"], net.body(x))
    # a one-shot iterator cannot be traced and replayed: whole forwards, same values (layers
    # given: default layers are chosen on its first batch, taken and put back)
    fresh = ActivationRecorder(net, ["head", "hidden", "body"], batch_size=4)
    again = fresh.record(iter([x[:4], x[4:]]), layers=["body"])
    assert net.head_calls == 3 and not fresh.last_stopped_early and not fresh.ordered
    torch.testing.assert_close(again["body"], low["body"])  # other batch sizes: float32 rounding


def test_subset_common_rows_are_the_full_captures_rows() -> None:
    torch.manual_seed(0)
    net, x = DeepOneByOne().eval(), torch.randn(10, 2, 8, 8)
    rec = ActivationRecorder(net, grid=2)
    low = rec.record(x, layers=["conv"])  # alone, conv would fold on 2x2: 40 rows
    assert rec.conv_grid == (1, 1) and low["conv"].shape == (10, 4)
    full = rec.record(x)
    torch.testing.assert_close(low["conv"], full["conv"], rtol=0, atol=0)
    assert torch.equal(rec.datapoint_index, torch.arange(10))
