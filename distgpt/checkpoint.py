"""Sharded, crash-safe checkpoints of the flat parameter vector and the AdamW moments.

A checkpoint is a folder OUT/ckpt/step_XXXXXXX/ holding one shard per rank and a manifest:

    shard_RRRRR.npy   float32 (3, n_r): params, m, v of rank r's slice [start_r, end_r) of the flat
                      vector. Plain .npy, so any reader can memory-map it and read only a byte range.
    manifest.json     format, version, step, world size, the parameter layout, every shard's range,
                      size and sha256, and the caller's meta (config, loader state, rng, ...).

The manifest decides: a folder is a checkpoint only if it has one, and a folder only gets its final
name after every shard and the manifest are on disk (written to temporary names, fsynced, renamed).
A crash at any point therefore leaves either the complete new checkpoint or a dot-folder that
nothing reads and the next save clears.

A checkpoint written by W ranks loads on any number of ranks: each rank works out which old shards
overlap its new slice and reads just those byte ranges through a memory map.

LoRA (lora.rank > 0): the same format over the run's trainable flat vector, the adapters: the
shards' rows are the adapters and their AdamW moments, manifest["layout"] is the lora.LoraLayout's
describe() (names as peft's keys without "base_model.model.transformer."), n_params its size, and
meta["lora"] = {"rank", "alpha", "dropout", "targets", "base": {"source": init_from as given,
"sha256": of the base's float32 values in model.Layout order, as read from the source}}. The base
itself is not saved: a resume reads it from its source again and refuses other weights (check_base).
read_lora returns the adapters with meta["lora"].
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distgpt import switches
from distgpt.fileio import DiskFullError, atomic_write, fsync_dir, io_error, write_text_atomic
from distgpt.partition import Partition

FORMAT = "distgpt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"step_(\d{7,})")
CHUNK = 4 << 20  # elements per write/hash chunk: 16 MB of float32, so no copy of a whole shard is made
CRASH_ENV = "DISTGPT_CKPT_CRASH_AT"


class CheckpointError(RuntimeError):
    """Something on disk is missing, incomplete or inconsistent; the message names the file."""


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _message(e: Exception, where: Path) -> str:
    """One-line description of a failure inside a collective section. These sections catch every
    exception, because one that escaped on a single rank would leave the others waiting forever.
    A full disk reads `<file>: no space left on device`, naming the file that did not fit."""
    if isinstance(e, OSError):
        e = io_error(e.filename or where, e)
    if isinstance(e, (CheckpointError, DiskFullError)):
        return str(e)
    return f"{where}: {type(e).__name__}: {e}"


def _crash_point(name: str) -> None:
    """Test hook: with DISTGPT_CKPT_CRASH_AT=<name>, die here as abruptly as a power cut or OOM kill.
    Unset, it is one dictionary lookup per named point (a handful per save)."""
    if switches.get(CRASH_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- small file-system helpers

def _remove_tree(path: Path) -> None:
    """Delete a checkpoint folder by first renaming it to a dot-name: a crash half way through the
    deletion then leaves a folder nobody reads instead of a manifest whose shards are gone."""
    doomed = path.with_name(".del_" + path.name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clear_leftovers(ckpt_dir: Path) -> None:
    """Remove what crashed saves left behind (.tmp_step_*, .old_step_*, .del_step_*): only one run
    writes into an output directory, so none of them belongs to a save still in progress."""
    for p in ckpt_dir.glob(".*step_*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _write_shard(path: Path, rows: tuple[np.ndarray, ...]) -> tuple[int, str]:
    """Write rows as one float32 (len(rows), n) .npy: the header, then the raw bytes in chunks,
    hashing exactly the bytes written (one pass, no reread). Returns (file size, sha256)."""
    n = len(rows[0])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (len(rows), n)})
    h = hashlib.sha256(header.getvalue())
    size = len(header.getvalue())
    # atomic_write: a shard is either complete under its name or absent, and a full disk names it
    with atomic_write(path) as f:
        f.write(header.getvalue())
        for i, row in enumerate(rows):
            for lo in range(0, n, CHUNK):
                chunk = np.ascontiguousarray(row[lo:lo + CHUNK], dtype="<f4")  # no copy if already so
                h.update(chunk)
                f.write(chunk)
                size += chunk.nbytes
            if i == 0:
                _crash_point("mid_shard")
    return size, h.hexdigest()


# ----------------------------------------------------------------------------- saving

def save_checkpoint(out_dir: str | Path, step: int, comm, layout, partition: Partition,
                    params: np.ndarray, m: np.ndarray, v: np.ndarray, meta: dict, keep: int,
                    worker: int = 0, workers: int = 1,
                    outer: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Collective: every rank writes params, m, v of its owned slice (partition.owned = [start, end),
    the arrays hold just that slice); rank 0 writes the manifest and publishes the folder. Returns
    OUT/ckpt/step_XXXXXXX on every rank.

    DiLoCo (workers > 1, or `outer` given): each worker's ranks write that worker's set of shards
    (partition is the worker's), and worker 0's also hold the global parameters and outer momentum
    (`outer`) as rows 3 and 4; the manifest records `workers` and each shard's worker and rows.

    Failures on any rank are gathered and raised as CheckpointError on all ranks, so no rank is
    left waiting in a collective that the failed one never reaches. A failed save (a full disk
    included) removes its temporary folder and leaves the earlier checkpoints and `latest` as they were.
    """
    ckpt_dir = Path(out_dir) / "ckpt"
    name = step_name(step)
    final, tmp_dir = ckpt_dir / name, ckpt_dir / f".tmp_{name}"

    # 1. rank 0 prepares an empty temporary folder; the broadcast doubles as the barrier
    err = None
    if comm.rank == 0:
        try:
            try:
                json.dumps(meta)  # fail before writing gigabytes, not after
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{final}: meta is not JSON-serialisable: {e}") from None
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(ckpt_dir)
            tmp_dir.mkdir()
        except Exception as e:
            err = _message(e, tmp_dir)
    err = comm.bcast_obj(err)
    if err:
        raise CheckpointError(err)

    # 2. every rank writes its shard into the temporary folder
    start, end = partition.owned
    file = f"shard_{comm.rank:05d}.npy"
    diloco = outer is not None or workers > 1
    rows = (params, m, v) + (tuple(outer) if outer is not None and worker == 0 else ())
    try:
        for label, a in zip(("params", "m", "v", "global params", "outer momentum"), rows, strict=False):
            if a.shape != (end - start,):
                raise CheckpointError(f"rank {comm.rank}: {label} has shape {a.shape}, "
                                      f"shard [{start}, {end}) needs ({end - start},)")
        nbytes, digest = _write_shard(tmp_dir / file, rows)
        record: dict | str = {"file": file, "start": start, "end": end, "bytes": nbytes, "sha256": digest}
        if diloco:
            record.update(worker=worker, rows=len(rows))
    except Exception as e:
        record = _message(e, tmp_dir / file)
    _crash_point("after_shard")
    records = comm.allgather_obj(record)
    errors = [r for r in records if isinstance(r, str)]
    if errors:
        if comm.rank == 0:  # every rank is past its write: free the space the partial save holds
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CheckpointError(errors[0])

    # 3. rank 0 writes the manifest, then publishes the folder under its final name
    err = None
    if comm.rank == 0:
        try:
            _crash_point("before_manifest")
            if diloco:      # each worker's shards in order, worker by worker
                records.sort(key=lambda r: (r["worker"], r["start"]))
            _finish(ckpt_dir, tmp_dir, final, step, comm.size, layout, records, meta, keep,
                    workers if diloco else None)
        except Exception as e:
            err = _message(e, final)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already if the folder was published
    # every rank waits here until the checkpoint is complete (or has failed) on rank 0
    err = comm.bcast_obj(err)
    if err:
        raise CheckpointError(err)
    return final


def _finish(ckpt_dir: Path, tmp_dir: Path, final: Path, step: int, world: int, layout,
            records: list[dict], meta: dict, keep: int, workers: int | None = None) -> None:
    """Rank 0's half of save_checkpoint, after every shard is on disk."""
    # each worker's shards must tile [0, N) and be visible here: a run whose nodes write to local
    # disks would otherwise produce a manifest for files that this node cannot read
    pos = [0] * (workers or 1)
    for r in records:
        k = r.get("worker", 0)
        if r["start"] != pos[k]:
            raise CheckpointError(f"{tmp_dir / r['file']}: covers [{r['start']}, {r['end']}), expected to "
                                  f"start at {pos[k]} (shards must tile the flat vector)")
        path = tmp_dir / r["file"]
        if not path.is_file() or path.stat().st_size != r["bytes"]:
            raise CheckpointError(f"{path}: not visible from rank 0 with {r['bytes']} bytes "
                                  f"(the output directory must be on a file system shared by all nodes)")
        pos[k] = r["end"]
    for end in pos:
        if end != layout.size:
            raise CheckpointError(f"{tmp_dir}: shards cover [0, {end}), the model has {layout.size} values")

    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
                "layout": layout.describe(), "n_params": layout.size, "dtype": "float32",
                "shards": records, "meta": meta}
    if workers is not None:
        manifest["workers"] = workers
    write_text_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _crash_point("after_manifest")

    # an older run may have left a checkpoint of the same step; keep it until the new one replaces it
    aside = ckpt_dir / f".old_{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    try:
        os.replace(tmp_dir, final)
    except OSError:
        if aside.exists():  # put the old one back: the next save would clear it as debris
            os.replace(aside, final)
        raise
    fsync_dir(ckpt_dir)
    shutil.rmtree(aside, ignore_errors=True)

    _crash_point("before_latest")
    # a full disk here fails the save, but the folder is already complete and published, so
    # resume=auto (which picks the newest valid folder, not `latest`) still finds it
    write_text_atomic(ckpt_dir / LATEST, final.name + "\n")

    # prune: keep the one just written and the newest keep-1 others that are complete. Completeness
    # here is the cheap check (manifest and shard sizes); rehashing gigabytes every save would stall
    # all ranks, and a bad hash is still caught at resume time, which then falls back further.
    kept = 1
    for path in list_checkpoints(ckpt_dir.parent):
        if path == final or not _ours(path):      # a step_* folder without a manifest is not ours
            continue
        if kept < keep and _is_complete(path):
            kept += 1
        else:
            _remove_tree(path)
    fsync_dir(ckpt_dir)


# ----------------------------------------------------------------------------- finding and validating

def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint folders in out_dir/ckpt, newest step first (temporary dot-folders are ignored)."""
    ckpt_dir = Path(out_dir) / "ckpt"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(mt.group(1)), p) for p in ckpt_dir.iterdir()
             if (mt := STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _read_manifest(path: Path) -> dict:
    """The manifest of checkpoint folder `path`, with its structure checked (no shard is opened)."""
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if not mf.is_file():
        raise CheckpointError(f"{mf}: missing (incomplete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mf}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{mf}: version {manifest.get('version')!r}, this code reads version {VERSION}")
    for key, kind in (("step", int), ("world_size", int), ("n_params", int), ("layout", list),
                      ("shards", list), ("meta", dict), ("dtype", str)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{mf}: field {key!r} missing or not a {kind.__name__}")
    if manifest["dtype"] != "float32":
        raise CheckpointError(f"{mf}: dtype {manifest['dtype']!r}, expected 'float32'")
    if len(manifest["shards"]) != manifest["world_size"]:
        raise CheckpointError(f"{mf}: {len(manifest['shards'])} shards, world size {manifest['world_size']}")
    workers = manifest.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise CheckpointError(f"{mf}: field 'workers' is {workers!r}, expected a positive integer")
    pos = [0] * workers          # each worker's shards tile [0, n_params), in order
    for s in manifest["shards"]:
        ok = isinstance(s, dict) and all(isinstance(s.get(k), int) for k in ("start", "end", "bytes"))
        k = s.get("worker", 0) if isinstance(s, dict) else None
        rows = (5 if k == 0 else 3) if "workers" in manifest else 3    # worker 0 holds the outer state
        ok = ok and isinstance(k, int) and 0 <= k < workers and s.get("rows", 3) == rows
        ok = (ok and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
              and s["start"] == pos[k])
        if not ok or s["end"] < s["start"] or not isinstance(s.get("sha256"), str):
            raise CheckpointError(f"{mf}: bad shard record {s!r}")
        pos[k] = s["end"]
    for k, end in enumerate(pos):
        if end != manifest["n_params"]:
            whose = "the" if workers == 1 else f"worker {k}'s"
            raise CheckpointError(f"{mf}: {whose} shards cover [0, {end}), "
                                  f"n_params is {manifest['n_params']}")
    return manifest


def _check_shard_size(path: Path, record: dict) -> Path:
    file = path / record["file"]
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, the manifest records {record['bytes']} (truncated?)")
    return file


def _check_shard_hash(file: Path, record: dict) -> None:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    if h.hexdigest() != record["sha256"]:
        raise CheckpointError(f"{file}: sha256 mismatch (corrupted)")


def validate(path: str | Path, check_hash: bool = True) -> dict:
    """Check a checkpoint folder: manifest readable and well-formed, every shard present with its
    recorded size and (with check_hash) sha256. Returns the manifest; CheckpointError otherwise."""
    path = Path(path)
    manifest = _read_manifest(path)
    for record in manifest["shards"]:
        file = _check_shard_size(path, record)
        if check_hash:
            try:
                _check_shard_hash(file, record)
            except OSError as e:
                raise CheckpointError(f"{file}: unreadable: {e}") from None
    return manifest


def _is_complete(path: Path) -> bool:
    try:
        validate(path, check_hash=False)
        return True
    except CheckpointError:
        return False


def _newest_valid(out_dir: Path) -> Path | None:
    """Newest checkpoint in out_dir that validates in full, with a one-line warning on stderr for
    each newer one skipped (a crash mid-save, a corrupted shard)."""
    for path in list_checkpoints(out_dir):
        try:
            validate(path)
            return path
        except CheckpointError as e:
            print(f"distgpt: warning: skipping checkpoint {path.name}: {e}", file=sys.stderr, flush=True)
    return None


def _resolve_local(out_dir: str | Path, spec: str) -> Path | None:
    """Single-process half of resolve_resume (also used by read_params)."""
    if spec == "auto":
        return _newest_valid(Path(out_dir))
    path = Path(spec)
    if (path / MANIFEST).exists() or STEP_RE.fullmatch(path.name):
        validate(path)
        return path
    if (path / "ckpt").is_dir():
        found = _newest_valid(path)
        if found is None:
            raise CheckpointError(f"{path / 'ckpt'}: no valid checkpoint")
        return found
    raise CheckpointError(f"{path}: neither a checkpoint folder nor an output directory with checkpoints")


def resolve_resume(out_dir: str | Path, spec: str, comm) -> Path | None:
    """Collective: which checkpoint to resume from. spec "auto" -> the newest valid one in
    out_dir/ckpt, or None if there is none; otherwise spec is a checkpoint folder (or an output
    directory, meaning its newest valid checkpoint) that must validate.

    Only rank 0 reads and hashes; its answer (or its error) is broadcast so all ranks agree."""
    answer: tuple[str, str | None] = ("ok", None)
    if comm.rank == 0:
        try:
            found = _resolve_local(out_dir, spec)
            answer = ("ok", None if found is None else str(found))
        except Exception as e:
            answer = ("error", _message(e, Path(spec)))
    status, value = comm.bcast_obj(answer)
    if status == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


# ----------------------------------------------------------------------------- loading

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple")


def _check_model(mf: Path, manifest: dict, layout) -> None:
    """Refuse a checkpoint of a different model, naming the config keys that differ (n_head and
    the attention pattern change no tensor's shape, so the layout alone would not notice them)."""
    saved = (manifest["meta"].get("config") or {}).get("model") or {}
    ours = layout.cfg.model_dump()
    differ = [f"model.{k}={saved[k]} (this run: {ours[k]})" for k in (*MODEL_KEYS, "attention", "window")
              if k in saved and saved[k] != ours[k]]
    if differ:
        raise CheckpointError(f"{mf}: saved for another model: {', '.join(differ)}; resume with the "
                              "checkpoint's model settings, or start a new run in another out_dir")
    saved_layout, our_layout = manifest["layout"], layout.describe()
    for a, b in itertools.zip_longest(saved_layout, our_layout):   # (a checkpoint without the config)
        if a == b:
            continue
        if not isinstance(a, dict):
            what = f"it lacks tensor {b['name']}"
        elif b is None:
            what = f"it has tensor {a.get('name')}, which this run's model lacks"
        elif a.get("name") != b["name"]:
            what = f"it has tensor {a.get('name')} where this run's model has {b['name']}"
        else:
            what = (f"tensor {b['name']} has shape {a.get('shape')} at offset {a.get('offset')} there, "
                    f"shape {b['shape']} at offset {b['offset']} in this run's model")
        raise CheckpointError(f"{mf}: saved for another model: {what}")


def _read_range(path: Path, manifest: dict, start: int, end: int, rows: int, worker: int = 0,
                first: int = 0) -> np.ndarray:
    """Rows [first, first + rows) of the flat range [start, end) of one worker's shards (a DiLoCo
    checkpoint has a set per worker), assembled from whichever shards overlap it. Each shard is
    memory-mapped, so only the overlapping byte ranges are read."""
    out = np.empty((rows, end - start), np.float32)
    for record in manifest["shards"]:
        a, b = max(start, record["start"]), min(end, record["end"])
        if a >= b or record.get("worker", 0) != worker:
            continue
        file = _check_shard_size(path, record)
        try:
            mm = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable .npy: {e}") from None
        n, held = record["end"] - record["start"], record.get("rows", 3)
        if mm.shape != (held, n) or mm.dtype != np.float32:
            raise CheckpointError(f"{file}: holds {mm.dtype} {mm.shape}, expected float32 ({held}, {n})")
        if first + rows > held:
            raise CheckpointError(f"{file}: holds {held} rows, rows up to {first + rows} are needed")
        out[:, a - start:b - start] = mm[first:first + rows, a - record["start"]:b - record["start"]]
        del mm  # unmap now rather than holding every overlapping shard open
    return out


def _manifest_for(path: Path, layout) -> dict:
    """The manifest of checkpoint `path`, refused (CheckpointError) unless it was saved for `layout`."""
    manifest = _read_manifest(path)
    mf = path / MANIFEST
    _check_model(mf, manifest, layout)
    if manifest["n_params"] != layout.size:
        raise CheckpointError(f"{mf}: {manifest['n_params']} values, the model has {layout.size}")
    return manifest


def load_checkpoint(path: str | Path, comm, layout, partition: Partition, verify: bool = False,
                    worker: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Collective: params, m, v of this rank's owned slice (partition.owned = [start, end)) and the
    manifest.

    The saving world size does not matter: the slice is read from the overlapping old shards.
    verify=True rehashes every shard first, the shards split round-robin across ranks.
    Any rank's failure is raised as CheckpointError on all ranks."""
    path = Path(path)
    start, end = partition.owned
    err = None
    try:
        manifest = _manifest_for(path, layout)
        if verify:
            for record in manifest["shards"][comm.rank::comm.size]:
                _check_shard_hash(_check_shard_size(path, record), record)
        rows = _read_range(path, manifest, start, end, 3, worker)
    except Exception as e:
        err = _message(e, path)
    errors = [e for e in comm.allgather_obj(err) if e]
    if errors:
        raise CheckpointError(errors[0])
    return rows[0], rows[1], rows[2], manifest


def _merged(path: Path, manifest: dict, a: int, b: int, moments: bool = True
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """A DiLoCo checkpoint's workers merged as their next outer sync would merge them, early, on
    [a, b): (parameters, the workers' mean m and v (with `moments`), outer momentum). At a sync
    they all hold the global parameters already and no outer step is taken. One worker's rows are
    read at a time and the sums run in worker order, in place (a model-sized array each)."""
    from distgpt.config import DilocoConfig
    from distgpt.diloco import outer_update

    old, saved = manifest.get("workers", 1), manifest["meta"]["diloco"]
    g, mom = _read_range(path, manifest, a, b, 2, 0, 3)
    rows = 3 if moments else 1
    inv = np.float32(1.0 / old)
    p = m = v = delta = None
    for k in range(old):
        got = _read_range(path, manifest, a, b, rows, k)
        if k == 0:
            p, delta = got[0], g - got[0]
            if moments:
                m, v = got[1], got[2]
            continue
        np.subtract(g, got[0], out=got[0])
        delta += got[0]
        if moments:
            m += got[1]
            v += got[2]
    if moments:
        m *= inv
        v *= inv
    if int(saved["last_sync"]) != manifest["step"]:
        delta *= inv
        d = DilocoConfig(**manifest["meta"]["config"]["parallel"]["diloco"])
        outer_update(g, mom, delta, d.outer_lr, d.outer_momentum, d.nesterov)
        p = g
    return p, m, v, mom


def load_worker_state(path: str | Path, comm, layout, partition: Partition, workers: int | None,
                      worker: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple | None, str]:
    """Collective: params, m, v of this rank's owned slice for a run of `workers` DiLoCo workers
    (None: a synchronous run), of which this rank's host is `worker`; the outer state of the slice
    (global parameters, momentum, the step of the last sync) or None to start a cycle here; and a
    phrase saying which rule applied:
    - a synchronous checkpoint: its parameters and moments (a DiLoCo run starts its first cycle);
    - a DiLoCo checkpoint into a run with as many workers: each worker resumes its own parameters
      and moments, and the outer state (exact);
    - otherwise (another number of hosts, or a synchronous run): the workers are merged as the next
      outer sync would merge them, early: one outer step (with the checkpoint's outer settings) on
      the mean pseudo-gradient, unless the checkpoint was taken right at a sync; AdamW moments are
      the workers' mean; the outer momentum carries on into a DiLoCo run.
    Any rank's failure is raised as CheckpointError on all ranks."""
    path = Path(path)
    a, b = partition.owned
    result, err = None, None
    try:
        manifest = _manifest_for(path, layout)
        saved = manifest["meta"].get("diloco")
        old = manifest.get("workers", 1)
        if saved is None:
            p, m, v = _read_range(path, manifest, a, b, 3)
            result = p, m, v, None, "a synchronous checkpoint"
        else:
            last, step = int(saved["last_sync"]), manifest["step"]
            if workers == old:
                g, mom = _read_range(path, manifest, a, b, 2, 0, 3)
                p, m, v = _read_range(path, manifest, a, b, 3, worker)
                result = p, m, v, (g, mom, last), f"each of the {old} hosts its own state"
            else:
                p, m, v, mom = _merged(path, manifest, a, b)
                hosts = f"{old} host{'s' if old > 1 else ''}"
                how = (f"{hosts} merged into {workers or 1} "
                       + ("(taken at an outer sync)" if last == step else "by an early outer step")
                       + ", AdamW moments averaged")
                result = p, m, v, ((p, mom, step) if workers else None), how
    except Exception as e:
        err = _message(e, path)
    errors = [e for e in comm.allgather_obj(err) if e]
    if errors:
        raise CheckpointError(errors[0])
    return result


def param_reader(path: str | Path) -> tuple[dict, Callable[[int, int], np.ndarray]]:
    """Single process: (manifest, read) for a checkpoint folder or the newest valid checkpoint of an
    output directory, validated in full; read(start, end) -> float32 values [start, end) of its flat
    vector, read from the shards' byte ranges (a DiLoCo checkpoint: the global parameters at a sync,
    between syncs the hosts merged as a resume on one host would merge them, elementwise)."""
    found = _resolve_local(path, str(path))
    assert found is not None  # an explicit path either resolves or raises
    manifest = _read_manifest(found)
    saved = manifest["meta"].get("diloco")
    if saved is None:
        def read(a: int, b: int) -> np.ndarray:
            return _read_range(found, manifest, a, b, 1)[0]
    elif int(saved["last_sync"]) == manifest["step"]:      # at a sync: the global parameters
        def read(a: int, b: int) -> np.ndarray:
            return _read_range(found, manifest, a, b, 1, 0, 3)[0]
    else:
        def read(a: int, b: int) -> np.ndarray:
            return _merged(found, manifest, a, b, moments=False)[0]
    return manifest, read


def read_params(path: str | Path) -> tuple[dict, np.ndarray]:
    """Single process: (manifest, the full flat float32 vector) of a checkpoint folder, or of the
    newest valid checkpoint of an output directory: the model's parameters, or a LoRA run's adapters
    (read_lora). Validates in full (sample/export run once)."""
    manifest, read = param_reader(path)
    return manifest, read(0, manifest["n_params"])


def read_lora(path: str | Path) -> tuple[dict, dict, np.ndarray]:
    """Single process: (manifest, meta["lora"], the flat float32 adapter vector) of a LoRA checkpoint
    (folder, or an output directory's newest). meta["lora"] is {"rank", "alpha", "dropout", "targets",
    "base": {"source": init_from as given, "sha256": of the base's float32 values in model.Layout
    order}}; manifest["layout"] is the lora.LoraLayout's describe(). CheckpointError otherwise."""
    manifest, adapters = read_params(path)
    lora = manifest["meta"].get("lora")
    if not lora:
        raise CheckpointError(f"{path}: not a LoRA checkpoint (it holds a whole model's parameters)")
    return manifest, lora, adapters


# ----------------------------------------------------------------------------- a run's output directory

METRICS = "metrics.jsonl"
WATCHDOG_BOARD = ".watchdog"


def step_of(path: Path) -> int:
    """The step a checkpoint folder's name says."""
    return int(STEP_RE.fullmatch(path.name).group(1))


def _ours(path: Path) -> bool:
    """A checkpoint folder distgpt published: a folder gets its step name only after its manifest is
    on disk, so one without a manifest was not made by a save."""
    return (path / MANIFEST).is_file()


def existing_run(out_dir: str | Path, after_step: int | None = None) -> str | None:
    """What an earlier run left in out_dir (its checkpoints, its metrics.jsonl), described in a few
    words, or None when out_dir holds no run. With `after_step`: only its checkpoints newer than that
    step (a run resumed from an older checkpoint of its own would mix two histories)."""
    out_dir = Path(out_dir)
    found = []
    ckpts = [p for p in list_checkpoints(out_dir) if after_step is None or step_of(p) > after_step]
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s), the newest at step {step_of(ckpts[0])}")
    metrics = out_dir / METRICS
    if after_step is None and metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS)
    return " and ".join(found) or None


def remove_run(out_dir: str | Path, after_step: int | None = None) -> None:
    """Start over in out_dir: remove what an earlier run wrote there (its checkpoint folders, `latest`,
    leftovers of interrupted saves, metrics.jsonl, the watchdog's board) and nothing else, so a
    user's own files in out_dir or out_dir/ckpt survive. With `after_step`: only the checkpoints
    newer than that step (the metrics past it are dropped by the resumed run itself)."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "ckpt"
    for path in list_checkpoints(out_dir):
        if _ours(path) and (after_step is None or step_of(path) > after_step):
            _remove_tree(path)
    if ckpt_dir.is_dir():
        _clear_leftovers(ckpt_dir)
        if after_step is None:
            (ckpt_dir / LATEST).unlink(missing_ok=True)
    if after_step is None:
        (out_dir / METRICS).unlink(missing_ok=True)
        board = out_dir / WATCHDOG_BOARD
        if board.is_dir():
            for f in board.glob("rank_*.json"):
                f.unlink(missing_ok=True)


def resume_source(out_dir: str | Path, spec: str | None) -> tuple[str, int | None]:
    """Where `resume` takes the run from, seen from out_dir, decided on the resolved path (a link or
    another spelling of the same folder counts as that folder):
    ("none", None) no resume, or auto (out_dir's own newest checkpoint);
    ("own", None) out_dir itself (its newest checkpoint, as auto);
    ("rewind", step) a checkpoint folder in out_dir/ckpt: the ones newer than `step` belong to a
    history the resumed run would leave;
    ("elsewhere", None) anything else (another run, a copy kept anywhere, even under out_dir): the
    run continues that history into out_dir, which must then hold no run of its own."""
    if not spec or spec == "auto":
        return "none", None
    path = Path(spec).resolve()
    out = Path(out_dir).resolve()
    if path == out:
        return "own", None
    if STEP_RE.fullmatch(path.name) and path.parent == (out / "ckpt").resolve():
        return "rewind", step_of(path)
    return "elsewhere", None


class ResumeRefused(CheckpointError):
    """The checkpoint does not fit this run (another model, seed, data order, no steps left). Decided
    on rank 0 from the manifest alone and raised on every rank alike."""


class RunComplete(Exception):
    """resume=auto found the run already at train.max_steps: nothing to do (a requeued job whose run
    finished; not an error)."""


def plan_resume(cfg, comm, layout, loader, tokenizer: str | None):
    """Collective: (checkpoint folder, its TrainingState) that `cfg.resume` names, or None to start
    from scratch. Everything that makes the checkpoint unfit is found here, from the manifest, before
    any shard is read and before the model is built (--dry-run calls this too): ResumeRefused, or
    RunComplete when resume=auto finds the run already finished."""
    from distgpt.trainer import TrainingState

    if not cfg.resume:
        return None
    try:    # rank 0's verdict, broadcast: every rank raises alike
        path = resolve_resume(cfg.out_dir, cfg.resume, comm)
    except CheckpointError as e:
        raise ResumeRefused(str(e)) from None
    if path is None:
        # auto found no valid checkpoint: starting over is right only where there is none at all
        found = comm.bcast_obj(existing_run(cfg.out_dir) if comm.rank == 0 else None)
        if found and "checkpoint" in found:
            raise ResumeRefused(
                f"resume=auto: {Path(cfg.out_dir) / 'ckpt'} holds {found.split(' and ')[0]}, none of them "
                "valid (see the warnings above): repair or move them, or start over without --resume and "
                "with --overwrite")
        return None

    def verdict() -> tuple[str, object]:
        mf = path / MANIFEST
        try:
            manifest = _read_manifest(path)
            meta = manifest["meta"]
            lora_mismatch(mf, meta.get("lora"), cfg.lora)     # before the layouts are compared
            _check_model(mf, manifest, layout)
            saved_tok = meta.get("tokenizer")
            if saved_tok and tokenizer and saved_tok != tokenizer:
                return "refused", f"{mf}: saved with tokenizer {saved_tok}, the data uses {tokenizer}"
            state = TrainingState.from_meta(meta)
            loader.check_resumable(meta["loader"])
        except CheckpointError as e:
            return "refused", str(e)
        except Exception as e:      # DataError (another data order), a malformed meta
            return "refused", f"{mf}: {e}"
        steps = cfg.train.max_steps
        if state.step == steps and cfg.resume == "auto":
            return "complete", f"the run in {cfg.out_dir} is complete: its newest checkpoint is at step " \
                               f"{state.step} = train.max_steps (raise train.max_steps to continue it)"
        if state.step >= steps:
            return "refused", (f"{mf}: the run is already at step {state.step}, train.max_steps is {steps}: "
                               "nothing to train (raise train.max_steps to continue it)")
        return "ok", state.to_dict()

    status, value = comm.bcast_obj(verdict() if comm.rank == 0 else None)
    if status == "refused":
        raise ResumeRefused(value)
    if status == "complete":
        raise RunComplete(value)
    return path, TrainingState(**value)


def lora_mismatch(mf: Path, saved: dict | None, lora) -> None:
    """Refuse (CheckpointError, one line) a checkpoint whose LoRA settings do not fit this run's
    (config.LoraConfig): LoRA against a whole model either way, another rank, alpha or targets.
    lora.dropout may change (it changes no tensor), as model.dropout may. The base is compared by
    check_base, once it is loaded."""
    if saved is None and lora.rank == 0:
        return
    if saved is None:
        raise CheckpointError(f"{mf}: a whole model's checkpoint (no LoRA), this run trains LoRA adapters "
                              f"(lora.rank = {lora.rank}): resume it with lora.rank = 0, or start a new LoRA "
                              f"run with init_from = {mf.parent} (its weights as the base)")
    described = (f"LoRA rank {saved.get('rank')}, alpha {saved.get('alpha')}, targets "
                 f"{', '.join(saved.get('targets') or [])}")
    if lora.rank == 0:
        raise CheckpointError(f"{mf}: a LoRA checkpoint ({described}), this run has lora.rank = 0: resume "
                              "with its lora settings, or export it merged (--format hf) and start from that")
    ours = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
    differ = [f"lora.{k}={saved.get(k)} (this run: {v})" for k, v in ours.items() if saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{mf}: saved with other LoRA settings: {', '.join(differ)}; resume with the "
                              "checkpoint's lora settings, or start a new run in another out_dir")


def check_base(path: Path, base: dict, comm) -> None:
    """Collective: refuse (ResumeRefused on every rank) a LoRA checkpoint whose adapters were trained
    on another base than this run's (`base`: {"source", "sha256"} of the weights this run loaded)."""
    err = None
    if comm.rank == 0:
        try:
            saved = (_read_manifest(path)["meta"].get("lora") or {}).get("base") or {}
        except CheckpointError as e:
            saved, err = {}, str(e)
        if err is None and saved.get("sha256") != base["sha256"]:
            same = saved.get("source") == base["source"]
            err = (f"{path / MANIFEST}: its LoRA adapters were trained on the base {saved.get('source')} "
                   f"(sha256 {str(saved.get('sha256'))[:16]}), this run's base is "
                   + (f"{base['source']}, which now holds other weights" if same else base["source"])
                   + f" (sha256 {base['sha256'][:16]}): resume with init_from = the checkpoint's base")
    err = comm.bcast_obj(err)
    if err:
        raise ResumeRefused(err)


class Checkpointer:
    """Saving and resuming the whole training state of a run: the trainer's shards (parameters and
    AdamW moments), the TrainingState and what the data must match (tokenizer, loader identity)."""

    def __init__(self, cfg, comm, trainer, loader, tokenizer: str | None, log):
        self.cfg, self.comm, self.trainer, self.loader, self.tokenizer, self.log = (
            cfg, comm, trainer, loader, tokenizer, log)
        self.out_dir = Path(cfg.out_dir)
        self.saved_step = -1         # the step of the newest checkpoint this run wrote or resumed

    def resume(self, plan):
        """Load the checkpoint plan_resume chose: its TrainingState, or None to start fresh."""
        if plan is None:
            if self.cfg.resume:
                self.log(f"resume={self.cfg.resume}: no checkpoint in {self.out_dir / 'ckpt'}: "
                         "starting from scratch")
            return None
        path, state = plan
        trainer, comm = self.trainer, self.comm
        if trainer.base is not None:
            check_base(path, trainer.base, comm)
        workers = comm.n_nodes if trainer.outer is not None else None
        params, m, v, outer, how = load_worker_state(path, comm, trainer.layout, trainer.partition,
                                                     workers, comm.node_index)
        trainer.load_state(params, m, v, state, outer)
        self.saved_step = state.step
        self.log(f"resumed from {path} at step {state.step}"
                 + ("" if how == "a synchronous checkpoint" and workers is None else f" ({how})"))
        return state

    def save(self, state) -> None:
        t = self.cfg.train
        meta = {"config": self.cfg.to_dict(), "state": state.to_dict(), "loader": self.loader.state_dict(),
                "tokenizer": self.tokenizer, "precision": self.trainer.precision,
                "rng": {"kind": "counter-based: dropout masks from (seed, step, global row)", "seed": t.seed}}
        if self.trainer.base is not None:       # LoRA: the shards hold the adapters (trainer.layout)
            meta["lora"] = {**self.trainer.lora.config(), "base": dict(self.trainer.base)}
        from distgpt import dist

        outer, diloco = self.trainer.outer, {}
        if outer is not None:
            meta["diloco"] = {"workers": self.comm.n_nodes, "last_sync": outer.last_sync}
            diloco = {"worker": self.comm.node_index, "workers": self.comm.n_nodes,
                      "outer": self.trainer.outer_slices()}
        with self.comm.watch(dist.Phase.CHECKPOINT_SAVE, state.step):
            path = save_checkpoint(self.out_dir, state.step, self.comm, self.trainer.layout,
                                   self.trainer.partition, *self.trainer.state_slices(), meta,
                                   self.cfg.checkpoint.keep, **diloco)
        self.saved_step = state.step
        self.log(f"checkpoint: {path}")
