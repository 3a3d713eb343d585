"""`tessera mobile tts`: Best-of-N accuracy curve, or one beam-searched answer."""

from __future__ import annotations

import argparse
import json


def add_tts_parser(sub: argparse._SubParsersAction) -> None:
    tts = sub.add_parser("tts", help="test-time scaling against an OpenAI-compatible URL")
    tts.add_argument("--url", default="http://127.0.0.1:8000/v1",
                     help="OpenAI-compatible base URL (default: the gateway)")
    tts.add_argument("--model", default="smollm2-135m-instruct")
    tts.add_argument("--task", choices=("arithmetic", "addition", "choice"), default="arithmetic")
    tts.add_argument("--count", type=int, default=20)
    tts.add_argument("--n", default="1,4,8,16", help="sample counts to evaluate")
    tts.add_argument("--scorer", default="likelihood,vote",
                     help="comma list of likelihood, vote, verifier")
    tts.add_argument("--beam", metavar="QUESTION", default=None,
                     help="instead: step beam search on one question (vLLM endpoints)")
    tts.add_argument("--seed", type=int, default=0)
    tts.add_argument("--concurrency", type=int, default=4,
                     help="tasks in flight at once (the server batches their samples)")
    tts.set_defaults(func=_cmd_tts)


def _cmd_tts(args: argparse.Namespace) -> int:
    from mobile.tts.client import Endpoint

    endpoint = Endpoint(args.url, args.model)
    if args.beam:
        from mobile.tts.beam import beam_search

        res = beam_search(endpoint, args.beam)
        print(json.dumps({"answer": res.best.text, "mean_logprob": res.best.score,
                          "completion_tokens": res.generated_tokens}, indent=1))
        return 0
    from mobile.tts.best_of_n import evaluate
    from mobile.tts.tasks import TASK_SETS

    tasks = TASK_SETS[args.task](args.count, args.seed)
    result = evaluate(endpoint, tasks, [int(n) for n in args.n.split(",")],
                      args.scorer.split(","), concurrency=args.concurrency)
    result.pop("tasks")
    print(json.dumps(result, indent=1))
    return 0
