"""UMMKD 3D: test a trained 3D U-Net on the MR and CT test volumes.

Uses the settings of main.py (one list, written there), with PHASE "test":

    python test.py                                  # latest checkpoint of the demo run
    python test.py --test_model=output/3d_demo/checkpoints/model-500
    python test.py --preset=paper

Results go to OUTPUT_PATH/results/ (metrics.json, metrics.csv, predictions, figures).
"""
import sys

import main as training  # main.py beside this file: the 3D settings, PRESETS and network()

PHASE = "test"               # this script only tests
TEST_MODEL = ""              # checkpoint prefix to test; empty = latest of OUTPUT_PATH

if __name__ == "__main__":
    from lib.cli import main

    settings = {**vars(training), "PHASE": PHASE, "TEST_MODEL": TEST_MODEL}
    sys.exit(main(settings, training.network, presets=training.PRESETS, root=training._ROOT))
