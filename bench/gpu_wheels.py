"""Download into `.whl/` the wheels that `make gpu-check` needs on a GPU machine which has
torch with CUDA but none of this project's other dependencies, and no package registry.

Why a list is computed, not written down: the project's dependencies (pyproject.toml, plus
the test and benchmark extras) are followed through the requirements of what is installed
in the environment running this script, at the versions installed there (the versions the
suite is run with here); packages the GPU image already holds are dropped (and not
followed: that image is taken to be consistent), `GPU_IMAGE` below, from
/work/.library/device/KINDS.md. Run it with the project's venv:

    .venv/bin/python -m bench.gpu_wheels                 # → .whl/, for CPython 3.12 x86-64
    .venv/bin/python -m bench.gpu_wheels --list          # only print NAME==VERSION
    .venv/bin/python -m bench.gpu_wheels --python-version 3.11 --dest /tmp/w   # a local trial

`bench/gpu_check.py` installs them there with `pip install --no-index --target`.
The device tool carries at most 64 MiB with the working tree; this prints the total.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20
# What the GPU image ('cuda', nvidia-h200) holds, as KINDS.md listed it on 2026-11-17.
GPU_IMAGE = (
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal",
    "annotated-doc", "anyio", "attrs", "botorch", "build", "certifi", "charset-normalizer",
    "chex", "click", "cloudpickle", "cmake", "colorama", "contourpy", "coverage",
    "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit", "cupy-cuda13x",
    "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet",
    "filelock", "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec",
    "gpytorch", "grpcio", "h11", "h5py", "hf-xet", "httpcore", "httpx", "huggingface-hub",
    "humanize", "hypothesis", "idna", "imageio", "iniconfig", "interface-meta", "jax",
    "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib",
    "kiwisolver", "lazy-loader", "lightning", "lightning-utilities", "linear-operator",
    "lineax", "llvmlite", "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib",
    "mdurl", "meson", "ml-dtypes", "mpi4py", "mpmath", "msgpack", "multidict",
    "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx", "ninja",
    "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft",
    "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse",
    "nvidia-cusparselt-cu13", "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir", "onnxruntime", "onnxscript",
    "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx", "optimistix",
    "orbax-checkpoint", "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip",
    "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf", "psutil",
    "pyarrow", "pybind11", "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks",
    "pyre-extensions", "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock",
    "pytest-timeout", "pytest-xdist", "python-dateutil", "pytorch-lightning", "pyyaml",
    "regex", "requests", "rich", "sacrebleu", "safetensors", "scikit-build-core",
    "scikit-image", "scikit-learn", "scipy", "seaborn", "sentencepiece",
    "sentence-transformers", "setuptools", "shellingham", "simplejson", "six",
    "sortedcontainers", "statsmodels", "sympy", "tabulate", "tensorboard",
    "tensorboard-data-server", "tensorstore", "threadpoolctl", "tifffile", "tiktoken",
    "timm", "tokenizers", "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric",
    "torchmetrics", "torchvision", "tqdm", "transformers", "treescope", "triton", "typer",
    "typing-extensions", "typing-inspect", "urllib3", "uvloop", "wadler-lindig", "werkzeug",
    "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp",
)
# Carried although the image has them: a carried package needs a newer one than the image
# may hold (pydantic 2.14 needs typing-extensions >= 4.16).
CARRY_ANYWAY = {"typing-extensions"}
# Dev extras that gpu-check does not use (lint, schema fuzzing, the browser page test).
NOT_NEEDED = {"ruff", "schemathesis", "playwright", "torch"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> list[str]:
    """The project's runtime dependencies and its dev extras, less what gpu-check skips."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"].get("dev", [])]
    return [n for n in (norm(Requirement(r).name) for r in reqs) if n not in NOT_NEEDED]


def needed(python_version: str) -> dict[str, str]:
    """name → version (as installed here) of every package the GPU image lacks."""
    env: dict[str, str] = dict(default_environment())
    env |= {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "extra": ""}
    image = {norm(n) for n in GPU_IMAGE} - CARRY_ANYWAY
    out: dict[str, str] = {}

    def visit(name: str) -> None:
        n = norm(name)
        if n in out or n in image or n in NOT_NEEDED:
            return
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            raise SystemExit(f"{n} is not installed here: run `make install` first") from None
        out[n] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                visit(req.name)

    for r in roots():
        visit(r)
    return dict(sorted(out.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's (KINDS.md)")
    p.add_argument("--list", action="store_true", help="print the pins and stop")
    args = p.parse_args()
    pins = needed(args.python_version)
    for name, version in pins.items():
        print(f"{name}=={version}")
    if args.list:
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    keep = {norm(n) for n in pins}
    for old in args.dest.glob("*.whl"):          # one version of each: two stop the install
        name, version = old.name.split("-")[:2]
        if norm(name) not in keep or pins[norm(name)] != version.replace("_", "-"):
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp",
           *[a for plat in PLATFORMS for a in ("--platform", plat)],
           "-d", str(args.dest), *[f"{n}=={v}" for n, v in pins.items()]]
    subprocess.run(cmd, check=True)
    total = sum(f.stat().st_size for f in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.dest}"
          f" (the device tool carries at most {CARRY_LIMIT // 2**20} MiB with the tree)")
    if total > CARRY_LIMIT:
        raise SystemExit("too large to carry")


if __name__ == "__main__":
    main()
