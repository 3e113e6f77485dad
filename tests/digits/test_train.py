"""Training of the digits models: augmentation, a seeded smoke run that saves and reloads, the CLI."""

import torch

import sagkit as sk
from sagkit.digits.train import augment, train_classifier, train_unet
from sagkit.lab.cli import main

TINY_UNET = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D",) * 2,
    "up_block_types": ("UpBlock2D",) * 2,
    "norm_num_groups": 4,
}
TINY_CLASSIFIER = {"channels": (8, 8, 8), "features": 8}


def test_augment_identity_and_background():
    x, _ = sk.digits.digits_dataset("test")
    x = x[:6]
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(augment(x, gen, rotate=0.0, scale=0.0, shift=0.0), x)
    y = augment(x, gen, rotate=10.0, scale=0.1, shift=1.5)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert torch.allclose(y[..., 0, 0], torch.tensor(-1.0))  # corners stay background


def test_train_unet_smoke(tmp_path):
    model = train_unet(tmp_path, steps=2, batch_size=8, unet_config=TINY_UNET, progress=False)
    folder = tmp_path / "digits-unet"
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
        "class_embeddings.safetensors",
    }
    loaded = sk.digits.load_pretrained("digits", device="cpu", path=folder)
    assert loaded.unet.config.block_out_channels == [8, 16]
    x = torch.randn(3, 1, 16, 16)
    cond = model.cond_for([0, 5, 10])
    torch.testing.assert_close(loaded.eps(x, 0.4, cond), model.eps(x, 0.4, cond))
    # seeded: a second run gives the same weights
    again = train_unet(
        tmp_path / "again", steps=2, batch_size=8, unet_config=TINY_UNET, progress=False
    )
    torch.testing.assert_close(again.embeddings, model.embeddings, rtol=0, atol=0)
    assert all(
        torch.equal(p, q) for p, q in zip(again.parameters(), model.parameters(), strict=True)
    )


def test_train_classifier_smoke(tmp_path):
    classifier, accuracy = train_classifier(
        tmp_path, steps=2, batch_size=8, config=TINY_CLASSIFIER, progress=False
    )
    assert 0 <= accuracy <= 1
    loaded = sk.digits.load_classifier("digits", device="cpu", path=tmp_path / "digits-classifier")
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded.logits(x), classifier.logits(x))


def test_cli_trains_both(tmp_path, capsys):
    main(["train", "digits", "--steps", "1", "--out", str(tmp_path), "--seed", "1"])
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "unet:" in printed
    assert (tmp_path / "digits-unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "digits-classifier" / "model.safetensors").is_file()
