"""Generate M5Product-like demo products as real encoded media files, with a planted signal.

Layout written under ``OUT``::

    OUT/meta.jsonl        one JSON object per line, one per product (schema below)
    OUT/images/<id>.jpg   JPEG main image, RGB, image_size x image_size, quality 85
    OUT/videos/<id>.mp4   MP4: H.264 (libx264, yuv420p, video_size rounded up to even) at `fps`
                          frames/s for `video_seconds`; plus an AAC mono track carrying the same
                          sound as the wav -- only when the product also has audio
    OUT/audios/<id>.wav   16-bit PCM mono WAV at `sample_rate`, `audio_seconds` long
    OUT/features/<id>.{regions,boxes,video,mel}.npy   with `features=True` (`--features`): the
                          pre-extracted features M5Product released (regions + boxes, per-second
                          clip features, log-mel), see `datamodules/demo_features.py`

meta.jsonl: ``{"id": "s<seed>-p<index>", "title": str, "table": "key#:#value#;#key#:#value...",
"category": int, "instance": "s<seed>-i<index>", "image": "images/<id>.jpg" | null,
"video": "videos/<id>.mp4" | null, "audio": "audios/<id>.wav" | null}``. A missing title or table
is ``""``; a missing medium is ``null`` and has no file. Every product keeps at least one modality.
With `features=True` each line also has ``"image_regions"``, ``"image_boxes"``,
``"video_features"``, ``"audio_mel"`` (``"features/<id>.regions.npy"`` ... or ``null`` when that
modality is absent); without it, meta.jsonl is exactly as it was before features existed.

``layout="official"`` (``--layout official``) writes the same products the way the M5Product
release comes, for `scale shards` to read (see `datamodules/sources.py`)::

    OUT/products.json     {"<id>": {"title": str, "pv": table string, "label": category,
                                    "instance": str}, ...}
    OUT/image/<id>.jpg    OUT/video/<id>.mp4     (the same bytes as the jsonl layout's)
    OUT/audio/<id>.wav | OUT/audio/<id>.mp3      product index % 3 == 0: WAV, == 1: MP3 (libsndfile),
                          == 2: WAV too, except with a video: then NO audio file, the audio is only
                          the video's AAC track (the converter takes it from there)
    OUT/image_regions/<id>.npy  OUT/image_boxes/<id>.npy  OUT/video_features/<id>.npy
    OUT/audio_mel/<id>.npy      with `features=True`

Planted signal. The *world* (``world_seed``, ``categories``) fixes each category's name, six
category words, hue, shape kind, base tone, motion direction and five property keys with typical
values, so folders generated with different ``seed`` share categories (train / eval splits). The
``seed`` fixes the instances: a brand word, model code, colour, shape position/size, tone harmonic
and its own property values; each instance has 1-4 listings (products) that differ by noise and
jitter, like different merchants' photos. Per product and per modality, with probability
``CONFUSION`` that modality shows a random *other* category's cues, independently per modality,
so no single modality is a perfect label but fusing them helps:

- title: brand + 2-3 category words + 2-4 generic filler words, shuffled;
- table: 3-5 category key/value pairs plus brand and model pairs, shuffled;
- image: category-hue background, a region of a random hue (``CLUTTER_SHARE``) and noise, a
  category-kind shape in the instance colour/position;
- video: a blob in the instance colour moving in the category direction over a category-hue
  background (the image's layout: category around, instance in the object);
- audio: category base tone + instance harmonic + two tones at random pitches (``CHATTER_*``) +
  noise, under an attack/decay envelope.

The random hue region and the random tones are there so that an encoder has to *learn* the
category: without them the category is the image's mean colour and the clip's loudest pitch, which
random features already keep, and training could not beat its own initialisation on them
(docs/measured.md, "Does every modality learn?").

``noisy_title_rate`` replaces that share of titles with another random product's title (the
M5Product "title poorly matched" noise). Output is deterministic: every product draws from an RNG
keyed by (seed, index), so ``workers`` does not change the result and same args give a
byte-identical meta.jsonl.

``language="zh"`` (``--language zh``) writes the same products with Chinese titles and tables, as
M5Product's are: every word the English demo draws is replaced by its Chinese word of
`datamodules/demo_words_zh.py` (brands, model codes and units stay Latin, as in real Chinese
listings). The words are drawn in English and replaced afterwards, so the same arguments give the
same categories, instances, labels and media files in both languages; only the text differs.
"""

from __future__ import annotations

import argparse
import colorsys
import inspect
import json
import multiprocessing
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from datamodules import demo_features, demo_words_zh
from scale.modalities import BUILTIN
from scale.outputs import output_folder
from scale.shard_format import format_table

MODALITIES: tuple[str, ...] = BUILTIN
"""The modalities the demo renders: M5Product's five (a plugin modality adds its own field to the
products, see `tests/test_sixth_modality.py`)."""
CONFUSION = 0.25
"""Chance that one modality of one product shows a random other category's cues."""
CHATTER_TONES, CHATTER_LEVEL = 2, 0.7
"""Background tones at random pitches in every clip (of the category tones' range, each at this
amplitude relative to the base tone): the base tone is then not the clip's loudest pitch by
construction, so an untrained audio encoder does not read the category for free."""
CLUTTER_SHARE = (0.25, 0.5)
"""Range of the share of each image covered by a region of a random hue (a straight edge at a random
angle): the category hue is then not the image's mean colour by construction, so an untrained image
encoder does not read the category for free (the image's counterpart of the audio's chatter)."""

_FILES = {"image": "images/{}.jpg", "video": "videos/{}.mp4", "audio": "audios/{}.wav"}
LAYOUTS = ("jsonl", "official")
LANGUAGES = ("en", "zh")
OFFICIAL_META = "products.json"
_OFFICIAL = {"image": "image/{}.jpg", "video": "video/{}.mp4", "audio": "audio/{}.wav"}
_OFFICIAL_AUDIO = ("audio/{}.wav", "audio/{}.mp3")  # every audio file name a product may have had
# Distinct RNG streams, so adding a draw to one stage never shifts another stage's numbers.
_WORLD, _INSTANCES, _PRODUCT, _MEDIA, _NOISY = 7001, 7002, 7003, 7004, 7005

_NOUNS = """shoe sneaker boot dress skirt shirt jacket hoodie phone charger cable earbuds speaker
lamp bulb mug kettle teapot pan knife spoon blender pillow blanket towel curtain rug chair desk
shelf backpack wallet handbag watch bracelet necklace lipstick serum shampoo perfume toy puzzle doll
drone camera tripod bicycle helmet tent glove sock scarf""".split()
_FILLERS = ("new", "hot", "sale", "2024", "free shipping", "official", "genuine", "best", "quality",
            "discount", "original", "limited", "gift", "promo", "fast delivery", "cheap")
_KEYS: dict[str, tuple[str, ...]] = {k: tuple(v.split()) for k, v in (l.split(": ") for l in """\
material: cotton leather plastic steel wood glass silicone ceramic
style: casual classic sporty vintage minimal luxury
season: spring summer autumn winter all-season
fit: slim regular loose oversized
power: 5W 10W 20W 65W battery
capacity: 250ml 500ml 1L 2L 32GB 128GB
pattern: solid striped floral plaid dotted
origin: Zhejiang Guangdong Jiangsu Fujian Shandong
age group: adult teen kids baby
usage: home office outdoor travel gym
weight: 100g 250g 500g 1kg 2kg
finish: matte glossy brushed textured
size: S M L XL one-size
feature: waterproof wireless foldable portable rechargeable""".splitlines())}
_SYLLABLES = ("ka lo mi ra ven zu tor qui sa ne dor fi ga ble xo pe lin mar co ty "
              "bro nix sol ume vak dri").split()


class _Words(NamedTuple):
    """The words of a product that are not its category's or instance's: per language."""

    fillers: tuple[str, ...]
    brand_key: str
    model_key: str


_WORDS = {
    "en": _Words(_FILLERS, "brand", "model"),
    # Same length and order as the English fillers: the same draws pick the same words.
    "zh": _Words(tuple(demo_words_zh.FILLERS[w] for w in _FILLERS), demo_words_zh.BRAND_KEY,
                 demo_words_zh.MODEL_KEY),
}


_MASKS = {  # dx, dy: offsets from the shape centre in image units; r: shape radius
    "circle": lambda dx, dy, r: dx**2 + dy**2 < r**2,
    "square": lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) < r * 0.85,
    "triangle": lambda dx, dy, r: (abs(dy) < r) & (abs(dx) < (dy + r) / 2),
    "diamond": lambda dx, dy, r: abs(dx) + abs(dy) < r * 1.2,
    "cross": lambda dx, dy, r: ((abs(dx) < r / 3) & (abs(dy) < r)) | ((abs(dy) < r / 3)
                                                                   & (abs(dx) < r)),
    "ring": lambda dx, dy, r: abs(np.sqrt(dx**2 + dy**2) - r * 0.8) < r * 0.25,
    "hbar": lambda dx, dy, r: (abs(dx) < r * 1.2) & (abs(dy) < r / 2.5),
    "vbar": lambda dx, dy, r: (abs(dy) < r * 1.2) & (abs(dx) < r / 2.5),
}


def _word(rng: np.random.Generator, used: set[str]) -> str:
    for attempt in range(10**6):  # longer words after repeated collisions: never runs dry
        w = "".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)) + attempt // 10))
        if w not in used:
            break
    used.add(w)
    return w


def _syllables(word: str) -> list[str] | None:
    """The syllables `_word` joined into `word` (None: it is not made of them). Any parse joins
    back to `word`, so distinct words give distinct syllable lists."""
    if not word:
        return []
    for s in _SYLLABLES:
        if word.startswith(s) and (rest := _syllables(word[len(s):])) is not None:
            return [s, *rest]
    return None


def _in_chinese(world: list[dict], insts: list[dict]) -> tuple[list[dict], list[dict]]:
    """The world and instances with their category words, property keys and values in Chinese
    (`datamodules/demo_words_zh.py`); a made-up category word becomes one character per syllable.
    Translated after drawing, so every draw (and every medium) is the English demo's."""
    zh = demo_words_zh

    def word(w: str) -> str:
        return zh.NOUNS.get(w) or "".join(zh.SYLLABLES[s] for s in _syllables(w) or [])

    def props(p: dict) -> dict:
        return {zh.KEYS[k]: [zh.VALUES.get(x, x) for x in v] if isinstance(v, list) else zh.VALUES.get(v, v)
                for k, v in p.items()}  # fmt: skip

    world = [{**c, "name": "、".join(word(w) for w in c["words"][:2]), "words": [word(w) for w in c["words"]],
              "props": props(c["props"])} for c in world]  # fmt: skip
    return world, [{**inst, "props": props(inst["props"])} for inst in insts]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _world(categories: int, world_seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([world_seed, categories, _WORLD])
    nouns = [str(w) for w in rng.permutation(_NOUNS)]
    used = set(_NOUNS) | set(_FILLERS)
    # Evenly spaced hues/tones/directions, then permuted: categories stay separable for any count.
    hue, shape, tone, direction = (rng.permutation(categories) for _ in range(4))
    cats = []
    for c in range(categories):
        words = [nouns.pop() if nouns else _word(rng, used) for _ in range(6)]
        keys = [str(k) for k in rng.choice(list(_KEYS), 5, replace=False)]
        cats.append({
            "name": f"{words[0]} & {words[1]}", "words": words,
            "hue": (hue[c] + rng.uniform(-0.15, 0.15)) / categories,
            "shape": list(_MASKS)[shape[c] % len(_MASKS)],
            "tone": 220.0 * 2 ** (3.0 * tone[c] / max(categories - 1, 1)),  # 220..1760 Hz
            "angle": 2 * np.pi * direction[c] / categories,
            "props": {k: [str(v) for v in rng.choice(_KEYS[k], 2, replace=False)] for k in keys},
        })
    # Long tail: category popularity falls off with a random rank.
    weights = 1.0 / (1.0 + 0.35 * rng.permutation(categories))
    for c, w in zip(cats, weights / weights.sum()):
        c["weight"] = float(w)
    return cats


def _instances(products: int, seed: int, world: list[dict]) -> tuple[list[dict], list[int]]:
    """Returns the instances and, per product index, its instance index (shuffled order)."""
    rng = np.random.default_rng([seed, _INSTANCES])
    p = np.array([c["weight"] for c in world])
    used = set(_NOUNS) | {w.capitalize() for c in world for w in c["words"]}
    insts: list[dict] = []
    listing: list[int] = []
    while len(listing) < products:
        c = int(rng.choice(len(world), p=p))
        letters = "".join(rng.choice(list("ABCDEFGHKMNPRSTXZ"), 2))
        insts.append({
            "id": f"s{seed}-i{len(insts):06d}", "category": c,
            "brand": _word(rng, used).capitalize(), "model": f"{letters}-{rng.integers(100, 1000)}",
            "colour": _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 1.0)),
            "pos": rng.uniform(0.3, 0.7, 2), "radius": rng.uniform(0.16, 0.28),
            "ratio": float(rng.choice([1.5, 2.0, 2.5, 3.0])), "harm": rng.uniform(0.2, 0.5),
            "detune": rng.uniform(-0.03, 0.03),
            "props": {k: str(rng.choice(v)) for k, v in world[c]["props"].items()},
        })
        k = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
        listing += [len(insts) - 1] * min(k, products - len(listing))
    # Shuffled so listings of one instance are not neighbours (index-based splits stay fair).
    return insts, [listing[i] for i in rng.permutation(products)]


def _product(i: int, seed: int, inst: dict, world: list[dict], missing: dict[str, float],
             vocab: _Words = _WORDS["en"]) -> dict:
    """Draws everything about product `i` except pixel/sample noise (that happens in `_render`)."""
    rng = np.random.default_rng([seed, _PRODUCT, i])
    own = inst["category"]
    shown = {}
    for m in MODALITIES:
        confused = len(world) > 1 and rng.random() < CONFUSION
        shown[m] = int((own + rng.integers(1, len(world))) % len(world)) if confused else own
    present = {m: bool(rng.random() >= missing.get(m, 0.0)) for m in MODALITIES}
    cw = world[shown["text"]]["words"]
    words = [inst["brand"], *rng.choice(cw, int(rng.integers(2, 4)), replace=False),
             *rng.choice(vocab.fillers, int(rng.integers(2, 5)), replace=False)]
    title = " ".join(str(w) for w in rng.permutation(words))
    tc = world[shown["table"]]
    keys = rng.choice(list(tc["props"]), int(rng.integers(3, 6)), replace=False)
    own_props = shown["table"] == own  # a confused table shows the other category's values
    pairs = [(str(k), inst["props"][k] if own_props else str(rng.choice(tc["props"][k])))
             for k in keys] + [(vocab.brand_key, inst["brand"]), (vocab.model_key, inst["model"])]
    table = format_table(pairs[j] for j in rng.permutation(len(pairs)))
    if not any(present.values()):  # drawn last, so the missing rates never change the content
        present[MODALITIES[int(rng.integers(len(MODALITIES)))]] = True
    return {"id": f"s{seed}-p{i:06d}", "title": title, "table": table, "category": own,
            "instance": inst["id"], "shown": shown, "present": present}


def _image(job: dict, rng: np.random.Generator) -> np.ndarray:
    n, cat, inst = job["image_size"], job["cats"]["image"], job["inst"]
    bg = _hsv(cat["hue"] + rng.normal(0, 0.015), rng.uniform(0.45, 0.75), rng.uniform(0.6, 0.9))
    img = np.full((n, n, 3), bg, np.float32)
    yy, xx = np.mgrid[0:n, 0:n] / n
    # A half-plane through the centre covers half the image; moving its edge by c along its normal
    # covers about 0.5 - c of it (exact for edges parallel to a side, close enough at other angles).
    a, c = rng.uniform(0, 2 * np.pi), 0.5 - rng.uniform(*CLUTTER_SHARE)
    img[(xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a) > c] = _hsv(
        rng.random(), rng.uniform(0.45, 0.75), rng.uniform(0.6, 0.9))
    cx, cy = inst["pos"] + rng.normal(0, 0.03, 2)
    img[_MASKS[cat["shape"]](xx - cx, yy - cy, inst["radius"] * rng.uniform(0.9, 1.1))] = (
        inst["colour"] * rng.uniform(0.9, 1.1))
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _video(job: dict, rng: np.random.Generator) -> np.ndarray:
    n, t = job["video_size"], max(1, round(job["video_seconds"] * job["fps"]))
    cat, inst = job["cats"]["video"], job["inst"]
    bg = _hsv(cat["hue"] + rng.normal(0, 0.015), rng.uniform(0.45, 0.75), rng.uniform(0.6, 0.9))
    frames = np.full((t, n, n, 3), bg, np.float32)
    yy, xx = np.mgrid[0:n, 0:n] / n
    d = np.array([np.cos(cat["angle"]), np.sin(cat["angle"])])
    start = 0.5 - 0.3 * d + rng.normal(0, 0.04, 2)
    blob = inst["colour"] * rng.uniform(0.9, 1.1)
    for k in range(t):
        cx, cy = start + 0.6 * d * k / max(t - 1, 1)
        frames[k][(xx - cx) ** 2 + (yy - cy) ** 2 < 0.18**2] = blob
    frames += rng.normal(0, 10, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def _audio(job: dict, rng: np.random.Generator) -> np.ndarray:
    sr, inst = job["sample_rate"], job["inst"]
    t = np.arange(max(1, round(job["audio_seconds"] * sr))) / sr
    f0 = job["cats"]["audio"]["tone"] * (1 + inst["detune"]) * (1 + rng.normal(0, 0.005))
    wave = np.sin(2 * np.pi * f0 * t) + inst["harm"] * np.sin(
        2 * np.pi * f0 * inst["ratio"] * t + rng.uniform(0, 2 * np.pi))
    chatter = CHATTER_LEVEL * sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
                                  for f in 220.0 * 2 ** rng.uniform(0, 3, CHATTER_TONES))
    env = np.minimum(1.0, t / 0.05) * np.exp(-1.5 * t / max(job["audio_seconds"], 1e-3))
    wave = 0.6 * env * (wave + chatter) / (1 + inst["harm"] + CHATTER_LEVEL * CHATTER_TONES)
    wave = wave + rng.normal(0, 0.02, t.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def _encode_mp4(path: Path, frames: np.ndarray, fps: int, wave: np.ndarray | None, sr: int) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # ultrafast + one thread: tiny clips, and many run side by side in the worker pool.
        vs.options = {"preset": "ultrafast", "crf": "23"}
        vs.codec_context.thread_count = 1
        vs.codec_context.time_base = Fraction(1, fps)
        aus = out.add_stream("aac", rate=sr, layout="mono") if wave is not None else None
        for k, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = k
            out.mux(vs.encode(vf))
        out.mux(vs.encode())
        if aus is not None:
            af = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
            af.sample_rate, af.pts = sr, 0
            out.mux(aus.encode(af))  # the encoder re-chunks into AAC-sized frames itself
            out.mux(aus.encode())


def _render(job: dict) -> None:
    from PIL import Image
    import soundfile

    rng = np.random.default_rng([job["seed"], _MEDIA, job["index"]])
    root, pid = Path(job["out"]), job["id"]
    official = job.get("layout") == "official"
    paths = {m: root / fmt.format(pid) for m, fmt in (job["files"] if official else _FILES).items()}
    for m, p in paths.items():  # a rerun into the same OUT must not leave a "missing" file behind
        if not job["present"][m]:
            p.unlink(missing_ok=True)
    if official:
        for fmt in _OFFICIAL_AUDIO:
            if root / fmt.format(pid) != paths.get("audio"):
                (root / fmt.format(pid)).unlink(missing_ok=True)
    if job["present"]["image"]:
        Image.fromarray(_image(job, rng), "RGB").save(paths["image"], "JPEG", quality=85)
    wave = _audio(job, rng) if job["present"]["audio"] else None
    if wave is not None and "audio" in paths:
        if paths["audio"].suffix == ".mp3":
            soundfile.write(paths["audio"], wave, job["sample_rate"], format="MP3", subtype="MPEG_LAYER_III")
        else:
            soundfile.write(paths["audio"], wave, job["sample_rate"], subtype="PCM_16")
    if job["present"]["video"]:
        _encode_mp4(paths["video"], _video(job, rng), job["fps"], wave, job["sample_rate"])
    if job.get("features"):
        demo_features.write_features(job, wave)
        if official:  # the release keeps each feature in its own folder: features/<id>.X.npy -> <field>/<id>.npy
            for name, (_, pattern) in demo_features.FILES.items():
                source, target = root / pattern.format(pid), root / name / f"{pid}.npy"
                if source.exists():
                    source.replace(target)
                else:
                    target.unlink(missing_ok=True)


def generate(out: str | Path, products: int, seed: int = 0, categories: int = 8,
             world_seed: int = 0, missing: dict[str, float] | None = None,
             noisy_title_rate: float = 0.0, image_size: int = 96, video_size: int = 64,
             video_seconds: float = 2.0, fps: int = 12, audio_seconds: float = 2.0,
             sample_rate: int = 16000, workers: int = 0, features: bool = False,
             region_dim: int = 2048, video_feature_dim: int = 1024, mel_bins: int = 80,
             mel_frames: int = 751, layout: str = "jsonl", language: str = "en") -> Path:
    """Writes the raw folder; returns path to meta.jsonl (`layout="official"`: products.json).
    `features` also writes the pre-extracted feature arrays (widths `region_dim`,
    `video_feature_dim`, `mel_bins`; at most `mel_frames`). `language="zh"`: Chinese text, the
    same products otherwise (module doc)."""
    if layout not in LAYOUTS:
        raise ValueError(f"demo layout {layout!r}: expected one of {LAYOUTS}")
    if language not in LANGUAGES:
        raise ValueError(f"demo language {language!r}: expected one of {LANGUAGES}")
    missing = dict(missing or {})
    for m, rate in missing.items():
        if m not in MODALITIES:
            raise ValueError(f"unknown modality {m!r} in missing (expected one of {MODALITIES})")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"missing rate for {m!r} must be in [0, 1], got {rate}")
    if not (0.0 <= noisy_title_rate <= 1.0 and products >= 1 and categories >= 1):
        raise ValueError("need 0 <= noisy_title_rate <= 1, products >= 1 and categories >= 1")
    if features and min(region_dim, video_feature_dim, mel_bins, mel_frames) < 1:
        raise ValueError("feature sizes (region_dim, video_feature_dim, mel_bins, mel_frames) must be >= 1")
    root = Path(out)
    for fmt in (_FILES if layout == "jsonl" else _OFFICIAL).values():
        (root / fmt).parent.mkdir(parents=True, exist_ok=True)
    if features:
        (root / "features").mkdir(exist_ok=True)
        for name in demo_features.FILES if layout == "official" else ():
            (root / name).mkdir(exist_ok=True)

    world, insts, listing, rows = _draw(products, seed, categories, world_seed, missing, language)
    rng = np.random.default_rng([seed, _NOISY])
    raw = [r["title"] for r in rows]
    for i in np.flatnonzero(rng.random(products) < noisy_title_rate) if products > 1 else []:
        rows[i]["title"] = raw[(i + int(rng.integers(1, products))) % products]

    sizes = {"image_size": image_size, "video_size": video_size + video_size % 2,  # yuv420p: even
             "video_seconds": video_seconds, "fps": fps, "audio_seconds": audio_seconds,
             "sample_rate": sample_rate}
    jobs = [{"out": str(root), "seed": seed, "index": i, "id": r["id"], "present": r["present"],
             "inst": insts[listing[i]], "cats": {m: world[c] for m, c in r["shown"].items()},
             **sizes} for i, r in enumerate(rows)]
    if layout == "official":
        for job in jobs:
            job["layout"], job["files"] = layout, _official_files(job["index"], job["present"])
    if features:  # the planted latents behind the region / clip features (demo_features.py)
        world_latent = demo_features.world_latents(categories, world_seed)
        inst_latent = demo_features.instance_latents(len(insts), seed)
        for job, r in zip(jobs, rows):
            job["features"] = {
                "world_seed": world_seed, "region_dim": region_dim, "video_feature_dim": video_feature_dim,
                "mel_bins": mel_bins, "mel_frames": mel_frames,
                "image": world_latent["category"][r["shown"]["image"]],
                "video": world_latent["category"][r["shown"]["video"]],
                "motion": world_latent["motion"][r["shown"]["video"]],
                "instance": inst_latent[listing[job["index"]]],
            }  # fmt: skip
    if workers > 0:  # spawn, not fork: the caller may already hold threads (torch, decoders)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_render, jobs, chunksize=8)
    else:
        for job in jobs:
            _render(job)

    if layout == "official":
        return _write_official(root, rows, jobs, features)
    meta = root / "meta.jsonl"
    tmp = meta.with_suffix(".jsonl.tmp")  # readers never see a half-written meta.jsonl
    with tmp.open("w") as f:
        for r in rows:
            p = r["present"]
            f.write(json.dumps({
                "id": r["id"], "title": r["title"] if p["text"] else "",
                "table": r["table"] if p["table"] else "", "category": r["category"],
                "instance": r["instance"],
                **{m: _FILES[m].format(r["id"]) if p[m] else None for m in _FILES},
                **({f: pattern.format(r["id"]) if p[m] else None
                    for f, (m, pattern) in demo_features.FILES.items()} if features else {})}) + "\n")
    tmp.replace(meta)
    return meta


def planted(products: int, seed: int = 0, categories: int = 8, world_seed: int = 0,
            missing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """What `generate` with these arguments plants, without rendering anything: per product its
    `id`, `category`, `instance`, `present` (modality -> bool) and `shown` (modality -> the category
    whose cues that modality carries; another one with probability `CONFUSION`). The ceiling of a
    modality's coarse retrieval on the demo is that of a perfect detector of `shown`
    (`bench/demo_ceiling.py`)."""
    keys = ("id", "category", "instance", "present", "shown")
    return [{k: row[k] for k in keys} for row in _draw(products, seed, categories, world_seed, dict(missing or {}))[3]]


def _draw(products: int, seed: int, categories: int, world_seed: int, missing: dict[str, float],
          language: str = "en") -> tuple[list[dict], list[dict], list[int], list[dict]]:
    """The world, the instances, each product's instance index and the products' rows: everything
    `generate` and `planted` draw before any pixel."""
    world = _world(categories, world_seed)
    insts, listing = _instances(products, seed, world)
    if language == "zh":
        world, insts = _in_chinese(world, insts)
    rows = [_product(i, seed, insts[listing[i]], world, missing, _WORDS[language]) for i in range(products)]
    return world, insts, listing, rows


def _official_files(index: int, present: dict[str, bool]) -> dict[str, str]:
    """Official layout: media path patterns of one product (no audio file: audio only in the video)."""
    files = dict(_OFFICIAL)
    if index % 3 == 1:
        files["audio"] = "audio/{}.mp3"
    elif index % 3 == 2 and present["video"]:
        del files["audio"]
    return files


def _write_official(root: Path, rows: list[dict], jobs: list[dict], features: bool) -> Path:
    """products.json as in the M5Product release: {id: {title, pv, label}} (+ the demo's instance)."""
    if features:
        try:
            (root / "features").rmdir()  # only a staging folder in this layout
        except OSError:  # not empty: files of an earlier jsonl-layout run into the same OUT
            pass
    meta = root / OFFICIAL_META
    products = {r["id"]: {"title": r["title"] if r["present"]["text"] else "",
                          "pv": r["table"] if r["present"]["table"] else "",
                          "label": r["category"], "instance": r["instance"]} for r in rows}
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(products))
    tmp.replace(meta)
    return meta


def parse_missing(items: list[str] | None) -> dict[str, float]:
    """`--missing MOD=RATE` items (repeatable) -> {modality: rate}."""
    rates = {}
    for item in items or []:
        mod, sep, rate = item.partition("=")
        if not sep:
            raise ValueError(f"--missing expects MOD=RATE, got {item!r}")
        rates[mod.strip()] = float(rate)
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the generator's options to `parser` (used by `run`)."""
    a = parser.add_argument
    a("--out", required=True, help="output folder, new or empty (meta.jsonl, images/, videos/, audios/)")
    a("--overwrite", action="store_true", help="replace a non-empty --out (everything in it)")
    a("--products", type=int, default=300, help="number of products (listings)")
    a("--seed", type=int, default=0, help="instances and product ids; use another seed per split")
    a("--categories", type=int, default=8)
    a("--world-seed", type=int, default=0, help="categories; keep equal across train/eval splits")
    a("--missing", action="append", metavar="MOD=RATE",
      help=f"drop a modality at this rate, repeatable; MOD in {', '.join(MODALITIES)}")
    a("--noisy-title-rate", type=float, default=0.0, help="share of titles from another product")
    for flag, default in (("image-size", 96), ("video-size", 64), ("video-seconds", 2.0),
                          ("fps", 12), ("audio-seconds", 2.0), ("sample-rate", 16000)):
        a(f"--{flag}", type=type(default), default=default)
    a("--workers", type=int, default=0, help="processes for media encoding (0: in-process)")
    a("--layout", choices=LAYOUTS, default="jsonl",
      help="jsonl: meta.jsonl + images/ videos/ audios/; official: products.json + image/ video/ audio/ "
           "(some audio as mp3, some only in the video's track), as the M5Product release")
    a("--language", choices=LANGUAGES, default="en",
      help="language of titles and tables: en, or zh (Chinese, as M5Product's; the same products and media)")
    a("--features", action="store_true",
      help="also write M5Product-style pre-extracted features (features/*.npy, meta.jsonl fields)")
    for flag, default in (("region-dim", 2048), ("video-feature-dim", 1024), ("mel-bins", 80),
                          ("mel-frames", 751)):
        a(f"--{flag}", type=int, default=default, help="feature size (with --features)")


def run(args: argparse.Namespace) -> None:
    """Calls `generate` with parsed `add_arguments` options and prints one summary line."""
    start = time.perf_counter()
    # Option dests equal generate()'s parameter names; other options of a larger CLI are ignored.
    kw = {k: v for k, v in vars(args).items() if k in inspect.signature(generate).parameters}
    # Written into a staging folder renamed into place: an existing folder is never half replaced.
    with output_folder(args.out, getattr(args, "overwrite", False), "demo-data --out") as staging:
        meta = generate(**{**kw, "out": staging, "missing": parse_missing(args.missing)})
    meta = Path(args.out) / meta.name
    if meta.suffix == ".jsonl":
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
    else:
        rows = list(json.loads(meta.read_text()).values())
    print(f"demo: {len(rows)} products, {len({r['instance'] for r in rows})} instances, "
          f"{args.categories} categories -> {meta} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    run(_parser.parse_args())
