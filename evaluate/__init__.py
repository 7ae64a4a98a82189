"""Evaluation: prompt suites, generation, metrics, reports (installed as t2i_recap.evaluate)."""
