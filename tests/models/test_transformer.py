import pytest
import torch

from moestack.config import load_config
from moestack.models.transformer import Block, MoETransformer, ScMoEBlock
from moestack.moe.layer import MoELayer


def tiny(**over):
    base = {"model.d_model": "32", "model.n_heads": "2", "model.n_layers": "3", "model.seq_len": "16",
            "moe.num_experts": "4", "moe.d_ff": "32"}
    base.update(over)
    return load_config(overrides=base)


@pytest.mark.parametrize("arch", ["top2", "shared_top1", "scmoe"])
def test_each_arch_runs_forward_and_backward(arch):
    torch.manual_seed(0)
    model = MoETransformer(tiny(**{"model.arch": arch}))
    idx = torch.randint(0, 256, (2, 16))
    logits, loss, aux = model(idx, idx)
    assert logits.shape == (2, 16, 256) and loss.item() > 0 and aux.item() > 0
    (loss + aux).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_block_wiring_dense_first_and_moe_every():
    model = MoETransformer(tiny(**{"model.n_layers": "5", "model.dense_first": "1", "model.moe_every": "2"}))
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, True, False, True, False]
    assert len(model.moe_layers()) == 2


def test_shared_top1_and_scmoe_route_top1_with_a_shared_expert():
    m = MoETransformer(tiny(**{"model.arch": "shared_top1"}))
    assert all(b.ffn.router.top_k == 1 and b.ffn.shared is not None for b in m.blocks if isinstance(b, Block))
    s = MoETransformer(tiny(**{"model.arch": "scmoe"}))
    assert all(isinstance(b, ScMoEBlock) and b.moe.router.top_k == 1 for b in s.blocks)


@pytest.mark.parametrize("position", ["prev_attn", "block_input"])
def test_scmoe_overlap_switch_gives_identical_outputs(position):
    torch.manual_seed(0)
    model = MoETransformer(tiny(**{"model.arch": "scmoe", "model.scmoe_position": position}))
    idx = torch.randint(0, 256, (2, 16))
    a = model(idx, idx)[1]
    model.overlap = False
    b = model(idx, idx)[1]
    assert torch.equal(a, b)


def test_scmoe_moe_reads_the_shortcut_state():
    """Under prev_attn, block 1's MoE reads block 0's post-attention state: block 0's shared expert cannot change it."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(**{"model.arch": "scmoe", "model.n_layers": "2"}))
    seen = []
    model.blocks[1].moe.router.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    idx = torch.randint(0, 256, (1, 16))
    model(idx)
    with torch.no_grad():
        model.blocks[0].shared.w2.weight.mul_(3.0)  # changes block 0's output, not its post-attention state
    model(idx)
    torch.testing.assert_close(seen[0], seen[1])


def test_tied_embeddings_share_storage():
    m = MoETransformer(tiny())
    assert m.lm_head.weight is m.embed.weight
    m = MoETransformer(tiny(**{"model.tie_embeddings": "false"}))
    assert m.lm_head.weight is not m.embed.weight


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    idx = torch.randint(0, 256, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss, aux = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.5


def test_generate_extends_the_prompt():
    model = MoETransformer(tiny())
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 8)


class _Recording:
    """Wraps a layer's dispatcher: logs each launch and wait, so a test can read the schedule's order.

    A launch stands for what an expert-parallel dispatch does at once (a blocking exchange of row counts);
    the wait for when the rows must be there.
    """

    def __init__(self, inner, index, log):
        self.inner, self.index, self.log = inner, index, log

    def _handle(self, handle, name):
        log, index = self.log, self.index

        class Handle:
            def wait(self):
                log.append((name + "_wait", index))
                return handle.wait()

        return Handle()

    def dispatch(self, x, routing):
        self.log.append(("dispatch", self.index))
        return self._handle(self.inner.dispatch(x, routing), "dispatch")

    def combine(self, y, d):
        self.log.append(("combine", self.index))
        return self._handle(self.inner.combine(y, d), "combine")


def _schedule(position, overlap=True, n_layers=3):
    torch.manual_seed(0)
    model = MoETransformer(tiny(**{"model.arch": "scmoe", "model.scmoe_position": position,
                                   "model.n_layers": str(n_layers)}))
    model.overlap = overlap
    log = []
    for i, blk in enumerate(model.blocks):
        blk.moe.dispatcher = _Recording(blk.moe.dispatcher, i, log)
        for name, mod in (("attn", blk.attn), ("experts", blk.moe.experts), ("shared", blk.shared)):
            mod.register_forward_pre_hook(lambda m, args, name=name, i=i: log.append((name, i)))
    model(torch.randint(0, 256, (2, 16)))
    return log


def test_scmoe_prev_attn_keeps_communication_in_flight_across_compute():
    log, n = _schedule("prev_attn"), 3
    at = {event: k for k, event in enumerate(log)}
    for i in range(n):
        # the combine is in flight while the shared expert computes, with no dispatch launch (a blocking
        # count exchange on the same EP group) between the combine's launch and the shared expert
        between = log[at[("combine", i)] + 1: at[("shared", i)]]
        assert at[("combine", i)] < at[("shared", i)] < at[("combine_wait", i)]
        assert not any(name == "dispatch" for name, _ in between), log
        if i + 1 < n:  # the next block's dispatch is in flight across this block's experts and shared expert
            assert at[("dispatch", i + 1)] < at[("experts", i)] < at[("shared", i)] < at[("dispatch_wait", i + 1)]
    assert at[("dispatch", 0)] > at[("attn", 0)]  # block 0 reads its own post-attention state


def test_scmoe_block_input_overlaps_dispatch_with_attention():
    log = _schedule("block_input")
    at = {event: k for k, event in enumerate(log)}
    for i in range(3):
        assert at[("dispatch", i)] < at[("attn", i)] < at[("dispatch_wait", i)]
        assert at[("combine", i)] < at[("shared", i)] < at[("combine_wait", i)]


def test_scmoe_without_overlap_waits_at_once():
    log = _schedule("prev_attn", overlap=False)
    for k, (name, i) in enumerate(log):
        if name in ("dispatch", "combine"):
            assert log[k + 1] == (name + "_wait", i), log
