"""Finding, checking, splitting and transforming a site's BraTS-layout cases."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sitesagent import data
from sitesagent.data import DataError

SHAPE = (12, 10, 8)
LABELS = np.zeros(SHAPE, dtype=np.uint8)
LABELS[4:8, 3:7, 2:6] = 2
LABELS[5:7, 4:6, 3:5] = 4
LABELS[5, 4, 3] = 1


def write_volume(path: Path, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(volume, np.eye(4) if affine is None else affine), path)
    return path


def write_case(
    root: Path, name: str, *, labels: np.ndarray = LABELS, affine: np.ndarray | None = None
) -> Path:
    """A small BraTS-layout case: four random images (zero outside a box, like skull-stripping)."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for modality in data.MODALITIES:
        image = np.zeros(labels.shape, dtype=np.int16)
        image[1:-1, 1:-1, 1:-1] = rng.integers(100, 1000, size=tuple(n - 2 for n in labels.shape))
        write_volume(folder / f"{name}_{modality}.nii.gz", image, affine)
    write_volume(folder / f"{name}_seg.nii.gz", labels, affine)
    return folder


@pytest.fixture
def site(tmp_path: Path) -> Path:
    for name in ("case_b", "case_a", "case_c"):
        write_case(tmp_path, name)
    return tmp_path


def only_case(root: Path) -> data.Case:
    (case,) = data.discover_cases(root)
    return case


# -- finding cases ----------------------------------------------------------------------------


def test_discover_finds_every_case_sorted_with_images_in_modality_order(site: Path):
    cases = data.discover_cases(site)

    assert [case.name for case in cases] == ["case_a", "case_b", "case_c"]
    first = cases[0]
    assert [path.name for path in first.images] == [
        "case_a_t1.nii.gz",
        "case_a_t1ce.nii.gz",
        "case_a_t2.nii.gz",
        "case_a_flair.nii.gz",
    ]
    assert first.label.name == "case_a_seg.nii.gz"


def test_discover_finds_cases_grouped_one_level_down_as_in_brats_2018(tmp_path: Path):
    write_case(tmp_path / "HGG", "Brats18_1")
    write_case(tmp_path / "LGG", "Brats18_2")
    (tmp_path / "survival_data.csv").write_text("id,age\n")

    assert [case.name for case in data.discover_cases(tmp_path)] == ["HGG/Brats18_1", "LGG/Brats18_2"]


def test_missing_modality_names_the_missing_file(site: Path):
    (site / "case_b" / "case_b_t1ce.nii.gz").unlink()

    with pytest.raises(DataError) as error:
        data.discover_cases(site)

    assert str(site / "case_b" / "case_b_t1ce.nii.gz") in str(error.value)
    assert "missing" in str(error.value)


def test_missing_segmentation_names_the_missing_file(site: Path):
    (site / "case_a" / "case_a_seg.nii.gz").unlink()

    with pytest.raises(DataError, match=r"case_a_seg\.nii\.gz: missing"):
        data.discover_cases(site)


def test_empty_folder_is_named(tmp_path: Path):
    (tmp_path / "just_a_folder").mkdir()

    with pytest.raises(DataError) as error:
        data.discover_cases(tmp_path)

    assert str(error.value).startswith(f"{tmp_path}: no BraTS cases")


def test_folder_that_does_not_exist_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="no such folder"):
        data.discover_cases(tmp_path / "nowhere")


# -- checking cases ---------------------------------------------------------------------------


def test_shapes_that_disagree_name_the_file(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    write_volume(case.images[3], np.ones((12, 10, 9), dtype=np.int16))

    with pytest.raises(DataError) as error:
        data.inspect_case(case)

    message = str(error.value)
    assert message.startswith(str(case.images[3]))
    assert "shape (12, 10, 9)" in message and "case_t1.nii.gz's (12, 10, 8)" in message


def test_affines_that_disagree_name_the_file(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    shifted = np.eye(4)
    shifted[:3, 3] = (5, 0, 0)
    write_volume(case.images[2], np.ones(SHAPE, dtype=np.int16), shifted)

    with pytest.raises(DataError) as error:
        data.inspect_case(case)

    assert str(error.value).startswith(f"{case.images[2]}: affine differs")
    assert "not co-registered" in str(error.value)


def test_unreadable_file_names_the_file(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    case.images[2].write_bytes(b"this is not a NIfTI file at all" * 10)

    with pytest.raises(DataError) as error:
        data.inspect_case(case)

    assert str(error.value).startswith(f"{case.images[2]}: cannot be read as NIfTI")


def test_truncated_image_is_caught_when_images_are_read(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    _truncate(case.images[1])

    data.inspect_case(case)  # the header alone still reads
    with pytest.raises(DataError) as error:
        data.inspect_case(case, read_images=True)

    assert str(error.value).startswith(f"{case.images[1]}: cannot be read as NIfTI")


def test_labels_outside_brats_name_the_file(tmp_path: Path):
    labels = LABELS.copy()
    labels[0, 0, 0] = 3
    labels[0, 0, 1] = 7
    case = only_case(_with_case(tmp_path, labels=labels))

    with pytest.raises(DataError) as error:
        data.inspect_case(case)

    message = str(error.value)
    assert message.startswith(f"{case.label}: labels must be 0, 1, 2 or 4; found 3, 7")
    assert "BraTS 2023 uses 3" in message


def test_non_integer_labels_name_the_file(tmp_path: Path):
    case = only_case(_with_case(tmp_path, labels=LABELS.astype(np.float32) + 0.5))

    with pytest.raises(DataError, match=r"case_seg\.nii\.gz: labels must be 0, 1, 2 or 4; found non-integer"):
        data.inspect_case(case)


def test_inspect_case_reports_grid_and_label_counts(tmp_path: Path):
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    info = data.inspect_case(only_case(_with_case(tmp_path, affine=affine)))

    assert info.shape == SHAPE
    assert info.spacing == (1.0, 1.0, 2.5)
    assert info.orientation == "RAS"
    assert info.label_voxels == {label: int((label == LABELS).sum()) for label in (0, 1, 2, 4)}


def test_check_dataset_counts_good_cases_and_lists_each_bad_one(site: Path):
    (site / "case_b" / "case_b_flair.nii.gz").unlink()
    write_volume(site / "case_c" / "case_c_seg.nii.gz", np.full(SHAPE, 5, dtype=np.uint8))

    check = data.check_dataset(site)

    assert check.n_cases == 1 and not check.ok
    assert len(check.problems) == 2
    assert "case_b_flair.nii.gz: missing" in check.problems[0]
    assert "case_c_seg.nii.gz: labels must be" in check.problems[1]
    summary = json.loads(json.dumps(check.to_dict()))
    assert summary["n_cases"] == 1 and summary["n_problems"] == 2
    assert summary["shapes"] == [list(SHAPE)]
    assert summary["label_voxels"]["4"] == int((LABELS == 4).sum())
    assert summary["cases_with_region"] == {"et": 1, "tc": 1, "wt": 1}
    assert "case_a" not in json.dumps(summary), "case names stay at the site unless asked for"
    assert check.to_dict(with_details=True)["cases"] == ["case_a"]


def test_check_dataset_of_empty_folder_reports_one_problem(tmp_path: Path):
    check = data.check_dataset(tmp_path)

    assert check.n_cases == 0 and not check.ok
    assert check.problems == [f"{tmp_path}: no BraTS cases in this folder ({data._LAYOUT_HINT})"]


def _with_case(root: Path, **kwargs) -> Path:
    write_case(root, "case", **kwargs)
    return root


def _truncate(path: Path) -> None:
    """Keep the header but cut the gzip stream short, as an interrupted copy would."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])


# -- splitting --------------------------------------------------------------------------------


def _named_cases(names) -> list[data.Case]:
    return [data.Case(name=name, folder=Path(name), images=(), label=Path(name)) for name in names]


def test_split_is_deterministic_and_disjoint():
    cases = _named_cases(f"case_{i:02d}" for i in range(10))

    train, val = data.split_cases(cases, val_fraction=0.2, seed=7)

    assert data.split_cases(cases, val_fraction=0.2, seed=7) == (train, val)
    assert len(val) == 2 and len(train) == 8
    assert {c.name for c in train}.isdisjoint({c.name for c in val})
    assert {c.name for c in train} | {c.name for c in val} == {c.name for c in cases}
    assert data.split_cases(cases, val_fraction=0.2, seed=8)[1] != val


def test_split_does_not_depend_on_the_order_cases_come_in():
    cases = _named_cases(f"case_{i:02d}" for i in range(10))

    _, val = data.split_cases(cases, val_fraction=0.3, seed=1)
    _, val_reversed = data.split_cases(cases[::-1], val_fraction=0.3, seed=1)

    assert {c.name for c in val} == {c.name for c in val_reversed}


def test_split_keeps_one_validation_case_from_two_and_none_from_one():
    assert [len(part) for part in data.split_cases(_named_cases(["a", "b"]), val_fraction=0.1)] == [1, 1]
    assert [len(part) for part in data.split_cases(_named_cases(["a"]), val_fraction=0.5)] == [1, 0]
    assert [len(part) for part in data.split_cases(_named_cases("abcd"), val_fraction=0.0)] == [4, 0]


def test_adding_a_case_moves_at_most_one_other_into_training():
    names = [f"case_{i:02d}" for i in range(20)]
    _, val = data.split_cases(_named_cases(names), val_fraction=0.2, seed=3)
    _, val_after = data.split_cases(_named_cases([*names, "case_new"]), val_fraction=0.2, seed=3)

    assert len({c.name for c in val} - {c.name for c in val_after}) <= 1


def test_split_refuses_a_fraction_of_one():
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_cases(_named_cases("ab"), val_fraction=1.0)


# -- labels and transforms --------------------------------------------------------------------


def test_brats_labels_map_to_et_tc_wt_channels():
    labels = torch.tensor([0, 1, 2, 4]).reshape(1, 4, 1, 1)

    channels = data.brats_regions(labels)[:, :, 0, 0]

    # columns: background, necrosis (1), oedema (2), enhancing (4)
    assert channels.tolist() == [
        [0, 0, 0, 1],  # ET: enhancing only
        [0, 1, 0, 1],  # TC: necrosis and enhancing
        [0, 1, 1, 1],  # WT: all three
    ]


def test_region_transform_names_the_segmentation_with_unknown_labels(tmp_path: Path):
    labels = LABELS.copy()
    labels[0, 0, 0] = 3
    case = only_case(_with_case(tmp_path, labels=labels))

    with pytest.raises(DataError) as error, data.data_errors_surfaced():
        data.val_transforms()(case.as_item())

    assert str(error.value).startswith(f"{case.label}: labels must be 0, 1, 2 or 4; found 3")


def test_loading_a_truncated_image_names_the_file(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    _truncate(case.images[3])

    with pytest.raises(DataError) as error, data.data_errors_surfaced():
        data.val_transforms()(case.as_item())

    assert str(error.value).startswith(f"{case.images[3]}: cannot be read as NIfTI")


def test_validation_transforms_give_normalised_images_and_region_channels(tmp_path: Path):
    case = only_case(_with_case(tmp_path))

    item = data.val_transforms()(case.as_item())

    image, label = item["image"], item["label"]
    assert image.shape == (4, *SHAPE) and label.shape == (3, *SHAPE)
    assert label.dtype == torch.float32
    assert torch.equal(label, data.brats_regions(torch.as_tensor(LABELS)).float())
    inside = image[0] != 0  # nonzero=True: the skull-stripped background stays zero
    assert inside.sum() == np.prod([n - 2 for n in SHAPE])
    assert abs(float(image[0][inside].mean())) < 1e-4 and abs(float(image[0][inside].std()) - 1) < 1e-2


def test_cases_stored_in_other_orientations_load_as_ras(tmp_path: Path):
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_x[0, 3] = SHAPE[0] - 1  # same world box, x axis stored right-to-left (LAS)
    case = only_case(_with_case(tmp_path, affine=flip_x))

    label = data.val_transforms()(case.as_item())["label"]

    assert torch.equal(label, data.brats_regions(torch.as_tensor(LABELS[::-1].copy())).float())


def test_training_transforms_crop_to_the_roi_and_pad_small_volumes(tmp_path: Path):
    case = only_case(_with_case(tmp_path))
    transform = data.train_transforms((8, 8, 12))
    transform.set_random_state(seed=0)

    item = transform(case.as_item())

    assert item["image"].shape == (4, 8, 8, 12)
    assert item["label"].shape == (3, 8, 8, 12)


def test_loading_cases_in_parallel_threads_keeps_every_image_four_channels(site: Path):
    # Regression: MONAI's NibabelReader keeps the file names of its last read on itself, so
    # CacheDataset's threads sharing one reader stacked one segmentation's worth of images.
    cases = data.discover_cases(site) * 4
    for _ in range(5):
        dataset = data.make_dataset(cases, data.val_transforms(), cache_rate=1.0)
        assert [dataset[i]["image"].shape[0] for i in range(len(cases))] == [4] * len(cases)
