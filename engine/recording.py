"""The session directory on disk: manifest, action log, latents, snapshots, first frame, video.

    recordings/<session-id>/
        manifest.json                      atomic (tmp, fsync, rename); refuses a newer format version
        first_frame.png
        actions.log                        append-only CRC'd records; a torn tail is dropped on open
        latents/chunk_000123.safetensors   "stage1" [B,C,T,H,W] and optional "refined"
        state/chunk_000123.safetensors     a full snapshot's tensors, with its sidecar
        state/chunk_000123.json            (non-tensor state; written last, so it marks the snapshot complete)
        video.mp4                          fragmented H.264, playable after a crash

The format is specified for other tools in recordings/README.md. Every file but actions.log and
video.mp4 is written whole and atomically (tmp file, fsync, rename, fsync of the directory), so a
crash leaves either the old or the new version. This module knows nothing about models, the rollout
or sockets: it stores the tensors and records it is given.

Writing order that makes a chunk durable (the driver's job): save the chunk's latents, append its
frame records, then `ActionLog.flush_chunk` (a `chunk` record + fsync). A chunk is committed iff its
`chunk` record is in the log; anything after the last one belongs to the chunk in flight.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import json
import os
import re
import secrets
import shutil
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import msgpack
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from protocol.keys import check_controls, sort_controls
from protocol.messages import SESSION_ID_PATTERN

FORMAT_VERSION = 1  # of manifest.json, state/*.json and the actions.log header
MANIFEST_NAME = "manifest.json"
ACTIONS_NAME = "actions.log"
FIRST_FRAME_NAME = "first_frame.png"
VIDEO_NAME = "video.mp4"
LATENTS_DIR = "latents"
STATE_DIR = "state"
STATUSES = ("recording", "paused", "stopped")  # "recording" with no engine running = it crashed

_CHUNK_FILE = re.compile(r"chunk_(\d{6,})\.(safetensors|json)")


def chunk_name(chunk: int) -> str:
    return f"chunk_{chunk:06d}"


# ---- session ids ------------------------------------------------------------------------------


def new_session_id(now: dt.datetime | None = None) -> str:
    """UTC time to the millisecond + 6 random hex digits: sorts by creation time, e.g. 20261127-012227-123-3f9a1c."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def check_session_id(session_id: str) -> str:
    """The id itself, or InputError: ids become directory names, so nothing else is accepted."""
    if not isinstance(session_id, str) or not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise InputError(f"session id {session_id!r:.80} is not of the form YYYYMMDD-HHMMSS-mmm-xxxxxx (hex suffix)")
    return session_id


# ---- atomic files -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the directory: `path` is old or new, never torn."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = _tmp_path(path)
    try:
        save_file(_safetensors_ready(tensors), tmp, metadata)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _safetensors_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors writes: contiguous CPU tensors that share no storage with each other. A tensor that
    is one already is written as it is (a snapshot's staging buffers are gigabytes; no second host copy)."""
    out, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        if v.device.type != "cpu" or not v.is_contiguous() or v.untyped_storage().data_ptr() in storages:
            v = v.to("cpu").contiguous().clone()
        storages.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (files here are immutable once renamed into place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---- JSON with bytes (RNG states and the like in snapshot sidecars) ---------------------------


def _to_json(obj):
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, Mapping):
        if "__bytes__" in obj:
            raise InputError("snapshot meta may not use the reserved key '__bytes__'")
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _check_format_version(version, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{what}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{what}: format_version {version} was written by a newer sana-wm; this one reads up to {FORMAT_VERSION}"
        )


# ---- manifest ---------------------------------------------------------------------------------


@dataclass
class Manifest:
    """manifest.json: everything needed, with actions.log, to regenerate the session."""

    session_id: str
    created: str = ""  # UTC ISO 8601
    status: str = "recording"  # one of STATUSES
    engine_version: str = ""
    preset: str = ""  # "tiny", "streaming", ...
    weights: dict[str, str] = field(default_factory=dict)  # component -> "sha256:..." digest
    seed: int = 0
    fps: float = 16.0
    width: int = 0
    height: int = 0
    prompt: str = ""  # the initial prompt (changes are in actions.log)
    intrinsics: list[float] | None = None  # [fx, fy, cx, cy] in first-image pixels, as given
    keymap: str = "v2"
    controls: dict = field(default_factory=dict)  # speeds: translation_speed, rotation_speed_deg, ...
    quality: str = "preview"
    first_image_sha256: str = ""  # of the first image's RGB pixels (uint8, row-major [H, W, 3])
    parent: dict | None = None  # a branch: {"session_id": ..., "chunk": k}
    extra: dict = field(default_factory=dict)  # free-form, for the engine's own bookkeeping
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj, what: str = "manifest") -> Manifest:
        if not isinstance(obj, dict):
            raise InputError(f"{what}: expected a JSON object, got {type(obj).__name__}")
        _check_format_version(obj.get("format_version"), what)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise InputError(f"{what}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        if "session_id" not in obj:
            raise InputError(f"{what}: missing key 'session_id'")
        m = cls(**obj)
        check_session_id(m.session_id)
        if m.status not in STATUSES:
            raise InputError(f"{what}: status {m.status!r} is not one of {', '.join(STATUSES)}")
        for name, types in _MANIFEST_TYPES.items():
            value = getattr(m, name)
            if not isinstance(value, types) or isinstance(value, bool):
                names = " or ".join(
                    "null" if t is type(None) else t.__name__ for t in (types if isinstance(types, tuple) else (types,))
                )
                raise InputError(f"{what}: {name} = {value!r:.60} is not {names}")
        return m


_MANIFEST_TYPES = {
    "session_id": str,
    "created": str,
    "status": str,
    "engine_version": str,
    "preset": str,
    "weights": dict,
    "seed": int,
    "fps": (int, float),
    "width": int,
    "height": int,
    "prompt": str,
    "intrinsics": (list, type(None)),
    "keymap": str,
    "controls": dict,
    "quality": str,
    "first_image_sha256": str,
    "parent": (dict, type(None)),
    "extra": dict,
    "format_version": int,
}


def write_manifest(session_dir: str | Path, manifest: Manifest) -> None:
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    atomic_write_bytes(Path(session_dir) / MANIFEST_NAME, data)


def read_manifest(session_dir: str | Path) -> Manifest:
    path = Path(session_dir) / MANIFEST_NAME
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{str(path)!r} does not exist: not a session directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{str(path)!r} is not valid JSON ({e})") from None
    return Manifest.from_json(obj, what=str(path))


# ---- actions.log ------------------------------------------------------------------------------

LOG_MAGIC = b"SWMALOG"  # + one byte: the format version
LOG_HEADER = LOG_MAGIC + bytes([FORMAT_VERSION])
MAX_RECORD_BYTES = 1 << 20
_U32 = struct.Struct("<I")


def encode_record(body: Mapping) -> bytes:
    """One record: u32 LE length | msgpack body | u32 LE CRC32 of (length bytes + body)."""
    payload = msgpack.packb(dict(body), use_bin_type=True)
    if len(payload) > MAX_RECORD_BYTES:
        raise InputError(f"action record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    head = _U32.pack(len(payload))
    return head + payload + _U32.pack(zlib.crc32(head + payload))


@dataclass
class LogScan:
    """What is in an actions.log: its complete records and where the good part ends."""

    records: list[dict]  # every complete, CRC-correct record, in order
    good_bytes: int  # length of the file's valid prefix (header + those records)
    dropped_bytes: int  # bytes after it: a torn or corrupt tail
    ends: list[int] = field(default_factory=list)  # byte offset just past each record


def scan_actions(path: str | Path) -> LogScan:
    """Read an actions.log without modifying it. Everything from the first bad record on is the tail."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < len(LOG_HEADER):
        if LOG_HEADER.startswith(data):  # torn while the header was written
            return LogScan([], 0, len(data))
        raise InputError(f"{str(path)!r} is not an actions.log (bad header {data!r})")
    if data[: len(LOG_MAGIC)] != LOG_MAGIC:
        raise InputError(f"{str(path)!r} is not an actions.log (header {data[:8]!r}, expected {LOG_HEADER!r})")
    _check_format_version(data[len(LOG_MAGIC)], str(path))
    records, ends, pos = [], [], len(LOG_HEADER)
    while pos + 4 <= len(data):
        (n,) = _U32.unpack_from(data, pos)
        end = pos + 4 + n + 4
        if n == 0 or n > MAX_RECORD_BYTES or end > len(data):
            break
        (crc,) = _U32.unpack_from(data, end - 4)
        if zlib.crc32(data[pos : end - 4]) != crc:
            break
        try:
            body = msgpack.unpackb(data[pos + 4 : end - 4], raw=False, strict_map_key=True, max_ext_len=0)
        except Exception:  # noqa: BLE001 - a CRC-correct but undecodable body is corruption too
            break
        if not isinstance(body, dict) or not isinstance(body.get("t"), str):
            break
        records.append(body)
        ends.append(end)
        pos = end
    return LogScan(records, pos, len(data) - pos, ends)


class ActionLog:
    """actions.log opened for appending. Opening drops a torn or corrupt tail (reported in `dropped_bytes`).

    Records (msgpack maps, key "t" = kind):
        frame   {"t": "frame", "i": frame index, "held": [controls], "seq": keys seq applied (-1: none)}
        prompt  {"t": "prompt", "i": first frame it applies to, "prompt": str}
        pause   {"t": "pause", "i": next frame index}      resume  {"t": "resume", "i": next frame index}
        chunk   {"t": "chunk", "chunk": k, "start": first frame, "end": one past its last frame}  (commit)
    Appends are buffered; `flush_chunk` writes the chunk record and fsyncs.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists():
            scan = scan_actions(self.path)
        else:
            scan = LogScan([], 0, 0)
        self.records: list[dict] = scan.records  # what was on disk at open (not updated by appends)
        self.dropped_bytes = scan.dropped_bytes
        self._ends = scan.ends
        self._appended = False
        self._file = open(self.path, "r+b" if self.path.exists() else "w+b")  # noqa: SIM115 - held open
        if scan.good_bytes == 0:
            self._file.truncate(0)
            self._file.write(LOG_HEADER)
        elif scan.dropped_bytes:
            self._file.truncate(scan.good_bytes)
        self._file.seek(0, os.SEEK_END)
        if scan.dropped_bytes or scan.good_bytes == 0:
            self._sync()
            _fsync_dir(self.path.parent)

    def append(self, record: Mapping) -> None:
        if not isinstance(record.get("t"), str):
            raise InputError(f"action record {record!r:.80} has no string 't' (kind)")
        self._file.write(encode_record(record))
        self._appended = True

    def discard_uncommitted(self) -> int:
        """Drop the `frame` records after the last `chunk` record (the chunk in flight at a crash); returns
        how many. Prompt changes, pauses and resumes recorded after the last commit are what the user did and
        are kept (they apply from the next chunk on).

        Call right after opening, before resuming a session in place, so that the new chunk's records
        follow the last committed chunk.
        """
        if self._appended:
            raise RuntimeError("discard_uncommitted must be called before anything is appended")
        last = max((i for i, r in enumerate(self.records) if r["t"] == "chunk"), default=-1)
        tail = self.records[last + 1:]
        kept = [r for r in tail if r["t"] != "frame"]
        dropped = len(tail) - len(kept)
        if dropped:
            cut = self._ends[last] if last >= 0 else len(LOG_HEADER)
            self._file.truncate(cut)
            self._file.seek(0, os.SEEK_END)
            ends = self._ends[: last + 1]
            for r in kept:
                self._file.write(encode_record(r))
                ends.append(self._file.tell())
            self._sync()
            self.records, self._ends = self.records[: last + 1] + kept, ends
        return dropped

    def append_frame(self, index: int, held: Iterable[str], keys_seq: int = -1) -> None:
        """The controls actually applied to frame `index` (from the `keys` message `keys_seq`)."""
        held = check_controls(list(held), "held")
        self.append({"t": "frame", "i": int(index), "held": list(sort_controls(held)), "seq": int(keys_seq)})

    def append_prompt(self, index: int, prompt: str) -> None:
        self.append({"t": "prompt", "i": int(index), "prompt": str(prompt)})

    def append_pause(self, index: int) -> None:
        self.append({"t": "pause", "i": int(index)})

    def append_resume(self, index: int) -> None:
        self.append({"t": "resume", "i": int(index)})

    def flush_chunk(self, chunk: int, start: int, end: int) -> None:
        """Commit chunk `chunk` (frames [start, end)): write its `chunk` record, flush and fsync."""
        self.append({"t": "chunk", "chunk": int(chunk), "start": int(start), "end": int(end)})
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._sync()
            self._file.close()

    def __enter__(self) -> ActionLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_actions(path: str | Path, records: Iterable[Mapping]) -> None:
    """A whole actions.log at once, atomically (used by branch)."""
    atomic_write_bytes(path, LOG_HEADER + b"".join(encode_record(r) for r in records))


def records_through_chunk(records: list[dict], chunk: int) -> list[dict]:
    """The records up to and including chunk `chunk`'s commit record (InputError if it was never committed)."""
    for i, r in enumerate(records):
        if r["t"] == "chunk" and r.get("chunk") == chunk:
            return records[: i + 1]
    done = [r["chunk"] for r in records if r["t"] == "chunk"]
    have = f"chunks {done[0]}..{done[-1]}" if done else "no chunks"
    raise InputError(f"chunk {chunk} is not committed in this action log; it has {have}")


def committed_chunks(records: Iterable[dict]) -> list[int]:
    return [r["chunk"] for r in records if r["t"] == "chunk"]


def frame_controls(records: Iterable[dict]) -> list[frozenset[str]]:
    """Per-frame applied controls in frame order (index i of the result = frame i of the session).

    Frames must be contiguous from the first frame record on; a gap means a damaged log (InputError).
    """
    out: list[frozenset[str]] = []
    first = None
    for r in records:
        if r["t"] != "frame":
            continue
        if first is None:
            first = r["i"]
        if r["i"] != first + len(out):
            raise InputError(f"action log frame records jump from {first + len(out) - 1} to {r['i']}")
        out.append(check_controls(r["held"], f"frame {r['i']} held"))
    return out


# ---- video ------------------------------------------------------------------------------------

# Every frame its own fragment: after a crash the file plays up to the frame before the last one appended.
_MP4_OPTIONS = {"movflags": "frag_keyframe+frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"}


class VideoWriter:
    """Progressive fragmented H.264 (yuv420p) mp4: playable at any moment, also after a crash.

    `append(frames [F, H, W, 3] uint8)` encodes and writes at once (no B-frames, zero-latency x264);
    `flush()` fsyncs; `close()` writes the end of the stream. A process killed between appends leaves
    a file that decodes to every frame but the last one appended.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 16.0, crf: int = 18, gop: int = 24):
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise InputError(f"video size {width}x{height}: H.264 yuv420p needs positive even width and height")
        self.path, self.width, self.height = Path(path), width, height
        self.frames_written = 0
        import av  # PyAV only where video is written or read: logs, latents and snapshots work without it

        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - unbuffered: a kill loses nothing written
        self._av = av
        self._container = av.open(self._file, "w", format="mp4", options=_MP4_OPTIONS)
        rate = _fps_fraction(fps)
        self._stream = self._container.add_stream(
            "libx264", rate=rate, options={"preset": "veryfast", "tune": "zerolatency", "crf": str(crf)}
        )
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.time_base = 1 / rate
        self._stream.codec_context.gop_size = gop

    def append(self, frames) -> None:
        """frames: [F, H, W, 3] uint8 RGB (numpy or a CPU torch tensor)."""
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise InputError(
                f"video frames {frames.dtype} {list(frames.shape)}: expected uint8 [F, {self.height}, {self.width}, 3]"
            )
        for frame in frames:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_written
            self._container.mux(self._stream.encode(vf))
            self.frames_written += 1

    def flush(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        self._container.mux(self._stream.encode())
        self._container.close()
        self.flush()
        self._file.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fps_fraction(fps: float):
    if not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise InputError(f"fps {fps!r}: expected a number in (0, 1000]")
    return Fraction(fps).limit_denominator(1001)


def iter_video(path: str | Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """Decoded frames [H, W, 3] uint8 of an mp4 (complete or cut short by a crash), at most `limit`."""
    import av

    with av.open(str(path)) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if limit is not None and n >= limit:
                return
            yield frame.to_ndarray(format="rgb24")


def copy_video_prefix(src: str | Path, writer: VideoWriter, frames: int, batch: int = 24) -> int:
    """Re-encode the first `frames` frames of `src` into `writer` (branch, resume); returns how many there were."""
    buf, n = [], 0
    for frame in iter_video(src, frames):
        buf.append(frame)
        n += 1
        if len(buf) == batch:
            writer.append(np.stack(buf))
            buf = []
    if buf:
        writer.append(np.stack(buf))
    return n


def resume_video(path: str | Path, width: int, height: int, fps: float, keep_frames: int) -> VideoWriter:
    """A VideoWriter on `path` that already holds the first `keep_frames` frames of the video there.

    mp4 cannot be appended to in place, so the old file is renamed to `<name>.prev.mp4`, its first
    `keep_frames` frames are re-encoded into a new `path`, and the old file is deleted. A crash during
    the copy leaves `.prev.mp4`, which the next call uses again. Compare `frames_written` with
    `keep_frames`: a video cut short by a crash may hold fewer (the driver re-emits what is missing).
    """
    import av

    path = Path(path)
    prev = path.with_name(path.stem + ".prev" + path.suffix)
    if not prev.exists() and path.exists():
        os.replace(path, prev)
        _fsync_dir(path.parent)
    writer = VideoWriter(path, width, height, fps)
    if prev.exists():
        try:
            copy_video_prefix(prev, writer, keep_frames)
        except av.error.FFmpegError:  # nothing decodable (killed before the first fragment)
            pass
        writer.flush()
        prev.unlink()
        _fsync_dir(path.parent)
    return writer


# ---- the session directory --------------------------------------------------------------------


class SessionDir:
    """One recorded session's directory. Paths are fixed (module docstring); every writer here is atomic."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.session_id = check_session_id(self.path.name)

    @classmethod
    def create(cls, root: str | Path, manifest: Manifest) -> SessionDir:
        """A new, empty session directory `root/<manifest.session_id>` with its manifest."""
        check_session_id(manifest.session_id)
        path = Path(root) / manifest.session_id
        path.mkdir(parents=True, exist_ok=False)
        (path / LATENTS_DIR).mkdir()
        (path / STATE_DIR).mkdir()
        _fsync_dir(path.parent)
        session = cls(path)
        session.write_manifest(manifest)
        return session

    @classmethod
    def open(cls, path: str | Path) -> SessionDir:
        """An existing session (its manifest is read and checked now)."""
        session = cls(path)
        session.read_manifest()
        return session

    def sweep_stale_tmp(self) -> list[Path]:
        """Delete the temporary files of atomic writes that a dead process left (a `kill -9` mid-write: up to a
        whole snapshot's size). Another live process's are left alone. Returns what was deleted."""
        gone = []
        for tmp in self.path.rglob(".*.tmp*"):
            pid = tmp.name.rsplit(".tmp", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
        return gone

    manifest_path = property(lambda self: self.path / MANIFEST_NAME)
    actions_path = property(lambda self: self.path / ACTIONS_NAME)
    first_frame_path = property(lambda self: self.path / FIRST_FRAME_NAME)
    video_path = property(lambda self: self.path / VIDEO_NAME)

    def latents_path(self, chunk: int) -> Path:
        return self.path / LATENTS_DIR / f"{chunk_name(chunk)}.safetensors"

    def snapshot_paths(self, chunk: int) -> tuple[Path, Path]:
        """(tensors, sidecar) of the snapshot taken after chunk `chunk`."""
        base = self.path / STATE_DIR / chunk_name(chunk)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    # manifest
    def write_manifest(self, manifest: Manifest) -> None:
        if manifest.session_id != self.session_id:
            raise InputError(f"manifest session_id {manifest.session_id!r} != directory {self.session_id!r}")
        write_manifest(self.path, manifest)

    def read_manifest(self) -> Manifest:
        m = read_manifest(self.path)
        if m.session_id != self.session_id:
            raise InputError(
                f"{str(self.manifest_path)!r} says session {m.session_id!r}, directory is {self.session_id!r}"
            )
        return m

    # first frame
    def save_first_frame(self, image) -> None:
        """image: [H, W, 3] uint8 RGB (numpy or CPU tensor), written as PNG."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"first frame {image.dtype} {list(image.shape)}: expected uint8 [H, W, 3]")
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, format="PNG")
        atomic_write_bytes(self.first_frame_path, buf.getvalue())

    def load_first_frame(self) -> np.ndarray:
        with Image.open(self.first_frame_path) as im:
            return np.asarray(im.convert("RGB"))

    # actions
    def open_actions(self) -> ActionLog:
        return ActionLog(self.actions_path)

    def scan_actions(self) -> LogScan:
        if not self.actions_path.exists():
            return LogScan([], 0, 0)
        return scan_actions(self.actions_path)

    # latents
    def save_latents(self, chunk: int, stage1: torch.Tensor, refined: torch.Tensor | None = None) -> None:
        """Clean stage-1 latents [B, C, T, H, W] of chunk `chunk` and (full quality) the refined ones."""
        tensors = {"stage1": stage1} if refined is None else {"stage1": stage1, "refined": refined}
        meta = {"format_version": str(FORMAT_VERSION), "chunk": str(chunk)}
        _atomic_save_tensors(self.latents_path(chunk), tensors, meta)

    def load_latents(self, chunk: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        path = self.latents_path(chunk)
        if not path.exists():
            raise InputError(f"no latents for chunk {chunk} in {str(self.path)!r}; stored: {self.latent_chunks()}")
        t = load_file(path, device=str(device))
        return t["stage1"], t.get("refined")

    def latent_chunks(self) -> list[int]:
        return _chunks_in(self.path / LATENTS_DIR, "safetensors")

    # snapshots
    def save_snapshot(self, chunk: int, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """A full snapshot after chunk `chunk`: tensors (caches, RNG states) + JSON-able meta (bytes allowed).

        The sidecar is written after the tensors, so a snapshot is listed only once both are complete.
        """
        tensor_path, sidecar_path = self.snapshot_paths(chunk)
        _atomic_save_tensors(tensor_path, tensors, {"format_version": str(FORMAT_VERSION), "chunk": str(chunk)})
        sidecar = {
            "format_version": FORMAT_VERSION,
            "chunk": chunk,
            "tensors_file": tensor_path.name,
            "tensors_bytes": tensor_path.stat().st_size,
            "meta": _to_json(dict(meta)),
        }
        atomic_write_bytes(sidecar_path, json.dumps(sidecar, indent=1, allow_nan=True).encode())

    def load_snapshot(self, chunk: int, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
        tensor_path, sidecar_path = self.snapshot_paths(chunk)
        if chunk not in self.snapshot_chunks():
            raise InputError(
                f"no complete snapshot after chunk {chunk} in {str(self.path)!r}; stored: {self.snapshot_chunks()}"
            )
        sidecar = json.loads(sidecar_path.read_bytes())
        return load_file(tensor_path, device=str(device)), _from_json(sidecar["meta"])

    def snapshot_chunks(self) -> list[int]:
        """Chunks with a complete snapshot (sidecar present and readable, tensors file of the recorded size)."""
        out = []
        for chunk in _chunks_in(self.path / STATE_DIR, "json"):
            tensor_path, sidecar_path = self.snapshot_paths(chunk)
            try:
                sidecar = json.loads(sidecar_path.read_bytes())
                _check_format_version(sidecar.get("format_version"), str(sidecar_path))
                if tensor_path.stat().st_size != sidecar["tensors_bytes"]:
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue
            out.append(chunk)
        return out

    def nearest_snapshot(self, chunk: int) -> int | None:
        """The latest complete snapshot taken after a chunk <= `chunk`, or None."""
        return max((c for c in self.snapshot_chunks() if c <= chunk), default=None)


def _chunks_in(directory: Path, suffix: str) -> list[int]:
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _CHUNK_FILE.fullmatch(p.name)
        if m and m.group(2) == suffix:
            out.append(int(m.group(1)))
    return sorted(out)


# ---- branch -----------------------------------------------------------------------------------


def branch_session(
    source: str | Path | SessionDir, chunk: int, root: str | Path | None = None, session_id: str | None = None
) -> SessionDir:
    """A new session that shares `source`'s history up to and including chunk `chunk`.

    Copies the manifest (new id, status "paused", `parent` = {"session_id", "chunk"}), the action log
    through chunk `chunk`'s commit record, latents and snapshots of chunks <= `chunk` (hard links when
    possible), the first frame, and the video's frames of those chunks (re-encoded).
    """
    src = source if isinstance(source, SessionDir) else SessionDir.open(source)
    manifest = src.read_manifest()
    records = records_through_chunk(src.scan_actions().records, chunk)
    commits = [r for r in records if r["t"] == "chunk"]
    video_frames = commits[-1]["end"] - commits[0]["start"]  # the video starts at the first emitted frame
    new_id = check_session_id(session_id) if session_id else new_session_id()
    new_manifest = dataclasses.replace(
        manifest,
        session_id=new_id,
        status="paused",
        created=dt.datetime.now(dt.UTC).isoformat(),
        parent={"session_id": src.session_id, "chunk": chunk},
    )
    dst = SessionDir.create(root if root is not None else src.path.parent, new_manifest)
    write_actions(dst.actions_path, records)
    if src.first_frame_path.exists():
        _link_or_copy(src.first_frame_path, dst.first_frame_path)
    for k in src.latent_chunks():
        if k <= chunk:
            _link_or_copy(src.latents_path(k), dst.latents_path(k))
    for k in src.snapshot_chunks():
        if k <= chunk:
            for s, d in zip(src.snapshot_paths(k), dst.snapshot_paths(k), strict=True):  # sidecar last
                _link_or_copy(s, d)
    if src.video_path.exists() and manifest.width and manifest.height:
        with VideoWriter(dst.video_path, manifest.width, manifest.height, manifest.fps) as writer:
            copy_video_prefix(src.video_path, writer, video_frames)
    for d in (dst.path / LATENTS_DIR, dst.path / STATE_DIR, dst.path):
        _fsync_dir(d)
    return dst
