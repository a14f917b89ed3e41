"""Real English text for the flagship model, present on any CPython: no download.

The corpus is ``pydoc_data.topics``, the ~465 KB of reference prose (with
small code examples) that ``help("with")`` prints, shipped in every CPython
standard library: real, varied, mostly English text, large enough that a small
character model needs minutes to beat the unigram baseline and cannot simply
memorize it. It is rebuilt by a fixed rule (topics in sorted key order, joined
by a blank line, a few typographic characters folded to ASCII), so it is
identical wherever the Python patch release is the same; its text changes a
little between releases, hence ``corpus_fingerprint()`` for run records.

Characters map to a fixed vocabulary (newline + printable ASCII, everything
else one unknown id), so ``VOCAB_SIZE`` is a constant. The first 90% is the
train split, the last 10% the held-out split; no window crosses the cut.
``CharWindows`` is a ``MicrobatchSource``: micro-batch id k -> windows drawn
from a permutation of (seed, epoch), like ``pipetrain.data.ArraySource``.
"""
from __future__ import annotations

import functools
import hashlib
import math

import numpy as np

UNKNOWN_ID = 0
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = 1 + len(ALPHABET)  # 97: the unknown id, then ALPHABET
HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")

# Fold the few typographic characters of the docs so they are not all "unknown".
_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                       "\u2014": "-", "\u2013": "-", "\u2026": "...", "\t": "    ", "\r": ""})
_LOOKUP = np.full(128, UNKNOWN_ID, dtype=np.int32)
for _i, _ch in enumerate(ALPHABET):
    _LOOKUP[ord(_ch)] = _i + 1


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The whole text (loaded on first use, then cached per process)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distro builds strip it; say so plainly
        raise RuntimeError("models.text: this Python lacks pydoc_data.topics, the text corpus") from e
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)).translate(_FOLD)


def encode(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = _LOOKUP[np.minimum(codes, 127)]
    ids[codes > 127] = UNKNOWN_ID
    return ids


def decode(ids) -> str:
    return "".join("\ufffd" if i == UNKNOWN_ID else ALPHABET[i - 1] for i in np.asarray(ids).ravel().tolist())


@functools.lru_cache(maxsize=1)
def _all_tokens() -> np.ndarray:
    ids = encode(corpus())
    ids.setflags(write=False)
    return ids


def tokens(split: str) -> np.ndarray:
    """The split's character ids (int32, read-only)."""
    _check_split(split)
    ids = _all_tokens()
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    return ids[:cut] if split == "train" else ids[cut:]


def corpus_fingerprint() -> str:
    """sha256 of the encoded corpus: record it, since Python releases differ."""
    return hashlib.sha256(_all_tokens().tobytes()).hexdigest()


def unigram_loss(split: str = "heldout") -> float:
    """Cross-entropy (nats/char) on ``split`` of the train split's character
    frequencies (add-one smoothed): the baseline a model must beat."""
    counts = np.bincount(tokens("train"), minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[tokens(split)].mean())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"models.text: split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class CharWindows:
    """Micro-batch k -> ``microbatch_size`` windows of ``context`` characters.

    Inputs are int32 [b, context], targets the same windows shifted by one
    character. Window starts come from a permutation of all start positions
    of the split, drawn from (seed, epoch); epoch and the slot in it follow
    from k, so any process computes the same batch for the same k. Holds only
    its settings: cheap to build and to pickle; the text loads on first use.
    """

    def __init__(self, *, split: str = "train", context: int = 64, microbatch_size: int = 16, seed: int = 0):
        _check_split(split)
        if context < 1:
            raise ValueError(f"CharWindows: context must be >= 1, got {context}")
        if microbatch_size < 1:
            raise ValueError(f"CharWindows: microbatch_size must be >= 1, got {microbatch_size}")
        self.split, self.context, self.microbatch_size, self.seed = split, context, microbatch_size, seed

    def __repr__(self) -> str:
        return (f"CharWindows(split={self.split!r}, context={self.context}, "
                f"microbatch_size={self.microbatch_size}, seed={self.seed})")

    @property
    def num_windows(self) -> int:
        # A window needs context + 1 characters: inputs and the next character.
        return len(tokens(self.split)) - self.context

    @property
    def microbatches_per_epoch(self) -> int:
        per_epoch = self.num_windows // self.microbatch_size
        if per_epoch < 1:
            raise ValueError(f"{self!r}: the {self.split} split has only {self.num_windows} windows")
        return per_epoch

    def starts(self, k: int) -> np.ndarray:
        if k < 0:
            raise IndexError(f"micro-batch id must be >= 0, got {k}")
        epoch, j = divmod(k, self.microbatches_per_epoch)
        order = _permutation(self.seed, epoch, self.num_windows)
        return order[j * self.microbatch_size : (j + 1) * self.microbatch_size]

    def _windows(self, k: int, shift: int) -> np.ndarray:
        offsets = np.arange(self.context) + shift
        return tokens(self.split)[self.starts(k)[:, None] + offsets].astype(np.int32)

    def inputs(self, k: int) -> np.ndarray:
        return self._windows(k, 0)

    def targets(self, k: int) -> np.ndarray:
        return self._windows(k, 1)


def heldout_batches(n: int = 8, *, context: int = 64, microbatch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed held-out evaluation set: ``n`` (inputs, targets) batches whose
    windows start at evenly spaced positions of the held-out split."""
    ids = tokens("heldout")
    last_start = len(ids) - context - 1
    if n < 1 or last_start < 0:
        raise ValueError(f"heldout_batches: need n >= 1 and context < {len(ids)}, got n={n}, context={context}")
    starts = np.linspace(0, last_start, n * microbatch_size).round().astype(np.int64)
    offsets = np.arange(context)
    batches = []
    for s in starts.reshape(n, microbatch_size):
        window = s[:, None] + offsets
        batches.append((ids[window].astype(np.int32), ids[window + 1].astype(np.int32)))
    return batches


def uniform_loss() -> float:
    """ln(VOCAB_SIZE): the loss of a model that knows nothing."""
    return math.log(VOCAB_SIZE)
