"""The per-modality records of dataset.json: declared from an output spec, read back, derived from an older
dataset.json, and refused with a message naming the field when malformed."""

from __future__ import annotations

import json

import pytest

from shards.contract import ModalityContract, declare, legacy_contracts, member_table, read_contracts
from shards.dataset_fields import dataset_field_problems
from shards.schema import MEMBERS, SCHEMA_VERSION, MemberSpec, SchemaError

EMB = MemberSpec("float16", ("Tv", "De"), "video", True, "an embedding", "feature")
OUTPUTS = {
    "video_emb.npy": EMB,
    "video_mask.npy": MEMBERS["video_mask.npy"],
    "video_time.npy": MEMBERS["video_time.npy"],
}


def test_a_declared_record_reads_back_equal_and_names_each_role() -> None:
    c = declare("video", "toy", OUTPUTS, {"De": 9}, {"fps": 5.0, "sizes": (1, 2)})
    assert (c.feature, c.width, c.mask, c.time, c.raw, c.extra) == (
        "video_emb.npy", 9, "video_mask.npy", "video_time.npy", None, {},
    )  # fmt: skip
    assert c.settings == {"fps": 5.0, "sizes": [1, 2]}
    assert ModalityContract.from_json("video", json.loads(json.dumps(c.to_json()))) == c
    table = member_table({"video": c})
    assert "video_emb.npy" in table and "video_lmk.npy" not in table and "text_feat.npy" in table


def test_an_output_spec_needs_one_feature_and_one_member_per_role() -> None:
    with pytest.raises(SchemaError, match="0 members of role feature"):
        declare("video", "toy", {"video_mask.npy": MEMBERS["video_mask.npy"]}, {})
    two = {**OUTPUTS, "video_lmk.npy": MEMBERS["video_lmk.npy"]}
    with pytest.raises(SchemaError, match="2 members of role feature"):
        declare("video", "toy", two, {"De": 9})
    with pytest.raises(SchemaError, match="'video_geom.npy' .joined. is not one of its extra members"):
        declare("video", "toy", OUTPUTS, {"De": 9}, joined=("video_geom.npy",))
    with pytest.raises(SchemaError, match="no 'dims' entry gives"):
        declare("video", "toy", OUTPUTS, {})


def test_older_dataset_json_gets_the_built_in_records() -> None:
    facemesh = {"feature_set": {"extractors": {"video": {"name": "mediapipe-facemesh", "max_faces": 2}}}}
    found = legacy_contracts({**facemesh, "dims": {"Dt": 11, "landmarks": 478}})
    assert sorted(found) == ["text", "video"]  # audio: neither Da nor statistics give its width
    assert (found["text"].feature, found["text"].width, found["text"].raw) == ("text_feat.npy", 11, "text_ids.npy")
    video = found["video"]
    assert (video.feature, video.width, video.extra, video.settings) == (
        "video_lmk.npy", 1434, {"video_geom.npy": 4}, {"max_faces": 2},
    )  # fmt: skip
    assert legacy_contracts({"feature_set": {"extractors": {"video": {"name": "other"}}}})["video"].extra == {}
    imported = legacy_contracts({"feature_set": {"imported": {}}, "dims": {"Dv": 35}})["video"]
    assert (imported.extractor, imported.feature, imported.width) == ("imported", "video_feat.npy", 35)
    assert imported.members["video_feat.npy"].required and "video_lmk.npy" not in imported.members
    checkpoint = {"feature_set": {}, "stats": {"video_feat.npy": {"mean": [0.0] * 5}, "audio_feat.npy": {"mean": [1]}}}
    derived = read_contracts(checkpoint)  # a checkpoint records no dims: widths from its statistics
    assert (derived["video"].feature, derived["video"].width, derived["audio"].width) == ("video_feat.npy", 5, 1)


def document(records: dict, dims: dict | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "feature_set": {}, "feature_set_hash": "f", "dims": dims or {"De": 9},
        "counts": {}, "shards": [], "modalities": records,
    }  # fmt: skip


def test_malformed_records_are_refused_naming_the_field() -> None:
    good = declare("video", "toy", OUTPUTS, {"De": 9}).to_json()
    assert dataset_field_problems(document({"video": good})) == []
    cases = {
        "'modalities.smell' is not a modality": {"smell": good},
        "'modalities.video.feature' is 'video_mask.npy', not one of its members of role feature": {
            "video": {**good, "feature": "video_mask.npy"}
        },
        "'modalities.video.width' is 8, but video_emb.npy holds 9 per step": {"video": {**good, "width": 8}},
        "'modalities.video.members.text_x.npy': a member is named video_": {
            "video": {**good, "members": {**good["members"], "text_x.npy": good["members"]["video_emb.npy"]}}
        },
        "'modalities.video.members.video_mask.npy' is declared bool ['Tv'] by the shard schema": {
            "video": {**good, "members": {**good["members"], "video_mask.npy": {**good["members"]["video_emb.npy"]}}}
        },
        "no field 'modalities.video.extractor'": {"video": {k: v for k, v in good.items() if k != "extractor"}},
    }
    for message, records in cases.items():
        problems = dataset_field_problems(document(records))
        assert any(message in p for p in problems), (message, problems)
