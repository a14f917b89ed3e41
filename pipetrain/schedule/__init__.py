"""Schedules as data: actions, builders, simulator."""
from pipetrain.schedule.actions import Action, Kind

__all__ = ["Action", "Kind"]
