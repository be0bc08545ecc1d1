"""Files that survive a crash: each is written to a temporary file, flushed to disk and renamed over the old one
(`atomic_write`); a safetensors file carries the sha256 of its tensors in its metadata (`atomic_save`), checked when
it is read (`verify_checksum`); what a killed save left is removed (`remove_stale_temporaries`)."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable

import torch

from utils import UserError

CHECKSUM = "sha256"  # the metadata key of the tensors' checksum, in every safetensors file written here
TEMPORARY = ".tmp"  # a file is written to path + TEMPORARY, then renamed
# safetensors itself writes each file to a hidden `.tmp` + 6 random letters or digits beside it, then renames it
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (about 1 s per GB on one core)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_unverified: set[str] = set()  # files without a checksum this process already warned about


def verify_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> None:
    """Check the tensors read from the safetensors file `path` against the checksum saved in its metadata: a
    mismatch is a one-line UserError naming the file; a file written before checksums existed gets one warning."""
    if CHECKSUM not in metadata:
        if str(path) not in _unverified:
            _unverified.add(str(path))
            print(f"warning: {path} has no checksum (written before checksums were added): its tensors are not "
                  "verified; saving it again adds one", file=sys.stderr)  # fmt: skip
        return
    if tensor_checksum(tensors) != metadata[CHECKSUM]:
        raise UserError(
            f"{path} is corrupted: its tensors do not match the sha256 saved with them; restore it from a copy, "
            "download it again or train anew"
        )


def remove_stale_temporaries(folder: str, names: Iterable[str], owned: bool = False) -> None:
    """Remove the temporary files killed saves left in `folder` (a save of the full state leaves up to 1.3 GB):
    `NAME.tmp` of each of `names` and, where this process `owned` the folder (it holds the run's lock, so no other
    process writes there), safetensors' own hidden temporaries, whose names do not say which file they were."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name + TEMPORARY))
    if owned:
        for entry in os.scandir(folder):
            if SAFETENSORS_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)


def atomic_write(path: str, write: Callable[[str], None], size: int) -> None:
    """`write(temporary)`, flush it to disk, then rename it to `path`: a crash mid-write leaves the old file intact.

    The temporary file is removed on every failure; a full disk or another OSError is a one-line UserError naming
    the path and the space needed (`size`, the bytes to write)."""
    from safetensors import SafetensorError

    folder, temporary = os.path.dirname(path) or ".", path + TEMPORARY
    try:
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if not isinstance(error, (OSError, SafetensorError)):
            raise
        reason = " ".join(str(error).split())  # one line
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB are free there"
        except OSError:
            free = "the free space there is unknown"
        kept = f"the previous {os.path.basename(path)} is untouched" if os.path.exists(path) else "nothing was written"
        raise UserError(
            f"could not write {path} ({reason}): it needs about {size / 1e6:,.1f} MB and {free}; {kept}; free some "
            "space, then --resume from the last checkpoint written, if any"
        ) from None


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (`atomic_write`), with the checksum of its tensors in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM: tensor_checksum(tensors)}
    size = sum(v.numel() * v.element_size() for v in tensors.values()) + len(json.dumps(metadata)) + 100 * len(tensors)
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata), size)


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (`atomic_write`)."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            f.write(text)

    atomic_write(path, write, len(text))
