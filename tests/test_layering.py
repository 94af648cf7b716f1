"""Which module may import which: `kernels/` is a leaf (neither `model/` nor `engine/`), a request does not
import its sampler; and the native kernels' structs match their ctypes mirror, or the library refuses to load."""

from __future__ import annotations

import ast
import ctypes
from pathlib import Path

import pytest

from splitserve.kernels import cpu_kernels

PACKAGE = Path(__file__).resolve().parent.parent / "splitserve"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (functions, TYPE_CHECKING blocks), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_kernels_import_neither_the_model_nor_the_engine():
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        bad = {n for n in _imports(path) if n.startswith(("splitserve.model", "splitserve.engine"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_a_request_does_not_import_its_sampler():
    assert not {n for n in _imports(PACKAGE / "engine/request.py") if n.startswith("splitserve.engine.sampling")}


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no native CPU kernels here (no AVX2/FMA or compiler)")
def test_the_structs_ctypes_mirror_is_checked_against_the_compiled_ones():
    lib = cpu_kernels.library()
    cpu_kernels.check_struct_layout(lib)  # the real mirror: loads

    class Reordered(ctypes.Structure):  # bias and offset swapped: the same size, other offsets
        _fields_ = [(name, ctypes.c_void_p) for name in ("w", "scale", "bias", "offset", "wbits")]

    class Short(ctypes.Structure):
        _fields_ = [(name, ctypes.c_void_p) for name in ("w", "scale", "offset", "bias")]

    for wrong in (Reordered, Short):
        with pytest.raises(RuntimeError, match="do not match their ctypes mirror"):
            cpu_kernels.check_struct_layout(lib, (wrong, cpu_kernels.DecodeLayer))


def test_the_router_imports_no_torch(smollm2):
    """Neither the router's module nor a running router process loads torch (nor the grammar engine, which
    imports it): it tokenizes with transformers' fast tokenizer class and checks schemas with jsonschema."""
    import subprocess
    import sys
    import time

    from splitserve.launcher import free_port

    code = (
        "import sys, splitserve.router.http.server, splitserve.cli; "
        "print(sorted({'torch', 'xgrammar'} & {*sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    cmd = [sys.executable, "-m", "splitserve", "router", "--model", str(smollm2), "--port", str(free_port()),
           "--worker-port", str(free_port())]  # fmt: skip
    router = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = router.stdout.readline()  # printed once the tokenizer is loaded and the workers' socket is bound
        assert line.startswith("splitserve router: model"), line
        time.sleep(1)  # uvicorn starts serving
        maps = Path(f"/proc/{router.pid}/maps").read_text()
        assert "libtorch" not in maps and "xgrammar" not in maps, "the router process loaded torch"
    finally:
        router.terminate()
        router.wait(10)
