"""Training checkpoints: the whole state of a resumable run (the sampler), with large buffers
streamed in as attachments."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bayestune.files.base import (
    FileFormatError,
    PathLike,
    atomic_output,
)

# --- training checkpoint: whole state of a resumable run (sampler, fine-tuning) -------------
# Large raw arrays can ride along as attachments: torch.save writes a zip archive whose records
# all sit in one folder and whose reader skips records it does not know, so an attachment is
# one more record there, stored uncompressed and streamed in and out (never whole in memory).
ATTACHMENT_FOLDER = "bayestune_attachments"
AttachmentWriter = Callable[[BinaryIO], None]


def save_checkpoint(path: PathLike, state: Mapping[str, Any],
                    attachments: Mapping[str, AttachmentWriter] | None = None) -> None:
    """Write ``state``; each attachment's writer streams its raw bytes into the same file."""
    with atomic_output(path) as tmp:
        torch.save(dict(state), tmp)
        if attachments:
            with zipfile.ZipFile(tmp, "a") as archive:
                folder = _archive_folder(archive)
                for name, write in attachments.items():
                    with archive.open(f"{folder}/{ATTACHMENT_FOLDER}/{name}", "w",
                                      force_zip64=True) as out:
                        write(out)


@contextmanager
def open_checkpoint_attachment(path: PathLike, name: str) -> Iterator[BinaryIO]:
    """A stream of the raw bytes attached under ``name`` (its CRC is checked at the end)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise FileFormatError(f"{path}: unreadable checkpoint ({err}); delete it to start "
                              "over") from err
    with archive:
        record = f"{_archive_folder(archive)}/{ATTACHMENT_FOLDER}/{name}"
        if record not in archive.namelist():
            raise FileFormatError(f"{path}: checkpoint has no attachment {name!r}; it was "
                                  "written by another version, delete it to start over")
        with archive.open(record) as stream:
            try:
                yield stream
            except zipfile.BadZipFile as err:  # a CRC mismatch shows at the end of the stream
                raise FileFormatError(f"{path}: attachment {name!r} is corrupt ({err}); delete "
                                      "the checkpoint to start over") from err


def _archive_folder(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].split("/", 1)[0]


def load_checkpoint(path: PathLike) -> dict[str, Any] | None:
    """Return the saved state, or None when there is no checkpoint to resume from."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch's is long
        raise FileFormatError(
            f"{path}: unreadable checkpoint ({first}); delete it to start over") from err
