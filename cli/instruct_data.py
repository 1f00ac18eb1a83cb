"""`python -m tunelab instruct-data {folders,table,synth}`: build an instruction dataset for InstructPix2Pix."""
from __future__ import annotations

INPUT_FLAGS = {"input_dir": "inputs", "target_dir": "targets", "clean_dir": "clean", "instructions": "instruction"}


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
    f.add_argument("--task", default=None,
                   help="task name recorded per example (default: from the instruction, 'cartoonize' for the "
                        "built-in synonyms)")
    t = sub.add_parser("table", help="import a local jsonl / csv / parquet table")
    t.add_argument("--table", required=True, help="the table file")
    t.add_argument("--columns", default="tunelab",
                   help=f"a preset ({', '.join(COLUMN_PRESETS)}) or input=COL,instruction=COL,edited=COL")
    t.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the table's)")
    s = sub.add_parser("synth", help="low-level pairs from clean images: rain, noise, blur, low light")
    s.add_argument("--clean", required=True, help="folder of clean images (the targets)")
    s.add_argument("--degradations", default=",".join(DEFAULT_DEGRADATIONS),
                   help=f"comma-separated, from {', '.join(DEGRADATIONS)} (default %(default)s)")
    for q in (f, t, s):
        q.add_argument("--out", required=True,
                       help="new dataset folder (a finished one with the same settings is reused as it is)")
        q.add_argument("--seed", type=int, default=0,
                       help="seed of the instruction choice and degradations, 0..2^64-1; same seed, same bytes "
                            "(default 0)")
        q.add_argument("--resolution", type=int, default=0,
                       help="resize the shorter side to this first (default 0: keep the size)")
        q.add_argument("--limit", type=int, default=0, help="keep the first N examples; 0: all (default 0)")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction held out as split 'validation', by source image and stratified by task, "
                            "from 0 up to 1; 0: none (default 0)")


def run(args) -> int:
    from pathlib import Path

    from ..core import files, instruct_data

    files.check_output_dir(args.out, "out")
    common = dict(seed=args.seed, resolution=args.resolution, limit=args.limit, val_fraction=args.val_fraction)
    if args.source == "folders":
        instructions = args.instruction
        if args.instructions_file:
            path = files.check_input_file(args.instructions_file, "instructions_file", what="instructions file")
            try:
                instructions = Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                from ..core.errors import TuneLabError

                raise TuneLabError(f"'{path}' is not UTF-8 text ({e.reason}); save it as UTF-8",
                                   input_name="instructions_file") from None
        result = instruct_data.from_folders(args.inputs, args.targets, args.out, instructions=instructions,
                                            task=args.task, **common)
    elif args.source == "table":
        result = instruct_data.from_table(args.table, args.out, columns=args.columns, image_root=args.image_root,
                                          **common)
    else:
        result = instruct_data.synthesize(args.clean, args.out, degradations=args.degradations, **common)
    tasks = ", ".join(f"{k}: {v}" for k, v in result["tasks"].items())
    verb = "reused the finished dataset" if result.get("reused") else "wrote"
    print(f"{verb} {result['examples']} example(s) in {result['folder']} ({tasks})")
    return 0
