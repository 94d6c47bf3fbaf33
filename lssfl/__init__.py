"""lssfl: cross-silo federated learning with Local Superior Soups."""

__version__ = "0.1.0"
