"""Time forward+backward of one LSTM layer, ours against PyTorch's, at captioning shapes.

    python benchmarks/lstm_speed.py                       # N=128, T=17, D=256, H=512
    python benchmarks/lstm_speed.py --hidden-size 256 --repeats 50 --json

Every implementation runs the same layer (same weights, inputs and output gradients) in one
process, in interleaved rounds so that load from other processes falls on all of them alike:

    lstm_forward                 torch_lstmcap.lstm_forward (hand-written sequence backward)
                                 with its fused CPU gate kernel and oneDNN products (if the
                                 kernel cannot be built, the library logs a warning and runs
                                 the gate arithmetic in PyTorch operations)
    lstm_forward (PyTorch path)  the same with LSTMCAP_FUSED=0: the gate arithmetic in PyTorch
                                 operations and the products through torch.mm, the reference
                                 the fused path is tested against
    nn.LSTM                      torch.nn.LSTM, batch first
    nn.LSTMCell loop             torch.nn.LSTMCell called once per step from Python
    autograd                     the math of lstm_forward in plain PyTorch ops, autograd's backward
    matmul floor (torch.mm)      the matrix products alone, no gate arithmetic, through torch.mm
    matmul floor (oneDNN)        the same products through oneDNN, as lstm_forward runs them on
                                 the CPU in float32 (left out where torch lacks oneDNN)

The table lists the median and the minimum time of each, each as a ratio to nn.LSTM, the
minimum as a ratio to the matmul floor (the faster of the two product libraries: what no LSTM
beats), and the bytes each implementation saves for the
backward (distinct tensor storages packed by autograd, inputs and weights included).

On a machine shared with other work, wall time mostly measures the neighbours. Minima over
many rounds are the steadier figure; `--threads 1 --cpu-time` times the CPU time of the one
computing thread, which leaves out the time spent waiting for a core.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_lstmcap.lstm import LSTM, lstm_forward, split_gates  # noqa: E402
from torch_lstmcap.products import add_matmul_, matmul, onednn_linear  # noqa: E402

IMPLEMENTATIONS = (
    "lstm_forward",
    "lstm_forward (PyTorch path)",
    "nn.LSTM",
    "nn.LSTMCell loop",
    "autograd",
    "matmul floor (torch.mm)",
    "matmul floor (oneDNN)",
)
FLOORS = ("matmul floor (torch.mm)", "matmul floor (oneDNN)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="N")
    parser.add_argument("--seq-len", type=int, default=17, help="T")
    parser.add_argument("--input-size", type=int, default=256, help="D")
    parser.add_argument("--hidden-size", type=int, default=512, help="H")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the calling thread's CPU time instead of wall time (use with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=list(IMPLEMENTATIONS),
        help="time only these implementations (nn.LSTM is always timed, as the reference)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def autograd_lstm(x: Tensor, h0: Tensor, c0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """The math of lstm_forward in plain ops, differentiated by autograd. Returns h: (N, T, H)."""
    prev_h, prev_c = h0, c0
    hs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ Wx + prev_h @ Wh + b
        i, f, o, g = split_gates(a)
        prev_c = torch.sigmoid(f) * prev_c + torch.sigmoid(i) * torch.tanh(g)
        prev_h = torch.sigmoid(o) * torch.tanh(prev_c)
        hs.append(prev_h)
    return torch.stack(hs, dim=1)


def make_cases(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], dict]:
    """Build one zero-argument forward+backward closure per implementation."""
    N, T, D, H = args.batch_size, args.seq_len, args.input_size, args.hidden_size
    layer = LSTM(D, H)
    torch_lstm = layer.to_torch()
    cell = nn.LSTMCell(D, H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch_lstm.weight_ih_l0)
        cell.weight_hh.copy_(torch_lstm.weight_hh_l0)
        cell.bias_ih.copy_(torch_lstm.bias_ih_l0)
        cell.bias_hh.copy_(torch_lstm.bias_hh_l0)

    x = torch.randn(N, T, D, requires_grad=True)
    h0 = torch.randn(N, H, requires_grad=True)
    c0 = torch.randn(N, H, requires_grad=True)
    grad_h = torch.randn(N, T, H)
    Wx, Wh, b = layer.Wx, layer.Wh, layer.b

    def ours() -> Tensor:
        return lstm_forward(x, h0, Wx, Wh, b, c0=c0)[0]

    def ours_pytorch_path() -> Tensor:
        # The backward follows the path its forward took, so only the forward needs the switch.
        with fused_kernel_disabled():
            return lstm_forward(x, h0, Wx, Wh, b, c0=c0)[0]

    def torch_module() -> Tensor:
        return torch_lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)))[0]

    def cell_loop() -> Tensor:
        state = (h0, c0)
        hs = []
        for t in range(T):
            state = cell(x[:, t], state)
            hs.append(state[0])
        return torch.stack(hs, dim=1)

    def plain() -> Tensor:
        return autograd_lstm(x, h0, c0, Wx, Wh, b)

    forwards = {
        "lstm_forward": ours,
        "lstm_forward (PyTorch path)": ours_pytorch_path,
        "nn.LSTM": torch_module,
        "nn.LSTMCell loop": cell_loop,
        "autograd": plain,
    }

    def run(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            torch.autograd.backward(forward(), grad_h)

        return step

    forwards = {
        name: forward
        for name, forward in forwards.items()
        if name in args.only or name == "nn.LSTM"
    }
    cases = {name: run(forward) for name, forward in forwards.items()}
    tensors = x.detach(), h0.detach(), Wx.detach(), Wh.detach()
    if "matmul floor (torch.mm)" in args.only:
        cases["matmul floor (torch.mm)"] = matmul_floor(*tensors, op=None)
    if "matmul floor (oneDNN)" in args.only and onednn_linear() is not None:
        cases["matmul floor (oneDNN)"] = matmul_floor(*tensors, op=onednn_linear())
    saved = {name: saved_bytes(forward) for name, forward in forwards.items()}
    return cases, saved


@contextlib.contextmanager
def fused_kernel_disabled():
    """Run lstm_forward on its PyTorch path (LSTMCAP_FUSED=0) inside the block."""
    previous = os.environ.get("LSTMCAP_FUSED")
    os.environ["LSTMCAP_FUSED"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LSTMCAP_FUSED"]
        else:
            os.environ["LSTMCAP_FUSED"] = previous


def matmul_floor(
    x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, op: object | None
) -> Callable[[], None]:
    """The matrix products of an LSTM's forward and backward, as torch_lstmcap.products runs
    them: through the oneDNN op when it is given, else through torch.mm."""
    N, T, D = x.shape
    H = Wh.shape[0]
    da = torch.randn(N, T, 4 * H)
    h = torch.randn(N, T, H)
    x_flat, da_flat, h_flat = x.view(N * T, D), da.view(N * T, 4 * H), h.view(N * T, H)

    def step() -> None:
        gates = matmul(x_flat, Wx, op).view(N, T, 4 * H)
        prev_h = h0
        for t in range(T):
            add_matmul_(gates[:, t], prev_h, Wh, op)
            prev_h = h[:, t]
        for t in reversed(range(T)):
            matmul(da[:, t], Wh.t(), op)
        matmul(da_flat, Wx.t(), op)
        matmul(x_flat.t(), da_flat, op)
        matmul(h_flat.t(), da_flat, op)

    return step


def saved_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of forward()."""
    storages = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def measure(
    cases: dict[str, Callable[[], None]], repeats: int, warmup: int, clock: Callable[[], float]
) -> dict:
    """Time each case once per round, rounds interleaved; return seconds per case."""
    times = {name: [] for name in cases}
    for round_index in tqdm(range(warmup + repeats), desc="rounds", file=sys.stderr):
        for name, step in cases.items():
            start = clock()
            step()
            elapsed = clock() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times: dict, saved: dict) -> dict:
    """Per implementation: median and minimum in ms, their ratios to nn.LSTM, the minimum's
    ratio to the matmul floor (None when it was not timed) and the bytes saved."""
    reference_median = statistics.median(times["nn.LSTM"])
    reference_min = min(times["nn.LSTM"])
    floors = [min(times[name]) for name in FLOORS if name in times]
    floor_min = min(floors) if floors else None
    rows = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows[name] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(seconds),
            "median_ratio": median / reference_median,
            "min_ratio": min(seconds) / reference_min,
            "min_floor_ratio": None if floor_min is None else min(seconds) / floor_min,
            "saved_bytes": saved.get(name),
        }
    return rows


def print_table(rows: dict, args: argparse.Namespace) -> None:
    clock = "thread CPU time" if args.cpu_time else "wall time"
    print(
        f"LSTM forward+backward, N={args.batch_size} T={args.seq_len} D={args.input_size} "
        f"H={args.hidden_size}, {torch.get_num_threads()} threads, {clock}, "
        f"{args.repeats} rounds"
    )
    print(
        f"{'implementation':<28} {'median ms':>10} {'min ms':>9} {'median/nn':>10} "
        f"{'min/nn':>7} {'min/floor':>10} {'saved MiB':>10}"
    )
    for name, row in rows.items():
        saved = "-" if row["saved_bytes"] is None else f"{row['saved_bytes'] / 2**20:.1f}"
        floor = "-" if row["min_floor_ratio"] is None else f"{row['min_floor_ratio']:.2f}"
        print(
            f"{name:<28} {row['median_ms']:>10.1f} {row['min_ms']:>9.1f} "
            f"{row['median_ratio']:>10.2f} {row['min_ratio']:>7.2f} {floor:>10} {saved:>10}"
        )


def main(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cases, saved = make_cases(args)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    rows = summarize(measure(cases, args.repeats, args.warmup, clock), saved)
    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        config["threads"] = torch.get_num_threads()
        print(json.dumps({"config": config, "results": rows}, indent=2))
    else:
        print_table(rows, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
