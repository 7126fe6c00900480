"""Data layer: seqio Tasks (`tasks`), packed objective batches (`pipeline`), text (`corpus`).

Importing this package does not import seqio/TensorFlow; building a dataset does.
"""

from midas_jax.data.corpus import builtin_documents, split_documents, text_file_documents
from midas_jax.data.pipeline import DEFAULT_SEQ_LEN, SeqioLM, make_datasets
from midas_jax.data.tasks import (BUILTIN_TASK, DataError, builtin_task, hf_dataset_task, mixture,
                                  text_files_task, tfds_task, vocabulary)

__all__ = ["builtin_documents", "split_documents", "text_file_documents", "DEFAULT_SEQ_LEN",
           "SeqioLM", "make_datasets", "BUILTIN_TASK", "DataError", "builtin_task",
           "hf_dataset_task", "mixture", "text_files_task", "tfds_task", "vocabulary"]
