"""UMMKD 3D: train one 3D U-Net on unpaired MR and CT slabs (test it with test.py).

Edit the settings below, or override any of them on the command line as --name=value
(names are case-insensitive), for example:

    python main.py                          # demo: phantom data, a few minutes on a CPU
    python test.py                          # test the demo run's latest checkpoint
    python main.py --preset=paper           # the paper's 3D setting (GPU)
    python main.py --phase=train_test       # train, then test

The chosen PRESET fills in the settings it lists (see PRESETS below) over the values
written here; command-line overrides come last. PRESET "custom" uses the values as written.
test.py imports these settings, so they are written once, here. Relative paths are
relative to the repository root (the folder above this one), from wherever you run.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep errors to one readable line
# the repository (lib/) and this folder (model_3d), from wherever this file is run or loaded
sys.path[:0] = [p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

# The settings shared with 2D (run control, task, loss weights, precision, devices, seed,
# bookkeeping) are in lib/settings.py; write one here again to change it for 3D only.

# --- what to run
PRESET = "demo"              # "demo" | "paper" | "heldout" | "custom" (values below as written)
PHASE = "train"              # "train", "test", "train_test", "predict" or "export" (test.py sets "test")
OUTPUT_PATH = "output/3d_paper"  # checkpoints, logs, config.json and results/ go here

# --- data (list files of "image,label" NIfTI pairs, slices last; test lists may hold .npz)
SOURCE_TRAIN_LIST = "data/prepared/mr/train_volume_list.txt"  # MR (source) training volumes
SOURCE_VAL_LIST = "data/prepared/mr/val_volume_list.txt"      # MR validation volumes
TARGET_TRAIN_LIST = "data/prepared/ct/train_volume_list.txt"  # CT (target) training volumes
TARGET_VAL_LIST = "data/prepared/ct/val_volume_list.txt"      # CT validation volumes
SOURCE_TEST_LIST = "data/prepared/mr/test_list.txt"           # MR test volumes
TARGET_TEST_LIST = "data/prepared/ct/test_list.txt"           # CT test volumes

# --- network
NETWORK = "unet3d"           # recorded with checkpoints so another network's are refused
PATCH_SIZE = [256, 256, 8]   # training slab [height, width, depth] (multiples of 8)
FEATURE_BASE = 16            # f: channels of the first level

# --- optimisation
BATCH_SIZE = 2               # slabs per modality per step
NUM_STEPS = 50000            # training steps
LEARNING_RATE = 1e-4         # Adam learning rate at step 0
LR_DECAY_STEPS = 500         # steps between learning-rate decays (x LR_DECAY)

# --- bookkeeping
CHECKPOINT_SPACE = 200       # steps between checkpoints
DISPLAY_STEP = 500           # steps between validation batches and image summaries
TEST_STRIDE = 0              # depth step of the test windows; 0 = half a slab
TEST_BATCH = 2               # windows per forward pass at test time

_DEMO = "data/generated/demo"       # where the demo (phantom) data are generated
_DEMO_SEED = 0                      # the demo data are the same whatever SEED (which seeds training)
_DEMO_IMAGE_SIZE = 64               # in-plane size of the demo data (shared with the 2D demo)
_HELDOUT = "output/compare3d_heldout/data"  # where experiments/compare.py --network=3d --preset=heldout prepares its folds
PRESETS = {
    "custom": {},
    # the original's abdominal 3D setting: its one-hot gave labels outside the classes no
    # class; float32 and TF 1's Adam
    "paper": dict(OUTPUT_PATH="output/3d_paper", OUT_OF_RANGE_LABELS="ignore",
                  PRECISION="fp32", ADAM_EPSILON=1e-8, LR_SCHEDULE="step", CHECKPOINT_MINUTES=10.0,
                  CLASS_NAMES=["liver", "right_kidney", "left_kidney", "spleen"],
                  LATERAL_PAIRS=["2:3"]),
    "demo": dict(
        OUTPUT_PATH="output/3d_demo", PATCH_SIZE=[64, 64, 8], FEATURE_BASE=8, BATCH_SIZE=2,
        NUM_STEPS=500, LEARNING_RATE=1e-3, LR_SCHEDULE="step", LR_DECAY_STEPS=50, CHECKPOINT_SPACE=100,
        DISPLAY_STEP=100,
        SOURCE_TRAIN_LIST=f"{_DEMO}/mr/train_volume_list.txt",
        SOURCE_VAL_LIST=f"{_DEMO}/mr/val_volume_list.txt",
        TARGET_TRAIN_LIST=f"{_DEMO}/ct/train_volume_list.txt",
        TARGET_VAL_LIST=f"{_DEMO}/ct/val_volume_list.txt",
        SOURCE_TEST_LIST=f"{_DEMO}/mr/test_list.txt", TARGET_TEST_LIST=f"{_DEMO}/ct/test_list.txt"),
    # real held-out patients (README, "Real held-out patients"): MR fold 0 of the CHAOS
    # patients, CT ct_0001 -> the DICOM patient; experiments/compare.py sets each fold's lists;
    # float32 on every CPU, so that a rerun reproduces the README's table (in bf16 a seed's
    # MR average moved by up to 0.08 from it, docs/results.md)
    "heldout": dict(
        OUTPUT_PATH="output/heldout3d", PATCH_SIZE=[64, 64, 8], FEATURE_BASE=8, BATCH_SIZE=2,
        PRECISION="fp32", NUM_STEPS=400, LEARNING_RATE=1e-3, LR_SCHEDULE="step",
        LR_DECAY_STEPS=40,
        CHECKPOINT_SPACE=200, DISPLAY_STEP=200,
        CLASS_NAMES=["liver", "right_kidney", "left_kidney", "spleen"], LATERAL_PAIRS=["2:3"],
        SOURCE_TRAIN_LIST=f"{_HELDOUT}/mr_fold0/train_volume_list.txt", SOURCE_VAL_LIST="",
        TARGET_TRAIN_LIST=f"{_HELDOUT}/ct/train_volume_list.txt", TARGET_VAL_LIST="",
        SOURCE_TEST_LIST=f"{_HELDOUT}/mr_fold0/test_list.txt",
        TARGET_TEST_LIST=f"{_HELDOUT}/ct/test_list.txt"),
}

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def network():
    """The 3D variant for lib.pipeline: model, slab batches, sliding-window prediction."""
    from lib.data import volume_training_data
    from lib.evaluate import lateral_permutation, make_predict_fn, predict_volume_3d
    from lib.pipeline import Network
    from model_3d import build_model

    def predictor(model, config):
        patch = [int(p) for p in config["PATCH_SIZE"]]
        fn = make_predict_fn(model, [*patch, 1])  # compiled once per modality, reused per volume
        permutation = lateral_permutation(config["LATERAL_PAIRS"], config["N_CLASS"])
        return lambda m, image, probabilities=False: predict_volume_3d(
            fn, m, image, patch, config["N_CLASS"], config["TEST_STRIDE"] or None,
            config["TEST_BATCH"], config["TEST_MIRROR"], probabilities, permutation=permutation)

    def prepare_data(config):
        if config["PRESET"] == "demo":
            from data.demo import ensure_demo_data
            ensure_demo_data(os.path.join(_ROOT, _DEMO), _DEMO_IMAGE_SIZE, _DEMO_SEED)

    return Network("UMMKD 3D", build_model, volume_training_data, predictor, prepare_data)


if __name__ == "__main__":
    from lib.cli import main

    sys.exit(main(globals(), network, presets=PRESETS, root=_ROOT))
