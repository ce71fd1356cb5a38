"""Build hook for the pybind11 extension genfuse._C (everything else is in pyproject.toml)."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "genfuse._C",
        sorted(glob("csrc/*.cpp")),
        cxx_std=17,
        define_macros=[("GENFUSE_VERSION", '"0.1.0"')],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
