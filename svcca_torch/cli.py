"""The ``svcca-torch`` command line.

::

    svcca-torch compare A.npy B.npy [--method svcca|cca|pwcca|cka|all] [--keep 0.99]
                                    [--layout datapoints-first|neurons-first]
    svcca-torch report RUN_DIR [--out DIR] [--all-matrices] [--device cuda]
                                               summary and matrices of a run's stores; its figures
                                               (drawn as the run draws them where missing, or in DIR)
    svcca-torch demo [--out runs]              what `make demo` runs (digits, a few minutes on a CPU)

Arrays are activations ``(datapoints, neurons)`` (batch-first, the default layout) or conv
maps ``(N, C, H, W)``, saved as ``.npy``, ``.npz`` (one array, or ``FILE.npz:NAME``),
``.pt``/``.pth`` (a tensor) or ``.csv``/``.txt`` (comma or whitespace separated).
Errors are one line on stderr and a non-zero exit status (2); set ``SVCCA_TORCH_TRACEBACK=1``
to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .functional.methods import get_method, method_names

__all__ = ["main", "build_parser", "load_array"]

LAYOUTS = ("datapoints-first", "neurons-first")


class CLIError(Exception):
    """A user-facing error, printed as one line."""


# ----------------------------------------------------------------------------- arrays
def _split_key(path: str) -> tuple[Path, Optional[str]]:
    p = Path(path)
    if not p.exists() and ":" in path:
        head, _, key = path.rpartition(":")
        if head and Path(head).suffix == ".npz":
            return Path(head), key
    return p, None


def load_array(path: str) -> np.ndarray:
    """Load one activation array from ``.npy``, ``.npz`` (``FILE.npz:NAME`` picks an array),
    ``.pt``/``.pth`` (a tensor) or ``.csv``/``.txt``; raises :class:`CLIError` otherwise."""
    p, key = _split_key(path)
    if not p.exists():
        raise CLIError(f"{path}: no such file")
    if p.is_dir():
        raise CLIError(f"{path}: is a directory, not an array file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if len(tensors) != 1:
                    raise CLIError(f"{path}: holds {len(tensors)} tensors ({', '.join(map(str, tensors)) or 'none'}); "
                                   "save the one activation tensor alone")
                obj = next(iter(tensors.values()))
            if not isinstance(obj, torch.Tensor):
                raise CLIError(f"{path}: holds a {type(obj).__name__}, not a tensor")
            return obj.detach().float().numpy() if obj.dtype in (torch.float16, torch.bfloat16) else obj.detach().numpy()
        if suffix in (".csv", ".txt", ".tsv"):
            text = p.read_text()
            delimiter = "," if "," in text.split("\n", 1)[0] else None
            return np.loadtxt(p, delimiter=delimiter, ndmin=2)
        with open(p, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
            raise CLIError(f"{path}: is not a NumPy .npy/.npz file (save arrays with numpy.save, or use .pt/.csv)")
        arr = np.load(p, allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            with arr:
                names = list(arr.files)
                if key is not None:
                    if key not in names:
                        raise CLIError(f"{p}: has no array {key!r}; it holds {', '.join(names)}")
                    return arr[key]
                if len(names) != 1:
                    raise CLIError(f"{path}: holds {len(names)} arrays ({', '.join(names)}); pick one as {p}:NAME")
                return arr[names[0]]
        return arr
    except CLIError:
        raise
    except Exception as err:  # any reader failure is a bad file to the user
        kind = {".pt": "PyTorch", ".pth": "PyTorch", ".csv": "text", ".txt": "text", ".tsv": "text"}.get(suffix, "NumPy")
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"{path}: cannot be read as a {kind} array ({msg})") from None


def _orient(a: np.ndarray, name: str, layout: str) -> np.ndarray:
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise CLIError(f"{name}: holds {a.dtype} values, not numbers")
    if a.ndim == 1:
        raise CLIError(f"{name}: is 1-D {a.shape}; activations are (datapoints, neurons): for one neuron save a[:, None]")
    if layout == "neurons-first":
        if a.ndim != 2:
            raise CLIError(f"{name}: --layout neurons-first needs a 2-D (neurons, datapoints) array, got shape {a.shape}")
        return np.ascontiguousarray(a.T)
    if a.ndim not in (2, 4):
        raise CLIError(f"{name}: has shape {a.shape}; expected (datapoints, neurons) or conv maps (N, C, H, W)")
    return a


def _mismatch(a: np.ndarray, b: np.ndarray, na: str, nb: str, layout: str) -> str:
    msg = (f"{na} has {a.shape[0]} datapoints (rows) and {nb} has {b.shape[0]}: both must be activations of the "
           f"same inputs, {'(neurons, datapoints)' if layout == 'neurons-first' else '(datapoints, neurons)'} each")
    if a.ndim == 2 and b.ndim == 2:
        other = "datapoints-first" if layout == "neurons-first" else "neurons-first"
        if a.shape[1] == b.shape[1]:
            return msg + f"; their other axes match ({a.shape[1]}): if both are transposed, pass --layout {other}"
        if a.shape[0] == b.shape[1] or a.shape[1] == b.shape[0]:
            return msg + "; one of them looks transposed: save both in the same layout"
    return msg


def _parse_keep(text: str) -> Union[int, float]:
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= 1 or a float in (0, 1], got {text!r}") from None
    return value


def _compare(args: argparse.Namespace) -> int:
    from .utils.validation import check_keep

    keep = check_keep(args.keep)
    a = _orient(load_array(args.a), args.a, args.layout)
    b = _orient(load_array(args.b), args.b, args.layout)
    if a.shape[0] != b.shape[0]:
        raise CLIError(_mismatch(a, b, args.a, args.b, args.layout))
    for arr, name in ((a, args.a), (b, args.b)):
        if arr.ndim == 2 and arr.shape[0] < arr.shape[1] and args.layout == "datapoints-first":
            print(f"svcca-torch: note: {name} has fewer datapoints (rows, {arr.shape[0]}) than neurons ({arr.shape[1]}); "
                  "if it is (neurons, datapoints), pass --layout neurons-first", file=sys.stderr)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    x, y = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
    methods = method_names() if args.method == "all" else (args.method,)
    names = (str(args.a), str(args.b))  # kernel errors name the files, not `x`/`y`
    out: Dict[str, Any] = {"a": args.a, "b": args.b, "datapoints": int(a.shape[0]),
                           "shape_a": list(a.shape), "shape_b": list(b.shape)}
    lines = []
    for m in methods:
        spec = get_method(m)
        options = {"debiased": args.debiased} if "debiased" in spec.options else {}
        r = spec.compare(x, y, keep=keep, keep_rule=args.keep_rule, dtype=dtype, names=names, **options)
        out[m] = r["value"]
        out.update({f"{m}_{k}": v for k, v in r.items() if k not in ("value", "note")})
        lines.append(f"{m:<6} {r['value']:.6f}  ({r['note']})")
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.a} {tuple(a.shape)} vs {args.b} {tuple(b.shape)}, {a.shape[0]} datapoints")
        for line in lines:
            print(line)
    return 0


# ----------------------------------------------------------------------------- report
def _find_stores(run_dir: Path) -> List[Path]:
    if (run_dir / "index.json").is_file():
        return [run_dir]
    return sorted(p.parent for p in run_dir.rglob("index.json")
                  if p.parent.name == "store" or any(p.parent.glob("step_*")))


def _nan_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


from .views.sinks import RUN_FIGURES  # noqa: E402  (tag -> the PNG a run writes next to its store)


def _summary(home: Path) -> Dict[str, Any]:
    """The run's ``svcca_summary.json`` next to its store, or {}."""
    try:
        summary = json.loads((home / "svcca_summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _run_figures(home: Path, steps: List[int]) -> Optional[Dict[str, Path]]:
    """The figures the run drew in ``home``, if they show the store as it is now: its
    ``svcca_summary.json`` (written with the figures) lists the store's captures. Else None."""
    figs = {Path(f).stem: home / f for f in RUN_FIGURES.values() if (home / f).is_file()}
    if "learning_dynamics" not in figs or "convergence" not in figs:
        return None
    return figs if _summary(home).get("steps") == list(steps) else None


def _draw_run_figures(store: Any, home: Path, fractions: Optional[Sequence[float]], out: Path,
                      device: Optional[str]) -> Dict[str, Path]:
    """Draw a run's figures as the run does: the analysis the tracker runs at the end
    (:func:`~svcca_torch.analysis.shown_dynamics`), then the views' run-folder figures
    (:func:`svcca_torch.views.write_figures`: the same choice of captures, layout, fonts and
    pixels as the run's PNGs, freezes marked from the run's summary). ``fractions``: None for
    the run's grid, else the captures nearest these."""
    from .analysis import FinalAnalysis, shown_dynamics
    from .views import write_figures

    freeze = _summary(home).get("freeze")
    frozen = freeze.get("layer_freeze_steps") if isinstance(freeze, dict) else None
    frozen = {str(n): int(s) for n, s in frozen.items()} if isinstance(frozen, dict) else None
    dyn = shown_dynamics(store, device=device, previous=len(store) > 1, grid=tuple(fractions or ()))
    several = len(dyn.steps) > 1
    write_figures(FinalAnalysis(dyn, dyn.curves(), dyn.to_previous()) if several else dyn, out,
                  grid_fractions=fractions, freeze_steps=frozen, to_previous=several)
    figs = {"learning_dynamics": out / "learning_dynamics.png", "convergence": out / "convergence.png"}
    if several and (out / "to_previous.png").exists():
        figs["to_previous"] = out / "to_previous.png"
    return figs


def _report(args: argparse.Namespace) -> int:
    from .dynamics import learning_dynamics
    from .store import RepresentationStore

    args.fractions_given = args.fractions is not None
    if args.fractions is None:
        args.fractions = [0.0, 0.35, 0.75, 1.0]
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"{run_dir}: no such folder")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise CLIError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: no CUDA device is available here; omit --device to use the CPU")
    stores = _find_stores(run_dir)
    if not stores:
        raise CLIError(f"{run_dir}: holds no SVCCA store (a folder with index.json); pass a run folder written by "
                       "SVCCACallback or an experiment, or the store folder itself")
    rendered = 0
    failed: List[str] = []
    for folder in stores:
        try:  # a reader: never blocks, never writes, even while a training run holds the store
            store = RepresentationStore(folder, read_only=True)
        except ValueError as err:  # includes StoreCorruptError (a damaged index): report the others anyway
            if len(stores) == 1:
                raise CLIError(_one_line(err)) from None
            print(f"svcca-torch: warning: {folder} skipped: {_one_line(err)}", file=sys.stderr)
            failed.append(str(folder))
            continue
        if not len(store):
            print(f"{folder}: empty store, skipped")
            continue
        # a run's `store` renders into the run folder; any other store (e.g. a superseded
        # archive inside it) into its own folder, so that two never overwrite each other
        home = folder.parent if folder.name == "store" else folder
        out = Path(args.out) if args.out else home
        if args.out and len(stores) > 1 and home != run_dir:
            out = out / home.relative_to(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        shown = None if args.all_matrices else [store.nearest(f) for f in args.fractions]
        dyn = learning_dynamics(store, full=shown, device=args.device, previous=True)  # one pass over the store
        fin, prev = dyn.curves(), dyn.to_previous()
        # without --out the run's own figures stand when they show this store; drawn (as the
        # run draws them) only where they are missing or older than the store's last capture
        figs = None if args.out else _run_figures(home, dyn.steps)
        if figs is not None:
            drawn = "the run's own, up to date with the store"
            if args.fractions_given:
                drawn += "; pass --out DIR for a grid at --fractions"
        else:
            figs = _draw_run_figures(store, home, args.fractions if args.fractions_given else None, out, args.device)
            drawn = "drawn now" if args.out else "drawn now: the run's own were missing or older than its last capture"
        matrices = {"store": str(folder), "layers": dyn.layers, "steps": dyn.steps, "fractions": dyn.fractions,
                    "matrices": _nan_none(dyn.matrices.tolist()), "to_final": _nan_none(fin.values.tolist()),
                    "to_previous": _nan_none(prev.values.tolist())}
        (out / "matrices.json").write_text(json.dumps(matrices, indent=1))
        print(f"{folder}: {len(store)} checkpoints x {len(dyn.layers)} layers")
        picks = sorted({dyn.nearest(f) for f in args.fractions})
        width = max(len(n) for n in dyn.layers) + 2
        print("  similarity to final state".ljust(width + 2) + "".join(f"{100 * dyn.fractions[c]:>7.0f}%" for c in picks))
        tf = dyn.to_final()
        for j, n in enumerate(dyn.layers):
            print(f"  {n:<{width}}" + "".join(f"{float(tf[c, j]):>8.3f}" for c in picks))
        print(f"  figures ({drawn}): {', '.join(str(p) for p in figs.values())}")
        print(f"  matrices: {out / 'matrices.json'}")
        rendered += 1
    if not rendered:
        raise CLIError(f"{run_dir}: no store with checkpoints could be rendered (see above)")
    if failed:
        raise CLIError(f"{len(failed)} of {len(stores)} stores could not be read (warnings above): {', '.join(failed)}")
    return 0


# ----------------------------------------------------------------------------- demo
def _experiments():
    """The reproduction scripts, installed as ``svcca_torch.experiments`` (see setup.cfg)."""
    try:
        from .experiments import compare_networks, learning_dynamics
    except ImportError as err:  # e.g. an old install made before experiments/ was packaged
        raise CLIError(f"the demo needs the package svcca_torch.experiments ({_one_line(err)}); reinstall "
                       "svcca-torch (pip install .) or run `make demo` in the source checkout") from None
    return learning_dynamics, compare_networks


def tensorboard_command(logdir: Union[str, Path]) -> str:
    """The command that opens ``logdir`` in TensorBoard with this interpreter, so it works
    without activating the virtual environment."""
    return f"{sys.executable} -m tensorboard.main --logdir {logdir}"


def _demo(args: argparse.Namespace) -> int:
    import time

    ld, cn = _experiments()
    t0 = time.perf_counter()
    common = ["--out", args.out, "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.smoke:
        common.append("--smoke")
    print("== 1/2  learning dynamics with adaptive freeze training (scikit-learn digits)")
    ld_args = ld.build_parser().parse_args(
        common + ["--model", *args.models, "--freeze", "adaptive"] + ([] if args.smoke else ["--epochs", str(args.epochs)]))
    res = ld.run(ld_args)
    print("\n== 2/2  two networks from different seeds, every method against a random baseline of the same shapes")
    cn_args = cn.build_parser().parse_args(
        common + ["--model", "convnet"] + ([] if args.smoke else ["--epochs", str(args.compare_epochs)]))
    cmp = cn.run(cn_args)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    for model, m in res["models"].items():
        print(f"learning-dynamics grid ({model}): {m['figures']['learning_dynamics']}")
        print(f"convergence curves ({model}):    {m['figures']['convergence']}")
    print(f"network comparison figures:      {cmp['run_dir']}")
    print(f"numbers: {res['run_dir']}/results.json, {cmp['run_dir']}/results.json")
    print(f"open the logs with:  {tensorboard_command(Path(res['run_dir']) / 'tensorboard')}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svcca-torch", description="SVCCA, PWCCA and CKA for PyTorch: compare layers, "
                                "render learning dynamics, run the demo.")
    sub = p.add_subparsers(dest="command", metavar="{compare,report,demo}")
    sub.required = True

    c = sub.add_parser("compare", help="similarity of two saved activation arrays",
                       description="Print the similarity of two saved activation arrays of the same inputs.")
    c.add_argument("a", help="activations of layer A: .npy, .npz[:NAME], .pt, .csv")
    c.add_argument("b", help="activations of layer B, same datapoints in the same order")
    c.add_argument("--method", choices=method_names() + ("all",), default="svcca", help="similarity measure (default svcca)")
    c.add_argument("--keep", type=_parse_keep, default=0.99,
                   help="SVCCA truncation: float in (0, 1] = fraction kept, int = number of directions (default 0.99)")
    c.add_argument("--keep-rule", choices=("singular_values", "variance"), default="singular_values",
                   help="what --keep measures as a float (default: cumulative singular values, google/svcca's rule)")
    c.add_argument("--layout", choices=LAYOUTS, default="datapoints-first",
                   help="datapoints-first: (datapoints, neurons) [default]; neurons-first: (neurons, datapoints), transposed")
    c.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="compute precision")
    c.add_argument("--debiased", action="store_true", help="debiased linear CKA")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_compare)

    r = sub.add_parser("report", help="summary, matrices and figures of a run's stores",
                       description="Print the similarity to the final state of every SVCCA store under RUN_DIR "
                       "(written by SVCCACallback, DynamicsTracker or an experiment), write matrices.json, and "
                       "name the run's figures. Figures the run drew that show the store as it is are kept as "
                       "they are; missing or older ones are drawn as the run draws them (with --out, in DIR).")
    r.add_argument("run_dir", help="a run folder, or a store folder (holding index.json)")
    r.add_argument("--out", default=None, help="write matrices.json and newly drawn figures here instead of next "
                   "to each store (the run's figures are left as they are)")
    r.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="moments of training in the printed table (default 0 0.35 0.75 1) and, given, the "
                   "panels of a newly drawn grid (default: the run's own choice, where the curves change)")
    r.add_argument("--all-matrices", action="store_true",
                   help="compute the layers x layers matrix of every capture for matrices.json (slower); by "
                   "default only the captures shown in the grid get one, every capture its to-final diagonal")
    r.add_argument("--device", default=None, help="where the analysis runs, e.g. cuda (default cpu)")
    r.set_defaults(func=_report)

    d = sub.add_parser("demo", help="learning dynamics + freeze training + two-network comparison on digits",
                       description="Train on scikit-learn's handwritten digits with SVCCACallback and adaptive freeze "
                       "training, then compare two networks from different seeds by every method.")
    d.add_argument("--out", default="runs", help="parent folder of the run folders (default runs)")
    d.add_argument("--models", nargs="+", choices=("convnet", "resnet"), default=["convnet"],
                   help="networks of the learning-dynamics part (default convnet)")
    d.add_argument("--epochs", type=int, default=20, help="epochs of the learning-dynamics run")
    d.add_argument("--compare-epochs", type=int, default=10, help="epochs of each network compared")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small nets)")
    d.add_argument("--smoke", action="store_true", help="tiny budget (seconds): check that everything runs")
    d.set_defaults(func=_demo)
    return p


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``svcca-torch`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))

    def showwarning(message, category, filename, lineno, file=None, line=None):  # one line per warning
        print(f"svcca-torch: warning: {_one_line(message if isinstance(message, Warning) else Warning(message))}",
              file=sys.stderr)

    saved, warnings.showwarning = warnings.showwarning, showwarning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("svcca-torch: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        known = isinstance(err, (CLIError, ValueError, TypeError, OSError)) or type(err).__name__ == "ExperimentError"
        if not known or os.environ.get("SVCCA_TORCH_TRACEBACK"):
            raise
        print(f"svcca-torch: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = saved


if __name__ == "__main__":
    sys.exit(main())
