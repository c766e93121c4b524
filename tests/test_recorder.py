"""ActivationRecorder: layer choice, shapes, common datapoints, hooks/modes restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.models import ConvNet, resnet_small
from svcca_torch.recorder import ActivationRecorder, default_layers, select_layers


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
    assert select_layers(net, ["fc", "features.block*.conv", "fc"]) == ["fc"] + [f"features.block{i}.conv" for i in range(1, 5)]


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
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

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
