"""Faults injected into every Python process a test starts (run.py, torchrun, the ranks) through PYTHONPATH.

METAFORMER_TEST_FAULTS is JSON: {"<part of a run directory's name>": "raise" | "nan", "sleep_s": seconds}. A run
whose directory matches fails (or its loss turns NaN) at its second step; sleep_s slows every step down (the numbers
stay the same) so that a test can kill a run mid-epoch.
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
        if fault == "nan" and self.global_step >= 1:
            with torch.no_grad():
                self.model.head.weight.fill_(float("nan"))
        time.sleep(FAULTS.get("sleep_s", 0))
        return training_step(self, batch, batch_idx)

    ImageClassifier.training_step = faulty_training_step
