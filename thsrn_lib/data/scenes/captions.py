"""Caption grammar: five distinct captions per scene, with token-level object alignments.

A caption is built from a :class:`CaptionPlan` (kind, sentence frame, mentions, optional
relation), realised as a list of :class:`Token` objects, each knowing which objects it
names and as what (``colour``, ``shape``, ``size``, ``pattern``, ``count``, ``relation``).
The string is the tokens joined with spaces (punctuation attached, first letter upper-case),
and the generator checks that ``tokenize(caption)`` gives back exactly those tokens, so
token positions in the alignments are positions in ``tokenize(caption)``.

Kinds of caption:

- ``single``: one object ("A small red circle.", "There is a striped star.");
- ``list``: two or three mentions ("A red circle, two blue squares and a big star.");
- ``count``: a group of 2-4 objects sharing attributes ("There are three green shapes" is
  *not* used; the shape noun is always named: "Two green triangles.");
- ``relation``: "A red circle to the left of a large yellow star."

Every singular mention is a *referring expression*: its attributes pick out exactly one
object of the scene (attributes are added until they do), so an aligned word always names a
well-defined object. A count mention names *all* objects with its attributes.

Binding captions (:func:`binding_captions`) mention two objects that differ in some
attribute, state that attribute for both, and come with the caption whose two values are
swapped ("a red circle and a blue square" -> "a blue circle and a red square": the same
words, only bound to other objects), kept only if the swapped caption is false for the scene.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thsrn_lib.data.scenes.meaning import fits
from thsrn_lib.data.scenes.world import Scene, SceneObject

__all__ = [
    "WORD_TYPES",
    "Token",
    "Mention",
    "CaptionPlan",
    "Caption",
    "realise",
    "scene_captions",
    "binding_captions",
]

WORD_TYPES: tuple[str, ...] = ("colour", "shape", "size", "pattern", "count", "relation")

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PATTERN_WORDS: dict[str, str] = {"striped": "striped", "plain": "plain"}
# (singular, plural) per synonym
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "cross": (("cross", "crosses"),),
    "hexagon": (("hexagon", "hexagons"),),
}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
# relation -> (phrase words, index of the head word that carries the relation)
RELATION_PHRASES: dict[str, tuple[tuple[tuple[str, ...], int], ...]] = {
    "left_of": ((("to", "the", "left", "of"), 2), (("left", "of"), 0), (("on", "the", "left", "of"), 2)),
    "right_of": ((("to", "the", "right", "of"), 2), (("right", "of"), 0), (("on", "the", "right", "of"), 2)),
    "above": ((("above",), 0), (("over",), 0)),
    "below": ((("below",), 0), (("under",), 0), (("beneath",), 0)),
    "next_to": ((("next", "to"), 0), (("beside",), 0), (("near",), 0)),
}
# Frames: "NPS" is the joined mention list; "BE" agrees with the first mention.
LIST_FRAMES: tuple[tuple[str, ...], ...] = (
    ("NPS", "."),
    ("there", "BE", "NPS", "."),
    ("a", "picture", "of", "NPS", "."),
    ("an", "image", "with", "NPS", "."),
    ("this", "picture", "shows", "NPS", "."),
    ("NPS", "in", "the", "picture", "."),
    ("we", "can", "see", "NPS", "."),
)
RELATION_FRAMES: tuple[tuple[str, ...], ...] = (
    ("A", "REL", "B", "."),
    ("there", "BE", "A", "REL", "B", "."),
    ("A", "is", "REL", "B", "."),
    ("a", "picture", "of", "A", "REL", "B", "."),
    ("you", "can", "see", "A", "REL", "B", "."),
)
_KIND_WEIGHTS = {"single": 0.12, "list": 0.38, "count": 0.12, "relation": 0.38}
_OPTIONAL_ATTRS = ("colour", "size", "pattern")
_VOWELS = set("aeiou")


@dataclass(frozen=True)
class Token:
    """One caption token; ``objects`` are the scene objects it names (empty for function words)."""

    text: str
    type: str | None = None  # one of WORD_TYPES, or None
    objects: tuple[int, ...] = ()
    in_relation: bool = False


@dataclass(frozen=True)
class Mention:
    """A noun phrase naming ``objects``. ``count`` None: "a ..." (one object); n: "n ..." (all n)."""

    objects: tuple[int, ...]
    shape: str
    colour: str | None = None
    size: str | None = None
    pattern: str | None = None
    count: int | None = None
    size_word: int = 0  # synonym choices
    shape_word: int = 0

    def meaning(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "pattern": self.pattern,
                "count": self.count}


@dataclass(frozen=True)
class CaptionPlan:
    kind: str
    frame: int
    mentions: tuple[Mention, ...]
    relation: str | None = None  # subject = mentions[0], object = mentions[1]
    phrase: int = 0


@dataclass
class Caption:
    """A realised caption: its text, tokens (== ``tokenize(text)``) and meaning."""

    text: str
    tokens: list[Token]
    meaning: dict[str, Any]
    relations: list[dict[str, Any]] = field(default_factory=list)  # relation phrases (token positions)


# ---------------------------------------------------------------------------- realisation
def _mention_tokens(m: Mention, in_relation: bool) -> list[Token]:
    objs = m.objects
    words: list[Token] = []
    if m.size is not None:
        syn = SIZE_WORDS[m.size]
        words.append(Token(syn[m.size_word % len(syn)], "size", objs, in_relation))
    if m.colour is not None:
        words.append(Token(m.colour, "colour", objs, in_relation))
    if m.pattern is not None:
        words.append(Token(PATTERN_WORDS[m.pattern], "pattern", objs, in_relation))
    syn_shape = SHAPE_WORDS[m.shape]
    sing, plur = syn_shape[m.shape_word % len(syn_shape)]
    words.append(Token(plur if m.count else sing, "shape", objs, in_relation))
    if m.count:
        head = Token(COUNT_WORDS[m.count], "count", objs, in_relation)
    else:
        head = Token("an" if words[0].text[0] in _VOWELS else "a")
    return [head, *words]


def _join(mentions: list[list[Token]]) -> list[Token]:
    out: list[Token] = []
    for k, toks in enumerate(mentions):
        if k > 0:
            out.append(Token("and") if k == len(mentions) - 1 else Token(","))
        out.extend(toks)
    return out


def _to_text(tokens: list[Token]) -> str:
    parts: list[str] = []
    for t in tokens:
        if t.text in (",", ".") and parts:
            parts[-1] += t.text
        else:
            parts.append(t.text)
    text = " ".join(parts)
    return text[:1].upper() + text[1:]


def realise(plan: CaptionPlan) -> Caption:
    """Turn a plan into tokens, text and meaning (deterministic: no randomness here)."""
    be = "are" if plan.mentions[0].count else "is"
    rel_info: list[dict[str, Any]] = []
    tokens: list[Token] = []
    if plan.relation is None:
        frame = LIST_FRAMES[plan.frame]
        for slot in frame:
            if slot == "NPS":
                tokens.extend(_join([_mention_tokens(m, False) for m in plan.mentions]))
            else:
                tokens.append(Token(be if slot == "BE" else slot))
    else:
        frame = RELATION_FRAMES[plan.frame]
        a, b = plan.mentions[0], plan.mentions[1]
        words, head = RELATION_PHRASES[plan.relation][plan.phrase]
        for slot in frame:
            if slot == "A":
                tokens.extend(_mention_tokens(a, True))
            elif slot == "B":
                tokens.extend(_mention_tokens(b, True))
            elif slot == "REL":
                start = len(tokens)
                for j, w in enumerate(words):
                    tokens.append(Token(w, "relation", a.objects + b.objects, True) if j == head else Token(w))
                rel_info.append({"tokens": list(range(start, start + len(words))), "head": start + head,
                                 "phrase": " ".join(words), "relation": plan.relation,
                                 "subject": list(a.objects), "object": list(b.objects)})
            else:
                tokens.append(Token(be if slot == "BE" else slot))
    meaning = {
        "mentions": [m.meaning() for m in plan.mentions],
        "relation": None if plan.relation is None else {"type": plan.relation, "subject": 0, "object": 1},
    }
    return Caption(_to_text(tokens), tokens, meaning, rel_info)


# ---------------------------------------------------------------------------- mention choice
class _View:
    """Per-scene lookups used while planning captions (built once per scene)."""

    def __init__(self, scene: Scene, use_patterns: bool) -> None:
        self.scene = scene
        self.use_patterns = use_patterns
        self.attrs = [o.attributes() for o in scene.objects]
        self.ids_with: dict[tuple[str, str], frozenset[int]] = {}
        for o, attrs in zip(scene.objects, self.attrs):
            for key in attrs.items():
                self.ids_with[key] = self.ids_with.get(key, frozenset()) | {o.id}
        self.rels: dict[tuple[int, int], list[str]] = {}
        for name, pairs in scene.relations.items():
            for pair in pairs:
                self.rels.setdefault(tuple(pair), []).append(name)
        self.groups = self._groups()

    def matching(self, attrs: dict[str, str]) -> frozenset[int]:
        """Ids of the objects that have every attribute value in ``attrs``."""
        out: frozenset[int] | None = None
        for key in attrs.items():
            ids = self.ids_with.get(key, frozenset())
            out = ids if out is None else out & ids
        return out if out is not None else frozenset(range(len(self.attrs)))

    def _groups(self) -> list[tuple[dict[str, str], tuple[int, ...]]]:
        """Every attribute set (shape plus a subset of the others) matched by 2-4 objects."""
        subsets: list[tuple[str, ...]] = [(), ("colour",), ("size",), ("colour", "size")]
        if self.use_patterns:
            subsets += [("pattern",), ("colour", "pattern")]
        seen: dict[tuple, tuple[dict[str, str], tuple[int, ...]]] = {}
        for o in self.attrs:
            for sub in subsets:
                attrs = {"shape": o["shape"], **{a: o[a] for a in sub}}
                key = tuple(attrs.items())
                if key not in seen:
                    ids = tuple(sorted(self.matching(attrs)))
                    if 2 <= len(ids) <= max(COUNT_WORDS):
                        seen[key] = (attrs, ids)
        return list(seen.values())


def _weighted(rng: np.random.Generator, weights: list[float]) -> int:
    """Index drawn with probability proportional to ``weights`` (cheaper than rng.choice(p=...))."""
    target = rng.random() * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return len(weights) - 1


def refer(rng: np.random.Generator, view: _View, obj: SceneObject, force: tuple[str, ...] = (),
          detailed: bool = False) -> Mention | None:
    """A singular mention that picks out ``obj`` alone, or None if no attribute set does.

    ``detailed`` (used when the caption has only this mention) states more attributes, so
    that such captions do not fit a third of all images ("A cross.").
    """
    own = view.attrs[obj.id]
    attrs = {"shape": own["shape"]}
    for a in force:
        attrs[a] = own[a]
    striped = own["pattern"] == "striped"
    use_patterns = view.use_patterns
    if detailed:
        probs = {"colour": 1.0, "size": 0.6, "pattern": (0.7 if striped else 0.1) if use_patterns else 0}
    else:
        probs = {"colour": 0.85, "size": 0.35, "pattern": (0.5 if striped else 0.05) if use_patterns else 0}
    for a in _OPTIONAL_ATTRS:
        if a not in attrs and rng.random() < probs[a]:
            attrs[a] = own[a]
    match = view.matching(attrs)
    missing = [a for a in _OPTIONAL_ATTRS if a not in attrs and (use_patterns or a != "pattern")]
    rng.shuffle(missing)
    # add missing attributes (random order) while they narrow the match down
    for a in missing:
        if len(match) == 1:
            break
        narrowed = match & view.ids_with[(a, own[a])]
        if len(narrowed) < len(match):
            attrs[a] = own[a]
            match = narrowed
    if match != {obj.id}:
        return None
    return _mention(rng, (obj.id,), attrs, None)


def _mention(rng: np.random.Generator, objects: tuple[int, ...], attrs: dict[str, str], count: int | None) -> Mention:
    return Mention(objects, attrs["shape"], attrs.get("colour"), attrs.get("size"), attrs.get("pattern"), count,
                   size_word=int(rng.integers(6)), shape_word=int(rng.integers(2)))


# ---------------------------------------------------------------------------- plans
def _plan(rng: np.random.Generator, view: _View, kind: str) -> CaptionPlan | None:
    objs = view.scene.objects
    order = [objs[int(i)] for i in rng.permutation(len(objs))]
    groups = view.groups
    if kind == "single":
        for o in order:
            m = refer(rng, view, o, detailed=True)
            if m is not None:
                return CaptionPlan(kind, int(rng.integers(len(LIST_FRAMES))), (m,))
        return None
    if kind == "count":
        if not groups:
            return None
        # prefer groups named by more attributes ("two red circles" over "two circles")
        attrs, ids = groups[_weighted(rng, [len(g[0]) ** 2 for g in groups])]
        return CaptionPlan(kind, int(rng.integers(len(LIST_FRAMES))), (_mention(rng, ids, attrs, len(ids)),))
    if kind == "list":
        want = 3 if len(objs) >= 3 and rng.random() < 0.3 else 2
        used: set[int] = set()
        mentions: list[Mention] = []
        for o in order:
            if len(mentions) == want:
                break
            free = [g for g in groups if used.isdisjoint(g[1])]
            if free and rng.random() < 0.2:
                attrs, ids = free[int(rng.integers(len(free)))]
                m = _mention(rng, ids, attrs, len(ids))
            elif o.id not in used:
                m = refer(rng, view, o)
            else:
                m = None
            if m is not None:
                mentions.append(m)
                used.update(m.objects)
        if len(mentions) < 2:
            return None
        return CaptionPlan(kind, int(rng.integers(len(LIST_FRAMES))), tuple(mentions))
    if kind == "relation":
        for a in order:
            for b in order:
                rels = view.rels.get((a.id, b.id))
                if not rels:
                    continue
                ma, mb = refer(rng, view, a), refer(rng, view, b)
                if ma is None or mb is None:
                    continue
                rel = rels[int(rng.integers(len(rels)))]
                return CaptionPlan(kind, int(rng.integers(len(RELATION_FRAMES))), (ma, mb), rel,
                                   int(rng.integers(len(RELATION_PHRASES[rel]))))
        return None
    raise ValueError(f"unknown caption kind {kind!r}")


def scene_captions(rng: np.random.Generator, scene: Scene, n: int = 5, use_patterns: bool = True,
                   max_tries: int = 200) -> list[Caption] | None:
    """``n`` distinct captions of ``scene``, or None if the grammar cannot find that many."""
    kinds = list(_KIND_WEIGHTS)
    weights = list(_KIND_WEIGHTS.values())
    view = _View(scene, use_patterns)
    out: list[Caption] = []
    texts: set[str] = set()
    for _ in range(max_tries):
        plan = _plan(rng, view, kinds[_weighted(rng, weights)])
        if plan is None:
            continue
        cap = realise(plan)
        if cap.text not in texts:
            texts.add(cap.text)
            out.append(cap)
            if len(out) == n:
                return out
    return None


# ---------------------------------------------------------------------------- binding
_SWAP_WEIGHTS = {"colour": 0.5, "shape": 0.2, "size": 0.2, "pattern": 0.1}


def _binding_plan(rng: np.random.Generator, view: _View,
                  scene_record: dict[str, Any]) -> tuple[CaptionPlan, CaptionPlan, dict[str, Any]] | None:
    objs = view.scene.objects
    pairs = [(a, b) for a in objs for b in objs if a.id != b.id]
    a, b = pairs[int(rng.integers(len(pairs)))]
    attrs = [t for t in _SWAP_WEIGHTS if getattr(a, t) != getattr(b, t) and (view.use_patterns or t != "pattern")]
    if not attrs:
        return None
    t = attrs[_weighted(rng, [_SWAP_WEIGHTS[x] for x in attrs])]
    ma, mb = refer(rng, view, a, force=(t,)), refer(rng, view, b, force=(t,))
    if ma is None or mb is None:
        return None
    rels = view.rels.get((a.id, b.id))
    if rels and rng.random() < 0.5:
        rel = rels[int(rng.integers(len(rels)))]
        plan = CaptionPlan("relation", int(rng.integers(len(RELATION_FRAMES))), (ma, mb), rel,
                           int(rng.integers(len(RELATION_PHRASES[rel]))))
    else:
        mentions = [ma, mb]
        rest = [o for o in objs if o.id not in (a.id, b.id)]
        if rest and rng.random() < 0.25:
            mc = refer(rng, view, rest[int(rng.integers(len(rest)))])
            if mc is not None:
                mentions.insert(int(rng.integers(3)), mc)
        plan = CaptionPlan("list", int(rng.integers(len(LIST_FRAMES))), tuple(mentions))
    # Swap the words themselves (value and synonym choice), so that the swapped caption has
    # exactly the same bag of words: only the binding of words to objects differs.
    fields_t = (t, f"{t}_word") if t in ("size", "shape") else (t,)
    sa = {f: getattr(ma, f) for f in fields_t}
    sb = {f: getattr(mb, f) for f in fields_t}
    va, vb = sa[t], sb[t]
    swapped_mentions = tuple(
        dataclasses.replace(m, **sb) if m is ma else dataclasses.replace(m, **sa) if m is mb else m
        for m in plan.mentions
    )
    swapped = dataclasses.replace(plan, mentions=swapped_mentions)
    if fits(realise(swapped).meaning, scene_record):
        return None  # the "swap" happens to be true of this scene too: not a binding test
    return plan, swapped, {"attribute": t, "values": [va, vb], "objects": [a.id, b.id]}


def binding_captions(rng: np.random.Generator, scene: Scene, n: int = 5, use_patterns: bool = True,
                     max_tries: int = 200) -> list[tuple[Caption, Caption, dict[str, Any]]] | None:
    """``n`` distinct (caption, swapped caption, swap info) triples, or None if not possible."""
    if len(scene.objects) < 2:
        return None
    view = _View(scene, use_patterns)
    record = scene.to_record()
    out: list[tuple[Caption, Caption, dict[str, Any]]] = []
    texts: set[str] = set()
    for _ in range(max_tries):
        res = _binding_plan(rng, view, record)
        if res is None:
            continue
        plan, swapped, info = res
        cap = realise(plan)
        if cap.text not in texts:
            texts.add(cap.text)
            out.append((cap, realise(swapped), info))
            if len(out) == n:
                return out
    return None
