"""seqio vocabularies, Tasks and Mixtures: what to train on, chosen by name in gin.

Every source is a registered seqio Task whose examples carry one tokenized document in
`targets` (ending in EOS); the objective (`midas_jax.objectives`) turns documents into
training examples later, so any Task can be trained with any objective.

    midas_builtin                       the built-in corpus (always available, offline)
    @midas_jax.data.text_files_task()   your text files (one document per line, or per file)
    @midas_jax.data.tfds_task()         any TFDS dataset with a text feature, e.g. c4/en
    @midas_jax.data.hf_dataset_task()   a Hugging Face `datasets` dataset (parquet, arrow, JSON...)
    @midas_jax.data.mixture()           a seqio Mixture of any of these, with rates

The register functions return the name, so gin can bind `MIXTURE_OR_TASK_NAME` to a call.
Tasks registered the T5X way (a Python module imported through `MIXTURE_OR_TASK_MODULE`) work
by name too. seqio (and TensorFlow) are imported lazily: only the data layer needs them.
"""

from __future__ import annotations

import functools
import glob
import importlib
import logging
import os
import zlib
from typing import Optional, Sequence

import gin

from midas_jax.data import corpus

log = logging.getLogger("midas_jax")
BUILTIN_TASK = "midas_builtin"
DEFAULT_EXTRA_IDS = 100  # the lowest 3 are UL2's mode tokens, the rest sentinels
BUILTIN_VALIDATION_FRACTION = 0.02
_DEFINITIONS: dict[str, tuple] = {}  # name -> definition, for idempotent re-registration


class DataError(ValueError):
  """A data configuration problem; the message says what to change."""


def _seqio():
  import seqio  # pylint: disable=import-outside-toplevel  (lazy: pulls in TensorFlow)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # TF must not grab the accelerator JAX trains on (as T5X does).
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised; it then had no GPU to grab in our processes
    pass
  return seqio


@gin.configurable(module="midas_jax.data")
def vocabulary(sentencepiece_model: Optional[str] = None, extra_ids: int = DEFAULT_EXTRA_IDS):
  """The seqio vocabulary: bytes (default) or a SentencePiece model, plus `extra_ids`.

  Extra ids hold UL2's three mode tokens and the span sentinels. Train a SentencePiece model on
  your corpus with `python -m midas_jax.data.train_tokenizer`.
  """
  return _vocabulary(sentencepiece_model, int(extra_ids))


@functools.lru_cache(maxsize=None)
def _vocabulary(sentencepiece_model, extra_ids):
  seqio = _seqio()
  if extra_ids < 0:
    raise DataError(f"vocabulary.extra_ids must be >= 0, got {extra_ids}.")
  if not sentencepiece_model:
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not tf.io.gfile.exists(sentencepiece_model):
    raise DataError(f"SentencePiece model {sentencepiece_model!r} does not exist. Train one with "
                    "`python -m midas_jax.data.train_tokenizer --output=<prefix>` and set "
                    "midas_jax.data.vocabulary.sentencepiece_model='<prefix>.model'.")
  return seqio.SentencePieceVocabulary(sentencepiece_model, extra_ids=extra_ids)


def _document_task(seqio, name, source, vocab, text_key="text", extra_preprocessors=()):
  """A Task whose `targets` are the tokenized `text_key` of each source example, plus EOS."""
  return seqio.Task(
      name, source=source,
      output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=_tf().int32)},
      preprocessors=[*extra_preprocessors,
                     functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
                     functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                     seqio.preprocessors.append_eos])


def _tf():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf


def _register(name: str, definition: tuple, make) -> str:
  """Register `make()` as `name`; re-registering the same definition is a no-op."""
  seqio = _seqio()
  if _DEFINITIONS.get(name) == definition:
    return name
  if name in _DEFINITIONS or name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    raise DataError(
        f"A seqio Task or Mixture named {name!r} is already registered"
        + (f" as {_DEFINITIONS[name]}" if name in _DEFINITIONS else " (by another module)")
        + f", so it cannot be registered again as {definition}. Give this one another name.")
  provider = make(seqio)
  registry = seqio.MixtureRegistry if isinstance(provider, seqio.Mixture) else seqio.TaskRegistry
  registry.add_provider(name, provider)
  _DEFINITIONS[name] = definition
  return name


def builtin_task(vocab=None) -> str:
  """Register (once per vocabulary) and return `midas_builtin`: the built-in corpus as a Task."""
  vocab = vocab if vocab is not None else vocabulary()
  definition = ("builtin", _vocab_key(vocab))
  seqio = _seqio()
  if _DEFINITIONS.get(BUILTIN_TASK) not in (None, definition):
    seqio.TaskRegistry.remove(BUILTIN_TASK)  # ours: follow the vocabulary chosen in gin
    del _DEFINITIONS[BUILTIN_TASK]

  def make(seqio):
    train, val = corpus.split_documents(corpus.builtin_documents(), BUILTIN_VALIDATION_FRACTION)
    splits = {"train": train, "validation": val}

    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
      docs = splits[split]
      return _tf().data.Dataset.from_tensor_slices(
          {"id": [n for n, _ in docs], "text": [t for _, t in docs]})
    source = seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"),
                                      num_input_examples={k: len(v) for k, v in splits.items()})
    return _document_task(seqio, BUILTIN_TASK, source, vocab)
  return _register(BUILTIN_TASK, definition, make)


def _vocab_key(vocab) -> tuple:
  return (type(vocab).__name__, getattr(vocab, "sentencepiece_model_file", None), vocab.extra_ids)


@gin.configurable(module="midas_jax.data")
def text_files_task(name: str = gin.REQUIRED, files=gin.REQUIRED, unit: str = "line",
                    validation_files=None, validation_fraction: float = 0.02,
                    vocab=None) -> str:
  """Register a Task over your text files (glob patterns) and return its name.

  `unit="line"`: one document per non-empty line, read with `seqio.TextLineDataSource` (JSONL-
  style dumps, one article per line). `unit="file"`: one document per file (long files split at
  blank lines), for prose. The validation split is `validation_files` if given, else a stable
  hash of each document's text (lines) or name (files) sends `validation_fraction` of them there.
  """
  vocab = vocab if vocab is not None else vocabulary()
  files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
  val_files = ([validation_files] if isinstance(validation_files, (str, os.PathLike))
               else list(validation_files or []))
  if unit not in ("line", "file"):
    raise DataError(f"text_files_task.unit must be 'line' or 'file', got {unit!r}.")
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  _check_globs(files + val_files, local=unit == "file")
  _warn_if_binary(files + val_files, local=unit == "file")
  definition = ("text_files", tuple(map(str, files)), unit, tuple(map(str, val_files)),
                float(validation_fraction), _vocab_key(vocab))

  def make(seqio):
    if unit == "file":
      docs = corpus.text_file_documents(files)
      if val_files:
        splits = {"train": docs, "validation": corpus.text_file_documents(val_files)}
      else:
        splits = dict(zip(("train", "validation"),
                          corpus.split_documents(docs, validation_fraction)))

      def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        return _tf().data.Dataset.from_tensor_slices(
            {"text": [t for _, t in splits[split]] or [""]}).filter(
                lambda ex: _tf().strings.length(ex["text"]) > 0)
      source = seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))
      return _document_task(seqio, name, source, vocab)
    if val_files:
      source = seqio.TextLineDataSource({"train": [str(f) for f in files],
                                         "validation": [str(f) for f in val_files]})
    else:  # both splits read the same files; a stable hash of each line picks its split
      source = _hash_split_text_line_source(seqio)([str(f) for f in files], validation_fraction)
    as_doc = lambda ds: ds.map(lambda line: {"text": line}).filter(  # noqa: E731
        lambda ex: _tf().strings.length(_tf().strings.strip(ex["text"])) > 0)
    return _document_task(seqio, name, source, vocab, extra_preprocessors=[as_doc])
  return _register(name, definition, make)


@functools.lru_cache(maxsize=None)
def _hash_split_text_line_source(seqio):
  """`seqio.TextLineDataSource` whose train/validation splits are one file set split by hash."""

  class HashSplitTextLineSource(seqio.TextLineDataSource):
    def __init__(self, files, validation_fraction):
      super().__init__({"train": files, "validation": files})
      self.validation_fraction = validation_fraction

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kw):
      tf = _tf()
      ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kw)
      cut = int(self.validation_fraction * 10_000)
      in_val = lambda line: tf.strings.to_hash_bucket_fast(line, 10_000) < cut  # noqa: E731
      return ds.filter(in_val if split == "validation" else lambda l: tf.logical_not(in_val(l)))
  return HashSplitTextLineSource


def _check_globs(patterns, local: bool = False) -> None:
  """Each pattern must match a file: as unit='file' reads them (Python glob, `**` allowed), or
  as seqio.TextLineDataSource does (tf.io.gfile.glob: local or gs://, no `**`)."""
  for p in patterns:
    if not _matches(p, local):
      raise DataError(f"No file matches {str(p)!r} (cwd: {os.getcwd()}); check the path or glob "
                      "in text_files_task.files / validation_files.")


def _matches(pattern, local: bool) -> list[str]:
  return ([f for f in glob.glob(str(pattern), recursive=True) if os.path.isfile(f)] if local
          else _tf().io.gfile.glob(str(pattern)))


def _warn_if_binary(patterns, local: bool, max_files: int = 20) -> None:
  """Warn about files whose first 8 KB hold a NUL byte or invalid UTF-8: they are not text,
  yet would train without complaint (read as bytes, or as U+FFFD)."""
  for path in [f for p in patterns for f in _matches(p, local)][:max_files]:
    with _tf().io.gfile.GFile(path, "rb") as f:
      head = f.read(8192)
    try:
      binary = "\0" in head.decode("utf-8")
    except UnicodeDecodeError as e:
      binary = e.start < len(head) - 3  # not just a character cut by the 8 KB limit
    if binary:
      log.warning("%s does not look like text (NUL bytes or invalid UTF-8); check "
                  "text_files_task.files: it trains on it anyway.", path)


@gin.configurable(module="midas_jax.data")
def tfds_task(name: str = gin.REQUIRED, tfds_name: str = gin.REQUIRED, text_key: str = "text",
              splits: Optional[dict] = None, data_dir: Optional[str] = None, vocab=None) -> str:
  """Register a Task over a TFDS dataset's `text_key` feature (e.g. `c4/en:3.0.1`, `text`).

  `splits` maps our split names to TFDS split names (default `train` and `validation`).
  `data_dir` (default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`) must already hold the
  prepared dataset: nothing is downloaded at run time (see docs/data.md).
  """
  vocab = vocab if vocab is not None else vocabulary()
  splits = dict(splits or {"train": "train", "validation": "validation"})
  definition = ("tfds", tfds_name, text_key, tuple(sorted(splits.items())), data_dir,
                _vocab_key(vocab))

  def make(seqio):
    # read_only: as_dataset() on prepared data; never download_and_prepare() at run time.
    source = seqio.TfdsDataSource(tfds_name, splits=splits, tfds_data_dir=data_dir,
                                  read_only=True)
    return _document_task(seqio, name, source, vocab, text_key=text_key)
  return _register(name, definition, make)


@gin.configurable(module="midas_jax.data")
def hf_dataset_task(name: str = gin.REQUIRED, path: str = gin.REQUIRED, text_key: str = "text",
                    data_files=None, config_name: Optional[str] = None,
                    splits: Optional[dict] = None, validation_fraction: float = 0.02,
                    vocab=None) -> str:
  """Register a Task over a Hugging Face `datasets` dataset's `text_key` column; return its name.

  `path`, `config_name` and `data_files` go to `datasets.load_dataset`: a file builder
  (`'parquet'`, `'arrow'`, `'json'`, `'csv'`, `'text'`) with `data_files` (a glob, a list, or
  `{split: globs}`), a local dataset directory, or a hub name (from the HF cache; from the hub
  only when online). `splits` maps our split names to the dataset's (default `train` and
  `validation`); without the validation split, a stable hash of each text sends
  `validation_fraction` of the train split there. Rows stream in the dataset's order, so
  seqio's seeded shuffle, per-host sharding and resumption work as for the other sources.
  """
  vocab = vocab if vocab is not None else vocabulary()
  splits = dict(splits or {"train": "train", "validation": "validation"})
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  files = data_files if isinstance(data_files, dict) else {"*": data_files}
  local = [f for v in files.values() if v for f in ([v] if isinstance(v, str) else v)
           if "://" not in str(f)]
  _check_globs(local, local=True)
  definition = ("hf_dataset", path, config_name, repr(data_files), text_key,
                tuple(sorted(splits.items())), float(validation_fraction), _vocab_key(vocab))

  def make(seqio):
    loaded = {}  # the DatasetDict, loaded on the first read rather than at registration

    def rows(split):
      """(this split's HF dataset, whether its rows are cut by hash from the train split)."""
      if not loaded:
        import datasets  # pylint: disable=import-outside-toplevel  (lazy: only this source)
        loaded.update(datasets.load_dataset(path, name=config_name, data_files=data_files))
      hashed = split in ("train", "validation") and splits["validation"] not in loaded
      hf_split = splits["train"] if hashed else splits[split]
      if hf_split not in loaded:
        raise DataError(f"hf_dataset_task {name!r}: {path} has no split {hf_split!r} (it has "
                        f"{sorted(loaded)}); map our split names to its with `splits`.")
      if text_key not in loaded[hf_split].column_names:
        raise DataError(f"hf_dataset_task {name!r}: {path} has no column {text_key!r} (it has "
                        f"{loaded[hf_split].column_names}); set text_key.")
      return loaded[hf_split].select_columns([text_key]), hashed

    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed  # rows in the dataset's order; the Task shuffles examples
      source, hashed = rows(split)
      cut = int(validation_fraction * 10_000)

      def texts():
        for batch in source.iter(batch_size=1024):
          for text in batch[text_key]:
            if text and (not hashed or (zlib.crc32(text.encode("utf-8")) % 10_000 < cut)
                         == (split == "validation")):
              yield text
      tf = _tf()
      return tf.data.Dataset.from_generator(
          texts, output_signature=tf.TensorSpec((), tf.string)).map(lambda t: {"text": t})
    source = seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))
    return _document_task(seqio, name, source, vocab)
  return _register(name, definition, make)


@gin.configurable(module="midas_jax.data")
def mixture(name: str = gin.REQUIRED, tasks_and_rates: Sequence = gin.REQUIRED) -> str:
  """Register a seqio Mixture of `(task_name, rate)` pairs (rates need not sum to 1)."""
  pairs = [(str(t), float(r)) for t, r in tasks_and_rates]
  if not pairs or any(r < 0 for _, r in pairs) or sum(r for _, r in pairs) <= 0:
    raise DataError(f"mixture {name!r} needs (task, rate) pairs with rates >= 0 and a positive "
                    f"sum; got {pairs}.")
  for t, _ in pairs:
    get_provider(t)  # a clear error for an unknown task, now rather than at the first batch
  return _register(name, ("mixture", tuple(pairs)),
                   lambda seqio: seqio.Mixture(name, pairs))


def unregister(*names: str) -> None:
  """Remove Tasks/Mixtures from seqio's registries (and ours), e.g. to redefine one in a
  notebook or after a test."""
  seqio = _seqio()
  for name in names:
    for registry in (seqio.TaskRegistry, seqio.MixtureRegistry):
      if name in registry.names():
        registry.remove(name)
    _DEFINITIONS.pop(name, None)


def import_modules(modules) -> None:
  """Import the modules that register Tasks/Mixtures (T5X's `MIXTURE_OR_TASK_MODULE`)."""
  for module in [modules] if isinstance(modules, str) else (modules or ()):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise DataError(f"Cannot import MIXTURE_OR_TASK_MODULE {module!r}: {e}. It must be an "
                      "importable module (on PYTHONPATH) that registers your seqio Tasks.") from e


def get_provider(name: str):
  """The registered Task or Mixture `name`, or a DataError listing what is registered."""
  seqio = _seqio()
  if name == BUILTIN_TASK and name not in seqio.TaskRegistry.names():
    builtin_task()
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    if BUILTIN_TASK not in seqio.TaskRegistry.names():
      builtin_task()  # always available, so listed
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise DataError(
        f"No seqio Task or Mixture is registered as {name!r}. Registered: {names[:20]}"
        f"{' ...' if len(names) > 20 else ''}. Register it in gin (text_files_task, tfds_task, "
        "mixture) or import the module that does with MIXTURE_OR_TASK_MODULE.") from e


def is_tfds(provider) -> bool:
  seqio = _seqio()
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  return any(isinstance(t.source, seqio.TfdsDataSource) for t in tasks)


def tfds_help(provider, error: Exception) -> DataError:
  """A DataError explaining how to make a TFDS-backed Task readable offline."""
  seqio = _seqio()
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  loaders = [t.source.tfds_dataset for t in tasks if isinstance(t.source, seqio.TfdsDataSource)]
  names = [loader.name for loader in loaders]
  data_dir = (next((loader.data_dir for loader in loaders if loader.data_dir), None)
              or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  first = names[0] if names else "<name>"
  return DataError(
      f"Could not read TFDS dataset(s) {names} for {provider.name!r} from the TFDS data dir "
      f"({data_dir}): {type(error).__name__}: {str(error).splitlines()[0][:300]}\n"
      "Nothing is downloaded at run time. On a machine with network access run\n"
      f"  tfds build {first.split(':')[0]} --data_dir=/path/to/tfds   (or tfds.load(...))\n"
      "copy /path/to/tfds to this machine (or a gs:// bucket), then set TFDS_DATA_DIR=/path/to/"
      "tfds or --gin.midas_jax.data.tfds_task.data_dir=\"'/path/to/tfds'\".")
