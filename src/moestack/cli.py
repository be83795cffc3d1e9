"""`moestack train | generate | serve | eval | trace | plan | sparsify | ckpt`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moestack.config import SECTIONS, ConfigError, section_fields

log = logging.getLogger("moestack")

# Short flags of `train` and the config keys they set.
TRAIN_SHORTCUTS = {
    "--run-dir": ("train.run_dir", "run folder (default runs/<timestamp>)"),
    "--steps": ("train.steps", "total optimizer steps (with --resume: the step to reach, not steps to add)"),
    "--seed": ("train.seed", "random seed"),
    "--device": ("train.device", "auto (this rank's GPU if there is one) | cpu | cuda | cuda:N (one process)"),
    "--data": ("train.data", "a text file or folder (default: Python's standard library source)"),
    "--batch-size": ("train.batch_size", "GLOBAL batch in sequences, split over all ranks"),
    "--ckpt-every": ("checkpoint.every", "checkpoint every N steps (0 = off)"),
    "--ep": ("parallel.ep", "expert-parallel ranks (default 0 = as many as the ranks and experts allow)"),
    "--dp": ("parallel.dp", "data-parallel replicas (default world / ep)"),
    "--placement": ("parallel.placement", "expert placement JSON from `moestack plan`"),
}
SECTION_ALIASES = {"checkpoint": ("ckpt",)}
# Dotted overrides `train --help` lists by name (every other field is accepted and summed up in the epilog).
SHOWN_FIELDS = {"model.arch": "top2 | shared_top1 | scmoe", "moe.num_experts": "experts per MoE layer",
                "moe.top_k": "experts per token (top2 arch)", "train.lr": "peak learning rate",
                "parallel.mode": "ep | fssdp (Hecate: experts sharded once, hot ones copied per step)"}
OVERRIDES_EPILOG = ("Any config field can be set as --section.field V (sections: model, moe, train, parallel, "
                    "checkpoint or ckpt; e.g. --model.d_model 256, --ckpt.pec-k 0); a run's config.toml lists them "
                    "all and is a valid --config.")


def add_config_flags(p: argparse.ArgumentParser, shortcuts: dict) -> None:
    """--config, the short flags, and a dotted override for every config field (--moe.top_k 2)."""
    p.add_argument("--config", help="TOML config file; flags override it")
    for flag, (key, help_) in shortcuts.items():  # the short flag, and the dotted ones as aliases
        p.add_argument(flag, *_dotted_flags(key), dest=key, default=argparse.SUPPRESS, metavar="V",
                       help=f"{help_} [{key}]")
    group = p.add_argument_group("config overrides (any field, see config.toml of a run)")
    for section in SECTIONS:
        for name in section_fields(section):
            key = f"{section}.{name}"
            if any(k == key for k, _ in shortcuts.values()):
                continue
            group.add_argument(*_dotted_flags(key), dest=key, default=argparse.SUPPRESS, metavar="V",
                               help=SHOWN_FIELDS.get(key, argparse.SUPPRESS))


def _dotted_flags(key: str) -> list[str]:
    """--section.field spellings of a config key: with - or _ in the field, and the section's aliases."""
    section, name = key.split(".")
    return sorted({f"--{s}.{n}" for s in (section, *SECTION_ALIASES.get(section, ())) for n in (name, name.replace("_", "-"))})


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def overrides_from(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if "." in k}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moestack",
        description="Train, checkpoint, place and serve Mixture-of-Experts language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from moestack.inference.cli import add_drop_eval_args, add_sparsify_parser, positive_int

    p = sub.add_parser("train", help="train an MoE language model (torchrun for expert parallelism)",
                       description="Train an MoE LM. With no arguments: a small model on Python's standard library source, "
                                   "in about a minute on the CPU (on the GPU if there is one; --device cpu to stay on the CPU). "
                                   "Under torchrun: expert parallel over as many ranks of a node as divide the experts (or "
                                   "the --placement file's GPU count), data parallel over the rest (--ep N / --dp N to choose).",
                       epilog=OVERRIDES_EPILOG)
    add_config_flags(p, TRAIN_SHORTCUTS)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest good checkpoint, "
                   "with its config.toml (flags given now override it)")

    p = sub.add_parser("generate", help="continue a prompt with a trained run or a Hugging Face MoE checkpoint",
                       description="Continue --prompt through the serving engine (paged KV cache, CUDA graphs on a GPU). "
                                   "Under torchrun with several ranks the engine serves expert parallel: each rank keeps "
                                   "its experts (--placement), tokens move by all-to-all (--parallel.ep_flow).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a run folder written by `moestack train`, or a Hugging Face checkpoint folder "
                     "(config.json + safetensors + tokenizer)")
    src.add_argument("--run-dir", help="a run folder (the same as --model RUN_DIR)")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_engine_drop_args(p)
    p.add_argument("--realb", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="ReaLB: run overloaded, vision-dominated EP ranks' experts in FP8; optional KEY=VALUE,... "
                        "(load_ratio, modality, min_tokens, min_expert_rows, precision, ranks, everywhere). In one "
                        "process give ranks=G to simulate G EP ranks; text prompts stay BF16 unless modality=0 "
                        "(docs/methods/realb.md)")
    add_ep_serving_args(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on a run or a Hugging Face MoE checkpoint",
                       description="Serve --model over HTTP: POST /v1/completions and /v1/chat/completions (streamed "
                                   "or not), GET /v1/models, /health, /metrics. Needs the serve extra: "
                                   "pip install 'moestack[serve]'. SIGTERM drains the requests in flight, then exits.")
    p.add_argument("--model", required=True, help="a run folder written by `moestack train`, or a Hugging Face "
                   "checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOESTACK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $MOESTACK_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the folder name)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="most requests in one engine step")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="most requests waiting for a batch slot; more get 429")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--num-blocks", type=positive_int, default=None,
                   help="KV-cache blocks (default: sized from free GPU memory, or room for every sequence on the CPU)")
    add_engine_drop_args(p)
    p.add_argument("--realb", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="ReaLB: run overloaded, vision-dominated EP ranks' experts in FP8; optional KEY=VALUE,... "
                        "(load_ratio, modality, min_tokens, min_expert_rows, precision, ranks, everywhere). In one "
                        "process give ranks=G to simulate G EP ranks; text prompts stay BF16 unless modality=0 "
                        "(docs/methods/realb.md)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), bfloat16, float16, float32")
    add_ep_serving_args(p)

    p = sub.add_parser("eval", help="validation loss and perplexity of a trained run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--batches", type=positive_int, default=None,
                   help="validation batches (default: the run's train.eval_batches, as training evaluated)")
    p.add_argument("--device", default="auto")

    add_drop_eval_args(p)  # --drop-rate R: evaluate with DualSparse dropping
    add_sparsify_parser(sub)

    p = sub.add_parser("trace", help="record a routing trace (tokens per expert, inter-layer transitions) of a run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tokens", type=positive_int, default=65536, help="held-out tokens to route")
    p.add_argument("--out", required=True, help="output .npz (counts [L,E], transitions [L-1,E,E], top_k)")
    p.add_argument("--device", default="auto")

    from moestack.checkpoint.cli import add_ckpt_parser
    from moestack.placement.cli import add_plan_parser

    add_plan_parser(sub)
    add_ckpt_parser(sub)
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a message comes, not as it was when the handler was made (pytest's
    capture, or a tool embedding `main`, swaps it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging() -> None:
    """moestack's own messages on stderr (INFO on rank 0, warnings elsewhere); other libraries' loggers untouched."""
    rank = int(os.environ.get("RANK", 0))
    if not any(getattr(h, "_moestack", False) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("moestack: %(message)s"))
        handler._moestack = True
        log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def _unknown_flags(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    import difflib

    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subs.choices[command]
    flags = [f for action in sub._actions for f in action.option_strings]
    first = next((e.split("=")[0] for e in extra if e.startswith("--")), None)
    close = difflib.get_close_matches(first, flags, n=1) if first else []
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, with its usage and the closest flag
        _unknown_flags(parser, args.command, extra)
    from moestack.checkpoint import CheckpointError
    from moestack.data import DataError
    from moestack.placement.placement import PlacementError
    from moestack.placement.trace import TraceError

    try:
        return COMMANDS[args.command](args)
    # OSError: a path that cannot be created or written (a file where a folder goes, a full disk...)
    except (ConfigError, DataError, PlacementError, TraceError, CheckpointError, OSError) as err:
        print(f"moestack {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moestack {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from moestack.config import load_config
    from moestack.train import train

    overrides = overrides_from(args)
    base = args.config
    if args.resume:  # continue the run as it was configured: its config.toml, then the flags given now
        run_dir = overrides.get("train.run_dir") or (load_config(args.config).train.run_dir if args.config else "")
        if not run_dir:
            raise ConfigError("--resume needs --run-dir D, the folder of the run to continue")
        saved = Path(run_dir) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a moestack run folder (no config.toml); check the "
                              "path, or train without --resume to start a new run there")
        base = base or saved
    cfg = load_config(base, overrides)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        first, last = summary.get("first_val_loss"), summary.get("val_loss")
        if first is not None and last is not None:
            log.info("val loss %.4f -> %.4f after %d steps", first, last, summary["step"])
        elif last is not None:
            log.info("val loss %.4f at step %d", last, summary["step"])
        run_dir = Path(summary["run_dir"])
        kept = [name for name in ("config.toml", "metrics.jsonl", "loss.png", "ckpt/") if (run_dir / name).exists()]
        log.info("run folder: %s (%s)", run_dir, ", ".join(kept))
        if summary.get("interrupted"):
            log.info("interrupted at step %d; continue with: moestack train --run-dir %s --resume", summary["step"], run_dir)
            return 130
    return 0


def add_engine_drop_args(p) -> None:
    """--drop-rate and --drop-policy: DualSparse dropping in the serving engine."""
    p.add_argument("--drop-rate", type=non_negative_float, default=None,
                   help="DualSparse: partition the experts and drop this share of expert computation")
    p.add_argument("--drop-policy", choices=("auto", "token"), default=None,
                   help="with --drop-rate: auto (the default) drops whole sub-experts in steps of up to 1024 "
                        "token-choices (decode: memory-bound, a skipped weight read saves the time) and per token in "
                        "larger ones; token drops per token everywhere (the paper's rule)")


def add_ep_serving_args(p) -> None:
    """--placement and --parallel.ep_flow: expert-parallel serving under torchrun (serve/ep.py)."""
    p.add_argument("--placement", default="", help="under torchrun: expert placement JSON from `moestack plan` "
                   "(default: contiguous)")
    p.add_argument("--parallel.ep_flow", dest="ep_flow", choices=("home", "follow"), default="home",
                   help="under torchrun: home = each token returns to its rank after every MoE layer; follow = it stays "
                        "on its first-choice expert's rank (KV cache replicated on every rank; docs/methods/moetuner.md)")


def _ep_context(args):
    """Under torchrun: the expert-parallel context over every rank; None in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from moestack.config import ParallelConfig
    from moestack.parallel.mesh import init_parallel

    return init_parallel(ParallelConfig(ep=int(os.environ["WORLD_SIZE"])), args.device)


def cmd_generate(args) -> int:
    from moestack.parallel.mesh import shutdown

    ctx = _ep_context(args)  # torchrun: expert-parallel serving (serve/ep.py); rank 0 prints
    try:
        return _engine_generate(args, args.model or args.run_dir, ctx)
    finally:
        if ctx is not None:
            shutdown(ctx)


def _engine_generate(args, path, ctx=None) -> int:
    """Continue --prompt with the serving engine (expert parallel over ctx's ranks when given)."""
    from moestack.serve import LLM, SamplingParams

    try:  # the engine's errors for a bad model folder, prompt or flag combination say what to do
        llm = LLM(path, device=str(ctx.device) if ctx else args.device, drop_rate=args.drop_rate,
                  drop_policy=args.drop_policy, max_num_seqs=1,
                  realb=_realb(args), parallel=ctx, placement=args.placement or None, ep_flow=args.ep_flow)
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                seed=args.seed)
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
    except ValueError as err:
        print(f"moestack generate: error: {err}", file=sys.stderr)
        return 2
    if ctx is None or ctx.rank == 0:
        print(args.prompt + out.text)
    return 0


def _realb(args):
    """The RealbConfig `--realb` asks for, or None (ValueError on a bad spec)."""
    if args.realb is None:
        return None
    from moestack.inference.realb import parse_realb

    return parse_realb(args.realb)


def cmd_serve(args) -> int:
    try:
        from moestack.serve.server import serve
    except ImportError as err:
        print(f"moestack serve: error: the HTTP server needs the serve extra ({err.name} is missing): "
              "pip install 'moestack[serve]'", file=sys.stderr)
        return 2
    from moestack.parallel.mesh import shutdown
    from moestack.serve import LLM

    ctx = _ep_context(args)  # torchrun: rank 0 serves HTTP, the other ranks follow its engine (serve/ep_server.py)
    try:
        try:
            llm = LLM(args.model, device=str(ctx.device) if ctx else args.device, dtype=args.dtype,
                      max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, num_blocks=args.num_blocks,
                      drop_rate=args.drop_rate, drop_policy=args.drop_policy, realb=_realb(args), parallel=ctx,
                      placement=args.placement or None, ep_flow=args.ep_flow)
        except ValueError as err:
            print(f"moestack serve: error: {err}", file=sys.stderr)
            return 2
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        if ctx is None:
            serve(llm, name, args.host, args.port, args.api_key, args.max_queue)
            return 0
        from moestack.serve.ep_server import FrontEnd, follow_rank_zero

        if ctx.ep_rank != 0:
            follow_rank_zero(llm, ctx)
            return 0
        front = FrontEnd(llm, ctx)
        try:
            serve(front, name, args.host, args.port, args.api_key, args.max_queue)
        finally:
            front.close()
        return 0
    finally:
        if ctx is not None:
            shutdown(ctx)


def cmd_eval(args) -> int:
    from moestack.inference.cli import DROP_DEFAULTS, run_eval_with_drop

    if args.drop_rate is not None:
        return run_eval_with_drop(args)
    given = [f"--{name.replace('_', '-')}" for name in DROP_DEFAULTS if getattr(args, name) is not None]
    if given:
        print(f"moestack eval: error: {', '.join(given)} only apply with --drop-rate R; add one, or leave them out",
              file=sys.stderr)
        return 2
    from moestack.runs import evaluate_run

    result = evaluate_run(args.run_dir, args.batches, args.device)
    if result is not None:
        print(f"val_loss {result['val_loss']:.4f}  perplexity {result['perplexity']:.2f}  ({result['batches']} batches)")
    return 0


def cmd_trace(args) -> int:
    from moestack.runs import record_trace

    trace = record_trace(args.run_dir, args.tokens, args.out, args.device)
    log.info("trace of %d tokens over %d MoE layers written to %s", trace.num_tokens, trace.num_layers, args.out)
    return 0


def cmd_sparsify(args) -> int:
    from moestack.inference.cli import run_sparsify

    return run_sparsify(args)


def cmd_plan(args) -> int:
    from moestack.placement.cli import run_plan

    return run_plan(args)


def cmd_ckpt(args) -> int:
    from moestack.checkpoint.cli import run_ckpt

    return run_ckpt(args)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "serve": cmd_serve, "eval": cmd_eval, "trace": cmd_trace, "plan": cmd_plan,
            "ckpt": cmd_ckpt, "sparsify": cmd_sparsify}

if __name__ == "__main__":
    sys.exit(main())
