"""Packed, deterministic, resumable training batches from a seqio Task or Mixture.

    Task/Mixture (tokenized documents in `targets`, shuffled with `seed`, this host's shard)
      -> objective (`midas_jax.objectives`: CLM, prefix LM or UL2; numpy, seeded per example)
      -> seqio feature converter, packed (LMFeatureConverter or PrefixLMFeatureConverter)
      -> batches of {inputs, targets, segment_ids, positions, loss_weights[, prefix_mask]}

The stream is a pure function of (task, objective, seed, shard): example `i` of a host's stream
is corrupted with `default_rng([seed, shard, i])`, and seqio shuffles with `seed`. Resuming at
step `s` rebuilds the stream and skips `s` batches (the data position is the step), so a resumed
run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import numpy as np

from midas_jax.data import tasks

log = logging.getLogger("midas_jax")
Batch = dict[str, np.ndarray]
DEFAULT_SEQ_LEN = 256
EVAL_SEED = 0  # validation examples are corrupted the same way in every run, so losses compare
_FIELDS = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets",
           "decoder_segment_ids": "segment_ids", "decoder_positions": "positions",
           "decoder_loss_weights": "loss_weights", "decoder_causal_attention": "prefix_mask"}
_DTYPES = {"loss_weights": "float32"}  # every other field is int32


def batch_spec(rows: int, seq_len: int, objective=None) -> dict:
  """The `ShapeDtypeStruct`s of a batch of `rows` rows under `objective` (default CLM): what
  the trainer's executables are compiled for, without reading any data (`midas_jax.aot`)."""
  import jax  # pylint: disable=import-outside-toplevel
  prefix = getattr(objective, "feature_converter", "lm") == "prefix_lm"
  names = [n for n in _FIELDS.values() if prefix or n != "prefix_mask"]
  return {n: jax.ShapeDtypeStruct((rows, seq_len), _DTYPES.get(n, "int32")) for n in names}


def _apply_objective(ds, objective, info, seq_len: int, seed: int, shard_index: int):
  """Map each tokenized document to the objective's examples (a flat stream of examples)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from midas_jax import objectives  # pylint: disable=import-outside-toplevel
  fields = objective.features

  def np_fn(tokens_T, index):
    # Seeded per example (not per call order), so parallel maps stay deterministic.
    rng = np.random.default_rng([seed, shard_index, int(index)])
    return objectives.flatten(
        objective.examples(np.asarray(tokens_T, np.int32), rng, seq_len, info), fields)

  def to_ragged(index, ex):
    outs = tf.numpy_function(np_fn, [ex["targets"], index], [tf.int32, tf.int64] * len(fields),
                             stateful=False)
    return {f: tf.RaggedTensor.from_row_lengths(tf.ensure_shape(outs[2 * i], [None]),
                                                tf.ensure_shape(outs[2 * i + 1], [None]))
            for i, f in enumerate(fields)}

  ds = ds.enumerate().map(to_ragged, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.flat_map(tf.data.Dataset.from_tensor_slices)


class SeqioLM:
  """Packed LM batches of split `split` of a seqio Task/Mixture under `objective`."""

  def __init__(self, name: str, split: str, seq_len: int, objective):
    if seq_len <= 0:
      raise tasks.DataError(f"seq_len must be positive, got {seq_len}.")
    self.provider = tasks.get_provider(name)
    self.name, self.split, self.seq_len, self.objective = name, split, seq_len, objective
    self.vocab = self.provider.output_features["targets"].vocabulary
    self.vocab_size = int(self.vocab.vocab_size)
    from midas_jax import objectives  # pylint: disable=import-outside-toplevel
    self.info = objectives.VocabInfo.from_vocabulary(self.vocab)
    objective.check(self.info, seq_len)
    self.stats = {"task": name, "split": split, "objective": objective.name,
                  "vocabulary": f"{type(self.vocab).__name__}({self.vocab_size} ids)",
                  "seq_len": seq_len}

  @contextlib.contextmanager
  def _tfds_help(self):
    """Reading a TFDS-backed Task: its failures become a DataError that says how to get the
    data (TFDS cannot download here); other providers' errors pass through unchanged."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if tasks.is_tfds(self.provider):
        raise tasks.tfds_help(self.provider, e) from e
      raise

  def _examples(self, seed: int, shard_index: int, num_shards: int, repeat: bool):
    import seqio  # pylint: disable=import-outside-toplevel
    kwargs = dict(sequence_length=None, split=self.split, shuffle=repeat, seed=seed,
                  try_in_mem_cache=False,  # its partial-read warnings; tokenising is cheap
                  num_epochs=None if repeat else 1, trim_output_features=False,
                  shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None)
    with self._tfds_help():
      ds = self.provider.get_dataset(**kwargs)
    return _apply_objective(ds, self.objective, self.info, self.seq_len, seed, shard_index)

  def _batched(self, rows: int, seed: int, shard_index: int, num_shards: int, repeat: bool):
    import seqio  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    ds = self._examples(seed, shard_index, num_shards, repeat)
    if self.objective.feature_converter == "prefix_lm":
      # Inputs and targets are concatenated before packing; only their sum must fit.
      converter = seqio.PrefixLMFeatureConverter(pack=True, apply_length_check=False)
      lengths = {"inputs": self.seq_len // 2, "targets": self.seq_len - self.seq_len // 2}
    else:
      converter = seqio.LMFeatureConverter(pack=True)
      lengths = {"targets": self.seq_len}
    ds = converter(ds, lengths)

    def rename(ex):
      return {_FIELDS[k]: tf.cast(v, _DTYPES.get(_FIELDS[k], "int32")) for k, v in ex.items()
              if k in _FIELDS}
    ds = ds.batch(rows, drop_remainder=repeat).map(rename)
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep order: the stream is reproducible
    return ds.with_options(options)

  def batches(self, batch_size: int, seed: int = 0, start_step: int = 0, shard_index: int = 0,
              num_shards: int = 1) -> Iterator[Batch]:
    """Training batches from step `start_step` on, endless; this host's rows of each.

    Each host reads shard `shard_index` of `num_shards` of the Task and packs its own
    `batch_size // num_shards` rows, so the global batch at step `s` is the same for every
    resume point and the hosts never read each other's data.
    """
    rows = _rows(batch_size, shard_index, num_shards)
    ds = self._batched(rows, seed, shard_index, num_shards, repeat=True)
    if start_step:
      ds = ds.skip(start_step)  # replays the deterministic stream: exact resumption
    with self._tfds_help():
      yield from ds.prefetch(2).as_numpy_iterator()

  def batch(self, step: int, batch_size: int, seed: int = 0, shard_index: int = 0,
            num_shards: int = 1) -> Batch:
    """Training batch `step` alone (replays the stream up to it; for tests and notebooks)."""
    return next(self.batches(batch_size, seed, step, shard_index, num_shards))

  def eval_batches(self, batch_size: int, max_batches: Optional[int] = None,
                   shard_index: int = 0, num_shards: int = 1) -> Iterator[Batch]:
    """The split in order, unshuffled, one pass; rows and (with `max_batches`) batches padded.

    Padding is all zeros (`segment_ids` and `loss_weights` too), so weighted sums ignore it.
    With `max_batches` every host yields exactly that many, as collectives need. An empty split
    yields nothing (with a warning).
    """
    rows = _rows(batch_size, shard_index, num_shards)
    ds = self._batched(rows, EVAL_SEED, shard_index, num_shards, repeat=False)
    if max_batches is not None:
      ds = ds.take(max_batches)
    n, spec = 0, None
    with self._tfds_help():
      for b in ds.as_numpy_iterator():
        spec = spec or b
        yield {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in b.items()}
        n += 1
    if spec is None:
      log.warning("The %r split of %r is empty (shard %d of %d): no validation loss.",
                  self.split, self.name, shard_index, num_shards)
      return
    for _ in range(n, max_batches or 0):
      yield {k: np.zeros((rows,) + v.shape[1:], v.dtype) for k, v in spec.items()}


def _rows(batch_size: int, shard_index: int, num_shards: int) -> int:
  if isinstance(batch_size, bool) or batch_size <= 0 or batch_size % num_shards or not (
      0 <= shard_index < num_shards):
    raise ValueError(f"batch_size={batch_size} must be positive and divisible by num_shards="
                     f"{num_shards}, and 0 <= shard_index={shard_index} < num_shards.")
  return batch_size // num_shards


def make_datasets(seq_len: int = DEFAULT_SEQ_LEN, mixture_or_task_name: str = tasks.BUILTIN_TASK,
                  objective=None, mixture_or_task_module=None, train_split: str = "train",
                  validation_split: Optional[str] = "validation"
                  ) -> tuple[SeqioLM, Optional[SeqioLM]]:
  """(train, validation) batch streams of a seqio Task/Mixture; validation None if absent.

  `objective` defaults to causal LM. `mixture_or_task_module` is imported first (T5X's
  `MIXTURE_OR_TASK_MODULE`) so Tasks registered in your own code resolve by name.
  """
  tasks.import_modules(mixture_or_task_module)
  if objective is None:
    from midas_jax import objectives  # pylint: disable=import-outside-toplevel
    objective = objectives.CLM()
  train = SeqioLM(mixture_or_task_name, train_split, seq_len, objective)
  if validation_split and validation_split in train.provider.splits:
    return train, SeqioLM(mixture_or_task_name, validation_split, seq_len, objective)
  log.info("%s has no %r split: no validation loss.", mixture_or_task_name, validation_split)
  return train, None
