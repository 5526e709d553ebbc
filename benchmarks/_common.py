"""What the benchmark scripts share: which LSTM to measure, where results go, what machine ran them."""
import datetime
import importlib
import os
import platform
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_impl(module_name="fastlstm"):
    """The module whose `LSTM` is measured against torch.nn.LSTM (fastlstm unless debugging)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        sys.exit(f"cannot import {module_name!r} ({e}); build it with: pip install --no-build-isolation -e .")
    if not hasattr(module, "LSTM"):
        sys.exit(
            f"{module_name!r} has no LSTM (found {getattr(module, '__path__', module)}): is it built? "
            "Run: pip install --no-build-isolation -e ."
        )
    return module


def impl_backend(module, device):
    """fastlstm.backend(device): "compiled" or "reference"; None for a stand-in without it."""
    backend = getattr(module, "backend", None)
    return backend(device) if callable(backend) else None


def _amd_generation(family, model):
    # AMD's family/model numbers for its Zen cores (a VM's "model name" often says only "AMD EPYC").
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen/Zen+"
    if family == 0x19:
        return "Zen 4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def cpu_model():
    """The CPU's model name, with its family and model numbers (and, for AMD, the Zen generation
    they mean): e.g. "AMD EPYC (family 26, model 2: Zen 5)"."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return name
    gen = _amd_generation(family, model) if fields.get("vendor_id") == "AuthenticAMD" else None
    return f"{name} (family {family}, model {model}{': ' + gen if gen else ''})"


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device):
    """`cpu`, or the GPU's name as a path component, e.g. `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def default_out_dir(device):
    date = datetime.date.today().isoformat()
    return os.path.join(HERE, "results", f"{device_slug(device)}-{date}")


def git_revision():
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def allocator_settings():
    """The environment variables that change the C allocator (glibc's malloc thresholds, a preloaded
    jemalloc or tcmalloc): torch's CPU times on large shapes depend on them (page faults), so every
    run records them. Empty: glibc's defaults."""
    return {k: os.environ[k] for k in ALLOCATOR_VARIABLES if os.environ.get(k)}


def environment(device, module):
    """Top-level JSON keys describing the run (results.json adds `rows`)."""
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_type": device.type,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "impl_module": module.__name__,
        "fastlstm_backend": impl_backend(module, device.type),
        "fastlstm_version": getattr(module, "__version__", None),
        "git": git_revision(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "allocator": allocator_settings(),
    }
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env
