"""Every file format of the project, written in one place and read in one place.

Tensor files are safetensors; their run information is JSON stored under the metadata key
``bayestune`` (safetensors metadata only holds strings). Every writer goes through
:func:`atomic_output`, so a killed job never leaves a half-written file behind. Every tensor
file, and each JSON record given one, carries a provenance record under ``provenance``
(:mod:`bayestune.provenance`: code, lock, software, config, device); callers that know the
command, its settings and the device pass it, the rest get the code and software part.

The formats, one module each: ``base`` (atomic writes, safetensors metadata, JSON and CSV),
``tensors`` (scales, chain diagnostics, scores, model weights, token caches), ``sparse``
(masks and deltas) and ``checkpoint`` (resumable training state). Every name is re-exported
here, and callers use them through this package (``files.save_mask``), so a test may replace
one.
"""

from bayestune.errors import MissingFileError  # noqa: F401 (files.MissingFileError)
from bayestune.files.base import (  # noqa: F401
    METADATA_KEY,
    PROVENANCE_KEY,
    STALE_TEMPORARY_SECONDS,
    FileFormatError,
    PathLike,
    Provenance,
    Tensors,
    _load_tensors,
    _save_tensors,
    _temporary_is_dead,
    _writer,
    append_csv_row,
    atomic_output,
    check_matches_model,
    read_csv_table,
    read_json,
    remove_output,
    remove_stale_temporaries,
    replace_folder,
    write_json,
)
from bayestune.files.checkpoint import (  # noqa: F401
    ATTACHMENT_FOLDER,
    AttachmentWriter,
    _archive_folder,
    load_checkpoint,
    open_checkpoint_attachment,
    save_checkpoint,
)
from bayestune.files.sparse import (  # noqa: F401
    _INDEX_DTYPES,
    DELTA_FORMAT,
    MASK_FORMAT,
    _decode_mask,
    _format_version,
    _index_bytes,
    _itemsize,
    _packed_bytes,
    delta_entry_bytes,
    delta_is_dense,
    index_dtype,
    load_delta,
    load_mask,
    mask_entry_bytes,
    save_delta,
    save_mask,
)
from bayestune.files.tensors import (  # noqa: F401
    DIAGNOSTICS_FORMAT,
    diagnostics_paths,
    load_diagnostics,
    load_model_state,
    load_scales,
    load_scores,
    load_token_cache,
    load_traces,
    save_diagnostics,
    save_model_state,
    save_scales,
    save_scores,
    save_token_cache,
    save_traces,
)
