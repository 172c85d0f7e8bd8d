"""Synthetic BraTS-layout cases, for demos and tests where real scans cannot go.

BraTS is not downloadable here, so every demo site gets cases from this generator instead:

- anatomy: the MNI152 2009 template and its grey- and white-matter probability maps that
  nilearn ships inside its package (nothing is downloaded), resampled onto the case's grid with
  a small random scale, rotation and shift per case so no two heads are identical;
- a tumour with the three nested BraTS regions: necrotic core (label 1) inside the enhancing rim
  (label 4) inside the oedema (label 2), an irregular ellipsoid whose size, shape, orientation
  and place in the white matter vary per case;
- four contrasts from a tissue table (T1: white matter bright, CSF dark, tumour dark; T1ce:
  enhancing rim bright; T2: CSF and oedema bright; FLAIR: oedema bright, CSF dark);
- a scanner style per site (see `STYLES`): contrast, bias field, noise and resolution differ,
  so that sites are genuinely non-IID. The intensity scale differs too, though per-volume
  normalisation in training removes it; the other four survive normalisation.

Images are skull-stripped like BraTS (exactly zero outside the brain, strictly positive
inside), stored as int16 with an RAS affine in millimetres; labels are uint8 in {0, 1, 2, 4}.
Everything is numpy and scipy: this module never imports torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MODALITIES = ("t1", "t1ce", "t2", "flair")
SMALL_SIZE = 48
BRATS_SHAPE = (240, 240, 155)
LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING = 1, 2, 4

# Relative signal of each tissue on each sequence; white matter on T1 matches the MNI template.
#            csf   gm    wm    oedema enhancing necrosis
CONTRASTS = {
    "t1": (0.30, 0.65, 0.87, 0.55, 0.60, 0.35),
    "t1ce": (0.30, 0.67, 0.87, 0.57, 1.30, 0.30),
    "t2": (1.00, 0.60, 0.40, 0.85, 0.65, 0.95),
    "flair": (0.15, 0.62, 0.50, 1.00, 0.80, 0.45),
}
_WHITE_MATTER_T1 = 0.87
_INTENSITY_UNITS = 1000.0  # a signal of 1.0 is stored as 1000 (times the style's scale)


@dataclass(frozen=True)
class ScannerStyle:
    """How one site's scanner renders the same anatomy."""

    intensity_scale: float  # arbitrary scanner units
    contrast_gamma: float  # signal ** gamma: vendors and protocols weigh tissue contrast differently
    bias_strength: float  # standard deviation of the log of the smooth multiplicative bias field
    noise: float  # Rician sigma as a fraction of white matter's signal on T1
    # Resolution is in voxels of the case's grid, not millimetres, so that styles differ as much
    # on a 48^3 demo grid (about 4 mm) as on BraTS's 1 mm grid.
    blur_voxels: float  # in-plane point spread, Gaussian FWHM
    slice_voxels: int  # slice thickness: blurred over it along z, every n-th slice interpolated


# The style table. Style 0 is a clean research scanner; the others drift away from it in
# different directions. Styles past the table are drawn from the same ranges, seeded by K.
STYLES = (
    #            scale gamma bias  noise blur slice
    ScannerStyle(1.0, 1.00, 0.00, 0.01, 0.0, 1),  # 0: clean research scanner
    ScannerStyle(1.6, 0.90, 0.15, 0.03, 0.5, 1),  # 1: modern 3T, another vendor's contrast
    ScannerStyle(0.7, 1.15, 0.25, 0.05, 1.0, 2),  # 2: strong bias field, 2-voxel slices
    ScannerStyle(2.5, 0.85, 0.10, 0.06, 1.5, 3),  # 3: older 1.5T: noisy, thick slices
    ScannerStyle(1.2, 1.10, 0.35, 0.04, 0.8, 2),  # 4: surface-coil bias
    ScannerStyle(0.5, 0.95, 0.20, 0.07, 1.5, 3),  # 5: low field: noisiest and blurriest
)


def scanner_style(style: int) -> ScannerStyle:
    """The scanner character of style ``style`` (0, 1, 2, ...): from `STYLES`, or drawn from K."""
    if isinstance(style, bool) or not isinstance(style, int | np.integer) or style < 0:
        raise ValueError(f"style must be a whole number 0 or more, not {style!r}")
    if style < len(STYLES):
        return STYLES[style]
    rng = np.random.default_rng([style, 0x5C4])
    return ScannerStyle(
        intensity_scale=float(rng.uniform(0.5, 2.5)),
        contrast_gamma=float(rng.uniform(0.85, 1.15)),
        bias_strength=float(rng.uniform(0.0, 0.35)),
        noise=float(rng.uniform(0.01, 0.07)),
        blur_voxels=float(rng.uniform(0.0, 1.5)),
        slice_voxels=int(rng.integers(1, 4)),
    )


@dataclass(frozen=True)
class Grid:
    """A case's voxel grid: shape and RAS affine (millimetres)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.abs(np.diag(self.affine)[:3])


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case in memory: the four images, the label map, and their grid."""

    name: str
    images: dict[str, np.ndarray]  # modality -> int16 volume
    label: np.ndarray  # uint8 in {0, 1, 2, 4}
    brain: np.ndarray  # bool, the skull-stripping mask
    grid: Grid


def case_name(index: int, *, seed: int, style: int) -> str:
    """The folder and file prefix of case ``index``: ``SynthSite{style}_seed{seed}_{index:03d}``."""
    return f"SynthSite{style}_seed{seed}_{index:03d}"


def write_synthetic_cases(
    out_dir: str | Path,
    cases: int,
    seed: int = 0,
    style: int = 0,
    size: str | int = "small",
    on_case: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``cases`` synthetic cases in the BraTS layout under ``out_dir``; return their folders.

    Each case is a folder ``SynthSite{style}_seed{seed}_{i:03d}`` holding
    ``<case>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair`` and ``_seg``.

    - ``seed`` and ``style`` together fix every case: the same pair writes the same voxels, and
      a different seed or a different style gives different patients, so sites that share the
      default seed still hold different cases.
    - ``style`` (0, 1, 2, ...) picks the site's scanner character; see `STYLES`.
    - ``size``: ``"small"`` (48 voxels a side, about 4 mm; seconds for ten cases, fit for CPU
      training), ``"brats"`` (240 x 240 x 155 at 1 mm, as BraTS), or a whole number N for an
      N-cubed grid over the same field of view.
    - ``on_case(i, total)`` is called after each case is written (i counts from 1).

    Existing files of the same name are overwritten.
    """
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a whole number 1 or more, not {cases!r}")
    _check_arguments(seed=seed, style=style, size=size)  # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for index in range(cases):
        case = synthetic_case(index, seed=seed, style=style, size=size)
        folders.append(save_case(case, out))
        if on_case is not None:
            on_case(index + 1, cases)
    return folders


def save_case(case: SyntheticCase, out_dir: Path) -> Path:
    """Write one case as BraTS-layout NIfTI files in ``out_dir / case.name``."""
    folder = out_dir / case.name
    folder.mkdir(parents=True, exist_ok=True)
    for modality, volume in case.images.items():
        _save_nifti(volume, case.grid.affine, folder / f"{case.name}_{modality}.nii.gz")
    _save_nifti(case.label, case.grid.affine, folder / f"{case.name}_seg.nii.gz")
    return folder


def synthetic_case(
    index: int,
    *,
    seed: int = 0,
    style: int = 0,
    size: str | int = "small",
    scanner: ScannerStyle | None = None,
) -> SyntheticCase:
    """Generate case ``index`` of a site in memory (what `write_synthetic_cases` writes).

    ``scanner``, when given, images the same patient with another scanner than ``style``'s.
    """
    _check_arguments(seed=seed, style=style, size=size)
    scanner = scanner or scanner_style(style)
    grid = grid_for_size(size)
    rng = np.random.default_rng([seed, style, index])
    tissues = _jittered_anatomy(grid, rng)
    brain = tissues["brain"]
    label = _tumour_labels(tissues, grid, rng)
    fractions = _tissue_fractions(tissues, label, grid)
    texture = 1 + 0.03 * _smooth_noise(rng, grid.shape, 3 / grid.spacing)
    images = {
        modality: _acquire(_signal(fractions, CONTRASTS[modality]) * texture, brain, grid, scanner, rng)
        for modality in MODALITIES
    }
    name = case_name(index, seed=seed, style=style)
    return SyntheticCase(name=name, images=images, label=label, brain=brain, grid=grid)


def _check_arguments(*, seed: int, style: int, size: str | int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a whole number 0 or more, not {seed!r}")
    scanner_style(style)
    if size != "brats":
        _cube_edge(size)


# -- the grid and the anatomy ---------------------------------------------------------------


def grid_for_size(size: str | int) -> Grid:
    """The voxel grid for ``size`` ("small", "brats" or N), centred on the MNI brain."""
    if size != "brats":
        edge = _cube_edge(size)  # refuse a bad size before loading the template
    _, _, (low, high) = _mni_volumes()
    centre = (low + high) / 2
    if size == "brats":
        shape = BRATS_SHAPE
        spacing = np.ones(3)
    else:
        shape = (edge, edge, edge)
        # A cube over the brain's largest extent plus 10% margin, so the whole head fits.
        spacing = np.full(3, 1.1 * float(np.max(high - low)) / edge)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2
    return Grid(shape=shape, affine=affine)


def _cube_edge(size: str | int) -> int:
    if size == "small":
        return SMALL_SIZE
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 8 <= size <= 512:
        raise ValueError(f'size must be "small", "brats", or a whole number from 8 to 512, not {size!r}')
    return int(size)


@functools.cache
def _mni_volumes() -> tuple[dict[str, np.ndarray], np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """nilearn's packaged MNI152 T1 template and tissue maps (1 mm), loaded once per process.

    Returns the maps (t1, gm, wm as float32 in [0, 1]), their affine, and the brain's bounding
    box in world millimetres.
    """
    from nilearn import datasets  # imported here: it takes a second and pulls in scikit-learn

    t1 = datasets.load_mni152_template(resolution=1)
    maps = {
        "t1": t1.get_fdata(dtype=np.float32),
        "gm": datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
    }
    affine = np.asarray(t1.affine, dtype=float)
    corners = np.argwhere(maps["t1"] > _BRAIN_THRESHOLD)
    low = nib.affines.apply_affine(affine, corners.min(axis=0))
    high = nib.affines.apply_affine(affine, corners.max(axis=0))
    return maps, affine, (np.minimum(low, high), np.maximum(low, high))


_BRAIN_THRESHOLD = 0.2  # nilearn's own threshold for load_mni152_brain_mask


@functools.cache
def _mni_volumes_for_spacing(spacing: float) -> dict[str, np.ndarray]:
    """The MNI maps low-pass filtered for sampling at ``spacing`` mm, so coarse grids do not alias."""
    maps, _, _ = _mni_volumes()
    sigma = 0.4 * spacing if spacing > 1.5 else 0.0
    if sigma == 0.0:
        return maps
    return {name: ndimage.gaussian_filter(volume, sigma) for name, volume in maps.items()}


def _jittered_anatomy(grid: Grid, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tissue maps on ``grid`` for one head: the template scaled, rotated and shifted a little."""
    _, mni_affine, (low, high) = _mni_volumes()
    sources = _mni_volumes_for_spacing(round(float(np.max(grid.spacing)), 3))
    centre = (low + high) / 2
    scale = rng.uniform(0.92, 1.08, size=3)  # heads differ in size and shape
    rotation = _rotation(rng.uniform(-4, 4, size=3))
    shift = rng.uniform(-3, 3, size=3)
    # world point on the case's grid -> world point in the template
    to_template = np.eye(4)
    to_template[:3, :3] = rotation @ np.diag(1 / scale)
    to_template[:3, 3] = centre + shift - to_template[:3, :3] @ centre
    voxel_map = np.linalg.inv(mni_affine) @ to_template @ grid.affine
    resampled = {
        name: ndimage.affine_transform(
            volume, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=grid.shape, order=1, mode="constant"
        )
        for name, volume in sources.items()
    }
    brain = resampled["t1"] > _BRAIN_THRESHOLD
    gm = np.clip(resampled["gm"], 0, 1) * brain
    wm = np.clip(resampled["wm"], 0, 1) * brain
    total = np.maximum(gm + wm, 1.0)  # the maps may overlap a little after interpolation
    gm, wm = gm / total, wm / total
    csf = (1 - gm - wm) * brain
    return {"brain": brain, "gm": gm, "wm": wm, "csf": csf}


def _rotation(degrees: np.ndarray) -> np.ndarray:
    x, y, z = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


# -- the tumour ---------------------------------------------------------------------------


def _tumour_labels(tissues: dict[str, np.ndarray], grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """A label map with one tumour: oedema (2) around an enhancing rim (4) around necrosis (1)."""
    radius = rng.uniform(18, 38)  # mm; BraTS whole tumours are mostly 20 to 250 cm3
    axes = radius * rng.uniform(0.75, 1.25, size=3)
    centre = _tumour_centre(tissues, grid, radius, rng)
    box = _box_around(centre, 1.6 * float(np.max(axes)), grid)
    offsets_mm = _offsets_mm(box, centre, grid)
    rotation = _rotation(rng.uniform(-180, 180, size=3))
    roughness = rng.uniform(0.15, 0.35)
    bumps = 0.4 * radius / grid.spacing  # correlation length of the surface bumps, in voxels
    box_shape = tuple(s.stop - s.start for s in box)

    def region(scale_axes: np.ndarray, shift_mm: np.ndarray) -> np.ndarray:
        distance = _ellipsoid_distance(offsets_mm - shift_mm, rotation, scale_axes)
        return distance + roughness * _smooth_noise(rng, box_shape, bumps) < 1

    core_fraction = rng.uniform(0.45, 0.75)
    necrosis_fraction = rng.uniform(0.4, 0.8) if rng.random() > 0.15 else 0.0
    core_shift = rng.uniform(-0.15, 0.15, size=3) * radius  # cores are often off-centre
    whole = region(axes, np.zeros(3))
    # The eroded outer region bounds the inner one, so oedema surrounds the core and an
    # enhancing rim surrounds the necrosis, at least a voxel thick.
    core = region(axes * core_fraction, core_shift) & ndimage.binary_erosion(whole)
    necrosis = region(axes * core_fraction * max(necrosis_fraction, 1e-3), core_shift)
    necrosis &= ndimage.binary_erosion(core) if necrosis_fraction else False

    brain, csf = tissues["brain"][box], tissues["csf"][box]
    core &= brain
    # Oedema spreads through white matter and spares the ventricles and sulci.
    whole &= brain & (csf < 0.7)
    whole |= core
    necrosis &= core
    core, necrosis = _ensure_enhancing_rim(core, necrosis, offsets_mm, brain)

    label = np.zeros(grid.shape, dtype=np.uint8)
    patch = label[box]
    patch[whole] = LABEL_OEDEMA
    patch[core] = LABEL_ENHANCING
    patch[necrosis] = LABEL_NECROSIS
    return label


def _ensure_enhancing_rim(
    core: np.ndarray, necrosis: np.ndarray, offsets_mm: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """On coarse grids a small core can vanish or be all necrosis; keep every region present."""
    if not core.any():
        distance = np.linalg.norm(offsets_mm, axis=-1)
        distance[~brain] = np.inf
        core = np.zeros_like(core)
        core[np.unravel_index(np.argmin(distance), core.shape)] = True
    if not (core & ~necrosis).any():
        necrosis = np.zeros_like(necrosis)
    return core, necrosis


def _tumour_centre(
    tissues: dict[str, np.ndarray], grid: Grid, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """A voxel in white matter deep enough that most of the tumour lies inside the brain."""
    # Millimetre precision is plenty here, so fine grids are searched at every other voxel.
    stride = 2 if float(np.min(grid.spacing)) < 2 else 1
    brain = tissues["brain"][::stride, ::stride, ::stride]
    white_matter = tissues["wm"][::stride, ::stride, ::stride]
    depth_mm = ndimage.distance_transform_edt(brain, sampling=grid.spacing * stride)
    candidates = np.argwhere((white_matter > 0.5) & (depth_mm > 0.6 * radius))
    if len(candidates) == 0:
        candidates = np.argwhere(depth_mm == depth_mm.max())
    return stride * candidates[rng.integers(len(candidates))].astype(float)


def _box_around(centre: np.ndarray, half_mm: float, grid: Grid) -> tuple[slice, slice, slice]:
    half = np.ceil(half_mm / grid.spacing).astype(int)
    low = np.maximum(centre.astype(int) - half, 0)
    high = np.minimum(centre.astype(int) + half + 1, grid.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


def _offsets_mm(box: tuple[slice, slice, slice], centre: np.ndarray, grid: Grid) -> np.ndarray:
    """Millimetre offset of every voxel in ``box`` from ``centre``, shape (*box, 3)."""
    axes = [(np.arange(s.start, s.stop) - c) * d for s, c, d in zip(box, centre, grid.spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _ellipsoid_distance(offsets_mm: np.ndarray, rotation: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """1 on the surface of the rotated ellipsoid with semi-axes ``axes``, 0 at its centre."""
    local = offsets_mm @ rotation
    return np.sqrt(np.sum((local / axes) ** 2, axis=-1))


# -- contrasts and the scanner ---------------------------------------------------------------


def _tissue_fractions(tissues: dict[str, np.ndarray], label: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """Per-voxel fractions of csf, gm, wm, oedema, enhancing, necrosis (summing to 1 in the brain)."""
    sigma = 0.8 / grid.spacing  # tumour borders are not sharp on the images, only in the labels
    tumour = [
        np.clip(ndimage.gaussian_filter((label == value).astype(np.float32), sigma), 0, 1) * tissues["brain"]
        for value in (LABEL_OEDEMA, LABEL_ENHANCING, LABEL_NECROSIS)
    ]
    healthy = np.clip(1 - sum(tumour), 0, 1)
    return [tissues["csf"] * healthy, tissues["gm"] * healthy, tissues["wm"] * healthy, *tumour]


def _signal(fractions: list[np.ndarray], contrast: tuple[float, ...]) -> np.ndarray:
    return sum(fraction * value for fraction, value in zip(fractions, contrast, strict=True))  # type: ignore[return-value]


def _acquire(
    signal: np.ndarray, brain: np.ndarray, grid: Grid, scanner: ScannerStyle, rng: np.random.Generator
) -> np.ndarray:
    """What ``scanner`` records of ``signal``: contrast, bias, resolution, noise, then skull-stripping."""
    image = np.power(np.clip(signal, 0, None, dtype=np.float32), np.float32(scanner.contrast_gamma))
    if scanner.bias_strength > 0:
        field = np.exp(np.float32(scanner.bias_strength) * _smooth_noise(rng, grid.shape, 80 / grid.spacing))
        image = image * field
    image = _blur(image, scanner)
    sigma = scanner.noise * _WHITE_MATTER_T1
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real**2 + imaginary**2)  # magnitude images carry Rician noise
    stored = np.rint(image * scanner.intensity_scale * _INTENSITY_UNITS)
    # BraTS is skull-stripped: zero outside the brain, and never zero inside it.
    stored = np.where(brain, np.clip(stored, 1, np.iinfo(np.int16).max), 0)
    return stored.astype(np.int16)


def _blur(image: np.ndarray, scanner: ScannerStyle) -> np.ndarray:
    fwhm_to_sigma = 1 / (2 * math.sqrt(2 * math.log(2)))
    fwhm = np.array(
        [scanner.blur_voxels, scanner.blur_voxels, max(scanner.blur_voxels, scanner.slice_voxels)]
    )
    if scanner.blur_voxels > 0 or scanner.slice_voxels > 1:
        image = ndimage.gaussian_filter(image, fwhm * fwhm_to_sigma)
    step = scanner.slice_voxels
    if step > 1:  # thick slices: keep every step-th slice and interpolate between them
        kept = image[:, :, ::step]
        image = ndimage.affine_transform(
            kept, [1, 1, 1 / step], output_shape=image.shape, order=1, mode="nearest"
        )
    return image


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], correlation_voxels: np.ndarray
) -> np.ndarray:
    """Zero-mean, unit-variance noise that varies smoothly over ``correlation_voxels``.

    Drawn on a coarse grid and interpolated up, so it costs little even on a 240^3 volume.
    """
    correlation = np.broadcast_to(np.asarray(correlation_voxels, dtype=float), (len(shape),))
    # Two coarse points per correlation length, and never fewer than three along an axis.
    coarse_shape = tuple(
        int(max(3, math.ceil(2 * n / max(c, 1.0)) + 1)) for n, c in zip(shape, correlation, strict=True)
    )
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
    # Linear is smooth enough after the filter, and a third of cubic's cost at 240^3.
    noise = _resize(coarse, shape, order=1)
    return ((noise - noise.mean()) / (noise.std() + 1e-12)).astype(np.float32)


def _resize(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Interpolate ``volume`` to exactly ``shape``, corners aligned."""
    scale = [(n_in - 1) / max(n_out - 1, 1) for n_in, n_out in zip(volume.shape, shape, strict=True)]
    return ndimage.affine_transform(volume, scale, output_shape=shape, order=order, mode="nearest")


def _save_nifti(volume: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
