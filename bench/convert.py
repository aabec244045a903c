"""Converter benchmark: N demo products, some broken on purpose, -> shards; wall time, products/s,
and a check that the shard set holds each usable product exactly once, with its source bytes.

    python bench/convert.py --products 20000 --processes 2      # make bench-convert

The demo release is generated once and cached under `--raw` (20,000 products at the default media
sizes: about 8 min and 1.9 GB on 2 cores). The converted copy is a *noisy* view of it, as real
releases are: a `meta.jsonl` with absolute media paths in which 1 % of the JPEGs are truncated
copies, 1 % of the WAVs are empty, 20 products are listed twice and 5 lines are not JSON. Each
modality that is unusable is dropped; a product left with nothing is skipped; the rest is verified.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import demo  # noqa: E402
from datamodules.shards import write_shards  # noqa: E402
from datamodules.sources import FILE_FIELDS  # noqa: E402
from scale.shard_format import SIZES_FILE  # noqa: E402


def release(raw: Path, products: int, workers: int) -> list[dict]:
    meta = raw / "meta.jsonl"
    if not meta.is_file() or sum(1 for _ in meta.open()) != products:
        shutil.rmtree(raw, ignore_errors=True)
        start = time.time()
        demo.generate(raw, products=products, seed=0, workers=workers,
                      missing={"video": 0.2, "audio": 0.2, "table": 0.1})  # fmt: skip
        print(f"generated {products} demo products in {time.time() - start:.0f} s -> {raw}")
    return [json.loads(line) for line in meta.read_text().splitlines()]


def noisy_copy(rows: list[dict], raw: Path, noisy: Path) -> dict[str, dict]:
    """A meta.jsonl over the same media (absolute paths), with known damage; returns id -> row."""
    noisy = noisy.resolve()  # media paths in its meta.jsonl are absolute
    shutil.rmtree(noisy, ignore_errors=True)
    (noisy / "bad").mkdir(parents=True)
    rng = random.Random(0)
    lines, final = [], {}
    for row in rows:
        row = {k: (str(raw / v) if k in FILE_FIELDS and v else v) for k, v in row.items()}
        if row.get("image") and rng.random() < 0.01:
            data = Path(row["image"]).read_bytes()
            row["image"] = str(noisy / "bad" / f"{row['id']}.jpg")
            Path(row["image"]).write_bytes(data[: len(data) // 3])  # truncated
        if row.get("audio") and rng.random() < 0.01:
            row["audio"] = str(noisy / "bad" / f"{row['id']}.wav")
            Path(row["audio"]).write_bytes(b"")  # zero length
        lines.append(json.dumps(row))
        final[row["id"]] = row
    lines += [lines[i] for i in rng.sample(range(len(rows)), 20)]  # listed twice: kept once
    lines += ["{not json"] * 5
    rng.shuffle(lines)
    (noisy / "meta.jsonl").write_text("\n".join(lines) + "\n")
    return final


def verify(out: Path, rows: dict[str, dict]) -> dict:
    """Every usable product exactly once; shard counts match the index; media bytes match the source."""
    sizes = json.loads((out / SIZES_FILE).read_text())
    # Products skipped whole (a repeated id or a bad line is skipped too, but its product is kept once).
    skipped = {i["id"] for i in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())
               if i["action"] == "skipped" and i["reason"] == "no_usable_modality"}  # fmt: skip
    fields = {"jpg": "image", "mp4": "video", "wav": "audio"}
    seen: collections.Counter[str] = collections.Counter()
    mismatches = 0
    for name, count in sizes.items():
        keys: list[str] = []
        with tarfile.open(out / name) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                if field in fields:
                    mismatches += tar.extractfile(member).read() != Path(rows[key][fields[field]]).read_bytes()
        assert len(keys) == count, f"{name}: {len(keys)} samples, index says {count}"
        seen.update(keys)
    usable = set(rows) - skipped
    result = {
        "products": len(rows), "usable": len(usable), "in_shards": len(seen),
        "duplicates": sum(1 for c in seen.values() if c > 1), "missing": len(usable - set(seen)),
        "extra": len(set(seen) - usable), "media_mismatches": mismatches,
    }  # fmt: skip
    result["exactly_once"] = result["duplicates"] == result["missing"] == result["extra"] == mismatches == 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--raw", default="outputs/bench-convert/raw", help="cached demo release")
    parser.add_argument("--out", default="outputs/bench-convert")
    args = parser.parse_args()
    out = Path(args.out)
    rows = noisy_copy(release(Path(args.raw), args.products, args.processes), Path(args.raw).resolve(), out / "noisy")
    shards = out / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    start = time.time()
    summary = write_shards(out / "noisy", shards, processes=args.processes)
    seconds = time.time() - start
    report = json.loads((shards / "report.json").read_text())
    check = verify(shards, rows)
    sizes = [round(p.stat().st_size / 2**20) for p in sorted(shards.glob("*.tar"))]
    print(f"converted {args.products} products with {args.processes} processes in {seconds:.1f} s "
          f"({args.products / seconds:.0f} products/s): {summary['samples']} samples in {summary['shards']} "
          f"shards of {sizes} MiB")  # fmt: skip
    print(f"skipped products: {report['skipped']}; dropped modalities: {report['dropped']}")
    print("check: " + ", ".join(f"{k} {v}" for k, v in check.items()))
    (out / "results.json").write_text(json.dumps({"seconds": seconds, "summary": summary, "check": check}, indent=1))
    if not check["exactly_once"]:
        sys.exit("bench-convert: the shard set does not hold each usable product exactly once")


if __name__ == "__main__":
    main()
