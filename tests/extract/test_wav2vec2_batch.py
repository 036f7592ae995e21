"""The batched wav2vec 2.0 forward (extract/extractors/wav2vec2.py) against transformers' own modules: the padded
front end with its per-clip group norm equals each clip run alone, our encoder loop equals transformers' encoder
for both layer-norm placements and any layer, and LayerDrop drops whole layers without a Python branch."""

from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from extract.extractors.audio import wave_pieces
from extract.extractors.wav2vec2 import encode_waves, masked_group_norm, prepare_waves, receptive_field, run_encoder

SHAPES = {  # wav2vec2-base's group-norm front end, and the large models' layer-norm one with a stable encoder
    "group": {"feat_extract_norm": "group", "do_stable_layer_norm": False},
    "layer": {"feat_extract_norm": "layer", "do_stable_layer_norm": True},
}


def tiny(norm: str, **extra: object) -> Wav2Vec2Model:
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=32, conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **SHAPES[norm], **extra,
    )  # fmt: skip
    return Wav2Vec2Model(cfg).eval()


def clips(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 1.6 - 0.8 for n in (3200, 1100, 7000, 300)]  # one under a frame


def alone(model: Wav2Vec2Model, clip: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """One clip through transformers' model as extraction always ran it: prepared, unpadded, no mask."""
    (_, piece), *_ = wave_pieces(clip, receptive_field(model.config.conv_kernel, model.config.conv_stride), 10**9, True)
    out = model(piece[None], output_hidden_states=True)
    return out.last_hidden_state[0] if layer == -1 else out.hidden_states[layer][0]


@pytest.mark.parametrize("norm", sorted(SHAPES))
@pytest.mark.parametrize("layer", [-1, 1, 2])
def test_a_padded_batch_gives_each_clip_its_features_alone(norm: str, layer: int) -> None:
    model = tiny(norm)
    waves = torch.nn.utils.rnn.pad_sequence(clips(), batch_first=True)
    lengths = torch.tensor([len(c) for c in clips()])
    receptive = receptive_field(model.config.conv_kernel, model.config.conv_stride)
    with torch.no_grad():
        states, counts = encode_waves(model, *prepare_waves(waves, lengths, receptive, True), layer)
    for i, clip in enumerate(clips()):
        expected = alone(model, clip, layer)
        assert int(counts[i]) == len(expected)
        torch.testing.assert_close(states[i, : len(expected)], expected, atol=2e-5, rtol=1e-4)
        assert not states[i, len(expected) :].any()  # zero past the clip's frames


def test_masked_group_norm_is_group_norm_over_the_valid_steps() -> None:
    norm = torch.nn.GroupNorm(5, 5)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 9)
    valid = torch.arange(9)[None] < torch.tensor([[9], [4]])
    out = masked_group_norm(x, valid, norm)
    torch.testing.assert_close(out[0], norm(x[:1])[0])
    torch.testing.assert_close(out[1, :, :4], norm(x[1:, :, :4])[0])
    with pytest.raises(ValueError, match="group norm of 1 groups over 5 channels: not per channel"):
        masked_group_norm(x, valid, torch.nn.GroupNorm(1, 5))


def test_layerdrop_drops_whole_layers_with_every_parameter_in_the_graph() -> None:
    model = tiny("group", layerdrop=1.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    encoder = model.encoder.train()
    hidden = torch.randn(2, 6, 24)
    mask = torch.ones(2, 6, dtype=torch.bool)
    before_layers = encoder.layer_norm(hidden + encoder.pos_conv_embed(hidden))
    torch.testing.assert_close(run_encoder(encoder, hidden, mask), before_layers)  # every layer dropped
    encoder.config.layerdrop = 0.0  # no layer dropped: transformers' own encoder in training mode
    torch.testing.assert_close(run_encoder(encoder, hidden, mask), encoder(hidden, attention_mask=mask)[0])
    encoder.config.layerdrop = 0.5
    run_encoder(encoder, hidden, mask).sum().backward()
    assert all(p.grad is not None for p in encoder.layers.parameters())  # a dropped layer still takes part
