"""Tests for datamodules/demo.py: real, openable media files and a learnable, imperfect signal."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter, defaultdict
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import soundfile
from PIL import Image

from datamodules.demo import MODALITIES, add_arguments, generate, planted, run
from tests.conftest import ROOT

SMALL = dict(image_size=48, video_size=32, video_seconds=1.0, fps=8, audio_seconds=0.5,
             sample_rate=16000)
# Text/table/image only: the classifier and category tests need no video/audio and run faster.
NO_AV = {"video": 1.0, "audio": 1.0}


def _rows(meta: Path) -> list[dict]:
    return [json.loads(line) for line in meta.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    meta = generate(tmp_path_factory.mktemp("demo"), 16, seed=3, **SMALL)
    return meta.parent, _rows(meta)


def test_meta_schema(demo: tuple[Path, list[dict]]) -> None:
    root, rows = demo
    assert len(rows) == 16
    keys = ["id", "title", "table", "category", "instance", "image", "video", "audio"]
    for r in rows:
        assert list(r) == keys
        assert r["id"].startswith("s3-") and isinstance(r["instance"], str)
        assert isinstance(r["title"], str) and r["title"]
        assert isinstance(r["category"], int) and 0 <= r["category"] < 8
        assert r["image"] == f"images/{r['id']}.jpg" and (root / r["image"]).is_file()
        assert r["video"] == f"videos/{r['id']}.mp4" and (root / r["video"]).is_file()
        assert r["audio"] == f"audios/{r['id']}.wav" and (root / r["audio"]).is_file()
    assert len({r["id"] for r in rows}) == len(rows)
    per_instance = Counter(r["instance"] for r in rows)
    assert max(per_instance.values()) >= 2 and max(per_instance.values()) <= 4
    for inst in per_instance:  # listings of one instance are one product: one category
        assert len({r["category"] for r in rows if r["instance"] == inst}) == 1


def test_table_parses_as_m5product_pairs(demo: tuple[Path, list[dict]]) -> None:
    for r in demo[1]:
        pairs = [p.split("#:#") for p in r["table"].split("#;#")]
        assert 5 <= len(pairs) <= 7 and all(len(p) == 2 and all(p) for p in pairs)
        table = dict(pairs)
        assert {"brand", "model"} <= set(table) and table["brand"] in r["title"].split()


def test_image_opens_with_pil(demo: tuple[Path, list[dict]]) -> None:
    root, rows = demo
    with Image.open(root / rows[0]["image"]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))


def test_video_opens_with_decord(demo: tuple[Path, list[dict]]) -> None:
    root, rows = demo
    vr = decord.VideoReader(str(root / rows[0]["video"]))
    assert abs(len(vr) - 8) <= 1
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert frames.shape[1:] == (32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # not a blank clip


def test_video_has_h264_and_aac_streams(demo: tuple[Path, list[dict]]) -> None:
    root, rows = demo
    with av.open(str(root / rows[0]["video"])) as c:
        codecs = {s.type: s.codec_context.name for s in c.streams}
        assert codecs == {"video": "h264", "audio": "aac"}
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert c.streams.audio[0].sample_rate == 16000


def test_wav_reads_with_soundfile(demo: tuple[Path, list[dict]]) -> None:
    root, rows = demo
    info = soundfile.info(str(root / rows[0]["audio"]))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 8000, "PCM_16")


def test_missing_modalities(tmp_path: Path) -> None:
    meta = generate(tmp_path / "a", 20, missing={"audio": 1.0, "text": 1.0, "table": 1.0,
                                                  "image": 0.5}, **SMALL)
    rows = _rows(meta)
    assert all(r["audio"] is None and r["title"] == "" and r["table"] == "" for r in rows)
    assert not any((meta.parent / "audios").iterdir())
    assert 0 < sum(r["image"] is None for r in rows) < 20
    for r in rows:
        assert r["image"] is not None or r["video"] is not None  # never zero modalities
        for m, ext in (("image", "jpg"), ("video", "mp4")):
            assert (meta.parent / f"{m}s/{r['id']}.{ext}").exists() == (r[m] is not None)
    with av.open(str(meta.parent / next(r["video"] for r in rows if r["video"]))) as c:
        assert [s.type for s in c.streams] == ["video"]  # audio missing -> no audio track

    rows = _rows(generate(tmp_path / "b", 20, missing={m: 1.0 for m in MODALITIES}, **SMALL))
    for r in rows:  # everything dropped -> exactly one modality kept at random
        kept = [bool(r["title"]), bool(r["table"])] + [r[m] is not None for m in MODALITIES[2:]]
        assert sum(kept) == 1
    assert len({tuple(r[m] is None for m in MODALITIES[2:]) for r in rows}) > 1


def test_deterministic_and_worker_independent(tmp_path: Path) -> None:
    kw = dict(missing={"video": 0.5}, noisy_title_rate=0.3, **SMALL)
    a = generate(tmp_path / "a", 12, seed=5, **kw)
    b = generate(tmp_path / "b", 12, seed=5, workers=2, **kw)
    assert a.read_bytes() == b.read_bytes()
    first = _rows(a)[0]
    assert (a.parent / first["image"]).read_bytes() == (b.parent / first["image"]).read_bytes()
    other = _rows(generate(tmp_path / "c", 12, seed=6, **kw))
    assert not {r["id"] for r in other} & {r["id"] for r in _rows(a)}


def _title_accuracy(train: list[dict], test: list[dict], categories: int = 8) -> float:
    """Multinomial naive Bayes on title words: fillers and brands carry no category and wash out."""
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for r in train for w in r["title"].split()}))}
    counts = np.ones((categories, len(vocab) + 1))  # Laplace smoothing; column 0: unseen words
    for r in train:
        for w in r["title"].split():
            counts[r["category"], vocab[w]] += 1
    logp = np.log(counts / counts.sum(1, keepdims=True))
    hits = 0
    for r in test:
        idx = [vocab.get(w, 0) for w in r["title"].split()]  # column 0: unseen words
        hits += int(logp[:, idx].sum(1).argmax() == r["category"])
    return hits / len(test)


def test_categories_shared_across_seeds(tmp_path: Path) -> None:
    kw = dict(missing={"image": 1.0, **NO_AV}, **SMALL)
    train = _rows(generate(tmp_path / "train", 150, seed=0, **kw))
    same_world = _rows(generate(tmp_path / "eval", 100, seed=1, **kw))
    other_world = _rows(generate(tmp_path / "other", 100, seed=1, world_seed=9, **kw))
    assert _title_accuracy(train, same_world) > 0.5
    assert _title_accuracy(train, other_world) < 0.35
    keys = lambda rows, c: {p.split("#:#")[0] for r in rows if r["category"] == c
                            for p in r["table"].split("#;#")}
    assert all(keys(train, c) & keys(same_world, c) - {"brand", "model"} for c in range(8)
               if keys(train, c) and keys(same_world, c))


def test_signal_is_learnable_but_imperfect(tmp_path: Path) -> None:
    """Nearest centroid on each image's hue histogram (a feature an encoder has to learn): clearly
    above chance (1/8), clearly below 100 %; and clearly above the image's mean colour, which the
    random-hue region (`CLUTTER_SHARE`) keeps from giving the category away to random features."""
    kw = dict(missing=NO_AV, **SMALL)
    feats: dict[str, dict[str, np.ndarray]] = {}
    for split, seed, n in (("train", 0, 120), ("test", 1, 80)):
        meta = generate(tmp_path / split, n, seed=seed, **kw)
        rows = _rows(meta)
        images = [Image.open(meta.parent / r["image"]) for r in rows]
        hue = [np.asarray(im.convert("HSV"), np.float32)[..., 0].ravel() for im in images]
        feats[split] = {
            "mean colour": np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images]),
            "hue histogram": np.stack([np.histogram(h, 32, (0, 256))[0] / h.size for h in hue]),
            "label": np.array([r["category"] for r in rows])}

    def accuracy(kind: str) -> float:
        x, y = feats["train"][kind], feats["train"]["label"]
        xt, yt = feats["test"][kind], feats["test"]["label"]
        # A long-tail category may have no training product: give it an unreachable centroid.
        centroids = np.stack([np.median(x[y == c], 0) if (y == c).any() else np.full(x.shape[1], 1e6)
                              for c in range(8)])
        return float((((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == yt).mean())

    learned, mean_colour = accuracy("hue histogram"), accuracy("mean colour")
    assert 0.4 < learned < 0.95, learned
    assert mean_colour < learned - 0.15, (mean_colour, learned)


def test_cli_and_unknown_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--products", "4", "--missing", "video=1",
                              "--missing", "audio=1.0", "--image-size", "32"])
    run(args)
    assert "4 products" in capsys.readouterr().out
    assert all(r["video"] is None for r in _rows(tmp_path / "meta.jsonl"))
    with pytest.raises(ValueError, match="smell"):
        run(parser.parse_args(["--out", str(tmp_path / "other"), "--missing", "smell=0.2"]))
    with pytest.raises(ValueError, match="not empty"):  # never written over
        run(parser.parse_args(["--out", str(tmp_path), "--products", "2"]))
    assert len(_rows(tmp_path / "meta.jsonl")) == 4
    with pytest.raises(ValueError, match="smell"):
        generate(tmp_path, 4, missing={"smell": 0.1})
    with pytest.raises(ValueError):
        generate(tmp_path, 4, missing={"video": 1.5})


def test_chinese_is_the_same_products_in_chinese_words(tmp_path: Path) -> None:
    """`language="zh"`: every English word replaced by its Chinese one (made-up category words of the
    categories past the noun list too), brands and model codes kept; labels and media unchanged."""
    from datamodules import demo_words_zh as zh
    from datamodules.demo import _syllables

    kw = dict(seed=4, categories=12, missing={"video": 1.0, "audio": 1.0}, **SMALL)
    en, cn = (_rows(generate(tmp_path / lang, 30, language=lang, **kw)) for lang in ("en", "zh"))

    def word(w: str) -> str:
        if w[0].isupper() or w in zh.FILLERS.values():  # a brand, or a filler replaced below
            return w
        return zh.NOUNS.get(w) or zh.FILLERS.get(w) or "".join(zh.SYLLABLES[s] for s in _syllables(w))

    keys = {**zh.KEYS, "brand": zh.BRAND_KEY, "model": zh.MODEL_KEY}
    for e, c in zip(en, cn):
        assert {k: v for k, v in e.items() if k not in ("title", "table")} == {k: v for k, v in c.items() if k not in ("title", "table")}
        title = e["title"]
        for phrase in ("free shipping", "fast delivery"):  # the fillers of two words
            title = title.replace(phrase, zh.FILLERS[phrase])
        assert c["title"] == " ".join(word(w) for w in title.split())
        pairs = [p.split("#:#") for p in e["table"].split("#;#")]
        assert c["table"] == "#;#".join(f"{keys[k]}#:#{v if k in ('brand', 'model') else zh.VALUES.get(v, v)}" for k, v in pairs)
        assert (tmp_path / "en" / e["image"]).read_bytes() == (tmp_path / "zh" / c["image"]).read_bytes()
    made_up = set(zh.SYLLABLES.values())
    assert any(set(w) <= made_up for r in cn for w in r["title"].split())  # categories past the noun list
    with pytest.raises(ValueError, match="language"):
        generate(tmp_path / "fr", 2, language="fr")


def test_planted_is_what_generate_writes(tmp_path: Path) -> None:
    """`planted` (the ceiling benchmark's ground truth) draws the products `generate` writes."""
    missing = {"video": 0.3, "audio": 0.5, "table": 0.2}
    rows = _rows(generate(tmp_path, 20, seed=4, missing=missing, **SMALL))
    truth = planted(20, seed=4, missing=missing)
    assert [(r["id"], r["category"], r["instance"]) for r in rows] == [(t["id"], t["category"], t["instance"]) for t in truth]
    for row, t in zip(rows, truth):
        assert t["present"] == {"text": bool(row["title"]), "table": bool(row["table"]),
                                **{m: row[m] is not None for m in ("image", "video", "audio")}}  # fmt: skip
    shown = [t["shown"][m] != t["category"] for t in truth for m in MODALITIES]
    assert 0 < sum(shown) < len(shown)  # some modalities show another category, most their own


def test_ceiling_of_a_perfect_detector_is_one_and_confusion_lowers_it() -> None:
    spec = importlib.util.spec_from_file_location("demo_ceiling", ROOT / "bench" / "demo_ceiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = planted(200, seed=2)
    found = bench.ceilings(rows)
    honest = [{**r, "shown": {m: r["category"] for m in MODALITIES}} for r in rows]
    assert all(value == pytest.approx(1.0) for value in bench.ceilings(honest).values())
    assert all(0.2 < value < 0.8 for value in found.values()), found
