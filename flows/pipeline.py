"""The whole pipeline as one flow: gate -> federated UltraMIM -> registered encoder ->
fine-tuning (diagnosis + segmentation) -> evaluation -> promotion if the gates hold."""
from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.pretrain import federated_pretrain
from tasks.finetune import finetune_task, promote_task


def _fmt(d: dict | None, key: str) -> str:
    if not d or key not in d:
        return "   -  "
    lo, hi = d.get(f"{key}_lo"), d.get(f"{key}_hi")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{d[key]:.3f}{ci}"


@flow(name="ultrafed-pipeline")
def pipeline(cfg: dict, sites: list[dict], *, tasks: list[tuple[str, str]], mode: str = "embedded",
             rounds: int | None = None, run_name: str | None = None, promote: bool = True) -> dict[str, Any]:
    """``tasks``: (task name, data root) pairs to fine-tune the final encoder on."""
    t0 = time.perf_counter()
    pre = federated_pretrain(cfg, sites, mode=mode, rounds=rounds, run_name=run_name)
    enc_uri = pre["model_uri"]
    futures = [finetune_task.submit(cfg, name, root, enc_uri) for name, root in tasks]
    results = [f.result() for f in futures]
    promotions = []
    if promote:
        enc_name = cfg["tracking"]["registered_model"]
        promotions.append(promote_task(enc_name, pre["version"], "production",
                                       f"pipeline run {pre['parent_run_id']}: final round of federated pretraining"))
        for r in results:
            if r["version"]:
                promotions.append(promote_task(r["name"], r["version"], "production",
                                               f"fine-tuned from {enc_uri} in pipeline run {pre['parent_run_id']}"))
    wall = time.perf_counter() - t0
    print("\n== UltraFed pipeline summary ==")
    print(f"encoder: {enc_uri}  (rounds {len(pre['history'])}, final global val loss "
          f"{pre['history'][-1]['metrics']['global_val_loss']:.4f})")
    print(f"{'task':<12} {'model':<28} {'val (select)':<24} {'test (report)':<24} {'sec':>6}")
    for r in results:
        key = "auroc" if r["task"].endswith("-cls") else "dice"
        print(f"{r['task']:<12} {str(r['model_uri']):<28} {key + ' ' + _fmt(r['val'], key):<24} "
              f"{key + ' ' + _fmt(r['test'], key):<24} {r['wall_s']:>6.1f}")
    for p in promotions:
        verdict = "promoted to @" + p["alias"] if p["promoted"] else "NOT promoted: " + "; ".join(p["gates"])
        print(f"{p['name']} v{p['version']}: {verdict}")
    import mlflow

    print(f"done in {wall:.0f} s. Look: `.venv/bin/mlflow ui --backend-store-uri {mlflow.get_tracking_uri()} "
          f"--host 127.0.0.1` (runs, pictures, registry); `.venv/bin/ultrafed models`; "
          f"`.venv/bin/ultrafed lineage {enc_uri}`")
    return {"pretrain": {k: pre[k] for k in ("model_uri", "version", "run_dir", "parent_run_id")},
            "finetune": results, "promotions": promotions, "seconds": wall}
