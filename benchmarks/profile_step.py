"""Where a convtrain training step spends its time: per layer and per phase.

Times every layer's forward and backward, the loss, the L2 terms and the SGD update inside
Trainer.train_step (the layers' and optimizer's methods are wrapped with timers for the run;
the step itself is unchanged). "python/other" is the step's time not inside any of them
(argument checks, dicts, accuracy, the step's own bookkeeping).
A conv layer's kernel time is split further by timing, on the same arrays and thread count,
the standalone im2col (forward and filter gradient build the same columns) and col2im
(input gradient) kernels: an upper bound of their share, since inside the fused kernels
the columns stay in cache; the rest is GEMM (+ the bias row). Layers run the algorithm `convtrain fit` gives them
(--conv-algo, default auto, as the fit's): a Winograd layer's phases say so, and get no split.

    python benchmarks/profile_step.py --nets digits,mnist,cifar --threads 1,2 [--clock cpu] [--conv-algo im2col]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

import convtrain
from convtrain.nn import kernels, layers
from convtrain.training import step as train_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import BATCH, LR, NETS, batches, build_network, trainer_for  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class PhaseTimer:
    """Accumulates seconds per label; `wrap` times a bound method under a label."""

    def __init__(self, clock):
        self.clock = clock
        self.seconds = collections.Counter()

    def wrap(self, owner, attribute, label):
        original = getattr(owner, attribute)
        clock, seconds = self.clock, self.seconds

        def timed(*args, **kwargs):
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += clock() - started
        setattr(owner, attribute, timed)


CONV_PARTS = {"im2col": "im2col+GEMM+bias", "winograd": "winograd"}

def phase_label(layer, direction):
    kind = type(layer).__name__
    if isinstance(layer, layers.Conv2D):
        what = (f"conv ({CONV_PARTS[layer.algo]})" if direction == "forward"
                else f"conv grads (filter+input, {layer.algo})" if layer.filter_algo == layer.algo
                else f"conv grads (filter {layer.filter_algo}, input {layer.algo})")
    elif isinstance(layer, layers.ReLU):
        what = "ReLU" if direction == "forward" else "ReLU backward"
    elif isinstance(layer, layers.Dense):
        what = "dense GEMM+bias" if direction == "forward" else "dense grads"
    elif isinstance(layer, layers.MaxPool2D):
        what = "max pooling" if direction == "forward" else "max pooling backward"
    else:
        what = kind.lower()
    return f"{layer.name:<10} {what}"


def profile(net, threads, steps, clock, conv_algo="auto"):
    """{label: seconds per step} for `steps` train steps of net at `threads` threads."""
    spec = NETS[net]
    network = build_network(spec)
    network.set_conv_algo(conv_algo)
    trainer = trainer_for(network)
    xs, ys = batches(spec)
    convtrain.set_num_threads(threads)
    from threadpoolctl import threadpool_limits
    timer = PhaseTimer(CLOCKS[clock])
    with threadpool_limits(threads, user_api="blas"):
        for i in range(3):  # warm-up, unwrapped
            trainer.train_step(xs[i % 4], ys[i % 4], LR)
        # a residual block's layers (its add and ReLU fall under python/other)
        for layer in network.leaf_layers():
            for direction in ("forward", "backward"):
                timer.wrap(layer, direction, phase_label(layer, direction))
        loss_function = train_module.softmax_cross_entropy
        timer.wrap(train_module, "softmax_cross_entropy", "softmax + cross-entropy")
        timer.wrap(network, "add_l2_gradients", "L2 gradient")
        timer.wrap(network, "l2_penalty", "L2 penalty")
        timer.wrap(trainer.optimizer, "step", "SGD update")
        started = timer.clock()
        for i in range(steps):
            trainer.train_step(xs[i % 4], ys[i % 4], LR)
        total = timer.clock() - started
        # standalone im2col / col2im on the arrays of each conv layer
        x = xs[0]
        conv_parts = {}
        for layer in network.layers:
            if not isinstance(layer, (layers.Conv2D, layers.MaxPool2D, layers.ReLU)):
                break  # the convs of the plain stack only (not inside residual blocks)
            if isinstance(layer, layers.Conv2D):
                out_shape = kernels.conv2d_output_shape(x.shape, layer.params["weight"].shape)
                cols = kernels.im2col(x, layer.kernel_size)
                im2col_s = _median_time(lambda: kernels.im2col(x, layer.kernel_size), timer.clock)
                col2im_s = _median_time(lambda: kernels.col2im(cols, x.shape, layer.kernel_size), timer.clock)
                if layer.algo == "im2col":
                    conv_parts[layer.name] = (im2col_s, col2im_s, layer.needs_input_grad)
                x = np.maximum(kernels.conv2d_forward(x, layer.params["weight"], layer._bias), 0)
                assert x.shape == out_shape
            elif isinstance(layer, (layers.MaxPool2D,)):
                x = layer.forward(x)
    train_module.softmax_cross_entropy = loss_function
    per_step = {label: s / steps for label, s in timer.seconds.items()}
    per_step["python/other"] = total / steps - sum(per_step.values())
    return per_step, total / steps, conv_parts


def _median_time(fn, clock, repeat=15):
    times = []
    for _ in range(repeat):
        started = clock()
        fn()
        times.append(clock() - started)
    return sorted(times)[len(times) // 2]


def print_profile(net, threads, per_step, total, conv_parts, clock):
    print(f"\n{net} at {threads} thread(s), batch {BATCH}, float32: {total * 1e3:.3f} ms per step "
          f"({BATCH / total:,.0f} images/s), {clock} clock")
    print(f"  {'phase':<46} {'ms/step':>8} {'share':>6}")
    for label, seconds in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"  {label:<46} {seconds * 1e3:8.3f} {100 * seconds / total:5.1f}%")
    for name, (im2col_s, col2im_s, has_input_grad) in conv_parts.items():
        forward = per_step.get(f"{name:<10} conv ({CONV_PARTS['im2col']})", 0.0)
        backward = per_step.get(f"{name:<10} conv grads (filter+input, im2col)", 0.0)
        im2col_total = 2 * im2col_s
        col2im_total = col2im_s if has_input_grad else 0.0
        gemm = forward + backward - im2col_total - col2im_total
        print(f"    {name}: im2col x2 {im2col_total * 1e3:.3f} ms, col2im {col2im_total * 1e3:.3f} ms "
              f"(standalone, upper bounds), GEMM+rest {gemm * 1e3:.3f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="digits,mnist,cifar")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--conv-algo", choices=["auto", "im2col", "winograd"], default="auto",
                        help="the conv layers' algorithm (conv_algo); auto as convtrain fit")
    args = parser.parse_args(argv)
    for net in args.nets.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            steps = max(5, NETS[net]["steps"] * 3)
            print_profile(net, threads, *profile(net, threads, steps, args.clock, args.conv_algo), args.clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
