"""
Pinned CPU numerics: the same seed gives the same bits on every x86-64 CPU with AVX2, not only on one machine.

torch, MKL and oneDNN each pick their kernels by what the CPU offers, and kernels of another instruction set round
differently in the last bit; a training run grows that into another matrix. The pins hold each library to a kernel
set every x86-64 CPU with AVX2 has (Intel since 2013, AMD since 2015), and they must be in the environment before
torch is imported (the libraries read them once, at their first call):

- torch's own vectorised kernels (softmax, AdamW, layer norm, SiLU, sums, exp): ATEN_CPU_CAPABILITY=avx2
  (PyTorch's CI runs its no-AVX-512 jobs with this variable);
- MKL, which computes every fp32 matmul of the torch CPU wheel (BLAS_INFO=mkl): MKL_CBWR=COMPATIBLE, its conditional
  numerical reproducibility (CNR) on the SSE2 branch. oneMKL's developer guide: "on non-Intel CPUs, only the
  MKL_CBWR_AUTO and MKL_CBWR_COMPATIBLE options are supported"; MKL_CBWR=AVX2 holds on Intel CPUs only and falls back
  to AUTO (the CPU's own dispatch) on AMD ones. CNR also asks for a fixed thread count with MKL_DYNAMIC and
  OMP_DYNAMIC false;
- oneDNN, which torch calls for fp32 convolutions and GELU: its documentation promises the same bits only on the
  same platform, so compute_init turns it off (torch.backends.mkldnn.enabled = False: the CLIP patch embedding then
  runs as im2col + MKL matmul, GELU in torch's own kernels); ONEDNN_MAX_CPU_ISA=AVX2 holds anything that still calls
  it to AVX2.

The thread count changes reduction orders too: pinned, a run with --threads=0 uses one thread per rank.
COIN_PINS=0 in the environment leaves every library its widest kernels (a run ~1.8x faster, almost all of it MKL's:
docs/performance.md; other bits on another CPU); a variable already set in the environment is kept (and recorded), so
one pin can be changed alone.
"""
import os
import sys

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",    # torch's vectorised kernels: AVX2, not AVX-512
    "MKL_CBWR": "COMPATIBLE",         # MKL's matmul: the CNR branch MKL honours on Intel and AMD CPUs alike (SSE2)
    "MKL_DYNAMIC": "FALSE",           # MKL: the thread count asked for, never fewer (CNR's condition)
    "OMP_DYNAMIC": "FALSE",           # OpenMP: likewise
    "ONEDNN_MAX_CPU_ISA": "AVX2",     # oneDNN, should anything call it with torch.backends.mkldnn off
}
OPT_OUT = "COIN_PINS"                 # COIN_PINS=0: no pins
_applied = False  # apply() ran in this process before torch loaded


def apply(environ=os.environ):
    """Put the pins into `environ` (a variable already set is kept), unless COIN_PINS=0. Call before importing torch:
    a library that has already read its variable ignores a later change."""
    global _applied
    assert sys.modules.get("torch") is None, "pins.apply() after torch was imported: the pins would not take effect"
    if environ.get(OPT_OUT, "1") != "0":
        for key, value in PINS.items():
            environ.setdefault(key, value)
        _applied = True


def active():
    """True when apply() pinned this process (coin.py run as a program; not coin.main() called from a test)."""
    return _applied


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def mkl_branch():
    """The CNR branch MKL runs on, as MKL reports it (None where this torch build has no MKL to ask): 'OFF' (the
    CPU's own dispatch, no CNR), 'AUTO', 'COMPATIBLE', 'AVX2', ... MKL_CBWR=AVX2 on an AMD CPU reads back 'AUTO'."""
    import ctypes

    import torch
    if not torch.backends.mkl.is_available():
        return None
    try:  # libtorch_cpu links MKL in statically and exports its CNR getter (oneMKL's mkl_cbwr_get)
        get = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    names = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 8: "SSE4_2", 9: "AVX", 10: "AVX2",
             12: "AVX512", 14: "AVX512_E1"}
    branch = get(1)  # MKL_CBWR_BRANCH
    return names.get(branch, str(branch)) + (",STRICT" if get(-1) & 0x10000 else "")


def record():
    """What results.json and every checkpoint record about the numerics of the run: the CPU, the kernels torch and MKL
    ran, oneDNN on or off, the threads, and the pin variables as they were set."""
    import torch
    return {"cpu": cpu_model(), "pinned": active(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": mkl_branch(), "onednn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads(),
            "pins": {k: os.environ.get(k) for k in PINS}}
