"""The frozen prefix's output, kept and served instead of running the prefix (issues 10, 19, 20).

Once the lowest layer groups are frozen (``requires_grad=False``, normalisation in eval
mode), the frozen prefix maps each input to a fixed output. :class:`FrozenPrefix` keeps the
output of the prefix's last module to run (the *boundary*) per input and skips the prefix
for a forward whose every input was kept. Inputs come from two sources, keyed alike and kept
in one kind of store (:class:`~.rows.KeptRows`, each with its byte cap):

- **the probe** (always on): the freeze signal's recordings (:meth:`FrozenPrefix.probe_recording`),
  so that after a freeze a recording runs only the modules above the prefix;
- **training inputs** (opt-in, ``cache_bytes``: the tracker's ``frozen_cache=True``): a
  training batch seen before (no random augmentation) skips the frozen forward, as Egeria does.

**Keys.** Each sample of the first frozen module's input gets two 64-bit multilinear hashes
of its bit pattern (:func:`~.contract.bits_hash`, on the input's device) with everything else
that decides the prefix's output: the sample's shape, dtype and device, the forward's context
(:func:`~.contract.forward_context`: autocast, grad/inference mode, TF32 and matmul precision
flags) and the train/eval flag of every module up to the boundary. A probe sample's key also
has its index in the probe, which stands for the probe's other inputs (a mask); a training
forward must have one tensor argument and no frozen module after the first may take another
tensor (else the training cache is off). Two different inputs share a key with probability
<= 2^-66.

**Serving.** The frozen modules' ``forward`` is replaced (instance attribute; while the
training cache may serve, else for a recording's duration) by one stub that decides per
forward, at the first frozen module: every sample kept at the boundary -> the boundary returns
the kept rows and the frozen modules before it return zeros shaped like their output (never
their input: the next module may work in place); every sample kept at an older boundary (more
groups froze since) -> serve from there, run the newly frozen modules and keep the new
boundary's output; otherwise the real forward, keeping the boundary's output of the new
samples. A kept output stays valid as more groups freeze.

**Checks** (one set for both sources; a failure turns the source off, the run then computes
exactly what it computes without it):

- once per frozen prefix, on the first :attr:`FrozenPrefix.CHECK_IMAGES` probe inputs in eval
  mode: each frozen module is called once, no module that runs inside the prefix, or around
  it with parameters of its own, is trainable, and every output after the boundary (each
  module's, the model's) is the same with the boundary serving (a skip past it is not):
  every source off;
- the first forward each kept level could serve runs for real and its boundary output must
  equal the kept rows;
- a forward in which the prefix runs must draw no random numbers
  (:class:`~.contract.RandomStreams`: dropout, stochastic depth, a module that draws numbers it
  does not use; skipping it would shift what the layers above draw);
- the prefix's state (:class:`~.contract.StateWatch`: each parameter and buffer the same object,
  storage and version, plain attributes and hooks unchanged) before each training forward and
  each recording, and its weights' bits at each recording, freeze and training window's end:
  a change turns the training cache off and the probe's rows are kept again.

**Turning off** besides the checks: more than its byte cap kept -> a source is suspended until
the next freeze; a training window (:meth:`FrozenPrefix.note_step`) that began with rows kept
and served less than a quarter of its training samples (random augmentation) -> the training
cache is off, its memory freed. Every reason is in :meth:`FrozenPrefix.stats`.

**Not seen.** Random numbers from a private ``torch.Generator``; state the forward reads from
outside its modules (globals, objects shared by reference and changed in place); a frozen
weight changed in place through ``.data`` (no version counter counts it) is seen at the next
bit comparison, not before. Forward hooks on modules inside the frozen ones do not run for a
served forward (those on the frozen modules do). Kept rows live in host memory (a GPU's is not
held), one per sample, whatever tensor the boundary returns (a nested one is not kept).
"""
from .contract import (RandomStreams, StateWatch, bits_hash, forward_context, outermost, same, streams_kept,
                       tensor_hash)
from .core import FrozenPrefix, FrozenPrefixStats
from .rows import SourceStats

__all__ = ["FrozenPrefix", "FrozenPrefixStats", "SourceStats", "outermost", "bits_hash", "tensor_hash",
           "forward_context", "StateWatch", "RandomStreams", "streams_kept", "same"]
