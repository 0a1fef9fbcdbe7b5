"""Import the JSON lines of bench/gpu_protocol.py into the results store, as MLflow runs ``ultrafed report`` reads.

The lent GPU machine has no MLflow: ``bench/gpu_protocol.py`` writes one JSON object per result
(``kind``, ``variant``, ``task``, ``seed``, ``status``, ``preset``, ``device``, ``wall_s``, ``command``,
``error``, ``metrics``, ``params`` and, for pretraining, ``curve``). Each line becomes one
``ultrafed.kind=result`` run with the same tags as ``bench/run_protocol.py`` logs, plus
``ultrafed.protocol``, ``ultrafed.device``, ``ultrafed.error`` (when there is one) and
``ultrafed.import_key`` (sha256 of the line); a pretraining line with a curve also becomes one
``ultrafed.kind=pretraining`` run whose ``train_loss`` / ``global_val_loss`` histories have
step = round. Importing the same file again adds nothing: keys already in the store are skipped.

    .venv/bin/python bench/import_results.py gpu-results.jsonl
    .venv/bin/ultrafed report --out docs/RESULTS.md

A baseline's preset names its own model (``resnet18@128px``); its protocol is the preset of the
file's encoder runs (or ``--protocol``, or a ``protocol`` field on the line).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ultrafed.paths import RESULTS_TRACKING_URI
from ultrafed.protocol import EXPERIMENT, JOB_TASK, PRETRAIN_TASK, RESULT_KIND, RUN_STATUS, STATUSES
from ultrafed.protocol import TASKS as FINETUNE_TASKS

# JOB_TASK ("all"): a whole job of bench/gpu_protocol.py that was stopped or never started (its steps did not run)
TASKS = (PRETRAIN_TASK, *FINETUNE_TASKS, JOB_TASK)
CURVE_METRICS = ("train_loss", "global_val_loss")


class BadLine(ValueError):
    """A line that is not a result object of bench/gpu_protocol.py (the message says what is wrong)."""


@dataclass
class Line:
    """One parsed result line, with where it came from."""
    number: int
    key: str
    obj: dict[str, Any]
    protocol: str = ""


@dataclass
class Summary:
    imported: int = 0
    duplicates: int = 0
    bad: list[str] = field(default_factory=list)


def _need(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    v = obj.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadLine(f"field '{name}' missing or not {getattr(kind, '__name__', kind)}")
    return v


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadLine(f"{name} is {v!r}, not a number")
    return float(v)


def parse_line(text: str) -> dict[str, Any]:
    """The checked object of one line; raises BadLine naming the first problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    if obj.get("kind") != RESULT_KIND:
        raise BadLine(f"kind is {obj.get('kind')!r}, not '{RESULT_KIND}'")
    for name in ("variant", "task", "preset", "command"):
        _need(obj, name, str)
    if obj["task"] not in TASKS:
        raise BadLine(f"task '{obj['task']}' is not one of {', '.join(TASKS)}")
    _need(obj, "seed", int)
    if obj.get("status") not in STATUSES:
        raise BadLine(f"status is {obj.get('status')!r}, not one of {', '.join(STATUSES)}")
    _number("wall_s", obj.get("wall_s"))
    for name in ("metrics", "params"):
        if not isinstance(obj.get(name, {}), dict):
            raise BadLine(f"field '{name}' is not an object")
    for k, v in obj.get("metrics", {}).items():
        if v is not None:  # a metric the run could not compute is left out, not a bad line
            _number(f"metric '{k}'", v)
    curve = obj.get("curve") or []
    if not isinstance(curve, list) or not all(isinstance(p, dict) and isinstance(p.get("round"), int) for p in curve):
        raise BadLine("field 'curve' is not a list of objects with an integer 'round'")
    for p in curve:
        for m in CURVE_METRICS:
            if m in p and p[m] is not None:
                _number(f"curve round {p['round']} {m}", p[m])
    for name in ("device", "error", "protocol"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise BadLine(f"field '{name}' is not a string")
    return obj


def read_lines(path: Path, summary: Summary) -> list[Line]:
    """Every well-formed line of ``path``; each bad one is added to ``summary.bad`` as ``path:N: problem``."""
    out: list[Line] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, raw in enumerate(fh, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                obj = parse_line(text)
            except BadLine as e:
                summary.bad.append(f"{path}:{n}: {e}")
                continue
            out.append(Line(n, hashlib.sha256(text.encode("utf-8")).hexdigest(), obj))
    return out


def assign_protocols(path: Path, lines: list[Line], summary: Summary, default: str | None) -> list[Line]:
    """Give every line its protocol: its own ``protocol`` field, else ``default`` (``--protocol``), else its preset
    for encoder runs (and for baselines whose preset is an encoder preset of the file), else the file's one encoder
    preset for baselines with a model preset (``resnet18@128px``); a baseline with none of these is a bad line."""
    encoder_presets = {ln.obj["preset"] for ln in lines if not ln.obj["variant"].startswith("baseline-")}
    keep = []
    for ln in lines:
        o = ln.obj
        if o.get("protocol") or default:
            ln.protocol = o.get("protocol") or default  # type: ignore[assignment]
        elif not o["variant"].startswith("baseline-") or o["preset"] in encoder_presets:
            ln.protocol = o["preset"]   # bench/gpu_protocol.py gives its baselines the protocol's preset
        elif len(encoder_presets) == 1:
            ln.protocol = next(iter(encoder_presets))
        else:
            summary.bad.append(f"{path}:{ln.number}: baseline {o['variant']} belongs to no single protocol (encoder "
                               f"presets in the file: {', '.join(sorted(encoder_presets)) or 'none'}); pass --protocol")
            continue
        keep.append(ln)
    return keep


def existing_keys(client, exp_id: str) -> set[tuple[str, str]]:
    """``(import_key, kind)`` of every imported run already in the experiment."""
    keys: set[tuple[str, str]] = set()
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string="tags.`ultrafed.import_key` LIKE '%'", max_results=1000,
                                  page_token=token)
        keys |= {(r.data.tags["ultrafed.import_key"], r.data.tags.get("ultrafed.kind", "")) for r in page}
        token = page.token
        if not token:
            return keys


def _tags(ln: Line, kind: str, source: str) -> dict[str, str]:
    o = ln.obj
    tags = {"ultrafed.kind": kind, "ultrafed.variant": o["variant"], "ultrafed.seed": str(o["seed"]),
            "ultrafed.preset": o["preset"], "ultrafed.protocol": ln.protocol, "ultrafed.wall_s": f"{float(o['wall_s']):.1f}",
            "ultrafed.command": o["command"], "ultrafed.device": o.get("device") or "",
            "ultrafed.import_key": ln.key, "ultrafed.imported_from": f"{source}:{ln.number}"}
    if kind == "result":
        tags.update({"ultrafed.task": o["task"], "ultrafed.status": o["status"]})
        if o.get("error"):
            tags["ultrafed.error"] = o["error"][:1000]
    return tags


def _key(name: Any) -> str:
    """A metric/param name MLflow accepts (it refuses the whole batch over one odd character)."""
    return re.sub(r"[^\w\-./ ]", "_", str(name))[:250] or "_"


def _log(client, run_id: str, metrics: Iterable[tuple[str, float, int]], params: dict[str, Any]) -> None:
    """Metrics ``(key, value, step)`` (finite ones only) and params in batches."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ms = [Metric(_key(k), float(v), now + i, int(step)) for i, (k, v, step) in enumerate(metrics)
          if v is not None and math.isfinite(v)]
    ps = [Param(_key(k), str(v)[:500]) for k, v in params.items()]
    for i in range(0, max(len(ms), len(ps)), 100):
        client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])


def import_line(client, exp_id: str, ln: Line, have: set[tuple[str, str]], source: str) -> bool:
    """Log the result run (and the pretraining curve run) of one line unless already there; True if anything new."""
    o, new = ln.obj, False
    if (ln.key, "result") not in have:
        rid = client.create_run(exp_id, run_name=f"result-{o['variant']}-{o['task']}-s{o['seed']}",
                                tags=_tags(ln, "result", source)).info.run_id
        metrics = {**o.get("metrics", {}), "wall_s": float(o["wall_s"])}
        _log(client, rid, ((k, v, 0) for k, v in metrics.items()), o.get("params", {}))
        client.set_terminated(rid, RUN_STATUS[o["status"]])
        have.add((ln.key, "result"))
        new = True
    curve = o.get("curve") or []
    if o["task"] == "pretrain" and curve and (ln.key, "pretraining") not in have:
        rid = client.create_run(exp_id, run_name=f"pretrain-{o['variant']}-s{o['seed']}",
                                tags=_tags(ln, "pretraining", source)).info.run_id
        pts = [(m, p[m], p["round"]) for p in sorted(curve, key=lambda p: p["round"]) for m in CURVE_METRICS
               if p.get(m) is not None]
        _log(client, rid, pts, {})
        client.set_terminated(rid, RUN_STATUS[o["status"]])
        have.add((ln.key, "pretraining"))
        new = True
    return new


def import_file(path: Path, tracking_uri: str, experiment: str, protocol: str | None = None) -> Summary:
    """Import every good line of ``path``; bad lines are listed in the summary, not raised."""
    from mlflow import MlflowClient

    from ultrafed.tracking.runs import configure_tracking, ensure_experiment

    summary = Summary()
    lines = assign_protocols(path, read_lines(path, summary), summary, protocol)
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(uri)
    exp_id = ensure_experiment(experiment)
    have = existing_keys(client, exp_id)
    for ln in lines:
        if import_line(client, exp_id, ln, have, path.name):
            summary.imported += 1
        else:
            summary.duplicates += 1
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, help="JSON lines written by bench/gpu_protocol.py")
    ap.add_argument("--tracking-uri", default=RESULTS_TRACKING_URI,
                    help="MLflow store (default: the one of bench/run_protocol.py)")
    ap.add_argument("--experiment", default=EXPERIMENT)
    ap.add_argument("--protocol", default=None,
                    help="protocol of every line (default: the preset of the file's encoder runs)")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        print(f"import_results: {args.file}: no such file", file=sys.stderr)
        return 1
    s = import_file(args.file, args.tracking_uri, args.experiment, args.protocol)
    for msg in s.bad:
        print(f"import_results: {msg}", file=sys.stderr)
    print(f"import_results: {args.file}: imported {s.imported}, skipped {s.duplicates} duplicates, "
          f"{len(s.bad)} bad lines")
    return 1 if s.bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
