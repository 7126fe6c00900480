"""UL2 mixture of denoisers (Tay et al. 2022) for a decoder-only (prefix LM) model.

Each example draws a denoiser by rate and takes the longest next chunk of the document whose
example still fits `seq_len` (the document tail may be shorter). Span denoisers (R, X) corrupt it
with t5's `random_spans_noise_mask`:

  chunk    a b c d e f g h             (noise spans: c d, g h)
  inputs   [mode] a b <s0> e f <s1> EOS
  targets  <s0> c d <s1> g h EOS        len(inputs) + len(targets) = L + 2 * num_spans + 3

Sentinel j is `vocab.sentinel_ids[j]`, so every span of an example is named uniquely: `check`
refuses a vocabulary with fewer sentinels than `max_spans` of some denoiser at seq_len (3 + 255
extra ids at seq_len 2048 with the default denoisers). With `UL2(allow_sentinel_reuse=True)` it
only warns, and sentinel j is `sentinel_ids[j % num_sentinels]`, reused cyclically; `reconstruct`
still inverts that because spans come in order, but a model can no longer tell which span a
repeated sentinel names. The S (prefix)
denoiser gives inputs `[S2S] + chunk[:k]`, targets `chunk[k:]` (no EOS added: the document's own
EOS ends its last chunk, as in CLM and prefix_lm), with k uniform in [1, L-1] (k=0 if L=1).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import ClassVar, Optional

import gin
import numpy as np

from midas_jax.objectives import base


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) in a chunk of `length`, as t5 counts them: round(L * density)
  clipped to [1, L-1], and round(noise / mean span) >= 1, capped so that every span and every
  kept run before one has a token. A 1-token chunk gets no noise (0, 0), as in t5."""
  if length < 2:
    return 0, 0
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  num_spans = min(max(round(num_noise / mean_span_length), 1), num_noise, length - num_noise)
  return num_noise, num_spans


def _span_bounds(length: int, noise_density: float, mean_span_length: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) of each noise span: kept and noise runs alternate, kept first (t5), their
  lengths two uniformly random compositions (of the kept and of the noise token counts)."""
  num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
  if not num_spans:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)

  def cut(n):  # ends of the first num_spans - 1 runs: a random (num_spans - 1)-subset of 1..n-1
    is_end = np.zeros(n - 1, bool)
    is_end[:num_spans - 1] = True
    rng.shuffle(is_end)
    return np.flatnonzero(is_end) + 1

  kept_to_T = np.append(cut(length - num_noise), length - num_noise)  # kept tokens before span j
  noise_cuts = cut(num_noise)
  return kept_to_T + np.append(0, noise_cuts), kept_to_T + np.append(noise_cuts, num_noise)


def _mask(length: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  delta = np.zeros(length + 1, np.int32)
  delta[starts], delta[ends] = 1, -1  # spans never touch: a kept token separates them
  return np.cumsum(delta[:-1]) > 0


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
  """t5's `random_spans_noise_mask`: bool [length], True on noise; kept and noise runs alternate,
  starting with kept tokens (so the last token is noise), run lengths uniformly random."""
  return _mask(length, *_span_bounds(length, noise_density, mean_span_length, rng))


@gin.configurable(module='midas_jax.objectives')
@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoiser: kind 'span' (R, X: t5 span corruption) or 'prefix' (S: prefix LM; then
  `noise_density` and `mean_span_length` are ignored, set to 0), announced by token `mode`."""
  kind: str = 'span'
  noise_density: float = 0.15
  mean_span_length: float = 3.0
  mode: str = '[NLU]'

  def __post_init__(self):
    if self.kind not in ('span', 'prefix'):
      raise ValueError(f"Denoiser kind={self.kind!r}: use 'span' (R/X) or 'prefix' (S).")
    if self.mode not in base.MODES:
      raise ValueError(f'Denoiser mode={self.mode!r}: use one of {base.MODES}.')
    prefix = self.kind == 'prefix'  # then zero the unused fields, so equal denoisers compare equal
    object.__setattr__(self, 'noise_density', 0.0 if prefix else float(self.noise_density))
    object.__setattr__(self, 'mean_span_length', 0.0 if prefix else float(self.mean_span_length))
    if self.kind == 'span' and not 0 < self.noise_density < 1:
      raise ValueError(f'Denoiser noise_density={self.noise_density} must be in (0, 1), the '
                       'fraction of tokens masked, e.g. 0.15.')
    if self.kind == 'span' and not 1 <= self.mean_span_length < math.inf:
      raise ValueError(f'Denoiser mean_span_length={self.mean_span_length} must be >= 1 tokens.')

  def __str__(self) -> str:
    if self.kind == 'prefix':
      return f'S(prefix){self.mode}'
    return f'{"R" if self.mode == "[NLU]" else "X"}({self.noise_density:g}, ' \
           f'{self.mean_span_length:g}){self.mode}'

  def example_length(self, length: int) -> int:
    """len(inputs) + len(targets) of the example of a `length`-token chunk."""
    if self.kind == 'prefix':
      return length + 1
    return length + 2 * span_counts(length, self.noise_density, self.mean_span_length)[1] + 3

  def max_chunk(self, seq_len: int) -> int:
    """The longest chunk whose example fits `seq_len` (0 if none)."""
    return _max_chunk(self, seq_len)

  def max_spans(self, seq_len: int) -> int:
    """The most noise spans (one sentinel each) an example can have at `seq_len`."""
    return _max_spans(self, seq_len)

  def encode(self, chunk_L: np.ndarray, rng: np.random.Generator,
             vocab: base.VocabInfo) -> dict[str, np.ndarray]:
    """The example of one chunk (see the module docstring)."""
    mode = vocab.mode_ids[self.mode]
    if self.kind == 'prefix':
      k = base.split_point(chunk_L.size, rng)
      return {'inputs': np.concatenate([[mode], chunk_L[:k]], dtype=np.int32),
              'targets': chunk_L[k:]}
    starts, ends = _span_bounds(chunk_L.size, self.noise_density, self.mean_span_length, rng)
    mask_L = _mask(chunk_L.size, starts, ends)
    sentinels = vocab.sentinel_ids[np.arange(starts.size) % max(vocab.sentinel_ids.size, 1)]
    keep_L = ~mask_L
    keep_L[starts] = True  # a span's first token makes room for its sentinel
    inputs = np.empty(keep_L.sum() + 2, np.int32)
    inputs[0], inputs[1:-1], inputs[-1] = mode, chunk_L[keep_L], vocab.eos_id
    inputs[1:-1][np.cumsum(keep_L)[starts] - 1] = sentinels
    spans = ends - starts
    is_sentinel = np.zeros(spans.sum() + spans.size, bool)
    is_sentinel[np.cumsum(spans) - spans + np.arange(spans.size)] = True
    targets = np.empty(is_sentinel.size + 1, np.int32)
    targets[:-1][is_sentinel], targets[:-1][~is_sentinel] = sentinels, chunk_L[mask_L]
    targets[-1] = vocab.eos_id
    return {'inputs': inputs, 'targets': targets}


@functools.lru_cache(maxsize=None)
def _max_chunk(denoiser: Denoiser, seq_len: int) -> int:
  # example_length strictly increases with the chunk length (both t5 counts are monotone), and
  # exceeds seq_len from length seq_len on: binary search.
  lo, hi = 0, seq_len
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if denoiser.example_length(mid) <= seq_len else (lo, mid - 1)
  return lo


@functools.lru_cache(maxsize=None)
def _max_spans(denoiser: Denoiser, seq_len: int) -> int:
  # Every chunk length up to max_chunk occurs (document tails), and the span count depends on
  # the length alone; it is monotone in it, but the max over all lengths needs no proof of that.
  if denoiser.kind == 'prefix':
    return 0
  return max(span_counts(n, denoiser.noise_density, denoiser.mean_span_length)[1]
             for n in range(denoiser.max_chunk(seq_len) + 1))


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.getLogger('midas_jax').warning(message)


DEFAULT_DENOISERS = (
    Denoiser('span', 0.15, 3, '[NLU]'), Denoiser('span', 0.15, 8, '[NLU]'),
    Denoiser('span', 0.5, 3, '[NLG]'), Denoiser('span', 0.5, 8, '[NLG]'),
    Denoiser('span', 0.15, 64, '[NLG]'), Denoiser('span', 0.5, 64, '[NLG]'),
    Denoiser('prefix', mode='[S2S]'))


@gin.configurable(module='midas_jax.objectives')
@dataclasses.dataclass(frozen=True)
class UL2:
  """A mixture of denoisers with mixing `rates` (relative weights; None = uniform).

  `denoisers` entries are `Denoiser`s or their field tuples, e.g. ('span', 0.5, 3, '[NLG]').
  A denoiser with rate 0 is never drawn, and `check` ignores it. `allow_sentinel_reuse`: let
  `check` warn instead of raising when an example can have more spans than the vocabulary has
  sentinels (they are then reused cyclically; see the module docstring).
  """
  denoisers: tuple[Denoiser, ...] = DEFAULT_DENOISERS
  rates: Optional[tuple[float, ...]] = None
  allow_sentinel_reuse: bool = False
  name: ClassVar[str] = 'ul2'
  feature_converter: ClassVar[str] = 'prefix_lm'
  features: ClassVar[tuple[str, ...]] = ('inputs', 'targets')

  def __post_init__(self):
    denoisers = tuple(d if isinstance(d, Denoiser) else Denoiser(*d) for d in self.denoisers)
    if not denoisers:
      raise ValueError('UL2 needs at least one denoiser.')
    rates = (1.0,) * len(denoisers) if self.rates is None else tuple(map(float, self.rates))
    if len(rates) != len(denoisers):
      raise ValueError(f'UL2 has {len(denoisers)} denoisers but {len(rates)} rates {rates}; give '
                       'one rate per denoiser, or rates=None for uniform.')
    if not all(0 <= r < math.inf for r in rates) or not sum(rates) > 0:
      raise ValueError(f'UL2 rates {rates} must be finite, >= 0 and not all zero (relative '
                       'weights, e.g. (1,) * 7).')
    object.__setattr__(self, 'denoisers', denoisers)
    object.__setattr__(self, 'rates', rates)
    cdf = np.cumsum(rates) / sum(rates)
    cdf[-1] = 1.0  # so a draw in [0, 1) always lands on a denoiser
    object.__setattr__(self, '_cdf', cdf)

  @property
  def probabilities(self) -> np.ndarray:
    return np.diff(self._cdf, prepend=0.0)

  def check(self, vocab: base.VocabInfo, seq_len: int) -> None:
    used = [d for d, r in zip(self.denoisers, self.rates) if r > 0]
    need = len(base.MODES) + any(d.kind == 'span' for d in used)  # mode tokens (+ a sentinel)
    if vocab.extra_ids < need:
      raise ValueError(f'UL2 needs >= {need} extra ids (3 mode tokens {base.MODES}, and sentinels '
                       f'for span denoisers), the vocabulary has extra_ids={vocab.extra_ids}; use '
                       'a vocabulary with extra ids (seqio: extra_ids=100).')
    base.check_seq_len(seq_len, 1, 'ul2')
    for d in used:
      need = d.example_length(1 if d.kind == 'prefix' else 2)  # span: 1 kept + 1 noise token
      if seq_len < need:
        raise ValueError(f'UL2 denoiser {d} needs seq_len >= {need}, got seq_len={seq_len}; '
                         'use a longer sequence or set its rate to 0.')
    self.check_sentinels(vocab.extra_ids - len(base.MODES), seq_len)

  def check_sentinels(self, num_sentinels: int, seq_len: int) -> None:
    """ValueError (a warning if allow_sentinel_reuse) if an example at `seq_len` can have more
    spans than `num_sentinels`, naming each denoiser's need and the fixes."""
    need = [(d, d.max_spans(seq_len)) for d, r in zip(self.denoisers, self.rates) if r > 0]
    worst = max(n for _, n in need)
    if worst <= num_sentinels:  # checked per document: keep the passing path cheap
      return
    short = ', '.join(f'{d} {n}' for d, n in need if n > num_sentinels)
    extra = worst + len(base.MODES)
    message = (f'UL2 at seq_len={seq_len}: examples can have up to {worst} noise '
               f'spans ({short}), but the vocabulary has {num_sentinels} sentinels '
               f'(extra_ids={num_sentinels + len(base.MODES)}: 3 mode tokens, the rest '
               f'sentinels). Use a vocabulary with extra_ids >= {extra} (gin: '
               f'midas_jax.data.vocabulary.extra_ids = {extra}, within the model\'s vocab_size), '
               'a shorter seq_len, or fewer / longer spans (a lower noise_density or a higher '
               'mean_span_length, or rate 0 for those denoisers)')
    if not self.allow_sentinel_reuse:
      raise ValueError(message + '; or reuse sentinels cyclically with '
                       'midas_jax.objectives.UL2.allow_sentinel_reuse = True.')
    _warn_once(message + '. allow_sentinel_reuse=True: sentinels are reused cyclically, so '
               'spans of one example are no longer uniquely named.')

  def examples(self, tokens_T: np.ndarray, rng: np.random.Generator, seq_len: int,
               vocab: base.VocabInfo) -> list[dict[str, np.ndarray]]:
    """The document's examples; denoisers, splits and noise drawn from `rng`."""
    tokens_T = base.as_tokens(tokens_T)
    self.check(vocab, seq_len)
    if tokens_T.max() >= vocab.first_extra_id:
      raise ValueError(f'A document has token id {tokens_T.max()} >= {vocab.first_extra_id}, an '
                       'extra id that UL2 reserves for mode and sentinel tokens; tokenize text '
                       'only (seqio vocabularies never produce extra ids from text).')
    out, pos = [], 0
    while pos < tokens_T.size:
      d = self.denoisers[int(np.searchsorted(self._cdf, rng.random(), side='right'))]
      n = min(d.max_chunk(seq_len), tokens_T.size - pos)
      out.append(d.encode(tokens_T[pos:pos + n], rng, vocab))
      pos += n
    return out

  def describe(self, seq_len: Optional[int] = None) -> str:
    """One line per denoiser: its probability and, given `seq_len`, the t5 counts of a full chunk
    (long spans shrink when a chunk holds few of them)."""
    lines = [f'ul2: {len(self.denoisers)} denoisers']
    for d, p in zip(self.denoisers, self.probabilities):
      line = f'  {p:6.1%} {d}'
      if seq_len and d.kind == 'span' and d.max_chunk(seq_len) >= 2:
        n = d.max_chunk(seq_len)
        noise, spans = span_counts(n, d.noise_density, d.mean_span_length)
        line += f': chunks of {n}, {noise} noise tokens in {spans} spans (mean {noise / spans:.3g})'
      elif seq_len and d.kind == 'prefix':
        line += f': chunks of {d.max_chunk(seq_len)}'
      lines.append(line)
    return '\n'.join(lines)

