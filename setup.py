"""Build shortrt: the Python package plus the C++ extension shortrt._C (via CMake)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, placing _C next to the package."""

    def build_extension(self, ext):
        import pybind11

        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        # Example programs go beside the package: in the source tree for an editable install
        # (setuptools copies only the extension itself out of its temporary build dir).
        editable = getattr(self, "editable_mode", False) or self.inplace or ext_dir == ROOT / "shortrt"
        examples_dir = (ROOT / "shortrt" / "bin") if editable else (ext_dir / "bin")
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DSHORTRT_EXAMPLES_DIR={examples_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DSHORTRT_PYTHON=ON",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    name="shortrt",
    version="0.1.0",
    description="Depth-pruned LLMs on a lean C++ runtime: measure layer redundancy, remove it, run faster",
    python_requires=">=3.10",
    packages=["shortrt", "shortrt.commands", "shortrt.kernels"],
    ext_modules=[CMakeExtension("shortrt._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch==2.13.0",
        "transformers>=5,<6",
        "safetensors==0.8.0",  # the differential tests hold the C++ reader to this version's verdicts
        "tokenizers",
        "gguf",
        "accelerate",
        "numpy",
        "tqdm",
        "matplotlib",
        "pyarrow",
        "fastapi>=0.110",  # shortrt serve
        "uvicorn>=0.29",
    ],
    extras_require={"triton": ["triton==3.9.*"], "lm-eval": ["lm-eval==0.4.13"],  # shortrt lm-eval
                    "test": ["pytest", "openai>=1.0", "httpx>=0.27", "lm-eval==0.4.13"]},
    entry_points={"console_scripts": ["shortrt=shortrt.cli:main"]},
)
