"""Schema round trip, validation errors, key sanitising, corrupt and foreign shards, no pickle."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from shards import SCHEMA_VERSION, SchemaError, ShardWriter, iter_shard, make_key, validate_sample
from shards.io import decode_member


def sample(key="v__c", tt=5, ta=7, tv=3, **over):
    rng = np.random.default_rng(0)
    s = {
        "__key__": key,
        "meta.json": {
            "schema_version": SCHEMA_VERSION, "key": key, "video_id": "v", "clip_id": "c", "split": "train",
            "feature_set_hash": "abc", "modalities": {m: {"status": "ok", "error": None} for m in ("text", "audio", "video")},
        },
        "text_ids.npy": np.arange(tt, dtype=np.int32),
        "text_feat.npy": rng.standard_normal((tt, 11)).astype(np.float16),
        "audio_feat.npy": rng.standard_normal((ta, 13)).astype(np.float16),
        "audio_mask.npy": np.ones(ta, bool),
        "audio_time.npy": np.arange(ta, dtype=np.float32) / 50,
        "video_lmk.npy": np.zeros((tv, 478, 3), np.float16),
        "video_mask.npy": np.array([True, False, True][:tv]),
        "video_time.npy": np.arange(tv, dtype=np.float32) / 25,
    }  # fmt: skip
    s.update(over)
    return s


def test_round_trip(tmp_path):
    w = ShardWriter(tmp_path / "train-000000.tar")
    w.write(sample("a__1"))
    w.write(sample("b__2", tt=9))
    assert not (tmp_path / "train-000000.tar").exists()  # only under its temporary name until committed
    w.commit()
    out = list(iter_shard(tmp_path / "train-000000.tar"))
    assert [s["__key__"] for s in out] == ["a__1", "b__2"]
    ref = sample("b__2", tt=9)
    for name in ("text_ids.npy", "text_feat.npy", "video_mask.npy"):
        np.testing.assert_array_equal(out[1][name], ref[name])
        assert out[1][name].dtype == ref[name].dtype
    assert out[1]["meta.json"] == ref["meta.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text_feat.npy": np.zeros((5, 11), np.float32)}, "text_feat.npy has dtype float32, expected float16"),
        ({"text_feat.npy": np.zeros((4, 11), np.float16)}, "(Tt) is 4, expected 5"),
        ({"video_lmk.npy": np.zeros((3, 468, 3), np.float16)}, "axis 1 is 468, expected 478"),
        ({"audio_feat.npy": np.full((7, 13), np.nan, np.float16)}, "audio_feat.npy has 91 NaN/inf values"),
        ({"extra.npy": np.zeros(1)}, "unknown members ['extra.npy']"),
    ],
)
def test_validation_errors_name_sample_and_member(change, message):
    with pytest.raises(SchemaError) as err:
        validate_sample(sample(**change))
    assert message in str(err.value) and "sample v__c" in str(err.value)


def test_status_decides_required_members():
    s = sample()
    del s["audio_mask.npy"]
    with pytest.raises(SchemaError, match="audio_mask.npy missing for modality audio"):
        validate_sample(s)
    s = sample()
    s["meta.json"]["modalities"]["text"] = {"status": "failed", "error": "empty transcript"}
    with pytest.raises(SchemaError, match="text_ids.npy present but modality text is failed"):
        validate_sample(s)
    s = {k: v for k, v in s.items() if not k.startswith("text_")}
    validate_sample(s)


def test_foreign_schema_version_refused():
    s = sample()
    s["meta.json"]["schema_version"] = 99
    with pytest.raises(SchemaError, match="schema version 99 but this mmfuse reads version 1"):
        validate_sample(s)


def test_make_key_sanitises():
    assert make_key("../../etc", "passwd") == "______etc__passwd"
    assert make_key("vid.v1", "a/b\\c d") == "vid_v1__a_b_c_d"
    assert make_key("03bSnISJMiM", "1") == "03bSnISJMiM__1"
    assert "." not in make_key("a.b", "c.d") and "/" not in make_key("a/b", "c")


def test_truncated_and_corrupt_shards_raise_clear_errors(tmp_path):
    w = ShardWriter(tmp_path / "s.tar")
    for i in range(3):
        w.write(sample(f"k__{i}", tt=200))
    w.commit()
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(SchemaError, match=r"shard .*cut.tar"):
        list(iter_shard(tmp_path / "cut.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SchemaError, match="not a readable tar"):
        list(iter_shard(tmp_path / "junk.tar"))


def test_pickled_npy_is_never_loaded(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_member("text_ids.npy", buf.getvalue())
    with tarfile.open(tmp_path / "p.tar", "w") as t:
        info = tarfile.TarInfo("k__1.text_ids.npy")
        info.size = len(buf.getvalue())
        t.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(SchemaError, match="member k__1.text_ids.npy cannot be decoded"):
        list(iter_shard(tmp_path / "p.tar"))


def test_writer_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "s.tar")
    w.write(sample())
    with pytest.raises(SchemaError):
        w.write(sample(**{"text_feat.npy": np.zeros((5, 11), np.float64)}))
    w.abort()
    assert list(tmp_path.iterdir()) == []
