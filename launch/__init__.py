"""absl entry points: ``python -m launch.train``, and friends."""
