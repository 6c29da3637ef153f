"""Errors a user can act on. Each message names what is wrong and the fix; the CLI prints it as
one line (no traceback) and exits with status 2."""
from creditaudit.typedconfig import ConfigError

__all__ = ["ConfigError"]
