"""Chunked vs quadratic hybrid attention, forward + backward, on this machine's CPU.

Each (implementation, length, dtype) runs in a fresh subprocess so that its peak RSS is its own.
Usage: python benchmarks/bench_ops.py [--lengths 1024,4096,16384] [--threads 2] [--out benchmarks/results/ops]
Writes <out>.json and <out>.md; the README quotes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HEADS, HEAD_DIM, FEATURES, WINDOW, CHUNK = 8, 64, 128, 64, 64
# L×L fp32 tensors per head alive at the quadratic path's peak (measured live at 1k and 4k: about 5.2).
QUADRATIC_TENSORS_ALIVE = 6
MEMORY_LIMIT_BYTES = 16 * 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def useful_flops(impl: str, length: int) -> float:
    """Multiply-adds ×2 of the forward pass as each implementation computes it; backward counted as 2× forward."""
    d, f, dv, h = HEAD_DIM, FEATURES, HEAD_DIM, HEADS
    if impl == "quadratic":
        forward = 2 * h * length * length * (d + f + dv)
    else:
        # With CHUNK == WINDOW the local slice is the terrace's two blocks and needs no linear product;
        # the running state costs φ(k)ᵀv per chunk and φ(q)·S per query.
        keys = 2 * WINDOW
        forward = 2 * h * length * keys * (d + dv) + 2 * h * length * f * dv * 2
    return 3.0 * forward


def run_one(impl: str, length: int, dtype_name: str, repeats: int) -> dict:
    import torch

    from lolcats.runtime.ops import Window, hybrid_attention_chunked, hybrid_attention_reference

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    make = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    q, k, v = make(1, HEADS, length, HEAD_DIM), make(1, HEADS, length, HEAD_DIM), make(1, HEADS, length, HEAD_DIM)
    fq = torch.softmax(make(1, HEADS, length, FEATURES).float(), -1).to(dtype).requires_grad_()
    fk = torch.softmax(make(1, HEADS, length, FEATURES).float(), -1).to(dtype).requires_grad_()
    logit = torch.zeros(HEADS, requires_grad=True)
    window = Window("terrace", WINDOW)

    def step() -> None:
        gamma = torch.sigmoid(logit)
        if impl == "quadratic":
            out = hybrid_attention_reference(q, k, v, fq, fk, window=window, scaling=HEAD_DIM**-0.5, gamma=gamma)
        else:
            out = hybrid_attention_chunked(
                q, k, v, fq, fk, window=window, scaling=HEAD_DIM**-0.5, gamma=gamma, chunk_size=CHUNK
            )
        out.float().square().mean().backward()

    baseline = rss_bytes()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "impl": impl,
        "length": length,
        "dtype": dtype_name,
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "gflop_per_s": useful_flops(impl, length) / seconds / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_extra_bytes": peak_rss_bytes() - baseline,
    }


def matmul_gflops(dtype_name: str) -> dict:
    """Plain matmuls on this machine: one large square GEMM, and the chunked path's batched local product."""
    import torch

    dtype = getattr(torch, dtype_name)
    result = {}
    shapes = {
        "square_2048": ((2048, 2048), (2048, 2048)),
        "batched_local": ((HEADS * 64, CHUNK, HEAD_DIM), (HEADS * 64, HEAD_DIM, 3 * CHUNK)),
    }
    for name, (a_shape, b_shape) in shapes.items():
        a, b = torch.randn(*a_shape, dtype=dtype), torch.randn(*b_shape, dtype=dtype)
        a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        batch = a_shape[0] if len(a_shape) == 3 else 1
        flops = 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
        result[name] = flops / statistics.median(times) / 1e9
    return result


def predicted_quadratic_bytes(length: int) -> int:
    return QUADRATIC_TENSORS_ALIVE * HEADS * length * length * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/ops")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "LENGTH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        impl, length, dtype_name = args.child
        print(json.dumps(run_one(impl, int(length), dtype_name, args.repeats)))
        return

    rows = []
    for dtype_name in args.dtypes.split(","):
        for length in map(int, args.lengths.split(",")):
            for impl in ("quadratic", "chunked"):
                if impl == "quadratic" and predicted_quadratic_bytes(length) > MEMORY_LIMIT_BYTES:
                    rows.append({"impl": impl, "length": length, "dtype": dtype_name, "skipped":
                                 f"predicted {predicted_quadratic_bytes(length) / 2**30:.0f} GiB"})
                    continue
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--child", impl, str(length), dtype_name]
                timed = subprocess.run(cmd, capture_output=True, text=True)
                # glibc keeps freed heap memory, so the default run's RSS overstates what is live. A second
                # run with every large block mmapped (freed at once) gives the live peak.
                live_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                live = subprocess.run(cmd, capture_output=True, text=True, env=live_env)
                if timed.returncode or live.returncode:
                    error = (timed.stderr or live.stderr).strip().splitlines()[-1]
                    rows.append({"impl": impl, "length": length, "dtype": dtype_name, "skipped": f"failed: {error}"})
                else:
                    row = json.loads(timed.stdout.strip().splitlines()[-1])
                    row["live_peak_extra_bytes"] = json.loads(live.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
                    rows.append(row)
                print(rows[-1], flush=True)

    matmul = {name: matmul_gflops(name) for name in args.dtypes.split(",")}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "setup": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "features": FEATURES,
                  "window": f"terrace {WINDOW}", "chunk": CHUNK, "pass": "forward+backward (grads of fq, fk, gamma)"},
        "matmul_gflop_per_s": matmul,
        "rows": rows,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| dtype | L | quadratic s | chunked s | speed-up | quadratic live peak MiB | chunked live peak MiB | memory ratio | chunked RSS peak MiB | chunked GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["impl"], r["length"], r["dtype"]): r for r in result["rows"]}
    for (impl, length, dtype), chunked in by_key.items():
        if impl != "chunked":
            continue
        quad = by_key.get(("quadratic", length, dtype), {})
        mib = lambda r: r["live_peak_extra_bytes"] / 2**20  # noqa: E731
        if "seconds" in quad and "seconds" in chunked:
            speed, ratio = f"{quad['seconds'] / chunked['seconds']:.1f}×", f"1/{mib(quad) / mib(chunked):.0f}"
            qs, qm = f"{quad['seconds']:.3f}", f"{mib(quad):.0f}"
        else:
            speed = ratio = "–"
            qs = qm = quad.get("skipped", "–")
        if "seconds" not in chunked:
            lines.append(f"| {dtype} | {length} | {qs} | {chunked.get('skipped')} | | {qm} | | | | |")
            continue
        lines.append(f"| {dtype} | {length} | {qs} | {chunked['seconds']:.3f} | {speed} | {qm} | {mib(chunked):.0f} | {ratio} | {chunked['peak_extra_bytes'] / 2**20:.0f} | {chunked['gflop_per_s']:.1f} |")
    mm = result["matmul_gflop_per_s"]
    lines.append("")
    lines.append("Memory: peak RSS above the inputs, live (large blocks mmapped, so freed memory leaves the RSS) and with "
                 "the default allocator (RSS peak). FLOP/s counts forward+backward as 3× the forward's products.")
    lines.append("")
    lines.append("Plain matmul on the same threads (GFLOP/s): " + ", ".join(
        f"{dtype}: square 2048³ {v['square_2048']:.0f}, batched (512×64×64)·(64×192) {v['batched_local']:.0f}"
        for dtype, v in mm.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
