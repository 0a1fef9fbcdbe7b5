"""``ultrafed models | lineage | promote``: the Model Registry for engineers and auditors."""
from __future__ import annotations

import argparse
import json
import sys


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else params tracking.tracking_uri)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model versions, aliases and key metrics")
    p.add_argument("name", nargs="?", help="one registered model (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _tracking(p)
    p.set_defaults(func=run_models)

    p = sub.add_parser("lineage", help="how a registered version came to be, back to round 0",
                       description="Print the chain from a fine-tuned or encoder version back to its first round.")
    p.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="recompute manifest md5s (where reachable) and artifact sha256s; exit 1 on any mismatch")
    _tracking(p)
    p.set_defaults(func=run_lineage)

    p = sub.add_parser("promote", help="point an alias at a version if the promotion gates hold",
                       description="Gates come from mlflow/registry.yaml: metric thresholds, complete lineage, "
                                   "every participating site passed its checks, artifact checksums.")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="production")
    p.add_argument("--reason", required=True, help="why (recorded on the version)")
    p.add_argument("--by", default=None, help="who (default: user@host)")
    p.add_argument("--gates", default=None, help="gates file (default: mlflow/registry.yaml)")
    p.add_argument("--dry-run", action="store_true", help="evaluate the gates only")
    _tracking(p)
    p.set_defaults(func=run_promote)


def _configure(args: argparse.Namespace) -> str:
    from flows.commands.common import tracking_uri
    from ultrafed.tracking.runs import configure_tracking

    return configure_tracking(tracking_uri(args))


def _fmt_metrics(m: dict, limit: int = 4) -> str:
    keys = sorted(m, key=lambda k: (("val" not in k), k))[:limit]
    return " ".join(f"{k}={m[k]:.4g}" for k in keys)


def run_models(args: argparse.Namespace) -> int:
    from ultrafed.tracking.registry import list_versions

    _configure(args)
    rows = list_versions(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no registered models" + (f" named {args.name}" if args.name else ""))
        return 1 if args.name else 0
    print(f"{'model':<22} {'ver':>4} {'aliases':<14} {'kind':<8} {'round':>5} {'from':<24} {'created':<20} metrics")
    for r in rows:
        origin = r["encoder"] or (f"v{r['parent']}" if r["parent"] else "-")
        print(f"{r['name']:<22} {r['version']:>4} {','.join(r['aliases']) or '-':<14} {r['kind']:<8} "
              f"{r['round'] or '-':>5} {origin:<24} {r['created'][:19]:<20} {_fmt_metrics(r['metrics'])}")
    return 0


def _print_link(d: dict) -> None:
    lin = d["lineage"] or {}
    head = f"{d['name']} v{d['version']}" + (f" @{','.join(d['aliases'])}" if d["aliases"] else "")
    if lin.get("kind") == "task":
        print(f"{head}  task model '{lin.get('task') or '?'}' fine-tuned from {lin.get('encoder_uri')}")
    else:
        print(f"{head}  round {lin.get('round')}  parent {('v' + str(lin['parent_version'])) if lin.get('parent_version') is not None else '-'}"
              f"  strategy {lin.get('strategy')} {json.dumps(lin.get('strategy_params') or {})}")
        for s in lin.get("sites", []):
            print(f"    site {s['site']:<12} n={s['n_images']:<6} weight={s['weight']:.4f} gate={s['gate_status']:<7}"
                  f" manifest md5={s['manifest_md5']}  {_fmt_metrics(s.get('metrics') or {}, 3)}")
            for reason in s.get("gate_reasons") or []:
                print(f"        {reason}")
        for site, reason in (lin.get("excluded") or {}).items():
            print(f"    excluded {site}: {reason}")
    print(f"    metrics: {_fmt_metrics(lin.get('metrics') or {}, 6) or '-'}")
    print(f"    commit {lin.get('code_commit')}  params {str(lin.get('params_hash'))[:12]}  run {lin.get('run_id')}"
          f"  weights sha256 {str(lin.get('weights_sha256'))[:12]}")
    for p in d["problems"]:
        print(f"    INCOMPLETE: {p}")


def run_lineage(args: argparse.Namespace) -> int:
    from ultrafed.tracking.lineage import chain, chain_problems, verify_links

    _configure(args)
    try:
        links = chain(args.model_uri)
    except Exception as e:  # noqa: BLE001 - one clear line for a bad URI / unknown model
        print(f"ultrafed lineage: {args.model_uri}: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    problems = chain_problems(links)
    checks = verify_links(links) if args.verify else []
    failed = [c for c in checks if c.failed]
    if args.json:
        out = {"model_uri": args.model_uri, "chain": [link.to_dict() for link in links], "problems": problems}
        if args.verify:
            out["verify"] = [c.__dict__ for c in checks]
            out["verified"] = not failed
        print(json.dumps(out, indent=2))
    else:
        for link in links:
            _print_link(link.to_dict())
        if problems:
            print(f"lineage INCOMPLETE: {len(problems)} problem(s)")
        if args.verify:
            skipped = [c for c in checks if c.status == "skipped"]
            for c in failed:
                print(f"MISMATCH {c.version}: {c.what}: {c.detail}")
            for c in skipped:
                print(f"skipped  {c.version}: {c.what}: {c.detail}")
            ok = sum(c.status == "ok" for c in checks)
            print(f"verify: {ok} ok, {len(failed)} failed, {len(skipped)} not reachable here -> "
                  f"{'FAILED' if failed else 'OK'}")
    return 1 if failed else 0


def run_promote(args: argparse.Namespace) -> int:
    from ultrafed.tracking.promotion import PromotionRefused, evaluate_gates, load_gates, promote

    _configure(args)
    try:
        if args.dry_run:
            results = evaluate_gates(args.name, args.version, load_gates(args.name, args.gates))
        else:
            results = promote(args.name, args.version, args.alias, reason=args.reason, by=args.by,
                              gates_path=args.gates)
    except PromotionRefused as e:
        for r in e.results:
            print(f"  {'ok  ' if r.passed else 'FAIL'} {r.gate}: {r.detail}")
        print(f"ultrafed promote: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - unknown model/version, bad gates file: one line
        print(f"ultrafed promote: {args.name} v{args.version}: {(str(e).splitlines() or [type(e).__name__])[0]}",
              file=sys.stderr)
        return 2
    for r in results:
        print(f"  {'ok  ' if r.passed else 'FAIL'} {r.gate}: {r.detail}")
    if args.dry_run:
        print("dry run: " + ("all gates hold" if all(r.passed for r in results) else "gates do NOT hold"))
        return 0 if all(r.passed for r in results) else 1
    print(f"{args.name}@{args.alias} -> v{args.version} (models:/{args.name}@{args.alias})")
    return 0
