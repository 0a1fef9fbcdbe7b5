"""One federated round as a Prefect DAG (DESIGN.md, "One round").

check_site (per site) -> train_site (per site, on its pool) -> validate_updates -> aggregate
-> validate_global (per site) -> register. Tasks exchange references (MLflow artifact URIs and
sha256 digests), never tensors. A site that fails its gate, crashes after its retries or times
out is excluded with the reason recorded; fewer than ``min_sites`` usable updates fails the round.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture

from tasks.aggregate import aggregate, validate_updates
from tasks.register import register
from tasks.sites import check_site, train_site, validate_global


def _first_line(e: BaseException | Any) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip() if isinstance(e, BaseException) else str(e)


def _outcome(fut: PrefectFuture, timeout_s: float) -> tuple[dict | None, str | None]:
    """(result, None) or (None, one-line reason); never raises."""
    try:
        return fut.result(timeout=timeout_s), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a recorded exclusion reason
        return None, _first_line(e)


def manifest_path(sites: list[dict], site_id: str, mode: str) -> str | None:
    """Embedded mode knows where a site keeps its manifest (for ``lineage --verify``); federation never does."""
    if mode != "embedded":
        return None
    from ultrafed.federated.client import site_manifest_path

    site = next(s for s in sites if s["id"] == site_id)
    return str(site_manifest_path(site_id, site["root"], site.get("work_dir")))


def _site_lineage(ref: dict, gate: dict, weights: dict, train_loss: dict, val_loss: dict, drift: dict,
                  manifest: str | None) -> dict[str, Any]:
    """A participating site's lineage record (ultrafed.tracking.lineage.SiteRecord fields)."""
    sid = ref["site"]
    metrics = {"train_loss": train_loss.get(sid), "val_loss": val_loss.get(sid),
               "n_quarantined": float(gate["n_quarantined"]), **drift.get(sid, {})}
    return {"site": sid, "n_images": int(ref["n_images"]), "manifest_md5": gate["manifest_md5"],
            "weight": float(weights.get(sid, 0.0)),
            "gate_status": "passed" if gate["status"] in ("pass", "warn") else "failed",
            "gate_reasons": [f"{gate['status']}: {r}" for r in gate["reasons"]],
            "metrics": {k: float(v) for k, v in metrics.items() if v is not None},
            "manifest_path": manifest, "update_sha256": ref["update_sha256"]}


@flow(name="federated-round", flow_run_name="round-{round_idx}")
def federated_round(cfg: dict, sites: list[dict], *, mode: str, round_idx: int, global_uri: str,
                    global_sha256: str, server_state_path: str | None, parent_version: int | None,
                    parent_run_id: str, run_dir: str, code_commit: str,
                    params_hash: str) -> dict[str, Any]:
    """Run one round and return its record (the lineage of the version it registers)."""
    from ultrafed.federated.coordinator import require_quorum
    from ultrafed.federated.metrics import spread
    from ultrafed.tracking.runs import end_run, log_metrics, start_round_run, start_site_run

    t0 = time.perf_counter()
    fed = cfg["federated"]
    timeout = float(fed["site_timeout_s"])
    round_run = start_round_run(parent_run_id, round_idx)
    site_runs = {s["id"]: start_site_run(round_run, s["id"], round_idx) for s in sites}
    excluded: dict[str, str] = {}

    # 1. quality gate at each site
    checks = {s["id"]: check_site.submit(s, mode=mode, timeout_s=timeout, run_id=site_runs[s["id"]]) for s in sites}
    gates: dict[str, dict] = {}
    for sid, fut in checks.items():
        res, err = _outcome(fut, timeout)
        if err:
            excluded[sid] = f"quality check crashed: {err}"
        else:
            gates[sid] = res
            if res["status"] == "fail":
                excluded[sid] = "quality gate failed: " + "; ".join(res["reasons"][:5])
    eligible = [s for s in sites if s["id"] in gates and s["id"] not in excluded]

    # 2. local training on each eligible site's pool
    trains = {s["id"]: train_site.submit(s, cfg, round_idx=round_idx, global_uri=global_uri, global_sha256=global_sha256,
                                         run_id=site_runs[s["id"]], run_key=parent_run_id, mode=mode,
                                         timeout_s=timeout) for s in eligible}
    refs: list[dict] = []
    for sid, fut in trains.items():
        res, err = _outcome(fut, timeout)
        if err:
            excluded[sid] = f"training failed: {err}"
        else:
            refs.append(res)

    # 3. screen updates, 4. aggregate
    screened = validate_updates(global_uri, global_sha256, refs, float(fed["norm_bound"])) if refs else \
        {"accepted": [], "rejected": {}, "drift": {}}
    for sid, why in screened["rejected"].items():
        excluded[sid] = f"update rejected: {why}"
    accepted = screened["accepted"]
    require_quorum([r["site"] for r in accepted], int(fed["min_sites"]), excluded)
    agg = aggregate(global_uri, global_sha256, accepted, strategy=fed["strategy"],
                    strategy_params=fed["strategy_params"], server_state_path=server_state_path,
                    round_run_id=round_run, out_dir=run_dir, round_idx=round_idx)

    # 5. validate the new global model at every site that passed its gate
    vals = {s["id"]: validate_global.submit(s, cfg, global_uri=agg["global_uri"], global_sha256=agg["global_sha256"],
                                            mode=mode, timeout_s=timeout, run_id=site_runs[s["id"]],
                                            round_idx=round_idx) for s in eligible}
    val_loss: dict[str, float] = {}
    for sid, fut in vals.items():
        res, err = _outcome(fut, timeout)
        val_loss[sid] = float("nan") if err else float(res["val_loss"])

    # metrics of the round
    train_loss = {r["site"]: float(r["metrics"].get("loss", float("nan"))) for r in accepted}
    finite_val = {k: v for k, v in val_loss.items() if v == v}
    metrics: dict[str, float] = {
        "global_val_loss": statistics.fmean(finite_val.values()) if finite_val else float("nan"),
        "train_loss": statistics.fmean(train_loss.values()) if train_loss else float("nan"),
        "sites_accepted": float(len(accepted)), "sites_excluded": float(len(excluded)),
    }
    metrics.update({f"val_loss_spread_{k}": v for k, v in spread({k: v for k, v in val_loss.items() if v == v}).items()})
    metrics.update({f"train_loss.{k}": v for k, v in train_loss.items()})
    metrics.update({f"val_loss.{k}": v for k, v in val_loss.items()})
    for sid, d in screened["drift"].items():
        metrics.update({f"{m}.{sid}": float(v) for m, v in d.items()})
    metrics["seconds"] = time.perf_counter() - t0
    finite = {k: v for k, v in metrics.items() if v == v}
    log_metrics(round_run, finite)
    log_metrics(parent_run_id, finite, step=round_idx)
    from ultrafed.tracking.pictures import log_site_bars

    for name, per_site in (("val_loss", val_loss), ("train_loss", train_loss)):
        if any(v == v for v in per_site.values()):
            log_site_bars(round_run, {k: v for k, v in per_site.items() if v == v}, metric=name, round_idx=round_idx)

    lineage = {
        "round": round_idx, "parent_version": parent_version, "strategy": fed["strategy"],
        "strategy_params": dict(fed["strategy_params"]), "code_commit": code_commit, "params_hash": params_hash,
        "seed": cfg["seed"], "run_id": round_run, "parent_run_id": parent_run_id,
        "excluded": excluded, "metrics": {k: v for k, v in metrics.items() if v == v and "." not in k},
        "model": {k: cfg["model"][k] for k in ("preset", "img_size", "patch_size", "in_chans")},
        "extra": {"global_uri": agg["global_uri"], "global_sha256": agg["global_sha256"], "mode": mode,
                  "gates": {sid: g["status"] for sid, g in gates.items()}},
        "sites": [_site_lineage(r, gates[r["site"]], agg["weights"], train_loss, val_loss, screened["drift"],
                                manifest_path(sites, r["site"], mode)) for r in accepted],
    }
    reg = register(cfg, global_uri=agg["global_uri"], global_sha256=agg["global_sha256"], run_id=round_run,
                   lineage=lineage, metrics={k: v for k, v in metrics.items() if v == v and "." not in k})
    end_run(round_run)
    for sid, rid in site_runs.items():
        end_run(rid, "FAILED" if sid in excluded else "FINISHED")
    return {"round": round_idx, "metrics": metrics, "excluded": excluded, "weights": agg["weights"],
            "global_uri": agg["global_uri"], "global_sha256": agg["global_sha256"],
            "server_state_path": agg["server_state_path"], "version": reg["version"], "model_uri": reg["uri"],
            "lineage": lineage}
