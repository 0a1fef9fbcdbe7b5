"""``ultrafed report`` on a tiny MLflow store made here: the tables carry exactly the logged numbers."""
from __future__ import annotations

import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # one sqlite store (schema migrations) and matplotlib: ~30 s on 2 busy cores
EXP = "results-test"


def _log_result(client, exp_id: str, *, variant: str, task: str, metrics: dict[str, float], wall_s: float,
                status: str = "ok", seed: str = "0", params: dict[str, str] | None = None) -> str:
    from ultrafed.tracking.runs import log_metrics

    rid = client.create_run(exp_id, run_name=f"result-{variant}-{task}", tags={
        "ultrafed.kind": "result", "ultrafed.variant": variant, "ultrafed.task": task, "ultrafed.seed": seed,
        "ultrafed.preset": "test-preset", "ultrafed.wall_s": f"{wall_s:.1f}", "ultrafed.status": status,
        "ultrafed.command": f"ultrafed finetune --task {task} # {variant}"}).info.run_id
    for k, v in (params or {}).items():
        client.log_param(rid, k, v)
    log_metrics(rid, {**metrics, "wall_s": wall_s})
    client.set_terminated(rid)
    return rid


def _cls_metrics(rng: np.random.Generator) -> dict[str, float]:
    """A plausible AUROC with its CI (lo < value < hi) and a val AUROC, all drawn, none typed."""
    lo, v, hi = np.sort(rng.uniform(0.5, 0.9, size=3))
    return {"test_auroc": float(v), "test_auroc_lo": float(lo), "test_auroc_hi": float(hi),
            "val_auroc": float(rng.uniform(0.5, 0.9))}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite store with result runs of three variants, one skipped step and two
    pretraining parent runs with loss histories; yields (uri, logged values)."""
    import mlflow
    from mlflow import MlflowClient

    from ultrafed.tracking.runs import configure_tracking, ensure_experiment, log_metrics

    tmp = tmp_path_factory.mktemp("report-store")
    prev = mlflow.get_tracking_uri()
    uri = configure_tracking(f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts"))
    client = MlflowClient(uri)
    exp_id = ensure_experiment(EXP)
    rng = np.random.default_rng(7)
    logged: dict[tuple[str, str], dict[str, float]] = {}
    # an older run of the same cell that the newer one must replace
    _log_result(client, exp_id, variant="ultramim-fed", task="busi-cls", metrics=_cls_metrics(rng), wall_s=1.0)
    for variant in ("ultramim-fed", "ultramim-central", "mae-fed", "scratch"):
        m = _cls_metrics(rng)
        logged[(variant, "busi-cls")] = {**m, "wall_s": float(rng.uniform(10, 99))}
        _log_result(client, exp_id, variant=variant, task="busi-cls", metrics=m,
                    wall_s=logged[(variant, "busi-cls")]["wall_s"], params={"epochs": "3"})
    seg = {"test_dice": float(rng.uniform(0.3, 0.6)), "val_dice": float(rng.uniform(0.3, 0.6))}
    logged[("ultramim-fed", "ddti-seg")] = {**seg, "wall_s": 12.0}
    _log_result(client, exp_id, variant="ultramim-fed", task="ddti-seg", metrics=seg, wall_s=12.0)
    _log_result(client, exp_id, variant="mae-fed", task="ddti-seg", metrics={}, wall_s=0.0, status="skipped")
    # a later skipped attempt must not hide the completed ultramim-fed ddti-seg result
    _log_result(client, exp_id, variant="ultramim-fed", task="ddti-seg", metrics={}, wall_s=0.0, status="skipped")
    curves: dict[str, list[float]] = {}
    for variant in ("ultramim-fed", "mae-fed"):
        pre_wall = float(rng.uniform(100, 400))
        logged[(variant, "pretrain")] = {"wall_s": pre_wall}
        _log_result(client, exp_id, variant=variant, task="pretrain", wall_s=pre_wall,
                    metrics={"rounds": 3.0, "train_loss": float(rng.uniform(0.5, 1)), "global_val_loss": float(rng.uniform(0.5, 1))},
                    params={"rounds": "3", "model.img_size": "64"})
        parent = client.create_run(exp_id, run_name=f"pre-{variant}", tags={
            "ultrafed.kind": "pretraining", "ultrafed.variant": variant}).info.run_id
        curves[variant] = [float(x) for x in np.sort(rng.uniform(0.5, 1.0, size=3))[::-1]]
        for step, v in enumerate(curves[variant]):
            log_metrics(parent, {"train_loss": v, "global_val_loss": v + 0.01}, step=step)
        client.set_terminated(parent)
    yield uri, logged, curves
    mlflow.set_tracking_uri(prev)
    mlflow.set_registry_uri(prev)


def _row(md: str, section: str, variant: str) -> list[str]:
    body = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in body.splitlines() if ln.startswith(f"| {variant} |")]
    assert len(rows) == 1, f"expected one row for {variant} in {section}, got {rows}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_tables_have_the_logged_numbers(store, tmp_path):
    from flows.cli import main

    uri, logged, _ = store
    out = tmp_path / "docs" / "RESULTS.md"
    assert main(["report", "--out", str(out), "--experiment", EXP, "--tracking-uri", uri]) == 0
    md = out.read_text()
    for variant in ("ultramim-fed", "ultramim-central", "mae-fed", "scratch"):
        m = logged[(variant, "busi-cls")]
        cells = _row(md, "busi-cls", variant)
        assert cells[1] == f"{m['test_auroc']:.3f} [{m['test_auroc_lo']:.3f}, {m['test_auroc_hi']:.3f}]"
        assert cells[2] == f"{m['val_auroc']:.3f}"
        assert cells[3] == f"{m['wall_s']:.0f}"
        pre = logged.get((variant, "pretrain"))
        assert cells[4] == (f"{pre['wall_s']:.0f}" if pre else "-")
        assert cells[7] == "ok"
    # the newest run of a cell wins: exactly one ultramim-fed row (checked in _row) with the newer numbers
    seg = logged[("ultramim-fed", "ddti-seg")]
    assert _row(md, "ddti-seg", "ultramim-fed")[1] == f"{seg['test_dice']:.3f}"
    assert _row(md, "ddti-seg", "mae-fed")[7] == "skipped"
    # every number of the busi-cls table is one that was logged (none made up by the report)
    section = md.split("## busi-cls", 1)[1].split("Reference anchors", 1)[0]
    body = "\n".join(ln for ln in section.splitlines() if ln.startswith(("| ultramim", "| mae", "| scratch")))
    assert body.count("\n") == 3  # four variants
    allowed = {f"{v:.3f}" for m in logged.values() for v in m.values()} | \
              {f"{v:.0f}" for m in logged.values() for v in m.values()} | {"0"}  # "0": the seed tag
    assert set(re.findall(r"\d+\.\d+|\b\d+\b", body)) <= allowed


def test_report_goals_say_by_how_much_they_are_missed(store, tmp_path):
    from flows.cli import main
    from ultrafed.report import GOALS

    uri, logged, _ = store
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--out", str(out), "--experiment", EXP, "--tracking-uri", uri]) == 0
    missing = out.read_text().split("## What is missing", 1)[1]
    goal = dict(((t, m), g) for t, m, g in GOALS)
    v = logged[("ultramim-fed", "busi-cls")]["test_auroc"]
    assert f"missed by {goal[('busi-cls', 'auroc')] - v:.3f}" in missing  # drawn AUROC < 0.9 < 0.92
    d = logged[("ultramim-fed", "ddti-seg")]["test_dice"]
    assert f"missed by {goal[('ddti-seg', 'dice')] - d:.3f}" in missing
    assert "hc18-seg dice >= 0.975 (federated UltraMIM): **not measured**" in missing
    gap = logged[("ultramim-central", "busi-cls")]["test_auroc"] - v
    tol = 0.01  # the tolerance for federated vs centralized
    verdict = "**reached**" if gap <= tol else f"**missed by {gap - tol:.3f}**"
    assert f"centralized on busi-cls: {verdict} (centralized - federated = {gap:+.3f}" in missing
    diff = v - logged[("mae-fed", "busi-cls")]["test_auroc"]
    assert f"UltraMIM - MAE = {diff:+.3f}" in missing
    assert "mae-fed / ddti-seg: skipped" in missing
    assert "Only 1 seed" in missing


def test_report_writes_plots_with_the_anchors(store, tmp_path):
    from ultrafed.report import build_report, load_loss_curves, load_results
    from mlflow import MlflowClient

    uri, logged, curves = store
    client = MlflowClient(uri)
    loaded = load_loss_curves(client, EXP)
    assert {k: [v for _, v in pts["train_loss"]] for k, pts in loaded.items()} == curves
    rep = build_report(load_results(client, EXP), loaded, experiment=EXP, tracking_uri=uri)
    assert set(rep.figures) == {"pretrain_loss.png", "busi-cls.png", "ddti-seg.png"}
    ax = rep.figures["busi-cls.png"].axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(logged[(v, "busi-cls")]["test_auroc"], 6)
                             for v in ("ultramim-fed", "ultramim-central", "mae-fed", "scratch"))
    assert sum("reference" in t.get_text() for t in ax.get_legend().get_texts()) == 3  # the three BUSI-cls anchors
    assert "Reference anchors quoted from the issue" in rep.markdown


def test_report_missing_experiment_is_one_line_error(store, tmp_path, capsys):
    from flows.cli import main

    uri, _, _ = store
    assert main(["report", "--out", str(tmp_path / "R.md"), "--experiment", "nope", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no experiment named 'nope'" in err
    assert not (tmp_path / "R.md").exists()


def test_report_experiment_without_results_is_one_line_error(store, tmp_path, capsys):
    from flows.cli import main
    from ultrafed.tracking.runs import ensure_experiment

    uri, _, _ = store
    ensure_experiment("no-results-yet")
    assert main(["report", "--out", str(tmp_path / "R.md"), "--experiment", "no-results-yet", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no ultrafed.kind=result runs" in err
