"""Layout and packaging promises (README.md "Layout", docs/architecture.md)."""
import ast
import pathlib

import genfuse
import genfuse.kernels
import genfuse.runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_subpackages_map_to_the_top_level_folders():
    assert pathlib.Path(genfuse.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert pathlib.Path(genfuse.runtime.__file__).resolve().parent == ROOT / "runtime"


def test_extension_is_built_and_matches_the_package():
    from genfuse import _C

    assert _C.version() == genfuse.__version__
    assert _C.build_info()["cxx_standard"] >= 201703


def test_kernels_import_nothing_from_runtime():
    """Dependencies flow one way: facade -> runtime -> kernels."""
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert "runtime" not in name, f"{path.name} imports {name}"


def test_versions_agree():
    """pyproject.toml is the source; setup.py passes it to the extension, the facade repeats it."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == genfuse.__version__
