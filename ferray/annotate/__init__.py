"""Annotation of image and video archives: planning, detection, labelling, video sampling and summaries."""

from ferray.annotate.command import run

__all__ = ["run"]
