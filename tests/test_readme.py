"""The README as a test: its python examples run, its commands exist.

* Every ```python block of README.md runs as written, top to bottom in one namespace, in a
  temporary working directory (nothing lands in the checkout), on the CPU. A block that must
  not run is marked visibly in the README with ```python title="not run"``` and counted here:
  at most ``MAX_NOT_RUN`` of them, each with a reason on the line right above it.
* Every ``python -m svcca_torch.experiments.NAME`` the README and the docs/ pages show names an
  installed module whose ``--help`` runs, and no command needs the source tree
  (``python experiments/X.py``).
* Every relative link (and image) in README.md and docs/*.md points to a file that exists, and
  a ``#fragment`` into a Markdown page to one of its headings.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and the pages it links
NOT_RUN = 'title="not run"'
MAX_NOT_RUN = 0  # every block runs today; raise only with a reason above the block
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MODULE_CMD = re.compile(r"python -m (svcca_torch\.experiments\.[A-Za-z_][A-Za-z0-9_]*)")


def python_blocks(text: str) -> List[Tuple[int, str, str]]:
    """``(line number, fence info, code)`` of every ```python block, in order."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def test_block_extraction_sees_every_python_fence():
    text = README.read_text()
    opened = len(re.findall(r"^```python", text, re.M))
    blocks = python_blocks(text)
    assert opened >= 5 and len(blocks) == opened  # an unterminated or odd fence would drop a block
    fake = "a\n```python\nx = 1\n```\n\n```python title=\"not run\"\ny = 2\n```\n```bash\nz\n```\n"
    assert [(n, info, code) for n, info, code in python_blocks(fake)] == [
        (2, "", "x = 1\n"), (6, NOT_RUN, "y = 2\n")]


def test_not_run_blocks_are_few_and_explained():
    text = README.read_text()
    lines = text.splitlines()
    skipped = [(n, info) for n, info, _ in python_blocks(text) if info]
    assert all(info == NOT_RUN for _, info in skipped), f"unknown python fence options: {skipped}"
    assert len(skipped) <= MAX_NOT_RUN, f"README blocks marked not run: {skipped}"
    for n, _ in skipped:  # the reason is the text right above the fence
        assert lines[n - 2].strip(), f"README line {n}: a block marked not run needs its reason on the line above"


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def test_readme_python_blocks_run_in_order(in_tmp_dir):
    """All blocks in one namespace, as a user pastes them into one session (on a CPU: the
    examples must not need a GPU). Fails with the README line of the block that raised."""
    torch.set_num_threads(1)
    ns: dict = {"__name__": "__readme__"}
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the examples' own warnings (few datapoints, Lightning tips) are fine
        for line, info, code in python_blocks(README.read_text()):
            if info == NOT_RUN:
                continue
            try:
                exec(compile(code, f"README.md:{line}", "exec"), ns)
            except Exception as err:
                raise AssertionError(f"the README's python block at line {line} failed: "
                                     f"{type(err).__name__}: {err}") from err
            ran += 1
    assert ran >= 5
    # what the examples promise to write, under the temporary working directory only
    assert (in_tmp_dir / "runs" / "store" / "index.json").is_file()
    assert (in_tmp_dir / "runs" / "svcca" / "svcca_summary.json").is_file()
    assert (in_tmp_dir / "ckpt.pt").is_file()
    assert any((in_tmp_dir / "runs" / "tb").iterdir())
    assert 0.0 <= float(ns["metric"].compute().mean) <= 1.0


def readme_modules() -> List[str]:
    """The experiment modules the README and the docs/ pages (its measurements) name."""
    return sorted(set(m for page in PAGES for m in MODULE_CMD.findall(page.read_text())))


def test_readme_commands_work_from_an_installed_package():
    for page in PAGES:
        source_only = re.findall(r"python3? (?:\S*/)?experiments/\w+\.py", page.read_text())
        assert not source_only, (f"{page.name}: commands that need the source tree "
                                 f"(use python -m svcca_torch.experiments.X): {source_only}")
    assert "svcca_torch.experiments.compare_networks" in MODULE_CMD.findall(README.read_text())
    mods = readme_modules()
    assert len(mods) >= 10
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    assert not missing, f"README names modules that do not exist: {missing}"


def test_experiment_docstrings_use_module_commands():
    for path in sorted((ROOT / "experiments").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"python3? experiments/", text), f"{path.name}: use python -m svcca_torch.experiments.X"
        for mod in MODULE_CMD.findall(text):
            assert importlib.util.find_spec(mod) is not None, f"{path.name} names {mod}, which does not exist"


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for mod in sys.argv[1:]:
    buf, err = io.StringIO(), io.StringIO()
    sys.argv = [mod, "--help"]
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(mod, run_name="__main__", alter_sys=True)  # what python -m does
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:
            code, _ = 1, err.write(repr(e))
    out[mod] = {"rc": code, "out": buf.getvalue(), "err": err.getvalue()[-2000:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict:
    """``--help`` of every module the README names, run as ``python -m`` runs them, in one
    fresh interpreter (torch imported once) outside the checkout."""
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", HELP_DRIVER, *readme_modules()], capture_output=True, text=True,
                         env=env, timeout=600, cwd=str(tmp_path_factory.mktemp("help")))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _option_blocks(help_text: str) -> List[str]:
    """One string per option of an argparse help (its first line and the indented ones after)."""
    blocks: List[str] = []
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
        elif not line.strip():
            continue
        else:
            blocks.append("")  # a section header or the description: closes the option
    return [b for b in blocks if b]


def test_option_blocks_catch_a_repeated_default():
    text = ("options:\n  --epochs EPOCHS  training epochs (default 20 on digits)\n"
            "                   (default: None)\n  --seed SEED      seed (default: 0)\n")
    blocks = _option_blocks(text)
    assert [b.count("(default") for b in blocks] == [2, 1]


@pytest.mark.parametrize("module", readme_modules())
def test_readme_module_help_runs(module, helps):
    """``--help`` of each module the README names works for a user of the installed package;
    and no option states its default twice."""
    res = helps[module]
    assert res["rc"] == 0, res["err"]
    assert "usage:" in res["out"] and "--help" in res["out"]
    assert "experiments/" not in res["out"], "the help shows a source-tree command"
    twice = [b for b in _option_blocks(res["out"]) if b.count("(default") > 1]
    assert not twice, f"{module} --help states a default twice: {twice}"


# ---------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _strip_fences(text: str) -> str:
    """The Markdown without its fenced code blocks."""
    return re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def github_anchors(text: str) -> set:
    """The ``#fragment`` of each heading, as GitHub makes them: lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` ... on repeats."""
    seen: dict = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _strip_fences(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(page: Path) -> List[Tuple[str, Path, str]]:
    """``(link as written, target path, fragment)`` of every relative link of a Markdown page."""
    out = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        out.append((target, (page.parent / path).resolve() if path else page, fragment))
    return out


def test_link_check_sees_broken_links(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "b.md").write_text("# The `b` page: A, B\n\n## Two\n\n## Two\n")
    page = tmp_path / "a.md"
    page.write_text("![a](images/a.png) [b](b.md#the-b-page-a-b) [c](c.md) [x](https://x.org/y)\n"
                    "`[d](d.md)` [e](#local) [f](b.md#two-1)\n\n## Local\n\n```\n[g](g.md)\n```\n")
    links = relative_links(page)
    assert [t for t, _, _ in links] == ["images/a.png", "b.md#the-b-page-a-b", "c.md", "#local", "b.md#two-1"]
    assert [t for t, p, _ in links if not p.exists()] == ["c.md"]
    assert github_anchors((tmp_path / "b.md").read_text()) == {"the-b-page-a-b", "two", "two-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Every relative link and image of README.md and docs/*.md points to an existing file (the
    figures moved into docs/ pages link ``images/...``), and every ``#fragment`` into a Markdown
    page to one of its headings."""
    broken = []
    for target, path, fragment in relative_links(page):
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif fragment and path.suffix == ".md" and fragment not in github_anchors(path.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
