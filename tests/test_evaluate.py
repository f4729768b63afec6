import math

import numpy as np
import pytest
import torch

from pipeline.evaluate import (
    ConfusionMatrix,
    class_die_counts,
    compute_metrics,
    evaluate_predictions,
    plot_confusion,
    plot_overlays,
)
from pipeline.wafer import validate_wafer

# 12 on-wafer dies; the four corners are off-wafer.
WAFER_MAP = np.array([[0, 1, 1, 0],
                      [1, 2, 2, 1],
                      [1, 2, 1, 1],
                      [0, 1, 1, 0]], dtype=np.uint8)
TRUTH = np.array([[0, 0, 0, 0],
                  [1, 1, 1, 0],
                  [0, 2, 2, 0],
                  [0, 0, 0, 0]], dtype=np.uint8)
# The corners predict circle (4): off-wafer, so circle must stay absent.
PREDICTION = np.array([[4, 0, 1, 4],
                       [1, 1, 0, 0],
                       [0, 2, 3, 0],
                       [4, 0, 0, 4]], dtype=np.uint8)
# On-wafer (truth, prediction) pairs: (0,0) x6, (0,1) x1, (1,1) x2, (1,0) x1, (2,2) x1, (2,3) x1.
EXPECTED_MATRIX = np.array([[6, 1, 0, 0, 0],
                            [1, 2, 0, 0, 0],
                            [0, 0, 1, 1, 0],
                            [0, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0]])
# IoU = TP / (row sum + column sum - TP):
#   background 6 / (7 + 7 - 6) = 0.75    ring 2 / (3 + 3 - 2) = 0.5    scratch 1 / (2 + 1 - 1) = 0.5
#   local_zone 0 / (0 + 1 - 0) = 0 (predicted only)    circle: no die in truth or prediction -> NaN
# mIoU = (0.75 + 0.5 + 0.5 + 0) / 4 = 0.4375; defect mIoU = (0.5 + 0.5 + 0) / 3; accuracy = 9 / 12.


def hand_case_matrix() -> ConfusionMatrix:
    confusion = ConfusionMatrix()
    confusion.update(TRUTH, PREDICTION, WAFER_MAP != 0)
    return confusion


def test_hand_computed_case():
    confusion = hand_case_matrix()
    np.testing.assert_array_equal(confusion.matrix, EXPECTED_MATRIX)
    assert confusion.matrix.dtype == np.int64
    metrics = compute_metrics(confusion.matrix)
    np.testing.assert_allclose(metrics["iou"], [0.75, 0.5, 0.5, 0.0, np.nan])
    assert metrics["miou"] == pytest.approx(0.4375)
    assert metrics["defect_miou"] == pytest.approx(1 / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(0.75)
    assert metrics["iou_ring"] == 0.5 and metrics["iou_local_zone"] == 0.0 and math.isnan(metrics["iou_circle"])


def test_off_wafer_dies_are_ignored():
    confusion = hand_case_matrix()
    wrong_off_wafer = np.where(WAFER_MAP == 0, 3, PREDICTION)
    confusion.update(TRUTH, wrong_off_wafer, WAFER_MAP != 0)
    np.testing.assert_array_equal(confusion.matrix, 2 * EXPECTED_MATRIX)


def test_torch_and_numpy_inputs_give_the_same_matrix():
    generator = np.random.default_rng(0)
    truth = generator.integers(0, 5, (3, 16, 20), dtype=np.uint8)
    prediction = generator.integers(0, 5, (3, 16, 20), dtype=np.uint8)
    valid = generator.random((3, 16, 20)) > 0.3
    from_numpy = ConfusionMatrix()
    for wafer in range(3):
        from_numpy.update(truth[wafer], prediction[wafer], valid[wafer])
    from_torch = ConfusionMatrix()
    from_torch.update(torch.from_numpy(truth), torch.from_numpy(prediction).long(), torch.from_numpy(valid))
    np.testing.assert_array_equal(from_torch.matrix, from_numpy.matrix)
    assert from_numpy.matrix.sum() == valid.sum()


def test_merge_adds_and_reset_clears():
    merged = hand_case_matrix().merge(hand_case_matrix())
    np.testing.assert_array_equal(merged.matrix, 2 * EXPECTED_MATRIX)
    merged.reset()
    assert merged.matrix.sum() == 0
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(ConfusionMatrix(num_classes=3))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"class ids \[7\] outside 0..4"):
        ConfusionMatrix().update(TRUTH, np.where(WAFER_MAP == 2, 7, PREDICTION), WAFER_MAP != 0)
    with pytest.raises(ValueError, match="shapes differ"):
        ConfusionMatrix().update(TRUTH, PREDICTION[:3], WAFER_MAP != 0)


def test_absent_classes_are_nan_and_left_out_of_means():
    only_background = np.zeros((5, 5), np.int64)
    only_background[0, 0] = 10
    metrics = compute_metrics(only_background)
    assert metrics["iou"][0] == 1.0 and all(math.isnan(v) for v in metrics["iou"][1:])
    assert metrics["miou"] == 1.0
    assert math.isnan(metrics["defect_miou"])  # no defect anywhere: nothing to average
    assert math.isnan(compute_metrics(np.zeros((5, 5), np.int64))["pixel_accuracy"])


def test_defect_miou_excludes_background():
    matrix = np.diag([1000, 1, 1, 1, 1])
    matrix[1, 0] = 1  # one ring die missed: ring IoU 0.5, background IoU 1000/1001
    metrics = compute_metrics(matrix)
    assert metrics["defect_miou"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert metrics["miou"] == pytest.approx((1000 / 1001 + 0.5 + 3) / 5)


def test_class_die_counts_ignore_off_wafer():
    counts = class_die_counts(PREDICTION, WAFER_MAP)
    np.testing.assert_array_equal(counts, [7, 3, 1, 1, 0])  # corner 4s are off-wafer
    assert counts.sum() == np.count_nonzero(WAFER_MAP)


def test_evaluate_predictions_matches_the_hand_case():
    wafers = [validate_wafer("LOT1", "01", WAFER_MAP, TRUTH), validate_wafer("LOT1", "02", WAFER_MAP, TRUTH)]
    confusion, metrics = evaluate_predictions(wafers, [PREDICTION, PREDICTION])
    np.testing.assert_array_equal(confusion.matrix, 2 * EXPECTED_MATRIX)
    assert metrics["miou"] == pytest.approx(0.4375)
    with pytest.raises(ValueError, match="LOT1/03.*no mask"):
        evaluate_predictions([validate_wafer("LOT1", "03", WAFER_MAP)], [PREDICTION])


@pytest.mark.slow
def test_plots_write_png_files(tmp_path):
    confusion_png = plot_confusion(EXPECTED_MATRIX, tmp_path / "plots" / "confusion.png")
    wafers = [validate_wafer("LOT1", "01", WAFER_MAP, TRUTH), validate_wafer("LOT1", "02", WAFER_MAP)]
    overlays_png = plot_overlays(wafers, [PREDICTION, PREDICTION], tmp_path / "overlays.png", n=2)
    for png in (confusion_png, overlays_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
