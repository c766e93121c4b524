"""Wide layers (more neurons than datapoints, issue 21): the kernels decompose them from the
datapoints' (n, n) Gram, never a (neurons, neurons) matrix. Checked against float64
torch.linalg.svd with bounds derived from the dtype, against the neuron-side route on the
same data, and by recording every tensor the kernels create.

Tolerances (``eps`` = the machine epsilon of the dtype the data and the products are in,
``u = eps/2`` the unit roundoff; ``A`` the exactly centred data (n, d), ``‖·‖_F`` Frobenius):

* The wide route eigendecomposes ``K̃ = fl(Ã Ãᵀ)`` (float64 eigensolve) where ``Ã`` is ``A``
  centred in the dtype. A dot product of length d has error ``<= γ_d |a|ᵀ|b|`` with
  ``γ_d ~ d u``, so ``‖K̃ - ÃÃᵀ‖_2 <= γ_d ‖ |Ã||Ã|ᵀ ‖_2 <= d u ‖A‖_F²``. Centring in the
  dtype: ``|Ã - A| <= u |A| + |μ̃ - μ|`` entrywise, and a recursive mean of n values is off by
  ``<= n u mean|x|``, so ``‖Ã - A‖_F <= u ‖A‖_F + n u √n ‖mean|x|‖``, which moves ``AAᵀ`` by
  ``<= 2 ‖A‖_2 ‖Ã - A‖_F`` (first order). The float64 eigensolve is backward stable with
  error ``<= n eps_64 ‖K‖_2``. All together ``‖δK‖_2 <= E`` with
  ``E = (d + n) eps ‖A‖_F² + 2 ‖A‖_2 (eps ‖A‖_F + n eps √n ‖mean|x|‖)`` (``eps >= eps_64``).
* Singular values: Weyl's theorem gives ``|λ̃_i - λ_i| <= E``, and ``λ = σ²`` gives
  ``|σ̃_i - σ_i| = |λ̃_i - λ_i| / (σ̃_i + σ_i) <= E / σ_i``. (The reference SVD's own error,
  ``~ n eps_64 σ_1``, is far below.)
* Left subspace of the top k: Davis-Kahan (Yu, Wang & Samworth 2015 variant)
  ``‖sin Θ‖_2 <= 2 E / (λ_k - λ_{k+1})``.
* Right subspace: ``Ṽ = orth(Ãᵀ Ũ / σ̃)``; the error in ``Ũ`` is carried by ``Aᵀ`` with gain
  ``<= σ_1 / σ_k`` and the product adds ``γ_n ‖A‖_F / σ_k``:
  ``‖sin Θ_V‖_2 <= (σ_1/σ_k) 2 E / (λ_k - λ_{k+1}) + n eps ‖A‖_F / σ_k``.
* Orthonormality of a basis cast to the dtype: ``|QᵀQ - I| <= n eps`` entrywise.

These are worst-case bounds (the measured errors are far smaller); in float64 they are
~1e-11 relative on these sizes, so a wrong algorithm fails them by orders of magnitude.
Similarities between the two routes use the suite's claims: 1e-9 in float64, 1e-5 in float32.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import svcca_torch as sv
from svcca_torch import ZeroVarianceError

_MODULES = [sys.modules[f"svcca_torch.functional.{m}"] for m in ("svcca", "cca", "cka", "matrix", "conv")]


@pytest.fixture
def neuron_side(monkeypatch):
    """A context in which every kernel takes the neuron-side (d, d) route, as before issue 21."""

    class Ctx:
        def __enter__(self):
            for m in _MODULES:
                monkeypatch.setattr(m, "prefer_datapoint_gram", lambda n, d: False)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Ctx()


def low_rank(n, d, r, seed, dtype, lo=1.0, hi=10.0):
    """``Q_n diag(s) Q_dᵀ`` with centred ``Q_n``: rank ``r``, singular values ``s`` spread
    geometrically over [lo, hi] (well separated), plus dead, constant and duplicate neurons."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, generator=g, dtype=torch.float64)
    qa = torch.linalg.qr(a - a.mean(0)).Q
    qb = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(np.log10(hi), np.log10(lo), r, dtype=torch.float64)
    x = (qa * s) @ qb.mT
    x = torch.cat([x, torch.zeros(n, 3, dtype=x.dtype), torch.full((n, 2), 0.5, dtype=x.dtype), x[:, :4]], 1)
    return x.to(dtype)


def gaussian(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3).to(dtype)


def error_budget(x: torch.Tensor) -> float:
    """``E`` of the module docstring for data ``x`` held in its dtype."""
    eps = torch.finfo(x.dtype).eps
    n, d = x.shape
    x64 = x.double()
    a = x64 - x64.mean(0)
    fro, two = float(torch.linalg.matrix_norm(a)), float(torch.linalg.matrix_norm(a, 2))
    mean_abs = float(x64.abs().mean(0).norm())
    return (d + n) * eps * fro**2 + 2 * two * (eps * fro + n * eps * n**0.5 * mean_abs)


def sin_theta(q_ref: torch.Tensor, q: torch.Tensor) -> float:
    """Largest principal angle's sine between two orthonormal column spaces of equal
    dimension: ``‖(I - Q_ref Q_refᵀ) Q‖_2`` (accurate to ~eps, unlike ``sqrt(1 - cos²)``)."""
    q = q.double()
    return float(torch.linalg.matrix_norm(q - q_ref @ (q_ref.mT @ q), 2))


CASES = {
    "gaussian 64x512": lambda dt: gaussian(64, 512, 0, dt),
    "gaussian 100x101": lambda dt: gaussian(100, 101, 1, dt),  # just past the switch
    "rank 20 of 64x512, dead/constant/duplicate": lambda dt: low_rank(64, 512, 20, 2, dt),
    "rank 5 of 30x3000": lambda dt: low_rank(30, 3000, 5, 3, dt),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("keep", [1.0, 0.6, 7])
def test_wide_svd_reduce_matches_float64_svd(case, dtype, keep):
    x = CASES[case](dtype)
    n, d = x.shape
    assert d > n
    b = sv.svd_reduce(x, keep)
    a = x.double() - x.double().mean(0)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    e = error_budget(x)
    k = b.k
    # every synthetic spectrum is >= 0.1 s_1 or exactly 0; the data's rounding to the dtype
    # adds singular values ~eps s_1, which no rank threshold counts
    true_rank = int((s > 1e-4 * s[0]).sum())
    if isinstance(keep, int):
        assert k == min(keep, true_rank)
    elif keep == 1.0:  # everything above the dtype's rank threshold: the true rank
        assert k == true_rank, (k, true_rank)
    s_ref = s[:k]
    sv_err = (b.singular_values.double() - s_ref).abs()
    assert bool((sv_err <= e / s_ref).all()), float((sv_err * s_ref).max() / e)
    lam = s.square()
    gap = float(lam[k - 1] - (lam[k] if k < len(lam) else 0.0))
    if 2 * e / gap < 1:  # the bound says something
        assert sin_theta(u[:, :k], b.basis) <= 2 * e / gap
        bound_v = float(s[0] / s[k - 1]) * 2 * e / gap + n * torch.finfo(dtype).eps * float(a.norm()) / float(s[k - 1])
        assert sin_theta(vh[:k].mT, b.components) <= max(bound_v, 0.0)
    eye = torch.eye(k, dtype=torch.float64)
    lim = n * torch.finfo(dtype).eps
    assert float((b.basis.double().mT @ b.basis.double() - eye).abs().max()) <= lim
    assert float((b.components.double().mT @ b.components.double() - eye).abs().max()) <= d * torch.finfo(dtype).eps
    assert b.basis.dtype == dtype and b.basis.shape == (n, k) and b.components.shape == (d, k)
    assert b.n_neurons == d
    torch.testing.assert_close(b.mean, x.mean(0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dead_neurons_get_zero_components(dtype):
    x = low_rank(64, 512, 20, 4, dtype)  # columns 512..514 zero, 515..516 constant
    b = sv.svd_reduce(x, 1.0)
    assert float(b.components[512:517].abs().max()) == 0.0


# ------------------------------------------------------------------ the two routes agree
def _pair(dtype, wide_y: bool, scale: float = 1.0):
    """80 datapoints; ``x`` 300 neurons of rank 40 (10 shared latents, 30 of its own) with
    dead, constant and duplicate neurons; ``y`` 120 (wide) or 40 neurons of rank 40."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((80, 10))

    def layer(d):
        own = rng.standard_normal((80, 30)) @ rng.standard_normal((30, d))
        return z @ rng.standard_normal((10, d)) + 0.5 * own

    x = layer(300)
    x[:, :3] = 0.0  # dead
    x[:, 3:5] = 2.5  # constant
    x[:, 5:9] = x[:, 20:24]  # duplicate
    y = layer(120 if wide_y else 40)
    return torch.tensor(x * scale, dtype=dtype), torch.tensor(y, dtype=dtype)


SIMILARITIES = {
    "svcca": lambda x, y: sv.svcca(x, y).mean,
    "svcca keep=5": lambda x, y: sv.svcca(x, y, keep=5).mean,
    "svcca variance": lambda x, y: sv.svcca(x, y, 0.9, keep_rule="variance").mean,
    "cca": lambda x, y: sv.cca(x, y).mean,
    "cka": lambda x, y: sv.linear_cka(x, y),
    "cka debiased": lambda x, y: sv.linear_cka(x, y, debiased=True),
    "matrix svcca": lambda x, y: sv.similarity_matrix([x, y])[0, 1].item(),
    "matrix cca": lambda x, y: sv.similarity_matrix([x, y], method="cca")[0, 1].item(),
    "matrix cka": lambda x, y: sv.similarity_matrix([x, y], method="cka")[0, 1].item(),
    "matrix cka debiased": lambda x, y: sv.similarity_matrix([x, y], method="cka", debiased=True)[0, 1].item(),
    "matrix svcca of ys": lambda x, y: sv.similarity_matrix([x], [y, x])[0, 0].item(),
}


@pytest.mark.parametrize("scale", [1.0, 2.0**63, 2.0**-63])
@pytest.mark.parametrize("wide_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_similarities_agree_with_the_neuron_side(dtype, wide_y, scale, neuron_side):
    x, y = _pair(dtype, wide_y, scale)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few datapoints per direction: the point here is agreement
        wide = {k: f(x, y) for k, f in SIMILARITIES.items()}
        wide_t = {k: f(y, x) for k, f in SIMILARITIES.items()}
        with neuron_side:
            narrow = {k: f(x, y) for k, f in SIMILARITIES.items()}
    for k in SIMILARITIES:
        assert wide[k] == pytest.approx(narrow[k], abs=tol), k
        if "ys" not in k:
            assert wide_t[k] == pytest.approx(wide[k], abs=tol), k  # symmetric


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_results_and_variates_agree_with_the_neuron_side(dtype, neuron_side):
    x, y = _pair(dtype, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = {"cca": sv.cca(x, y), "svcca": sv.svcca(x, y, keep=6)}
        with neuron_side:
            ref = {"cca": sv.cca(x, y), "svcca": sv.svcca(x, y, keep=6)}
            red = sv.svd_reduce(x, 0.9, max_directions=8)
        wide_red = sv.svd_reduce(x, 0.9, max_directions=8)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for name in res:
        a, b = res[name], ref[name]
        torch.testing.assert_close(a.coefficients.double(), b.coefficients.double(), rtol=0, atol=tol)
        torch.testing.assert_close(a.x_mean, b.x_mean)
        # canonical variates: unit variance and cross-correlations = the coefficients, to
        # the suite's accuracy for variates (1e-8 float64, 1e-5 float32)
        u, v = a.x_variates.double(), a.y_variates.double()
        m = len(u) - 1
        r = u.shape[1]
        lim = 1e-8 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose((u.T @ u / m).numpy(), np.eye(r), atol=lim)
        np.testing.assert_allclose((u.T @ v / m).numpy(), np.diag(a.coefficients.double().numpy()), atol=lim)
        assert a.x_weights.shape == b.x_weights.shape == (300, r)
        assert float(a.x_weights[:5].abs().max()) == 0.0  # dead and constant neurons
    assert (wide_red.k, red.k) == (8, 8)
    torch.testing.assert_close(wide_red.singular_values, red.singular_values, rtol=tol, atol=0)
    angle = 1e-4 if dtype == torch.float32 else 1e-9
    assert sin_theta(red.basis.double(), wide_red.basis) < angle
    assert sin_theta(red.components.double(), wide_red.components) < angle


# ------------------------------------------------------------------ no (d, d) matrix
class LargestTensor(TorchFunctionMode):
    """Records the largest tensor (in elements) that any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name,call", [
    ("svd_reduce", lambda x, y: sv.svd_reduce(x, 0.99)),
    ("svd_reduce all", lambda x, y: sv.svd_reduce(x, 1.0)),
    ("svcca", lambda x, y: sv.svcca(x, y).x_weights),
    ("cca", lambda x, y: sv.cca(x, y).x_weights),
    ("cka", lambda x, y: sv.linear_cka(x, y, debiased=True)),
    ("matrix svcca", lambda x, y: sv.similarity_matrix([x, y])),
    ("matrix cca", lambda x, y: sv.similarity_matrix([x, y], method="cca")),
    ("matrix cka", lambda x, y: sv.similarity_matrix([x, y], method="cka")),
])
def test_wide_layers_never_form_a_neurons_by_neurons_matrix(name, call):
    n, d = 16, 2000  # a (d, d) matrix would hold 4,000,000 elements; the layer 32,000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d // 2, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LargestTensor() as spy:
            call(x, y)
    assert spy.largest <= n * d, (name, spy.largest)


def test_dft_cca_with_more_channels_than_images_never_forms_a_channel_gram():
    n, c, h, w = 4, 256, 4, 4  # 12 kept frequencies: (F, C, C) would hold 786,432 elements
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LargestTensor() as spy:
            sv.dft_cca(x, x[:, :3])
    assert spy.largest <= 4 * n * c * h * w, spy.largest


@pytest.mark.parametrize("centering", ["per_frequency", "dc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dft_cca_with_more_channels_than_images_agrees_with_the_channel_side(centering, dtype, neuron_side):
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
    # 10 channels of rank 2 on 8 images (a full-rank side would span every centred direction)
    x = torch.einsum("dc,nchw->ndhw", torch.randn(10, 2, generator=g, dtype=torch.float64), latent)
    y = latent[:, :1] + torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    kw = dict(centering=centering, dtype=dtype, return_per_frequency=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide, wide_t = sv.dft_cca(x, y, **kw), sv.dft_cca(y, x, **kw)
        with neuron_side:
            ref = sv.dft_cca(x, y, **kw)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert wide.coefficients.shape == ref.coefficients.shape
    torch.testing.assert_close(wide.coefficients, ref.coefficients, rtol=0, atol=tol)
    torch.testing.assert_close(wide_t.coefficients, ref.coefficients, rtol=0, atol=tol)
    torch.testing.assert_close(wide.per_frequency, ref.per_frequency, rtol=0, atol=tol, equal_nan=True)
    assert 0.2 < wide.mean < 0.99  # not the degenerate all-ones case


# ------------------------------------------------------------------ errors and warnings
def test_constant_wide_layer_is_a_zero_variance_error_naming_it():
    c = torch.full((10, 50), 0.1)
    with pytest.raises(ZeroVarianceError, match=r"`fc` has zero variance: all 50 neurons .*float32"):
        sv.svd_reduce(c, name="fc")
    other = torch.randn(10, 60, generator=torch.Generator().manual_seed(0))
    for f in (sv.svcca, sv.cca, sv.linear_cka):
        with pytest.raises(ZeroVarianceError, match=r"`tok` has zero variance: all 50 neurons"):
            f(other, c, names=("x", "tok"))
    for method in ("svcca", "cca", "cka"):
        with pytest.raises(ZeroVarianceError, match=r"`xs\[1\]` has zero variance"):
            sv.similarity_matrix([other, c], method=method)


def test_wide_power_of_two_scaling_changes_nothing():
    x = gaussian(64, 512, 6, torch.float32)
    for scale in (2.0**63, 2.0**-63):
        b, b1 = sv.svd_reduce(x * scale), sv.svd_reduce(x)
        assert b.k == b1.k
        torch.testing.assert_close(b.singular_values / scale, b1.singular_values, rtol=1e-5, atol=0)
        assert sin_theta(b1.basis.double(), b.basis) < 1e-5


def test_wide_svcca_warns_on_few_datapoints_by_the_kept_directions():
    x, y = gaussian(40, 400, 7, torch.float64), gaussian(40, 30, 8, torch.float64)
    with pytest.warns(sv.FewDatapointsWarning, match="39 directions on the larger side"):
        assert sv.cca(x, y).mean == pytest.approx(1.0, abs=1e-9)  # the degenerate answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sv.svcca(x, y, keep=4)
