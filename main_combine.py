"""UMMKD 2D: train one dilated residual network on unpaired MR and CT, then test it.

Edit the settings below, or override any of them on the command line as --name=value
(names are case-insensitive), for example:

    python main_combine.py                                   # demo: phantom data, <10 min on 2 cores
    python main_combine.py --preset=paper                    # the paper's 2D setting (GPU)
    python main_combine.py --phase=test --test_model=output/2d_demo/checkpoints/model-1000
    python main_combine.py --phase=predict --predict_modality=ct --predict_input=scans/
    python main_combine.py --phase=export                    # SavedModel, signatures ct and mr

The chosen PRESET fills in the settings it lists (see PRESETS below) over the values
written here; command-line overrides come last. PRESET "custom" uses the values as written.
Relative paths are relative to this file's folder.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep errors to one readable line

# The settings shared with 3D (run control, task, loss weights, precision, devices, seed,
# bookkeeping) are in lib/settings.py; write one here again to change it for 2D only.

# --- what to run
PRESET = "demo"              # "demo" | "paper" | "abdomen" | "heldout" | "custom" (values below as written)
PHASE = "train_test"         # "train", "test", "train_test", "predict" (new scans) or "export" (SavedModel)
OUTPUT_PATH = "output/2d_paper"  # checkpoints, logs, config.json and results/ go here

# --- data (list files: one TFRecord per line for training, image,label or .npz for test)
SOURCE_TRAIN_LIST = "data/released/lists/mr_train_list"  # MR (source) training slices
SOURCE_VAL_LIST = "data/released/lists/mr_val_list"      # MR validation slices
TARGET_TRAIN_LIST = "data/released/lists/ct_train_list"  # CT (target) training slices
TARGET_VAL_LIST = "data/released/lists/ct_val_list"      # CT validation slices
SOURCE_TEST_LIST = "data/released/lists/mr_test_list"    # MR test volumes
TARGET_TEST_LIST = "data/released/lists/ct_test_list"    # CT test volumes
FOREGROUND_SHARE = 0.0       # share of training slices drawn among those with foreground (nnU-Net: 1/3)
AUGMENT = False              # on-the-fly augmentation of training slices (lib/augment.py), as below
# each transform: [probability, low, high], a value drawn uniformly in [low, high]
AUG_ROTATE = [0.5, -15.0, 15.0]     # rotation, degrees
AUG_SCALE = [0.5, 0.85, 1.25]       # zoom factor
AUG_SHIFT = [0.5, -0.05, 0.05]      # shift, fraction of the slice size (each axis)
AUG_ELASTIC = [0.0, 0.0, 4.0]       # elastic deformation, largest displacement in pixels
AUG_BIAS_FIELD = [0.3, 0.0, 0.4]    # smooth multiplicative bias field, log-amplitude
AUG_NOISE = [0.15, 0.0, 0.1]        # Gaussian noise, standard deviation (z-score units)
AUG_BLUR = [0.2, 0.5, 1.0]          # Gaussian blur, sigma in pixels
AUG_BRIGHTNESS = [0.5, 0.7, 1.3]    # intensity multiplier
AUG_CONTRAST = [0.5, 0.65, 1.5]     # contrast factor about the mean (range kept)
AUG_GAMMA = [0.3, 0.7, 1.5]         # gamma on intensities rescaled to [0, 1] (mean, std kept)

# --- network
NETWORK = "dilated_resnet_2d"  # recorded with checkpoints so another network's are refused
IMAGE_SIZE = 256             # input height and width (a multiple of 8)
FEATURE_BASE = 16            # f: channels of the first stage
DROPOUT = 0.25               # dropout rate after each convolution (training only)

# --- optimisation
BATCH_SIZE = 8               # slices per modality per step
NUM_STEPS = 150000           # training steps
LEARNING_RATE = 1e-3         # Adam learning rate at step 0
LR_DECAY_STEPS = 1000        # steps between learning-rate decays (x LR_DECAY)

# --- bookkeeping
CHECKPOINT_SPACE = 300       # steps between checkpoints
DISPLAY_STEP = 500           # steps between validation batches and image summaries
TEST_BATCH = 16              # slices per forward pass at test time
CHECK_DATA = True            # read every training record once before training (fail fast)

_DEMO = "data/generated/demo"       # where the demo (phantom) data are generated
_DEMO_SEED = 0                      # the demo data are the same whatever SEED (which seeds training)
_ABDOMEN = "data/generated/abdomen"  # where README's commands prepare the real abdominal pair
_HELDOUT = "output/compare_heldout/data"  # where experiments/compare.py --preset=heldout prepares its folds
PRESETS = {
    "custom": {},
    # the released MM-WHS slices as the original read them: its one-hot gave their label
    # 5 no class, its test flipped the released test volumes; float32 and TF 1's Adam
    "paper": dict(OUTPUT_PATH="output/2d_paper", OUT_OF_RANGE_LABELS="ignore",
                  TEST_FLIP="released", PRECISION="fp32", ADAM_EPSILON=1e-8, LR_SCHEDULE="step",
                  CHECKPOINT_MINUTES=10.0),
    "demo": dict(
        OUTPUT_PATH="output/2d_demo", IMAGE_SIZE=64, FEATURE_BASE=8, BATCH_SIZE=4,
        NUM_STEPS=1000, LR_SCHEDULE="step", LR_DECAY_STEPS=40, CHECKPOINT_SPACE=250, DISPLAY_STEP=200,
        AUGMENT=False,
        SOURCE_TRAIN_LIST=f"{_DEMO}/mr/train_list.txt", SOURCE_VAL_LIST=f"{_DEMO}/mr/val_list.txt",
        TARGET_TRAIN_LIST=f"{_DEMO}/ct/train_list.txt", TARGET_VAL_LIST=f"{_DEMO}/ct/val_list.txt",
        SOURCE_TEST_LIST=f"{_DEMO}/mr/test_list.txt", TARGET_TEST_LIST=f"{_DEMO}/ct/test_list.txt"),
    "abdomen": dict(
        OUTPUT_PATH="output/2d_abdomen", IMAGE_SIZE=64, FEATURE_BASE=8, BATCH_SIZE=4,
        NUM_STEPS=1500, LR_SCHEDULE="step", LR_DECAY_STEPS=100, CHECKPOINT_SPACE=250, DISPLAY_STEP=250,
        CLASS_NAMES=["liver", "right_kidney", "left_kidney", "spleen"], LATERAL_PAIRS=["2:3"],
        SOURCE_TRAIN_LIST=f"{_ABDOMEN}/mr_train/train_list.txt", SOURCE_VAL_LIST="",
        TARGET_TRAIN_LIST=f"{_ABDOMEN}/ct_train/train_list.txt", TARGET_VAL_LIST="",
        SOURCE_TEST_LIST=f"{_ABDOMEN}/mr_test/test_list.txt",
        TARGET_TEST_LIST=f"{_ABDOMEN}/ct_test/test_list.txt"),
    # real held-out patients (README, "Real held-out patients"): MR fold 0 of the CHAOS
    # patients, CT ct_0001 -> the DICOM patient; experiments/compare.py sets each fold's lists
    # and validation patients; the recipe was chosen on fold 0's validation patients
    # (docs/results.md, "Choosing the training recipe"); float32 on every CPU (in bf16 a
    # seed's MR average moved by up to 0.08, docs/results.md)
    "heldout": dict(
        OUTPUT_PATH="output/heldout", IMAGE_SIZE=64, FEATURE_BASE=8, BATCH_SIZE=4,
        PRECISION="fp32", NUM_STEPS=2500, LR_SCHEDULE="poly", CHECKPOINT_SPACE=500,
        DISPLAY_STEP=500, VALIDATE_EVERY=250, AUGMENT=True, FOREGROUND_SHARE=0.33, DROPOUT=0.0,
        CLASS_NAMES=["liver", "right_kidney", "left_kidney", "spleen"], LATERAL_PAIRS=["2:3"],
        SOURCE_TRAIN_LIST=f"{_HELDOUT}/mr_fold0/train_list.txt", SOURCE_VAL_LIST="",
        SOURCE_VAL_VOLUME_LIST=f"{_HELDOUT}/mr_fold0/val_volume_list.txt",
        TARGET_TRAIN_LIST=f"{_HELDOUT}/ct/train_list.txt", TARGET_VAL_LIST="",
        SOURCE_TEST_LIST=f"{_HELDOUT}/mr_fold0/test_list.txt",
        TARGET_TEST_LIST=f"{_HELDOUT}/ct/test_list.txt"),
}

_ROOT = os.path.dirname(os.path.abspath(__file__))


def network():
    """The 2D variant for lib.pipeline: model, slice batches, slice-wise prediction."""
    from lib.data import slice_training_data
    from lib.evaluate import (lateral_permutation, make_predict_fn, paper_coverage,
                              predict_volume_2d)
    from lib.pipeline import Network
    from model_2d import build_model

    def datasets(config, train_lists, val_lists, start_step=0):
        augment = None
        if config["AUGMENT"]:
            from lib.augment import make_augment, settings_of
            augment = make_augment(settings_of(config))
        return slice_training_data(config, train_lists, val_lists, augment, start_step)

    def predictor(model, config):
        fn = make_predict_fn(model, [config["IMAGE_SIZE"]] * 2 + [3])
        permutation = lateral_permutation(config["LATERAL_PAIRS"], config["N_CLASS"])
        return lambda m, image, probabilities=False: predict_volume_2d(
            fn, m, image, config["IMAGE_SIZE"], config["TEST_BATCH"], config["TEST_MIRROR"],
            probabilities, permutation=permutation)

    def prepare_data(config):
        if config["PRESET"] == "demo":
            from data.demo import ensure_demo_data
            ensure_demo_data(os.path.join(_ROOT, _DEMO), config["IMAGE_SIZE"], _DEMO_SEED)

    def coverage(config, depth):  # the original test batches slices by BATCH_SIZE
        return paper_coverage(depth, config["BATCH_SIZE"], config["SEED"])

    return Network("UMMKD 2D", build_model, datasets, predictor, prepare_data, coverage)


if __name__ == "__main__":
    from lib.cli import main

    sys.exit(main(globals(), network, presets=PRESETS, root=_ROOT))
