"""The paper's comparison: every configuration runs on the same split, and the report says what ran."""

import pytest

from coordinator import experiment
from sitesagent.model import preset
from sitesagent.synth import write_synthetic_cases


@pytest.mark.parametrize(
    ("case", "site"),
    [
        ("Brats18_2013_10_1", "2013"),
        ("Brats18_CBICA_AAB_1", "CBICA"),
        ("Brats18_TCIA01_131_1", "TCIA01"),
        ("Brats18_TMC_06290_1", "TMC"),
    ],
)
def test_brats_cases_are_grouped_by_the_institution_in_their_name(case, site):
    assert experiment.BRATS_INSTITUTION.match(case).group("institution") == site


@pytest.mark.slow
def test_each_configuration_trains_on_the_same_split_and_lands_in_the_report(tmp_path):
    folders = []
    for index in range(2):
        folder = tmp_path / f"site-{index}"
        write_synthetic_cases(folder, 3, seed=index, style=index, size=32)
        folders.append(folder)
    study = experiment.Study(
        sites=experiment.sites_from_folders(folders, seed=0),
        model=preset("tiny"),
        rounds=2,
        iterations=2,
        roi_size=16,
        lr=1e-3,
        device="cpu",
        seed=0,
    )
    plan = experiment.DpSgdPlan(epsilons=[8.0], sample_rate=0.5, clip=1.0, delta=1e-5, rounds=2, steps=2)
    settings = experiment.default_settings(
        27_559, fractions=[0.1], epsilons=[1000.0], svt_fraction=0.1, gamma=1e-3, dpsgd=plan
    )
    assert [s.mechanism for s in settings] == ["centralised", "none", "partial", "svt", "dpsgd"]
    assert settings[3].epsilon_per_round == pytest.approx(1000.0)
    assert 7.99 <= settings[4].epsilon_spent(2) <= 8
    outcomes = [experiment.run(study, setting, on_progress=lambda line: None) for setting in settings]
    for outcome in outcomes:
        assert len(outcome.per_round) == 2 and set(outcome.per_site) == {"site-0", "site-1"}
        assert all(0 <= round_["dice_mean"] <= 1 for round_ in outcome.per_round)
    table = experiment.markdown_table(outcomes, rounds=2)
    assert "| SVT eps=1000 | 1000 | 2000 | 0 |" in table and "| centralised | n/a (data pooled)" in table
    assert "| DP-SGD eps=8 over the run" in table and "| 1e-05 |" in table
    html = experiment.html_report(outcomes, study, "python manage.py experiment")
    assert "plotly" in html and "SVT eps=1000" in html


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_dpsgd_noise_is_calibrated_to_the_run_s_epsilon_by_the_accountant(target):
    from sitesagent import accountant

    sigma = experiment.calibrated_noise(target, sample_rate=0.5, steps=8, rounds=5, delta=1e-5)

    def spent(noise):
        event = {"kind": "poisson_gaussian", "sample_rate": 0.5, "noise_multiplier": noise, "steps": 8}
        return accountant.composed_epsilon([event] * 5, 1e-5)

    assert spent(sigma) <= target < spent(sigma * 0.99)  # the smallest noise that fits, to 1%
