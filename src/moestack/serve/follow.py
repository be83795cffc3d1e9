"""Token-follows-expert expert parallelism for serving (`ep_flow="follow"`, ExFlow's context-coherent EP).

Under the home flow (serve/ep.py) every MoE layer sends each token-choice from the token's rank to its
expert's rank and back, whatever the placement. Under follow:
- Every rank runs the same scheduler over every request (each rank adds the same requests in the same
  order, as tensor-parallel engines do; the engine checks it each step) and holds the KV cache of every
  sequence: KV is replicated, ExFlow's context coherence. Memory: each rank holds the whole batch's KV,
  G times what a home-flow rank holds for the same batch.
- A step's tokens start on the ranks in contiguous chunks. At each block the rank holding a token's hidden
  state computes its attention; its new keys and values go to every rank, so every cache stays whole.
- At each MoE layer the state goes to the ranks of the token's k experts (the rows carry the residual
  state; the expert rank applies the block's norm). The expert outputs, each with its routing weight, then
  go to the rank of the token's first choice (the highest router score), which already holds the state
  (one of the rows it received) and becomes the token's rank for the next block. A token whose next experts sit on that rank
  sends nothing: co-locating consecutive experts (MoETuner's transition term) removes real traffic.
- The final hidden rows that are sampled go to every rank, and every rank samples the same tokens.
Counted bytes: MoE rows with their 12 bytes of metadata (token tag int64, routing weight fp32) in the
dispatchers' `sent_bytes`; keys and values (with a 4-byte token index) in `kv_bytes`; sampled rows in
`sample_bytes`. Bytes a rank sends itself count on the diagonal, as in the home flow; the few integers per
rank of the count exchanges are not counted (in either flow).
Notation: T = the step's tokens, n = this rank's share, k = choices per token, G = ranks, D = hidden size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moestack.moe.dispatch import weighted_sum
from moestack.moe.layer import MoELayer
from moestack.moe.router import count_ids
from moestack.parallel.ep import EPDispatcher
from moestack.parallel.mesh import ParallelContext
from moestack.serve.attention import attend, write_kv

META_BYTES = 8 + 4  # per MoE row: the int64 tag (token, choice, follow rank) and the fp32 routing weight


class FollowFlow:
    """Runs ServeModel.hidden with each token's state on the rank of its last first-choice expert."""

    def __init__(self, model, ctx: ParallelContext, dispatchers: list[EPDispatcher]):
        self.group, self.G, self.me = ctx.ep_group, ctx.ep, ctx.ep_rank
        self.dispatcher = {id(layer): d for layer, d in zip(model.moe_layers(), dispatchers)}
        self.kv_bytes = torch.zeros(len(model.blocks), self.G, dtype=torch.int64)  # [block, to]
        self.sample_bytes = torch.zeros(self.G, dtype=torch.int64)

    def reset_traffic(self) -> None:
        self.kv_bytes.zero_()
        self.sample_bytes.zero_()

    def hidden(self, model, tokens, positions, kv_caches, meta, rows):
        if kv_caches is None:
            raise ValueError("ep_flow='follow' serves through the KV cache; whole-sequence forwards run in one process")
        T, G = tokens.numel(), self.G
        mine = torch.arange(self.me * T // G, (self.me + 1) * T // G, device=tokens.device)  # [n] step-token index
        h = model.embed(tokens.index_select(0, mine))
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        for i, (block, kv) in enumerate(zip(model.blocks, kv_caches)):
            h = h + self._attention(i, block.attn, block.norm1(h), mine, cos, sin, kv, meta, T)
            if isinstance(block.ffn, MoELayer):
                h, mine = self._moe(block.ffn, block.norm2, h, mine, T)
            else:
                h = h + block.ffn(block.norm2(h))
        return self._sampled(h, mine, torch.arange(T, device=h.device) if rows is None else rows, T)

    # -- attention over the replicated cache ----------------------------------------------------------
    def _attention(self, i, attn, x, mine, cos, sin, kv, meta, T):
        n = mine.numel()
        q, k, v = attn.project(x, cos.index_select(0, mine), sin.index_select(0, mine))
        payload = torch.cat([k.flatten(1), v.flatten(1)], 1)  # [n, 2 Hkv hd]
        counts = self._counts(n, x.device)
        got = self._to_all(payload, counts)
        where = self._to_all(mine.int(), counts).long()
        self.kv_bytes[i] += n * (payload.shape[1] * payload.element_size() + 4)  # the index travels as int32
        k_all, v_all = k.new_empty(T, *k.shape[1:]), v.new_empty(T, *v.shape[1:])
        got_k, got_v = got.chunk(2, dim=1)
        k_all[where], v_all[where] = got_k.reshape(-1, *k.shape[1:]), got_v.reshape(-1, *v.shape[1:])
        write_kv(kv[0], kv[1], k_all, v_all, meta.slots)
        o = attend(q, k_all, v_all, kv, meta, rows=mine)
        return attn.out(o.flatten(1))

    # -- the MoE layer: out to the experts, back to the first choice's rank ----------------------------
    def _moe(self, moe: MoELayer, norm, h, mine, T):
        d, G = self.dispatcher[id(moe)], self.G
        n, D = h.shape
        routing = moe.route(norm(h))
        k = routing.expert_ids.shape[1]
        slot = d.destinations(routing.expert_ids)  # [n, k] slot over all ranks' concatenated slots
        per = d.slots[self.me]
        follow = slot[:, 0] // per  # [n] the rank the token's state goes on to
        choice = torch.arange(k, device=h.device)
        tag = ((mine[:, None] * k + choice) * G + follow[:, None]).flatten()  # [n k] int64
        order, in_splits, out_splits, regroup, counts = d.plan(slot)
        got_h = self._a2a(h.index_select(0, order // k), in_splits, out_splits)
        got_tag = self._a2a(tag[order], in_splits, out_splits)
        got_w = self._a2a(routing.weights.flatten()[order], in_splits, out_splits)
        d.add_sent(torch.tensor(in_splits) * (D * h.element_size() + META_BYTES))
        # the experts, on rows regrouped by local slot
        y = moe.experts(norm(got_h.index_select(0, regroup)), counts)
        tag_r, w_r = got_tag[regroup], got_w[regroup]
        # outputs to the first choice's rank
        dest = tag_r % G
        order2 = torch.argsort(dest, stable=True)
        back_in = count_ids(dest, G)
        back_out = torch.empty_like(back_in)
        dist.all_to_all_single(back_out, back_in, group=self.group)
        b_in, b_out = back_in.tolist(), back_out.tolist()
        back_y = self._a2a(y.index_select(0, order2), b_in, b_out)
        back_tag = self._a2a((tag_r // G)[order2], b_in, b_out)  # token * k + choice
        back_w = self._a2a(w_r[order2], b_in, b_out)
        d.add_sent(torch.tensor(b_in) * (D * y.element_size() + META_BYTES))
        # the tokens that follow to this rank: their state came with their first choice's row
        first = (got_tag // G) % k == 0
        new = got_tag[first] // (G * k)
        new, perm = new.sort()
        state = got_h[first].index_select(0, perm)
        m = new.numel()
        pos = torch.full((T,), -1, dtype=torch.long, device=h.device)
        pos[new] = torch.arange(m, device=h.device)
        row = pos[back_tag // k] * k + back_tag % k
        per_choice = back_y.new_empty(m * k, D)
        per_choice[row] = back_y
        weights = back_w.new_empty(m * k)
        weights[row] = back_w
        out = weighted_sum(per_choice, weights.view(m, k))
        if moe.shared is not None:
            out = out + moe.shared(norm(state))
        return state + out, new

    # -- the sampled rows, to every rank -------------------------------------------------------------
    def _sampled(self, h, mine, rows, T):
        want = torch.full((T,), -1, dtype=torch.long, device=h.device)
        want[rows] = torch.arange(rows.numel(), device=h.device)
        keep = want[mine] >= 0
        sel, at = h[keep], want[mine][keep]
        counts = self._counts(sel.shape[0], h.device)
        got, where = self._to_all(sel, counts), self._to_all(at.int(), counts).long()
        self.sample_bytes += sel.shape[0] * (sel.shape[1] * sel.element_size() + 4)
        out = h.new_empty(rows.numel(), h.shape[1])
        out[where] = got
        return out

    # -- collectives ------------------------------------------------------------------------------------
    def _counts(self, n: int, device) -> list[int]:
        """Every rank's n."""
        t = torch.tensor([n], device=device)
        out = [torch.empty_like(t) for _ in range(self.G)]
        dist.all_gather(out, t, group=self.group)
        return [int(c) for c in out]

    def _to_all(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [n, ...] from every rank, concatenated in rank order (counts: every rank's n)."""
        return self._a2a(x.repeat(self.G, *([1] * (x.dim() - 1))), [x.shape[0]] * self.G, counts)

    def _a2a(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out
