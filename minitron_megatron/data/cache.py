"""Cache directory, inter-process locks and atomic publishing of built files.

Several ranks or pytest workers may ask for the same artefact at once: one takes
an exclusive `flock`, builds into a temporary name and renames it into place;
the others block on the lock and then find the finished result. Only the final
name counts as complete, so a crash leaves at most a temporary that the next
builder (holding the lock) removes.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from minitron_megatron.errors import ConfigError

DEFAULT_CACHE_DIR = "~/.cache/minitron_megatron"
TMP_PREFIX = ".tmp-"


def resolve_cache_dir(cache_dir: Optional[str]) -> Path:
    """`cache_dir`, else $MINITRON_CACHE, else ~/.cache/minitron_megatron (created)."""
    chosen = cache_dir or os.environ.get("MINITRON_CACHE") or DEFAULT_CACHE_DIR
    path = Path(chosen).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"data.cache_dir={chosen}: cannot create it ({error.strerror}); "
                          "set data.cache_dir or $MINITRON_CACHE to a writable directory") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"data.cache_dir={chosen}: not writable; set data.cache_dir or "
                          "$MINITRON_CACHE to a writable directory")
    return path


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (blocking) for the `with` body."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temporaries of `name` left by crashed builders. Call with the lock held."""
    for stale in parent.glob(f"{TMP_PREFIX}{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `final` when the body succeeds.

    Call with the lock for `final` held: the rename is atomic and `final` must not
    exist yet. On error the temporary is removed and `final` is left untouched.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_indexed_files(tmp_prefix: str, prefix: str) -> None:
    """Move `tmp_prefix.{bin,idx}` onto `prefix.{bin,idx}`; the .idx lands last.

    An old .idx is removed first, so a crash between the two renames leaves a
    prefix without an .idx (visibly incomplete) rather than a mismatched pair.
    """
    with contextlib.suppress(FileNotFoundError):
        os.remove(prefix + ".idx")
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")
