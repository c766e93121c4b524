"""Test configuration: one torch thread (two threads on a loaded 2-core machine made an
epoch 50x slower), headless matplotlib, and the shared reference activations."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "svcca_reference"


def _load_reference(name: str, transpose: bool) -> np.ndarray:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(
            f"reference activations not found at {path}: they live in ../shared/data/svcca_reference "
            "beside the project checkout (developer machines and CI only)"
        )
    arr = np.load(path)
    return np.ascontiguousarray(arr.T) if transpose else arr


@pytest.fixture(scope="session")
def mnist_pair() -> tuple[np.ndarray, np.ndarray]:
    """Logits (10 neurons) of two MNIST nets on 10,000 test images, as (datapoints, neurons).

    The files are stored neurons x datapoints, so they are transposed here."""
    return (
        _load_reference("mnist_model0_lay04.npy", transpose=True),
        _load_reference("mnist_model1_lay04.npy", transpose=True),
    )


@pytest.fixture(scope="session")
def svhn_pair() -> tuple[np.ndarray, np.ndarray]:
    """fc(200) post-ReLU activations of two SVHN nets on 1,000 images, (datapoints, neurons).

    The files are already datapoints x neurons."""
    return (
        _load_reference("svhn_model0_lay06.npy", transpose=False),
        _load_reference("svhn_model1_lay06.npy", transpose=False),
    )
