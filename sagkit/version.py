"""sagkit's version, in a module of its own: any layer may read it without importing the
package root (which imports the layers)."""

__version__ = "0.3.0"
