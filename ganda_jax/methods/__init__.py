"""One method per file: its networks' use, its losses and its phase order."""
