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
