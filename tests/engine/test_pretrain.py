"""Local UltraMIM engine: schedule, optimiser groups, determinism, divergence, FedProx, single site."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ultrafed.data.datasets import UltraMIMDataset, make_loader
from ultrafed.data.sites import load_site
from ultrafed.data.synth import make_cohort
from ultrafed.engine.checkpoint import load_checkpoint
from ultrafed.engine.device import select_device
from ultrafed.engine.pretrain import (
    NonFiniteLossError,
    build_optimizer,
    lr_at,
    pretrain_single_site,
    scaled_lr,
    train_local,
)
from ultrafed.models.mae import build_mae

torch.set_num_threads(1)
MIC = {"p": 0.5, "p_each": 0.5, "motion_kernel": 24, "gauss_sigma": 1.1, "sp_amount": 0.05}
OPT = {"peak_lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_steps": 1, "total_steps": 4}


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), sites=1, per_site=8, seed=0, size=96, progress=None)[0]


@pytest.fixture(scope="module")
def dataset(site_dir):
    return UltraMIMDataset(load_site(site_dir).records, img_size=64, patch_size=16, smat=False, mic=MIC, seed=0)


def tiny(seed: int = 0):
    return build_mae("tiny", 64, 16, decoder_dim=64, decoder_depth=1, decoder_heads=2, seed=seed)


# -- schedule and optimiser ------------------------------------------------------------------
def test_lr_schedule_hand_values():
    kw = {"peak_lr": 1.0, "warmup_steps": 4, "total_steps": 12}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0                                  # cosine starts at the peak
    assert lr_at(8, **kw) == pytest.approx(0.5)                   # half way: cos(pi/2) = 0
    assert lr_at(6, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(12, **kw) == 0.0 and lr_at(50, **kw) == 0.0      # done: min_lr
    assert lr_at(8, **kw, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(0, peak_lr=2.0, warmup_steps=0, total_steps=10) == 2.0  # no warmup
    with pytest.raises(ValueError):
        lr_at(-1, **kw)


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(1.5e-4, 32) == pytest.approx(1.875e-5)


def test_optimizer_groups_skip_decay_on_norms_biases_tokens():
    m = tiny()
    opt = build_optimizer(m, 1e-3, 0.05, (0.9, 0.95))
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    named = dict(m.named_parameters())
    for name in ("encoder.cls_token", "mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias",
                 "decoder_norm.bias"):
        assert id(named[name]) in ids[1], name
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder_pred.weight"):
        assert id(named[name]) in ids[0], name
    assert len(ids[0]) + len(ids[1]) == len(named) and not ids[0] & ids[1]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown choice 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


# -- training ---------------------------------------------------------------------------------
def run(dataset, seed: int = 0, **kw):
    loader = make_loader(dataset, 4, 0, seed=seed)  # 8 images -> 2 steps per epoch
    return train_local(tiny(), loader, **{"epochs": 1, "seed": seed, **OPT, **kw})


def test_same_seed_same_weights_and_metrics(dataset):
    steps = []
    a = run(dataset, on_step=lambda s, m: steps.append((s, m["lr"])))
    b = run(dataset)
    c = run(dataset, seed=1)
    assert a.state.keys() == b.state.keys() == tiny().state_dict().keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert any(not torch.equal(a.state[k], c.state[k]) for k in a.state)
    init = tiny().state_dict()
    assert not torch.equal(a.state["encoder.blocks.0.attn.qkv.weight"], init["encoder.blocks.0.attn.qkv.weight"])
    assert a.steps == 2 and a.metrics["steps"] == 2 and a.metrics["images"] == 8
    assert set(a.metrics) == {"loss", "last_loss", "images", "steps", "seconds", "img_per_s"}
    assert math.isfinite(a.metrics["loss"]) and a.metrics["img_per_s"] > 0
    assert steps == [(0, 1e-3), (1, pytest.approx(lr_at(1, **{k: OPT[k] for k in ("peak_lr", "warmup_steps", "total_steps")})))]
    assert all(v.device.type == "cpu" for v in a.state.values())


def test_schedule_continues_from_step_offset_and_optimizer_state(dataset):
    first = run(dataset)
    seen = []
    second = run(dataset, step_offset=2, optimizer_state=first.optimizer_state,
                 on_step=lambda s, m: seen.append((s, m["lr"])))
    sched = {k: OPT[k] for k in ("peak_lr", "warmup_steps", "total_steps")}
    assert seen == [(2, pytest.approx(lr_at(2, **sched))), (3, pytest.approx(lr_at(3, **sched)))]
    # AdamW kept its moments: the step counter continues
    assert float(second.optimizer_state["state"][0]["step"]) == 4.0
    assert float(first.optimizer_state["state"][0]["step"]) == 2.0
    assert dataset.epoch == 1  # the augmentation epoch is the global one: step_offset // steps_per_epoch


def test_uniform_masking_option_differs_from_tgm(dataset):
    tgm, uniform = run(dataset), run(dataset, tgm_strength=None)
    assert math.isfinite(uniform.metrics["loss"])
    assert not torch.equal(tgm.state["decoder_pred.weight"], uniform.state["decoder_pred.weight"])
    # strength 0 draws exactly MAE's uniform masks from the same generator stream
    zero = run(dataset, tgm_strength=0.0)
    assert all(torch.equal(zero.state[k], uniform.state[k]) for k in zero.state)


def test_texture_computed_when_the_loader_has_none(dataset):
    batch = next(iter(make_loader(dataset, 4, 0, seed=0)))
    without = [{"input": batch["input"], "target": batch["target"]}]
    a = train_local(tiny(), [batch], epochs=1, **OPT)
    b = train_local(tiny(), without, epochs=1, **OPT)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_nan_data_raises_typed_error():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g)
    bad = torch.full_like(x, float("nan"))  # a broken input (the clean target is fine)
    batches = [{"input": x, "target": x}, {"input": bad, "target": x}]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 8") as e:
        train_local(tiny(), batches, epochs=1, step_offset=7, progress=False, **{**OPT, "total_steps": 20})
    assert e.value.step == 8 and math.isnan(e.value.loss)


def test_huge_lr_diverges_with_typed_error():
    g = torch.Generator().manual_seed(0)
    batches = [{"input": (x := torch.rand(2, 1, 64, 64, generator=g)), "target": x} for _ in range(6)]
    with pytest.raises(NonFiniteLossError):
        train_local(tiny(), batches, epochs=1, **{**OPT, "peak_lr": 1e36, "warmup_steps": 0, "total_steps": 100})


def test_fedprox_term_hand_computed(dataset):
    batch = next(iter(make_loader(dataset, 4, 0, seed=0)))
    model = tiny()
    n_params = sum(p.numel() for p in model.parameters())
    shifted = {k: v + 0.01 for k, v in model.state_dict().items()}
    mu = 0.5
    res = train_local(model, [batch], epochs=1, prox_mu=mu, global_state=shifted, **OPT)
    # one step, taken at the initial weights: (mu/2) * sum (0.01)^2 over every trainable value
    assert res.metrics["prox_loss"] == pytest.approx(mu / 2 * 1e-4 * n_params, rel=1e-3)
    with pytest.raises(ValueError, match="global_state"):
        train_local(tiny(), [batch], epochs=1, prox_mu=0.1, **OPT)


def test_empty_loader_and_bad_epochs(dataset):
    with pytest.raises(ValueError, match="no batches"):
        train_local(tiny(), [], epochs=1, **OPT)
    with pytest.raises(ValueError, match="epochs"):
        train_local(tiny(), [object()], epochs=0, **OPT)


def test_pretrain_single_site_writes_checkpoint_and_metrics(site_dir, tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg.replace(**{"pretrain.epochs": 1, "pretrain.batch_size": 4})
    site = shutil.copytree(site_dir, tmp_path / "site-0")
    n_train = len(load_site(site).select(["train"]))
    (site / "images" / "zz_broken.png").write_bytes(b"")  # a bad file must not stop the run
    with open(site / "labels.csv", "a") as f:
        f.write("zz_broken,normal,linear,train,96,96\n")
    metrics = pretrain_single_site(cfg, site, tmp_path / "run", progress=False)
    assert metrics["n_files"] == n_train and metrics["n_images"] == 2 * n_train  # SMAT copies count
    assert metrics["skipped"] == 1 and metrics["steps"] == (2 * n_train) // 4
    info = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt", sha256=info["sha256"])
    assert info["params_hash"] == ckpt["params_hash"] == cfg.params_hash()
    assert "zz_broken.png: zero-byte file" in info["problems"][0]
    model = tiny()
    model.load_state_dict(ckpt["model"])
    assert ckpt["format"] == "ultrafed-mae/1" and ckpt["metrics"]["loss"] == metrics["loss"]
    out = capsys.readouterr().out
    assert "pretrained site-0" in out and "1 skipped" in out


def test_progress_bar_names_the_site_and_round(dataset, capsys):
    batch = next(iter(make_loader(dataset, 4, 0, seed=0)))
    train_local(tiny(), [batch, batch], epochs=1, progress="site-3 round 2", **OPT)
    err = capsys.readouterr().err
    assert "site-3 round 2" in err and "2/2" in err


def test_pretrain_single_site_without_usable_images(tmp_path, tiny_cfg):
    site = tmp_path / "site-x"
    (site / "images").mkdir(parents=True)
    (site / "images" / "a.png").write_bytes(b"")
    (site / "images" / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError) as e:
        pretrain_single_site(tiny_cfg, site, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{site}: no usable images") and "2 unreadable" in msg and "a.png: zero-byte" in msg
    assert not (tmp_path / "run").exists()
