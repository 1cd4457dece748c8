"""A V3-compatible upstream for offline use and tests (think stripe-mock).

Written from the V3 contract alone: it imports nothing from the proxy's translation or composing
code, so it cannot share (and hide) the proxy's mistakes.
"""

from proxy.emulator.app import EMULATOR, create_emulator_app
from proxy.emulator.settings import EmulatorSettings

__all__ = ["EMULATOR", "EmulatorSettings", "create_emulator_app"]
