"""The version, in a module of its own: the package metadata reads it
(pyproject.toml) and modules that record it import it without importing the
package's ``__init__`` (no import cycle)."""

__version__ = "0.1.0"
