"""Emulated upstreams for offline use and tests (think stripe-mock): V3 (`create_emulator_app`),
and the legacy V2 it replaces (`create_legacy_app`), which runs A1111's extras as V2 did.

Written from the contracts alone: they import nothing from the proxy's translation or composing
code, so they cannot share (and hide) the proxy's mistakes.
"""

from proxy.emulator.app import EMULATOR, create_emulator_app
from proxy.emulator.legacy import LEGACY_V2, create_legacy_app
from proxy.emulator.legacy_settings import LegacySettings
from proxy.emulator.settings import EmulatorSettings

__all__ = ["EMULATOR", "LEGACY_V2", "EmulatorSettings", "LegacySettings", "create_emulator_app",
           "create_legacy_app"]
