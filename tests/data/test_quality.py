"""The quality gate: GX suites from YAML, quarantine vs fail, drift, reports, the CLI."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from _gate_sites import write_site
from ultrafed.data.manifest import manifest_bytes, manifest_md5, read_manifest, scan_site, write_manifest
from ultrafed.data.quality import (
    GateResult, SuiteError, check_manifest, check_site, gate_metrics, load_suite, run_expectations,
)


@pytest.fixture(scope="module")
def clean_manifest(tmp_path_factory):
    """A 10-image site that meets every default expectation."""
    tmp = tmp_path_factory.mktemp("clean")
    root = write_site(tmp / "site", n=10)
    out = tmp / "m" / "site.csv"
    write_manifest(scan_site(root, "clean", workers=1), out)
    return out


def _edited(src, dst, **cols):
    """A copy of manifest ``src`` with some cells replaced: {column: {row: value}}."""
    df = read_manifest(src)
    for col, cells in cols.items():
        for i, v in cells.items():
            df.loc[i, col] = v
    dst.write_bytes(manifest_bytes(df))
    return dst


def _exp(gate: GateResult, name: str) -> dict:
    return next(e for e in gate.expectations if e["name"] == name)


def test_clean_site_passes_with_report(clean_manifest, tmp_path):
    report = tmp_path / "r" / "clean.md"
    gate = check_manifest(clean_manifest, report=report)
    assert gate.status == "pass" and gate.ok and gate.reasons == () and gate.quarantined == ()
    assert gate.n_images == gate.n_total == 10 and dict(gate.splits) == {"train": 8, "val": 2}
    assert gate.manifest_md5 == manifest_md5(clean_manifest) and gate.suite == "default"
    assert all(e["success"] for e in gate.expectations)
    assert _exp(gate, "min_images")["observed"] == 10  # GX's observed row count
    text = report.read_text()
    assert "site `clean` - PASS" in text and "| not_blank | ExpectColumnValuesToBeBetween | quarantine | yes |" in text
    json.dumps(gate.to_dict())  # JSON-safe for MLflow
    assert gate_metrics(gate)["status_code"] == 0


def test_blank_image_quarantined_with_observed_value(clean_manifest, tmp_path):
    m = _edited(clean_manifest, tmp_path / "m.csv", std={3: 0.5})
    gate = check_manifest(m)
    assert gate.status == "warn" and gate.n_images == 9
    assert gate.quarantined == (("images/img_003.png", "not_blank: std=0.5 (expected >= 2)"),)
    assert gate.reasons == ("[warn] not_blank: 1 of 10 images (10.0%) unexpected, 1 quarantined; "
                            "expected >= 2; e.g. images/img_003.png",)


def test_too_many_bad_images_fail_the_site(clean_manifest, tmp_path):
    # 3 of 10 saturated > 25% (max_quarantine_fraction): GX `mostly` is not met
    m = _edited(clean_manifest, tmp_path / "m.csv", frac_saturated={0: 0.9, 1: 0.5, 2: 0.3})
    gate = check_manifest(m)
    assert gate.status == "fail" and not gate.ok
    assert len(gate.quarantined) == 3 and gate.n_images == 7
    line = next(r for r in gate.reasons if "not_saturated" in r)
    assert line.startswith("[fail] not_saturated: 3 of 10 images (30.0%) unexpected, more than the 25%")
    # also below min_images (7 < 8): a second, independent reason
    assert any(r.startswith("[fail] min_images: observed 7, expected >= 8") for r in gate.reasons)


def test_exact_duplicate_keeps_first_copy(clean_manifest, tmp_path):
    df = read_manifest(clean_manifest)
    m = _edited(clean_manifest, tmp_path / "m.csv", sha256={7: df.loc[2, "sha256"]})
    gate = check_manifest(m)
    assert gate.quarantined == (("images/img_007.png", "unique_sha256: duplicate of images/img_002.png"),)
    assert gate.status == "warn"


def test_near_duplicates_warn_but_train(clean_manifest, tmp_path):
    m = _edited(clean_manifest, tmp_path / "m.csv", dup_group_size={0: 2, 1: 2}, dup_group={1: 0})
    gate = check_manifest(m)
    assert gate.status == "warn" and gate.quarantined == () and gate.n_images == 10
    assert gate.reasons[0].startswith("[warn] near_duplicates: 2 of 10 images (20.0%) unexpected")


def test_drift_against_previous(clean_manifest, tmp_path):
    df = read_manifest(clean_manifest)
    prev_mean = float(df["mean"].mean())
    same = check_manifest(clean_manifest, previous=clean_manifest)
    drift = _exp(same, "drift_mean_intensity")
    assert drift["success"] and drift["observed"] == pytest.approx(prev_mean, abs=1e-6)
    assert drift["kwargs"]["min_value"] == pytest.approx(prev_mean - 12.0, abs=1e-5)
    brighter = _edited(clean_manifest, tmp_path / "b.csv", mean={i: v + 30 for i, v in df["mean"].items()})
    gate = check_manifest(brighter, previous=clean_manifest)
    assert gate.status == "warn" and gate.quarantined == ()
    line = next(r for r in gate.reasons if "drift_mean_intensity" in r)
    assert line.startswith(f"[warn] drift_mean_intensity: observed {prev_mean + 30:.4g}, expected")
    assert f"previous {prev_mean:.4g} +- 12.0" in line
    assert not any(e["name"].startswith("drift") for e in check_manifest(clean_manifest).expectations)


def test_unusable_previous_manifest_skips_drift_visibly(clean_manifest, tmp_path):
    (tmp_path / "old.csv").write_text("garbage\n")
    gate = check_manifest(clean_manifest, previous=tmp_path / "old.csv", report=tmp_path / "r.md")
    drift = [e for e in gate.expectations if e["name"].startswith("drift")]
    assert len(drift) == 4 and all(e["success"] is None for e in drift)
    observed = drift[0]["observed"]
    assert observed.startswith("skipped: previous manifest unusable (") and "missing columns" in observed
    assert gate.status == "pass"
    assert "| drift_mean_intensity | ExpectColumnMeanToBeBetween | warn | skipped |" in (tmp_path / "r.md").read_text()


def test_suites_are_data(tmp_path):
    busi = load_suite(site="busi")
    assert busi["name"] == "busi"
    assert next(e for e in busi["usable"] if e["name"] == "min_images")["kwargs"] == {"min_value": 100}
    ddti = load_suite("ddti")
    assert next(e for e in ddti["expectations"] if e["name"] == "label_in_set")["kwargs"]["value_set"] == ["0", "1"]
    assert load_suite(site="site-7")["name"] == "default"
    with pytest.raises(SuiteError, match="no such suite"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: default\nexpectations:\n  - {name: not_blank, severity: fatal}\n")
    with pytest.raises(SuiteError, match="severity 'fatal'"):
        load_suite(bad)
    bad.write_text("expectations:\n  - {name: x, expectation: ExpectNoSuchThing, severity: warn}\n")
    with pytest.raises(SuiteError, match="not a GX expectation class"):
        run_expectations(pd.DataFrame({"relpath": ["a"]}), load_suite(bad)["expectations"])


def test_custom_suite_file_changes_the_outcome(clean_manifest, tmp_path):
    strict = tmp_path / "strict.yaml"
    strict.write_text("extends: default\nname: strict\nusable:\n  - {name: min_images, kwargs: {min_value: 50}}\n")
    gate = check_manifest(clean_manifest, suite=strict)
    assert gate.suite == "strict" and gate.status == "fail"
    assert gate.reasons == ("[fail] min_images: observed 10, expected >= 50",)


def test_unreadable_manifest_is_a_failed_gate(tmp_path):
    (tmp_path / "x.csv").write_text("not,a,manifest\n")
    gate = check_manifest(tmp_path / "x.csv", report=tmp_path / "x.md")
    assert gate.status == "fail" and "missing columns" in gate.reasons[0]
    assert "FAIL" in (tmp_path / "x.md").read_text()


def test_check_site_scans_writes_and_uses_previous(tmp_path):
    root = write_site(tmp_path / "site", n=9)
    out = tmp_path / "manifests" / "a.csv"
    first = check_site(root, "a", manifest_out=out, report=tmp_path / "a.md")
    assert first.status == "pass" and first.manifest_md5 == manifest_md5(out)
    assert not any(e["name"].startswith("drift") for e in first.expectations)
    second = check_site(root, "a", manifest_out=out)  # last round's manifest is the reference
    assert second.manifest_md5 == first.manifest_md5
    assert _exp(second, "drift_mean_intensity")["success"] is True


def test_cli_scan_and_check(tmp_path, capsys):
    from flows.cli import main

    root = write_site(tmp_path / "site", n=10)
    out = tmp_path / "m" / "s.csv"
    assert main(["data", "scan", "--site", "s", "--root", str(root), "--out", str(out), "--workers", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("s: 10 images (0 unchanged, 10 read)") and manifest_md5(out) in line
    metrics = tmp_path / "q.json"
    assert main(["data", "check", "--manifest", str(out), "--metrics", str(metrics)]) == 0
    assert capsys.readouterr().out.startswith("s: PASS (10 of 10 images may train, 0 quarantined")
    assert json.loads(metrics.read_text())["status"] == "pass"
    # fail: exit 1 and one line per unmet expectation
    assert main(["data", "check", "--manifest", str(out), "--suite", "busi"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("s: FAIL") and lines[1] == "[fail] min_images: observed 10, expected >= 100"
    assert main(["data", "check", "--manifest", str(out), "--suite", "busi", "--exit-zero"]) == 0
    capsys.readouterr()
    assert main(["data", "check", "--manifest", str(out), "--suite", "nope"]) == 2
    assert "no such suite" in capsys.readouterr().err
    assert main(["data", "scan", "--site", "s", "--root", str(tmp_path / "gone"), "--out", str(out)]) == 1
    assert "site folder not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
def test_busi_real_data(shared_data, tmp_path):
    """BUSI: warn (not fail) on its near-duplicates and calipers; groups agree with BUSI's own."""
    import itertools

    gate = check_site(shared_data / "busi", "busi", manifest_out=tmp_path / "busi.csv")
    assert gate.status == "warn" and gate.n_total == 780 and gate.suite == "busi"
    m = read_manifest(tmp_path / "busi.csv")
    groups = m[m["dup_group_size"] > 1]
    redundant = len(groups) - groups["dup_group"].nunique()
    assert 0.15 < redundant / len(m) < 0.30  # README: about 20% near-duplicates
    own = pd.read_csv(shared_data / "busi" / "labels.csv", dtype=str).set_index("id")["group"]
    for _, g in groups.groupby("dup_group"):
        for a, b in itertools.combinations(g["relpath"], 2):  # every pair we group, BUSI groups too
            assert own[a[len("images/"):-4]] == own[b[len("images/"):-4]], (a, b)
    assert m.loc[m["caliper_marks"] > 0, "label"].isin(["benign", "malignant"]).all()
    assert any(r.startswith("[warn] no_caliper_marks") for r in gate.reasons)


def test_an_unchanged_site_reuses_its_verdict_and_a_changed_one_is_judged_again(tmp_path, monkeypatch):
    """The gate's verdict is cached by (manifest md5, drift reference, suite); any change re-runs GX."""
    import shutil

    from ultrafed.data import quality
    from ultrafed.data.synth import make_cohort

    make_cohort(tmp_path / "c", 1, 10, seed=0, size=64, progress=None)
    root, cache, out = tmp_path / "c" / "site-0", tmp_path / "cache", tmp_path / "m" / "site-0.csv"
    calls = []
    real = quality._judge
    monkeypatch.setattr(quality, "_judge", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = [quality.check_site(root, "site-0", manifest_out=out, cache_dir=cache) for _ in range(3)]
    assert len(calls) == 2  # no reference, then the first reference; the third check is the second's inputs
    assert first[2].status == first[1].status and first[2].reasons == first[1].reasons
    assert first[2].expectations == first[1].expectations and first[2].n_images == first[1].n_images
    a, b = sorted((root / "images").glob("*.png"))[:2]
    shutil.copy(a, b)  # b becomes a duplicate of a: the data changed
    changed = quality.check_site(root, "site-0", manifest_out=out, cache_dir=cache)
    assert len(calls) == 3 and changed.manifest_md5 != first[2].manifest_md5
    assert any(b.name in q[0] for q in changed.quarantined)
    assert len(list(cache.glob("verdict-*.json"))) == 1  # only the latest verdict is kept
