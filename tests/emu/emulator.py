"""Builds the CUDA emulator (tests/emu) with the machine's C++ compiler and runs the CUDA layer code
(csrc/kernels) under it on tensors from torch. Used by tests/test_emulator.py and tests/emu/mutate.py.

Builds are cached under $FASTLSTM_EMU_CACHE (default ~/.cache/fastlstm-emu) by a hash of every source,
the flags and the compiler's version. FASTLSTM_EMU_KERNELS points the build at another copy of
csrc/kernels (the mutation check uses it)."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import torch

EMU = Path(__file__).resolve().parent
ROOT = EMU.parent.parent
CXX = os.environ.get("CXX", "g++")

COMMON = ["-std=c++17", "-fno-strict-aliasing", "-DFASTLSTM_EMULATION", "-Wall", "-Wno-unknown-pragmas"]
# sm80: the code path compiled for the GPUs the project targets (mma.sync for 16-bit types).
# fma: no tensor cores (16-bit types through the FMA path; never compiled for a real GPU today).
# asan: sm80 under AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first report;
#   unoptimised, which builds in half the time and keeps every access the source makes.
# O0: sm80 unoptimised (the mutation check, tests/emu/mutate.py, builds once per planted bug).
VARIANTS = {
    "sm80": ["-O2", "-D__CUDA_ARCH__=800"],
    "fma": ["-O2"],
    "asan": ["-O0", "-g", "-D__CUDA_ARCH__=800", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "O0": ["-O0", "-D__CUDA_ARCH__=800"],
}

DTYPE_CODE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def kernels_dir() -> Path:
    return Path(os.environ.get("FASTLSTM_EMU_KERNELS", ROOT / "csrc" / "kernels")).resolve()


def _sources(kdir: Path):
    # This file too: it is the build recipe.
    emu = (sorted(EMU.glob("*.cpp")) + sorted(EMU.glob("*.h")) + sorted((EMU / "include").glob("*.h"))
           + [Path(__file__).resolve()])
    kernels = sorted(kdir.glob("*.cu")) + sorted(kdir.glob("*.cuh")) + sorted(kdir.glob("*.h"))
    return emu, kernels


def build(variant: str = "sm80", objects: Path | None = None) -> Path:
    """Path of the driver binary for `variant`, compiled now unless a build of the same sources,
    flags and compiler is cached. `objects`: a directory of compiled units to reuse and add to
    (see compile_into)."""
    kdir = kernels_dir()
    emu_src, kernel_src = _sources(kdir)
    flags = COMMON + VARIANTS[variant]
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for part in [version, " ".join(flags)]:
        h.update(part.encode())
    for p in emu_src + kernel_src:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    cache = Path(os.environ.get("FASTLSTM_EMU_CACHE", Path.home() / ".cache" / "fastlstm-emu"))
    exe = cache / f"driver-{variant}-{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.replace(compile_into(Path(tmp), flags, objects), exe)
    # Keep the newest few builds of each variant (other checkouts share the cache).
    old = sorted(cache.glob(f"driver-{variant}-" + "?" * 16), key=lambda p: p.stat().st_mtime,
                 reverse=True)
    for p in old[4:]:
        p.unlink(missing_ok=True)
    return exe


def compile_into(out: Path, flags: list, objects: Path | None = None) -> Path:
    """Compiles the emulator and the kernels of kernels_dir() with `flags` into the directory `out`
    (objects, and .gcno notes for coverage builds, stay there); returns the driver's path.
    `objects`: reuse a unit compiled before into that directory when its preprocessed source and the
    flags are the same (the mutation check changes one kernel file at a time)."""
    kdir = kernels_dir()
    # The kernels' own directory goes first so that the mutation check's copy is what compiles;
    # "kernels/lstm_host.h" (driver.cpp) resolves through a directory that holds it as kernels/.
    (out / "kernels").symlink_to(kdir)
    inc = [f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{out}"]
    # Every .cu file: a new kernel file is emulated (and must compile as C++) without a change here.
    units = [(EMU / "runtime.cpp", []), (EMU / "driver.cpp", [])] + [
        (out / "kernels" / p.name, ["-x", "c++"]) for p in sorted(kdir.glob("*.cu"))]
    keys = [None] * len(units)
    if objects is not None:
        objects.mkdir(parents=True, exist_ok=True)
        # -P: no line markers, so the temporary directory's name does not enter the key.
        pre = [subprocess.Popen([CXX, *flags, *inc, *lang, "-E", "-P", str(src)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
               for src, lang in units]
        for i, p in enumerate(pre):
            text, _ = p.communicate()
            if p.returncode == 0:
                keys[i] = hashlib.sha256(" ".join(flags).encode() + b"\0" + text).hexdigest()[:24]
    procs, objs = [], []
    for i, (src, lang) in enumerate(units):
        obj = out / f"{i}.o"
        objs.append(obj)
        if keys[i] and (objects / f"{keys[i]}.o").exists():
            shutil.copyfile(objects / f"{keys[i]}.o", obj)
            procs.append(None)
            continue
        procs.append(subprocess.Popen([CXX, *flags, *inc, *lang, "-c", str(src), "-o", str(obj)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = []
    for i, p in enumerate(procs):
        if p is None:
            continue
        output, _ = p.communicate()
        if p.returncode != 0:
            errors.append(output)
        elif keys[i]:
            shutil.copyfile(objs[i], objects / f"{keys[i]}.o")
    if errors:
        raise RuntimeError("emulator build failed:\n" + "\n".join(errors))
    link = subprocess.run([CXX, *flags, *map(str, objs), "-o", str(out / "driver")],
                          capture_output=True, text=True)
    if link.returncode != 0:
        raise RuntimeError("emulator link failed:\n" + link.stdout + link.stderr)
    return out / "driver"


def write_tensors(path: Path, tensors: dict):
    with open(path, "wb") as f:
        for name, t in tensors.items():
            if t is None:
                continue
            data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
            f.write(name.encode() + b"\0" + struct.pack("<Q", len(data)) + data)


def read_tensors(path: Path) -> dict:
    out = {}
    data = Path(path).read_bytes()
    i = 0
    while i < len(data):
        j = data.index(b"\0", i)
        name = data[i:j].decode()
        (n,) = struct.unpack_from("<Q", data, j + 1)
        out[name] = data[j + 9:j + 9 + n]
        i = j + 9 + n
    return out


class EmulatorError(RuntimeError):
    """The emulated run failed: a kernel defect the emulator or a sanitizer reported."""


def run(exe: Path, mode: str, tensors: dict, shapes: dict, env: dict | None = None,
        timeout: float = 600) -> dict:
    """Runs `driver mode` on `tensors`; returns the outputs as tensors of the given
    {name: (shape, dtype)}."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in", Path(tmp) / "out"
        write_tensors(inp, tensors)
        proc = subprocess.run([str(exe), mode, str(inp), str(outp)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout)
        if proc.returncode != 0:
            err = proc.stderr if len(proc.stderr) < 6000 else (
                proc.stderr[:3000] + "\n[...]\n" + proc.stderr[-3000:])
            raise EmulatorError(f"driver {mode} exited with {proc.returncode}:\n{err}")
        raw = read_tensors(outp)
    result = {}
    for name, (shape, dtype) in shapes.items():
        if name not in raw:
            raise EmulatorError(f"driver wrote no {name}")
        if not raw[name]:
            result[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(bytearray(raw[name]), dtype=torch.uint8)
        result[name] = t.view(dtype).reshape(shape)
    return result
