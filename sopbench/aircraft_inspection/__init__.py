"""Pre-flight airworthiness inspection: the running example of the SOP suite."""

from sopbench.aircraft_inspection.task import AircraftInspection

__all__ = ["AircraftInspection"]
