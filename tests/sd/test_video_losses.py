"""The video losses on a tiny random CLIP: the frame average, the temporal term, their
gradients against central differences, and the inputs they refuse."""

import pytest
import torch
from helpers import WRONG_GRADIENT, RoundingChain, pair_bound, rel, roundoff_bound, seeded

from sagkit.sd.clip import (
    ImageSimilarityLoss,
    StyleLoss,
    TextSimilarityLoss,
    cosine_distance,
    image_embeddings,
)
from sagkit.sd.tiny import tiny_clip_vision
from sagkit.sd.video_losses import (
    FrameAverage,
    TemporalConsistency,
    TemporallyRegularised,
    check_video,
    video_style_loss,
)


def video(batch=2, frames=3, size=(16, 20), seed=0):
    """A video in [-1, 1], (B, 3, F, H, W), float64, every frame different."""
    return torch.rand(batch, 3, frames, *size, dtype=torch.float64, generator=seeded(seed)) * 2 - 1


def reference(seed=1):
    return torch.rand(1, 3, 24, 24, dtype=torch.float64, generator=seeded(seed)) * 2 - 1


def test_frame_average_is_the_mean_of_the_per_frame_losses(vision):
    """(1/F) Σ_f ℓ(x_f) for the style, CLIP-I and text losses, ℓ called on x[:, :, f]."""
    x = video()
    text = image_embeddings(vision, video(frames=1, seed=3)[:, :, 0])  # one per sample, (2, E)
    for image_loss in (
        StyleLoss(vision, reference()),
        ImageSimilarityLoss(vision, reference()),
        TextSimilarityLoss(vision, text),
    ):
        got = FrameAverage(image_loss)(x)
        per_frame = torch.stack([image_loss(x[:, :, f]) for f in range(x.shape[2])])
        # the same calls on the same frames, in float64: the same roundings, then one mean
        assert got.shape == (2,) and torch.equal(got, per_frame.mean(dim=0))
        assert not torch.allclose(per_frame[0], per_frame[1])  # the frames differ


def test_temporal_consistency_is_the_mean_cosine_distance_of_consecutive_frames(vision):
    x = video(frames=4)
    with RoundingChain() as chain:
        got = TemporalConsistency(vision)(x)  # the B·F frames in one batch
        e = [image_embeddings(vision, x[:, :, f]) for f in range(4)]  # frame by frame
        want = torch.stack([cosine_distance(e[f + 1], e[f]) for f in range(3)]).mean(dim=0)
    # one exact quantity computed twice in float64, each within γ̃ of its counted chain
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    assert got.shape == (2,) and rel(got, want) <= pair_bound(*bounds)


def test_temporal_consistency_is_zero_for_a_still_video_and_positive_otherwise(vision):
    term = TemporalConsistency(vision)
    moving = video(frames=4)
    still = moving[:, :, :1].expand(-1, -1, 4, -1, -1)  # frame 0 four times
    with RoundingChain() as chain:
        zero, positive = term(still), term(moving)
        backwards = term(moving.flip(2))  # the same consecutive pairs, each the other way
    # T = 1 − cos(e, e) with cos = 1 computed to a relative γ̃_N (N its counted chain)
    bound = roundoff_bound(chain.longest(zero), torch.float64)
    assert zero.abs().max() <= bound
    assert positive.min() > bound
    # one exact quantity computed twice in float64, each within γ̃ of its counted chain
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (backwards, positive))
    assert rel(backwards, positive) <= pair_bound(*bounds)


def test_video_style_loss_is_the_frame_average_plus_the_weighted_temporal_term(vision):
    x, ref = video(), reference()
    style = FrameAverage(StyleLoss(vision, ref))(x)
    assert torch.equal(video_style_loss(vision, ref)(x), style)
    combined = video_style_loss(vision, ref, temporal=0.5)
    assert isinstance(combined, TemporallyRegularised) and combined.weight == 0.5
    # the same calls on the same frames, then one multiply and one add
    assert torch.equal(combined(x), style + 0.5 * TemporalConsistency(vision)(x))
    one_frame = video(frames=1)
    assert video_style_loss(vision, ref)(one_frame).shape == (2,)  # no temporal term: F = 1 is fine


LOSSES = {
    "frame-average-style": lambda v: FrameAverage(StyleLoss(v, reference())),
    "frame-average-clip-i": lambda v: FrameAverage(ImageSimilarityLoss(v, reference())),
    "temporal": lambda v: TemporalConsistency(v),
    "video-style-with-temporal": lambda v: video_style_loss(v, reference(), temporal=0.5),
}


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_matches_central_differences(vision, name):
    """⟨∂L/∂x, v⟩ by autograd against (4 D(δ/2) − D(δ))/3, D the central difference."""
    loss = LOSSES[name](vision)
    x, v = video(batch=1), video(batch=1, seed=7)
    leaf = x.clone().requires_grad_()
    with RoundingChain() as chain:
        value = loss(leaf).sum()
    (grad,) = torch.autograd.grad(value, leaf)
    delta = 1e-4

    def central(d):
        return float(loss(x + d * v).sum() - loss(x - d * v).sum()) / (2 * d)

    with torch.no_grad():
        fd = (4 * central(delta / 2) - central(delta)) / 3  # Richardson: O(δ⁴)
    # each loss value is off by ≤ γ̃_N |L| (N its counted chain), weighed by 3/δ in all; the
    # truncation f⁽⁵⁾δ⁴/480 is 2e-19 f⁽⁵⁾, negligible
    bound = 3 * roundoff_bound(chain.longest(value), torch.float64) * abs(value.item()) / delta
    directional = float((grad * v).sum())
    assert bound < WRONG_GRADIENT * abs(directional)  # the check can tell a wrong gradient
    assert abs(directional - fd) <= bound


# --- inputs refused, each with a clear error naming the argument ---------------------------


def _vision32():
    return tiny_clip_vision()


BAD = [
    ("video-4d", lambda v: FrameAverage(StyleLoss(v, reference().float()))(torch.zeros(2, 3, 8, 8)),
     ValueError, r"\(B, C, F, H, W\).*x\[:, :, None\]"),
    ("video-frames-first", lambda v: TemporalConsistency(v)(torch.zeros(1, 4, 3, 8, 8)),
     ValueError, r"\(B, C, F, H, W\).*permute\(0, 2, 1, 3, 4\)"),
    ("video-rank-6", lambda v: check_video(torch.zeros(1, 3, 2, 8, 8, 1)),
     ValueError, r"\(B, C, F, H, W\)"),
    ("video-1-channel", lambda v: check_video(torch.zeros(1, 1, 2, 8, 8)),
     ValueError, r"\(B, C, F, H, W\)"),
    ("video-uint8", lambda v: check_video(torch.zeros(1, 3, 2, 8, 8, dtype=torch.uint8)),
     TypeError, r"video.*127\.5"),
    ("video-list", lambda v: check_video([[0.0]]), TypeError, r"video must be a torch\.Tensor"),
    ("video-empty-batch", lambda v: check_video(torch.zeros(0, 3, 2, 8, 8)),
     ValueError, r"B, H, W >= 1"),
    ("video-0-frames", lambda v: FrameAverage(lambda x: x.sum((1, 2, 3)))(torch.zeros(1, 3, 0, 8, 8)),
     ValueError, r"F >= 1"),
    ("temporal-1-frame", lambda v: TemporalConsistency(v)(torch.zeros(2, 3, 1, 8, 8)),
     ValueError, r"F >= 2"),
    ("image-loss-not-callable", lambda v: FrameAverage("style"), TypeError, r"image_loss"),
    ("image-loss-scalar", lambda v: FrameAverage(lambda x: x.sum())(torch.zeros(2, 3, 2, 8, 8)),
     ValueError, r"image_loss must return one loss per image, shape \(2,\)"),
    ("image-loss-not-tensor", lambda v: FrameAverage(lambda x: 1.0)(torch.zeros(2, 3, 2, 8, 8)),
     ValueError, r"image_loss must return"),
    ("vision-model-none", lambda v: TemporalConsistency(None), TypeError, r"vision_model"),
    ("vision-model-module", lambda v: video_style_loss(torch.nn.Linear(2, 2), reference()),
     TypeError, r"vision_model"),
    ("mean-2-values", lambda v: TemporalConsistency(v, mean=(0.5, 0.5)), ValueError, r"mean"),
    ("std-zero", lambda v: TemporalConsistency(v, std=(0.2, 0.0, 0.2)), ValueError, r"std"),
    ("std-text", lambda v: video_style_loss(v, reference(), std="abc"), ValueError, r"std"),
    ("temporal-negative", lambda v: video_style_loss(v, reference(), temporal=-1.0),
     ValueError, r"temporal"),
    ("temporal-text", lambda v: video_style_loss(v, reference(), temporal="0.5"),
     TypeError, r"temporal"),
    ("temporal-nan", lambda v: video_style_loss(v, reference(), temporal=float("nan")),
     ValueError, r"temporal"),
    ("regularised-weight-missing-term", lambda v: TemporallyRegularised(lambda x: x, None, weight=1.0),
     TypeError, r"temporal"),
    ("reference-0-255", lambda v: video_style_loss(v, reference() * 127.5 + 127.5),
     ValueError, r"reference"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exception", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_inputs_raise_clear_errors(call, exception, message):
    with pytest.raises(exception, match=message):
        call(_vision32())
