"""`tessera mobile ...`: ActiveFlow convert / calibrate / run, and test-time scaling.

Only argparse at import time: `server/cli.py` registers these subcommands without pulling in
numpy or torch until one of them runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEFAULT_MODEL_DIR = Path("data/models/smollm2-135m-instruct")
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30,
          "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(text: str) -> int:
    """'64MiB' -> 67108864; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (e.g. 64MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def default_flash_path(model_dir: Path) -> Path:
    return model_dir.parent.parent / "mobile" / f"{model_dir.name}.flash.bin"


def add_mobile_parser(commands: argparse._SubParsersAction) -> None:
    mobile = commands.add_parser("mobile", help="on-device inference: ActiveFlow engine, TTS")
    mobile.set_defaults(config=None)  # `tessera` reads args.config for every command
    sub = mobile.add_subparsers(dest="mobile_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
        p.add_argument("--flash", type=Path, default=None,
                       help="flash-layout file (default: data/mobile/<model>.flash.bin)")

    conv = sub.add_parser("convert", help="write the channel-major flash file")
    common(conv)
    conv.set_defaults(func=_cmd_convert)

    cal = sub.add_parser("calibrate", help="per-layer thresholds from local text")
    common(cal)
    cal.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    cal.add_argument("--tokens", type=int, default=128)
    cal.add_argument("--sparsity", default="0.3,0.5,0.6,0.7")
    cal.add_argument("--out", type=Path, default=None)
    cal.set_defaults(func=_cmd_calibrate)

    run = sub.add_parser("run", help="generate with weights streamed under a DRAM budget")
    common(run)
    run.add_argument("--dram-budget", type=parse_bytes, default=parse_bytes("64MiB"))
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--sparsity", type=float, default=0.0,
                     help="0 = dense; else needs `tessera mobile calibrate` thresholds")
    run.add_argument("--thresholds", type=Path, default=None)
    run.add_argument("--lookahead", type=int, default=2, help="layers preloaded ahead (N)")
    run.add_argument("--no-chat", action="store_true", help="raw prompt, no chat template")
    run.set_defaults(func=_cmd_run)

    dis = sub.add_parser("distill", help="sparsity-aware self-distillation (KL to the dense "
                         "model, straight-through masks), then convert + calibrate")
    common(dis)
    dis.add_argument("--out", type=Path, default=None,
                     help="HF checkpoint dir of the student (default: data/mobile/"
                          "<model>-distilled-sp<S>); its flash file goes to <out>.flash.bin")
    dis.add_argument("--sparsity", type=float, default=0.5)
    dis.add_argument("--steps", type=int, default=150)
    dis.add_argument("--seq-len", type=int, default=256)
    dis.add_argument("--lr", type=float, default=2e-5)
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--max-minutes", type=float, default=30.0,
                     help="stop (checkpointed) after this long; rerun to resume")
    dis.add_argument("--calibration-tokens", type=int, default=256)
    dis.add_argument("--threads", type=int, default=1,
                     help="torch threads; 1 on a shared box (NOTES: 2 OpenMP threads ran 5-8x "
                          "slower than 1 at load ~20)")
    dis.set_defaults(func=_cmd_distill)

    from mobile.tts.cli import add_tts_parser

    add_tts_parser(sub)


def _flash(args: argparse.Namespace) -> Path:
    return args.flash or default_flash_path(args.model_dir)


def _ensure_flash(args: argparse.Namespace):
    from mobile.activeflow.layout import FlashIndex, write_flash_file

    path = _flash(args)
    if not Path(f"{path}.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[mobile] converting {args.model_dir} -> {path}", flush=True)
        return write_flash_file(args.model_dir, path)
    return FlashIndex.load(path)


def _cmd_convert(args: argparse.Namespace) -> int:
    index = _ensure_flash(args)
    print(f"[mobile] {index.path}: {index.weight_bytes / 2**20:.1f} MiB of streamed weights")
    return 0


def _thresholds_path(args: argparse.Namespace) -> Path:
    return Path(f"{_flash(args)}.thresholds.json")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from mobile.activeflow.engine import ActiveFlowEngine, EngineOptions
    from mobile.activeflow.sparsity import collect_abs_inputs, save_thresholds, thresholds_for
    from mobile.activeflow.text import load_tokenizer

    index = _ensure_flash(args)
    tok = load_tokenizer(args.model_dir)
    ids = tok.encode(args.text.read_text()).ids[: args.tokens]
    engine = ActiveFlowEngine(index, EngineOptions(budget_bytes=index.weight_bytes + (64 << 20),
                                                   max_seq_len=len(ids)))
    print(f"[mobile] calibrating on {len(ids)} tokens of {args.text}", flush=True)
    abs_inputs = collect_abs_inputs(engine, ids, progress=True)
    engine.close()
    levels = [float(s) for s in args.sparsity.split(",")]
    out = args.out or _thresholds_path(args)
    save_thresholds(out, {sp: thresholds_for(abs_inputs, sp) for sp in levels})
    print(f"[mobile] thresholds for sparsity {levels} -> {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mobile.activeflow.engine import ActiveFlowEngine, EngineOptions
    from mobile.activeflow.sparsity import load_thresholds
    from mobile.activeflow.text import generate, load_tokenizer

    index = _ensure_flash(args)
    thresholds = None
    if args.sparsity > 0:
        table = load_thresholds(args.thresholds or _thresholds_path(args))
        if args.sparsity not in table:
            raise SystemExit(f"no thresholds for sparsity {args.sparsity}: have {sorted(table)}")
        thresholds = table[args.sparsity]
    engine = ActiveFlowEngine(index, EngineOptions(budget_bytes=args.dram_budget,
                                                   lookahead_layers=args.lookahead),
                              thresholds)
    tok = load_tokenizer(args.model_dir)
    s = engine.summary()
    print(f"[mobile] budget {args.dram_budget / 2**20:.1f} MiB: {s['resident_share']:.0%} of "
          f"{index.weight_bytes / 2**20:.0f} MiB weights cacheable, O_DIRECT={s['o_direct']}, "
          f"sparsity {args.sparsity}", flush=True)
    generate(engine, tok, args.prompt, args.max_tokens, chat=not args.no_chat, progress=True)
    engine.close()
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from mobile.activeflow.corpus import CALIBRATION, split_texts, tokens_of
    from mobile.activeflow.distill import DistillConfig, distill, load_model, save_student
    from mobile.activeflow.layout import write_flash_file
    from mobile.activeflow.text import load_tokenizer

    out = args.out or args.model_dir.parent.parent / "mobile" / (
        f"{args.model_dir.name}-distilled-sp{args.sparsity}")
    cfg = DistillConfig(sparsity=args.sparsity, steps=args.steps, seq_len=args.seq_len,
                        lr=args.lr, seed=args.seed, max_minutes=args.max_minutes,
                        threads=args.threads)
    tok = load_tokenizer(args.model_dir)
    print("[mobile] tokenizing the local training text (corpus.py: Apache-2.0 and 1/8 of the "
          "docs held out)", flush=True)
    import numpy as np

    # int32 array, not a list of 5.9M Python ints (~200 MB): the first run was OOM-killed
    train_ids = np.asarray(
        tokens_of(tok, split_texts()["train"], tok.token_to_id("<|endoftext|>")), np.int32
    )
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the tokenizer's temporaries back
    calib = tok.encode(CALIBRATION.read_text()).ids[: args.calibration_tokens]
    print(f"[mobile] {len(train_ids)} training tokens; {cfg}", flush=True)
    student, teacher = load_model(args.model_dir), load_model(args.model_dir)
    log = distill(student, teacher, train_ids, calib, cfg, out / "train")
    if not log["finished"]:
        print(f"[mobile] stopped at step {len(log['losses'])}/{cfg.steps} after "
              f"{args.max_minutes} min; run the same command again to resume", flush=True)
        return 3
    save_student(student, args.model_dir, out, {"log": log, "base": str(args.model_dir),
                                                "calibration_tokens": len(calib)})
    flash = args.flash or Path(f"{out}.flash.bin")
    write_flash_file(out, flash)  # always rewritten: an older file may hold other weights
    _cmd_calibrate(argparse.Namespace(model_dir=out, flash=flash, text=CALIBRATION,
                                      tokens=args.calibration_tokens, sparsity="0.3,0.5,0.7",
                                      out=None))
    print(f"[mobile] distilled weights {out}, flash file {flash}; run with "
          f"`tessera mobile run --model-dir {out} --flash {flash} --sparsity {args.sparsity} "
          f"...`", flush=True)
    return 0
