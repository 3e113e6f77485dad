"""The oracle guidance method: the guided sampler on the mixture with the exact prediction shift
is the unguided sampler on the tilted mixture (docs/maths.md §14.4)."""

import pytest
import torch
from helpers import BOTH_SCHEDULES, gamma, seeded

import sagkit as sk
from sagkit.core.tilted import ExactGuidance, QuadraticLoss
from sagkit.guidance.oracle import Oracle

F64 = torch.float64


def exact_guidance(mixture):
    matrix = torch.randn(3, 4, dtype=F64, generator=seeded(1))
    loss = QuadraticLoss(matrix, matrix @ mixture.means[1].detach().flatten(), tau=0.4)
    return ExactGuidance(mixture, loss)


@BOTH_SCHEDULES
def test_the_oracle_samples_with_the_tilted_mixtures_prediction(mixture):
    """Guided DDIM on the mixture with the oracle = unguided DDIM on the tilted mixture, under
    the VP schedule (ε frame) and the flow (velocity frame), at every step."""
    exact = exact_guidance(mixture)
    x_T = torch.randn(16, *mixture.event_shape, dtype=F64, generator=seeded(0))
    steps = 12
    options = {"steps": steps, "progress": False, "return_trajectory": True}
    _, guided = sk.guided_sample(
        mixture, exact.loss, x_T, guidance=Oracle(exact), window=(0, 1), **options
    )
    _, plain = sk.guided_sample(exact.target, None, x_T, guidance="none", **options)
    # The oracle's F = F* + (F̃ − F*) equals F̃ up to the roundoff of two mixture evaluations
    # (γ_{8D} of |F| each, D = 4 pixels); a step passes an error on times the sampler's own
    # amplification, measured here by perturbing x_T in the tilted mixture's sampler.
    delta = 1e-7 * torch.randn(x_T.shape, dtype=F64, generator=seeded(2))
    _, moved = sk.guided_sample(exact.target, None, x_T + delta, guidance="none", **options)
    gain = float(((moved - plain)[-1].flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)).max())
    scale = float(plain.abs().max() + 1)
    bound = steps * 2 * gamma(8 * 4, F64) * scale * max(gain, 1.0) * 4
    assert (guided - plain).abs().max() <= bound
    # and it is guidance: the tilt moves the samples far beyond that
    assert (
        plain[-1]
        - sk.guided_sample(mixture, None, x_T, guidance="none", steps=steps, progress=False)
    ).abs().max() > 1e3 * bound


def test_the_oracle_takes_no_scale_and_needs_an_exact_guidance(mixture):
    exact = exact_guidance(mixture)
    with pytest.raises(ValueError, match="scale is not read"):
        sk.GuidanceConfig(guidance=Oracle(exact), scale=1.0)
    with pytest.raises(TypeError, match="exact must be an ExactGuidance"):
        Oracle(exact.loss)
    assert Oracle(exact).repeats == 1
