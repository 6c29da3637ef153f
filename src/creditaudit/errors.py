"""Errors a user can act on. Each message names what is wrong and the fix; the CLI prints it as
one line (no traceback) and exits with status 2."""


class ConfigError(ValueError):
    """A bad config key or value, or a combination the run cannot start with (e.g. an image-only
    architecture on vector data); the message says which and what is allowed."""
