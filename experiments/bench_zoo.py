"""DynamicsTracker at its defaults on models nobody here wrote (issue 21): what it chooses,
what it costs and what it freezes, per model, in a plain training loop.

Each model is trained from its seed on tiny inputs for ``--epochs`` epochs of
``--train`` examples (batch ``--batch-size``) in the loop the README shows, with
``DynamicsTracker(model, probe, run_dir=..., freeze="adaptive", freeze_window=len(loader))``
and nothing else set (default layers, groups, threshold, patience, capture budget), one torch
thread:

* images: scikit-learn's digits upsampled to 32x32 with 3 channels (torchvision's
  ``resnet18``, ``mobilenet_v3_small``, ``shufflenet_v2_x0_5``,
  ``googlenet(aux_logits=True, init_weights=True)`` trained on its logits plus 0.3 x each
  auxiliary head's loss, as torchvision's recipe does, and a tiny ``VisionTransformer``:
  image 32, patch 8, 2 layers, 2 heads, width 32, MLP 64), SGD lr 0.05 momentum 0.9 for the
  CNNs, AdamW lr 1e-3 for the ViT;
* token ids (vocabulary 64, 16 tokens, 10 classes; each class draws half of its tokens from
  a band of the vocabulary of its own, so the label is learnable): an ``nn.TransformerEncoder``
  classifier (2 layers, width 32, learned positions), an LSTM classifier (``nn.LSTM``, 64
  units, the last step's output) and a two-input model ``forward(ids, mask)`` (a
  transformer layer with ``src_key_padding_mask=mask``, sequences of 8 to 16 real tokens,
  the probe a tuple ``(ids, mask)``), AdamW lr 1e-3.

Per model it prints the layers and freeze groups chosen, the median training step, the
captures' cost against it, the tracker's own time (``setup``, ``start``, every
``maybe_capture``, ``finish``; each call timed around the call, also split by kind) against
the training steps' time, what froze and
when, and the warnings the tracker gave; or the error and the phase it came from (setup,
start, training, finish), so that one model's failure does not stop the table. Writes
``zoo.json`` and ``zoo.md`` (the table) to ``--out``.

    python -m svcca_torch.experiments.bench_zoo                        # every model (a few minutes)
    python -m svcca_torch.experiments.bench_zoo --models lstm two_input --epochs 2 --train 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: import it as part of the package `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import experiments  # noqa: F401  (PEP 366: relative imports below then resolve)

    __package__ = "experiments"

import torch
from torch import nn

from .common import DefaultsHelpFormatter, doc_examples, module_prog, write_json

VOCAB, SEQ_LEN, CLASSES = 64, 16, 10


# ----------------------------------------------------------------------------- text models
class TextTransformer(nn.Module):
    """Token ids ``(N, L)`` -> logits: embedding + learned positions, an
    ``nn.TransformerEncoder`` of 2 layers (width 32, 2 heads, batch first), mean over tokens."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, layers: int = 2, classes: int = CLASSES,
                 max_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.encoder(h).mean(1))


class TextLSTM(nn.Module):
    """Token ids ``(N, L)`` -> logits: embedding, one ``nn.LSTM`` layer (batch first), a linear
    layer on the last step's output."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, hidden: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.fc(out[:, -1])


class TwoInput(nn.Module):
    """``forward(ids, mask)``: ``mask`` ``(N, L)`` bool, True at padding (PyTorch's
    ``key_padding_mask``); a transformer layer, the mean over real tokens, a linear head."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, classes: int = CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.block = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(ids), src_key_padding_mask=mask)
        real = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * real).sum(1) / real.sum(1).clamp(min=1))


# ----------------------------------------------------------------------------- the zoo
def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kw)
    return build


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=CLASSES)


#: name -> (builder, inputs: "image" | "text" | "pair", optimiser: "sgd" | "adamw")
ZOO: Dict[str, Tuple[Callable[[], nn.Module], str, str]] = {
    "resnet18": (_tv("resnet18"), "image", "sgd"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), "image", "sgd"),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), "image", "sgd"),
    "googlenet": (_tv("googlenet", aux_logits=True, init_weights=True), "image", "sgd"),
    "vit_tiny": (_vit, "image", "adamw"),
    "transformer_encoder": (TextTransformer, "text", "adamw"),
    "lstm": (TextLSTM, "text", "adamw"),
    "two_input": (TwoInput, "pair", "adamw"),
}


# ----------------------------------------------------------------------------- data
def _images(n_train: int, n_probe: int) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Digits at 32x32x3: ``n_train`` training examples (x, y) and a probe of ``n_probe``
    training images (:func:`svcca_torch.data.probe_set`)."""
    from svcca_torch.data import load_digits_dataset, probe_set

    train, _ = load_digits_dataset(size=32)
    x, y = train.tensors
    x = x[:n_train].expand(-1, 3, -1, -1).contiguous()
    y = y[:n_train]
    return list(zip(x, y)), probe_set(torch.utils.data.TensorDataset(x, y), min(n_probe, len(x)), seed=0)


def _tokens(n: int, seed: int, lengths: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``SEQ_LEN`` token ids (1..VOCAB-1; 0 is padding), labels and a
    padding mask (True at padding; none without ``lengths``): each class draws half of its
    tokens from a band of 6 ids of its own, the rest uniformly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    uniform = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    band = 1 + 6 * y[:, None] + torch.randint(0, 6, (n, SEQ_LEN), generator=g)
    ids = torch.where(torch.rand(n, SEQ_LEN, generator=g) < 0.5, band, uniform)
    mask = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    if lengths:
        real = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
        mask = torch.arange(SEQ_LEN)[None, :] >= real[:, None]
        ids = ids.masked_fill(mask, 0)
    return ids, y, mask


def make_data(kind: str, n_train: int, n_probe: int, seed: int) -> Tuple[List[Tuple[Any, torch.Tensor]], Any]:
    """(training examples ``[(inputs, label)]``, probe) for ``kind``; ``inputs`` a tensor, or
    ``(ids, mask)`` for ``"pair"`` (the probe then a tuple ``(ids, mask)``)."""
    if kind == "image":
        return _images(n_train, n_probe)
    ids, y, mask = _tokens(n_train, seed, lengths=kind == "pair")
    pids, _, pmask = _tokens(n_probe, seed + 1, lengths=kind == "pair")
    if kind == "pair":
        return [((i, m), t) for i, m, t in zip(ids, mask, y)], (pids, pmask)
    return list(zip(ids, y)), pids


def batches(examples: List[Tuple[Any, torch.Tensor]], batch_size: int, generator: torch.Generator):
    """One shuffled epoch of ``(inputs, labels)`` batches (``inputs`` a tuple for pairs)."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        first = chunk[0][0]
        if isinstance(first, tuple):
            inputs: Any = tuple(torch.stack([c[0][k] for c in chunk]) for k in range(len(first)))
        else:
            inputs = torch.stack([c[0] for c in chunk])
        yield inputs, torch.stack([c[1] for c in chunk])


def loss_of(output: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits; a tuple output (GoogLeNet's logits and auxiliary heads in
    train mode) adds 0.3 x each auxiliary head's loss (torchvision's recipe)."""
    if isinstance(output, tuple):
        main, *aux = [o for o in output if isinstance(o, torch.Tensor)]
        return nn.functional.cross_entropy(main, y) + sum(0.3 * nn.functional.cross_entropy(a, y) for a in aux)
    return nn.functional.cross_entropy(output, y)


# ----------------------------------------------------------------------------- one model
def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_model(name: str, args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """Train ``name`` with the tracker at its defaults + ``freeze="adaptive"``; what it chose,
    cost and froze, or the error and the phase it came from."""
    from svcca_torch.tracker import DynamicsTracker

    build, kind, optimiser = ZOO[name]
    out: Dict[str, Any] = {"model": name, "inputs": kind, "status": "ok", "phase": None, "error": None}
    tracker: Optional[DynamicsTracker] = None
    phase = "build"
    caught: List[warnings.WarningMessage] = []
    step_times: List[float] = []
    captures: List[Tuple[int, float]] = []
    phases = {"setup": 0.0, "start": 0.0, "steps": 0.0, "finish": 0.0}  # the tracker's time per call kind
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(args.seed)
            model = build()
            out["parameters"] = sum(p.numel() for p in model.parameters())
            examples, probe = make_data(kind, args.train, args.probe, args.seed)
            n_batches = -(-len(examples) // args.batch_size)
            if optimiser == "sgd":
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            phase = "setup"
            tracker = DynamicsTracker(model, probe, run_dir=root / name, freeze="adaptive", freeze_window=n_batches)
            t0 = time.perf_counter()
            try:
                tracker.setup()
            finally:
                phases["setup"] += time.perf_counter() - t0
            assert tracker.recorder is not None
            out["layers"] = list(tracker.recorder.layers)
            out["groups"] = [{"name": g.name, "modules": list(g.module_names)} for g in tracker.groups]
            phase = "start"
            t0 = time.perf_counter()
            try:
                tracker.start()
            finally:
                phases["start"] += time.perf_counter() - t0
            phase = "training"
            g = torch.Generator().manual_seed(args.seed)
            step = 0
            model.train()
            for epoch in range(args.epochs):
                for x, y in batches(examples, args.batch_size, g):
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss = loss_of(model(*x) if isinstance(x, tuple) else model(x), y)
                    loss.backward()
                    opt.step()
                    step += 1
                    step_times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    try:
                        tracker.maybe_capture(step, epoch=epoch)
                    finally:
                        phases["steps"] += time.perf_counter() - t0
            out["final_loss"] = float(loss.detach())
            phase = "finish"
            t0 = time.perf_counter()
            try:
                tracker.finish(step)
            finally:
                phases["finish"] += time.perf_counter() - t0
            out["steps"] = step
        except Exception as err:  # noqa: BLE001  (reported per model: the table goes on)
            out.update(status="failed", phase=phase, error=_short(err))
            out["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
            if tracker is not None and tracker.recorder is not None and "layers" not in out:
                out["layers"] = list(tracker.recorder.layers)  # what setup chose before it failed
            if tracker is not None:
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001
                    pass
    if tracker is not None and tracker.capturer is not None:
        captures = list(tracker.capturer.timings)  # the tracker's own record of each capture's cost
    train_s = sum(step_times)
    warm = step_times[2:] or step_times
    out["step_s"] = statistics.median(warm) if warm else None
    out["training_s"] = train_s
    tracker_s = sum(phases.values())
    out["tracker_s"] = tracker_s
    out["tracker_phases_s"] = phases  # setup (layers, groups), start (first capture), maybe_capture calls, finish
    out["tracker_vs_training"] = tracker_s / train_s if train_s > 0 else None
    out["captures"] = [{"step": s, "seconds": t} for s, t in captures]
    if captures and out["step_s"]:
        out["capture_s"] = statistics.mean(t for _, t in captures)
        out["capture_vs_step"] = out["capture_s"] / out["step_s"]
    if tracker is not None:
        out["frozen"] = [{"step": int(e["step"]), "groups": list(e["groups"])} for e in tracker.freeze_log]
        out["signal"] = [dict(e) for e in tracker.signal_log]
        out["failures"] = [dict(f) for f in tracker.failures]
        out["reported_overhead"] = tracker.overhead
    texts = [" ".join(str(w.message).split()) for w in caught
             if w.category.__module__.startswith("svcca_torch") or "svcca_torch" in (w.filename or "")
             or Path(w.filename or "").resolve() == Path(__file__).resolve()]
    out["warnings"] = list(dict.fromkeys(texts))
    return out


# ----------------------------------------------------------------------------- report
def _frozen_text(r: Dict[str, Any]) -> str:
    events = r.get("frozen") or []
    if not events:
        return "nothing"
    return "; ".join(f"{', '.join(e['groups'])} @ {e['step']}" for e in events)


def table(results: List[Dict[str, Any]]) -> str:
    """The markdown table: one row per model."""
    head = ("| model | layers | groups | step (ms) | capture (s) / x step | tracker / training | froze (group @ step) "
            "| result |\n|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in results:
        step = f"{1000 * r['step_s']:.0f}" if r.get("step_s") else "-"
        cap = (f"{r['capture_s']:.2f} / {r['capture_vs_step']:.0f}x" if r.get("capture_vs_step") is not None else "-")
        own = f"{r['tracker_vs_training']:.2f}x" if r.get("tracker_vs_training") is not None else "-"
        err = r["error"] or ""
        res = "ok" if r["status"] == "ok" else f"**failed at {r['phase']}**: {err[:160]}{'...' if len(err) > 160 else ''}"
        res = res.replace("|", "\\|")
        rows.append(f"| {r['model']} | {len(r.get('layers') or []) or '-'} | {len(r.get('groups') or []) or '-'} "
                    f"| {step} | {cap} | {own} | {_frozen_text(r).replace('|', '/')} | {res} |")
    return "\n".join(rows)


def _names(names: List[str], limit: int = 12) -> str:
    """``names`` joined, the middle elided past ``limit`` (first 7, last 3)."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:7]) + f", ... ({len(names) - 10} more) ..., " + ", ".join(names[-3:])


def details(results: List[Dict[str, Any]]) -> str:
    """Per model: the layers and groups chosen, the signal, the warnings."""
    lines: List[str] = []
    for r in results:
        lines.append(f"- **{r['model']}** ({r.get('parameters', 0):,} parameters)")
        if r.get("layers"):
            lines.append(f"  - layers ({len(r['layers'])}): {_names(r['layers'])}")
        if r.get("groups"):
            multi = [g for g in r["groups"] if len(g["modules"]) > 1 or g["modules"] != [g["name"]]]
            lines.append(f"  - groups ({len(r['groups'])}): {_names([g['name'] for g in r['groups']])}"
                         + (f"; with more than their layer: " + "; ".join(
                             f"{g['name']} = {', '.join(g['modules'])}" for g in multi[:6])
                            + (" ..." if len(multi) > 6 else "") if multi else ""))
        if r.get("tracker_phases_s") and r.get("training_s"):
            ph = r["tracker_phases_s"]
            lines.append(f"  - tracker time (s): setup {ph['setup']:.2f}, start {ph['start']:.2f}, maybe_capture "
                         f"{ph['steps']:.2f}, finish {ph['finish']:.2f}; training steps {r['training_s']:.2f}")
        if r.get("captures"):
            lines.append("  - captures (step: s): " + ", ".join(f"{c['step']}: {c['seconds']:.2f}" for c in r["captures"]))
        if r.get("signal"):
            lines.append("  - signal: " + "; ".join(
                f"{e['step']}: " + ", ".join(f"{g} {v:.3f}" for g, v in e.items() if g != "step") for e in r["signal"]))
        if r["status"] != "ok":
            lines.append(f"  - failed at {r['phase']}: `{r['error']}`")
        for w in r.get("warnings", [])[:4]:
            lines.append(f"  - warning: {w[:300]}{'...' if len(w) > 300 else ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=module_prog(__file__), usage="%(prog)s [options]",
                                description=__doc__.split("\n\n")[0], epilog=doc_examples(__doc__),
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO), help="models to run (default: all)")
    p.add_argument("--train", type=int, default=256, help="training examples per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6, help="epochs (the freeze window is one epoch)")
    p.add_argument("--probe", type=int, default=256, help="probe inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench_zoo", help="folder for zoo.json and zoo.md")
    return p


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    results: List[Dict[str, Any]] = []
    steps = args.epochs * -(-args.train // args.batch_size)
    log(f"DynamicsTracker at its defaults + freeze='adaptive' (window: one epoch of {-(-args.train // args.batch_size)} "
        f"steps), {args.epochs} epochs of {args.train} examples ({steps} steps), batch {args.batch_size}, probe "
        f"{args.probe}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            r = run_model(name, args, Path(tmp))
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            status = "ok" if r["status"] == "ok" else f"FAILED at {r['phase']}: {r['error']}"
            log(f"  {name:<20} {r['wall_s']:6.1f} s  {status}")
    md = table(results)
    log("\n" + md + "\n\n" + details(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": "bench_zoo", "config": {k: v for k, v in vars(args).items()},
               "torch": torch.__version__, "models": results}
    write_json(out / "zoo.json", payload)
    (out / "zoo.md").write_text(md + "\n\n" + details(results) + "\n")
    log(f"\nwrote {out / 'zoo.json'} and {out / 'zoo.md'}")
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
