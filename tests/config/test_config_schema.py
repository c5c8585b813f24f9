"""The config's JSON Schema (`edge-agent check-config --schema`, shipped in the .deb as
/usr/share/edge-agent/config.schema.json): generated from the model, so an editor (taplo, Even
Better TOML) completes and checks a config file with the keys, bounds, enums, defaults and
descriptions that `check-config` applies. Held here to the model and to config.example.toml."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from agent.cli.main import main
from agent.config.settings import Settings, json_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


def validator() -> jsonschema.Draft7Validator:
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(doc)
    ]


def test_the_example_config_validates_against_the_schema() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    assert schema_errors(doc) == []


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('gateway_id = "gw"\n[mqtt]\nport = 70000\n', "mqtt.port"),
        ('gateway_id = "gw"\n[mqtt]\nhots = "x"\n', "mqtt"),
        ('gateway_id = "gw"\n[buffer]\nsynchronous = "fast"\n', "buffer.synchronous"),
        ('gateway_id = "gw"\n[buffer]\nmax_bytes = "12 furlongs"\n', "buffer.max_bytes"),
        ('gateway_id = "gw"\n[buffer]\nmax_bytes = 1024\n', "buffer.max_bytes"),
        ('gateway_id = "gw"\nstreams = []\n', "streams"),
        ('gateway_id = "gw"\n[[streams]]\ntopic = "a/{camera}"\nname = "a b"\n', "streams.0.name"),
        ('gateway_id = "gw id"\n', "gateway_id"),
        ("[mqtt]\nport = 1884\n", ""),  # gateway_id is required
    ],
)
def test_the_schema_refuses_what_check_config_refuses(toml: str, where: str) -> None:
    errors = schema_errors(tomllib.loads(toml))
    assert errors, f"the schema took {toml!r}"
    assert any(e.startswith(f"{where}:") for e in errors), errors


@pytest.mark.parametrize("size", ['"64KiB"', '"1 GiB"', '"10MB"', '" 2gb "', "1048576", '"1.5MiB"'])
def test_the_schema_takes_the_sizes_check_config_takes(size: str) -> None:
    assert schema_errors(tomllib.loads(f'gateway_id = "gw"\n[buffer]\nmax_bytes = {size}\n')) == []


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: a section, or the item of `streams`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every key of the config, dotted, with its default as JSON (None if required)."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is not None:
            keys.update(_model_keys(sub, f"{prefix}{name}."))
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        keys[prefix + name] = json.loads(json.dumps(default, default=str))
    return keys


def _schema_keys(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for name, prop in node["properties"].items():
        target = prop.get("items", prop)
        ref = target.get("$ref")
        if ref is not None:
            keys.update(
                _schema_keys(
                    schema, schema["definitions"][ref.rsplit("/", 1)[1]], f"{prefix}{name}."
                )
            )
            continue
        keys[prefix + name] = prop.get("default")
    return keys


def test_the_schema_and_the_model_agree_on_every_key_and_default() -> None:
    schema = json_schema()
    assert _schema_keys(schema, schema) == _model_keys(Settings)
    assert len(_model_keys(Settings)) == 72


def _literal_keys(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is not None:
            out.update(_literal_keys(sub, f"{prefix}{name}."))
        elif typing.get_origin(field.annotation) is typing.Literal:
            out[prefix + name] = list(typing.get_args(field.annotation))
    return out


def test_every_enum_in_the_schema_lists_the_models_values() -> None:
    schema = json_schema()
    enums = _literal_keys(Settings)
    assert len(enums) == 9
    for key, values in enums.items():
        section, name = key.rsplit(".", 1)
        title = {"streams": "StreamSettings"}.get(section, f"{section.title()}Settings")
        assert schema["definitions"][title]["properties"][name]["enum"] == values, key


_KEY_LINE = re.compile(r"^(?:# )?([a-z_]+) = ")


def example_comments(text: str) -> dict[str, str]:
    """Per key of config.example.toml (also the commented-out ones), the comment block above
    it; consecutive keys share the block above the first of them."""
    lines = text.splitlines()
    out: dict[str, str] = {}
    section = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]") + "."
            continue
        m = _KEY_LINE.match(line)
        if m is None:
            continue
        j = i - 1
        while j >= 0 and _KEY_LINE.match(lines[j]):
            j -= 1
        block: list[str] = []
        while j >= 0 and lines[j].startswith("#") and not _KEY_LINE.match(lines[j]):
            block.insert(0, lines[j][1:].strip())
            j -= 1
        out[section + m.group(1)] = " ".join(block)
    return out


def _descriptions(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for name, prop in node["properties"].items():
        ref = prop.get("items", prop).get("$ref")
        if ref is not None:
            out.update(
                _descriptions(
                    schema, schema["definitions"][ref.rsplit("/", 1)[1]], f"{prefix}{name}."
                )
            )
        else:
            out[prefix + name] = prop.get("description", "")
    return out


def test_every_key_is_described_by_the_text_of_config_example_toml() -> None:
    """One text: the schema's description of a key is the example's comment above it."""
    schema = json_schema()
    assert _descriptions(schema, schema) == example_comments(EXAMPLE.read_text())


def test_check_config_schema_prints_the_schema_without_a_config() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check-config", "--schema"]) == 0
    assert json.loads(out.getvalue()) == json_schema()


def test_check_config_without_config_or_schema_names_the_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No --config: $EDGE_AGENT_CONFIG, else the unit's config, here not installed.
    import agent.config.settings as settings

    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    monkeypatch.setattr(settings, "UNIT_CONFIG", tmp_path / "config.toml")
    assert main(["check-config"]) == 2
    assert capsys.readouterr().err == (
        f"config error: config file '{tmp_path}/config.toml' not found (the default; give "
        "--config FILE or set EDGE_AGENT_CONFIG)\n"
    )


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('gateway_id = "gw"\n[mqtt]\nhost = ""\n', "mqtt.host"),
        ('gateway_id = "gw"\n[health]\nlisten = "127.0.0.1"\n', "health.listen"),
        ('gateway_id = "gw"\n[health]\nlisten = "127.0.0.1:0"\n', "health.listen"),
        ('gateway_id = "gw"\n[health]\nlisten = "127.0.0.1:65536"\n', "health.listen"),
        ('gateway_id = "gw"\n[health]\nlisten = ":9108"\n', "health.listen"),
        ('gateway_id = "gw"\n[[streams]]\ntopic = "a/x{camera}"\nname = "a"\n', "streams.0.topic"),
        ('gateway_id = "gw"\n[[streams]]\ntopic = "a/+/b"\nname = "a"\n', "streams.0.topic"),
        (
            'gateway_id = "gw"\n[[streams]]\ntopic = "a/{camera}/{stream}"\n'
            'numeric = ["conf", "conf"]\n',
            "streams.0.numeric",
        ),
        (
            'gateway_id = "gw"\n[[streams]]\ntopic = "a/{camera}/{stream}"\n'
            'categorical = ["cls", "cls"]\n',
            "streams.0.categorical",
        ),
    ],
)
def test_the_schema_refuses_more_of_what_check_config_refuses(toml: str, where: str) -> None:
    errors = schema_errors(tomllib.loads(toml))
    assert any(e.startswith(f"{where}:") for e in errors), errors


@pytest.mark.parametrize(
    "toml",
    [
        '[health]\nlisten = "[::1]:9108"\n',
        '[health]\nlisten = "::1:9108"\n',
        '[health]\nlisten = "localhost:09108"\n',
        '[health]\nlisten = "127.0.0.1:65535"\n',
        '[mqtt]\nhost = "::1"\n',
        '[[streams]]\ntopic = "{camera}"\nname = "a"\n',
        '[[streams]]\ntopic = "site/cam/{camera}/{stream}"\nnumeric = ["a", "b"]\n',
    ],
)
def test_the_schema_takes_what_check_config_takes(toml: str) -> None:
    assert schema_errors(tomllib.loads(f'gateway_id = "gw"\n{toml}')) == []
