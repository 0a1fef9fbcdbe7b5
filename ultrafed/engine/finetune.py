"""Fine-tuning and evaluation on the downstream tasks, with an honest protocol.

Train on ``train``; after every epoch score ``val`` (macro AUROC or mean Dice) and keep the
best epoch's weights; ``test`` is touched only when ``evaluate_test`` is set, once, on the
chosen weights, with bootstrap confidence intervals. The encoder gets layer-wise lr decay
(BEiT/MAE): deeper blocks, which hold more task-specific features, move faster than the patch
embedding. ``encoder=None`` trains the same architecture from random weights: the scratch
baseline with the same budget. :func:`train_baseline` runs the non-ViT baselines through the
same loop and protocol.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ultrafed.data.datasets import make_loader
from ultrafed.data.tasks import TaskDataset, TaskSpec, get_task, load_task
from ultrafed.engine.device import select_device
from ultrafed.engine.metrics import (
    bootstrap_ci,
    classification_metrics,
    macro_auroc,
    per_image_dice,
    segmentation_metrics,
)
from ultrafed.engine.pretrain import NonFiniteLossError, lr_at, no_weight_decay
from ultrafed.engine.probe import full_proba
from ultrafed.models.baselines import UNet, build_resnet18, handcrafted_features
from ultrafed.models.heads import ClassificationModel, SegmentationModel, adapt_encoder
from ultrafed.models.mae import ViTEncoder, build_encoder
from ultrafed.protocol import PRIMARY_METRIC

BASELINES: tuple[str, ...] = ("resnet18", "unet", "handcrafted-lr")


if TYPE_CHECKING:
    from ultrafed.config import Config


@dataclass
class FinetuneResult:
    model: Any                       # the chosen nn.Module on CPU, eval mode (a sklearn Pipeline for handcrafted-lr)
    val: dict[str, float]            # metrics of the chosen model on val, with bootstrap CI of the primary metric
    test: dict[str, float] | None    # the same on test; None unless evaluate_test
    history: list[dict[str, float]]  # per epoch (or per C for handcrafted-lr): train loss, val metric
    best_epoch: int                  # index into history of the chosen model
    task: str = ""
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)  # rows/files left out, one line each
    settings: dict[str, Any] = field(default_factory=dict)  # the hyper-parameters actually used (to log)


def primary_metric(spec: TaskSpec) -> str:
    """The model-selection metric: macro AUROC for diagnosis, mean per-image Dice for segmentation."""
    return PRIMARY_METRIC[spec.kind]


# -- optimisation -------------------------------------------------------------------------------

def layer_id(name: str, depth: int) -> int:
    """Depth index of a parameter for lr decay: 0 = embeddings, ``i + 1`` = block ``i``,
    ``depth + 1`` = final norm and everything outside the encoder (heads, decoders)."""
    if not name.startswith("encoder."):
        return depth + 1
    rest = name[len("encoder."):]
    if rest.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; norms, biases and
    tokens without weight decay. A model without ``.encoder`` gets one scale (1.0)."""
    enc = getattr(model, "encoder", None)
    depth = enc.depth if isinstance(enc, ViTEncoder) else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth) if depth else 1
        no_decay = no_weight_decay(name, p)
        g = groups.setdefault((lid, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** ((depth + 1 - lid) if depth else 0)})
        g["params"].append(p)
    return list(groups.values())


def _loss(spec: TaskSpec, logits: Tensor, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    if spec.kind == "cls":
        return F.cross_entropy(logits.float(), batch["label"].to(device))
    target = batch["mask"].to(device)
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).flatten(1).sum(1)
    total = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    soft_dice = (2 * inter + 1.0) / (total + 1.0)  # +1: an empty mask is learnable (predict nothing)
    return bce + (1.0 - soft_dice).mean()


# -- prediction and evaluation --------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, ds: TaskDataset, *, batch_size: int = 64, device: torch.device | str = "cpu"
            ) -> tuple[np.ndarray, Any]:
    """``(probs [N, C], labels [N])`` for diagnosis or ``(pred masks, gt masks)`` (lists of ``[S, S]`` bool).

    Masks are compared at the model's resolution ``S`` (ground truth resized nearest-neighbour),
    as the 128-px anchors were measured; HD95 is therefore in pixels of ``S``, not millimetres.
    """
    device = torch.device(device)
    model.to(device).eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    outs: list[np.ndarray] = []
    gts: list[np.ndarray] = []
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["image"].to(device)).float()
        if ds.spec.kind == "cls":
            outs.append(torch.softmax(logits, dim=1).cpu().numpy())
        else:
            outs.extend((logits[:, 0] > 0).cpu().numpy())
            gts.extend(batch["mask"][:, 0].numpy() > 0.5)
    if ds.spec.kind == "cls":
        probs = np.concatenate(outs) if outs else np.zeros((0, ds.spec.num_classes))
        return probs, ds.labels.copy()
    return outs, gts


def score(spec: TaskSpec, outputs: Any, targets: Any, *, n_boot: int = 0, seed: int = 0) -> dict[str, float]:
    """Task metrics of predictions; with ``n_boot > 0`` also ``<primary>_lo/_hi`` (95% bootstrap CI)."""
    if spec.kind == "cls":
        m: dict[str, float] = dict(classification_metrics(targets, outputs))
        if n_boot:
            _, lo, hi = bootstrap_ci(lambda p, y: macro_auroc(y, p), outputs, targets, n_boot=n_boot, seed=seed)
            m.update(auroc_lo=lo, auroc_hi=hi)
    else:
        m = dict(segmentation_metrics(outputs, targets))
        lesion = segmentation_metrics(outputs, targets, include_empty=False)
        m.update(dice_lesion=lesion["dice"], n_lesion=lesion["n"])
        if n_boot:
            _, lo, hi = bootstrap_ci(np.mean, per_image_dice(outputs, targets), n_boot=n_boot, seed=seed)
            m.update(dice_lo=lo, dice_hi=hi)
    m["n"] = float(len(targets))
    return {k: float(v) for k, v in m.items()}


def evaluate(model: nn.Module, ds: TaskDataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
             n_boot: int = 0, seed: int = 0) -> dict[str, float]:
    """:func:`score` of :func:`predict` on ``ds``."""
    outputs, targets = predict(model, ds, batch_size=batch_size, device=device)
    return score(ds.spec, outputs, targets, n_boot=n_boot, seed=seed)


# -- the training loop ---------------------------------------------------------------------------------

@dataclass
class _Data:
    train: TaskDataset
    val: TaskDataset
    test: TaskDataset | None
    problems: list[str]


def _datasets(spec: TaskSpec, root: Path, img_size: int, seed: int, evaluate_test: bool) -> _Data:
    problems: list[str] = []
    out: dict[str, TaskDataset | None] = {}
    for split in ("train", "val", "test"):
        if split == "test" and not evaluate_test:
            out[split] = None
            continue
        records, probs = load_task(spec.name, root, split)
        ds = TaskDataset(records, spec, img_size, train=split == "train", seed=seed)
        problems += probs + ds.problems
        if len(ds) == 0:
            raise ValueError(f"{root}: task {spec.name} has no usable {split} images"
                             + (f" (first problem: {problems[0]})" if problems else ""))
        out[split] = ds
    if spec.kind == "cls" and len(np.unique(out["train"].labels)) < 2:  # type: ignore[union-attr]
        raise ValueError(f"{root}: task {spec.name} has a single class in train; nothing to learn")
    return _Data(out["train"], out["val"], out["test"], problems)  # type: ignore[arg-type]


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


def fit(model: nn.Module, data: _Data, spec: TaskSpec, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, layer_decay: float, warmup_epochs: float, seed: int, device: torch.device,
        num_workers: int = 0, progress: bool = False, n_boot: int = 1000, evaluate_test: bool = False,
        label: str = "finetune") -> FinetuneResult:
    """Train ``model`` on ``data.train``, pick the best epoch on ``data.val``, optionally score test.

    An epoch whose val metric is undefined (e.g. AUROC on a single-class val split) never beats
    a defined one; ties keep the earlier epoch.
    """
    if epochs < 1:
        raise ValueError(f"{label}: epochs must be >= 1, got {epochs}")
    t0 = time.perf_counter()
    loader = make_loader(data.train, batch_size, num_workers, seed, shuffle=True)
    spe = len(loader)
    total, warmup = epochs * spe, int(round(warmup_epochs * spe))
    model.to(device)
    opt = torch.optim.AdamW(param_groups_lrd(model, weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999))
    key = primary_metric(spec)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    bar = _progress(progress, epochs, f"{label} {spec.name}")
    step = 0
    try:
        for epoch in range(epochs):
            te = time.perf_counter()
            data.train.set_epoch(epoch)
            model.train()
            losses = []
            for batch in loader:
                cur = lr_at(step, peak_lr=lr, warmup_steps=warmup, total_steps=total)
                for g in opt.param_groups:
                    g["lr"] = cur * g.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(batch["image"].to(device))
                loss = _loss(spec, logits, batch, device)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(step, value, f"{label} {spec.name}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(value)
                step += 1
            val = evaluate(model, data.val, batch_size=batch_size, device=device)
            history.append({"epoch": float(epoch), "train_loss": float(np.mean(losses)), "lr": cur,
                            **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - te})
            s = val[key] if math.isfinite(val[key]) else -math.inf
            if best is None or s > best[0]:
                best = (s, epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", **{f"val_{key}": f"{val[key]:.4f}"})
    finally:
        if bar is not None:
            bar.close()
    assert best is not None
    model.load_state_dict(best[2])
    val = evaluate(model, data.val, batch_size=batch_size, device=device, n_boot=n_boot, seed=seed)
    test = (evaluate(model, data.test, batch_size=batch_size, device=device, n_boot=n_boot, seed=seed)
            if evaluate_test and data.test is not None else None)
    settings = {"model": label, "img_size": data.train.img_size, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "layer_decay": layer_decay, "warmup_epochs": warmup_epochs,
                "seed": seed, "steps": step, "selection": f"val_{key}"}
    return FinetuneResult(model=model.cpu().eval(), val=val, test=test, history=history, best_epoch=best[1],
                          task=spec.name, wall_s=time.perf_counter() - t0, problems=data.problems, settings=settings)


def build_task_model(spec: TaskSpec, encoder: ViTEncoder) -> nn.Module:
    """The head for ``spec`` on ``encoder``."""
    if spec.kind == "cls":
        return ClassificationModel(encoder, spec.num_classes)
    return SegmentationModel(encoder, num_classes=1)


def finetune(task: str, root: str | Path, encoder: ViTEncoder | None, *, preset: str, img_size: int, epochs: int,
             batch_size: int, lr: float, weight_decay: float, layer_decay: float, seed: int,
             device: str | torch.device = "cpu", progress: bool = True, evaluate_test: bool = False,
             warmup_epochs: float = 1.0, num_workers: int = 0, n_boot: int = 1000) -> FinetuneResult:
    """Fine-tune ``encoder`` (copied; ``None`` = random init of ``preset``) with the task head.

    ``lr`` is the peak rate of the head; encoder block ``i`` gets ``lr * layer_decay ** (depth - i)``.
    Layer decay protects pretrained lower layers, so the scratch baseline (``encoder=None``)
    trains every layer at the full rate (``layer_decay`` is ignored; ``settings`` records 1.0).
    Warmup then cosine decay per step. The returned model holds the best-on-val epoch.
    """
    spec = get_task(task)
    dev = select_device(device) if isinstance(device, str) else device
    data = _datasets(spec, Path(root), img_size, seed, evaluate_test)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = build_encoder(preset, img_size) if encoder is None else adapt_encoder(encoder, img_size)
        if enc.in_chans != 1:
            raise ValueError(f"encoder takes {enc.in_chans} channels; task images are one gray channel")
        model = build_task_model(spec, enc)
    return fit(model, data, spec, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
               layer_decay=1.0 if encoder is None else layer_decay, warmup_epochs=warmup_epochs, seed=seed, device=dev,
               num_workers=num_workers, progress=progress, n_boot=n_boot, evaluate_test=evaluate_test,
               label="scratch" if encoder is None else "finetune")


# -- baselines ------------------------------------------------------------------------------------------------

def train_baseline(task: str, root: str | Path, kind: Literal["resnet18", "unet", "handcrafted-lr"], *,
                   img_size: int = 128, epochs: int = 10, batch_size: int = 32, lr: float = 1e-3,
                   weight_decay: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu",
                   progress: bool = True, evaluate_test: bool = False, warmup_epochs: float = 1.0,
                   num_workers: int = 0, n_boot: int = 1000,
                   Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> FinetuneResult:
    """A from-scratch baseline under the same splits, selection and budget as :func:`finetune`.

    ``resnet18`` (diagnosis) and ``unet`` (segmentation) train like the ViT (no layer decay);
    ``handcrafted-lr`` fits :func:`handcrafted_features` + logistic regression per ``C`` in
    ``Cs`` on train and keeps the ``C`` best on val (``history`` has one entry per ``C``).
    """
    spec = get_task(task)
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline '{kind}' (choose from {', '.join(BASELINES)})")
    wants = {"resnet18": "cls", "unet": "seg", "handcrafted-lr": "cls"}[kind]
    if spec.kind != wants:
        raise ValueError(f"baseline '{kind}' is for {'classification' if wants == 'cls' else 'segmentation'} "
                         f"tasks; {task} is {'classification' if spec.kind == 'cls' else 'segmentation'}")
    data = _datasets(spec, Path(root), img_size, seed, evaluate_test)
    if kind == "handcrafted-lr":
        return _handcrafted_lr(spec, data, img_size=img_size, seed=seed, n_boot=n_boot, Cs=Cs,
                               evaluate_test=evaluate_test)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_resnet18(spec.num_classes) if kind == "resnet18" else UNet(1, 1)
    dev = select_device(device) if isinstance(device, str) else device
    return fit(model, data, spec, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
               layer_decay=1.0, warmup_epochs=warmup_epochs, seed=seed, device=dev, num_workers=num_workers,
               progress=progress, n_boot=n_boot, evaluate_test=evaluate_test, label=kind)


def _features(ds: TaskDataset, size: int) -> np.ndarray:
    return np.stack([handcrafted_features(ds.frame(i), size) for i in range(len(ds))])


def _handcrafted_lr(spec: TaskSpec, data: _Data, *, img_size: int, seed: int, n_boot: int,
                    Cs: tuple[float, ...], evaluate_test: bool) -> FinetuneResult:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    xtr, xva = _features(data.train, img_size), _features(data.val, img_size)
    ytr, yva = data.train.labels, data.val.labels
    history: list[dict[str, float]] = []
    best: tuple[float, int, Any] | None = None
    for i, c in enumerate(Cs):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(xtr, ytr)
        val = score(spec, full_proba(clf, xva, spec.num_classes), yva)
        history.append({"C": float(c), **{f"val_{k}": v for k, v in val.items()}})
        s = val["auroc"] if math.isfinite(val["auroc"]) else -math.inf
        if best is None or s > best[0]:
            best = (s, i, clf)
    assert best is not None
    clf = best[2]
    val = score(spec, full_proba(clf, xva, spec.num_classes), yva, n_boot=n_boot, seed=seed)
    test = None
    if evaluate_test and data.test is not None:
        test = score(spec, full_proba(clf, _features(data.test, img_size), spec.num_classes), data.test.labels,
                     n_boot=n_boot, seed=seed)
    return FinetuneResult(model=clf, val=val, test=test, history=history, best_epoch=best[1], task=spec.name,
                          wall_s=time.perf_counter() - t0, problems=data.problems,
                          settings={"model": "handcrafted-lr", "img_size": img_size, "C": history[best[1]]["C"],
                                    "seed": seed, "selection": "val_auroc"})



def finetune_from_config(task: str, root: str | Path, encoder: ViTEncoder | None, cfg: "Config", *,
                         evaluate_test: bool = False, progress: bool = True) -> FinetuneResult:
    """:func:`finetune` with ``cfg.finetune`` (and ``cfg.model.preset``, ``cfg.seed``) exploded into arguments."""
    f = cfg.finetune
    return finetune(task, root, encoder, preset=cfg.model.preset, img_size=f.img_size, epochs=f.epochs,
                    batch_size=f.batch_size, lr=f.lr, weight_decay=f.weight_decay, layer_decay=f.layer_decay,
                    seed=cfg.seed, device=f.device, progress=progress, evaluate_test=evaluate_test,
                    warmup_epochs=f.warmup_epochs, num_workers=f.num_workers, n_boot=f.n_boot)


def baseline_from_config(task: str, root: str | Path, kind: Literal["resnet18", "unet", "handcrafted-lr"], cfg: "Config", *,
                         evaluate_test: bool = False, progress: bool = True) -> FinetuneResult:
    """:func:`train_baseline` with ``cfg.finetune``'s budget (epochs, batch) and baseline settings."""
    f = cfg.finetune
    return train_baseline(task, root, kind, img_size=f.baseline_img_size, epochs=f.epochs, batch_size=f.batch_size,
                          lr=f.baseline_lr, weight_decay=f.baseline_weight_decay, seed=cfg.seed, device=f.device,
                          progress=progress, evaluate_test=evaluate_test, warmup_epochs=f.warmup_epochs,
                          num_workers=f.num_workers, n_boot=f.n_boot)
