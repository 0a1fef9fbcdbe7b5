"""What a site does in a round: check its data, train on it, validate a global model.

These run AT the site (in embedded mode: in-process; in federation mode: inside the site's
Prefect worker). They take the site's data root from the caller or the worker's environment
and return only small JSON-able dicts — counts, metrics, hashes and artifact URIs — so
neither a path nor a pixel ever reaches the coordinator.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ultrafed.config import Config, from_dict
from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ultrafed.federated.seeds import derive_seed

SITE_ROOT_ENV = "ULTRAFED_SITE_ROOT"
SITE_WORKDIR_ENV = "ULTRAFED_SITE_WORKDIR"
PRETRAIN_SPLITS = ("train", "unlabeled")  # never val/test: those are for choosing and reporting

if TYPE_CHECKING:
    from ultrafed.federated.round import StateStore


def default_store() -> "StateStore":
    """Weights through MLflow artifacts: what both modes use between processes."""
    from ultrafed.tracking.round_tracking import MlflowStateStore

    return MlflowStateStore()


class SiteError(RuntimeError):
    """A site cannot take part (no data, bad global model); the message is one line."""


def default_work_dir(site_id: str) -> Path:
    """``$ULTRAFED_HOME/sites/<id>`` (embedded default): never inside the data folder, which may be read-only."""
    from ultrafed.paths import ultrafed_home

    return ultrafed_home() / "sites" / site_id


def site_paths(site_id: str, root: str | Path | None, work_dir: str | Path | None) -> tuple[Path, Path]:
    """Resolve the site's data root and private work dir (explicit args, else the worker's env)."""
    root = root or os.environ.get(SITE_ROOT_ENV)
    if not root:
        raise SiteError(f"site {site_id}: no data root (pass one or set ${SITE_ROOT_ENV} in the worker)")
    work = Path(work_dir or os.environ.get(SITE_WORKDIR_ENV) or default_work_dir(site_id))
    work.mkdir(parents=True, exist_ok=True)
    return Path(root), work


def _config(cfg: Config | Mapping[str, Any]) -> Config:
    return cfg if isinstance(cfg, Config) else from_dict(cfg)


def site_manifest_path(site_id: str, root: str | Path | None, work_dir: str | Path | None) -> Path:
    _, work = site_paths(site_id, root, work_dir)
    return work / "manifests" / f"{site_id}.csv"


# -- check ---------------------------------------------------------------------------------
def site_check(site_id: str, root: str | Path | None = None, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Scan + Great Expectations gate; keeps the quarantine list at the site for training."""
    from ultrafed.data.quality import check_site, quarantine_counts, render_report

    root, work = site_paths(site_id, root, work_dir)
    manifest = site_manifest_path(site_id, root, work)
    previous = work / "manifests" / f"{site_id}.previous.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    if manifest.exists():
        os.replace(manifest, previous)  # drift is measured against the last checked version
    report = work / "reports" / f"{site_id}-quality.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    gate = check_site(root, site_id, manifest_out=manifest, previous=previous if previous.exists() else None,
                      report=report, cache_dir=work / "gate-cache")
    (work / "quarantine.json").write_text(json.dumps([list(q) for q in gate.quarantined]))
    return {
        "site": site_id,
        "status": gate.status,
        "reasons": list(gate.reasons),
        "n_images": gate.n_images,
        "n_quarantined": len(gate.quarantined),
        "quarantined": [f"{p}: {r}" for p, r in gate.quarantined],
        "problems": list(gate.problems),  # site-relative: refused files, format notes, unreadable folders
        "manifest_md5": gate.manifest_md5,
        "report_md": report.read_text() if report.exists() else "",
        "report_md_shared": render_report(gate, names=False),  # what a federation site sends (no file names)
        "quarantine_by_check": quarantine_counts(gate.quarantined),
        "n_problems": len(gate.problems),
    }


def _training_records(site_id: str, root: Path, work: Path) -> list:
    from ultrafed.data.sites import load_site

    site = load_site(root, site_id)
    bad: set[str] = set()
    qfile = work / "quarantine.json"
    if qfile.exists():
        bad = {str(Path(p)) for p, _ in json.loads(qfile.read_text())}
    recs = [r for r in site.select(PRETRAIN_SPLITS) if r.relpath not in bad]
    if not recs:
        raise SiteError(f"site {site_id}: no trainable images after the quality gate")
    return recs


# The last AdamW state each site of this process wrote, by file: in embedded mode the next round
# takes it from memory instead of reading the file back. The file is still written (a resumed
# or separate process reads it); an entry is taken out when used, so a retried action reads
# the file, not a state a failed attempt already stepped.
_OPTIMIZER_STATES: dict[Path, dict] = {}
_OPTIMIZER_LOCK = threading.Lock()


def _keep_optimizer_state(path: Path, state: dict) -> None:
    save_checkpoint(path, {"optimizer": state})
    with _OPTIMIZER_LOCK:
        for old in [p for p in _OPTIMIZER_STATES if p.parent == path.parent]:
            del _OPTIMIZER_STATES[old]
        _OPTIMIZER_STATES[path] = state


def _take_optimizer_state(path: Path) -> dict | None:
    """The state saved at ``path`` (memory first, else the file), or None for a fresh AdamW."""
    with _OPTIMIZER_LOCK:
        state = _OPTIMIZER_STATES.pop(path, None)
    if state is not None:
        return state
    try:
        return load_checkpoint(path)["optimizer"]
    except CheckpointError:
        return None  # first round at this site, or a fresh site: start AdamW anew


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    return max(1, n_items // batch_size) if n_items >= batch_size else 1


# -- train ---------------------------------------------------------------------------------
@torch.no_grad()
def _global_loss(model, loader, tgm_strength: float | None, device, seed: int, max_batches: int = 2) -> float:
    """UltraMIM loss of the (untrained) global model on the first batches of the site's data."""
    from ultrafed.engine.pretrain import draw_mask

    model.to(device).eval()
    gen = torch.Generator().manual_seed(derive_seed(seed, "loss-before", 0))
    losses = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        mask = draw_mask(model, batch, tgm_strength, gen).to(device)
        losses.append(float(model(batch["input"].to(device), mask=mask, target=batch["target"].to(device)).loss))
    model.train()
    return sum(losses) / max(len(losses), 1)


def round_lr_schedule(cfg: Config, per_round: int, round_idx: int) -> dict[str, int]:
    """``warmup_steps``, ``total_steps`` and ``step_offset`` of round ``round_idx`` in the run's one LR schedule.

    The warmup+cosine spans ``federated.lr_horizon_rounds`` rounds when > 0, whatever the rounds
    of the current call, so a run continued in chunks follows one schedule; rounds past the
    horizon stay at ``min_lr``. 0 spans ``federated.rounds`` (the target of the current call):
    continuing a run with a larger target then stretches the cosine and the LR jumps back up.
    """
    fed = cfg.federated
    if fed.lr_horizon_rounds < 0:
        raise ValueError(f"params: federated.lr_horizon_rounds must be >= 0, got {fed.lr_horizon_rounds}")
    horizon = fed.lr_horizon_rounds or fed.rounds
    return {"warmup_steps": per_round * min(cfg.pretrain.warmup_epochs, horizon), "total_steps": per_round * horizon,
            "step_offset": per_round * round_idx}


def site_train(site_id: str, cfg: Config | Mapping[str, Any], *, round_idx: int, global_uri: str,
               global_sha256: str | None, update_run_id: str | None, run_key: str = "default",
               root: str | Path | None = None, work_dir: str | Path | None = None, progress: bool = False,
               store: "StateStore | None" = None, records: Sequence | None = None) -> dict[str, Any]:
    """Pull the global model, run ``local_epochs`` of UltraMIM, push the update; return a reference.

    ``run_key`` (the pretraining's parent run id) scopes the site's saved optimizer state, so
    two pretrainings over the same site never read each other's AdamW moments. The learning
    rate follows :func:`round_lr_schedule`: one warmup+cosine over ``federated.lr_horizon_rounds``
    rounds when > 0 (rounds beyond it stay at ``pretrain.min_lr``), else over ``federated.rounds``.
    ``store`` moves weights (default: MLflow artifacts); ``records`` replaces the site's own
    train split (a pooled "central" site, a capped smoke run).
    """
    from ultrafed.data.datasets import dataset_from_config, make_loader
    from ultrafed.engine.device import select_device
    from ultrafed.engine.pretrain import scaled_lr, train_local
    from ultrafed.models.mae import blank_mae

    cfg = _config(cfg)
    store = store or default_store()
    root, work = site_paths(site_id, root, work_dir)
    fed, pre = cfg.federated, cfg.pretrain
    seed = derive_seed(cfg.seed, "train", round_idx, site_id)
    global_state = store.get(global_uri, global_sha256)
    model = blank_mae(cfg.model)
    model.load_state_dict(global_state)
    ds = dataset_from_config(list(records) if records is not None else _training_records(site_id, root, work), cfg, seed)
    loader = make_loader(ds, batch_size=pre.batch_size, num_workers=pre.num_workers, seed=seed)
    per_round = steps_per_epoch(len(ds), pre.batch_size) * fed.local_epochs
    optim_dir = work / "optimizer" / run_key
    opt_state = None
    if fed.keep_optimizer_state and round_idx > 0:
        opt_state = _take_optimizer_state(optim_dir / f"round-{round_idx - 1:04d}.pt")
    prox_mu = float(fed.strategy_params.get("mu", 0.0)) if fed.strategy == "fedprox" else 0.0
    tgm_strength = cfg.ultramim.tgm.strength if cfg.ultramim.tgm.enabled else None
    device = select_device(pre.device)
    # q-FedAvg weighs sites by the GLOBAL model's loss on their data, before local training
    loss_before = _global_loss(model, loader, tgm_strength, device, seed) if fed.strategy == "qfedavg" else None
    res = train_local(
        model, loader, epochs=fed.local_epochs, peak_lr=scaled_lr(pre.base_lr, pre.batch_size),
        weight_decay=pre.weight_decay, betas=tuple(pre.betas),
        min_lr=pre.min_lr, **round_lr_schedule(cfg, per_round, round_idx), optimizer_state=opt_state,
        tgm_strength=tgm_strength, prox_mu=prox_mu, global_state=global_state if prox_mu > 0 else None,
        optimizer_state_owned=True,  # just read from disk: AdamW may update it in place
        device=device, seed=seed,
        progress=f"site {site_id} round {round_idx}" if progress else False,
    )
    if fed.keep_optimizer_state and res.optimizer_state is not None:
        _keep_optimizer_state(optim_dir / f"round-{round_idx:04d}.pt", res.optimizer_state)
    uri = store.put(res.state, update_run_id, f"update-round-{round_idx:04d}", meta={"site": site_id, "round": round_idx})
    from ultrafed.federated.transfer import state_sha256

    metrics = {k: float(v) for k, v in res.metrics.items()}
    if loss_before is not None:
        metrics["loss_before"] = loss_before
    return {"site": site_id, "n_images": len(ds), "metrics": metrics,
            "update_uri": uri, "update_sha256": state_sha256(res.state), "problems": list(getattr(ds, "problems", []))}


# -- validate ------------------------------------------------------------------------------
def picture_due(cfg: Config, round_idx: int) -> bool:
    """Round 0, every ``tracking.picture_every``-th round and the run's last (0: never)."""
    every = cfg.tracking.picture_every
    return every > 0 and (round_idx % every == 0 or round_idx == cfg.federated.rounds - 1)


@torch.no_grad()
def global_val_loss(model, records: list, cfg: Config, site_id: str, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Masked-reconstruction loss of ``model`` on whole val frames (fixed uniform masks, no MIC).

    The same masks and no corruption for every variant, so the number compares variants and
    rounds; returns ``(mean loss, images)``.
    """
    import cv2
    import numpy as np

    from ultrafed.data.datasets import UltraMIMDataset

    model.to(device).eval()
    ds = UltraMIMDataset(records, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size, smat=False, mic=None)
    size = cfg.model.img_size
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "val-mask", 0, site_id))
    total, n = 0.0, 0
    for start in range(0, len(ds), 32):  # whole frames, no augmentation: comparable across rounds
        frames = [cv2.resize(ds.gray(i), (size, size), interpolation=cv2.INTER_AREA) for i in range(start, min(start + 32, len(ds)))]
        x = torch.from_numpy(np.stack(frames)[:, None].astype(np.float32) / 255.0).to(device)
        mask = model.random_mask(x.shape[0], gen).to(device)
        out = model(x, mask=mask)
        total += float(out.loss) * x.shape[0]
        n += x.shape[0]
    return total / max(n, 1), n


@torch.no_grad()
def site_validate(site_id: str, cfg: Config | Mapping[str, Any], *, global_uri: str, global_sha256: str | None = None,
                  root: str | Path | None = None, work_dir: str | Path | None = None, max_images: int = 256,
                  picture_run_id: str | None = None, round_idx: int = 0, store: "StateStore | None" = None,
                  records: Sequence | None = None, pictures_at_site: bool = False) -> dict[str, Any]:
    """Masked-reconstruction loss of a global model on the site's val split (fixed masks, no MIC).

    In round 0, every ``tracking.picture_every``-th round and the last, the site also draws an
    original / masked / reconstruction grid of a few val images: logged to its run
    ``picture_run_id`` (embedded mode: one machine), or, with ``pictures_at_site`` (what a
    federation worker always sets), written to its own work dir, so no pixel leaves the site.
    """
    import cv2
    import numpy as np

    from ultrafed.data.sites import load_site
    from ultrafed.engine.device import select_device
    from ultrafed.models.mae import blank_mae

    cfg = _config(cfg)
    store = store or default_store()
    root, work = site_paths(site_id, root, work_dir)
    recs = (list(records) if records is not None else load_site(root, site_id).select(["val"]))[:max_images]
    if not recs:
        return {"site": site_id, "val_loss": float("nan"), "n_val": 0}
    device = select_device(cfg.pretrain.device)
    model = blank_mae(cfg.model).to(device).eval()
    model.load_state_dict(store.get(global_uri, global_sha256))
    loss, n = global_val_loss(model, recs, cfg, site_id, device)
    if picture_due(cfg, round_idx) and (picture_run_id or pictures_at_site):
        from ultrafed.data.datasets import UltraMIMDataset
        from ultrafed.tracking.pictures import log_reconstructions, save_reconstructions

        size = cfg.model.img_size
        ds = UltraMIMDataset(recs, img_size=size, patch_size=cfg.model.patch_size, smat=False, mic=None)
        first = [cv2.resize(ds.gray(i), (size, size), interpolation=cv2.INTER_AREA) for i in range(min(4, len(ds)))]
        imgs = torch.from_numpy(np.stack(first)[:, None].astype(np.float32) / 255.0).to(device)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "picture", round_idx, site_id))
        if pictures_at_site:
            save_reconstructions(work / "pictures" / f"round-{round_idx:03d}" / f"{site_id}.png", model, imgs,
                                 site=site_id, round_idx=round_idx, generator=gen)
        else:
            log_reconstructions(picture_run_id, model, imgs, site=site_id, round_idx=round_idx, generator=gen)
    if not math.isfinite(loss):
        raise SiteError(f"site {site_id}: validation loss is not finite ({loss})")
    return {"site": site_id, "val_loss": loss, "n_val": n}


# -- one entry point for both modes ----------------------------------------------------------
ACTIONS = {"check": site_check, "train": site_train, "validate": site_validate}


def result_artifact(action: str) -> str:
    return f"site-results/{action}.json"


def run_action(action: str, site_id: str, params: Mapping[str, Any], *, root: str | Path | None = None,
               work_dir: str | Path | None = None, result_run_id: str | None = None,
               extra: Mapping[str, Any] | None = None, redact: bool = False) -> dict[str, Any]:
    """Run a site action and, given a run id, log its (small) result there for the coordinator.

    ``params`` are the JSON parameters a coordinator may send; ``extra`` holds in-process
    objects (a state store, record lists) that only a caller in the same process can pass.
    ``redact`` (a federation site): answer with :func:`~ultrafed.federated.disclosure.coordinator_view`
    only, so no file name of the site reaches the coordinator.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown site action '{action}' (check | train | validate)")
    result = ACTIONS[action](site_id, root=root, work_dir=work_dir, **params, **dict(extra or {}))
    if redact:
        from ultrafed.federated.disclosure import coordinator_view

        result = coordinator_view(action, result)
    if result_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.log_dict(result_run_id, result, result_artifact(action))
        if action == "check":
            client.log_text(result_run_id, result.get("report_md", ""), f"quality/{site_id}-quality.md")
        metrics = {"val_loss": result.get("val_loss")} if action == "validate" else result.get("metrics", {})
        from ultrafed.tracking.runs import log_metrics

        log_metrics(result_run_id, {k: float(v) for k, v in (metrics or {}).items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)})  # one batch, not one call each
    return result


def run_for_coordinator(action: str, site_id: str, params: Mapping[str, Any], *, result_run_id: str | None,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A federation site's action: redacted answers, and a failure that names no site file.

    The full error (with the file it names, for the site's operator) is appended to
    ``<work dir>/errors.log``; the coordinator gets the same line with file names and paths
    replaced, raised without its chained traceback, which would carry them too.
    """
    from ultrafed.federated.disclosure import redact_text

    try:
        return run_action(action, site_id, params, result_run_id=result_run_id, extra=extra, redact=True)
    except Exception as e:  # noqa: BLE001 - any failure is reported, redacted, to the coordinator
        line = " ".join(f"{type(e).__name__}: {e}".split())
        try:
            _, work = site_paths(site_id, None, None)
            with open(work / "errors.log", "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {action}: {line}\n")
        except Exception:  # noqa: BLE001 - no work dir: the redacted line still goes out
            pass
        raise SiteError(f"site {site_id}: {action} failed: {redact_text(line)} (details in the site's errors.log)") from None


def read_result(action: str, result_run_id: str) -> dict[str, Any]:
    """What a site logged for ``action`` (federation mode: the coordinator's only view of the site)."""
    import mlflow

    return mlflow.artifacts.load_dict(f"runs:/{result_run_id}/{result_artifact(action)}")
