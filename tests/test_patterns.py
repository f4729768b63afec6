"""The wafer-level decision: patterns agree with the mask, the batch rule and the calibration rule agree."""

import numpy as np
import pytest
import torch

from pipeline import real_eval
from pipeline.labels import label_classes, normalise_label, patterns_text
from pipeline.model import presence_logits
from pipeline.evaluate import compute_metrics, evaluate_predictions
from pipeline.patterns import CLAIM, PRESENCE, Evidence, MaskEvidence, calibrate_offsets, decide_masks, wafer_patterns
from pipeline.wafer import CLASS_NAMES, FAIL, OFF_WAFER, Wafer

ROUND = np.array([[0, 1, 1, 0],
                  [1, 1, 1, 1],
                  [1, 1, 1, 1],
                  [0, 1, 1, 0]], np.uint8)


def test_wafer_patterns_threshold_ties_and_off_wafer_dies():
    wafer_map = np.ones((4, 5), np.uint8)
    mask = np.zeros((4, 5), np.uint8)
    mask[0, :4] = 3  # local_zone 4 dies
    mask[1, :4] = 2  # scratch 4 dies: tie with local_zone
    assert wafer_patterns(mask, wafer_map, min_dies=5) == ("none", "none")
    assert wafer_patterns(mask, wafer_map, min_dies=4) == ("scratch+local_zone", "scratch")  # tie: lowest id
    mask[2, :] = 3
    assert wafer_patterns(mask, wafer_map, min_dies=4) == ("scratch+local_zone", "local_zone")
    assert wafer_patterns(mask, wafer_map, min_dies=5) == ("local_zone", "local_zone")
    off = np.where(ROUND == OFF_WAFER, 4, 0).astype(np.uint8)  # circle only on the four off-wafer corners
    assert wafer_patterns(off, ROUND, min_dies=1) == ("none", "none")


def _logits(margins: np.ndarray) -> torch.Tensor:
    """(N, 5, H, W) logits whose background score is 0 and defect scores are `margins` (N, 4, H, W)."""
    margins = torch.as_tensor(margins, dtype=torch.float32)
    return torch.cat([torch.zeros_like(margins[:, :1]), margins], dim=1)


def test_presence_pools_only_failing_dies_between_mean_and_max():
    maps = torch.tensor([[[FAIL, FAIL, 1, 0]], [[1, 1, 1, 1]]], dtype=torch.uint8)  # (2, 1, 4)
    margins = np.zeros((2, 4, 1, 4), np.float32)
    margins[0, 1] = [[3.0, -1.0, 50.0, 50.0]]  # the pass and off-wafer dies' 50 must not count
    pooled = presence_logits(_logits(margins), maps == FAIL, sharpness=4.0)
    assert -1.0 < pooled[0, 1].item() < 3.0
    assert pooled[0, 1].item() == pytest.approx(np.log(np.mean(np.exp(4 * np.array([3.0, -1.0])))) / 4, rel=1e-5)
    assert pooled[1].max().item() < -100  # no failing die: nothing present


def test_presence_is_the_log_mean_exp_of_the_failing_dies_with_finite_gradients():
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.choice([OFF_WAFER, 1, FAIL], size=(8, 10, 10), p=[0.2, 0.6, 0.2]).astype(np.uint8))
    maps[0] = 1  # no failing die
    logits = _logits(rng.normal(0.0, 30.0, size=(8, 4, 10, 10))).requires_grad_()  # margins far apart
    pooled = presence_logits(logits, maps == FAIL, sharpness=4.0)
    margins = (logits[:, 1:] - logits[:, :1]).flatten(2) * 4.0
    fail = (maps == FAIL).flatten(1)
    for n in range(1, 8):
        expected = torch.logsumexp(margins[n][:, fail[n]], dim=-1) - np.log(fail[n].sum().item())
        assert torch.allclose(pooled[n], expected / 4.0, rtol=1e-5, atol=1e-5)
    assert (pooled[0] < -100).all()
    pooled.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() == 0


def test_decided_masks_carry_exactly_the_present_classes():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.choice([OFF_WAFER, 1, FAIL], size=(64, 12, 12), p=[0.1, 0.5, 0.4]).astype(np.uint8))
    logits = _logits(rng.normal(-1.0, 2.0, size=(64, 4, 12, 12)))
    offsets = torch.tensor([[0.5, -0.5, 0.0, 1.0], [1.5, -1.0, 0.5, 0.0]])  # presence, claims
    masks = decide_masks(logits, maps, offsets, sharpness=4.0).numpy()
    present = (presence_logits(logits, maps == FAIL, 4.0) + offsets[PRESENCE] > 0).numpy()
    for mask, wafer_map, flags in zip(masks, maps.numpy(), present):
        assert not mask[wafer_map != FAIL].any()  # only failing dies carry a pattern
        carried = {c for c in range(1, 5) if (mask == c).any()}
        assert carried <= {c + 1 for c in np.flatnonzero(flags)}
        patterns, dominant = wafer_patterns(mask, wafer_map, 1)
        assert patterns == patterns_text(carried)
        assert dominant == "none" if not carried else (mask == CLASS_NAMES.index(dominant)).sum() == max(
            (mask == c).sum() for c in carried)
    # each failing die goes to the present class with the largest positive margin plus claim offset
    margins = (logits[:, 1:] - logits[:, :1]).permute(0, 2, 3, 1).numpy() + offsets[CLAIM].numpy()
    margins = np.where(present[:, None, None, :], margins, -np.inf)
    expected = np.where((margins.max(-1) > 0) & (maps.numpy() == FAIL), margins.argmax(-1) + 1, 0)
    np.testing.assert_array_equal(masks, expected)
    # a vector of four offsets is the same offsets for presence and claims
    np.testing.assert_array_equal(decide_masks(logits, maps, offsets[PRESENCE], 4.0).numpy(),
                                  decide_masks(logits, maps, offsets[PRESENCE].expand(2, 4), 4.0).numpy())
    # the calibration's vectorised rule gives the same patterns and dominant classes as the masks
    evidence = Evidence.gather(logits, maps, 4.0)
    patterns, dominant = evidence.decide(offsets.numpy(), 1)
    assert (patterns, dominant) == tuple(map(list, zip(*[wafer_patterns(m, w, 1) for m, w in zip(masks, maps.numpy())])))
    # and reordering wafers reorders their decisions
    order = rng.permutation(64)
    shuffled = evidence.reordered(order).decide(offsets.numpy(), 1)
    assert shuffled[0] == [patterns[i] for i in order] and shuffled[1] == [dominant[i] for i in order]


def test_calibration_finds_the_offset_that_separates_the_classes():
    # wafer i has ring evidence i - 10 on its single failing die; wafers 12..19 truly carry a ring
    n = 20
    maps = torch.full((n, 1, 1), FAIL, dtype=torch.uint8)
    margins = np.full((n, 4, 1, 1), -5.0, np.float32)
    margins[:, 0, 0, 0] = np.arange(n) - 10.0
    evidence = Evidence.gather(_logits(margins), maps, 4.0)
    truth = ["ring" if i >= 12 else "none" for i in range(n)]

    def accuracy(patterns, dominant, confusion):
        assert confusion is None  # no mask evidence given
        return float(np.mean([p == t for p, t in zip(patterns, truth)]))

    offsets, best = calibrate_offsets(evidence, accuracy, 1, np.linspace(-4, 4, 17), rounds=2)
    assert best == 1.0
    # evidence 2 and up is a ring, 1 and below is not: presence and claims move together
    assert offsets.shape == (2, 4) and -2.0 <= offsets[PRESENCE, 0] < -1.0
    assert offsets[CLAIM, 0] == offsets[PRESENCE, 0] and not offsets[:, 1:].any()


def test_calibration_keeps_false_alarms_under_the_cap_rather_than_buy_recall_with_them():
    # one failing die each, scratch evidence: none wafers 0-6 at -3 and 7-9 at -0.5 (noisy), Scratch wafers
    # 10-14 at -0.5 (faint) and 15-19 at +2. An offset of 1 finds the faint scratches and alarms on 3 of 10 none.
    evidence_of_scratch = [-3.0] * 7 + [-0.5] * 3 + [-0.5] * 5 + [2.0] * 5
    margins = np.full((20, 4, 1, 1), -5.0, np.float32)
    margins[:, 1, 0, 0] = evidence_of_scratch
    evidence = Evidence.gather(_logits(margins), torch.full((20, 1, 1), FAIL, dtype=torch.uint8), 4.0)
    labels = ["none"] * 10 + ["Scratch"] * 10

    def calibrated(max_false_alarms):
        def objective(patterns, dominant, confusion):
            scores = real_eval.score_set("wm811k", labels, patterns, dominant)
            return real_eval.calibration_objective([scores], max_false_alarms, penalty=10.0)

        offsets, best = calibrate_offsets(evidence, objective, 1, np.linspace(-4, 4, 17), rounds=2)
        return offsets, best, real_eval.score_set("wm811k", labels, *evidence.decide(offsets, 1))

    offsets, best, scores = calibrated(None)
    assert (offsets[:, 1] >= 1.0).all() and best == pytest.approx(0.85)  # recall Scratch 1.0, none 0.7
    assert scores["false_alarm_rate"] == pytest.approx(0.3)
    offsets, best, scores = calibrated(0.05)
    assert offsets[PRESENCE, 1] < 1.0 and best == pytest.approx(0.75)  # recall Scratch 0.5, none 1.0
    assert scores["false_alarm_rate"] == 0.0


def test_calibration_objective_is_the_mean_main_score_less_the_penalised_excess_of_false_alarms():
    wm811k = {"kind": "wm811k", "balanced_accuracy": 0.8, "false_alarm_rate": 0.08}
    mixed = {"kind": "mixed", "exact_match": 0.6}
    assert real_eval.calibration_objective([wm811k, mixed], None, 10.0) == pytest.approx(0.7)
    assert real_eval.calibration_objective([wm811k, mixed], 0.05, 10.0) == pytest.approx(0.7 - 10 * 0.03)
    assert real_eval.calibration_objective([wm811k, mixed], 0.1, 10.0) == pytest.approx(0.7)
    # with the synthetic val mIoU: the mean of the three, as the selection score
    assert real_eval.calibration_objective([wm811k, mixed], 0.05, 10.0, synthetic_miou=0.4) == pytest.approx(0.6 - 0.3)


def test_labels_map_to_the_contract_classes():
    assert label_classes("Center+Edge-Loc+Scratch") == {2, 3, 4}
    assert patterns_text(label_classes("Center+Edge-Loc+Scratch")) == "scratch+local_zone+circle"
    assert patterns_text(label_classes("Donut+Edge-Ring")) == "ring"
    assert label_classes("Near-full") == label_classes("Random") == label_classes("none") == frozenset()
    assert normalise_label("Scratch+Center") == "Center+Scratch"
    with pytest.raises(ValueError, match="unknown pattern"):
        label_classes("Blob")


def test_claim_offsets_let_a_present_class_take_the_dies_without_raising_alarms():
    # one failing die each. Loc wafers: ring margin 1.0, local_zone 0.5 (both present, the ring takes the die);
    # none wafers: local_zone -0.8; Edge-Ring wafers: a faint ring 0.4, local_zone -3. Moving local_zone's
    # presence and claims together by 0.5 ties with the ring, by 1.0 raises alarms on the none wafers; moving the
    # ring down loses the Edge-Ring wafers. Only local_zone's claims moved alone read all three right.
    ring_lz = [(1.0, 0.5)] * 4 + [(-3.0, -0.8)] * 4 + [(0.4, -3.0)] * 4
    margins = np.full((12, 4, 1, 1), -5.0, np.float32)
    margins[:, 0, 0, 0], margins[:, 2, 0, 0] = zip(*ring_lz)
    evidence = Evidence.gather(_logits(margins), torch.full((12, 1, 1), FAIL, dtype=torch.uint8), 4.0)
    labels = ["Loc"] * 4 + ["none"] * 4 + ["Edge-Ring"] * 4

    def balanced_accuracy(patterns, dominant, confusion=None):
        return real_eval.score_set("wm811k", labels, patterns, dominant)["balanced_accuracy"]

    grid = np.linspace(-4, 4, 17)
    offsets, best = calibrate_offsets(evidence, balanced_accuracy, 1, grid, rounds=2)
    assert best == 1.0
    assert offsets[CLAIM, 2] > offsets[PRESENCE, 2]
    patterns, dominant = evidence.decide(offsets, 1)
    assert dominant == ["local_zone"] * 4 + ["none"] * 4 + ["ring"] * 4
    # without claim deltas the calibration keeps the two rows equal, and cannot read them all
    offsets, best = calibrate_offsets(evidence, balanced_accuracy, 1, grid, rounds=2, claim_deltas=False)
    assert (offsets[CLAIM] == offsets[PRESENCE]).all() and best < 1.0
    # nor can any one offset per class for presence and claims alike
    for ring in grid:
        for local_zone in grid:
            same = np.array([ring, 0.0, local_zone, 0.0])
            assert balanced_accuracy(*evidence.decide(same, 1)) < 1.0


def _synthetic_wafers(n: int, rng: np.random.Generator) -> list[Wafer]:
    """Wafers of mixed sizes with random masks on their on-wafer dies."""
    wafers = []
    for i in range(n):
        height, width = rng.integers(5, 14, size=2)
        wafer_map = rng.choice([OFF_WAFER, 1, FAIL], size=(height, width), p=[0.1, 0.5, 0.4]).astype(np.uint8)
        mask = np.where(wafer_map == OFF_WAFER, 0, rng.integers(0, 5, size=(height, width))).astype(np.uint8)
        wafers.append(Wafer(lot_id="L", wafer_id=f"w{i}", map=wafer_map, mask=mask))
    return wafers


def test_mask_evidence_counts_the_dies_as_the_decided_masks_do():
    rng = np.random.default_rng(3)
    wafers = _synthetic_wafers(12, rng)
    side = 16
    maps = torch.full((12, side, side), OFF_WAFER, dtype=torch.uint8)
    for i, wafer in enumerate(wafers):
        maps[i, :wafer.shape[0], :wafer.shape[1]] = torch.from_numpy(wafer.map)
    logits = _logits(rng.normal(-1.0, 2.0, size=(12, 4, side, side)))
    masks = MaskEvidence.gather(Evidence.gather(logits, maps, 4.0), wafers)
    for offsets in (np.zeros(4), np.array([[0.5, -0.5, 1.0, 0.0], [1.5, -1.0, 0.5, 2.0]])):
        decided = decide_masks(logits, maps, torch.as_tensor(offsets, dtype=torch.float32), 4.0).numpy()
        predictions = [decided[i, :w.shape[0], :w.shape[1]] for i, w in enumerate(wafers)]
        expected, _ = evaluate_predictions(wafers, predictions)
        np.testing.assert_array_equal(masks.confusion(offsets), expected.matrix)
        # leaving out the dies no offset up to 2.5 can claim changes nothing
        np.testing.assert_array_equal(masks.claimable(2.5).confusion(offsets), expected.matrix)
    with pytest.raises(ValueError, match="failing dies in the wafers but"):
        MaskEvidence.gather(Evidence.gather(logits[:11], maps[:11], 4.0), wafers)


def test_calibration_with_masks_fits_the_offsets_to_their_confusion_too():
    # one failing die each, truly scratch; its scratch margin is -0.7 on wafers 0-9: only an offset of 1 or more
    # draws it. The wafers carry no real labels: the objective is the mIoU of the masks alone.
    wafers = [Wafer(lot_id="L", wafer_id=f"w{i}", map=np.array([[FAIL, 1]], np.uint8),
                    mask=np.array([[2, 0]], np.uint8)) for i in range(10)]
    maps = torch.from_numpy(np.stack([w.map for w in wafers]))
    margins = np.full((10, 4, 1, 2), -5.0, np.float32)
    margins[:, 1] = -0.7
    evidence = Evidence.gather(_logits(margins), maps, 4.0)
    masks = MaskEvidence.gather(evidence, wafers)
    seen = []

    def miou(patterns, dominant, confusion):
        seen.append(confusion.sum())
        return compute_metrics(confusion)["miou"]

    offsets, best = calibrate_offsets(evidence, miou, 1, np.linspace(-2, 2, 9), rounds=2, masks=masks)
    assert best == 1.0 and offsets[PRESENCE, 1] >= 1.0 and offsets[CLAIM, 1] >= 1.0
    assert set(seen) == {20}  # every trial counted all 20 on-wafer dies


def test_mask_evidence_of_a_model_matches_its_evaluation_across_padded_batches():
    """evidence_of batches wafers by padded size and puts them back in order: the dies must line up with
    each wafer's true mask, so the calibration's confusion is the one evaluate_model reports."""
    from pipeline.evaluate import evaluate_model
    from pipeline.model import FCN
    from pipeline.predict import evidence_of

    torch.manual_seed(0)
    model = FCN("fcn8s", 0.0625, 0.1, batch_norm=True, global_context=True).eval()
    model.pattern_offsets.copy_(torch.tensor([[2.0, 1.0, 2.5, 1.5], [2.5, 0.5, 2.0, 3.0]]))
    rng = np.random.default_rng(5)
    wafers = _synthetic_wafers(7, rng) + [
        Wafer(lot_id="L", wafer_id=f"big{i}", map=(w := rng.choice([1, FAIL], size=(40, 35)).astype(np.uint8)),
              mask=rng.integers(0, 5, size=w.shape).astype(np.uint8)) for i in range(3)]
    wafers = [wafers[i] for i in rng.permutation(len(wafers))]  # sizes interleaved: several padded buckets
    masks = MaskEvidence.gather(evidence_of(model, wafers, 4, torch.device("cpu")), wafers)
    confusion, _ = evaluate_model(model, wafers, 4, torch.device("cpu"))
    assert confusion.matrix[:, 1:].sum() > 0  # some dies claimed: the order matters
    np.testing.assert_array_equal(masks.confusion(model.pattern_offsets.numpy()), confusion.matrix)
