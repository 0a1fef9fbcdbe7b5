"""Fine-tuning, baselines and probes on a tiny synthetic cohort (ViT-tiny at 64 px, CPU)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ultrafed.data.synth import make_cohort
from ultrafed.data.tasks import TASKS, TaskDataset, task_records
from ultrafed.engine.finetune import (
    build_task_model,
    finetune,
    layer_id,
    param_groups_lrd,
    predict,
    train_baseline,
)
from ultrafed.engine.probe import knn_probe, linear_probe, probe_task
from ultrafed.models.heads import ClassificationModel
from ultrafed.models.mae import build_encoder

TINY = dict(preset="tiny", img_size=64, batch_size=8, weight_decay=0.05, layer_decay=0.75, seed=0,
            progress=False, n_boot=50)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription costs more than it gives
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    make_cohort(root, sites=2, per_site=16, seed=0, size=64, progress=None)
    return root


def _eval_loss(model: torch.nn.Module, ds: TaskDataset) -> float:
    probs, y = predict(model, ds, batch_size=32)
    return float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))


@pytest.mark.slow
def test_two_epoch_finetune_lowers_the_train_loss(cohort):
    res = finetune("synth-cls", cohort, None, epochs=2, lr=1e-4, warmup_epochs=0.0, **{**TINY, "batch_size": 4})
    train = TaskDataset(task_records("synth-cls", cohort, "train"), TASKS["synth-cls"], 64)
    with torch.random.fork_rng(devices=[]):  # the same seed rebuilds the untrained starting point
        torch.manual_seed(0)
        start = build_task_model(TASKS["synth-cls"], build_encoder("tiny", 64))
    assert _eval_loss(res.model, train) < _eval_loss(start, train) - 0.03
    assert len(res.history) == 2 and res.best_epoch in (0, 1)
    assert res.history[res.best_epoch]["val_auroc"] == max(h["val_auroc"] for h in res.history)
    assert res.val["auroc_lo"] <= res.val["auroc"] <= res.val["auroc_hi"]
    assert res.test is None  # the test split is not touched unless asked
    assert isinstance(res.model, ClassificationModel) and not res.model.training
    # layer decay protects pretrained layers; from scratch every layer trains at the full rate
    assert res.settings["model"] == "scratch" and res.settings["layer_decay"] == 1.0


@pytest.mark.slow
def test_segmentation_finetune_from_a_given_encoder_reports_val_and_test(cohort):
    torch.manual_seed(1)
    enc = build_encoder("tiny", 96)  # another size: positions are rebuilt, weights copied
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = finetune("synth-seg", cohort, enc, epochs=1, lr=5e-4, evaluate_test=True, **TINY)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # caller's encoder untouched
    for m in (res.val, res.test):
        assert 0.0 <= m["dice"] <= 1.0 and m["dice_lo"] <= m["dice"] <= m["dice_hi"]
        assert m["n"] > 0 and m["n_lesion"] <= m["n"]
    assert res.model.encoder.img_size == 64
    assert res.settings["model"] == "finetune" and res.settings["layer_decay"] == 0.75


def test_layer_decay_scales_by_depth():
    model = ClassificationModel(build_encoder("tiny", 32), 3)
    assert layer_id("encoder.patch_embed.proj.weight", 12) == 0
    assert layer_id("encoder.blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id("head.weight", 12) == layer_id("encoder.norm.weight", 12) == 13
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == (0.5 ** 13, 0.05)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.5 ** 12, 0.05)
    assert scale[id(named["encoder.blocks.11.attn.qkv.bias"])] == (0.5, 0.0)
    assert scale[id(named["encoder.cls_token"])] == (0.5 ** 13, 0.0)
    assert scale[id(named["head.weight"])] == (1.0, 0.05)
    assert len(scale) == len(named)  # every parameter in exactly one group


def test_handcrafted_baseline_selects_c_on_val(cohort):
    res = train_baseline("synth-cls", cohort, "handcrafted-lr", img_size=64, n_boot=50, Cs=(0.01, 1.0))
    assert [h["C"] for h in res.history] == [0.01, 1.0]
    best = res.history[res.best_epoch]["val_auroc"]
    assert best == max(h["val_auroc"] for h in res.history) and res.val["auroc"] == best
    assert res.test is None and hasattr(res.model, "predict_proba")


@pytest.mark.slow
def test_cnn_baselines_train_through_the_same_loop(cohort):
    cls = train_baseline("synth-cls", cohort, "resnet18", img_size=64, epochs=1, batch_size=8, n_boot=0, progress=False)
    seg = train_baseline("synth-seg", cohort, "unet", img_size=64, epochs=1, batch_size=8, n_boot=0, progress=False)
    assert 0.0 <= cls.val["auroc"] <= 1.0 and 0.0 <= seg.val["dice"] <= 1.0


def test_baseline_task_mismatch_is_one_clear_error(cohort):
    with pytest.raises(ValueError, match="baseline 'unet' is for segmentation tasks; synth-cls is classification"):
        train_baseline("synth-cls", cohort, "unet")
    with pytest.raises(ValueError, match="unknown baseline 'svm'"):
        train_baseline("synth-cls", cohort, "svm")  # type: ignore[arg-type]


# -- probes -------------------------------------------------------------------------------------------------

def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    return centres[y] + rng.normal(0, 0.3, (n, 4)), y


def test_probes_separate_well_separated_clusters():
    xtr, ytr = _clusters(60, 0)
    xva, yva = _clusters(30, 1)
    lin = linear_probe(xtr, ytr, xva, yva, num_classes=3, Cs=(0.1, 1.0), test_x=xva, test_y=yva)
    assert lin["val"]["auroc"] == 1.0 and lin["test"]["accuracy"] == 1.0 and lin["C"] in (0.1, 1.0)
    knn = knn_probe(xtr, ytr, xva, yva, num_classes=3, k=5)
    assert knn["auroc"] == 1.0 and knn["accuracy"] == 1.0
    with pytest.raises(ValueError, match="60 feature rows but 59 labels"):
        knn_probe(xtr, ytr[:-1], xva, yva, num_classes=3)


@pytest.mark.slow
def test_probe_task_on_a_frozen_encoder(cohort):
    torch.manual_seed(0)
    enc = build_encoder("tiny", 64)
    out = probe_task("synth-cls", cohort, enc, batch_size=16, k=5)
    n_train = len(task_records("synth-cls", cohort, "train"))
    assert out["n_train"] == n_train and out["linear"]["test"] is None and out["knn"]["test"] is None
    for m in (out["linear"]["val"], out["knn"]["val"]):
        assert math.isnan(m["auroc"]) or 0.0 <= m["auroc"] <= 1.0
        assert 0.0 <= m["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="classification task"):
        probe_task("synth-seg", cohort, enc)
