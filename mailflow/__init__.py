"""mailflow: warehouse-native email notifications orchestrated by Prefect."""

__version__ = "0.1.0"
