"""Data layer: tokenizer, vocab, and the SCAN precomp reader shared by all models.

The synthetic Scenes generator lives in :mod:`thsrn_lib.data.scenes` and is imported on demand
(it is not needed to read data).
"""
from thsrn_lib.data.precomp import (
    Batch,
    ImageBatch,
    PrecompDataset,
    Sample,
    TextBatch,
    collate,
    collate_images,
    collate_texts,
    find_vocab,
    validate_precomp,
)
from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.data.vocab import Vocab

__all__ = [
    "tokenize",
    "Vocab",
    "PrecompDataset",
    "Sample",
    "Batch",
    "TextBatch",
    "ImageBatch",
    "collate",
    "collate_texts",
    "collate_images",
    "validate_precomp",
    "find_vocab",
]
