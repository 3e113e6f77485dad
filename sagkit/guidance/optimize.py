"""Moved (see :data:`sagkit.bridges.MOVED_MODULES`): importing this warns and gives the new module."""

from ..bridges import bridge_module

bridge_module(__name__)
