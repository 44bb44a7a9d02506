"""Phases of learning and mirroring, and the loop that runs them.

`mirror` (noise-driven mirror phases in which B learns W), `mirror_stream` (mirror batches beside learning, on a
CUDA side stream), `schedule` (the phase scheduler: Learn, Mirror, Repeat), `divergence` (non-finite numbers,
diagnosed) and `trainer` (the training loop: Trainer, TrainerConfig).
"""
from .divergence import DivergenceError
from .mirror import mirror_step
from .schedule import Learn, Mirror, Repeat, Schedule, paper_schedule
from .trainer import Trainer, TrainerConfig

__all__ = ["DivergenceError", "mirror_step", "Learn", "Mirror", "Repeat", "Schedule", "paper_schedule", "Trainer",
           "TrainerConfig"]
