"""GPU profiles: what `pagedlab profile` measured on one card for one model shape, as JSON in data/profiles/.

A profile holds the raw measurements (decode steps over batch x context, prefill chunks over cached prefixes,
mixed steps, the host's time per step, block moves) and where they were taken (card, driver, versions, engine
configuration, model shape). `sim/profiled_cost.py` turns one into a cost model. Shipped profiles are named
`<card>-<model shape>.json`, e.g. `h200-llama-3.2-1b.json`; `SimConfig(profile=...)` takes such a name or a path.
"""
from __future__ import annotations

import json
from pathlib import Path

from pagedlab.sim.cost_model import ModelShape

PROFILE_DIR = Path(__file__).resolve().parents[2] / "data" / "profiles"
FORMAT = "pagedlab-profile/1"


def shipped_profiles() -> dict[str, Path]:
    """The profiles in data/profiles/, keyed by file stem ("h200-llama-3.2-1b")."""
    return {path.stem: path for path in sorted(PROFILE_DIR.glob("*.json"))}


def profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile's name, or a path to a profile JSON; a clear error naming the shipped ones otherwise."""
    shipped = shipped_profiles()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise FileNotFoundError(f"no profile {str(name_or_path)!r}: give a path to a profile JSON (pagedlab profile "
                            f"writes one) or a shipped profile's name: {', '.join(shipped) or 'none shipped'}")


def load_profile(name_or_path: str | Path | dict) -> dict:
    """A profile as a dict (a dict is returned as it is), checked to be one."""
    if isinstance(name_or_path, dict):
        profile = name_or_path
    else:
        path = profile_path(name_or_path)
        with open(path) as f:
            profile = json.load(f)
        profile.setdefault("name", path.stem)
    if profile.get("format") != FORMAT:
        raise ValueError(f"not a pagedlab profile (format {profile.get('format')!r}, expected {FORMAT!r})")
    return profile


def profile_shape(profile: dict) -> ModelShape:
    m = profile["model"]
    return ModelShape(m["name"], m["num_params"], m["num_layers"], m["hidden_size"], m["num_kv_heads"], m["head_dim"],
                      m["dtype_bytes"])


def profile_label(profile: dict) -> str:
    """One line saying what the profile describes: "NVIDIA H200, llama-3.2-1b (bfloat16), profile h200-llama-3.2-1b"."""
    return (f"{profile['card']['name']}, {profile['model']['name']} ({profile['engine']['dtype']}), "
            f"profile {profile.get('name', '?')}")
