"""Lineage: what an auditor needs to know about how one registered model version came to be.

Every registered version carries its lineage twice: as ``lineage.json`` inside the version's
own artifacts (the complete record, checksummed) and as flat version tags (searchable in the
MLflow UI). :func:`chain` follows ``parent_version`` (and, for task models, the encoder they
were fine-tuned from) back to round 0; :func:`verify` recomputes what can be recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ultrafed.files import file_digest, files_sha256
from ultrafed.paths import REPO_ROOT
from ultrafed.tracking.names import (
    GATE_PASSED,
    LINEAGE_ARTIFACT,
    TAG_FILES_SHA,
    TAG_LINEAGE_SHA,
    TAG_WEIGHTS_SHA,
    resolve_version,
)


@dataclass
class SiteRecord:
    """One participating site in one round."""

    site: str  # site id (also its Prefect work pool suffix)
    n_images: int  # images the site trained on this round (counts its FedAvg weight)
    manifest_md5: str  # DVC md5 of the site's manifest file at check time
    weight: float  # aggregation weight the strategy gave this site's update (sums to 1)
    gate_status: str  # quality gate outcome: "passed" or "failed" (a failed site is normally excluded)
    gate_reasons: list[str] = field(default_factory=list)  # why a gate failed or warned
    metrics: dict[str, float] = field(default_factory=dict)  # the site's local metrics this round
    manifest_path: str | None = None  # manifest file (repo-relative or absolute) for --verify, if reachable
    update_sha256: str | None = None  # sha256 of the site's update state (ultrafed.tracking.store)


@dataclass
class Lineage:
    """The record attached to a registered version; ``kind`` is ``encoder`` or ``task``."""

    kind: str = "encoder"
    round: int | None = None  # federated round that produced this global encoder (0-based)
    parent_version: int | None = None  # registry version this round started from (None for round 0)
    strategy: str | None = None  # aggregation strategy (fedavg, fedprox, ...)
    strategy_params: dict[str, Any] = field(default_factory=dict)  # its settings
    sites: list[SiteRecord] = field(default_factory=list)  # participating sites
    excluded: dict[str, str] = field(default_factory=dict)  # site -> reason it did not take part
    code_commit: str | None = None  # git commit of the code ("-dirty" if modified)
    params_hash: str | None = None  # sha256 of the resolved params.yaml (ultrafed.config)
    run_id: str | None = None  # MLflow run that logged this version (the round's run)
    parent_run_id: str | None = None  # the pretraining's parent run
    seed: int | None = None  # base seed (per-site/per-round seeds derive from it)
    metrics: dict[str, float] = field(default_factory=dict)  # global validation metrics
    model: dict[str, Any] = field(default_factory=dict)  # architecture (preset, img_size, ...)
    weights_sha256: str | None = None  # state_sha256 of the registered weights (set at registration)
    encoder_uri: str | None = None  # task models: the encoder version they were fine-tuned from
    task: str | None = None  # task models: e.g. "busi-classification"
    data: dict[str, Any] = field(default_factory=dict)  # task models: dataset, splits, sizes
    created_at: str | None = None  # UTC ISO time of registration
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping

    # -- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Lineage":
        """Build from a dict; unknown top-level keys are kept under ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**dict(known.pop("extra", None) or {}), **{k: v for k, v in data.items() if k not in names}}
        site_names = {f.name for f in dataclasses.fields(SiteRecord)}
        sites = []
        for s in known.pop("sites", None) or []:
            if isinstance(s, SiteRecord):
                sites.append(s)
                continue
            unknown = set(s) - site_names
            if unknown:
                raise ValueError(f"lineage site record has unknown field(s) {sorted(unknown)}")
            sites.append(SiteRecord(**s))
        if known.get("excluded") is None:
            known["excluded"] = {}
        return cls(**known, sites=sites, extra=extra)

    @classmethod
    def coerce(cls, x: "Lineage | Mapping[str, Any]") -> "Lineage":
        return dataclasses.replace(x) if isinstance(x, Lineage) else cls.from_dict(x)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    # -- checks -----------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What makes this record incomplete for an auditor (empty list: complete)."""
        out: list[str] = []
        for key in ("code_commit", "params_hash", "run_id", "weights_sha256"):
            if not getattr(self, key):
                out.append(f"{key} missing")
        if self.code_commit == "unknown":
            out.append("code_commit unknown (not a git checkout)")
        if self.kind == "task":
            if not self.encoder_uri:
                out.append("encoder_uri missing (task model must name its encoder version)")
            return out
        if self.round is None:
            out.append("round missing")
        elif self.round > 0 and self.parent_version is None:
            out.append(f"round {self.round} has no parent_version")
        if not self.strategy:
            out.append("strategy missing")
        if not self.sites:
            out.append("no participating sites recorded")
        for s in self.sites:
            if not s.manifest_md5:
                out.append(f"site {s.site}: manifest_md5 missing")
            if not s.n_images or s.n_images <= 0:
                out.append(f"site {s.site}: n_images missing")
            if s.weight is None or not math.isfinite(s.weight):
                out.append(f"site {s.site}: aggregation weight missing")
            if not s.gate_status:
                out.append(f"site {s.site}: quality-gate outcome missing")
        if self.sites and all(s.weight is not None and math.isfinite(s.weight) for s in self.sites):
            total = sum(s.weight for s in self.sites)
            if abs(total - 1.0) > 1e-4:
                out.append(f"aggregation weights sum to {total:.6f}, not 1")
        overlap = {s.site for s in self.sites} & set(self.excluded)
        if overlap:
            out.append(f"site(s) {sorted(overlap)} both participating and excluded")
        return out

    def failed_sites(self) -> list[str]:
        """Participating sites whose quality gate did not pass."""
        return [s.site for s in self.sites if s.gate_status != GATE_PASSED]


def resolve_manifest(path: str | None, base: Path = REPO_ROOT) -> Path | None:
    """A recorded manifest path as a local file, or None where it is not reachable here."""
    if not path:
        return None
    p = Path(base) / path  # an absolute path stays as it is
    return p if p.is_file() else None


# -- the chain in the registry ------------------------------------------------------------------
@dataclass
class ChainLink:
    """One registered version on the way back to round 0."""

    name: str
    version: int
    aliases: list[str]
    tags: dict[str, str]
    lineage: Lineage | None  # None where lineage.json could not be read
    problems: list[str]  # incompleteness of this link (missing record, missing fields, broken parent)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": self.aliases,
                "uri": f"models:/{self.name}/{self.version}", "problems": self.problems,
                "lineage": self.lineage.to_dict() if self.lineage else None}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]


def load_lineage(name: str, version: int, dst: str | Path | None = None) -> Lineage:
    """``lineage.json`` of a registered version (raises a one-line error if unreadable)."""
    import tempfile

    import mlflow

    uri = f"models:/{name}/{version}/{LINEAGE_ARTIFACT}"
    with tempfile.TemporaryDirectory(prefix="ultrafed-lineage-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst or tmp))
            return Lineage.from_dict(json.loads(Path(path).read_text()))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{uri}: lineage unreadable ({_first_line(e)})") from None


def chain(model_uri: str, max_links: int = 10_000) -> list[ChainLink]:
    """The version ``model_uri`` names, then what it came from, back to round 0.

    A task model links to its encoder version (``encoder_uri``); an encoder version links to
    its ``parent_version``. Problems (unreadable record, missing parent, a cycle) are recorded
    on the link rather than raised, so an auditor sees the whole broken chain.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    name, version = resolve_version(model_uri)
    links: list[ChainLink] = []
    seen: set[tuple[str, int]] = set()
    nxt: tuple[str, int] | None = (name, version)
    while nxt is not None and len(links) < max_links:
        name, version = nxt
        nxt = None
        if (name, version) in seen:
            links[-1].problems.append(f"cycle: links back to {name} v{version}")
            break
        seen.add((name, version))
        try:
            mv = client.get_model_version(name, str(version))
        except Exception as e:  # noqa: BLE001
            if links:
                links[-1].problems.append(f"points to {name} v{version}, which is not registered ({_first_line(e)})")
            else:
                raise
            break
        try:
            lin: Lineage | None = load_lineage(name, version)
            problems = lin.problems()
        except ValueError as e:
            lin, problems = None, [str(e)]
        links.append(ChainLink(name, version, list(getattr(mv, "aliases", []) or []), dict(mv.tags), lin, problems))
        if lin is None:
            break
        if lin.kind == "task" and lin.encoder_uri:
            try:
                nxt = resolve_version(lin.encoder_uri)
            except Exception as e:  # noqa: BLE001
                links[-1].problems.append(f"encoder {lin.encoder_uri} not found ({_first_line(e)})")
        elif lin.parent_version is not None:
            nxt = (name, int(lin.parent_version))
    return links


def chain_problems(links: list[ChainLink]) -> list[str]:
    """All problems along a chain, prefixed with the version; also checks it reaches round 0."""
    out = [f"{link.name} v{link.version}: {p}" for link in links for p in link.problems]
    last = links[-1] if links else None
    if last is not None and last.lineage is not None and last.lineage.kind == "encoder" \
            and last.lineage.round not in (0, None) and not last.problems:
        out.append(f"{last.name} v{last.version}: chain ends at round {last.lineage.round}, not round 0")
    return out


# -- verification -------------------------------------------------------------------------------
@dataclass
class Check:
    """One verification: ``status`` is ok, mismatch, missing or skipped (not reachable here)."""

    version: str  # "name vN"
    what: str
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "missing")


# MLflow writes this into every models:/ download (name + version of what was fetched).
_DOWNLOAD_ADDED = {"registered_model_meta"}


def _verify_files(link: ChainLink, tmp: Path) -> list[Check]:
    import mlflow

    where = f"{link.name} v{link.version}"
    recorded = link.tags.get(TAG_FILES_SHA)
    if not recorded:
        return [Check(where, "artifact checksums", "missing", f"tag {TAG_FILES_SHA} not recorded")]
    expected: dict[str, str] = json.loads(recorded)
    dst = tmp / f"{link.name}-{link.version}"
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{link.name}/{link.version}",
                                                         dst_path=str(dst)))
    except Exception as e:  # noqa: BLE001
        return [Check(where, "artifacts", "missing", f"cannot download ({_first_line(e)})")]
    got = files_sha256(local)
    checks = []
    for rel, sha in sorted(expected.items()):
        if rel not in got:
            checks.append(Check(where, f"artifact {rel}", "missing", "file absent from the store"))
        elif got[rel] != sha:
            checks.append(Check(where, f"artifact {rel}", "mismatch",
                                f"sha256 {got[rel][:12]} != registered {sha[:12]}"))
        else:
            checks.append(Check(where, f"artifact {rel}", "ok", sha[:12]))
    for rel in sorted(set(got) - set(expected) - _DOWNLOAD_ADDED):
        checks.append(Check(where, f"artifact {rel}", "mismatch", "file not present at registration"))
    lsha = link.tags.get(TAG_LINEAGE_SHA)
    lpath = local / LINEAGE_ARTIFACT
    if lsha and lpath.is_file():
        actual = hashlib.sha256(lpath.read_bytes()).hexdigest()
        checks.append(Check(where, "lineage.json vs tag", "ok" if actual == lsha else "mismatch",
                            "" if actual == lsha else f"sha256 {actual[:12]} != tag {lsha[:12]}"))
    return checks


def _verify_manifests(link: ChainLink, base: Path) -> list[Check]:
    where = f"{link.name} v{link.version}"
    checks = []
    for s in link.lineage.sites if link.lineage else []:
        path = resolve_manifest(s.manifest_path, base)
        if path is None:
            checks.append(Check(where, f"manifest {s.site}", "skipped",
                                f"{s.manifest_path or 'no path recorded'} not reachable here"))
            continue
        md5 = file_digest(path, "md5")  # what DVC 3 records as the manifest's md5
        checks.append(Check(where, f"manifest {s.site}", "ok" if md5 == s.manifest_md5 else "mismatch",
                            f"{path}" if md5 == s.manifest_md5 else f"{path}: md5 {md5} != recorded {s.manifest_md5}"))
    return checks


def _verify_tags(link: ChainLink) -> list[Check]:
    """The searchable tags must agree with the checksummed record."""
    where = f"{link.name} v{link.version}"
    if link.lineage is None:
        return []
    rec = link.lineage.weights_sha256 or ""
    tag = link.tags.get(TAG_WEIGHTS_SHA, "")
    ok = bool(rec) and rec == tag
    return [Check(where, "weights sha256 (lineage vs tag)", "ok" if ok else "mismatch",
                  rec[:12] if ok else f"lineage {rec[:12] or '-'} != tag {tag[:12] or '-'}")]


def verify_links(links: list[ChainLink], *, base: Path = REPO_ROOT) -> list[Check]:
    """Artifact checksums, lineage-vs-tag agreement and manifest md5s for the given links."""
    import tempfile

    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="ultrafed-verify-") as tmp:
        for link in links:
            checks += _verify_files(link, Path(tmp))
            checks += _verify_tags(link)
            checks += _verify_manifests(link, base)
            shutil.rmtree(Path(tmp) / f"{link.name}-{link.version}", ignore_errors=True)  # one model at a time
    return checks


def verify(model_uri: str, *, base: Path = REPO_ROOT) -> list[Check]:
    """Recompute, for every version in the chain: artifact checksums, lineage.json hash,
    manifest md5s (where the manifest files are reachable). Failed checks have ``failed``."""
    links = chain(model_uri)
    problems = [Check("chain", "lineage complete", "missing", p) for p in chain_problems(links)]
    return problems + verify_links(links, base=base)
