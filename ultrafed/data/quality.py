"""The site quality gate: a Great Expectations suite run on a site's manifest.

A site may train only on data that is versioned and checked. The checks are GX expectations
built from a suite kept as data (``ultrafed/data/suites/*.yaml``), run in an ephemeral GX 1.x
context on the manifest (never on pixels, which stay at the site). Per-image failures
quarantine the image instead of failing the site, unless too many images fail; site-level
failures (too few usable images, no train split, broken manifest) exclude the site from the
round. Every outcome carries GX's observed values, so an excluded site knows why.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml

from ultrafed.data.manifest import (
    ManifestError, manifest_md5, read_manifest, scan_site, stat_cache_path, write_manifest,
)

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SEVERITIES = ("fail", "warn", "quarantine")
STATUS_CODE = {"pass": 0, "warn": 1, "fail": 2}
_SECTIONS = ("expectations", "usable", "drift")
_BULKY = ("unexpected_list", "unexpected_index_list", "unexpected_index_query", "partial_unexpected_index_list",
          "partial_unexpected_counts", "unexpected_index_column_names", "unexpected_percent_total",
          "unexpected_percent_nonmissing")
_DRIFT_EXPECTATION = {"mean": "ExpectColumnMeanToBeBetween", "median": "ExpectColumnMedianToBeBetween",
                      "stdev": "ExpectColumnStdevToBeBetween"}


class SuiteError(ValueError):
    """A suite file that cannot be used; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class GateResult:
    """Outcome of the quality gate for one site (what the round records as lineage)."""

    site: str
    status: str                                  # "pass" | "warn" | "fail"
    reasons: tuple[str, ...]                     # one line per failed/warned expectation
    quarantined: tuple[tuple[str, str], ...]     # (relpath, reason): excluded from training
    n_images: int                                # usable images (all splits) that may train
    manifest_path: str
    manifest_md5: str                            # DVC md5 of the manifest = the data version
    report_path: str | None
    expectations: tuple[dict, ...]               # name, expectation, severity, success, observed
    n_total: int = 0                             # rows in the manifest
    suite: str = ""
    problems: tuple[str, ...] = ()               # scan-level lines (e.g. rows left out of labels.csv)
    splits: tuple[tuple[str, int], ...] = ()     # usable images per split

    @property
    def ok(self) -> bool:
        """May this site train this round?"""
        return self.status != "fail"

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


# ----------------------------------------------------------------------------------------------
# Suites (data, not code)

def _suite_file(suite: str | Path | None, site: str | None) -> Path:
    if suite is None:
        cand = SUITES_DIR / f"{(site or '').lower()}.yaml"
        return cand if site and cand.is_file() else SUITES_DIR / "default.yaml"
    p = Path(suite)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists():
        return p
    named = SUITES_DIR / f"{suite}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(f.stem for f in SUITES_DIR.glob("*.yaml")))
        raise SuiteError(f"{suite}: no such suite (known: {known})")
    return named


def _merge_named(base: list[dict], over: list[dict], where: str) -> list[dict]:
    out = [dict(e) for e in base]
    index = {e["name"]: i for i, e in enumerate(out)}
    for e in over:
        name = e.get("name")
        if not name:
            raise SuiteError(f"{where}: an entry has no 'name'")
        if name in index:
            merged = {**out[index[name]], **e}
            merged["kwargs"] = {**out[index[name]].get("kwargs", {}), **e.get("kwargs", {})}
            out[index[name]] = merged
        else:
            index[name] = len(out)
            out.append(dict(e))
    return out


def load_suite(suite: str | Path | None = None, site: str | None = None) -> dict[str, Any]:
    """The suite as a dict: ``suite`` is a file, a name in ``suites/``, or None (the site's own
    suite if there is one, else ``default``). ``extends`` chains are resolved."""
    path = _suite_file(suite, site)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise SuiteError(f"{path}: suite file not found") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise SuiteError(f"{path}: not valid YAML/JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite must be a mapping")
    if data.get("extends"):
        base = load_suite(data["extends"])
        for sec in _SECTIONS:
            base[sec] = _merge_named(base.get(sec, []), data.get(sec) or [], str(path))
        removed = set(data.get("remove") or [])
        for sec in _SECTIONS:
            base[sec] = [e for e in base[sec] if e["name"] not in removed]
        for k, v in data.items():
            if k not in _SECTIONS and k not in ("extends", "remove"):
                base[k] = v
        data = base
    data.setdefault("name", path.stem)
    data["path"] = str(path)
    for sec in _SECTIONS:
        for e in data.setdefault(sec, []) or []:
            if e.get("severity") not in SEVERITIES:
                raise SuiteError(f"{path}: '{e.get('name')}' has severity {e.get('severity')!r} "
                                 f"(expected one of {', '.join(SEVERITIES)})")
            if sec != "drift" and not e.get("expectation"):
                raise SuiteError(f"{path}: '{e.get('name')}' names no GX expectation class")
    return data


# ----------------------------------------------------------------------------------------------
# GX engine: one ephemeral context per process (creating one imports and wires GX).

_GX_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _gx() -> tuple[Any, Any]:
    """(gx module, batch definition) of a cached ephemeral context with a pandas data source."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # never phone home from a hospital
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_or_update_pandas(name="ultrafed_manifests")
    asset = source.add_dataframe_asset(name="manifest")
    return gx, asset.add_batch_definition_whole_dataframe("whole_manifest")


def _expectation(gx: Any, spec: Mapping[str, Any], mostly: float | None) -> Any:
    cls = getattr(gx.expectations, spec["expectation"], None)
    if cls is None:
        raise SuiteError(f"'{spec['name']}': {spec['expectation']} is not a GX expectation class")
    kwargs = dict(spec.get("kwargs") or {})
    if mostly is not None and "mostly" not in kwargs:
        kwargs["mostly"] = mostly
    try:
        return cls(**kwargs, meta={"name": spec["name"]})
    except Exception as e:  # pydantic validation of the suite's kwargs
        first = str(e).strip().splitlines()[0]
        raise SuiteError(f"'{spec['name']}': bad arguments for {spec['expectation']} ({first})") from None


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX wants plain numpy dtypes: nullable Int64 -> float64 (NaN)."""
    out = df.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.Int64Dtype):
            out[c] = out[c].astype("float64")
    return out


def run_expectations(df: pd.DataFrame, specs: Sequence[Mapping[str, Any]],
                     max_bad_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Validate ``df`` with GX; one dict per spec: name, expectation, severity, success,
    observed, unexpected (list of (relpath, row values) for per-row expectations)."""
    if not specs:
        return []
    gx, batch_def = _gx()
    suite = gx.ExpectationSuite(name="ultrafed_site")
    for spec in specs:
        mostly = 1.0 - max_bad_fraction if spec["severity"] == "quarantine" else None
        suite.add_expectation(_expectation(gx, spec, mostly))
    with _GX_LOCK:
        batch = batch_def.get_batch(batch_parameters={"dataframe": _gx_frame(df)})
        res = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                   "unexpected_index_column_names": ["relpath"]})
    by_name = {r.expectation_config.meta["name"]: r for r in res.results}
    out = []
    for spec in specs:
        r = by_name[spec["name"]]
        result = r.result or {}
        exc = r.exception_info or {}
        item: dict[str, Any] = {"name": spec["name"], "expectation": spec["expectation"],
                                "severity": spec["severity"], "success": bool(r.success),
                                "kwargs": _plain(spec.get("kwargs") or {})}
        if exc.get("raised_exception"):
            item["success"] = False
            item["observed"] = {"error": (exc.get("exception_message") or "GX error").splitlines()[0]}
        elif result.get("observed_value") is not None:
            item["observed"] = _plain(result["observed_value"])
        else:  # per-row expectations (and a few whose observed_value GX leaves empty)
            item["observed"] = _plain({k: (v[:3] if isinstance(v, list) else v) for k, v in result.items()
                                       if k not in _BULKY and k != "observed_value"})
        item["unexpected"] = [(str(u.get("relpath")), {k: _plain(v) for k, v in u.items() if k != "relpath"})
                              for u in result.get("unexpected_index_list") or []
                              if isinstance(u, Mapping)]
        out.append(item)
    return out


def _plain(x: Any) -> Any:
    """JSON-safe copy (numpy scalars, NaN -> None, tuples -> lists)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is pd.NA or x is pd.NaT:
        return None
    return x


# ----------------------------------------------------------------------------------------------
# The gate

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bounds(kwargs: Mapping[str, Any]) -> str:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"expected {_fmt(lo)}..{_fmt(hi)}"
    if lo is not None:
        return f"expected >= {_fmt(lo)}"
    if hi is not None:
        return f"expected <= {_fmt(hi)}"
    if "value_set" in kwargs:
        return "allowed: " + ", ".join(map(str, kwargs["value_set"]))
    return ""


EXAMPLES = "; e.g. "  # a reason's tail naming example files (left out of what leaves a site)


def without_names(reason: str) -> str:
    """A gate reason without its example file names (what a coordinator may see)."""
    return reason.split(EXAMPLES, 1)[0]


def reason_kind(reason: str) -> str:
    """The check a quarantine reason comes from (``readable``, ``duplicate``...), never a file name."""
    return reason.split(":", 1)[0].strip() or "other"


def _row_reason(item: Mapping[str, Any], values: Mapping[str, Any], error: str | None) -> str:
    if item["name"] == "readable" and error:
        return f"unreadable: {error}"
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    extra = _bounds(item["kwargs"])
    return f"{item['name']}: {shown}" + (f" ({extra})" if extra else "")


def _reason(item: Mapping[str, Any], status: str) -> str:
    obs = item["observed"]
    extra = _bounds(item["kwargs"])
    if isinstance(obs, Mapping) and "unexpected_count" in obs:
        n, of = obs.get("unexpected_count", 0), obs.get("element_count", 0)
        text = f"{n} of {of} images ({obs.get('unexpected_percent') or 0.0:.1f}%) unexpected"
        if item["severity"] == "quarantine" and status == "fail":
            limit = 1.0 - float(item["kwargs"].get("mostly", 1.0))
            text += f", more than the {100 * limit:.0f}% that may be quarantined"
        elif item["severity"] == "quarantine":
            text += f", {item.get('n_quarantined', n)} quarantined"
        examples = ", ".join(rel for rel, _ in item["unexpected"][:3])
        return (f"[{status}] {item['name']}: {text}" + (f"; {extra}" if extra else "")
                + (f"{EXAMPLES}{examples}" if examples else ""))
    if isinstance(obs, Mapping) and "error" in obs:
        return f"[{status}] {item['name']}: GX could not evaluate it ({obs['error']})"
    note = item.get("note")
    return (f"[{status}] {item['name']}: observed {_fmt(obs)}" + (f", {extra}" if extra else "")
            + (f" ({note})" if note else ""))


def _skipped(drift: Mapping[str, Any], why: str) -> dict[str, Any]:
    return {"name": drift["name"], "expectation": _DRIFT_EXPECTATION.get(drift.get("statistic", "mean"), ""),
            "severity": drift["severity"], "success": None, "observed": f"skipped: {why}", "kwargs": {},
            "unexpected": []}


def _drift_specs(suite: Mapping[str, Any], prev: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """GX specs with bounds computed from the previous manifest, and skipped drift entries."""
    specs, skipped = [], []
    ok = prev[prev["readable"].eq(True)]
    for d in suite.get("drift") or []:
        col, stat = d.get("column"), d.get("statistic", "mean")
        if col not in ok.columns or stat not in _DRIFT_EXPECTATION:
            raise SuiteError(f"{suite['path']}: drift '{d.get('name')}' needs a manifest column and "
                             f"statistic in {', '.join(_DRIFT_EXPECTATION)}")
        values = pd.to_numeric(ok[col], errors="coerce").dropna()
        if values.empty:
            skipped.append(_skipped(d, "previous manifest has no values"))
            continue
        ref = float({"mean": values.mean, "median": values.median, "stdev": values.std}[stat]())
        if "abs" in d:
            lo, hi = ref - float(d["abs"]), ref + float(d["abs"])
            note = f"previous {ref:.4g} +- {d['abs']}"
        else:
            lo, hi = ref * (1 - float(d["rel"])), ref * (1 + float(d["rel"]))
            note = f"previous {ref:.4g} x(1 +- {d['rel']})"
        specs.append({"name": d["name"], "expectation": _DRIFT_EXPECTATION[stat], "severity": d["severity"],
                      "kwargs": {"column": col, "min_value": round(lo, 6), "max_value": round(hi, 6)},
                      "note": note})
    return specs, skipped


def _judge(df: pd.DataFrame, suite: Mapping[str, Any], prev: pd.DataFrame | str | None
           ) -> tuple[str, list[str], list[tuple[str, str]], list[dict], pd.DataFrame]:
    """Status, reasons, quarantine list, expectation results and usable rows. ``prev``: the
    previous manifest, or why it could not be read (drift then shows as skipped)."""
    maxq = float(suite.get("max_quarantine_fraction", 0.25))
    items = run_expectations(df, suite["expectations"], maxq)
    errors = dict(zip(df["relpath"], df["error"]))
    first_of: dict[str, str] = {}
    for rel, sha in sorted(zip(df["relpath"], df["sha256"]), key=lambda t: t[0]):
        if isinstance(sha, str):
            first_of.setdefault(sha, rel)
    bad: dict[str, list[str]] = {}
    for it in items:
        if it["severity"] != "quarantine":
            continue
        it["kwargs"].setdefault("mostly", round(1.0 - maxq, 6))
        it["n_quarantined"] = 0
        for rel, values in it["unexpected"]:
            if it["expectation"] == "ExpectColumnValuesToBeUnique":
                sha = next(iter(values.values()), None)
                keep = first_of.get(sha) if it["kwargs"].get("column") == "sha256" else None
                if keep == rel:
                    continue  # the first copy trains
                reason = f"{it['name']}: duplicate of {keep}" if keep else _row_reason(it, values, None)
            else:
                reason = _row_reason(it, values, errors.get(rel))
            bad.setdefault(rel, []).append(reason)
            it["n_quarantined"] += 1
    usable = df[~df["relpath"].isin(bad)]
    items_usable = run_expectations(usable, suite.get("usable") or [])
    items += items_usable
    if isinstance(prev, str):
        items += [_skipped(d, prev) for d in suite.get("drift") or []]
    elif prev is not None and len(usable):
        specs, skipped = _drift_specs(suite, prev)
        drift = run_expectations(usable, specs)
        for it, spec in zip(drift, specs):
            it["note"] = spec["note"]
        items += drift + skipped
    reasons, status = [], "pass"
    for it in items:
        if it["success"] is None:
            continue
        if it["severity"] == "quarantine":
            n_bad = it["n_quarantined"]
            if not it["success"]:
                reasons.append(_reason(it, "fail"))
                status = "fail"
            elif n_bad:
                reasons.append(_reason(it, "warn"))
                status = "warn" if status == "pass" else status
        elif not it["success"]:
            reasons.append(_reason(it, it["severity"]))
            if it["severity"] == "fail":
                status = "fail"
            elif status == "pass":
                status = "warn"
    quarantined = [(rel, "; ".join(rs)) for rel, rs in sorted(bad.items())]
    return status, reasons, quarantined, items, usable


GATE_CACHE_VERSION = 1  # bump when _judge's logic changes: cached verdicts of older code are then ignored


def _verdict_key(md5: str, prev_key: str | None, suite: Mapping[str, Any]) -> str:
    """Everything a verdict depends on: the manifest (its md5), the drift reference, the suite, the code."""
    from importlib.metadata import version

    blob = json.dumps([GATE_CACHE_VERSION, version("great_expectations"), md5, prev_key, _plain(suite)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _judge_cached(df: pd.DataFrame, md5: str, suite: Mapping[str, Any], prev: pd.DataFrame | str | None,
                  prev_key: str | None, cache_dir: Path | None) -> tuple[str, list[str], list, list[dict], int, tuple]:
    """:func:`_judge`, or its stored verdict when the manifest, drift reference and suite are unchanged.

    A site's data rarely changes between rounds, and Great Expectations takes ~0.4 s a site; the
    verdict of the same inputs is the same, so it is kept (one file, the latest) in the site's work dir.
    """
    key = _verdict_key(md5, prev_key, suite) if cache_dir is not None and prev_key != "unknown" else None
    path = cache_dir / f"verdict-{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            v = json.loads(path.read_text())
            return (v["status"], list(v["reasons"]), [tuple(q) for q in v["quarantined"]], list(v["items"]),
                    int(v["n_images"]), tuple(tuple(x) for x in v["splits"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    status, reasons, quarantined, items, usable = _judge(df, suite, prev)
    splits = tuple((str(k), int(v)) for k, v in sorted(usable["split"].fillna("").value_counts().items()))
    items = [_plain(it) for it in items]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob("verdict-*.json"):
            old.unlink(missing_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "reasons": reasons, "quarantined": quarantined, "items": items,
                                   "n_images": int(len(usable)), "splits": splits}, default=str))
        os.replace(tmp, path)
    return status, reasons, quarantined, items, int(len(usable)), splits


def _check_frame(df: pd.DataFrame, manifest: Path, md5: str, suite_arg: str | Path | None,
                 prev: pd.DataFrame | str | None, report: str | Path | None, problems: Sequence[str], *,
                 prev_key: str | None = "unknown", cache_dir: Path | None = None) -> GateResult:
    site = str(df["site"].dropna().iloc[0]) if len(df) and df["site"].notna().any() else manifest.stem
    suite = load_suite(suite_arg, site)
    status, reasons, quarantined, items, n_usable, splits = _judge_cached(df, md5, suite, prev, prev_key, cache_dir)
    gate = GateResult(
        site=site, status=status, reasons=tuple(reasons), quarantined=tuple(quarantined),
        n_images=n_usable, manifest_path=str(manifest), manifest_md5=md5,
        report_path=str(report) if report else None,
        expectations=tuple(items), n_total=int(len(df)), suite=suite["name"],
        problems=tuple(problems), splits=splits,
    )
    if report:
        write_report(gate, report)
    return gate


def _failed_gate(manifest: Path, site: str, reason: str, report: str | Path | None) -> GateResult:
    gate = GateResult(site=site, status="fail", reasons=(f"[fail] manifest: {reason}",), quarantined=(),
                      n_images=0, manifest_path=str(manifest), manifest_md5="",
                      report_path=str(report) if report else None, expectations=())
    if report:
        write_report(gate, report)
    return gate


def check_manifest(manifest: str | Path, *, suite: str | Path | None = None, previous: str | Path | None = None,
                   report: str | Path | None = None) -> GateResult:
    """Run the suite on ``manifest`` (drift against ``previous`` when given); write a Markdown
    ``report`` when asked. An unreadable manifest is a failed gate, not an exception."""
    manifest = Path(manifest)
    try:
        df = read_manifest(manifest)
    except ManifestError as e:  # the message names the manifest by its file name only
        return _failed_gate(manifest, manifest.stem, str(e).replace(str(manifest), manifest.name), report)
    return _check_frame(df, manifest, manifest_md5(manifest), suite, _read_previous(previous), report, ())


def _read_previous(previous: str | Path | None) -> pd.DataFrame | str | None:
    """The drift reference, or why there is none (reported as skipped drift checks)."""
    if previous is None:
        return None
    try:
        return read_manifest(previous)
    except ManifestError as e:
        return f"previous manifest unusable ({e})"


def check_site(root: str | Path, site_id: str, *, manifest_out: str | Path, previous: str | Path | None = None,
               suite: str | Path | None = None, report: str | Path | None = None,
               workers: int | None = None, cache_dir: str | Path | None = None) -> GateResult:
    """Scan the site, write its manifest (the DVC-tracked data version) and gate it.

    ``previous`` defaults to the manifest already at ``manifest_out`` (the last round's):
    its stat cache makes the scan incremental and its statistics are the drift reference.
    With ``cache_dir`` an unchanged manifest, reference and suite reuse the last verdict.
    """
    manifest_out = Path(manifest_out)
    prev_path = Path(previous) if previous else (manifest_out if manifest_out.is_file() else None)
    prev_df = _read_previous(prev_path)  # read before it is overwritten
    prev_key = manifest_md5(prev_path) if prev_path is not None and not isinstance(prev_df, str) else None
    # The stat cache lives next to the manifest it was written with; callers that move the
    # last manifest aside (to keep it as the drift reference) leave it at manifest_out.
    cache_from = manifest_out if stat_cache_path(manifest_out).is_file() else prev_path
    result = scan_site(root, site_id, previous=cache_from, workers=workers)
    md5 = write_manifest(result, manifest_out)
    df = read_manifest(manifest_out)  # judge exactly what was versioned
    row_problems = set(f"{r}: {e}" for r, e in zip(df["relpath"], df["error"]) if e)
    scan_level = [p for p in result.problems if p not in row_problems]
    return _check_frame(df, manifest_out, md5, suite, prev_df, report, scan_level, prev_key=prev_key,
                        cache_dir=Path(cache_dir) if cache_dir is not None else None)


# ----------------------------------------------------------------------------------------------
# Outputs

def gate_metrics(gate: GateResult) -> dict[str, Any]:
    """Flat numbers for ``dvc metrics`` / MLflow."""
    failed = [e for e in gate.expectations if e.get("success") is False]
    return {
        "status": gate.status, "status_code": STATUS_CODE[gate.status], "n_total": gate.n_total,
        "n_images": gate.n_images, "n_quarantined": len(gate.quarantined),
        "n_expectations": len(gate.expectations), "n_unmet": len(failed),
        "manifest_md5": gate.manifest_md5,
    }


def _observed_text(obs: Any, names: bool = True) -> str:
    if isinstance(obs, Mapping) and "unexpected_count" in obs:
        text = (f"{obs['unexpected_count']} of {obs.get('element_count', '?')} unexpected "
                f"({obs.get('unexpected_percent') or 0.0:.1f}%)")
        examples = (obs.get("partial_unexpected_list") or []) if names else []  # values may be file names
        return text + (f", e.g. {', '.join(_fmt(v) for v in examples)}" if examples else "")
    if isinstance(obs, float):
        return _fmt(obs)
    return json.dumps(obs) if isinstance(obs, (dict, list)) else str(obs)


def quarantine_counts(quarantined: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Images quarantined per check: a file's reasons are joined by "; ", each counts once."""
    out: dict[str, int] = {}
    for _, why in quarantined:
        for kind in {reason_kind(r) for r in why.split("; ")}:
            out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _md_cell(x: Any) -> str:
    text = json.dumps(x) if isinstance(x, (dict, list)) else str(x)
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(gate: GateResult, *, names: bool = True) -> str:
    """Markdown report: outcome, reasons, every expectation with GX's observed value,
    quarantined images and scan problems. Files are named relative to the site folder, the
    manifest by its file name only; ``names=False`` leaves every file name out (counts by
    reason instead): the report a federation site sends its coordinator, since hospital file
    names often carry patient or accession numbers."""
    lines = [f"# Data quality: site `{gate.site}` - {gate.status.upper()}", "",
             f"- manifest: `{Path(gate.manifest_path).name}` (md5 `{gate.manifest_md5 or 'n/a'}`)",
             f"- suite: `{gate.suite or 'n/a'}`",
             f"- images: {gate.n_total} listed, {gate.n_images} may train, {len(gate.quarantined)} quarantined",
             "- usable by split: " + (", ".join(f"{k} {v}" for k, v in gate.splits) or "none"), ""]
    reasons = [r if names else without_names(r) for r in gate.reasons]
    lines += ["## Reasons", ""] + ([f"- {r}" for r in reasons] or ["- none: every expectation met"]) + [""]
    if gate.expectations:
        lines += ["## Expectations (Great Expectations)", "",
                  "| name | expectation | severity | met | observed |", "|---|---|---|---|---|"]
        for e in gate.expectations:
            met = {True: "yes", False: "NO", None: "skipped"}[e.get("success")]
            lines.append(f"| {e['name']} | {e['expectation']} | {e['severity']} | {met} | "
                         f"{_md_cell(_observed_text(e.get('observed'), names))} |")
        lines.append("")
    if gate.quarantined and names:
        lines += ["## Quarantined images", "", "| image | reason |", "|---|---|"]
        lines += [f"| `{_md_cell(r)}` | {_md_cell(why)} |" for r, why in gate.quarantined] + [""]
    elif gate.quarantined:
        lines += ["## Quarantined images (names kept at the site)", "", "| check | images |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {n} |" for k, n in quarantine_counts(gate.quarantined).items()] + [""]
    if gate.problems and names:
        lines += ["## Scan problems", ""] + [f"- {_md_cell(p)}" for p in gate.problems] + [""]
    elif gate.problems:
        lines += ["## Scan problems", "", f"- {len(gate.problems)} (named in the site's own report)", ""]
    return "\n".join(lines)


def write_report(gate: GateResult, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_report(gate), encoding="utf-8")
    return p
