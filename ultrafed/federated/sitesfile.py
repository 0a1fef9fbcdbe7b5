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
from typing import TYPE_CHECKING, Any, Sequence

from ultrafed.config import ConfigError
from ultrafed.yamlfile import read_yaml_mapping

if TYPE_CHECKING:
    from ultrafed.config import Config

SITE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
MODES = ("embedded", "federation")
_TOP_KEYS = ("mode", "sites")
_SITE_KEYS = ("id", "root")


class SitesFileError(ConfigError):
    """sites.yaml is malformed, or its sites cannot run this config; the message names the file and the problem.

    A ConfigError: the sites are part of a run's configuration, and the CLI reports both alike."""


def load_sites_file(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Return (mode, sites); embedded roots are resolved relative to the file."""
    p = Path(path)
    doc = read_yaml_mapping(p, "sites file", SitesFileError)
    unknown = sorted(str(k) for k in doc if k not in _TOP_KEYS)
    if unknown:
        raise SitesFileError(f"{p}: unknown key(s) {unknown} at the top (allowed: {', '.join(_TOP_KEYS)})")
    mode = doc.get("mode", "embedded")
    if mode not in MODES:
        raise SitesFileError(f"{p}: mode must be 'embedded' or 'federation', got {mode!r}")
    entries = doc.get("sites") or []
    if not isinstance(entries, list):
        raise SitesFileError(f"{p}: 'sites' must be a list of sites (- id: ...), got {type(entries).__name__}")
    sites = [_site(p, i, s, mode) for i, s in enumerate(entries)]
    if not sites:
        raise SitesFileError(f"{p}: no sites listed")
    check_sites(sites, source=p)
    return mode, sites


def _site(p: Path, i: int, entry: Any, mode: str) -> dict[str, Any]:
    """One ``sites:`` entry (a mapping, or a bare id in federation mode) as ``{"id", ["root"]}``."""
    if isinstance(entry, dict):
        extra = sorted(str(k) for k in entry if k not in _SITE_KEYS)
        if extra:
            raise SitesFileError(f"{p}: site #{i + 1} has unknown key(s) {extra} (allowed: {', '.join(_SITE_KEYS)})")
        sid = entry.get("id")
    elif isinstance(entry, (str, int)) and not isinstance(entry, bool):
        sid = entry
    else:
        raise SitesFileError(f"{p}: site #{i + 1} must be a mapping with 'id' (and 'root'), got {entry!r}")
    sid = "" if sid is None else str(sid)
    if not SITE_ID.match(sid):
        raise SitesFileError(f"{p}: site #{i + 1} id {sid!r} must be lowercase letters, digits, - or _")
    site: dict[str, Any] = {"id": sid}
    root = entry.get("root") if isinstance(entry, dict) else None
    if mode == "embedded":
        if not root or not isinstance(root, str):
            raise SitesFileError(f"{p}: site {sid} needs a 'root' folder in embedded mode")
        site["root"] = str((p.parent / root).resolve())
    elif root is not None:
        raise SitesFileError(f"{p}: site {sid} has a 'root' in federation mode; the coordinator must not know it")
    return site


def check_sites(sites: Sequence[dict[str, Any]], *, source: str | Path, min_sites: int | None = None) -> None:
    """Refuse sites that would train wrongly: an id twice, one data folder under two ids (its
    images counted twice), or fewer sites than ``federated.min_sites`` (no round could aggregate)."""
    seen: set[str] = set()
    roots: dict[str, str] = {}  # resolved root -> the first site id that has it
    for s in sites:
        if s["id"] in seen:
            raise SitesFileError(f"{source}: duplicate site id {s['id']!r}")
        seen.add(s["id"])
        if s.get("root"):
            real = str(Path(s["root"]).resolve())
            if real in roots:
                raise SitesFileError(f"{source}: sites {roots[real]} and {s['id']} have the same root {real} "
                                     f"(its images would count twice)")
            roots[real] = s["id"]
    if min_sites is not None and len(sites) < min_sites:
        raise SitesFileError(f"{source}: {len(sites)} site(s) but federated.min_sites is {min_sites}; "
                             f"no round could aggregate (lower federated.min_sites or add sites)")


def cohort_sites(root: str | Path) -> list[dict[str, Any]]:
    """Every ``site-*`` folder of a synthetic cohort as embedded sites."""
    return [{"id": d.name, "root": str(d.resolve())} for d in sorted(Path(root).glob("site-*")) if d.is_dir()]


def shared_data_sites(root: str | Path) -> list[dict[str, Any]]:
    """busi, ddti, hc18 of the real data folder as three embedded sites (train split used)."""
    return [{"id": n, "root": str((Path(root) / n).resolve())} for n in ("busi", "ddti", "hc18")
            if (Path(root) / n / "labels.csv").is_file()]


def resolve_sites(cfg: "Config", *, sites_file: str | Path | None = None,
                  data: str | Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(mode, sites) from --sites / --data, else the synthetic cohort (made on first use),
    checked against the config (``federated.min_sites``, ids, roots) before anything is made."""
    from ultrafed.paths import REPO_ROOT

    need = cfg.federated.min_sites
    if sites_file:
        mode, sites = load_sites_file(sites_file)
        check_sites(sites, source=sites_file, min_sites=need)
        missing = [s for s in sites if s.get("root") and not Path(s["root"]).is_dir()]
        if missing:
            raise SitesFileError(f"{sites_file}: site {missing[0]['id']}: root {missing[0]['root']} is not a folder")
        return mode, sites
    if data:
        sites = shared_data_sites(data)
        if not sites:
            raise SitesFileError(f"{data}: no busi/ddti/hc18 folders with labels.csv")
        check_sites(sites, source=data, min_sites=need)
        return "embedded", sites
    root = Path(cfg.data.root)
    root = root if root.is_absolute() else REPO_ROOT / root
    if not cohort_sites(root):
        if cfg.synth.sites < need:
            raise SitesFileError(f"{root}: the synthetic cohort would have synth.sites={cfg.synth.sites} site(s) "
                                 f"but federated.min_sites is {need}; no round could aggregate")
        from ultrafed.data.synth import make_cohort

        print(f"making the synthetic cohort in {root} ({cfg.synth.sites} sites x {cfg.synth.per_site} images)")
        make_cohort(root, cfg.synth.sites, cfg.synth.per_site, cfg.synth.seed, cfg.synth.size)
    sites = cohort_sites(root)
    check_sites(sites, source=root, min_sites=need)
    return "embedded", sites
