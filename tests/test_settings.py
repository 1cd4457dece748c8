"""Settings: the per-feature policies generated from the registry, the A1111 release line, and a bad
value stopping the boot with a message naming the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

import pytest
from pydantic import AwareDatetime, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy import cli, mappings
from proxy.settings import Settings
from proxy.translate.features import ALL, REGISTRY, default_policies
from proxy.translate.profiles import PROFILES
from proxy.v2.translation import Translator
from tests.images import b64

NOT_ALLOWED = [(unit, policy) for unit in REGISTRY for policy in ALL if policy not in unit.allowed]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only what a test sets: no UPSCALE_PROXY_* from the shell running the suite."""
    for name in list(os.environ):
        if name.startswith("UPSCALE_PROXY_"):
            monkeypatch.delenv(name)


def env_name(unit) -> str:
    return f"UPSCALE_PROXY_POLICY_{unit.name.upper()}"


# --- policies -----------------------------------------------------------------------------------

def test__no_policy_settings__give_each_units_default():
    assert Settings().policies() == default_policies()


def test__native_scale_strict__is_refused_naming_the_variable():
    with pytest.raises(ValidationError) as e:
        Settings(policy_native_scale="strict")
    assert "UPSCALE_PROXY_POLICY_NATIVE_SCALE" in str(e.value)


@pytest.mark.parametrize(("unit", "policy"), NOT_ALLOWED, ids=[f"{u.name}-{p}" for u, p in NOT_ALLOWED])
def test__a_policy_the_unit_does_not_allow__is_refused_naming_the_variable_and_the_choices(unit, policy):
    with pytest.raises(ValidationError) as e:
        Settings(**{f"policy_{unit.name}": policy})
    msg = str(e.value)
    assert f"{env_name(unit)}={policy}" in msg and ", ".join(unit.allowed) in msg


def test__a_policy_that_is_no_policy__is_refused_naming_the_setting():
    with pytest.raises(ValidationError) as e:
        Settings(policy_crop="sometimes")
    assert "policy_crop" in str(e.value)


def test__global_strict__is_strict_where_allowed_and_the_default_elsewhere():
    chosen = Settings(policy="strict").policies()
    assert chosen == {unit.name: "strict" if "strict" in unit.allowed else unit.default for unit in REGISTRY}
    assert chosen["native_scale"] == "approximate"


def test__global_approximate__leaves_units_without_it_at_their_default():
    chosen = Settings(policy="approximate").policies()
    assert chosen["scale_to"] == "emulate" and chosen["crop"] == "approximate" and chosen["model"] == "approximate"


def test__a_units_own_policy__wins_over_the_global_one():
    chosen = Settings(policy="strict", policy_model="approximate", policy_native_scale="emulate").policies()
    assert (chosen["model"], chosen["native_scale"], chosen["crop"]) == ("approximate", "emulate", "strict")


@pytest.mark.parametrize("unit", REGISTRY, ids=lambda u: u.name)
def test__each_units_policy__is_read_from_its_environment_variable(unit, monkeypatch):
    other = next(p for p in unit.allowed if p != unit.default)
    monkeypatch.setenv(env_name(unit), other)
    assert Settings().policies() == {**default_policies(), unit.name: other}


# --- the A1111 release line -----------------------------------------------------------------------

def test__a1111_profile__the_setting_names_exactly_the_profiles():
    assert set(get_args(Settings.model_fields["a1111_profile"].annotation)) == set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test__a1111_profile__accepts_each_profile(name, monkeypatch):
    assert Settings(a1111_profile=name).profile is PROFILES[name]
    monkeypatch.setenv("UPSCALE_PROXY_A1111_PROFILE", name)
    assert Settings().profile is PROFILES[name]


@pytest.mark.parametrize("name", ["v1.4", "v1.9.3", "1.10", "V1.10", "v1.10.1", "latest", ""])
def test__a1111_profile__refuses_any_other_name(name):
    with pytest.raises(ValidationError) as e:
        Settings(a1111_profile=name)
    assert "a1111_profile" in str(e.value)


def test__translator_from_settings__plans_with_their_profile_policies_and_restorer():
    settings = Settings(a1111_profile="v1.10", policy_native_scale="emulate", policy_face="emulate",
                        face_restorer_url="http://gpu:7860/")
    translator = Translator.from_settings(mappings.load(), settings)
    plan = translator.translate({"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2, "gfpgan_visibility": 0.5},
                                b64(64, 48).encode()).plan
    assert plan.profile == "v1.10" and plan.read.keep_rgba
    assert plan.decisions == {"native_scale": "emulate", "face": "emulate"} and plan.faces is not None
    assert settings.face_restorer_url == "http://gpu:7860"


# --- the CLI ------------------------------------------------------------------------------------

def test__serve_with_a_policy_the_unit_does_not_allow__exits_2_naming_the_variable(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("UPSCALE_PROXY_")}
    env.update(UPSCALE_PROXY_POLICY_MODEL="emulate", UPSCALE_PROXY_DATA_DIR=str(tmp_path), UPSCALE_PROXY_PORT="0")
    done = subprocess.run([sys.executable, "-m", "proxy", "serve"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2, done.stderr
    assert "UPSCALE_PROXY_POLICY_MODEL=emulate" in done.stderr and "approximate, strict" in done.stderr
    assert "Traceback" not in done.stderr


# --- every setting: a bad value stops the boot, exit 2, naming it, never a traceback -------------

BAD_BY_NAME = {
    "host": ["", "not a host!", "\udcff"],
    "upstream": ["not a url", "ftp://example.com", ""],
    "v2_upstream": ["not a url", "ftp://example.com", "", "http://127.0.0.1:9/?q=1"],
    "migration_file": ["/nonexistent/migration.toml"],
    "public_url": ["not a url", "ftp://example.com", ""],
    "face_restorer_url": ["not a url", "ftp://example.com", ""],
    "successor_url": ["not a url", "ftp://example.com", ""],
    "deprecation_link": ["", "has a space", "<x>", "\udcff"],
    "fingerprint_secret": ["", " ", "\udcff"],
    "admin_token": ["", "too-short", "has spaces in it, sixteen+", "\udcff" * 20],
    "client_labels": ["not json", "[1]", '{"a": 1}', ""],
    "redis_url": ["not a url", "http://127.0.0.1:6379", ""],
    "redis_prefix": ["", "x" * 201],
    "brownouts": ["not json", "", "{}", '[{"start": "2025-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}]',
                  '[{"start": "x"}]'],
}


def bad_values(name: str, field: FieldInfo, a_file: Path) -> list[str]:
    """Representative bad values of a setting, from its type (or BAD_BY_NAME)."""
    if name in BAD_BY_NAME:
        return BAD_BY_NAME[name]
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    bound = {type(m).__name__: m for m in field.metadata}
    if kind is bool:
        return ["maybe", "", "2"]
    if kind is int:
        out = bound["Le"].le + 1 if "Le" in bound else bound["Ge"].ge - 1
        return ["many", "1.5", "", str(out)]
    if kind is float:
        low = str(bound["Gt"].gt) if "Gt" in bound else str(bound["Ge"].ge - 1)
        return ["many", "", "nan", "inf", low]
    if get_origin(kind) is Literal:
        return ["nope", ""]
    if kind is Path:
        return ["", str(a_file), str(a_file / "data")]
    if kind is AwareDatetime:
        return ["tomorrow", "2025-01-01T00:00:00", ""]
    if get_origin(kind) is list and get_args(kind) == (str,):
        return ["[not json", "[1]"]
    raise LookupError(f"no bad values known for {name} ({field.annotation}): add them to BAD_BY_NAME")


def serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("UPSCALE_PROXY_")}
    return subprocess.run([sys.executable, "-m", "proxy", "serve"], env={**clean, **env}, capture_output=True,
                          text=True, errors="backslashreplace", timeout=30, check=False)


def named(stderr: str, name: str) -> bool:
    return re.search(rf"^  UPSCALE_PROXY_{name.upper()}( at [^:]*)?: ", stderr, re.MULTILINE) is not None


@pytest.mark.parametrize("kind", range(5))
def test__serve_with_every_setting_bad__exits_2_naming_each_one_without_a_traceback(kind, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    values = {name: bad_values(name, field, a_file) for name, field in Settings.model_fields.items()}
    env = {f"UPSCALE_PROXY_{name.upper()}": bad[kind % len(bad)] for name, bad in values.items()}
    done = serve(env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    missing = [f"UPSCALE_PROXY_{name.upper()}={env[f'UPSCALE_PROXY_{name.upper()}']!r}" for name in values
               if not named(done.stderr, name)]
    assert not missing, f"accepted or not named: {missing}\n{done.stderr}"
    secret = next(line for line in done.stderr.splitlines() if "UPSCALE_PROXY_FINGERPRINT_SECRET" in line)
    assert "(got" not in secret  # a secret is never echoed


@pytest.mark.parametrize("value", ["not json", ""])
def test__serve_with_brownouts_that_are_not_json__exits_2_naming_it_in_two_lines(value, tmp_path):
    done = serve({"UPSCALE_PROXY_BROWNOUTS": value, "UPSCALE_PROXY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2 and named(done.stderr, "brownouts"), done.stderr
    assert "not JSON" in done.stderr and len(done.stderr.splitlines()) == 2, done.stderr


def test__a_value_pydantic_settings_cannot_decode__exits_2_naming_it(monkeypatch, capsys):
    class Decoded(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="UPSCALE_PROXY_TEST_")
        table: dict[str, int] = {}

    monkeypatch.setenv("UPSCALE_PROXY_TEST_TABLE", "not json")
    with pytest.raises(SystemExit) as e:
        cli._settings(Decoded, {})
    assert e.value.code == 2
    assert "  UPSCALE_PROXY_TEST_TABLE: can't be read" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "value"), [("compose_deadline", "inf"), ("sweep_interval", "inf"),
                                             ("compose_deadline", "nan")])
def test__unbounded_durations__must_be_finite(name, value):
    with pytest.raises(ValidationError) as e:
        Settings(**{name: value})
    assert name in str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::", "0.0.0.0", "localhost", "proxy.internal", "my_proxy"])
def test__host__accepts_addresses_and_names(host):
    assert Settings(host=host).host == host


def test__data_dir__may_not_exist_yet_but_may_not_be_a_file(tmp_path):
    assert Settings(data_dir=tmp_path / "a" / "b").data_dir == tmp_path / "a" / "b"
    (tmp_path / "f").write_text("")
    with pytest.raises(ValidationError, match="not a directory"):
        Settings(data_dir=tmp_path / "f" / "data")


@pytest.mark.parametrize("link", ["/_proxy/guide", "https://docs.example/v3-migration#upscale"])
def test__deprecation_link__is_a_path_or_an_http_url(link):
    assert Settings(deprecation_link=link).deprecation_link == link
