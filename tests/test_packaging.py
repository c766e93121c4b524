"""The installed package carries the experiments the demo runs (setup.cfg maps experiments/
as svcca_torch.experiments, the way callbacks/ is mapped)."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_maps_experiments_into_the_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package_dir = dict(line.split("=") for line in cfg["options"]["package_dir"].split("\n") if "=" in line)
    assert {k.strip(): v.strip() for k, v in package_dir.items()}["svcca_torch.experiments"] == "experiments"
    assert "svcca_torch.experiments" in cfg["options"]["packages"].split()


def test_every_subpackage_is_listed_so_a_regular_install_carries_it():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {"svcca_torch." + ".".join(p.parent.relative_to(ROOT / "svcca_torch").parts)
             for p in (ROOT / "svcca_torch").rglob("__init__.py") if p.parent != ROOT / "svcca_torch"}
    assert found and found <= listed, f"not in setup.cfg's packages: {sorted(found - listed)}"


def test_demo_imports_its_experiments_from_the_package():
    from svcca_torch.cli import _experiments, tensorboard_command

    ld, cn = _experiments()
    assert ld.__name__ == "svcca_torch.experiments.learning_dynamics"
    assert cn.__name__ == "svcca_torch.experiments.compare_networks"
    assert callable(ld.run) and callable(cn.run)
    import sys

    assert tensorboard_command("runs/x").startswith(f"{sys.executable} -m tensorboard.main --logdir ")
