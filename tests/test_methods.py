"""The similarity methods are listed once (svcca_torch.functional.methods, issue 20)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from svcca_torch.cli import main
from svcca_torch.functional import similarity_matrix
from svcca_torch.functional.methods import Method, get_method, method_names, register_method, unregister_method


def _layers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    return [x, x @ torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(200, 4, generator=g,
                                                                                     dtype=torch.float64)]


def test_an_unknown_method_is_the_same_error_everywhere(tmp_path, capsys):
    with pytest.raises(ValueError, match="`method` must be one of 'svcca', 'cca', 'pwcca', 'cka'; got 'ckaa'"):
        get_method("ckaa")
    with pytest.raises(ValueError, match="`method` must be one of"):
        similarity_matrix(_layers(), method="ckaa")
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, _layers()[0].numpy())
    np.save(b, _layers()[1].numpy())
    with pytest.raises(SystemExit) as e:
        main(["compare", str(a), str(b), "--method", "ckaa"])
    assert e.value.code == 2 and "invalid choice: 'ckaa'" in capsys.readouterr().err


def test_a_registered_method_is_used_by_the_matrix_and_the_command_line(tmp_path, capsys):
    """A new method is its kernel and one registration: nothing else changes."""
    def mean_abs_corr(x, y, *, keep=None, keep_rule=None, dtype=None, names=("x", "y"), power=1):
        c = torch.corrcoef(torch.cat([x, y], 1).T)[: x.shape[1], x.shape[1]:]
        return {"value": float(c.abs().pow(power).mean()), "note": "mean |correlation| of neuron pairs"}

    register_method(Method("abscorr", mean_abs_corr, options=("power",)))
    try:
        assert method_names()[-1] == "abscorr"
        layers = _layers()
        m = similarity_matrix(layers, method="abscorr", power=2)
        assert m.shape == (3, 3)
        assert m[0, 1] == pytest.approx(mean_abs_corr(layers[0], layers[1], power=2)["value"])
        with pytest.raises(TypeError, match="unexpected arguments for method='abscorr': debiased"):
            similarity_matrix(layers, method="abscorr", debiased=True)
        a, b = tmp_path / "a.npy", tmp_path / "b.npy"
        np.save(a, layers[0].numpy())
        np.save(b, layers[1].numpy())
        assert main(["compare", str(a), str(b), "--method", "all"]) == 0
        out = capsys.readouterr().out
        assert "abscorr" in out and "mean |correlation|" in out and "svcca" in out
        assert main(["compare", str(a), str(b), "--method", "abscorr"]) == 0
    finally:
        unregister_method("abscorr")
    assert "abscorr" not in method_names()


def test_the_builtin_methods_agree_with_the_matrix():
    layers = _layers()
    for name in method_names():
        m = similarity_matrix(layers, method=name)
        v = get_method(name).compare(layers[0], layers[1])["value"]
        assert m[0, 1] == pytest.approx(v, abs=1e-9), name
