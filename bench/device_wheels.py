"""Fetch, here, the wheels a bare GPU machine lacks to run bench/bench_gpu.py, into .whl/ (git-ignored).

    python bench/device_wheels.py            # about 40 MB: diffusers, mlflow, hydra, optuna, fastapi and their needs

The lent GPU machines (the `device` tool) run Python 3.12 with torch, transformers, peft, accelerate,
pandas, pytest and more, but not diffusers, mlflow or hydra, and they cannot reach the internet. This
walks lora-sweep's requirements as installed here, leaves out what that image already has
(DEVICE_HAS, from the tool's package list), and downloads the rest for CPython 3.12 on x86-64 without
their own dependencies (pinned at the versions installed here); a package published only as source is
built into a wheel here. Then, on the machine, with `.whl` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/bench_gpu.py --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The device image's packages that lora-sweep's requirements reach (the full list: the device tool's KINDS.md).
DEVICE_HAS = """accelerate aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle contourpy cycler filelock fonttools frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2
joblib kiwisolver markdown-it-py markupsafe matplotlib mdurl mpmath multidict narwhals networkx numpy packaging pandas
peft pillow propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors
scikit-learn scipy setuptools shellingham six sympy threadpoolctl tokenizers torch tqdm transformers typer
typing-extensions urllib3 werkzeug yarl zipp"""
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def missing_on_device(root: str = "lora-sweep") -> dict[str, str]:
    """Every distribution `root` needs (as installed here, no extras) that the device image does not have."""
    has = {canonicalize_name(name) for name in DEVICE_HAS.split()}
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here, so its version is unknown: run `pip install -e .` first")
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(requirement.name)
    return {name: version for name, version in sorted(found.items()) if name not in has and name != canonicalize_name(root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / ".whl"))
    args = parser.parse_args()
    pins = [f"{name}=={version}" for name, version in missing_on_device().items()]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    pip = [sys.executable, "-m", "pip"]
    binary = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    source_only = []
    for pin in pins:
        if subprocess.run([*binary, *platforms, "-d", args.dest, pin], capture_output=True).returncode != 0:
            source_only.append(pin)
    for pin in source_only:  # pure-Python packages published as source only (antlr4-python3-runtime 4.9.3)
        built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", args.dest, pin], capture_output=True, text=True)
        if built.returncode != 0:
            error = (built.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"{pin}: no wheel for CPython 3.12 on x86-64 could be downloaded or built ({error}); is the package index reachable?")
    wheels = sorted(Path(args.dest).glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.0f} MB in {args.dest} ({len(source_only)} built from source: {', '.join(source_only) or 'none'})")


if __name__ == "__main__":
    main()
