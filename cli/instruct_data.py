"""`python -m tunelab instruct-data {folders,table,synth}`: build an instruction dataset for InstructPix2Pix."""
from __future__ import annotations


def add_arguments(p) -> None:
    from ..core.instruct_data import COLUMN_PRESETS, DEFAULT_DEGRADATIONS, DEGRADATIONS

    sub = p.add_subparsers(dest="source", required=True)
    f = sub.add_parser("folders", help="pairs from an inputs folder and a targets folder, matched by file name")
    f.add_argument("--inputs", required=True, help="folder of input images")
    f.add_argument("--targets", required=True, help="folder of edited images (same file names, any image type)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--instruction", action="append", default=None,
                   help="an instruction; repeat for synonyms chosen per example by seed "
                        "(default: the 50 built-in cartoonization synonyms)")
    g.add_argument("--instructions-file", default=None, help="a text file of instructions, one per line")
    f.add_argument("--task", default=None, help="task name recorded per example (default: from the instruction)")
    t = sub.add_parser("table", help="import a local jsonl / csv / parquet table")
    t.add_argument("--table", required=True, help="the table file")
    t.add_argument("--columns", default="tunelab",
                   help=f"a preset ({', '.join(COLUMN_PRESETS)}) or input=COL,instruction=COL,edited=COL")
    t.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the table's)")
    s = sub.add_parser("synth", help="low-level pairs from clean images: rain, noise, blur, low light")
    s.add_argument("--clean", required=True, help="folder of clean images (the targets)")
    s.add_argument("--degradations", default=",".join(DEFAULT_DEGRADATIONS),
                   help=f"comma-separated, from {', '.join(DEGRADATIONS)} (default: %(default)s)")
    for q in (f, t, s):
        q.add_argument("--out", required=True, help="new dataset folder")
        q.add_argument("--seed", type=int, default=0, help="seed (default 0); same seed, same bytes")
        q.add_argument("--resolution", type=int, default=0,
                       help="resize the shorter side to this first (default 0: keep the size)")
        q.add_argument("--limit", type=int, default=0, help="keep the first N examples (default 0: all)")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction held out as split 'validation', by source image and stratified by task "
                            "(default 0: none)")


def run(args) -> int:
    from pathlib import Path

    from ..core import instruct_data

    common = dict(seed=args.seed, resolution=args.resolution, limit=args.limit, val_fraction=args.val_fraction)
    if args.source == "folders":
        instructions = args.instruction
        if args.instructions_file:
            instructions = Path(args.instructions_file).read_text(encoding="utf-8")
        result = instruct_data.from_folders(args.inputs, args.targets, args.out, instructions=instructions,
                                            task=args.task, **common)
    elif args.source == "table":
        result = instruct_data.from_table(args.table, args.out, columns=args.columns, image_root=args.image_root,
                                          **common)
    else:
        result = instruct_data.synthesize(args.clean, args.out, degradations=args.degradations, **common)
    tasks = ", ".join(f"{k}: {v}" for k, v in result["tasks"].items())
    print(f"wrote {result['examples']} example(s) to {result['folder']} ({tasks})")
    return 0
