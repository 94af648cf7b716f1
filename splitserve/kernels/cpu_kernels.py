"""Native CPU kernels (cpu_kernels.c): int8 and 4-bit linear layers (`cpu_quant` wraps them), paged attention
that reads the KV pages in place for every row (decode rows and prompt rows alike), and a step's layers in one
call (`cpu_fused` wraps it).

The C file is compiled once per machine with the system's C compiler (`-O3 -march=native -fopenmp`: VNNI where
the CPU has it) into the splitserve cache and loaded with ctypes. `library()` is None where that cannot work (no
AVX2/FMA, no compiler); callers then keep the PyTorch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from splitserve.kernels import kv_format

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.c")


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve")) / "kernels"


@functools.cache
def library(march: str = "native", extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernels built for this CPU (`-march=native`: VNNI where it has it), or for another x86 target with
    `extra` flags (the tests build `x86-64-v3`, AVX2 without VNNI, and `x86-64-v3 -mavxvnni`, to compare the
    paths on one machine). None where they cannot build or run here."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        log.info("CPU kernels: this CPU lacks AVX2/FMA/F16C")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("CPU kernels: no C compiler found")
        return None
    source = _SOURCE.read_bytes()
    args = ["-O3", f"-march={march}", *extra, "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(source + " ".join([compiler, *args]).encode()).hexdigest()[:16]
    path = cache_dir() / f"cpu_kernels-{key}.so"
    if not path.exists():
        log.warning("compiling splitserve's CPU kernels for this machine (once; later starts reuse them)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *args, str(_SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("CPU kernels did not compile: %s", result.stderr.strip()[-500:])
                return None
            built.replace(path)  # atomic: concurrent workers never load a half-written library
    lib = ctypes.CDLL(str(path))
    lib.quant_linear.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    lib.quant_linear.restype = None
    lib.paged_attention.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 8, ctypes.c_float, ctypes.c_int,
                                           ctypes.c_int]  # fmt: skip
    lib.paged_attention.restype = None
    lib.add_rms_norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.rope.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    lib.silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f32, i32 = ctypes.c_float, ctypes.c_int
    lib.decode_layers.argtypes = [p, i64, *[p] * 8, i64, p, *[i64] * 7, f32, f32, i32, i32, i32]
    lib.vnni.argtypes, lib.vnni.restype = [], ctypes.c_int
    lib.read_bytes.argtypes, lib.read_bytes.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int64
    for f in (lib.add_rms_norm, lib.rope, lib.silu_mul, lib.decode_layers):
        f.restype = None
    check_struct_layout(lib)
    return lib


def instructions(lib: ctypes.CDLL | None = None) -> str:
    """The integer dot product the kernels use here, for start-up lines and benchmarks: `AVX512-VNNI`, `AVX-VNNI`,
    or `AVX2` (maddubs, no VNNI)."""
    lib = lib or library()
    if lib is None:
        return "none"
    return ("AVX2", "AVX-VNNI", "AVX512-VNNI")[lib.vnni()]


class QLinear(ctypes.Structure):
    """One quantized linear layer's tensors, as `quant_linear` takes them (C's `QLinear`)."""

    _fields_ = [*((name, ctypes.c_void_p) for name in ("w", "scale", "offset", "bias")), ("wbits", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    """One decoder layer's weights, as `decode_layers` takes them (C's `DecodeLayer`)."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("qkv", QLinear), ("o", QLinear), ("post_norm", ctypes.c_void_p),
                ("gate_up", QLinear), ("down", QLinear)]  # fmt: skip


# The fields whose offsets C's `struct_layout` reports, by name, in its order: QLinear's, then DecodeLayer's.
_C_FIELDS = (("w", "scale", "offset", "bias", "wbits"), ("input_norm", "qkv", "o", "post_norm", "gate_up", "down"))


def struct_layout(*structs: type[ctypes.Structure]) -> list[int]:
    """Each struct's size, then the offsets of its fields named in `_C_FIELDS` (-1 where it lacks one): what C's
    `struct_layout` reports for the compiled structs."""
    return [
        n
        for struct, names in zip(structs, _C_FIELDS, strict=True)
        for n in (ctypes.sizeof(struct), *(getattr(getattr(struct, name, None), "offset", -1) for name in names))
    ]


def check_struct_layout(lib: ctypes.CDLL, structs: tuple[type[ctypes.Structure], ...] = (QLinear, DecodeLayer)) -> None:
    """Raise when the ctypes mirror and the compiled structs disagree (a call would read the wrong memory)."""
    expected = struct_layout(*structs)
    compiled = (ctypes.c_int64 * len(expected))()
    lib.struct_layout.argtypes, lib.struct_layout.restype = [ctypes.c_void_p], None
    lib.struct_layout(compiled)
    if list(compiled) != expected:
        raise RuntimeError(
            f"cpu_kernels.c's structs do not match their ctypes mirror: sizes and offsets {list(compiled)} in C, "
            f"{expected} in cpu_kernels.py"
        )


def read_seconds(tensors: list[torch.Tensor], repeats: int = 20) -> float:
    """Seconds to read every byte of `tensors` once, one after another, each with torch's threads (the best of
    `repeats`): the floor of a memory-bound step that reads them (benchmarks/decode_step.py)."""
    lib, threads = library(), torch.get_num_threads()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for t in tensors:
            lib.read_bytes(t.data_ptr(), t.numel() * t.element_size(), threads)
        best = min(best, time.perf_counter() - start)
    return best


def native(t: torch.Tensor) -> bool:
    """Whether the native kernels take `t`: fp32 on the CPU, where they built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out, h = torch.empty_like(x), torch.empty_like(x)
    dim = x.shape[-1]
    library().add_rms_norm(x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(),
                           out.data_ptr(), h.data_ptr(), x.numel() // dim, dim, eps)  # fmt: skip
    return out, h


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` ([tokens, heads, dim], heads contiguous; rows may be strided) in place; returns it."""
    tokens, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        raise ValueError("rope_ needs each token's heads contiguous")
    cos, sin = cos.contiguous(), sin.contiguous()
    library().rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, dim, x.stride(0))
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate_up` = [rows, 2 * size] (gate first)."""
    gate_up = gate_up.contiguous()
    size = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], size)
    library().silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * size), size)
    return out


# The cache element types the kernels read and write in place (C's KV_F32, KV_F16, KV_BF16, KV_I8; int8 pages
# and their scales as kernels/kv_format.py lays them out).
KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}


def attention_supported(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Beyond `native(q)`: a whole cache (`kv_format.laid_out`) of a type in `KV_KINDS`, and at most 64 query
    heads per KV head."""
    return kv_cache.dtype in KV_KINDS and kv_format.laid_out(kv_cache) and q.shape[1] // kv_cache.shape[4] <= 64


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each query row `q` ([rows, heads, dim]) over the first `context_lens[i]` tokens of its pages
    `page_table[i]`, read in place; written into `out` (contiguous, q's shape) when given. One row's result
    depends on its query, its keys and its context length only: decode rows and prompt rows
    (`PagedAttentionMetadata.row_tables`) alike."""
    rows, heads, dim = q.shape
    if page_table.shape[0] != rows or context_lens.shape[0] != rows:
        raise ValueError(f"{rows} query rows for {page_table.shape[0]} page tables and {context_lens.shape[0]} lengths")
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of q's shape")
    table, lens = page_table.contiguous(), context_lens.contiguous()
    _, num_layers, _, page_size, kv_heads, _ = kv_cache.shape
    library().paged_attention(q.data_ptr(), kv_cache.data_ptr(), table.data_ptr(), lens.data_ptr(),
                                     out.data_ptr(), rows, heads, kv_heads, dim, page_size, num_layers, layer,
                                     table.shape[1], scale, torch.get_num_threads(),
                                     KV_KINDS[kv_cache.dtype])  # fmt: skip
    return out
