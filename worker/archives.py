"""Safe unpacking of uploaded `.tar`, `.tar.gz`/`.tgz` and `.zip` archives.

Nothing is handed to `extractall`: each member's name is checked, only plain files and folders are
written (links, devices and fifos are refused), every file is opened exclusively below the
destination, and the bytes actually decompressed are counted against the limit instead of the sizes
the headers claim (a zip bomb lies in its headers). A reader between the archive libraries and the
file refuses any single read larger than it should be, so that a hostile header (a tar pax record
of gigabytes, a zip central directory of millions of entries) is refused before it is read into
memory.
"""

from __future__ import annotations

import errno
import gzip
import re
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

from worker.file_policy import CHUNK_BYTES, DEFAULT_LIMITS, FileRejected, Limits, readable_size

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
GZIP_MAGIC = b"\x1f\x8b"
# macOS's zip tool adds AppleDouble copies of every file under this folder: never model files
MACOS_METADATA = "__MACOSX"
# a zip central-directory entry of a model file needs far less (46 bytes + the name + extras)
ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024
# what a tar archive may hold besides its members' data: headers, pax records, padding
TAR_OVERHEAD_PER_MEMBER = 8 * 1024
ONLY_FILES_AND_FOLDERS = "archives may hold only files and folders"
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def archive_suffix(name: str) -> str:
    """The archive suffix of `name` ('.tar.gz', '.zip', ...), or '' for anything else."""
    lowered = name.lower()
    return next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if lowered.endswith(s)), "")


def unpack_archive(path: Path, dest: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Unpack the archive `path` into the folder `dest` (created if missing; it must be empty),
    flattening a single top-level folder. Returns `dest`; on a refusal (`FileRejected`) or any
    other error `dest` is left empty."""
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} must be an empty folder to unpack {path.name} into")
    suffix = archive_suffix(path.name)
    if not suffix:
        raise FileRejected(
            f"{path.name} is not an archive xatl unpacks: expected {', '.join(ARCHIVE_SUFFIXES)}",
            code="unsupported_file_type",
        )
    writer = _MemberWriter(path.name, dest, limits)
    try:
        if suffix in ZIP_SUFFIXES:
            _unpack_zip(path, writer, limits)
        else:
            _unpack_tar(path, writer, limits)
        _flatten_single_folder(dest)
    except BaseException:
        empty_folder(dest)
        raise
    return dest


def empty_folder(folder: Path) -> None:
    """Remove everything inside `folder`, never following a link out of it."""
    for entry in Path(folder).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class _MemberWriter:
    """Writes members below `dest`, checking names and counting members and real bytes."""

    def __init__(self, archive: str, dest: Path, limits: Limits):
        self.archive = archive
        self.root = dest.resolve()
        self.limits = limits
        self.members = 0
        self.unpacked = 0

    def count(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise FileRejected(
                f"{self.archive} holds more than {self.limits.max_members} entries, the limit",
                code="too_many_members",
            )

    def refuse(self, name: str, problem: str) -> FileRejected:
        return FileRejected(f"{self.archive}: member {name!r} {problem}", code="unsafe_archive_member")

    def target(self, name: str) -> Path | None:
        """Where member `name` goes (None: the archive's root itself, or macOS metadata)."""
        if name.startswith("/") or _WINDOWS_DRIVE.match(name):
            raise self.refuse(name, "has an absolute path")
        if "\\" in name or any(unicodedata.category(c) == "Cc" for c in name):
            raise self.refuse(name, "has a backslash or a control character in its name")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "climbs out of its folder with '..'")
        if not parts or parts[0] == MACOS_METADATA:
            return None
        target = self.root.joinpath(*parts)
        # the name is clean, but the resolved path is what the OS will write to
        if not target.resolve().is_relative_to(self.root):
            raise self.refuse(name, "would be written outside the folder it unpacks into")
        return target

    def directory(self, name: str) -> None:
        target = self.target(name)
        if target is not None:
            self._clashes_are_refused(name, lambda: target.mkdir(parents=True, exist_ok=True))

    def file(self, name: str, data) -> None:
        target = self.target(name)
        if target is None:
            return
        self._clashes_are_refused(name, lambda: self._copy(data, target))

    def _copy(self, data, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:  # "x": a second member of the same name never overwrites
            while chunk := data.read(CHUNK_BYTES):
                self.unpacked += len(chunk)
                if self.unpacked > self.limits.max_unpacked_bytes:
                    raise FileRejected(
                        f"{self.archive} unpacks to more than {readable_size(self.limits.max_unpacked_bytes)}, "
                        "the limit",
                        code="archive_too_large",
                    )
                out.write(chunk)

    def _clashes_are_refused(self, name: str, write) -> None:
        try:
            write()
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise FileRejected(
                f"{self.archive}: member {name!r} clashes with another member of the same path",
                code="invalid_archive",
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                raise  # a full or unwritable disk is the server's problem, not the upload's
            raise FileRejected(
                f"{self.archive}: member {name!r} has a name this server cannot write ({error.strerror})",
                code="unsafe_archive_member",
            ) from None


class CappedReader:
    """A seekable binary file that raises `big_read` for any single read over `max_read` bytes and
    `past_end` (when given) for a position past `max_position`: the archive libraries read headers
    whole, so a hostile size is refused here instead of allocated."""

    def __init__(self, raw, *, max_read: int, big_read: FileRejected, max_position: int = 0,
                 past_end: FileRejected | None = None):
        self.raw, self.max_read, self.big_read = raw, max_read, big_read
        self.max_position, self.past_end = max_position, past_end
        self.last_read = b""

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # "the rest": allowed while the rest is small
            data = self.raw.read(self.max_read + 1)
            if len(data) > self.max_read:
                raise self.big_read
        elif n > self.max_read:
            raise self.big_read
        else:
            data = self.raw.read(n)
        self._check_position(self.raw.tell())
        self.last_read = data
        return data

    def _check_position(self, position: int) -> None:
        if self.past_end is not None and position > self.max_position:
            raise self.past_end

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self.raw.seek(offset, whence)
        self._check_position(position)
        return position

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return True


def _unpack_tar(path: Path, writer: _MemberWriter, limits: Limits) -> None:
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        reader = CappedReader(
            stream,
            max_read=CHUNK_BYTES,
            big_read=FileRejected(f"{path.name} holds a tar header over {readable_size(CHUNK_BYTES)} (a pax record "
                                  "or long name): not an archive of a model folder", code="invalid_archive"),
            # members' data, plus what tar adds around it: an archive that goes on past this is a bomb
            max_position=limits.max_unpacked_bytes + TAR_OVERHEAD_PER_MEMBER * (limits.max_members + 2),
            past_end=FileRejected(f"{path.name} unpacks to more than {readable_size(limits.max_unpacked_bytes)}, "
                                  "the limit", code="archive_too_large"),
        )
        try:
            # "r:" (not the streaming "r|"): tarfile then reads headers from `reader` directly
            with tarfile.open(fileobj=reader, mode="r:") as archive:
                for member in archive:
                    writer.count()
                    if member.isdir():
                        writer.directory(member.name)
                    elif member.isreg():
                        writer.file(member.name, archive.extractfile(member))
                    else:
                        raise writer.refuse(member.name, f"is {_tar_kind(member)}; {ONLY_FILES_AND_FOLDERS}")
            # tarfile ends quietly at a cut or garbled header; only a zero block is a real end
            if reader.last_read != bytes(tarfile.BLOCKSIZE):
                raise FileRejected(f"{path.name} is cut short or corrupt after byte {archive.offset}",
                                   code="invalid_archive")
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise FileRejected(f"{path.name} is not a readable tar archive: {error}", code="invalid_archive") from None


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a fifo"
    return f"an entry of tar type {member.type!r}"


def _unpack_zip(path: Path, writer: _MemberWriter, limits: Limits) -> None:
    with open(path, "rb") as raw:
        too_many = f"{path.name} holds more than {limits.max_members} entries, the limit"
        # zipfile reads the central directory whole: cap it at what max_members entries need
        directory_cap = max(CHUNK_BYTES, ZIP_DIRECTORY_BYTES_PER_MEMBER * limits.max_members)
        big_directory = FileRejected(f"{too_many} (its central directory is over {readable_size(directory_cap)})",
                                     code="too_many_members")
        reader = CappedReader(raw, max_read=directory_cap, big_read=big_directory)
        try:
            with zipfile.ZipFile(reader) as archive:
                members = archive.infolist()
                if len(members) > limits.max_members:
                    raise FileRejected(too_many, code="too_many_members")
                for info in members:
                    writer.count()
                    # the Unix file type, where the zip was made on Unix (Python's own writer leaves it 0)
                    file_type = stat.S_IFMT(info.external_attr >> 16)
                    if info.is_dir():
                        writer.directory(info.filename)
                        continue
                    if file_type and file_type != stat.S_IFREG:
                        kind = "a symbolic link" if file_type == stat.S_IFLNK else "a special file"
                        raise writer.refuse(info.filename, f"is {kind}; {ONLY_FILES_AND_FOLDERS}")
                    if info.flag_bits & 0x1:
                        raise FileRejected(f"{path.name}: member {info.filename!r} is encrypted",
                                           code="invalid_archive")
                    with archive.open(info) as data:
                        writer.file(info.filename, data)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error) as error:
            raise FileRejected(f"{path.name} is not a readable zip archive: {error}", code="invalid_archive") from None


def _flatten_single_folder(dest: Path) -> None:
    """`dest/model/config.json` -> `dest/config.json` when `model` is all the archive held."""
    entries = list(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    top = entries[0]
    taken = {child.name for child in top.iterdir()} | {top.name}
    staging = next(dest / f".unpacking-{i}" for i in range(len(taken) + 1) if f".unpacking-{i}" not in taken)
    top.rename(staging)  # so that a child named like `top` can move up
    for child in list(staging.iterdir()):
        child.rename(dest / child.name)
    staging.rmdir()
