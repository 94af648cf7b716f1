"""One-off GPU diagnostics of 2026-12-04 (kept with their output, diagnostics.txt; not a maintained benchmark):
UCX settings for GPU->GPU KV transfers, and where a batch-64 captured decode step spends its host time.

On the GPU machine, from the repository root, after installing the wheels as scripts/gpu_check.sh does:
    TRITON_INTERPRET=0 python3 benchmarks/results/2026-12-04-h200/diagnostics.py
"""

import cProfile
import importlib.util
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
sys.path.insert(0, str(ROOT))


def bench(name):
    spec = importlib.util.spec_from_file_location(name + "_b", ROOT / f"benchmarks/{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def kv():
    from splitserve.kv_transfer.testing import Peer

    b = bench("kv_transfer")
    variants = [
        ("default, UCX_PROTO_INFO=used", {"UCX_PROTO_INFO": "used"}),
        ("UCX_RNDV_SCHEME=get_zcopy", {"UCX_RNDV_SCHEME": "get_zcopy"}),
        ("UCX_RNDV_SCHEME=put_zcopy", {"UCX_RNDV_SCHEME": "put_zcopy"}),
        ("UCX_TLS=cuda_ipc,cuda_copy,sm,self", {"UCX_TLS": "cuda_ipc,cuda_copy,sm,self"}),
        ("1 message", {"SPLITSERVE_KV_MAX_MESSAGES": "1"}),
        ("32 messages", {"SPLITSERVE_KV_MAX_MESSAGES": "32", "SPLITSERVE_KV_MIN_MESSAGE_BYTES": "1"}),
    ]
    for label, env in variants:
        t0 = time.monotonic()
        rng = random.Random(0)
        s = Peer("sender", b.KEY, 2100, "auto", fill_seed=1, device="cuda", env=env)
        r = Peer("receiver", b.KEY, 2100, "auto", fill_seed=None, device="cuda", env=env)
        try:
            b.transfer_seconds(s, r, 1, 3, rng)
            out = []
            for n, consecutive in ((64, True), (2048, True), (2048, False)):
                b.transfer_seconds(s, r, n, 2, rng, consecutive)
                sec = statistics.median(b.transfer_seconds(s, r, n, 4, rng, consecutive))
                out.append(
                    f"{n}{'c' if consecutive else 's'} {n * b.PAGE_BYTES / sec / 1e9:.1f} GB/s {sec * 1e3:.2f} ms"
                )
            print(f"KV [{label}]: " + "; ".join(out) + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        except Exception as e:
            print(f"KV [{label}]: FAILED {type(e).__name__}: {e}", flush=True)
        finally:
            s.stop()
            r.stop()


def host_profile():
    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.params import SamplingParams

    folder = g.random_checkpoint("135m", Path(tempfile.mkdtemp(dir="/dev/shm")) / "135m")
    e = DecodeEngine(
        EngineConfig(
            model=str(folder), device="cuda", max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_memory="8GiB"
        )
    )
    p = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    for i in range(64):
        e.add_request(f"r{i}", [(7 * i + j) % 1000 + 10 for j in range(128)], p)
    while any(r.num_computed_tokens < 128 for r in e._requests.values()):
        e.step()
    for _ in range(10):
        e.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(64):
        e.step()
    print(f"135m batch 64: {(time.perf_counter() - t) / 64 * 1e3:.2f} ms/step unprofiled", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(64):
        e.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    t = time.monotonic()
    host_profile()
    print(f"host profile done at {time.monotonic() - t:.0f} s", flush=True)
    kv()
    print(f"done at {time.monotonic() - t:.0f} s", flush=True)
