"""The README's configuration tables name every setting there is."""

from pathlib import Path

import pytest

from proxy.emulator import EmulatorSettings, LegacySettings
from proxy.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("cls", [Settings, EmulatorSettings, LegacySettings])
def test__readme__documents_every_setting(cls):
    prefix = cls.model_config["env_prefix"]
    missing = [name for name in cls.model_fields if f"`{prefix}{name.upper()}`" not in README]
    assert not missing


def test__readme_feature_table__is_the_registry():
    """The table between the `features` markers is what `upscale-v2-proxy guide --features` prints."""
    from proxy.guide import feature_table

    start, end = "<!-- features:start -->\n", "<!-- features:end -->"
    table = README[README.index(start) + len(start):README.index(end)]
    assert table == feature_table(), "regenerate it: upscale-v2-proxy guide --features"
