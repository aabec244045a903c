"""Corrupt a known share of a raw product folder: the robustness protocol of K3M (the K3M paper).

    scale corrupt --src RAW --out OUT --modalities text --kind missing --rate 0.5 --seed 0

- `missing`: the modality is blanked (title/table "" , media and feature paths null);
- `swap`: it is replaced by another product's (another instance), K3M's "noise";
- `noise`: it is replaced by pure noise (random words, a noise JPEG / MP4 / WAV, random features).

`--modalities text,image` with several names is K3M's *mixed* setting: each corrupted product gets
one of them, chosen at random. Exactly round(rate x N) products are corrupted (a `missing`
corruption that would leave a product with no modality is skipped and not counted), and each
corrupted product records what was done in its metadata: `"corrupted": {"text": "swap"}`. OUT holds
a new `meta.jsonl` whose media paths point at the source files (absolute), plus any noise media.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.sources import FIELD_TABLE, FIELDS, TEXT_FIELDS  # the one field table (shared with the converter)
from scale.config import MODALITIES
from scale.outputs import refuse_non_empty

KINDS = ("missing", "swap", "noise")
NOISE_WORDS = "lorem ipsum dolor sit amet zeta quark blip nova orbit pixel delta echo flux glyph ion".split()


def has_modality(product: dict, modality: str) -> bool:
    return any(product.get(f) for f in FIELDS[modality])


def _noise_record(name: str, rng: random.Random) -> Any:
    """A noise value for a record field, made by the field (`RecordField.noise`) from random words."""
    words = [rng.choice(NOISE_WORDS) for _ in range(rng.randint(4, 9))]
    noise = FIELD_TABLE[name][1].noise
    if noise is None:
        raise ValueError(f"corrupt --kind noise: the {name} field declares no noise")
    return noise(words)


def _noise_media(field: str, source: Path, out: Path, key: str, rng: np.random.Generator) -> str:
    """Write a noise file shaped like `source` (same size / duration / array shape)."""
    target = out / "noise" / f"{key}.{field}{''.join(source.suffixes[-1:])}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".npy":
        shape = np.load(source, allow_pickle=False).shape
        np.save(target, rng.standard_normal(shape).astype(np.float32))
    elif source.suffix == ".jpg":
        from PIL import Image

        with Image.open(source) as image:
            size = image.size
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(target, quality=85)
    elif source.suffix == ".wav":
        import soundfile

        info = soundfile.info(str(source))
        soundfile.write(target, rng.uniform(-0.5, 0.5, info.frames).astype(np.float32), info.samplerate, subtype="PCM_16")
    elif source.suffix == ".mp4":
        import av

        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            width, height, frames = stream.width, stream.height, stream.frames or 24
            rate = int(stream.average_rate or 12)
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for _ in range(frames):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        target.write_bytes(buffer.getvalue())
    else:
        raise ValueError(f"corrupt: no noise writer for {source}")
    return str(target.resolve())


def corrupt(
    src: str | Path, out: str | Path, modalities: list[str], kind: str, rate: float, seed: int = 0
) -> dict[str, int]:
    """Write OUT/meta.jsonl with `rate` of SRC's products corrupted; returns counts per modality."""
    src, out = Path(src).resolve(), Path(out)
    if kind not in KINDS:
        raise ValueError(f"corrupt --kind {kind!r}: expected one of {KINDS}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"corrupt --modalities: unknown {unknown or 'empty'}; choose from {list(MODALITIES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corrupt --rate {rate}: must be in [0, 1]")
    meta = src / "meta.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"corrupt --src: {meta} not found")
    products = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    for product in products:  # media paths become absolute: OUT holds only metadata and noise files
        for fields in FIELDS.values():
            for f in fields:
                if f not in TEXT_FIELDS and product.get(f):
                    product[f] = str(src / product[f])
    originals = copy.deepcopy(products)  # donors give their *clean* modality, never a swapped one
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    order = list(range(len(products)))
    rng.shuffle(order)
    wanted, counts = round(rate * len(products)), {m: 0 for m in modalities}
    for index in order:
        if sum(counts.values()) >= wanted:
            break
        product = products[index]
        candidates = [m for m in modalities if has_modality(product, m)]
        if not candidates:
            continue
        modality = rng.choice(candidates)
        if kind == "missing":
            if not any(has_modality(product, m) for m in MODALITIES if m != modality):
                continue  # would leave nothing: the product stays clean
            for f in FIELDS[modality]:
                product[f] = "" if f in TEXT_FIELDS else None
        elif kind == "swap":
            donors = [p for p in originals if p["instance"] != product["instance"] and has_modality(p, modality)]
            donor = rng.choice(donors)
            for f in FIELDS[modality]:
                product[f] = donor.get(f)
        else:
            for f in FIELDS[modality]:
                if f in TEXT_FIELDS:
                    product[f] = _noise_record(f, rng)
                elif product.get(f):
                    product[f] = _noise_media(f, Path(product[f]), out, product["id"], noise_rng)
        product["corrupted"] = {**product.get("corrupted", {}), modality: kind}
        counts[modality] += 1
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "meta.jsonl.tmp"
    temporary.write_text("".join(json.dumps(p) + "\n" for p in products))
    temporary.replace(out / "meta.jsonl")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="raw folder with meta.jsonl")
    parser.add_argument("--out", required=True, help="output raw folder, new or empty (meta.jsonl + noise media)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (its meta.jsonl is replaced)")
    parser.add_argument("--modalities", required=True, help="comma-separated; several = K3M's mixed setting")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--rate", type=float, required=True, help="share of products corrupted, 0..1")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    refuse_non_empty(Path(args.out), args.overwrite, "corrupt --out")
    counts = corrupt(args.src, args.out, args.modalities.split(","), args.kind, args.rate, args.seed)
    print(f"corrupted ({args.kind}) {counts} of the products in {args.src} -> {args.out}/meta.jsonl")
