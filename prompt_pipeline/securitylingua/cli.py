"""`tessera securitylingua generate | train | eval`, registered by `server/cli.py`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prompt_pipeline.securitylingua.artifacts import (
    DEFAULT_EXTRACTOR_DIR,
    DEFAULT_HARM_CLASSIFIER,
    FULL_HARM_CLASSIFIER,
)


def _cmd_generate(args: argparse.Namespace) -> int:
    from prompt_pipeline.securitylingua.generator import eval_samples, train_samples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in (("train", train_samples(args.seed)), ("eval", eval_samples())):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as file:
            for sample in samples:
                file.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
        print(f"{out / f'{name}.jsonl'}: {len(samples)} prompts")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from prompt_pipeline.securitylingua.train import TrainConfig, train
    from prompt_pipeline.token_classifier.encoders import EncoderConfig

    encoder = EncoderConfig(kind=args.encoder, layers=args.layers, hidden=args.hidden,
                            heads=args.heads, ffn=args.ffn)
    config = TrainConfig(out_dir=Path(args.out), encoder=encoder, epochs=args.epochs,
                         learning_rate=args.lr, seed=args.seed, batch_tokens=args.batch_tokens,
                         max_chunk_tokens=args.max_chunk_tokens, eval_limit=args.eval_limit,
                         threads=args.threads)
    print(json.dumps(train(config), indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from prompt_pipeline.securitylingua.evaluate import extraction_metrics
    from prompt_pipeline.securitylingua.generator import eval_samples
    from prompt_pipeline.token_classifier import TokenClassifier

    torch.set_num_threads(2)
    metrics = extraction_metrics(TokenClassifier.load(args.artifact), eval_samples(),
                                 args.threshold)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_train_harm(args: argparse.Namespace) -> int:
    if args.attention:
        from prompt_pipeline.securitylingua.harm_attention import train_attention_harm

        out = Path(args.out or DEFAULT_HARM_CLASSIFIER)
        layers = 0 if args.layers is None else args.layers
        _, facts = train_attention_harm(out, args.seed, layers, args.precision, args.heads,
                                        args.with_intentions, form_crossed=args.form_crossed)
    else:
        from prompt_pipeline.securitylingua.harm import train_harm_classifier

        out = Path(args.out or FULL_HARM_CLASSIFIER)
        layers = 6 if args.layers is None else args.layers
        facts = train_harm_classifier(out, args.seed, layers, args.with_intentions)
    print(json.dumps(facts, indent=2))
    return 0


def add_securitylingua_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("securitylingua", help="SecurityLingua: data, training, eval")
    parser.set_defaults(config=None)  # `tessera` reads args.config for every command
    sub = parser.add_subparsers(dest="securitylingua_command", required=True)

    generate = sub.add_parser("generate", help="write the seeded train/eval prompts as JSONL")
    generate.add_argument("--out", default="data/securitylingua")
    generate.add_argument("--seed", type=int, default=42)
    generate.set_defaults(func=_cmd_generate)

    # Defaults = the shipped extractor's run (artifacts/intention-compact/config.json).
    train = sub.add_parser("train", help="train the intention extractor (resumable)")
    train.add_argument("--out", default=str(DEFAULT_EXTRACTOR_DIR),
                       help="artifact directory; an unfinished run there is resumed")
    train.add_argument("--encoder", choices=["compact", "minilm"], default="compact")
    train.add_argument("--layers", type=int, default=3)
    train.add_argument("--hidden", type=int, default=128)
    train.add_argument("--heads", type=int, default=4)
    train.add_argument("--ffn", type=int, default=256)
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-tokens", type=int, default=1024)
    train.add_argument("--max-chunk-tokens", type=int, default=256)
    train.add_argument("--eval-limit", type=int, default=None)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threads", type=int, default=1, help="torch threads (<= 2 here)")
    train.set_defaults(func=_cmd_train)

    harm = sub.add_parser("train-harm", help="train block mode's harm classifier")
    harm.add_argument("--out", default=None, help="default: the shipped file of that kind "
                      f"({DEFAULT_HARM_CLASSIFIER.name} with --attention, else "
                      f"{FULL_HARM_CLASSIFIER.name})")
    harm.add_argument("--seed", type=int, default=42)
    harm.add_argument("--attention", action="store_true",
                      help="attention-pooled head over MiniLM's per-piece states instead of a "
                      "logistic regression on their mean (the default artifact, "
                      "harm-classifier-attention.json: --attention --layers 0 "
                      "--with-intentions)")
    harm.add_argument("--heads", type=int, default=4, help="attention heads (--attention)")
    harm.add_argument("--form-crossed", action="store_true",
                      help="also fit on harmful goals asked as questions and benign how-to "
                      "questions given as imperatives (--attention)")
    harm.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                      help="MiniLM precision for the states (--attention)")
    harm.add_argument("--layers", type=int, default=None,
                      help="MiniLM layers under the embedding (default 6 = the full sentence "
                      "model, harm-classifier.json; with --attention 0 = its token "
                      "embeddings only, as in harm-classifier-attention.json and "
                      "harm-classifier-l0.json)")
    harm.add_argument("--with-intentions", action="store_true",
                      help="also fit on the extractor's intentions of the generated training "
                      "prompts (training families only; harm-classifier-l0-intentions.json)")
    harm.set_defaults(func=_cmd_train_harm)

    evaluate = sub.add_parser("eval", help="extraction F1 on the held-out families")
    evaluate.add_argument("--artifact", default=str(DEFAULT_EXTRACTOR_DIR))
    evaluate.add_argument("--threshold", type=float, default=0.5)
    evaluate.set_defaults(func=_cmd_eval)
