"""``python -m sstmerge.train``: train one LoRA adapter (utility or safety) on a model of the registry.

    python -m sstmerge.train --model mistral-7b --data utility-train --out adapters/utility
    python -m sstmerge.train --model /path/to/model --data my_safety.jsonl --out adapters/safety

``--data`` is a registry name (sstmerge.data.registry: its local file) or a file of chat rows or MMLU
rows. Errors in the input print one line and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import CliParser, InputError, cli_main
from .lora import DEFAULT_TARGET_MODULES, train_lora


def main(argv: Sequence[str] | None = None) -> int:
    from ..data import registry

    p = CliParser(prog="python -m sstmerge.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="tiny | mistral-7b | llama-3.1-8b | qwen2.5-14b | PATH")
    p.add_argument("--data", required=True, help="registry name (safety-train, utility-train, ...) or a JSONL file")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.data in registry.DATASETS:
        rows = registry.load(args.data)
    else:
        path = Path(args.data)
        if not path.exists():
            raise InputError(f"--data {args.data}: neither a registry dataset ({', '.join(registry.DATASETS)}) nor a file")
        first = registry.read_rows(path)[0]
        rows = registry.load_chat(path) if "messages" in first else registry.load_mmlu(path)
    from ..worlds import resolve_model  # a front end: a world name ("tiny") -> its base model dir

    out = train_lora(resolve_model(args.model), rows, args.out, r=args.r, alpha=args.alpha,
                     target_modules=[t for t in args.target_modules.split(",") if t], steps=args.steps,
                     lr=args.lr, seed=args.seed, batch_size=args.batch_size, max_length=args.max_length)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
