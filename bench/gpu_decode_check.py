"""`decode_on: device` on a GPU: nvJPEG's pixels against the CPU's, the decode time of a batch, and
the stream-ordering hazard of torchvision's CUDA decoder (pytorch/vision#9606: it can overwrite
memory that work still queued on the caller's stream reads; `scale.media.pixels` decodes from a
side stream to avoid it).

    python bench/gpu_decode_check.py --shards SHARDS --image-size 64 --frames 4 --frame-size 32

SHARDS converted with `--shrink-images <image size> --extract-frames <frames>x<frame size>`. Each
iteration queues a long matmul and then sums of four known tensors on the current stream, frees
the tensors while those sums are still queued, decodes a batch, and checks the sums: any wrong sum
is memory the decoder overwrote. Without a GPU it runs on the CPU (the hazard cannot occur there)
so that the script itself is tested. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale.media.pixels import centre_crop, pack_jpeg, strip_frames, unpack_pixels  # noqa: E402


def bitstreams(shards: Path, suffix: str, limit: int) -> list[bytes]:
    found = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]
        if len(found) >= limit:
            break
    return found[:limit]


def packed(streams: list[bytes], capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    buffers = torch.stack([pack_jpeg(data, capacity) for data in streams])
    return buffers.pin_memory() if torch.cuda.is_available() else buffers, torch.tensor([len(d) for d in streams])


def check(name: str, streams: list[bytes], shape: tuple[int, ...], fit, device: torch.device, iterations: int) -> dict:
    buffers, lengths = packed(streams, math.prod(shape))
    reference, reference_ok = unpack_pixels(buffers, lengths, shape, torch.device("cpu"), fit)
    corrupted, worst, seconds = 0, 0, []
    big = torch.randn(4096 if device.type == "cuda" else 256, 4096 if device.type == "cuda" else 256, device=device)
    for iteration in range(iterations):
        victims = [torch.full((1 << 20,), float(k + 1), device=device) for k in range(4)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _ = big @ big  # keeps the stream busy while the sums below wait in its queue
        sums = [victim.sum() for victim in victims]
        del victims  # freed while their sums are still queued: the memory a faulty decoder reuses
        start = time.perf_counter()
        pixels, decoded = unpack_pixels(buffers, lengths, shape, device, fit)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        corrupted += sum(int(total.item() != float(k + 1) * (1 << 20)) for k, total in enumerate(sums))
        if not torch.equal(decoded, reference_ok):
            raise SystemExit(f"{name}: the device decoded {decoded.tolist()}, the CPU {reference_ok.tolist()}")
        worst = max(worst, int((pixels.cpu().int() - reference.int()).abs().max()))
    return {"name": name, "batch": len(streams), "corrupted_sums": corrupted, "checked_sums": 4 * iterations,
            "max_level_difference": worst, "decode_ms_best": round(1e3 * min(seconds), 3),
            "decode_ms_median": round(1e3 * sorted(seconds)[len(seconds) // 2], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--frame-size", type=int, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, count, side = args.image_size, args.frames, args.frame_size
    images = bitstreams(args.shards, ".small.jpg", args.batch)
    strips = bitstreams(args.shards, ".frames.jpg", args.batch)
    if not images or not strips:
        raise SystemExit(f"{args.shards}: no small.jpg or frames.jpg (convert with --shrink-images and --extract-frames)")
    rows = [check("images", images, (3, size, size), lambda im: centre_crop(im, size), device, args.iterations),
            check("strips", strips, (count, 3, side, side), lambda im: strip_frames(im, count, side), device,
                  args.iterations)]  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("GPU_DECODE " + json.dumps({"device": name, "rows": rows}))
    return 1 if any(row["corrupted_sums"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
