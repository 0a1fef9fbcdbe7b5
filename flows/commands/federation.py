"""``ultrafed federation up|down|status``: a real federation rehearsal on 127.0.0.1."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federation", help="start/stop a local federation (Prefect server, MLflow server, site workers)")
    fsub = p.add_subparsers(dest="federation_command", required=True)
    up = fsub.add_parser("up", help="start servers and one worker per site on 127.0.0.1")
    up.add_argument("--sites", type=int, default=2, help="number of synthetic sites (default 2)")
    up.add_argument("--data", help="use busi/ddti/hc18 of this real data folder as the sites instead")
    up.set_defaults(func=run_up)
    fsub.add_parser("down", help="stop everything by PID").set_defaults(func=run_down)
    fsub.add_parser("status", help="show what runs").set_defaults(func=run_status)


def run_up(args: argparse.Namespace) -> int:
    from flows import federation
    from flows.commands.common import load_cfg, resolve_sites

    if args.sites < 1:
        print(f"ultrafed federation up: --sites must be >= 1, got {args.sites}", file=sys.stderr)
        return 2
    cfg = load_cfg(argparse.Namespace(params=args.params, set=[]))
    _, sites = resolve_sites(argparse.Namespace(sites=None, data=args.data), cfg)
    sites = sites if args.data else sites[: args.sites]
    if args.sites > len(sites) and not args.data:
        print(f"note: the cohort has {len(sites)} site(s); raise synth.sites for more")
    print("starting Prefect server, MLflow server and workers for: " + ", ".join(s["id"] for s in sites))
    info = federation.up({s["id"]: s["root"] for s in sites})
    sites_file = federation.state_dir() / "sites.yaml"
    sites_file.write_text("mode: federation\nsites:\n" + "".join(f"  - id: {s}\n" for s in info["sites"]))
    print(json.dumps({k: info[k] for k in ("prefect_api_url", "mlflow_tracking_uri", "pids")}, indent=2))
    print(f"run rounds with:  ultrafed pretrain --sites {sites_file}\nstop with:        ultrafed federation down")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from flows import federation

    stopped = federation.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from flows import federation

    st = federation.status()
    if st["info"] is None:
        print("no federation is up")
        return 1
    for name, pid in st["info"]["pids"].items():
        print(f"{name:<20} pid {pid:<8} {'running' if name in st['running'] else 'STOPPED'}")
    print(f"prefect: {st['info']['prefect_api_url']}\nmlflow:  {st['info']['mlflow_tracking_uri']}")
    return 0 if len(st["running"]) == len(st["info"]["pids"]) else 1
