"""The one atomic-write helper of the repository: every file or folder it writes appears whole or not at all.

    atomic_write(path, text_or_bytes)                 # a file: unique temp file beside it, fsync, rename
    atomic_json(path, obj)                            # strict JSON (NaN/inf refused) through atomic_write
    with atomic_file(path) as tmp: torch.save(x, tmp) # any writer that wants a path
    with atomic_directory(folder) as tmp: ...         # a folder: built aside, then swapped in

    write_owned(folder / "table1.md", text)           # a file among others: never over one we did not write
    with exclusive_lock(path, wait=False): ...        # one process at a time per path (lock file removed after)

Temporary names come from `tempfile` (unique per call), so two writers never collide on a temp file.
`atomic_directory` never deletes what it did not write: an existing non-empty folder must carry this
helper's manifest (or pass `is_ours`), or it is refused; files in it that the new version does not
contain and that no earlier save of ours wrote (a user's notes, say) are carried over untouched. The
manifest also records the sha256 of every weight file the save wrote (`verify_checksums` compares on load:
a payload corrupted under an intact header is caught). `write_owned` keeps a ledger of the files it wrote
into a shared folder (`.lrlora-files`, name -> sha256): it replaces only those, unchanged since, and a clean
removes only those. Stdlib only: `lrlora` stays importable with torch alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lrlora.errors import NonFiniteError, UnsafeWrite

MANIFEST = ".lrlora-manifest.json"  # names of the entries a save wrote into a folder (and its weights' sha256)
LEDGER = ".lrlora-files"  # name -> sha256 of the files write_owned put into a shared folder
CHECKED = (".safetensors", ".bin", ".pkl", ".pt")  # payloads whose sha256 the manifest keeps and loads check


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: how a written or downloaded file is recognised later."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_nonfinite(obj, where: str = "") -> str | None:
    """The key path of the first NaN/inf float in a JSON-like object, else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<value>"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def dumps_strict(obj, **kwargs) -> str:
    """json.dumps with allow_nan=False; a non-finite value raises NonFiniteError naming its key."""
    bad = first_nonfinite(obj)
    if bad:
        raise NonFiniteError(f"refusing to write a non-finite value at {bad}: a NaN/inf is not a result")
    return json.dumps(obj, allow_nan=False, **kwargs)


def atomic_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    return atomic_write(path, dumps_strict(obj, **kwargs) + "\n")


def read_manifest(directory: Path) -> list[str] | None:
    meta = _manifest(directory)
    return meta.get("files") if meta else None


def _manifest(directory: Path) -> dict | None:
    try:
        meta = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("files"), list) else None


def recover_interrupted_swap(directory: str | os.PathLike) -> None:
    """If a crash hit between the two renames of a folder swap, `directory` is missing while its complete new
    version (`.NAME.new.*`, manifest written) or its previous one (`.NAME.old.*`) sits beside it: put it back
    (the new one first). Does nothing when `directory` exists."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return
    for tag in ("new", "old"):
        for cand in sorted(directory.parent.glob(f".{directory.name}.{tag}.*")):
            if cand.is_dir() and _manifest(cand) is not None:
                cand.rename(directory)
                return


def _hidden_temp(directory: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{tag}.", dir=directory.parent))


def check_writable(directory: str | os.PathLike, is_ours: Callable[[Path], bool] | None = None,
                   what: str = "folder") -> None:
    """Raise UnsafeWrite unless `directory` is absent, empty, or ours (see atomic_directory): callers check
    this before long work, so a refusal comes first, not after minutes of computing. Ours: its manifest names
    the same kind of writer (`what`), or `is_ours(directory)` says so."""
    directory = Path(directory)
    recover_interrupted_swap(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UnsafeWrite(f"{directory} is a file, not a folder: choose another path for the {what}")
    entries = [p.name for p in directory.iterdir()]
    meta = _manifest(directory)
    mine = meta is not None and meta.get("writer", what) == what  # an adapter save never replaces a checkpoint
    if entries and not mine and not (is_ours and is_ours(directory)):
        raise UnsafeWrite(
            f"{directory} is not empty and was not written as {'an' if what[0] in 'aeiou' else 'a'} {what} by this code "
            f"(it holds {', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}); "
            f"nothing was written: choose an empty or new folder")


@contextmanager
def atomic_directory(directory: str | os.PathLike, is_ours: Callable[[Path], bool] | None = None,
                     what: str = "folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside `directory`; when the block succeeds it takes `directory`'s place.

    Refuses (UnsafeWrite, before anything is written) a `directory` that exists, is not empty and is not
    ours: it carries no manifest of an earlier save and `is_ours(directory)` is not true. In one of ours,
    the entries the new save writes replace the old ones; entries no save of ours wrote are kept.
    A failing block leaves `directory` exactly as it was.
    """
    directory = Path(directory)
    check_writable(directory, is_ours, what)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_temp(directory, "new")
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        if directory.exists():
            owned = set(read_manifest(directory) or [])
            if not owned:  # a folder of ours from before manifests: what this save writes is ours
                owned = set(written)
            for entry in directory.iterdir():  # keep what we did not write: hard links, so the old folder
                if entry.name in owned or entry.name == MANIFEST or (tmp / entry.name).exists():
                    continue                  # stays whole until the swap
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)
        sums = {str(f.relative_to(tmp)): file_sha256(f) for f in sorted(tmp.rglob("*"))
                if f.is_file() and f.suffix in CHECKED and f.parts[len(tmp.parts)] in written}
        (tmp / MANIFEST).write_text(json.dumps({"files": written, "writer": what, "sha256": sums}))
        _fsync_dir(tmp)
        if directory.exists():
            old = _hidden_temp(directory, "old")
            old.rmdir()
            directory.rename(old)
            tmp.rename(directory)  # the only window: between these two renames `directory` is absent
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def verify_checksums(directory: str | os.PathLike) -> list[str]:
    """The weight files of `directory` whose bytes differ from the sha256 its manifest recorded when they were
    written ([] when all match, or for a folder written before checksums were kept)."""
    meta = _manifest(Path(directory)) or {}
    sums = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    bad = []
    for name, digest in sorted(sums.items()):
        f = Path(directory) / name
        try:
            if file_sha256(f) != digest:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


# --- files among others: the ledger -----------------------------------------------------------------------------
def _read_ledger(folder: Path) -> dict:
    try:
        d = json.loads((folder / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def owned_files(folder: str | os.PathLike) -> list[Path]:
    """The files write_owned wrote into `folder` that are still exactly as it wrote them."""
    folder = Path(folder)
    out = []
    for name, digest in sorted(_read_ledger(folder).items()):
        f = folder / name
        try:
            if f.is_file() and file_sha256(f) == digest:
                out.append(f)
        except OSError:
            continue
    return out


def check_owned(path: str | os.PathLike) -> None:
    """Raise UnsafeWrite if `path` exists and is not a file write_owned wrote (unchanged since)."""
    path = Path(path)
    if not path.exists():
        return
    digest = _read_ledger(path.parent).get(path.name)
    if not path.is_file() or digest is None or file_sha256(path) != digest:
        why = "was changed since this code wrote it" if digest else "was not written by this code"
        raise UnsafeWrite(f"{path} exists and {why}; nothing was written: move it away or choose another "
                          f"output folder")


def write_owned(path: str | os.PathLike, data: str | bytes) -> Path:
    """atomic_write, refusing to replace a file this code did not write, and recording what it wrote."""
    path = Path(path)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(path.parent / LEDGER):
            check_owned(path)
            atomic_write(path, data)
            ledger = _read_ledger(path.parent)
            ledger[path.name] = file_sha256(path)
            atomic_write(path.parent / LEDGER, json.dumps(ledger, indent=1, sort_keys=True))
    except BaseException:
        for folder in created:  # a refused or failed write leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return path


def remove_owned(folder: str | os.PathLike) -> list[Path]:
    """Delete the files write_owned wrote into `folder` (unchanged since), then its ledger if nothing else is
    in it, then the folder if empty; returns what was removed. A file changed since stays."""
    folder = Path(folder)
    removed = []
    for f in owned_files(folder):
        f.unlink()
        removed.append(f)
    ledger = {k: v for k, v in _read_ledger(folder).items() if (folder / k).exists()}
    if ledger:
        atomic_write(folder / LEDGER, json.dumps(ledger, indent=1, sort_keys=True))
    elif (folder / LEDGER).exists():
        (folder / LEDGER).unlink()
    try:
        folder.rmdir()
    except OSError:
        pass
    return removed


# --- one process at a time ----------------------------------------------------------------------------------------
class Busy(UnsafeWrite):
    """Another process holds the lock on this path."""


def lock_file(path: str | os.PathLike) -> Path:
    """Where the lock on `path` lives: in the temp folder, named by the path's hash, so that taking it writes
    nothing beside the path (a refused run leaves nothing behind)."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"lrlora-{key}.lock"


@contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (fcntl; released by the kernel if the process dies). With
    wait=False, a lock held elsewhere raises Busy(`busy`, its `{pid}` replaced by the holder's). The lock file is removed on
    release; a process that opened it meanwhile finds it replaced and takes a fresh one."""
    import fcntl

    lock = lock_file(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            busy = busy or f"{path} is in use by another process ({{pid}})"
            raise Busy(busy.replace("{pid}", f"process {holder or '?'}")) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            lock.unlink()
        except OSError:
            pass
        os.close(fd)
