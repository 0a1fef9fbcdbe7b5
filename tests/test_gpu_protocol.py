"""bench/gpu_protocol.py: the protocol runner for the GPU machine, exercised end to end on the CPU."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_protocol  # noqa: E402


def test_plan_orders_by_seed_then_priority_and_excludes():
    jobs = gpu_protocol.plan(None, [0, 1], ["ultramim-fed:0"])
    assert jobs[0] == ("mae-fed", 0) and ("ultramim-fed", 0) not in jobs
    assert jobs.index(("no-tgm-fed", 0)) < jobs.index(("ultramim-fed", 1))  # every seed-0 job before seed 1
    assert len(jobs) == 2 * len(gpu_protocol.PRIORITY) - 1
    assert gpu_protocol.plan(["scratch", "baselines"], [3]) == [("scratch", 3), ("baselines", 3)]


def _site(root: Path, name: str, size: tuple[int, int]) -> None:
    import cv2

    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        cv2.imwrite(str(root / name / "images" / f"{i}.png"), rng.integers(0, 255, size, dtype=np.uint8))
        m = np.zeros(size, np.uint8)
        m[10:20, 10:30] = 255
        cv2.imwrite(str(root / name / "masks" / f"{i}.png"), m)
        rows.append({"id": str(i), "split": "train"})
    with open(root / name / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "split"])
        w.writeheader()
        w.writerows(rows)


def test_shrink_fits_images_keeps_masks_binary_and_copies_labels(tmp_path):
    import cv2

    src, out = tmp_path / "data", tmp_path / "small"
    for name in gpu_protocol.SITES:
        _site(src, name, (200, 400))
    gpu_protocol.shrink(src, out, 100)
    img = cv2.imread(str(out / "busi" / "images" / "0.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(out / "hc18" / "masks" / "1.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (50, 100) and mask.shape == (50, 100)
    assert set(np.unique(mask)) <= {0, 255}  # nearest neighbour: no grey edges
    assert (out / "ddti" / "labels.csv").read_text() == (src / "ddti" / "labels.csv").read_text()


def test_shrink_names_a_missing_labels_file(tmp_path):
    with pytest.raises(SystemExit, match=r"busi/labels.csv: missing"):
        gpu_protocol.shrink(tmp_path, tmp_path / "out", 100)


def test_run_without_data_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_protocol.py"), "run", "--data", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no busi/labels.csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_smoke_protocol_runs_and_imports_into_the_report(shared_data, tmp_path):
    """One pretraining job on the real sites (smoke preset), its four fine-tunings, a job cut by the
    budget; the lines import into a fresh MLflow store and the report has the protocol's section."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_protocol.py"), "run", "--preset", "smoke", "--data", str(shared_data),
           "--out", str(out), "--seeds", "0", "--only", "ultramim-fed", "--jobs", "1", "--budget-s", "600",
           "--pretrain-estimate-s", "1", "--finetune-estimate-s", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["task"], x["status"]) for x in lines] == [("pretrain", "ok")] + [(t, "ok") for t in gpu_protocol.TASKS]
    pre = lines[0]
    assert pre["metrics"]["rounds"] == 1.0 and len(pre["curve"]) == 1 and np.isfinite(pre["metrics"]["global_val_loss"])
    cls = next(x for x in lines if x["task"] == "busi-cls")
    assert 0.0 <= cls["metrics"]["test_auroc"] <= 1.0 and cls["metrics"]["test_n"] > 0
    # a budget too small for any step: every step is written as skipped, never silently lost
    cut = tmp_path / "cut"
    r = subprocess.run(cmd[:cmd.index("--out") + 1] + [str(cut)] + ["--seeds", "0", "--only", "scratch", "--jobs", "1",
                       "--budget-s", "30", "--finetune-estimate-s", "1000"], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    cut_lines = [json.loads(x) for x in (cut / "results.jsonl").read_text().splitlines()]
    assert {x["status"] for x in cut_lines} == {"skipped"} and len(cut_lines) == len(gpu_protocol.TASKS)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for f in (out / "results.jsonl", cut / "results.jsonl"):
        r = subprocess.run([sys.executable, str(REPO / "bench" / "import_results.py"), str(f), "--tracking-uri", uri,
                            "--experiment", "smoke"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "flows.cli", "report", "--out", str(tmp_path / "R.md"), "--experiment",
                        "smoke", "--tracking-uri", uri], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "R.md").read_text()
    assert "## Protocol smoke" in md and f"{cls['metrics']['test_auroc']:.3f}" in md
    assert "scratch / busi-cls (seed 0): skipped" in md


def test_equal_steps_doubles_the_epochs_of_variants_without_smat_only():
    assert gpu_protocol.local_epochs(1, smat=False, equal_steps=True) == 2
    assert gpu_protocol.local_epochs(3, smat=True, equal_steps=True) == 3
    assert gpu_protocol.local_epochs(1, smat=False, equal_steps=False) == 1


def test_sigterm_takes_the_job_processes_down(shared_data, tmp_path):
    """`timeout` sends SIGTERM to the runner only; its spawned job processes must not live on."""
    import os
    import signal
    import time

    kids: list[int] = []
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "gpu_protocol.py"), "run", "--preset", "smoke",
                             "--data", str(shared_data), "--out", str(tmp_path), "--seeds", "0", "--only", "scratch",
                             "--jobs", "1", "--finetune-estimate-s", "1"], cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not kids:  # wait for the spawned job process
            time.sleep(1)
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            kids = [int(k) for k in out]
        assert kids, "no job process was started"
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        time.sleep(2)
        alive = []
        for k in kids:
            try:
                os.kill(k, 0)
                alive.append(k)
            except ProcessLookupError:
                pass
        assert not alive, f"job processes {alive} outlived the runner"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for k in kids:  # never leave a job behind, even when the assertion failed
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
