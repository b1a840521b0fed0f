"""Voxel grids in physical space: whether a label map stored in another axis order or
direction than its scan lies on the same voxels, and the exact re-indexing that puts it there.

DICOM-to-NIfTI converters and viewers store the same grid with axes permuted or flipped (an
LAS label beside an LPS series, say); the affines then differ while every label voxel sits
exactly on an image voxel. Resampling such a label would be an exact permutation and flip, so
it is done as one (numpy views, no interpolation). Grids that differ otherwise (spacing,
extent, a shift by part of a voxel) have no alignment; a label on such a grid is resampled
only when the user asks (``resample_nearest``). numpy only; no TensorFlow.
"""
from __future__ import annotations

import numpy as np

Alignment = tuple  # (axes, flips): fixed = np.flip(np.transpose(moving, axes), flips)


def grid_alignment(moving_affine, moving_shape, fixed_affine, fixed_shape,
                   tol: float = 1e-3) -> Alignment | None:
    """(axes, flips) such that ``np.flip(np.transpose(moving, axes), flips)`` holds the
    moving array's values on the fixed grid, when the two grids are the same physical voxels
    up to axis order and direction (within ``tol`` voxels); None otherwise.

    ``axes[i]`` is the moving axis that runs along fixed axis i; ``flips`` the fixed axes along
    which it runs backwards. Affines are 4x4 voxel-to-world; shapes the first three dims.
    """
    to_fixed = np.linalg.inv(np.asarray(fixed_affine, np.float64)) @ np.asarray(
        moving_affine, np.float64)  # moving voxel index -> fixed voxel index
    rotation, shift = to_fixed[:3, :3], to_fixed[:3, 3]
    axes, flips = [], []
    for i in range(3):
        j = int(np.argmax(np.abs(rotation[i])))
        off = np.delete(rotation[i], j)
        if abs(abs(rotation[i, j]) - 1.0) > tol or np.any(np.abs(off) > tol):
            return None
        axes.append(j)
        if rotation[i, j] < 0:
            flips.append(i)
    if sorted(axes) != [0, 1, 2]:
        return None
    if tuple(int(moving_shape[j]) for j in axes) != tuple(int(s) for s in fixed_shape[:3]):
        return None
    for i in range(3):  # the first moving voxel lands on the first (or, flipped, last) one
        expected = float(fixed_shape[i] - 1) if i in flips else 0.0
        if abs(shift[i] - expected) > tol:
            return None
    return tuple(axes), tuple(flips)


def is_identity(alignment: Alignment) -> bool:
    return alignment == ((0, 1, 2), ())


def apply_alignment(array: np.ndarray, alignment: Alignment) -> np.ndarray:
    """The moving array [X, Y, Z] re-indexed onto the fixed grid (see grid_alignment)."""
    axes, flips = alignment
    return np.ascontiguousarray(np.flip(np.transpose(array, axes), flips) if flips
                                else np.transpose(array, axes))


def describe(alignment: Alignment) -> str:
    """One phrase for a log line, e.g. "axes (0, 1, 2), flipped along 1"."""
    axes, flips = alignment
    flipped = f", flipped along {', '.join(str(f) for f in flips)}" if flips else ""
    return f"axes {tuple(axes)}{flipped}"


def resample_nearest(moving: np.ndarray, moving_affine, fixed_affine, fixed_shape,
                     fill=0) -> np.ndarray:
    """The moving array [X', Y', Z'] on the fixed grid [X, Y, Z] by nearest neighbour: each
    fixed voxel takes the value of the moving voxel whose centre is nearest to its centre in
    world coordinates (ties round half to even), ``fill`` where that falls outside the moving
    array. Affines are 4x4 voxel-to-world. One fixed slice at a time, to bound the memory."""
    to_moving = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(
        fixed_affine, np.float64)  # fixed voxel index -> moving voxel index
    nx, ny, nz = (int(s) for s in fixed_shape[:3])
    out = np.full((nx, ny, nz), fill, dtype=moving.dtype)
    ij = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij"), -1).reshape(-1, 2)
    limits = np.asarray(moving.shape[:3])
    for k in range(nz):
        index = np.c_[ij, np.full(len(ij), k)] @ to_moving[:3, :3].T + to_moving[:3, 3]
        index = np.rint(index).astype(np.int64)
        inside = np.all((index >= 0) & (index < limits), axis=1)
        values = np.full(len(ij), fill, dtype=moving.dtype)
        values[inside] = moving[tuple(index[inside].T)]
        out[:, :, k] = values.reshape(nx, ny)
    return out
