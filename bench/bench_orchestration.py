"""What does a federated round cost besides training? Today's round against the code before
``run_round``, and the Prefect runner against the in-process runner, in one invocation.

    .venv/bin/python bench/bench_orchestration.py [--sites 4] [--rounds 3] [--per-site 8] [--size 32]
                                                  [--baseline-rev bfef65e]

Training is made negligible (``--per-site`` images at ``--size`` px, one local epoch, a
one-block decoder), so a round's wall time is its fixed cost: quality gates, MLflow runs,
weight transfers, screening, aggregation, validation, metrics and pictures, registration.

* ``prefect``: :func:`flows.round.federated_round`, i.e. :func:`ultrafed.federated.round.run_round`
  with the Prefect runner (ephemeral API, thread task runner) and MLflow tracking;
* ``inprocess``: the same ``run_round`` with :class:`ultrafed.federated.runners.InProcessRunner`;
* ``baseline``: ``--baseline-rev`` (default: the last commit before ``run_round``) checked out
  in a temporary git worktree and its own ``bench/bench_orchestration.py`` run in a subprocess
  with the same settings; its round flow is what the README's embedded mode ran before.

A warm-up round per variant (the ephemeral API server's start) is dropped; the new variants
are interleaved so load changes hit both alike. Prints medians, the ratio new/baseline, the
Prefect overhead (prefect - inprocess) and the per-step breakdown of the new round.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BASELINE_REV = "bfef65e"  # the round as a Prefect flow body, before ultrafed/federated/round.py


def run_baseline(rev: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median round seconds of the old code's flow (its own bench, in a temporary worktree)."""
    tmp = Path(tempfile.mkdtemp(prefix="ultrafed-bench-base-"))
    wt = tmp / "checkout"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(wt), rev], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(wt), "ULTRAFED_HOME": str(tmp / "home")}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, str(wt / "bench" / "bench_orchestration.py"), "--sites", str(args.sites),
               "--rounds", str(args.rounds), "--per-site", str(args.per_site), "--size", str(args.size)]
        out = subprocess.run(cmd, cwd=wt, env=env, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"baseline {rev}: bench failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
        m = re.search(r"flow ([\d.]+) s, direct ([\d.]+) s", out.stdout)
        steps = re.search(r"direct round, median seconds per step: (.*)", out.stdout)
        if not m:
            raise SystemExit(f"baseline {rev}: no medians in its output:\n{out.stdout[-2000:]}")
        return {"flow": float(m.group(1)), "direct": float(m.group(2)), "steps": steps.group(1) if steps else ""}
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--per-site", type=int, default=8, help="images per site (8: the quality gate minimum; 5 train)")
    ap.add_argument("--size", type=int, default=32, help="image and model size in px")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision to compare against ('' to skip)")
    args = ap.parse_args()

    baseline = run_baseline(args.baseline_rev, args) if args.baseline_rev else None

    home = Path(tempfile.mkdtemp(prefix="ultrafed-bench-orch-"))
    os.environ.update({"ULTRAFED_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    import flows  # noqa: F401  (runtime env)
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.round import federated_round, manifest_paths
    from ultrafed.config import load_config
    from ultrafed.data.synth import make_cohort
    from ultrafed.federated.round import ModelRef, RoundInputs, run_round
    from ultrafed.federated.runners import InProcessRunner, LocalSite
    from ultrafed.federated.sitesfile import cohort_sites
    from ultrafed.models.mae import mae_from_config
    from ultrafed.tracking.round_tracking import MlflowRoundTracker, MlflowStateStore
    from ultrafed.tracking.runs import code_commit, configure_tracking, start_parent_run
    from ultrafed.tracking.store import get_state, put_state, retain, state_sha256

    configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
    make_cohort(home / "cohort", args.sites, args.per_site, seed=0, size=args.size, progress=None)
    c = load_config(overrides={"model.img_size": args.size, "model.decoder_depth": 1, "model.decoder_dim": 32,
                               "model.decoder_heads": 1, "pretrain.batch_size": 2, "federated.local_epochs": 1,
                               "federated.rounds": args.rounds + 1, "federated.min_sites": args.sites,
                               "federated.site_timeout_s": 600})
    conc = max(1, c.federated.max_concurrency)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(conc, args.sites)))  # as run_pretrain does
    commit, phash = code_commit(), c.params_hash()
    init = mae_from_config(c.model, seed=c.seed).state_dict()
    chains: dict[str, dict[str, Any]] = {}
    for name in ("prefect", "inprocess"):  # separate site work dirs and MLflow parents: two independent runs
        parent = start_parent_run(c, run_name=f"bench-{name}")
        run_dir = home / "runs" / name
        run_dir.mkdir(parents=True)
        sites = [dict(s, work_dir=str(home / f"work-{name}" / s["id"])) for s in cohort_sites(home / "cohort")]
        chains[name] = {"sites": sites, "parent": parent, "run_dir": str(run_dir), "state": init,
                        "ref": ModelRef(put_state(init, parent, "global-start"), state_sha256(init)),
                        "version": None, "times": [], "phases": [], "losses": []}
    round_flow = federated_round.with_options(task_runner=ThreadPoolTaskRunner(max_workers=conc))
    print(f"{args.sites} sites x {args.per_site} images at {args.size} px, preset {c.model.preset}, "
          f"{conc} concurrent site tasks, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for r in range(args.rounds + 1):
        for name in ("prefect", "inprocess") if r % 2 == 0 else ("inprocess", "prefect"):
            ch = chains[name]
            t0 = time.perf_counter()
            if name == "prefect":
                out = round_flow(c.to_dict(), ch["sites"], mode="embedded", round_idx=r, global_uri=ch["ref"].uri,
                                 global_sha256=ch["ref"].sha256, server_state_path=None, parent_version=ch["version"],
                                 parent_run_id=ch["parent"], run_dir=ch["run_dir"], code_commit=commit,
                                 params_hash=phash)
                ref, version, metrics, phases = ModelRef(out["global_uri"], out["global_sha256"]), out["version"], \
                    out["metrics"], out["phases"]
                state = get_state(ref.uri, expected_sha256=ref.sha256)
            else:
                local = [LocalSite(s["id"], s["root"], s["work_dir"]) for s in ch["sites"]]
                inputs = RoundInputs(round_idx=r, global_state=ch["state"], global_ref=ch["ref"],
                                     parent_version=ch["version"], run_key=ch["parent"], code_commit=commit,
                                     params_hash=phash, manifest_paths=manifest_paths(ch["sites"], "embedded"))
                rec = run_round(c, [s.id for s in local], inputs, InProcessRunner(c, local, MlflowStateStore()),
                                MlflowRoundTracker(c, ch["parent"]))
                ref, version, metrics, phases, state = rec.global_ref, rec.version, rec.metrics, rec.phases, \
                    rec.global_state
            dt = time.perf_counter() - t0
            retain({chains[n]["ref"].sha256 for n in chains} | {ref.sha256})
            assert metrics["sites_accepted"] == args.sites, metrics
            ch.update(ref=ref, version=version, state=state)
            ch["times"].append(dt)
            ch["phases"].append(phases)
            ch["losses"].append(metrics["train_loss"])
            ch.setdefault("compute", []).append(metrics["site_train_seconds"] / min(conc, args.sites))
            print(f"round {r}{' (warm-up)' if r == 0 else ''} {name:<9} {dt:6.2f} s "
                  f"(train loss {metrics['train_loss']:.4f})", flush=True)
    same = chains["prefect"]["losses"] == chains["inprocess"]["losses"]
    print(f"same train losses in every round (both runners did the same work): {'yes' if same else 'NO'}")
    med = {n: statistics.median(ch["times"][1:]) for n, ch in chains.items()}
    print(f"\nmedian of {args.rounds} rounds after warm-up: prefect {med['prefect']:.2f} s, "
          f"inprocess {med['inprocess']:.2f} s; Prefect overhead {med['prefect'] - med['inprocess']:+.2f} s per round, "
          f"ratio {med['prefect'] / med['inprocess']:.2f}")
    compute = statistics.median(chains["inprocess"]["compute"][1:] + chains["prefect"]["compute"][1:])
    print(f"training loops (sum over sites / {min(conc, args.sites)} concurrent): {compute:.2f} s per round; "
          f"fixed part: prefect {med['prefect'] - compute:.2f} s, inprocess {med['inprocess'] - compute:.2f} s")
    for n in chains:
        ph = chains[n]["phases"][1:]
        print(f"{n} round, median seconds per step: "
              + ", ".join(f"{k} {statistics.median(p[k] for p in ph):.2f}" for k in ph[0]))
    if baseline:
        print(f"baseline {args.baseline_rev} (same settings, its own bench in a temporary worktree): "
              f"flow {baseline['flow']:.2f} s, direct {baseline['direct']:.2f} s; its steps: {baseline['steps']}")
        print(f"ratio new/baseline: prefect/flow {med['prefect'] / baseline['flow']:.2f}, "
              f"inprocess/direct {med['inprocess'] / baseline['direct']:.2f}")
        print(f"fixed part (round - training loops; the baseline trains the same steps, so its loops are taken "
              f"as equal): prefect/flow {(med['prefect'] - compute) / (baseline['flow'] - compute):.2f}, "
              f"inprocess/direct {(med['inprocess'] - compute) / (baseline['direct'] - compute):.2f}")
    print(f"warm-up round: prefect {chains['prefect']['times'][0]:.2f} s (starts the ephemeral API server), "
          f"inprocess {chains['inprocess']['times'][0]:.2f} s")


if __name__ == "__main__":
    main()
