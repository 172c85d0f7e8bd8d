"""The Content-Security-Policy header, and nothing received is ever unpickled: Celery takes JSON
only, the cache reads JSON only, and no code loads pickles (tests/test_browser.py shows the pages
work under the policy; tests/test_settings.py covers HSTS and cookies in production)."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
from django.core.cache import cache
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent


def _directives(policy: str) -> dict[str, list[str]]:
    parts = [directive.split() for directive in policy.split(";") if directive.strip()]
    return {name: values for name, *values in parts}


@pytest.mark.parametrize("path", ["/login/", "/healthz", "/api/schema/", "/sites/", "/api/federations/"])
def test_every_response_carries_the_content_security_policy(db, path):
    response = Client().get(path)
    directives = _directives(response["Content-Security-Policy"])
    assert directives == {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "style-src-attr": ["'unsafe-hashes'", "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"],
        "img-src": ["'self'", "data:", "blob:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }


# --- Nothing received is unpickled --------------------------------------------------------------


def test_celery_sends_and_accepts_json_only():
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import dumps, loads, prepare_accept_content

    from coordinator.celery import app

    assert app.conf.task_serializer == app.conf.result_serializer == "json"
    assert app.conf.accept_content == app.conf.result_accept_content == ["json"]
    accept = prepare_accept_content(app.conf.accept_content)  # as the worker does
    content_type, encoding, body = dumps({"args": [1]}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=accept)
    content_type, encoding, body = dumps({"args": [1]}, serializer="json")
    assert loads(body, content_type, encoding, accept=accept) == {"args": [1]}


UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("ran")
    return "ran"


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_the_cache_never_unpickles_what_it_reads_from_redis(db):
    import redis
    from django.conf import settings

    assert pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled())) == "ran"  # the payload works
    UNPICKLED.clear()
    cache.set("a-number", 7)
    cache.set("a-record", {"until": 1.5})
    assert (cache.get("a-number"), cache.get("a-record")) == (7, {"until": 1.5})
    server = redis.Redis.from_url(settings.REDIS_URL)
    server.set(cache.make_key("planted"), pickle.dumps(_RunsCodeWhenUnpickled()))
    with pytest.raises(ValueError):
        cache.get("planted")
    assert UNPICKLED == []


# What loads a pickle: these calls on these modules, torch.load unless weights_only=True, and
# numpy.load with allow_pickle=True.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}


def pickle_loads_in(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` loads a pickle, as "file:line what", in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            found += [(node.lineno, f"from {node.module} import {alias.name}") for alias in node.names]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        keywords = {k.arg: k.value for k in node.keywords}
        constant = {k: v.value for k, v in keywords.items() if isinstance(v, ast.Constant)}
        unpickles = owner in PICKLE_MODULES and node.func.attr in PICKLE_CALLS
        torch_unpickles = name == "torch.load" and constant.get("weights_only") is not True
        numpy_unpickles = name in ("np.load", "numpy.load") and "allow_pickle" in keywords
        if unpickles or torch_unpickles or (numpy_unpickles and constant.get("allow_pickle") is not False):
            found.append((node.lineno, name))
    return [f"{filename}:{line} {what}" for line, what in sorted(found)]


def test_the_pickle_scan_finds_every_way_of_loading_one():
    source = "\n".join(
        [
            "import pickle, torch, numpy as np",
            "pickle.loads(data)",
            "pickle.load(stream)",
            "pickle.Unpickler(stream).load()",
            "from pickle import loads",
            "torch.load(path)",
            "torch.load(path, weights_only=False)",
            "np.load(path, allow_pickle=True)",
            "torch.load(path, weights_only=True)",
            "np.load(path)",
            "json.loads(data)",
        ]
    )
    assert [line.split(" ", 1)[0] for line in pickle_loads_in(source)] == [
        "<source>:2",
        "<source>:3",
        "<source>:4",
        "<source>:5",
        "<source>:6",
        "<source>:7",
        "<source>:8",
    ]


def test_no_code_loads_a_pickle():
    files = sorted((ROOT / "coordinator").rglob("*.py")) + sorted((ROOT / "sitesagent").rglob("*.py"))
    assert len(files) > 30
    found = [hit for path in files for hit in pickle_loads_in(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


# --- Nothing a site sends becomes part of a selector -----------------------------------------------


SELECTOR_CALL = re.compile(r"(querySelector(?:All)?|closest|matches)\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def selectors_built_from_data(source: str) -> list[str]:
    """Selector calls whose argument is assembled (a template with ${...}, or + concatenation)."""
    return [
        f"{name}({argument})"
        for name, argument in SELECTOR_CALL.findall(source)
        if "${" in argument or "+" in argument
    ]


def test_the_selector_scan_finds_a_selector_built_from_data():
    source = 'document.querySelector(`[data-latest="${name}"]`); row.querySelector("td" + x); a.closest(".x")'
    assert selectors_built_from_data(source) == [
        'querySelector(`[data-latest="${name}"]`)',
        'querySelector("td" + x)',
    ]


def test_no_script_builds_a_selector_from_data():
    """round.js once built `[data-latest="${name}"]` from a metric name a site chose: a metric named
    `x"],body,[x="` selected <body> on every viewer's page. Pages now compare data attributes."""
    scripts = [p for p in sorted((ROOT / "static" / "js").glob("*.js")) if p.name != "plotly.min.js"]
    assert len(scripts) >= 6
    found = {p.name: selectors_built_from_data(p.read_text()) for p in scripts}
    assert {name: hits for name, hits in found.items() if hits} == {}
