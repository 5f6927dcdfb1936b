"""Settings from the environment: a number an operator mistyped is refused at start with the
setting's name and what it must be, and `make up` / `make up-cluster` stop there, before they
start anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config import SettingError, load_settings
from worker_fixtures import PROJECT_ROOT


@pytest.mark.parametrize("name, given, says", [
    ("WEB_PORT", "80a", "a whole number from 1 to 65535"),
    ("WEB_PORT", "70000", "a whole number from 1 to 65535"),
    ("FLOWER_PORT", "0", "a whole number from 1 to 65535"),
    ("ACCESS_TOKEN_TTL", "15m", "a whole number of at least 1"),
    ("RECOMPUTE_COUNTDOWN", "-1", "a number of at least 0"),
    ("COUNTER_FLUSH_INTERVAL", "inf", "a number of at least 0"),
    ("NEAR_CACHE_ENTRIES", "2e4", "a whole number of at least 0"),
    ("LOGIN_FAILURES_PER_ADDRESS", "0", "a whole number of at least 1"),
    ("CACHE_REFRESH_AHEAD", "1.5", "a number from 0 to 1"),
    ("CACHE_REFRESH_AHEAD", "nan", "a number from 0 to 1"),
    ("CACHE_REFRESH_AHEAD", "quarter", "a number from 0 to 1"),
])
def test_a_number_that_cannot_be_used_is_refused_with_its_name(name, given, says):
    with pytest.raises(SettingError) as refused:
        load_settings({"SECRET_KEY": "k", name: given})
    assert str(refused.value) == f"{name}={given!r}: give {says}"


def test_numbers_given_are_used_and_empty_ones_take_their_defaults():
    settings = load_settings({"SECRET_KEY": "k", "WEB_PORT": " 8080 ", "NEAR_CACHE_ENTRIES": "0",
                              "RECOMPUTE_COUNTDOWN": "0.5", "ACCESS_TOKEN_TTL": "",
                              "CACHE_REFRESH_AHEAD": "0"})
    assert (settings.web_port, settings.near_cache_entries) == (8080, 0)
    assert (settings.recompute_countdown, settings.access_token_ttl) == (0.5, 900)
    assert settings.cache_refresh_ahead == 0  # off
    assert load_settings({"SECRET_KEY": "k"}).cache_refresh_ahead == 0.25


@pytest.mark.parametrize("command", ["stack.up", "stack.cluster"])
def test_make_up_stops_on_a_refused_setting_before_it_starts_anything(command, tmp_path):
    env = {**os.environ, "WEB_PORT": "80a", "STACK_VAR_DIR": str(tmp_path),
           "SECRET_KEY": "k", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-m", command], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration: WEB_PORT='80a': give a whole number from 1 to 65535" in done.stdout
    assert "started" not in done.stdout and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())
