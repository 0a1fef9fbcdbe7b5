"""The full evaluation protocol of issue 6 on one GPU machine, with the library alone.

The lent GPU machine has torch, timm, OpenCV and scikit-learn but no Prefect or MLflow, and
it cannot reach this machine's servers. So this script runs the protocol's *steps* with
``ultrafed``'s pure functions -- the same site datasets, ``train_local``, ``fedavg``,
``global_val_loss``, ``finetune`` and ``train_baseline`` the flows call -- and writes one JSON
line per result; ``bench/import_results.py`` then logs those lines as MLflow result runs here
and ``ultrafed report`` builds docs/RESULTS.md from them. Pretraining plays its rounds with
the library's ``run_round`` and coordinator loop, as the flows do, with the in-process site
runner, weights in memory and a JSON-lines tracker (no registry, no quality gate: this machine
has no Great Expectations, and each round's lineage says ``skipped``).

Jobs (one process each, several at once: a ViT-Tiny leaves an H100 mostly idle, the CPU
augmentations are the bottleneck) in priority order, so a cut-off run loses seed 1 first::

    seed s: ultramim-fed, mae-fed, ultramim-central, scratch, baselines, no-smat-fed, no-mic-fed, no-tgm-fed

A pretraining job fine-tunes its encoder on every task (busi-cls, busi-seg, ddti-seg,
hc18-seg), selects the epoch on val and scores test once. Steps that do not fit in the
budget are written as ``skipped``; a failing step is ``failed`` with its one-line error.

    python bench/gpu_protocol.py shrink --data ../shared/data --out .gpu/data      # here, to carry
    python bench/gpu_protocol.py run --data .gpu/data --out $OUT --budget-s 420    # there
    python bench/gpu_protocol.py run --preset smoke --data ../shared/data --out /tmp/p --jobs 1   # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from run_protocol import split_metrics  # noqa: E402  (stdlib-only at import: fine on the GPU machine)

from ultrafed.protocol import TASKS  # noqa: E402  (stdlib-only, like run_protocol)
SITES = ("busi", "ddti", "hc18")
SEG_BASELINE_TASKS = ("busi-seg", "ddti-seg", "hc18-seg")

# Presets: dotted overrides of params.yaml plus the protocol's own budget.
PRESETS: dict[str, dict[str, Any]] = {
    # ViT-Tiny/16 at 128 px (the anchors are at 128 px), a 4 x 256 decoder, batch 64;
    # data fitted into 160 px by `shrink` to travel. 20 rounds x 1 local epoch, 25 fine-tuning epochs.
    "gpu-tiny128": {
        "config": {"model.preset": "tiny", "model.img_size": 128, "model.decoder_depth": 4, "model.decoder_dim": 256,
                   "model.decoder_heads": 8, "pretrain.batch_size": 64, "pretrain.base_lr": 1.5e-3,
                   "pretrain.warmup_epochs": 2, "finetune.img_size": 128, "finetune.epochs": 25,
                   "finetune.batch_size": 32, "finetune.baseline_img_size": 128},
        "rounds": 20, "local_epochs": 1, "workers": 3,
    },
    # seconds on a CPU: proves the script end to end, numbers mean nothing
    "smoke": {
        "config": {"model.preset": "tiny", "model.img_size": 64, "model.decoder_depth": 1, "model.decoder_dim": 64,
                   "model.decoder_heads": 2, "pretrain.batch_size": 32, "finetune.img_size": 64, "finetune.epochs": 1,
                   "finetune.batch_size": 32, "finetune.baseline_img_size": 64, "finetune.n_boot": 50},
        "rounds": 1, "local_epochs": 1, "workers": 0, "max_images": 64,
    },
}
MAE_OFF = {"ultramim.smat.enabled": False, "ultramim.mic.enabled": False, "ultramim.tgm.enabled": False}
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "ultramim-fed": ({}, "fed"),
    "mae-fed": (MAE_OFF, "fed"),
    "ultramim-central": ({}, "central"),
    "no-smat-fed": ({"ultramim.smat.enabled": False}, "fed"),
    "no-mic-fed": ({"ultramim.mic.enabled": False}, "fed"),
    "no-tgm-fed": ({"ultramim.tgm.enabled": False}, "fed"),
}
PRIORITY = ("ultramim-fed", "mae-fed", "ultramim-central", "scratch", "baselines", "no-smat-fed", "no-mic-fed",
            "no-tgm-fed")


# -- carrying the data -------------------------------------------------------------------------------

def shrink(data: Path, out: Path, longest: int) -> None:
    """Copy busi/ddti/hc18 with every image and mask fitted into ``longest`` px (area / nearest).

    The full data (90 MB) is over the 64 MiB that travels to the GPU machine. At 160 px a 128 px
    model still sees whole frames downsampled; only its smallest random crops are upsampled
    (about 1.5x) instead. Labels and splits are copied unchanged; the preset name records it.
    """
    import cv2

    n = 0
    for name in SITES:
        src = data / name
        if not (src / "labels.csv").is_file():
            raise SystemExit(f"shrink: {src / 'labels.csv'}: missing (is {data} the shared data folder?)")
        for sub in ("images", "masks", "unlabeled"):
            if not (src / sub).is_dir():
                continue
            for f in sorted((src / sub).rglob("*.png")):
                dst = out / name / f.relative_to(src)
                if dst.exists():
                    continue
                img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                if img is None:
                    raise SystemExit(f"shrink: {f}: not a readable image")
                h, w = img.shape[:2]
                s = min(1.0, longest / max(h, w))
                if s < 1.0:
                    size = (max(1, round(w * s)), max(1, round(h * s)))
                    img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if sub == "masks" else cv2.INTER_AREA)
                dst.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(dst), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
                n += 1
        for f in src.glob("*.csv"):
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / f.name).write_bytes(f.read_bytes())
    print(f"shrink: {n} images and masks fitted into {longest} px under {out}")


# -- one job -----------------------------------------------------------------------------------------

class Writer:
    """Appends one JSON line per result; each line is one ``write`` so concurrent jobs never interleave."""

    def __init__(self, path: Path, preset: str, device: str, argv: list[str]) -> None:
        self.path, self.preset, self.device, self.argv = path, preset, device, argv

    def __call__(self, *, variant: str, task: str, seed: int, status: str, wall_s: float, protocol_args: str,
                 metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
                 curve: list[dict[str, float]] | None = None, error: str | None = None) -> None:
        line = {"kind": "result", "variant": variant, "task": task, "seed": seed, "status": status,
                "preset": self.preset, "device": self.device, "wall_s": round(float(wall_s), 2),
                "command": " ".join(shlex.quote(a) for a in self.argv) + " " + protocol_args,
                "error": error, "metrics": metrics or {}, "params": params or {}}
        if curve is not None:
            line["curve"] = curve
        data = (json.dumps(line, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        shown = {k: round(v, 4) for k, v in (metrics or {}).items() if k.startswith("test_") and "_" not in k[5:]}
        print(f"[{status}] {variant} {task} seed {seed} {wall_s:.0f} s {shown or ''}{' ' + error if error else ''}",
              flush=True)


def _records(data: Path, splits: tuple[str, ...], limit: int | None) -> dict[str, list]:
    from ultrafed.data.sites import load_site

    out = {}
    for name in SITES:
        recs = load_site(data / name, name).select(splits)
        out[name] = recs[:limit] if limit else recs
    return out


def pretrain(cfg, data: Path, mode: str, rounds: int, local_epochs: int, workers: int, limit: int | None,
             work: Path) -> tuple[Any, dict[str, float], list[dict[str, float]]]:
    """Federated (one site per dataset) or centralized (one pooled site) UltraMIM; returns (encoder, metrics, curve).

    The rounds are :func:`ultrafed.federated.round.run_round` under the library's coordinator loop,
    exactly as the flows play them, with the in-process runner, weights in memory and no quality
    gate (this machine has no Great Expectations; the lineage of each round says ``skipped``).
    Sites train one after another on the one GPU.
    """
    import torch

    from ultrafed.federated.client import PRETRAIN_SPLITS
    from ultrafed.federated.coordinator import RunHooks, pretrain_rounds
    from ultrafed.federated.local import JsonlRoundTracker, MemoryStateStore
    from ultrafed.federated.round import run_round
    from ultrafed.federated.runners import InProcessRunner, LocalSite
    from ultrafed.models.mae import mae_from_config

    train = _records(data, PRETRAIN_SPLITS, limit)
    val = _records(data, ("val",), limit)
    if mode == "central":  # one site holding every train image: the upper bound federated learning chases
        sites = [LocalSite("central", str(data), str(work / "central"), tuple(r for n in SITES for r in train[n]),
                           tuple(r for n in SITES for r in val[n]))]
    else:
        sites = [LocalSite(n, str(data / n), str(work / n), tuple(train[n]), tuple(val[n])) for n in SITES]
    cfg = cfg.replace(**{"federated.local_epochs": local_epochs, "federated.min_sites": len(sites),
                         "pretrain.num_workers": workers})
    store = MemoryStateStore()
    tracker = JsonlRoundTracker(None, f"{mode}-seed{cfg.seed}", store=store)
    runner = InProcessRunner(cfg, sites, store, gate=False, max_workers=1)
    curve: list[dict[str, float]] = []
    images = seconds = per_round = 0.0

    def play(c, inputs):
        nonlocal images, seconds, per_round
        rec = run_round(c, [s.id for s in sites], inputs, runner, tracker)
        per_round = float(sum(u.n_images for u in rec.updates) * local_epochs)
        images += sum(u.metrics.get("images", 0.0) for u in rec.updates)
        seconds += sum(u.metrics.get("seconds", 0.0) for u in rec.updates)
        curve.append({"round": rec.round_idx, "train_loss": rec.metrics["train_loss"],
                      "global_val_loss": rec.metrics["global_val_loss"]})
        print(f"    round {rec.round_idx + 1}/{rounds}: train {curve[-1]['train_loss']:.4f} "
              f"val {curve[-1]['global_val_loss']:.4f}", flush=True)
        return rec

    hooks = RunHooks(store=store, start_run=lambda c: tracker.run_name, play_round=play,
                     after_round=lambda rec, st: store.retain({rec.global_ref.sha256}))
    state = pretrain_rounds(cfg, run_dir=work / "coordinator", rounds=rounds, resume=False, hooks=hooks,
                            code_commit="gpu-protocol", mode=mode)
    model = mae_from_config(cfg.model)
    model.load_state_dict(state.global_state)
    metrics = {"rounds": float(rounds), "train_loss": curve[-1]["train_loss"],
               "global_val_loss": curve[-1]["global_val_loss"], "img_per_s": images / max(seconds, 1e-9),
               "train_images_per_round": per_round}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model.encoder, metrics, curve


def _scores(res) -> dict[str, float]:
    return {**split_metrics(res.val, res.test), "best_epoch": float(res.best_epoch)}


def local_epochs(base: int, *, smat: bool, equal_steps: bool) -> int:
    """SMAT adds each file's converted copy to the epoch (as the official code does), so a variant
    without it takes half the optimizer steps per epoch; with ``equal_steps`` it gets twice the epochs."""
    return base * (2 if equal_steps and not smat else 1)


def run_job(job: dict[str, Any]) -> str:
    """One protocol job in its own process; every result goes to the JSON-lines file as it ends."""
    import torch

    from ultrafed.config import load_config
    from ultrafed.engine.device import select_device
    from ultrafed.engine.finetune import finetune, train_baseline

    # a spawned job would spawn its loader workers too, and the datasets do not pickle; fork them
    # (they never touch CUDA), as a plain Linux process would
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(max(1, int(job["threads"])))
    name, seed, preset = job["name"], int(job["seed"]), PRESETS[job["preset"]]
    data, deadline = Path(job["data"]), float(job["deadline"])
    write = Writer(Path(job["out"]), job["preset"], job["device_name"], job["argv"])
    args = f"--only {name} --seeds {seed}"
    device = select_device("auto")
    ft_est, pre_est = float(job["finetune_estimate_s"]), float(job["pretrain_estimate_s"])
    left = lambda: deadline - time.time()  # noqa: E731 - the wall clock is shared by every job

    def attempt(variant: str, task: str, estimate: float, fn, **extra) -> Any:
        if left() < estimate:
            write(variant=variant, task=task, seed=seed, status="skipped", wall_s=0.0, protocol_args=args,
                  error=f"{left():.0f} s left < estimate {estimate:.0f} s")
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
            write(variant=variant, task=task, seed=seed, status="failed", wall_s=time.perf_counter() - t0,
                  protocol_args=args, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
            return None
        wall = time.perf_counter() - t0
        metrics, params, curve = out if isinstance(out, tuple) else (_scores(out), dict(out.settings), None)
        write(variant=variant, task=task, seed=seed, status="ok", wall_s=wall, protocol_args=args, metrics=metrics,
              params=params, curve=curve, **extra)
        return out

    base = {**preset["config"], "seed": seed}
    if name == "baselines":
        cfg = load_config(None, base)
        fc = cfg.finetune
        kw = dict(img_size=fc.baseline_img_size, epochs=fc.epochs, batch_size=fc.batch_size, lr=fc.baseline_lr,
                  weight_decay=fc.baseline_weight_decay, seed=seed, device=device, progress=False,
                  evaluate_test=True, warmup_epochs=fc.warmup_epochs, num_workers=int(job["workers"]), n_boot=fc.n_boot)
        for kind, task in [("handcrafted-lr", "busi-cls"), ("resnet18", "busi-cls"),
                           *[("unet", t) for t in SEG_BASELINE_TASKS]]:
            attempt(f"baseline-{kind}", task, 5.0 if kind == "handcrafted-lr" else ft_est,
                    lambda kind=kind, task=task: train_baseline(task, data, kind, **kw))
        return name
    over, mode = ({}, None) if name == "scratch" else VARIANTS[name]
    cfg = load_config(None, {**base, **over})
    encoder = None
    if mode is not None:
        epochs = local_epochs(preset["local_epochs"], smat=cfg.ultramim.smat.enabled,
                              equal_steps=bool(job.get("equal_steps")))

        def _pre_result():
            with tempfile.TemporaryDirectory(prefix=f"ultrafed-gpu-{name}-{seed}-") as work:
                enc, metrics, curve = pretrain(cfg, data, mode, preset["rounds"], epochs, int(job["workers"]),
                                               preset.get("max_images"), Path(work))
            holder["encoder"] = enc
            params = dict(base) | over | {"rounds": preset["rounds"], "local_epochs": epochs, "mode": mode}
            return metrics, params, curve

        holder: dict[str, Any] = {}
        if attempt(name, "pretrain", pre_est, _pre_result) is None:
            for task in TASKS:
                write(variant=name, task=task, seed=seed, status="skipped", wall_s=0.0, protocol_args=args,
                      error="no encoder: pretraining did not run")
            return name
        encoder = holder["encoder"]
    fc = cfg.finetune
    for task in TASKS:
        attempt(name, task, ft_est, lambda task=task: finetune(
            task, data, encoder, preset=cfg.model.preset, img_size=fc.img_size, epochs=fc.epochs,
            batch_size=fc.batch_size, lr=fc.lr, weight_decay=fc.weight_decay, layer_decay=fc.layer_decay, seed=seed,
            device=device, progress=False, evaluate_test=True, warmup_epochs=fc.warmup_epochs,
            num_workers=int(job["workers"]), n_boot=fc.n_boot))
    return name


# -- the whole protocol ------------------------------------------------------------------------------

def plan(only: list[str] | None, seeds: list[int], exclude: list[str] | None = None) -> list[tuple[str, int]]:
    """Jobs in priority order: every job of the first seed, then the next seed; ``exclude`` holds ``name:seed``."""
    names = [n for n in PRIORITY if not only or n in only]
    skip = set(exclude or [])
    return [(n, s) for s in seeds for n in names if f"{n}:{s}" not in skip]


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    data = Path(args.data).resolve()
    if not (data / "busi" / "labels.csv").is_file():
        print(f"gpu_protocol: {data}: no busi/labels.csv (real data absent); nothing to run", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "results.jsonl"
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    start = time.time()
    deadline = start + args.budget_s
    jobs = plan(args.only, args.seeds, args.exclude)
    cores = os.cpu_count() or 2
    workers = PRESETS[args.preset]["workers"] if args.workers is None else args.workers
    n_par = max(1, min(args.jobs, len(jobs)))
    threads = max(1, (cores - n_par * workers) // n_par)
    print(f"gpu_protocol: {len(jobs)} jobs, {n_par} at a time, {workers} loader workers and {threads} threads each, "
          f"on {device_name} ({cores} cores), budget {args.budget_s:.0f} s -> {out}", flush=True)
    base = {"out": str(out), "data": str(data), "preset": args.preset, "deadline": deadline, "device_name": device_name,
            "argv": ["python", "bench/gpu_protocol.py", "run", "--preset", args.preset, "--data", args.data,
                     *(["--equal-steps"] if args.equal_steps else [])],
            "threads": threads, "workers": workers, "equal_steps": args.equal_steps,
            "finetune_estimate_s": args.finetune_estimate_s, "pretrain_estimate_s": args.pretrain_estimate_s}
    pending = list(jobs)
    running = {}
    with ProcessPoolExecutor(max_workers=n_par, mp_context=get_context("spawn")) as pool:
        def _stop(signum: int, _frame: Any) -> None:  # `timeout` or Ctrl-C: take the jobs down too, not only us
            for proc in list(pool._processes.values()):  # noqa: SLF001
                proc.kill()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while pending or running:
            while pending and len(running) < n_par and time.time() < deadline:
                name, seed = pending.pop(0)
                running[pool.submit(run_job, {**base, "name": name, "seed": seed})] = (name, seed)
            if not running:
                break
            done, _ = wait(running, timeout=max(1.0, deadline + args.grace_s - time.time()), return_when=FIRST_COMPLETED)
            if not done:  # past the deadline and its grace: leave the stragglers, keep what was written
                print(f"gpu_protocol: deadline passed; abandoning {sorted(running.values())}", flush=True)
                for p in list(pool._processes.values()):  # noqa: SLF001 - no public way to stop a running job
                    p.kill()
                break
            for f in done:
                name, seed = running.pop(f)
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001
                    print(f"gpu_protocol: job {name} seed {seed} died: {type(e).__name__}: {e}", flush=True)
    write = Writer(out, args.preset, device_name, base["argv"])  # type: ignore[arg-type]
    for name, seed in running.values():  # killed mid-way: the steps it finished are already written
        write(variant=name, task="all", seed=seed, status="failed", wall_s=0.0,
              protocol_args=f"--only {name} --seeds {seed}", error="stopped at the deadline; later steps did not run")
    for name, seed in pending:  # never started: say so, so the report lists them
        write(variant=name, task="all", seed=seed, status="skipped", wall_s=0.0,
              protocol_args=f"--only {name} --seeds {seed}", error="not started: the budget ran out")
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    ok = sum(1 for x in lines if x["status"] == "ok")
    print(f"gpu_protocol: {ok}/{len(lines)} results ok in {time.time() - start:.0f} s -> {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shrink", help="copy the shared data with images fitted into --longest px (to carry)")
    s.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    s.add_argument("--out", required=True)
    s.add_argument("--longest", type=int, default=160)
    r = sub.add_parser("run", help="run the protocol's jobs; results.jsonl under --out")
    r.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    r.add_argument("--out", required=True)
    r.add_argument("--preset", default="gpu-tiny128", choices=sorted(PRESETS))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--only", nargs="+", choices=PRIORITY, help="run these jobs only")
    r.add_argument("--exclude", nargs="+", metavar="NAME:SEED", help="jobs already run elsewhere")
    r.add_argument("--jobs", type=int, default=4, help="jobs at a time")
    r.add_argument("--budget-s", type=float, default=420.0, help="no step starts after this; jobs stop at it + grace")
    r.add_argument("--grace-s", type=float, default=20.0)
    r.add_argument("--workers", type=int, default=None, help="loader workers per job (default: the preset's)")
    r.add_argument("--equal-steps", action="store_true",
                   help="variants without SMAT train 2x the local epochs, so every variant takes the same optimizer "
                        "steps per round (the issue's 'same compute budget'); off in the recorded runs")
    r.add_argument("--pretrain-estimate-s", type=float, default=60.0)
    r.add_argument("--finetune-estimate-s", type=float, default=20.0)
    a = ap.parse_args(argv)
    if a.cmd == "shrink":
        shrink(Path(a.data), Path(a.out), a.longest)
        return 0
    return run(a, argv)


if __name__ == "__main__":
    raise SystemExit(main())
