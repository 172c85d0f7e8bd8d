"""The dashboard's forms: they check what people typed and hand services plain values."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

from django import forms

from coordinator.models import Federation, LedgerKind, Mechanism
from sitesagent import protocol

EPSILON: dict[str, Any] = {"max_digits": 24, "decimal_places": 12, "min_value": Decimal(0)}
MECHANISM_FIELDS = (
    "fraction",
    "gamma",
    "tau",
    "eps_threshold",
    "eps_query",
    "eps_release",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "crops_per_case",
)
MECHANISM_HELP = {
    "noise_multiplier": "σ: Gaussian noise σ·C on each step's summed case gradients",
    "max_grad_norm": "C: each case's gradient is clipped to this L2 norm",
    "sample_rate": "q: each case is in a step's batch with this probability (expected batch q·N)",
    "steps": "noisy optimiser steps each site takes this round",
    "crops_per_case": "random crops of each sampled case, together one record",
    "fraction": "Q: the share of coordinates a site may release",
    "gamma": "clip bound on each per-step delta value",
    "tau": "SVT threshold on |clipped delta|",
    "eps_threshold": "ε spent on the noisy threshold",
    "eps_query": "ε spent on selecting coordinates",
    "eps_release": "ε spent on the released values",
}


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=1000, widget=forms.TextInput(attrs={"placeholder": "why (audited)"}))


class SiteRegisterForm(forms.Form):
    name = forms.CharField(max_length=120, label="Site name")
    federation = forms.ModelChoiceField(
        queryset=Federation.objects.none(), required=False, empty_label="(none for now)"
    )
    budget = forms.DecimalField(
        **EPSILON, required=False, label="Privacy budget (ε)", help_text="total ε over all rounds"
    )
    allows_unprotected_sharing = forms.BooleanField(required=False, label="Allows unprotected sharing")
    reason = forms.CharField(max_length=1000, required=False, initial="joined the federation")

    def __init__(self, *args: Any, federations=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cast(forms.ModelChoiceField, self.fields["federation"]).queryset = (
            federations if federations is not None else Federation.objects.none()
        )

    def clean(self):
        data = super().clean() or {}
        if data.get("federation") is not None:
            if data.get("budget") is None:
                self.add_error("budget", "A site joining a federation needs a budget.")
            if not (data.get("reason") or "").strip():
                self.add_error("reason", "A reason is required: it goes into the audit log.")
        return data


class MembershipAddForm(forms.Form):
    federation = forms.ModelChoiceField(queryset=Federation.objects.none())
    budget = forms.DecimalField(**EPSILON, label="Privacy budget (ε)")
    allows_unprotected_sharing = forms.BooleanField(required=False, label="Allows unprotected sharing")
    reason = forms.CharField(max_length=1000, initial="joined the federation")

    def __init__(self, *args: Any, federations=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cast(forms.ModelChoiceField, self.fields["federation"]).queryset = (
            federations if federations is not None else Federation.objects.none()
        )


class BudgetForm(forms.Form):
    membership = forms.IntegerField(widget=forms.HiddenInput)
    budget = forms.DecimalField(**EPSILON, label="New budget (ε)")
    reason = forms.CharField(max_length=1000, widget=forms.TextInput(attrs={"placeholder": "why (audited)"}))
    allows_unprotected_sharing = forms.BooleanField(required=False, label="Allows unprotected sharing")


class LaunchForm(forms.Form):
    sites = forms.TypedMultipleChoiceField(coerce=int, widget=forms.CheckboxSelectMultiple)
    mechanism = forms.ChoiceField(choices=Mechanism.choices)
    fraction = forms.FloatField(required=False, min_value=0)
    gamma = forms.FloatField(required=False, min_value=0)
    tau = forms.FloatField(required=False)
    eps_threshold = forms.FloatField(required=False, min_value=0, label="ε threshold")
    eps_query = forms.FloatField(required=False, min_value=0, label="ε query")
    eps_release = forms.FloatField(required=False, min_value=0, label="ε release")
    noise_multiplier = forms.FloatField(required=False, min_value=0, label="Noise multiplier σ")
    max_grad_norm = forms.FloatField(required=False, min_value=0, label="Clip norm C")
    sample_rate = forms.FloatField(required=False, min_value=0, max_value=1, label="Sample rate q")
    steps = forms.IntegerField(required=False, min_value=1, max_value=protocol.MAX_WHOLE, label="Steps")
    crops_per_case = forms.IntegerField(required=False, min_value=1, max_value=64, label="Crops per case")
    local_epochs = forms.IntegerField(min_value=0, initial=1)
    max_iterations = forms.IntegerField(
        min_value=0, initial=0, help_text="0: no limit, the local epochs decide"
    )
    deadline_minutes = forms.IntegerField(min_value=1, initial=60, label="Deadline (minutes)")
    min_sites = forms.IntegerField(min_value=1, initial=1, label="Minimum sites")
    rounds = forms.IntegerField(
        min_value=1,
        max_value=1000,
        initial=1,
        label="Rounds back to back",
        help_text="each next round starts as soon as the one before is done",
    )
    confirm_noise = forms.BooleanField(
        required=False,
        label="Launch even if the updates would be mostly noise",
        help_text="the preview says when; without this, such a launch is refused",
    )

    def __init__(self, *args: Any, site_choices: list[tuple[int, str]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        cast(forms.ChoiceField, self.fields["sites"]).choices = site_choices
        for name in MECHANISM_FIELDS:
            self.fields[name].help_text = MECHANISM_HELP[name]
            self.fields[name].widget.attrs.update(step="any", **{"data-param": name})

    @staticmethod
    def initial_for(federation: Federation, site_ids: list[int]) -> dict[str, Any]:
        training = federation.training_defaults or {}
        return {
            "sites": site_ids,
            "mechanism": federation.default_mechanism,
            **(federation.default_mechanism_params or {}),
            "local_epochs": training.get("local_epochs", 1),
            "max_iterations": training.get("max_iterations", 0),
            "deadline_minutes": max(1, round(federation.round_deadline_seconds / 60)),
            "min_sites": federation.min_sites,
            "rounds": 1,
        }

    def clean(self):
        data = super().clean() or {}
        mechanism = data.get("mechanism") or ""
        for name in protocol.MECHANISM_PARAMS.get(mechanism, ()):
            if data.get(name) is None and name not in self.errors:
                self.add_error(name, f"{mechanism} needs {name}.")
        return data

    def launch_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of services.round_launch (and of privacy_preview.preview)."""
        data = self.cleaned_data
        mechanism = data["mechanism"]
        return {
            "site_ids": data["sites"],
            "mechanism": mechanism,
            "mechanism_params": {name: data[name] for name in protocol.MECHANISM_PARAMS[mechanism]},
            "training_params": {
                "local_epochs": data["local_epochs"],
                "max_iterations": data["max_iterations"],
            },
            "deadline_seconds": data["deadline_minutes"] * 60,
            "min_sites": data["min_sites"],
        }

    def preview_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of privacy_preview.preview and check_noise."""
        kwargs = self.launch_kwargs()
        return {
            "sites": kwargs["site_ids"],
            "mechanism": kwargs["mechanism"],
            "mechanism_params": kwargs["mechanism_params"],
            "rounds": self.cleaned_data["rounds"],
        }


class LedgerFilterForm(forms.Form):
    site = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)
    round = forms.IntegerField(required=False, min_value=1)
    kind = forms.ChoiceField(choices=[("", "any kind"), *LedgerKind.choices], required=False)

    def __init__(self, *args: Any, site_choices: list[tuple[int, str]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        cast(forms.ChoiceField, self.fields["site"]).choices = [("", "all sites"), *site_choices]

    def filters(self) -> dict[str, Any]:
        if not self.is_valid():
            return {}
        data = self.cleaned_data
        return {
            "site_id": data.get("site"),
            "round_number": data.get("round"),
            "kind": data.get("kind") or None,
        }
