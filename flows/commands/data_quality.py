"""``ultrafed data scan`` and ``ultrafed data check``: site manifests and the quality gate.

``scan`` writes a site's manifest (one row per image, no pixels) and prints its md5, the site's
data version. ``check`` runs the site's Great Expectations suite on a manifest: exit 0 on pass
or warn, 1 on fail, one line per unmet expectation (and per quarantined image).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(dsub: argparse._SubParsersAction) -> None:
    s = dsub.add_parser("scan", help="write a site's manifest (hashes and stats of its images, no pixels)",
                        description="Scan a site folder into a manifest CSV; incremental by default "
                                    "(files unchanged since the last scan of --out are not re-read).")
    s.add_argument("--site", required=True, help="site id recorded in the manifest")
    s.add_argument("--root", required=True, help="site folder (images/, masks/, labels.csv) or a flat folder")
    s.add_argument("--out", required=True, help="manifest CSV to write, e.g. manifests/<site>.csv")
    s.add_argument("--previous", default=None, help="earlier manifest to reuse unchanged files from "
                                                    "(default: --out itself)")
    s.add_argument("--full", action="store_true", help="re-read every file (ignore the stat cache)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU cores)")
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.set_defaults(func=run_scan)

    c = dsub.add_parser("check", help="run the site's Great Expectations suite on a manifest",
                        description="Exit 0 on pass or warn, 1 on fail; prints one line per unmet "
                                    "expectation and per quarantined image.")
    c.add_argument("--manifest", required=True, help="manifest CSV written by `ultrafed data scan`")
    c.add_argument("--report", default=None, help="write a Markdown report here")
    c.add_argument("--suite", default=None, help="suite name (default, busi, ddti, hc18) or YAML/JSON file "
                                                 "(default: the site's own suite, else default)")
    c.add_argument("--previous", default=None, help="the site's previous manifest: drift reference")
    c.add_argument("--metrics", default=None, help="write gate metrics (JSON) here, e.g. for `dvc metrics`")
    c.add_argument("--json", dest="json_out", default=None, help="write the full gate result (JSON) here")
    c.add_argument("--exit-zero", action="store_true", help="exit 0 even when the site fails "
                                                            "(pipelines that record the outcome)")
    c.set_defaults(func=run_check)


def run_scan(args: argparse.Namespace) -> int:
    import time

    from ultrafed.data.manifest import scan_site, write_manifest

    root = Path(args.root)
    if not root.is_dir():
        print(f"ultrafed data scan: {root}: site folder not found", file=sys.stderr)
        return 1
    previous = None if args.full else (args.previous or args.out)
    t0 = time.perf_counter()
    result = scan_site(root, args.site, previous=previous, workers=args.workers, progress=args.progress)
    md5 = write_manifest(result, args.out)
    seconds = time.perf_counter() - t0
    for line in result.problems:
        print(f"{args.site}: {line}", file=sys.stderr)
    n = len(result.rows)
    print(f"{args.site}: {n} images ({result.n_reused} unchanged, {n - result.n_reused} read) "
          f"in {seconds:.1f}s, {len(result.problems)} problems -> {args.out} (md5 {md5})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ultrafed.data.quality import SuiteError, check_manifest, gate_metrics

    try:
        gate = check_manifest(args.manifest, suite=args.suite, previous=args.previous, report=args.report)
    except SuiteError as e:
        print(f"ultrafed data check: {e}", file=sys.stderr)
        return 2
    print(f"{gate.site}: {gate.status.upper()} ({gate.n_images} of {gate.n_total} images may train, "
          f"{len(gate.quarantined)} quarantined; suite {gate.suite or 'n/a'}; "
          f"manifest md5 {gate.manifest_md5 or 'n/a'})")
    for line in gate.reasons:
        print(line)
    for rel, why in gate.quarantined:
        print(f"quarantined {rel}: {why}")
    for path, data in ((args.metrics, gate_metrics(gate)), (args.json_out, gate.to_dict())):
        if path:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if args.report:
        print(f"report: {args.report}")
    return 1 if gate.status == "fail" and not args.exit_zero else 0
