"""Batch inference: every wafer of a source is predicted and reported per lot, or quarantined with its reason.

Reading, compute and report writing overlap: a reader thread parses the source ahead, the model runs on
batches that span many lots (bucketed by padded size), and a writer thread renders finished lots.
"""

from __future__ import annotations

import csv
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import report
from pipeline.atomic import atomic_file, targets_with_leftovers
from pipeline.device import select_device
from pipeline.io import Rejected, iter_source, read_wafers, write_npy_lots
from pipeline.locks import hold_lock, release, try_lock
from pipeline.model import folded_for_inference
from pipeline.params import Params
from pipeline.predict import predict_wafers
from pipeline.registry import load_model
from pipeline.wafer import CLASS_NAMES, RUN_QUARANTINE_FILE, Wafer, WaferError, check_id

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"  # one lock file per lot being reported (hidden: not a lot)
UNASSIGNED_QUARANTINE = RUN_QUARANTINE_FILE  # inputs that belong to no usable lot, at the top of OUT
QUARANTINE_LOCK_TIMEOUT_S = 60  # OUT/quarantine.csv is held for one read and one write
_DONE = object()


@dataclass
class Lot:
    lot_id: str
    wafers: list[Wafer] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def n_read(self) -> int:
        return len(self.wafers) + len(self.rejected)


@dataclass
class InferSummary:
    model_version: str
    read: int = 0
    reported: int = 0
    quarantined: int = 0
    skipped: int = 0  # wafers of lots already reported by this model version, or being reported by another run
    lots_reported: int = 0
    lots_skipped: int = 0
    lots_left_to_others: int = 0  # of lots_skipped: another run held the lot's lock
    reported_lots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    class_mix: dict[str, int] = field(default_factory=dict)

    @property
    def wafers_per_s(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


def _lot_of(item: Wafer | Rejected) -> str | None:
    """The lot directory an item may go to, or None when its lot id is missing or unsafe."""
    if item.lot_id is None:
        return None
    try:
        return check_id(item.lot_id, "lot_id", getattr(item, "source", ""))
    except WaferError:
        return None


def _withhold_duplicates(lot: Lot) -> Lot:
    """Inputs that claim the same wafer of a lot (two files, two rows) cannot be told apart: none of them
    is reported, and each wafer among them is quarantined naming every source."""
    claims = Counter(item.wafer_id for item in (*lot.wafers, *lot.rejected) if item.wafer_id is not None)
    if all(count == 1 for count in claims.values()):
        return lot
    kept = [wafer for wafer in lot.wafers if claims[wafer.wafer_id] == 1]
    withheld = [Rejected.from_error(WaferError(
        wafer.source, f"{claims[wafer.wafer_id]} inputs claim this wafer ({_sources_of(lot, wafer.wafer_id)}); "
                      "none of them is reported", lot.lot_id, wafer.wafer_id))
        for wafer in lot.wafers if claims[wafer.wafer_id] > 1]
    return Lot(lot.lot_id, kept, lot.rejected + withheld)


def _sources_of(lot: Lot, wafer_id: str) -> str:
    return ", ".join(sorted({item.source for item in (*lot.wafers, *lot.rejected) if item.wafer_id == wafer_id}))


def group_lots(items: Iterator[Wafer | Rejected], unassigned: list[Rejected]) -> Iterator[Lot]:
    """Consecutive items of one lot become a Lot (sources yield lots together); lot-less rejects, and wafers
    of a lot that shows up again after it was closed, go aside with the reason."""
    current: Lot | None = None
    closed: set[str] = set()
    for item in items:
        lot_id = _lot_of(item)
        if lot_id is None or lot_id in closed:
            reason = ("lot_id is missing or unusable as a directory name" if lot_id is None else
                      f"lot {lot_id} reappears after its other wafers; the source must keep a lot's wafers together")
            unassigned.append(Rejected(item.source, item.lot_id, item.wafer_id,
                                       item.reason if isinstance(item, Rejected) else reason))
            continue
        if current is None or current.lot_id != lot_id:
            if current is not None:
                closed.add(current.lot_id)
                yield _withhold_duplicates(current)
            current = Lot(lot_id)
        (current.wafers if isinstance(item, Wafer) else current.rejected).append(item)
    if current is not None:
        yield _withhold_duplicates(current)


def read_ahead(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a thread, `depth` items ahead, so parsing overlaps compute."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)

    def fill() -> None:
        try:
            for item in iterator:
                buffer.put(item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put(error)
        buffer.put(_DONE)

    threading.Thread(target=fill, daemon=True, name="waferseg-reader").start()
    while (item := buffer.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


def chunks_of_lots(lots: Iterator[Lot], min_wafers: int) -> Iterator[list[Lot]]:
    """Whole lots gathered until they hold at least `min_wafers` wafers: batches then span lots."""
    chunk: list[Lot] = []
    wafers = 0
    for lot in lots:
        chunk.append(lot)
        wafers += len(lot.wafers)
        if wafers >= min_wafers:
            yield chunk
            chunk, wafers = [], 0
    if chunk:
        yield chunk


def _read_sources(sources: Sequence[Path], lot_wafers: int, named: bool) -> Iterator[Wafer | Rejected]:
    """Every item of every source; a source that cannot be opened at all becomes one Rejected."""
    for source in sources:
        try:
            yield from iter_source(source, wafers_per_lot=lot_wafers, named=named)
        except WaferError as error:
            yield Rejected.from_error(error)


def claim_lot(out: Path, lot_id: str) -> TextIO | None:
    """The lot's lock, held while this run decides on and writes its report; None when another run holds it.
    With the check for a current report made under the lock, two runs on one inbox report each lot once."""
    return try_lock(out / LOCKS_DIR / f"{lot_id}.lock")


def _write_unassigned(out: Path, rejected: list[Rejected]) -> None:
    """Add this run's lot-less rejects to OUT/quarantine.csv, each row once, under the file's lock: runs at
    once on one OUT (infer_lots groups, two nightlies) keep each other's rows. Replaced atomically."""
    target = out / UNASSIGNED_QUARANTINE
    columns = report.QUARANTINE_COLUMNS
    with hold_lock(out / LOCKS_DIR / f"{UNASSIGNED_QUARANTINE}.lock", QUARANTINE_LOCK_TIMEOUT_S):
        kept = []
        if target.is_file():
            with open(target, encoding="utf-8", newline="") as handle:
                kept = [tuple(row[c] for c in columns) for row in csv.DictReader(handle)]
        new = [tuple(report.spreadsheet_cell("" if getattr(r, c) is None else str(getattr(r, c))) for c in columns)
               for r in rejected]
        with atomic_file(target) as staging:
            report.write_csv(staging, columns, [dict(zip(columns, row)) for row in dict.fromkeys(kept + new)])


class LotWriter:
    """Lot reports built on one thread and published on another (each waits for its files to be on disk,
    renames its directory into place and releases the lot's lock), so the disk's sync of one lot overlaps
    building the next. A failed report stops the run at the next raise_failures rather than being lost."""

    def __init__(self) -> None:
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waferseg-writer")
        self.publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waferseg-publisher")
        self.pending: list[Future] = []  # of the builder: each gives its lot's publish future

    def __enter__(self) -> LotWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.builder.shutdown(wait=True)
        self.publisher.shutdown(wait=True)

    def submit(self, lock: TextIO, *args) -> None:
        """Report a lot (report.build_lot_report's arguments) held by `lock`, released once it is published."""
        self.pending.append(self.builder.submit(self._build, lock, *args))

    def _build(self, lock: TextIO, *args) -> Future:
        try:
            build = report.build_lot_report(*args)
        except BaseException:
            release(lock)
            raise
        published = self.publisher.submit(build.publish)
        published.add_done_callback(lambda _: release(lock))
        return published

    def raise_failures(self, wait: bool = False) -> None:
        """Raise the first failed report among those finished (all of them, waiting, with `wait`)."""
        for built in list(self.pending):
            if wait or built.done():
                published = built.result()
                if wait or published.done():
                    published.result()
                    self.pending.remove(built)


_THREADS_LOCK = threading.Lock()
_threads_users = 0  # infer runs inside this process (a flow may run several in threads) ...
_threads_before = 0  # ... and torch's thread count before the first of them


@contextmanager
def model_streams(threads: int | None, device: torch.device) -> Iterator[int]:
    """How many batches the model predicts at once: on the CPU `threads` (default: one per core this process
    may use), each on its own thread with torch single-threaded for the duration. Single-threaded batches side
    by side keep both cores busy while the report threads come and go; one batch on two OpenMP threads waits
    at every barrier for a thread the reports have taken. The setting is process-wide: runs at once in
    threads share it, and the last to finish restores it."""
    global _threads_users, _threads_before
    if device.type != "cpu":
        yield 1
        return
    with _THREADS_LOCK:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        _threads_users += 1
        torch.set_num_threads(1)
    try:
        yield threads or len(os.sched_getaffinity(0))
    finally:
        with _THREADS_LOCK:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)


def inference_model(uri: str, params: Params, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model `infer` runs, and its version label: BatchNorm folded into the convs, channels_last if asked."""
    model, version = load_model(uri, params.registry, device)
    model = folded_for_inference(model)
    if params.infer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, version


def infer(source: Path | Sequence[Path], out: Path, params: Params, model_uri: str | None = None, force: bool = False,
          index: bool = True, named: bool = False) -> InferSummary:
    """The `infer` stage: predict every lot of `source` (one source or several) with the model and write
    per-lot reports to `out`, then the cross-lot index unless `index` is False (callers running several
    `infer` at once on one `out` write it once at the end). `named`: the user named these sources on the
    command line, so a WM-811K pickle among them is opened; inbox entries never are."""
    sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    started = time.perf_counter()
    device = select_device(params.train.device)
    model, version = inference_model(model_uri or params.infer.model_uri, params, device)
    amp, channels_last = params.infer.amp, params.infer.channels_last
    out.mkdir(parents=True, exist_ok=True)
    summary = InferSummary(version)
    unassigned: list[Rejected] = []

    def lot_done(lot: Lot, reported: bool) -> None:
        summary.read += lot.n_read
        summary.quarantined += len(lot.rejected)
        if reported:
            summary.reported += len(lot.wafers)
            summary.lots_reported += 1
            summary.reported_lots.append(lot.lot_id)
        else:
            summary.skipped += len(lot.wafers)
            summary.lots_skipped += 1

    lots = group_lots(read_ahead(_read_sources(sources, params.infer.wafer_table_lot_wafers, named), params.infer.read_ahead_wafers), unassigned)
    with model_streams(params.infer.model_threads, device) as streams, LotWriter() as writer, Progress(
        TextColumn("inferring"), BarColumn(), MofNCompleteColumn(), TextColumn("lots"), TimeElapsedColumn()
    ) as progress:
        task = progress.add_task("lots", total=None)
        for chunk in chunks_of_lots(lots, params.infer.chunk_wafers):
            todo = []
            stale = targets_with_leftovers(out)  # listed once a chunk, not once a lot
            for lot in chunk:
                lock = claim_lot(out, lot.lot_id)
                if lock is None:
                    log.info("lot %s is being reported by another run: left to it", lot.lot_id)
                    summary.lots_left_to_others += 1
                    lot_done(lot, reported=False)
                    continue
                if lot.lot_id in stale:  # first: a report a killed writer left aside may be current
                    report.remove_stale_builds(out, lot.lot_id)
                if force or not report.lot_is_current(out, lot.lot_id, version,
                                                      report.inputs_fingerprint(lot.wafers, lot.rejected)):
                    todo.append((lot, lock))
                else:
                    release(lock)
                    lot_done(lot, reported=False)
            wafers = [w for lot, _ in todo for w in lot.wafers]
            try:
                predictions = predict_wafers(model, wafers, params.infer.batch_wafers, device, amp, channels_last,
                                             params.infer.batch_pixels, streams)
            except BaseException:
                for _, lock in todo:  # no report will be written: the lots are free for the next run
                    release(lock)
                raise
            position = 0
            for lot, lock in todo:
                masks = predictions[position : position + len(lot.wafers)]
                position += len(lot.wafers)
                writer.submit(lock, lot.lot_id, lot.wafers, masks, lot.rejected, out, version, params.infer,
                              params.report)
                lot_done(lot, reported=True)
            writer.raise_failures()
            progress.update(task, advance=len(chunk))
        writer.raise_failures(wait=True)
    summary.read += len(unassigned)
    summary.quarantined += len(unassigned)
    if unassigned or index:
        _write_unassigned(out, unassigned)
    if index:
        report.write_index(out)
    summary.seconds = time.perf_counter() - started
    summary.class_mix = class_mix(out)
    log.info("%d wafers read: %d reported, %d quarantined, %d skipped (already reported by %s) in %.1f s "
             "(%.1f wafers/s)", summary.read, summary.reported, summary.quarantined, summary.skipped, version,
             summary.seconds, summary.wafers_per_s)
    return summary


def lot_pattern_counts(out: Path, lot_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Per lot: its wafers and how many have each dominant pattern, from the complete lot reports under `out`
    (never another run's staging directory, which a glob of `out/*` would match and which vanishes)."""
    lot_dirs = [lot_dir for lot_dir, _ in report.complete_lots(out)] if lot_ids is None else [
        out / lot for lot in lot_ids]
    rows = []
    for path in [lot_dir / report.WAFERS_CSV for lot_dir in lot_dirs]:
        if path.is_file():  # csv, not pandas: a nightly's index over thousands of small lots
            with open(path, encoding="utf-8", newline="") as handle:
                rows += [(row["lot_id"], row["dominant_class"]) for row in csv.DictReader(handle)]
    patterns = [*CLASS_NAMES[1:], report.NO_PATTERN]
    if not rows:
        return pd.DataFrame(columns=["wafers", *patterns], dtype="int64").rename_axis("lot_id")
    wafers = pd.DataFrame(rows, columns=["lot_id", "dominant_class"])
    table = pd.crosstab(wafers["lot_id"], wafers["dominant_class"]).reindex(columns=patterns, fill_value=0)
    table.insert(0, "wafers", table.sum(axis=1))
    return table


def class_mix(out: Path) -> dict[str, int]:
    """Wafers per dominant class over every lot report under `out`."""
    totals = lot_pattern_counts(out).drop(columns="wafers").sum()
    return {name: int(count) for name, count in sorted(totals.items()) if count}


def seed_inbox(source: Path, inbox: Path) -> int:
    """Fill an empty lots inbox with the lots of `source` as <lot_id>/<wafer_id>.npy; the wafers written
    (0 when the inbox already holds lots). The inbox appears whole or not at all."""
    inbox = Path(inbox)
    if inbox.is_dir() and any(not entry.name.startswith(".") for entry in inbox.iterdir()):
        return 0
    wafers = read_wafers(source, named=True)  # the user's own seed source (--seed-lots or flow.seed_lots)
    inbox.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{inbox.name}-", dir=inbox.parent))
    try:
        write_npy_lots(wafers, staging)
        if inbox.exists():
            inbox.rmdir()
        staging.rename(inbox)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("seeded %s with %d wafers in %d lots from %s", inbox, len(wafers), len({w.lot_id for w in wafers}),
             source)
    return len(wafers)


def inbox_sources(inbox: Path) -> list[Path]:
    """Each lot directory or wafer file of an inbox, by name: the units `infer` can be fanned out over."""
    return sorted(entry for entry in Path(inbox).iterdir() if not entry.name.startswith("."))
