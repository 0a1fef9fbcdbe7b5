"""Run the (reduced) evaluation protocol of docs/RESULTS.md and log every result to MLflow.

Pretraining variants on the real sites (busi, ddti, hc18: train split + hc18/unlabeled), each
encoder fine-tuned on BUSI-cls and a segmentation task, plus the hand-crafted + LR baseline.
Every result becomes one MLflow run tagged ``ultrafed.kind=result`` (variant, task, seed,
preset, wall_s, the command that reproduces it) that ``ultrafed report`` reads back; nothing
is printed for copying by hand.

The store is separate from the project's embedded one (the results must not mix with demos)::

    .venv/bin/python bench/run_protocol.py --budget-min 60        # the reduced CPU protocol
    .venv/bin/python bench/run_protocol.py --groups central resnet18 --budget-min 20   # more, if time is left
    .venv/bin/ultrafed report --out docs/RESULTS.md               # tables and plots from it

Steps run in priority order against a wall-clock deadline; a step whose estimate does not
fit in the time left is skipped and recorded as skipped (a ``result`` run with status
``skipped``), so the report can say what did not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Standard library only at import (bench/gpu_protocol.py imports this file on a machine without MLflow).
from ultrafed.paths import REPO_ROOT as REPO
from ultrafed.paths import RESULTS_HOME, RESULTS_TRACKING_URI, neutral
from ultrafed.protocol import (
    CENTRAL,
    CPU_PROTOCOL,
    EXPERIMENT,
    FEDERATED,
    PLAIN_MAE,
    PRETRAIN_TASK,
    RESULT_KIND,
    RUN_STATUS,
    SCRATCH,
    primary_metric,
)

# The reduced CPU preset (documented in RESULTS.md through the runs' tags and params).
PRESET_NAME = CPU_PROTOCOL
PRESET: dict[str, Any] = {
    "model.preset": "tiny", "model.img_size": 64, "model.decoder_depth": 1, "model.decoder_dim": 128,
    "model.decoder_heads": 4, "pretrain.batch_size": 32, "finetune.img_size": 64,
}
MAE_OFF = {"ultramim.smat.enabled": False, "ultramim.mic.enabled": False, "ultramim.tgm.enabled": False}


def _sets(over: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in over.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["ULTRAFED_HOME"] = str(RESULTS_HOME)
    env["MLFLOW_TRACKING_URI"] = RESULTS_TRACKING_URI
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def _command(argv: list[str]) -> str:
    """The command a result records (and RESULTS.md prints): quoted, with this checkout's paths relative
    to the repository root (``../shared/data``), which is where it runs from."""
    return neutral(" ".join(shlex.quote(a) for a in argv))


def split_metrics(val: dict[str, float], test: dict[str, float] | None) -> dict[str, float]:
    """A model's val and test scores under the ``val_<m>`` / ``test_<m>`` names ``ultrafed report`` reads."""
    out = {f"val_{k}": float(v) for k, v in val.items()}
    out.update({f"test_{k}": float(v) for k, v in (test or {}).items()})
    return out


def centralized_folder(data: Path, out: Path) -> Path:
    """One site folder holding the train, val (and unlabeled) images of busi, ddti and hc18 as symlinks.

    Only ``id`` and ``split`` are written: pretraining reads no labels and trains on train +
    unlabeled only; val is there for the round's reconstruction-loss check, as at the three
    federated sites. Ids are prefixed with the dataset so they never collide; test images are
    not linked at all.
    """
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for name in ("busi", "ddti", "hc18"):
        with open(data / name / "labels.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("split") not in ("train", "val"):
                    continue
                src = data / name / "images" / f"{row['id']}.png"
                dst = out / "images" / f"{name}_{row['id']}.png"
                if src.is_file() and not dst.exists():
                    dst.symlink_to(src.resolve())
                rows.append({"id": f"{name}_{row['id']}", "split": row["split"]})
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "split"])
        w.writeheader()
        w.writerows(rows)
    unl = out / "unlabeled"
    if not unl.exists() and (data / "hc18" / "unlabeled").is_dir():
        unl.symlink_to((data / "hc18" / "unlabeled").resolve())
    (out.parent / "sites-central.yaml").write_text(f"mode: embedded\nsites:\n  - id: central\n    root: {out}\n")
    return out.parent / "sites-central.yaml"


class Protocol:
    def __init__(self, data: Path, budget_s: float, rounds: int, local_epochs: int, ft_epochs: int,
                 seg_task: str, seed: int) -> None:
        self.data, self.rounds, self.local_epochs, self.ft_epochs = data, rounds, local_epochs, ft_epochs
        self.seg_task, self.seed = seg_task, seed
        self.deadline = time.monotonic() + budget_s
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.encoders: dict[str, str | None] = {SCRATCH: None}
        self.pretrain_s: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- tracking ----------------------------------------------------------------------------
    def _client(self):
        from mlflow import MlflowClient

        from ultrafed.tracking.runs import configure_tracking

        configure_tracking()
        return MlflowClient()

    def log_result(self, *, variant: str, task: str, status: str, wall_s: float, command: str,
                   metrics: dict[str, float] | None = None, extra_tags: dict[str, str] | None = None,
                   params: dict[str, Any] | None = None) -> str:
        from ultrafed.tracking.runs import ensure_experiment, log_metrics

        client = self._client()
        exp = ensure_experiment(EXPERIMENT)
        tags = {"ultrafed.kind": RESULT_KIND, "ultrafed.variant": variant, "ultrafed.task": task,
                "ultrafed.seed": str(self.seed), "ultrafed.preset": PRESET_NAME, "ultrafed.wall_s": f"{wall_s:.1f}",
                "ultrafed.status": status, "ultrafed.command": command, **(extra_tags or {})}
        rid = client.create_run(exp, run_name=f"result-{variant}-{task}", tags=tags).info.run_id
        if params:
            for k, v in params.items():
                client.log_param(rid, k, str(v)[:500])
        m = {k: float(v) for k, v in (metrics or {}).items() if v == v}
        m["wall_s"] = float(wall_s)
        log_metrics(rid, m)
        client.set_terminated(rid, RUN_STATUS[status])
        return rid

    def skipped(self, *, variant: str, task: str, estimate_s: float, command: str, what: str) -> bool:
        """Record a ``skipped`` result when ``estimate_s`` no longer fits in the time left; True then."""
        if self.left() >= estimate_s:
            return False
        print(f"[skip] {what}: {self.left():.0f} s left < estimate {estimate_s:.0f} s", flush=True)
        self.log_result(variant=variant, task=task, status="skipped", wall_s=0.0, command=command)
        return True

    # -- steps -------------------------------------------------------------------------------
    def pretrain(self, variant: str, over: dict[str, Any], estimate_s: float, sites_args: list[str]) -> None:
        name = f"{variant}-{self.stamp}"
        over = {**PRESET, **over, "tracking.experiment": EXPERIMENT, "federated.local_epochs": self.local_epochs,
                "seed": self.seed}
        metrics_out = RESULTS_HOME / "out" / f"{name}.json"
        argv = ["ultrafed", "pretrain", *sites_args, "--rounds", str(self.rounds), "--run-name", name,
                "--metrics-out", str(metrics_out), *_sets(over)]
        cmd = _command(argv)
        if self.skipped(variant=variant, task=PRETRAIN_TASK, estimate_s=estimate_s, command=cmd,
                        what=f"pretrain {variant}"):
            return
        print(f"[run ] pretrain {variant}: {cmd}", flush=True)
        t0 = time.perf_counter()
        log = RESULTS_HOME / "out" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.run([str(REPO / ".venv" / "bin" / "ultrafed"), *argv[1:]], cwd=REPO, env=_env(),
                                stdout=fh, stderr=subprocess.STDOUT,
                                timeout=max(60.0, self.left())).returncode
        wall = time.perf_counter() - t0
        if rc != 0 or not metrics_out.is_file():
            print(f"[fail] pretrain {variant}: rc {rc}, see {log}", flush=True)
            self.log_result(variant=variant, task=PRETRAIN_TASK, status="failed", wall_s=wall, command=cmd)
            return
        out = json.loads(metrics_out.read_text())
        self.encoders[variant] = out["model_uri"]
        self.pretrain_s[variant] = wall
        client = self._client()
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  filter_string=f"attributes.run_name = '{name}' and tags.`ultrafed.kind` = 'pretraining'")
        for r in runs:  # the parent run carries the loss curves the report plots
            for k, v in {"ultrafed.variant": variant, "ultrafed.preset": PRESET_NAME, "ultrafed.wall_s": f"{wall:.1f}",
                         "ultrafed.command": cmd, "ultrafed.seed": str(self.seed)}.items():
                client.set_tag(r.info.run_id, k, v)
        self.log_result(variant=variant, task=PRETRAIN_TASK, status="ok", wall_s=wall, command=cmd,
                        metrics={k: v for k, v in out.items() if isinstance(v, (int, float))},
                        extra_tags={"ultrafed.encoder_uri": out["model_uri"],
                                    "ultrafed.pretrain_run": runs[0].info.run_id if runs else ""},
                        params={"rounds": self.rounds, "local_epochs": self.local_epochs, **over})
        print(f"[done] pretrain {variant}: {out['model_uri']} in {wall:.0f} s", flush=True)

    def finetune(self, variant: str, task: str, estimate_s: float) -> None:
        from ultrafed.config import load_config

        over = {**PRESET, "tracking.experiment": EXPERIMENT, "finetune.epochs": self.ft_epochs, "seed": self.seed}
        enc = self.encoders.get(variant, "missing")
        argv = ["ultrafed", "finetune", "--task", task, "--test", "--data", str(self.data), *_sets(over)]
        if enc:
            argv[4:4] = ["--encoder", enc]
        cmd = _command(argv)
        if enc == "missing":
            print(f"[skip] finetune {variant} {task}: no encoder (pretraining did not run)", flush=True)
            self.log_result(variant=variant, task=task, status="skipped", wall_s=0.0, command=cmd)
            return
        if self.skipped(variant=variant, task=task, estimate_s=estimate_s, command=cmd, what=f"finetune {variant} {task}"):
            return
        from tasks.finetune import finetune_and_register

        print(f"[run ] finetune {variant} {task}", flush=True)
        cfg = load_config(None, over)
        t0 = time.perf_counter()
        try:
            out = finetune_and_register(cfg.to_dict(), task, str(self.data), enc, evaluate_test=True,
                                        register=enc is not None)
        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
            wall = time.perf_counter() - t0
            print(f"[fail] finetune {variant} {task}: {type(e).__name__}: {e}", flush=True)
            self.log_result(variant=variant, task=task, status="failed", wall_s=wall, command=cmd,
                            extra_tags={"ultrafed.error": f"{type(e).__name__}: {e}"[:250]})
            return
        wall = time.perf_counter() - t0
        self.log_result(variant=variant, task=task, status="ok", wall_s=wall, command=cmd,
                        metrics=split_metrics(out["val"], out["test"]),
                        extra_tags={"ultrafed.encoder_uri": enc or SCRATCH, "ultrafed.finetune_run": out["run_id"],
                                    "ultrafed.model_uri": out["model_uri"] or ""},
                        params={"epochs": self.ft_epochs, **over})
        key = primary_metric(task)
        print(f"[done] finetune {variant} {task}: test {key} {out['test'][key]:.3f} in {wall:.0f} s", flush=True)

    def baseline(self, kind: str, task: str, estimate_s: float, epochs: int) -> None:
        from ultrafed.config import load_config
        from ultrafed.engine.finetune import baseline_from_config

        variant = f"baseline-{kind}"
        over = {"finetune.epochs": epochs, "seed": self.seed}
        cmd = neutral(f"python -c \"from ultrafed.config import load_config; from ultrafed.engine.finetune import "
                      f"baseline_from_config; baseline_from_config('{task}', '{self.data}', '{kind}', "
                      f"load_config(None, {over!r}), evaluate_test=True)\"")
        if self.skipped(variant=variant, task=task, estimate_s=estimate_s, command=cmd, what=f"{variant} {task}"):
            return
        print(f"[run ] {variant} {task}", flush=True)
        cfg = load_config(None, over)
        t0 = time.perf_counter()
        res = baseline_from_config(task, self.data, kind, cfg, evaluate_test=True, progress=False)
        wall = time.perf_counter() - t0
        self.log_result(variant=variant, task=task, status="ok", wall_s=wall, command=cmd,
                        metrics=split_metrics(res.val, res.test),
                        extra_tags={"ultrafed.preset": f"{kind}@{cfg.finetune.baseline_img_size}px"},
                        params={k: v for k, v in res.settings.items()})
        key = primary_metric(task)
        print(f"[done] {variant} {task}: test {key} {res.test[key]:.3f} in {wall:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--budget-min", type=float, default=60.0, help="hard wall-clock budget of the whole protocol")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--seg-task", default="ddti-seg", choices=["ddti-seg", "hc18-seg", "busi-seg"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-estimate-s", type=float, default=480.0)
    ap.add_argument("--finetune-estimate-s", type=float, default=180.0)
    ap.add_argument("--groups", nargs="+", default=["main"], choices=["main", "central", "resnet18", "unet"],
                    help="main: handcrafted-LR, federated UltraMIM, federated MAE, scratch, fine-tuned on busi-cls and "
                         "the segmentation task; central: (d) centralized UltraMIM (one site holding every train image) "
                         "and its fine-tuning; resnet18 / unet: the from-scratch CNN baselines at 128 px")
    ap.add_argument("--baseline-estimate-s", type=float, default=300.0)
    args = ap.parse_args(argv)

    os.environ.update({k: v for k, v in _env().items() if k in ("ULTRAFED_HOME", "MLFLOW_TRACKING_URI",
                                                                "MLFLOW_DISABLE_TELEMETRY")})
    data = Path(args.data).resolve()
    if not (data / "busi" / "labels.csv").is_file():
        print(f"run_protocol: {data}: no busi/labels.csv (real data absent); nothing to run", file=sys.stderr)
        return 2
    RESULTS_HOME.mkdir(parents=True, exist_ok=True)
    p = Protocol(data, args.budget_min * 60, args.rounds, args.local_epochs, args.ft_epochs, args.seg_task, args.seed)
    t0 = time.perf_counter()
    fe = args.finetune_estimate_s
    if "main" in args.groups:  # priority order: the BUSI-cls comparison of all three encoders first
        p.baseline("handcrafted-lr", "busi-cls", 60, epochs=args.ft_epochs)
        p.pretrain(FEDERATED, {}, args.pretrain_estimate_s, ["--data", str(data)])
        p.finetune(FEDERATED, "busi-cls", fe)
        p.finetune(SCRATCH, "busi-cls", fe)
        p.pretrain(PLAIN_MAE, MAE_OFF, args.pretrain_estimate_s, ["--data", str(data)])
        p.finetune(PLAIN_MAE, "busi-cls", fe)
        for variant in (FEDERATED, SCRATCH, PLAIN_MAE):
            p.finetune(variant, args.seg_task, fe)
    if "central" in args.groups:
        sites_yaml = centralized_folder(data, RESULTS_HOME / "central" / "central")
        p.pretrain(CENTRAL, {"federated.min_sites": 1}, args.pretrain_estimate_s, ["--sites", str(sites_yaml)])
        p.finetune(CENTRAL, "busi-cls", fe)
        p.finetune(CENTRAL, args.seg_task, fe)
    if "resnet18" in args.groups:
        p.baseline("resnet18", "busi-cls", args.baseline_estimate_s, epochs=args.ft_epochs)
    if "unet" in args.groups:
        p.baseline("unet", args.seg_task, args.baseline_estimate_s, epochs=args.ft_epochs)
    print(f"protocol done in {time.perf_counter() - t0:.0f} s; pretraining wall: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in p.pretrain_s.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
