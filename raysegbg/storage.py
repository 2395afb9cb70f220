"""Where a run lives: a local (or shared) folder, or a URI that pyarrow understands.

`logging.storage_path` may be `/mnt/shared/runs`, `s3://bucket/runs`, `gs://bucket/runs`,
`file:///...`, ... Ray Train writes checkpoints there itself (through the same
pyarrow filesystems); everything raysegbg writes or reads beside them (config.yaml,
TensorBoard, the shared-state snapshots, `eval`/`predict`) goes through these few functions.

A location is a `Path` for a local folder and a `Uri` for the rest (`Path("s3://b/x")` would
collapse the `//`). Both take `/ "name"`, `.name` and `.parent`, so code that builds paths
inside a run folder works on either. URIs may carry pyarrow's query options (e.g.
`s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`), kept at the end.
Credentials come from each store's usual sources (AWS_ACCESS_KEY_ID, ~/.aws, instance roles).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raysegbg.errors import RaysegbgError

CURRENT = "CURRENT"  # names the complete version of a published folder (see publish_dir)


class Uri(str):
    """A URI (`s3://bucket/runs/name?options`) with the few Path manners the code uses."""

    def _split(self) -> tuple[str, str]:
        head, sep, query = str(self).partition("?")
        return head.rstrip("/"), sep + query

    def __truediv__(self, part: str) -> Uri:
        head, query = self._split()
        return Uri(f"{head}/{str(part).strip('/')}{query}")

    @property
    def name(self) -> str:
        return posixpath.basename(self._split()[0])

    @property
    def parent(self) -> Uri:
        head, query = self._split()
        return Uri(f"{head.rsplit('/', 1)[0]}{query}")


Location = Path | Uri  # plain strings are accepted too: see `location`


def is_uri(value: str | Path) -> bool:
    return isinstance(value, str) and "://" in value


def location(value: str | Path) -> Location:
    """A command-line or config value as a location: a `Uri` for URIs, else a `Path`."""
    return Uri(value) if is_uri(value) else Path(value)


def join(base: str | Path, *parts: str) -> Location:
    """`base/part/...` (a URI's query options stay at the end)."""
    out = location(base)
    for part in parts:
        out = out / part
    return out


# one filesystem per store (scheme, bucket/host, options), and the fs path its URI paths map to
_STORES: dict[tuple[str, str, str], tuple[pafs.FileSystem, str]] = {}


def resolve(loc: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it.

    A store's filesystem is made once (making one can cost a request, e.g. an S3 region
    lookup) and reused for every path in it.
    """
    if not is_uri(loc):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(loc))
    parts = urlsplit(str(loc))
    key, path = (parts.scheme, parts.netloc, parts.query), parts.path.rstrip("/")
    if key in _STORES:
        fs, base = _STORES[key]
        return fs, base + path
    fs, fs_path = pafs.FileSystem.from_uri(str(loc))
    fs_path = fs_path.rstrip("/")
    if fs_path.endswith(path):  # learn how this scheme maps URI paths (e.g. s3: bucket + path)
        _STORES[key] = (fs, fs_path[: len(fs_path) - len(path)])
    return fs, fs_path


def check(loc: str | Path) -> None:
    """Fail in one line, before any run starts, when a URI names no store we can reach, or
    an S3/GCS bucket that does not exist."""
    try:
        fs, path = resolve(loc)
        bucket = path.lstrip("/").split("/")[0]
        is_bucket = fs.type_name in ("s3", "gcs")
        missing = is_bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RaysegbgError(
            f"cannot use storage {loc}: {first}; check the URI, its options (e.g. "
            "endpoint_override=HOST:PORT&scheme=http) and the store's credentials "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from None
    if missing:
        raise RaysegbgError(f"bucket {bucket} of {loc} does not exist: create it first")


def _info(loc: Location) -> pafs.FileInfo:
    fs, path = resolve(loc)
    return fs.get_file_info(path)


def exists(loc: Location) -> bool:
    return _info(loc).type != pafs.FileType.NotFound


def is_file(loc: Location) -> bool:
    return _info(loc).type == pafs.FileType.File


def listdir(loc: Location) -> list[str]:
    """Names of the entries directly inside a folder (none when it does not exist)."""
    fs, path = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_bytes(loc: Location) -> bytes:
    fs, path = resolve(loc)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a file whole: a reader sees the old content or the new, never part of it.

    Local filesystems get a temp file and a rename; an object store shows an object only
    once its upload completed.
    """
    fs, path = resolve(loc)
    local = isinstance(fs, pafs.LocalFileSystem)
    parent = posixpath.dirname(path)
    if local:
        fs.create_dir(parent, recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    with fs.open_output_stream(target) as f:
        f.write(data)
    if local:
        fs.move(target, path)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def delete_dir(loc: Location) -> None:
    fs, path = resolve(loc)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(loc: Location) -> None:
    fs, path = resolve(loc)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def upload_file(src: Path, dest: Location) -> None:
    write_bytes(dest, Path(src).read_bytes())


def upload_dir(src: Path, dest: Location) -> None:
    """Copy a local folder's files (recursively) to `dest`."""
    fs, path = resolve(dest)
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(src).resolve()), path, destination_filesystem=fs)


def download_dir(src: Location, dest: Path) -> Path:
    """Copy the files under `src` into the local folder `dest` (created)."""
    fs, path = resolve(src)
    Path(dest).mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        pafs.copy_files(path, str(Path(dest).resolve()), source_filesystem=fs)
    return Path(dest)


def upload_changed(src: Path, dest: Location, seen: dict[str, tuple[int, int]]) -> int:
    """Mirror a growing local folder to `dest`: upload the files that are new or changed
    since the last call (`seen` remembers size and mtime). Returns the number uploaded."""
    count = 0
    for file in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        rel = file.relative_to(src).as_posix()
        stat = file.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        if seen.get(rel) != stamp:
            upload_file(file, join(dest, *rel.split("/")))
            seen[rel] = stamp
            count += 1
    return count


# -- whole folders that must appear at once (the shared-state snapshots) ----------------------
@contextlib.contextmanager
def staging(dest: Location) -> Iterator[Path]:
    """A fresh local folder to write the next version of `dest` into (then `publish_dir`):
    inside `dest` itself when it is local, so publishing is a rename; removed if left over."""
    if is_uri(dest):
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            yield Path(tmp)
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=dest, ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def publish_dir(src: Path, dest: Location) -> str:
    """Publish a local folder as the new version of `dest`, all or nothing, with no moment
    where `dest` has no complete version.

    Each version goes to its own `dest/v-<time>-<id>/` (a rename when `src` is a `staging`
    folder of a local `dest`, else a copy) and the small file `dest/CURRENT` is switched to it
    last (one whole-file write); versions before the one it replaced are deleted after that
    (a reader that resolved `CURRENT` just before the switch still finds its version). Read
    with `published` or `fetch_published`.
    """
    version = f"v-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
    target = join(dest, version)
    previous = published(dest)
    if not is_uri(dest) and Path(src).resolve().parent == Path(dest).resolve():
        Path(src).rename(target)  # staged in place
    else:
        upload_dir(src, target)
    write_text(join(dest, CURRENT), version)
    keep = {version, previous and previous.name}
    for entry in listdir(dest):
        if entry.startswith("v-") and entry not in keep:
            delete_dir(join(dest, entry))
    return str(target)


def published(src: Location) -> Location | None:
    """The current version's folder of a `publish_dir` folder; None when there is none."""
    pointer = join(src, CURRENT)
    if not is_file(pointer):
        return None
    return join(src, read_text(pointer).strip())


def fetch_published(src: Location, dest: Path) -> bool:
    """Download the current version of a `publish_dir` folder; False when there is none."""
    current = published(src)
    if current is None:
        return False
    download_dir(current, dest)
    return True
