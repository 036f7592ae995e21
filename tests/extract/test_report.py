"""``mmfuse report``: HTML + PNG quality report from a synthetic shard directory (and one real media file)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract.report import write_report
from shards.dataset import build_dataset, feature_set_hash
from shards.io import ShardWriter
from shards.schema import N_LANDMARKS, SCHEMA_VERSION, make_key

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT / "examples" / "media"
DT, DA = 5, 7
FEATURE_SET = {
    "schema_version": SCHEMA_VERSION,
    "modalities": ["text", "audio", "video"],
    "fps": None,
    "extractors": {
        "text": {"name": "text-transformer", "model": "tiny-bert", "pretrained": True, "weights_sha256": "abc123"},
        "audio": {"name": "speech-ssl", "model": "random:w2v", "pretrained": False, "weights_sha256": "def456"},
        "video": {"name": "mediapipe-facemesh", "model": "mediapipe==0.10.21"},
    },
}
FS_HASH = feature_set_hash(FEATURE_SET)
SKIP_ERROR = "unreadable container <bad.mp4>: Invalid data & more"


def make_sample(
    video_id: str, clip_id: str, split: str, text: str = "hello", frames: int = 10, media: str | None = None
) -> dict:
    """A valid sample: 25 fps video with landmarks on a circle centred at (180, 144) px, faces in all but 2 frames."""
    rng = np.random.default_rng(len(clip_id))
    key = make_key(video_id, clip_id)
    angle = np.linspace(0, 2 * np.pi, N_LANDMARKS, endpoint=False)
    circle = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=1)
    mask = np.ones(frames, dtype=bool)
    mask[-2:] = False
    lmk = np.where(mask[:, None, None], circle[None], 0).astype(np.float16)
    norm = np.where(mask[:, None], np.array([[180.0, 144.0, 0.0, 40.0]]), 0).astype(np.float32)
    vtime = (np.arange(frames) / 25).astype(np.float32)
    duration = frames / 25
    media = media or f"{video_id}/{clip_id}.mp4"
    ta = int(duration * 50)
    meta = {
        "schema_version": SCHEMA_VERSION, "key": key, "video_id": video_id, "clip_id": clip_id, "split": split,
        "text": text, "media": media, "start": None, "end": None, "duration": duration, "feature_set_hash": FS_HASH,
        "modalities": {
            "text": {"status": "ok", "error": None},
            "audio": {"status": "ok", "error": None, "real_span": [0.0, duration - 0.01]},
            "video": {"status": "ok", "error": None},
        },
    }  # fmt: skip
    return {
        "__key__": key,
        "meta.json": meta,
        "text_ids.npy": np.arange(4, dtype=np.int32),
        "text_feat.npy": rng.normal(size=(4, DT)).astype(np.float16),
        "audio_feat.npy": rng.normal(size=(ta, DA)).astype(np.float16),
        "audio_mask.npy": np.ones(ta, dtype=bool),
        "audio_time.npy": ((np.arange(ta) + 0.5) / 50).astype(np.float32),
        "video_lmk.npy": lmk,
        "video_mask.npy": mask,
        "video_time.npy": vtime,
        "video_norm.npy": norm,
    }


def build(out: Path, shards: dict[str, list[dict]], media_root: Path | None, skipped: tuple | list = ()) -> Path:
    """Write one shard per split, hand-made sidecars, then dataset.json/status.jsonl with the real builder."""
    out.mkdir(parents=True, exist_ok=True)
    for split, samples in shards.items():
        writer = ShardWriter(out / f"{split}-000000.tar", validate=False)
        for sample in samples:
            writer.write(sample)
        writer.commit()
        clips = [
            {"key": s["__key__"], "split": split, "status": "ok", "modalities": s["meta.json"]["modalities"]}
            for s in samples
        ]
        clips += [r for r in skipped if r["split"] == split]
        sidecar = {
            "schema_version": SCHEMA_VERSION, "keys": writer.keys, "clips": clips, "feature_set_hash": FS_HASH,
            "bytes": (out / f"{split}-000000.tar").stat().st_size, "dims": {"Dt": DT, "Da": DA}, "stats": {},
        }  # fmt: skip
        (out / f"{split}-000000.json").write_text(json.dumps(sidecar))
    extra = {"media_root": str(media_root) if media_root else None}
    build_dataset(out, [(split, 0) for split in shards], FEATURE_SET, extra=extra)
    return out


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    bad = make_sample("vid", "nan_clip", "valid")
    bad["audio_feat.npy"][0, :3] = np.nan
    skipped = {"key": "vid__broken", "split": "train", "status": "skipped", "error": SKIP_ERROR, "modalities": {}}
    shards = {
        "train": [make_sample("vid<1>&é", "c.1", "train", text="a <b> & ü"), make_sample("vid", "c2", "train")],
        "valid": [bad],
    }
    return build(tmp_path / "shards", shards, tmp_path / "nowhere", [skipped])


def img_sources(html: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", html)


def test_report_contents_and_links(synthetic: Path, tmp_path: Path) -> None:
    index = write_report(synthetic, tmp_path / "rep")
    html = index.read_text(encoding="utf-8")
    assert index == tmp_path / "rep" / "index.html"
    for key in (make_key("vid<1>&é", "c.1"), "vid__c2", "vid__nan_clip", "vid__broken"):
        assert key in html
    assert "<tr><td>train</td><td>2</td><td>1</td><td>3</td></tr>" in html  # ok 2, skipped 1
    assert "<tr><td>valid</td><td>1</td><td>0</td><td>1</td></tr>" in html
    assert FS_HASH in html and "random:w2v" in html and "abc123" in html
    assert "a &lt;b&gt; &amp; ü" in html and "<b>" not in html
    assert "unreadable container &lt;bad.mp4&gt;: Invalid data &amp; more" in html
    assert "<bad.mp4>" not in html
    # the NaN table lists every float member; the three NaNs are counted
    assert "<tr><td>audio_feat.npy</td><td>3</td><td>3</td><td>0</td></tr>" in html
    assert "<tr><td>video_norm.npy</td><td>3</td><td>0</td><td>0</td></tr>" in html
    sources = img_sources(html)
    assert {"face_rate.png", "durations.png", "av_mismatch.png", "feature_norms.png"} <= set(sources)
    for src in sources:
        assert "/" not in src
        assert (tmp_path / "rep" / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_media_is_reported_not_fatal(synthetic: Path, tmp_path: Path) -> None:
    html = write_report(synthetic, tmp_path / "rep", overlays=2).read_text(encoding="utf-8")
    assert html.count("media not reachable") == 2
    assert str(tmp_path / "nowhere") in html
    assert not list((tmp_path / "rep").glob("overlay_*.png"))


def test_overlay_on_real_media(tmp_path: Path) -> None:
    import matplotlib.image

    sample = make_sample("grid", "bbaf2n", "train", frames=75, media="grid/bbaf2n.mpg")
    shards = build(tmp_path / "shards", {"train": [sample]}, tmp_path / "moved")
    html = write_report(shards, tmp_path / "rep", media_root=MEDIA).read_text(encoding="utf-8")
    assert "overlay_000.png" in img_sources(html)
    assert "within 0 ms of the landmark times" in html
    image = matplotlib.image.imread(tmp_path / "rep" / "overlay_000.png")
    assert image.shape[1] > 3 * image.shape[0]  # 3 frames with a face and one without, side by side


def test_overlay_decodes_only_media_inside_the_media_root(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "grid").mkdir(parents=True)
    (root / "grid" / "link.mpg").symlink_to(MEDIA / "grid" / "bbaf2n.mpg")  # leads out of the root
    outside = [str(MEDIA / "grid" / "bbaf2n.mpg"), "../../examples/media/grid/bbaf2n.mpg", "grid/link.mpg"]
    samples = [make_sample("grid", f"c{i}", "train", frames=75, media=m) for i, m in enumerate(outside)]
    shards = build(tmp_path / "shards", {"train": samples}, root)
    html = write_report(shards, tmp_path / "rep", overlays=3).read_text(encoding="utf-8")
    assert html.count("media not decoded") == 3 and html.count("resolves outside the media root") == 3
    assert not list((tmp_path / "rep").glob("overlay_*.png"))


def test_overlays_zero_and_import_is_cheap(synthetic: Path, tmp_path: Path) -> None:
    html = write_report(synthetic, tmp_path / "rep", overlays=0).read_text(encoding="utf-8")
    assert "none drawn" in html
    code = "import sys, extract.report; assert 'matplotlib' not in sys.modules and 'decord' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def big_flat_video(path: Path, width: int, height: int, frames: int) -> Path:
    """``frames`` frames of one flat colour at ``width`` × ``height``, 25 fps MPEG-4: ~100 KB for 3200 × 2400."""
    import av

    yuv = np.full((height * 3 // 2, width), 128, dtype=np.uint8)
    yuv[:height] = 90
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_overlays_of_large_frames_are_decoded_at_the_capped_size(tmp_path: Path, monkeypatch) -> None:
    from extract import overlays
    from extract.video import MAX_FRAME_SIDE

    (tmp_path / "media" / "big").mkdir(parents=True)
    big_flat_video(tmp_path / "media" / "big" / "c1.mp4", 3200, 2400, 5)
    sample = make_sample("big", "c1", "train", frames=5)  # 3 frames with a face, 2 without: 4 panels
    sample["video_norm.npy"][:3] = [1600.0, 1200.0, 0.0, 400.0]  # a circle of radius 400 px at the centre
    shards = build(tmp_path / "shards", {"train": [sample]}, tmp_path / "media")
    drawn = []
    draw = overlays._draw_overlay
    monkeypatch.setattr(overlays, "_draw_overlay", lambda *a: drawn.append(a) or draw(*a))
    html = write_report(shards, tmp_path / "rep").read_text(encoding="utf-8")
    assert "overlay_000.png" in img_sources(html) and "within 0 ms of the landmark times" in html
    (_, images, points, _), scale = drawn[0], MAX_FRAME_SIDE / 3200
    assert images.shape == (4, 960, 1280, 3)  # 3200 × 2400 decoded at 1280 on its long side, aspect kept
    for pts in points[:3]:  # landmarks follow the frames: centre (640, 480), radius 160 px
        assert np.allclose(pts[:, :2].mean(0), [1600 * scale, 1200 * scale], atol=0.5)
        assert np.allclose(np.linalg.norm(pts[:, :2] - [640, 480], axis=1), 400 * scale, atol=0.5)
    assert points[3] is None


def test_an_overlay_that_fails_is_one_line_naming_the_clip(tmp_path: Path, monkeypatch) -> None:
    import extract.video
    from extract import overlays
    from extract.decode import DecodeError

    media = tmp_path / "media"
    (media / "v").mkdir(parents=True)
    (media / "v" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    big_flat_video(media / "v" / "refused.mp4", 640, 480, 5)
    big_flat_video(media / "v" / "drawn.mp4", 640, 480, 5)
    samples = [make_sample("v", c, "train", frames=5) for c in ("corrupt", "refused", "drawn", "missing")]
    shards = build(tmp_path / "shards", {"train": samples}, media)
    real = extract.video.VideoFrames

    def refuse(path, *args, **kwargs):
        if path.name == "refused.mp4":
            raise DecodeError("frame of 100000 × 100000 pixels is over the decoder's cap")
        return real(path, *args, **kwargs)

    def fail_drawing(path, *args):
        path.write_bytes(b"half")
        raise MemoryError("cannot allocate the figure")

    monkeypatch.setattr(extract.video, "VideoFrames", refuse)
    monkeypatch.setattr(overlays, "_draw_overlay", fail_drawing)
    html = write_report(shards, tmp_path / "rep", overlays=4).read_text(encoding="utf-8")
    lines = {key: line for line in html.splitlines() for key in ("corrupt", "refused", "drawn", "missing")
             if line.startswith(f"<p class='flag'>no overlay for v__{key}: ")}  # fmt: skip
    assert set(lines) == {"corrupt", "refused", "drawn", "missing"}
    assert "media not decodable: " in lines["corrupt"] and "corrupt.mp4" in lines["corrupt"]
    assert "DecodeError: frame of 100000 × 100000 pixels is over the decoder&#x27;s cap" in lines["refused"]
    assert "overlay not drawn: MemoryError: cannot allocate the figure" in lines["drawn"]
    assert "media not reachable: " in lines["missing"] and "does not exist" in lines["missing"]
    assert not list((tmp_path / "rep").glob("overlay_*.png"))  # no half-drawn picture left
    assert "face_rate.png" in img_sources(html)  # the rest of the report is there
