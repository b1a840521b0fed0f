"""Synthetic unpaired cardiac CT and MR "scanner" volumes with label maps (demo data).

A deterministic (by seed) generator of simple thorax phantoms, written as NIfTI image + label
pairs in the layout the preparation step reads. It is meant for a first run on a laptop: a
small 2D network learns it in minutes, yet the two modalities look different enough that a
network trained on one of them does badly on the other.

Labels (ids in the label files)
-------------------------------
0 background, 1 lv_myo (left-ventricle myocardium), 2 la_blood (left-atrium blood cavity),
3 lv_blood (left-ventricle blood cavity), 4 aa (ascending aorta).

Anatomy (all positions in patient RAS millimetres: +x = patient's right, +y = anterior,
+z = superior; origin at the centre of the field of view)
--------------------------------------------------------------------------------------
The geometry is defined for a reference field of view of 192 x 192 x 120 mm (the default
shape (96, 96, 48) at spacing (2.0, 2.0, 2.5) mm) and is scaled to fill the field of view
``shape * spacing`` of the requested grid, so smaller test grids hold the same anatomy.

* body: elliptic cylinder along z (semi-axes 85 x 72 mm times a per-subject body scale),
  covered by a subcutaneous fat layer (4-10 mm) over a chest-wall muscle layer (~10 mm);
  ribs (bands repeating along z) and a sternum sit at the inner edge of the chest wall.
* spine: vertebral bodies (cancellous bone with a cortical rim, intervertebral discs every
  ~25 mm), neural arch, spinous process and spinal canal (CSF), posterior in the midline.
* lungs: the thoracic cavity left and right of the mediastinum, above a two-domed diaphragm;
  below it the liver (right) and stomach with a gas bubble (left).
* heart (centre left-anterior of the midline, per-subject scale 0.88-1.12 and a small 3D
  rotation): LV blood = truncated ellipsoid (semi-axes 34 x 17 x 17 mm) whose long axis points
  from the base (posterior-right-superior) to the apex (anterior-left-inferior); LV myocardium
  = a shell around it, wall 7-13 mm per subject, open at the base; RV = a crescent of
  (less contrast-enhanced) blood with a thin muscular wall wrapped around the septum
  (not labelled); LA = ellipsoid beyond the LV base, posterior; AA = tube (radius 11-15 mm)
  rising from the LV base towards the top of the volume, slightly curved to the right and
  anterior; descending aorta = straight tube left of the spine (blood, not labelled).
  A ~4 mm layer of pericardial/mediastinal fat surrounds the chambers and vessels and fills
  the gaps between them and a central band between sternum and spine.
* per subject: body scale, heart scale and position, wall thickness, aorta radius, fat
  thickness, global rotation about z (+-10 deg) and translation (+-6 mm), heart rotation
  (+-8 deg about each axis).

Intensity models
----------------
* CT (Hounsfield units, contrast-enhanced): air -1000, lung -820, fat -100, mediastinal fat
  -90, muscle 50, myocardium 55, liver 65, CSF 10, contrast blood (LV, LA, aortas) 300-400,
  RV blood ~200, cancellous bone 700, cortical bone 1000. Each tissue value varies +-10 % per
  subject. A Gaussian point-spread blur (sigma 0.6 voxel), a faint smooth texture and white
  Gaussian noise (sigma 15-25 HU) are added; values are rounded and clipped to
  [-1024, 3071].
* MR (arbitrary units, bSSFP/T1-like): air 0, lung 30, cortical bone 30, myocardium 120,
  muscle 200, liver 260, cancellous bone (fatty marrow) 420, blood (all chambers and vessels)
  620, mediastinal fat 600, fat 650, CSF 750. Each tissue value varies +-10 % per subject, times
  a per-subject receiver gain (0.85-1.2). Blur (sigma 0.8 voxel), a multiplicative texture,
  a smooth multiplicative bias field (second-order polynomial in x, y, z scaled so the field
  spans 1 +- 0.2..0.3, see :func:`mr_bias_field`) and Rician noise (magnitude of the signal
  plus complex Gaussian noise of sigma ``MR_NOISE_SIGMA`` times the gain). Rounded, >= 0.

Storage orientation
-------------------
CT arrays are stored RAS (affine diag(+sx, +sy, +sz)), MR arrays LPS (affine diag(-sx, -sy,
+sz): axes 0 and 1 flipped relative to CT), both with the volume centre at world (0, 0, 0).
After ``nibabel.as_closest_canonical`` both are RAS and the anatomy lies the same way up.
The anatomy depends only on the subject seed, so ``make_subject("ct", s)`` and
``make_subject("mr", s)`` image the same "person" (useful for checks); :func:`generate` gives
the two modalities disjoint seeds, so its data sets are unpaired.

In the default grid the heart spans roughly the middle third of every axis: the LV is seen
in about 20 axial (z) slices; AA runs along z, so axial slices show it as a disc and coronal
or sagittal slices as a band.

Usage: ``python data/phantom.py --out_dir data/phantom --seed 0``.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script: python data/phantom.py
    sys.path.insert(0, _REPO)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from lib.files import atomic_path, write_json  # noqa: E402

LABELS = {0: "background", 1: "lv_myo", 2: "la_blood", 3: "lv_blood", 4: "aa"}
MODALITIES = ("mr", "ct")
DEFAULT_SHAPE = (96, 96, 48)
DEFAULT_SPACING = (2.0, 2.0, 2.5)
REF_HALF_FOV = np.array([96.0, 96.0, 60.0])  # mm; the anatomy is defined in this field of view
MR_NOISE_SIGMA = 20.0  # Rician noise level of MR, before the per-subject gain
CT_RANGE = (-1024.0, 3071.0)

# Tissue classes of the internal tissue map.
(AIR, LUNG, FAT, MUSCLE, MYO, BLOOD, RV_BLOOD, CORTICAL, CANCELLOUS, CSF, LIVER,
 MED_FAT) = range(12)
N_TISSUES = 12
#                      air      lung   fat   muscle myo  blood  rv_blood cortical canc. csf liver medfat
CT_VALUES = np.array([-1000.0, -820.0, -100.0, 50.0, 55.0, 350.0, 200.0, 1000.0, 700.0, 10.0, 65.0, -90.0])
MR_VALUES = np.array([0.0, 30.0, 650.0, 200.0, 120.0, 620.0, 620.0, 30.0, 420.0, 750.0, 260.0, 600.0])

_MODALITY_INDEX = {"ct": 0, "mr": 1}


# ----------------------------------------------------------------------------- geometry
def subject_affine(modality: str, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of the stored arrays: CT RAS, MR LPS; centre at 0."""
    _check_modality(modality)
    n = np.asarray(shape, dtype=float)
    sp = np.asarray(spacing, dtype=float)
    signs = np.array([1.0, 1.0, 1.0]) if modality == "ct" else np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * sp)
    affine[:3, 3] = -signs * (n - 1.0) / 2.0 * sp
    return affine


def _reference_coords(affine, shape, spacing):
    """Open-grid coordinates (x [X,1,1], y [1,Y,1], z [1,1,Z]) in reference-FOV millimetres."""
    n = np.asarray(shape, dtype=float)
    scale = REF_HALF_FOV / (n * np.asarray(spacing, dtype=float) / 2.0)
    coords = []
    for axis in range(3):
        idx = np.arange(shape[axis], dtype=np.float64)
        world = affine[axis, axis] * idx + affine[axis, 3]
        view = [1, 1, 1]
        view[axis] = shape[axis]
        coords.append((world * scale[axis]).astype(np.float32).reshape(view))
    return coords


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _ellipsoid(q, center, semi, axes=None):
    """Normalised squared radius (< 1 inside) of an ellipsoid; axes columns = its directions."""
    d = [q[i] - np.float32(center[i]) for i in range(3)]
    if axes is not None:
        d = [d[0] * np.float32(axes[0, j]) + d[1] * np.float32(axes[1, j])
             + d[2] * np.float32(axes[2, j]) for j in range(3)]
    return sum((d[j] / np.float32(semi[j])) ** 2 for j in range(3))


def _draw_anatomy(rng: np.random.Generator) -> dict:
    """Per-subject anatomical parameters (independent of grid and modality)."""
    u = rng.uniform
    return dict(
        rot=u(-10.0, 10.0), shift=u(-6.0, 6.0, size=3), body_scale=u(0.9, 1.0),
        fat=u(4.0, 10.0), heart_scale=u(0.88, 1.12), heart_shift=u(-5.0, 5.0, size=3),
        heart_rot=u(-8.0, 8.0, size=3), wall=u(7.0, 13.0), aa_radius=u(11.0, 15.0),
        rib_phase=u(0.0, 24.0), disc_phase=u(0.0, 25.0), dome=u(-4.0, 4.0, size=2),
        la_shift=u(-3.0, 3.0, size=3), aa_bend=u(-0.002, 0.0))


def _anatomy(seed: int, modality: str, shape, spacing):
    """Tissue map (uint8), label map (uint8) and affine in the stored orientation."""
    shape = tuple(int(s) for s in shape)
    affine = subject_affine(modality, shape, spacing)
    prm = _draw_anatomy(np.random.default_rng(_seed_sequence(seed, "anatomy")))
    px, py, pz = _reference_coords(affine, shape, spacing)

    # Patient frame: undo the global rotation about z and translation.
    rz = _rot(2, prm["rot"])
    tx, ty, tz = prm["shift"]
    dx, dy = px - np.float32(tx), py - np.float32(ty)
    x = dx * np.float32(rz[0, 0]) + dy * np.float32(rz[1, 0])  # R^T (p - t), [X, Y, 1]
    y = dx * np.float32(rz[0, 1]) + dy * np.float32(rz[1, 1])
    x, y = np.broadcast_to(x, shape), np.broadcast_to(y, shape)
    z = np.broadcast_to(pz - np.float32(tz), shape)
    q = (x, y, z)
    sb = prm["body_scale"]

    tissue = np.full(shape, AIR, dtype=np.uint8)
    label = np.zeros(shape, dtype=np.uint8)

    # Body, fat and chest wall (elliptic cylinders, slightly wider towards the bottom).
    widen = 1.0 - 0.03 * z / 60.0
    rx, ry = 85.0 * sb * widen, 72.0 * sb * widen
    body = (x / rx) ** 2 + (y / ry) ** 2
    f = prm["fat"]
    tissue[body < 1] = FAT
    muscle_r = ((x / (rx - f)) ** 2 + (y / (ry - f)) ** 2)
    tissue[muscle_r < 1] = MUSCLE
    crx, cry = rx - f - 10.0, ry - f - 10.0
    cavity_r = (x / crx) ** 2 + (y / cry) ** 2
    cavity = cavity_r < 1

    # Diaphragm (two domes), abdomen below it.
    d1, d2 = prm["dome"]
    zd = (-40.0 + 14.0 * np.exp(-((x - 25.0) ** 2 + (y + 5.0) ** 2) / (2 * 35.0 ** 2))
          + 9.0 * np.exp(-((x + 25.0) ** 2 + (y + 5.0) ** 2) / (2 * 35.0 ** 2)) + d1 + 0.5 * d2)
    below = z < zd
    abdomen = cavity & below
    tissue[abdomen] = MUSCLE
    tissue[abdomen & (x > -20.0 + 0.2 * y)] = LIVER
    gas = _ellipsoid(q, (-35.0, 5.0, -62.0 + d2), (15.0, 12.0, 8.0)) < 1
    tissue[abdomen & gas] = AIR

    # Heart geometry (heart frame = global patient frame rotated by heart_rot).
    sh = prm["heart_scale"]
    rh = _rot(2, prm["heart_rot"][0]) @ _rot(0, prm["heart_rot"][1]) @ _rot(1, prm["heart_rot"][2])
    c_h = np.array([-14.0 * sb, 16.0 * sb, -8.0]) + prm["heart_shift"]

    def hpos(offset):
        return c_h + sh * rh @ np.asarray(offset, dtype=float)

    u0 = np.array([-0.5, 0.6, -0.6])
    u0 /= np.linalg.norm(u0)
    e2 = np.cross(u0, [0.0, 0.0, 1.0])
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(u0, e2)
    lv_axes = rh @ np.stack([u0, e2, e3], axis=1)
    a, b, w = 34.0 * sh, 17.0 * sh, prm["wall"]
    u = lv_axes[:, 0]
    t = sum((q[i] - np.float32(c_h[i])) * np.float32(u[i]) for i in range(3))
    above_base = t > -0.6 * a
    lv_blood = (_ellipsoid(q, c_h, (a, b, b), lv_axes) < 1) & above_base
    lv_outer = (_ellipsoid(q, c_h, (a + 0.7 * w, b + w, b + w), lv_axes) < 1) & above_base
    lv_env = _ellipsoid(q, c_h, (a + 0.7 * w + 4, b + w + 4, b + w + 4), lv_axes) < 1

    # RV: crescent right-anterior of the LV, perpendicular to the long axis.
    e_rv0 = np.array([0.7, 0.5, 0.0])
    e_rv0 -= e_rv0.dot(u0) * u0
    e_rv0 /= np.linalg.norm(e_rv0)
    rv_axes = rh @ np.stack([u0, e_rv0, np.cross(u0, e_rv0)], axis=1)
    c_rv = hpos(18.0 * e_rv0 - 4.0 * u0)
    rv_semi = (0.85 * a, 14.0 * sh + w, 24.0 * sh)
    rv_in = _ellipsoid(q, c_rv, rv_semi, rv_axes) < 1
    rv_wall = _ellipsoid(q, c_rv, [s + 3.5 for s in rv_semi], rv_axes) < 1
    rv_env = _ellipsoid(q, c_rv, [s + 7.5 for s in rv_semi], rv_axes) < 1

    # LA beyond the LV base, posterior.
    base = -0.6 * 34.0 * u0
    c_la = hpos(base + np.array([-10.0, -14.0, 10.0]) + prm["la_shift"])
    la_semi = np.array([24.0, 15.0, 19.0]) * sh
    la = _ellipsoid(q, c_la, la_semi, rh) < 1
    la_env = _ellipsoid(q, c_la, la_semi + 4.0, rh) < 1

    # Ascending aorta: from the aortic root at the LV base up to the top of the volume.
    root = hpos(base + np.array([12.0, 4.0, 2.0]))
    r_aa = prm["aa_radius"] * sh
    dz = z - np.float32(root[2])
    xc = root[0] + 0.25 * dz + prm["aa_bend"] * dz * dz
    yc = root[1] + 0.15 * dz
    aa_d2 = (x - xc) ** 2 + (y - yc) ** 2
    aa_d2 = np.where(dz >= 0, aa_d2, aa_d2 + dz * dz)  # rounded cap below the root
    aa = aa_d2 < r_aa ** 2
    aa_env = aa_d2 < (r_aa + 4.0) ** 2

    # Descending aorta left of the spine.
    da_c = (-23.0 * sb, -28.0 * sb)
    da_d2 = (x - da_c[0]) ** 2 + (y - da_c[1]) ** 2
    da = da_d2 < 10.0 ** 2
    da_env = da_d2 < 13.0 ** 2

    # Spine (vertebral body, neural arch, spinous process, canal).
    vb_c = (0.0, -38.0 * sb)
    vb_d2 = (x - vb_c[0]) ** 2 + (y - vb_c[1]) ** 2
    canal_c = (0.0, -55.0 * sb)
    canal_d2 = (x - canal_c[0]) ** 2 + (y - canal_c[1]) ** 2
    disc = np.mod(z - prm["disc_phase"], 25.0) < 5.0
    spine_env = (vb_d2 < 18.0 ** 2) | (canal_d2 < 15.0 ** 2)

    # Mediastinum: fat between the chambers and vessels, and a central band.
    heart_env = lv_env | rv_env | la_env | aa_env | da_env
    band = (np.abs(x - 0.3 * y) < 14.0) & (y > vb_c[1])
    mediastinum = cavity & ~below & (heart_env | band | spine_env)
    lungs = cavity & ~below & ~mediastinum
    tissue[lungs] = LUNG
    tissue[mediastinum] = MED_FAT

    # Ribs and sternum at the inner edge of the chest wall.
    rib_ring = (cavity_r >= 1) & (((x / (crx + 7.0)) ** 2 + (y / (cry + 7.0)) ** 2) < 1)
    ribs = rib_ring & (np.mod(z + 0.35 * y - prm["rib_phase"], 24.0) < 8.0) & (y > -0.3 * cry)
    tissue[ribs] = CANCELLOUS
    sternum = ((x / 13.0) ** 2 + ((y - (cry + 4.0)) / 5.0) ** 2) < 1
    tissue[sternum] = CANCELLOUS

    tissue[vb_d2 < 14.0 ** 2] = CORTICAL
    tissue[vb_d2 < 12.0 ** 2] = CANCELLOUS
    tissue[(vb_d2 < 14.0 ** 2) & disc] = MUSCLE
    tissue[canal_d2 < 10.5 ** 2] = CORTICAL
    spinous = ((x / 3.5) ** 2 + ((y - (canal_c[1] - 11.0)) / 7.0) ** 2) < 1
    tissue[spinous] = CORTICAL
    tissue[canal_d2 < 5.5 ** 2] = CSF
    tissue[da] = BLOOD

    # Heart, in painting order (later wins), inside a pericardial fat layer.
    tissue[lv_env | rv_env | la_env] = MED_FAT
    tissue[rv_wall & ~lv_outer] = MYO
    tissue[rv_in & ~lv_outer] = RV_BLOOD
    for mask, lab, tis in ((la, 2, BLOOD), (aa, 4, BLOOD), (lv_outer, 1, MYO), (lv_blood, 3, BLOOD)):
        tissue[mask] = tis
        label[mask] = lab
    return tissue, label, affine


# ----------------------------------------------------------------------------- intensities
def _seed_sequence(seed: int, stream: str, modality: str | None = None) -> np.random.SeedSequence:
    """Independent random streams of one subject: anatomy (shared by both modalities) and,
    per modality, intensities / bias field / noise."""
    streams = {"anatomy": 0, "intensity": 1, "bias": 2, "noise": 3}
    key = [int(seed), streams[stream]]
    if modality is not None:
        key.append(_MODALITY_INDEX[modality])
    return np.random.SeedSequence(key)


def _bias_from_coords(coords, rng: np.random.Generator) -> np.ndarray:
    """1 + smooth second-order polynomial, scaled so that max |field - 1| = strength."""
    xn, yn, zn = [c / np.float32(h) for c, h in zip(coords, REF_HALF_FOV)]
    coef = rng.standard_normal(9)
    strength = rng.uniform(0.2, 0.3)
    terms = (xn, yn, zn, xn * xn, yn * yn, zn * zn, xn * yn, xn * zn, yn * zn)
    g = sum(np.float32(c) * term for c, term in zip(coef, terms))
    g = np.broadcast_to(g, np.broadcast_shapes(*(c.shape for c in coords))).astype(np.float32)
    g = g - g.mean()
    g *= np.float32(strength / max(float(np.abs(g).max()), 1e-6))
    return 1.0 + g


def mr_bias_field(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> np.ndarray:
    """The noise-free multiplicative bias field that ``make_subject("mr", seed)`` applies,
    float32 [X, Y, Z] in the stored (LPS) orientation. Values lie in [0.7, 1.3]."""
    shape = tuple(int(s) for s in shape)
    affine = subject_affine("mr", shape, spacing)
    coords = _reference_coords(affine, shape, spacing)
    return _bias_from_coords(coords, np.random.default_rng(_seed_sequence(seed, "bias", "mr")))


def _smooth_texture(rng: np.random.Generator, shape, sigma=2.0) -> np.ndarray:
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return tex / max(float(tex.std()), 1e-6)


def make_subject(modality: str, seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING):
    """One synthetic subject.

    Returns ``(image, label, affine)``: image float32 [X, Y, Z] (integer-valued: HU for CT,
    arbitrary units >= 0 for MR), label uint8 [X, Y, Z] with ids 0-4 (see ``LABELS``) and the
    4x4 voxel-to-RAS-mm affine. Arrays are in the stored orientation matching the affine
    (CT RAS, MR LPS). The anatomy depends only on ``seed`` (same seed, same "person" in both
    modalities); the appearance depends on ``seed`` and ``modality``.
    """
    return _render(modality, seed, shape, spacing)


def _render(modality: str, seed: int, shape, spacing, clean: bool = False):
    """make_subject; with ``clean`` the noise-free signal (no texture, noise or rounding)."""
    _check_modality(modality)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes >= 4, got {shape}")
    tissue, label, affine = _anatomy(seed, modality, shape, spacing)

    rng = np.random.default_rng(_seed_sequence(seed, "intensity", modality))
    base = CT_VALUES if modality == "ct" else MR_VALUES
    values = base * rng.uniform(0.9, 1.1, size=N_TISSUES)
    values[AIR] = base[AIR]
    if modality == "ct":
        values[BLOOD] = rng.uniform(300.0, 400.0)  # contrast timing
        values[RV_BLOOD] = values[BLOOD] * rng.uniform(0.5, 0.7)
    else:
        values[RV_BLOOD] = values[BLOOD] * rng.uniform(0.95, 1.05)
    gain = rng.uniform(0.85, 1.2)
    noise_rng = np.random.default_rng(_seed_sequence(seed, "noise", modality))
    texture = _smooth_texture(noise_rng, shape)
    if clean:
        texture[:] = 0.0

    signal = values.astype(np.float32)[tissue]
    if modality == "ct":
        signal = ndimage.gaussian_filter(signal, 0.6)
        signal += 8.0 * texture
        if clean:
            return signal, label, affine
        sigma = rng.uniform(15.0, 25.0)
        image = signal + noise_rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
        image = np.clip(np.round(image), *CT_RANGE)
    else:
        signal = ndimage.gaussian_filter(signal, 0.8)
        signal *= 1.0 + 0.04 * texture
        coords = _reference_coords(affine, shape, spacing)
        bias = _bias_from_coords(coords, np.random.default_rng(_seed_sequence(seed, "bias", "mr")))
        signal *= bias * np.float32(gain)
        if clean:
            return signal, label, affine
        sigma = np.float32(MR_NOISE_SIGMA * gain)
        real = signal + noise_rng.standard_normal(shape, dtype=np.float32) * sigma
        imag = noise_rng.standard_normal(shape, dtype=np.float32) * sigma
        image = np.clip(np.round(np.sqrt(real * real + imag * imag)), 0.0, 32767.0)
    return image.astype(np.float32), label, affine


# ----------------------------------------------------------------------------- files
def subject_seeds(seed: int, modality: str, n: int) -> list[int]:
    """Subject seeds of ``generate``: disjoint between modalities, prefix-stable in n."""
    _check_modality(modality)
    states = np.random.SeedSequence([int(seed), 7919, _MODALITY_INDEX[modality]]).generate_state(
        max(n, 0), dtype=np.uint32)
    return [int(s) for s in states]


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    """Write a NIfTI file atomically (lib/files.py)."""
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def generate(out_dir: str, n_train: int = 8, n_val: int = 1, n_test: int = 3, seed: int = 0,
             shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, overwrite: bool = False) -> dict:
    """Write the phantom data set.

    Files: ``out_dir/raw/{mr,ct}/{modality}_{k:04d}_image.nii.gz`` (int16) and
    ``..._label.nii.gz`` (uint8) for k in range(n_train + n_val + n_test), and
    ``out_dir/raw/{mr,ct}/split.json`` = {"train": [...], "val": [...], "test": [...]} of case
    names such as "ct_0003" (the first n_train cases train, the next n_val validate, the rest
    test). MR and CT subjects have different seeds (unpaired). Raises FileExistsError if a
    modality folder already holds files, unless ``overwrite`` (then earlier phantom files are
    removed first). Returns {modality: {"cases": [(image_path, label_path, case_name), ...],
    "split": {...}}}.
    """
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(counts.values()) < 0 or sum(counts.values()) < 1:
        raise ValueError(f"need non-negative split sizes with at least one case, got {counts}")
    n = sum(counts.values())
    raw = os.path.join(out_dir, "raw")
    folders = {m: os.path.join(raw, m) for m in MODALITIES}
    for modality, folder in folders.items():
        if os.path.isdir(folder) and os.listdir(folder):
            if not overwrite:
                raise FileExistsError(f"{folder} already holds files; pass overwrite=True "
                                      "(--overwrite) to regenerate")
            stale = glob.glob(os.path.join(folder, f"{modality}_*_image.nii.gz"))
            stale += glob.glob(os.path.join(folder, f"{modality}_*_label.nii.gz"))
            stale += [os.path.join(folder, "split.json")]
            for path in stale:
                if os.path.isfile(path):
                    os.remove(path)
    result = {}
    for modality, folder in folders.items():
        os.makedirs(folder, exist_ok=True)
        split_path = os.path.join(folder, "split.json")
        cases = []
        for k, subject_seed in enumerate(subject_seeds(seed, modality, n)):
            name = f"{modality}_{k:04d}"
            image, label, affine = make_subject(modality, subject_seed, shape, spacing)
            image_path = os.path.join(folder, f"{name}_image.nii.gz")
            label_path = os.path.join(folder, f"{name}_label.nii.gz")
            _save_nifti(image, affine, image_path, np.int16)
            _save_nifti(label, affine, label_path, np.uint8)
            cases.append((image_path, label_path, name))
        names = [c[2] for c in cases]
        split = {"train": names[:counts["train"]],
                 "val": names[counts["train"]:counts["train"] + counts["val"]],
                 "test": names[counts["train"] + counts["val"]:]}
        write_json(split_path, split)  # written last: its presence marks a complete folder
        result[modality] = {"cases": cases, "split": split}
    return result


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def main(argv=None) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default=os.path.join(repo, "data", "phantom"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=8)
    parser.add_argument("--n_val", type=int, default=1)
    parser.add_argument("--n_test", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE))
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING))
    parser.add_argument("--overwrite", action="store_true", help="replace existing phantom files")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        result = generate(args.out_dir, args.n_train, args.n_val, args.n_test, args.seed,
                          tuple(args.shape), tuple(args.spacing), overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    for modality, info in result.items():
        print(f"{modality}: {len(info['cases'])} cases in "
              f"{os.path.join(args.out_dir, 'raw', modality)} "
              f"({', '.join(f'{k} {len(v)}' for k, v in info['split'].items())})")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
