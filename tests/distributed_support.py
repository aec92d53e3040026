"""Run a reconstruction under torchrun and stop it after a number of steps, as an interrupted
run would (every rank stops before the same step; rank 0 has checkpointed the one before).

    torchrun --standalone --nproc-per-node 2 tests/distributed_support.py CONFIG.json STEPS

CONFIG.json: a `ReconstructionConfig.to_dict()`; give it checkpoint_interval_s 0 so that the
last completed step is in checkpoint.pt.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import joined
from cryostoch.engine.reconstruct import Reconstruction


class Stopped(Exception):
    """Raised on every rank before step `STEPS + 1`."""


def run_and_stop(config: ReconstructionConfig, steps: int) -> None:
    with joined(config.device) as world:
        config = dataclasses.replace(config, device=world.device)
        run = Reconstruction(config, progress=False, world=world)
        step = run._step

        def counted(batch: int) -> float:
            if run.state.iteration >= steps:
                raise Stopped
            return step(batch)

        run._step = counted
        try:
            run.run()
        except Stopped:
            return
        raise AssertionError(f"the run ended before {steps} steps")


if __name__ == "__main__":
    settings = json.loads(open(sys.argv[1]).read())
    run_and_stop(ReconstructionConfig.from_dict(settings), int(sys.argv[2]))
