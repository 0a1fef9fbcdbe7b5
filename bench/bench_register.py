"""Registering a ViT-B/16 (224 px) encoder version vs a plain ``torch.save`` of the same weights.

Target: registration <= 3 s. Both run in this process on the same disk (a temporary embedded
sqlite store); median of ``--repeats``. The first registration in a process also pays MLflow's
one-time scan of installed packages (requirement check); it is printed separately.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=3.0)
    args = ap.parse_args(argv)

    import torch

    from ultrafed.models import build_encoder
    from ultrafed.tracking.registry import register_encoder
    from ultrafed.tracking.runs import configure_tracking, ensure_experiment
    from mlflow import MlflowClient

    torch.manual_seed(0)
    enc = build_encoder(args.preset, args.img_size).eval()
    n_params = sum(p.numel() for p in enc.parameters())
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        configure_tracking(f"sqlite:///{tmp}/mlflow.db", f"{tmp}/artifacts")
        run_id = MlflowClient().create_run(ensure_experiment("bench")).info.run_id
        lineage = {"round": 0, "strategy": "fedavg", "params_hash": "bench",
                   "sites": [{"site": "a", "n_images": 1, "manifest_md5": "0" * 32, "weight": 1.0,
                              "gate_status": "passed"}]}

        def save() -> float:
            t = time.perf_counter()
            torch.save(enc.state_dict(), Path(tmp) / f"plain-{time.perf_counter_ns()}.pt")
            return time.perf_counter() - t

        def register(i: int) -> float:
            t = time.perf_counter()
            register_encoder(enc, name="bench-encoder", run_id=run_id,
                             lineage={**lineage, "round": i, "parent_version": i or None})
            return time.perf_counter() - t

        first = register(0)
        saves, regs = [], []
        for i in range(args.repeats):  # interleaved so load on the machine hits both alike
            saves.append(save())
            regs.append(register(i + 1))
    s, r = statistics.median(saves), statistics.median(regs)
    print(f"encoder {args.preset}/{args.img_size}: {n_params / 1e6:.1f} M params, "
          f"{n_params * 4 / 2**20:.0f} MiB fp32")
    print(f"torch.save state_dict     median {s:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in saves)})")
    print(f"register_encoder          median {r:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in regs)})")
    print(f"register_encoder (1st in process, incl. MLflow's package scan) {first:.2f} s")
    print(f"ratio register / torch.save = {r / s:.2f}x; target <= {args.target_s:.1f} s: "
          f"{'OK' if r <= args.target_s else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
