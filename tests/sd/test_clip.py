"""The CLIP losses and their differentiable preprocessing, on a tiny random CLIP."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import RoundingChain, pair_bound, rel, roundoff_bound, seeded

from sagkit.sd.clip import (
    OPENAI_CLIP_STD,
    AestheticLoss,
    ImageSimilarityLoss,
    StyleLoss,
    TextSimilarityLoss,
    image_embeddings,
    preprocess,
    resized_size,
    text_embeddings,
)
from sagkit.sd.tiny import tiny_tokenizer


def images(batch=2, shape=(20, 24), seed=0):
    """Images in [-1, 1], (B, 3, H, W), float64."""
    return torch.rand(batch, 3, *shape, dtype=torch.float64, generator=seeded(seed)) * 2 - 1


def resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The (n_out, n_in) weights of the 1-D antialiased bicubic resize n_in → n_out."""
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    out = F.interpolate(basis, size=(n_out, 1), mode="bicubic", antialias=True)
    return out.reshape(n_in, n_out).T


@pytest.mark.parametrize("shape", [(40, 40), (48, 40), (40, 52), (12, 20)])
def test_preprocess_matches_clip_image_processor(shape):
    """Downsampling, either orientation with its centre crop, and upsampling."""
    from transformers import CLIPImageProcessor

    size = 32
    crop = {"height": size, "width": size}
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop)
    # 8-bit images in [64, 192]: the resize's overshoot stays inside [0, 255] (below)
    pixels = torch.randint(64, 193, (2, 3, *shape), generator=seeded(0), dtype=torch.uint8)
    arrays = [p.permute(1, 2, 0).numpy() for p in pixels]
    want = torch.as_tensor(np.asarray(processor(arrays, return_tensors="np").pixel_values))
    got = preprocess(pixels.double() / 255 * 2 - 1, size=size)
    assert got.shape == want.shape == (2, 3, size, size)
    # PIL resizes 8-bit images in two passes (width, then height), rounding to an integer
    # after each (≤ 1/2) and with coefficients in fixed point (≤ 2⁻²³ each); torch computes
    # the same antialiased bicubic (a = −0.5) in float64. The first rounding reaches the
    # output weighed by S, the largest absolute row sum of the second pass: |Δ| ≤ (1 + S)/2
    # + 255 (K S + K) 2⁻²³ in 8-bit units (K taps a row), /255 to [0, 1], /std after norming.
    # Overshoot: |u − 128| ≤ S_h S_v · 64 ≤ 127 for S ≤ 1.4, so PIL's clipping never acts.
    h, w = resized_size(*shape, size)
    mats = [resample_matrix(*dims) for dims in ((shape[0], h), (shape[1], w))]
    s = max(float(m.abs().sum(1).max()) for m in mats)
    k = max(int((m != 0).sum(1).max()) for m in mats)
    assert s <= 1.4
    bound = ((1 + s) / 2 + 255 * (k * s + k) * 2**-23) / 255 / min(OPENAI_CLIP_STD)
    assert float((got - want).abs().max()) <= bound


def test_resized_size_is_the_processors():
    assert resized_size(40, 52, 32) == (32, 41)  # ⌊32 · 52/40⌋ = 41
    assert resized_size(48, 40, 32) == (38, 32)
    with pytest.raises(ValueError, match="crop"):
        preprocess(images(), size=16, crop=20)
    with pytest.raises(ValueError, match="images"):
        preprocess(torch.zeros(3, 8, 8), size=8)


def test_style_loss_is_the_frobenius_distance_of_gram_matrices(vision):
    """L = ‖FᵀF − F_refᵀF_ref‖_F with F the patch tokens output by encoder layer 2."""
    x, ref = images(), images(batch=1, shape=(28, 28), seed=1)
    loss = StyleLoss(vision, ref)

    def gram(img):
        states = vision(pixel_values=preprocess(img, size=32), output_hidden_states=True)
        tokens = states.hidden_states[3][:, 1:]  # layer 2's output, the class token dropped
        assert tokens.shape[1] == 16  # (32/8)² patches
        return torch.einsum("bpd,bpe->bde", tokens, tokens)

    with RoundingChain() as chain:  # the roundings behind each value, counted
        got = loss(x)
        want = (gram(x) - gram(ref)).pow(2).sum((1, 2)).sqrt()
    # one exact quantity computed twice in float64, each within γ̃ of its counted chain
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    assert got.shape == (2,) and rel(got, want) <= pair_bound(*bounds)
    assert float(loss(ref)) == 0.0  # the same computation as the reference's
    assert not torch.allclose(StyleLoss(vision, ref, layer=0)(x), got)
    with pytest.raises(ValueError, match="layer"):
        StyleLoss(vision, ref, layer=4)
    with pytest.raises(ValueError, match="reference"):
        StyleLoss(vision, images())


def test_embedding_losses(vision):
    """CLIP-I and text–image losses are cosine distances of the projected embeddings; the
    aesthetic loss is s_max minus the head on the normalised embedding."""
    x, ref = images(), images(batch=1, seed=2)
    e, e_ref = image_embeddings(vision, x), image_embeddings(vision, ref)
    assert e.shape == (2, 16)
    cos = (e * e_ref).sum(1) / (e.norm(dim=1) * e_ref.norm(dim=1))
    u = 2.0**-53  # float64 cosines of 16-d vectors: a few dozen roundings
    assert torch.allclose(ImageSimilarityLoss(vision, ref)(x), 1 - cos, rtol=0, atol=100 * u)
    assert float(ImageSimilarityLoss(vision, ref)(ref).abs()) <= 100 * u
    assert torch.allclose(TextSimilarityLoss(vision, e_ref)(x), 1 - cos, rtol=0, atol=100 * u)
    head = torch.nn.Linear(16, 1).double()
    with torch.no_grad():
        want = 10 - head(e / e.norm(dim=1, keepdim=True))[:, 0]
        assert torch.equal(AestheticLoss(vision, head)(x), want)
    with pytest.raises(ValueError, match="text_embeds"):
        TextSimilarityLoss(vision, e_ref[0])


def test_text_embeddings_of_a_tiny_clip_text_model():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text_model = CLIPTextModelWithProjection(config).eval()
    with RoundingChain() as chain:  # the roundings behind each embedding, counted
        t = text_embeddings(text_model, tokenizer, ["a fox", "a lighthouse"])
        one = text_embeddings(text_model, tokenizer, "a fox")
    assert t.shape == (2, 16) and t.dtype == torch.float32
    # the same text alone and in a batch: float32, each within γ̃ of its counted chain
    bounds = (roundoff_bound(chain.longest(r), torch.float32) for r in (t, one))
    assert rel(one, t[:1]) <= pair_bound(*bounds)
