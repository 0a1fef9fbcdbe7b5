"""Streaming FedAvg vs naive stack-then-average on ViT-B-sized updates; bf16 transfer bytes.

    .venv/bin/python bench/bench_aggregation.py [--ks 2 4 8 16] [--repeats 3]

Each K runs in fresh subprocesses (one for streaming and naive, one for lazy):

* time   : median of ``--repeats`` aggregations over the same in-memory list of K updates,
           streaming and naive interleaved so load changes on a shared machine hit both alike;
* memory : peak RSS during each aggregation minus RSS just before it (inputs already built). The
           kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs before each
           aggregation, and glibc is told to mmap every block >= 64 KiB
           (MALLOC_MMAP_THRESHOLD_) so freed tensors leave RSS at once and do not inflate the
           baseline. Reported in MB and in "models" (one float32 ViT-B state).
* lazy   : streaming FedAvg fed by a generator that builds one update at a time; its peak
           (minus RSS before the call) includes the update being generated, so it is the total
           memory of a round whose updates arrive one by one, and must not grow with K.

The updates are random (uniform in [-1, 1), seeded); the encoder is timm's
``vit_base_patch16_224`` (~86 M params, ~344 MB float32).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ultrafed.federated import encode_state, encoded_nbytes, fedavg, state_nbytes  # noqa: E402

State = dict[str, torch.Tensor]


def vit_b_shapes() -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_update(shapes: dict[str, tuple[int, ...]], seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.empty(s).uniform_(-1.0, 1.0, generator=g) for k, s in shapes.items()}


def naive_fedavg(updates: list[tuple[State, int]]) -> State:
    """The baseline: stack all K updates per tensor ([K, ...]), then the weighted mean over K."""
    ns = torch.tensor([float(n) for _, n in updates])
    w = ns / ns.sum()
    stacked = {k: torch.stack([s[k] for s, _ in updates]) for k in updates[0][0]}
    return {k: torch.tensordot(w, v, dims=1) for k, v in stacked.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _checksum(state: State) -> float:
    return float(sum(t.double().sum() for t in state.values()))


def _measure(fn, arg) -> tuple[float, int, float]:
    """(seconds, peak RSS above the pre-call RSS in kB, checksum) of one call."""
    gc.collect()
    base = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    out = fn(arg)
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM") - base
    return dt, peak, _checksum(out)


def worker(mode: str, k: int, repeats: int) -> dict:
    shapes = vit_b_shapes()
    ns = [100 + 37 * i for i in range(k)]  # unequal site sizes
    if mode == "lazy":
        def gen(_: object) -> Iterator[tuple[State, int]]:
            for i in range(k):
                yield make_update(shapes, i), ns[i]  # no local name: the previous update is freed first
        dt, peak, cs = _measure(lambda a: fedavg(gen(a)), None)
        return {"lazy": {"time_s": dt, "peak_extra_kb": peak, "checksum": cs}}
    updates = [(make_update(shapes, i), ns[i]) for i in range(k)]
    runs: dict[str, list[tuple[float, int, float]]] = {"streaming": [], "naive": []}
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
        runs["streaming"].append(_measure(fedavg, updates))
        runs["naive"].append(_measure(naive_fedavg, updates))
    return {v: {"time_s": statistics.median(r[0] for r in rs), "peak_extra_kb": max(r[1] for r in rs),
                "checksum": rs[-1][2]} for v, rs in runs.items()}


def run_worker(mode: str, k: int, repeats: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--worker", mode, "--k", str(k), "--repeats", str(repeats)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode} K={k} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["pair", "lazy"])
    ap.add_argument("--k", type=int)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.k, args.repeats)))
        return

    import psutil

    shapes = vit_b_shapes()
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model_b = state_nbytes(meta)
    mb = 1024 * 1024
    print(f"ViT-B encoder state: {sum(t.numel() for t in meta.values()) / 1e6:.1f} M params, "
          f"{model_b / mb:.0f} MB float32 (= 1 model); torch threads {torch.get_num_threads()}")
    method = "Each K" + __doc__.split("Each K", 1)[1].split("The updates are", 1)[0].rstrip()
    print("Method: " + method)
    print(f"\n{'K':>3} {'variant':>10} {'time s':>8} {'peak extra MB':>14} {'models':>7}  note")
    for k in args.ks:
        avail = psutil.virtual_memory().available
        rows: dict[str, dict] = {}
        # pair: inputs K models + naive's stacked copy K models + output; lazy: ~3 models
        for mode, need in (("pair", (2 * k + 1) * model_b), ("lazy", 4 * model_b)):
            if need > 0.8 * avail:
                print(f"{k:>3} {mode:>10}  skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
                continue
            rows.update(run_worker(mode, k, args.repeats))
        for variant, r in rows.items():
            note = "time includes generating the updates" if variant == "lazy" else f"median of {args.repeats}"
            print(f"{k:>3} {variant:>10} {r['time_s']:>8.2f} {r['peak_extra_kb'] / 1024:>14.0f} "
                  f"{r['peak_extra_kb'] * 1024 / model_b:>7.2f}  {note}")
        if "streaming" in rows and "naive" in rows:
            s, n = rows["streaming"], rows["naive"]
            diff = abs(s["checksum"] - n["checksum"]) / max(abs(n["checksum"]), 1e-12)
            print(f"    K={k}: time streaming/naive = {s['time_s'] / n['time_s']:.2f}, "
                  f"peak extra memory streaming/naive = {s['peak_extra_kb'] / n['peak_extra_kb']:.2f}, "
                  f"checksums agree to {diff:.1e} (relative)")

    f32, bf16 = encoded_nbytes(meta, "float32"), encoded_nbytes(meta, "bfloat16")
    one = make_update(shapes, 0)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        enc = encode_state(one, "bfloat16")
        times.append(time.perf_counter() - t0)
    assert state_nbytes(enc) == bf16
    print(f"\nbf16 transfer: {bf16 / mb:.0f} MB vs float32 {f32 / mb:.0f} MB per update "
          f"(ratio {bf16 / f32:.3f}); encode {statistics.median(times):.2f} s per update (median of {args.repeats})")


if __name__ == "__main__":
    main()
