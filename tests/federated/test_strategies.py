"""Each strategy on tiny states with expectations derived by hand (Prepare / Execute / Assert)."""
from __future__ import annotations

import math

import pytest
import torch

from ultrafed.federated import STRATEGIES, SiteUpdate, aggregate, fedavg, proximal_term, resolve_params

from ._states import A, B, C, D, E, F64, st, zeros


def close(state: dict[str, torch.Tensor], w: list[float], b: list[float]) -> None:
    torch.testing.assert_close(state["w"], torch.tensor(w, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["b"], torch.tensor(b, dtype=F64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- fedavg
def test_fedavg_weighted_by_volume():
    # Prepare: A (n=1) w=[1,2] b=0; B (n=3) w=[3,6] b=4
    # Execute
    out = fedavg([(A.state, A.n), (B.state, B.n)])
    # Assert: w = (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5]; b = (0 + 12) / 4 = 3
    close(out, [2.5, 5.0], [3.0])


def test_fedavg_uniform_ignores_volume():
    out = fedavg([(A.state, A.n), (B.state, B.n)], weighted=False)
    close(out, [2.0, 4.0], [2.0])  # plain mean


def test_fedavg_integer_buffer_comes_from_largest_update():
    out = fedavg([(A.state, 1), (B.state, 3), (C.state, 3)])
    assert out["steps"].dtype == torch.int64
    assert int(out["steps"]) == 33  # B: largest n, first on the tie with C


def test_fedavg_streams_a_generator_and_keeps_dtype():
    # float32 inputs from a one-shot generator: result float32, equal to the list result
    def gen():
        for u in (A, B, C):
            yield {k: v.float() if v.is_floating_point() else v for k, v in u.state.items()}, u.n
    out = fedavg(gen())
    assert out["w"].dtype == torch.float32
    # (1*[1,2] + 3*[3,6] + 2*[2,-1]) / 6 = [14/6, 18/6]
    torch.testing.assert_close(out["w"], torch.tensor([14 / 6, 3.0]))


def test_fedavg_does_not_mutate_inputs():
    before = {k: v.clone() for k, v in A.state.items()}
    fedavg([(A.state, 1), (B.state, 3)])
    for k in before:
        assert torch.equal(A.state[k], before[k])


@pytest.mark.parametrize("updates, message", [
    ([], "no updates"),
    ([(st([1, 2], [0]), 0), (st([3, 4], [0]), 0)], "n=0"),
    ([(st([1, 2], [0]), -1)], "invalid image count"),
    ([(st([1, 2], [0]), 1), ({"w": torch.zeros(2, dtype=F64)}, 1)], "keys differ"),
    ([(st([1, 2], [0]), 1), (st([1, 2, 3], [0]), 1)], "update 1 tensor 'w'"),
])
def test_fedavg_rejects_bad_input_with_one_line(updates, message):
    with pytest.raises(ValueError, match=message) as e:
        fedavg(updates)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- robust strategies
def test_median_odd_k():
    # w0: (1,3,2) -> 2; w1: (2,6,-1) -> 2; b: (0,4,10) -> 4
    res = aggregate("median", zeros(), [A, B, C])
    close(res.state, [2.0, 2.0], [4.0])
    assert res.weights == pytest.approx({"A": 1 / 3, "B": 1 / 3, "C": 1 / 3})


def test_median_even_k_averages_the_two_middle_values():
    # w0: 0,1,2,3 -> 1.5; w1: -1,2,5,6 -> 3.5; b: 0,1,4,10 -> 2.5
    res = aggregate("median", zeros(), [A, B, C, D])
    close(res.state, [1.5, 3.5], [2.5])
    assert int(res.state["steps"]) == 33  # largest n (B and D have 3; B first)


def test_trimmed_mean_drops_extremes():
    # K=5, beta=0.2 -> cut 1 each side. w0: 0,[1,2,3],100 -> 2; w1: -100,[-1,2,5],6 -> 2;
    # b: 0,[1,4,7],10 -> 4. The plain mean of w0 would be 21.2 (E's 100 dominates).
    res = aggregate("trimmed_mean", zeros(), [A, B, C, D, E], beta=0.2)
    close(res.state, [2.0, 2.0], [4.0])


def test_trimmed_mean_with_nothing_to_cut_is_the_uniform_mean():
    res = aggregate("trimmed_mean", zeros(), [A, B, C], beta=0.1)  # floor(0.3) = 0
    close(res.state, [2.0, 7 / 3], [14 / 3])


# ------------------------------------------------------------------- server optimisers
def test_fedavgm_two_rounds_with_state_fed_back():
    lr, beta = 0.5, 0.9
    # Round 1 from 0: mean delta D1 = weighted fedavg(A,B) = w [2.5,5], b [3]
    # m1 = D1; x1 = 0 + 0.5 m1 = w [1.25, 2.5], b [1.5]
    r1 = aggregate("fedavgm", zeros(), [A, B], server_lr=lr, momentum=beta)
    close(r1.state, [1.25, 2.5], [1.5])
    close(r1.server_state["momentum"], [2.5, 5.0], [3.0])
    # Round 2 from x1: sites at x1 + [1,0] and x1 + [0,2] (n=1 each) -> D2 = w [0.5, 1], b [0]
    a2 = SiteUpdate("A", st([2.25, 2.5], [1.5]), 1)
    b2 = SiteUpdate("B", st([1.25, 4.5], [1.5]), 1)
    r2 = aggregate("fedavgm", r1.state, [a2, b2], r1.server_state, server_lr=lr, momentum=beta)
    # m2 = 0.9 m1 + D2 = w [2.75, 5.5], b [2.7]; x2 = x1 + 0.5 m2 = w [2.625, 5.25], b [2.85]
    close(r2.server_state["momentum"], [2.75, 5.5], [2.7])
    close(r2.state, [2.625, 5.25], [2.85])


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg():
    res = aggregate("fedavgm", zeros(), [A, B, C], server_lr=1.0, momentum=0.0)
    ref = fedavg([(u.state, u.n) for u in (A, B, C)])
    close(res.state, ref["w"].tolist(), ref["b"].tolist())


def test_fedadam_two_rounds_with_state_fed_back():
    lr, b1, b2, tau = 1.0, 0.5, 0.5, 1.0
    g0 = {"w": torch.zeros(2, dtype=F64), "steps": torch.tensor(0)}
    # Round 1: weighted mean of [-1,-5] (n=1) and [2,-8] (n=2) = [1, -7] = D1
    u1 = [SiteUpdate("A", {"w": torch.tensor([-1.0, -5.0], dtype=F64), "steps": torch.tensor(3)}, 1),
          SiteUpdate("B", {"w": torch.tensor([2.0, -8.0], dtype=F64), "steps": torch.tensor(4)}, 2)]
    r1 = aggregate("fedadam", g0, u1, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    # m1 = 0.5 D1 = [0.5, -3.5]; v1 = 0.5 tau^2 + 0.5 D1^2 = [1, 25]
    # x1 = m1 / (sqrt(v1) + 1) = [0.5/2, -3.5/6] = [0.25, -7/12]
    x1 = torch.tensor([0.25, -7 / 12], dtype=F64)
    torch.testing.assert_close(r1.server_state["m"]["w"], torch.tensor([0.5, -3.5], dtype=F64))
    torch.testing.assert_close(r1.server_state["v"]["w"], torch.tensor([1.0, 25.0], dtype=F64))
    torch.testing.assert_close(r1.state["w"], x1)
    assert int(r1.state["steps"]) == 4 and "steps" not in r1.server_state["m"]
    # Round 2: sites at x1 + [0,4] and x1 + [2,6], n=1 each -> D2 = [1, 5]
    u2 = [SiteUpdate("A", {"w": x1 + torch.tensor([0.0, 4.0], dtype=F64), "steps": torch.tensor(5)}, 1),
          SiteUpdate("B", {"w": x1 + torch.tensor([2.0, 6.0], dtype=F64), "steps": torch.tensor(6)}, 1)]
    r2 = aggregate("fedadam", r1.state, u2, r1.server_state, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    # m2 = 0.5 m1 + 0.5 D2 = [0.75, 0.75]; v2 = 0.5 v1 + 0.5 D2^2 = [1, 25]
    # x2 = x1 + m2 / (sqrt(v2) + 1) = [0.25 + 0.375, -7/12 + 0.125] = [0.625, -11/24]
    torch.testing.assert_close(r2.server_state["m"]["w"], torch.tensor([0.75, 0.75], dtype=F64))
    torch.testing.assert_close(r2.state["w"], torch.tensor([0.625, -11 / 24], dtype=F64))


def test_server_state_is_returned_not_mutated():
    r1 = aggregate("fedavgm", zeros(), [A, B], server_lr=0.5, momentum=0.9)
    saved = {k: v.clone() for k, v in r1.server_state["momentum"].items()}
    aggregate("fedavgm", r1.state, [A, B], r1.server_state, server_lr=0.5, momentum=0.9)
    for k in saved:
        assert torch.equal(r1.server_state["momentum"][k], saved[k])


def test_server_state_from_another_strategy_is_refused():
    r1 = aggregate("fedavgm", zeros(), [A, B])
    with pytest.raises(ValueError, match="fedadam: server_state has keys"):
        aggregate("fedadam", r1.state, [A, B], r1.server_state)


# ------------------------------------------------------------------------------ q-FedAvg
def test_qfedavg_q0_is_uniform_fedavg():
    # q=0: D_k = L (w - w_k), h_k = L -> w - sum L (w - w_k) / (K L) = uniform mean, any L and loss
    a = SiteUpdate("A", A.state, 1, loss=0.3)
    b = SiteUpdate("B", B.state, 3, loss=5.0)
    res = aggregate("qfedavg", zeros(), [a, b], q=0.0, lipschitz=7.0)
    close(res.state, [2.0, 4.0], [2.0])
    assert res.weights == pytest.approx({"A": 0.5, "B": 0.5})


def test_qfedavg_q1_favours_the_site_with_higher_loss():
    g = {"w": torch.zeros(1, dtype=F64)}
    a = SiteUpdate("A", {"w": torch.tensor([1.0], dtype=F64)}, 1, loss=1.0)
    b = SiteUpdate("B", {"w": torch.tensor([3.0], dtype=F64)}, 1, loss=2.0)
    res = aggregate("qfedavg", g, [a, b], q=1.0, lipschitz=1.0)
    # dw_A = -1, D_A = 1*-1 = -1, h_A = 1*1*1 + 1*1 = 2; dw_B = -3, D_B = 2*-3 = -6, h_B = 9 + 2 = 11
    # w = 0 - (-7)/13 = 7/13; weights c_k = L F_k^q / 13 = 1/13, 2/13
    torch.testing.assert_close(res.state["w"], torch.tensor([7 / 13], dtype=F64))
    assert res.weights == pytest.approx({"A": 1 / 13, "B": 2 / 13})


def test_qfedavg_needs_every_loss():
    with pytest.raises(ValueError, match="site 'A' needs a finite loss"):
        aggregate("qfedavg", zeros(), [A, SiteUpdate("B", B.state, 3, loss=1.0)])


# ----------------------------------------------------------------------- the interface
def test_fedavg_strategy_reports_site_weights():
    res = aggregate("fedavg", zeros(), [A, B])
    assert res.weights == pytest.approx({"A": 0.25, "B": 0.75})
    assert res.server_state == {}
    res_u = aggregate("fedavg_uniform", zeros(), [A, B])
    close(res_u.state, [2.0, 4.0], [2.0])


def test_fedprox_server_side_is_fedavg():
    res = aggregate("fedprox", zeros(), [A, B], mu=0.1)
    close(res.state, [2.5, 5.0], [3.0])


def test_every_strategy_runs_and_resolves_defaults():
    updates = [SiteUpdate(u.site, u.state, u.n, loss=1.0) for u in (A, B, C)]
    for name in STRATEGIES:
        res = aggregate(name, zeros(), updates)
        assert set(res.state) == {"w", "b", "steps"}
        assert all(torch.isfinite(t).all() for t in res.state.values())
        assert set(res.weights) == {"A", "B", "C"}
    assert resolve_params("fedadam", {"tau": 0.5}) == {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 0.5}


@pytest.mark.parametrize("name, params, message", [
    ("fedsgd", {}, "unknown aggregation strategy 'fedsgd'"),
    ("fedavg", {"mu": 0.1}, "strategy 'fedavg': unknown parameter"),
    ("fedavgm", {"momentum": 1.0}, "momentum must be in"),
    ("trimmed_mean", {"beta": 0.5}, "beta must be in"),
    ("fedadam", {"tau": 0.0}, "tau must be > 0"),
])
def test_bad_strategy_settings_fail_with_one_line(name, params, message):
    with pytest.raises(ValueError, match=message) as e:
        aggregate(name, zeros(), [A, B], **params)
    assert "\n" not in str(e.value)


def test_duplicate_site_is_refused():
    with pytest.raises(ValueError, match="two updates for site 'A'"):
        aggregate("fedavg", zeros(), [A, A])


def test_update_keys_must_match_the_global_state():
    bad = SiteUpdate("X", {"w": torch.zeros(2, dtype=F64)}, 1)
    with pytest.raises(ValueError, match="site 'X' keys differ"):
        aggregate("median", zeros(), [A, bad])


# ------------------------------------------------------------------------------ FedProx
def test_proximal_term_value_and_gradient():
    g = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    w = torch.tensor([2.0, 0.0], requires_grad=True)
    b = torch.tensor([0.5], requires_grad=True)
    head = torch.tensor([9.0], requires_grad=True)  # not in the global state: not penalised
    term = proximal_term([("w", w), ("b", b), ("head", head)], g, mu=0.2)
    # (0.2/2) * ((2-1)^2 + (0-2)^2 + 0) = 0.1 * 5 = 0.5; d/dw = mu (w - g) = 0.2 * [1, -2]
    assert float(term.detach()) == pytest.approx(0.5)
    term.backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.2, -0.4]))
    assert head.grad is None
    assert math.isclose(float(proximal_term([("w", w)], g, mu=0.0).detach()), 0.0)
