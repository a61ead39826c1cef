"""Chip characterization through any driver, model fitting, and eps."""
