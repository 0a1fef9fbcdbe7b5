"""What a federation site's answers carry: no file name, no path; counts by check instead."""
from __future__ import annotations

from pathlib import Path

import pytest

from ultrafed.data.quality import GateResult, quarantine_counts, render_report, without_names
from ultrafed.federated.disclosure import coordinator_view, redact_text

SECRET = "patient-4711-mrn-0042"


def _gate() -> GateResult:
    return GateResult(site="a", status="warn",
                      reasons=(f"[warn] readable: 1 of 11 images (9.1%) unexpected, 1 quarantined; e.g. images/{SECRET}.png",),
                      quarantined=((f"images/{SECRET}.png", "unreadable: truncated PNG"),
                                   ("images/x2.png", "readable: readable=False; duplicate: duplicate of images/x1.png")),
                      n_images=10, manifest_path="/hospital/a/manifests/a.csv", manifest_md5="abc", report_path=None,
                      expectations=(),
                      problems=(f"labels.csv row 12: images/{SECRET}-2.png not found",))


def test_reasons_lose_their_example_file_names():
    r = _gate().reasons[0]
    assert SECRET not in without_names(r) and "1 quarantined" in without_names(r)


def test_quarantine_counts_name_the_check_never_the_file():
    assert quarantine_counts(_gate().quarantined) == {"duplicate": 1, "readable": 1, "unreadable": 1}


def test_the_shared_report_names_no_file_and_the_site_report_does():
    shared, full = render_report(_gate(), names=False), render_report(_gate())
    assert SECRET not in shared and "/hospital" not in shared and "x2.png" not in shared
    assert "| unreadable | 1 |" in shared and "1 (named in the site's own report)" in shared
    assert SECRET in full


@pytest.mark.parametrize("text", [f"cannot decode /data/site-a/images/{SECRET}.png: bad header",
                                  f"images/{SECRET}.PNG: truncated", f"row 3: {SECRET}.dcm is DICOM",
                                  "open /srv/hospital/a failed"])
def test_redacted_errors_keep_the_problem_and_drop_the_file(text):
    out = redact_text(text + "\nsecond line")
    assert SECRET not in out and "/srv" not in out and "/data" not in out
    assert "\n" not in out and ("<site file>" in out or "<site path>" in out)


def test_check_answer_keeps_counts_and_drops_names():
    full = {"site": "a", "status": "warn", "reasons": list(_gate().reasons), "n_images": 10, "n_quarantined": 2,
            "quarantined": [f"images/{SECRET}.png: unreadable"], "problems": ["x"], "manifest_md5": "abc",
            "report_md": f"| {SECRET} |", "report_md_shared": render_report(_gate(), names=False),
            "quarantine_by_check": {"unreadable": 1}, "n_problems": 1}
    view = coordinator_view("check", full)
    assert SECRET not in str(view)
    assert view["n_quarantined"] == 2 and view["quarantine_by_check"] == {"unreadable": 1}
    assert set(view) >= {"site", "status", "reasons", "n_images", "manifest_md5", "report_md"}
    assert coordinator_view("validate", {"site": "a", "val_loss": 0.5}) == {"site": "a", "val_loss": 0.5}


def test_a_failing_site_action_tells_the_coordinator_no_file_name(tmp_path: Path, monkeypatch):
    from ultrafed.federated import client

    monkeypatch.setenv(client.SITE_ROOT_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setenv(client.SITE_WORKDIR_ENV, str(tmp_path / "work"))

    def boom(site_id, **kw):
        raise ValueError(f"{tmp_path}/nowhere/images/{SECRET}.png: cannot decode")

    monkeypatch.setitem(client.ACTIONS, "check", boom)
    with pytest.raises(client.SiteError) as e:
        client.run_for_coordinator("check", "a", {}, result_run_id=None)
    msg = str(e.value)
    assert SECRET not in msg and str(tmp_path) not in msg and "cannot decode" in msg and e.value.__cause__ is None
    assert SECRET in (tmp_path / "work" / "errors.log").read_text()  # the site's operator still sees which file
