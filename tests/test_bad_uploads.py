"""Bad uploads, through the HTTP API: each gets a 4xx naming the problem, nothing is stored, and
the round goes on (the other site uploads and the round aggregates to its new version).

Bytes that are no update at all (400) leave no trace: the agent may fix them and upload again.
An update that decodes but breaks the round's rules (422) is recorded as rejected with its
reason and hash, its epsilon is spent (its values left the site), and its bytes are not kept.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
from django.conf import settings
from django.utils import timezone
from safetensors.torch import save as save_safetensors

from coordinator import aggregation, services, storage
from coordinator.models import LedgerEntry, LedgerKind, Round, RoundState, Task, Update
from sitesagent import protocol
from sitesagent.updates import decode_update, encode_update

from .conftest import SVT_PARAMS
from .factories import svt_update

N_K = 2  # the factory's n_iterations


def _upload(client_for, token: str | None, task: Task, data: bytes):
    return client_for(token=token).generic(
        "PUT", f"/api/agent/tasks/{task.pk}/update/", data, content_type="application/octet-stream"
    )


def _task(round_: Round, site) -> Task:
    return Task.objects.get(round=round_, site=site)


def _stored_update_files() -> list[str]:
    folder = settings.STORAGE_DIR / "updates"
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _commits(round_: Round, site) -> int:
    return LedgerEntry.objects.filter(round=round_, membership__site=site, kind=LedgerKind.COMMIT).count()


def _completes(round_: Round) -> None:
    """With every task finished, the round aggregates into its new version (services, no worker)."""
    assert services.round_check_completion(round_id=round_.pk) == "aggregating"
    assert services.round_aggregate(round_id=round_.pk).startswith("version")
    round_.refresh_from_db()
    assert round_.state == RoundState.DONE


def _round_goes_on(client_for, round_: Round, sites, *, site_a_retries: bool) -> None:
    round_.refresh_from_db()
    assert round_.is_open, round_.state
    n = round_.base_version.n_parameters
    if site_a_retries:
        site, token = sites["A"]
        assert _upload(client_for, token, _task(round_, site), svt_update(n, SVT_PARAMS)).status_code == 200
    site, token = sites["B"]
    response = _upload(client_for, token, _task(round_, site), svt_update(n, SVT_PARAMS, seed=1))
    assert response.status_code == 200, response.content
    _completes(round_)


@pytest.fixture
def round_(alice, federation, sites) -> Round:
    return services.round_launch(federation=federation, launched_by=alice)


# --- files that are no update (400) -----------------------------------------------------------


def _metadata(n: int, **changes: str) -> dict[str, str]:
    return {
        "format": protocol.UPDATE_FORMAT,
        "n_parameters": str(n),
        "n_iterations": str(N_K),
        "n_cases": "3",
        "mechanism": "svt",
        "params": json.dumps(SVT_PARAMS),
        "encoding": "sparse",
        **changes,
    }


def _good_tensors(n: int) -> dict[str, torch.Tensor]:
    update = decode_update(svt_update(n, SVT_PARAMS))
    assert update.indices is not None and update.n_values >= 3
    return {"indices": update.indices.clone(), "values": update.values.clone()}


def _file(n: int, change=None, **metadata: str) -> bytes:
    """A file the safetensors library writes itself, so only the changed part is wrong."""
    tensors = _good_tensors(n)
    if change is not None:
        change(tensors)
    return save_safetensors(tensors, metadata=_metadata(n, **metadata))


def _flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= mask
    return bytes(flipped)


def _flip_first_index_sign(n: int) -> bytes:
    data = _file(n)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header["indices"]["data_offsets"][0]
    return _flip(data, start + 7, 0x80)  # the top byte of a little-endian int64


def _set(name: str, value):
    def change(tensors):
        tensors[name] = value(tensors[name])

    return change


def _repeat_first(indices: torch.Tensor) -> torch.Tensor:
    indices[1] = indices[0]
    return indices


MALFORMED = {
    "empty body": (lambda n: b"", "only 0 bytes long"),
    "truncated": (lambda n: svt_update(n, SVT_PARAMS)[:-7], "not a valid safetensors file"),
    "header byte flipped": (lambda n: _flip(svt_update(n, SVT_PARAMS), 8), "the header is not JSON"),
    "index bytes flipped": (_flip_first_index_sign, "is outside the model's"),
    "wrong tensor name": (
        lambda n: save_safetensors(
            {"indices": _good_tensors(n)["indices"], "weights": _good_tensors(n)["values"]},
            metadata=_metadata(n),
        ),
        "unknown tensor(s) 'weights'",
    ),
    "values 2-D": (lambda n: _file(n, _set("values", lambda v: v.reshape(-1, 1))), "expected a 1-D vector"),
    "values float64": (lambda n: _file(n, _set("values", lambda v: v.double())), "dtype F64, expected F32"),
    "indices int32": (lambda n: _file(n, _set("indices", lambda i: i.int())), "dtype I32, expected I64"),
    "lengths differ": (
        lambda n: _file(n, _set("values", lambda v: v[:-1].clone())),
        "entries but values has",
    ),
    "index out of range": (
        lambda n: _file(n, _set("indices", lambda i: torch.cat([i[:-1], torch.tensor([n])]))),
        "index {n} is outside the model's {n} parameters",
    ),
    "repeated index": (lambda n: _file(n, _set("indices", _repeat_first)), "sorted without repeats"),
    "zero iterations": (lambda n: _file(n, n_iterations="0"), "n_iterations must be at least 1"),
    "unknown mechanism": (lambda n: _file(n, mechanism="laplace"), "unknown mechanism 'laplace'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_file_that_is_no_update_is_refused_leaving_no_trace(client_for, round_, sites, case):
    make, words = MALFORMED[case]
    n = round_.base_version.n_parameters
    site, token = sites["A"]
    response = _upload(client_for, token, _task(round_, site), make(n))
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error.startswith("the upload is not a valid update") and words.format(n=n) in error, error
    assert not Update.objects.exists() and _stored_update_files() == []
    assert _commits(round_, site) == 0
    assert _task(round_, site).state == "assigned"
    _round_goes_on(client_for, round_, sites, site_a_retries=True)


# --- updates that break the round's rules (422) ------------------------------------------------


def _encoded(n: int, indices, values, **changes) -> bytes:
    arguments = dict(
        indices=indices,
        values=values,
        n_parameters=n,
        n_iterations=N_K,
        n_cases=3,
        mechanism="svt",
        params=SVT_PARAMS,
    )
    arguments.update(changes)
    return encode_update(**arguments)


def _with_value(value: float):
    def make(n: int) -> bytes:
        tensors = _good_tensors(n)
        tensors["values"][0] = value
        return _encoded(n, tensors["indices"], tensors["values"])

    return make


def _beyond_the_bound(n: int) -> bytes:
    bound = aggregation.value_bound("svt", SVT_PARAMS, n, N_K)
    return _with_value(-2 * bound)(n)


def _more_than_c(n: int) -> bytes:
    c = protocol.selection_count(SVT_PARAMS["fraction"], n)
    return _encoded(n, torch.arange(c + 1), torch.zeros(c + 1))


def _wrong_model_size(n: int) -> bytes:
    tensors = _good_tensors(n)
    return _encoded(n, tensors["indices"], tensors["values"], n_parameters=n + 1)


RULE_BREAKING = {
    "NaN value": (_with_value(float("nan")), "value 0 is nan; every value must be finite"),
    "infinite value": (_with_value(float("inf")), "value 0 is inf; every value must be finite"),
    "minus infinity": (_with_value(float("-inf")), "value 0 is -inf; every value must be finite"),
    "beyond the SVT bound": (
        _beyond_the_bound,
        "beyond the svt bound N_k * (gamma + 50 release-noise scales)",
    ),
    "more than c values": (_more_than_c, "but the round allows at most"),
    "another model's size": (_wrong_model_size, "the update is for {n1} parameters but the model has {n}"),
    "another mechanism": (
        lambda n: _encoded(n, [0], [0.0], mechanism="partial", params={"fraction": 0.1, "gamma": 0.01}),
        "made with mechanism 'partial' but the round uses 'svt'",
    ),
    "dense under SVT": (
        lambda n: _encoded(n, None, torch.zeros(n)),
        "mechanism svt shares a subset: the update must be sparse",
    ),
    "another epsilon": (
        lambda n: svt_update(n, {**SVT_PARAMS, "eps_release": 5.0}),
        "applied eps_release=5.0 but the round set eps_release=0.5",
    ),
}


@pytest.mark.parametrize("case", sorted(RULE_BREAKING))
def test_an_update_breaking_the_rounds_rules_is_rejected_by_name_and_its_bytes_not_kept(
    client_for, round_, sites, case
):
    make, words = RULE_BREAKING[case]
    n = round_.base_version.n_parameters
    site, token = sites["A"]
    data = make(n)
    response = _upload(client_for, token, _task(round_, site), data)
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error.startswith("the update was rejected") and words.format(n=n, n1=n + 1) in error, error
    update = Update.objects.get()
    assert (update.status, update.path, update.sha256) == ("rejected", "", storage.sha256_of(data))
    assert words.format(n=n, n1=n + 1) in update.rejection_reason
    assert _stored_update_files() == []
    # Its values left the site: the epsilon is spent, once, and the site is out of this round.
    assert _commits(round_, site) == 1
    assert _task(round_, site).state == "dropped"
    again = _upload(client_for, token, _task(round_, site), data)
    assert again.status_code == 422 and _commits(round_, site) == 1 and _stored_update_files() == []
    _round_goes_on(client_for, round_, sites, site_a_retries=False)
    assert _stored_update_files() == [str(storage.path_of(Update.objects.get(status="accepted").path))]


# --- the wrong sender (401, 403) --------------------------------------------------------------


def _token(case: str, sites, alice, client_for) -> str | None:
    if case == "missing token":
        return None
    if case == "unknown token":
        return "site_not-a-real-token"
    if case == "revoked token":
        site, token = sites["A"]
        services.site_token_revoke(site=site, revoked_by=alice, reason="laptop stolen")
        return token
    if case == "a person's token":
        return services.personal_token_create(user=alice, name="script")
    return sites["B"][1]  # another site's token


WRONG_SENDER = {
    "missing token": (401, "credentials were not provided"),
    "unknown token": (401, "unknown or revoked site token"),
    "revoked token": (401, "unknown or revoked site token"),
    "a person's token": (403, "this endpoint is for site agents"),
    "another site's token": (404, "Not found"),  # another site's task is as if missing
}


@pytest.mark.parametrize("case", sorted(WRONG_SENDER))
def test_an_upload_from_the_wrong_sender_is_refused(client_for, alice, round_, sites, case):
    status, words = WRONG_SENDER[case]
    n = round_.base_version.n_parameters
    task = _task(round_, sites["A"][0])
    response = _upload(client_for, _token(case, sites, alice, client_for), task, svt_update(n, SVT_PARAMS))
    assert response.status_code == status, response.content
    assert words in response.json()["error"]
    assert not Update.objects.exists() and _stored_update_files() == []
    assert not LedgerEntry.objects.filter(kind=LedgerKind.COMMIT).exists()
    if case == "revoked token":
        sites["A"] = (sites["A"][0], services.site_token_rotate(site=sites["A"][0], rotated_by=alice))
    _round_goes_on(client_for, round_, sites, site_a_retries=True)


# --- a task that no longer takes an update (409) -----------------------------------------------


def _close(how: str, round_: Round, client_for, sites, alice) -> None:
    if how == "aborted":
        services.round_abort(round_=round_, aborted_by=alice, reason="wrong settings")
    elif how == "failed":
        services.rounds_enforce_deadlines(now=timezone.now() + timedelta(days=1))
    else:  # done: B uploaded, A missed the deadline, the round aggregated without A
        site, token = sites["B"]
        n = round_.base_version.n_parameters
        assert (
            _upload(client_for, token, _task(round_, site), svt_update(n, SVT_PARAMS, seed=1)).status_code
            == 200
        )
        services.rounds_enforce_deadlines(now=timezone.now() + timedelta(days=1))
        services.round_aggregate(round_id=round_.pk)
    round_.refresh_from_db()
    assert round_.state == how


@pytest.mark.parametrize("how", ["aborted", "failed", "done"])
def test_an_upload_for_a_closed_or_old_rounds_task_is_refused(
    client_for, alice, federation, round_, sites, how
):
    _close(how, round_, client_for, sites, alice)
    newer = services.round_launch(federation=federation, launched_by=alice)
    files = _stored_update_files()
    site, token = sites["A"]
    commits = _commits(round_, site)
    response = _upload(
        client_for, token, _task(round_, site), svt_update(round_.base_version.n_parameters, SVT_PARAMS)
    )
    assert response.status_code == 409, response.content
    assert f"no longer takes an update (task dropped, round {how})" in response.json()["error"]
    assert "its epsilon is committed all the same" in response.json()["error"]
    assert not Update.objects.filter(task__round=round_, task__site=site).exists()
    # Nothing stored, but the values left the site: its spend is committed, once.
    assert _stored_update_files() == files and _commits(round_, site) == 1
    assert (
        _upload(
            client_for,
            token,
            _task(round_, site),
            svt_update(round_.base_version.n_parameters, SVT_PARAMS, seed=3),
        ).status_code
        == 409
    )
    assert _commits(round_, site) == 1 >= commits
    # The newer round is untouched: both sites upload and it completes.
    n = newer.base_version.n_parameters
    for label, seed in (("A", 2), ("B", 3)):
        site, token = sites[label]
        assert (
            _upload(client_for, token, _task(newer, site), svt_update(n, SVT_PARAMS, seed=seed)).status_code
            == 200
        )
    _completes(newer)


def test_a_second_different_update_is_refused_and_the_first_is_kept(client_for, round_, sites):
    site, token = sites["A"]
    n = round_.base_version.n_parameters
    first = svt_update(n, SVT_PARAMS, seed=1)
    assert _upload(client_for, token, _task(round_, site), first).status_code == 200
    files = _stored_update_files()
    again = _upload(client_for, token, _task(round_, site), svt_update(n, SVT_PARAMS, seed=2))
    assert again.status_code == 409
    assert "already has a different update; an update is uploaded once" in again.json()["error"]
    assert Update.objects.get(task__site=site).sha256 == storage.sha256_of(first)
    assert _stored_update_files() == files and len(files) == 1 and _commits(round_, site) == 1
    _round_goes_on(client_for, round_, sites, site_a_retries=False)
