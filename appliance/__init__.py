"""The CRM appliance: configuration, database and operations (backup, monitor, ...)."""

__version__ = "0.1.0"
