"""Text utilities beyond tokenisation: the shipped stop words and concept vocabularies (HJE's labels)."""

from .concepts import (
    EXTRACTORS,
    LABEL_MODES,
    ConceptVocab,
    extract_concepts,
    get_extractor,
    ids_to_multi_hot,
    label_matrix,
    normalize_plural,
    rules_concept,
    vocab_words,
)
from .stopwords import ENGLISH_STOP_WORDS

__all__ = [
    "ENGLISH_STOP_WORDS",
    "EXTRACTORS",
    "LABEL_MODES",
    "ConceptVocab",
    "extract_concepts",
    "get_extractor",
    "ids_to_multi_hot",
    "label_matrix",
    "normalize_plural",
    "rules_concept",
    "vocab_words",
]
