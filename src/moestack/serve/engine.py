"""The engine: requests in, tokens out. `LLM` is the offline API; `add_request` / `step` / `abort` drive it
online (serve/server.py runs `step` in a loop for HTTP clients).

    llm = LLM("runs/2026-12-02_10-00-00")            # a moestack run, or a Hugging Face checkpoint folder
    out = llm.generate(["def ", "class "], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].text)

Each step: the scheduler picks the batch (continuous batching, chunked prefill, preemption), the runner
runs it over the paged KV cache and samples, and the engine appends tokens, detokenizes, checks stop
conditions and frees finished requests' blocks. `expert_loads()` gives the last step's tokens per expert
per MoE layer (what load-aware methods read).
"""

from __future__ import annotations

import itertools
import logging
import zlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from moestack.serve import loader
from moestack.serve.kv_cache import BlockManager
from moestack.serve.params import Completion, RequestOutput, SamplingParams
from moestack.serve.runner import ModelRunner
from moestack.serve.scheduler import Scheduler
from moestack.serve.sequence import Sequence, Status

log = logging.getLogger("moestack")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# DualSparse dropping (drop_rate) in the engine: auto (the default) drops whole sub-experts in steps of at most
# WHOLE_ROWS token-choices (decode steps, and small prefill chunks: memory-bound, where a skipped weight read is
# what saves time) and per token in larger ones; token drops per token everywhere (the paper's rule).
# inference/dropping.py says more; docs/methods/dualsparse.md has the quality, weights read and GPU timing of each.
DROP_POLICIES = ("auto", "token")
WHOLE_ROWS = 1024  # the fused small-batch kernels' default reach (fused_rows): decode batches up to 128 x top-8


@dataclass
class EngineStats:
    """Counters since the engine started (the HTTP server's /metrics reads them)."""

    steps: int = 0
    decode_steps: int = 0
    graph_steps: int = 0  # steps replayed as CUDA graphs (decodes, prompts, prefill chunks)
    prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    finished: int = 0
    last_batch: int = 0  # sequences in the last step
    max_batch: int = 0
    realb_layers: int = 0  # ReaLB: MoE layer forwards it decided on (batches of >= min_tokens)
    realb_low_layers: int = 0  # ... of which some EP rank ran low precision


class LLM:
    """Serve one model: `generate` offline, or `add_request` + `step` from a serving loop."""

    def __init__(self, model, *, device: str = "auto", dtype: str = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 8192, block_size: int = 16, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.85, prefix_caching: bool = True, cuda_graphs: bool = True,
                 max_model_len: int | None = None, drop_rate: float | None = None, drop_policy: str | None = None,
                 parts: int = 2, calib_batches: int = 8, fused_rows: int = 1024, compile: bool = True,
                 pipeline: bool | None = None,
                 tokenizer=None, realb=None, parallel=None, placement=None, ep_flow: str = "home",
                 prefill_graph_tokens: int | None = None):
        dev = _device(device)
        from moestack.serve.ep import FLOWS

        if ep_flow not in FLOWS:
            raise ValueError(f"ep_flow {ep_flow!r}: expected one of {', '.join(FLOWS)} (home: tokens return to their "
                             "rank after each MoE layer; follow: they stay with their first choice's expert)")
        if ep_flow != "home" and (parallel is None or parallel.ep < 2):
            raise ValueError(f"ep_flow={ep_flow!r} is a flow of expert-parallel serving; run under torchrun with "
                             "parallel=ctx (world size > 1), or leave ep_flow out")
        served = model if isinstance(model, loader.Served) else loader.load(model, dev, _dtype(dtype, dev))
        if tokenizer is not None:
            served.tokenizer = tokenizer
        self.served, self.model, self.tokenizer = served, served.model, served.tokenizer
        spec = self.model.spec
        self.max_model_len = min(max_model_len or spec.max_len, spec.max_len)
        self.ep = parallel if parallel is not None and parallel.ep > 1 else None  # a ParallelContext (torchrun)
        self.dispatchers = []
        if self.ep is not None:  # expert-parallel serving (serve/ep.py): this rank keeps its experts
            from moestack.serve.ep import shard_for_serving

            if drop_rate is not None:
                raise ValueError("DualSparse dropping runs in the single-process engine; leave out torchrun or --drop-rate")
            if ep_flow == "follow" and realb is not None:
                raise ValueError("ReaLB runs with ep_flow='home' (its dispatcher wraps the home flow's); leave out one")
            self.dispatchers = shard_for_serving(self.model, self.ep, placement, ep_flow)
            cuda_graphs, pipeline = False, False  # every step is a collective all-to-all: eager, in lock-step
        # follow flow (serve/follow.py): every rank runs every request, so the ranks' schedulers agree, and an
        # unseeded request samples from a generator seeded from rank 0's random base seed and its id
        self.replicated = self.model.flow is not None
        if self.replicated:
            from moestack.serve.ep import gather_objects

            self._base_seed = gather_objects(int(torch.randint(0, 2**62, ()).item()), self.ep)[0]
        if drop_rate is not None and realb is not None:
            raise ValueError("ReaLB and DualSparse dropping do not combine (both replace the experts); pick one")
        if drop_policy is not None and drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {drop_policy!r}: expected one of {', '.join(DROP_POLICIES)}")
        if drop_policy is not None and drop_rate is None:
            raise ValueError(f"drop_policy={drop_policy!r} applies to DualSparse dropping: give drop_rate too "
                             "(--drop-rate R), or leave the policy out")
        if drop_rate is not None:
            whole = (drop_policy or DROP_POLICIES[0]) == "auto"
            self._sparsify(drop_rate, parts, calib_batches, WHOLE_ROWS if whole else 0)
        self.realb = None
        if realb is not None:  # a RealbConfig (inference/realb.py); the decisions land in `stats`
            from moestack.inference.realb import apply_realb

            self.realb = apply_realb(self.model, realb)
            log.info("ReaLB: %s", realb)
            if self.ep is None and realb.ranks < 2 and not realb.everywhere:
                log.warning("ReaLB in one process without simulated ranks never lowers a rank: give ranks=G (the EP "
                            "size to simulate) or run under torchrun")
            if realb.modality > 0:
                log.info("ReaLB: the engine's prompts are text, so no rank reaches modality=%.2f unless it is "
                         "lowered (modality=0 lowers by load alone)", realb.modality)
        if num_blocks is None:
            num_blocks = self._num_blocks(gpu_memory_utilization, block_size, max_num_seqs)
        if self.ep is not None:  # one size on every rank, so a prompt fits everywhere or nowhere
            from moestack.serve.ep import min_over_ranks

            num_blocks = min_over_ranks(num_blocks, self.ep)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max(max_num_batched_tokens, 1))
        # steps of up to prefill_graph_tokens tokens (default: max_num_batched_tokens, i.e. all) that are not all
        # decodes replay CUDA graphs too; 0: they run eagerly. Only in bf16; not with ReaLB (its decisions read
        # the loads on the host) or capacity dropping (it counts the drops on the host). The graphs' memory is
        # about what the largest step needs eagerly.
        capacity = any(getattr(layer.dispatcher, "capacity_factor", 0) > 0 for layer in self.model.moe_layers())
        if prefill_graph_tokens is None:
            prefill_graph_tokens = max_num_batched_tokens
        # torch._grouped_mm runs bf16 natively; other dtypes take a path that reads the group offsets on the host,
        # which a graph cannot capture
        bf16 = all(p.dtype == torch.bfloat16 for layer in self.model.moe_layers() for p in layer.experts.parameters())
        if self.realb is not None or capacity or not bf16:
            prefill_graph_tokens = 0
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, cuda_graphs=cuda_graphs, fused_rows=fused_rows,
                                  compile=compile, prefill_graph_tokens=min(prefill_graph_tokens, max_num_batched_tokens))
        self.eos = set(spec.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.pipeline = self.runner.device.type == "cuda" and bool(self.runner.graphs) if pipeline is None else pipeline
        self._pending = None  # a step queued ahead by pipelining (see `step`)
        log.info("engine: %s (%s) on %s, %d KV blocks of %d tokens, max_model_len %d", served.name, served.kind,
                 self.runner.device, num_blocks, block_size, self.max_model_len)

    # -- set-up -------------------------------------------------------------------------------------------
    def _sparsify(self, drop_rate: float, parts: int, batches: int, whole_rows: int) -> None:
        from moestack.inference.dualsparse import sparsify

        seq = min(self.max_model_len, 256)
        sparsify(self.model, self.served.calib_tokens(batches, seq), drop_rate, parts, whole_rows=whole_rows)
        log.info("DualSparse: %d parts per expert, drop rate %.2f, %s", parts, drop_rate,
                 f"whole sub-experts in steps of <= {whole_rows} choices" if whole_rows else "per token")

    def _num_blocks(self, utilization: float, block_size: int, max_num_seqs: int) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.model, block_size)
        if self.model.embed.weight.device.type == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            used = total - free
            budget = utilization * total - used - 2 * (1 << 30)  # 2 GiB left for activations and graphs
            if budget < per_block:
                raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free); lower the model "
                                 "size or raise gpu_memory_utilization")
            return int(budget // per_block)
        # CPU: room for every sequence at full length, capped at 1 GiB
        want = max_num_seqs * -(-self.max_model_len // block_size)
        return max(1, min(want, (1 << 30) // per_block))

    # -- requests -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> tuple[list[int], str | None]:
        """(token ids, text or None) of a prompt given as a string or a list of token ids."""
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return ids, text

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """ValueError unless the engine can run this prompt."""
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        V = self.model.spec.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                             f"(max_model_len), which leaves no room to generate: shorten the prompt")
        need = -(-(len(ids) + 1) // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"the prompt needs {need} KV blocks and the cache has {self.blocks.num_blocks}; give the "
                             "engine more KV memory (num_blocks, gpu_memory_utilization) or shorten the prompt")

    def add_request(self, prompt, params: SamplingParams | dict | None = None, request_id: str | None = None) -> str:
        """Queue a prompt (string or token ids); returns its request id. Bad input: ValueError, nothing queued."""
        params = _params(params)
        ids, text = self.encode_prompt(prompt)
        self.check_prompt(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, params, text, arrival=self.stats.steps)
        self.requests[rid] = seq
        seed = params.seed
        if seed is None and self.replicated and params.temperature > 0:  # every rank must draw the same tokens
            seed = self._base_seed ^ zlib.crc32(rid.encode())
        if seed is not None:
            g = torch.Generator(device=self.runner.device)
            g.manual_seed(seed)
            self.generators[rid] = g
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is not known (already finished)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        self.generators.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- stepping -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; what each request in it produced (requests still prefilling produce nothing).

        Pipelining (on with CUDA graphs): when a step is all decodes and nothing waits to be admitted, the next
        decode step is queued on the device, fed with this step's sampled tokens still on the device, before
        this step's tokens are read back and detokenized; the host's bookkeeping then overlaps the device's
        work. The next call completes that step. A sequence that finished meanwhile (a stop string, eos,
        abort) has its extra token dropped, so outputs are those of the plain loop."""
        outputs: list[RequestOutput] = []
        if self._pending is not None:
            launched, self._pending = self._pending, None
        else:
            batch, stuck = self.scheduler.schedule()
            outputs = [self._finish(seq, "length") for seq in stuck]
            if self.replicated:
                self._check_same_batch(batch)
            if not batch:
                if self.ep is not None and not self.replicated:  # the other ranks' forward waits on this rank's
                    self.runner.idle()  # all-to-alls
                return outputs
            sample_for = [seq for seq, n in batch if seq.num_computed + n == len(seq)]
            launched = self.runner.launch(batch, sample_for, [self.generators.get(s.request_id) for s in sample_for])
        nxt = self._launch_ahead(launched) if self.pipeline else None
        outputs += self._complete(launched)
        if self.realb is not None:
            self._count_realb()
        if nxt is not None and not any(seq.status is Status.RUNNING for seq, _ in nxt.batch):
            nxt.result()  # everything in it finished meanwhile: let it end, keep nothing
            nxt = None
        self._pending = nxt
        return outputs

    def _check_same_batch(self, batch) -> None:
        """Under the follow flow every rank must schedule the same step: a clear error on every rank if not."""
        from moestack.serve.ep import same_on_all_ranks

        key = zlib.crc32(repr([(seq.request_id, seq.num_computed, n, len(seq), seq.token_ids[-1])
                               for seq, n in batch]).encode())
        if not same_on_all_ranks(key, self.ep):
            raise RuntimeError("ep_flow='follow': the ranks scheduled different steps; every rank must add and abort "
                               "the same requests, with the same ids and prompts, in the same order (LLM.generate "
                               "and moestack serve do)")

    def _count_realb(self) -> None:
        decisions = self.realb.take_decisions()
        low = [d for d in decisions if d["low_ranks"]]
        self.stats.realb_layers += len(decisions)
        self.stats.realb_low_layers += len(low)
        for d in low:
            log.info("ReaLB: layer %d, %d tokens, rank loads %s: ranks %s in %s", d["layer"], d["tokens"], d["loads"],
                     d["low_ranks"], self.realb.cfg.precision)

    def _launch_ahead(self, launched):
        """Queue the decode step after `launched` (see `step`), or None where it does not apply."""
        batch = launched.batch
        if self.scheduler.waiting or launched.tokens is None or any(n != 1 for _, n in batch):
            return None
        if any(seq.params.penalized or seq.params.logprobs is not None for seq, _ in batch):
            return None  # penalties need the tokens on the host; logprobs are read back with them
        alive = [i for i, (seq, _) in enumerate(batch) if seq.status is Status.RUNNING]
        if not alive or (self.runner.graphs and self.runner._graph_for(len(alive)) is None):
            return None
        seqs = [batch[i][0] for i in alive]
        need = sum(self.blocks.blocks_needed(seq, len(seq) + 1, []) for seq in seqs)
        if need > self.blocks.num_free or any(len(seq) + 1 > self.max_model_len for seq in seqs):
            return None
        for seq in seqs:
            self.blocks.grow(seq, len(seq) + 1)
        tokens = launched.tokens if len(alive) == len(batch) else launched.tokens[torch.tensor(alive, device=launched.tokens.device)]
        return self.runner.launch([(seq, 1) for seq in seqs], seqs, [self.generators.get(s.request_id) for s in seqs],
                                  ahead=tokens)

    def _complete(self, launched) -> list[RequestOutput]:
        """Read a launched step's tokens back and advance its (still running) sequences."""
        tokens = launched.result()
        batch = launched.batch
        st = self.stats
        st.steps += 1
        st.last_batch = len(batch)
        st.max_batch = max(st.max_batch, len(batch))
        if all(n == 1 for _, n in batch):
            st.decode_steps += 1
        st.graph_steps += launched.graphed
        logprobs = launched.token_logprobs()
        row = -1
        outputs = []
        for seq, n in batch:
            token = None
            if seq.num_computed + n >= len(seq):
                row += 1
                token = tokens[row]
            if seq.status is not Status.RUNNING:
                continue  # finished or aborted after this step was queued
            if seq.num_computed < seq.num_prompt:
                st.prompt_tokens += min(n, seq.num_prompt - seq.num_computed)
            seq.num_computed += n
            self.blocks.register_computed(seq)
            if token is None:
                continue
            if seq.num_output == 0 and seq.num_preempted == 0:
                st.cached_tokens += seq.num_cached
            seq.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(logprobs[row])
            st.generated_tokens += 1
            outputs.append(self._after_token(seq, token))
        return outputs

    def _after_token(self, seq: Sequence, token: int) -> RequestOutput:
        p = seq.params
        new, *offsets = self.tokenizer.decode_new(seq.token_ids, *seq.detok)
        seq.detok = tuple(offsets)
        text = seq.text + new
        reason = None
        if not p.ignore_eos and token in self.eos:
            reason = "stop"
        if p.stop:
            hit = _first_stop(text, p.stop, max(0, len(seq.text) - max(map(len, p.stop))))
            if hit is not None:
                text, reason = text[:hit], "stop"
        if reason is None and (seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        seq.text = text
        if reason is not None:
            return self._finish(seq, reason)
        return self._delta(seq, finished=False)

    def _delta(self, seq: Sequence, finished: bool) -> RequestOutput:
        text = seq.text
        if not finished:  # hold back a partial UTF-8 character and what could still become a stop string
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            end = len(text) - hold
            while end > seq.sent_text and text[end - 1] == "\ufffd":
                end -= 1
            end = max(end, seq.sent_text)
        else:
            end = len(text)
        new_text, seq.sent_text = text[seq.sent_text:end], end
        sent, seq.sent_tokens = seq.sent_tokens, seq.num_output
        new_tokens = seq.token_ids[seq.num_prompt + sent:]
        new_lps = None if seq.logprobs is None else seq.logprobs[sent:]
        return RequestOutput(seq.request_id, new_tokens, new_text, finished, seq.finish_reason,
                             self._completion(seq) if finished else None, new_logprobs=new_lps)

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        self.requests.pop(seq.request_id, None)
        self.generators.pop(seq.request_id, None)
        self.stats.finished += 1
        return self._delta(seq, finished=True)

    def _completion(self, seq: Sequence) -> Completion:
        return Completion(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt], seq.text, seq.output_ids,
                          seq.finish_reason or "length", seq.num_cached,
                          None if seq.logprobs is None else list(seq.logprobs))

    # -- offline ------------------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | dict | None = None,
                 use_tqdm: bool = True) -> list[Completion]:
        """Completions of `prompts` (strings or token-id lists), in their order. Every prompt is checked first:
        a bad one is a ValueError naming it, before any work starts."""
        if isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams; give one, or one per prompt")
        plist = [_params(p) for p in plist]
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            try:
                self.check_prompt(self.encode_prompt(prompt)[0], p)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
        ep = self.ep if not self.replicated else None  # follow flow: every rank runs every prompt
        share = (lambda r: range(r, len(prompts), ep.ep)) if ep is not None else (lambda r: range(len(prompts)))
        rids = [self.add_request(prompts[i], plist[i]) for i in share(ep.ep_rank if ep else 0)]  # under EP: mine
        done: dict[str, Completion] = {}
        wanted = set(rids)
        show = use_tqdm and (self.ep is None or self.ep.ep_rank == 0)
        with tqdm(total=len(rids), desc="generate", unit="req", disable=not show, leave=False) as bar:
            stalled = False
            while self._keep_going(len(done) < len(rids), stalled):
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out.completion
                        bar.update(1)
                stalled = len(done) < len(rids) and not self.has_unfinished()
        if ep is None:
            return [done[r] for r in rids]
        from moestack.serve.ep import gather_objects

        out: list[Completion | None] = [None] * len(prompts)
        for r, part in enumerate(gather_objects([done[x] for x in rids], ep)):
            for i, completion in zip(share(r), part):
                out[i] = completion
        return out

    def _keep_going(self, local: bool, stalled: bool = False) -> bool:
        """Whether to run another step: this rank's work, or under EP any rank's (they step together). A rank
        whose requests stopped unfinished (`stalled`) makes every rank raise, so none waits for it."""
        if self.ep is not None:
            from moestack.serve.ep import any_rank

            local, stalled = any_rank([local, stalled], self.ep)
        if stalled:
            raise RuntimeError("the engine stopped with requests unfinished")
        return local

    def traffic(self, reset: bool = True):
        """Under EP: bytes sent by each rank to each rank since the last reset, a dict of int64 [..., from, to]
        matrices ("moe" per MoE layer, "kv" per block and "sample": serve/ep.py's `traffic`; every rank gets
        every matrix; a collective, so every rank calls it); None in one process."""
        if self.ep is None:
            return None
        from moestack.serve.ep import traffic

        return traffic(self.model, self.dispatchers, self.ep, reset)

    def expert_loads(self):
        """Tokens routed to each expert in the last step, per MoE layer: a numpy array [L_moe, E] (or None). Under
        EP, this rank's tokens: its requests (home), or its share of each layer's tokens (follow)."""
        loads = self.runner.last_loads
        return None if loads is None else loads.cpu().numpy()

    def check_blocks(self) -> None:
        """Raise if a KV block leaked (see kv_cache.BlockManager.check)."""
        self.blocks.check(list(self.scheduler.running) + list(self.scheduler.waiting))


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _params(p) -> SamplingParams:
    if p is None:
        return SamplingParams()
    if isinstance(p, dict):
        return SamplingParams.from_dict(p)
    if not isinstance(p, SamplingParams):
        raise ValueError(f"sampling parameters must be a SamplingParams or a dict, got {type(p).__name__}")
    return p


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device here; use --device cpu")
    return device


def _dtype(dtype: str, device: str) -> torch.dtype | None:
    if dtype == "auto":
        return None if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
