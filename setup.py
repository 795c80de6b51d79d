"""Builds fastres's Cython extension; everything else is in pyproject.toml.

OpenMP is passed at compile and link time: without ``-fopenmp`` Cython's
``prange`` compiles to a serial loop and nothing says so.
"""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastres.kernels._im2col",
        ["kernels/_im2col.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3))
