"""What does Prefect cost per federated round? The real round flow vs the same steps called directly.

    .venv/bin/python bench/bench_orchestration.py [--sites 4] [--rounds 3] [--per-site 8] [--size 32]

Both variants run, in this process and embedded mode, every step of a round with the same
library calls: quality gate, local training, update screening, aggregation, validation of the
new global model, MLflow round/site runs, metrics and pictures, registration. ``flow`` is
:func:`flows.round.federated_round` (Prefect ephemeral API, ThreadPoolTaskRunner); ``direct``
calls the tasks' undecorated functions (``task.fn``) through a ThreadPoolExecutor of the same
width. Training is made negligible (``--per-site`` images at ``--size`` px, one local epoch,
one-block decoder) so what remains is the round's fixed cost. A warm-up round of each (it pays
for the ephemeral API server's start) is dropped; then ``--rounds`` rounds, flow and direct
interleaved so load changes on a shared machine hit both alike. Prints the medians, the
overhead per round (flow - direct; target <= 2 s) and the ratio. Federation mode is not
measured here (its cost is dominated by worker polling and process start per site action).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def direct_round(cfg: dict, sites: list[dict], *, round_idx: int, global_uri: str, global_sha256: str,
                 server_state_path: str | None, parent_version: int | None, parent_run_id: str, run_dir: str,
                 code_commit: str, params_hash: str, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """flows/round.py's federated_round step for step, without Prefect (the baseline)."""
    from flows.round import _site_lineage, manifest_path
    from tasks.aggregate import aggregate, validate_updates
    from tasks.register import register
    from tasks.sites import check_site, train_site, validate_global
    from ultrafed.federated.coordinator import require_quorum
    from ultrafed.federated.metrics import spread
    from ultrafed.tracking.pictures import log_site_bars
    from ultrafed.tracking.runs import end_run, log_metrics, start_round_run, start_site_run

    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    clock = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now

    fed, mode = cfg["federated"], "embedded"
    timeout = float(fed["site_timeout_s"])
    round_run = start_round_run(parent_run_id, round_idx)
    site_runs = {s["id"]: start_site_run(round_run, s["id"], round_idx) for s in sites}
    gates = {s["id"]: f.result() for s, f in zip(sites, [pool.submit(check_site.fn, s, mode=mode, timeout_s=timeout,
                                                                     run_id=site_runs[s["id"]]) for s in sites])}
    lap("mlflow runs + check")
    excluded = {sid: "quality gate failed" for sid, g in gates.items() if g["status"] == "fail"}
    eligible = [s for s in sites if s["id"] not in excluded]
    futs = [pool.submit(train_site.fn, s, cfg, round_idx=round_idx, global_uri=global_uri, global_sha256=global_sha256,
                        run_id=site_runs[s["id"]], run_key=parent_run_id, mode=mode, timeout_s=timeout) for s in eligible]
    refs = [f.result() for f in futs]
    lap("train")
    screened = validate_updates.fn(global_uri, global_sha256, refs, float(fed["norm_bound"]))
    accepted = screened["accepted"]
    require_quorum([r["site"] for r in accepted], int(fed["min_sites"]), excluded)
    agg = aggregate.fn(global_uri, global_sha256, accepted, strategy=fed["strategy"],
                       strategy_params=fed["strategy_params"], server_state_path=server_state_path,
                       round_run_id=round_run, out_dir=run_dir, round_idx=round_idx)
    lap("screen + aggregate")
    vfuts = {s["id"]: pool.submit(validate_global.fn, s, cfg, global_uri=agg["global_uri"],
                                  global_sha256=agg["global_sha256"], mode=mode, timeout_s=timeout,
                                  run_id=site_runs[s["id"]], round_idx=round_idx) for s in eligible}
    val_loss = {sid: float(f.result()["val_loss"]) for sid, f in vfuts.items()}
    lap("validate")
    train_loss = {r["site"]: float(r["metrics"].get("loss", float("nan"))) for r in accepted}
    metrics = {"global_val_loss": statistics.fmean(val_loss.values()), "train_loss": statistics.fmean(train_loss.values()),
               "sites_accepted": float(len(accepted)), "sites_excluded": float(len(excluded))}
    metrics.update({f"val_loss_spread_{k}": v for k, v in spread(val_loss).items()})
    metrics.update({f"train_loss.{k}": v for k, v in train_loss.items()})
    metrics.update({f"val_loss.{k}": v for k, v in val_loss.items()})
    for sid, d in screened["drift"].items():
        metrics.update({f"{m}.{sid}": float(v) for m, v in d.items()})
    metrics["seconds"] = time.perf_counter() - t0
    log_metrics(round_run, metrics)
    log_metrics(parent_run_id, metrics, step=round_idx)
    for name, per_site in (("val_loss", val_loss), ("train_loss", train_loss)):
        log_site_bars(round_run, per_site, metric=name, round_idx=round_idx)
    top = {k: v for k, v in metrics.items() if "." not in k}
    lap("metrics + pictures")
    lineage = {
        "round": round_idx, "parent_version": parent_version, "strategy": fed["strategy"],
        "strategy_params": dict(fed["strategy_params"]), "code_commit": code_commit, "params_hash": params_hash,
        "seed": cfg["seed"], "run_id": round_run, "parent_run_id": parent_run_id, "excluded": excluded, "metrics": top,
        "model": {k: cfg["model"][k] for k in ("preset", "img_size", "patch_size", "in_chans")},
        "extra": {"global_uri": agg["global_uri"], "global_sha256": agg["global_sha256"], "mode": mode,
                  "gates": {sid: g["status"] for sid, g in gates.items()}},
        "sites": [_site_lineage(r, gates[r["site"]], agg["weights"], train_loss, val_loss, screened["drift"],
                                manifest_path(sites, r["site"], mode)) for r in accepted],
    }
    reg = register.fn(cfg, global_uri=agg["global_uri"], global_sha256=agg["global_sha256"], run_id=round_run,
                      lineage=lineage, metrics=top)
    end_run(round_run)
    for rid in site_runs.values():
        end_run(rid)
    lap("register + close runs")
    return {"phases": phases, "global_uri": agg["global_uri"], "global_sha256": agg["global_sha256"],
            "server_state_path": agg["server_state_path"], "version": reg["version"], "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--per-site", type=int, default=8, help="images per site (8: the quality gate minimum; 5 train)")
    ap.add_argument("--size", type=int, default=32, help="image and model size in px")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ultrafed-bench-orch-"))
    os.environ.update({"ULTRAFED_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    import flows  # noqa: F401  (runtime env)
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.round import federated_round
    from ultrafed.config import load_config
    from ultrafed.data.synth import make_cohort
    from ultrafed.federated.sitesfile import cohort_sites
    from ultrafed.models.mae import mae_from_config
    from ultrafed.tracking.runs import code_commit, configure_tracking, start_parent_run
    from ultrafed.tracking.store import put_state, state_sha256

    configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
    make_cohort(home / "cohort", args.sites, args.per_site, seed=0, size=args.size, progress=None)
    c = load_config(overrides={"model.img_size": args.size, "model.decoder_depth": 1, "model.decoder_dim": 32,
                               "model.decoder_heads": 1, "pretrain.batch_size": 2, "federated.local_epochs": 1,
                               "federated.rounds": args.rounds + 1, "federated.min_sites": args.sites,
                               "federated.site_timeout_s": 600})
    cfg = c.to_dict()
    conc = max(1, c.federated.max_concurrency)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(conc, args.sites)))  # as run_pretrain does
    commit, phash = code_commit(), c.params_hash()
    init = mae_from_config(c.model, seed=c.seed).state_dict()
    chains: dict[str, dict[str, Any]] = {}
    for name in ("flow", "direct"):  # separate site work dirs and MLflow parents: two independent runs
        parent = start_parent_run(c, run_name=f"bench-{name}")
        run_dir = home / "runs" / name
        run_dir.mkdir(parents=True)
        chains[name] = {"sites": [dict(s, work_dir=str(home / f"work-{name}" / s["id"])) for s in cohort_sites(home / "cohort")],
                        "parent": parent, "run_dir": str(run_dir), "global_uri": put_state(init, parent, "global-start"),
                        "global_sha256": state_sha256(init), "server_state_path": None, "version": None, "times": []}
    round_flow = federated_round.with_options(task_runner=ThreadPoolTaskRunner(max_workers=conc))
    print(f"{args.sites} sites x {args.per_site} images at {args.size} px, preset {c.model.preset}, "
          f"{conc} concurrent site tasks, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    with ThreadPoolExecutor(max_workers=conc) as pool:
        for r in range(args.rounds + 1):
            for name in ("flow", "direct") if r % 2 == 0 else ("direct", "flow"):
                ch = chains[name]
                kw = dict(round_idx=r, global_uri=ch["global_uri"], global_sha256=ch["global_sha256"],
                          server_state_path=ch["server_state_path"], parent_version=ch["version"],
                          parent_run_id=ch["parent"], run_dir=ch["run_dir"], code_commit=commit, params_hash=phash)
                t0 = time.perf_counter()
                rec = round_flow(cfg, ch["sites"], mode="embedded", **kw) if name == "flow" else \
                    direct_round(cfg, ch["sites"], pool=pool, **kw)
                dt = time.perf_counter() - t0
                assert rec["metrics"]["sites_accepted"] == args.sites, rec["metrics"]
                ch.update({k: rec[k] for k in ("global_uri", "global_sha256", "server_state_path", "version")})
                ch["times"].append(dt)
                ch.setdefault("phases", []).append(rec.get("phases", {}))
                ch.setdefault("losses", []).append(rec["metrics"]["train_loss"])
                print(f"round {r}{' (warm-up)' if r == 0 else ''} {name:<6} {dt:6.2f} s "
                      f"(train loss {rec['metrics']['train_loss']:.4f})", flush=True)
    same = chains["flow"]["losses"] == chains["direct"]["losses"]
    print(f"same train losses in every round (both variants did the same work): {'yes' if same else 'NO'}")
    flow_s = statistics.median(chains["flow"]["times"][1:])
    direct_s = statistics.median(chains["direct"]["times"][1:])
    print(f"\nmedian of {args.rounds} rounds after warm-up: flow {flow_s:.2f} s, direct {direct_s:.2f} s; "
          f"Prefect overhead {flow_s - direct_s:+.2f} s per round (target <= 2 s), ratio flow/direct {flow_s / direct_s:.2f}")
    phases = chains["direct"]["phases"][1:]
    print("direct round, median seconds per step: " + ", ".join(
        f"{k} {statistics.median(ph[k] for ph in phases):.2f}" for k in phases[0]))
    print(f"warm-up round: flow {chains['flow']['times'][0]:.2f} s (starts the ephemeral API server), "
          f"direct {chains['direct']['times'][0]:.2f} s")


if __name__ == "__main__":
    main()
