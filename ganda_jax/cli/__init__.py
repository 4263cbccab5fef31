"""Command-line tools besides train.py."""
