"""Reading one tar shard: its samples, from a sample offset, with what must not be in a sample refused.

Written on tarfile rather than webdataset's streaming iterator so that a local shard can be entered
at a sample offset by seeking over the members before it (a worker that owns the second half of a
1-GB shard reads only that half), which exact resume needs; so that each member is judged
before it is read (its type, its name, its size); and so that a member the model will not decode
(the MP4 of a product whose frames were extracted at conversion) stays in the shard instead of in
the shuffle buffer, where it was about two thirds of a product's bytes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scale.media import MediaError
from scale.shard_format import split_member

MEMBER_ERRORS = "__errors__"
"""A sample's entry listing what the reader refused in it: [(kind, detail)] (the decoder counts them)."""
UNSAFE_KEY, REPEATED_KEY, NOT_A_FILE = "tar: unsafe name", "tar: repeated key", "tar: not a file"
DROPPING_ERRORS = frozenset({UNSAFE_KEY, REPEATED_KEY})
"""Reader errors that make the whole sample unusable (the others only make one member absent)."""


class UnreadMember:
    """A member over its byte limit, left unread: `len()` is its size, so the decoder's size check
    refuses it as too large without the bytes ever being in memory."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


class DeferredMember:
    """A member left in a local shard because the sample has what makes it needless (the MP4
    beside its extracted frames): `len()` is its size, and `bytes()` reads it from the shard only
    if the decoder asks (a config the extracted file does not fit). Until then a shuffle buffer
    holds these few numbers instead of the bytes."""

    def __init__(self, url: str, offset: int, size: int):
        self.url, self.offset, self.size = url, offset, size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        try:
            with open(self.url, "rb") as shard:
                shard.seek(self.offset)
                data = shard.read(self.size)
        except OSError as error:
            raise MediaError(f"{self.url}: reading a member at byte {self.offset}: {error}", "corrupt") from None
        if len(data) != self.size:
            raise MediaError(f"{self.url}: the member at byte {self.offset} ends after {len(data)} of {self.size} "
                             "bytes (the shard changed since it was read)", "corrupt")  # fmt: skip
        return data


def unsafe_key(key: str) -> bool:
    """An absolute key or one with a `..` component: never a product of ours, and dangerous to
    anything downstream that joins it to a path."""
    return key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/")


def read_samples(
    url: str, start: int = 0, stop: int | None = None, on_error=None, fields: set[str] | None = None,
    max_bytes: dict[str, int] | None = None, deferred: dict[str, frozenset[str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples `start` .. `stop`-1 of a tar shard as `{"__key__", "__url__", field: bytes}`, with
    only the members in `fields` read (None: all), a member over its `max_bytes[field]` left
    unread (`UnreadMember`), and in a local shard a member of `deferred` left in the shard
    (`DeferredMember`) when the sample has one of the members `deferred[field]` names; without
    them it is read (a streamed shard reads it whatever the sample holds).

    A sample is a run of members with one key. What a sample must not hold is refused and listed
    under `MEMBER_ERRORS` for the decoder to count: a member that is not a plain file (a link, a
    device, a folder) stays absent; a sample whose key is absolute or has a `..` component, or
    whose key was seen earlier in the shard (a repeated key, or a member name twice in a row), is a
    sample of its own that the decoder drops rather than merges.

    A local shard is entered at `start` by seeking over the members before it; other URLs (`pipe:`,
    `http://`) are streamed with webdataset's `gopen` and the skipped samples read through. A read error (truncated or
    corrupt tar) ends the shard: `on_error("tar", url, error)` is called, nothing is raised.
    """
    local = Path(url).is_file()
    index, key, sample, yielded = -1, None, {}, 0
    seen: set[str] = set()  # the shard's keys so far
    names: set[str] = set()  # the current sample's members (whether read or not: counting must not depend on `fields`)
    max_bytes = max_bytes or {}
    deferred = deferred if local and deferred else {}
    pending: dict[str, tarfile.TarInfo] = {}  # the current sample's deferred members, not yet read

    def refuse(kind: str, detail: str) -> None:
        if sample:
            sample.setdefault(MEMBER_ERRORS, []).append((kind, detail))

    def complete(tar: tarfile.TarFile) -> dict[str, Any]:
        """The sample with its pending members settled: left in the shard, or read (seeking back)."""
        for field, member in pending.items():
            needless = not deferred[field].isdisjoint(sample)
            sample[field] = DeferredMember(url, member.offset_data, member.size) if needless else tar.extractfile(member).read()
        pending.clear()
        return sample

    try:
        if local:
            tar = tarfile.open(url, mode="r:")
        else:
            import webdataset as wds

            tar = tarfile.open(fileobj=wds.gopen(url), mode="r|")
        with tar:
            for member in tar:
                name = split_member(member.name)
                if name is None:
                    continue
                member_key, field = name
                if member_key != key or field in names:  # a new sample (the second: a repeated key)
                    if sample:
                        yield complete(tar)
                        yielded += 1
                    index, key = index + 1, member_key
                    if stop is not None and index >= stop:
                        return
                    sample = {"__key__": key, "__url__": url} if index >= start else {}
                    if unsafe_key(key):
                        refuse(UNSAFE_KEY, f"{member.name!r} is an absolute or `..` path")
                    elif key in seen:
                        refuse(REPEATED_KEY, f"key {key!r} appears again at sample {index}")
                    seen.add(key)
                    names = set()
                names.add(field)
                if not sample or (fields is not None and field not in fields):
                    continue
                if not member.isfile():
                    refuse(NOT_A_FILE, f"{member.name!r} is a {_member_type(member)}, not a file")
                elif member.size > max_bytes.get(field, member.size):
                    sample[field] = UnreadMember(member.size)
                elif field in deferred:  # settled when the sample is complete (its other members known)
                    pending[field] = member
                else:
                    sample[field] = tar.extractfile(member).read()
            if sample:
                yield complete(tar)
                yielded += 1
            # tarfile ends iteration silently at a truncated header: a complete archive ends with
            # two zero blocks, and the index says how many samples to expect.
            if local and tar.offset + 2 * tarfile.BLOCKSIZE > Path(url).stat().st_size:
                raise tarfile.ReadError("truncated: the archive has no end-of-archive blocks")
            if stop is not None and yielded < stop - start:
                raise tarfile.ReadError(f"ended after {start + yielded} samples, expected {stop}")
    except (tarfile.TarError, OSError, EOFError) as error:
        if on_error is None:
            raise
        on_error("tar", url, error)


def _member_type(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    return "folder" if member.isdir() else "device or special file"
