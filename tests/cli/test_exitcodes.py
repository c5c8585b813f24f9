"""Exit codes: one meaning each, listed once (agent/cli/exitcodes.py), in --help and docs/reference.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli.exitcodes import MEANING, Exit
from agent.cli.main import build_parser, main
from agent.durable.store import Store
from devtools.procs import HOST, free_port

README = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_every_code_has_one_meaning() -> None:
    values = [int(v) for v in Exit.__members__.values()]  # aliases (a reused number) included
    assert len(values) == len(set(values)), f"an exit code is used twice: {sorted(values)}"
    assert set(MEANING) == set(Exit)


def test_help_and_the_reference_list_exactly_the_codes() -> None:
    epilog = build_parser().epilog or ""
    assert [int(m) for m in re.findall(r"^\s+(\d+)  ", epilog, re.M)] == [int(c) for c in Exit]
    text = README.read_text()
    section = text[text.index("## Exit codes") :]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section.split("\n\n", 3)[2], re.M)
    assert {int(code): meaning for code, meaning in rows} == {int(c): MEANING[c] for c in Exit}, (
        "docs/reference.md's exit code table differs from agent/cli/exitcodes.py"
    )


def test_status_of_an_agent_that_does_not_answer_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://{HOST}:{free_port()}"  # nothing listens there
    assert main(["status", "--url", url, "--timeout-s", "2"]) == Exit.UNREACHABLE
    assert f"edge-agent at {url} is unreachable" in capsys.readouterr().err


def test_deadletter_show_of_an_unknown_seq_is_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buffer = tmp_path / "buffer.sqlite3"
    store, _ = Store.open(buffer)
    store.close()
    config = tmp_path / "agent.toml"
    config.write_text(f'gateway_id = "gw-exit"\n[buffer]\npath = "{buffer}"\n')
    assert main(["deadletter", "show", "7", "--config", str(config)]) == Exit.NOT_FOUND
    assert main(["deadletter", "retry", "7", "--config", str(config)]) == Exit.NOT_FOUND
    assert "no dead letter with seq 7" in capsys.readouterr().err
