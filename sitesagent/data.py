"""A site's scans: finding BraTS-layout cases, checking them, and MONAI's transform pipelines.

The layout is BraTS 2018-2020's: one folder per case holding ``<case>_t1.nii.gz``,
``<case>_t1ce.nii.gz``, ``<case>_t2.nii.gz``, ``<case>_flair.nii.gz`` and ``<case>_seg.nii.gz``
(labels 0 background, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing tumour). Case folders
may sit directly under the data folder or one level deeper (BraTS 2018's ``HGG/`` and ``LGG/``).

Every problem with the data raises `DataError` with a message that names the file (or, for an
empty data folder, the folder) and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, NibabelReader
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

MODALITIES = ("t1", "t1ce", "t2", "flair")  # the model's input channels, in order
REGIONS = ("et", "tc", "wt")  # the model's output channels, in order (as sitesagent.model.REGIONS)
BRATS_LABELS = (0, 1, 2, 4)
_SUFFIXES = (".nii.gz", ".nii")
_AFFINE_TOLERANCE_MM = 1e-3
_LABELS_RULE = "labels must be 0, 1, 2 or 4"
_LAYOUT_HINT = (
    "expected one folder per case holding <case>_t1.nii.gz, <case>_t1ce.nii.gz, "
    "<case>_t2.nii.gz, <case>_flair.nii.gz and <case>_seg.nii.gz"
)


class DataError(ValueError):
    """A problem with a site's scans; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class Case:
    """One patient: four modality images and the segmentation, all on one voxel grid."""

    name: str  # the folder's path under the data folder, e.g. "Brats18_2013_2_1" or "HGG/Brats18_2013_2_1"
    folder: Path
    images: tuple[Path, ...]  # in MODALITIES order
    label: Path

    def as_item(self) -> dict[str, Any]:
        """The dict MONAI's dictionary transforms take."""
        return {"image": [str(path) for path in self.images], "label": str(self.label)}


# -- finding cases ----------------------------------------------------------------------------


def discover_cases(root: str | Path) -> list[Case]:
    """Every case under ``root``, sorted by name.

    Checks that each case folder has exactly one file per modality and a segmentation; it does
    not open them (see `check_dataset`). Raises DataError naming the missing file, or naming
    ``root`` when it does not exist or holds no cases.
    """
    root = _existing_folder(root)
    return [_case_in_folder(folder, root) for folder in _case_folders(root)]


def _existing_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder of cases")
    return root


def _case_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (it included, one level of grouping folders below) holding NIfTI files."""
    candidates = [root, *_subfolders(root)]
    candidates += [inner for folder in _subfolders(root) for inner in _subfolders(folder)]
    folders = sorted(folder for folder in candidates if any(_is_nifti(p) for p in folder.iterdir()))
    if not folders:
        raise DataError(f"{root}: no BraTS cases in this folder ({_LAYOUT_HINT})")
    return folders


def _subfolders(folder: Path) -> list[Path]:
    # Hidden folders are editors' and tools' (.ipynb_checkpoints, .git), never cases.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_SUFFIXES)


def _case_in_folder(folder: Path, root: Path) -> Case:
    name = folder.relative_to(root).as_posix() if folder != root else folder.name
    images = tuple(_modality_file(folder, modality) for modality in MODALITIES)
    return Case(name=name, folder=folder, images=images, label=_modality_file(folder, "seg"))


def _modality_file(folder: Path, modality: str) -> Path:
    matches = sorted(p for suffix in _SUFFIXES for p in folder.glob(f"*_{modality}{suffix}") if p.is_file())
    if not matches:
        expected = folder / f"{folder.name}_{modality}.nii.gz"
        raise DataError(f"{expected}: missing; the case has no {modality} file (*_{modality}.nii.gz)")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{matches[1]}: more than one {modality} file in {folder} ({names}); keep one")
    return matches[0]


# -- checking cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseInfo:
    """What opening a case found: its grid and how many voxels carry each label."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str  # e.g. "RAS"
    label_voxels: dict[int, int]


def inspect_case(case: Case, *, read_images: bool = False) -> CaseInfo:
    """Open ``case``'s files and check them; return its grid and label counts.

    Checks that every file reads as NIfTI, that all five share one shape and affine, and that
    the labels are BraTS's 0, 1, 2 and 4. The segmentation is read in full; the four images
    only their headers, unless ``read_images`` (slower, but also catches truncated images).
    Raises DataError naming the offending file.
    """
    reference_path = case.images[0]
    reference = _load_header(reference_path)
    _check_3d(reference_path, reference)
    for path in (*case.images[1:], case.label):
        image = _load_header(path)
        _check_same_grid(path, image, reference_path, reference)
    if read_images:
        for path in case.images:
            _read_voxels(path)
    label_voxels = _label_voxels(case.label, _read_voxels(case.label))
    zooms = reference.header.get_zooms()[:3]
    return CaseInfo(
        shape=tuple(int(n) for n in reference.shape[:3]),  # type: ignore[arg-type]
        spacing=tuple(round(float(z), 4) for z in zooms),  # type: ignore[arg-type]
        orientation="".join(nib.aff2axcodes(reference.affine)),
        label_voxels=label_voxels,
    )


def _load_header(path: Path) -> Any:
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises many kinds for a damaged file
        raise DataError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from error


def _read_voxels(path: Path) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(path).dataobj)  # type: ignore[attr-defined]
    except Exception as error:  # a truncated or corrupt gzip stream surfaces only here
        raise DataError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from error


def _check_3d(path: Path, image: Any) -> None:
    if len(image.shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, found shape {tuple(image.shape)}")


def _check_same_grid(path: Path, image: Any, reference_path: Path, reference: Any) -> None:
    _check_3d(path, image)
    if tuple(image.shape) != tuple(reference.shape):
        raise DataError(
            f"{path}: shape {tuple(image.shape)} differs from {reference_path.name}'s "
            f"{tuple(reference.shape)}; a case's images and segmentation must share one voxel grid"
        )
    if not np.allclose(image.affine, reference.affine, atol=_AFFINE_TOLERANCE_MM):
        raise DataError(
            f"{path}: affine differs from {reference_path.name}'s (origin {_origin(image)} vs "
            f"{_origin(reference)}, axes {''.join(nib.aff2axcodes(image.affine))} vs "
            f"{''.join(nib.aff2axcodes(reference.affine))}); the scans are not co-registered"
        )


def _origin(image: Any) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in image.affine[:3, 3]) + ")"


def _label_voxels(path: Path, labels: np.ndarray) -> dict[int, int]:
    """Voxels per BraTS label; DataError naming ``path`` for any other value."""
    if not np.issubdtype(labels.dtype, np.integer):
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            example = float(labels[~whole].flat[0])
            raise DataError(f"{path}: {_LABELS_RULE}; found non-integer values such as {example:g}")
    values = labels.astype(np.int64, copy=False).ravel()
    if values.size and values.min() >= 0 and values.max() <= 255:
        counts = np.bincount(values, minlength=max(BRATS_LABELS) + 1)  # far faster than np.unique
        present = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    else:
        present = {int(v): int(n) for v, n in zip(*np.unique(values, return_counts=True), strict=True)}
    unexpected = sorted(set(present) - set(BRATS_LABELS))
    if unexpected:
        # BraTS 2023 renumbered enhancing tumour to 3: the likeliest cause, so say so.
        hint = " (BraTS 2023 uses 3 for enhancing tumour; this tool expects 4)" if 3 in unexpected else ""
        raise DataError(f"{path}: {_LABELS_RULE}; found {', '.join(map(str, unexpected))}{hint}")
    return {label: present.get(label, 0) for label in BRATS_LABELS}


@dataclass
class DataCheck:
    """What `check_dataset` found in a site's data folder."""

    root: str
    case_names: list[str] = field(default_factory=list)  # cases that passed every check
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    orientations: list[str] = field(default_factory=list)
    label_voxels: dict[int, int] = field(default_factory=lambda: dict.fromkeys(BRATS_LABELS, 0))
    cases_with_region: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0))
    problems: list[str] = field(default_factory=list)  # one DataError message per bad case

    @property
    def n_cases(self) -> int:
        return len(self.case_names)

    @property
    def ok(self) -> bool:
        """True when there is at least one case and nothing is wrong."""
        return self.n_cases > 0 and not self.problems

    def to_dict(self, *, with_details: bool = False) -> dict[str, Any]:
        """JSON-able summary. Case names and problem messages (which name files, and so may
        name patients) are included only ``with_details``: keep them at the site."""
        summary: dict[str, Any] = {
            "n_cases": self.n_cases,
            "n_problems": len(self.problems),
            "ok": self.ok,
            "shapes": [list(shape) for shape in self.shapes],
            "spacings": [list(spacing) for spacing in self.spacings],
            "orientations": list(self.orientations),
            "label_voxels": {str(label): count for label, count in self.label_voxels.items()},
            "cases_with_region": dict(self.cases_with_region),
        }
        if with_details:
            summary |= {"root": self.root, "cases": list(self.case_names), "problems": list(self.problems)}
        return summary

    def _add(self, case: Case, info: CaseInfo) -> None:
        self.case_names.append(case.name)
        _add_unique(self.shapes, info.shape)
        _add_unique(self.spacings, info.spacing)
        _add_unique(self.orientations, info.orientation)
        for label, count in info.label_voxels.items():
            self.label_voxels[label] += count
        present = {label for label, count in info.label_voxels.items() if count}
        for region, labels in _REGION_LABELS.items():
            self.cases_with_region[region] += bool(present & set(labels))


_REGION_LABELS = {"et": (4,), "tc": (1, 4), "wt": (1, 2, 4)}


def _add_unique(values: list, value: Any) -> None:
    if value not in values:
        values.append(value)


def check_dataset(root: str | Path, *, read_images: bool = False) -> DataCheck:
    """Check every case under ``root`` and summarise them, collecting problems instead of raising.

    A case with any problem is left out of the counts and its DataError message is added to
    ``problems``; a missing or empty folder gives no cases and one problem.
    """
    check = DataCheck(root=str(root))
    try:
        root = _existing_folder(root)
        folders = _case_folders(root)
    except DataError as error:
        check.problems.append(str(error))
        return check
    for folder in folders:
        try:
            case = _case_in_folder(folder, root)
            check._add(case, inspect_case(case, read_images=read_images))
        except DataError as error:
            check.problems.append(str(error))
    return check


# -- splitting --------------------------------------------------------------------------------


def split_cases(
    cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """Split a site's cases into (training, validation), the same way every time.

    A case's side depends only on its name, the seed and how many cases there are: cases are
    ordered by a hash of seed and name and the first round(val_fraction * n) go to validation,
    so adding a case moves at most one other. With two or more cases and a fraction above 0,
    at least one is kept for validation and at least one for training.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be from 0 up to (not including) 1, not {val_fraction!r}")
    n_val = round(val_fraction * len(cases))
    if val_fraction > 0 and len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    ranked = sorted(cases, key=lambda case: hashlib.sha256(f"{seed}:{case.name}".encode()).hexdigest())
    validation = {case.name for case in ranked[:n_val]}
    return [c for c in cases if c.name not in validation], [c for c in cases if c.name in validation]


# -- MONAI transforms -------------------------------------------------------------------------


def brats_regions(label: torch.Tensor) -> torch.Tensor:
    """BraTS labels (1, H, W, D) or (H, W, D) -> three uint8 channels ET, TC, WT.

    ET is label 4; TC (tumour core) is 1 or 4; WT (whole tumour) is 1, 2 or 4. MONAI's
    ConvertToMultiChannelBasedOnBratsClasses gives the same channels ordered TC, WT, ET; the
    order here is DESIGN section 7's, which the model's outputs and the Dice metrics follow.
    """
    if label.dim() == 4:
        label = label[0]
    et = label == 4
    tc = et | (label == 1)
    wt = tc | (label == 2)
    return torch.stack([et, tc, wt]).to(torch.uint8)


class BratsRegionsd(MapTransform):
    """Dictionary transform: the label key's BraTS labels -> ET, TC, WT channels (`brats_regions`).

    Raises DataError naming the segmentation file when it holds any label but 0, 1, 2 and 4.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            label = result[key]
            known = (label == 0) | (label == 1) | (label == 2) | (label == 4)
            if not bool(known.all()):
                path = getattr(label, "meta", {}).get("filename_or_obj", key)
                found = sorted({float(v) for v in torch.unique(torch.as_tensor(label)[~known])})
                raise DataError(f"{path}: {_LABELS_RULE}; found {', '.join(f'{v:g}' for v in found)}")
            result[key] = brats_regions(label)
        return result


class LoadCased(LoadImaged):
    """LoadImaged with NIfTI files, a reader per call, and DataError naming the file at fault."""

    def __call__(self, data: Any, reader: Any = None) -> Any:
        # A fresh reader each time: NibabelReader keeps the file names of its last read on
        # itself, so CacheDataset's loading threads sharing one would stack a case's four
        # images against another case's one segmentation, and return one channel.
        try:
            return super().__call__(data, reader or NibabelReader())
        except Exception as error:
            raise _explain_load_failure(data, error) from error


def _explain_load_failure(data: dict[str, Any], error: Exception) -> Exception:
    """Find which file broke loading: one that does not read, or one off the first image's grid."""
    paths = [Path(p) for key in _KEYS for p in np.atleast_1d(data.get(key, [])).tolist()]
    try:
        for path in paths:
            _read_voxels(path)
        reference = _load_header(paths[0])
        for path in paths[1:]:
            _check_same_grid(path, _load_header(path), paths[0], reference)
    except DataError as found:
        return found
    return error


_KEYS = ("image", "label")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _deterministic_transforms() -> list:
    """Loading and normalising: what a cached dataset stores, so only the random part repeats."""
    return [
        LoadCased(_KEYS, image_only=True),
        EnsureChannelFirstd(_KEYS),
        Orientationd(_KEYS, axcodes="RAS", labels=_RAS_LABELS),
        BratsRegionsd("label"),
        # Whole-volume statistics (not per crop, as in MONAI's tutorial) so training and
        # validation see the same intensities, and the normalised volume can be cached.
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]


def train_transforms(roi_size: Sequence[int]) -> Compose:
    """Training pipeline: load, RAS, regions, normalise, then a random ``roi_size`` crop, flips on
    all three axes, and random intensity scale and shift (as MONAI's BraTS tutorial)."""
    roi = tuple(int(n) for n in roi_size)
    return Compose(
        [
            *_deterministic_transforms(),
            SpatialPadd(_KEYS, spatial_size=roi),  # a volume smaller than the crop still yields a full crop
            RandSpatialCropd(_KEYS, roi_size=roi, random_size=False),
            RandFlipd(_KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(_KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(_KEYS, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandShiftIntensityd("image", offsets=0.1, prob=1.0),
            CastToTyped("label", dtype=torch.float32),
        ]
    )


def val_transforms() -> Compose:
    """Validation pipeline: the deterministic part of `train_transforms`, whole volumes."""
    return Compose([*_deterministic_transforms(), CastToTyped("label", dtype=torch.float32)])


def make_dataset(cases: Sequence[Case], transform: Compose, *, cache_rate: float = 1.0) -> Dataset:
    """A MONAI dataset over ``cases``; with ``cache_rate`` > 0 that share of the cases is kept
    in memory after the deterministic transforms (about 180 MB per 240x240x155 case)."""
    items = [case.as_item() for case in cases]
    if cache_rate <= 0:
        return Dataset(items, transform)
    # num_workers=None: one thread per core while filling the cache.
    return CacheDataset(items, transform, cache_rate=cache_rate, num_workers=None, progress=False)


@contextlib.contextmanager
def data_errors_surfaced() -> Iterator[None]:
    """Re-raise a DataError that MONAI wrapped in RuntimeError("applying transform ...").

    MONAI's Compose hides a transform's exception behind a generic RuntimeError; the
    DataError inside, which names the file, is the message a site admin needs.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as error:
        cause = _data_error_in_chain(error)
        if cause is None:
            raise
        raise cause from error


def _data_error_in_chain(error: BaseException) -> DataError | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, DataError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
