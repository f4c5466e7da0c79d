"""Exceptions shared across packages (no project imports: any layer may raise them)."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message starts with its dotted path."""
