"""An M5Product release -> webdataset tar shards, resumable and parallel (`scale shards`).

    scale shards --src RAW --out OUT [--layout auto|jsonl|official] [--max-count N] [--max-bytes N]
                 [--processes N] [--meta FILE] [--image-dir image ...] [--no-derive]
                 [--extract-frames TxS] [--shrink-images S] [--overwrite]

Input: a release in either layout of `datamodules/sources.py` (the demo's meta.jsonl + media, or the
official JSON + per-modality folders). Output, in OUT (the shard format: `scale/shard_format.py`):

    shard-000000.tar ...   samples `<key>.json` (id, title, table, category, ...) and, when usable,
                           one member per file field of the modalities (`<key>.jpg|.png|.webp|.mp4|
                           .wav|.mp3|.flac`, `<key>.regions.npy|.boxes.npy|.video.npy|.mel.npy`),
                           copied byte for byte (a FLAC may be audio taken from the video's sound
                           track; see `datamodules/validate.py`)
    sizes.json             {"shard-000000.tar": n_samples, ...} in shard order
    labels.json            the label vocabulary of the products written: names and numbers, in
                           `label_order`, with counts and the number of products without a label
    report.json            totals, products/s, counts of skipped products / dropped files per reason
    skipped.jsonl          one line per skipped product, dropped or cut field: id, modality, field,
                           reason, detail, action
    _progress/             the plan and one record per finished shard (what makes restarts exact)

How it works, and why:
1. Plan. One pass over the metadata: repeated product ids are skipped (the first is kept),
   unreadable records are reported, every file is `stat`ed (missing or oversized files are dropped
   here, unread), and products are packed greedily, in source order, into shards of at most
   `max_count` products and `max_bytes` bytes (the exact tar size of the files, plus a bound on
   the FLAC of audio taken from a video track). The plan (`_progress/plan.json`, with a fingerprint
   of the metadata's bytes and of the settings, and one manifest per shard) is written once; a
   restart reuses exactly the same assignment, so a product can never land in two shards.
2. Write. Shards are written by a process pool (`processes`), each to `shard-NNNNNN.tar.tmp`,
   fsynced and renamed into place; then its record `_progress/shard-NNNNNN.json` (count, items) is
   written atomically. A shard is done iff its record exists: a restart (the same command again)
   leaves done shards untouched, deletes stale temporaries and writes the rest. A shard whose
   products were all skipped is still written (an empty tar), so the numbering stays contiguous and
   `OUT/shard-{000000..000041}.tar` stays a valid brace pattern.
3. Validate. Every file is checked once while its shard is written (`datamodules/validate.py`,
   limits from `DataLimits`): an unusable file drops that modality of that product, a product with
   nothing usable is skipped, and each is reported with its reason.

A shard can exceed `max_bytes` only when one product alone is larger (it then gets a shard of its
own, and the report lists it). OUT holding shards of another plan (other source or settings), or files that are not a conversion's,
is an error unless `overwrite=True`: nothing already written is replaced silently. With it, the new
conversion is written beside OUT (`.OUT.replacing`, resumed there by the same command) and swapped
in when done, so a failure leaves the old shard set whole (only when OUT also holds files of the
user's is it cleared and converted in place, keeping their files). A conversion writes
`sizes.json` last: until then the loader refuses the folder (`scale/shard_format.py`), so a
half-finished conversion is never trained on, and the same command finishes it.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable

from datamodules.limits import DataLimits
from datamodules.sources import DEFAULT_DIRS, FIELD_TABLE, LAYOUTS, BadRecord, iter_products, open_source, shard_extension
from datamodules.validate import check_product, size_limit
from scale.shard_format import (IN_PROGRESS, LABELS_FILE, LABELS_FORMAT, RECORD_MEMBER, SIZES_FILE, brace_pattern,
                                canonical_label, label_order, sample_key, shard_name)

MiB = 2**20
DEFAULT_MAX_COUNT = 5000
DEFAULT_MAX_BYTES = 512 * MiB
REPORT_FILE = "report.json"
SKIPPED_FILE = "skipped.jsonl"
PROGRESS = IN_PROGRESS
PLAN_VERSION = 2
"""2: shard records count the labels of their products (labels.json)."""
KILL_ENV = "SCALE_SHARDS_TEST_KILL_AFTER"
"""Tests only: SIGKILL the conversion's process group once this many shard records exist (a real crash)."""


def _member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a tar: header (+ a PAX header for long or non-ASCII names) + data blocks."""
    encoded = name.encode()
    header = 512 if len(encoded) < 100 and name.isascii() else 1024 + -(-(len(encoded) + 64) // 512) * 512
    return header + -(-size // 512) * 512


def _tar_bytes(members: int) -> int:
    """Size of a tar file of `members` bytes of members: end-of-archive blocks, padded to 10240."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- plan


def _plan(source, out: Path, max_count: int, max_bytes: int, limits: DataLimits, fingerprint: dict) -> dict:
    """Scan the metadata once and write the shard manifests and `plan.json` (last: it marks a complete plan)."""
    progress, plan_dir = out / PROGRESS, out / PROGRESS / "plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    plan_dir.mkdir(parents=True)
    shards: list[dict] = []
    ids: set[str] = set()
    keys: dict[str, str] = {}
    missing: Counter[str] = Counter()
    skipped: list[dict] = []
    records = 0
    manifest = None
    for position, product in enumerate(iter_products(source)):
        records += 1
        if isinstance(product, BadRecord):
            skipped.append({"id": product.id, "modality": "*", "field": "*", "reason": product.reason,
                            "detail": product.detail, "action": "skipped"})
            continue
        key = sample_key(product.id)
        if product.id in ids or key in keys:
            reason, detail = (("duplicate_id", f"{product.where}: id seen before; the first is kept") if product.id in ids
                              else ("key_collision", f"{product.where}: sample key {key!r} is also that of id {keys[key]!r}"))
            skipped.append({"id": product.id, "modality": "*", "field": "*", "reason": reason, "detail": detail,
                            "action": "skipped"})
            continue
        ids.add(product.id)
        keys[key] = product.id
        entry = _entry(product, key, limits, missing)
        size = sum(_member_bytes(f"{key}.{e}", n) for e, n in entry.pop("sizes").items())
        current = shards[-1] if shards else None
        if current is None or current["count"] >= max_count or _tar_bytes(current["members"] + size) > max_bytes:
            if manifest:
                manifest.close()
            current = {"name": shard_name(len(shards)), "first": position, "last": position, "count": 0, "members": 0}
            shards.append(current)
            manifest = open(plan_dir / (current["name"] + ".jsonl"), "w")
        manifest.write(json.dumps(entry) + "\n")
        current["count"] += 1
        current["last"] = position
        current["members"] += size
    if manifest:
        manifest.close()
    if not shards:
        first = f" (first: {skipped[0]['detail']})" if skipped else ""
        raise ValueError(f"shards: {source.meta} holds no usable product record among {records}{first}")
    for shard in shards:
        shard["bytes"] = _tar_bytes(shard.pop("members"))
        shard["oversized"] = shard["bytes"] > max_bytes
    _atomic_write(progress / "plan-skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped).encode())
    plan = {"version": PLAN_VERSION, "fingerprint": fingerprint, "records": records, "products": len(ids),
            "missing_media": dict(missing), "shards": shards}
    _atomic_write(progress / "plan.json", json.dumps(plan, indent=1).encode())
    return plan


def _entry(product, key: str, limits: DataLimits, missing: Counter) -> dict:
    """A product's manifest line: its JSON metadata and the files that exist within limits (`stat` only)."""
    entry: dict[str, Any] = {"id": product.id, "key": key, "meta": product.meta, "files": {}, "notes": []}
    sizes = {RECORD_MEMBER: len(json.dumps(product.meta).encode())}

    def note(name: str, reason: str, detail: str) -> None:
        entry["notes"].append({"id": product.id, "modality": FIELD_TABLE[name][0], "field": name,
                               "reason": reason, "detail": detail, "action": "dropped"})

    for name, path in product.files.items():
        extension = shard_extension(name, path)
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            missing[FIELD_TABLE[name][0]] += 1
            note(name, "not_found", f"{path}: no such file")
        elif extension is None:
            note(name, "unsupported_type", f"{path}: {Path(path).suffix or 'no suffix'} is not one of "
                                           f"{', '.join(FIELD_TABLE[name][1].extensions)}")
        elif stat.st_size > size_limit(name, limits):
            note(name, "too_large", f"{path}: {stat.st_size} bytes, over the {name} limit {size_limit(name, limits)}")
        else:
            entry["files"][name] = [path, extension]
            sizes[extension] = stat.st_size
    for name in product.derive:  # a file made from another one: reserve its room, so the byte bound holds
        derived = FIELD_TABLE[name][1].derive
        if name not in entry["files"] and derived.source in entry["files"]:
            budget = derived.probe(entry["files"][derived.source][0], limits)
            if budget is not None:
                entry.setdefault("derive", {})[name] = budget
                sizes[derived.member] = derived.bound(budget)
    entry["sizes"] = sizes
    return entry


def _fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 120 else f"{prefix}{k} changed")
    return diffs


def _clear(out: Path) -> None:
    """Remove a previous conversion's outputs (only with `overwrite`)."""
    for pattern in ("shard-*.tar", "shard-*.tar.tmp", SIZES_FILE, LABELS_FILE, REPORT_FILE, SKIPPED_FILE):
        for path in out.glob(pattern):
            path.unlink()
    shutil.rmtree(out / PROGRESS / "plan", ignore_errors=True)
    for path in (out / PROGRESS).glob("*.json*"):
        path.unlink()


OURS = re.compile(r"shard-\d+\.tar(\.tmp)?|" + "|".join(map(re.escape, (SIZES_FILE, LABELS_FILE, REPORT_FILE, SKIPPED_FILE, PROGRESS))))
"""What a conversion writes into OUT."""


def _foreign(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not OURS.fullmatch(p.name)) if out.is_dir() else []


def _refuse_foreign(out: Path, overwrite: bool) -> None:
    """A non-empty OUT that is not a conversion (a user's folder) is refused before anything is
    written into it, unless `overwrite` (which removes only our outputs, never other files)."""
    if overwrite or not out.is_dir() or (out / PROGRESS / "plan.json").is_file():
        return
    foreign = _foreign(out)
    if foreign:
        raise ValueError(f"shards --out: {out} is not empty and not a conversion ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); use an empty or new folder, or --overwrite "
                         "(which removes only shards and reports, never other files)")  # fmt: skip


def _fingerprint(source, max_count: int, max_bytes: int, limits: DataLimits) -> dict:
    try:
        return {"version": PLAN_VERSION, "source": source.fingerprint(), "max_count": max_count,
                "max_bytes": max_bytes, "limits": asdict(limits)}
    except OSError as error:
        raise ValueError(f"shards: cannot read {source.meta} ({error.strerror or error})") from None


def _existing(out: Path, fingerprint: dict) -> tuple[dict | None, str | None]:
    """What OUT holds: (its plan, when it is this conversion's; why it is another conversion, when
    it is one: another plan, or shards without one). (None, None): nothing converted yet."""
    plan_path = out / PROGRESS / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan.get("fingerprint") == fingerprint:
            return plan, None
        diff = "; ".join(_fingerprint_diff(plan.get("fingerprint", {}), fingerprint)[:4])
        return None, (f"{plan_path} was planned from another source or settings ({diff}); use another --out, "
                      "or --overwrite to replace that conversion")  # fmt: skip
    if list(out.glob("shard-*.tar")) or (out / SIZES_FILE).exists():
        return None, f"{out} holds shards without a plan (another conversion?); use another --out, or --overwrite to replace them"
    return None, None


def _load_or_plan(source, out: Path, fingerprint: dict, limits: DataLimits, overwrite: bool) -> dict:
    plan, other = _existing(out, fingerprint)
    if plan is not None:
        return plan
    if other is not None and not overwrite:
        raise ValueError(f"shards --out: {other}")
    _clear(out)
    return _plan(source, out, fingerprint["max_count"], fingerprint["max_bytes"], limits, fingerprint)


# --------------------------------------------------------------------------------------- write


def _write_shard(job: dict) -> dict:
    """Write one planned shard (temporary name, fsync, rename), then its record; returns the record."""
    start = time.perf_counter()
    out, name, limits = Path(job["out"]), job["name"], DataLimits(**job["limits"])
    progress = out / PROGRESS
    tmp, items, count, labels = out / (name + ".tmp"), [], 0, Counter()
    kill_after = os.environ.get(KILL_ENV)
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as tar:
            with open(progress / "plan" / (name + ".jsonl")) as manifest:
                for line in manifest:
                    entry = json.loads(line)
                    members, notes = check_product(entry, limits)
                    items += notes
                    if members is None:
                        continue
                    for extension, data in members.items():
                        info = tarfile.TarInfo(f"{entry['key']}.{extension}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible
                        tar.addfile(info, io.BytesIO(data))
                    count += 1
                    labels[canonical_label(entry["meta"].get("category"))] += 1
                    if kill_after and len(list(progress.glob("shard-*.json"))) >= int(kill_after):
                        f.flush()
                        os.killpg(os.getpgrp(), signal.SIGKILL)
        f.flush()
        os.fsync(f.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, out / name)
    unlabeled = labels.pop(None, 0)
    record = {"shard": name, "count": count, "bytes": size, "seconds": round(time.perf_counter() - start, 3),
              "items": items, "labels": dict(labels), "unlabeled": unlabeled}
    _atomic_write(_record_path(out, name), json.dumps(record).encode())
    return record


def _record_path(out: Path, name: str) -> Path:
    return out / PROGRESS / (name.removesuffix(".tar") + ".json")


def _is_done(out: Path, name: str) -> bool:
    record = _record_path(out, name)
    if record.is_file() and not (out / name).is_file():
        record.unlink()  # the shard was removed after it was recorded: write it again
    return record.is_file()


def write_shards(src: str | Path, out: str | Path, max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES,
                 *, processes: int = 1, layout: str = "auto", meta: str | Path | None = None,
                 dirs: dict[str, str] | None = None, derive: bool = True, limits: DataLimits | None = None,
                 overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Convert a release to shards in OUT (resuming a previous run of the same command); returns a
    summary: samples, shards, pattern, missing_media, skipped_products, dropped, seconds, report."""
    if max_count < 1 or max_bytes < tarfile.RECORDSIZE or processes < 1:
        raise ValueError(f"shards: need --max-count >= 1, --max-bytes >= {tarfile.RECORDSIZE}, --processes >= 1")
    start = time.perf_counter()
    limits = limits or DataLimits()
    source = open_source(src, layout, meta, dirs, derive)
    out = Path(out)
    _refuse_foreign(out, overwrite)
    fingerprint = _fingerprint(source, max_count, max_bytes, limits)
    if overwrite and out.is_dir() and _existing(out, fingerprint)[1] is not None and not _foreign(out):
        # The old conversion stays whole (and usable) until the new one is: it is written beside
        # OUT (the same command resumes it there) and the folders are swapped when it is done.
        staging = out.parent / f".{out.name}.replacing"
        summary = _convert(source, staging, fingerprint, limits, processes, log, start, overwrite=True, named=out)
        replaced = out.parent / f".{out.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(out, replaced)
        os.rename(staging, out)
        shutil.rmtree(replaced)
        return summary
    return _convert(source, out, fingerprint, limits, processes, log, start, overwrite=overwrite)


def _convert(source, out: Path, fingerprint: dict, limits: DataLimits, processes: int, log, start: float,
             overwrite: bool = False, named: Path | None = None) -> dict:
    """Plan (or reuse the plan) and write the missing shards of one conversion in `out`; the
    summary names `named` (the folder it will be in) when that is another."""
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    with open(out / PROGRESS / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"shards --out: another conversion is writing to {named or out}") from None
        plan = _load_or_plan(source, out, fingerprint, limits, overwrite)
        for stale in [*out.glob("shard-*.tar.tmp"), *(out / PROGRESS).glob("*.tmp")]:
            stale.unlink()  # a crashed run's partial files; their shards are not done
        names = [s["name"] for s in plan["shards"]]
        pending = [n for n in names if not _is_done(out, n)]
        if log:
            log(f"shards: {plan['products']} products planned in {len(names)} shards; "
                f"{len(names) - len(pending)} done, {len(pending)} to write with {min(processes, max(len(pending), 1))} process(es)")
        written = _write_all(out, pending, limits, processes, log, len(names))
        summary = _finish(out, source, plan, written, time.perf_counter() - start, named or out)
    return summary


def _write_all(out: Path, pending: list[str], limits: DataLimits, processes: int, log, total: int) -> list[dict]:
    jobs = [{"out": str(out), "name": n, "limits": asdict(limits)} for n in pending]
    done, products, start = [], 0, time.perf_counter()

    def progress(record: dict) -> None:
        nonlocal products
        done.append(record)
        products += record["count"]
        if log:
            rate = products / max(time.perf_counter() - start, 1e-9)
            log(f"{record['shard']}: {record['count']} samples, {record['bytes'] / MiB:.1f} MiB "
                f"({total - len(pending) + len(done)}/{total} shards, {rate:.0f} products/s)")

    if processes == 1 or len(jobs) <= 1:
        for job in jobs:
            progress(_write_shard(job))
        return done
    # spawn, not fork: the caller may hold threads (torch, decoders); a dead worker breaks the pool
    # (BrokenProcessPool) instead of hanging it, and every finished shard stays done.
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_write_shard, job) for job in jobs]):
            progress(future.result())
    return done


def _finish(out: Path, source, plan: dict, written: list[dict], seconds: float, named: Path) -> dict:
    """sizes.json, report.json and skipped.jsonl from the records of every shard (this run's and earlier)."""
    records = [json.loads(_record_path(out, s["name"]).read_text()) for s in plan["shards"]]
    sizes = {r["shard"]: r["count"] for r in records}
    items = [json.loads(line) for line in (out / PROGRESS / "plan-skipped.jsonl").read_text().splitlines()]
    items += [item for r in records for item in r["items"]]
    counts: dict[str, Counter] = {}
    for item in items:
        counts.setdefault(item["action"], Counter())[f"{item['modality']}/{item['reason']}"] += 1
    new = sum(r["count"] for r in written)
    labels = Counter()
    for record in records:
        labels.update(record["labels"])
    vocabulary = sorted(labels, key=label_order)
    unlabeled = sum(r["unlabeled"] for r in records)
    pattern = brace_pattern(named, len(sizes))
    summary = {
        "samples": sum(sizes.values()), "shards": len(sizes), "pattern": pattern,
        "bytes": sum(r["bytes"] for r in records), "records": plan["records"],
        "products_planned": plan["products"],
        "skipped_products": sum(counts.get("skipped", {}).values()),
        "skipped": dict(counts.get("skipped", {})), "dropped": dict(counts.get("dropped", {})),
        "cut": dict(counts.get("cut", {})), "kept_with_warning": dict(counts.get("kept", {})),
        "derived": dict(counts.get("added", {})),
        "missing_media": plan["missing_media"],
        "labels": len(vocabulary), "unlabeled": unlabeled,
        "oversized_shards": [s["name"] for s in plan["shards"] if s["oversized"]],
        "empty_shards": [n for n, c in sizes.items() if c == 0],
        "this_run": {"shards_written": len(written), "samples_written": new, "seconds": round(seconds, 2),
                     "products_per_s": round(new / seconds, 1) if seconds > 0 else None},
        "seconds": round(seconds, 2), "source": str(source.meta), "layout": source.layout,
        "report": str(named / REPORT_FILE), "items": str(named / SKIPPED_FILE),
    }
    _atomic_write(out / SKIPPED_FILE, "".join(json.dumps(i) + "\n" for i in items if i["action"] != "added").encode())
    _atomic_write(out / LABELS_FILE, json.dumps({"format": LABELS_FORMAT, "labels": vocabulary,
                                                 "counts": [labels[x] for x in vocabulary], "unlabeled": unlabeled},
                                                indent=1, ensure_ascii=False).encode())  # fmt: skip
    _atomic_write(out / SIZES_FILE, json.dumps(sizes, indent=1).encode())
    _atomic_write(out / REPORT_FILE, json.dumps(summary, indent=1).encode())
    return summary


# ----------------------------------------------------------------------------------------- CLI


def _bytes(text: str) -> int:
    """`536870912`, `512M`, `512MiB`, `1G` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 536870912, 512M, 1G)")
    return int(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--src", required=True, help="release folder (meta.jsonl, or an official JSON + folders), or its metadata file")
    a("--out", required=True, help="output folder for shards")
    a("--layout", choices=LAYOUTS, default="auto", help="auto: meta.jsonl -> jsonl, a *.json file -> official")
    a("--meta", help="the metadata file, when SRC has several JSON files or another name")
    a("--max-count", type=int, default=DEFAULT_MAX_COUNT, help=f"samples per shard at most (default {DEFAULT_MAX_COUNT})")
    a("--max-bytes", type=_bytes, default=DEFAULT_MAX_BYTES, help="bytes per shard at most, e.g. 512M (default 512 MiB)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    a("--processes", type=int, default=cpus, help=f"shard-writing processes (default: the usable CPUs, {cpus} here)")
    for name, folder in DEFAULT_DIRS.items():
        a(f"--{name.replace('_', '-')}-dir", dest=f"{name}_dir", default=folder,
          help=f"official layout: folder of the {name} files (default {folder}/)")
    a("--no-derive", dest="derive", action="store_false",
      help="never make a missing file from another one (e.g. audio from a video's sound track)")
    a("--extract-frames", type=_frames_and_size, metavar="TxS",
      help="also store T frames of S x S pixels sampled from each MP4 as one JPEG (frames.jpg), decoded by the "
           "`frames` stem instead of the MP4 when video.frames is T and video.size S, e.g. 12x112")
    a("--shrink-images", type=_side, default=0, metavar="S",
      help="also store each image whose shorter side is over S downscaled to S (small.jpg), decoded by the "
           "`pixels` stem instead of the original when image.size <= S; S = image.size (e.g. 224) leaves the "
           "loader only a crop")
    a("--overwrite", action="store_true", help="replace a conversion of another source / settings in OUT")


def _frames_and_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"not FRAMESxSIZE: {text!r} (e.g. 12x112)")
    return int(match[1]), int(match[2])


def _side(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a side in pixels: {text!r} (e.g. 256)")
    return int(text)


def run(args: argparse.Namespace) -> None:
    dirs = {name: getattr(args, f"{name}_dir") for name in DEFAULT_DIRS}
    try:
        frames, size = args.extract_frames or (0, DataLimits().extract_size)
        s = write_shards(args.src, args.out, args.max_count, args.max_bytes, processes=args.processes,
                         layout=args.layout, meta=args.meta, dirs=dirs, derive=args.derive,
                         limits=DataLimits(extract_frames=frames, extract_size=size,
                                           shrink_images=args.shrink_images),
                         overwrite=args.overwrite, log=lambda line: print(line, flush=True))
    except BrokenProcessPool:
        sys.exit(f"scale shards: error: a shard-writing process died (out of memory? killed?); finished shards "
                 f"are kept: run the same command again to resume")
    dropped = sum(s["dropped"].values())
    print(f"wrote {s['samples']} samples in {s['shards']} shards ({s['bytes'] / MiB:.1f} MiB, {s['seconds']} s, "
          f"{s['this_run']['products_per_s']} products/s this run); skipped {s['skipped_products']} products, "
          f"dropped {dropped} files (details: {s['items']}; totals: {s['report']})")
    unlabeled = f", {s['unlabeled']} products without one" if s["unlabeled"] else ""
    print(f"labels: {s['labels']} categories{unlabeled} ({Path(s['report']).parent / LABELS_FILE})")
    print(s["pattern"])
