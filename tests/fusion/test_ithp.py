"""ITHP (fusion/models/ithp.py): the published objective by hand, prime-only prediction, aligned vs pooled
reconstruction, masking, eval determinism, the faithful switch, and a short training run."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fusion import FusionConfigError, build_model
from fusion.models.ithp import ITHP, is_aligned

DIMS = {"text": 7, "audio": 5, "video": 3}
B = 4


def make(dims: dict[str, int] | None = None, **extra: object) -> ITHP:
    torch.manual_seed(0)
    settings = {"hidden": 12, "num_heads": 3, "b0_dim": 6, "b1_dim": 4, "vib_hidden": 10, **extra}
    model = build_model("ithp", dims=dict(dims or DIMS), **settings)
    assert isinstance(model, ITHP)
    return model


def lengths_mask(lengths: list[int], t: int) -> Tensor:
    return torch.arange(t)[None] < torch.tensor(lengths)[:, None]


def make_batch(seed: int = 1, video_aligned: bool = False) -> dict[str, Tensor]:
    """Audio word-aligned with text (same length and mask; sample 3 has no audio); video unaligned (9 steps;
    sample 2 has none) unless ``video_aligned``. Padded steps hold large garbage."""
    g = torch.Generator().manual_seed(seed)
    text_mask = lengths_mask([6, 4, 5, 2], 6)
    audio_mask = text_mask.clone()
    audio_mask[3] = False
    video_mask = text_mask.clone() if video_aligned else lengths_mask([9, 3, 0, 7], 9)
    batch = {"label": torch.randn(B, generator=g)}
    for m, mask in (("text", text_mask), ("audio", audio_mask), ("video", video_mask)):
        x = torch.randn(*mask.shape, DIMS[m], generator=g)
        batch[m] = torch.where(mask[..., None], x, 1e3 * torch.randn(x.shape, generator=g))
        batch[f"{m}_mask"] = mask
    return batch


def by_hand(model: ITHP, batch: dict[str, Tensor], per_token: dict[str, bool]) -> tuple[Tensor, dict[str, Tensor]]:
    """Default mode in eval: the prediction and the unweighted terms, step by step from the submodules."""
    inputs = model.prepare(batch)
    mask = inputs.masks["text"]
    h = model.encoder(inputs.feats["text"], mask)
    z, terms = h, {}
    for k, m in enumerate(("audio", "video")):
        stage = model.bottlenecks[k]
        mu, logvar = stage.vib.head(stage.trunk(z)).chunk(2, -1)
        terms[f"kl{k}"] = (0.5 * (mu**2 + logvar.exp() - logvar - 1)).mean(-1)[mask].mean()
        target, target_mask = inputs.feats[m], inputs.masks[m]
        if per_token[m]:
            error = (stage.decoder(mu) - target) ** 2
            terms[f"rec_{m}"] = error.mean(-1)[mask & target_mask].mean()
        else:
            latent = (mu * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            pooled = (target * target_mask[..., None]).sum(1) / target_mask.sum(1, keepdim=True).clamp_min(1)
            has_both = mask.any(1) & target_mask.any(1)
            terms[f"rec_{m}"] = ((stage.decoder(latent) - pooled) ** 2).mean(-1)[has_both].mean()
        z = mu  # eval: the latents are the means
    s = model.norm(h + model.fuse(z))
    pooled = (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    prediction = model.head(model.pooler(pooled)).squeeze(-1)
    terms["task"] = ((prediction - batch["label"]) ** 2).mean()
    return prediction, terms


def published_total(terms: dict[str, Tensor], beta: float = 8.0, gamma: float = 32.0, lam: float = 0.3) -> Tensor:
    ib = terms["kl0"] + beta * terms["rec_audio"] + lam * (terms["kl1"] + gamma * terms["rec_video"])
    return terms["task"] + 2 / (beta + gamma) * ib


def test_config_defaults_and_problems() -> None:
    model = build_model("ithp", dims=DIMS)
    c = model.config
    assert (c.beta, c.gamma, c.lam, c.b0_dim, c.b1_dim, c.vib_hidden, c.prime) == (8.0, 32.0, 0.3, 128, 64, 256, "text")
    assert model.ib_weight == pytest.approx(0.05)
    with torch.no_grad():
        assert model(make_batch()).diagnostics["ib_weight"].item() == pytest.approx(0.05)
    with pytest.raises(FusionConfigError) as info:
        build_model("ithp", dims=DIMS, beta=0.0, lam=-1.0, b1_dim=0, prime="txt")
    for text in ("beta: must be positive", "lam: must be positive", "b1_dim: must be a positive int", "prime: must"):
        assert text in str(info.value)


def test_loss_equals_published_formula_by_hand() -> None:
    model = make()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        prediction, terms = by_hand(model, batch, {"audio": True, "video": False})
    torch.testing.assert_close(out.prediction, prediction)
    torch.testing.assert_close(sum(out.losses.values()), published_total(terms))
    assert list(out.losses) == ["task", "kl0", "rec_audio", "kl1", "rec_video"]
    expected = {"task": 1.0, "kl0": 0.05, "rec_audio": 0.4, "kl1": 0.015, "rec_video": 0.48}
    for key, weight in expected.items():
        torch.testing.assert_close(out.losses[key], weight * terms[key], msg=key)
        if key != "task":
            torch.testing.assert_close(out.diagnostics[key], terms[key], msg=key)


def test_reconstruction_per_token_when_aligned_pooled_otherwise() -> None:
    text = lengths_mask([3, 2, 1], 3)
    assert is_aligned(text, text.clone())
    assert not is_aligned(text, lengths_mask([3, 2, 1], 4))  # another length
    assert not is_aligned(text, lengths_mask([3, 1, 1], 3))  # another mask on a sample that has both
    missing = text.clone()
    missing[1] = False  # a sample without the detector does not break the alignment
    assert is_aligned(text, missing)
    assert not is_aligned(text, torch.zeros_like(text))  # nothing to compare

    model = make()
    model.eval()
    batch = make_batch(video_aligned=True)
    batch["audio_mask"] = batch["audio_mask"].clone()
    batch["audio_mask"][0, 5] = False  # same length as text, but another mask: not aligned
    with torch.no_grad():
        out = model(batch)
        _, terms = by_hand(model, batch, {"audio": False, "video": True})
        _, wrong = by_hand(model, batch, {"audio": True, "video": False})
    for key in ("rec_audio", "rec_video"):
        torch.testing.assert_close(out.diagnostics[key], terms[key], msg=key)
        assert not torch.isclose(out.diagnostics[key], wrong[key]), key


def test_prediction_depends_on_the_prime_only() -> None:
    model = make()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        reference = model(batch)
        changed = dict(batch, audio=torch.randn_like(batch["audio"]), video=torch.randn_like(batch["video"]))
        removed = {k: v for k, v in batch.items() if k in ("text", "text_mask", "label")}
        masked = dict(batch, audio_mask=torch.zeros_like(batch["audio_mask"]))
        masked["video_mask"] = torch.zeros_like(batch["video_mask"])
        for other in (changed, removed, masked):
            out = model(other)
            torch.testing.assert_close(out.prediction, reference.prediction, atol=0, rtol=0)
            torch.testing.assert_close(out.losses["task"], reference.losses["task"], atol=0, rtol=0)
        assert model(removed).losses["rec_audio"] == 0  # no sample has audio: nothing to reconstruct
    assert not torch.equal(model(changed).losses["rec_audio"], reference.losses["rec_audio"])


def test_kl_ignores_padding_by_default_and_counts_it_when_faithful() -> None:
    batch = make_batch()
    garbage = dict(batch, text=torch.where(batch["text_mask"][..., None], batch["text"], -5.0))
    longer = dict(batch)  # text and audio padded alike, so the audio stays word-aligned
    for m in ("text", "audio"):
        longer[m] = torch.cat([batch[m], torch.randn(B, 3, DIMS[m])], 1)
        longer[f"{m}_mask"] = torch.cat([batch[f"{m}_mask"], torch.zeros(B, 3, dtype=torch.bool)], 1)
    model = make()
    model.eval()
    with torch.no_grad():
        reference = model(batch)
        for other in (garbage, longer):
            out = model(other)
            for key in reference.losses:
                torch.testing.assert_close(out.losses[key], reference.losses[key], msg=key)
    faithful = make(faithful=True)
    faithful.eval()
    with torch.no_grad():
        kl_short, kl_long = faithful(batch).diagnostics["kl0"], faithful(longer).diagnostics["kl0"]
        inputs = faithful.prepare(longer)
        stage = faithful.bottlenecks[0]
        h = faithful.encoder(inputs.feats["text"], torch.ones_like(inputs.masks["text"]))
        mu, logvar = stage.vib.head(stage.trunk(h)).chunk(2, -1)
        every_position = (0.5 * (mu**2 + logvar.exp() - logvar - 1)).mean()
    assert abs(kl_long - kl_short) > 1e-3
    torch.testing.assert_close(kl_long, every_position)


def test_faithful_loss_by_hand() -> None:
    """Published behaviour: no masks, sigmoid decoders on per-batch min-max targets, first-token pooling."""
    model = make(faithful=True)
    for stage in model.bottlenecks:  # sigma ~ e^-30: the eval-time samples equal the means to 1e-13
        latent = stage.vib.latent_dim
        stage.vib.head.weight.data[latent:] = 0.0
        stage.vib.head.bias.data[latent:] = -60.0
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        inputs = model.prepare(batch)
        h = model.encoder(inputs.feats["text"], torch.ones_like(inputs.masks["text"]))
        z, terms = h, {}
        for k, m in enumerate(("audio", "video")):
            stage = model.bottlenecks[k]
            mu, logvar = stage.vib.head(stage.trunk(z)).chunk(2, -1)
            terms[f"kl{k}"] = (0.5 * (mu**2 + logvar.exp() - logvar - 1)).mean()
            x = inputs.feats[m]
            x = (x - x.min()) / (x.max() - x.min())
            if m == "audio":  # aligned: every position, padding included
                terms[f"rec_{m}"] = ((torch.sigmoid(stage.decoder(mu)) - x) ** 2).mean()
            else:
                target_mask = inputs.masks[m][..., None]
                target = (x * target_mask).sum(1) / target_mask.sum(1).clamp_min(1)
                terms[f"rec_{m}"] = ((torch.sigmoid(stage.decoder(mu.mean(1))) - target) ** 2).mean()
            z = mu
        prediction = model.head(model.pooler(model.norm(h + model.fuse(z))[:, 0])).squeeze(-1)
        terms["task"] = ((prediction - batch["label"]) ** 2).mean()
    torch.testing.assert_close(out.prediction, prediction)
    torch.testing.assert_close(sum(out.losses.values()), published_total(terms))
    for key in ("kl0", "rec_audio", "kl1", "rec_video"):
        torch.testing.assert_close(out.diagnostics[key], terms[key], msg=key)


def test_eval_deterministic_by_default_stochastic_when_faithful() -> None:
    batch = make_batch()
    for faithful in (False, True):
        model = make(faithful=faithful)
        model.eval()
        with torch.no_grad():
            first, second = model(batch), model(batch)
        same = torch.equal(first.prediction, second.prediction)
        assert same != faithful, faithful
    model = make()
    model.train()  # latents are sampled in training (dropout off to isolate the sampling)
    model.apply(lambda module: setattr(module, "p", 0.0) if isinstance(module, torch.nn.Dropout) else None)
    assert not torch.equal(model(batch).prediction, model(batch).prediction)


def test_modality_subsets_set_the_bottlenecks() -> None:
    batch = make_batch()
    model = make({"text": 7, "video": 3})
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert model.detectors == ("video",) and list(out.losses) == ["task", "kl0", "rec_video"]
    d = out.diagnostics
    torch.testing.assert_close(out.losses["rec_video"], 0.05 * 8 * d["rec_video"])
    torch.testing.assert_close(sum(out.losses.values()), out.losses["task"] + 0.05 * (d["kl0"] + 8 * d["rec_video"]))
    alone = make({"audio": 5})
    assert alone.prime == "audio" and not alone.detectors and list(alone(batch).losses) == ["task"]
    swapped = make(prime="video")
    assert (swapped.prime, swapped.detectors) == ("video", ("text", "audio"))
    unlabelled = {k: v for k, v in batch.items() if k != "label"}
    out = make()(unlabelled)
    assert out.losses == {} and {"kl0", "kl1", "rec_audio", "rec_video"} <= set(out.diagnostics)


def test_training_reduces_reconstruction_error() -> None:
    """Audio is a linear function of the text tokens (word-aligned): B0 must learn to carry it."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(16, 5, 6, generator=g)
    mask = lengths_mask(torch.randint(2, 6, (16,), generator=g).tolist(), 5)
    batch = {"text": text, "text_mask": mask, "audio": text @ torch.randn(6, 4, generator=g), "audio_mask": mask}
    batch["label"] = (text * mask[..., None]).sum((1, 2)) / mask.sum(1)
    model = make({"text": 6, "audio": 4}, num_layers=0, b0_dim=8, vib_hidden=16, dropout=0.0)
    opt = torch.optim.Adam(model.param_groups(lr=1e-2))

    def rec_audio() -> float:
        model.eval()
        with torch.no_grad():
            return model(batch).diagnostics["rec_audio"].item()

    before = rec_audio()
    model.train()
    for _ in range(100):
        loss = sum(model(batch).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = rec_audio()
    assert after < before / 10, (before, after)  # about 65x in practice
