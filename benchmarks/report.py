"""What every benchmark CLI reports besides its numbers, and how: the implementation measured, the
host facts (CPU model and the flags that pick kernels, torch's CPU capability, fastlstm's kernels,
the allocator settings, versions, git revision, command), where results go, aligned text tables,
JSON and CSV files, and bench_lstm.py's speedup plot."""
from __future__ import annotations

import csv
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------------
# The implementation measured


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


# ---------------------------------------------------------------------------------------------------
# Host facts


def _amd_generation(family, model):
    # AMD's family/model numbers for its Zen cores (a VM's "model name" often says only "AMD EPYC").
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen/Zen+"
    if family == 0x19:
        return "Zen 4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def _cpuinfo():
    """The first processor's fields of /proc/cpuinfo (what lscpu shows as model name and flags)."""
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
    return fields


def cpu_model():
    """The CPU's model name, with its family and model numbers (and, for AMD, the Zen generation
    they mean): e.g. "AMD EPYC (family 26, model 2: Zen 5)"."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return name
    gen = _amd_generation(family, model) if fields.get("vendor_id") == "AuthenticAMD" else None
    return f"{name} (family {family}, model {model}{': ' + gen if gen else ''})"


# The CPU features that decide which kernels run (torch's and fastlstm's) and so which host kind a
# result belongs to (AVX2-only hosts have no native bfloat16: torch's bf16 is slow there).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_host_info(impl):
    """cpu_flags (each of CPU_FLAGS: present or not), torch's CPU capability and the ISA of the
    fastlstm kernels loaded."""
    flags = set(_cpuinfo().get("flags", "").split())
    loader = getattr(impl, "_loader", None)
    isa = loader.cpu_isa() if loader is not None and hasattr(loader, "cpu_isa") else None
    return {
        "cpu_flags": {k: k in flags for k in CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fastlstm_cpu_isa": isa,
    }


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
    """Top-level JSON keys describing the run (each CLI adds its own, then `rows`). On the CPU they
    include cpu_host_info's."""
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
    else:
        env.update(cpu_host_info(module))
    return env


def host_lines(env):
    """The CPU host facts as header lines for a printed table."""
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["cpu_flags"].items())
    alloc = env["allocator"]
    return [
        f"CPU flags: {flags}; torch CPU capability {env['torch_cpu_capability']}; "
        f"fastlstm CPU kernels {env['fastlstm_cpu_isa']}",
        "allocator: " + (" ".join(f"{k}={v}" for k, v in alloc.items()) if alloc else "C library defaults"),
    ]


# ---------------------------------------------------------------------------------------------------
# Text tables


def table_row(cells, widths, left=(), sep="  "):
    """One line: each cell padded to its column's width, left-aligned in the `left` columns and
    right-aligned in the others."""
    return sep.join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def format_table(header, rows, left=()):
    """A table whose columns are as wide as their widest cell, with a rule under the header."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = [table_row(cells[0], widths, left), "  ".join("-" * w for w in widths)]
    out += [table_row(row, widths, left) for row in cells[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Files


def write_json(path, env, rows, **extra):
    """{**env, **extra, "rows": rows} to path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**env, **extra, "rows": rows}, f, indent=2)
        f.write("\n")


def write_csv(path, rows, fields):
    """One line per row with the given columns (a field a row lacks is empty)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in fields})


def plot_speedups(path, env, rows, geo, modes):
    """Horizontal bars of each row's speedup (torch time / fastlstm time, log scale), one bar per
    mode for each `name · dtype`, MISMATCH/ERROR written where a row has no speedup; the legend
    gives each mode's geometric mean (geo[mode])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullLocator

    labels = []
    for r in rows:
        label = f"{r['name']} · {r['dtype']}"
        if label not in labels:
            labels.append(label)
    modes = [m for m in modes if any(r["mode"] == m for r in rows)]
    colors = {"inference": "#4C72B0", "training": "#DD8452"}
    height = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(labels) * len(modes)))
    speedups = [r["speedup"] for r in rows if r.get("speedup")]
    lo = min(speedups + [0.8]) / 1.4
    hi = max(speedups + [1.25]) * 1.4
    for k, mode in enumerate(modes):
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["mode"] == mode and f"{r['name']} · {r['dtype']}" == label), None)
            if r is None:
                continue
            y = i + (k - (len(modes) - 1) / 2) * height
            if r.get("speedup"):
                v = r["speedup"]
                ax.barh(y, v - 1, height=height * 0.9, color=colors[mode], left=1)
                ax.text(v * (1.02 if v >= 1 else 0.98), y, f"{v:.2f}", va="center", ha="left" if v >= 1 else "right", fontsize=7)
            else:
                text = "MISMATCH" if r.get("status") == "mismatch" else "ERROR"
                ax.text(lo * 1.05, y, f"{mode}: {text}", va="center", fontsize=7, color="red")
    handles = [
        Patch(color=colors[m], label=f"{m} (geomean {geo[m]:.2f}x)" if geo.get(m) else m) for m in modes
    ]
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("speedup = torch.nn.LSTM time / fastlstm time  (> 1: fastlstm faster)", fontsize=9)
    backend = env.get("fastlstm_backend")
    ax.set_title(
        f"fastlstm vs torch.nn.LSTM on {env['device']}"
        + (f" ({env['cpu']}, {env['threads']} threads)" if env["device_type"] == "cpu" else "")
        + (f", TF32 {'on' if env['tf32']['cudnn.allow_tf32'] else 'off'}" if env.get("tf32") else "")
        + f"\ntorch {env['torch']}, fastlstm backend {backend}, {env['date'][:10]}",
        fontsize=10,
    )
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=len(modes), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
