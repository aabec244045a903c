"""Video bytes: `read_frames(bytes) -> (T, S, S, 3) uint8` over the decoders, and `check_video`, the
converter's test of an MP4 (the same header limits and decoder as the loader's); frame strips, the
sampled frames extracted once at conversion as one JPEG (`extract_strip`, `strip_to_frames`).

`auto` reads with PyAV and falls back to decord. PyAV is maintained, reads the header limits from
the container it decodes from (decord cannot report a stream's size, so checking limits before
decord means opening the file twice: 4 ms per 1-MB clip, 10 % of the whole five-modality decode in
`make bench-data`), and its seeking reader (`_read_pyav`) was as fast as decord's `get_batch` on
480p 15-s clips (0.159 vs 0.170 s for 12 frames) and faster on longer ones. decord is unmaintained
since 2022 (x86-64 Linux wheel only, known hangs on over-reported frame counts, memory growth on
seeks); it stays as the fallback and `backend="decord"`, opened with `num_threads=1` like PyAV:
data workers are the parallelism, decoder threads would oversubscribe the CPU.

A time limit (`timeout_s`) cannot be enforced inside the process: decord hangs inside C code, where
a Python signal handler never runs. So with a limit, decoding runs in a helper process
(one per data worker, forked lazily, fed the bytes over a pipe, returning the frame array), which
is killed (SIGKILL) when it overruns and replaced by a fresh one on the next call.
"""

from __future__ import annotations

import bisect
import ctypes
import io
import os
import signal
import threading
from multiprocessing.connection import Connection, Pipe

import numpy as np

from scale.media import MediaError, MediaTooLarge, native_stderr, with_native_detail

try:  # decord has no wheel off x86-64 Linux; PyAV alone then does the work
    import decord
except ImportError:  # pragma: no cover - depends on the platform
    decord = None

BACKENDS = ("auto", "decord", "pyav")


def sample_indices(available: int, wanted: int) -> np.ndarray:
    """`wanted` frame indices spread uniformly over `available` frames (repeats if too few)."""
    if available <= 0:
        raise ValueError("video has no frames")
    return np.linspace(0, available - 1, wanted).round().astype(np.int64)


def check_header(data: bytes, max_pixels: int | None = None, max_seconds: float | None = None) -> None:
    """Raise MediaTooLarge when the container header claims more than `max_pixels` (width x height)
    or `max_seconds`. Reads the header only (PyAV), before any backend decodes a frame."""
    import av

    with av.open(io.BytesIO(data)) as container:
        _check_limits(container, max_pixels, max_seconds)


def _check_limits(container, max_pixels: int | None, max_seconds: float | None):
    """The first video stream of an open PyAV container, if its header is within the limits."""
    import av

    if not container.streams.video:
        raise MediaError("no video stream", "no_video_stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLarge(f"video {width}x{height} is over max_video_pixels={max_pixels}", "too_many_pixels")
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if max_seconds is not None and seconds is not None and seconds > max_seconds:
        raise MediaTooLarge(f"video of {seconds:.0f} s is over max_video_seconds={max_seconds:g}", "too_long")
    return stream


def _read_decord(data: bytes, num_frames: int, size: int) -> np.ndarray:
    """decord's read, with what its FFmpeg prints kept out of the terminal (`native_stderr`)."""
    with native_stderr() as printed:
        try:
            return _read_decord_quietly(data, num_frames, size)
        except Exception as error:
            failure = error
    raise with_native_detail(failure, printed) from None


def _read_decord_quietly(data: bytes, num_frames: int, size: int) -> np.ndarray:
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1, width=size, height=size)
    # Over-reported frame counts are a known decord failure: ask for at most the reported frames
    # and let the caller fall back to PyAV if even that fails.
    return reader.get_batch(sample_indices(len(reader), num_frames).tolist()).asnumpy()


def _to_rgb(frame, size: int) -> np.ndarray:
    return frame.to_ndarray(width=size, height=size, format="rgb24")


def _read_pyav(
    data: bytes, num_frames: int, size: int, max_pixels: int | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """The wanted frames only: one demux pass (packets, no decoding) gives every frame's timestamp
    and the keyframes; then for each wanted frame, seek to the keyframe before it and decode
    forward to it, unless it is reachable by decoding on from the last wanted frame (same group of
    pictures), which is cheaper than a seek back to the same keyframe."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = _check_limits(container, max_pixels, max_seconds)
        stream.codec_context.thread_count = 1  # one thread per data worker, as with decord
        timestamps, keyframes = [], []
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size:
                timestamps.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
        if not timestamps or not keyframes:  # no timestamps to seek by (e.g. raw streams)
            return _read_pyav_all(container, stream, num_frames, size)
        timestamps.sort()
        keyframes.sort()
        wanted = [timestamps[i] for i in sample_indices(len(timestamps), num_frames)]
        found: dict[int, np.ndarray] = {}
        frames, last = None, None  # the running decode, and the pts of its last frame
        for target in sorted(set(wanted)):
            keyframe = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
            if frames is None or last is None or keyframe > last:
                container.seek(target, stream=stream, backward=True)  # lands on a keyframe <= target
                frames = container.decode(stream)
            picked = None
            for frame in frames:
                if frame.pts is None:
                    raise ValueError("decoded frame without a timestamp")
                last = frame.pts
                if frame.pts >= target:  # the first frame at or after it (exact unless corrupt)
                    picked = frame
                    break
            if picked is not None:
                found[target] = _to_rgb(picked, size)
            elif found:  # ran off the end (a frame that does not decode): repeat the last one
                found[target] = found[max(found)]
            else:
                raise ValueError("no decodable frame")
    return np.stack([found[t] for t in wanted])


def _read_pyav_all(container, stream, num_frames: int, size: int) -> np.ndarray:
    """Decode every frame, keep the wanted ones (for streams without timestamps)."""
    container.seek(0)
    frames = [_to_rgb(f, size) for f in container.decode(stream)]
    if not frames:
        raise ValueError("no decodable frame")
    return np.stack([frames[i] for i in sample_indices(len(frames), num_frames)])


def decode_frames(
    data: bytes, num_frames: int, size: int, backend: str = "auto",
    max_pixels: int | None = None, max_seconds: float | None = None,
) -> np.ndarray:  # fmt: skip
    """`read_frames` in this process, without a time limit."""
    if backend not in BACKENDS:
        raise ValueError(f"video backend {backend!r}: expected auto, decord or pyav")
    if backend == "decord" and decord is not None:
        if max_pixels is not None or max_seconds is not None:
            check_header(data, max_pixels, max_seconds)
        return _read_decord(data, num_frames, size)
    try:
        return _read_pyav(data, num_frames, size, max_pixels, max_seconds)
    except MediaTooLarge:
        raise
    except Exception:
        if backend == "pyav" or decord is None:
            raise
    # PyAV could not decode it; decord gets a try. (Its limits were checked unless PyAV could not
    # even read the header, and then decord cannot open the file either.)
    return _read_decord(data, num_frames, size)


def read_frames(
    data: bytes, num_frames: int, size: int, backend: str = "auto", timeout_s: float | None = None,
    max_pixels: int | None = None, max_seconds: float | None = None,
) -> np.ndarray:  # fmt: skip
    """Decode `num_frames` frames, uniformly spaced over the clip, resized to size x size (RGB).

    With `timeout_s`, decoding runs in this process's helper process and raises TimeoutError past
    the limit (the helper is killed); `max_pixels` / `max_seconds` refuse a video whose header is
    over them (MediaTooLarge) before any frame is decoded."""
    if backend not in BACKENDS:
        raise ValueError(f"video backend {backend!r}: expected auto, decord or pyav")
    if timeout_s is None:
        return decode_frames(data, num_frames, size, backend, max_pixels, max_seconds)
    with _lock:
        return _call_helper((num_frames, size, backend, max_pixels, max_seconds), data, timeout_s)


def _converter_read(data: bytes, num_frames: int, size: int, limits) -> np.ndarray:
    """`read_frames` as the converter runs it: PyAV, in the helper process under `video_timeout_s`
    (a file that hangs the decoder cannot stall a conversion worker), within `limits`' pixel and
    duration limits. Raises MediaError: reason `timeout` past the limit, `corrupt` for anything
    PyAV cannot read."""
    try:
        return read_frames(data, num_frames, size, backend="pyav", timeout_s=limits.video_timeout_s,
                           max_pixels=limits.max_video_pixels, max_seconds=limits.max_video_seconds)  # fmt: skip
    except MediaError:
        raise
    except TimeoutError as error:
        raise MediaError(f"MP4: {error}", "timeout") from None
    except Exception as error:  # av.FFmpegError and friends
        raise MediaError(f"MP4: {error}", "corrupt") from None


def check_video(data: bytes, limits) -> None:
    """The converter's check of an MP4: a video stream within the limits whose first frame decodes."""
    _converter_read(data, 1, 16, limits)


# ---- frame strips: the sampled frames, extracted once at conversion ----------------------------------
# Decoding an MP4 to sample 12 frames costs tens to hundreds of milliseconds of CPU per video (the
# codec decodes every frame between key frames); one JPEG of the 12 small frames decodes in about a
# millisecond. The frames are stacked top to bottom in one image, so a sample is one member and one
# decode call. JPEG rather than raw uint8 (.npy): 12 x 112 x 112 x 3 is 452 KB raw, tens of KB as JPEG.
STRIP_QUALITY = 90


def frames_to_strip(frames: np.ndarray, quality: int = STRIP_QUALITY) -> bytes:
    """(T, S, S, 3) uint8 frames -> one JPEG, S wide and T x S high."""
    from PIL import Image

    count, height, width, _ = frames.shape
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frames).reshape(count * height, width, 3)).save(
        buffer, "JPEG", quality=quality, subsampling=0)  # 4:4:4: small frames keep their colour edges
    return buffer.getvalue()


def strip_to_frames(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """A strip of `frames_to_strip` -> (T, S, S, 3) uint8. MediaError when it is not a JPEG of
    square frames stacked top to bottom; MediaTooLarge over `max_pixels` (read from the header,
    before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format != "JPEG" or width == 0 or height % width:
                raise MediaError(f"frame strip: a {image.format} of {width}x{height}, not a JPEG of square frames "
                                 f"stacked top to bottom", "not_a_strip")  # fmt: skip
            if max_pixels is not None and width * height > max_pixels:
                raise MediaTooLarge(f"frame strip {width}x{height} is over max_video_pixels={max_pixels}", "too_many_pixels")
            frames = np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(f"frame strip: {error}", "corrupt") from None
    return frames.reshape(height // width, width, width, 3)


def extract_strip(data: bytes, num_frames: int, size: int, limits) -> bytes:
    """The converter's strip of an MP4: `num_frames` frames sampled as the loader samples them
    (`read_frames`), at `size` x `size`, as one JPEG."""
    return frames_to_strip(_converter_read(data, num_frames, size, limits))


def check_strip(data: bytes, limits) -> None:
    """The converter's check of a frame strip given as a file of the product's own."""
    strip_to_frames(data, limits.max_video_pixels)


# ---- the helper process -------------------------------------------------------------------------
helper_target = decode_frames
"""What the helper process runs on each request (module global, looked up at each call, so a test
can replace it before the helper forks, e.g. with a function that hangs)."""

RECYCLE_AFTER = 1000
"""Videos a helper decodes before it is replaced: bounds decord's memory growth on seeks."""


class _Helper:
    """One forked child decoding videos for the process that forked it (its `owner`)."""

    def __init__(self) -> None:
        parent_end, child_end = Pipe(duplex=True)
        owner = os.getpid()
        # os.fork, not multiprocessing.Process: DataLoader workers are daemonic processes, which
        # multiprocessing forbids to have children.
        pid = os.fork()
        if pid == 0:  # the helper: never returns into the caller's code
            status = 0
            try:
                parent_end.close()
                # Hold none of the owner's files: an inherited descriptor keeps its locks (the
                # converter's lock on OUT), pipes and sockets open for as long as the helper lives.
                keep = child_end.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), keep + 1))
                _serve(child_end, owner)
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        child_end.close()
        self.pid, self.owner, self.conn, self.calls = pid, owner, parent_end, 0

    def request(self, job: tuple, data: bytes, timeout_s: float) -> np.ndarray:
        self.calls += 1
        try:
            self.conn.send(job)
            self.conn.send_bytes(data)
        except BaseException:  # BrokenPipeError: it died between two calls (the caller retries)
            self.kill()
            raise
        try:
            if not self.conn.poll(timeout_s):
                raise TimeoutError(f"video decode exceeded {timeout_s:g} s")
            status, payload = self.conn.recv()
            if status == "ok":
                shape, dtype = payload
                frames = np.empty(shape, dtype)  # received straight into a writable array: one copy
                self.conn.recv_bytes_into(memoryview(frames).cast("B"))
                return frames
        except (EOFError, ConnectionResetError):  # it died mid-request: a crash inside the decoder
            raise RuntimeError(f"video decoder process died ({self.kill()})") from None
        except BaseException:  # timeout, or interrupted: the pipe is out of step, the helper goes
            self.kill()
            raise
        raise payload  # the decoder's own exception, raised in the helper (which is fine)

    def kill(self) -> str:
        """SIGKILL and reap; returns how it ended. Only the owner kills: a forked copy of this
        object in another process names a helper that is not its child, and just closes its pipe."""
        ended = "not ours"
        if self.owner == os.getpid() and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # a process that already died is a zombie until reaped
                _, status = os.waitpid(self.pid, 0)
                ended = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
            except (ProcessLookupError, ChildProcessError):
                ended = "already reaped"
            self.pid = 0
        self.conn.close()
        return ended


def _serve(conn: Connection, owner: int) -> None:
    """The helper's loop: a request (job tuple, then the video bytes) -> ("ok", (shape, dtype)) and
    the frame bytes, or ("error", exception). Ends when the owner closes the pipe or dies."""
    try:  # Linux: die with the owner even while hung in C code (no orphaned, spinning decoders)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != owner:  # the owner died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    while True:
        try:
            job = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            frames = np.ascontiguousarray(helper_target(data, *job))
        except Exception as error:
            try:
                conn.send(("error", error))
            except Exception:  # an exception that does not pickle: keep its text
                conn.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))
            continue
        conn.send(("ok", (frames.shape, frames.dtype.str)))
        conn.send_bytes(memoryview(frames).cast("B"))


_helper: _Helper | None = None
_lock = threading.Lock()


def _call_helper(job: tuple, data: bytes, timeout_s: float) -> np.ndarray:
    global _helper
    for attempt in (0, 1):
        if _helper is not None and (_helper.owner != os.getpid() or _helper.pid == 0 or _helper.calls >= RECYCLE_AFTER):
            _helper.kill()  # dead, recycled, or inherited through a fork (then only our pipe copy closes)
            _helper = None
        if _helper is None:
            _helper = _Helper()
        try:
            return _helper.request(job, data, timeout_s)
        except (BrokenPipeError, ConnectionResetError):  # it died between two calls: one retry
            if attempt:
                raise
    raise AssertionError("unreachable")


def shutdown_helper() -> None:
    """Kill this process's helper (if any); the next timed call starts a fresh one."""
    global _helper
    with _lock:
        if _helper is not None:
            _helper.kill()
            _helper = None


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by another thread at fork time would never be released


os.register_at_fork(after_in_child=_after_fork_in_child)
