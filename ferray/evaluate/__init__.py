"""Evaluation: scoring, metrics, calibration, figures and the report."""

from ferray.evaluate.command import run

__all__ = ["run"]
