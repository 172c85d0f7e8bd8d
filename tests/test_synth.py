"""The synthetic BraTS-layout generator: files, anatomy, nested tumour regions, scanner styles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sitesagent import synth

SIZE = 32


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth.write_synthetic_cases(out, 3, seed=0, style=1, size=SIZE)


def case(index: int, *, seed: int = 0, style: int = 0, scanner=None) -> synth.SyntheticCase:
    return synth.synthetic_case(index, seed=seed, style=style, size=SIZE, scanner=scanner)


def test_writes_brats_layout_files_with_brats_names(site):
    out, folders = site

    assert [folder.name for folder in folders] == [f"SynthSite1_seed0_{i:03d}" for i in range(3)]
    for folder in folders:
        names = sorted(path.name for path in folder.iterdir())
        suffixes = ("flair", "seg", "t1", "t1ce", "t2")
        assert names == [f"{folder.name}_{suffix}.nii.gz" for suffix in suffixes]


def test_written_files_share_a_ras_millimetre_grid(site):
    _, folders = site
    for folder in folders:
        images = [nib.load(path) for path in sorted(folder.iterdir())]
        for image in images:
            assert image.shape == (SIZE, SIZE, SIZE)
            assert np.allclose(image.affine, images[0].affine)
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
            assert image.header.get_xyzt_units()[0] == "mm"
        spacing = images[0].header.get_zooms()
        assert spacing[0] == pytest.approx(synth.grid_for_size(SIZE).spacing[0])


def test_written_cases_pass_the_site_data_check(site):
    from sitesagent.data import check_dataset

    out, _ = site
    check = check_dataset(out, read_images=True)

    assert check.ok and check.n_cases == 3
    assert check.cases_with_region == {"et": 3, "tc": 3, "wt": 3}


def test_labels_are_brats_labels_with_all_three_regions():
    for index in range(4):
        labels = case(index).label
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1, 2, 4}
        assert {2, 4} <= set(np.unique(labels)), "every case has oedema and an enhancing rim"


def test_regions_nest_necrosis_inside_the_rim_inside_the_oedema():
    for index in range(4):
        generated = synth.synthetic_case(index, seed=5, size=48)
        labels = generated.label
        necrosis = labels == 1
        core = (labels == 1) | (labels == 4)
        whole = labels > 0
        # What touches the necrosis is core, and what touches the core is mostly oedema: the
        # core may also meet a ventricle or the brain's edge, where oedema does not spread.
        assert _share_inside(necrosis, core) == 1.0
        assert _share_inside(core, whole) > 0.8
        assert core.sum() < whole.sum()


def _share_inside(inner: np.ndarray, outer: np.ndarray) -> float:
    if not inner.any():
        return 1.0
    ring = ndimage.binary_dilation(inner) & ~inner
    return float((ring & outer).sum() / ring.sum())


def test_tumour_lies_inside_the_brain_and_the_background_is_zero():
    for index, style in ((0, 0), (1, 3), (2, 5)):
        generated = case(index, style=style)
        for image in generated.images.values():
            assert (image[~generated.brain] == 0).all()
            assert (image[generated.brain] > 0).all(), (
                "nonzero inside: NormalizeIntensity(nonzero) relies on it"
            )
        assert generated.brain[generated.label > 0].all()


def test_anatomy_comes_from_the_mni_template():
    generated = case(0)
    brain_share = generated.brain.mean()
    # The MNI brain fills about a third of a cube around it with a 10% margin.
    assert 0.2 < brain_share < 0.5
    t1, t2 = generated.images["t1"].astype(float), generated.images["t2"].astype(float)
    healthy = generated.brain & (generated.label == 0)
    # T1 and T2 contrasts are opposed in healthy tissue: bright white matter on T1 is dark on T2.
    assert np.corrcoef(t1[healthy], t2[healthy])[0, 1] < -0.3


def test_contrasts_light_up_the_right_regions():
    generated = synth.synthetic_case(1, seed=2, size=48)
    labels, images = generated.label, generated.images
    healthy = generated.brain & (labels == 0)

    def mean(modality: str, where: np.ndarray) -> float:
        return float(images[modality][where].mean())

    assert mean("t1ce", labels == 4) > 1.2 * mean("t1ce", healthy)  # the enhancing rim
    assert mean("flair", labels == 2) > 1.2 * mean("flair", healthy)  # oedema
    assert mean("t2", labels == 2) > mean("t2", healthy)
    assert mean("t1", labels > 0) < mean("t1", healthy)  # the tumour is dark on T1


def test_same_seed_and_style_give_identical_cases():
    first, again = case(0, seed=3, style=2), case(0, seed=3, style=2)

    assert np.array_equal(first.label, again.label)
    for modality in synth.MODALITIES:
        assert np.array_equal(first.images[modality], again.images[modality])


def test_other_seeds_cases_and_styles_give_other_patients():
    reference = case(0, seed=0).label
    for other in (case(1, seed=0), case(0, seed=1), case(0, seed=0, style=1)):
        assert not np.array_equal(reference, other.label)


def test_styles_image_the_same_patient_differently_even_after_normalisation():
    renderings = [case(0, scanner=synth.scanner_style(style)) for style in range(len(synth.STYLES))]

    for style, rendering in enumerate(renderings):
        ratio = _brain_mean(rendering) / _brain_mean(renderings[0])
        gamma_effect = 0.6 ** (synth.STYLES[style].contrast_gamma - 1)  # a rough allowance for gamma
        assert ratio == pytest.approx(synth.STYLES[style].intensity_scale * gamma_effect, rel=0.25)
    quantiles = [np.percentile(_normalised(r)[r.brain], [5, 25, 50, 75, 95]) for r in renderings]
    for first in range(len(quantiles)):
        for second in range(first + 1, len(quantiles)):
            assert np.abs(quantiles[first] - quantiles[second]).max() > 0.05, (first, second)


def test_noisier_scanners_give_noisier_images():
    quiet = {"intensity_scale": 1.0, "contrast_gamma": 1.0, "bias_strength": 0.0, "blur_voxels": 0.0}
    clean = case(0, scanner=synth.ScannerStyle(**quiet, noise=0.01, slice_voxels=1))
    noisy = case(0, scanner=synth.ScannerStyle(**quiet, noise=0.10, slice_voxels=1))

    assert _normalised_noise(noisy) > 1.2 * _normalised_noise(clean)


def test_thick_slices_smooth_the_images_most_along_z():
    quiet = {
        "intensity_scale": 1.0,
        "contrast_gamma": 1.0,
        "bias_strength": 0.0,
        "noise": 0.0,
        "blur_voxels": 0.0,
    }
    thin = case(0, scanner=synth.ScannerStyle(**quiet, slice_voxels=1))
    thick = case(0, scanner=synth.ScannerStyle(**quiet, slice_voxels=3))

    along_z = _normalised_roughness(thick, axis=2) / _normalised_roughness(thin, axis=2)
    across = _normalised_roughness(thick, axis=0) / _normalised_roughness(thin, axis=0)
    assert along_z < 0.7 and along_z < across


def test_bias_field_varies_intensity_smoothly_across_the_brain():
    quiet = {
        "intensity_scale": 1.0,
        "contrast_gamma": 1.0,
        "noise": 0.0,
        "blur_voxels": 0.0,
        "slice_voxels": 1,
    }
    flat = case(0, scanner=synth.ScannerStyle(**quiet, bias_strength=0.0))
    biased = case(0, scanner=synth.ScannerStyle(**quiet, bias_strength=0.3))

    inside = flat.brain & (flat.images["t1"] > 100)
    ratio = biased.images["t1"][inside] / flat.images["t1"][inside]
    assert 0.15 < np.log(ratio).std() < 0.45


def _brain_mean(generated: synth.SyntheticCase) -> float:
    return float(generated.images["t1"][generated.brain].mean())


def _normalised(generated: synth.SyntheticCase) -> np.ndarray:
    image = generated.images["t1"].astype(float)
    inside = image[generated.brain]
    return np.where(generated.brain, (image - inside.mean()) / inside.std(), 0)


def _normalised_roughness(generated: synth.SyntheticCase, axis: int) -> float:
    """Mean absolute difference between neighbouring slices along ``axis``, deep inside the brain."""
    image = _normalised(generated)
    deep = ndimage.binary_erosion(generated.brain, iterations=2)
    step = np.abs(np.diff(image, axis=axis))
    return float(step[np.take(deep, range(1, deep.shape[axis]), axis=axis)].mean())


def _normalised_noise(generated: synth.SyntheticCase) -> float:
    """Spread of the normalised image minus a smoothed copy, deep in the brain away from the tumour."""
    image = _normalised(generated)
    residual = image - ndimage.median_filter(image, size=3)
    deep = ndimage.binary_erosion(generated.brain, iterations=2) & (generated.label == 0)
    return float(residual[deep].std())


def test_styles_past_the_table_are_drawn_from_the_same_ranges():
    assert synth.scanner_style(7) == synth.scanner_style(7)
    assert synth.scanner_style(7) != synth.scanner_style(8)
    assert 0.5 <= synth.scanner_style(99).intensity_scale <= 2.5


def test_brats_size_is_240_by_240_by_155_at_one_millimetre():
    grid = synth.grid_for_size("brats")

    assert grid.shape == (240, 240, 155)
    assert np.allclose(grid.spacing, 1.0)


def test_small_size_is_48_cubed():
    assert synth.grid_for_size("small").shape == (48, 48, 48)


def test_progress_is_reported_per_case(tmp_path: Path):
    calls = []

    synth.write_synthetic_cases(tmp_path, 2, size=16, on_case=lambda i, total: calls.append((i, total)))

    assert calls == [(1, 2), (2, 2)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"cases": 0}, "cases must be"),
        ({"cases": 1, "style": -1}, "style must be"),
        ({"cases": 1, "size": "huge"}, "size must be"),
        ({"cases": 1, "size": 4}, "size must be"),
        ({"cases": 1, "seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named_before_writing(tmp_path: Path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synth.write_synthetic_cases(tmp_path / "out", **arguments)

    assert not (tmp_path / "out").exists()


def test_importing_the_generator_does_not_import_torch():
    code = "import sys, sitesagent.synth; assert 'torch' not in sys.modules, 'torch was imported'"

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
