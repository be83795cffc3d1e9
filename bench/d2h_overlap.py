"""Does a device-to-host copy on a side stream overlap compute on the default stream? (GPU diagnostic)

    python bench/d2h_overlap.py [--gib 5] [--tensors 300]

Times, in one run: (a) the copy alone, (b) the compute alone (fp32 4096^2 matmuls, ~100 ms),
(c) both queued together, copy on a side stream into pinned buffers, waiting for each separately. Overlap
works when (c)'s total is about max(a, b), not a + b. The copy is split into `--tensors` pieces like a
checkpoint snapshot. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=5.0)
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--matmuls", type=int, default=40)
    args = ap.parse_args()
    n = int(args.gib * 2**30 / 4 / args.tensors)
    src = [torch.randn(n, device="cuda") for _ in range(args.tensors)]
    dst = [torch.empty(n, pin_memory=True) for _ in range(args.tensors)]
    a = torch.randn(4096, 4096, device="cuda")
    side = torch.cuda.Stream()

    def copy():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            ev = torch.cuda.Event(blocking=True)
            ev.record(side)
        return ev

    def compute():
        x = a
        for _ in range(args.matmuls):
            x = torch.tanh(x @ x)
        return x

    for _ in range(2):
        copy().synchronize()
        compute()
        torch.cuda.synchronize()
    out = {}
    t0 = time.perf_counter()
    copy().synchronize()
    out["copy_alone_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compute()
    torch.cuda.synchronize()
    out["compute_alone_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = copy()
    out["queue_copy_s"] = time.perf_counter() - t0
    compute()
    torch.cuda.current_stream().synchronize()
    out["compute_done_s"] = time.perf_counter() - t0
    ev.synchronize()
    out["both_done_s"] = time.perf_counter() - t0
    out["gib"], out["tensors"] = args.gib, args.tensors
    out["copy_GBps"] = args.gib * 2**30 / out["copy_alone_s"] / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
