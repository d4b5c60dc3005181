"""The English stop-word list shipped with the library (used by the offline concept extractor).

Written for this library (no download, no external list): function words that carry no visual
concept in an image caption. Groups: articles and determiners, pronouns, forms of *be*/*have*/*do*
and the modals, conjunctions, prepositions (spatial ones included: they describe a relation, not
an object), common adverbs, and the word pieces the Treebank tokenizer leaves behind when it splits
contractions (``can't`` -> ``ca`` ``n't``, ``gonna`` -> ``gon`` ``na``).

Numbers ("two", "three") are *not* stop words: counts are visible in an image.
"""

from __future__ import annotations

__all__ = ["ENGLISH_STOP_WORDS"]

_DETERMINERS = """
a an the this that these those some any each every another other others such both either neither
all few more most many much several own same no
"""
_PRONOUNS = """
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one ones someone something
somebody anyone anything anybody everyone everything everybody nobody nothing who whom whose which
what whatever whoever whichever
"""
_VERBS = """
am is are was were be been being have has had having do does did doing done will would shall should
can could may might must ought get gets got getting
"""
_CONJUNCTIONS = """
and or but nor so yet if then else than because while although though unless until whether as
since whereas
"""
_PREPOSITIONS = """
at by for from in into of off on onto out over under up down with within without to toward towards
upon about above across after against along alongside among amongst around before behind below
beneath beside besides between beyond during inside near nearby outside past through throughout via
per like atop amid
"""
_ADVERBS = """
not only just very too also again ever still here there where when why how now once always often
quite rather almost even really perhaps maybe soon already yes
"""
_FRAGMENTS = """
ca wo gon na wan ta gim lem
"""

ENGLISH_STOP_WORDS: frozenset[str] = frozenset(
    " ".join([_DETERMINERS, _PRONOUNS, _VERBS, _CONJUNCTIONS, _PREPOSITIONS, _ADVERBS, _FRAGMENTS]).split()
)
