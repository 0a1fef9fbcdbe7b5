"""Pictures of a site's images: when they are drawn, and that a federation site keeps them at home."""
from __future__ import annotations

import pytest

from ultrafed.config import load_config
from ultrafed.federated.client import picture_due, site_validate
from ultrafed.federated.local import MemoryStateStore
from ultrafed.models.mae import mae_from_config


@pytest.mark.parametrize("every, due", [(5, [0, 5, 9]), (1, list(range(10))), (0, [])])
def test_pictures_in_round_0_every_nth_and_the_last(every, due):
    cfg = load_config(overrides={"tracking.picture_every": every, "federated.rounds": 10})
    assert [r for r in range(10) if picture_due(cfg, r)] == due


def test_a_site_that_keeps_pictures_writes_them_to_its_work_dir(tmp_path):
    from ultrafed.data.synth import make_cohort
    from ultrafed.federated.transfer import state_sha256

    make_cohort(tmp_path / "c", 1, 10, seed=0, size=32, progress=None)
    cfg = load_config(overrides={"model.img_size": 32, "model.decoder_depth": 1, "model.decoder_dim": 32,
                                 "model.decoder_heads": 1, "federated.rounds": 3})
    store = MemoryStateStore()
    state = mae_from_config(cfg.model, seed=0).state_dict()
    uri = store.put(state, None, "g")
    out = site_validate("site-0", cfg, global_uri=uri, global_sha256=state_sha256(state), root=tmp_path / "c" / "site-0",
                        work_dir=tmp_path / "work", store=store, round_idx=2, pictures_at_site=True)
    assert out["n_val"] > 0 and out["val_loss"] > 0
    pics = list((tmp_path / "work" / "pictures").rglob("*.png"))
    assert [p.relative_to(tmp_path / "work").as_posix() for p in pics] == ["pictures/round-002/site-0.png"]
    assert pics[0].read_bytes()[:4] == b"\x89PNG"
    site_validate("site-0", cfg, global_uri=uri, global_sha256=state_sha256(state), root=tmp_path / "c" / "site-0",
                  work_dir=tmp_path / "work", store=store, round_idx=1, pictures_at_site=True)
    assert len(list((tmp_path / "work" / "pictures").rglob("*.png"))) == 1  # round 1 of 3 is not due
