"""Experiment entry points: main (absl app), train loop, data, models."""
