"""Writing files safely: through a temporary file and a rename, with the mode the umask gives any new file,
and a failed write (a full disk, no permission) reported as one error naming the file."""
import contextlib
import errno
import json
import math
import os
import re
import shutil

from .errors import MinisdError

# Temporary names: ours are `<name>.tmp<pid>[suffix]`, safetensors' own are hidden `.tmpXXXXXX` files.
TEMPORARY = re.compile(r"(.+\.tmp\d*(\.\w+)?|\.tmp\w{6})")


def new_file_mode():
    """0o666 less the umask: the mode open() gives a new file (temporary-file helpers give 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_error(path, error):
    """One error naming `path` for a failed write; a full disk is said as such, whatever raised it
    (torch.save reports one as a RuntimeError without the OS error)."""
    from .checkpoint.files import first_line
    folder = os.path.dirname(os.path.abspath(path))
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    if getattr(error, "errno", None) == errno.ENOSPC or full:
        reason = "no space left on the device"
    else:
        reason = getattr(error, "strerror", None) or first_line(error)
    return MinisdError(f"{path}: cannot write ({reason})")


def atomic_write(path, write, suffix="", errors=()):
    """Call `write(temporary path)`, then rename the file into place at `path` with the umask's mode. On
    failure nothing is left behind and the error names `path`; `errors` are more exception types to catch."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError, *errors) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(path, e) from None


def json_text(data, indent=2):
    """Standard JSON (which has no NaN or Infinity) and a newline: a non-finite number, such as the PSNR of
    identical images, is written as null. `indent` None: one line (a JSON Lines record)."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(data), indent=indent, allow_nan=False) + "\n"


def atomic_text(text, path):
    """Write a text file through a temporary file and a rename (the folder must exist)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_json(data, path):
    atomic_text(json_text(data), path)


def remove_temporary_files(folder):
    """Delete the temporary files and folders that interrupted writes left in `folder` (and below), and put back
    a folder that atomic_folder had moved aside; returns how many were removed."""
    removed = 0
    for parent, folders, names in os.walk(folder):
        for name in list(folders):
            if TEMPORARY.fullmatch(name):
                folders.remove(name)
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                removed += 1
            elif name.endswith(PREVIOUS):   # the old folder of a replacement: kept where the new one is missing
                folders.remove(name)
                original = os.path.join(parent, name[:-len(PREVIOUS)])
                if os.path.isdir(original):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                else:
                    os.replace(os.path.join(parent, name), original)
        for name in names:
            if TEMPORARY.fullmatch(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(parent, name))
                    removed += 1
    return removed


PREVIOUS = ".previous"   # a folder being replaced by atomic_folder, until its replacement is in place


def atomic_folder(path, write):
    """Call `write(temporary folder)`, then put that folder in place at `path`. The folder it replaces is moved
    aside first and deleted last: after a crash at any point remove_temporary_files leaves `path` whole, the
    old or the new one."""
    path = os.fspath(path)
    tmp, previous = f"{path}.tmp{os.getpid()}", path + PREVIOUS
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if os.path.isdir(path):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    shutil.rmtree(previous, ignore_errors=True)


def clear_outputs(folder, patterns):
    """Delete what an earlier call wrote into `folder` (files matching the glob `patterns`), so that a
    failed call leaves nothing that a later one could take for its own."""
    import glob
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), pattern)):
            if os.path.isfile(path):
                os.remove(path)
