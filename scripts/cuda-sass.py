#!/usr/bin/env python3
"""Registers, spills and SASS of the CUDA kernels, on a machine without a GPU.

    python3 scripts/cuda-sass.py [--arch 90] [--sass] [--filter gemv_bf16] [-D NAME=VALUE ...]

Compiles shaders/cuda/grouped_gemm.cu (or --source FILE) with the NVRTC that pip's
nvidia-cuda-nvrtc wheel installs (or MOE_NVRTC_LIB's folder), with the backend's options
(`-std=c++17 -lineinfo`, see crates/moe-cuda/src/kernels.rs), and prints ptxas's line per kernel:
registers, stack, spills. With --sass it disassembles the cubin with cuobjdump, from pip's
nvidia-cuda-cuobjdump wheel (`pip download --no-deps nvidia-cuda-cuobjdump`, unzip it, and pass
--cuobjdump PATH or put it on PATH): what the compiler made of a loop (which loads are
predicated, whether the next step's loads are issued early) can be read without a device.
"""
import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvrtc():
    folders = [os.environ["MOE_NVRTC_LIB"]] if "MOE_NVRTC_LIB" in os.environ else []
    try:
        import nvidia  # the pip wheels' namespace package

        folders += [os.path.join(p, sub, "lib") for p in nvidia.__path__ for sub in ("cu13", "cuda_nvrtc")]
    except ImportError:
        pass
    for folder in folders:
        for lib in sorted(glob.glob(os.path.join(folder, "libnvrtc.so*"))):
            if "builtins" not in lib:
                return ctypes.CDLL(lib)
    sys.exit("cuda-sass: no libnvrtc.so: pip install nvidia-cuda-nvrtc, or set MOE_NVRTC_LIB to its folder")


def compile_cubin(lib, source, opts):
    prog = ctypes.c_void_p()
    text = open(source, "rb").read()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), text, os.path.basename(source).encode(), 0, None, None) != 0:
        sys.exit("cuda-sass: nvrtcCreateProgram failed")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"cuda-sass: NVRTC error {rc}:\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return log.value.decode(), cubin.raw


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=os.path.join(ROOT, "shaders/cuda/grouped_gemm.cu"))
    ap.add_argument("--arch", default="90")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("-D", action="append", default=[], help="a define, as the backend's -D options")
    ap.add_argument("--sass", action="store_true", help="print the SASS of the matching kernels")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    a = ap.parse_args()
    opts = [f"--gpu-architecture=sm_{a.arch}", "-std=c++17", "-lineinfo", "--ptxas-options=-v"] + [f"-D{d}" for d in a.D]
    log, cubin = compile_cubin(nvrtc(), a.source, opts)
    kernel = None
    for line in log.splitlines():
        if "Compiling entry function" in line:
            kernel = line.split("'")[1]
        elif kernel and a.filter in kernel and ("registers" in line or "spill" in line):
            what = line.split(":", 1)[1] if "info" in line else line.replace("ptxas", "")
            print(f"{kernel:32} {what.strip(' .')}")
    if a.sass:
        if not a.cuobjdump:
            sys.exit("cuda-sass: no cuobjdump: pass --cuobjdump PATH (pip's nvidia-cuda-cuobjdump wheel has one)")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([a.cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        show = False
        for line in out.splitlines():
            if line.strip().startswith("Function :"):
                show = a.filter in line
            if show:
                print(line)


if __name__ == "__main__":
    main()
