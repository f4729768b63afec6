"""Running a model over wafers: batches bucketed by padded size, padding, and argmax predictions.

Training (validation), evaluation and batch inference all go through these functions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch

from pipeline.model import STRIDE, autocast_context, encode_maps
from pipeline.patterns import Evidence, decide_masks
from pipeline.wafer import OFF_WAFER, Wafer

IGNORE_INDEX = 255


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // STRIDE) * STRIDE, -(-shape[1] // STRIDE) * STRIDE)


def bucket_batches(
    shapes: Sequence[tuple[int, int]], batch_wafers: int, rng: np.random.Generator | None = None,
    max_pixels: int | None = None,
) -> list[np.ndarray]:
    """Positions grouped into batches whose wafers pad to the same size, so no die is padded twice.

    With `rng`, wafers are shuffled within buckets and batches shuffled across them. With `max_pixels`, a
    bucket of large maps gets smaller batches (at least one wafer): memory stays flat whatever the map size.
    """
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, shape in enumerate(shapes):
        buckets[padded_shape(shape)].append(position)
    batches = []
    for key in sorted(buckets):
        positions = np.asarray(buckets[key])
        if rng is not None:
            positions = rng.permutation(positions)
        size = batch_wafers if max_pixels is None else max(1, min(batch_wafers, max_pixels // (key[0] * key[1])))
        batches += [positions[i : i + size] for i in range(0, len(positions), size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def stack_padded(grids: Sequence[np.ndarray], fill: int) -> np.ndarray:
    """(N, H, W) array of grids padded at the bottom/right to their common padded size."""
    height, width = padded_shape((max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)))
    out = np.full((len(grids), height, width), fill, dtype=np.uint8)
    for i, grid in enumerate(grids):
        out[i, : grid.shape[0], : grid.shape[1]] = grid
    return out


def model_input(maps: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = encode_maps(maps.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def batch_logits(
    model: torch.nn.Module,
    maps: torch.Tensor,
    device: torch.device,
    amp: bool,
    channels_last: bool,
) -> torch.Tensor:
    with autocast_context(device, training=False, enabled=amp):
        # contiguous: the decision reduces over dies, 1.5x slower on channels_last strides
        return model(model_input(maps, device, channels_last)).float().contiguous()


@torch.inference_mode()
def predict_maps(
    model: torch.nn.Module,
    maps: torch.Tensor,
    device: torch.device,
    amp: bool,
    channels_last: bool,
) -> torch.Tensor:
    """Class per die for a padded batch under the wafer-level decision (patterns.decide_masks): only the
    classes judged present claim dies, and a die that passes is background by definition."""
    logits = batch_logits(model, maps, device, amp, channels_last)
    return decide_masks(logits, maps, model.pattern_offsets, model.presence_sharpness)


def compiled_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` under torch.compile with Inductor's freezing, for a model whose weights no longer change.

    Freezing folds the weights in as constants: cast to bf16 and packed for oneDNN once instead of on
    every call (eager autocast spends ~85 ms of a 64-wafer width-1 batch casting them), and fuses conv +
    ReLU. Each new batch shape compiles once (20-30 s on 2 busy cores), so it pays off for long jobs only:
    about 1.2x eager bf16 + channels_last at width 1 (benchmarks/results/speed-cpu.md).
    """
    return torch.compile(model, options={"freezing": True})


def padded_batches(wafers: Sequence[Wafer], batch_wafers: int, max_pixels: int | None = None
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions, padded maps) of every batch of `wafers`, bucketed by padded size."""
    for batch in bucket_batches([w.shape for w in wafers], batch_wafers, max_pixels=max_pixels):
        yield batch, torch.from_numpy(stack_padded([wafers[i].map for i in batch], OFF_WAFER))


def evidence_of(
    model: torch.nn.Module,
    wafers: Sequence[Wafer],
    batch_wafers: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
) -> Evidence:
    """The decision's inputs for every wafer, in the order of `wafers` (patterns.Evidence)."""
    model.eval()
    parts, order = [], []
    for batch, maps in padded_batches(wafers, batch_wafers):
        parts.append(Evidence.gather(batch_logits(model, maps, device, amp, channels_last), maps,
                                     model.presence_sharpness))
        order.extend(batch)
    return Evidence.concatenate(parts).reordered(np.argsort(order))


def predict_wafers(
    model: torch.nn.Module,
    wafers: Sequence[Wafer],
    batch_wafers: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    max_pixels: int | None = None,
    streams: int = 1,
) -> list[np.ndarray]:
    """Predicted uint8 masks, in the order of `wafers`, each cropped to its wafer's shape. `streams` > 1
    predicts that many batches at once on their own threads (each with torch's thread count as it is now)."""
    model.eval()
    predictions: list[np.ndarray | None] = [None] * len(wafers)

    def predict(item: tuple[np.ndarray, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        batch, maps = item
        return batch, predict_maps(model, maps, device, amp, channels_last).cpu().numpy()

    batches = padded_batches(wafers, batch_wafers, max_pixels)
    with ThreadPoolExecutor(streams) if streams > 1 else nullcontext() as pool:
        # threads made per call: each takes torch's thread count when it first runs an op
        for batch, predicted in (pool.map(predict, batches) if pool else map(predict, batches)):
            for row, position in enumerate(batch):
                height, width = wafers[position].shape
                predictions[position] = predicted[row, :height, :width].copy()
    return predictions  # type: ignore[return-value]
