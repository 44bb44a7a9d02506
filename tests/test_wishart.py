"""WeightMirror(wishart=True): the noise's second moment drawn as a Wishart sample matches the simulated neurons."""
import pytest
import torch

import circuits
from circuits import rules
from circuits.phases.mirror import correlation, mirror_step, settled_angle
from circuits.recording.alignment import angle

DRAWS = 4000


def layer(shape: tuple[int, ...], projection, out_shape: tuple[int, ...],
          rule: rules.WeightMirror) -> circuits.Synapse:
    c = circuits.Circuit(rule=rule)
    c.connect(c.input("x", shape=shape), c.population("y", shape=out_shape), projection)
    return c.build().double().projection("x->y")


def second_moments(synapse: circuits.Synapse, batch_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the flattened correlation over DRAWS mirror batches."""
    draws = torch.stack([correlation(synapse, batch_size, generator).flatten() for _ in range(DRAWS)])
    return draws.mean(0), torch.cov(draws.T)


def expected_covariance(w: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """Cov(C_ij, C_kl) = sigma^4 (delta_jl <W_i, W_k> + W_il W_kj) / k for C = W S / k, S ~ Wishart(sigma^2 I, k)."""
    w = w.reshape(w.shape[0], -1)
    out, n = w.shape
    eye = torch.eye(n, dtype=w.dtype)
    cov = torch.einsum("ik,jl->ijkl", w @ w.T, eye) + torch.einsum("il,kj->ijkl", w, w)
    return sigma**4 * cov.reshape(out * n, out * n) / k


@pytest.mark.parametrize("case", ["dense", "1x1 conv, stride 2"])
def test_wishart_correlations_have_the_moments_of_the_simulated_ones(case: str):
    sigma = 0.7
    if case == "dense":
        shape, projection, out_shape, batch, k = (12,), circuits.Dense(bias=False), (6,), 16, 16
    else:   # 4x4 map, stride 2: 4 output positions, each meeting its own input position
        shape, projection, out_shape, batch, k = (3, 4, 4), circuits.Conv2d(1, stride=2), (5, 2, 2), 8, 32
    torch.manual_seed(0)
    simulated = layer(shape, projection, out_shape, rules.WeightMirror(sigma=sigma))
    drawn = layer(shape, projection, out_shape, rules.WeightMirror(sigma=sigma, wishart=True))
    drawn.weight.data.copy_(simulated.weight.data)
    w = simulated.weight.detach()
    target = expected_covariance(w, sigma, k)
    for synapse, seed in ((simulated, 1), (drawn, 2)):
        mean, cov = second_moments(synapse, batch, torch.Generator().manual_seed(seed))
        se = target.diagonal().sqrt() / DRAWS**0.5
        assert ((mean - sigma**2 * w.flatten()).abs() < 5 * se).all(), synapse.rule
        variances = cov.diagonal() / target.diagonal()
        assert float(variances.mean()) == pytest.approx(1, abs=0.03), synapse.rule     # each about +-2% (4000 draws)
        assert ((variances - 1).abs() < 0.15).all(), synapse.rule
        # the whole covariance, off-diagonal structure included (its estimate scatters by about 10%)
        assert torch.linalg.matrix_norm(cov - target) < 0.2 * torch.linalg.matrix_norm(target), synapse.rule
    # the Wishart draw took the other path: its noise never passed through W, so its stream differs
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert not torch.allclose(correlation(simulated, batch, g1), correlation(drawn, batch, g2))


def test_wishart_B_settles_at_the_angle_of_the_simulated_mirror():
    """B's statistics: settled under a fixed W at the angle tan^2 theta = n lambda / (m P (2 - lambda)) predicts."""
    measured = {}
    for wishart in (False, True):
        torch.manual_seed(0)
        net = _mlp(rules.WeightMirror(eta=0.05, decay=0.05, wishart=wishart))
        for _, s in net.projections():
            s.feedback = s.weight.detach()
        for _ in range(150):
            mirror_step(net, 64)
        total = {name: 0.0 for name, _ in net.projections()}
        for _ in range(200):
            mirror_step(net, 64)
            for name, s in net.projections():
                total[name] += float(angle(s.feedback, s.weight)) / 200
        measured[wishart] = total
    for name, s in _mlp(rules.WeightMirror(eta=0.05, decay=0.05)).projections():
        predicted = settled_angle(s, 64)
        assert measured[True][name] == pytest.approx(predicted, rel=0.15), name
        assert measured[True][name] == pytest.approx(measured[False][name], rel=0.15), name


def _mlp(rule: rules.WeightMirror) -> circuits.CircuitNet:
    c = circuits.Circuit(rule=rule)
    x, h = c.input("x", shape=(48,)), c.population("h", shape=(32,), activation="relu")
    y = c.population("y", shape=(10,))
    c.connect(x, h, circuits.Dense())
    c.connect(h, y, circuits.Dense())
    return c.build()


def test_wishart_needs_gaussian_noise_and_the_linear_response():
    for bad in ({"noise": "uniform"}, {"response": "sigmoid"}):
        with pytest.raises(circuits.CircuitError, match="wishart"):
            rules.WeightMirror(wishart=True, **bad)
