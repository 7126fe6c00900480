"""Data layer: text corpora (`corpus`) and packed byte-level LM batches (`pipeline`).

Importing this package does not import seqio/TensorFlow; tokenising does.
"""

from midas_jax.data.corpus import builtin_documents, split_documents, text_file_documents
from midas_jax.data.pipeline import (DEFAULT_SEQ_LEN, SOURCES, PackedLM, byte_vocabulary,
                                     make_datasets, tokenize)

__all__ = ["builtin_documents", "split_documents", "text_file_documents", "DEFAULT_SEQ_LEN",
           "SOURCES", "PackedLM", "byte_vocabulary", "make_datasets", "tokenize"]
