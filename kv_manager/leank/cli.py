"""`tessera leank train | show`, registered by `server/cli.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MASK = Path("kv_manager/leank/masks/smollm2-135m-instruct_s0.7_a16.safetensors")


def _cmd_train(args: argparse.Namespace) -> int:
    from kv_manager.leank.train import TrainConfig, summary, train

    config = TrainConfig(model_dir=Path(args.model), out=Path(args.out), sparsity=args.sparsity,
                         align=args.align, seq_len=args.seq_len, stage1_steps=args.stage1_steps,
                         stage2_steps=args.stage2_steps, mode=args.mode, seed=args.seed,
                         threads=args.threads)
    print(summary(train(config)))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from kv_manager.leank.mask import load_mask

    meta = load_mask(Path(args.mask)).metadata()
    meta.pop("kept_channels")
    print(json.dumps(meta, indent=2))
    return 0


def add_leank_parser(commands: argparse._SubParsersAction) -> None:
    leank = commands.add_parser("leank", help="LeanK K-channel masks (arXiv 2508.02215)")
    leank.set_defaults(config=None)  # `tessera` reads args.config for every command
    sub = leank.add_subparsers(dest="leank_command", required=True)
    train = sub.add_parser("train", help="two-stage mask training on a local HF model (CPU)")
    train.add_argument("--model", required=True, help="HF model directory")
    train.add_argument("--out", default=str(DEFAULT_MASK), help="mask file (.safetensors)")
    train.add_argument("--sparsity", type=float, default=0.7, help="fraction of K dropped")
    train.add_argument("--align", type=int, default=16, help="kept channels per head: multiple")
    train.add_argument("--seq-len", type=int, default=256, help="training window (tokens)")
    train.add_argument("--stage1-steps", type=int, default=100)
    train.add_argument("--stage2-steps", type=int, default=60)
    train.add_argument("--mode", choices=["decode", "all"], default="decode",
                       help="decode: masked decode after dense prefill (serving); all: mask "
                       "keys at every position")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.set_defaults(func=_cmd_train)
    show = sub.add_parser("show", help="print a mask file's metadata")
    show.add_argument("mask")
    show.set_defaults(func=_cmd_show)
