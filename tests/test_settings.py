"""Settings: the per-feature policies generated from the registry, the A1111 release line, and a bad
value stopping the boot with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import get_args

import pytest
from pydantic import ValidationError

from proxy import mappings
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
