"""The settings schema: the shared settings and their defaults, and the type, allowed values
and derived values of every setting. Imports no TensorFlow.

The constants below are the settings the 2D (main_combine.py) and the 3D
(3d_implementation/main.py) entry scripts share; each entry script lists the settings of its
own network. lib.config.resolve puts the two together (a constant written again in an entry
script wins), then the PRESET, then ``--name=value`` overrides; lib.config.validate checks
the result against the tables at the end of this module. Every setting has its default in
exactly one place: here, or in the entry script of its network.
"""
from __future__ import annotations

# --- run control
TEST_MODEL = ""              # checkpoint prefix to test; empty = latest of OUTPUT_PATH
RESUME = False               # continue a run in OUTPUT_PATH even if its settings differ
START_OVER = False           # move a different run in OUTPUT_PATH aside and start again

# --- segmenting new scans (PHASE "predict"; README, "Segmenting new scans")
PREDICT_INPUT = []           # scans to segment: NIfTI/MHA/NRRD files, DICOM series folders, or folders of either
PREDICT_OUTPUT = ""          # folder for <scan>_seg.nii.gz and volumes.csv; empty = OUTPUT_PATH/predictions
PREDICT_MODALITY = "ct"      # "ct" or "mr": the modality of the scans (its BN branch segments them)
PREDICT_DATASET_JSON = ""    # dataset.json of the preparation to apply; empty = beside the modality's training list
PREDICT_OVERWRITE = False    # replace outputs that exist already
PREDICT_PROBABILITIES = False  # also write <scan>_prob.nii.gz: the class probabilities [X, Y, Z, C]
EXPORT_PATH = ""             # PHASE "export": SavedModel folder (signatures ct, mr); empty = OUTPUT_PATH/saved_model

# --- task
N_CLASS = 5                  # classes including background
CLASS_NAMES = ["lv_myo", "la_blood", "lv_blood", "aa"]  # names of classes 1..N_CLASS-1
OUT_OF_RANGE_LABELS = "error"  # labels outside 0..N_CLASS-1: "error" (stop, naming the file) or "ignore" (no class, as the original)
LABEL_RESAMPLE = "none"      # a listed label on another voxel grid than its image: "none" (refused, naming the file) or "nearest" (resampled onto it)
TEST_FLIP = "npz"            # flip test volumes on axes 0, 1: "npz", "released" (.npz + NIfTI not from data/prepare.py) or "none"
TEST_MIRROR = False          # test/predict: average the softmax over mirrored inputs (test-time augmentation)
LATERAL_PAIRS = []           # class pairs that swap under a left-right flip, "a:b" (e.g. "2:3" right/left kidney)
TEST_CHECKPOINT = "best"     # test/predict/export without TEST_MODEL: "best" (on validation volumes; latest if none) or "latest"
POSTPROCESS = True           # keep a class's largest connected component where that helped on validation volumes
PAPER_PROTOCOL = False       # also score the test as the published scripts did (README, "Evaluation")
SCHEME = "ummkd"             # sharing scheme: ummkd, separate_bn, joint, individual, y_shape, x_shape

# --- objective and optimisation
MIU_SEG_DICE = 1.0           # weight of the Dice loss (each modality)
MIU_SEG_CE = 1.0             # weight of the weighted cross-entropy (each modality)
MIU_KD = 0.5                 # weight of the knowledge-distillation loss (used by SCHEME ummkd)
MIU_SEG_L2_NORM = 1e-4       # weight of the L2 penalty on convolution kernels
KD_TEMPERATURE = 2.0         # softmax temperature of the distillation loss
KD_CLASSES = "all"           # KD over "all" classes (the paper) or those "present" in both batches
ADAM_EPSILON = 1e-7          # Adam's epsilon (Keras' default; the paper presets: 1e-8, the original's)
LR_SCHEDULE = "poly"         # "poly": LEARNING_RATE x (1 - step / NUM_STEPS)^0.9 (nnU-Net); "step": x LR_DECAY every LR_DECAY_STEPS (the original)
LR_DECAY = 0.95              # learning-rate factor applied every LR_DECAY_STEPS (LR_SCHEDULE "step")
PRECISION = "auto"           # "fp32", "bf16", "fp16" or "auto" (GPU >= 8.0 or CPU with bf16 units: bf16; GPU 7.x: fp16; else fp32)
XLA = False                  # compile the training step with XLA (for GPUs; slower on CPUs)

# --- validation on whole volumes (README, "Validation and the best checkpoint")
SOURCE_VAL_VOLUME_LIST = ""  # MR validation volumes ("image,label" lines, as the test lists); empty = none
TARGET_VAL_VOLUME_LIST = ""  # CT validation volumes; empty = none
VALIDATE_EVERY = 500         # steps between validations on the volumes (and best-checkpoint updates)

# --- several devices and machines (README, "Training on GPUs")
DISTRIBUTE = None            # None (one device), "mirrored" (local GPUs) or "multi_worker" (TF_CONFIG)
SYNC_BN = False              # BN statistics over all replicas (per modality) instead of per replica
CPU_DEVICES = 0              # "mirrored" without GPUs: split the CPU into this many devices (testing)

# --- bookkeeping
KEEP_CHECKPOINTS = 5         # most recent checkpoints kept
CHECKPOINT_MINUTES = 0.0     # > 0: skip a CHECKPOINT_SPACE checkpoint until this long after the last
SUMMARY_STEP = 10            # steps between training scalar summaries
SEED = 0                     # seeds weights, dropout and the training data stream
DETERMINISTIC = False        # TensorFlow op determinism (identical runs, slower)
TENSORBOARD_PORT = None      # launch TensorBoard on 127.0.0.1:PORT while training
PROGRESS = True              # show a progress bar

# --- the schema tables (not settings)
# The type of every setting whose default is None; any other setting has its default's type.
TYPES = {"TENSORBOARD_PORT": int, "DISTRIBUTE": str}
# The allowed values of every setting that takes one of a few; the modules that act on
# them import these tuples, so each list is written once.
CHOICES = {
    "PHASE": ("train", "test", "train_test", "predict", "export"),
    "PREDICT_MODALITY": ("ct", "mr"),
    "PRECISION": ("auto", "fp32", "bf16", "fp16"),
    "KD_CLASSES": ("all", "present"),
    "OUT_OF_RANGE_LABELS": ("error", "ignore"),
    "TEST_FLIP": ("npz", "released", "none"),
    "LABEL_RESAMPLE": ("none", "nearest"),
    "LR_SCHEDULE": ("poly", "step"),
    "TEST_CHECKPOINT": ("best", "latest"),
    "DISTRIBUTE": (None, "mirrored", "multi_worker"),
}
# Settings that count steps or examples: at least 1 (0 would divide by zero mid-training).
POSITIVE_KEYS = frozenset({"BATCH_SIZE", "CHECKPOINT_SPACE", "DISPLAY_STEP", "SUMMARY_STEP",
                           "LR_DECAY_STEPS", "KEEP_CHECKPOINTS", "TEST_BATCH",
                           "VALIDATE_EVERY"})
SCHEMA_TABLES = ("TYPES", "CHOICES", "POSITIVE_KEYS", "SCHEMA_TABLES")


# --- derived values: computed from the settings here, never set by hand
def kd_weight(config: dict) -> float:
    """Weight of the distillation term: MIU_KD for a scheme that uses KD (ummkd), else 0.

    The baselines (separate_bn, joint, individual, y_shape, x_shape) are trained without
    distillation whatever MIU_KD says.
    """
    from lib.schemes import get_scheme

    return float(config["MIU_KD"]) if get_scheme(config["SCHEME"]).kd else 0.0
