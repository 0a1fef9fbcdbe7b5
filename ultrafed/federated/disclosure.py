"""What a federation site's answers may carry to its coordinator: numbers, hashes, check names.

Hospital file names often hold patient or accession numbers, and a path tells where a site keeps
its data, so in federation mode a site sends how many files were quarantined and by which check,
never which files; the named report stays in the site's work dir for its own operator.
Embedded mode (one machine, one owner) keeps the full answers.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from ultrafed.data.quality import without_names

# what a site's ``check`` answer keeps; everything else (the quarantine list, scan problems,
# the named report) stays at the site
CHECK_KEYS = ("site", "status", "n_images", "n_quarantined", "manifest_md5", "quarantine_by_check", "n_problems")
_FILE = re.compile(r"(?:[^\s:;,'\"()\[\]<>|`]*/)*[^\s:;,'\"()\[\]<>|`/]+\.(?:png|jpe?g|bmp|tiff?|gif|dcm|npy|npz|csv|"
                   r"json|nii(?:\.gz)?|mhd|raw)\b", re.IGNORECASE)
_ABS = re.compile(r"(?<![\w.])/(?:[^\s:;,'\"()\[\]<>|`]+)")


def redact_text(text: str) -> str:
    """``text`` with every file name and absolute path replaced by ``<site file>`` (one line)."""
    one = " ".join(str(text).split())
    return _ABS.sub("<site path>", _FILE.sub("<site file>", one))


def coordinator_view(action: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a site's answer to ``action`` that may leave the site in federation mode."""
    if action != "check":
        return dict(result)  # train / validate answers are counts, metrics, URIs and hashes already
    out = {k: result[k] for k in CHECK_KEYS if k in result}
    out["reasons"] = [redact_text(without_names(r)) for r in result.get("reasons", ())]
    out["report_md"] = result.get("report_md_shared", "")
    return out
