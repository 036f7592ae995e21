"""Whisper transcription for corpora without transcripts: a tiny Whisper built from a config, with a hand-made
byte-level BPE tokenizer, checked against model.generate and a hand-written greedy decoder on the bundled clips."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEDIA, bundled_rows, write_manifest

from extract.config import ConfigError, make_config
from extract.extractors.asr import WhisperTranscriber
from extract.extractors.base import DecodedClip, ExtractionError, ModalityFailure, ModelNotFoundError
from extract.manifest import Clip, ManifestError, load_manifest
from mmfuse.terminal import ProgressFactory

SR = 16000
D_MODEL = 30
MERGES = [("h", "i"), ("Ġ", "hi"), ("o", "k"), ("Ġ", "ok")]
SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
]  # fmt: skip
READABLE = set("abcdefghijklmnopqrstuvwxyzĠ")  # "Ġ" is the byte-level space


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_whisper(path: Path, seed: int, fixed_token: str | None = None) -> Path:
    """Save a 1+1-layer Whisper of width 30 with a 264-token byte-level vocabulary and Whisper's special tokens.

    Only lowercase letters, the space and the merged words can be generated (everything else is suppressed), so
    transcripts are readable. With ``fixed_token`` the decoder's final layer norm outputs a constant that the
    tied output projection scores highest for that token, at every step and for any audio.
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    vocab = {ch: i for i, ch in enumerate(byte_chars())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = WhisperTokenizer(vocab=dict(vocab), merges=list(MERGES))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    ids = dict(zip(SPECIALS, tok.convert_tokens_to_ids(SPECIALS), strict=True))
    eos, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=D_MODEL, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=37, decoder_ffn_dim=41,
        max_source_positions=1500, max_target_positions=64, init_std=0.5, pad_token_id=eos, bos_token_id=eos,
        eos_token_id=eos, decoder_start_token_id=sot,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(cfg).eval()
    if fixed_token is not None:
        with torch.no_grad():
            unit = torch.zeros(D_MODEL)
            unit[0] = 1.0
            model.model.decoder.layer_norm.weight.zero_()
            model.model.decoder.layer_norm.bias.copy_(unit)
            model.model.decoder.embed_tokens.weight[vocab[fixed_token]] = 50.0 * unit  # tied with proj_out
    allowed = {i for t, i in vocab.items() if set(t) <= READABLE} | {eos}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        begin_suppress_tokens=[vocab["Ġ"], eos], suppress_tokens=sorted(set(range(len(tok))) - allowed),
        max_length=64,
    )  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return build_whisper(tmp_path_factory.mktemp("tiny-whisper"), seed=5)


@pytest.fixture(scope="module")
def fixed_whisper_dir(tmp_path_factory) -> Path:
    return build_whisper(tmp_path_factory.mktemp("fixed-whisper"), seed=6, fixed_token="Ġhi")


@pytest.fixture(scope="module")
def transcriber(whisper_dir) -> WhisperTranscriber:
    t = WhisperTranscriber(str(whisper_dir), batch_size=3, max_new_tokens=12)
    t.setup("cpu")
    return t


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, DecodedClip]:
    """The bundled clips decoded (audio only), by key."""
    from extract.worker import DecodeSettings, decode_clip

    tmp = tmp_path_factory.mktemp("asr-clips")
    clips = load_manifest(write_manifest(tmp / "label.csv", bundled_rows()), MEDIA)
    return {c.key: decode_clip(c, DecodeSettings(("audio",))) for c in clips}


def wave_clip(wave: np.ndarray, key: str = "k") -> DecodedClip:
    clip = Clip(key, "v", key, "train", "", 1)
    return DecodedClip(clip, duration=len(wave) / SR, wave=wave, audio_span=(0.0, len(wave) / SR))


def real_part(d: DecodedClip) -> np.ndarray:
    lo, hi = d.audio_span
    return d.wave[round(lo * SR) : round(hi * SR)]


def greedy_reference(model, features, tokenizer, max_new_tokens: int) -> str:
    """Whisper greedy decoding written out: detect the language from <|startoftranscript|>, then argmax one token
    at a time under the generation config's suppressions, until <|endoftext|> or ``max_new_tokens``."""
    gen = model.generation_config
    enc = model.model.encoder(features)
    sot = torch.tensor([[gen.decoder_start_token_id]])
    first = model(encoder_outputs=enc, decoder_input_ids=sot).logits[0, -1]
    langs = torch.tensor(sorted(gen.lang_to_id.values()))
    lang = int(langs[first[langs].argmax()])
    tokens = [gen.decoder_start_token_id, lang, gen.task_to_id["transcribe"], gen.no_timestamps_token_id]
    new: list[int] = []
    for step in range(max_new_tokens):
        logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([tokens + new])).logits[0, -1].clone()
        logits[gen.suppress_tokens] = -float("inf")
        if step == 0:
            logits[gen.begin_suppress_tokens] = -float("inf")
        nxt = int(logits.argmax())
        if nxt == gen.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new).strip()


@torch.inference_mode()
def test_transcript_equals_direct_generate_and_hand_written_greedy(whisper_dir, transcriber, decoded):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(whisper_dir, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, local_files_only=True).eval()
    d = decoded["grid__bbaf2n"]
    ours = transcriber([d])[0]
    wave = real_part(d).astype(np.float32) / 32768.0
    features = proc.feature_extractor(wave, sampling_rate=SR, return_tensors="pt").input_features
    seq = model.generate(features, max_new_tokens=12, num_beams=1, do_sample=False, task="transcribe")
    direct = proc.tokenizer.batch_decode(seq, skip_special_tokens=True)[0].strip()
    print(f"transcript: {ours!r}")
    assert ours == direct
    assert ours == greedy_reference(model, features, proc.tokenizer, max_new_tokens=12)
    assert ours and set(ours) <= set("abcdefghijklmnopqrstuvwxyz ")


def test_batch_size_does_not_change_transcripts(whisper_dir, transcriber, decoded):
    grid = decoded["grid__pwij3p"]
    clips = [
        decoded["grid__bbaf2n"],
        wave_clip(grid.wave[: int(1.3 * SR)], "short"),
        decoded["faces__face_noface"],
    ]
    one = WhisperTranscriber(str(whisper_dir), batch_size=1, max_new_tokens=12)
    one.setup("cpu")
    batched = transcriber(clips)
    assert batched == one(clips)
    assert len(set(batched)) == 3, batched  # the audio matters: three clips, three transcripts


def test_known_transcript_from_set_weights(fixed_whisper_dir, decoded):
    t = WhisperTranscriber(str(fixed_whisper_dir), batch_size=4, max_new_tokens=5)
    t.setup("cpu")
    out = t([decoded["grid__bbaf2n"], decoded["faces__face_noface"], wave_clip(np.zeros(SR // 2, np.int16))])
    assert out == ["hi hi hi hi hi"] * 3
    # 65 s of audio: three 30 s windows (30 + 30 + 5 s), each five tokens, joined with spaces.
    long = np.tile(decoded["grid__bbaf2n"].wave, 22)[: 65 * SR]
    assert t([wave_clip(long)]) == [" ".join(["hi"] * 15)]


@pytest.mark.gpu
def test_cuda_gives_the_known_transcript(fixed_whisper_dir, decoded):
    t = WhisperTranscriber(str(fixed_whisper_dir), batch_size=2, max_new_tokens=5)
    t.setup("cuda")
    assert next(t._model.parameters()).is_cuda
    long = np.tile(decoded["grid__bbaf2n"].wave, 12)[: 35 * SR]
    assert t([decoded["grid__bbaf2n"], wave_clip(long)]) == ["hi hi hi hi hi", " ".join(["hi"] * 10)]


def test_audio_span_is_honoured(transcriber, decoded):
    d = decoded["faces__face_noface"]
    lo, hi = d.audio_span
    assert lo == pytest.approx(2.43, abs=0.01)  # the stream starts late: silence before, outside the span
    padded = transcriber([d])[0]
    cropped = transcriber([wave_clip(real_part(d))])[0]
    whole = transcriber([wave_clip(d.wave)])[0]  # the same samples with the padding counted as audio
    assert padded == cropped
    assert whole != cropped, "the test needs a model whose transcript depends on the leading silence"


def test_long_audio_is_transcribed_in_30s_windows(transcriber, decoded, monkeypatch):
    speech = [decoded[k].wave for k in ("grid__bbaf2n", "grid__pwij3p", "grid__id2_vcd_swwp2s")]
    long = np.concatenate([np.tile(w, 4) for w in speech] * 2)[: 65 * SR]  # 65 s: windows of 30, 30 and 5 s
    windows = [long[: 30 * SR], long[30 * SR : 60 * SR], long[60 * SR :]]
    expected = [transcriber([wave_clip(w)])[0] for w in windows]
    assert all(expected) and len(set(expected)) == 3
    rows: list[int] = []
    generate = transcriber._model.generate

    def counting(features, **kw):
        rows.append(features.shape[0])
        assert features.shape[-1] == 3000  # each window padded to Whisper's 30 s
        return generate(features, **kw)

    short = wave_clip(speech[0], "short")
    short_text = transcriber([short])[0]
    monkeypatch.setattr(transcriber._model, "generate", counting)
    assert transcriber([wave_clip(long), short]) == [" ".join(expected), short_text]
    assert rows == [3, 1]  # three windows of the long clip, then the short clip (batch_size 3)


def test_failed_batch_is_recorded_and_the_others_kept(whisper_dir, decoded, monkeypatch):
    t = WhisperTranscriber(str(whisper_dir), batch_size=1, max_new_tokens=8)
    t.setup("cpu")
    clips = [decoded["grid__bbaf2n"], decoded["grid__pwij3p"], decoded["grid__id2_vcd_swwp2s"]]
    good = t(clips)
    generate, calls = t._model.generate, []

    def flaky(features, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        if len(calls) == 3:
            features = torch.full_like(features, float("nan"))
        return generate(features, **kw)

    monkeypatch.setattr(t._model, "generate", flaky)
    out = t(clips)
    assert out[0] == good[0]
    assert out[1] == ModalityFailure("transcription failed: RuntimeError: CUDA out of memory (simulated)")
    assert out[2] == ModalityFailure("transcription failed: the ASR model produced NaN/inf scores")


def test_clip_without_audio_is_a_recorded_failure(transcriber, decoded):
    no_stream = DecodedClip(
        decoded["grid__bbaf2n"].clip, status={"audio": {"status": "failed", "error": "no audio stream"}}
    )
    empty_span = wave_clip(np.zeros(SR, np.int16))
    empty_span.audio_span = (0.5, 0.5)
    out = transcriber([no_stream, decoded["grid__bbaf2n"], empty_span, DecodedClip(no_stream.clip)])
    assert out[0] == ModalityFailure("no audio to transcribe: no audio stream")
    assert isinstance(out[1], str) and out[1]
    assert out[2] == ModalityFailure("no audio to transcribe: the audio span holds no samples")
    assert out[3] == ModalityFailure("no audio to transcribe")


def test_blank_transcript_is_an_empty_string(whisper_dir, decoded, monkeypatch):
    t = WhisperTranscriber(str(whisper_dir), max_new_tokens=8)
    t.setup("cpu")
    space, eos = t._tokenizer.convert_tokens_to_ids(["Ġ", "<|endoftext|>"])

    def blank(features, **kw):  # what Whisper says for silence: only spaces, then <|endoftext|>
        return torch.tensor([[space, space, eos]] * features.shape[0])

    monkeypatch.setattr(t._model, "generate", blank)
    assert t([decoded["grid__bbaf2n"], decoded["grid__pwij3p"]]) == ["", ""]


def test_provenance_names_model_weights_and_decoding(whisper_dir, transcriber):
    p = transcriber.provenance()
    assert p["name"] == "whisper-asr" and p["version"] == "1" and p["model"] == str(whisper_dir)
    assert len(p["weights_sha256"]) == 16 and p["task"] == "transcribe" and p["decoding"] == "greedy"
    assert p["language"] is None and p["max_new_tokens"] == 12
    capped = WhisperTranscriber(str(whisper_dir), max_new_tokens=500, language="en")
    capped.setup("cpu")
    # max_target_positions 64 minus the 4 prompt tokens
    assert capped.provenance()["max_new_tokens"] == 60 and capped.provenance()["language"] == "en"
    assert capped.provenance()["weights_sha256"] == p["weights_sha256"]


def test_missing_and_wrong_checkpoints_give_clear_errors(tmp_path, whisper_dir):
    from transformers import BertConfig, BertModel, WhisperForConditionalGeneration

    missing = tmp_path / "no-such-whisper"
    with pytest.raises(ModelNotFoundError, match="no-such-whisper.*never downloads"):
        WhisperTranscriber(str(missing)).setup()
    BertModel(BertConfig(vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=13)).save_pretrained(tmp_path / "bert")  # fmt: skip
    with pytest.raises(ModelNotFoundError, match=r"bert is not a Whisper checkpoint .*model_type 'bert'"):
        WhisperTranscriber(str(tmp_path / "bert")).setup()
    WhisperForConditionalGeneration.from_pretrained(whisper_dir).save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ModelNotFoundError) as err:
        WhisperTranscriber(str(tmp_path / "weights-only")).setup()
    assert "weights-only lacks the tokenizer" in str(err.value) and "preprocessor_config.json" in str(err.value)
    with pytest.raises(ExtractionError, match=r"language 'fr' is not one of .*: en, zh"):
        WhisperTranscriber(str(whisper_dir), language="fr").setup()


def test_english_only_checkpoint_takes_no_language(tmp_path, whisper_dir, decoded):
    import json
    import shutil

    english = shutil.copytree(whisper_dir, tmp_path / "english-only")
    gen = json.loads((english / "generation_config.json").read_text())
    (english / "generation_config.json").write_text(json.dumps({**gen, "is_multilingual": False}))
    with pytest.raises(ExtractionError, match="english-only is English-only: it takes no language"):
        WhisperTranscriber(str(english), language="en").setup()
    t = WhisperTranscriber(str(english), max_new_tokens=12)
    t.setup()
    text = t([decoded["grid__bbaf2n"]])[0]
    assert isinstance(text, str) and text  # no language or task token in the prompt, still a transcript


def test_config_validation_of_asr_settings():
    cfg = make_config(None, asr="/models/whisper", asr_language="en", modalities="text,audio")
    assert (cfg.asr.model, cfg.asr_language, cfg.asr.language) == ("/models/whisper", "en", "en")
    with pytest.raises(ConfigError, match=r"asr.model: no audio to transcribe with modalities \['text'\]"):
        make_config(None, asr="/models/whisper", modalities="text")
    with pytest.raises(ConfigError) as err:
        make_config(None, asr="/models/whisper", modalities="audio,video", asr_language=None)
    assert "asr.model: transcripts feed the text modality" in str(err.value)
    with pytest.raises(ConfigError, match=r"asr.language: set, but asr.model"):
        make_config(None, asr_language="en")


def test_manifest_without_text_column_when_transcripts_come_from_asr(tmp_path):
    rows = [{"video_id": "grid", "clip_id": "bbaf2n"}, {"video_id": "grid", "clip_id": "pwij3p"}]
    path = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['text'\].*--asr PATH"):
        load_manifest(path, MEDIA)
    clips = load_manifest(path, MEDIA, need_text=False)
    assert [(c.key, c.text) for c in clips] == [("grid__bbaf2n", ""), ("grid__pwij3p", "")]
    partial = write_manifest(tmp_path / "p.csv", [{**rows[0], "text": "bin blue"}, {**rows[1], "text": ""}])
    assert [c.text for c in load_manifest(partial, MEDIA, need_text=False)] == ["bin blue", ""]


def test_cli_help_and_flags_reach_the_config(monkeypatch, tmp_path):
    import extract.pipeline
    from extract.cli import add_extract
    from mmfuse.commands import Commands

    parser = argparse.ArgumentParser(prog="mmfuse")
    commands = Commands(parser.add_subparsers(), argparse.ArgumentParser(add_help=False))
    add_extract(commands)
    sub = commands.choices["extract"]
    text = sub.format_help()
    assert "--asr PATH" in text and "--asr-language CODE" in text and "Whisper" in text
    assert "mmfuse extract videos.csv --media-root videos --out shards/asr --asr " in text  # an example
    seen = {}

    def fake_run(manifest, media_root, out, cfg, progress=None):
        seen["cfg"] = cfg
        return {"counts": {}, "samples_written": 0, "shards_written": 0, "shards_this_rank": 0, "out": str(out),
                "wall_s": 0.0, "complete": True}  # fmt: skip

    monkeypatch.setattr(extract.pipeline, "run_extract", fake_run)
    args = parser.parse_args(["extract", "m.csv", "--media-root", ".", "--out", str(tmp_path), "--asr", "/m/w",
                              "--asr-language", "de"])  # fmt: skip
    args.quiet, args.no_progress, args.progress = True, True, ProgressFactory(enabled=False)
    assert args.run(args) == 0
    assert (seen["cfg"].asr.model, seen["cfg"].asr.language, seen["cfg"].asr_language) == ("/m/w", "de", "de")


def test_extraction_transcribes_clips_without_text_and_records_the_source(
    tmp_path, tiny_cfg, tiny_text_model, whisper_dir, decoded
):
    from transformers import AutoTokenizer

    from extract.pipeline import run_extract
    from shards import iter_shard, load_dataset_json

    rows = bundled_rows()  # face_noface has no transcript; blank a GRID one too
    rows[1]["text"] = "  "
    manifest = write_manifest(tmp_path / "label.csv", rows)
    run_extract(manifest, MEDIA, tmp_path / "out", tiny_cfg(asr=str(whisper_dir), modalities="text,audio"))
    ds = load_dataset_json(tmp_path / "out")
    samples = {s["__key__"]: s for e in ds["shards"] for s in iter_shard(tmp_path / "out" / e["name"])}
    reference = WhisperTranscriber(str(whisper_dir))
    reference.setup("cpu")
    assert ds["feature_set"]["asr"] == reference.provenance()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    for key, source in [("grid__bbaf2n", "manifest"), ("grid__pwij3p", "asr"), ("faces__face_noface", "asr")]:
        meta = samples[key]["meta.json"]
        assert meta["text_source"] == source, key
        if source == "asr":
            expected = reference([decoded[key]])[0]
            assert meta["text"] == expected and meta["asr_model"] == str(whisper_dir) and meta["asr_error"] is None
            assert samples[key]["text_ids.npy"].tolist() == tokenizer(expected)["input_ids"]
        else:
            assert meta["text"] == "bin blue at f two now" and meta["asr_model"] is None
    assert samples["grid__bbaf2n"]["meta.json"]["modalities"]["text"]["status"] == "ok"
    without = tmp_path / "plain"
    rows[1]["text"] = "place white in j three please"
    run_extract(write_manifest(tmp_path / "plain.csv", rows), MEDIA, without, tiny_cfg(modalities="text,audio"))
    assert load_dataset_json(without)["feature_set_hash"] != ds["feature_set_hash"]  # ASR is part of the features
    assert "asr" not in load_dataset_json(without)["feature_set"]


def test_failed_transcription_is_the_text_status(tmp_path, tiny_cfg, whisper_dir, monkeypatch):
    from extract.pipeline import run_extract
    from shards import iter_shard, load_dataset_json

    def deaf(self, clips):
        return [ModalityFailure("the ASR model produced NaN/inf scores") for _ in clips]

    monkeypatch.setattr(WhisperTranscriber, "__call__", deaf)
    rows = [r for r in bundled_rows() if r["clip_id"] in ("bbaf2n", "pwij3p")]
    rows[0]["text"] = ""
    run_extract(write_manifest(tmp_path / "l.csv", rows), MEDIA, tmp_path / "o", tiny_cfg(asr=str(whisper_dir)))
    ds = load_dataset_json(tmp_path / "o")
    samples = {s["__key__"]: s for e in ds["shards"] for s in iter_shard(tmp_path / "o" / e["name"])}
    meta = samples["grid__bbaf2n"]["meta.json"]
    assert meta["modalities"]["text"] == {
        "status": "failed",
        "error": "empty transcript; speech recognition failed: the ASR model produced NaN/inf scores",
    }
    assert meta["text_source"] is None and meta["asr_error"] == "the ASR model produced NaN/inf scores"
    assert meta["modalities"]["audio"]["status"] == "ok" and meta["modalities"]["video"]["status"] == "ok"
    assert samples["grid__pwij3p"]["meta.json"]["text_source"] == "manifest"


def test_predict_transcribes_a_clip_without_text_when_the_shards_did(tmp_path, tiny_cfg, fixed_whisper_dir):
    from extract.pipeline import build_extractors, describe_feature_set
    from shards.dataset import feature_set_hash
    from train.predict import extract_config, extract_sample

    cfg = tiny_cfg(asr=str(fixed_whisper_dir), modalities="text,audio")
    extractors = build_extractors(cfg)
    feature_set = describe_feature_set(cfg, extractors)
    again = extract_config(feature_set)
    assert again.asr.model == str(fixed_whisper_dir) and again.asr.language is None
    fs_hash = feature_set_hash(feature_set)
    sample = extract_sample(MEDIA / "grid" / "bbaf2n.mpg", None, cfg, extractors, fs_hash, ("text", "audio"))
    meta = sample["meta.json"]
    assert meta["text_source"] == "asr" and meta["text"] == " ".join(["hi"] * extractors["asr"].max_new_tokens)
    assert meta["modalities"]["text"]["status"] == "ok" and "text_feat.npy" in sample
    given = extract_sample(MEDIA / "grid" / "bbaf2n.mpg", "bin blue", cfg, extractors, fs_hash, ("text", "audio"))
    assert given["meta.json"]["text_source"] == "manifest" and given["meta.json"]["text"] == "bin blue"
