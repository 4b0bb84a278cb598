"""Build fasthess._C: the C++ kernels always, the CUDA kernels when asked for or available.

Switches (environment variables):
  FASTHESS_CPU_ONLY=1  never build CUDA code.
  FASTHESS_CUDA=1      always build CUDA code (needs nvcc; fails loudly without it).
  neither              build CUDA code when torch is a CUDA build and a CUDA toolkit is found.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FASTHESS_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FASTHESS_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    args = {"cxx": cxx}
    macros = [("Py_LIMITED_API", "0x030A0000")]  # the Python floor of pyproject.toml: 3.10
    ext = CppExtension
    if cuda:
        sources += _sources("csrc/cuda/*.cu")
        args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        macros.append(("WITH_CUDA", None))
        ext = CUDAExtension
    return [ext("fasthess._C", sources, extra_compile_args=args, define_macros=macros,
                extra_link_args=["-fopenmp"], py_limited_api=True)]


setup(
    # The checkout keeps the runner in experiments/; it installs (the editable install too) as fasthess_experiments,
    # with the console script fasthess-experiments, so it neither collides with PyPI's `experiments` nor is shadowed
    # by a user's own experiments/ folder. Its one name: fasthess-experiments / python -m fasthess_experiments.
    packages=find_packages(include=["fasthess", "fasthess.*"]) + ["fasthess_experiments"],
    package_dir={"fasthess_experiments": "experiments"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
