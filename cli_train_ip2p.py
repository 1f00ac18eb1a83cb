"""`python -m tunelab train-ip2p`: InstructPix2Pix fine-tuning (full or LoRA) from a terminal (also
`python -m tunelab.training ip2p`). The flags and the run live in `training.ip2p` (`add_arguments`, `run`)."""
from __future__ import annotations


def add_arguments(p) -> None:
    from .training.ip2p import add_arguments as add

    add(p)


def run(args) -> int:
    from .training.ip2p import run as run_ip2p

    return run_ip2p(args)
