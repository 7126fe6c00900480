"""Pre-training objectives: exact round trips, fit and maximal chunks, UL2 statistics, errors, gin."""

import importlib
import pathlib
import re
import types

import gin
import numpy as np
import pytest

from midas_jax import objectives as obj
from midas_jax.objectives import CLM, UL2, Denoiser, PrefixLM, VocabInfo, reconstruct

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / 'gin'
EOS = 1
VOCAB = VocabInfo(vocab_size=1000, eos_id=EOS, extra_ids=100)  # regular ids < 900
MODE = VOCAB.mode_ids
SPAN_DENOISERS = [d for d in obj.DEFAULT_DENOISERS if d.kind == 'span']
S_DENOISER = obj.DEFAULT_DENOISERS[-1]


def _doc(rng, n):
  tokens = rng.integers(2, VOCAB.first_extra_id, n, dtype=np.int32)
  tokens[-1] = EOS
  return tokens


def _docs(seed, seq_len, num=60):
  """Very short documents, documents around chunk boundaries, and long random ones."""
  rng = np.random.default_rng(seed)
  lengths = [1, 2, 3, 4, seq_len - 1, seq_len, seq_len + 1, seq_len + 2, 2 * seq_len + 1]
  lengths += list(rng.integers(1, 4 * seq_len, num))
  return [_doc(rng, n) for n in lengths]


def _fits(objective, ex, seq_len):
  assert set(ex) == set(objective.features)
  assert all(v.dtype == np.int32 and v.ndim == 1 for v in ex.values())
  assert ex['targets'].size >= 1
  assert sum(v.size for v in ex.values()) <= seq_len


def _id(objective):
  if objective.name != 'ul2' or len(objective.denoisers) > 1:
    return objective.name
  return str(objective.denoisers[0])


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _span_stats(examples):
  """(noise tokens, spans, chunk tokens) summed over span-corruption examples."""
  noise = spans = chunk = 0
  for ex in examples:
    s = int((ex['targets'] >= VOCAB.first_extra_id).sum())
    noise, spans = noise + ex['targets'].size - 1 - s, spans + s
    chunk += ex['inputs'].size - 2 - s + ex['targets'].size - 1 - s
  return noise, spans, chunk


def test_vocab_info_ids():
  assert MODE == {'[NLU]': 900, '[NLG]': 901, '[S2S]': 902}
  assert VOCAB.sentinel_ids.tolist() == list(range(999, 902, -1))  # t5: sentinel i = 999 - i
  v = VocabInfo.from_vocabulary(types.SimpleNamespace(vocab_size=32100, eos_id=1, extra_ids=100))
  assert (v.mode_ids['[NLU]'], v.sentinel_ids[0], v.sentinel_ids.size) == (32000, 32099, 97)
  assert VocabInfo(300, 1).sentinel_ids.size == 0
  with pytest.raises(ValueError, match='3 extra ids'):
    VocabInfo(300, 1, extra_ids=2).mode_ids  # pylint: disable=expression-not-assigned
  with pytest.raises(ValueError, match='eos_id=999 must be a regular id'):
    VocabInfo(1000, 999, 100)
  with pytest.raises(ValueError, match='extra_ids=1000'):
    VocabInfo(1000, 1, 1000)


@pytest.mark.parametrize('seq_len', [2, 3, 16, 128])
@pytest.mark.parametrize('objective', [
    CLM(), PrefixLM(), UL2(), UL2((S_DENOISER,)),
    *[UL2((d,)) for d in SPAN_DENOISERS]], ids=_id)
def test_examples_fit_and_reconstruct_the_document(objective, seq_len):
  try:
    objective.check(VOCAB, seq_len)
  except ValueError:
    assert objective.name == 'ul2' and seq_len < 7  # a span denoiser needs 7 (tested below)
    return
  rng = np.random.default_rng(seq_len)
  for tokens in _docs(seq_len, seq_len, num=30 if seq_len > 3 else 10):
    examples = objective.examples(tokens, rng, seq_len, VOCAB)
    for ex in examples:
      _fits(objective, ex, seq_len)
    chunks = [reconstruct(ex, VOCAB) for ex in examples]
    assert all(c.size for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), tokens)


def test_clm_chunks_of_seq_len():
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 8, 9, 33):
    tokens = _doc(rng, n)
    sizes = [ex['targets'].size for ex in CLM().examples(tokens, rng, 8, VOCAB)]
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])


def test_prefix_lm_splits_and_tails():
  rng = np.random.default_rng(0)
  split = lambda n, s: [(e['inputs'].size, e['targets'].size)
                        for e in PrefixLM().examples(_doc(rng, n), rng, s)]
  assert split(1, 8) == [(0, 1)]  # a 1-token document: empty inputs
  assert split(2, 8) == [(1, 1)]
  assert [a + b for a, b in split(9, 8)] == [7, 2]  # no 1-token tail
  assert [a + b for a, b in split(17, 8)] == [8, 7, 2]
  assert [a + b for a, b in split(3, 2)] == [2, 1]  # seq_len 2: a 1-token tail is unavoidable
  assert all(a >= 1 and b >= 1 for a, b in split(1000, 8))
  ks = [a for a, _ in split(5 * 6000, 5)]
  np.testing.assert_allclose(np.bincount(ks, minlength=5)[1:] / len(ks), 0.25, atol=0.02)


def test_noise_mask_counts_and_layout():
  rng = np.random.default_rng(0)
  assert obj.span_counts(1, 0.15, 3) == (0, 0) and not obj.noise_mask(1, 0.15, 3, rng).any()
  assert obj.noise_mask(2, 0.15, 3, rng).tolist() == [False, True]
  assert obj.span_counts(10, 0.9, 1) == (9, 1)  # spans capped by the kept tokens
  length, total = 100, np.zeros(100)
  for _ in range(3000):
    mask = obj.noise_mask(length, 0.3, 5, rng)
    starts = mask & ~np.r_[False, mask[:-1]]
    assert (mask.sum(), starts.sum()) == obj.span_counts(length, 0.3, 5) == (30, 6)
    assert not mask[0] and mask[-1]  # t5: kept tokens first, a noise span last
    total += mask
  # Noise spread over the chunk: the rate away from the forced ends is near the density.
  np.testing.assert_allclose(total[10:90] / 3000, 0.3, atol=0.05)


@pytest.mark.parametrize('denoiser', SPAN_DENOISERS, ids=str)
def test_span_denoiser_statistics(denoiser):
  # Chunks hold >= ~15 spans here so that rounding the span count moves the mean span < 5 %.
  seq_len = 8192 if denoiser.mean_span_length > 8 else 512
  rng = np.random.default_rng(1)
  ul2, examples = UL2((denoiser,)), []
  for _ in range(600_000 // (20 * seq_len)):  # ~1000 examples of 512, ~70 of 8192
    examples += ul2.examples(_doc(rng, 20 * seq_len), rng, seq_len, VOCAB)
  noise, spans, chunk = _span_stats(examples)
  assert noise / chunk == pytest.approx(denoiser.noise_density, rel=0.02)
  assert noise / spans == pytest.approx(denoiser.mean_span_length, rel=0.05)


def test_ul2_structure_modes_and_sentinels():
  rng = np.random.default_rng(2)
  modes = {MODE[m]: m for m in obj.MODES}
  for tokens in _docs(2, 64, num=40):
    for ex in UL2().examples(tokens, rng, 64, VOCAB):
      inputs, targets = ex['inputs'], ex['targets']
      assert inputs[0] in modes
      if modes[inputs[0]] == '[S2S]':
        assert (inputs[1:] < VOCAB.first_extra_id).all()
        continue
      assert inputs[-1] == targets[-1] == EOS
      s_in = inputs[1:][inputs[1:] >= VOCAB.first_extra_id]
      s_tg = targets[targets >= VOCAB.first_extra_id]
      np.testing.assert_array_equal(s_in, VOCAB.sentinel_ids[:s_in.size])
      np.testing.assert_array_equal(s_in, s_tg)


def test_sentinels_are_reused_cyclically_only_if_allowed(caplog):
  vocab = VocabInfo(100, EOS, extra_ids=5)  # 2 sentinels: 99, 98
  rng = np.random.default_rng(3)
  tokens = rng.integers(2, 95, 200).astype(np.int32)
  with pytest.raises(ValueError, match=r'up to 15 noise spans .* has 2 sentinels'):
    UL2((('span', 0.5, 1, '[NLG]'),)).examples(tokens, rng, 64, vocab)
  ul2 = UL2((('span', 0.5, 1, '[NLG]'),), allow_sentinel_reuse=True)
  with caplog.at_level('WARNING', logger='midas_jax'):
    examples = ul2.examples(tokens, rng, 64, vocab)
  assert [r.message.count('reused cyclically') for r in caplog.records] == [1]  # warned once
  for ex in examples:
    s_tg = ex['targets'][ex['targets'] >= vocab.first_extra_id]
    assert s_tg.size > 2 and s_tg.tolist() == [99, 98] * (s_tg.size // 2) + [99] * (s_tg.size % 2)
  np.testing.assert_array_equal(np.concatenate([reconstruct(e, vocab) for e in examples]), tokens)


def test_ul2_mixing_rates():
  rng = np.random.default_rng(4)
  ul2 = UL2([SPAN_DENOISERS[0], ('span', 0.5, 3, '[NLG]'), ('span', 0.5, 8, '[NLU]'),
             S_DENOISER], rates=(1, 2, 0, 3))
  np.testing.assert_allclose(ul2.probabilities, [1 / 6, 1 / 3, 0, 1 / 2])
  tokens, seen = _doc(rng, 40), []
  for _ in range(4000):  # short documents: one example each, so draws are what we count
    seen += [int(ex['inputs'][0]) for ex in ul2.examples(tokens, rng, 64, VOCAB)]
  freq = np.array([seen.count(MODE[m]) for m in obj.MODES]) / len(seen)
  # [NLU] is only the rate-1 R denoiser: the rate-0 one is never drawn.
  np.testing.assert_allclose(freq, [1 / 6, 1 / 3, 1 / 2], atol=0.025)
  uniform = np.bincount([int(e['inputs'][0]) - 900 for _ in range(2800)
                         for e in UL2().examples(tokens, rng, 512, VOCAB)]) / 2800
  np.testing.assert_allclose(uniform, [2 / 7, 4 / 7, 1 / 7], atol=0.025)


@pytest.mark.parametrize('seq_len', [7, 13, 64, 300, 2048])
def test_max_spans_is_the_empirical_max(seq_len):
  """max_spans (what the sentinel check uses) against the most sentinels seen in examples of
  documents of every length up to two chunks."""
  big = VocabInfo(100_000, EOS, extra_ids=600)  # enough sentinels at 2048: none reused
  rng = np.random.default_rng(seq_len)
  for d in obj.DEFAULT_DENOISERS:
    n = d.max_chunk(seq_len)
    lengths = sorted({*range(1, min(n, 40) + 1), *rng.integers(1, 2 * n + 2, 12), n, n + 1})
    seen = max(int((ex['targets'] >= big.first_extra_id + 3).sum())
               for k in lengths for ex in UL2((d,)).examples(
                   rng.integers(2, 1000, k).astype(np.int32), rng, seq_len, big))
    assert seen == d.max_spans(seq_len), (d, seq_len)
  assert [d.max_spans(2048) for d in obj.DEFAULT_DENOISERS] == [93, 37, 255, 114, 5, 16, 0]


def test_sentinel_check_names_the_numbers_and_fixes():
  byte = VocabInfo(359, EOS, extra_ids=100)  # seqio ByteVocabulary(extra_ids=100): 97 sentinels
  UL2().check(byte, 512)  # X(0.5, 3) needs 63
  with pytest.raises(ValueError) as e:
    UL2().check(byte, 2048)
  msg = str(e.value)
  for part in ('seq_len=2048', 'up to 255 noise spans', 'X(0.5, 3)[NLG] 255, X(0.5, 8)[NLG] 114',
               'has 97 sentinels', 'extra_ids >= 258', 'shorter seq_len', 'longer spans',
               'allow_sentinel_reuse = True'):
    assert part in msg, (part, msg)
  assert 'R(0.15, 3)' not in msg  # 93 spans: enough
  with pytest.raises(ValueError, match='up to 255'):  # X(0.5, 8) off, X(0.5, 3) still on
    UL2(rates=(1, 1, 1, 0, 1, 1, 1)).check(VocabInfo(1000, EOS, 3 + 114), 2048)
  UL2(rates=(1, 1, 0, 1, 1, 1, 1)).check(VocabInfo(1000, EOS, 3 + 114), 2048)  # X(0.5, 3) off
  UL2().check(VocabInfo(32000 + 258, EOS, 258), 2048)


def test_accelerator_presets_have_a_sentinel_per_span(gin_config):  # pylint: disable=redefined-outer-name,unused-argument
  """Every experiment on the C4 UL2 data side: its vocabulary (T5's 32000 pieces + the bound
  extra ids, within its model file's vocab_size) passes the UL2 check at its SEQ_LEN. Parsed
  without the model and trainer modules (skip_unknown), so no JAX import."""
  importlib.import_module('midas_jax.data.tasks')  # registers midas_jax.data.vocabulary
  paths = [p for p in sorted((GIN_DIR / 'experiments').glob('*.gin'))
           if "common/c4_spm32k_ul2.gin'" in p.read_text()]
  assert len(paths) >= 4
  for path in paths:
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [str(path)], ['tests.objective_probe.objective = %OBJECTIVE'], finalize_config=False,
        skip_unknown=True)
    extra = gin.query_parameter('midas_jax.data.vocabulary.extra_ids')
    seq_len = gin.query_parameter('%SEQ_LEN')
    model = re.search(r"^include '(models/\w+\.gin)'", path.read_text(), re.M).group(1)
    vocab_size = int(re.search(r'vocab_size = (\d+)', (GIN_DIR / model).read_text()).group(1))
    assert seq_len >= 2048 and 32000 + extra <= vocab_size, path  # the case the check is for
    _probe().check(VocabInfo(32000 + extra, EOS, extra), seq_len)


@pytest.mark.parametrize('seq_len', [7, 8, 13, 64, 100, 512])
def test_chunks_are_maximal(seq_len):
  rng = np.random.default_rng(seq_len)
  for d in obj.DEFAULT_DENOISERS:
    n = d.max_chunk(seq_len)
    assert n >= (2 if d.kind == 'span' else 1)
    # Brute force: encode chunks of n and n + 1 tokens.
    assert sum(v.size for v in d.encode(_doc(rng, n), rng, VOCAB).values()) <= seq_len
    assert sum(v.size for v in d.encode(_doc(rng, n + 1), rng, VOCAB).values()) > seq_len
    sizes = [reconstruct(e, VOCAB).size
             for e in UL2((d,)).examples(_doc(rng, 5 * n + 1), rng, seq_len, VOCAB)]
    assert sizes == [n] * 5 + [1]  # every chunk but the tail is maximal


@pytest.mark.parametrize('objective', [CLM(), PrefixLM(), UL2()], ids=_id)
def test_deterministic_given_seed(objective):
  tokens = _doc(np.random.default_rng(0), 3000)
  run = lambda seed: objective.examples(tokens, np.random.default_rng(seed), 128, VOCAB)
  assert _same(run(5), run(5))
  assert _same(run(5), run(6)) == (objective.name == 'clm')  # CLM draws nothing


def test_errors_name_the_problem():
  tokens, rng = _doc(np.random.default_rng(0), 50), np.random.default_rng(0)
  with pytest.raises(ValueError, match='seq_len >= 1'):
    CLM().examples(tokens, rng, 0, VOCAB)
  with pytest.raises(ValueError, match='seq_len >= 2'):
    PrefixLM().check(VOCAB, 1)
  with pytest.raises(ValueError, match=r'R\(0.15, 3\)\[NLU\] needs seq_len >= 7'):
    UL2().check(VOCAB, 6)
  with pytest.raises(ValueError, match='needs seq_len >= 2'):
    UL2((S_DENOISER,)).check(VOCAB, 1)
  UL2(rates=(0,) * 6 + (1,)).check(VOCAB, 2)  # rate-0 denoisers are not checked
  with pytest.raises(ValueError, match='needs >= 3 extra ids'):
    UL2((S_DENOISER,)).check(VocabInfo(1000, EOS, 2), 64)
  UL2((S_DENOISER,)).check(VocabInfo(1000, EOS, 3), 64)  # S needs no sentinel
  with pytest.raises(ValueError, match='needs >= 4 extra ids'):
    UL2().check(VocabInfo(1000, EOS, 3), 64)
  with pytest.raises(ValueError, match='7 denoisers but 6 rates'):
    UL2(rates=(1,) * 6)
  for rates in ((1, 1, 1, -1, 1, 1, 1), (0,) * 7, (1, 1, 1, float('nan'), 1, 1, 1)):
    with pytest.raises(ValueError, match='must be finite, >= 0 and not all zero'):
      UL2(rates=rates)
  with pytest.raises(ValueError, match='at least one denoiser'):
    UL2(())
  with pytest.raises(ValueError, match="use 'span'"):
    Denoiser('mask')
  with pytest.raises(ValueError, match='noise_density=1.0 must be in'):
    Denoiser('span', 1.0)
  with pytest.raises(ValueError, match='mean_span_length=0.5 must be >= 1'):
    Denoiser('span', 0.15, 0.5)
  with pytest.raises(ValueError, match='mode=.NLU.: use one of'):
    Denoiser(mode='NLU')
  for bad in (np.zeros(0, np.int32), np.ones((2, 3), np.int32), np.ones(3, np.float32)):
    with pytest.raises(ValueError, match='non-empty 1-D integer array'):
      CLM().examples(bad, rng, 8, VOCAB)
  with pytest.raises(ValueError, match='negative token id'):
    PrefixLM().examples(np.array([3, -1, 1]), rng, 8, VOCAB)
  with pytest.raises(ValueError, match='token id 905 >= 900, an extra id'):
    UL2().examples(np.array([3, 905, 1]), rng, 64, VOCAB)
  with pytest.raises(ValueError, match='Sentinels differ'):
    reconstruct({'inputs': np.array([900, 5, 999, 1]), 'targets': np.array([998, 6, 1])}, VOCAB)


def test_flatten_and_describe():
  rng = np.random.default_rng(0)
  examples = UL2().examples(_doc(rng, 1000), rng, 128, VOCAB)
  values_i, lengths_i, values_t, lengths_t = obj.flatten(examples, UL2.features)
  assert values_i.dtype == np.int32 and lengths_i.dtype == np.int64
  np.testing.assert_array_equal(np.split(values_t, np.cumsum(lengths_t)[:-1])[3],
                                examples[3]['targets'])
  assert lengths_i.sum() == values_i.size and len(lengths_i) == len(examples)
  assert [a.size for a in obj.flatten([], ('targets',))] == [0, 0]
  text = UL2().describe(512)
  assert '14.3% X(0.15, 64)[NLG]: chunks of 507, 76 noise tokens in 1 spans' in text
  assert 'S(prefix)[S2S]: chunks of 511' in text and CLM().describe(8).startswith('clm')


@pytest.fixture
def gin_config():
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_DIR))
  yield
  gin.clear_config()


@gin.configurable('objective_probe', module='tests')
def _probe(objective=gin.REQUIRED):
  return objective


def _gin_objective(*lines):
  gin.parse_config(list(lines) + ['tests.objective_probe.objective = %OBJECTIVE'])
  return _probe()


def test_gin_files(gin_config):  # pylint: disable=redefined-outer-name,unused-argument
  importlib.reload(importlib.import_module('midas_jax.objectives'))  # a second import is harmless
  for name, cls in obj.OBJECTIVES.items():
    gin.clear_config()
    objective = _gin_objective(f"include 'objectives/{name}.gin'")
    assert isinstance(objective, cls) and objective.name == name
  assert objective == UL2()  # ul2.gin spells out the defaults
  gin.clear_config()
  tweaked = _gin_objective("include 'objectives/ul2.gin'", 'UL2_RATES = (0, 0, 1, 1, 1, 1, 4)')
  assert tweaked.probabilities.tolist() == [0, 0, .125, .125, .125, .125, .5]
  gin.clear_config()
  scoped = _gin_objective(
      'OBJECTIVE = @midas_jax.objectives.UL2()',
      'midas_jax.objectives.UL2.denoisers = [@x/midas_jax.objectives.Denoiser()]',
      'x/midas_jax.objectives.Denoiser.noise_density = 0.5',
      "x/midas_jax.objectives.Denoiser.mode = '[NLG]'")
  assert scoped.denoisers == (Denoiser('span', 0.5, 3, '[NLG]'),)
