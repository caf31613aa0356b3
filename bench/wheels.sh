#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with Python 3.12 manylinux x86-64 wheels of exactly the packages the benchmark
# GPU machine lacks for `import minisd`, the CUDA tests and the benches; bench/gpu.sh installs them there
# without network. Run it where pip reaches PyPI:
#
#   bash bench/wheels.sh
#
# Then it checks, recursively, that every requirement of minisd (setup.py, the `test` extra included) and of
# each wheel is either on the GPU machine (bench/gpu_packages.txt), among the wheels or named in NOT_CARRIED,
# that versions known on both sides agree, and that no package comes twice; it fails naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned to versions that work with the machine's huggingface-hub 1.33, transformers 5.17, safetensors 0.8.
WHEELS=(
    ftfy==6.3.1                 # minisd's tokenizer
    wcwidth==0.9.4              # ftfy
    open-clip-torch==3.3.0      # ships the CLIP BPE vocabulary minisd's tokenizer reads; CLIP score
    diffusers==0.42.1           # reference pipelines of the tests and benches
    importlib-metadata==8.7.0   # diffusers
    pytorch-fid==0.3.0          # bench/fid.py's reference
    pydicom==3.0.2              # minisd's DICOM reader
)
# Test-only references that neither the CUDA tests nor the benches use (tens of MiB each): not carried.
export NOT_CARRIED="pydicom-data torchxrayvision"

PY=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

"$PY" - <<'EOF'
import ast
import os
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MACHINE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

image = {}
for line in Path("bench/gpu_packages.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        name, _, version = line.strip().partition("==")
        image[canonicalize_name(name)] = version or None

wheels, needs = {}, []
for path in sorted(Path(".whl").glob("*.whl")):
    name, version = path.name.split("-")[:2]
    name = canonicalize_name(name)
    if name in wheels:
        sys.exit(f"error: two wheels of {name} in .whl/")
    wheels[name] = version
    with zipfile.ZipFile(path) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(metadata).decode()
    needs += [(line.split(":", 1)[1].strip(), path.name) for line in text.splitlines()
              if line.startswith("Requires-Dist:")]

setup = ast.parse(Path("setup.py").read_text())
call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
needs += [(r, "setup.py") for r in keywords.get("install_requires", []) + keywords.get("extras_require", {}).get("test", [])]

not_carried = {canonicalize_name(name) for name in os.environ["NOT_CARRIED"].split()}
problems, unchecked = [], {}
for text, who in needs:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate(MACHINE):
        continue
    name = canonicalize_name(req.name)
    if name in not_carried:
        continue
    version = wheels.get(name, image.get(name))
    if name not in wheels and name not in image:
        problems.append(f"{req} (required by {who}) is neither on the GPU machine nor among the wheels")
    elif version is None:
        unchecked.setdefault(name, set()).add(str(req.specifier) or "any version")
    elif not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req} (required by {who}) but {name} {version} is there")
if unchecked:
    print("on the GPU machine, version not recorded (not checked): " +
          ", ".join(f"{name} ({' and '.join(sorted(asks))})" for name, asks in sorted(unchecked.items())))
for line in problems:
    print("error:", line, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"ok: {len(wheels)} wheels ({', '.join(f'{n} {v}' for n, v in wheels.items())}) complete the GPU machine; "
      f"not carried: {', '.join(sorted(not_carried))}")
EOF
du -sh .whl
