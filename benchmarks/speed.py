"""Wafers/s of FCN-8s on this CPU for inference and training, per execution path, against fp32 eager.

    .venv/bin/python benchmarks/speed.py [--quick]

Widths 1.0 and 0.25, on 64x64 maps and on the size mix of the real WM-811K lots (a fixed subsample,
bucketed like `waferseg infer`). Each path (variant) of a group runs in its own process, kept alive for
the group, so its peak RSS is its own and timing rounds can interleave: every round times one pass of every
variant in a rotating order, and a variant's speedup is the median over rounds of fp32-time / its-time in
the same round (neighbours on a shared VM slow whole rounds, not one variant). A variant counts only if its
masks agree with fp32's on >= 99.9% of on-wafer dies. Writes benchmarks/results/speed-cpu.{json,md}.

Weights: no trained model ships, and argmax of a random-init FCN-8s is decided by tiny margins (its score
layers start at zero). So the encoder keeps its random init and the score head is fitted on its frozen
features to synthetic masks: logits with class margins like a trained model's, in seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model import FCN, encode_maps  # noqa: E402
from pipeline.params import DEFAULT_PARAMS, Params, load_params  # noqa: E402
from pipeline.predict import (  # noqa: E402
    IGNORE_INDEX, bucket_batches, compiled_for_inference, model_input, padded_shape, predict_maps, stack_padded,
)
from pipeline.wafer import FAIL, OFF_WAFER  # noqa: E402

log = logging.getLogger("speed")
REAL_LOTS = ROOT / "real_data/wm811k/unlabeled_lots.parquet"
RESULTS = Path(__file__).with_name("results")
AGREEMENT_FLOOR = 0.999
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    runner: str = "eager"  # eager | compile | onnxruntime | openvino
    compile_mode: str | None = None
    fused_adamw: bool = False  # training: make_optimizer's fused AdamW (the default in training) vs the eager loops


FP32 = Variant("fp32")
INFER = [
    FP32,
    Variant("channels_last", channels_last=True),
    Variant("bf16", bf16=True),
    Variant("bf16+channels_last", bf16=True, channels_last=True),
    Variant("compile fp32+cl", channels_last=True, runner="compile"),
    Variant("compile bf16+cl", bf16=True, channels_last=True, runner="compile"),
    Variant("compile bf16+cl max-autotune", bf16=True, channels_last=True, runner="compile",
            compile_mode="max-autotune-no-cudagraphs"),
    Variant("onnxruntime fp32", runner="onnxruntime"),
    Variant("openvino (bf16 on AMX)", runner="openvino"),
]
TRAIN = [
    FP32,
    Variant("channels_last", channels_last=True),
    Variant("bf16", bf16=True),
    Variant("bf16+channels_last", bf16=True, channels_last=True),
    Variant("compile bf16+cl", bf16=True, channels_last=True, runner="compile"),
    Variant("fp32 + fused AdamW", fused_adamw=True),
    Variant("bf16+channels_last + fused AdamW", bf16=True, channels_last=True, fused_adamw=True),
]
# Which variants each group runs; the real size mix recompiles per shape, so it skips the slow-to-build ones.
PLAN = {
    ("full", "infer", "64x64"): [v.name for v in INFER],
    ("full", "infer", "real"): ["fp32", "channels_last", "bf16+channels_last", "openvino (bf16 on AMX)"],
    ("full", "train", "64x64"): [v.name for v in TRAIN],
    ("full", "train", "real"): ["fp32", "bf16+channels_last", "bf16+channels_last + fused AdamW"],
    ("quick", "infer", "64x64"): ["fp32", "bf16+channels_last"],
    ("quick", "train", "64x64"): ["fp32", "bf16+channels_last"],
}


@dataclass
class Group:
    width: float
    mode: str  # infer | train
    inputs: str  # 64x64 | real
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    batch: int
    weights: str
    mix: dict[tuple[int, int], int]  # real mix: wafers per padded size in the whole source; {} for 64x64
    repeats: int = 1  # times a pass runs its batches: keeps a pass of the small model above noise
    results: dict[str, dict] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)


# --- one variant, in its own process ---------------------------------------------------------------------


def worker(variant: Variant, group: dict, conn) -> None:
    torch.manual_seed(0)
    model = FCN("fcn8s", group["width"])
    model.load_state_dict(torch.load(group["weights"]))
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    maps, masks, batch = group["maps"], group["masks"], group["batch"]
    batches = bucket_batches([m.shape for m in maps], batch)
    padded = [torch.from_numpy(stack_padded([maps[i] for i in b], OFF_WAFER)) for b in batches]
    rss_ready = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of this path, not of loading the weights
    initial = {k: v.clone() for k, v in model.state_dict().items()} if group["mode"] == "train" else None
    timed = range(1) if group["inputs"] == "64x64" else range(len(padded))  # the real mix: one batch per size
    if group["mode"] == "infer":
        predict = make_predictor(model, variant)
        run_batch = lambda i: predict(padded[i])  # noqa: E731
    else:
        step, net = make_train_step(model, variant)
        targets = [training_targets(maps, masks, b) for b in batches]
        run_batch = lambda i: step(padded[i], targets[i])  # noqa: E731

        def predict(maps_batch: torch.Tensor) -> torch.Tensor:
            net.eval()
            try:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
                    logits = net(model_input(maps_batch, CPU, variant.channels_last))
            finally:
                net.train()
            return logits.float().argmax(1).to(torch.uint8).masked_fill_(maps_batch != FAIL, 0)

    def one_pass() -> list[tuple[tuple[int, int], int, float]]:
        timings = []
        for _ in range(group["repeats"]):
            for i in timed:
                start = time.perf_counter()
                run_batch(i)
                timings.append((tuple(padded[i].shape[-2:]), len(padded[i]), time.perf_counter() - start))
        return timings

    while True:
        command = conn.recv()
        if command == "stop":
            break
        if initial is not None and command in ("masks", "grads"):  # every path from the same weights, not its own steps
            model.load_state_dict(initial)
        start = time.perf_counter()
        if command == "pass":
            conn.send({"batches": one_pass()})
        elif command == "masks":
            out: list[np.ndarray | None] = [None] * len(maps)
            for b, maps_batch in zip(batches, padded):
                predicted = predict(maps_batch).numpy()
                for row, i in enumerate(b):
                    out[i] = predicted[row, : maps[i].shape[0], : maps[i].shape[1]]
            conn.send({"masks": out, "seconds": time.perf_counter() - start})
        elif command == "grads":  # eager even for the compiled path: a third graph would cost a minute to build
            conn.send(gradient_sketch(model, padded[0], targets[0], variant))
        elif command == "rss":
            conn.send({"rss_ready_mb": rss_ready, "peak_rss_mb": status_mb("VmHWM")})


def status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process: VmHWM restarts at exec, unlike ru_maxrss (which a spawned child inherits)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 1024


def make_predictor(model: FCN, variant: Variant):
    model.eval()
    if variant.runner == "eager":
        return lambda maps: predict_maps(model, maps, CPU, variant.bf16, variant.channels_last)
    if variant.runner == "compile":
        net = (compiled_for_inference(model) if variant.compile_mode is None  # max-autotune = max_autotune on CPU
               else torch.compile(model, options={"freezing": True, "max_autotune": True}))
        return lambda maps: predict_maps(net, maps, CPU, variant.bf16, variant.channels_last)
    if variant.runner == "onnxruntime":
        return onnxruntime_predictor(model)
    if variant.runner == "openvino":
        return openvino_predictor(model)
    raise ValueError(variant.runner)


def masks_from_logits(logits: np.ndarray, maps: torch.Tensor) -> torch.Tensor:
    prediction = torch.from_numpy(logits.argmax(1).astype(np.uint8))
    return prediction.masked_fill_(maps != FAIL, 0)


def onnxruntime_predictor(model: FCN):
    import onnxruntime

    path = Path(tempfile.mkdtemp()) / "fcn.onnx"
    example = encode_maps(torch.zeros(2, 64, 64, dtype=torch.uint8))
    torch.onnx.export(model, (example,), path, input_names=["x"], output_names=["logits"], dynamo=True,
                      dynamic_shapes=({0: "batch", 2: "height", 3: "width"},))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda maps: masks_from_logits(session.run(None, {"x": encode_maps(maps).numpy()})[0], maps)


def openvino_predictor(model: FCN):
    """One compiled model per padded size (Fc6 slices its kernel by the map size), any batch."""
    import openvino

    core, compiled = openvino.Core(), {}

    def predict(maps: torch.Tensor) -> torch.Tensor:
        size = tuple(maps.shape[-2:])
        if size not in compiled:
            example = encode_maps(maps[:1])
            converted = openvino.convert_model(model, example_input=example,
                                               input=[openvino.PartialShape([-1, 3, *size])])
            compiled[size] = core.compile_model(converted, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        return masks_from_logits(compiled[size].infer({0: encode_maps(maps).numpy()})[0], maps)

    return predict


def training_targets(maps: list[np.ndarray], masks: list[np.ndarray], batch: np.ndarray) -> torch.Tensor:
    grid = stack_padded([maps[i] for i in batch], OFF_WAFER)
    target = stack_padded([masks[i] for i in batch], IGNORE_INDEX).astype(np.int64)
    target[grid == OFF_WAFER] = IGNORE_INDEX
    return torch.from_numpy(target)


def make_train_step(model: FCN, variant: Variant):
    from pipeline.train import make_optimizer

    model.train()
    settings = Params().train
    optimizer = make_optimizer(model, settings, fused=variant.fused_adamw)
    net = torch.compile(model, mode=variant.compile_mode) if variant.runner == "compile" else model

    def step(maps: torch.Tensor, target: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
            logits = net(model_input(maps, CPU, variant.channels_last))
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, net


def gradient_sketch(model: FCN, maps: torch.Tensor, target: torch.Tensor, variant: Variant) -> dict:
    """Loss and a strided sample of every parameter's gradient for one batch, dropout off (deterministic)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
        logits = model(model_input(maps, CPU, variant.channels_last))
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
    loss.backward()
    sample = torch.cat([p.grad.flatten()[::17].float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    model.train()
    return {"loss": loss.item(), "grad_sample": sample.numpy()}


# --- the driver -------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, variant: Variant, group: Group, timeout: float):
        self.variant, self.timeout, self.error = variant, timeout, None
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        spec = {k: getattr(group, k) for k in ("width", "mode", "inputs", "maps", "masks", "batch", "weights", "repeats")}
        self.process = context.Process(target=worker, args=(variant, spec, child), daemon=True)
        self.process.start()

    def ask(self, command: str, timeout: float | None = None):
        if self.error:
            return None
        self.conn.send(command)
        if not self.conn.poll(timeout or self.timeout):
            self.error = f"no answer to {command!r} in {timeout or self.timeout:.0f}s"
        elif not self.process.is_alive() and not self.conn.poll():
            self.error = f"died (exit code {self.process.exitcode})"
        else:
            try:
                return self.conn.recv()
            except EOFError:
                self.process.join(5)
                self.error = f"died (exit code {self.process.exitcode})"
        self.stop()
        return None

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def run_group(group: Group, variants: list[Variant], rounds: int, timeout: float) -> None:
    log.info("== width %g %s on %s: %s", group.width, group.mode, group.inputs, ", ".join(v.name for v in variants))
    workers = [Worker(v, group, timeout) for v in variants]
    for w in workers:  # warm-up one at a time: compilation and exporters do not share the CPU with timing
        started = time.perf_counter()
        first = w.ask("pass", timeout=max(timeout, 600))
        group.results[w.variant.name] = {"variant": asdict(w.variant), "warmup_s": time.perf_counter() - started,
                                         "seconds": [], "ratios": []}
        log.info("  %-30s warm-up %.1fs%s", w.variant.name, time.perf_counter() - started, f"  FAILED: {w.error}" if first is None else "")
    for r in range(rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        timings = {}
        for w in order:
            answer = w.ask("pass")
            if answer:
                seconds, wafers = pass_time(answer["batches"], group.mix)
                timings[w.variant.name] = seconds
                group.results[w.variant.name]["wafers_per_pass"] = wafers
        for name, seconds in timings.items():
            group.results[name]["seconds"].append(seconds)
            if "fp32" in timings:  # rates: a pass's wafers may differ between variants
                per_wafer = {n: t / group.results[n]["wafers_per_pass"] for n, t in timings.items()}
                group.results[name]["ratios"].append(per_wafer["fp32"] / per_wafer[name])
        log.info("  round %d: %s", r + 1, "  ".join(f"{n} {s:.2f}s" for n, s in timings.items()))
    reference = workers[0].ask("masks", timeout=max(timeout, 600))
    sketch_reference = workers[0].ask("grads") if group.mode == "train" else None
    for w in workers:
        result = group.results[w.variant.name]
        answer = reference if w is workers[0] else w.ask("masks", timeout=max(timeout, 600))
        if answer and reference:
            result.update(agreement(reference["masks"], answer["masks"], group.maps))
        if group.mode == "train" and sketch_reference:
            sketch = sketch_reference if w is workers[0] else w.ask("grads")
            if sketch:
                a, b = sketch_reference["grad_sample"], sketch["grad_sample"]
                result["grad_cosine_vs_fp32"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                result["loss_vs_fp32"] = [sketch_reference["loss"], sketch["loss"]]
        rss = w.ask("rss")
        if rss:
            result.update(rss)
        if w.error:
            result["error"] = w.error
        w.stop()
        summarise(result, group)


def pass_time(batches: list[tuple[tuple[int, int], int, float]], mix: dict) -> tuple[float, int]:
    """(seconds, wafers) of a pass; for the real mix, the time the whole source would take at each size's rate."""
    if not mix:
        return sum(b[2] for b in batches), sum(b[1] for b in batches)
    wafers: dict[tuple[int, int], int] = {}
    seconds: dict[tuple[int, int], float] = {}
    for shape, n, t in batches:
        wafers[shape] = wafers.get(shape, 0) + n
        seconds[shape] = seconds.get(shape, 0.0) + t
    return sum(mix[shape] * seconds[shape] / wafers[shape] for shape in wafers), sum(mix.values())


def worker_memory_gb(width: float, mode: str) -> float:
    """Rough peak of one worker: fp32 weights x (weights, grads, two AdamW states, bf16 copies...) + torch itself."""
    weights_gb = sum(p.numel() for p in FCN("fcn8s", width).parameters()) * 4 / 2**30
    return 1.0 + weights_gb * (8 if mode == "train" else 3)


def run_in_chunks(group: Group, variants: list[Variant], rounds: int, timeout: float) -> None:
    """As many workers at once as memory holds (7 width-1 trainers do not fit in 24 GB); each chunk has its fp32."""
    import psutil

    fit = max(2, int(psutil.virtual_memory().available / 2**30 * 0.8 / worker_memory_gb(group.width, group.mode)))
    others = [v for v in variants if v != FP32]
    size = fit - 1
    chunks = [others[i : i + size] for i in range(0, len(others), size)] or [[]]
    first_fp32 = None
    for k, chunk in enumerate(chunks):
        run_group(group, [FP32, *chunk], rounds, timeout)
        if k == 0:
            first_fp32 = group.results.pop("fp32")
        else:
            group.results[f"fp32 (reference of chunk {k + 1})"] = group.results.pop("fp32")
    group.results = {"fp32": first_fp32, **group.results}


def agreement(reference: list[np.ndarray], masks: list[np.ndarray], maps: list[np.ndarray]) -> dict:
    on_wafer = fail = same_on = same_fail = 0
    for ref, ours, grid in zip(reference, masks, maps):
        same = ref == ours
        on_wafer += int((grid != OFF_WAFER).sum())
        same_on += int(same[grid != OFF_WAFER].sum())
        fail += int((grid == FAIL).sum())
        same_fail += int(same[grid == FAIL].sum())
    return {"agreement_on_wafer": same_on / on_wafer, "agreement_fail_dies": same_fail / fail}


def summarise(result: dict, group: Group) -> None:
    if result["seconds"]:
        result["wafers_per_s"] = result["wafers_per_pass"] / statistics.median(result["seconds"])
    if result["ratios"]:
        result["speedup_vs_fp32"] = statistics.median(result["ratios"])
    result["correct"] = result.get("agreement_on_wafer", 0.0) >= AGREEMENT_FLOOR and "error" not in result


# --- weights, inputs, FLOPs ---------------------------------------------------------------------------------


def synthetic_wafers(params: Params, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from pipeline.synth import generate

    wafers = list(generate(params.synth, seed, n, shape=(64, 64)))
    return [w.map for w in wafers], [w.mask for w in wafers]


@functools.cache
def real_maps_by_size() -> dict[tuple[int, int], list[np.ndarray]]:
    from pipeline.io import read_wafers

    by_size: dict[tuple[int, int], list[np.ndarray]] = {}
    for wafer in read_wafers(REAL_LOTS):
        by_size.setdefault(padded_shape(wafer.shape), []).append(wafer.map)
    return by_size


def real_size_mix(batch: int) -> tuple[list[np.ndarray], dict[tuple[int, int], int]]:
    """One batch of real wafers per padded size, and how many wafers of each size the whole source holds."""
    by_size = real_maps_by_size()
    return [m for size in sorted(by_size) for m in by_size[size][:batch]], {s: len(w) for s, w in by_size.items()}


def fitted_weights(width: float, maps: list[np.ndarray], masks: list[np.ndarray], path: Path, steps: int) -> None:
    """Random-init encoder, score head fitted on its frozen features (see the module docstring)."""
    torch.manual_seed(0)
    model = FCN("fcn8s", width).eval()
    grid = torch.from_numpy(np.stack(maps))
    target = torch.from_numpy(np.stack(masks).astype(np.int64))
    target[grid == OFF_WAFER] = IGNORE_INDEX
    with torch.no_grad():
        x = encode_maps(grid)
        pool3 = model.to_pool3(x)
        pool4 = model.to_pool4(pool3)
        fc7 = model.fc(model.to_pool5(pool4))
    head = [p for name, p in model.named_parameters() if name.startswith(("score", "upscore"))]
    optimizer = torch.optim.Adam(head, lr=0.01)
    counts = torch.bincount(target[target != IGNORE_INDEX], minlength=5).float().clamp(min=1)
    weight = (counts.sum() / counts) ** 0.5
    for _ in range(steps):
        loss = F.cross_entropy(model.head(fc7, pool4, pool3), target, weight=weight / weight.mean(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log.info("width %g: score head fitted on frozen random-init features, loss %.3f", width, loss.item())
    torch.save(model.state_dict(), path)


def flops_per_wafer(width: float, shapes: list[tuple[int, int]]) -> dict[str, float]:
    """FlopCounterMode count of one fp32 forward (and forward + backward) per wafer, averaged over `shapes`."""
    from torch.utils.flop_counter import FlopCounterMode

    model = FCN("fcn8s", width)
    cache: dict[tuple[int, int], tuple[int, int]] = {}
    for shape in set(shapes):
        x = encode_maps(torch.zeros(1, *shape, dtype=torch.uint8))
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                model.eval()(x)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.train()(x).float().square().mean().backward()
        cache[shape] = (forward, counter.get_total_flops())
    return {"forward": float(np.mean([cache[s][0] for s in shapes])), "train": float(np.mean([cache[s][1] for s in shapes]))}


def _peaks(flags: str, gcycles: float) -> dict:
    bf16, kind = ((1024, "amx_bf16") if "amx_bf16" in flags else (128, "avx512_bf16") if "avx512_bf16" in flags
                  else (64, "fp32 (no bf16 units)"))
    return {"peak_fp32_gflops": gcycles * 64, "peak_fp32_flops_per_cycle": 64,
            "peak_amx_bf16_gflops": gcycles * bf16, "peak_bf16_flops_per_cycle": bf16, "peak_bf16_kind": kind}


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text()
    mhz = float(next(line.split(":")[1] for line in flags.splitlines() if line.startswith("cpu MHz")))
    cores = len(os.sched_getaffinity(0))
    model_name = next((line.split(":")[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return {
        "cpu": model_name, "cores": cores, "mhz": mhz, "amx_bf16": "amx_bf16" in flags, "avx512f": "avx512f" in flags,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.version() if hasattr(torch.backends.mkldnn, "version") else "?",
        "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
        # Peak assumptions (FLOPs per cycle per core at the nominal clock; turbo runs higher, AVX-512/AMX
        # licences lower): 2 AVX-512 FMA units = 64 fp32, AVX512-BF16 dot products = 128, AMX TMUL = 1024 bf16.
        **_peaks(flags, cores * mhz / 1e3),
    }


# --- report -----------------------------------------------------------------------------------------------


def write_reports(groups: list[Group], info: dict, quick: bool, seconds: float, out_name: str) -> dict:
    rows = []
    for g in groups:
        for name, r in g.results.items():
            flops = g.flops["forward" if g.mode == "infer" else "train"]
            gflops = r.get("wafers_per_s", 0) * flops / 1e9
            peak = info["peak_amx_bf16_gflops"] if (r["variant"]["bf16"] or "openvino" in name) else info["peak_fp32_gflops"]
            rows.append({"width": g.width, "mode": g.mode, "inputs": g.inputs, "variant": name, "batch": g.batch,
                         **{k: v for k, v in r.items() if k not in ("variant", "seconds", "ratios")},
                         "round_seconds": r["seconds"], "round_speedups": r["ratios"],
                         "gflops_per_wafer": flops / 1e9, "achieved_gflops": gflops, "share_of_peak": gflops / peak,
                         "peak_used": info.get("peak_bf16_kind", "amx_bf16") if peak == info["peak_amx_bf16_gflops"]
                         else "fp32_avx512"})

    def best(mode: str) -> dict | None:
        candidates = [r for r in rows if r["mode"] == mode and r["width"] == 1.0 and r["inputs"] == "64x64"
                      and r["correct"] and "speedup_vs_fp32" in r]
        return max(candidates, key=lambda r: r["speedup_vs_fp32"], default=None)

    best_infer, best_train = best("infer"), best("train")
    summary = {
        "infer_speedup_vs_fp32": best_infer and best_infer["speedup_vs_fp32"],
        "infer_best_variant": best_infer and best_infer["variant"],
        "train_speedup_vs_fp32": best_train and best_train["speedup_vs_fp32"],
        "train_best_variant": best_train and best_train["variant"],
        "targets": {"infer_5x_met": bool(best_infer and best_infer["speedup_vs_fp32"] >= 5),
                    "train_2x_met": bool(best_train and best_train["speedup_vs_fp32"] >= 2)},
        "quick": quick, "run_seconds": seconds, "agreement_floor": AGREEMENT_FLOOR, "machine": info, "variants": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (RESULTS / f"{out_name}.md").write_text(markdown(summary, rows))
    return summary


def markdown(summary: dict, rows: list[dict]) -> str:
    info = summary["machine"]
    lines = [
        f"# FCN-8s speed on CPU ({'quick' if summary['quick'] else 'full'} run of benchmarks/speed.py)", "",
        f"{info['cpu']}, {info['cores']} cores at {info['mhz']:.0f} MHz, AMX bf16: {info['amx_bf16']}, torch "
        f"{info['torch']}; load average at start {', '.join(f'{x:.1f}' for x in info['load_average_at_start'])} "
        "(the VM is shared: speedups are medians of per-round ratios against fp32 timed in the same round).", "",
        f"Best correct path at width 1.0, 64x64: inference **{fmt(summary['infer_speedup_vs_fp32'])}x** "
        f"({summary['infer_best_variant']}; target 5x {'met' if summary['targets']['infer_5x_met'] else 'NOT met'}), "
        f"training **{fmt(summary['train_speedup_vs_fp32'])}x** ({summary['train_best_variant']}; target 2x "
        f"{'met' if summary['targets']['train_2x_met'] else 'NOT met'}).", "",
        f"Peak assumed: fp32 {info['peak_fp32_gflops']:.0f} GFLOP/s ({info.get('peak_fp32_flops_per_cycle', 64)} "
        f"FLOPs/cycle/core), {info.get('peak_bf16_kind', 'amx_bf16')} {info['peak_amx_bf16_gflops']:.0f} GFLOP/s "
        f"({info.get('peak_bf16_flops_per_cycle', 1024)} FLOPs/cycle/core), nominal clock. "
        f"A path is correct when its masks agree with fp32's on >= {AGREEMENT_FLOOR:.1%} of on-wafer dies "
        "(training paths: the forward of that path from the same weights; grad cos: cosine of a strided sample "
        "of all gradients with fp32's on one batch). Inputs `real`: one batch per padded size of "
        "unlabeled_lots.parquet, weighted by that size's share of its 1,465 wafers. Weights: random-init "
        "encoder, score head fitted to synthetic masks on its frozen features.", "",
        "| width | mode | inputs | batch | variant | wafers/s | x fp32 | agree on-wafer | agree fail dies | grad cos | "
        "warm-up s | RSS ready / peak MB | GFLOP/wafer | GFLOP/s | % of peak | ok |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']:g} | {r['mode']} | {r['inputs']} | {r['batch']} | {r['variant']} | {fmt(r.get('wafers_per_s'), 1)} | "
            f"{fmt(r.get('speedup_vs_fp32'))} | {pct(r.get('agreement_on_wafer'))} | {pct(r.get('agreement_fail_dies'))} | "
            f"{fmt(r.get('grad_cosine_vs_fp32'), 4)} | {fmt(r.get('warmup_s'), 0)} | {fmt(r.get('rss_ready_mb'), 0)} / {fmt(r.get('peak_rss_mb'), 0)} | "
            f"{r['gflops_per_wafer']:.2f} | {r['achieved_gflops']:.0f} | {r['share_of_peak']:.1%} ({r['peak_used']}) | "
            f"{'yes' if r['correct'] else 'NO: ' + r.get('error', 'masks disagree')} |")
    return "\n".join(lines) + "\n"


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value) -> str:
    return "-" if value is None else f"{value:.3%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="64x64 only, fp32 vs bf16+channels_last, training batch 8, 2 rounds (under 2 minutes)")
    parser.add_argument("--widths", type=float, nargs="+", help="default 1.0 and 0.25 (quick: 1.0)")
    parser.add_argument("--rounds", type=int, help="timing rounds per group (default 3, quick 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one pass may take")
    parser.add_argument("--name", help="results file name (default speed-cpu, quick: speed-cpu-quick)")
    args = parser.parse_args()
    name = args.name or ("speed-cpu-quick" if args.quick else "speed-cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    plan = "quick" if args.quick else "full"
    widths = args.widths or ([1.0] if args.quick else [1.0, 0.25])
    rounds = args.rounds or (2 if args.quick else 3)
    try:
        params = load_params(ROOT / DEFAULT_PARAMS)
    except Exception:  # params.yaml mid-edit elsewhere must not stop a benchmark
        params = Params()
    info = machine()
    n_synthetic = 64 if args.quick else 128
    synth_maps, synth_masks = synthetic_wafers(params, n_synthetic, seed=7)
    groups: list[Group] = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            weights = str(Path(tmp) / f"fcn8s-{width}.pt")
            fitted_weights(width, synth_maps, synth_masks, Path(weights), steps=40 if args.quick else 150)
            for mode in ("infer", "train"):
                batch = params.infer.batch_wafers if mode == "infer" else 8 if args.quick else params.train.batch_wafers
                for inputs in ("64x64", "real"):
                    names = PLAN.get((plan, mode, inputs))
                    if not names:
                        continue
                    maps, mix = (synth_maps, {}) if inputs == "64x64" else real_size_mix(batch)
                    masks = synth_masks if inputs == "64x64" else [  # real wafers are unlabelled: any classes time the same
                        np.where(m == FAIL, np.arange(m.size).reshape(m.shape) % 5, 0).astype(np.uint8) for m in maps]
                    group = Group(width, mode, inputs, maps, masks, batch, weights, mix, repeats=1 if width >= 0.5 else 4)
                    group.flops = flops_per_wafer(width, [padded_shape(m.shape) for m in maps] if not mix else
                                                  [size for size, count in mix.items() for _ in range(count)])
                    variants = [v for v in (INFER if mode == "infer" else TRAIN) if v.name in names
                                and not (v.compile_mode and width != 1.0)]
                    run_in_chunks(group, variants, rounds, args.timeout)
                    groups.append(group)
    summary = write_reports(groups, info, args.quick, time.perf_counter() - started, name)
    print((RESULTS / f"{name}.md").read_text())
    log.info("done in %.0fs", summary["run_seconds"])


if __name__ == "__main__":
    main()
