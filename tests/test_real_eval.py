"""Wafer-level scores on real labels, checked cell by cell on small hand-built fixtures."""

from __future__ import annotations

import json
import re

import pytest

from pipeline import real_eval

# 12 wafers: (WM-811K label, predicted dominant_class). No Donut, so Donut must be left out of the per-label dicts.
WM811K = [
    ("Center", "circle"), ("Center", "local_zone"), ("Center", "circle"),
    ("Edge-Ring", "ring"), ("Edge-Ring", "none"),
    ("Edge-Loc", "local_zone"), ("Loc", "scratch"), ("Scratch", "scratch"),
    ("none", "none"), ("none", "scratch"), ("Random", "none"), ("Near-full", "ring"),
]
# 8 wafers: (MixedWM38 label, predicted patterns).
MIXED = [
    ("Center+Edge-Loc+Scratch", "scratch+local_zone+circle"), ("Donut+Edge-Ring", "ring"), ("none", "none"),
    ("Center+Loc", "circle"), ("Center+Edge-Loc", "circle"), ("Random", "ring"),
    ("Scratch", "scratch+local_zone"), ("Edge-Ring+Loc", "ring+local_zone"),
]


def wm811k() -> dict:
    return real_eval.wm811k_scores(*zip(*WM811K))


def mixed() -> dict:
    return real_eval.mixed_scores(*zip(*MIXED))


def test_wm811k_confusion_cells():
    scores = wm811k()
    assert scores["outcomes"] == ["none", "ring", "scratch", "local_zone", "circle"]
    assert scores["labels"] == ["Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch",
                                "Random", "none"]
    assert scores["confusion"] == [
        [0, 0, 0, 1, 2],  # Center
        [0, 0, 0, 0, 0],  # Donut
        [0, 0, 0, 1, 0],  # Edge-Loc
        [1, 1, 0, 0, 0],  # Edge-Ring
        [0, 0, 1, 0, 0],  # Loc
        [0, 1, 0, 0, 0],  # Near-full
        [0, 0, 1, 0, 0],  # Scratch
        [1, 0, 0, 0, 0],  # Random
        [1, 0, 1, 0, 0],  # none
    ]
    assert scores["wafers"] == 12


def test_wm811k_recall_balanced_accuracy_and_false_alarms():
    scores = wm811k()
    assert scores["counts"] == {"Center": 3, "Edge-Loc": 1, "Edge-Ring": 2, "Loc": 1, "Near-full": 1,
                                "Scratch": 1, "Random": 1, "none": 2}
    assert scores["recall"] == pytest.approx({"Center": 2 / 3, "Edge-Loc": 1.0, "Edge-Ring": 0.5, "Loc": 0.0,
                                              "Near-full": 0.0, "Scratch": 1.0, "Random": 1.0, "none": 0.5})
    assert "Donut" not in scores["recall"]
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5 + 0 + 0 + 1 + 1 + 0.5) / 8)
    assert scores["accuracy"] == pytest.approx(7 / 12)
    # none/Random/Near-full: 4 wafers, of which none->scratch and Near-full->ring got a pattern.
    assert scores["false_alarm_rate"] == pytest.approx(0.5)
    assert scores["false_alarm_wafers"] == 2


def test_wm811k_without_quiet_wafers_has_no_false_alarm_rate():
    scores = real_eval.wm811k_scores(["Scratch"], ["scratch"])
    assert scores["false_alarm_rate"] is None
    assert json.loads(json.dumps(real_eval.headline(scores), allow_nan=False))["false_alarm_rate"] is None


@pytest.mark.parametrize(("label", "outcome", "named"), [
    ("Edge-Lok", "none", "Edge-Lok"),               # unknown pattern
    ("Center+Loc", "circle", "Center+Loc"),         # multi-pattern: no single expected dominant class
    ("Center", "background", "background"),         # not a dominant_class
    ("", "none", "empty"),
])
def test_wm811k_bad_input_names_it(label, outcome, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        real_eval.wm811k_scores(["none", label], ["none", outcome])


def test_lengths_must_match_and_not_be_empty():
    with pytest.raises(ValueError, match="2 labels but 1"):
        real_eval.wm811k_scores(["none", "none"], ["none"])
    with pytest.raises(ValueError, match="no wafers"):
        real_eval.mixed_scores([], [])


def test_mixed_exact_match_f1_and_most_confused():
    scores = mixed()
    assert scores["wafers"] == 8
    assert scores["exact_match"] == pytest.approx(4 / 8)
    assert scores["support"] == {"ring": 2, "scratch": 2, "local_zone": 4, "circle": 3}
    assert scores["precision"] == pytest.approx({"ring": 2 / 3, "scratch": 1.0, "local_zone": 2 / 3, "circle": 1.0})
    assert scores["recall"] == pytest.approx({"ring": 1.0, "scratch": 1.0, "local_zone": 0.5, "circle": 1.0})
    assert scores["f1"] == pytest.approx({"ring": 0.8, "scratch": 1.0, "local_zone": 4 / 7, "circle": 1.0})
    assert scores["macro_f1"] == pytest.approx((0.8 + 1 + 4 / 7 + 1) / 4)
    assert scores["most_confused"] == [
        {"truth": "local_zone+circle", "predicted": "circle", "wafers": 2},
        {"truth": "none", "predicted": "ring", "wafers": 1},
        {"truth": "scratch", "predicted": "scratch+local_zone", "wafers": 1},
    ]


def test_mixed_scores_single_wm811k_labels_and_leaves_absent_classes_out():
    scores = real_eval.mixed_scores(["Center", "Random", "Loc", "Near-full"], ["circle", "none", "none", "none"])
    assert scores["exact_match"] == pytest.approx(3 / 4)
    assert set(scores["f1"]) == {"circle", "local_zone"}  # ring, scratch: neither true nor predicted anywhere
    assert scores["f1"] == {"circle": 1.0, "local_zone": 0.0}
    assert scores["most_confused"] == [{"truth": "local_zone", "predicted": "none", "wafers": 1}]


def test_most_confused_keeps_the_ten_commonest():
    truths = ["Center", "Donut", "Edge-Loc", "Scratch", "none"]
    guesses = ["none", "ring", "scratch", "local_zone", "circle", "ring+circle", "scratch+circle"]
    labels, predicted = [], []
    for truth in truths:
        for guess in guesses:
            labels.append(truth)
            predicted.append(guess)
    labels += ["Center"] * 5
    predicted += ["none"] * 5
    confused = real_eval.mixed_scores(labels, predicted)["most_confused"]
    assert len(confused) == 10
    assert confused[0] == {"truth": "circle", "predicted": "none", "wafers": 6}


@pytest.mark.parametrize(("label", "guess", "named"), [
    ("Center+Lok", "circle", "Lok"), ("Center", "circle+donut", "donut"), ("Center", "", "empty"),
])
def test_mixed_bad_input_names_it(label, guess, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        real_eval.mixed_scores([label], [guess])


def test_headlines_are_json_without_nan_and_without_confusion():
    for scores in (wm811k(), mixed()):
        text = json.dumps(real_eval.headline(scores), allow_nan=False)
        assert "confusion" not in text and "most_confused" not in text
    head = real_eval.headline(wm811k())
    assert head["balanced_accuracy"] == round(7 / 12, 4) and head["false_alarm_rate"] == 0.5
    assert head["recall"]["Center"] == round(2 / 3, 4)
    assert real_eval.headline(mixed())["f1"]["local_zone"] == round(4 / 7, 4)
    with pytest.raises(ValueError, match="unknown kind"):
        real_eval.headline({})


def test_tables_list_every_label_and_summary():
    table = real_eval.scores_table_md(wm811k())
    assert "| Center | 3 | circle | 66.7% |" in table
    assert "Donut" not in table and "balanced accuracy" in table and "| 50.0% |" in table
    table = real_eval.scores_table_md(mixed())
    assert "| local_zone | 4 | 66.7% | 50.0% | 57.1% |" in table
    assert "exact match" in table and "macro F1" in table


@pytest.mark.parametrize("confused", [True, False])
@pytest.mark.slow
def test_plots_write_png(tmp_path, confused):
    confusion = real_eval.plot_wm811k_confusion(wm811k(), tmp_path / "a" / "wm811k.png", "fixture")
    scores = mixed() if confused else real_eval.mixed_scores(["Center"], ["circle"])
    presence = real_eval.plot_mixed_presence(scores, tmp_path / "b" / "mixed.png", "fixture")
    for path in (confusion, presence):
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
