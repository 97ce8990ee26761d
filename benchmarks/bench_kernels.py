"""GFLOP/s of convtrain's conv kernels beside np.matmul on the same GEMM shapes, same run.

For the conv layers of the three reference nets (batch 100, float32, valid, stride 1) it times
forward, filter gradient and input gradient at 1 and 2 threads, and np.matmul on the GEMM each
pass amounts to, with the batch folded into one matrix dimension (P = Ho*Wo, K = C*kh*kw):

    forward      out (F x N*P)  = W (F x K) . cols (K x N*P)
    filter grad  dW (F x K)     = dout (F x N*P) . cols^T (N*P x K)
    input grad   dcols (K x N*P) = W^T (K x F) . dout (F x N*P)

FLOPs are 2*F*K*N*P for each pass (the bias and col2im additions are not counted).
np.matmul gets the same thread count through threadpoolctl. Times are medians of --repeat runs.
The im2col column is the time of convtrain.kernels.im2col on the whole batch as a share of the
forward kernel's time (an upper bound: inside the kernel the columns stay in cache; the
AVX-512/AVX2 builds' direct path writes no im2col matrix at all).

"peak" is this machine's FMA peak, measured in the same run at each thread count by an
FMA-bound loop (12 independent chains of the widest vectors the CPU runs, compiled into the
kernels: convtrain.nn._conv*.fma_flops), best of 5, with the same clock as the kernels;
"%peak" is the kernel's GFLOP/s as a share of it, "%torch" as a share of oneDNN's (PyTorch
CPU) on the same pass, with --torch.

Winograd F(2x2, 3x3) (kernels' algo="winograd") is timed beside im2col on the 3x3 layers'
three passes, interleaved with them, in rows "forward-wg", "filter-wg" and "input-wg"; their
GFLOP/s count the same 2*F*K*N*P flops of the direct convolution (an equivalent rate: Winograd
does 2.25x fewer multiplies, so it can exceed the FMA peak), and "ratio" is Winograd's speed-up
over the im2col kernel on that pass instead of the share of np.matmul.

    python benchmarks/bench_kernels.py [--repeat 30] [--threads 1 2] [--torch] [--clock cpu]

On a shared machine, compare 1-thread efficiency with --clock cpu --threads 1 (CPU time is
not inflated by other processes) and 2-thread scaling with wall time when the machine is idle.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
from threadpoolctl import ThreadpoolController

import convtrain
from convtrain.nn import backend, kernels

# name, (C, H, W) input, (F, kh, kw) filters
LAYERS = [
    ("DIGITS conv1", (1, 8, 8), (16, 3, 3)),
    ("DIGITS conv2", (16, 6, 6), (32, 3, 3)),
    ("MNIST conv1", (1, 28, 28), (20, 5, 5)),
    ("MNIST conv2", (20, 24, 24), (50, 5, 5)),
    ("CIFAR conv1", (3, 32, 32), (32, 5, 5)),
    ("CIFAR conv2", (32, 28, 28), (64, 3, 3)),
]
PASSES = ("forward", "filter", "input")
TARGET_RATIO = 0.8
TARGET_SCALING = 1.7
# The peak target: the conv passes of these layers at >= 90% of the FMA peak at 1 thread,
# and 2 threads >= 1.9x 1 thread
PEAK_LAYERS = ("MNIST conv2", "CIFAR conv2")
TARGET_PEAK_SHARE = 0.9
TARGET_PEAK_SCALING = 1.9


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(candidates, repeat, min_time=0.3, clock=time.perf_counter):
    """Median time of each (setup, fn) candidate, timed round-robin.

    Round-robin puts every candidate under the same background load (the machine is shared),
    which makes the ratios trustworthy even when the absolute figures drift.
    """
    for setup, fn in candidates:  # warm up: first-touch pages, thread pools, caches
        setup()
        fn()
    times = [[] for _ in candidates]
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat or (time.perf_counter() - start < min_time and rounds < 20 * repeat):
        for (setup, fn), bucket in zip(candidates, times):
            setup()
            t0 = clock()
            fn()
            bucket.append(clock() - t0)
        rounds += 1
    return [statistics.median(bucket) for bucket in times]


def fma_peak_gflops(threads, clock, rounds=5, iters=4_000_000):
    """GFLOP/s of the FMA-bound loop on `threads` threads: the best of `rounds` runs."""
    module = backend.load_build(backend.available_builds()[0])   # the widest vectors here
    module.fma_flops(iters // 10, threads)   # warm up: wake the threads, raise the clock
    best = 0.0
    for _ in range(rounds):
        t0 = clock()
        flops = module.fma_flops(iters, threads)
        best = max(best, flops / (clock() - t0) / 1e9)
    return best


def layer_problem(chw, fkk, batch, rng):
    (C, H, W), (F, kh, kw) = chw, fkk
    Ho, Wo = H - kh + 1, W - kw + 1
    x = rng.standard_normal((batch, C, H, W), dtype=np.float32)
    w = (rng.standard_normal((F, C, kh, kw), dtype=np.float32) * 0.1).astype(np.float32)
    b = rng.standard_normal(F, dtype=np.float32)
    dout = rng.standard_normal((batch, F, Ho, Wo), dtype=np.float32)
    return x, w, b, dout


def gemm_operands(pass_name, F, K, NP, rng):
    """Contiguous operands of the pass's GEMM (the shape np.matmul is timed on)."""
    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    if pass_name == "forward":
        return r(F, K), r(K, NP)
    if pass_name == "filter":
        return r(F, NP), r(NP, K)
    return r(K, F), r(F, NP)


def numpy_blas_threads(n):
    """A setup step that gives NumPy's BLAS n threads (cheap: no library scan)."""
    libraries = ThreadpoolController().select(user_api="blas").lib_controllers

    def setup():
        for lib in libraries:
            lib.set_num_threads(n)

    return setup


def run(args):
    rng = np.random.default_rng(0)
    info = convtrain.build_info()
    blas = ", ".join(f"{lib['prefix']} {lib['version']} ({lib['architecture']})" for lib in info["blas"])
    print(f"convtrain kernels: Cython {info['cython']}, OpenMP {info['openmp']}, "
          f"max threads {info['max_threads']}; BLAS: {blas}")
    print(f"batch {args.batch}, float32, valid, stride 1; medians of >= {args.repeat} "
          f"interleaved runs, {args.clock} clock; load average at start {os.getloadavg()[0]:.2f}\n")
    torch = None
    if args.torch:
        import torch

    clock = CLOCKS[args.clock]
    peaks = {threads: fma_peak_gflops(threads, clock) for threads in args.threads}
    print("FMA peak (" + ", ".join(f"{t} thread{'s' if t > 1 else ''}: {peaks[t]:.1f} GFLOP/s"
                                   for t in args.threads) + f"; build {info['isa']})\n")
    header = (f"{'layer':<13} {'pass':<8} {'GEMM M x K x N':>20} {'thr':>3} {'kernel ms':>9} "
              f"{'GF/s':>7} {'%peak':>6} {'matmul GF/s':>11} {'ratio':>6} {'im2col':>7}")
    if torch is not None:
        header += f" {'torch GF/s':>10} {'%torch':>6}"
    print(header)
    print("-" * len(header))
    results = {}
    winograd = {}   # (layer, pass, threads) -> im2col time / Winograd time
    layers = [layer for layer in LAYERS
              if not args.layers or any(word.lower() in layer[0].lower() for word in args.layers)]
    for name, chw, fkk in layers:
        x, w, b, dout = layer_problem(chw, fkk, args.batch, rng)
        (C, H, W), (F, kh, kw) = chw, fkk
        Ho, Wo = H - kh + 1, W - kw + 1
        K, NP = C * kh * kw, args.batch * Ho * Wo
        flops = 2.0 * F * K * NP
        calls = {
            "forward": lambda: kernels.conv2d_forward(x, w, b),
            "filter": lambda: kernels.conv2d_backward_filter(x, dout, (kh, kw)),
            "input": lambda: kernels.conv2d_backward_input(dout, w, x.shape),
        }
        gemm_shape = {"forward": (F, K, NP), "filter": (F, NP, K), "input": (K, F, NP)}
        winograd_calls = {}
        if kernels.winograd_applies((kh, kw), (1, 1)):
            winograd_calls = {
                "forward": lambda: kernels.conv2d_forward(x, w, b, algo="winograd"),
                "filter": lambda: kernels.conv2d_backward_filter(x, dout, (kh, kw), algo="winograd"),
                "input": lambda: kernels.conv2d_backward_input(dout, w, x.shape, algo="winograd"),
            }
        for pass_name in PASSES:
            A, B = gemm_operands(pass_name, F, K, NP, rng)
            candidates, labels = [], []
            for threads in args.threads:
                kernel_setup = (lambda t=threads: convtrain.set_num_threads(t))
                candidates += [(kernel_setup, calls[pass_name]),
                               (numpy_blas_threads(threads), lambda: np.matmul(A, B))]
                labels += [("kernel", threads), ("matmul", threads)]
                if pass_name == "forward":
                    candidates.append((kernel_setup, lambda: kernels.im2col(x, (kh, kw))))
                    labels.append(("im2col", threads))
                if pass_name in winograd_calls:
                    candidates.append((kernel_setup, winograd_calls[pass_name]))
                    labels.append(("winograd", threads))
                if torch is not None:
                    candidates.append((lambda t=threads: torch.set_num_threads(t),
                                       torch_call(torch, pass_name, x, w, b, dout)))
                    labels.append(("torch", threads))
            seconds = dict(zip(labels, interleaved_medians(candidates, args.repeat,
                                                            clock=CLOCKS[args.clock])))
            for threads in args.threads:
                kernel_s, matmul_s = seconds["kernel", threads], seconds["matmul", threads]
                kernel_gf, matmul_gf = flops / kernel_s / 1e9, flops / matmul_s / 1e9
                results[name, pass_name, threads] = (kernel_gf, matmul_gf, kernel_gf / peaks[threads])
                im2col_share = ""
                if ("im2col", threads) in seconds:
                    im2col_share = f"{100 * seconds['im2col', threads] / kernel_s:6.0f}%"
                M, Kd, N = gemm_shape[pass_name]
                torch_gf = flops / seconds["torch", threads] / 1e9 if torch is not None else None
                print_row(name, pass_name, f"{M} x {Kd} x {N}", threads, kernel_s, kernel_gf, peaks[threads],
                          f"{matmul_gf:11.1f}", kernel_gf / matmul_gf, im2col_share, torch_gf)
                if ("winograd", threads) in seconds:
                    wg_s = seconds["winograd", threads]
                    winograd[name, pass_name, threads] = kernel_s / wg_s
                    # the ratio column is Winograd's speed-up over im2col here, not over np.matmul
                    print_row(name, pass_name + "-wg", "16 GEMMs / image", threads, wg_s, flops / wg_s / 1e9,
                              peaks[threads], "", kernel_s / wg_s, "", torch_gf)
    convtrain.set_num_threads(max(args.threads))
    numpy_blas_threads(max(args.threads))()
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    summarize(results, args.threads, [layer[0] for layer in layers])
    if winograd:
        print("\nWinograd F(2x2,3x3) speed-up over im2col (time ratio, same run): "
              + ", ".join(f"{name} {pass_name} @{threads}t {ratio:.2f}x"
                          for (name, pass_name, threads), ratio in winograd.items()))


def torch_call(torch, pass_name, x, w, b, dout):
    xt, wt, bt, dt = (torch.from_numpy(a) for a in (x, w, b, dout))
    conv = torch.nn.functional.conv2d
    if pass_name == "forward":
        return lambda: conv(xt, wt, bt)
    if pass_name == "filter":
        return lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, dt)
    return lambda: torch.nn.grad.conv2d_input(xt.shape, wt, dt)


def summarize(results, thread_counts, layer_names):
    print("\nTargets: kernel >= 80% of np.matmul at the same thread count; "
          "2 threads >= 1.7x 1 thread on MNIST and CIFAR.")
    print(f"Peak target: {', '.join(PEAK_LAYERS)} passes >= {TARGET_PEAK_SHARE:.0%} of the FMA peak at "
          f"1 thread; 2 threads >= {TARGET_PEAK_SCALING}x 1 thread on them.")
    misses = []
    for (name, pass_name, threads), (kernel_gf, matmul_gf, peak_share) in results.items():
        if kernel_gf < TARGET_RATIO * matmul_gf:
            misses.append(f"{name} {pass_name} @{threads}t: {kernel_gf / matmul_gf:.2f} of np.matmul")
        if name in PEAK_LAYERS and threads == 1 and peak_share < TARGET_PEAK_SHARE:
            misses.append(f"{name} {pass_name} @1t: {peak_share:.0%} of the FMA peak")
    if 1 in thread_counts and 2 in thread_counts:
        print(f"\n{'layer':<13} {'pass':<8} {'2t/1t kernel':>12} {'2t/1t matmul':>12}")
        for name in layer_names:
            for pass_name in PASSES:
                k1, m1, _ = results[name, pass_name, 1]
                k2, m2, _ = results[name, pass_name, 2]
                print(f"{name:<13} {pass_name:<8} {k2 / k1:12.2f} {m2 / m1:12.2f}")
                if not name.startswith("DIGITS") and k2 / k1 < TARGET_SCALING:
                    misses.append(f"{name} {pass_name}: 2 threads {k2 / k1:.2f}x 1 thread")
                elif name in PEAK_LAYERS and k2 / k1 < TARGET_PEAK_SCALING:
                    misses.append(f"{name} {pass_name}: 2 threads {k2 / k1:.2f}x 1 thread "
                                  f"(peak target: {TARGET_PEAK_SCALING}x)")
    print("\nall targets met" if not misses else "\nmissed:\n  " + "\n  ".join(misses))


def print_row(name, pass_name, shape, threads, seconds, gflops, peak, matmul, ratio, im2col_share, torch_gflops):
    """One line of the table: the pass, its time, GFLOP/s and share of the FMA peak, then the
    comparison columns (empty strings where a column does not apply) and oneDNN's share."""
    line = (f"{name:<13} {pass_name:<8} {shape:>20} {threads:>3} {seconds * 1e3:9.3f} {gflops:7.1f} "
            f"{100 * gflops / peak:5.0f}% {matmul:>11} {ratio:6.2f} {im2col_share:>7}")
    if torch_gflops is not None:
        line += f" {torch_gflops:10.1f} {100 * gflops / torch_gflops:5.0f}%"
    print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="minimum timed runs per entry")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", nargs="+", help="only layers whose name contains a word, e.g. MNIST")
    parser.add_argument("--torch", action="store_true", help="add PyTorch CPU's GFLOP/s")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall: elapsed time (what the targets mean); cpu: CPU time of the process, "
             "robust to other load on the machine but only meaningful at 1 thread",
    )
    run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
