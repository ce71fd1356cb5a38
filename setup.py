"""Build hook for the pybind11 extension genfuse._C (everything else is in pyproject.toml)."""
import tomllib
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

with open("pyproject.toml", "rb") as f:
    VERSION = tomllib.load(f)["project"]["version"]

ext_modules = [
    Pybind11Extension(
        "genfuse._C",
        sorted(glob("csrc/*.cpp")),
        cxx_std=17,
        # float32 results must not depend on whether the compiler fuses a * b + c.
        extra_compile_args=["-O3", "-ffp-contract=off"],
        define_macros=[("GENFUSE_VERSION", f'"{VERSION}"')],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
