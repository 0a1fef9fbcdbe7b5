"""``sites.yaml``: which sites take part, and (embedded mode only) where their data is.

```yaml
mode: embedded        # or federation (then no roots: each site's worker knows its own)
sites:
  - id: busi
    root: ../shared/data/busi
```
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

SITE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class SitesFileError(ValueError):
    """sites.yaml is malformed; the message names the file and the problem."""


def load_sites_file(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Return (mode, sites); embedded roots are resolved relative to the file."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise SitesFileError(f"{p}: sites file not found") from None
    except yaml.YAMLError as e:
        raise SitesFileError(f"{p}: not valid YAML ({type(e).__name__})") from None
    mode = doc.get("mode", "embedded")
    if mode not in ("embedded", "federation"):
        raise SitesFileError(f"{p}: mode must be 'embedded' or 'federation', got {mode!r}")
    sites = []
    for i, s in enumerate(doc.get("sites") or []):
        sid = str(s.get("id", "")) if isinstance(s, dict) else str(s)
        if not SITE_ID.match(sid):
            raise SitesFileError(f"{p}: site #{i + 1} id {sid!r} must be lowercase letters, digits, - or _")
        site: dict[str, Any] = {"id": sid}
        if mode == "embedded":
            root = s.get("root") if isinstance(s, dict) else None
            if not root:
                raise SitesFileError(f"{p}: site {sid} needs a 'root' in embedded mode")
            site["root"] = str((p.parent / root).resolve())
        elif isinstance(s, dict) and "root" in s:
            raise SitesFileError(f"{p}: site {sid} has a 'root' in federation mode; the coordinator must not know it")
        sites.append(site)
    if not sites:
        raise SitesFileError(f"{p}: no sites listed")
    if len({s["id"] for s in sites}) != len(sites):
        raise SitesFileError(f"{p}: duplicate site ids")
    return mode, sites


def cohort_sites(root: str | Path) -> list[dict[str, Any]]:
    """Every ``site-*`` folder of a synthetic cohort as embedded sites."""
    return [{"id": d.name, "root": str(d.resolve())} for d in sorted(Path(root).glob("site-*")) if d.is_dir()]


def shared_data_sites(root: str | Path) -> list[dict[str, Any]]:
    """busi, ddti, hc18 of the real data folder as three embedded sites (train split used)."""
    return [{"id": n, "root": str((Path(root) / n).resolve())} for n in ("busi", "ddti", "hc18")
            if (Path(root) / n / "labels.csv").is_file()]
