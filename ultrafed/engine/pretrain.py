"""Local UltraMIM training: one call is one site's local epochs in one federated round.

The same loop serves the single-site Quick start (:func:`pretrain_single_site`) and every
federated strategy: ``step_offset``/``total_steps`` continue one warmup+cosine schedule across
rounds, ``optimizer_state`` carries a site's AdamW moments from round to round (the official
code does), and ``prox_mu`` adds FedProx's proximal term. The expensive per-image work (decode,
SMAT copies, MIC corruption, texture scores) happens in the data loader's workers
(:class:`ultrafed.data.datasets.UltraMIMDataset`); the step itself only draws the TGM mask and
runs the model.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ultrafed.engine.checkpoint import save_checkpoint
from ultrafed.engine.device import select_device
from ultrafed.federated.strategies import proximal_term
from ultrafed.models.mae import MaskedAutoencoderViT, mae_from_config
from ultrafed.ultramim.tgm import texture_scores, tgm_mask

# Parameters MAE keeps out of weight decay besides every 1-D tensor (norms, biases); pretraining
# and fine-tuning (ultrafed.engine.finetune) both follow it.
NO_DECAY_NAMES: tuple[str, ...] = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


if TYPE_CHECKING:
    from ultrafed.config import Config


def no_weight_decay(name: str, p: Tensor) -> bool:
    """Norms, biases and the token / position embeddings train without weight decay (as MAE does)."""
    return p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training diverged (lr too high, bad data); the weights are unusable."""

    def __init__(self, step: int, loss: float, where: str = "") -> None:
        self.step, self.loss = step, loss
        super().__init__(f"{where + ': ' if where else ''}non-finite loss {loss} at step {step} (diverged; lower the lr or check the data)")


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps`` steps, then half-cosine to ``min_lr`` at ``total_steps``.

    Step 0 already gets ``peak_lr / warmup_steps`` (no wasted step at lr 0); past ``total_steps``
    the rate stays at ``min_lr``.
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    frac = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1): here warmup <= step < total
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """MAE's linear scaling rule: ``base_lr * batch / 256`` (the paper's 1.5e-4 is per 256 images)."""
    return base_lr * batch_size / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed matrices, and undecayed norms/biases/tokens (as MAE does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the lr is overwritten every step by the schedule."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))


@dataclass
class LocalResult:
    state: dict[str, Tensor]            # model state_dict after training, CPU copies
    optimizer_state: dict | None        # AdamW state_dict, CPU copies (to keep across rounds)
    metrics: dict[str, float]           # loss, last_loss, images, steps, seconds, img_per_s (+ prox_loss)
    steps: int                          # optimiser steps taken in this call


def _to_cpu(x: Any, copy: bool = True) -> Any:
    """CPU tensors of ``x`` (nested); ``copy=False`` passes CPU tensors through uncopied."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", copy=copy)
    if isinstance(x, Mapping):
        return {k: _to_cpu(v, copy) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v, copy) for v in x)
    return x


def _proximal(params: Iterable[tuple[str, Tensor]], global_state: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx ``mu/2 * ||w - w_global||^2`` over the trainable parameters (the strategies' definition)."""
    return proximal_term([(n, p) for n, p in params if p.requires_grad], global_state, mu)


def _progress_bar(enabled: bool | str, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=enabled if isinstance(enabled, str) else "pretrain", unit="step", leave=False)


def draw_mask(model: MaskedAutoencoderViT, batch: Mapping[str, Tensor], tgm_strength: float | None,
              generator: torch.Generator) -> Tensor:
    """``[N, L]`` bool on the CPU: TGM from the batch's texture scores (computed from the clean
    target when absent), or MAE's uniform masks when ``tgm_strength`` is None."""
    target = batch["target"]
    if tgm_strength is None:
        return model.random_mask(target.shape[0], generator)
    tex = batch.get("texture")
    if tex is None:
        tex = texture_scores(target, model.encoder.patch_size)
    return tgm_mask(tex, model.mask_ratio, tgm_strength, generator)


def train_step(model: MaskedAutoencoderViT, opt: torch.optim.Optimizer, batch: Mapping[str, Tensor], mask: Tensor, *,
               device: torch.device, step: int = 0, prox_mu: float = 0.0,
               global_state: Mapping[str, Tensor] | None = None, where: str = "") -> tuple[float, float]:
    """One optimiser step on ``input`` -> clean ``target`` (bf16 autocast on CUDA).

    Returns (reconstruction loss, proximal term). A non-finite loss raises
    :class:`NonFiniteLossError` *before* the weights are touched.
    """
    inp = batch["input"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(inp, mask=mask, target=target)
    loss, prox = out.loss, None
    if global_state is not None and prox_mu > 0:
        prox = _proximal(model.named_parameters(), global_state, prox_mu)
        loss = loss + prox
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value, where)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(out.loss.detach()), (float(prox.detach()) if prox is not None else 0.0)


def train_local(model: MaskedAutoencoderViT, loader: torch.utils.data.DataLoader, *, epochs: int,
                peak_lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                total_steps: int, step_offset: int = 0, optimizer_state: dict | None = None,
                tgm_strength: float | None = 1.0, prox_mu: float = 0.0,
                global_state: Mapping[str, Tensor] | None = None, device: torch.device | str = "cpu",
                seed: int = 0, min_lr: float = 0.0, progress: bool | str = False,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                optimizer_state_owned: bool = False) -> LocalResult:
    """Run ``epochs`` passes of UltraMIM over ``loader`` and return the new weights.

    The loader yields dicts with ``input`` (MIC-corrupted), ``target`` (clean) and ``texture``
    (per-patch scores; computed here from ``target`` if absent). ``tgm_strength=None`` is plain
    MAE uniform masking. Masks are drawn on the CPU from ``seed``, so the same seed gives the
    same masks on any device. The dataset's augmentation epoch is the *global* epoch
    ``step_offset // len(loader) + e`` so later rounds see fresh crops. ``on_step(global_step,
    {"loss", "lr"})`` is called after every step (e.g. to log to MLflow). ``optimizer_state`` is
    copied before use unless ``optimizer_state_owned`` says the caller hands it over.
    """
    if epochs < 1:
        raise ValueError(f"train_local: epochs must be >= 1, got {epochs}")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("train_local: the loader yields no batches (fewer images than one batch with drop_last?)")
    if prox_mu > 0 and global_state is None:
        raise ValueError("train_local: prox_mu > 0 needs global_state (the round's global weights)")
    device = torch.device(device)
    model.to(device).train()
    opt = build_optimizer(model, peak_lr, weight_decay, betas)
    if optimizer_state is not None:
        # on the same device torch adopts the given tensors and AdamW updates them in place: copy the
        # caller's state unless it is ours to consume (``optimizer_state_owned``, e.g. just read from disk)
        opt.load_state_dict(optimizer_state if optimizer_state_owned else copy.deepcopy(optimizer_state))
    gstate = None
    if prox_mu > 0:
        gstate = {n: global_state[n].to(device, torch.float32) for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    bar = _progress_bar(progress, epochs * steps_per_epoch)
    dataset = getattr(loader, "dataset", None)

    losses: list[float] = []
    prox_losses: list[float] = []
    images = step = 0
    t0 = time.perf_counter()
    try:
        for e in range(epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(step_offset // steps_per_epoch + e)
            for batch in loader:
                gstep = step_offset + step
                lr = lr_at(gstep, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                n = batch["target"].shape[0]
                mask = draw_mask(model, batch, tgm_strength, gen)
                rec, prox = train_step(model, opt, batch, mask, device=device, step=gstep, prox_mu=prox_mu,
                                       global_state=gstate, where=progress if isinstance(progress, str) else "")
                if gstate is not None:
                    prox_losses.append(prox)
                losses.append(rec)
                images += n
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec:.4f}", lr=f"{lr:.2e}")
                if on_step is not None:
                    on_step(gstep, {"loss": rec, "lr": lr})
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    metrics = {"loss": sum(losses) / len(losses), "last_loss": losses[-1], "images": float(images),
               "steps": float(step), "seconds": seconds, "img_per_s": images / seconds if seconds > 0 else float("nan")}
    if prox_losses:
        metrics["prox_loss"] = sum(prox_losses) / len(prox_losses)
    # the model stays the caller's, so its weights are copied; the optimizer ends here, so its state is handed over
    return LocalResult(state=_to_cpu(model.state_dict()), optimizer_state=_to_cpu(opt.state_dict(), copy=False),
                       metrics=metrics, steps=step)


def pretrain_single_site(cfg: "Config", site_root: str | Path, out_dir: str | Path, *,
                         splits: Iterable[str] = ("train",), progress: bool = True) -> dict[str, float]:
    """Quick start: UltraMIM on one site folder for ``cfg.pretrain.epochs``; writes checkpoint + metrics.

    Files: ``out_dir/checkpoint.pt`` (model, optimizer, resolved config, params hash, metrics)
    and ``out_dir/metrics.json`` (metrics, checkpoint sha256, unreadable files skipped). A site
    with no usable image is a ``ValueError`` naming the folder and the first unreadable file.
    """
    from ultrafed.data.datasets import UltraMIMDataset, dataset_from_config, make_loader
    from ultrafed.data.sites import load_site

    out = Path(out_dir)
    site = load_site(site_root)
    records = site.select(tuple(splits))
    ds: UltraMIMDataset = dataset_from_config(records, cfg)
    if len(ds) == 0:
        why = f"; {len(ds.problems)} unreadable, first: {ds.problems[0]}" if ds.problems else ""
        raise ValueError(f"{site_root}: no usable images in split(s) {', '.join(splits)}{why}")
    pc = cfg.pretrain
    loader = make_loader(ds, pc.batch_size, pc.num_workers, cfg.seed, shuffle=True)
    model = mae_from_config(cfg.model, seed=cfg.seed)
    spe = len(loader)
    device = select_device(pc.device)
    res = train_local(model, loader, epochs=pc.epochs, peak_lr=scaled_lr(pc.base_lr, pc.batch_size),
                      weight_decay=pc.weight_decay, betas=pc.betas, warmup_steps=pc.warmup_epochs * spe,
                      total_steps=pc.epochs * spe, min_lr=pc.min_lr,
                      tgm_strength=cfg.ultramim.tgm.strength if cfg.ultramim.tgm.enabled else None,
                      device=device, seed=cfg.seed, progress=f"{Path(site_root).name}" if progress else False)
    metrics = dict(res.metrics, n_images=float(len(ds)), n_files=float(ds.n_images), skipped=float(len(ds.problems)))
    sha = save_checkpoint(out / "checkpoint.pt", {
        "format": "ultrafed-mae/1", "model": res.state, "optimizer": res.optimizer_state,
        "config": cfg.to_dict(), "params_hash": cfg.params_hash(), "metrics": metrics,
        "steps": res.steps, "site": str(site_root), "device": str(device)})
    (out / "metrics.json").write_text(json.dumps(
        {"metrics": metrics, "checkpoint": "checkpoint.pt", "sha256": sha, "params_hash": cfg.params_hash(),
         "problems": list(ds.problems), "site_problems": list(site.problems)}, indent=2) + "\n")
    print(f"pretrained {Path(site_root).name}: {len(ds)} images ({ds.n_images} files"
          f"{', SMAT copies' if ds.smat else ''}; {len(ds.problems)} skipped), {res.steps} steps on {device}, "
          f"loss {metrics['loss']:.4f} (last {metrics['last_loss']:.4f}), {metrics['img_per_s']:.1f} img/s -> {out / 'checkpoint.pt'}")
    return metrics
