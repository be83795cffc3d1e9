"""`moestack serve` under torchrun: rank 0 is the HTTP front end, every other rank follows its engine.

Rank 0 runs the usual server (server.py, worker.py) on a `FrontEnd`: an `LLM` look-alike that wraps rank 0's
expert-parallel engine. What the engine thread asks of it goes to the other ranks as ops, broadcast over
the EP group before each step:
- `add_request` checks the prompt and the id on rank 0 (ValueError as in one process), then queues an op.
  Under the home flow each request belongs to one rank, given in turn (rank 0 adds its own at once); under
  the follow flow every rank adds every request.
- `abort` queues an op; whichever ranks hold the request abort it.
- `step` broadcasts the queued ops with a step flag; every rank applies them, then runs one `LLM.step`, so
  the MoE all-to-alls line up. Under home the other ranks' outputs are gathered to rank 0; under follow
  rank 0's own are complete (every rank runs every request).
- `tick` (while idle) broadcasts no ops and no step, so the followers' collective never waits past the
  process group's timeout.
- `close` tells the followers to leave.
The other ranks run `follow_rank_zero` until then; they ignore SIGINT and SIGTERM (torchrun forwards them
to every rank) and leave when rank 0 has drained and closed.
A step that fails on any rank leaves the ranks' collectives out of step, which no rank can recover from:
the failing process logs the error and exits at once with status 1, and torchrun stops the others (one
process would fail the requests in flight and go on; under EP the server dies loudly instead of hanging).
The server's admission queue and /metrics count rank 0's engine (under home, its share of the requests).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch.distributed as dist

from moestack.parallel.mesh import ParallelContext
from moestack.serve.engine import LLM, _params
from moestack.serve.ep import gather_objects
from moestack.serve.params import RequestOutput

TICK_S = 30.0  # seconds between idle broadcasts (the gloo and NCCL timeouts are minutes)
log = logging.getLogger("moestack")


class FrontEnd:
    """Rank 0's engine under torchrun, as the server's engine thread sees it (attributes it does not define
    are the wrapped LLM's)."""

    def __init__(self, llm: LLM, ctx: ParallelContext):
        if ctx.ep_rank != 0:
            raise ValueError("FrontEnd runs on EP rank 0; the other ranks run follow_rank_zero")
        self.llm, self.ctx = llm, ctx
        self.ops: list[tuple] = []
        self.remote: dict[str, int] = {}  # request id -> the rank that holds it (home flow, ranks > 0)
        self._turn = 0
        # the engine thread steps and ticks, the main thread closes: one collective sequence at a time
        self._collective = threading.Lock()
        self.closed = False
        self.last_sync = time.monotonic()

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def add_request(self, prompt, params=None, request_id: str | None = None) -> str:
        """Checked here (a refusal is forwarded to no rank), then queued for the ranks that run it."""
        llm = self.llm
        if request_id in self.remote:
            raise ValueError(f"request id {request_id!r} is already in use")
        owner = None if llm.replicated else self._turn % self.ctx.ep
        params = _params(params)
        if owner in (None, 0):
            rid = llm.add_request(prompt, params, request_id)
        else:  # another rank's: the checks add_request makes, without queueing it here
            llm.check_prompt(llm.encode_prompt(prompt)[0], params)
            rid = request_id if request_id is not None else f"req-{next(llm._ids)}"
            if rid in llm.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            self.remote[rid] = owner
        self._turn += 1
        self.ops.append(("add", owner, prompt, params, rid))
        return rid

    def abort(self, request_id: str) -> bool:
        known = self.remote.pop(request_id, None) is not None
        self.ops.append(("abort", request_id))
        return self.llm.abort(request_id) or known

    def has_unfinished(self) -> bool:
        return self.llm.has_unfinished() or bool(self.remote) or bool(self.ops)

    def step(self) -> list[RequestOutput]:
        with self._collective:
            if self.closed:
                return []
            ops, self.ops = self.ops, []
            try:
                _broadcast((ops, True), self.ctx)
                outs = self.llm.step()
                parts = [] if self.llm.replicated else gather_objects(outs, self.ctx)[1:]
            except Exception:
                _die("the engine step failed on EP rank 0")
            self.last_sync = time.monotonic()
        for part in parts:
            for out in part:
                if out.finished:
                    self.remote.pop(out.request_id, None)
                outs.append(out)
        return outs

    def tick_in(self) -> float:
        """Seconds until the next idle broadcast is due (the engine thread waits at most that long)."""
        return max(0.0, self.last_sync + TICK_S - time.monotonic())

    def tick(self) -> None:
        """Idle: let the other ranks' wait end and begin again."""
        with self._collective:
            if self.closed:
                return
            ops, self.ops = self.ops, []
            try:
                _broadcast((ops, False), self.ctx)
            except Exception:
                _die("the idle broadcast failed on EP rank 0")
            self.last_sync = time.monotonic()

    def close(self) -> None:
        """Tell the other ranks to leave; later steps and ticks do nothing."""
        with self._collective:
            if not self.closed:
                self.closed = True
                _broadcast(([("stop",)], False), self.ctx)


def follow_rank_zero(llm: LLM, ctx: ParallelContext) -> None:
    """Apply rank 0's ops and step with it until it closes (every rank but EP rank 0)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains, then closes: leave then
        signal.signal(sig, signal.SIG_IGN)
    me = ctx.ep_rank
    while True:
        try:
            ops, step = _broadcast(None, ctx)
            for op in ops:
                if op[0] == "stop":
                    return
                if op[0] == "add" and op[1] in (None, me):
                    llm.add_request(op[2], op[3], op[4])
                elif op[0] == "abort":
                    llm.abort(op[1])
            if step:
                outs = llm.step()
                if not llm.replicated:
                    gather_objects(outs, ctx)
        except Exception:
            _die(f"EP rank {me} failed while following rank 0")


def _die(what: str) -> None:
    """Log the exception being handled and exit now: the ranks' collectives are out of step (see the module
    docstring); torchrun stops the other ranks."""
    log.exception("%s; the ranks cannot continue in lock-step, so this process exits (torchrun stops the others)", what)
    logging.shutdown()
    os._exit(1)


def _broadcast(obj, ctx: ParallelContext):
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.ep_group, 0), group=ctx.ep_group)
    return box[0]
