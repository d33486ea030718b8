"""The files of one run, checked together before anything is read or written.

Inputs (the model, calibration data, --verify-inputs) must be regular files: a directory,
a FIFO (which would block the read), a device, a socket, a dangling symbolic link or a link
loop is refused in one line. Outputs (-o, --report, --report-html, analyze/bench --json) are
checked before the first one is written, so a bad report path never leaves a model behind:

- an output may not be (or reach, through symbolic or hard links: the same device and inode)
  an input file, one of the model's external data files, or another output;
- an output that exists must be a regular file; a FIFO, device node or socket (or a symbolic
  link to one) is refused, never replaced. A symbolic link to a regular file is written
  *through*: its target is replaced (atomically) and the link stays a link. A dangling link
  or a link loop is refused;
- a directory (an existing one, or any path ending in a slash) is refused: outputs are file
  names;
- the folder must be one (not a regular file), writable, and every name short enough for
  the file system, including the temporary names the atomic writers use beside it (checked
  by creating and removing an empty temporary file there; missing folders are not created
  until the run writes).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError

__all__ = ["check_input", "check_outputs", "input_identities", "model_file_identities", "OutputPath",
           "MODEL_TEMP_INFIX", "write_text_atomic", "remove_written_model"]

# the longest temporary name a writer puts beside a model output: model_io.save_model's data file
# `.<name>.<8 hex>.data.<8 random>.tmp` (reports: `.<name>.<8 random>.tmp`, see write_text_atomic)
MODEL_TEMP_INFIX = "01234567.data."

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _stat(path: Path, what: str) -> os.stat_result | None:
    """os.stat following links; None when nothing is there; a loop or a broken path: one line."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadInputError(f"{what} {path} is a symbolic link to a missing file ({os.readlink(path)})") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError(f"{what} {path}: symbolic link loop") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise BadInputError(f"{what} {path}: name too long for the file system") from None
        if exc.errno == errno.ENOTDIR:
            return None  # a parent is a regular file: reported by the caller
        raise BadInputError(f"{what} {path}: {exc.strerror or exc}") from None


def check_input(path: "str | os.PathLike", what: str = "model") -> Path:
    """`path` as a Path once it is known to be a regular file (following links); else one line."""
    p = Path(path)
    st = _stat(p, what)
    if st is None:
        raise BadInputError(f"{p}: no such file" if what == "model" else f"{what} {p}: no such file")
    if stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"{p}: is a directory, expected an .onnx file" if what == "model"
                            else f"{what} {p} is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file")
    return p


def _identity(path: "str | os.PathLike") -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def model_file_identities(path: "str | os.PathLike") -> dict[tuple[int, int], str]:
    """{(device, inode): label} of a model file and the external data files it names (read from
    the graph alone; a file that cannot be parsed contributes only itself: the loader reports it)."""
    out = {}
    ident = _identity(path)
    if ident is None:
        return out
    out[ident] = f"the input {path}"
    try:
        if os.path.getsize(path) > 1 << 28:  # a graph this large holds its weights inline
            return out
        import onnx
        from onnx import external_data_helper

        model = onnx.load(os.fspath(path), load_external_data=False)
        base = Path(path).resolve().parent
        for t in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(t):
                loc = next((e.value for e in t.external_data if e.key == "location"), "")
                ident = _identity(base / loc) if loc else None
                if ident is not None:
                    out.setdefault(ident, f"the input's external data file {loc}")
    except Exception:  # noqa: BLE001 - any parse failure: the loader says what is wrong
        pass
    return out


def input_identities(model: "str | os.PathLike | None" = None, *others: "str | os.PathLike | None"
                     ) -> dict[tuple[int, int], str]:
    """{(device, inode): label} of every input of a run: the model with its data files, and other
    input files (calibration data, --verify-inputs); folders of images count file by file."""
    out = model_file_identities(model) if model is not None else {}
    for other in others:
        if other is None:
            continue
        p = Path(other)
        if p.is_dir():
            for f in p.rglob("*"):
                ident = _identity(f)
                if ident is not None and f.is_file():
                    out.setdefault(ident, f"the input {f}")
        else:
            ident = _identity(p)
            if ident is not None:
                out.setdefault(ident, f"the input {p}")
    return out


@dataclass(frozen=True)
class OutputPath:
    flag: str  # how the user named it: "-o", "--report", ...
    given: str  # as given
    path: Path  # where to write: `given`, or a symbolic link's regular-file target


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    p = path.parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_folder(out: Path, flag: str, infix: str) -> None:
    """The folder `out` goes into: a folder (or one that can be created) we may write in, and names
    that fit the file system, the temporary name `.<name>.<infix><8 random>.tmp` written first included."""
    out = Path(os.path.abspath(out))
    anc = _existing_ancestor(out)
    st = _stat(anc, flag)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"{flag} {out}: {anc} is not a folder")
    limit = _name_max(anc)
    temp_extra = len(f"..{infix}01234567.tmp")
    for part in out.relative_to(anc).parts:
        room = temp_extra if part == out.name else 0
        if len(os.fsencode(part)) + room > limit:
            tail = ", leaving room for the temporary name written first" if room else ""
            raise BadInputError(f"{flag} {out}: name too long for the file system ({len(part)} characters; "
                                f"at most {limit - room} here{tail})")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BadInputError(f"{flag} {out}: cannot write in {anc} (permission denied)")
    if anc == out.parent:  # the folder exists: create (and remove) the temporary name the writer will use
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.{infix}", suffix=".tmp", dir=anc)
        except OSError as exc:
            what = "name too long for the file system" if exc.errno == errno.ENAMETOOLONG else (exc.strerror or exc)
            raise BadInputError(f"{flag} {out}: cannot write there: {what}") from None
        os.close(fd)
        os.unlink(probe)


def _physical(path: Path) -> Path:
    """Where writing `path` will land: the existing part resolved (symbolic links followed, so a link
    to a regular file is written through), the part still missing (folders the writer creates)
    normalised, so `missing/../model.onnx` is seen as the `model.onnx` it is."""
    path = Path(os.path.abspath(os.path.join(os.getcwd(), os.fspath(path)))) if not path.is_absolute() else path
    anc, rest = path, []
    while not os.path.lexists(anc) and anc != anc.parent:
        rest.insert(0, anc.name)
        anc = anc.parent
    base = Path(os.path.realpath(anc))
    return Path(os.path.normpath(base.joinpath(*rest))) if rest else base


def _resolve_output(flag: str, given: str) -> OutputPath:
    if not given:
        raise BadInputError(f"{flag}: empty file name")
    if given.endswith(("/", os.sep)) or Path(given).name in ("", ".", ".."):
        raise BadInputError(f"{flag} {given} names a directory; give a file name such as "
                            f"{given.rstrip('/' + os.sep) or '.'}/{'model.pruned.onnx' if flag == '-o' else 'report'}")
    p = Path(given)
    _stat(p, flag)  # a dangling link or a link loop: refused here
    target = _physical(p)
    st = _stat(target, flag)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise BadInputError(f"{flag} {given} is a directory; give a file name such as {p / 'name'}")
        if not stat.S_ISREG(st.st_mode):
            link = " (through a symbolic link)" if p.is_symlink() else ""
            raise BadInputError(f"{flag} {given} is {_kind(st.st_mode)}{link}, not a regular file; graphprune writes "
                                f"regular files only")
    return OutputPath(flag, given, target)


def check_outputs(outputs: "list[tuple[str, str | os.PathLike | None]]",
                  inputs: "dict[tuple[int, int], str] | None" = None, *, model_flag: str = "-o"
                  ) -> dict[str, OutputPath]:
    """Check every output of a run before anything is written; returns {flag: OutputPath} for
    those given (None values skipped). `inputs` is :func:`input_identities`' map. The output
    named `model_flag` gets room for the model's data-file temporary names."""
    inputs = inputs or {}
    checked: dict[str, OutputPath] = {}
    seen: dict[str, str] = {}  # resolved path -> flag
    for flag, given in outputs:
        if given is None:
            continue
        o = _resolve_output(flag, os.fspath(given))
        ident = _identity(o.path)
        if ident is not None and ident in inputs:
            raise BadInputError(f"{flag} {o.given} is {inputs[ident]}; choose another file (inputs are never "
                                f"overwritten)")
        real = os.path.realpath(o.path)
        if real in seen:
            raise BadInputError(f"{seen[real]} and {flag} are the same file ({o.given}); give each output its "
                                f"own name")
        for other in checked.values():
            if ident is not None and _identity(other.path) == ident:
                raise BadInputError(f"{other.flag} and {flag} are the same file ({o.given}); give each output its "
                                    f"own name")
        _check_folder(o.path, flag, MODEL_TEMP_INFIX if flag == model_flag else "")
        seen[real] = flag
        checked[flag] = o
    return checked


def write_text_atomic(path: "str | os.PathLike", text: str, flag: str = "") -> Path:
    """Write a report: a fresh temporary file beside `path` (a unique name, so two writers never share
    one), fsync'd, then a rename (a reader sees the old file or the new one, never a part); on any
    failure the temporary file is removed. Missing folders are created. OSError: one-line BadInputError."""
    path = Path(path)
    label = f"{flag} {path}" if flag else str(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise BadInputError(f"cannot write {label}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def remove_written_model(path: "str | os.PathLike") -> None:
    """Take back a model this run has just written (a later step failed): the graph file and the
    data file(s) it names (`<name>.<token>.data`, fresh names the writer chose, so nothing else
    can be using them)."""
    import re

    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{8}\.data")
    data = []
    try:
        import onnx
        from onnx import external_data_helper

        model = onnx.load(os.fspath(path), load_external_data=False)
        for t in external_data_helper._get_all_tensors(model):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if pattern.fullmatch(loc):
                data.append(path.parent / loc)
    except Exception:  # noqa: BLE001 - unreadable: remove the graph file alone
        pass
    for f in [path, *dict.fromkeys(data)]:
        with contextlib.suppress(OSError):
            f.unlink()
