"""Our aggregation against Flower's reference implementations (flwr 1.x) on random inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrafed.federated import SiteUpdate, aggregate, fedavg

flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")

SHAPES = {"patch_embed.proj.weight": (8, 1, 4, 4), "blocks.0.attn.qkv.bias": (24,), "cls_token": (1, 1, 8)}


def random_round(seed: int, k: int) -> tuple[dict[str, torch.Tensor], list[SiteUpdate]]:
    rng = np.random.default_rng(seed)
    glob = {name: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for name, s in SHAPES.items()}
    updates = [SiteUpdate(f"s{i}", {name: torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                                    for name, s in SHAPES.items()},
                          int(rng.integers(1, 500)), loss=float(rng.uniform(0.2, 2.0)))
               for i in range(k)]
    return glob, updates


def as_flower(u: SiteUpdate) -> tuple[list[np.ndarray], int]:
    return [u.state[name].numpy() for name in SHAPES], u.n


def assert_equal_to_flower(ours: dict[str, torch.Tensor], theirs: list[np.ndarray]) -> None:
    for name, ref in zip(SHAPES, theirs):
        np.testing.assert_allclose(ours[name].numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed, k", [(0, 2), (1, 3), (2, 7)])
def test_fedavg_matches_flower_aggregate(seed, k):
    _, updates = random_round(seed, k)
    theirs = flwr_aggregate.aggregate([as_flower(u) for u in updates])
    assert_equal_to_flower(fedavg([(u.state, u.n) for u in updates]), theirs)


@pytest.mark.parametrize("seed, k", [(3, 4), (4, 5)])
def test_median_matches_flower(seed, k):
    glob, updates = random_round(seed, k)
    theirs = flwr_aggregate.aggregate_median([as_flower(u) for u in updates])
    assert_equal_to_flower(aggregate("median", glob, updates).state, theirs)


@pytest.mark.parametrize("seed, k, beta", [(5, 5, 0.2), (6, 10, 0.3), (7, 4, 0.25)])
def test_trimmed_mean_matches_flower(seed, k, beta):
    glob, updates = random_round(seed, k)
    theirs = flwr_aggregate.aggregate_trimmed_avg([as_flower(u) for u in updates], proportiontocut=beta)
    assert_equal_to_flower(aggregate("trimmed_mean", glob, updates, beta=beta).state, theirs)


@pytest.mark.parametrize("q, lr", [(0.2, 0.1), (1.0, 0.5), (3.0, 0.05)])
def test_qfedavg_matches_flower_qffl(q, lr):
    # Flower's QFedAvg.aggregate_fit builds deltas and h from (global - local) / lr and the loss
    # (+1e-10), then calls aggregate_qffl; we reproduce that preamble, L = 1/lr.
    glob, updates = random_round(8, 4)
    w0 = [glob[name].numpy().astype(np.float64) for name in SHAPES]
    deltas, hs = [], []
    for u in updates:
        grads = [(a - b) / lr for a, b in zip(w0, as_flower(u)[0])]
        loss = u.loss + 1e-10
        sq = sum(float(np.sum(np.square(g))) for g in grads)
        deltas.append([loss ** q * g for g in grads])
        hs.append(q * loss ** (q - 1) * sq + (1 / lr) * loss ** q)
    theirs = flwr_aggregate.aggregate_qffl(w0, deltas, hs)
    ours = aggregate("qfedavg", glob, updates, q=q, lipschitz=1 / lr).state
    assert_equal_to_flower(ours, theirs)


def test_fedavgm_two_rounds_match_flower_fedavgm():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvgM

    glob, r1 = random_round(9, 3)
    _, r2 = random_round(10, 3)
    flower = FedAvgM(initial_parameters=ndarrays_to_parameters([glob[n].numpy() for n in SHAPES]),
                     server_learning_rate=0.7, server_momentum=0.9)
    state, server_state = glob, None
    for rnd, updates in ((1, r1), (2, r2)):
        fit = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(as_flower(u)[0]), u.n, {}))
               for u in updates]
        params, _ = flower.aggregate_fit(rnd, fit, [])
        res = aggregate("fedavgm", state, updates, server_state, server_lr=0.7, momentum=0.9)
        assert_equal_to_flower(res.state, parameters_to_ndarrays(params))
        state, server_state = res.state, res.server_state
