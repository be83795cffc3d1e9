"""ModelRunner: owns the KV cache, turns a scheduled batch into model inputs, runs the step, samples.

On CUDA every step runs as a CUDA graph where one was captured, so the host launches one graph instead of
the step's hundreds of kernels (a 1k-token prefill of 4 MoE layers took 16 ms of host time for 7 ms of GPU
work eagerly: bench/results/serve_prefill_profile_h200, 2026-12-03):
- steps of decodes only: one graph per batch size of a ladder (1, 2, 4, 8, 16, 24, 32, ...);
- other steps (prompts, prefill chunks, decodes mixed in): one graph per token count of a ladder (16 ... 512,
  every 256 to 2048, then every 512 up to `prefill_graph_tokens`), through the Triton paged prefill kernel.
The batch is padded to the next captured size; padding rows write to and read from the scratch block, and
everything in the step (Triton paged attention, routing, the MoE kernels) replays without a host sync. The one
sync per step is reading the sampled tokens. Larger steps run eagerly; on the CPU every step is eager through
the reference attention (`attention.attend_ref`).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from moestack.moe.experts import triton_runs
from moestack.serve.attention import AttnMeta, prefill_block_q, query_blocks
from moestack.serve.model import ServeModel, compile_elementwise
from moestack.serve.params import SamplingParams, TokenLogprob
from moestack.serve.sampling import Logprobs, sample
from moestack.serve.sequence import Sequence

log = logging.getLogger("moestack")


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured as CUDA graphs: 1, 2, 4, 8, then every 8 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class ModelRunner:
    """Runs one engine step of a ServeModel over its paged KV cache."""

    def __init__(self, model: ServeModel, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, cuda_graphs: bool, fused_rows: int, compile: bool = True,
                 prefill_graph_tokens: int = 0):
        self.model = model
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        spec = model.spec
        self.block_size, self.num_blocks, self.max_model_len = block_size, num_blocks, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch = num_blocks  # the extra block padding rows use
        shape = (num_blocks + 1, block_size, spec.n_kv_heads, spec.head_dim)
        self.kv = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in model.blocks]
        for layer in model.moe_layers():
            layer.fused_rows = fused_rows
            layer.count_tokens = False  # the engine reads each step's loads (`last_loads`), not running totals
            layer.router.aux_loss_coef = layer.router.z_loss_coef = 0.0  # no training losses while serving
        probe = torch.empty(0, device=self.device)
        self.triton_decode = triton_runs(probe) and self.device.type == "cuda"
        # every other step through the Triton prefill kernel, except under the token-follows-expert flow (its
        # ranks attend a share of the step's queries: the reference path)
        self.paged_prefill = self.triton_decode and model.flow is None
        self.block_q = prefill_block_q(spec.n_heads, spec.n_kv_heads)
        self.graphs: dict[int, tuple] = {}  # decode steps: batch size -> (graph, logits, argmax, routing snapshot)
        self.prefill_graphs: dict[int, tuple] = {}  # other steps: token count -> (graph, hidden, routing snapshot)
        self._pool = None
        self._loads: tuple | None = None  # the last step's (routing snapshot, valid rows or None): `last_loads`
        if compile and self.device.type == "cuda":
            compile_elementwise()
        model.fused_norms = self.triton_decode
        for layer in model.moe_layers():  # routers: softmax, top-k, weights and counts in one kernel
            if self.triton_decode:
                layer.router.fused_topk = True
            elif compile and self.device.type == "cuda":
                layer.router.compile(dynamic=True)
        if cuda_graphs and self.device.type == "cuda":
            if prefill_graph_tokens and self.paged_prefill:
                self.capture_prefill(prefill_graph_tokens, max_num_seqs)
            self.capture(max_num_seqs)

    @property
    def last_loads(self) -> torch.Tensor | None:
        """Token-choices per expert of the last step run, per MoE layer [L_moe, E] (counted when read; a graph
        step's buffers hold the last replay's routing)."""
        return None if self._loads is None else self.model.expert_loads(self._loads[1], self._loads[0])

    @staticmethod
    def kv_bytes_per_block(model: ServeModel, block_size: int) -> int:
        s = model.spec
        return 2 * len(model.blocks) * block_size * s.n_kv_heads * s.head_dim * model.embed.weight.element_size()

    # -- inputs -------------------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, n: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    def host_inputs(self, batch: list[tuple[Sequence, int]], ahead: int = 0) -> dict:
        """The step's inputs as host lists: tokens, positions and slots [T], new tokens (qlen) and keys (ctx) per
        sequence [B], and the rows [N] of the tokens whose logits are sampled."""
        tokens, positions, slots, qlen, ctx, last = [], [], [], [], [], []
        for seq, n in batch:
            start = seq.num_computed + ahead
            tokens += seq.token_ids[start:start + n] if not ahead else [0]
            positions += range(start, start + n)
            slots += self._slots(seq, start, n)
            ctx.append(start + n)
            qlen.append(n)
            if start + n >= len(seq):
                last.append(len(tokens) - 1)
        return dict(tokens=tokens, positions=positions, slots=slots, qlen=qlen, ctx=ctx, last=last)

    def _tables(self, batch: list[tuple[Sequence, int]], width: int) -> torch.Tensor:
        """Block tables [B, width] int64 on the host, the scratch block past each sequence's blocks."""
        tables = torch.full((len(batch), width), self.scratch, dtype=torch.long)
        for b, (seq, _) in enumerate(batch):
            tables[b, :len(seq.block_table)] = torch.tensor(seq.block_table[:width])
        return tables

    def prepare(self, batch: list[tuple[Sequence, int]], ahead: int = 0):
        """(tokens [T], positions [T], AttnMeta, rows [N] of the tokens whose logits are sampled). ahead = 1: a
        decode step one position past num_computed (its tokens come from the device; see `launch`)."""
        inp = self.host_inputs(batch, ahead)
        qlen, ctx = inp["qlen"], inp["ctx"]
        dev = self.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        tokens, positions, slots, last = (as_t(inp[key]) for key in ("tokens", "positions", "slots", "last"))
        B, Q, L = len(batch), max(qlen), max(ctx)
        q_seq = as_t([b for b, n in enumerate(qlen) for _ in range(n)])
        q_row = as_t([r for n in qlen for r in range(n)])
        decode = all(n == 1 for n in qlen) and self.triton_decode
        if all(c == n for c, n in zip(ctx, qlen)) and not (decode or self.paged_prefill):
            # new prompts only: attend to the step's own keys
            return tokens, positions, AttnMeta(slots=slots, q_seq=q_seq, q_row=q_row, fresh=True, batch=B, max_q=Q), last
        tables = self._tables(batch, -(-L // self.block_size)).to(dev)
        if decode or self.paged_prefill:
            meta = AttnMeta(slots=slots, block_tables=tables.to(torch.int32),
                            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev))
            if not decode:
                meta.q_start = torch.tensor([0] + list(itertools.accumulate(qlen)), dtype=torch.int32, device=dev)
                meta.q_blocks = query_blocks(meta.q_start, self.block_q, -(-len(inp["tokens"]) // self.block_q) + B)
            return tokens, positions, meta, last
        pos = torch.arange(L, device=dev)
        key_slots = tables.gather(1, (pos // self.block_size).expand(B, L)) * self.block_size + pos % self.block_size
        ctx_t, qlen_t = as_t(ctx), as_t(qlen)
        rows = torch.arange(Q, device=dev)
        q_abs = torch.where(rows < qlen_t[:, None], ctx_t[:, None] - qlen_t[:, None] + rows, 0)  # [B, Q]
        mask = (pos[None, None, :] <= q_abs[:, :, None]) & (pos[None, None, :] < ctx_t[:, None, None])
        meta = AttnMeta(slots=slots, q_seq=q_seq, q_row=q_row, key_slots=key_slots, mask=mask.unsqueeze(1))
        return tokens, positions, meta, last

    @torch.inference_mode()
    def idle(self) -> None:
        """A one-token forward into the scratch block, results dropped: an EP rank with no work of its own still
        takes part in the step's all-to-alls (serve/ep.py)."""
        dev = self.device
        one = torch.zeros(1, dtype=torch.long, device=dev)
        meta = AttnMeta(slots=one + self.scratch * self.block_size, q_seq=one, q_row=one, fresh=True, batch=1, max_q=1)
        self.model.hidden(one, one, self.kv, meta)

    # -- the step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], sample_for: list[Sequence],
            generators: list[torch.Generator | None]) -> list[int]:
        """Run the step; the sampled token of each sequence in `sample_for` (those whose last token ran)."""
        return self.launch(batch, sample_for, generators).result()

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Sequence, int]], sample_for: list[Sequence],
               generators: list[torch.Generator | None], ahead: torch.Tensor | None = None) -> "Launched":
        """Queue the step on the device and return at once; `.result()` waits for its sampled tokens.

        ahead: a decode step one token past what the host knows (the engine's pipelining): every sequence
        runs position num_computed + 1 and its input token is ahead[i], a device tensor (the previous
        step's sampled token, not yet read back)."""
        decode = all(n == 1 for _, n in batch)
        graph = self._graph_for(len(batch)) if decode else None
        prefill = None if decode or ahead is not None else self._prefill_graph_for(sum(n for _, n in batch))
        greedy = None
        if graph is not None:
            logits, greedy, loads = self._replay(graph, batch, ahead)
            logits, greedy = logits[: len(batch)], greedy[: len(batch)]
            rows = sampled_rows(batch, sample_for)
            if rows is not None:  # a one-token chunk of a longer prompt samples nothing
                rows = torch.tensor(rows, dtype=torch.long, device=self.device)
                logits, greedy = logits.index_select(0, rows), greedy.index_select(0, rows)
        elif prefill is not None:
            h, loads, last = self._replay_prefill(prefill, batch)
            logits = self.model.logits(h.index_select(0, last))
        else:
            tokens, positions, meta, last = self.prepare(batch, 0 if ahead is None else 1)
            if ahead is not None:
                tokens = ahead
            logits = self.model.logits(self.model.hidden(tokens, positions, self.kv, meta, rows=last))
            loads = (self.model.routing_snapshot(), None)
        self._loads = loads
        graphed = graph is not None or prefill is not None
        if not sample_for:
            return Launched(batch, None, graphed=graphed)
        params = [s.params for s in sample_for]
        outputs = [s.output_ids for s in sample_for] if any(p.penalized for p in params) else None
        tokens, logprobs = sample(logits, params, generators, outputs, greedy)
        return Launched(batch, tokens, logprobs, params, graphed=graphed)

    # -- CUDA graphs --------------------------------------------------------------------------------------
    def _graph_for(self, n: int):
        for size in sorted(self.graphs):
            if size >= n:
                return size
        return None

    def capture(self, max_num_seqs: int) -> None:
        """Capture the decode step for each size of `graph_sizes(max_num_seqs)`."""
        from moestack.serve.argmax_triton import argmax_rows  # greedy rows' tokens, taken in the graph
        dev, m = self.device, max_num_seqs
        # the graphs' inputs in two buffers, each filled by one copy from the host per step: int64 rows (tokens,
        # positions, cache slots, valid) and int32 context lengths [m] followed by the block tables [m, max_blocks]
        self.g_long = torch.zeros(4, m, dtype=torch.long, device=dev)
        self.g_long[2] = self.scratch * self.block_size
        self.g_tokens, self.g_positions, self.g_slots, self.g_valid = self.g_long
        self.g_int = torch.full((m * (1 + self.max_blocks),), self.scratch, dtype=torch.int32, device=dev)
        self.g_int[:m] = 1
        self.g_lens, self.g_tables = self.g_int[:m], self.g_int[m:].view(m, self.max_blocks)
        pool = self._pool
        for size in reversed(graph_sizes(m)):
            meta = AttnMeta(slots=self.g_slots[:size], block_tables=self.g_tables[:size],
                            context_lens=self.g_lens[:size], valid=self.g_valid[:size])

            def step():
                x = self.model.hidden(self.g_tokens[:size], self.g_positions[:size], self.kv, meta, normed=True)
                raw = self.model.head(x)  # the model's dtype: fp32 copies only for rows that need them
                return raw, argmax_rows(raw), self.model.routing_snapshot()

            with torch.inference_mode():
                step()  # warm-up: Triton compiles, allocations settle
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    outputs = step()
            pool = graph.pool()
            self.graphs[size] = (graph, *outputs)
        self._pool = pool
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    def _replay(self, size: int, batch: list[tuple[Sequence, int]], ahead: torch.Tensor | None = None):
        """Replay the decode graph of `size` rows for `batch`: (logits [size, V] in the model's dtype, their
        argmax [size], (routing snapshot, valid rows) for `last_loads`)."""
        graph, logits, greedy, snapshot = self.graphs[size]
        longs, lens, tables = self.decode_inputs(batch, size, self.g_long.shape[1], ahead is not None)
        width = tables.shape[1]
        # pinned sources: asynchronous copies (the host allocator keeps each buffer until its copy ran); whole
        # table rows follow the lengths in one copy while they are small, else the used columns go apart
        if size * self.max_blocks <= WHOLE_TABLE_ROWS:
            full = np.full((size, self.max_blocks), self.scratch, dtype=np.int32)
            full[:, :width] = tables
            ints = torch.from_numpy(np.concatenate([lens, full.ravel()])).pin_memory()
            self.g_int[:ints.numel()].copy_(ints, non_blocking=True)
        else:
            self.g_lens.copy_(torch.from_numpy(lens).pin_memory(), non_blocking=True)
            self.g_tables[:size, :width].copy_(torch.from_numpy(tables).pin_memory(), non_blocking=True)
        self.g_long.copy_(longs.pin_memory(), non_blocking=True)
        if ahead is not None:
            self.g_tokens[:len(batch)].copy_(ahead)
        graph.replay()
        return logits, greedy, (snapshot, self.g_valid[:size])


    def decode_inputs(self, batch: list[tuple[Sequence, int]], size: int, rows: int, ahead: bool = False):
        """A decode graph's inputs for `batch` on the host: (int64 [4, rows]: tokens, positions, cache slots,
        valid; context lengths [rows] int32; block tables [size, width] int32, width = the columns the batch
        uses). Rows past the batch: token 0 at position 0 on the scratch block, length 1, not valid; their
        tables hold the scratch block (the kernel reads a row's table up to its length only). ahead: the step
        one position past num_computed, its tokens filled from the device afterwards (zeros here)."""
        n, step, scratch = len(batch), int(ahead), self.scratch
        tokens = [0] * n if ahead else [seq.token_ids[seq.num_computed] for seq, _ in batch]
        positions = [seq.num_computed + step for seq, _ in batch]
        slots = [self._slots(seq, p, 1)[0] for (seq, _), p in zip(batch, positions)]
        pad = rows - n
        longs = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [scratch * self.block_size] * pad,
                              [1] * n + [0] * pad], dtype=torch.long)
        width = min(max(len(seq.block_table) for seq, _ in batch), self.max_blocks)
        tables = np.full((size, width), scratch, dtype=np.int32)
        for b, (seq, _) in enumerate(batch):
            row = seq.block_table[:width]
            tables[b, :len(row)] = row
        lens = np.ones(rows, dtype=np.int32)
        lens[:n] = [p + 1 for p in positions]
        return longs, lens, tables

    # -- CUDA graphs of the other steps (prefill chunks, prompts, decodes mixed in) -------------------------
    def _prefill_graph_for(self, n_tokens: int):
        for size in sorted(self.prefill_graphs):
            if size >= n_tokens:
                return size
        return None

    def capture_prefill(self, max_tokens: int, max_num_seqs: int) -> None:
        """Capture the whole step (embedding to final hidden states) for each token count of
        `prefill_graph_sizes(max_tokens)`, up to max_num_seqs sequences: the step is padded to the next size,
        its padding tokens write to the scratch block and belong to no sequence, and the attention kernel reads
        where each sequence's tokens are from the device. The LM head runs after, on the sampled rows only."""
        dev, B = self.device, max_num_seqs
        sizes = prefill_graph_sizes(max_tokens)
        T = sizes[-1]
        self.p_long = torch.zeros(4, T, dtype=torch.long, device=dev)  # tokens, positions, slots, valid
        self.p_long[2] = self.scratch * self.block_size
        self.p_int = torch.zeros(2 * B + 1, dtype=torch.int32, device=dev)  # q_start [B + 1], then context lens [B]
        self.p_tables = torch.full((B, self.max_blocks), self.scratch, dtype=torch.int32, device=dev)
        self.p_max_seqs = B
        pool = self._pool
        for size in reversed(sizes):
            q_start, lens = self.p_int[:B + 1], self.p_int[B + 1:]

            def step():
                meta = AttnMeta(slots=self.p_long[2, :size], block_tables=self.p_tables, context_lens=lens,
                                q_start=q_start, q_blocks=query_blocks(q_start, self.block_q, -(-size // self.block_q) + B),
                                valid=self.p_long[3, :size])
                h = self.model.hidden(self.p_long[0, :size], self.p_long[1, :size], self.kv, meta)
                return h, self.model.routing_snapshot()

            with torch.inference_mode():
                step()  # warm-up (no sequences: the attention programs all return at once)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    h, snapshot = step()
            pool = graph.pool()
            self.prefill_graphs[size] = (graph, h, snapshot)
        self._pool = pool
        torch.cuda.synchronize()
        log.info("captured prefill CUDA graphs for %s tokens", sorted(self.prefill_graphs))

    def _replay_prefill(self, size: int, batch: list[tuple[Sequence, int]]):
        """Replay the step graph of `size` tokens for `batch`: (hidden [size, D], (routing snapshot, valid rows), sampled rows [N])."""
        graph, h, snapshot = self.prefill_graphs[size]
        inp = self.host_inputs(batch)
        n, B = len(inp["tokens"]), self.p_max_seqs
        pad = size - n
        host = torch.tensor([inp["tokens"] + [0] * pad, inp["positions"] + [0] * pad,
                             inp["slots"] + [self.scratch * self.block_size] * pad, [1] * n + [0] * pad], dtype=torch.long)
        q_start = list(itertools.accumulate(inp["qlen"], initial=0))
        ints = torch.tensor(q_start + [n] * (B - len(batch)) + inp["ctx"] + [0] * (B - len(batch)), dtype=torch.int32)
        width = max(len(seq.block_table) for seq, _ in batch)
        self.p_long[:, :size].copy_(host.to(self.device, non_blocking=True))
        self.p_int.copy_(ints.to(self.device, non_blocking=True))
        self.p_tables[:len(batch), :width].copy_(self._tables(batch, width).to(self.device, non_blocking=True))
        last = torch.tensor(inp["last"], dtype=torch.long).to(self.device, non_blocking=True)
        graph.replay()
        return h, (snapshot, self.p_long[3, :size]), last


def sampled_rows(batch: list[tuple[Sequence, int]], sample_for: list[Sequence]) -> list[int] | None:
    """The rows of `batch` whose sequence is in `sample_for` (in batch order), or None for all of them."""
    if len(sample_for) == len(batch):
        return None
    wanted = {id(seq) for seq in sample_for}
    return [i for i, (seq, _) in enumerate(batch) if id(seq) in wanted]


# up to this many block-table entries (graph rows x max blocks) a decode step sends whole table rows with the
# context lengths in one host copy; past it, the columns in use in a copy of their own (and a strided device copy)
WHOLE_TABLE_ROWS = 8192


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """The token counts of the captured non-decode steps: 16, 32, ..., 512, every 256 to 2048, then every 512
    up to max_tokens (a step pads to the next one: at most a third more tokens past 512)."""
    sizes = [16, 32, 64, 128, 256, 512] + list(range(768, 2048, 256)) + list(range(2048, max_tokens, 512))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class Launched:
    """A step queued on the device: its batch and sampled tokens, copied back to pinned host memory
    without blocking, so the host can queue the next step before reading these."""

    def __init__(self, batch: list[tuple[Sequence, int]], tokens: torch.Tensor | None, logprobs: Logprobs | None = None,
                 params: list[SamplingParams] | None = None, graphed: bool = False):
        self.batch, self.tokens, self.event, self.logprobs, self.params = batch, tokens, None, logprobs, params
        self.graphed = graphed  # the step replayed a CUDA graph
        self.host = tokens
        if tokens is not None and tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> list[int]:
        """The sampled tokens (waits for the step)."""
        if self.host is None:
            return []
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def token_logprobs(self) -> dict[int, TokenLogprob]:
        """Sample-row index -> the TokenLogprob of the rows that asked for logprobs (after `result`)."""
        lp = self.logprobs
        if lp is None:
            return {}
        chosen, values, ids = lp.chosen.tolist(), lp.top_values.tolist(), lp.top_ids.tolist()
        toks = self.host.tolist()
        out = {}
        for j, row in enumerate(lp.rows):
            k = self.params[row].logprobs
            out[row] = TokenLogprob(toks[row], chosen[j], tuple(zip(ids[j][:k], values[j][:k])))
        return out
