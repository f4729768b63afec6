"""Batch inference at WM-811K scale, streamed from disk to reports, with RSS watched as the workload grows.

    .venv/bin/python benchmarks/scale.py --model models/fcn8s.pt [--wafers 200000] [--work /tmp/waferseg-scale]

Synthetic lots are generated in chunks into die-table parquet files (one file per chunk, WM-811K's size
mix), then `pipeline.infer.infer` reads them all as one stream and writes every lot report. A sampler thread
records the process's RSS against wafers reported; the result projects hours for 811,457 wafers. Then the
model alone (infer's model and streams, no reading or reports) is timed on the first `--model-sample` wafers of
the same files: `end_to_end_over_model` is the end-to-end rate over that one, both from this run. The model's
share of the run is timed too (predict_wafers, wrapped): what remains (reading, report writing) is CPU work a GPU
does not shorten, so 811,457 wafers / (wafers / non-model seconds) is the projection for one GPU with these CPU
cores. Writes benchmarks/results/scale-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from pipeline import infer as infer_module
from pipeline import io, synth
from pipeline.device import cpu_name, select_device
from pipeline.infer import infer, inference_model, model_streams
from pipeline.params import load_params
from pipeline.predict import predict_wafers

WM811K_WAFERS = 811_457
RESULTS = Path(__file__).parent / "results"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reported_wafers(out: Path) -> int:
    return sum(1 for _ in out.glob("*/masks/*.npy"))


def generate_inbox(params, inbox: Path, wafers: int, chunk: int) -> list[Path]:
    inbox.mkdir(parents=True, exist_ok=True)
    files = []
    for number, start in enumerate(range(0, wafers, chunk)):
        synth_params = params.synth.model_copy(update={"lot_prefix": f"S{number:04d}"})
        batch = list(synth.generate(synth_params, seed=number, n=min(chunk, wafers - start)))
        path = inbox / f"chunk-{number:04d}.parquet"
        io.write_die_table([replace(w, mask=None) for w in batch], path)  # new lots carry no labels
        files.append(path)
    return files


def model_only_rate(sources: list[Path], params, model_uri: str, sample: int) -> dict:
    """The model alone (infer's model, settings and streams; no reading or reports) over the first `sample`
    wafers of the run, read beforehand: the throughput the end-to-end rate is held against."""
    wafers: list = []
    for path in sources:
        wafers += io.read_wafers(path)
        if len(wafers) >= sample:
            break
    wafers = wafers[:sample]
    device = select_device(params.train.device)
    model, _ = inference_model(model_uri, params, device)
    with model_streams(params.infer.model_threads, device) as streams:
        predict = lambda chunk: predict_wafers(  # noqa: E731  (not the timed wrapper)
            model, chunk, params.infer.batch_wafers, device, params.infer.amp, params.infer.channels_last,
            params.infer.batch_pixels, streams)
        predict(wafers[: params.infer.chunk_wafers])  # warm-up: first calls allocate
        started = time.perf_counter()
        for start in range(0, len(wafers), params.infer.chunk_wafers):  # in infer's chunks, as infer runs it
            predict(wafers[start : start + params.infer.chunk_wafers])
        seconds = time.perf_counter() - started
    return {"model_alone_wafers": len(wafers), "model_alone_seconds": round(seconds, 1),
            "wafers_per_s_model": round(len(wafers) / seconds, 1), "model_streams": streams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    parser.add_argument("--wafers", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=5_000, help="wafers per generated parquet file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/waferseg-scale"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--name", default="", help="writes scale-cpu-NAME.json/.md (a host's own record)")
    parser.add_argument("--model-sample", type=int, default=20_000, help="wafers the model alone is timed on")
    args = parser.parse_args()

    params = load_params(args.params)
    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    sources = generate_inbox(params, args.work / "inbox", args.wafers, args.chunk)
    generate_s = time.perf_counter() - started

    out = args.work / "reports"
    samples: list[tuple[float, int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(30.0):
            samples.append((time.perf_counter() - started, reported_wafers(out), rss_mib()))

    model_seconds = [0.0]
    predict = infer_module.predict_wafers

    def timed_predict(*args, **kwargs):
        start = time.perf_counter()
        try:
            return predict(*args, **kwargs)
        finally:
            model_seconds[0] += time.perf_counter() - start

    infer_module.predict_wafers = timed_predict
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    summary = infer(sources, out, params, model_uri=args.model)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    samples.append((seconds, summary.reported, rss_mib()))

    model_alone = model_only_rate(sources, params, args.model, args.model_sample)

    quarters = [max((s[2] for s in samples if q * args.wafers / 4 <= s[1] <= (q + 1) * args.wafers / 4),
                    default=float("nan")) for q in range(4)]
    rate = summary.read / seconds
    result = {"wafers": summary.read, "reported": summary.reported, "quarantined": summary.quarantined,
              "lots": summary.lots_reported, "generate_seconds": round(generate_s, 1),
              "infer_seconds": round(seconds, 1), "wafers_per_s_end_to_end": round(rate, 1),
              "peak_rss_mib_by_quarter": [round(q, 1) for q in quarters],
              "model_seconds_in_run": round(model_seconds[0], 1),
              "model_share_in_run": round(model_seconds[0] / seconds, 3),
              **model_alone,
              # end to end over the model alone on the same wafers, both measured in this run (target >= 0.8)
              "end_to_end_over_model": round(rate / model_alone["wafers_per_s_model"], 3),
              "host": cpu_name(), "model": args.model,
              "projected_hours_811457_cpu": round(WM811K_WAFERS / rate / 3600, 2),
              "projected_hours_811457_one_gpu": round(WM811K_WAFERS * (seconds - model_seconds[0]) / summary.read / 3600, 2),
              "rss_samples": [{"s": round(t, 1), "wafers": n, "rss_mib": round(r, 1)} for t, n, r in samples]}
    RESULTS.mkdir(exist_ok=True)
    name = f"scale-cpu-{args.name}" if args.name else "scale-cpu"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    table = ["| wafers | lots | wafers/s end to end | model alone | end to end / model | model share of the run | "
             "peak RSS by quarter (MiB) | 811,457 wafers: hours on CPU | on one GPU (non-model work) |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
             f"| {result['wafers']:,} | {result['lots']:,} | {result['wafers_per_s_end_to_end']} | "
             f"{result['wafers_per_s_model']} | {result['end_to_end_over_model']} | "
             f"{result['model_share_in_run']:.0%} | {' / '.join(f'{q:.0f}' for q in quarters)} | "
             f"{result['projected_hours_811457_cpu']} | {result['projected_hours_811457_one_gpu']} |"]
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
