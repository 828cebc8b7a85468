"""The one exception type effdl raises for bad input.

Anything a user can get wrong (a missing file, an unknown preset, a prompt that
is too long, a config that does not match its weights) raises ``EffdlError``
with a message naming the problem; the CLI prints that message alone, without
a traceback.
"""


class EffdlError(ValueError):
    """Bad input or a bad environment, described in the message."""
