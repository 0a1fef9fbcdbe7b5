"""Promotion: point an alias (``production``) at a registered version only where its gates hold.

The gates (metric thresholds, a lineage complete back to round 0, every site's quality gate
passed, artifact checksums) come from ``mlflow/registry.yaml``; each promotion records who,
when, why and the gates' evidence as version tags. Kept apart from :mod:`ultrafed.tracking.registry`
(which registers versions) so that registration never depends on the lineage chain walk.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ultrafed.paths import REPO_ROOT
from ultrafed.tracking.lineage import Lineage, chain, chain_problems, verify_links
from ultrafed.tracking.names import tag_value

DEFAULT_GATES_FILE = REPO_ROOT / "mlflow" / "registry.yaml"


@dataclass(frozen=True)
class Gates:
    """What must hold before an alias may point at a version (from ``mlflow/registry.yaml``)."""

    metrics: Mapping[str, Mapping[str, float]]  # metric -> {"min": x} and/or {"max": y}
    require_complete_lineage: bool = True
    require_sites_passed: bool = True
    verify_artifacts: bool = True
    source: str = ""  # file the gates came from (recorded as evidence)


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str


class PromotionRefused(RuntimeError):
    """A gate did not hold; the message lists every failed gate on one line."""

    def __init__(self, name: str, version: int, alias: str, results: Sequence[GateResult]) -> None:
        self.results = list(results)
        failed = "; ".join(f"{r.gate}: {r.detail}" for r in results if not r.passed)
        super().__init__(f"refused to set {name}@{alias} -> v{version}: {failed}")


def load_gates(name: str, path: str | Path | None = None) -> Gates:
    """Gates for registered model ``name``: ``default`` overlaid by the first matching ``models`` pattern."""
    from ultrafed.yamlfile import read_yaml_mapping

    p = Path(path) if path else DEFAULT_GATES_FILE
    data = read_yaml_mapping(p, "gates file", ValueError)
    merged: dict[str, Any] = dict(data.get("default") or {})
    for pattern, section in (data.get("models") or {}).items():
        if fnmatch.fnmatchcase(name, str(pattern)):
            section = section or {}
            merged.update({k: v for k, v in section.items() if k != "metrics"})
            merged["metrics"] = {**(merged.get("metrics") or {}), **(section.get("metrics") or {})}
            break
    known = {"metrics", "require_complete_lineage", "require_sites_passed", "verify_artifacts"}
    if set(merged) - known:
        raise ValueError(f"{p}: unknown gate key(s) {sorted(set(merged) - known)}")
    metrics = merged.get("metrics") or {}
    for m, rule in metrics.items():
        if not isinstance(rule, dict) or not rule or set(rule) - {"min", "max"}:
            raise ValueError(f"{p}: metric gate '{m}' must be a mapping with 'min' and/or 'max'")
    return Gates(metrics={m: {k: float(v) for k, v in r.items()} for m, r in metrics.items()},
                 require_complete_lineage=bool(merged.get("require_complete_lineage", True)),
                 require_sites_passed=bool(merged.get("require_sites_passed", True)),
                 verify_artifacts=bool(merged.get("verify_artifacts", True)), source=str(p))


def _metric_results(lin: Lineage | None, gates: Gates) -> list[GateResult]:
    out = []
    values = lin.metrics if lin else {}
    for metric, rule in sorted(gates.metrics.items()):
        v = values.get(metric)
        if v is None or not np.isfinite(v):
            out.append(GateResult(f"metric {metric}", False, "not recorded" if v is None else f"{v} is not finite"))
            continue
        bad = [f"{v:.4g} < min {rule['min']:.4g}"] if "min" in rule and v < rule["min"] else []
        bad += [f"{v:.4g} > max {rule['max']:.4g}"] if "max" in rule and v > rule["max"] else []
        want = " and ".join(f"{k} {x:.4g}" for k, x in rule.items())
        out.append(GateResult(f"metric {metric}", not bad, "; ".join(bad) or f"{v:.4g} within {want}"))
    return out


def evaluate_gates(name: str, version: int, gates: Gates) -> list[GateResult]:
    """Every gate's outcome for one version (nothing is changed)."""
    links = chain(f"models:/{name}/{version}")
    head = links[0]
    results = _metric_results(head.lineage, gates)
    if gates.require_complete_lineage:
        problems = chain_problems(links)
        results.append(GateResult("lineage complete", not problems,
                                  "; ".join(problems) or f"{len(links)} version(s) back to round 0"))
    if gates.require_sites_passed:
        failed = [f"{link.name} v{link.version} site {s}" for link in links if link.lineage
                  for s in link.lineage.failed_sites()]
        n_sites = sum(len(link.lineage.sites) for link in links if link.lineage)
        results.append(GateResult("sites passed quality gates", not failed,
                                  ("failed: " + ", ".join(failed)) if failed else f"{n_sites} site-rounds passed"))
    if gates.verify_artifacts:
        # The version itself and, for a task model, the encoder it was fine-tuned from.
        own = links[:1] + [link for link in links[1:2] if head.lineage and head.lineage.kind == "task"]
        bad = [c for c in verify_links(own) if c.failed]
        results.append(GateResult("artifact checksums", not bad, "; ".join(
            f"{c.version} {c.what}: {c.detail}" for c in bad) or "all files match their registered sha256"))
    return results


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def promote(name: str, version: int, alias: str, *, reason: str, by: str | None = None,
            gates_path: str | Path | None = None) -> list[GateResult]:
    """Point ``name@alias`` at ``version`` if every gate holds, recording who/when/why/evidence.

    Raises :class:`PromotionRefused` (listing the failed gates) otherwise; nothing changes then.
    """
    if not reason or not reason.strip():
        raise ValueError("promote: a reason is required (it is recorded for auditors)")
    gates = load_gates(name, gates_path)
    results = evaluate_gates(name, int(version), gates)
    if not all(r.passed for r in results):
        raise PromotionRefused(name, int(version), alias, results)
    client = MlflowClient()
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = ""
    client.set_registered_model_alias(name, alias, str(version))
    evidence = {"gates_file": gates.source, "gates": {"metrics": dict(gates.metrics),
                "require_complete_lineage": gates.require_complete_lineage,
                "require_sites_passed": gates.require_sites_passed, "verify_artifacts": gates.verify_artifacts},
                "results": [r.__dict__ for r in results]}
    p = f"promotion.{alias}."
    for key, value in {p + "by": by or _who(), p + "reason": reason.strip(),
                       p + "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       p + "previous_version": str(previous), p + "evidence": tag_value(evidence)}.items():
        client.set_model_version_tag(name, str(version), key, value)
    return results
