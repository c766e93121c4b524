"""Learning dynamics of a small language model, character- or word-level (Saphra & Lopez
2019 did this with SVCCA on LSTM language models): which layers settle first?

The text is what every Python installation carries offline: the docstrings of the standard
library's top-level modules (``sysconfig.get_paths()["stdlib"]/*.py``, read with ``ast``, in
file order; every 10th docstring held out): about 0.9 M characters (96 distinct), or with
``--level word`` about 0.2 M words (lower-cased; 3,360 distinct, those seen fewer than 3
times as ``<unk>``). The model (``--model lstm``: embedding 64, three ``nn.LSTM`` layers of
128 units, a linear decoder; ``--model transformer``: embedding 96 + learned positions, four
causal pre-norm ``nn.TransformerEncoderLayer`` blocks, 4 heads, a LayerNorm + linear decoder)
is trained on random windows of ``--context`` tokens to predict each next token (Adam,
learning rate cosine-annealed to 0, gradients clipped at 1), with a
:class:`~svcca_torch.tracker.DynamicsTracker` recording its layers on a fixed probe of
held-out windows (captures at the tracker's front-loaded points, 1% to 90% of training, and
every 5%).

**Datapoints.** A layer's output is ``(windows, tokens, units)``. Each layer here is a
``Stage`` whose parameter-free ``last`` module returns the representation of the window's
last token ``(N, units)``, and those are the recorded layers (``layers=["embed.last",
"lstm1.last", ...]``): one datapoint per probe window, each a token seen with ``context - 1``
tokens before it, as a language model reads running text. (The embedding's datapoints are
the embedding vectors of the windows' last tokens: at most one distinct row per entry of the
vocabulary, so with 96 characters its similarity is high for any embedding; the chance level
below shows by how much.) ``--readout tokens`` records the
stages' own ``(N, L, D)`` outputs instead and lets the recorder take tokens as datapoints
(``max_tokens`` evenly spaced positions per window), where the recorder supports it.

**What it shows**, as ``learning_dynamics`` does for CNNs: the tracker's heatmaps
(``<model>/learning_dynamics.png``: layers x layers similarity of each checkpoint with the
final state) and to-final curves (``<model>/convergence.png``); ``<model>/lm_dynamics.png``
puts the to-final curves beside the held-out loss (bits per token) and marks each
layer's *chance level*: its SVCCA similarity, on the same probe, between the final model
and an independently initialised one (what the similarity reads for weights that learned
nothing in common). ``results.json`` gives per layer the fraction of training after which
its similarity to its final state stays >= ``--threshold`` and whether lower layers got
there first (Spearman's rho with a permutation p-value).

    python -m svcca_torch.experiments.language_dynamics                     # the LSTM (~10 min on 1 thread)
    python -m svcca_torch.experiments.language_dynamics --level word                        # words (~10 min)
    python -m svcca_torch.experiments.language_dynamics --model transformer
    python -m svcca_torch.experiments.language_dynamics --quick             # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import math
import os
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: import it as part of the package `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import experiments  # noqa: F401  (PEP 366: relative imports below then resolve)

    __package__ = "experiments"

import torch
from torch import nn

from .common import (
    DefaultsHelpFormatter,
    ExperimentError,
    doc_examples,
    make_run_dir,
    module_prog,
    script_main,
    write_json,
)
from .learning_dynamics import convergence

MODELS = ("lstm", "transformer")
READOUTS = ("last", "tokens")
FREEZE_CHOICES = ("none", "adaptive")


# ----------------------------------------------------------------------------- text
def stdlib_docstrings(max_chars: Optional[int] = None) -> List[str]:
    """The docstrings (module, class, function) of the standard library's top-level modules,
    in file-name order, until ``max_chars`` characters; else the ``*.txt`` files under
    ``sys.prefix`` and the standard library (``LICENSE.txt``), one per paragraph."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: List[str] = []
    total = 0
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
                    total += len(doc) + 2
        if max_chars is not None and total >= max_chars:
            break
    if not docs:
        for base in dict.fromkeys([Path(sys.prefix), lib]):
            for path in sorted(base.glob("*.txt")):
                try:
                    docs += [p for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
                except OSError:
                    continue
    return docs


def clean(text: str) -> str:
    """Printable ASCII and newlines (tabs as 4 spaces, anything else as ``?``)."""
    text = text.replace("\t", "    ")
    return "".join(c if (" " <= c <= "~" or c == "\n") else "?" for c in text)


#: a word-level token: a run of letters, a run of digits, or one other non-space character
WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
LEVELS = ("char", "word")


class Corpus:
    """Training and held-out text (every ``held_out``-th docstring held out) as id tensors
    over one vocabulary: characters (``level="char"``: printable ASCII and newlines) or
    words (``"word"``: lower-cased runs of letters or digits and single punctuation marks,
    an end-of-docstring token between docstrings, words seen fewer than ``min_count`` times
    in the training text as ``<unk>``)."""

    def __init__(self, max_chars: Optional[int] = None, held_out: int = 10, level: str = "char",
                 min_count: int = 3) -> None:
        docs = [clean(d) for d in stdlib_docstrings(max_chars)]
        if len(docs) < 2:
            raise ExperimentError(
                f"found no text under {sysconfig.get_paths()['stdlib']} (a Python without its standard library's "
                "sources?): this experiment trains on the standard library's docstrings")
        self.level = level
        train_docs = [d for i, d in enumerate(docs) if i % held_out != held_out - 1]
        test_docs = [d for i, d in enumerate(docs) if i % held_out == held_out - 1]
        if level == "char":
            train, test = "\n\n".join(train_docs), "\n\n".join(test_docs)
            if max_chars is not None:
                train, test = train[:max_chars], test[: max(max_chars // held_out, 1)]
            self.tokens = sorted(set(train) | set(test))
            lookup = torch.zeros(128, dtype=torch.long)
            lookup[torch.tensor([ord(c) for c in self.tokens])] = torch.arange(len(self.tokens))
            encode = lambda s: lookup[torch.tensor(list(s.encode("ascii")), dtype=torch.long)]  # noqa: E731
            self.train, self.test = encode(train), encode(test)
        else:
            split = lambda ds: [t for d in ds for t in [*WORD.findall(d.lower()), "<eod>"]]  # noqa: E731
            train_words, test_words = split(train_docs), split(test_docs)
            counts = collections.Counter(train_words)
            self.tokens = ["<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)
            index = {w: i for i, w in enumerate(self.tokens)}
            encode = lambda ws: torch.tensor([index.get(w, 0) for w in ws], dtype=torch.long)  # noqa: E731
            self.train, self.test = encode(train_words), encode(test_words)
        self.n_docs = len(docs)

    @property
    def unit(self) -> str:
        return "character" if self.level == "char" else "word"

    @property
    def vocab(self) -> int:
        return len(self.tokens)

    def windows(self, ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
        """``n`` windows ``(n, length)`` at evenly spaced offsets of ``ids`` (fixed: the probe)."""
        if len(ids) <= length:
            raise ExperimentError(f"the held-out text ({len(ids)} characters) is shorter than --context {length}")
        starts = torch.linspace(0, len(ids) - length - 1, n).long()
        return torch.stack([ids[s:s + length] for s in starts.tolist()])

    def batch(self, batch_size: int, length: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: inputs ``(B, length)`` and next characters ``(B, length)``."""
        starts = torch.randint(0, len(self.train) - length - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(length + 1)
        chunk = self.train[idx]
        return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- models
class LastToken(nn.Module):
    """``(N, L, D) -> (N, D)``: the last position, one datapoint per probe window (the
    module the tracker records; no parameters)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1]


class Stage(nn.Module):
    """One layer of the language model and its recorded ``last`` token; passes the whole
    sequence on (an ``nn.LSTM``'s ``(output, state)`` as its output)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.last = LastToken()

    def forward(self, h: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.layer(h, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        self.last(out)
        return out


class Embed(nn.Module):
    """Token embedding, plus learned positions when ``context`` is given."""

    def __init__(self, vocab: int, width: int, context: Optional[int] = None) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width) if context else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return h


class CharLSTM(nn.Module):
    """Embedding, ``layers`` single-layer ``nn.LSTM`` stages (batch first), linear decoder."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.embed = Stage(Embed(vocab, embed))
        self.rnns = [f"lstm{i + 1}" for i in range(layers)]
        for i, name in enumerate(self.rnns):
            self.add_module(name, Stage(nn.LSTM(embed if i == 0 else hidden, hidden, batch_first=True)))
        self.decoder = Stage(nn.Linear(hidden, vocab))
        self.stages = ["embed", *self.rnns, "decoder"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for name in self.rnns:
            h = getattr(self, name)(h)
        return self.decoder(h)


class CharTransformer(nn.Module):
    """Embedding + learned positions, ``layers`` causal pre-norm transformer blocks, LayerNorm
    + linear decoder."""

    def __init__(self, vocab: int, context: int, width: int = 96, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = Stage(Embed(vocab, width, context))
        self.blocks = [f"block{i + 1}" for i in range(layers)]
        for name in self.blocks:
            self.add_module(name, Stage(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                                   batch_first=True, norm_first=True)))
        self.decoder = Stage(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab)))
        self.stages = ["embed", *self.blocks, "decoder"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        h = self.embed(ids)
        for name in self.blocks:
            h = getattr(self, name)(h, src_mask=mask, is_causal=True)
        return self.decoder(h)


def build(model: str, vocab: int, args: argparse.Namespace) -> nn.Module:
    if model == "lstm":
        return CharLSTM(vocab, embed=args.embed, hidden=args.width, layers=args.layers)
    return CharTransformer(vocab, args.context, width=args.width, layers=args.layers)


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=module_prog(__file__), usage="%(prog)s [options]",
                                description=__doc__.split("\n\n")[0], epilog=doc_examples(__doc__),
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", choices=MODELS, default=["lstm"], help="language models to train")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000; 40 with --quick)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per training step")
    p.add_argument("--level", choices=LEVELS, default="char",
                   help="characters or words (lower-cased, words seen < 3 times as <unk>)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per training and probe window (default 64 characters, 32 words)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-3 LSTM, 1e-3 transformer)")
    p.add_argument("--width", type=int, default=None,
                   help="LSTM units / transformer width (default 128 / 96; 32 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="LSTM layers / transformer blocks (default 3 / 4; 2 with --quick)")
    p.add_argument("--embed", type=int, default=64, help="LSTM embedding width")
    p.add_argument("--probe-size", type=int, default=None,
                   help="held-out windows recorded (default 2048, about 16 datapoints per unit; 192 with --quick)")
    p.add_argument("--readout", choices=READOUTS, default="last",
                   help="datapoints: 'last', each probe window's last token (the Stage.last modules, any recorder); "
                        "'tokens', the layers' (N, L, D) outputs as tokens (the recorder's own token rows, "
                        "max_tokens per window; needs a recorder that reads (N, L, D) as tokens)")
    p.add_argument("--captures", type=int, default=20,
                   help="evenly spaced captures, on top of the tracker's front-loaded ones (1%% to 90%% of training)")
    p.add_argument("--threshold", type=float, default=0.95, help="similarity to the final state counted as converged")
    p.add_argument("--freeze", choices=FREEZE_CHOICES, default="none",
                   help="adaptive freeze training (one group per stage; window: a tenth of training)")
    p.add_argument("--max-chars", type=int, default=None,
                   help="characters of text read (default all, about 0.9 M; 60,000 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs", help="parent folder of the run folders")
    p.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                   help="tiny budget (seconds): a check that everything runs")
    return p


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    args.steps = args.steps if args.steps is not None else (40 if q else 2000)
    args.context = args.context if args.context is not None else (64 if args.level == "char" else 32)
    args.probe_size = args.probe_size if args.probe_size is not None else (192 if q else 2048)
    args.max_chars = args.max_chars if args.max_chars is not None else (60_000 if q else None)
    if q:
        args.captures = min(args.captures, 4)
    for name in ("steps", "batch_size", "context", "probe_size", "captures", "embed"):
        if getattr(args, name) < 1:
            raise ExperimentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.threshold <= 1:
        raise ExperimentError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.readout == "tokens" and not tokens_supported():
        raise ExperimentError(
            "--readout tokens needs an ActivationRecorder that reads (N, L, D) outputs as L tokens of D neurons; this "
            "svcca_torch flattens them to L x D neurons. Use --readout last (the default).")
    args.dataset, args.smoke = f"stdlib-docstrings-{args.level}", q  # for the run folder's name
    return args


def tokens_supported() -> bool:
    """Whether this svcca_torch's recorder reads ``(N, L, D)`` outputs as tokens (its
    ``LAYOUTS`` name ``"NLD"``)."""
    from svcca_torch import recorder

    return "NLD" in getattr(recorder, "LAYOUTS", ())


def model_settings(model: str, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the model's defaults filled (width, layers, learning rate)."""
    a = argparse.Namespace(**vars(args))
    if a.width is None:
        a.width = 32 if a.quick else (128 if model == "lstm" else 96)
    if a.layers is None:
        a.layers = 2 if a.quick else (3 if model == "lstm" else 4)
    if a.lr is None:
        a.lr = 2e-3 if model == "lstm" else 1e-3
    return a


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def bits_per_token(model: nn.Module, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over every position of ``windows``, in bits."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows.split(batch_size):
        logits = model(w[:, :-1])
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                   reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was)
    return total / count / math.log(2)


def chance_levels(model_name: str, args: argparse.Namespace, vocab: int, layers: Sequence[str], probe: torch.Tensor,
                  final: nn.Module, seed: int) -> Dict[str, float]:
    """Per layer, SVCCA similarity on ``probe`` between ``final`` and an independently
    initialised copy (seed ``seed``): what the similarity reads for weights that learned
    nothing in common."""
    from svcca_torch.dynamics import paired_similarity
    from svcca_torch.recorder import ActivationRecorder

    torch.manual_seed(seed)
    fresh = build(model_name, vocab, args)
    kw = {"layouts": {n: "NLD" for n in layers}} if args.readout == "tokens" else {}  # batch first, always
    a = ActivationRecorder(final, list(layers), **kw).record(probe)
    b = ActivationRecorder(fresh, list(layers), **kw).record(probe)
    return paired_similarity(b, a)


def run_model(model_name: str, args: argparse.Namespace, corpus: Corpus, run_dir: Path,
              log: Callable[[str], None]) -> Dict[str, Any]:
    from svcca_torch.tracker import DynamicsTracker

    a = model_settings(model_name, args)
    torch.manual_seed(a.seed)
    model = build(model_name, corpus.vocab, a)
    layers = [f"{s}.{'last' if a.readout == 'last' else 'layer'}" for s in model.stages]
    probe = corpus.windows(corpus.test, a.probe_size, a.context)
    val = corpus.windows(corpus.test, min(128, a.probe_size), a.context + 1)  # the held-out loss's windows
    every = max(1, a.steps // a.captures)
    freeze = a.freeze != "none"
    # token outputs (N, L, D): no probe batch may hold L windows, or batch first and sequence first look alike
    batch = next(b for b in range(256, 1, -1) if a.readout == "last" or (b != a.context and len(probe) % b != a.context))
    tracker = DynamicsTracker(
        model, probe, layers, run_dir=run_dir / model_name, max_overhead=None, total_steps=a.steps, batch_size=batch,
        freeze="adaptive" if freeze else False,
        freeze_groups={s: [s] for s in model.stages} if freeze else None,
        freeze_window=max(1, a.steps // 10) if freeze else None)
    init = {st: [q.detach().clone() for q in getattr(model, st).parameters()] for st in model.stages}
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.steps)
    g = torch.Generator().manual_seed(a.seed)
    params = sum(p.numel() for p in model.parameters())
    log(f"[{model_name}] {params:,} parameters, {a.steps} steps of {a.batch_size} x {a.context} {corpus.unit}s "
        f"({a.steps * a.batch_size * a.context / len(corpus.train):.1f} passes over {len(corpus.train):,}), probe "
        f"{len(probe)} held-out windows, layers {', '.join(layers)}")
    loss_curve: List[Dict[str, float]] = []

    def note_loss(step: int) -> None:
        loss_curve.append({"step": step, "fraction": step / a.steps, "bits_per_token": bits_per_token(model, val)})

    t0 = time.perf_counter()
    train_s = 0.0
    tracker.start()
    note_loss(0)
    model.train()
    for step in range(1, a.steps + 1):
        t1 = time.perf_counter()
        x, y = corpus.batch(a.batch_size, a.context, g)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t1
        events = tracker.maybe_capture(step, request=True if step % every == 0 else None)
        if events.capture is not None:
            note_loss(step)
        if events.freeze is not None:
            log(f"[{model_name}] step {step}: froze {', '.join(events.freeze['groups'])}")
    tracker.finish(a.steps)
    if not loss_curve or loss_curve[-1]["step"] != a.steps:
        note_loss(a.steps)
    wall = time.perf_counter() - t0
    model.eval()
    moved = weight_change(model, init)
    chance = chance_levels(model_name, a, corpus.vocab, layers, probe, model, a.seed + 1000)
    summary = json.loads((run_dir / model_name / "svcca_summary.json").read_text())
    conv = convergence(summary, a.threshold)
    figure = plot_lm_dynamics(summary, loss_curve, chance, conv, run_dir / model_name / "lm_dynamics.png",
                              title=f"{corpus.level}-level {model_name}: {params:,} parameters, {a.steps} steps",
                              unit=corpus.unit)
    out = {
        "model": model_name, "parameters": params, "settings": {k: getattr(a, k) for k in (
            "steps", "batch_size", "context", "lr", "width", "layers", "embed", "probe_size", "readout")},
        "wall_seconds": wall, "training_seconds": train_s, "steps": a.steps, "layers": summary["layers"],
        "captures": len(summary["captured_steps"]), "captured_steps": summary["captured_steps"],
        "level": corpus.level, "held_out_loss": loss_curve, "final_bits_per_token": loss_curve[-1]["bits_per_token"],
        "chance_level": chance, "weight_change": moved, **conv,
        "to_final_at": _to_final_at(summary, (0.01, 0.05, 0.1, 0.25, 0.5)),
        "freeze": {"policy": a.freeze, "events": summary["freeze"]["events"]},
        "figures": {"lm_dynamics": str(figure), "learning_dynamics": str(run_dir / model_name / "learning_dynamics.png"),
                    "convergence": str(run_dir / model_name / "convergence.png")},
        "svcca_summary": str(run_dir / model_name / "svcca_summary.json"),
    }
    log(f"[{model_name}] held-out {loss_curve[0]['bits_per_token']:.2f} -> {out['final_bits_per_token']:.2f} bits per "
        f"{corpus.unit} in {wall:.0f} s ({train_s:.0f} s training); layers reach {a.threshold} similarity to their final "
        "state at (fraction of training; chance level: final vs an independently initialised model):")
    for name, f in conv["convergence_fraction"].items():
        log(f"    {name:<16} {'-' if f is None else f'{f:.3f}':>6}   chance {chance.get(name, float('nan')):.3f}   "
            f"weights moved {moved[name.rsplit('.', 1)[0]]:.2f} of their initial norm")
    log(f"[{model_name}] {conv['statement']}")
    log(f"[{model_name}] without the output layer: {conv['hidden_layers']['statement']}")
    return out


def weight_change(model: nn.Module, init: Dict[str, List[torch.Tensor]]) -> Dict[str, float]:
    """Per stage, how far its parameters moved from initialisation: ``||w_T - w_0|| / ||w_0||``."""
    out: Dict[str, float] = {}
    for stage, before in init.items():
        now = list(getattr(model, stage).parameters())
        diff = sum(float((a.detach() - b).pow(2).sum()) for a, b in zip(now, before))
        norm = sum(float(b.pow(2).sum()) for b in before)
        out[stage] = math.sqrt(diff / norm) if norm > 0 else float("nan")
    return out


def _to_final_at(summary: Dict[str, Any], fractions: Sequence[float]) -> Dict[str, Dict[str, Optional[float]]]:
    """Each layer's similarity to its final state at the capture nearest each fraction."""
    fr = summary["fractions"]
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for f in fractions:
        i = min(range(len(fr)), key=lambda j: abs(fr[j] - f))
        out[f"{fr[i]:.3f}"] = {n: summary["to_final"][i][k] for k, n in enumerate(summary["layers"])}
    return out


def plot_lm_dynamics(summary: Dict[str, Any], loss_curve: List[Dict[str, float]], chance: Dict[str, float],
                     conv: Dict[str, Any], path: Path, title: str = "", unit: str = "character") -> Path:
    """Two panels: each layer's SVCCA similarity to its final state over training (solid; its
    chance level dashed, its convergence point marked), and the held-out bits per character."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, fr = summary["layers"], summary["fractions"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    x = list(fr)
    positive = [f for f in fr if f > 0] + [e["fraction"] for e in loss_curve if e["fraction"] > 0]
    linthresh = min(positive) if positive else 0.01  # symlog: step 0 at 0, the rest on a log scale
    for k, (name, c) in enumerate(zip(layers, colors)):
        y = [row[k] for row in summary["to_final"]]
        ax.plot(x, y, "o-", color=c, ms=3, lw=1.5, label=name.rsplit(".", 1)[0])
        if name in chance:
            ax.axhline(chance[name], color=c, ls="--", lw=0.8)
        f = conv["convergence_fraction"].get(name)
        if f is not None:
            ax.plot([f], [conv["threshold"]], "v", color=c, ms=8)
    ax.axhline(conv["threshold"], color="0.5", lw=0.6, ls=":")
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=0)
    ax.set_xlabel("fraction of training (log scale past the first capture)")
    ax.set_ylabel("SVCCA similarity to the final state")
    ax.set_title("layers vs their final state (dashed: chance level; v: converged)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    bx.plot([e["fraction"] for e in loss_curve], [e["bits_per_token"] for e in loss_curve], "o-", ms=3, color="k")
    bx.set_xscale("symlog", linthresh=linthresh)
    bx.set_xlim(left=0)
    bx.set_xlabel("fraction of training (log scale past the first capture)")
    bx.set_ylabel(f"held-out bits per {unit}")
    bx.set_title("held-out loss", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize(args)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.quick:
        from svcca_torch.utils.validation import FewDatapointsWarning

        warnings.filterwarnings("ignore", category=FewDatapointsWarning)
    t0 = time.perf_counter()
    corpus = Corpus(args.max_chars, level=args.level)
    log(f"text: {corpus.n_docs:,} standard-library docstrings, {len(corpus.train):,} training and "
        f"{len(corpus.test):,} held-out {corpus.unit}s, {corpus.vocab} distinct ({time.perf_counter() - t0:.1f} s to read)")
    models = list(dict.fromkeys(args.model))
    run_dir = make_run_dir(args, "language_dynamics", "-".join(models))
    results: Dict[str, Any] = {"experiment": "language_dynamics", "dataset": args.dataset, "seed": args.seed,
                               "quick": args.quick, "run_dir": str(run_dir),
                               "text": {"level": corpus.level, "docstrings": corpus.n_docs,
                                        "train_tokens": len(corpus.train), "held_out_tokens": len(corpus.test),
                                        "vocab": corpus.vocab},
                               "models": {}}
    for m in models:
        results["models"][m] = run_model(m, args, corpus, run_dir, log)
    write_json(run_dir / "results.json", results)
    log(f"results: {run_dir / 'results.json'}")
    for m in models:
        log(f"figures ({m}): {results['models'][m]['figures']['lm_dynamics']}, "
            f"{results['models'][m]['figures']['learning_dynamics']}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
