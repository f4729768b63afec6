"""Wafer-level labels of real data (WM-811K failureType, MixedWM38 pattern sets) and the contract's five classes.

A label is kept as the source wrote it: one WM-811K failureType (`Edge-Loc`), or MixedWM38 patterns joined
by `+` (`Center+Edge-Loc+Scratch`), or `none`. `label_classes` maps it to the defect classes it says are
present; `patterns_text` writes a set of classes the way reports do.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES

NONE = "none"
# The eight patterns in the order MixedWM38 joins them, then the empty label.
PATTERNS: tuple[str, ...] = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random")
WM811K_LABELS: tuple[str, ...] = (*PATTERNS, NONE)
# Pattern -> the contract's class id; Random and Near-full are background (no systematic pattern).
PATTERN_CLASS: dict[str, int | None] = {
    "Center": CLASS_NAMES.index("circle"),
    "Donut": CLASS_NAMES.index("ring"),
    "Edge-Ring": CLASS_NAMES.index("ring"),
    "Edge-Loc": CLASS_NAMES.index("local_zone"),
    "Loc": CLASS_NAMES.index("local_zone"),
    "Scratch": CLASS_NAMES.index("scratch"),
    "Near-full": None,
    "Random": None,
    NONE: None,
}
NO_PATTERN_LABELS = frozenset(name for name, cls in PATTERN_CLASS.items() if cls is None)


@lru_cache(maxsize=4096)  # labels repeat: a few dozen distinct strings over tens of thousands of wafers
def parse_label(text: object) -> tuple[str, ...]:
    """The patterns of a label, in MixedWM38 order (`()` for `none`); ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"label {text!r} is empty; expected a WM-811K failureType, patterns joined by '+', or 'none'")
    if text.strip() == NONE:
        return ()
    parts = [part.strip() for part in text.split("+")]
    unknown = [part for part in parts if part not in PATTERNS]
    if unknown:
        raise ValueError(f"label {text!r}: unknown pattern(s) {unknown}; known: {', '.join(PATTERNS)} or 'none'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"label {text!r} names a pattern twice")
    return tuple(sorted(parts, key=PATTERNS.index))


def normalise_label(text: object) -> str:
    """The label in its canonical spelling: patterns in MixedWM38 order joined by '+', or 'none'."""
    return "+".join(parse_label(text)) or NONE


def label_classes(text: object) -> frozenset[int]:
    """Defect class ids (1-4) a label says are present: `Center+Edge-Loc+Scratch` -> {2, 3, 4}."""
    return frozenset(cls for part in parse_label(text) if (cls := PATTERN_CLASS[part]) is not None)


def patterns_text(class_ids: Iterable[int]) -> str:
    """Class ids as reports write them: names in class-id order joined by '+', or 'none'."""
    present = sorted({int(c) for c in class_ids if int(c) in DEFECT_CLASSES})
    return "+".join(CLASS_NAMES[c] for c in present) or NONE


def expected_dominant(text: object) -> str:
    """The `dominant_class` a single-pattern WM-811K label asks for (the contract's table): a class name or 'none'."""
    classes = label_classes(text)
    if len(classes) > 1:
        raise ValueError(f"label {text!r} names several classes; a dominant class is defined for one")
    return CLASS_NAMES[next(iter(classes))] if classes else NONE
