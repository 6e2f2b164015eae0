"""The one exception type for a user's mistake.

Raised anywhere a command's input is wrong (a config value, a path, a run directory of
the wrong kind). The entry points (:func:`dalle_jax.config.run`) print its message as
one line and exit with status 2; ``--debug`` or ``DALLE_JAX_DEBUG=1`` shows the
traceback instead.
"""


class UserError(Exception):
    """A mistake in what the user asked for; its message is one line saying what to do."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config.{key}: {message}" if key else message)
        self.key = key
