"""The one error type for mistakes a user can make: config, playbooks, command-line input.

Anything else that goes wrong is a bug and is logged with its context, never dressed up as this.
"""


class InferWatchError(Exception):
    """A user-caused error whose message says where the problem is and what was expected."""


class ConfigError(InferWatchError):
    """The config file (or a flag overriding it) is invalid."""
