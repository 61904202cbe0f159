"""config.load: one clear line per invalid setting, flags over environment, to_env round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdworker import Config
from qdworker import _config as config
from qdworker.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORKER_COUNT": "nope"}, "WORKER_COUNT='nope' is invalid: expected an integer >= 0"),
        ({"WORKER_COUNT": "-1"}, "WORKER_COUNT='-1' is invalid"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' is invalid: expected one of trace, debug"),
        ({"QDWORKER_SHUTDOWN_TIMEOUT": "0"}, "QDWORKER_SHUTDOWN_TIMEOUT='0' is invalid"),
        ({"QDWORKER_WS_PORT": "70000"}, "QDWORKER_WS_PORT='70000' is invalid: expected a TCP port"),
        ({"QDWORKER_WS": "maybe"}, "QDWORKER_WS='maybe' is invalid: expected true/false"),
        ({"QDWORKER_TIMEZONE": "Mars/Base"}, "QDWORKER_TIMEZONE='Mars/Base' is invalid"),
        ({"QDWORKER_LOG_FORMAT": "xml"}, "QDWORKER_LOG_FORMAT='xml' is invalid: expected text"),
    ],
)
def test_invalid_value_names_the_variable_in_one_line(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(env)
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_flag_overrides_environment_and_is_named_in_errors() -> None:
    loaded = config.load({"WORKER_COUNT": "3"}, {"worker_count": "5"})
    assert loaded.worker_count == 5
    with pytest.raises(ConfigError, match=r"^--worker-count='x' is invalid"):
        config.load({"WORKER_COUNT": "3"}, {"worker_count": "x"})


def test_defaults_and_parsing() -> None:
    loaded = config.load({})
    assert loaded == config.Config()
    loaded = config.load({
        "WORKER_COUNT": "cpus", "LOG_LEVEL": "WARNING", "QDWORKER_JOBS": "a.b, c ,",
        "QDWORKER_WS": "off", "QDWORKER_DATA_DIR": "/var/tmp/qd",
    })  # fmt: skip
    assert loaded.worker_count >= 1
    assert loaded.log_level == "warn"
    assert loaded.jobs == ("a.b", "c")
    assert loaded.ws_enabled is False
    assert loaded.data_dir == Path("/var/tmp/qd")


def test_to_env_round_trips() -> None:
    original = config.load({
        "DATABASE_URL": "postgresql://u:secret@h/db", "WORKER_COUNT": "4",
        "QDWORKER_JOBS": "x,y", "QDWORKER_MIGRATE": "false", "QDWORKER_LEASE_SECONDS": "12.5",
        "QDWORKER_WS_SECRET": "s3",
    })  # fmt: skip
    assert config.load(original.to_env()) == original


def test_repr_hides_the_websocket_secret() -> None:
    assert "s3cret" not in repr(config.load({"QDWORKER_WS_SECRET": "s3cret"}))


def test_every_setting_has_a_unique_env_name_and_flag() -> None:
    envs = [s.env for s in config.SETTINGS]
    flags = [s.flag for s in config.SETTINGS]
    assert len(set(envs)) == len(envs) and len(set(flags)) == len(flags)
    assert {s.field for s in config.SETTINGS} == set(config.Config.__dataclass_fields__)


def test_config_from_env_reads_like_the_command_line() -> None:
    assert Config.from_env({"WORKER_COUNT": "3"}).worker_count == 3
    with pytest.raises(ConfigError, match="WORKER_COUNT"):
        Config.from_env({"WORKER_COUNT": "many"})
