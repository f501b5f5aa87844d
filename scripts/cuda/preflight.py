#!/usr/bin/env python3
"""Preflight of a GPU run (scripts/cuda/device-run.sh), before anything else: one JSON object
on stdout with the driver, what each binary links against (and what is missing), the newest
GLIBC symbol version each binary needs against the machine's, the size of what was sent, and
whether python3 has torch and transformers. Standard library only.

    python3 scripts/cuda/preflight.py BINARY... [--sent PATH...]
"""
import importlib.metadata
import json
import os
import re
import subprocess
import sys


def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return p.returncode, p.stdout + p.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)


def glibc_needed(path):
    """The newest GLIBC_x.y symbol version named in the binary (its version-needs table)."""
    with open(path, "rb") as f:
        found = set(re.findall(rb"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?", f.read()))
    versions = sorted(tuple(int(p or 0) for p in v) for v in found)
    return ".".join(map(str, versions[-1][:2])) if versions else None


def binary(path):
    if not os.path.exists(path):
        return {"path": path, "error": "missing"}
    _, ldd = run(["ldd", path])
    missing = sorted({line.split("=>")[0].strip() for line in ldd.splitlines() if "not found" in line})
    return {"path": path, "bytes": os.path.getsize(path), "glibc_needed": glibc_needed(path), "missing_libraries": missing,
            "ldd": [line.strip() for line in ldd.splitlines()]}


def size(paths):
    total = 0
    for p in paths:
        for root, _, files in os.walk(p) if os.path.isdir(p) else [("", None, [p])]:
            for f in files:
                fp = os.path.join(root, f)
                if os.path.isfile(fp) and not os.path.islink(fp):
                    total += os.path.getsize(fp)
    return total


def package(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main():
    args = sys.argv[1:]
    sent = args[args.index("--sent") + 1:] if "--sent" in args else []
    binaries = args[:args.index("--sent")] if "--sent" in args else args
    rc, smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    machine_glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    report = {
        "gpu": smi.strip() if rc == 0 else None,
        "gpu_error": None if rc == 0 else smi.strip()[:300],
        "machine_glibc": machine_glibc.split()[-1] if machine_glibc else None,
        "binaries": [binary(b) for b in binaries],
        "sent_mib": round(size(sent) / 2**20, 1),
        "python": sys.version.split()[0],
        "torch": package("torch"),
        "transformers": package("transformers"),
        "nvcc": None,
    }
    rc, nvcc = run(["nvcc", "--version"])
    if rc == 0:
        report["nvcc"] = nvcc.strip().splitlines()[-1]
    for b in report["binaries"]:
        need, have = b.get("glibc_needed"), report["machine_glibc"]
        if need and have:
            b["glibc_ok"] = tuple(map(int, need.split("."))) <= tuple(map(int, have.split(".")[:2]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
