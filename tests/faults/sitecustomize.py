"""Faults injected into every Python process a test starts (run.py, torchrun, the ranks) through PYTHONPATH.

METAFORMER_TEST_FAULTS is JSON: {"<part of a run directory's name>": "raise" | "nan", "sleep_s": seconds,
"hold_at_step": N, "hold_until": path, "nan_rank": R}. A run whose directory matches fails (or its loss turns NaN, on
rank R only where given) at its second step;
sleep_s slows every step down (the numbers stay the same) so that a test can kill a run mid-epoch; from step N on, a
run waits until the file `hold_until` exists (a test holds it there while it does what it tests).
"""

import json
import os

FAULTS = json.loads(os.environ.get("METAFORMER_TEST_FAULTS", "{}"))

if FAULTS:
    import time

    import torch

    from metaformer_lab.training.module import ImageClassifier

    training_step = ImageClassifier.training_step

    def faulty_training_step(self, batch, batch_idx):
        run_dir = str(self.trainer.default_root_dir)
        fault = next((fault for key, fault in FAULTS.items() if key in run_dir), None)
        if fault == "raise" and self.global_step >= 1:
            raise RuntimeError("injected failure")
        if fault == "nan" and self.global_step >= 1 and FAULTS.get("nan_rank", self.global_rank) == self.global_rank:
            with torch.no_grad():
                self.model.head.weight.fill_(float("nan"))
        time.sleep(FAULTS.get("sleep_s", 0))
        if self.global_step >= FAULTS.get("hold_at_step", float("inf")):
            while not os.path.exists(FAULTS["hold_until"]):
                time.sleep(0.05)
        return training_step(self, batch, batch_idx)

    ImageClassifier.training_step = faulty_training_step
