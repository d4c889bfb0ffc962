"""ferray: facial-expression recognition as a distributed batch job on Ray."""
__version__ = "0.1.0"
